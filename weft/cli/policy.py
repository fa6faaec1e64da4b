"""``weft policy check``: which policy and rule decide a request, before sending it.

Judges a request (or a connection) from an identity to a service's or a pod's workloads
exactly as their node's agent would: the same policies the control plane selects for
each workload, the same default, the same evaluator (`weft.policy`). Reads a lab's state
(``--lab``); a cluster is not read yet.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click
import rich.markup
from rich.console import Console
from rich.table import Table

from weft.cli import lab_option, output_option

err = Console(stderr=True)


@click.group()
def policy() -> None:
    """Authorization policies (docs/policy.md)."""


@policy.command()
@click.option("--from", "source", required=True,
              help="Caller: a SPIFFE ID, ns/sa, or 'plaintext' (no mesh identity).")  # fmt: skip
@click.option("--source-ip", default="",
              help="The caller's address (with --from plaintext: judged by ipBlocks).")  # fmt: skip
@click.option("--to", "target", required=True, help="svc/NAME or pod/NAME (-n for the namespace).")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--port", type=int, help="Destination (container) port [the service's target port].")
@click.option("--method", help="HTTP method; without it, a connection (L4) is judged.")
@click.option("--path", "path", default="/", show_default=True, help="HTTP path (with --method).")
@click.option("-H", "--header", "headers", multiple=True, help="Request header NAME:VALUE.")
@click.option("--protocol", type=click.Choice(["http/1.1", "h2", "opaque"]), default=None,
              help="What the connection carries [http/1.1 with --method, else opaque]")  # fmt: skip
@lab_option()
@click.option("--kubeconfig", type=click.Path(dir_okay=False),
              help="Judge against a cluster, read with this kubeconfig, not a lab.")  # fmt: skip
@click.option("--context", help="The kubeconfig context [its current one].")
@click.option("--trust-domain", default="cluster.local", show_default=True,
              help="With --kubeconfig: the mesh's trust domain.")  # fmt: skip
@click.option(
    "--mesh-default",
    default=None,
    help="With --kubeconfig: the control plane's --default-inbound-policy, if set.",
)
@output_option("table", "json")
def check(
    source: str,
    source_ip: str,
    target: str,
    namespace: str,
    port: int | None,
    method: str | None,
    path: str,
    headers: tuple[str, ...],
    protocol: str | None,
    lab_name: str,
    kubeconfig: str | None,
    context: str | None,
    trust_domain: str,
    mesh_default: str | None,
    output: str,
) -> None:
    """Say whether a request (or a connection) would be allowed, and by what.

    \b
    weft policy check --from ns/shop/sa/web --to svc/payments -n shop --method POST --path /charge
    weft policy check --from plaintext --to pod/payments-1 -n shop
    weft policy check --kubeconfig ~/.kube/config --from shop/web --to svc/payments -n shop

    It reads a lab's state, or with --kubeconfig the cluster's pods, services, endpoint
    slices, namespaces, routes and policies (one list of each, with the kubeconfig's
    credentials: it needs list on them), and judges with the same code the control
    plane and the agents run.
    """
    from weft.identity import IdentityError, SpiffeId
    from weft.lab.plan import validate_lab_name
    from weft.lab.state import StateError, lab_paths, load_state
    from weft.mesh import Service
    from weft.policy import Request, policy_set

    try:
        caller = _caller(source, SpiffeId, IdentityError)
    except ValueError as e:
        _fail(str(e))
    if kubeconfig is not None or context is not None:
        workloads, services = _cluster(kubeconfig, context, trust_domain, mesh_default)
        where = "the cluster"
    else:
        try:
            validate_lab_name(lab_name)
            state = load_state(lab_paths(lab_name, None).state_file)
        except (ValueError, StateError) as e:
            _fail(str(e))
        from controlplane.discovery.lab import lab_model

        workloads, services = lab_model(state)
        where = f"lab {lab_name}"
    kind, _, name = target.partition("/")
    svc: Service | None = None
    if kind in ("svc", "service"):
        svc = next((s for s in services if (s.namespace, s.name) == (namespace, name)), None)
        if svc is None:
            _fail(f"no service {namespace}/{name} in {where}")
        uids = {e.workload_uid for e in svc.endpoints}
        chosen = [w for w in workloads if w.uid in uids]
        if port is None and svc.ports and isinstance(svc.ports[0].target_port, int):
            port = svc.ports[0].target_port
    elif kind == "pod":
        chosen = [w for w in workloads if (w.namespace, w.name) == (namespace, name)]
    else:
        _fail(f"--to {target!r}: give svc/NAME or pod/NAME")
    if not chosen:
        _fail(f"{target} in {namespace} has no workloads in {where}")
    if port is None:
        port = next((p.port for w in chosen for p in w.ports), 0)
        if not port:
            _fail("give --port: the target declares none")
    hdrs = {}
    for h in headers:
        k, sep, v = h.partition(":")
        if not sep:
            _fail(f"--header {h!r}: NAME:VALUE")
        hdrs[k.strip().lower()] = v.strip()
    carries = protocol or ("http/1.1" if method else "opaque")
    route = None
    if method and kind in ("svc", "service") and svc is not None and svc.routes:
        # Where the caller's node applies the service's routes: the rule the request
        # matches names the route (for per-route policies) and the backends it goes to.
        from urllib.parse import parse_qsl

        from weft.routes import table_for

        svc_port = next((p.port for p in svc.ports if p.target_port == port), None)
        routes = table_for(svc.key, svc.routes, svc_port)
        rule = routes.match(method, path.partition("?")[0], hdrs,
                           dict(parse_qsl(path.partition("?")[2])))  # fmt: skip
        if rule is None and routes.entries:
            _fail(f"no route of {svc.key} matches {method} {path} (the proxy answers 404)")
        if rule is not None:
            route = rule.route
            backends = {b.service for b in rule.backends if b.weight > 0 and not b.invalid}
            uids = {e.workload_uid for s in services if s.key in backends for e in s.endpoints}
            chosen = [w for w in workloads if w.uid in uids]
    rows: list[dict[str, Any]] = []
    for w in chosen:
        ps = policy_set(f"{w.namespace}/{w.name}", w.policies, w.default_policy)
        # HTTP/1.1 requests are judged by the destination, HTTP/2 ones by the caller's node.
        http = carries in ("http/1.1", "h2")
        conn = ps.evaluate(Request(caller, source_ip, port), will_carry_http=http)
        row: dict[str, Any] = {"workload": f"{w.namespace}/{w.name}", "default": w.default_policy,
                               "policies": [p.key for p in w.policies],
                               "connection": _said(conn)}  # fmt: skip
        if caller is None and w.strict:
            # Plaintext never reaches the proxy of a strict pod: its eBPF filter judges
            # the SYN with the verdicts the agent loads into it (none: only the node).
            from weft.policy.plaintext import TooComplex, lookup, workload_verdicts

            try:
                verdicts = workload_verdicts(w, ps) or ()
                let_in = bool(source_ip) and lookup(verdicts, port, source_ip)
                why = (
                    "a policy lets this address in"
                    if let_in
                    else (
                        "no policy lets this address in"
                        if source_ip
                        else "give --source-ip to judge the caller's address"
                    )
                )
            except (TooComplex, ValueError) as e:
                let_in, why = False, str(e)
            row["connection"] = {"allowed": let_in, "policy": "strict inbound (eBPF)",
                                 "rule": None, "reason": why}  # fmt: skip
        if method and row["connection"]["allowed"] and http:
            row["request"] = _said(ps.evaluate(Request(caller, "", port, method, path, hdrs,
                                                       route)))  # fmt: skip
            if route is not None:
                row["route"] = route
        rows.append(row)
    if output == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        if route is not None:
            Console().print(f"route: {rich.markup.escape(route)} (matched on the caller's node)")
        table = Table("workload", "connection", "request" if method else "", "deciding policy")
        for row in rows:
            last = row.get("request") or row["connection"]
            table.add_row(
                row["workload"], _verdict(row["connection"]),
                _verdict(row["request"]) if "request" in row else "",
                rich.markup.escape(f"{last['policy']}"
                                   + (f" rule {last['rule']}" if last["rule"] is not None else "")
                                   + (f": {last['reason']}" if last["reason"] else "")),
            )  # fmt: skip
        Console().print(table)
    sys.exit(0 if all((r.get("request") or r["connection"])["allowed"] for r in rows) else 1)


def _cluster(
    kubeconfig: str | None, context: str | None, trust_domain: str, mesh_default: str | None
) -> tuple[list[Any], list[Any]]:
    """The cluster's mesh model now, as the control plane would build it."""
    from controlplane.discovery.kube import api_client_from_kubeconfig, cluster_snapshot
    from weft.policy import DefaultPolicy

    try:
        default = DefaultPolicy(mesh_default) if mesh_default else None
    except ValueError:
        _fail(f"--mesh-default {mesh_default!r}: one of "
              f"{', '.join(d.value for d in DefaultPolicy)}")  # fmt: skip
    try:
        api = api_client_from_kubeconfig(kubeconfig, context)
    except Exception as e:  # the kubernetes client's config errors have no common base
        _fail(f"kubeconfig {kubeconfig or '(default)'}: {e}")
    try:
        with api:
            workloads, services, notes = cluster_snapshot(api, trust_domain, default)
    except Exception as e:  # ApiException, urllib3's connection errors, a bad answer
        _fail(f"reading the cluster failed: {str(e).splitlines()[0][:300]}")
    for note in notes:
        err.print(f"[yellow]note:[/yellow] {rich.markup.escape(note)}", highlight=False)
    return workloads, services


def _caller(text: str, spiffe: Any, error: type[Exception]) -> Any:
    if text == "plaintext":
        return None
    if not text.startswith("spiffe://"):
        parts = text.split("/")
        if len(parts) == 4 and parts[0] == "ns" and parts[2] == "sa":
            text = f"spiffe://cluster.local/{text}"
        elif len(parts) == 2:
            text = f"spiffe://cluster.local/ns/{parts[0]}/sa/{parts[1]}"
    try:
        return spiffe.parse(text)
    except error as e:
        raise ValueError(f"--from {text!r}: {e}") from None


def _said(d: Any) -> dict[str, Any]:
    audit = {"audited": list(d.audited), "would_deny": True} if d.would_deny else {}
    return {"allowed": d.allowed, "policy": d.policy, "rule": d.rule, "reason": d.reason,
            **audit}  # fmt: skip


def _verdict(d: dict[str, Any]) -> str:
    if d.get("would_deny"):
        return "[yellow]allow (audit: would deny)[/yellow]"
    return "[green]allow[/green]" if d["allowed"] else "[red]deny[/red]"


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {rich.markup.escape(message)}", highlight=False)
    sys.exit(2)
