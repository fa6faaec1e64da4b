"""`weft viz dashboard`: the mesh's service graph and golden metrics in a browser.

One asyncio process: a poller (a named, guarded task) asks the source every
``interval`` seconds for a snapshot — the agents (scraped in their nodes' network
namespaces, one thread each, as the terminal commands do) or a Prometheus — and keeps
them in a `weft.viz.board.History`; an aiohttp server answers the page's JSON
endpoints from the latest views and serves the page and its one library (cytoscape,
installed from npm into ``weft/viz/web/node_modules`` by ``make setup``; no CDN, so the
page works where the browser has no Internet, as in the lab).

Why aiohttp: one well-kept asyncio library is both the HTTP server and nothing else we
need (no ASGI server beside a framework, no templates: the page is static and reads
JSON). The views are computed once per poll, not per request, so any number of open
pages costs the agents one scrape per interval.

Endpoints: ``/`` (the page), ``/static/…``, ``/api/graph``, ``/api/stat?kind=deploy|pod|svc``,
``/api/traces`` (from the lab's OTLP receiver when one runs, `TraceReceiver`),
``/api/tap?workload=NS/NAME`` (server-sent events, `Taps`), ``/healthz``.

The live tap is relayed, not opened wider: the agents serve ``/tap`` to clients on their
node only, so this server reads it as ``weft viz tap`` does (in the lab at 127.0.0.1
inside each node's namespace, `TapSource`), one stream per agent per open page, and
writes the events to the page as server-sent events. Server-sent events rather than a
websocket: the page only listens, the browser reconnects by itself, and it is plain
HTTP that the host check below covers as it does the other endpoints. Each page's
events wait in a bounded queue (`weft.viz.tap.TapRelay`: a page slower than the traffic
loses requests, counted and shown), at most `MAX_TAP_PAGES` pages tap at once (each
holds one of every agent's few tap slots), and the agents' streams are closed when the
page goes away.

Bound to 127.0.0.1 by default: the page shows workload identities and traffic and has
no login. On a loopback address requests must also name a loopback ``Host``, so a web
page elsewhere cannot read it through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from weft.viz import board
from weft.viz import tap as tapview
from weft.viz.model import Snapshot, Target, Topology, VizError
from weft.viz.sources import (
    Agent,
    PrometheusSource,
    Source,
    SourceError,
    TapStream,
    fetch_json,
    lab_accounts,
    lab_tap_agents,
    lab_topology,
    why,
)

if TYPE_CHECKING:
    from weft.lab.state import LabState

log = logging.getLogger("weft.viz.dashboard")

WEB_DIR = Path(__file__).parent / "web"
DEFAULT_PORT = 50750
"""Linkerd's dashboard port: a habit operators already have."""
TRACES_SHOWN = 20
TRACES_DETAILED = 10
"""Of the traces shown, how many are fetched whole (their hops)."""

STATIC = {
    "dashboard.js": ("dashboard.js", "text/javascript"),
    "dashboard.css": ("dashboard.css", "text/css"),
    "cytoscape.min.js": ("node_modules/cytoscape/dist/cytoscape.min.js", "text/javascript"),
}
"""What ``/static/NAME`` serves (paths under `WEB_DIR`): a fixed list, not a directory."""

STAT_KINDS = ("deploy", "pod", "svc")


class AssetsMissing(RuntimeError):
    """The page's library is not installed (the message says how to install it)."""


def check_assets(web_dir: Path = WEB_DIR) -> None:
    for name, (rel, _) in STATIC.items():
        if not (web_dir / rel).is_file():
            raise AssetsMissing(
                f"{web_dir / rel} not found ({name}, the dashboard's graph library from npm): "
                f"run `make dashboard` (npm ci in {web_dir}), or `make setup`"
            )


@dataclass(frozen=True)
class DashboardConfig:
    host: str = "127.0.0.1"
    """Address to listen on; loopback unless the page must be reached from elsewhere."""
    port: int = DEFAULT_PORT
    """Port to listen on (0: any free one; the URL printed names it)."""
    interval: float = 2.0
    """Seconds between polls of the source."""
    window: float = 10.0
    """Seconds the rates, success and latency are over (``weft viz stat --window``)."""
    namespace: str | None = None
    """Only this namespace's workloads (None: every namespace)."""
    web_dir: Path = WEB_DIR
    """The page and its installed npm packages."""

    def __post_init__(self) -> None:
        if not (self.interval > 0 and math.isfinite(self.interval)):
            raise VizError("--interval must be a positive number of seconds")
        if not (self.window >= self.interval and math.isfinite(self.window)):
            raise VizError("--window must be at least --interval seconds")


# -- traces -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceReceiver:
    """Where the page's traces come from: a `weft.lab.otlp` receiver's JSON API."""

    endpoint: Agent
    """Host, port and network namespace it is reached at (`fetch_json` goes there)."""
    how: str
    """How it was found, for the page: ``the lab's process otlp``, ``--traces``."""


def _listen_arg(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.partition("=")[2]
    return None


def _host_port(text: str, default_port: int) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    if not port.isdigit():
        return None
    host = host.strip("[]")
    # A receiver listening on every address is reached at loopback inside its namespace.
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return host, int(port)


def lab_trace_receiver(state: LabState) -> TraceReceiver | None:
    """The OTLP receiver a lab runs (``weft lab up --traces``), if it names one.

    The lab's ``traces`` record (``collector`` host:port, the ``netns`` it listens in);
    else what the lab ran: a process running ``weft.lab.otlp`` (its ``--listen``
    address, in its namespace), or the agents' ``--trace-collector`` (reached from the
    first node, as the agents reach it). The receiver serves its JSON API on the
    OTLP/HTTP port."""
    plan = state.plan
    if state.traces is not None and state.traces.get("collector"):
        addr = _host_port(str(state.traces["collector"]), 4318)
        netns = state.traces.get("netns")
        if addr is not None:
            return TraceReceiver(
                Agent("otlp", addr[0], addr[1], str(netns) if netns else None),
                "the lab's OTLP receiver (weft lab up --traces)",
            )
    for rec in state.processes:
        if "weft.lab.otlp" not in rec.argv:
            continue
        addr = _host_port(_listen_arg(rec.argv, "--listen") or "127.0.0.1:4318", 4318)
        if addr is not None:
            where = plan.netns(rec.where) if rec.where else None
            return TraceReceiver(
                Agent(rec.name, addr[0], addr[1], where), f"the lab's process {rec.name}"
            )
    collector = _listen_arg(state.agent_args, "--trace-collector")
    if collector and plan.nodes:
        addr = _host_port(collector, 4318)
        if addr is not None:
            node = plan.nodes[0].name
            return TraceReceiver(
                Agent("trace collector", addr[0], addr[1], plan.netns(node)),
                "the lab agents' --trace-collector",
            )
    return None


def receiver_from_url(url: str) -> TraceReceiver:
    """``--traces http://HOST:PORT``: a receiver reached from this namespace."""
    parts = urllib.parse.urlsplit(url if "//" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise VizError(f"--traces {url!r}: give http://HOST:PORT of a weft.lab.otlp receiver")
    return TraceReceiver(Agent("traces", parts.hostname, parts.port or 4318), "--traces")


Fetch = Callable[[Agent, str, float], object]


def read_traces(receiver: TraceReceiver, fetch: Fetch = fetch_json) -> dict[str, Any]:
    """``/api/traces``'s answer (blocking: run in a thread)."""
    where = receiver.endpoint.where
    base = {"enabled": True, "receiver": where, "how": receiver.how}
    try:
        summaries = fetch(receiver.endpoint, f"/api/traces?limit={TRACES_SHOWN}", 3.0)
        if not isinstance(summaries, list):
            raise OSError("/api/traces did not answer a list")
        spans: dict[str, Sequence[dict[str, Any]]] = {}
        for s in summaries[:TRACES_DETAILED]:
            trace_id = str(s.get("traceId", ""))
            whole = fetch(receiver.endpoint, f"/api/traces/{trace_id}", 3.0)
            if isinstance(whole, dict) and isinstance(whole.get("spans"), list):
                spans[trace_id] = whole["spans"]
    except OSError as e:
        return {**base, "error": f"the trace receiver at {where} cannot be read: {e}",
                "traces": []}  # fmt: skip
    return {**base, "error": None, "traces": board.traces(summaries, spans)}


NOT_ENABLED: dict[str, Any] = {
    "enabled": False,
    "error": None,
    "traces": [],
    "note": "tracing not enabled: the lab runs no OTLP receiver "
    "(`weft lab up --traces`), and no --traces URL was given",
}


# -- the live tap -----------------------------------------------------------------------------

TAP_QUEUE = 500
"""Requests held per page between the agents' readers and the page's connection; beyond
that they are dropped and counted (the page keeps fewer rows than this itself)."""
MAX_TAP_PAGES = 4
"""Pages tapping at once: each holds one of every agent's tap slots, of which an agent has
`nodeagent.tap.MAX_SUBSCRIBERS` (16) for everyone on its node."""
TAP_KEEPALIVE = 10.0
"""Seconds of quiet after which a comment is written: it keeps proxies from timing the
stream out."""
TAP_CHECK = 1.0
"""Seconds between looks at whether the page is still connected (a quiet stream writes
nothing that could fail)."""
TAP_RETRY_MS = 5000
"""How long the browser waits to reconnect a stream that ended (every agent gone)."""


@dataclass(frozen=True)
class TapSource:
    """Where the tap panel's events come from: agents reached as their tap is (loopback)."""

    agents: Sequence[Agent]
    topology: Topology
    """Resolves a workload into the pods and service accounts the agents match."""
    accounts: tapview.Accounts
    how: str
    """How the agents are reached, for the page."""


def lab_tap_source(state: LabState) -> TapSource:
    """A lab's agents, at 127.0.0.1 inside each node's namespace (as ``weft viz tap``)."""
    return TapSource(
        lab_tap_agents(state),
        lab_topology(state),
        lab_accounts(state),
        "the lab's agents, at 127.0.0.1 in each node's namespace",
    )


def tap_query(source: TapSource, workload: str, namespace: str | None) -> str:
    """The agents' ``/tap`` query for a page's ``workload`` (``NS/NAME``, a node of the
    graph; empty: every request, or the dashboard's namespace's)."""
    if not workload:
        return f"ns={namespace}" if namespace else ""
    ns, sep, name = workload.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise VizError(f"workload={workload!r}: give NAMESPACE/NAME, as the graph names it")
    return tapview.tap_query(Target("deploy", name, ns), source.topology, source.accounts)


OpenTap = Callable[[Agent, str], TapStream]


def _read_agent(stream: TapStream, relay: tapview.TapRelay) -> None:
    """A reader thread: one agent's stream into the page's relay, then its end."""
    name = stream.agent.name
    try:
        for event in stream:
            if stream.closed:
                return
            relay.put(tapview.Relayed(name, event))
    except OSError as e:
        if not stream.closed:
            relay.put(tapview.Relayed(name, None, f"could not tap it at {stream.agent.where}: "
                                                  f"{why(e)}"))  # fmt: skip
        return
    relay.put(tapview.Relayed(name, None, ""))


class Taps:
    """``/api/tap``: each page's server-sent events, relayed from every agent's tap.

    Messages: ``status`` (first, and whenever it changes: the agents tapped, the ones
    that failed or ended and why, what was dropped here and by the agents), ``request``
    (one event, `weft.viz.tap.page_row`), and ``unavailable`` or ``refused`` (then the
    stream ends, and the page does not reconnect)."""

    def __init__(
        self,
        source: TapSource | None,
        namespace: str | None = None,
        *,
        open_tap: OpenTap = TapStream,
        queue: int = TAP_QUEUE,
        max_pages: int = MAX_TAP_PAGES,
        keepalive: float = TAP_KEEPALIVE,
        check: float = TAP_CHECK,
    ) -> None:
        self.source = source
        self.namespace = namespace
        self._open = open_tap
        self.queue = queue
        self.max_pages = max_pages
        self.keepalive = keepalive
        self.check = check
        self.pages = 0
        """Pages tapping now."""
        self.closing = asyncio.Event()
        """Set when the dashboard stops: every stream ends."""

    @staticmethod
    async def _start(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8",
                     "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        )  # fmt: skip
        await response.prepare(request)
        await response.write(f"retry: {TAP_RETRY_MS}\n\n".encode())
        return response

    async def _final(self, request: web.Request, event: str, text: str) -> web.StreamResponse:
        response = await self._start(request)
        await response.write(tapview.sse(event, {"message": text}))
        await response.write_eof()
        return response

    async def handle(self, request: web.Request) -> web.StreamResponse:
        source = self.source
        if source is None:
            return await self._final(request, "unavailable",
                "no live tap: the dashboard reads the agents' tap in a lab (their /tap "
                "answers loopback clients only); with --agent, give agents reached on "
                "their node (kubectl port-forward)")  # fmt: skip
        workload = request.query.get("workload", "")
        try:
            query = tap_query(source, workload, self.namespace)
        except VizError as e:
            return await self._final(request, "refused", str(e))
        if self.pages >= self.max_pages:
            return await self._final(request, "refused",
                f"{self.pages} pages are tapping already (at most {self.max_pages}: each holds "
                "one of every agent's tap slots); close one and reload")  # fmt: skip
        self.pages += 1
        try:
            return await self._relay(request, source, workload, query)
        finally:
            self.pages -= 1

    async def _relay(
        self, request: web.Request, source: TapSource, workload: str, query: str
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:  # from a reader thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody to wake
                loop.call_soon_threadsafe(woken.set)

        relay = tapview.TapRelay(self.queue, wake)
        response = await self._start(request)
        streams = [self._open(agent, query) for agent in source.agents]
        ended: dict[str, str] = {}
        agent_dropped: dict[str, int] = {}
        shown = 0

        def status() -> bytes:
            return tapview.sse("status", {
                "workload": workload or None,
                "agents": [a.name for a in source.agents],
                "how": source.how,
                "tapping": len(streams) - len(ended),
                "ended": ended,
                "dropped": relay.dropped,
                "agent_dropped": agent_dropped,
                "shown": shown,
                "queue": self.queue,
            })  # fmt: skip

        try:
            for stream in streams:
                threading.Thread(target=_read_agent, args=(stream, relay), daemon=True,
                                 name=f"dashboard-tap-{stream.agent.name}").start()  # fmt: skip
            await response.write(status())
            quiet_since, dropped = loop.time(), 0
            while len(ended) < len(streams) and not self.closing.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), self.check)
                if request.transport is None or request.transport.is_closing():
                    break  # the page went away
                woken.clear()
                out, changed = bytearray(), False
                for item in relay.take():
                    event = item.event
                    # The agent's own end comes before its stream's: its reason is kept.
                    if event is None:
                        ended.setdefault(item.agent, item.problem or "its tap stream ended")
                        changed = True
                    elif "end" in event:
                        ended.setdefault(item.agent, f"the agent ended its tap: {event['end']}")
                        changed = True
                    elif "dropped" in event and "direction" not in event:
                        agent_dropped[item.agent] = int(event["dropped"])
                        changed = True
                    else:
                        shown += 1
                        out += tapview.sse("request", tapview.page_row(event))
                if changed or relay.dropped != dropped:
                    dropped = relay.dropped
                    out += status()
                if out:
                    await response.write(bytes(out))
                    quiet_since = loop.time()
                elif loop.time() - quiet_since >= self.keepalive:
                    await response.write(tapview.SSE_KEEPALIVE)
                    quiet_since = loop.time()
        except ConnectionResetError:
            pass  # the page went away while it was written to
        finally:
            for stream in streams:
                stream.close()
        return response


# -- the poller -------------------------------------------------------------------------------


@dataclass
class Views:
    """What the endpoints answer, replaced whole after every poll."""

    graph: dict[str, Any] = field(
        default_factory=lambda: {"window_seconds": None, "nodes": [], "edges": []}
    )
    stat: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class Poller:
    """Polls the source and recomputes the views; one instance per dashboard."""

    def __init__(
        self,
        source: Source,
        topology: Topology,
        config: DashboardConfig,
        describe: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.topology = topology
        self.config = config
        self.describe = describe
        self.history = board.History(config.window)
        self.trends = board.Trends()
        self._clock = clock
        self._wall = wall
        self.polls = 0
        self.views = Views(meta=self._meta(None, [], "waiting for the first scrape"))
        self._polled = asyncio.Condition()

    def _meta(
        self, seconds: float | None, down: list[dict[str, str]], error: str | None
    ) -> dict[str, Any]:
        return {
            "source": self.describe,
            "updated_unix": self._wall(),
            "polls": self.polls,
            "interval_seconds": self.config.interval,
            "window_seconds": seconds,
            "window_target_seconds": self.config.window,
            "unreachable": down,
            "error": error,
            "namespace": self.config.namespace,
        }

    def _pair(self) -> tuple[Snapshot | None, Snapshot]:
        if isinstance(self.source, PrometheusSource):
            # Prometheus holds the history: a whole window every poll, no warming up.
            return self.source.window(self.config.window, lambda _: None)
        self.history.add(self._clock(), self.source.snapshot())
        before, after = self.history.pair()
        assert after is not None
        return before, after

    def poll_once(self) -> None:
        """One poll (blocking: the agents are scraped in threads of their own)."""
        self.polls += 1
        try:
            before, after = self._pair()
        except SourceError as e:
            self.views = Views(self.views.graph, self.views.stat, self._meta(None, [], str(e)))
            return
        fig = board.figuring(before, after)
        ns, now = self.config.namespace, self._wall()
        stats = {
            kind: board.stat(fig, self.topology, kind, namespace=ns, trends=self.trends, at=now)
            for kind in STAT_KINDS
        }
        down = board.unreachable_json(fig.unreachable)
        error = None
        if fig.seconds is None:
            error = f"warming up: rates after the next scrape (every {self.config.interval:g} s)"
        if not after.scrapes:
            error = "no agent answered: " + "; ".join(u.describe() for u in fig.unreachable)
        self.views = Views(
            graph=board.graph(fig, self.topology, namespace=ns),
            stat=stats,
            meta=self._meta(fig.seconds, down, error),
        )

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.poll_once)
            async with self._polled:
                self._polled.notify_all()
            await asyncio.sleep(self.config.interval)

    async def wait_for_polls(self, n: int) -> None:
        """Until ``n`` polls are done (tests; a caller's own timeout bounds it)."""
        async with self._polled:
            await self._polled.wait_for(lambda: self.polls >= n)


async def _guard(name: str, coro: Awaitable[None], failed: asyncio.Future[BaseException]) -> None:
    """A long-lived task that must not die quietly: its failure stops the dashboard."""
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.exception("%s failed; stopping the dashboard", name)
        if not failed.done():
            failed.set_result(e)


# -- the web app ------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _request_host(request: web.Request) -> str:
    host = request.host
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def make_app(
    poller: Poller,
    config: DashboardConfig,
    traces: TraceReceiver | None,
    *,
    fetch: Fetch = fetch_json,
    taps: Taps | None = None,
) -> web.Application:
    local_only = is_loopback(config.host)
    tapping = taps if taps is not None else Taps(None)

    @web.middleware
    async def hosts(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if local_only and not is_loopback(_request_host(request)):
            raise web.HTTPForbidden(
                text=f"this dashboard listens on {config.host} and answers only requests for "
                "a loopback host (localhost, 127.0.0.1, [::1])\n"
            )
        response = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def asset(rel: str, ctype: str) -> web.Response:
        try:
            body = (config.web_dir / rel).read_bytes()
        except OSError as e:
            raise web.HTTPNotFound(text=f"{rel}: {e.strerror}; run `make dashboard`\n") from None
        return web.Response(body=body, content_type=ctype, charset="utf-8")

    async def index(request: web.Request) -> web.Response:
        return asset("index.html", "text/html")

    async def static(request: web.Request) -> web.Response:
        entry = STATIC.get(request.match_info["name"])
        if entry is None:
            raise web.HTTPNotFound(text="no such file\n")
        return asset(*entry)

    async def graph(request: web.Request) -> web.Response:
        return web.json_response({**poller.views.meta, **poller.views.graph})

    async def stat(request: web.Request) -> web.Response:
        kind = request.query.get("kind", "deploy")
        if kind not in STAT_KINDS:
            raise web.HTTPBadRequest(text=f"kind must be one of {', '.join(STAT_KINDS)}\n")
        empty: dict[str, Any] = {"kind": kind, "window_seconds": None, "rows": []}
        return web.json_response({**poller.views.meta, **poller.views.stat.get(kind, empty)})

    async def api_traces(request: web.Request) -> web.Response:
        if traces is None:
            return web.json_response(NOT_ENABLED)
        return web.json_response(await asyncio.to_thread(read_traces, traces, fetch))

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text=f"ok {poller.polls} polls\n")

    app = web.Application(middlewares=[hosts])
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/graph", graph)
    app.router.add_get("/api/stat", stat)
    app.router.add_get("/api/traces", api_traces)
    app.router.add_get("/api/tap", tapping.handle)
    app.router.add_get("/healthz", healthz)
    return app


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


@dataclass
class Running:
    runner: web.AppRunner
    url: str
    tasks: list[asyncio.Task[None]]
    failed: asyncio.Future[BaseException]
    taps: Taps

    async def stop(self) -> None:
        self.taps.closing.set()  # the pages' tap streams end, their agents' streams close
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.runner.cleanup()


async def start(
    poller: Poller,
    config: DashboardConfig,
    traces: TraceReceiver | None,
    *,
    fetch: Fetch = fetch_json,
    taps: Taps | None = None,
) -> Running:
    """Serve the dashboard and start polling; `Running.stop` undoes both."""
    taps = taps if taps is not None else Taps(None)
    app = make_app(poller, config, traces, fetch=fetch, taps=taps)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(
            f"cannot listen on {config.host}:{config.port}: {e.strerror or e}; "
            "give another --listen HOST:PORT (port 0 picks a free one)"
        ) from None
    port = config.port
    server = site._server  # aiohttp keeps the bound sockets there, not on the site
    if isinstance(server, asyncio.Server) and server.sockets:
        port = server.sockets[0].getsockname()[1]
    failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_guard("the poller", poller.run(), failed), name="viz-poller")
    return Running(runner, url_of(config.host, port), [task], failed, taps)
