"""Where `weft viz` gets its samples: the agents' admin ports, or a Prometheus.

The only module of `weft.viz` that does I/O. Both sources answer the same two calls,
so every command works the same on either:

* `snapshot` — every agent's samples now, and which agents could not be read;
* `window` — two snapshots ``seconds`` apart. Agents are scraped, then scraped again
  after a sleep; a Prometheus already has the history, so it is asked for the samples
  at ``now - seconds`` and ``now`` (instant queries of the raw series) without waiting,
  and the same arithmetic runs on both (`weft.viz.model.deltas`, which treats a counter
  reset as ``rate()`` does).

Agents are scraped concurrently, one thread each, with a short timeout: a node that
does not answer is named, and the others are still shown. In the lab an agent's admin
port is reachable only inside its node's network namespace, so the socket is made there
(`weft.nsenter.in_netns` moves only the calling thread).

`TapStream` reads one agent's ``/tap`` stream (``weft viz tap``): the agent serves it only
to loopback clients, so in the lab it is asked at 127.0.0.1 inside the node's namespace
(`lab_tap_agents`), as ``weft lab`` reads ``/debug/state``.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from weft.nsenter import in_netns
from weft.viz.expo import ExpositionError, Sample, parse_query_vector, parse_text
from weft.viz.model import FAMILIES, Pod, Scrape, Service, Snapshot, Topology, Unreachable

if TYPE_CHECKING:
    from weft.lab.state import LabState

ADMIN_PORT = 15020
SCRAPE_TIMEOUT = 3.0


class SourceError(Exception):
    """No figures at all can be had (the message says from where and what to do)."""


class Source(Protocol):
    def describe(self) -> str: ...

    def snapshot(self) -> Snapshot: ...

    def window(
        self, seconds: float, waiting: Callable[[str], None]
    ) -> tuple[Snapshot, Snapshot]: ...


@dataclass(frozen=True)
class Agent:
    name: str
    host: str
    port: int = ADMIN_PORT
    netns: str | None = None
    """Network namespace the admin port is reachable in (None: this one)."""

    @property
    def where(self) -> str:
        inside = f" in netns {self.netns}" if self.netns else ""
        return f"{self.host}:{self.port}{inside}"


class _NetnsConnection(http.client.HTTPConnection):
    def __init__(self, agent: Agent, timeout: float) -> None:
        super().__init__(agent.host, agent.port, timeout=timeout)
        self._netns = agent.netns

    def connect(self) -> None:
        if self._netns is None:
            super().connect()
            return
        with in_netns(self._netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def fetch_metrics(agent: Agent, timeout: float = SCRAPE_TIMEOUT) -> str:
    """The agent's ``/metrics`` text; `OSError` (with why) if it cannot be had."""
    conn = _NetnsConnection(agent, timeout)
    try:
        conn.request("GET", "/metrics", headers={"Accept": "text/plain"})
        response = conn.getresponse()
        body = response.read().decode("utf-8", errors="replace")
    except (http.client.HTTPException, UnicodeError) as e:
        raise OSError(f"bad HTTP answer: {e}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise OSError(f"/metrics answered {response.status} {response.reason}")
    return body


def fetch_json(agent: Agent, path: str, timeout: float = SCRAPE_TIMEOUT) -> object:
    """GET ``path`` of a JSON API reached like an agent (its host, port and network
    namespace), e.g. the lab's OTLP receiver; `OSError` (with why) if it cannot be had."""
    conn = _NetnsConnection(agent, timeout)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read()
    except http.client.HTTPException as e:
        raise OSError(f"bad HTTP answer: {e}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise OSError(f"{path} answered {response.status} {response.reason}")
    try:
        return json.loads(body)
    except ValueError:
        raise OSError(f"{path} did not answer JSON") from None


class TapStream:
    """One agent's ``/tap?query`` stream: iterate it (blocking, in a thread) for its JSON
    lines, the agent's ``{"end": ...}`` last; `close` (from any thread) ends it early.
    Connecting and the answer's head are bounded by ``timeout``; then reads wait as long
    as the stream is quiet. `OSError` (with why) if the agent cannot be tapped."""

    def __init__(self, agent: Agent, query: str, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.agent = agent
        self.query = query
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._closed = False

    def __iter__(self) -> Iterator[dict[str, object]]:
        conn = _NetnsConnection(self.agent, self.timeout)
        try:
            try:
                conn.connect()
                self._sock = conn.sock
                if self._closed:  # closed while connecting: `close` saw no socket to shut
                    return
                conn.request(
                    "GET", f"/tap?{self.query}", headers={"Accept": "application/x-ndjson"}
                )
                response = conn.getresponse()
            except http.client.HTTPException as e:
                raise OSError(f"bad HTTP answer: {e}") from None
            if response.status != 200:
                why = response.read(2000).decode("utf-8", errors="replace").strip()
                raise OSError(f"/tap answered {response.status} {response.reason}: {why}")
            if conn.sock is not None:
                conn.sock.settimeout(None)
            while True:
                try:
                    line = response.readline(1 << 20)
                except (http.client.HTTPException, ValueError) as e:
                    if self.closed:
                        return
                    raise OSError(f"the stream broke: {e}") from None
                except OSError:
                    if self.closed:
                        return
                    raise
                if not line:
                    return
                try:
                    item = json.loads(line)
                except ValueError:
                    raise OSError("the stream is not JSON lines") from None
                if isinstance(item, dict):
                    yield item
        finally:
            conn.close()

    @property
    def closed(self) -> bool:
        """`close` was called (what the stream raises then is the close, not a fault)."""
        return self._closed

    def close(self) -> None:
        self._closed = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError | socket.timeout):
        return "no answer within the timeout (agent hung or node unreachable)"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused: the agent is not running or not listening"
    return str(e) or type(e).__name__


class AgentSource:
    """Scrape agents directly (``weft viz`` without ``--prometheus``)."""

    def __init__(
        self,
        agents: Sequence[Agent],
        *,
        timeout: float = SCRAPE_TIMEOUT,
        fetch: Callable[[Agent, float], str] = fetch_metrics,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        hint: str = "",
    ) -> None:
        if not agents:
            raise SourceError("no agents to scrape")
        self.agents = list(agents)
        self.timeout = timeout
        self._fetch = fetch
        self._clock = clock
        self._sleep = sleep
        self.hint = hint
        """Appended to an unreachable agent's reason: what to do about it."""

    def describe(self) -> str:
        return f"{len(self.agents)} agents' :{self.agents[0].port}/metrics"

    def _one(self, agent: Agent) -> Scrape | Unreachable:
        try:
            text = self._fetch(agent, self.timeout)
            samples = parse_text(text)
        except ExpositionError as e:
            return Unreachable(agent.name, agent.where, f"unparsable /metrics: {e}")
        except OSError as e:
            reason = _reason(e)
            return Unreachable(agent.name, agent.where, f"{reason}{self.hint.format(agent.name)}")
        return Scrape(agent.name, self._clock(), tuple(s for s in samples if s.name in FAMILIES))

    def snapshot(self) -> Snapshot:
        with ThreadPoolExecutor(max_workers=min(32, len(self.agents))) as pool:
            results = list(pool.map(self._one, self.agents))
        scrapes = tuple(r for r in results if isinstance(r, Scrape))
        down = tuple(r for r in results if isinstance(r, Unreachable))
        return Snapshot(scrapes, down)

    def window(self, seconds: float, waiting: Callable[[str], None]) -> tuple[Snapshot, Snapshot]:
        first = self.snapshot()
        waiting(f"scraped {len(first.scrapes)} of {len(self.agents)} agents; "
                f"scraping again in {seconds:g} s for rates")  # fmt: skip
        self._sleep(seconds)
        return first, self.snapshot()


_FAMILY_QUERY = '{__name__=~"' + "|".join(sorted(FAMILIES)) + '"}'


class PrometheusSource:
    """PromQL instant queries over a Prometheus's HTTP API (``--prometheus URL``)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        opener: Callable[[str, float], bytes] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._clock = clock
        self._open = opener or _http_get

    def describe(self) -> str:
        return f"Prometheus at {self.url}"

    def _query(self, query: str, at: float) -> dict[str, object]:
        params = urllib.parse.urlencode({"query": query, "time": f"{at:.3f}"})
        url = f"{self.url}/api/v1/query?{params}"
        try:
            body = self._open(url, self.timeout)
        except OSError as e:
            raise SourceError(f"Prometheus at {self.url} cannot be queried: {_reason(e)}") from e
        try:
            answer: dict[str, object] = json.loads(body)
        except ValueError:
            raise SourceError(f"{url} did not answer JSON: is that a Prometheus?") from None
        return answer

    def at(self, when: float) -> Snapshot:
        try:
            samples = parse_query_vector(self._query(_FAMILY_QUERY, when))
            down = parse_query_vector(self._query("up == 0", when))
        except ExpositionError as e:
            raise SourceError(f"Prometheus at {self.url}: {e}") from None
        by_instance: dict[str, list[Sample]] = {}
        for s in samples:
            instance = s.label("instance") or "prometheus"
            kept = tuple((k, v) for k, v in s.labels if k not in ("instance", "job"))
            by_instance.setdefault(instance, []).append(Sample(s.name, kept, s.value))
        scrapes = tuple(
            Scrape(instance, when, tuple(vs)) for instance, vs in sorted(by_instance.items())
        )
        unreachable = tuple(
            Unreachable(
                s.label("instance") or "?",
                f"job {s.label('job') or '?'} of {self.url}",
                "Prometheus's last scrape of it failed (up == 0)",
            )
            for s in down
        )
        return Snapshot(scrapes, unreachable)

    def snapshot(self) -> Snapshot:
        return self.at(self._clock())

    def window(self, seconds: float, waiting: Callable[[str], None]) -> tuple[Snapshot, Snapshot]:
        now = self._clock()
        return self.at(now - seconds), self.at(now)


def _http_get(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as e:
        # Prometheus answers 400/422 with its JSON error body: let the caller read it.
        body: bytes = e.read()
        return body


# -- the lab --------------------------------------------------------------------------------


def lab_topology(state: LabState) -> Topology:
    """Pods and services of a lab."""
    plan = state.plan
    pods = tuple(
        Pod(p.namespace, p.name, p.node, dict(p.labels), p.owner, plan.captured(p))
        for p in plan.pods
    )
    services = tuple(Service(s.namespace, s.name, dict(s.selector)) for s in plan.services)
    return Topology(pods, services)


def lab_agents(state: LabState) -> list[Agent]:
    """Each node's agent, reached inside the node's network namespace."""
    plan = state.plan
    return [Agent(n.name, n.ip, ADMIN_PORT, plan.netns(n.name)) for n in plan.nodes]


def lab_tap_agents(state: LabState) -> list[Agent]:
    """Each node's agent as its tap is reached: 127.0.0.1 inside the node's namespace (the
    agent serves ``/tap`` to loopback clients only)."""
    plan = state.plan
    return [Agent(n.name, "127.0.0.1", ADMIN_PORT, plan.netns(n.name)) for n in plan.nodes]


def lab_accounts(state: LabState) -> dict[tuple[str, str], str]:
    """(namespace, pod) -> service account, for matching callers known by identity."""
    return {(p.namespace, p.name): p.service_account for p in state.plan.pods}


def load_lab(name: str) -> LabState:
    """The lab's state (`SourceError` if there is no such lab)."""
    from weft.lab.plan import validate_lab_name
    from weft.lab.state import StateError, lab_paths, load_state

    try:
        validate_lab_name(name)
        return load_state(lab_paths(name, None).state_file)
    except (ValueError, StateError) as e:
        raise SourceError(str(e)) from None


def why(e: BaseException) -> str:
    """What an `OSError` reaching an agent means, in words (refused, timeout, ...)."""
    return _reason(e)
