"""``weft check``: can this machine run Weft? (like ``linkerd check --pre``)

File-based host checks run first and print immediately; the live bcc probes follow,
announced beforehand because compiling takes a noticeable moment. Exit status is 1 if
any required check failed, so scripts and the lab can gate on it.

With ``--pre`` or ``--kubeconfig`` it checks a cluster instead, through its API server
(``controlplane.clustercheck``): before install (``--pre``: version, RBAC for what ``weft
install`` renders, Gateway API, node kernels, Pod Security) or after (the objects, CRDs,
CA, control plane and agents, discovery).  Same lines, same exit status, same JSON.

When a lab is up, its Gateway API routes follow, judged as the control plane judges them
(`weft.routes.conditions` against the lab's Services): a route that is not Accepted or
whose references do not resolve is a warning with the Gateway API reason.  Warnings never
change the exit status: a broken route does not stop the mesh from running.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from nodeagent.ebpf.probe import run_probes
from weft.cli import lab_option, output_option
from weft.preflight import (
    DEFAULT_BPFFS,
    DEFAULT_MODULES_DIR,
    CheckResult,
    all_required_ok,
    find_cgroup2_mount,
    read_mountinfo,
    run_host_checks,
)
from weft.routes import Condition, Reason, conditions


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


_HINTS = {
    Reason.BACKEND_NOT_FOUND: "create the Service, or fix the route's backendRefs",
    Reason.UNSUPPORTED_VALUE: "Weft does not apply this route at all: drop or change "
    "the field named (docs/resilience.md lists what routes may use)",
    Reason.INVALID_KIND: 'backendRefs must name Services (group "", kind Service)',
    Reason.REF_NOT_PERMITTED: "cross-namespace backends need a ReferenceGrant, which "
    "Weft does not support yet: use a Service in the route's namespace",
}


def route_checks(
    routes: Iterable[Mapping[str, Any]], services: Collection[str]
) -> list[tuple[CheckResult, list[Condition]]]:
    """One result per route object (``route <kind>/<ns>/<name>``), given the Services
    that exist (``ns/name``): a warning (never required) unless every condition is True."""
    out = []
    for obj in routes:
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace") or "default", meta.get("name", "?")
        _, conds = conditions(obj, dict.fromkeys(services))
        bad = [c for c in conds if not c.status]
        label = f"route {obj.get('kind', '?')}/{ns}/{name}"
        if bad:
            detail = "; ".join(f"{c.type} False ({c.reason}): {c.message}" for c in bad)
            result = CheckResult(label, False, False, detail, _HINTS.get(bad[0].reason))
        else:
            result = CheckResult(label, True, False, ", ".join(c.type for c in conds))
        out.append((result, conds))
    return out


def _lab_routes(lab: str) -> tuple[list[dict[str, Any]], set[str]] | None:
    """The routes and Service keys of lab ``lab``, or None if it is not up."""
    from weft.lab.state import StateError, lab_paths, load_state

    try:
        state = load_state(lab_paths(lab, None).state_file)
    except StateError:
        return None
    return state.routes, {f"{s.namespace}/{s.name}" for s in state.plan.services}


def _summary(console: Console, results: Iterable[CheckResult], ok_text: str, bad_text: str) -> None:
    results = list(results)
    failed = [r for r in results if not r.ok and r.required]
    warned = [r for r in results if not r.ok and not r.required]
    warn_note = f" ({len(warned)} warning{'s' * (len(warned) != 1)})" if warned else ""
    if failed:
        noun = "check" if len(failed) == 1 else "checks"
        console.print(f"\n[red]{len(failed)} required {noun} failed{warn_note}:[/red] {bad_text}")
    else:
        console.print(f"\n[green]{ok_text}{warn_note}.[/green]")


def _check_cluster(
    ctx: click.Context, pre: bool, kubeconfig: str | None, context: str | None, namespace: str,
    as_json: bool,
) -> None:  # fmt: skip
    """``weft check --pre`` / ``weft check --kubeconfig``: the cluster, not this machine."""
    from controlplane.clustercheck import Cluster, Report, run_installed, run_pre
    from weft.cli.install import InstallError, InstallOptions, load_template, render

    try:
        docs = render(load_template(), InstallOptions(namespace=namespace))
    except InstallError as e:
        raise click.BadParameter(str(e), param_hint="--namespace") from None
    mode = "pre" if pre else "installed"
    try:
        cluster = Cluster.from_kubeconfig(kubeconfig, context)
    except Exception as e:  # the client's kubeconfig errors have no common base
        report = Report(kubeconfig or "(default kubeconfig)", mode, namespace)
        report.checks.append(CheckResult(
            "kubeconfig", False, True, f"{kubeconfig or '$KUBECONFIG or ~/.kube/config'}: "
            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}",
            "give --kubeconfig FILE (and --context NAME) as for kubectl",
        ))  # fmt: skip
    else:
        try:
            report = run_pre(cluster, docs, namespace) if pre else run_installed(
                cluster, docs, namespace)  # fmt: skip
        finally:
            cluster.close()
    if as_json:
        out = report.as_json()
        out["cluster"]["context"] = context
        click.echo(json.dumps(out, indent=2))
        ctx.exit(0 if report.ok else 1)
    console = Console(highlight=False, soft_wrap=True)
    render_line = _Renderer(console)
    what = "before install" if pre else f"Weft in {namespace}"
    where = f" (context {context})" if context else ""
    console.print(f"[dim]… cluster {escape(report.server)}{escape(where)}: {what}[/dim]")
    for result in report.checks:
        render_line(result)
    for note in report.notes:
        console.print(f"[dim]… {escape(note)}[/dim]")
    if pre:
        _summary(console, report.checks, "Weft can be installed on this cluster",
                 "Weft cannot be installed here until fixed.")  # fmt: skip
    else:
        _summary(console, report.checks, "Weft is running on this cluster",
                 "the mesh is not healthy here.")  # fmt: skip
    ctx.exit(0 if report.ok else 1)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results.")
@output_option("table", "json", help_text="Lines, or JSON (as --json).")
@click.option(
    "--pre",
    is_flag=True,
    help="Check a cluster before `weft install` (with the kubeconfig's cluster).",
)
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False),
    help="Check Weft on this kubeconfig's cluster instead of this machine.",
)
@click.option("--context", help="The kubeconfig context [its current one].")
@click.option(
    "-n",
    "--namespace",
    default="weft-system",
    show_default=True,
    help="With a cluster: Weft's namespace (weft install --namespace).",
)
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
@lab_option("Also check this lab's routes, if the lab is up.")
@click.pass_context
def check(
    ctx: click.Context,
    as_json: bool,
    output: str,
    pre: bool,
    kubeconfig: str | None,
    context: str | None,
    namespace: str,
    bpffs: Path,
    modules_dir: Path,
    lab_name: str,
) -> None:
    """Check that this machine can run Weft: kernel, mounts, privileges, eBPF; and, when
    a lab is up, its routes' Accepted / ResolvedRefs conditions (warnings only).

    With --pre, a cluster before install: API server version, RBAC for what `weft
    install` renders, Gateway API CRDs, node kernels, Pod Security. With --kubeconfig
    (or --context) alone, Weft installed on it: objects, CRDs, CA, control plane,
    agents (through the API server's pod proxy), discovery.

    Exits 1 if any required check fails; each failure says how to fix it.
    """
    as_json = as_json or output == "json"
    if pre or kubeconfig is not None or context is not None:
        _check_cluster(ctx, pre, kubeconfig, context, namespace, as_json)
        return
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
    lab = _lab_routes(lab_name)
    routes = route_checks(*lab) if lab is not None else []
    results = host + probes + [r for r, _ in routes]
    ok = all_required_ok(results)

    if as_json:
        report: dict[str, Any] = {"ok": ok, "checks": [asdict(r) for r in results]}
        if lab is not None:
            report["routes"] = [
                {"check": r.name, "conditions": [
                    {"type": c.type, "status": str(c.status), "reason": str(c.reason),
                     "message": c.message} for c in conds]}
                for r, conds in routes
            ]  # fmt: skip
        click.echo(json.dumps(report, indent=2))
    else:
        for result in probes:
            render(result)
        if lab is not None:
            count = len(routes)
            console.print(f"[dim]… lab {escape(lab_name)}: {count} route{'s' * (count != 1)}"
                          "[/dim]")  # fmt: skip
            for result, _ in routes:
                render(result)
        _summary(console, results, "Weft can run on this machine",
                 "Weft cannot run here until fixed.")  # fmt: skip
    ctx.exit(0 if ok else 1)
