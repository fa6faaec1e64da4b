"""Plaintext verdicts compiled for the kernel (`weft.policy.plaintext`): the table's
longest-prefix lookup says what the evaluator says, for every address and port."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.identity import SpiffeId
from weft.mesh import InboundMode, Workload, WorkloadPort
from weft.policy import DefaultPolicy, Request, parse_policy, policy_set
from weft.policy.plaintext import (
    ANY_PORT,
    MAX_PREFIXES,
    TooComplex,
    lookup,
    plaintext_table,
    workload_verdicts,
)


def pol(name: str, spec: dict[str, Any]) -> Any:
    meta = {"name": name, "namespace": "shop"}
    return parse_policy({"apiVersion": "weft.io/v1alpha1", "kind": "AuthorizationPolicy",
                         "metadata": meta, "spec": spec})  # fmt: skip


def test_an_ip_block_allow_lets_only_that_block_in_on_its_port() -> None:
    allow = pol("batch-net", {"rules": [{"from": [{"source": {"ipBlocks": ["10.244.9.0/24"]}}],
                                         "to": [{"operation": {"ports": ["8000"]}}]}]})  # fmt: skip
    ps = policy_set("shop/p", [allow], DefaultPolicy.CLUSTER_AUTHENTICATED)
    table = plaintext_table(ps, [8000, 9090])
    assert lookup(table, 8000, "10.244.9.7")
    assert not lookup(table, 8000, "10.244.8.7")
    assert not lookup(table, 9090, "10.244.9.7")  # another port
    assert not lookup(table, 1234, "10.244.9.7")
    assert len(table) <= 3  # 0/0 deny (any port), 0/0 deny + the /24 allow (port 8000)


def test_a_permissive_pod_made_strict_by_a_deny_keeps_everyone_else() -> None:
    source = {"ipBlocks": ["10.0.0.0/8"], "notIpBlocks": ["10.1.0.0/16"]}
    deny = pol("no-lab-net", {"action": "DENY", "rules": [{"from": [{"source": source}]}]})
    ps = policy_set("shop/p", [deny])
    table = plaintext_table(ps, [8000], open_to_plaintext=True)
    assert not lookup(table, 8000, "10.2.3.4")
    assert lookup(table, 8000, "10.1.3.4")  # the notIpBlocks hole
    assert lookup(table, 8000, "192.168.1.1")
    # Not open to plaintext (strict by its own mode): only a rule can let plaintext in.
    assert not lookup(plaintext_table(ps, [8000]), 8000, "192.168.1.1")


def test_an_allow_rule_naming_no_source_admits_plaintext_as_the_proxy_would() -> None:
    anyone = pol("port-8000", {"rules": [{"to": [{"operation": {"ports": ["8000"]}}]}]})
    http_only = pol("get-only", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    table = plaintext_table(policy_set("shop/p", [anyone, http_only]), [8000])
    assert lookup(table, 8000, "1.2.3.4") and not lookup(table, 8001, "1.2.3.4")
    # A rule needing a method cannot allow opaque TCP, which plaintext is to the filter.
    assert not lookup(plaintext_table(policy_set("shop/p", [http_only])), 80, "1.2.3.4")


def test_too_many_prefixes_refuse_rather_than_truncate() -> None:
    blocks = [f"10.{i // 256}.{i % 256}.0/24" for i in range(MAX_PREFIXES + 1)]
    halves = [{"source": {"ipBlocks": blocks[:200]}}, {"source": {"ipBlocks": blocks[200:]}}]
    big = pol("big", {"rules": [{"from": halves}]})
    with pytest.raises(TooComplex):
        plaintext_table(policy_set("shop/p", [big]))


POD = Workload(
    uid="u1", name="p-1", namespace="shop", node="n1", ips=("10.244.1.5",),
    service_account="p", identity=SpiffeId.workload("shop", "p"), captured=True,
    inbound_mode=InboundMode.STRICT, ports=(WorkloadPort(8000),),
)  # fmt: skip


def test_a_workloads_filter_table_is_loaded_only_when_it_lets_some_plaintext_in() -> None:
    block = pol("batch-net", {"rules": [{"from": [{"source": {"ipBlocks": ["10.244.9.0/24"]}}]}]})
    deny = pol(
        "no-lab-net",
        {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]},
    )
    get = pol("get-only", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})

    def verdicts(w: Workload) -> Any:
        return workload_verdicts(w, policy_set("shop/p-1", w.policies, w.default_policy))

    table = verdicts(dataclasses.replace(POD, policies=(block,)))
    assert table == plaintext_table(policy_set("shop/p-1", [block], POD.default_policy), [8000])
    assert lookup(table, 8000, "10.244.9.7") and not lookup(table, 8000, "10.244.8.7")
    # Not strict: no filter. No policies and not open: the filter's default (only the node).
    assert verdicts(dataclasses.replace(POD, inbound_mode=InboundMode.PERMISSIVE,
                                        policies=(block,))) is None  # fmt: skip
    assert verdicts(POD) is None
    # Nothing allowed (a rule needing a method cannot allow opaque TCP): no table either.
    assert verdicts(dataclasses.replace(POD, policies=(get,))) is None
    # Strict only so that a DENY is not bypassed: everyone else still passes.
    opened = verdicts(dataclasses.replace(POD, policies=(deny,), open_to_plaintext=True))
    assert lookup(opened, 8000, "192.168.1.1") and not lookup(opened, 8000, "10.1.2.3")
    blocks = [f"10.{i // 256}.{i % 256}.0/24" for i in range(MAX_PREFIXES + 1)]
    halves = [{"source": {"ipBlocks": blocks[:200]}}, {"source": {"ipBlocks": blocks[200:]}}]
    big = pol("big", {"rules": [{"from": halves}]})
    with pytest.raises(TooComplex):
        verdicts(dataclasses.replace(POD, policies=(big,)))


NETS = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32",
        "192.168.0.0/16", "192.168.1.0/24", "128.0.0.0/1"]  # fmt: skip
ADDRS = ["10.1.2.3", "10.1.2.4", "10.1.9.9", "10.9.9.9", "192.168.1.5", "192.168.7.7",
         "172.16.0.1", "8.8.8.8", "200.1.1.1"]  # fmt: skip

sources = st.fixed_dictionaries({}, optional={
    "ipBlocks": st.lists(st.sampled_from(NETS), min_size=1, max_size=3),
    "notIpBlocks": st.lists(st.sampled_from(NETS), min_size=1, max_size=2),
    "principals": st.just(["*"]),
}).filter(bool)  # fmt: skip
operations = st.fixed_dictionaries({}, optional={
    "ports": st.lists(st.sampled_from(["80", "8000", "9090"]), min_size=1, max_size=2),
    "notPorts": st.lists(st.sampled_from(["80", "8000"]), min_size=1, max_size=1),
}).filter(bool)  # fmt: skip
rules = st.fixed_dictionaries({}, optional={
    "from": st.lists(st.builds(lambda s: {"source": s}, sources), min_size=1, max_size=2),
    "to": st.lists(st.builds(lambda o: {"operation": o}, operations), min_size=1, max_size=2),
})  # fmt: skip
specs = st.lists(
    st.tuples(st.sampled_from(["ALLOW", "DENY", "AUDIT"]), st.lists(rules, max_size=3)),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(specs, st.sampled_from(list(DefaultPolicy)), st.booleans())
def test_the_table_says_what_the_evaluator_says(
    spec: list[tuple[str, list[dict[str, Any]]]], default: DefaultPolicy, opened: bool
) -> None:
    policies = [pol(f"p{i}", {"action": a, "rules": r}) for i, (a, r) in enumerate(spec)]
    ps = policy_set("shop/p", policies, default)
    table = plaintext_table(ps, [8000], open_to_plaintext=opened)
    judge = dataclasses.replace(ps, default=(
        DefaultPolicy.ALL_UNAUTHENTICATED if opened
        else DefaultPolicy.DENY if default in (DefaultPolicy.ALL_UNAUTHENTICATED,
                                               DefaultPolicy.AUDIT)
        else default))  # fmt: skip
    for port in (80, 8000, 9090, 12345):
        for addr in ADDRS:
            want = judge.evaluate(Request(None, addr, port)).allowed
            assert lookup(table, port, addr) == want, (port, addr, table)
    # Each port's entries cover every address (the kernel falls back only without them).
    for port in {e.port for e in table} | {ANY_PORT}:
        mine = [e.network for e in table if e.port == port]
        if mine:
            assert any(ipaddress.IPv4Address("0.0.0.1") in n for n in mine) or any(
                n.prefixlen == 1 for n in mine
            )
