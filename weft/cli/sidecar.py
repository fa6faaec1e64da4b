"""``weft sidecar`` (the proxy of one pod, and its init step) and ``weft inject``.

Sidecar mode is the alternative to the node agent (docs/kubernetes.md "Sidecar mode"):
``weft inject -f deploy.yaml | kubectl apply -f -`` adds the init container and the
sidecar to a workload's pods; ``weft sidecar init`` is what the init container runs and
``weft sidecar run`` what the sidecar container runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import IO

import click
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client

from weft.inject import SIDECAR_UID, InjectError, InjectOptions, inject_all


@click.group()
def sidecar() -> None:
    """Sidecar mode: the node proxy's stages scoped to one pod, inside it."""


@sidecar.command("init")
@click.option("--uid", type=int, default=SIDECAR_UID, show_default=True,
              help="The sidecar's uid, whose connections are not redirected.")  # fmt: skip
@click.option("--skip-ports", default="", help="Destination ports never redirected (a,b,c).")
@click.option("--print", "print_only", is_flag=True, help="Print the nftables rules only.")
def init(uid: int, skip_ports: str, print_only: bool) -> None:
    """Install the pod's capture (the init container; needs NET_ADMIN in the pod's netns).

    Outbound TCP goes to 127.0.0.1:15001 except the sidecar's own (by uid) and traffic to
    the pod's own addresses; new inbound TCP is accepted only to 15008 and 15020 and from
    loopback. Running it again replaces the table (idempotent).
    """
    from nodeagent.sidecar import capture_rules

    try:
        skip = tuple(int(p) for p in skip_ports.split(",") if p.strip())
    except ValueError:
        raise click.BadParameter(f"not a list of ports: {skip_ports!r}") from None
    rules = capture_rules(uid, skip_ports=skip)
    if print_only:
        click.echo(rules, nl=False)
        return
    try:
        out = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True)
    except FileNotFoundError:
        raise click.ClickException("nft not found: the image needs nftables") from None
    if out.returncode != 0:
        raise click.ClickException(f"nft -f failed: {out.stderr.strip()}")
    click.echo(f"weft sidecar init: capture installed (uid {uid} exempt)")


@sidecar.command("run")
@click.option("--drop-to-uid", type=int, default=None,
              help="Start as root, then run as this uid once the code is loaded (the lab: "
              "its interpreter may not be readable by the sidecar's uid).")  # fmt: skip
def run(drop_to_uid: int | None) -> None:
    """Run the sidecar proxy (configured by the environment `weft inject` sets)."""
    from nodeagent.sidecar import SidecarConfig, SidecarError, preload
    from nodeagent.sidecar import run as run_sidecar

    if drop_to_uid is not None:
        preload()
        os.setgroups([])
        os.setgid(drop_to_uid)
        os.setuid(drop_to_uid)

    try:
        cfg = SidecarConfig.from_env(os.environ)
    except SidecarError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(run_sidecar(cfg))


@click.command()
@click.option("-f", "--filename", type=click.File("r"), required=True,
              help="Kubernetes YAML (Pods, Deployments, ...); - for stdin.")  # fmt: skip
@click.option("--image", default=InjectOptions.image, show_default=True)
@click.option("--controlplane", default=InjectOptions.controlplane, show_default=True)
@click.option("--trust-domain", default=InjectOptions.trust_domain, show_default=True)
@click.option("--trust-bundle-configmap", default=InjectOptions.trust_bundle_configmap,
              show_default=True, help="ConfigMap with ca.crt, in the pod namespace.")  # fmt: skip
@click.option("--audience", default=InjectOptions.audience, show_default=True,
              help="The pod token's audience: the control plane's --audience.")  # fmt: skip
@click.option("--rewrite-probes/--no-rewrite-probes", default=True, show_default=True,
              help="Point HTTP/TCP/gRPC probes at the sidecar, which runs them.")  # fmt: skip
def inject(
    filename: IO[str], image: str, controlplane: str, trust_domain: str,
    trust_bundle_configmap: str, audience: str, rewrite_probes: bool,
) -> None:  # fmt: skip
    """Add Weft's sidecar (and its init container) to the pods of a manifest; to stdout.

    Idempotent: an injected manifest comes back unchanged. `weft inject -f deploy.yaml |
    kubectl apply -f -`.
    """
    opts = InjectOptions(
        image=image,
        controlplane=controlplane,
        trust_domain=trust_domain,
        trust_bundle_configmap=trust_bundle_configmap,
        audience=audience,
        rewrite_probes=rewrite_probes,
    )
    try:
        docs = list(yaml.safe_load_all(filename))
        out = inject_all(docs, opts)
    except yaml.YAMLError as e:
        raise click.ClickException(f"{filename.name}: not YAML: {e}") from None
    except InjectError as e:
        raise click.ClickException(str(e)) from None
    click.echo(yaml.safe_dump_all(out, sort_keys=False), nl=False)
