"""``weft controlplane``: run the control plane's certificate API (see docs/identity.md)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from weft.identity import DEFAULT_TRUST_DOMAIN
from weft.wire import ADMIN_PORT, API_PORT

log = logging.getLogger("weft.controlplane")


@click.command()
@click.option(
    "--lab",
    "lab_name",
    envvar="WEFT_LAB",
    help="Take node binding and bootstrap tokens from this lab ($WEFT_LAB). Kubernetes "
    "sources (Pod watch, TokenReview) are not implemented yet, so this is required today.",
)
@click.option(
    "--ca-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="CA directory (weft identity init --dir, or a mounted TLS Secret). "
    "Default with --lab: the lab's ca/ directory.",
)
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option("--listen", default="0.0.0.0", show_default=True, help="Address for both ports.")
@click.option("--api-port", default=API_PORT, show_default=True, help="Agent API (TLS 1.3).")
@click.option("--admin-port", default=ADMIN_PORT, show_default=True, help="/metrics, /ready.")
@click.option(
    "--leaf-lifetime", default="24h", show_default=True, help="Workload certificate lifetime."
)
@click.option("--node-lifetime", default="1h", show_default=True, help="Node certificate lifetime.")
@click.option(
    "--sign-workers", default=2, show_default=True, help="Threads that sign off the event loop."
)
def controlplane(
    lab_name: str | None,
    ca_dir: Path | None,
    trust_domain: str,
    listen: str,
    api_port: int,
    admin_port: int,
    leaf_lifetime: str,
    node_lifetime: str,
    sign_workers: int,
) -> None:
    """Run the control plane: CSR signing for node agents on :15010, admin on :15014.

    Validates the CA first and refuses to start, naming the problem, if it is unusable.
    """
    from controlplane.identity.ca import CaError
    from controlplane.identity.lab import lab_identity_paths
    from controlplane.identity.server import ConfigError, ControlPlaneConfig, run_controlplane
    from weft.lab.plan import PlanError, validate_lab_name
    from weft.lab.state import lab_paths

    settings = {
        "trust_domain": trust_domain,
        "listen_address": listen,
        "api_port": str(api_port),
        "admin_port": str(admin_port),
        "leaf_lifetime": leaf_lifetime,
        "node_lifetime": node_lifetime,
        "sign_workers": str(sign_workers),
    }
    if lab_name is None:
        raise click.UsageError(
            "--lab NAME is required: Kubernetes sources (Pod watch, TokenReview) are not "
            "implemented yet"
        )
    try:
        validate_lab_name(lab_name)
    except PlanError as e:
        raise click.UsageError(str(e)) from None
    paths = lab_identity_paths(lab_paths(lab_name, None).state_dir)
    settings |= {
        "state_file": str(paths.state_file),
        "tokens_file": str(paths.tokens_file),
        "ca_dir": str(ca_dir or paths.ca_dir),
    }
    try:
        config = ControlPlaneConfig.from_mapping(settings)
        run_controlplane(config)
    except (CaError, ConfigError) as e:
        problems = e.problems if isinstance(e, CaError) else [str(e)]
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        click.echo("the control plane did not start", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
