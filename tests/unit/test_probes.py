"""The sidecar's gRPC health probe codec (`nodeagent.probes`): the request it sends and
the answer it reads, checked against protobuf's own encoding (opentelemetry-proto's
dependency) of the same fields."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.probes import grpc_frame, health_request, health_status


def _health_messages() -> tuple[type, type]:
    """HealthCheckRequest/Response as grpc/health/v1/health.proto declares them."""
    f = descriptor_pb2.FileDescriptorProto(
        name="weft_test_health.proto", package="weft_test.health.v1", syntax="proto3"
    )
    req = f.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=9, label=1)  # string
    resp = f.message_type.add(name="HealthCheckResponse")
    resp.field.add(name="status", number=1, type=14, label=1,
                   type_name=".weft_test.health.v1.HealthCheckResponse.ServingStatus")  # fmt: skip
    enum = resp.enum_type.add(name="ServingStatus")
    for i, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        enum.value.add(name=name, number=i)
    resp.field.add(name="note", number=7, type=9, label=1)  # an unknown field to skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("weft_test.health.v1.HealthCheckRequest")),
            get(pool.FindMessageTypeByName("weft_test.health.v1.HealthCheckResponse")))  # fmt: skip


REQUEST, RESPONSE = _health_messages()


@given(st.text(max_size=300))
def test_the_request_is_protobufs_encoding(service: str) -> None:
    assert health_request(service) == REQUEST(service=service).SerializeToString()


@given(st.integers(0, 3), st.text(max_size=200))
def test_the_status_is_read_as_protobuf_wrote_it(status: int, note: str) -> None:
    body = grpc_frame(RESPONSE(status=status, note=note).SerializeToString())
    assert health_status(body) == status


@pytest.mark.parametrize(
    "body", [b"", b"\x01\x00\x00\x00\x00", b"\x00\x00\x00\x00\x05\x08", b"\x00\x00\x00\x00\x01\x0f"]
)
def test_a_broken_answer_has_no_status(body: bytes) -> None:
    assert health_status(body) is None
