"""``weft lab``: run a whole Weft mesh on one Linux machine (see docs/lab.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import rich.markup
from rich.console import Console
from rich.table import Table

from weft.cli import lab_option
from weft.lab.lab import Lab, LabError, request_interrupt
from weft.lab.plan import PlanError

out = Console()
err = Console(stderr=True)


def _lab(ctx: click.Context) -> Lab:
    name: str = ctx.obj["lab"]

    def report(msg: str) -> None:
        err.print(f"[dim]·[/dim] {msg}", highlight=False)

    try:
        return Lab(name, report=report, identity_setup=lab_identity_setup)
    except PlanError as e:
        raise click.UsageError(str(e)) from None


_MAIN_PID = os.getpid()


def lab_identity_setup(state_dir: Path, nodes: list[str]) -> dict[str, str]:
    """The lab's CA (``<state>/ca``) and one bootstrap token per node (control plane code)."""
    from controlplane.identity.ca import init_ca
    from controlplane.identity.lab import lab_identity_paths, write_lab_tokens
    from weft.identity import DEFAULT_TRUST_DOMAIN

    paths = lab_identity_paths(state_dir)
    init_ca(DEFAULT_TRUST_DOMAIN).write(paths.ca_dir, force=True)
    return write_lab_tokens(paths.tokens_file, nodes)


def _interrupt(signum: int, _frame: object) -> None:
    # pyroute2 forks helper processes that inherit this handler; a helper told to stop
    # must just exit, not run `up`'s cleanup (it would tear the lab down under us).
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    # No raise here: a KeyboardInterrupt raised inside an at-fork hook or a logging lock
    # release is swallowed or leaves a lock held. `up` checks the flag between steps.
    request_interrupt(signal.Signals(signum).name)


def _fail(e: Exception) -> None:
    err.print(f"[red]error:[/red] {rich.markup.escape(str(e))}", highlight=False)
    sys.exit(1)


@click.group()
@lab_option("Lab name; several labs can coexist. Prefixes its namespaces (`<lab>-node-1`).")
@click.pass_context
def lab(ctx: click.Context, lab_name: str) -> None:
    """Run the mesh on this machine: nodes and pods as network namespaces and cgroups.

    \b
    Typical session:
      weft lab up --demo                   # 2 nodes, echo service, client pods
      weft lab status                      # who is where
      weft lab exec client-1 -- curl -s http://10.244.2.2:8080/
      weft lab down                        # leaves nothing behind
    """
    ctx.ensure_object(dict)
    ctx.obj["lab"] = lab_name


@lab.command()
@click.option("--nodes", default=2, show_default=True, help="Number of nodes (node-1..N).")
@click.option(
    "--pods-per-node",
    type=int,
    default=None,
    help="With --demo: echo replicas per node (default 1). Without: idle pods per node (0).",
)
@click.option("--demo", is_flag=True, help="Add the echo service (port 80 -> 8080) and clients.")
@click.option("--replace", is_flag=True, help="Tear down an existing lab of this name first.")
@click.option(
    "--keep-on-failure", is_flag=True, help="If up fails, leave what was made for inspection."
)
@click.option(
    "--agents/--no-agents",
    default=True,
    show_default=True,
    help="Start a Weft node agent per node (eBPF capture + node proxy).",
)
@click.option(
    "--leaf-lifetime",
    default=None,
    help="Workload certificate lifetime for the control plane (e.g. 30s to watch rotation; "
    "default 24h).",
)
@click.option(
    "--agent-arg",
    "agent_args",
    multiple=True,
    metavar="FLAG",
    help="An extra `weft agent` flag for every node's agent, kept for restarts; repeat it "
    "(e.g. --agent-arg=--ebpf-map-entries=4096).",
)
@click.option(
    "--traces",
    is_flag=True,
    help="Run the lab's OTLP receiver on the control-plane host (10.240.0.2:4318, spans "
    "as JSON at /api/traces) and start the agents exporting their spans to it.",
)
@click.option(
    "--trace-sample-rate",
    type=click.FloatRange(0.0, 1.0),
    default=1.0,
    show_default=True,
    help="With --traces: the agents' share of requests without a sampling decision of "
    "their own that start a trace (a caller's sampled flag is always followed).",
)
@click.option(
    "--mode",
    type=click.Choice(["node", "sidecar"]),
    default="node",
    show_default=True,
    help="sidecar: every captured pod runs its own proxy (weft sidecar, nftables capture "
    "in its netns) instead of being captured by its node's agent (docs/kubernetes.md).",
)
@click.option(
    "--sidecar",
    "sidecar_pods",
    multiple=True,
    metavar="POD",
    help="Run this pod in sidecar mode (repeatable; the rest stay in node mode).",
)
@click.pass_context
def up(
    ctx: click.Context,
    nodes: int,
    pods_per_node: int | None,
    demo: bool,
    replace: bool,
    keep_on_failure: bool,
    agents: bool,
    leaf_lifetime: str | None,
    agent_args: tuple[str, ...],
    traces: bool,
    trace_sample_rate: float,
    mode: str,
    sidecar_pods: tuple[str, ...],
) -> None:
    """Create the lab: fabric, nodes, pods, and (with --demo) demo workloads."""
    lab_ = _lab(ctx)
    plan = None
    if mode == "sidecar" or sidecar_pods:
        from weft.lab.plan import plan_lab
        from weft.lab.sidecar import with_sidecars

        try:
            plan = with_sidecars(
                plan_lab(lab_.name, nodes, pods_per_node, demo),
                None if mode == "sidecar" else sidecar_pods,
            )
        except (PlanError, ValueError) as e:
            _fail(e)
    # SIGTERM (and SIGINT, even if inherited as ignored) interrupt `up`, which then removes
    # what it made instead of leaving a half-built lab behind.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        lab_.up(
            nodes,
            pods_per_node,
            demo,
            replace=replace,
            keep_on_failure=keep_on_failure,
            agents=agents,
            controlplane_args=["--leaf-lifetime", leaf_lifetime] if leaf_lifetime else [],
            agent_args=list(agent_args),
            traces=traces,
            trace_sample_rate=trace_sample_rate,
            plan=plan,
        )
    except (LabError, PlanError, OSError) as e:
        _fail(e)
    _print_status(lab_.status())


@lab.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Remove every namespace, link, cgroup, pin, process and file of the lab."""
    lab_ = _lab(ctx)
    try:
        found = lab_.down()
    except (LabError, OSError) as e:
        _fail(e)
    if found:
        err.print(f"lab {lab_.name!r} removed")
    else:
        err.print(f"no lab {lab_.name!r} here; nothing to do")


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Print the lab state as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show nodes, pods, services and processes of the lab."""
    lab_ = _lab(ctx)
    try:
        data = lab_.status()
    except LabError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        _print_status(data)


@lab.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec(ctx: click.Context, pod: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside POD (its netns, cgroup and hosts file); exit code passes through.

    \b
    Example: weft lab exec client-1 -- curl -s http://echo-2:8080/
    """
    argv = list(command)
    if argv and argv[0] == "--":  # click passes the separator through with UNPROCESSED
        argv = argv[1:]
    if not argv:
        raise click.UsageError("no command given: weft lab exec POD -- COMMAND [ARGS...]")
    lab_ = _lab(ctx)
    try:
        lab_.exec(pod, argv)
    except (LabError, OSError) as e:
        _fail(e)


@lab.command()
@click.argument("pod")
@click.argument("changes", nargs=-1, required=True)
@click.pass_context
def label(ctx: click.Context, pod: str, changes: tuple[str, ...]) -> None:
    """Set (KEY=VALUE) or remove (KEY-) labels of POD; agents apply the change.

    \b
    Examples:
      weft lab label client-1 weft.io/capture-            # stop capturing client-1
      weft lab label echo-1 weft.io/inbound-mode=strict   # only the node may connect in
    """
    parsed = _changes(changes)
    lab_ = _lab(ctx)
    try:
        new = lab_.set_labels(pod, parsed)
    except LabError as e:
        _fail(e)
    labels = ", ".join(f"{k}={v}" for k, v in sorted(new.labels.items()))
    captured = lab_.load().plan.captured(new)
    err.print(f"{pod}: {labels} (captured: {captured}, strict: {new.strict})", highlight=False)


def _changes(changes: tuple[str, ...]) -> dict[str, str | None]:
    parsed: dict[str, str | None] = {}
    for c in changes:
        if "=" in c:
            k, v = c.split("=", 1)
            parsed[k] = v
        elif c.endswith("-"):
            parsed[c[:-1]] = None
        else:
            raise click.UsageError(f"{c!r}: use KEY=VALUE to set or KEY- to remove")
    return parsed


@lab.command()
@click.argument("service")
@click.argument("changes", nargs=-1, required=True)
@click.pass_context
def annotate(ctx: click.Context, service: str, changes: tuple[str, ...]) -> None:
    """Set (KEY=VALUE) or remove (KEY-) annotations of SERVICE (NAME or NS/NAME, as
    ``svc/NAME`` too), as ``kubectl annotate`` would; agents apply the change. Invalid
    values are rejected by the control plane (logged) and the last valid policy stays.

    \b
    Examples:
      weft lab annotate svc/echo weft.io/retry-http=5xx weft.io/retry-limit=2
      weft lab annotate echo weft.io/timeout-request=500ms
      weft lab annotate echo weft.io/retry-http-            # stop retrying
    """
    parsed = _changes(changes)
    if service.startswith(("svc/", "service/")):
        service = service.split("/", 1)[1]
    from weft.traffic import TrafficError, parse_traffic

    lab_ = _lab(ctx)
    try:
        new = lab_.annotate_service(service, parsed)
    except LabError as e:
        _fail(e)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(new.annotations.items())) or "(none)"
    err.print(f"{new.namespace}/{new.name}: {shown}", highlight=False)
    try:
        parse_traffic(new.annotations)
    except TrafficError as e:
        err.print(f"[yellow]warning:[/] rejected, the last valid policy stays: {e}")


def _read_objects(path: str) -> list[object]:
    import yaml  # type: ignore[import-untyped]

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise click.UsageError(f"{path}: {e}") from None


def _apply(ctx: click.Context, path: str, delete: bool) -> None:
    from weft.lab.apply import ApplyError

    docs = _read_objects(path)
    lab_ = _lab(ctx)
    try:
        lines = lab_.apply_objects(docs, delete=delete)
    except (ApplyError, LabError) as e:
        _fail(e)
    for line in lines:
        err.print(line, highlight=False, markup=False)


@lab.command()
@click.option("-f", "--filename", "path", required=True, help="YAML file (- for stdin).")
@click.pass_context
def apply(ctx: click.Context, path: str) -> None:
    """Create or update Services, Deployments, HTTPRoutes and GRPCRoutes from Kubernetes
    YAML, as ``kubectl apply -f`` would; prints each route's Accepted/ResolvedRefs
    conditions.

    A Deployment's replicas become lab pods spread over the nodes; each container's
    ``command``/``args`` runs as a process in its pod (the lab runs no images), started
    once the node's agent has captured the pod.

    \b
    Example: weft lab apply -f docs/examples/deployment.yaml
    """
    _apply(ctx, path, delete=False)


@lab.command()
@click.option("-f", "--filename", "path", required=True, help="YAML file (- for stdin).")
@click.pass_context
def delete(ctx: click.Context, path: str) -> None:
    """Delete the Services, Deployments (their pods stop and go) and routes a YAML file
    names (``kubectl delete -f``)."""
    _apply(ctx, path, delete=True)


@lab.command("restart-agent", context_settings={"ignore_unknown_options": True})
@click.argument("node")
@click.argument("agent_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def restart_agent(ctx: click.Context, node: str, agent_args: tuple[str, ...]) -> None:
    """Restart NODE's agent (pods stay captured meanwhile), optionally with AGENT_ARGS.

    \b
    Example: weft lab restart-agent node-1 -- --no-sockmap
    """
    args = list(agent_args)
    if args and args[0] == "--":
        args = args[1:]
    lab_ = _lab(ctx)
    try:
        lab_.restart_agent(node, args)
    except (LabError, OSError) as e:
        _fail(e)


@lab.command("stop")
@click.argument("name")
@click.pass_context
def stop_cmd(ctx: click.Context, name: str) -> None:
    """Stop one process of the lab: an echo replica, the control plane, an agent or the
    OTLP receiver (``otlp``, with --traces).

    \b
    For failure drills, e.g.:
      weft lab stop echo-2          # the mesh ejects it; requests go to echo-1
      weft lab stop controlplane    # agents keep serving with their last state
      weft lab stop otlp            # spans are dropped and counted; requests unaffected
    Start it again with `weft lab start NAME`.
    """
    try:
        _lab(ctx).stop_process(name)
    except (LabError, OSError) as e:
        _fail(e)


@lab.command("start")
@click.argument("name")
@click.pass_context
def start_cmd(ctx: click.Context, name: str) -> None:
    """Start again a process stopped with `weft lab stop` (echo replica, controlplane,
    agent-node-N, otlp)."""
    try:
        _lab(ctx).start_process(name)
    except (LabError, OSError) as e:
        _fail(e)


@lab.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (tail -f).")
@click.option("-n", "--lines", default=0, help="Only the last N lines (0: all).")
@click.pass_context
def logs(ctx: click.Context, name: str, follow: bool, lines: int) -> None:
    """Print the log of a process the lab started (see `weft lab status`)."""
    lab_ = _lab(ctx)
    try:
        path = lab_.log_path(name)
    except LabError as e:
        _fail(e)
    if follow:
        args = ["tail", "-n", str(lines) if lines else "+1", "-F", str(path)]
        try:
            sys.exit(subprocess.call(args))
        except KeyboardInterrupt:
            sys.exit(0)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        _fail(LabError(f"log {path} is gone"))
    if lines:
        text = "\n".join(text.splitlines()[-lines:]) + "\n"
    click.echo(text, nl=False)


def _print_status(data: dict[str, Any]) -> None:
    out.print(
        f"[bold]lab {data['name']}[/bold] — {data['phase']}, state in "
        f"{data['paths']['state_dir']}, cgroups under {data['paths']['cgroup_root']}",
        highlight=False,
    )
    nodes = Table("node", "address", "pod subnet", "netns", title="nodes", title_justify="left")
    for n in data["nodes"]:
        nodes.add_row(n["name"], n["ip"], n["pod_cidr"], n["netns"])
    out.print(nodes)
    pods = Table(
        "pod", "node", "ip", "namespace", "service account", "captured", "cgroup",
        title="pods", title_justify="left",
    )  # fmt: skip
    for p in data["pods"]:
        pods.add_row(
            p["name"], p["node"], p["ip"], p["namespace"], p["service_account"],
            "yes" if p["captured"] else "no", p["cgroup"] or "-",
        )  # fmt: skip
    out.print(pods)
    if data["services"]:
        svcs = Table("service", "vip", "ports", "endpoints", title="services", title_justify="left")
        for s in data["services"]:
            ports = ", ".join(
                f"{p['port']}->{p['target_port']}/{p['protocol']}" for p in s["ports"]
            )
            eps = ", ".join(f"{e['ip']}:{e['port']} ({e['pod']})" for e in s.get("endpoints", []))
            svcs.add_row(f"{s['namespace']}/{s['name']}", s["vip"], ports, eps)
        out.print(svcs)
    traces = data.get("traces")
    if traces:
        out.print(
            f"[bold]traces[/bold]: OTLP receiver on {traces['collector']} (netns "
            f"{traces['netns']}), agents sample requests without a decision at "
            f"{traces['sample_rate']:g}; spans: `weft lab exec node-1 -- curl -s "
            f"http://{traces['collector']}/api/traces`",
            highlight=False,
        )
    if data["processes"]:
        ps = Table("process", "in", "pid", "alive", "log", title="processes", title_justify="left")
        for r in data["processes"]:
            ps.add_row(
                r["name"], r["where"], str(r["pid"]), "yes" if r.get("alive") else "NO", r["log"]
            )
        out.print(ps)
