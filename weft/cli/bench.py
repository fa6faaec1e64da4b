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
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all figures.")
def controlplane(count: int, json_path: Path | None) -> None:
    """Control plane: CSRs signed per second on one core (parse, checks, sign, encode).

    Discovery fan-out (10,000 workloads, 1,000 agents) joins this when the discovery
    stream lands.
    """
    from controlplane.identity.bench import bench_signing

    err.print(f"[dim]·[/dim] signing {count} CSRs with the real signer on one core")
    result = bench_signing(count)
    Console().print(
        f"CSR signing: {result['csr_per_second']:.0f}/s end to end, "
        f"{result['sign_only_per_second']:.0f}/s signing alone (target >= 2,000/s)"
    )
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err.print(f"wrote {json_path}")
