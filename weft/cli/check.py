"""``weft check``: can this machine run Weft? (like ``linkerd check --pre``)

File-based host checks run first and print immediately; the live bcc probes follow,
announced beforehand because compiling takes a noticeable moment. Exit status is 1 if
any required check failed, so scripts and the lab can gate on it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from nodeagent.ebpf.probe import run_probes
from weft.preflight import (
    DEFAULT_BPFFS,
    DEFAULT_MODULES_DIR,
    CheckResult,
    all_required_ok,
    find_cgroup2_mount,
    read_mountinfo,
    run_host_checks,
)


class _Renderer:
    """Prints one line per check; a hint repeated by skipped checks is printed once."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._hint_owner: dict[str, str] = {}

    def __call__(self, result: CheckResult) -> None:
        if result.ok:
            mark = "[green]✔[/green]"
        elif result.required:
            mark = "[red]✘[/red]"
        else:
            mark = "[yellow]![/yellow]"
        self._console.print(f"{mark} [bold]{result.name:<16}[/bold] {escape(result.detail)}")
        if result.ok or not result.hint:
            return
        owner = self._hint_owner.setdefault(result.hint, result.name)
        text = escape(result.hint) if owner == result.name else f"same fix as {owner}"
        self._console.print(f"    → {text}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results.")
@click.option(
    "--bpffs",
    type=click.Path(path_type=Path),
    default=DEFAULT_BPFFS,
    show_default=True,
    help="Where bpffs should be mounted (maps are pinned here).",
)
@click.option(
    "--modules-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_MODULES_DIR,
    show_default=True,
    help="Kernel modules root holding <release>/build (the headers bcc compiles against).",
)
@click.pass_context
def check(ctx: click.Context, as_json: bool, bpffs: Path, modules_dir: Path) -> None:
    """Check that this machine can run Weft: kernel, mounts, privileges, eBPF.

    Exits 1 if any required check fails; each failure says how to fix it.
    """
    # soft_wrap: hints carry shell commands that must stay copy-pasteable on one line.
    console = Console(highlight=False, soft_wrap=True)
    render = _Renderer(console)
    host = run_host_checks(bpffs=bpffs, modules_dir=modules_dir)
    if not as_json:
        for result in host:
            render(result)

    def announce() -> None:
        if not as_json:
            console.print("[dim]… compiling and loading test eBPF programs with bcc[/dim]")

    probes = run_probes(find_cgroup2_mount(read_mountinfo()), host, on_compile=announce)
    results = host + probes
    ok = all_required_ok(results)

    if as_json:
        click.echo(json.dumps({"ok": ok, "checks": [asdict(r) for r in results]}, indent=2))
    else:
        for result in probes:
            render(result)
        failed = [r for r in results if not r.ok and r.required]
        warned = [r for r in results if not r.ok and not r.required]
        warn_note = f" ({len(warned)} warning{'s' * (len(warned) != 1)})" if warned else ""
        if failed:
            noun = "check" if len(failed) == 1 else "checks"
            console.print(
                f"\n[red]{len(failed)} required {noun} failed{warn_note}:[/red] "
                "Weft cannot run here until fixed."
            )
        else:
            console.print(f"\n[green]Weft can run on this machine{warn_note}.[/green]")
    ctx.exit(0 if ok else 1)
