"""``weft bench``: side-by-side measurements in the lab (see docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)


@click.group()
def bench() -> None:
    """Measure Weft in the lab; every comparison runs in one run, reported as ratios."""


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
