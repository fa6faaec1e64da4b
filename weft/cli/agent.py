"""``weft agent``: run the node agent (eBPF capture + node proxy) for one node."""

from __future__ import annotations

import logging
import sys

import click

log = logging.getLogger("weft.agent")


def _ports(value: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in value.split(",") if p.strip())
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of ports: {value!r}") from None
    bad = [p for p in ports if not 0 < p < 65536]
    if bad:
        raise click.BadParameter(f"ports out of range: {bad}")
    return ports


@click.command()
@click.option("--node", required=True, help="The node this agent serves (e.g. node-1).")
@click.option(
    "--lab",
    "lab_name",
    envvar="WEFT_LAB",
    required=True,
    help="Read pods from this lab's state ($WEFT_LAB). Kubernetes mode comes with discovery.",
)
@click.option("--outbound-port", default=15001, show_default=True)
@click.option("--admin-port", default=15020, show_default=True)
@click.option(
    "--exclude-ports",
    default="",
    help="Comma-separated destination ports never captured (e.g. 6443).",
)
@click.option(
    "--sockmap/--no-sockmap",
    default=True,
    show_default=True,
    help="Shortcut same-node pod<->proxy bytes with sk_msg.",
)
@click.option(
    "--connect-timeout",
    default=1.5,
    show_default=True,
    help="Seconds one endpoint may take to accept a connection (then another is tried).",
)
@click.option(
    "--connect-attempts",
    default=3,
    show_default=True,
    help="Endpoints tried for one connection to a service before the app's is reset.",
)
@click.option(
    "--idle-timeout",
    default=3600.0,
    show_default=True,
    help="Seconds without a byte either way after which a connection is closed.",
)
@click.option(
    "--warm-tunnels",
    default=1,
    show_default=True,
    help="Spare handshaken tunnels per recently used (source, node, destination); 0: none.",
)
@click.option("--drain", default=5.0, show_default=True, help="Seconds to drain on shutdown.")
@click.option(
    "--uninstall",
    "do_uninstall",
    is_flag=True,
    help="Detach every Weft program of this node and remove its pinned maps, then exit.",
)
def agent(
    node: str,
    lab_name: str,
    outbound_port: int,
    admin_port: int,
    exclude_ports: str,
    sockmap: bool,
    connect_timeout: float,
    connect_attempts: int,
    idle_timeout: float,
    warm_tunnels: int,
    drain: float,
    do_uninstall: bool,
) -> None:
    """Run the node agent: capture local pods with eBPF and proxy their connections.

    Run it inside the node's network namespace (the lab does this for you). Stopping it
    leaves pods captured; `--uninstall` releases them.
    """
    # Imported here so that other commands (and --help) do not load bcc.
    from nodeagent.agent import AgentConfig, AgentError, run, uninstall

    try:
        cfg = AgentConfig.for_lab(
            lab_name,
            node,
            outbound_port=outbound_port,
            admin_port=admin_port,
            skip_ports=_ports(exclude_ports),
            sockmap=sockmap,
            attempt_timeout=connect_timeout,
            connect_attempts=connect_attempts,
            idle_timeout=idle_timeout,
            warm_tunnels=warm_tunnels,
            drain_seconds=drain,
        )
        if do_uninstall:
            for line in uninstall(cfg) or ["nothing of Weft was attached"]:
                click.echo(line)
            return
        log.info("starting agent with %s", cfg)
        sys.exit(run(cfg))
    except AgentError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
