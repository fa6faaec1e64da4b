"""The policies' verdicts for plaintext callers, compiled for the kernel.

Plaintext from an uncaptured pod never passes the node proxy: a strict pod's eBPF
filter (``weft_ingress``) judges it at the SYN. So that it is judged *by the same
policy* as everything else, a workload's `PolicySet` is compiled here into a table the
filter looks up — (destination port, source prefix) → allow or deny, longest prefix
first — by asking the evaluator itself, once per region of the address space the
policies' ``ipBlocks`` cut it into, for each port a rule names (and once for every other
port). No second implementation of the rules: the table says what `PolicySet.evaluate`
says for an opaque connection from that address to that port.

Only IPv4 sources are compiled (the filter accepts new IPv6 connections from the pod
itself only: docs/ebpf.md). A plaintext connection is opaque TCP to the policies: an
ALLOW rule that needs a method or path cannot allow it.

The default that applies to plaintext is the workload's own, unless the pod would be
permissive but for its policies (``open_to_plaintext``: it is strict only so that its
policies are not bypassed) — then plaintext not named by a policy passes, as it did.

`workload_verdicts` is the one place that decides which table a workload's filter gets
(the agent loads it; ``weft policy check --from plaintext`` looks a caller up in it), so
the check cannot say otherwise than the kernel does.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from weft.policy.evaluate import PolicySet
from weft.policy.model import DefaultPolicy, Request

if TYPE_CHECKING:  # for its type only: weft.mesh itself imports weft.policy
    from weft.mesh import Workload

ANY_PORT = 0
"""The table's entries for every port no rule names."""
MAX_PREFIXES = 256
"""Distinct source prefixes per workload; beyond, plaintext is refused (fail closed)."""
MAX_PORTS = 64
MAX_ENTRIES = 1024
"""Table entries per workload (the kernel's table holds 16,384 for the node)."""

IPv4 = ipaddress.IPv4Network


@dataclass(frozen=True, slots=True)
class Entry:
    port: int
    """Destination port, or `ANY_PORT`."""
    network: IPv4
    allow: bool


class TooComplex(ValueError):
    """More prefixes or ports than the filter is given: plaintext is refused instead."""


def plaintext_table(
    ps: PolicySet, ports: Iterable[int] = (), *, open_to_plaintext: bool = False
) -> tuple[Entry, ...]:
    """The verdicts for plaintext to the workload of ``ps`` (``ports``: its declared
    ports), as longest-prefix entries: for a port, its own entries if it has any, else
    the `ANY_PORT` ones; each set covers ``0.0.0.0/0``. Redundant entries (a prefix
    judged as the prefix it is inside) are left out. Raises `TooComplex`."""
    if open_to_plaintext:
        ps = dataclasses.replace(ps, default=DefaultPolicy.ALL_UNAUTHENTICATED)
    elif ps.default in (DefaultPolicy.ALL_UNAUTHENTICATED, DefaultPolicy.AUDIT):
        # Strict by its own choice (the pod's inbound mode): a default does not open it.
        ps = dataclasses.replace(ps, default=DefaultPolicy.DENY)
    policies = [p for p in (*ps.deny, *ps.audit, *ps.allow) if not p.target_routes]
    nets: set[IPv4] = {IPv4("0.0.0.0/0")}
    named_ports = set(ports)
    for p in policies:
        for rule in p.rules:
            for s in rule.sources:
                nets.update(n for n in (*s.ip_blocks, *s.not_ip_blocks) if isinstance(n, IPv4))
            for o in rule.operations:
                named_ports.update(o.ports or ())
                named_ports.update(o.not_ports)
    named_ports.discard(ANY_PORT)
    if len(nets) > MAX_PREFIXES or len(named_ports) > MAX_PORTS:
        raise TooComplex(f"{len(nets)} source prefixes and {len(named_ports)} ports "
                         f"(at most {MAX_PREFIXES} and {MAX_PORTS})")  # fmt: skip
    other = _unnamed_port(named_ports)
    regions = _regions(nets)
    tables: dict[int, tuple[Entry, ...]] = {}
    for port in (ANY_PORT, *sorted(named_ports)):
        judged = port if port != ANY_PORT else other
        verdicts = {
            net: ps.evaluate(Request(None, str(rep), judged)).allowed
            for net, rep in regions.items()
        }
        tables[port] = _pruned(port, verdicts)
    out = list(tables[ANY_PORT])
    for port in sorted(named_ports):
        if [(e.network, e.allow) for e in tables[port]] != [
            (e.network, e.allow) for e in tables[ANY_PORT]
        ]:
            out.extend(tables[port])
    if len(out) > MAX_ENTRIES:
        raise TooComplex(f"{len(out)} table entries (at most {MAX_ENTRIES})")
    return tuple(out)


def workload_verdicts(w: Workload, ps: PolicySet) -> tuple[Entry, ...] | None:
    """The plaintext verdicts of ``w``'s eBPF filter, compiled from ``ps`` (``w``'s own
    compiled policies); None when there is no table to load: ``w`` is not strict (it has
    no filter), or no plaintext caller may come in (the filter's default: only the node)
    — it has no policies and is not `open_to_plaintext`, or its table allows nothing.
    Raises `TooComplex` (the filter refuses all plaintext then)."""
    if not w.strict or not (w.policies or w.open_to_plaintext):
        return None
    table = plaintext_table(ps, (p.port for p in w.ports), open_to_plaintext=w.open_to_plaintext)
    return table if any(e.allow for e in table) else None


def lookup(table: Iterable[Entry], port: int, source: str) -> bool:
    """What the filter does with a SYN from ``source`` to ``port`` (for tests and
    `weft policy check`): the port's entries if it has any, else `ANY_PORT`'s; the
    longest prefix containing the source decides; none: refused."""
    addr = ipaddress.IPv4Address(source)
    entries = list(table)
    mine = [e for e in entries if e.port == port] or [e for e in entries if e.port == ANY_PORT]
    best = max((e for e in mine if addr in e.network), key=lambda e: e.network.prefixlen,
               default=None)  # fmt: skip
    return best is not None and best.allow


def _unnamed_port(named: set[int]) -> int:
    port = 65535
    while port in named:
        port -= 1
    return port


def _regions(nets: set[IPv4]) -> dict[IPv4, ipaddress.IPv4Address]:
    """Each prefix with an address whose longest matching prefix is that one (prefixes
    that their more specific ones cover entirely have none and are left out)."""
    out: dict[IPv4, ipaddress.IPv4Address] = {}
    for net in nets:
        inside = [n for n in nets if n != net and n.subnet_of(net)]
        rest = [net]
        for child in inside:
            nxt: list[IPv4] = []
            for piece in rest:
                if child.subnet_of(piece):
                    nxt.extend(piece.address_exclude(child))
                elif not piece.subnet_of(child):
                    nxt.append(piece)
            rest = nxt
            if not rest:
                break
        if rest:
            out[net] = min(rest).network_address
    return out


def _pruned(port: int, verdicts: dict[IPv4, bool]) -> tuple[Entry, ...]:
    """The entries whose verdict differs from their nearest enclosing prefix's."""
    out = []
    for net in sorted(verdicts, key=lambda n: (n.prefixlen, n)):
        parents = [p for p in verdicts if p != net and net.subnet_of(p)]
        if parents:
            nearest = max(parents, key=lambda p: p.prefixlen)
            if verdicts[nearest] == verdicts[net]:
                continue
        out.append(Entry(port, net, verdicts[net]))
    return tuple(out)
