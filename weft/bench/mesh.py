"""``weft bench``: Weft against no mesh and against HAProxy sidecars, in one lab, one run.

Setups (all in one two-node lab, so they share the machine's mood):

* ``direct`` — ``bc-direct`` (node-1) to ``bs-direct`` (node-2): no mesh at all.
* ``weft`` — ``bc-weft`` to ``bs-weft`` (node-2): both captured; eBPF redirect into
  node-1's proxy, mTLS tunnel to node-2's proxy, into the pod.
* ``weft-same-node`` — ``bc-weft`` to ``bs-local`` (node-1): captured, same node (the
  tunnel through node-1's own proxy, the sk_msg shortcut on the pod hops).
* ``haproxy-sidecars`` — ``bc-haproxy`` to ``bs-haproxy`` (node-2), each pod with an
  HAProxy sidecar (Debian's package) doing what a sidecar mesh does: the client's
  connects are redirected by an nftables ``redirect`` in its netns (sidecar traffic
  excluded by uid, as Istio's init container does with iptables) to its sidecar, which
  opens TLS 1.3 with a client certificate (ECDSA P-256, like Weft's) to the server pod's
  port; there the server's ``prerouting`` redirect hands it to the server sidecar, which
  requires and verifies the client certificate and forwards to the app on the pod's
  loopback.  Verification is chain-only (HAProxy does not check SPIFFE IDs), which is
  less work than Weft does.
* ``haproxy-http`` — the same pair with both sidecars in ``mode http`` (per-request
  proxying, keep-alive on both sides, idle server connections reused across client
  connections): the like-for-like comparison for Weft's HTTP/1.1 path, since the bench
  load speaks HTTP/1.1 and Weft detects it.
* ``haproxy-h2`` — HAProxy sidecars in ``mode http`` that keep HTTP/2 end to end (h2c
  from the client, ``alpn h2`` between the sidecars, ``proto h2`` to the app, the gRPC
  port redirected too): the like-for-like row for the h2c and gRPC scenarios, where
  ``haproxy-http`` turns h2c into HTTP/1.1 towards the app.

Scenarios, each run for every setup in turn (rounds rotate the order; medians reported):

* fixed-rate HTTP/1.1 keep-alive requests, open loop (:mod:`weft.bench.openloop`):
  p50, p90, p99, p99.9, max at each rate;
* saturation: closed loop on 16 connections, requests per second;
* new connections: connect (+ TLS in the meshes) + one request + close, per second
  (:mod:`weft.bench.loadgen` ``conn``);
* bulk: 1 MiB request bodies on one connection, MB/s (``bulk``).

Memory, in a second lab: one node with N idle pods; the agent's RSS/PSS with 10, 50 and
100 of them captured (each with its own identity, so its own certificate), against the
summed RSS/PSS of one HAProxy sidecar per pod (same configuration as above).

The load generators and the echo servers are Python; they cost the same in every setup,
and the client runs on the same two cores as everything else — absolute numbers are
this machine's, the ratios are the point.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from weft.identity import SpiffeId, cert_pem, generate_key, key_pem
from weft.lab import procs
from weft.lab.lab import Lab, LabError, admin_get, agent_state
from weft.lab.plan import (
    CAPTURE_LABEL,
    ECHO_GRPC_PORT,
    ECHO_PORT,
    SERVICE_CIDR,
    LabPlan,
    PodPlan,
    ServicePlan,
    ServicePort,
    node_plan,
)
from weft.lab.state import LabState, ProcessRecord
from weft.nsenter import enter_pod

Report = Callable[[str], None]

SIDECAR_UID = 1337
SIDECAR_OUT = 15001
SIDECAR_IN = 15006
SIDECAR_OUT_GRPC = 15002
SIDECAR_IN_GRPC = 15007
"""``mode h2`` sidecars' listeners for the echo's gRPC port (``ECHO_GRPC_PORT``)."""
CAPTURED = {CAPTURE_LABEL: "enabled"}


@dataclass(frozen=True)
class Setup:
    name: str
    client: str
    server: str
    proxies: tuple[str, ...] = ()
    """Processes (lab records) doing this setup's proxying: their CPU per request."""
    only: tuple[str, ...] = ()
    """Scenarios it runs in; empty: all (but ``skip``)."""
    skip: tuple[str, ...] = ()

    def runs(self, scenario: str) -> bool:
        return (not self.only or scenario in self.only) and scenario not in self.skip


def _pair(client: str, server: str) -> tuple[str, str]:
    return (f"sidecar-{client}", f"sidecar-{server}")


H2_SCENARIOS = ("h2", "grpc")
"""HTTP/2 load (h2load): h2c GETs, and gRPC unary calls to the echo's gRPC port."""

SETUPS = (
    Setup("direct", "bc-direct", "bs-direct"),
    Setup("direct-same-node", "bc-direct", "bs-direct-l", skip=H2_SCENARIOS),
    Setup("weft", "bc-weft", "bs-weft", ("agent-node-1", "agent-node-2")),
    Setup("weft-same-node", "bc-weft", "bs-local", ("agent-node-1",), skip=H2_SCENARIOS),
    Setup("haproxy-sidecars", "bc-haproxy", "bs-haproxy", _pair("bc-haproxy", "bs-haproxy"),
          skip=H2_SCENARIOS),
    Setup("haproxy-same-node", "bc-haproxy-l", "bs-haproxy-l",
          _pair("bc-haproxy-l", "bs-haproxy-l"), skip=H2_SCENARIOS),
    # HAProxy with TLS session resumption on (its default), new connections only: the
    # row a sidecar user gets out of the box. Weft's equivalent is the pooled tunnel
    # connection (a new app connection costs one stream, no handshake, in every row).
    Setup("haproxy-resumption", "bc-haproxy-r", "bs-haproxy-r",
          _pair("bc-haproxy-r", "bs-haproxy-r"), only=("conn",)),
    # HAProxy sidecars in `mode http`: per-request proxying with pooled, reused server
    # connections — the like-for-like comparison for Weft's HTTP/1.1 path. It takes h2c
    # too (HAProxy detects the preface) and speaks HTTP/1.1 onwards, so it runs the h2
    # scenario (not like for like: the app's HTTP/1.1 path is cheaper than its HTTP/2).
    Setup("haproxy-http", "bc-haproxy-h", "bs-haproxy-h", _pair("bc-haproxy-h", "bs-haproxy-h"),
          skip=("grpc",)),
    # The HTTP/2 rows' like for like: HTTP/2 end to end through both sidecars.
    Setup("haproxy-h2", "bc-haproxy-2", "bs-haproxy-2", _pair("bc-haproxy-2", "bs-haproxy-2"),
          only=H2_SCENARIOS),
)  # fmt: skip
SIDECAR_PAIRS = (
    ("bs-haproxy", "bc-haproxy", False, "tcp"),
    ("bs-haproxy-l", "bc-haproxy-l", False, "tcp"),
    ("bs-haproxy-r", "bc-haproxy-r", True, "tcp"),
    ("bs-haproxy-h", "bc-haproxy-h", False, "http"),
    ("bs-haproxy-2", "bc-haproxy-2", False, "h2"),
)
"""(server pod, client pod, resumption, mode) of each HAProxy sidecar pair."""
P999_MIN_SAMPLES = 10_000
"""p99.9 is reported only from rounds with at least this many requests (10 beyond it)."""


@dataclass(frozen=True)
class Profile:
    rates: tuple[int, ...]
    seconds: float
    rounds: int
    memory_pods: tuple[int, ...]
    connections: int = 16


FULL = Profile(rates=(500, 1000, 2000), seconds=4.0, rounds=6, memory_pods=(10, 50, 100))
"""Six rounds: each of the six full setups runs first once in every scenario."""
QUICK = Profile(rates=(500, 1000), seconds=2.0, rounds=1, memory_pods=(10,))
IDLE_CONNECTIONS = 1000
"""Open idle connections held while the proxies' memory is measured under load."""


# --------------------------------------------------------------------------- lab layout


PodSpec = tuple[str, str, dict[str, str], str | None]
"""(name, service account, labels, app)."""


GRPC_SERVERS = frozenset({"bs-direct", "bs-weft", "bs-haproxy-2", "bs-pair-1", "bs-pair-2"})
"""The echo pods that also serve gRPC: only those the gRPC loads reach (grpcio's idle
threads cost ~0.7 % of a CPU per process, which a dozen idle servers would add to every
measurement on this 2-vCPU machine)."""


def _pods(node_index: int, specs: list[PodSpec]) -> list[PodPlan]:
    node = node_plan(node_index)
    base = ipaddress.IPv4Network(node.pod_cidr).network_address
    pods = []
    for i, (name, sa, labels, app) in enumerate(specs):
        ports: tuple[int, ...] = ()
        if app == "echo":
            ports = (ECHO_PORT, ECHO_GRPC_PORT) if name in GRPC_SERVERS else (ECHO_PORT,)
        pods.append(PodPlan(name, node.name, str(base + 2 + i), "default", sa, labels, app, ports))
    return pods


def bench_plan(name: str) -> LabPlan:
    pods = _pods(
        1,
        [
            ("bc-direct", "bench-client", {}, None),
            ("bc-weft", "bench-client", dict(CAPTURED), None),
            ("bc-haproxy", "bench-client-ha", {}, None),
            ("bs-local", "bench-server", dict(CAPTURED), "echo"),
            ("bs-direct-l", "bench-server", {}, "echo"),
            ("bc-haproxy-l", "bench-client-ha", {}, None),
            ("bs-haproxy-l", "bench-server-ha", {}, "echo"),
            ("bc-haproxy-r", "bench-client-ha", {}, None),
            ("bc-haproxy-h", "bench-client-ha", {}, None),
            ("bc-haproxy-2", "bench-client-ha", {}, None),
        ],
    ) + _pods(
        2,
        [
            ("bs-direct", "bench-server", {}, "echo"),
            ("bs-weft", "bench-server", dict(CAPTURED), "echo"),
            ("bs-haproxy", "bench-server-ha", {}, "echo"),
            ("bs-haproxy-r", "bench-server-ha", {}, "echo"),
            ("bs-haproxy-h", "bench-server-ha", {}, "echo"),
            ("bs-haproxy-2", "bench-server-ha", {}, "echo"),
            ("bs-pair-1", "bench-server", {**CAPTURED, "bench": "pair"}, "echo"),
            ("bs-pair-2", "bench-server", {**CAPTURED, "bench": "pair"}, "echo"),
        ],
    )
    return LabPlan(name, (node_plan(1), node_plan(2)), tuple(pods), (PAIR,), {"default": {}})


PAIR_VIP = str(SERVICE_CIDR.network_address + 20)
PAIR = ServicePlan(
    name="bench-pair",
    namespace="default",
    vip=PAIR_VIP,
    ports=(
        ServicePort(port=80, target_port=ECHO_PORT),
        ServicePort(port=ECHO_GRPC_PORT, target_port=ECHO_GRPC_PORT, name="grpc"),
    ),
    selector={"bench": "pair"},
)
"""Two equal replicas on node-2 behind one service: the per-request balancing figures."""


def balance_plan(name: str) -> LabPlan:
    """Only what `run_balance` needs: the captured client and the pair."""
    pods = _pods(1, [("bc-weft", "bench-client", dict(CAPTURED), None)]) + _pods(
        2,
        [
            ("bs-pair-1", "bench-server", {**CAPTURED, "bench": "pair"}, "echo"),
            ("bs-pair-2", "bench-server", {**CAPTURED, "bench": "pair"}, "echo"),
        ],
    )
    return LabPlan(name, (node_plan(1), node_plan(2)), tuple(pods), (PAIR,), {"default": {}})


def run_balance(
    identity_setup: IdentitySetup, rounds: int = 3, report: Report = print, name: str = "wbal"
) -> dict[str, Any]:
    """`_balance` alone, ``rounds`` times, in a small lab: the balancing figures without
    the half hour of the full run. Each run's share of bs-pair-2, and their median."""
    lab = Lab(name, report=lambda m: None, identity_setup=identity_setup)
    report(f"lab {name!r}: bc-weft (node-1) -> service bench-pair (bs-pair-1, bs-pair-2 on node-2)")
    lab.up(plan=balance_plan(name), replace=True)
    try:
        for ip in (p.ip for p in lab.load().plan.pods if p.name.startswith("bs-")):
            _wait_reachable(lab, Setup("pair", "bc-weft", ""), ip)
        runs = [_balance(lab, report) for _ in range(rounds)]
    finally:
        report(f"removing lab {name!r}")
        lab.down()
    out: dict[str, Any] = {}
    for run, _ in BALANCE_RUNS:
        shares = [r[run]["share"] for r in runs if r[run]["share"] is not None]
        out[run] = {
            "shares": shares,
            "median": round(statistics.median(shares), 3) if shares else None,
            "errors": sum(sum(r[run]["errors"].values()) for r in runs),
            "latency_ms": [r[run].get("latency_ms", {}) for r in runs],
            "switches": [r[run].get("switches") for r in runs],
        }
    return out


def memory_plan(name: str, pods: int) -> LabPlan:
    specs: list[PodSpec] = [(f"mem-{i}", f"mem-{i}", {}, None) for i in range(1, pods + 1)]
    return LabPlan(name, (node_plan(1),), tuple(_pods(1, specs)), (), {"default": {}})


# --------------------------------------------------------------------------- sidecars


class SidecarPki:
    """A throwaway CA for the HAProxy sidecars (P-256, like Weft's)."""

    def __init__(self) -> None:
        self.key = generate_key()
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weft bench sidecar CA")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def leaf(self, identity: SpiffeId) -> bytes:
        """PEM cert + key, as HAProxy's ``crt`` wants them."""
        key = generate_key()
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert_pem(cert) + key_pem(key)


def sidecar_config(
    directory: Path, upstream: str | None, *, resumption: bool = False, mode: str = "tcp"
) -> str:
    """An HAProxy sidecar: outbound (to ``upstream`` over mTLS) and inbound (mTLS -> app),
    configured as a sidecar mesh operator would run it (docs/benchmarks.md explains each
    setting). ``resumption`` turns TLS session resumption on (HAProxy's default);
    ``mode`` ``http`` proxies per request, reusing server connections; ``h2`` does too,
    with HTTP/2 end to end (``alpn h2`` between the sidecars, ``proto h2`` to the app)
    and the gRPC port proxied as well."""
    h2 = mode == "h2"
    mode = "http" if h2 else mode
    tls = f"crt {directory}/sidecar.pem ca-file {directory}/ca.pem verify required"
    bind_options = "ssl-min-ver TLSv1.3" + ("" if resumption else " no-tls-tickets")
    lines = [
        "global",
        f"    uid {SIDECAR_UID}",
        f"    gid {SIDECAR_UID}",
        # One thread, as Weft runs one event loop per node (and a sidecar's CPU limit is
        # usually well under a core).
        "    nbthread 1",
        "    maxconn 4096",
        # Weft reads up to 256 KiB at a time and buffers up to 256 KiB per direction.
        "    tune.bufsize 262144",
        # A sidecar talks to a handful of peers: 1,000 sessions, not the default 20,000
        # (which is allocated in every sidecar at start).
        "    tune.ssl.cachesize 1000",
        f"    ssl-default-bind-options {bind_options}",
        "    ssl-default-server-options ssl-min-ver TLSv1.3",
        "defaults",
        f"    mode {mode}",
        "    timeout connect 5s",
        "    timeout client 1h",
        "    timeout server 1h",
        *(
            [
                "    option http-keep-alive",
                "    timeout http-keep-alive 1h",
                "    timeout http-request 10s",
                # Idle server connections are shared between client connections, as
                # Weft's pool shares its upstream connections.
                "    http-reuse always",
            ]
            if mode == "http"
            else []
        ),
    ]
    # (name, inbound listener, app port) and (outbound listener, peer port) per port.
    ports = [("", SIDECAR_IN, SIDECAR_OUT, ECHO_PORT)]
    if h2:
        ports.append(("-grpc", SIDECAR_IN_GRPC, SIDECAR_OUT_GRPC, ECHO_GRPC_PORT))
    alpn = " alpn h2" if h2 else ""
    to_app = " proto h2" if h2 else ""
    for suffix, listen_in, _, port in ports:
        lines += [
            f"frontend inbound{suffix}",
            f"    bind :{listen_in} ssl {tls}{alpn}",
            f"    default_backend app{suffix}",
            f"backend app{suffix}",
            f"    server app 127.0.0.1:{port}{to_app}",
        ]
    if upstream:
        reuse = "" if resumption else " no-ssl-reuse"
        for suffix, _, listen_out, port in ports:
            lines += [
                f"frontend outbound{suffix}",
                f"    bind 127.0.0.1:{listen_out}",
                f"    default_backend upstream{suffix}",
                f"backend upstream{suffix}",
                f"    server peer {upstream}:{port} ssl {tls}{reuse}{alpn}",
            ]
    return "\n".join(lines) + "\n"


def nft_rules(outbound_to: str | None, grpc: bool = False) -> str:
    """The sidecar redirects, as an init container would install them (nftables);
    ``grpc``: the echo's gRPC port too."""
    ports = [(ECHO_PORT, SIDECAR_IN, SIDECAR_OUT)]
    if grpc:
        ports.append((ECHO_GRPC_PORT, SIDECAR_IN_GRPC, SIDECAR_OUT_GRPC))
    rules = [
        "table ip weft_bench_sidecar {",
        "  chain prerouting {",
        "    type nat hook prerouting priority -100; policy accept;",
        '    iifname "lo" return',
        *(f"    tcp dport {port} redirect to :{listen_in}" for port, listen_in, _ in ports),
        "  }",
    ]
    if outbound_to:
        rules += [
            "  chain output {",
            "    type nat hook output priority -100; policy accept;",
            f"    meta skuid {SIDECAR_UID} return",
            *(
                f"    ip daddr {outbound_to} tcp dport {port} redirect to :{listen_out}"
                for port, _, listen_out in ports
            ),
            "  }",
        ]
    return "\n".join([*rules, "}"]) + "\n"


def start_sidecar(
    lab: Lab, state: LabState, pod: PodPlan, pki: SidecarPki, upstream: str | None,
    redirect: bool = True, resumption: bool = False, mode: str = "tcp",
) -> ProcessRecord:  # fmt: skip
    directory = lab.paths.pod_dir(pod.name) / "sidecar"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(cert_pem(pki.cert))
    leaf = directory / "sidecar.pem"
    leaf.write_bytes(pki.leaf(SpiffeId.workload(pod.namespace, pod.service_account)))
    os.chmod(leaf, 0o640)
    os.chown(leaf, 0, SIDECAR_UID)
    (directory / "haproxy.cfg").write_text(
        sidecar_config(directory, upstream, resumption=resumption, mode=mode)
    )
    if redirect:
        (directory / "rules.nft").write_text(nft_rules(upstream, grpc=mode == "h2"))
        _in_pod(lab, pod.name, ["nft", "-f", str(directory / "rules.nft")])
    netns, cgroup = state.plan.netns(pod.name), state.pod_cgroup(pod)
    rec = procs.spawn(
        name=f"sidecar-{pod.name}",
        argv=["haproxy", "-db", "-f", str(directory / "haproxy.cfg")],
        log_path=lab.paths.log_dir / f"sidecar-{pod.name}.log",
        where=pod.name,
        preexec=lambda: enter_pod(netns, cgroup, None),
    )
    state.processes.append(rec)
    state.save()
    return rec


# --------------------------------------------------------------------------- running


def _in_pod(
    lab: Lab, pod: str, argv: list[str], timeout: float = 120.0, *, check: bool = True
) -> str:
    cmd = [sys.executable, "-m", "weft.cli", "lab", "--lab", lab.name, "exec", pod, "--", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0 and (check or not out.stdout.strip()):
        raise LabError(f"in {pod}: {' '.join(argv)} failed: {out.stderr.strip()[-500:]}")
    return out.stdout


def _json_in_pod(lab: Lab, pod: str, argv: list[str], timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_in_pod(lab, pod, argv, timeout))
    return result


def _wait_reachable(lab: Lab, setup: Setup, ip: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            _in_pod(lab, setup.client, ["curl", "-sS", "-m", "3", f"http://{ip}:{ECHO_PORT}/"], 10)
            return
        except LabError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _rss(pid: int) -> dict[str, int]:
    """RSS and PSS in bytes (PSS shares shared pages fairly between processes)."""
    out = {"rss": 0, "pss": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss"] = int(line.split()[1]) * 1024
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _openssl_of_haproxy() -> str | None:
    out = subprocess.run(["haproxy", "-vv"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Running on OpenSSL version"):
            return line.split(":", 1)[1].strip()
    return None


def machine_info() -> dict[str, Any]:
    import ssl

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "haproxy": haproxy.splitlines()[0].split(" - ")[0] if haproxy else None,
        "openssl_weft": ssl.OPENSSL_VERSION,
        "openssl_haproxy": _openssl_of_haproxy(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


ERROR_THRESHOLD = 0.001
"""A scenario whose requests failed more often than this (across all its rounds) is
marked invalid: it gets no figure, only its error count."""

SPREAD_KEYS = ("per_second", "mb_per_second", "p50_us", "p99_us", "cpu_us_per_request")
"""Figures reported with their min and max across rounds besides the median."""


def _median(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure across rounds — except errors, which are summed: one
    bad round must not disappear into a median — with min and max of the main figures,
    and p99.9 only from rounds large enough to mean it (`P999_MIN_SAMPLES`)."""
    keys = [
        k for k, v in samples[0].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "errors"
    ]  # fmt: skip
    out: dict[str, Any] = {}
    for k in keys:
        if k == "p999_us":
            big = [s[k] for s in samples if int(s.get("count", 0)) >= P999_MIN_SAMPLES]
            out[k] = round(statistics.median(big), 1) if big else None
            continue
        values = [s[k] for s in samples if isinstance(s.get(k), (int, float))]
        out[k] = round(statistics.median(values), 1)
        if k in SPREAD_KEYS and len(samples) > 1:
            out[f"{k}_min"] = round(min(values), 1)
            out[f"{k}_max"] = round(max(values), 1)
    if "errors" in samples[0]:
        errors = sum(int(s["errors"]) for s in samples)
        requests = sum(int(s.get("count", 0)) for s in samples)
        out["errors"] = errors
        out["requests"] = requests
        out["valid"] = requests > 0 and errors <= ERROR_THRESHOLD * requests
    return out


def _valid(figures: dict[str, Any]) -> bool:
    return bool(figures.get("valid", True))


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def rotation(setups: tuple[Setup, ...], scenario: str, rnd: int) -> list[Setup]:
    """The order of ``setups`` that run ``scenario`` in round ``rnd``: rotated by one per
    round, so over as many rounds as there are setups each one runs first once."""
    taking = [s for s in setups if s.runs(scenario)]
    k = rnd % len(taking)
    return taking[k:] + taking[:k]


def _cpu_seconds(lab: Lab, names: tuple[str, ...]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for rec in lab.load().processes:
        if rec.name in names and procs.is_alive(rec):
            stat = Path(f"/proc/{rec.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(stat[11]) + int(stat[12])) / ticks
    return total


def _pids(lab: Lab, names: tuple[str, ...]) -> list[int]:
    return [r.pid for r in lab.load().processes if r.name in names and procs.is_alive(r)]


def bpf_map_memlock(pid: int) -> int:
    """Bytes of locked kernel memory of the eBPF maps process ``pid`` holds open (from
    /proc/PID/fdinfo, which gives each map descriptor's ``memlock``): Weft's maps live
    in the kernel, outside the agent's RSS, so they are added to its figure."""
    total = 0
    seen: set[str] = set()
    for entry in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        map_id = fields.get("map_id", "").strip()
        if map_id and map_id not in seen:
            seen.add(map_id)
            total += int(fields.get("memlock", "0").strip() or 0)
    return total


class _Sampler:
    """Peak RSS/PSS of some processes (summed), sampled every 0.25 s in a thread."""

    def __init__(self, pids: list[int]) -> None:
        import threading

        self.pids = pids
        self.peak = {"rss": 0, "pss": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                now = [_rss(p) for p in self.pids]
            except OSError:
                continue
            for k in ("rss", "pss"):
                self.peak[k] = max(self.peak[k], sum(m[k] for m in now))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def _mem_sum(pids: list[int]) -> dict[str, int]:
    each = [_rss(p) for p in pids]
    return {"rss": sum(m["rss"] for m in each), "pss": sum(m["pss"] for m in each)}


IdentitySetup = Callable[[Path, list[str]], dict[str, str]]
"""Makes a lab's CA and bootstrap tokens (control plane code, so the CLI passes it in)."""


def run(
    profile: Profile, identity_setup: IdentitySetup, report: Report = print, name: str = "wbench"
) -> dict[str, Any]:
    """Both labs, every scenario; the result is JSON-ready.  Labs are removed at the end."""
    started = time.monotonic()
    result: dict[str, Any] = {
        "machine": machine_info(),
        "profile": {
            "rates": list(profile.rates),
            "seconds": profile.seconds,
            "rounds": profile.rounds,
            "connections": profile.connections,
            "memory_pods": list(profile.memory_pods),
        },
    }
    result |= _traffic(profile, identity_setup, report, name)
    result["memory"] = _memory(profile, identity_setup, report, f"{name}m")
    result["ratios"], result["targets"] = _ratios(result, profile)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def _traffic(
    profile: Profile, identity_setup: IdentitySetup, report: Report, name: str
) -> dict[str, Any]:
    lab = Lab(name, report=lambda m: None, identity_setup=identity_setup)
    report(f"lab {name!r}: 2 nodes, direct / weft / haproxy-sidecar pod pairs")
    lab.up(plan=bench_plan(name), replace=True)
    try:
        state = lab.load()
        ip = {p.name: p.ip for p in state.plan.pods}
        pki = SidecarPki()
        for server, client, resumption, mode in SIDECAR_PAIRS:
            start_sidecar(lab, state, state.pod(server), pki, None, mode=mode)
            start_sidecar(lab, state, state.pod(client), pki, ip[server],
                          resumption=resumption, mode=mode)  # fmt: skip
        for s in SETUPS:
            _wait_reachable(lab, s, ip[s.server])
        report(f"all {len(SETUPS)} paths answer; measuring")
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {} for s in SETUPS}
        secs = profile.seconds

        def openloop(*args: str) -> list[str]:
            return [sys.executable, "-m", "weft.bench.openloop", *args]

        def loadgen(mode: str, s: Setup) -> list[str]:
            target = [ip[s.server], str(ECHO_PORT), str(secs)]
            return [sys.executable, "-m", "weft.bench.loadgen", mode, *target]

        def h2load(mode: str, s: Setup, port: int) -> list[str]:
            # 16 connections x 8 streams: HTTP/2's multiplexing, at the h1 rows' conns.
            target = [ip[s.server], str(port), str(secs), conns, "8"]
            return [sys.executable, "-m", "weft.bench.h2load", mode, *target]

        conns = str(profile.connections)
        scenarios: list[tuple[str, Callable[[Setup], list[str]]]] = [
            *(
                (
                    f"rate-{r}",
                    lambda s, r=r: openloop(
                        "rate", ip[s.server], str(ECHO_PORT), str(r), str(secs), conns
                    ),
                )
                for r in profile.rates
            ),
            (
                "saturate",
                lambda s: openloop("saturate", ip[s.server], str(ECHO_PORT), str(secs), conns),
            ),
            ("conn", lambda s: loadgen("conn", s)),
            ("bulk", lambda s: loadgen("bulk", s)),
            ("h2", lambda s: h2load("h2", s, ECHO_PORT)),
            ("grpc", lambda s: h2load("grpc", s, ECHO_GRPC_PORT)),
        ]
        peaks: dict[str, list[dict[str, int]]] = {}
        for rnd in range(profile.rounds):
            for scenario, argv in scenarios:
                for s in rotation(SETUPS, scenario, rnd):
                    cpu_before = _cpu_seconds(lab, s.proxies)
                    sampler = None
                    if scenario == "saturate" and s.proxies:
                        sampler = _Sampler(_pids(lab, s.proxies))
                    try:
                        res = _json_in_pod(lab, s.client, argv(s), timeout=secs * 4 + 60)
                    finally:
                        if sampler is not None:
                            peaks.setdefault(s.name, []).append(sampler.stop())
                    _charge_cpu(res, _cpu_seconds(lab, s.proxies) - cpu_before, bool(s.proxies))
                    samples[s.name].setdefault(scenario, []).append(res)
                    report(f"round {rnd + 1}/{profile.rounds} {scenario:9} {s.name:18} "
                           f"{_fmt(res)}")  # fmt: skip
        balance = _balance(lab, report)
        idle = _idle_connections(lab, ip, report)
        tunnels = _tunnel_counts(lab)
        tls_facts = _tls_facts(lab, ip)
        maps = {
            rec.name: bpf_map_memlock(rec.pid)
            for rec in lab.load().processes
            if rec.name.startswith("agent-") and procs.is_alive(rec)
        }
    finally:
        report(f"removing lab {name!r}")
        lab.down()
    summary = {s: {sc: _median(v) for sc, v in by.items()} for s, by in samples.items()}
    under_load = {
        "saturation_peak": {
            k: {m: max(p[m] for p in v) for m in ("rss", "pss")} for k, v in peaks.items()
        },
        "idle_connections": idle,
        "bpf_map_memlock": maps,
    }
    return {
        "summary": summary,
        "samples": samples,
        "per_round_ratios": per_round_ratios(samples),
        "memory_under_load": under_load,
        "tunnels": tunnels,
        "tls": tls_facts,
        "balance": balance,
    }


def _charge_cpu(res: dict[str, Any], cpu_seconds: float, has_proxies: bool) -> None:
    """The proxies' CPU during this run only, per request (per MB for bulk)."""
    if not has_proxies:
        return
    res["proxy_cpu_seconds"] = round(cpu_seconds, 3)
    if res.get("mode") == "bulk":
        mb = res["mb_per_second"] * res["seconds"]
        res["cpu_ms_per_mb"] = round(1000 * cpu_seconds / mb, 3) if mb else None
        return
    count = int(res.get("count", 0))
    res["cpu_us_per_request"] = round(1e6 * cpu_seconds / count, 1) if count else None


RATIO_PAIRS = (
    ("weft", "haproxy-sidecars"),
    ("weft", "haproxy-http"),
    ("weft", "haproxy-h2"),
    ("weft-same-node", "haproxy-same-node"),
    ("weft", "direct"),
    ("weft-same-node", "direct-same-node"),
)


def per_round_ratios(
    samples: dict[str, dict[str, list[dict[str, Any]]]],
    pairs: tuple[tuple[str, str], ...] = RATIO_PAIRS,
) -> dict[str, Any]:
    """Throughput ratios computed within each round (the two setups ran moments apart,
    under the same load), then summarised: per round, median, min, max. A round in which
    either side had errors gives no ratio. ``pairs``: (mine, theirs) setup names
    (``weft bench sidecar`` passes its own)."""
    out: dict[str, Any] = {}
    for mine, theirs in pairs:
        by: dict[str, Any] = {}
        for scenario, rounds in samples.get(mine, {}).items():
            others = samples.get(theirs, {}).get(scenario, [])
            key = "mb_per_second" if scenario == "bulk" else "per_second"
            per = [
                round(a[key] / b[key], 3)
                for a, b in zip(rounds, others, strict=False)
                if b.get(key) and not a.get("errors") and not b.get("errors")
            ]
            if per:
                by[scenario] = {
                    "per_round": per,
                    "median": round(statistics.median(per), 3),
                    "min": min(per),
                    "max": max(per),
                }
        out[f"{mine}_over_{theirs}".replace("-", "_")] = by
    return out


BALANCE_RUNS = (
    # (name, echoclient arguments): one connection (channel) to the two-replica service.
    ("http1_split", ["http1", f"{PAIR_VIP}:80", "-n", "1000"]),
    ("h2_split", ["h2", f"{PAIR_VIP}:80", "-n", "1000", "--concurrency", "8"]),
    ("grpc_split", ["grpc", f"{PAIR_VIP}:{ECHO_GRPC_PORT}", "-n", "1000"]),
    ("http1_slow", ["http1", f"{PAIR_VIP}:80", "-n", "500", "--path", "/?delay_ms=bs-pair-2:20"]),
    # Right after: bs-pair-2 is fast again; how soon does it get its share back?
    ("http1_recovery", ["http1", f"{PAIR_VIP}:80", "-n", "1000"]),
    ("grpc_slow", ["grpc", f"{PAIR_VIP}:{ECHO_GRPC_PORT}", "-n", "500",
                   "--metadata", "delay_ms=bs-pair-2:20"]),
)  # fmt: skip
FORGET_SECONDS = 10.0
"""Pause before a round's split runs, so that the previous round's slow replica is
forgotten (5 time constants of `PeakEwma.decay`): the splits measure equal replicas,
``http1_recovery`` measures the return of one that was slow."""


def _balance(lab: Lab, report: Report) -> dict[str, Any]:
    """Per-request balancing over two equal replicas (bs-pair-1/2, both on node-2), from
    one keep-alive connection, one h2c connection and one gRPC channel in bc-weft; then
    with bs-pair-2 made 20 ms slower (``*_slow``), and right after it is fast again
    (``http1_recovery``). ``share`` is bs-pair-2's."""
    out: dict[str, Any] = {}
    for name, args in BALANCE_RUNS:
        if name == "http1_split":
            time.sleep(FORGET_SECONDS)
        argv = [sys.executable, "-m", "weft.lab.echoclient", *args]
        got = json.loads(_in_pod(lab, "bc-weft", argv, timeout=300, check=False))
        total = sum(got["pods"].values())
        share = round(got["pods"].get("bs-pair-2", 0) / total, 3) if total else None
        out[name] = {
            "pods": got["pods"],
            "errors": got["errors"],
            "share": share,
            "latency_ms": got.get("latency_ms", {}),
            "switches": got.get("switches"),
        }
        lat = ", ".join(f"{p} p50 {v['p50']} ms" for p, v in got.get("latency_ms", {}).items())
        report(f"balance {name:12} {got['pods']} errors {got['errors']} ({lat}; "
               f"{got.get('switches')} switches)")  # fmt: skip
    return out


def _idle_connections(lab: Lab, ip: dict[str, str], report: Report) -> dict[str, Any]:
    """RSS/PSS of each mesh's proxies while ``IDLE_CONNECTIONS`` connections are open
    and idle (each sent one request, then waits), cross node."""
    out: dict[str, Any] = {}
    for setup in (s for s in SETUPS if s.name in ("weft", "haproxy-sidecars")):
        pids = _pids(lab, setup.proxies)
        before = _mem_sum(pids)
        cmd = [sys.executable, "-m", "weft.cli", "lab", "--lab", lab.name, "exec", setup.client,
               "--", sys.executable, "-m", "weft.bench.burst", ip[setup.server], str(ECHO_PORT),
               str(IDLE_CONNECTIONS), "10"]  # fmt: skip
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            held = json.loads(proc.stdout.readline() or "{}")
            time.sleep(1.0)
            during = _mem_sum(pids)
            final = json.loads(proc.stdout.readline() or "{}")
            proc.wait(timeout=120)
        out[setup.name] = {"before": before, "held": during, "connections": held.get("held"),
                           "ok": final.get("ok")}  # fmt: skip
        report(
            f"{IDLE_CONNECTIONS} idle connections, {setup.name}: proxies RSS "
            f"{before['rss'] / 2**20:.1f} -> {during['rss'] / 2**20:.1f} MiB "
            f"(PSS {before['pss'] / 2**20:.1f} -> {during['pss'] / 2**20:.1f})"
        )
    return out


_PROBE = r"""
import json, socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(sys.argv[3])
ctx.load_cert_chain(sys.argv[4])
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as raw:
    with ctx.wrap_socket(raw) as tls:
        print(json.dumps({"version": tls.version(), "cipher": tls.cipher()[0]}))
"""


def _tls_facts(lab: Lab, ip: dict[str, str]) -> dict[str, Any]:
    """What each mesh negotiated: Weft's from its pooled connections, HAProxy's from a
    probe with the client sidecar's certificate. Both run OpenSSL 3.0 with its default
    group preference (X25519 first); Python 3.11 cannot report the group."""
    out: dict[str, Any] = {}
    state = agent_state(lab.name, "node-1")
    rows = [c for key in state["tunnel"].get("pool") or [] for c in key["connections"]]
    out["weft"] = sorted({f"{c.get('tls_version')} {c.get('cipher')}" for c in rows})
    side = lab.paths.pod_dir("bc-haproxy") / "sidecar"
    try:
        probe = _in_pod(lab, "bc-haproxy", [sys.executable, "-c", _PROBE, ip["bs-haproxy"],
                                            str(SIDECAR_IN), str(side / "ca.pem"),
                                            str(side / "sidecar.pem")], 30)  # fmt: skip
        out["haproxy"] = json.loads(probe)
    except (LabError, ValueError) as exc:
        out["haproxy"] = {"error": str(exc)[-200:]}
    return out


def _tunnel_counts(lab: Lab) -> dict[str, dict[str, int]]:
    """Per node agent: connections its outbound listener accepted, streams its tunnel
    client opened over how many TLS connections, and streams its tunnel server relayed:
    the proof that the weft setups' traffic crossed the mesh (cross node: node-1 opens,
    node-2 serves; same node: node-1 both)."""
    out = {}
    for node in lab.load().plan.nodes:
        state = agent_state(lab.name, node.name)
        out[node.name] = {
            "outbound_accepted": state["proxy"]["stats"]["accepted"],
            "streams_opened": state["tunnel"]["client"]["opened"],
            "tls_connections_made": state["tunnel"]["client"]["connections"],
            "streams_established": state["tunnel"]["server"]["established"],
        }
    return out


def _fmt(res: dict[str, Any]) -> str:
    errors = f"  {res['errors']} errors" if res.get("errors") else ""
    cpu = f"  cpu {res['cpu_us_per_request']:.0f}us/req" if res.get("cpu_us_per_request") else ""
    if res.get("mode") == "bulk":
        return f"{res['mb_per_second']:8.1f} MB/s{errors}"
    if res.get("mode") == "conn":
        return f"{res['per_second']:8.0f} conn/s  p50 {res['p50_us']:7.0f}us{cpu}{errors}"
    if res.get("mode") in H2_SCENARIOS:
        return (f"{res['per_second']:8.0f} req/s  mean {res.get('mean_us', 0):6.0f}us  "
                f"max {res.get('max_us', 0):8.0f}us{cpu}{errors}")  # fmt: skip
    return (
        f"{res['per_second']:8.0f} req/s  p50 {res['p50_us']:7.0f}us  p99 {res['p99_us']:7.0f}us"
        f"  max {res.get('max_us', 0):8.0f}us{cpu}{errors}"
    )


def _memory(
    profile: Profile, identity_setup: IdentitySetup, report: Report, name: str
) -> dict[str, Any]:
    most = max(profile.memory_pods)
    lab = Lab(name, report=lambda m: None, identity_setup=identity_setup)
    report(f"lab {name!r}: 1 node, {most} idle pods, each with its own identity")
    lab.up(plan=memory_plan(name, most), replace=True)
    out: dict[str, Any] = {"pods": list(profile.memory_pods), "weft_agent": {}, "haproxy": {}}
    try:
        state = lab.load()
        agent = next(r for r in state.processes if r.name == "agent-node-1")
        out["weft_agent_idle"] = _rss(agent.pid)
        pki = SidecarPki()
        sidecars: list[ProcessRecord] = []
        captured = 0
        for k in profile.memory_pods:
            for i in range(captured + 1, k + 1):
                lab.set_labels(f"mem-{i}", dict(CAPTURED))
            captured = k
            _wait_captured(lab, k)
            time.sleep(1.0)
            out["weft_agent"][str(k)] = _rss(agent.pid)
            out.setdefault("bpf_map_memlock", {})[str(k)] = bpf_map_memlock(agent.pid)
            state = lab.load()
            while len(sidecars) < k:
                pod = state.pod(f"mem-{len(sidecars) + 1}")
                sidecars.append(start_sidecar(lab, state, pod, pki, None, redirect=False))
            time.sleep(1.0)
            per = [_rss(r.pid) for r in sidecars[:k]]
            out["haproxy"][str(k)] = {
                "rss": sum(p["rss"] for p in per),
                "pss": sum(p["pss"] for p in per),
                "processes": k,
            }
            a, h = out["weft_agent"][str(k)], out["haproxy"][str(k)]
            report(
                f"memory, {k:3} pods: weft agent RSS {a['rss'] / 2**20:6.1f} MiB "
                f"(PSS {a['pss'] / 2**20:6.1f}); haproxy sidecars RSS {h['rss'] / 2**20:6.1f} "
                f"MiB (PSS {h['pss'] / 2**20:6.1f})"
            )
    finally:
        report(f"removing lab {name!r}")
        lab.down()
    return out


def run_memory(
    identity_setup: IdentitySetup, report: Report = print, name: str = "wbenchm"
) -> dict[str, Any]:
    """The memory step of the full run alone (one node, 10/50/100 captured pods against
    one HAProxy sidecar per pod), with the ratio the full run reports."""
    mem = _memory(FULL, identity_setup, report, name)
    mem["agent_memory_vs_sidecars"] = _memory_target(mem, str(max(FULL.memory_pods)))
    return mem


def _memory_target(mem: dict[str, Any], most: str) -> dict[str, Any]:
    """The agent (PSS + its eBPF maps) against the sidecars' summed PSS, at ``most`` pods."""
    weft_mem = mem["weft_agent"][most]["pss"] + mem.get("bpf_map_memlock", {}).get(most, 0)
    return {
        "measured": _ratio(weft_mem, mem["haproxy"][most]["pss"]),
        "target": 0.1,
        "pods": int(most),
        "basis": "PSS (+ the agent's eBPF map memlock)",
    }


def _wait_captured(lab: Lab, k: int, timeout: float = 120.0) -> None:
    """Until the agent captures ``k`` pods and holds a valid certificate for each."""
    deadline = time.monotonic() + timeout
    state = lab.load()
    netns = state.plan.netns("node-1")
    while True:
        answer = admin_get(netns, "127.0.0.1", 15020, "/debug/state")
        if answer is not None and answer[0] == 200:
            data = json.loads(answer[1])
            certs = (data.get("certificates") or {}).get("identities", {})
            valid = sum(1 for c in certs.values() if c.get("valid"))
            if len(data["capture"]["captured"]) >= k and valid >= k:
                return
        if time.monotonic() > deadline:
            raise LabError(f"the agent did not capture {k} pods within {timeout:.0f}s")
        time.sleep(0.5)


def _ratios(result: dict[str, Any], profile: Profile) -> tuple[dict[str, Any], dict[str, Any]]:
    s = result["summary"]
    ratios: dict[str, Any] = {}
    for other in ("direct", "haproxy-sidecars", "haproxy-http", "haproxy-h2"):
        if other not in s:
            continue
        r: dict[str, Any] = {}
        for scenario in s["weft"]:
            if scenario not in s[other]:
                continue  # a setup that does not run this scenario (haproxy-h2: h2 only)
            w, o = s["weft"][scenario], s[other][scenario]
            if not (_valid(w) and _valid(o)):
                r[scenario] = {"invalid": True}  # errors above the threshold: no ratio
                continue
            key = "mb_per_second" if scenario == "bulk" else "per_second"
            entry = {"throughput": _ratio(w.get(key), o.get(key))}
            if "p99_us" in w:
                entry["p50_latency"] = _ratio(w.get("p50_us"), o.get("p50_us"))
                entry["p99_latency"] = _ratio(w.get("p99_us"), o.get("p99_us"))
            r[scenario] = entry
        ratios[f"weft_over_{other.replace('-', '_')}"] = r
    added: dict[str, dict[str, float | None]] = {}
    for each in profile.rates:
        w, d = s["weft"][f"rate-{each}"], s["direct"][f"rate-{each}"]
        added[f"rate-{each}"] = {
            q: round(w[f"{q}_us"] - d[f"{q}_us"], 1)
            if _valid(w) and _valid(d) and None not in (w[f"{q}_us"], d[f"{q}_us"])
            else None
            for q in ("p50", "p90", "p99", "p999")
        }
    ratios["weft_added_latency_us"] = added
    cpu: dict[str, Any] = {}
    for scenario in ("saturate", "rate-1000", "conn"):
        w = s["weft"].get(scenario, {}).get("cpu_us_per_request")
        h = s["haproxy-sidecars"].get(scenario, {}).get("cpu_us_per_request")
        cpu[scenario] = {"weft_us": w, "haproxy_us": h, "weft_over_haproxy": _ratio(w, h)}
    ratios["cpu_per_request_cross_node"] = cpu
    mem = result["memory"]
    most = str(max(profile.memory_pods))
    rate = "rate-1000" if 1000 in profile.rates else f"rate-{profile.rates[-1]}"
    rounds = result.get("per_round_ratios", {})

    def vs_haproxy(scenario: str, target: float, of: str = "haproxy_sidecars") -> dict[str, Any]:
        r = rounds.get(f"weft_over_{of}", {}).get(scenario)
        if r is None or not _valid(s["weft"].get(scenario, {})):
            return {"measured": None, "target": target, "basis": "no valid rounds"}
        return {"measured": r["median"], "min": r["min"], "max": r["max"], "target": target,
                "basis": "median of per-round ratios"}  # fmt: skip

    targets = {
        "added_p99_ms_at_1000rps_cross_node": {
            "measured": round(p99 / 1000, 3) if (p99 := added[rate]["p99"]) is not None
            else None,
            "target": 0.5, "at": rate,
        },
        "saturation_vs_haproxy": vs_haproxy("saturate", 1.0),
        "saturation_vs_haproxy_http": vs_haproxy("saturate", 1.0, "haproxy_http"),
        "h2_saturation_vs_haproxy_http": vs_haproxy("h2", 1.0, "haproxy_http"),
        "h2_saturation_vs_haproxy_h2": vs_haproxy("h2", 1.0, "haproxy_h2"),
        "grpc_saturation_vs_haproxy_h2": vs_haproxy("grpc", 1.0, "haproxy_h2"),
        "keepalive_split_equal_replicas": _share_target(result, "http1_split", (0.45, 0.55)),
        "h2_split_equal_replicas": _share_target(result, "h2_split", (0.45, 0.55)),
        "grpc_split_equal_replicas": _share_target(result, "grpc_split", (0.45, 0.55)),
        "slow_replica_share_http1": _share_target(result, "http1_slow", (0.0, 0.10)),
        "slow_replica_share_grpc": _share_target(result, "grpc_slow", (0.0, 0.10)),
        "new_connections_vs_haproxy": vs_haproxy("conn", 1.5),
        "bulk_vs_haproxy": vs_haproxy("bulk", 1.0),
        "agent_memory_vs_sidecars": _memory_target(mem, most),
    }  # fmt: skip
    return ratios, targets


def _share_target(result: dict[str, Any], run: str, within: tuple[float, float]) -> dict[str, Any]:
    got = result.get("balance", {}).get(run)
    if got is None or got["share"] is None or got["errors"]:
        return {"measured": None, "target": list(within), "basis": "no valid run"}
    return {"measured": got["share"], "target": list(within),
            "met": within[0] <= got["share"] <= within[1],
            "basis": "share of requests to bs-pair-2 (of two replicas)"}  # fmt: skip


# --------------------------------------------------------------------------- plots


def plot(result: dict[str, Any], prefix: Path) -> list[Path]:
    """PNG plots next to the JSON; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    s = result["summary"]
    setups = list(s)
    written = []
    rates = result["profile"]["rates"]
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), squeeze=False)
    qs = ("p50_us", "p90_us", "p99_us", "p999_us", "max_us")
    for ax, rate in zip(axes[0], rates, strict=True):
        for setup in setups:
            row = s[setup].get(f"rate-{rate}")
            if row is None or not _valid(row):
                continue  # not run, or invalid (errors): no curve, as in the table
            ys = [row[q] / 1000 if row.get(q) is not None else float("nan") for q in qs]
            ax.plot(range(len(qs)), ys, marker="o", label=setup)
        ax.set_xticks(range(len(qs)), [q.removesuffix("_us") for q in qs])
        ax.set_yscale("log")
        ax.set_title(f"{rate} req/s, open loop")
        ax.set_ylabel("latency (ms, log)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path = prefix.with_name(prefix.name + "-latency.png")
    fig.savefig(path, dpi=110)
    written.append(path)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (scenario, key, title) in zip(
        axes,
        (
            ("saturate", "per_second", "saturation (req/s)"),
            ("conn", "per_second", "new connections (/s)"),
            ("bulk", "mb_per_second", "bulk (MB/s)"),
        ),
        strict=True,
    ):
        shown = [x for x in setups if scenario in s[x] and _valid(s[x][scenario])]
        values = [s[x][scenario][key] for x in shown]
        low = [v - s[x][scenario].get(f"{key}_min", v) for x, v in zip(shown, values, strict=True)]
        high = [s[x][scenario].get(f"{key}_max", v) - v for x, v in zip(shown, values, strict=True)]
        ax.bar(shown, values, yerr=[low, high], capsize=4,
               color=[f"C{i}" for i in range(len(shown))])  # fmt: skip
        ax.set_title(f"{title}, median and min-max of rounds")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = prefix.with_name(prefix.name + "-throughput.png")
    fig.savefig(path, dpi=110)
    written.append(path)
    plt.close(fig)

    mem = result["memory"]
    pods = mem["pods"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, series in (("weft agent (one per node)", mem["weft_agent"]),
                          ("haproxy sidecars (sum)", mem["haproxy"])):  # fmt: skip
        ax.plot(pods, [series[str(k)]["pss"] / 2**20 for k in pods], marker="o", label=label)
    ax.set_xlabel("captured pods on the node")
    ax.set_ylabel("memory (PSS, MiB)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = prefix.with_name(prefix.name + "-memory.png")
    fig.savefig(path, dpi=110)
    written.append(path)
    plt.close(fig)
    return written
