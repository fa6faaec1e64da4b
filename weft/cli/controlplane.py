"""``weft controlplane``: run the control plane (certificates and discovery for agents).

See docs/identity.md and docs/discovery.md."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from weft.identity import DEFAULT_TRUST_DOMAIN

if TYPE_CHECKING:
    from controlplane.identity.server import KubeSettings
from weft.wire import ADMIN_PORT, API_PORT

log = logging.getLogger("weft.controlplane")


@click.command()
@click.option(
    "--lab",
    "lab_name",
    envvar="WEFT_LAB",
    help="Serve this lab ($WEFT_LAB): discovery from its state file, bootstrap with its "
    "tokens. Without it: Kubernetes (watch the API server, TokenReview for bootstrap).",
)
@click.option(
    "--kube-server",
    envvar="WEFT_KUBE_SERVER",
    help="API server URL. Default: in-cluster (KUBERNETES_SERVICE_HOST, the pod's token and CA).",
)
@click.option("--kube-token-file", type=click.Path(dir_okay=False), help="Bearer token file.")
@click.option("--kube-ca-file", type=click.Path(dir_okay=False), help="API server CA bundle.")
@click.option(
    "--audience",
    default="weft-controlplane",
    show_default=True,
    help="Audience the agents' projected ServiceAccount tokens must carry.",
)
@click.option(
    "--agent-identity",
    default="weft-system/weft-agent",
    show_default=True,
    help="NAMESPACE/SERVICEACCOUNT of the node agents (only their tokens bootstrap).",
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
@click.option(
    "--default-inbound-policy",
    type=click.Choice(["all-unauthenticated", "all-authenticated", "cluster-authenticated",
                       "deny", "audit"]),
    help="Mesh-wide default for pods and namespaces without weft.io/default-inbound-policy "
         "(unset: all-authenticated, permissive pods stay permissive).",
)  # fmt: skip
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
    default_inbound_policy: str | None,
    kube_server: str | None,
    kube_token_file: str | None,
    kube_ca_file: str | None,
    audience: str,
    agent_identity: str,
) -> None:
    """Run the control plane: the agent API on :15010 (node bootstrap, workload
    certificates, the discovery stream) and admin (/metrics, /ready) on :15014.

    Validates the CA first and refuses to start, naming the problem, if it is unusable.

    \b
    Lab:         weft controlplane --lab NAME        (weft lab up does this)
    Kubernetes:  weft controlplane --ca-dir /etc/weft/ca
                 (in a pod; outside one add --kube-server URL --kube-token-file F)
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
        "default_inbound_policy": default_inbound_policy or "",
    }
    kube = None
    if lab_name is None:
        if ca_dir is None:
            raise click.UsageError("--ca-dir is required without --lab")
        settings["ca_dir"] = str(ca_dir)
        kube = _kube_settings(
            kube_server, kube_token_file, kube_ca_file, trust_domain, audience, agent_identity
        )
    else:
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
        run_controlplane(config, kube)
    except (CaError, ConfigError) as e:
        problems = e.problems if isinstance(e, CaError) else [str(e)]
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        click.echo("the control plane did not start", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


def _kube_settings(
    server: str | None,
    token_file: str | None,
    ca_file: str | None,
    trust_domain: str,
    audience: str,
    agent_identity: str,
) -> KubeSettings:
    import os

    from controlplane.discovery.kube import KubeConfig, KubeConfigError

    ns, sep, sa = agent_identity.partition("/")
    if not sep or not ns or not sa:
        raise click.UsageError(
            f"--agent-identity must be NAMESPACE/SERVICEACCOUNT, got {agent_identity!r}"
        )
    values = {
        k: v
        for k, v in os.environ.items()
        if k in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
    }
    values["trust_domain"] = trust_domain
    for key, value in (("server", server), ("token_file", token_file), ("ca_file", ca_file)):
        if value:
            values[key] = value
    try:
        api = KubeConfig.from_mapping(values)
    except KubeConfigError as e:
        raise click.UsageError(f"{e} (or use --lab NAME for a lab)") from None
    from controlplane.identity.server import KubeSettings

    return KubeSettings(api=api, audience=audience, agent=(ns, sa))
