"""``weft identity``: create and check the mesh's CA (see docs/identity.md)."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import NoReturn

import click
from rich.console import Console

from weft.identity import DEFAULT_TRUST_DOMAIN

out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


@click.group()
def identity() -> None:
    """The mesh's CA: a trust anchor (root) and an issuer (intermediate) that signs
    workload certificates.  `init` makes one, `check` validates one (yours or
    cert-manager's) the way the control plane does at start."""


@identity.command()
@click.option(
    "--trust-domain",
    default=DEFAULT_TRUST_DOMAIN,
    show_default=True,
    help="SPIFFE trust domain the CA serves (recorded in the Secret's annotation).",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write anchor.pem, issuer.pem and issuer.key (0600) into this directory.",
)
@click.option(
    "--secret-manifest",
    is_flag=True,
    help="Print a Secret (issuer) and a ConfigMap (trust bundle) to stdout for kubectl apply.",
)
@click.option(
    "--namespace",
    default="weft-system",
    show_default=True,
    help="Namespace of the manifest (with --secret-manifest).",
)
@click.option(
    "--secret-name",
    default="weft-ca",
    show_default=True,
    help="Name of the Secret (with --secret-manifest).",
)
@click.option("--anchor-days", default=365, show_default=True, help="Trust anchor lifetime.")
@click.option("--issuer-days", default=365, show_default=True, help="Issuer lifetime.")
@click.option("--force", is_flag=True, help="Overwrite an existing CA in --dir.")
@click.option(
    "--keep-anchor-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the anchor's private key (0600) to this file, outside --dir; keep it "
    "offline.  By default it is discarded.",
)
@click.option(
    "--anchor-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Sign a new issuer under this existing anchor instead of making a new anchor.",
)
@click.option(
    "--anchor-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The existing anchor's key (from --keep-anchor-key), with --anchor-cert.",
)
def init(
    trust_domain: str,
    directory: Path | None,
    secret_manifest: bool,
    namespace: str,
    secret_name: str,
    anchor_days: int,
    issuer_days: int,
    force: bool,
    keep_anchor_key: Path | None,
    anchor_cert: Path | None,
    anchor_key: Path | None,
) -> None:
    """Create a trust anchor and an issuer (ECDSA P-256).

    \b
    weft identity init --dir /etc/weft/ca
    weft identity init --secret-manifest | kubectl apply -f -
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from controlplane.identity.ca import CaError, init_ca, sha256_fingerprint
    from weft.identity import IdentityError

    if (directory is None) == (not secret_manifest):
        raise click.UsageError("give exactly one of --dir DIR or --secret-manifest")
    if (anchor_cert is None) != (anchor_key is None):
        raise click.UsageError("--anchor-cert and --anchor-key go together")
    anchor = None
    if anchor_cert is not None and anchor_key is not None:
        try:
            cert = x509.load_pem_x509_certificate(anchor_cert.read_bytes())
            key = serialization.load_pem_private_key(anchor_key.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            _fail(f"cannot read the existing anchor: {e}")
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            _fail(f"{anchor_key} is not an ECDSA key")
        anchor = (cert, key)
    try:
        bundle = init_ca(trust_domain, anchor_days, issuer_days, anchor=anchor)
        if directory is not None:
            written = bundle.write(directory, force=force, anchor_key_path=keep_anchor_key)
        else:
            if keep_anchor_key is not None:
                # Reuse write()'s checks and modes for the one file.
                from controlplane.identity.ca import write_file_atomic
                from weft.identity import key_pem

                if keep_anchor_key.exists() and not force:
                    _fail(f"{keep_anchor_key} exists; pass --force to overwrite it")
                assert bundle.anchor_key is not None
                write_file_atomic(keep_anchor_key, key_pem(bundle.anchor_key), 0o600)
            sys.stdout.write(bundle.secret_manifest(namespace, secret_name))
            written = [keep_anchor_key] if keep_anchor_key else []
    except (CaError, IdentityError) as e:
        _fail(str(e))
    for path in written:
        err.print(f"[dim]·[/dim] wrote {path}", highlight=False)
    err.print(
        f"trust domain {trust_domain}: anchor valid until "
        f"{bundle.anchor.not_valid_after_utc:%Y-%m-%d} "
        f"(SHA-256 {sha256_fingerprint(bundle.anchor)}), "
        f"issuer until {bundle.issuer.not_valid_after_utc:%Y-%m-%d}",
        highlight=False,
        soft_wrap=True,
    )
    if anchor is None and keep_anchor_key is None:
        err.print(
            "[dim]the anchor's key was discarded: renew by rotating the anchor "
            "(docs/identity.md)[/dim]",
            highlight=False,
        )
    if directory is not None:
        err.print(f"next: weft controlplane --ca-dir {directory} ...", highlight=False)


@identity.command()
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="CA directory: anchor.pem/issuer.pem/issuer.key or a mounted TLS Secret "
    "(ca.crt/tls.crt/tls.key).",
)
def check(directory: Path) -> None:
    """Validate a CA the way the control plane does at start; print the chain.

    Exits 1 and names every problem if the control plane would refuse to start.
    """
    from controlplane.identity.ca import (
        CaError,
        ca_files,
        describe,
        key_fingerprint,
        load_ca,
        sha256_fingerprint,
    )

    try:
        issuer = load_ca(directory)
    except CaError as e:
        for problem in e.problems:
            err.print(f"[red]problem:[/red] {problem}", highlight=False, soft_wrap=True)
        _fail(f"{directory}: the control plane would refuse to start with this CA")
    now = dt.datetime.now(dt.UTC)
    rows = [("issuer", issuer.cert)] + [("intermediate", c) for c in issuer.chain[1:]]
    rows += [("anchor", a) for a in issuer.anchors]
    # One block per certificate rather than a table: fingerprints do not fit in columns.
    for role, cert in rows:
        left = (cert.not_valid_after_utc - now).days
        days = f"[yellow]{left} days left[/yellow]" if left < 30 else f"{left} days left"
        out.print(f"[bold]{role:<12}[/bold] {describe(cert)}", highlight=False, soft_wrap=True)
        out.print(
            f"{'':<12} valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z → "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z ({days})",
            highlight=False,
            soft_wrap=True,
        )
        out.print(f"{'':<12} SHA-256 {sha256_fingerprint(cert)}", highlight=False, soft_wrap=True)
    files = ", ".join(p.name for p in ca_files(directory))
    out.print(
        f"{files}: OK — issuer key ECDSA P-256 (key SHA-256 {key_fingerprint(issuer.cert)[:16]}…), "
        f"leaves can be issued until {issuer.not_after:%Y-%m-%d %H:%M}Z",
        highlight=False,
        soft_wrap=True,
    )
    for warning in issuer.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
