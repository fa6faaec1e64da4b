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
from weft.lab.plan import CAPTURE_LABEL, ECHO_PORT, LabPlan, PodPlan, node_plan
from weft.lab.state import LabState, ProcessRecord
from weft.nsenter import enter_pod

Report = Callable[[str], None]

SIDECAR_UID = 1337
SIDECAR_OUT = 15001
SIDECAR_IN = 15006
CAPTURED = {CAPTURE_LABEL: "enabled"}


@dataclass(frozen=True)
class Setup:
    name: str
    client: str
    server: str


SETUPS = (
    Setup("direct", "bc-direct", "bs-direct"),
    Setup("weft", "bc-weft", "bs-weft"),
    Setup("weft-same-node", "bc-weft", "bs-local"),
    Setup("haproxy-sidecars", "bc-haproxy", "bs-haproxy"),
)


@dataclass(frozen=True)
class Profile:
    rates: tuple[int, ...]
    seconds: float
    rounds: int
    memory_pods: tuple[int, ...]
    connections: int = 16


FULL = Profile(rates=(500, 1000, 2000), seconds=8.0, rounds=3, memory_pods=(10, 50, 100))
QUICK = Profile(rates=(500, 1000), seconds=2.0, rounds=1, memory_pods=(10,))


# --------------------------------------------------------------------------- lab layout


PodSpec = tuple[str, str, dict[str, str], str | None]
"""(name, service account, labels, app)."""


def _pods(node_index: int, specs: list[PodSpec]) -> list[PodPlan]:
    node = node_plan(node_index)
    base = ipaddress.IPv4Network(node.pod_cidr).network_address
    pods = []
    for i, (name, sa, labels, app) in enumerate(specs):
        ports = (ECHO_PORT,) if app == "echo" else ()
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
        ],
    ) + _pods(
        2,
        [
            ("bs-direct", "bench-server", {}, "echo"),
            ("bs-weft", "bench-server", dict(CAPTURED), "echo"),
            ("bs-haproxy", "bench-server-ha", {}, "echo"),
        ],
    )
    return LabPlan(name, (node_plan(1), node_plan(2)), tuple(pods), (), {"default": {}})


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


def sidecar_config(directory: Path, upstream: str | None) -> str:
    """An HAProxy sidecar: outbound (to ``upstream`` over mTLS) and inbound (mTLS -> app)."""
    tls = f"crt {directory}/sidecar.pem ca-file {directory}/ca.pem verify required"
    lines = [
        "global",
        f"    uid {SIDECAR_UID}",
        f"    gid {SIDECAR_UID}",
        "    nbthread 1",
        "    maxconn 4096",
        "    ssl-default-bind-options ssl-min-ver TLSv1.3",
        "    ssl-default-server-options ssl-min-ver TLSv1.3",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 1h",
        "    timeout server 1h",
        "frontend inbound",
        f"    bind :{SIDECAR_IN} ssl {tls}",
        "    default_backend app",
        "backend app",
        f"    server app 127.0.0.1:{ECHO_PORT}",
    ]
    if upstream:
        lines += [
            "frontend outbound",
            f"    bind 127.0.0.1:{SIDECAR_OUT}",
            "    default_backend upstream",
            "backend upstream",
            f"    server peer {upstream}:{ECHO_PORT} ssl {tls}",
        ]
    return "\n".join(lines) + "\n"


def nft_rules(outbound_to: str | None) -> str:
    """The sidecar redirects, as an init container would install them (nftables)."""
    rules = [
        "table ip weft_bench_sidecar {",
        "  chain prerouting {",
        "    type nat hook prerouting priority -100; policy accept;",
        '    iifname "lo" return',
        f"    tcp dport {ECHO_PORT} redirect to :{SIDECAR_IN}",
        "  }",
    ]
    if outbound_to:
        rules += [
            "  chain output {",
            "    type nat hook output priority -100; policy accept;",
            f"    meta skuid {SIDECAR_UID} return",
            f"    ip daddr {outbound_to} tcp dport {ECHO_PORT} redirect to :{SIDECAR_OUT}",
            "  }",
        ]
    return "\n".join([*rules, "}"]) + "\n"


def start_sidecar(
    lab: Lab, state: LabState, pod: PodPlan, pki: SidecarPki, upstream: str | None,
    redirect: bool = True,
) -> ProcessRecord:  # fmt: skip
    directory = lab.paths.pod_dir(pod.name) / "sidecar"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(cert_pem(pki.cert))
    leaf = directory / "sidecar.pem"
    leaf.write_bytes(pki.leaf(SpiffeId.workload(pod.namespace, pod.service_account)))
    os.chmod(leaf, 0o640)
    os.chown(leaf, 0, SIDECAR_UID)
    (directory / "haproxy.cfg").write_text(sidecar_config(directory, upstream))
    if redirect:
        (directory / "rules.nft").write_text(nft_rules(upstream))
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


def _in_pod(lab: Lab, pod: str, argv: list[str], timeout: float = 120.0) -> str:
    cmd = [sys.executable, "-m", "weft.cli", "lab", "--lab", lab.name, "exec", pod, "--", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
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


def machine_info() -> dict[str, Any]:
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
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


ERROR_THRESHOLD = 0.001
"""A scenario whose requests failed more often than this (across all its rounds) is
marked invalid: it gets no figure, only its error count."""


def _median(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure across rounds — except errors, which are summed: one
    bad round must not disappear into a median."""
    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float)) and k != "errors"]
    out: dict[str, Any] = {k: round(statistics.median(s[k] for s in samples), 1) for k in keys}
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
        start_sidecar(lab, state, state.pod("bs-haproxy"), pki, None)
        start_sidecar(lab, state, state.pod("bc-haproxy"), pki, ip["bs-haproxy"])
        for s in SETUPS:
            _wait_reachable(lab, s, ip[s.server])
        report("all four paths answer; measuring")
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {} for s in SETUPS}
        secs = profile.seconds

        def openloop(*args: str) -> list[str]:
            return [sys.executable, "-m", "weft.bench.openloop", *args]

        def loadgen(mode: str, s: Setup) -> list[str]:
            target = [ip[s.server], str(ECHO_PORT), str(secs)]
            return [sys.executable, "-m", "weft.bench.loadgen", mode, *target]

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
        ]
        for rnd in range(profile.rounds):
            order = list(SETUPS[rnd % len(SETUPS) :] + SETUPS[: rnd % len(SETUPS)])
            for scenario, argv in scenarios:
                for s in order:
                    res = _json_in_pod(lab, s.client, argv(s), timeout=secs * 4 + 60)
                    samples[s.name].setdefault(scenario, []).append(res)
                    report(f"round {rnd + 1}/{profile.rounds} {scenario:9} {s.name:17} "
                           f"{_fmt(res)}")  # fmt: skip
        agent_cpu = _agent_stats(lab)
        tunnels = _tunnel_counts(lab)
    finally:
        report(f"removing lab {name!r}")
        lab.down()
    summary = {s: {sc: _median(v) for sc, v in by.items()} for s, by in samples.items()}
    return {"summary": summary, "samples": samples, "agents": agent_cpu, "tunnels": tunnels}


def _tunnel_counts(lab: Lab) -> dict[str, dict[str, int]]:
    """Per node agent: connections its outbound listener accepted, tunnels it opened and
    tunnels its server established — the proof that the weft setups' traffic crossed the
    mesh (cross node: node-1 opens, node-2 establishes; same node: node-1 both)."""
    out = {}
    for node in lab.load().plan.nodes:
        state = agent_state(lab.name, node.name)
        out[node.name] = {
            "outbound_accepted": state["proxy"]["stats"]["accepted"],
            "tunnels_opened": state["tunnel"]["client"]["opened"],
            "tunnels_established": state["tunnel"]["server"]["established"],
        }
    return out


def _agent_stats(lab: Lab) -> dict[str, Any]:
    out = {}
    state = lab.load()
    for rec in state.processes:
        if rec.name.startswith(("agent-", "sidecar-")) and procs.is_alive(rec):
            stat = Path(f"/proc/{rec.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            out[rec.name] = {
                "cpu_seconds": round((int(stat[11]) + int(stat[12])) / ticks, 2),
                **_rss(rec.pid),
            }
    return out


def _fmt(res: dict[str, Any]) -> str:
    if res.get("mode") == "bulk":
        return f"{res['mb_per_second']:8.1f} MB/s"
    if res.get("mode") == "conn":
        return f"{res['per_second']:8.0f} conn/s  p50 {res['p50_us']:7.0f}us"
    return (
        f"{res['per_second']:8.0f} req/s  p50 {res['p50_us']:7.0f}us  p99 {res['p99_us']:7.0f}us"
        f"  max {res.get('max_us', 0):8.0f}us"
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
    for other in ("direct", "haproxy-sidecars"):
        r: dict[str, Any] = {}
        for scenario in s["weft"]:
            w, o = s["weft"][scenario], s[other].get(scenario, {})
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
            q: round(w[f"{q}_us"] - d[f"{q}_us"], 1) if _valid(w) and _valid(d) else None
            for q in ("p50", "p90", "p99", "p999")
        }
    ratios["weft_added_latency_us"] = added
    mem = result["memory"]
    most = str(max(profile.memory_pods))
    rate = "rate-1000" if 1000 in profile.rates else f"rate-{profile.rates[-1]}"
    targets = {
        "added_p99_ms_at_1000rps_cross_node": {
            "measured": round(p99 / 1000, 3) if (p99 := added[rate]["p99"]) is not None
            else None,
            "target": 1.0, "at": rate,
        },
        "saturation_vs_haproxy": {
            "measured": ratios["weft_over_haproxy_sidecars"]["saturate"].get("throughput"),
            "target": 0.8,
        },
        "agent_memory_vs_sidecars": {
            "measured": _ratio(mem["weft_agent"][most]["pss"], mem["haproxy"][most]["pss"]),
            "target": 0.1,
            "pods": int(most),
            "basis": "PSS",
        },
    }  # fmt: skip
    return ratios, targets


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
            row = s[setup][f"rate-{rate}"]
            ax.plot(range(len(qs)), [row[q] / 1000 for q in qs], marker="o", label=setup)
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
        ax.bar(setups, [s[x][scenario][key] for x in setups], color=["C0", "C1", "C2", "C3"])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
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
