"""``weft bench``: side-by-side measurements in the lab (see docs/benchmarks.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)


@click.group(invoke_without_command=True)
@click.option("--quick", is_flag=True, help="About 3 minutes: fewer rates, shorter samples.")
@click.option("--seconds", type=float, help="Length of each sample (default 8, quick 2).")
@click.option("--rounds", type=int, help="Rounds over all setups; medians (default 3, quick 1).")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
    help="Write every figure here; PNG plots go next to it (FILE-latency.png, ...).",
)  # fmt: skip
@click.pass_context
def bench(
    ctx: click.Context,
    quick: bool,
    seconds: float | None,
    rounds: int | None,
    json_path: Path | None,
) -> None:
    """Measure Weft in the lab; every comparison runs in one run, reported as ratios.

    \b
    Without a subcommand: the side-by-side benchmark (docs/benchmarks.md) —
    direct pod-to-pod, Weft (cross-node and same-node) and HAProxy sidecars with mTLS:
    open-loop latency at fixed rates, saturation, new connections, bulk throughput,
    and node agent memory against summed sidecar memory for 10/50/100 pods.
    Needs root (it builds labs named wbench and wbenchm, replacing any such lab).
    """
    if ctx.invoked_subcommand is not None:
        return
    import dataclasses

    from weft.bench.mesh import FULL, QUICK, plot, run
    from weft.cli.lab import lab_identity_setup

    profile = QUICK if quick else FULL
    if seconds is not None:
        profile = dataclasses.replace(profile, seconds=seconds)
    if rounds is not None:
        profile = dataclasses.replace(profile, rounds=rounds)

    def say(message: str) -> None:
        err.print(f"[dim]·[/dim] {message}", highlight=False)

    result = run(profile, lab_identity_setup, report=say)
    _print_mesh(result)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")
        for png in plot(result, json_path.with_suffix("")):
            err.print(f"wrote {png}")


def _print_mesh(result: dict[str, Any]) -> None:
    s = result["summary"]
    rates = result["profile"]["rates"]
    table = Table("setup", *[f"{r}/s p50 / p99 / p99.9 ms" for r in rates], "sat. req/s",
                  "conn/s", "bulk MB/s", "CPU µs/req (sat.)")  # fmt: skip

    def spread(f: dict[str, Any], key: str) -> str:
        if f"{key}_min" not in f:
            return f"{f[key]:.0f}"
        return f"{f[key]:.0f} ({f[key + '_min']:.0f}-{f[key + '_max']:.0f})"

    def cell(by: dict[str, Any], scenario: str, text: Callable[[dict[str, Any]], str]) -> str:
        f = by.get(scenario)
        if f is None:
            return "-"
        if not f.get("valid", True):
            return f"invalid: {f['errors']} of {f['requests']} failed"
        return text(f)

    def quantiles(f: dict[str, Any]) -> str:
        p999 = f"{f['p999_us'] / 1000:.2f}" if f.get("p999_us") is not None else "n/a"
        return f"{f['p50_us'] / 1000:.2f} / {f['p99_us'] / 1000:.2f} / {p999}"

    for setup, by in s.items():
        table.add_row(
            setup,
            *[cell(by, f"rate-{r}", quantiles) for r in rates],
            cell(by, "saturate", lambda f: spread(f, "per_second")),
            cell(by, "conn", lambda f: spread(f, "per_second")),
            cell(by, "bulk", lambda f: spread(f, "mb_per_second")),
            cell(by, "saturate", lambda f: f"{f.get('cpu_us_per_request') or 0:.0f}"),
        )
    console = Console()
    console.print(table)
    for name, ratios in result.get("per_round_ratios", {}).items():
        parts = [
            f"{sc} {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
            for sc, r in ratios.items()
            if sc in ("saturate", "conn", "bulk")
        ]
        console.print(f"{name} (per round): " + ", ".join(parts))
    mem = result["memory"]
    mt = Table("captured pods", "weft agent RSS / PSS MiB (+ eBPF maps)",
               "haproxy sidecars RSS / PSS MiB")  # fmt: skip
    for k in mem["pods"]:
        a, h = mem["weft_agent"][str(k)], mem["haproxy"][str(k)]
        maps = mem.get("bpf_map_memlock", {}).get(str(k), 0)
        mt.add_row(
            str(k),
            f"{a['rss'] / 2**20:.1f} / {a['pss'] / 2**20:.1f} (+{maps / 2**20:.1f})",
            f"{h['rss'] / 2**20:.1f} / {h['pss'] / 2**20:.1f}",
        )
    console.print(mt)
    load = result.get("memory_under_load", {})
    for setup, m in load.get("idle_connections", {}).items():
        console.print(
            f"{m['connections']} idle connections, {setup}: proxies RSS "
            f"{m['before']['rss'] / 2**20:.1f} -> {m['held']['rss'] / 2**20:.1f} MiB"
        )
    for setup, m in load.get("saturation_peak", {}).items():
        console.print(f"saturation peak, {setup}: proxies RSS {m['rss'] / 2**20:.1f} MiB")
    for name, t in result["targets"].items():
        console.print(f"{name}: measured {t['measured']} (target {t['target']})")


@bench.command()
@click.option("--seconds", default=3.0, show_default=True, help="Length of each sample.")
@click.option("--rounds", default=3, show_default=True, help="A/B rounds (medians reported).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def sockmap(seconds: float, rounds: int, json_path: Path | None) -> None:
    """The sk_msg shortcut's effect: pod -> node proxy -> local echo, with and without."""
    from weft.bench.sockmap import SCENARIOS, run

    result = run(seconds, rounds, report=lambda m: err.print(f"[dim]·[/dim] {m}", highlight=False))
    table = Table("setup", *[f"{s} /s" for s in SCENARIOS], "rr p50 µs", "rr p99 µs", "bulk MB/s")
    for setup, by in result["summary"].items():
        table.add_row(
            setup,
            *[f"{by[s]['per_second']:.0f}" for s in SCENARIOS],
            f"{by['rr']['p50_us']:.0f}",
            f"{by['rr']['p99_us']:.0f}",
            f"{by['bulk']['mb_per_second']:.1f}",
        )
    Console().print(table)
    r = result["sockmap_over_no_sockmap"]
    Console().print(
        f"sockmap / no-sockmap: rr {r['rr']['per_second']}x req/s, "
        f"conn {r['conn']['per_second']}x conn/s, bulk {r['bulk']['per_second']}x; "
        f"sk_msg redirects {result['sk_msg_redirects']}"
    )
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")


@bench.command()
@click.option("--rounds", default=3, show_default=True, help="Rounds of each setup, alternated.")
@click.option("--seconds", default=8.0, show_default=True, help="Seconds per measurement.")
@click.option("--rate", default=500.0, show_default=True, help="Fixed rate of the latency runs.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def policy(rounds: int, seconds: float, rate: float, json_path: Path | None) -> None:
    """What authorization costs on the destination node: saturation and p99 of HTTP/1.1
    through two node proxies, with 100 AuthorizationPolicies on the destination pod and
    with none, alternated in one run (issue #15; docs/policy.md).
    """
    from weft.bench.policy import run
    from weft.cli.lab import lab_identity_setup

    result = run(lab_identity_setup, rounds, seconds, rate,
                 report=lambda m: err.print(f"[dim]·[/dim] {m}", highlight=False))  # fmt: skip
    table = Table("setup", "saturation req/s", "unique paths req/s", f"p50 at {rate:.0f}/s",
                  "p99", "errors")  # fmt: skip
    for setup, label in (("none", "no policy"),
                         ("with_policies", f"{result['policy_count']} policies")):  # fmt: skip
        r = result[setup]
        table.add_row(label, f"{r['saturation_per_second']:.0f}",
                      f"{r['saturation_unique_paths_per_second']:.0f}", f"{r['p50_us']:.0f} us",
                      f"{r['p99_us']:.0f} us", str(r["errors"]))  # fmt: skip
    Console().print(table)

    def span(key: str) -> str:
        low, high = result.get(key + "_range") or (0.0, 0.0)
        return f"{result[key]:.3f} ({low:.2f}-{high:.2f})"

    err.print(f"within-round ratios, median (range): saturation {span('saturation_ratio')} "
              f"(target >= 0.95), unique paths {span('saturation_unique_paths_ratio')}, "
              f"p99 {span('p99_ratio')}", highlight=False)  # fmt: skip
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")


@bench.command()
@click.option("--rounds", default=3, show_default=True, help="Rounds of all setups, rotated.")
@click.option("--seconds", default=6.0, show_default=True, help="Seconds per measurement.")
@click.option("--rate", default=500.0, show_default=True, help="Fixed rate of the latency runs.")
@click.option(
    "--profile-seconds", default=0.0, show_default=True,
    help="Afterwards, py-spy on both agents saturated at 100 % and at off (0: no).",
)  # fmt: skip
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def tracing(
    rounds: int, seconds: float, rate: float, profile_seconds: float, json_path: Path | None
) -> None:
    """What tracing costs: saturation and p50/p99 of HTTP/1.1 through two node proxies
    with tracing off (rate 0), 1 % and 100 % sampled, every request carrying a sampled
    traceparent, the collector down, and no collector at all; ratios to off within each
    round, spans exported and dropped (issue #14; docs/tracing.md).
    """
    from weft.bench.tracing import SETUPS, run
    from weft.cli.lab import lab_identity_setup

    result = run(lab_identity_setup, rounds, seconds, rate, profile_seconds=profile_seconds,
                 report=lambda m: err.print(f"[dim]·[/dim] {m}", highlight=False))  # fmt: skip
    table = Table("setup", "saturation req/s", "ratio to off", f"p50 / p99 µs at {rate:.0f}/s",
                  "p99 ratio", "agents CPU µs/req", "spans exported / dropped",
                  "errors")  # fmt: skip

    def ratio(r: dict[str, Any] | None) -> str:
        return f"{r['median']:.3f} ({r['min']:.2f}-{r['max']:.2f})" if r else "-"

    for s in SETUPS:
        row = result["setups"].get(s.name)
        if row is None:
            continue
        cpu = row["cpu_us_per_request"]
        dropped = ", ".join(f"{n} {r}" for r, n in row["spans_dropped"].items()) or "0"
        table.add_row(
            s.label,
            _span(row["saturation_per_second"], "{:.0f}"),
            ratio(row.get("saturation_ratio")),
            f"{row['p50_us']['median']:.0f} / {row['p99_us']['median']:.0f}",
            ratio(row.get("p99_ratio")),
            f"{cpu['median']:.0f}" if cpu else "-",
            f"{row['spans_exported']} / {dropped}",
            str(row["errors"]),
        )
    console = Console()
    console.print(table)
    for name, prof in result.get("profile", {}).items():
        if name == "seconds":
            continue
        for agent, frames in prof["agents"].items():
            top = ", ".join(f"{f['frame']} {f['percent']:.1f}" for f in frames["self"][:8])
            console.print(f"{name} {agent} (self %, {prof['load_per_second']} req/s): {top}")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")


@bench.command()
@click.option("--rounds", default=4, show_default=True,
              help="Rounds; the setups' order rotates by one per round.")  # fmt: skip
@click.option("--seconds", default=4.0, show_default=True, help="Seconds per measurement.")
@click.option("--rate", default=1000, show_default=True, help="Fixed rate of the latency runs.")
@click.option(
    "--memory-lab/--no-memory-lab", default=True, show_default=True,
    help="Measure the agent and HAProxy at 100 pods in a one-node lab (~2 min).",
)  # fmt: skip
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def sidecar(
    rounds: int, seconds: float, rate: int, memory_lab: bool, json_path: Path | None
) -> None:
    """Node mode against sidecar mode, beside HAProxy sidecars: latency at a fixed rate,
    saturation, new connections, the proxies' CPU per request, and memory per 100 pods
    (issue #16; docs/kubernetes.md "Sidecar mode").
    """
    from weft.bench.sidecar import SETUPS, run
    from weft.cli.lab import lab_identity_setup

    result = run(lab_identity_setup, rounds, seconds, rate, memory_lab=memory_lab,
                 report=lambda m: err.print(f"[dim]·[/dim] {m}", highlight=False))  # fmt: skip
    s = result["summary"]
    table = Table("setup", f"{rate}/s p50 / p99 ms", "sat. req/s", "conn/s",
                  "CPU µs/req (sat.)", "CPU µs/conn")  # fmt: skip

    def cell(f: dict[str, Any] | None, text: Callable[[dict[str, Any]], str]) -> str:
        if f is None:
            return "-"
        if not f.get("valid", True):
            return f"invalid: {f['errors']} of {f['requests']} failed"
        return text(f)

    def rate_(f: dict[str, Any]) -> str:
        return f"{f['p50_us'] / 1000:.2f} / {f['p99_us'] / 1000:.2f}"

    for setup in SETUPS:
        by = s[setup.name]
        table.add_row(
            setup.name,
            cell(by.get(f"rate-{rate}"), rate_),
            cell(by.get("saturate"), lambda f: _span_of(f, "per_second")),
            cell(by.get("conn"), lambda f: _span_of(f, "per_second")),
            cell(by.get("saturate"), lambda f: f"{f.get('cpu_us_per_request') or 0:.0f}"),
            cell(by.get("conn"), lambda f: f"{f.get('cpu_us_per_request') or 0:.0f}"),
        )
    console = Console()
    console.print(table)
    for name, ratios in result["per_round_ratios"].items():
        parts = [f"{sc} {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
                 for sc, r in ratios.items() if sc in ("saturate", "conn")]  # fmt: skip
        console.print(f"{name} (per round): " + ", ".join(parts))
    m = result["memory"]
    side = m["weft_sidecars"]
    console.print(
        f"memory per {m['pods']} pods: weft sidecars {side['pss'] / 2**20:.0f} MiB PSS "
        f"({side['measured']} idle measured x {m['pods']}; lower bound "
        f"{side['uss_plus_shared'] / 2**20:.0f} MiB: USS x {m['pods']} + shared once)"
        + (
            f", node agent {m['weft_agent'] / 2**20:.1f} MiB (PSS + eBPF maps), HAProxy "
            f"sidecars {m['haproxy_sidecars'] / 2**20:.0f} MiB PSS"
            if "weft_agent" in m
            else ""
        )
    )
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")


def _span_of(f: dict[str, Any], key: str) -> str:
    if f"{key}_min" not in f:
        return f"{f[key]:.0f}"
    return f"{f[key]:.0f} ({f[key + '_min']:.0f}-{f[key + '_max']:.0f})"


@bench.command()
@click.option("--requests", default=10_000, show_default=True,
              help="Requests of the flaky drill (the others scale from it).")  # fmt: skip
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def drills(requests: int, json_path: Path | None) -> None:
    """Retries, budgets, timeouts and failure accrual against failing replicas, in a
    three-node lab (issue #13's drills; docs/resilience.md).

    One replica failing half its requests (HTTP/1.1 and gRPC) with and without retries;
    every replica failing (retries against the budget); one replica hung (request
    timeout and failure accrual).
    """
    from weft.bench.drills import run
    from weft.cli.lab import lab_identity_setup

    result = run(lab_identity_setup, requests,
                 report=lambda m: err.print(f"[dim]·[/dim] {m}", highlight=False))  # fmt: skip
    f, g, a, h = result["flaky"], result["grpc"], result["all_failing"], result["hung"]
    sp = result["split"]
    table = Table("drill", "figure", "target")
    table.add_row(
        "flaky replica, HTTP/1.1",
        f"{f['success_without_retries']:.2%} -> {f['success_with_retries']:.2%} "
        f"({f['retried_share']:.1%} retried)",
        ">= 99.9 % with retries",
    )
    table.add_row(
        "flaky replica, gRPC",
        f"{g['success_without_retries']:.2%} -> {g['success_with_retries']:.2%}",
        ">= 99.9 % with retries",
    )
    table.add_row(
        "all replicas failing",
        f"{a['retries_per_request']} retries/request (budget "
        f"{a['budget_per_request']}, limit alone 3.0)",
        "<= budget",
    )
    table.add_row("hung replica, 500 ms timeout",
                  f"slowest {h['slowest_ms']} ms, {h['late_share']:.2%} after 1 s",
                  "<= 550 ms, < 1 %")  # fmt: skip
    table.add_row("HTTPRoute 90/10 split", f"{sp['canary_share']:.2%} to the canary",
                  "10 % +- 2 %")  # fmt: skip
    Console().print(table)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")


@bench.command()
@click.option("--rounds", default=3, show_default=True, help="Restarts of each kind, and bursts.")
@click.option(
    "--connections", default=2000, show_default=True, help="Connections opened at once per burst."
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def resilience(rounds: int, connections: int, json_path: Path | None) -> None:
    """The restart window (make-before-break and kill -9) and connection bursts, in a lab.

    Counts failed connects, answers that crossed in plaintext (there must be none),
    connections held until the new agent was ready, burst completion, the agent's peak
    RSS and endpoint ejections (docs/benchmarks.md).
    """
    from weft.bench.resilience import run
    from weft.cli.lab import lab_identity_setup

    result = run(
        lab_identity_setup,
        rounds,
        connections,
        report=lambda m: err.print(f"[dim]·[/dim] {m}", highlight=False),
    )
    s = result["summary"]
    table = Table(
        "restart", "failed connects", "failure window s", "plaintext", "held", "slowest s"
    )
    for how, name in (("mbb", "make-before-break"), ("kill", "kill -9 + start")):
        by = s[how]
        table.add_row(
            name,
            _span(by["failed"], "{:.0f}"),
            _span(by["failure_window_s"], "{:.2f}"),
            str(by["plaintext_total"]),
            _span(by["held_served"], "{:.0f}"),
            _span(by["slowest_ok_s"], "{:.2f}"),
        )
    Console().print(table)
    b = s["burst"]
    Console().print(
        f"burst of {connections}: completed {_span(b['completed'], '{:.0f}')}, slowest "
        f"{_span(b['slowest_s'], '{:.2f}')} s, agent peak RSS "
        f"{_span(b['agent_rss_peak_mib'], '{:.0f}')} MiB, ejections {b['ejections_total']}"
    )
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")


@bench.command()
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def memory(json_path: Path | None) -> None:
    """The node agent's memory against one HAProxy sidecar per pod (the full run's step).

    One node with 10, 50 and 100 captured pods, each with its own identity: the agent's
    PSS plus the kernel memory of its eBPF maps, against the summed PSS of one mTLS
    HAProxy sidecar per pod. About 3 minutes.
    """
    from weft.bench.mesh import run_memory
    from weft.cli.lab import lab_identity_setup

    def say(message: str) -> None:
        err.print(f"[dim]·[/dim] {message}")

    result = run_memory(lab_identity_setup, report=say)
    table = Table("pods", "agent PSS MiB", "eBPF maps MiB", "sidecars PSS MiB", "ratio")
    for k in result["pods"]:
        a, h = result["weft_agent"][str(k)], result["haproxy"][str(k)]
        maps = result.get("bpf_map_memlock", {}).get(str(k), 0)
        table.add_row(str(k), f"{a['pss'] / 2**20:.1f}", f"{maps / 2**20:.1f}",
                      f"{h['pss'] / 2**20:.1f}", f"{(a['pss'] + maps) / h['pss']:.3f}")  # fmt: skip
    Console().print(table)
    t = result["agent_memory_vs_sidecars"]
    Console().print(f"at {t['pods']} pods: {t['measured']} of the sidecars (target {t['target']})")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")


@bench.command()
@click.option("--rounds", default=3, show_default=True, help="Runs of each balancing figure.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def balance(rounds: int, json_path: Path | None) -> None:
    """Per-request balancing over two equal replicas, from one connection or channel.

    A small two-node lab: bc-weft (node-1) sends 1,000 requests on one HTTP/1.1
    keep-alive connection, 1,000 streams on one h2c connection and 1,000 calls on one
    gRPC channel to a two-replica service on node-2, then 500 with bs-pair-2 made 20 ms
    slower, then 1,000 more right after it is fast again; prints bs-pair-2's share of
    each (the full `weft bench` runs this once).
    """
    from weft.bench.mesh import run_balance
    from weft.cli.lab import lab_identity_setup

    def say(message: str) -> None:
        err.print(f"[dim]·[/dim] {message}")

    result = run_balance(lab_identity_setup, rounds, report=say)
    table = Table("run", "bs-pair-2 share, per round", "median", "errors")
    for run, got in result.items():
        table.add_row(run, ", ".join(f"{x:.3f}" for x in got["shares"]),
                      f"{got['median']}", str(got["errors"]))  # fmt: skip
    Console().print(table)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")


@bench.command()
@click.option("--seconds", default=20.0, show_default=True, help="Sampling time.")
@click.option(
    "--native",
    is_flag=True,
    help="Sample C frames too (TLS, event loop, parsers); stops the agents per sample.",
)
@click.option(
    "--load",
    type=click.Choice(["h1", "h2", "grpc"]),
    default="h1",
    show_default=True,
    help="h1: HTTP/1.1 keep-alive (16 connections); h2: h2load h2c GETs; grpc: h2load gRPC "
    "unary calls (16 connections x 8 streams).",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def profile(seconds: float, native: bool, load: str, json_path: Path | None) -> None:
    """Both node agents under saturation, sampled with py-spy: their top frames.

    A cross-node closed-loop saturation (client-1 -> echo-2) in a two-node lab; prints
    each agent's top frames by self and by total time (docs/benchmarks.md).
    """
    from weft.bench.profile import run
    from weft.cli.lab import lab_identity_setup

    result = run(
        lab_identity_setup,
        seconds,
        report=lambda m: err.print(f"[dim]·[/dim] {m}"),
        native=native,
        load=load,
    )
    console = Console()
    console.print(f"load: {result['load'].get('per_second')} req/s")
    for name, prof in result["agents"].items():
        table = Table(f"{name}: self %", "frame", "total %", "frame")
        for a, b in zip(prof["self"], prof["total"], strict=False):
            table.add_row(f"{a['percent']:.1f}", a["frame"], f"{b['percent']:.1f}", b["frame"])
        console.print(table)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")


@bench.command()
@click.option("--rounds", default=20_000, show_default=True, help="Round trips per protocol.")
@click.option("--size", default=1024, show_default=True, help="Bytes each way per round trip.")
def framing(rounds: int, size: int) -> None:
    """The tunnel's framing against HTTP/2's (h2, HBONE's), in memory: CPU per round trip.

    Both ends on this thread, no sockets or TLS: what each protocol layer alone costs
    per request/response on an open stream (docs/architecture.md, "Tunnel framing").
    """
    import asyncio

    from nodeagent.proxy.tunnel.bench import bench_framing

    result = asyncio.run(bench_framing(rounds, size))
    if result["h2_us"] is None:
        err.print("h2 is not installed (pip install h2); measured Weft's framing only")
    Console().print(json.dumps(result, indent=2))


def _span(v: dict[str, float], fmt: str) -> str:
    """median (min-max)"""
    return f"{fmt.format(v['median'])} ({fmt.format(v['min'])}-{fmt.format(v['max'])})"


@bench.command()
@click.option("-n", "count", default=2000, show_default=True, help="CSRs to sign.")
@click.option("--workloads", default=10_000, show_default=True, help="Discovery: pods.")
@click.option("--agents", default=1_000, show_default=True, help="Discovery: subscribed agents.")
@click.option("--changes", default=20, show_default=True, help="Discovery: changes timed.")
@click.option("--quick", is_flag=True, help="Small sizes (500 CSRs, 2,000 pods, 100 agents).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def controlplane(
    count: int, workloads: int, agents: int, changes: int, quick: bool, json_path: Path | None
) -> None:
    """Control plane: CSRs signed per second on one core, and discovery fan-out.

    \b
    Fan-out: WORKLOADS pods over AGENTS nodes, each agent on its own mTLS discovery
    stream (light clients in a second process); the time from one change to its arrival
    at every agent (target p99 <= 1 s) and the control plane's RSS (target <= 500 MB).
    """
    from controlplane.discovery.bench import bench_fanout
    from controlplane.identity.bench import bench_signing

    if quick:
        count, workloads, agents, changes = 500, 2_000, 100, 10

    def say(message: str) -> None:
        err.print(f"[dim]·[/dim] {message}", highlight=False)

    say(f"signing {count} CSRs with the real signer on one core")
    signing = bench_signing(count)
    Console().print(
        f"CSR signing: {signing['csr_per_second']:.0f}/s end to end, "
        f"{signing['sign_only_per_second']:.0f}/s signing alone (target >= 2,000/s)"
    )
    fanout = bench_fanout(workloads, agents, changes, report=say)
    lat = fanout["change_latency_ms"]
    rss = fanout["rss_bytes"]
    Console().print(
        f"discovery fan-out, {workloads} workloads to {agents} agents: one change reaches "
        f"all agents p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms "
        f"(target p99 <= 1000 ms); initial sync {fanout['initial_sync_seconds']:.1f} s; "
        f"control plane RSS {rss['agents_subscribed'] / 2**20:.0f} MiB subscribed, peak "
        f"{rss['peak'] / 2**20:.0f} MiB (target <= 500 MB); "
        f"{fanout['deliveries_missing']} deliveries missing"
    )
    if json_path:
        json_path.write_text(json.dumps({"signing": signing, "fanout": fanout}, indent=2))
        err.print(f"wrote {json_path}")


@bench.command()
@click.option("--seconds", default=15.0, show_default=True, help="Length of each phase.")
@click.option("--rate", default=500, show_default=True, help="B's fixed rate, req/s.")
@click.option("--http-connections", default=128, show_default=True,
              help="A's HTTP/1.1 flood: keep-alive connections.")  # fmt: skip
@click.option("--tcp-concurrency", default=512, show_default=True,
              help="A's TCP flood: concurrent connect/request/close loops.")  # fmt: skip
@click.option("--h2-connections", default=8, show_default=True,
              help="A's HTTP/2 rapid-reset flood: connections.")  # fmt: skip
@click.option("--max-requests-per-pod", default=64, show_default=True,
              help="The agents' per-pod share of in-flight requests in this lab.")  # fmt: skip
@click.option("--max-connections-per-pod", default=256, show_default=True,
              help="The agents' per-pod share of connections in this lab.")  # fmt: skip
@click.option("--haproxy/--no-haproxy", default=True, show_default=True,
              help="Also run the phases against HAProxy sidecars (the contrast).")  # fmt: skip
@click.option("--floods", default="http,tcp,h2reset", show_default=True,
              help="A's floods, in this order (comma-separated).")  # fmt: skip
@click.option("--request-timeout", default=2.0, show_default=True,
              help="Seconds before one of B's requests counts as an error.")  # fmt: skip
@click.option("--lab-name", default="wnoisy", show_default=True, help="The lab's name.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def noisy(
    seconds: float,
    rate: int,
    http_connections: int,
    tcp_concurrency: int,
    h2_connections: int,
    max_requests_per_pod: int,
    max_connections_per_pod: int,
    haproxy: bool,
    floods: str,
    request_timeout: float,
    lab_name: str,
    json_path: Path | None,
) -> None:
    """Noisy neighbour: workload B's latency at a fixed rate through node-1's proxy,
    alone and while workload A, on the same node, floods that proxy (HTTP/1.1, TCP
    connections to an opaque port, HTTP/2 rapid reset); A's rate and refusals, the
    agent's refusals per workload, CPU and RSS; the same against HAProxy sidecars
    (issue #18; docs/benchmarks.md). Needs root (it builds lab --lab-name, replacing it).
    """
    from weft.bench.noisy import FLOODS, Profile, run
    from weft.cli.lab import lab_identity_setup

    profile = Profile(
        seconds=seconds,
        rate=rate,
        http_connections=http_connections,
        tcp_concurrency=tcp_concurrency,
        h2_connections=h2_connections,
        max_requests_per_pod=max_requests_per_pod,
        max_connections_per_pod=max_connections_per_pod,
        setups=("weft", "haproxy-sidecars") if haproxy else ("weft",),
        floods=tuple(f for f in floods.split(",") if f),
        request_timeout=request_timeout,
    )
    unknown = set(profile.floods) - set(FLOODS)
    if unknown:
        raise click.BadParameter(f"unknown floods {sorted(unknown)}; known: {', '.join(FLOODS)}")
    result = run(lab_identity_setup, profile,
                 report=lambda m: err.print(f"[dim]·[/dim] {m}", highlight=False),
                 name=lab_name)  # fmt: skip
    table = Table("setup", "A's flood", "B p50 / p99 ms", "B p99 / alone", "B errors",
                  "A ok/s (h2: resets/s)", "A refused", "agent refusals (A / B)",
                  "proxy CPU", "proxy RSS MiB")  # fmt: skip
    for name, s in result["setups"].items():
        alone = s["phases"][0]
        rss = f"{alone['proxy_rss_peak'] / 2**20:.0f}"
        errors = alone["b"]["errors"] + alone["b"].get("warmup_errors", 0)
        table.add_row(name, "none", f"{alone['b']['p50_us'] / 1000:.2f} / "
                      f"{s['b_p99_alone_us'] / 1000:.2f}", "1.00", str(errors),
                      "-", "-", "-", _shares(alone), rss)  # fmt: skip
        for flood in profile.floods:
            f = s[flood]
            table.add_row(
                name,
                flood,
                f"{f['b_p50_us'] / 1000:.2f} / {f['b_p99_us'] / 1000:.2f}",
                f"{f['b_p99_ratio']:.2f}",
                str(f["b_errors"]),
                f"{f['a_per_second']:.0f}",
                str(f["a_refused_seen"]),
                _refusals(f.get("refusals")),
                _shares(next(p for p in s["phases"] if p["flood"] == flood)),
                f"{f['proxy_rss_peak'] / 2**20:.0f}",
            )
        last = s["phases"][-1]["b"]
        table.add_row(name, "none (again)", f"{last['p50_us'] / 1000:.2f} / "
                      f"{last['p99_us'] / 1000:.2f}", f"{last['p99_us'] / s['b_p99_alone_us']:.2f}",
                      str(last["errors"]), "-", "-", "-", "-", "-")  # fmt: skip
    console = Console(width=max(Console().width, 160))  # ten columns
    console.print(table)
    console.print(result["sharing"])
    for name, t in result["targets"].items():
        console.print(f"{name}: measured {t['measured']} (target {t['target']}, "
                      f"{'met' if t['met'] else 'NOT met'})")  # fmt: skip
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")


def _shares(phase: dict[str, Any]) -> str:
    return " ".join(f"{v:.0%}" for v in phase["proxy_cpu_share"].values())


def _refusals(by_metric: dict[str, dict[str, int]] | None) -> str:
    """The agent's refusals of the phase: requests (L7) + connections (L4), A's / B's."""
    if by_metric is None:
        return "-"
    totals = {"nz-a": 0, "nz-b": 0, "other": 0}
    for by in by_metric.values():
        for workload, n in by.items():
            totals[workload if workload in totals else "other"] += n
    text = f"{totals['nz-a']} / {totals['nz-b']}"
    return text + (f" (+{totals['other']} other)" if totals["other"] else "")


@bench.command()
@click.option("--rounds", default=3, show_default=True, help="Rounds of both setups, alternated.")
@click.option("--seconds", default=8.0, show_default=True, help="Seconds per saturation run.")
@click.option("--connections", default=16, show_default=True, help="h2load's connections.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def workers(rounds: int, seconds: float, connections: int, json_path: Path | None) -> None:
    """One proxy process against two workers (issue #18): HTTP/1.1 saturation through
    node-1's agent (client-1 to echo-1 on the same node, h2load and echo pinned to CPU 0),
    CPU per request of the agent and its workers, each process's memory, and the time
    /metrics takes with the workers' texts merged (docs/benchmarks.md). Needs root.
    """
    from weft.bench.workers import run
    from weft.cli.lab import lab_identity_setup

    result = run(lab_identity_setup, rounds, seconds, connections,
                 report=lambda m: err.print(f"[dim]·[/dim] {m}", highlight=False))  # fmt: skip
    table = Table("workers", "saturation req/s", "proxy cores", "CPU us/req", "req/s per core",
                  "agent PSS MiB", "per worker PSS MiB", "/metrics ms")  # fmt: skip
    for n, s in result["setups"].items():
        mem = s["memory"] or {}
        workers_pss = [w["pss"] / 2**20 for w in mem.get("workers", [])]
        table.add_row(
            n,
            f"{s['per_second']:.0f}",
            f"{s['proxy_cpu_cores']:.2f}",
            f"{s['proxy_cpu_us_per_request']:.0f}",
            str(result["per_core_requests_per_second"][n]),
            f"{mem['agent']['pss'] / 2**20:.1f}" if mem else "-",
            " ".join(f"{p:.1f}" for p in workers_pss) or "-",
            str(s["metrics_scrape_ms"]),
        )
    Console().print(table)
    low, high = result["saturation_ratio_range"] or (0.0, 0.0)
    err.print(f"2 workers / 1, within-round median (range): {result['saturation_ratio']} "
              f"({low:.2f}-{high:.2f})", highlight=False)  # fmt: skip
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")
