"""``weft viz``: success rate, RPS, latency, TCP, edges and routes of the mesh, in a terminal.

Modelled on ``linkerd viz``. Reads every node agent's ``:15020/metrics`` directly (the
default: in a lab, from inside each node's network namespace) or a Prometheus that
scrapes them (``--prometheus URL``). Parsing and arithmetic live in `weft.viz`
(sans-I/O); this module parses options, asks a source and prints.

An agent that cannot be read is named on stderr (and under ``unreachable`` in JSON) and
the others are still shown: its pods' figures are missing, not zero. Only when no agent
answers at all does a command fail.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import click
import rich.markup
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from weft.cli import lab_option, output_option
from weft.viz import model
from weft.viz.model import Delta, Figures, Snapshot, Topology, Unreachable, VizError
from weft.viz.sources import (
    ADMIN_PORT,
    Agent,
    AgentSource,
    PrometheusSource,
    Source,
    SourceError,
    TapStream,
    lab_accounts,
    lab_agents,
    lab_tap_agents,
    lab_topology,
    load_lab,
)
from weft.viz.sources import why as sources_why

if TYPE_CHECKING:
    from weft.lab.state import LabState

err = Console(stderr=True, highlight=False, soft_wrap=True)


def _out() -> Console:
    # Piped output (scripts, tests) must not be cut at rich's default 80 columns.
    if sys.stdout.isatty():
        return Console(highlight=False)
    return Console(highlight=False, width=max(200, shutil.get_terminal_size().columns))


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {rich.markup.escape(message)}")
    sys.exit(1)


@dataclass
class Env:
    source: Source
    topology: Topology
    describe: str


def _agent(text: str) -> Agent:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(ADMIN_PORT)
    if not host or not port.isdigit():
        raise click.BadParameter(f"{text!r}: give HOST or HOST:PORT", param_hint="--agent")
    return Agent(text, host, int(port))


@click.group()
@lab_option("Lab whose agents are read, and whose pods and services name the rows.")
@click.option(
    "--prometheus",
    metavar="URL",
    help="Query this Prometheus (PromQL, HTTP API) instead of the agents.",
)
@click.option(
    "--agent",
    "agent_addrs",
    multiple=True,
    metavar="HOST[:PORT]",
    help="Scrape this agent's admin port (repeatable) instead of a lab's agents, "
    "e.g. through `kubectl port-forward`.",
)
@click.option(
    "--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait for each agent."
)
@click.pass_context
def viz(
    ctx: click.Context,
    lab_name: str,
    prometheus: str | None,
    agent_addrs: tuple[str, ...],
    timeout: float,
) -> None:
    """Golden metrics of the mesh: success rate, RPS, latency, TCP, edges, routes, tap.

    \b
      weft viz stat deploy                 # per workload, over a 10 s window
      weft viz stat pod -o wide            # per pod, with bytes/s
      weft viz stat deploy --from deploy/client
      weft viz edges deploy                # who talks to whom, identities, mTLS
      weft viz routes svc/echo             # per route, or [default]
      weft viz top                         # busiest traffic, live (--once for one table)
      weft viz tap deploy/echo --max 5     # live requests from the agents (loopback only)
      weft viz dashboard                   # the service graph in a browser (127.0.0.1)
    """

    ctx.obj = _Options(lab_name, prometheus, agent_addrs, timeout)


@dataclass(frozen=True)
class _Options:
    lab: str
    prometheus: str | None
    agents: tuple[str, ...]
    timeout: float


def _lab(o: _Options, instead: str | None) -> LabState | None:
    """The lab's state; when it cannot be read, None if other options say what to read
    (``instead`` None), else fail, naming the options that would do (``instead``)."""
    try:
        return load_lab(o.lab)
    except SourceError as e:
        if instead is not None:
            _fail(f"{e} (or give {instead})")
        return None


def _env(ctx: click.Context) -> Env:
    o: _Options = ctx.obj
    state = _lab(o, None if o.prometheus or o.agents else "--prometheus URL or --agent HOST:PORT")
    topology = lab_topology(state) if state is not None else Topology()
    source: Source
    if o.prometheus:
        source = PrometheusSource(o.prometheus)
    elif o.agents:
        source = AgentSource([_agent(a) for a in o.agents], timeout=o.timeout)
    else:
        assert state is not None
        source = AgentSource(
            lab_agents(state),
            timeout=o.timeout,
            hint=" (`weft lab logs agent-{0}`; `weft lab start agent-{0}` restarts it)",
        )
    where = f"lab {o.lab}" if state is not None else "no lab: rows are pods"
    return Env(source, topology, f"{source.describe()}, {where}")


def _namespace_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("-A", "--all-namespaces", is_flag=True, help="Rows of every namespace.")(f)
    f = click.option("-n", "--namespace", default="default", show_default=True)(f)
    return f


_output_option = output_option("table", "wide", "json")


def _window_option(default: float) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--window",
        type=click.FloatRange(min=0),
        default=default,
        show_default=True,
        metavar="SECONDS",
        help="Rates over this many seconds (two scrapes that far apart); 0: totals since "
        "the agents started, one scrape, no rates.",
    )


def _collect(env: Env, window: float, quiet: bool) -> tuple[list[Delta], list[Unreachable]]:
    def waiting(message: str) -> None:
        if not quiet:
            err.print(f"[dim]·[/dim] {message} (--window)")

    try:
        if window > 0:
            before, after = env.source.window(window, waiting)
            ds, down = model.deltas(before, after)
            answered = len(after.scrapes)
        else:
            snap = env.source.snapshot()
            ds, down = model.deltas(None, snap)
            answered = len(snap.scrapes)
    except SourceError as e:
        _fail(str(e))
    for u in down:
        what = rich.markup.escape(_unreachable(u))
        err.print(f"[yellow]warning:[/yellow] {what} — its pods' figures are missing below")
    if answered == 0:
        _fail("no agent answered; nothing to show")
    over = model.overflowed(ds)
    if over:
        err.print(
            f"[yellow]warning:[/yellow] {over:g} requests were counted under an agent's "
            "overflow series (its cardinality cap) and are not attributed"
        )
    return ds, down


def _unreachable(u: Unreachable, doing: str = "read") -> str:
    """What every command says of an agent it could not read (or tap): which, where, why."""
    return f"could not {doing} the agent of {u.describe()}"


def _missing_agents(env: Env, down: Sequence[Unreachable]) -> Callable[[model.StatRow], list[str]]:
    """The unreachable agents a row's figures are missing from (the nodes of its pods)."""
    down_nodes = {u.source for u in down}
    return lambda r: sorted(env.topology.nodes(r.kind, r.namespace, r.name) & down_nodes)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _rps(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}rps"


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}ms" if v < 10 else f"{v:.0f}ms"


def _bps(v: float | None) -> str:
    if v is None:
        return "-"
    for unit in ("B/s", "KiB/s", "MiB/s"):
        if v < 1024:
            return f"{v:.1f}{unit}"
        v /= 1024
    return f"{v:.1f}GiB/s"


def _num(v: float) -> str:
    return f"{v:g}"


def _table(*headers: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for h in headers:
        table.add_column(h, no_wrap=True)
    return table


def _add(table: Table, *cells: str) -> None:
    # Cells are data, not markup: a route named "[default]" must print as such.
    table.add_row(*(Text(c) for c in cells))


def _json(env: Env, window: float, down: Sequence[Unreachable], **payload: Any) -> None:
    """A figures command's ``-o json`` document: ``payload``, the window, the source and
    the agents that could not be read (``unreachable``; an empty list when all answered)."""
    unreachable = [{"source": u.source, "where": u.where, "reason": u.reason} for u in down]
    doc = {**payload, "window_seconds": window, "source": env.describe, "unreachable": unreachable}
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def _rate_cells(f: Figures) -> list[str]:
    return [
        _pct(f.success_rate),
        _rps(f.request_rate),
        _ms(f.latency(0.5)),
        _ms(f.latency(0.95)),
        _ms(f.latency(0.99)),
    ]


def _figures_cells(f: Figures, wide: bool) -> list[str]:
    cells = [*_rate_cells(f), _num(f.tcp_open)]
    if wide:
        cells += [_num(f.requests), _bps(f.read_rate), _bps(f.write_rate)]
    return cells


_RATE_HEADERS = ("SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99")
_FIGURE_HEADERS = (*_RATE_HEADERS, "TCP_CONN")
_WIDE_HEADERS = ("REQUESTS", "READ_BYTES/SEC", "WRITE_BYTES/SEC")


def _resource(kind_arg: str, name_arg: str | None) -> tuple[str, str | None]:
    kind, sep, name = kind_arg.partition("/")
    if sep and name_arg:
        raise VizError(f"give {kind_arg} or {kind} {name_arg}, not both")
    return model.parse_kind(kind), (name if sep else name_arg) or None


# -- stat ---------------------------------------------------------------------------------


@viz.command()
@click.argument("kind")
@click.argument("name", required=False)
@_namespace_options
@click.option(
    "--from",
    "from_",
    metavar="KIND/NAME",
    help="Only requests from this (e.g. deploy/client); rows are what it calls.",
)
@click.option(
    "--to", metavar="KIND/NAME", help="Only requests to this (e.g. svc/echo); rows are its callers."
)
@_output_option
@_window_option(10.0)
@click.pass_context
def stat(
    ctx: click.Context,
    kind: str,
    name: str | None,
    namespace: str,
    all_namespaces: bool,
    from_: str | None,
    to: str | None,
    output: str,
    window: float,
) -> None:
    """Success rate, RPS, latency percentiles and TCP connections per deploy|pod|svc|ns.

    \b
      weft viz stat deploy                 # every Deployment (app label) in -n
      weft viz stat pod echo-1 -o json
      weft viz stat deploy/echo --from deploy/client
    \b
    Figures are the destination's view (requests each workload received, counted by its
    node's proxy); with --from or --to, the client's (counted by the caller's node).
    """
    try:
        kind_, name_ = _resource(kind, name)
        source = model.parse_target(from_, namespace) if from_ else None
        dest = model.parse_target(to, namespace) if to else None
        env = _env(ctx)
        ds, down = _collect(env, window, output == "json")
        rows = model.stat(
            ds,
            env.topology,
            kind_,
            namespace=None if all_namespaces else namespace,
            name=name_,
            source=source,
            dest=dest,
        )
    except VizError as e:
        _fail(str(e))
    if name_ is not None and not rows:
        err.print(f"no {kind_}/{name_} in {namespace} with traffic or pods")
    missing = _missing_agents(env, down)
    if output == "json":
        rows_json = [{**r.to_json(), "missing_agents": missing(r)} for r in rows]
        _json(env, window, down, kind=kind_, rows=rows_json)
        return
    wide = output == "wide"
    headers = ["NAMESPACE"] if all_namespaces or kind_ == "ns" else []
    note = ("MISSING",) if down else ()
    table = _table(
        *headers, "NAME", "MESHED", *_FIGURE_HEADERS, *(_WIDE_HEADERS if wide else ()), *note
    )
    for r in rows:
        meshed = "-" if r.meshed is None else f"{r.meshed[0]}/{r.meshed[1]}"
        ns = [r.namespace] if headers else []
        gone = missing(r)
        lost = [f"agent of {', '.join(gone)} unreachable" if gone else ""] if note else []
        _add(table, *ns, r.name, meshed, *_figures_cells(r.figures, wide), *lost)
    _out().print(table)
    if window == 0:
        err.print("[dim]totals since the agents started (--window 0): no rates[/dim]")


# -- edges --------------------------------------------------------------------------------


@viz.command()
@click.argument("kind", type=click.Choice(["deploy", "deployment", "pod", "po"]))
@_namespace_options
@_output_option
@_window_option(0.0)
@click.pass_context
def edges(
    ctx: click.Context,
    kind: str,
    namespace: str,
    all_namespaces: bool,
    output: str,
    window: float,
) -> None:
    """Who talks to whom: both ends, their SPIFFE identities and whether the edge is mTLS.

    From the clients' side (each node's outbound series name both pods); by default
    every edge seen since the agents started, with --window only the active ones.
    """
    try:
        kind_ = model.parse_kind(kind)
        env = _env(ctx)
        ds, down = _collect(env, window, output == "json")
        rows = model.edges(ds, env.topology, kind_, namespace=None if all_namespaces else namespace)
    except VizError as e:
        _fail(str(e))
    if window > 0:
        rows = [r for r in rows if r.figures.tcp_opened or r.figures.requests or r.figures.tcp_open]
    if output == "json":
        _json(env, window, down, kind=kind_, edges=[r.to_json() for r in rows])
        return
    wide = output == "wide"
    extra = ("CONNS", "REQUESTS", "SUCCESS") if wide else ()
    table = _table("SRC", "DST", "SRC_NS", "DST_NS", "CLIENT_ID", "SERVER_ID", "SECURED", *extra)
    for r in rows:
        f = r.figures
        cells = [_num(f.tcp_opened), _num(f.requests), _pct(f.success_rate)] if wide else []
        _add(
            table,
            r.src,
            r.dst,
            r.src_namespace,
            r.dst_namespace,
            ",".join(sorted(f.client_ids)) or "-",
            ",".join(sorted(f.server_ids)) or "-",
            {"yes": "√ mTLS", "no": "plaintext", "partly": "partly mTLS"}.get(f.secured, "-"),
            *cells,
        )
    _out().print(table)


# -- routes -------------------------------------------------------------------------------


@viz.command()
@click.argument("target", metavar="svc/NAME")
@click.option("-n", "--namespace", default="default", show_default=True)
@_output_option
@_window_option(10.0)
@click.pass_context
def routes(ctx: click.Context, target: str, namespace: str, output: str, window: float) -> None:
    """Per-route figures of a service: its Gateway API routes, or [default] without any.

    Requests, retries and timeouts are counted per route; success and latency per
    workload only, so they are the service's (its endpoints'), on [default] or [all].
    """
    try:
        t = model.parse_target(target, namespace)
        if t.kind != "svc":
            raise VizError(f"{target!r}: give svc/NAME")
        env = _env(ctx)
        service = env.topology.service(t.namespace, t.name)
        if service is None:
            if env.topology.services:
                raise VizError(f"no service {t.namespace}/{t.name} in the lab")
            service = model.Service(t.namespace, t.name, {})
        ds, down = _collect(env, window, output == "json")
        rows = model.routes(ds, env.topology, service)
    except VizError as e:
        _fail(str(e))
    if output == "json":
        _json(env, window, down, service=service.key, routes=[r.to_json() for r in rows])
        return
    wide = output == "wide"
    extra = ("SKIPPED", "BACKENDS") if wide else ()
    table = _table("ROUTE", "SERVICE", *_RATE_HEADERS, "RETRIES", "TIMEOUTS", *extra)
    for r in rows:
        cells = [_num(r.retries_skipped), ",".join(sorted(r.backends)) or "-"] if wide else []
        counts = [_num(r.retries), _num(r.timeouts), *cells]
        _add(table, r.route, service.name, *_rate_cells(r.figures), *counts)
    _out().print(table)
    if any(r.route == model.ALL_ROUTES for r in rows):
        err.print(
            "[dim]success and latency are measured per workload, not per route: "
            "[all] shows the service's[/dim]"
        )


# -- top ----------------------------------------------------------------------------------


NO_PATH_NOTE = (
    "the agents' metrics carry no request path: rows are by authority (Host), "
    "and per route below when services have Gateway API routes"
)


def _top_view(
    since: list[Delta],
    recent: list[Delta] | None,
    namespace: str | None,
    rows: int,
    heading: str,
) -> Group:
    by_path = model.has_path(since)
    table = _table(
        "SOURCE",
        "DESTINATION",
        "PATH" if by_path else "AUTHORITY",
        "COUNT",
        "RPS",
        "SUCCESS",
        "LATENCY_P50",
        "LATENCY_P99",
    )
    for r in model.top(since, recent, namespace=namespace)[:rows]:
        f = r.figures
        rate = r.recent_rate if r.recent_rate is not None else f.request_rate
        _add(
            table,
            f"{r.src_namespace}/{r.src}",
            f"{r.dst_namespace}/{r.dst}",
            r.what,
            _num(f.requests),
            _rps(rate),
            _pct(f.success_rate),
            _ms(f.latency(0.5)),
            _ms(f.latency(0.99)),
        )
    parts: list[Any] = [Text(heading, style="bold")]
    if not by_path:
        parts.append(Text(NO_PATH_NOTE, style="dim"))
    parts.append(table)
    traffic = model.route_traffic(since)
    if traffic:
        routes_table = _table("SERVICE", "ROUTE", "BACKEND", "COUNT", "RPS")
        for t in traffic[:rows]:
            _add(
                routes_table,
                t.service,
                t.route or model.DEFAULT_ROUTE,
                t.backend or "-",
                _num(t.figures.requests),
                _rps(t.figures.request_rate),
            )
        parts += [Text(""), routes_table]
    return Group(*parts)


@viz.command()
@_namespace_options
@click.option("--once", is_flag=True, help="Print one table after --window seconds and exit.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes of the live view.",
)
@click.option("--rows", "max_rows", type=click.IntRange(min=1), default=20, show_default=True)
@output_option("table", "json", help_text="json implies --once.")
@_window_option(5.0)
@click.pass_context
def top(
    ctx: click.Context,
    namespace: str,
    all_namespaces: bool,
    once: bool,
    interval: float,
    max_rows: int,
    output: str,
    window: float,
) -> None:
    """The busiest traffic, live: source, destination, path (or authority), rates.

    Counts run from when the view started; RPS is over the last refresh. Ctrl-C quits.
    """
    try:
        env = _env(ctx)
    except VizError as e:
        _fail(str(e))
    ns = None if all_namespaces else namespace
    if once or output == "json":
        ds, down = _collect(env, window, output == "json")
        if output == "json":
            _json(
                env,
                window,
                down,
                by="path" if model.has_path(ds) else "authority",
                rows=[r.to_json() for r in model.top(ds, namespace=ns)[:max_rows]],
                routes=[
                    {
                        "service": t.service,
                        "route": t.route or model.DEFAULT_ROUTE,
                        "backend": t.backend,
                        "count": t.figures.requests,
                        "rps": t.figures.request_rate,
                    }
                    for t in model.route_traffic(ds)
                ],
            )
            return
        _out().print(
            _top_view(ds, None, ns, max_rows, f"weft viz top — {env.describe}, last {window:g} s")
        )
        return
    _live_top(env, ns, interval, max_rows)


def _live_top(env: Env, namespace: str | None, interval: float, max_rows: int) -> None:
    from rich.live import Live

    def snap() -> Snapshot:
        try:
            return env.source.snapshot()
        except SourceError as e:
            _fail(str(e))

    first = prev = snap()
    started = time.monotonic()
    console = Console(highlight=False)
    with Live(console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                cur = snap()
                since, down = model.deltas(first, cur)
                recent, _ = model.deltas(prev, cur)
                prev = cur
                heading = (
                    f"weft viz top — {env.describe} — {time.monotonic() - started:.0f} s"
                    " (Ctrl-C quits)"
                )
                view: list[Any] = [_top_view(since, recent, namespace, max_rows, heading)]
                view += [Text(_unreachable(u), style="yellow") for u in down]
                live.update(Group(*view), refresh=True)
        except KeyboardInterrupt:
            pass


# -- tap ----------------------------------------------------------------------------------


@viz.command()
@click.argument("resource", metavar="KIND/NAME")
@click.argument("name", required=False)
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--to", metavar="KIND/NAME", help="Only requests to this (e.g. pod/echo-1).")
@click.option("--from", "from_", metavar="KIND/NAME", help="Only requests from this.")
@click.option("--method", metavar="METHOD", help="Only requests of this method (GET, POST...).")
@click.option("--path", metavar="PREFIX", help="Only requests whose path starts so.")
@click.option(
    "--max",
    "max_events",
    type=click.IntRange(min=1),
    help="Exit after this many requests (from every agent together).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True, max=3600),
    metavar="SECONDS",
    help="Exit after this many seconds (default: until Ctrl-C, or the agents' 1 h).",
)
@output_option("table", "json", help_text="json: one JSON object per request, per line.")
@click.pass_context
def tap(
    ctx: click.Context,
    resource: str,
    name: str | None,
    namespace: str,
    to: str | None,
    from_: str | None,
    method: str | None,
    path: str | None,
    max_events: int | None,
    duration: float | None,
    output: str,
) -> None:
    """A live stream of requests to or from a resource, as the node agents see them.

    \b
      weft viz tap deploy/echo                      # Ctrl-C stops
      weft viz tap deploy/echo --max 5 -o json      # one JSON object per line
      weft viz tap pod/client-1 --to deploy/echo --method GET --path /api --duration 10
      weft viz --agent 127.0.0.1:15020 tap ns/default   # through kubectl port-forward
    \b
    Each request is shown by the caller's node (out) and the destination's (in): method,
    path, authority, status or the proxy's error, latency, both ends and their SPIFFE
    identities, the route. The agents serve their tap only to clients on the node itself
    (loopback): in the lab this runs inside each node's namespace (root); in Kubernetes,
    `kubectl port-forward` to the agent's pod and --agent. A reader slower than the traffic
    loses requests; the agent counts them and this says so.
    """
    from weft.viz import tap as tapview

    o: _Options = ctx.obj
    if o.prometheus:
        _fail("weft viz tap reads the agents, not Prometheus: drop --prometheus")
    try:
        kind, rname = _resource(resource, name)
        if rname is None:
            raise VizError(f"{resource!r}: give KIND/NAME, e.g. deploy/echo, pod/echo-1")
        target = model.Target(kind, rname, namespace)
        state = _lab(o, None if o.agents else "--agent HOST:PORT")
        topology = lab_topology(state) if state is not None and not o.agents else Topology()
        accounts = lab_accounts(state) if state is not None and not o.agents else {}
        query = tapview.tap_query(
            target,
            topology,
            accounts,
            to=model.parse_target(to, namespace) if to else None,
            from_=model.parse_target(from_, namespace) if from_ else None,
            method=method,
            path=path,
            max_events=max_events,
            duration=duration,
        )
    except VizError as e:
        _fail(str(e))
    if o.agents:
        agents = [_agent(a) for a in o.agents]
    else:
        assert state is not None
        agents = lab_tap_agents(state)
    _run_tap(agents, query, o.timeout, max_events, duration, output == "json", f"{target}")


def _run_tap(
    agents: Sequence[Agent],
    query: str,
    timeout: float,
    max_events: int | None,
    duration: float | None,
    as_json: bool,
    what: str,
) -> None:
    """Read every agent's stream in its own thread; print in arrival order."""
    import queue
    import threading

    from weft.viz import tap as tapview

    inbox: queue.Queue[tuple[Agent, dict[str, Any] | None, str | None]] = queue.Queue()
    streams = [TapStream(a, query, timeout) for a in agents]

    def read(stream: TapStream) -> None:
        try:
            for item in stream:
                inbox.put((stream.agent, item, None))
        except OSError as e:
            inbox.put((stream.agent, None, sources_why(e)))
            return
        inbox.put((stream.agent, None, ""))

    for stream in streams:
        threading.Thread(target=read, args=(stream,), name=f"tap-{stream.agent.name}",
                         daemon=True).start()  # fmt: skip
    deadline = None if duration is None else time.monotonic() + duration

    def emit(text: str) -> None:
        click.echo(text)
        sys.stdout.flush()  # live, also into a pipe (| jq)

    if not as_json:
        err.print(
            f"[dim]tapping {what} on {len(agents)} agent(s)"
            + ("" if deadline else " — Ctrl-C stops")
            + "[/dim]"
        )
        emit(tapview.line(tapview.TapRow.HEADERS))
    running, answered, shown = len(streams), False, 0
    try:
        while running and (max_events is None or shown < max_events):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                agent, item, problem = inbox.get(timeout=left if left is not None else 0.5)
            except queue.Empty:
                continue
            where = rich.markup.escape(f"{agent.name} ({agent.where})")
            if item is None:
                running -= 1
                if problem:
                    what = _unreachable(Unreachable(agent.name, agent.where, problem), "tap")
                    err.print(f"[yellow]warning:[/yellow] {rich.markup.escape(what)}")
                continue
            answered = True
            if "end" in item:
                if item["end"] == "agent stopping":
                    err.print(f"[yellow]warning:[/yellow] the agent of {where} stopped its tap")
                continue
            if "dropped" in item and "direction" not in item:
                err.print(
                    f"[yellow]warning:[/yellow] the agent of {where} dropped {item['dropped']} "
                    "request(s) so far: this reader is slower than the traffic (filter more)"
                )
                continue
            shown += 1
            if as_json:
                emit(json.dumps(item, sort_keys=True))
            else:
                emit(tapview.line(tapview.row(item).cells()))
    except KeyboardInterrupt:
        pass
    finally:
        for stream in streams:
            stream.close()
    if not answered and running == 0:
        _fail("no agent could be tapped")
    if not as_json:
        err.print(f"[dim]{shown} request(s)[/dim]")


# -- dashboard ----------------------------------------------------------------------------


def _listen(text: str) -> tuple[str, int]:
    from weft.viz.dashboard import DEFAULT_PORT

    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    if not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{text!r}: give HOST:PORT (port 0: any free one)")
    return host.strip("[]") or "127.0.0.1", int(port)


@viz.command()
@click.option(
    "--listen",
    default="127.0.0.1:50750",
    show_default=True,
    metavar="HOST:PORT",
    help="Where the page is served; loopback by default (it has no login). Port 0 picks one.",
)
@click.option(
    "-n",
    "--namespace",
    default=None,
    help="Only this namespace's workloads (default: every namespace).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.5),
    default=2.0,
    show_default=True,
    help="Seconds between polls of the agents (or the Prometheus).",
)
@click.option(
    "--window",
    type=click.FloatRange(min=1.0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Rates, success and latency over this many seconds (at least --interval).",
)
@click.option(
    "--traces",
    "traces_url",
    metavar="URL",
    help="A weft.lab.otlp receiver's URL for the traces panel (default: the lab's, if any).",
)
@click.pass_context
def dashboard(
    ctx: click.Context,
    listen: str,
    namespace: str | None,
    interval: float,
    window: float,
    traces_url: str | None,
) -> None:
    """Serve a live web page: the service graph, golden metrics, traces, the live tap.

    \b
      weft viz dashboard                   # http://127.0.0.1:50750/, Ctrl-C stops it
      weft viz dashboard --listen 127.0.0.1:0 --window 30
      weft viz --prometheus http://prom:9090 dashboard
    \b
    Workloads are nodes; an edge is who calls whom (mTLS or plaintext) with its RPS,
    success rate and latency over --window. Recent traces come from the lab's OTLP
    receiver (`weft lab up --traces`) or --traces URL. The live tap panel streams the
    requests of the workload picked in the graph (or all), read from the agents' tap as
    `weft viz tap` reads it (on their node's loopback) and relayed to the page.
    """
    import asyncio

    try:
        from weft.viz import dashboard as dash
    except ImportError as e:
        _fail(f"{e}: the dashboard's server needs aiohttp: pip install 'weft[dashboard]'")

    try:
        host, port = _listen(listen)
        config = dash.DashboardConfig(
            host=host, port=port, interval=interval, window=window, namespace=namespace
        )
        dash.check_assets(config.web_dir)
        env = _env(ctx)
        receiver = dash.receiver_from_url(traces_url) if traces_url else None
        tap_source = None
        if ctx.obj.agents:
            tap_source = dash.TapSource(
                [_agent(a) for a in ctx.obj.agents], env.topology, {},
                "--agent (each must be its node's loopback, e.g. kubectl port-forward)",
            )  # fmt: skip
        else:
            with_lab = None
            try:
                with_lab = load_lab(ctx.obj.lab)
            except SourceError:
                pass
            if with_lab is not None:
                tap_source = dash.lab_tap_source(with_lab)
                if receiver is None:
                    receiver = dash.lab_trace_receiver(with_lab)
    except (VizError, dash.AssetsMissing) as e:
        _fail(str(e))
    poller = dash.Poller(env.source, env.topology, config, env.describe)
    taps = dash.Taps(tap_source, namespace)

    async def serve() -> None:
        import signal

        running = await dash.start(poller, config, receiver, taps=taps)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        click.echo(f"weft viz dashboard: {running.url}", nl=True)
        sys.stdout.flush()
        traces = receiver.endpoint.where if receiver else "tracing not enabled"
        tapped = f"{len(tap_source.agents)} agents" if tap_source else "none (no lab)"
        err.print(
            f"[dim]polling {rich.markup.escape(env.describe)} every {interval:g} s, "
            f"rates over {window:g} s; traces: {rich.markup.escape(traces)}; "
            f"live tap: {tapped}; Ctrl-C stops[/dim]"
        )
        if not dash.is_loopback(host):
            err.print(
                f"[yellow]warning:[/yellow] listening on {host}: anyone who reaches it sees "
                "the mesh's workloads, identities and traffic (there is no login)"
            )
        waiter = asyncio.ensure_future(stop.wait())
        either: set[asyncio.Future[Any]] = {waiter, running.failed}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            await running.stop()
        if running.failed.done():
            _fail(f"the dashboard's poller failed: {running.failed.result()}")

    try:
        asyncio.run(serve())
    except OSError as e:
        _fail(str(e))
