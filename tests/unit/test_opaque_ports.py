"""`weft.io/opaque-ports` (and Linkerd's annotation) parsed into ports."""

from __future__ import annotations

import pytest

from controlplane.discovery.kube import parse_pod, parse_service
from weft.mesh import opaque_ports


@pytest.mark.parametrize(
    ("value", "ports"),
    [
        ("2525", (2525,)),
        ("25, 587,2525", (25, 587, 2525)),
        ("8000-8003,8001", (8000, 8001, 8002, 8003)),
        ("http,99999,0,5-3,2525", (2525,)),  # bad entries skipped, the good one kept
        ("", ()),
        ("1-60000", ()),  # more than the cap: refused as a whole entry
    ],
)
def test_values(value: str, ports: tuple[int, ...]):
    assert opaque_ports({"weft.io/opaque-ports": value}) == ports


def test_linkerds_annotation_is_read_and_ours_wins():
    assert opaque_ports({"config.linkerd.io/opaque-ports": "3306"}) == (3306,)
    both = {"config.linkerd.io/opaque-ports": "3306", "weft.io/opaque-ports": "5432"}
    assert opaque_ports(both) == (5432,)


def test_kubernetes_objects_carry_their_annotation():
    meta = {"uid": "u", "name": "n", "namespace": "ns",
            "annotations": {"weft.io/opaque-ports": "2525"}}  # fmt: skip
    assert parse_pod({"metadata": meta, "spec": {}, "status": {}}).opaque_ports == (2525,)
    svc = {"metadata": meta, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 25}]}}
    assert parse_service(svc).opaque_ports == (2525,)
