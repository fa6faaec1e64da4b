"""The discovery stream's wire format, sans-I/O: frames of JSON on one long response.

An agent subscribes with ``POST /v1/discovery`` on the control plane's API port (mTLS,
node certificate; the body is a :class:`Subscribe`).  The answer is ``200`` with
``Content-Type: application/vnd.weft.discovery.v1`` and no length: the rest of the
connection is a sequence of frames, each a 4-byte big-endian length then that many bytes
of UTF-8 JSON, until either side closes.

Messages (the ``type`` field):

* ``snapshot`` — ``epoch``, ``revision``, every ``workloads`` and ``services`` item.
  Replaces whatever the agent held.
* ``deltas`` — ``epoch`` and ``deltas``: consecutive ``{revision, kind, key, value}``
  with ``value`` null for a deletion.  The first follows the agent's revision exactly.
* ``heartbeat`` — ``epoch``, ``revision``: sent when nothing changed for a while, so an
  agent can tell a quiet control plane from a dead connection.

Why length-prefixed JSON and not newline-delimited JSON or gRPC: a snapshot of 10,000
workloads is megabytes, and a length lets the reader refuse an oversized frame before
buffering it (``readline`` would have to buffer to find out); JSON keeps the stream
debuggable with ``openssl s_client`` and costs nothing new to install.  The server
encodes each snapshot and each batch of deltas once and writes the same bytes to every
subscriber, so fan-out costs no per-agent encoding.

Decoding validates everything — types, ranges, SPIFFE IDs — and raises
:class:`MeshWireError` naming the field: an agent must never apply half a message.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from weft.identity import IdentityError, SpiffeId
from weft.mesh import (
    Delta,
    Endpoint,
    InboundMode,
    Item,
    Kind,
    Service,
    ServicePort,
    Workload,
    WorkloadPort,
)
from weft.policy import (
    MESH_DEFAULT,
    DefaultPolicy,
    Policy,
    PolicyError,
    parse_policy,
    policy_object,
)
from weft.routes import Route, RouteError, parse_route, route_object
from weft.traffic import (
    DEFAULT as DEFAULT_TRAFFIC,
)
from weft.traffic import (
    MAX_RETRY_LIMIT,
    MAX_TIMEOUT,
    AccrualPolicy,
    RetryPolicy,
    TrafficPolicy,
    compact_statuses,
    parse_statuses,
)

DISCOVERY_PATH = "/v1/discovery"
CONTENT_TYPE = "application/vnd.weft.discovery.v1"
MAX_FRAME = 256 * 1024 * 1024
"""Largest frame accepted: a snapshot of ~500,000 workloads; anything larger is a bug
or an attack, and is refused before it is buffered."""
_LENGTH = struct.Struct("!I")


class MeshWireError(ValueError):
    """A discovery message that cannot be decoded; the message names what is wrong."""


# --------------------------------------------------------------------------- items


def encode_workload(w: Workload) -> dict[str, Any]:
    return {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "node": w.node,
        "node_ip": w.node_ip,
        "ips": list(w.ips),
        "service_account": w.service_account,
        "identity": str(w.identity),
        "captured": w.captured,
        "inbound_mode": w.inbound_mode.value,
        "ports": [[p.port, p.protocol, p.name] for p in w.ports],
        "ready": w.ready,
        "opaque_ports": list(w.opaque_ports),
        # Absent when default: a workload without policies encodes as before they existed.
        **({"default_policy": w.default_policy.value}
           if w.default_policy is not MESH_DEFAULT else {}),
        **({"policies": [policy_object(p) for p in w.policies]} if w.policies else {}),
        **({"open_to_plaintext": True} if w.open_to_plaintext else {}),
    }  # fmt: skip


def encode_service(s: Service) -> dict[str, Any]:
    return {
        "name": s.name,
        "namespace": s.namespace,
        "vips": list(s.vips),
        "ports": [[p.port, p.target_port, p.protocol, p.name] for p in s.ports],
        "endpoints": [
            {
                "address": e.address,
                "workload_uid": e.workload_uid,
                "ready": e.ready,
                "target_ports": [[n, v] for n, v in e.target_ports],
            }
            for e in s.endpoints
        ],
        "opaque_ports": list(s.opaque_ports),
        **({"traffic": encode_traffic(s.traffic)} if s.traffic != DEFAULT_TRAFFIC else {}),
        **({"routes": [route_object(r) for r in s.routes]} if s.routes else {}),
    }


def encode_traffic(t: TrafficPolicy) -> dict[str, Any]:
    r = t.retry
    out: dict[str, Any] = {"retry_limit": r.limit}
    if r.http_statuses:
        out["retry_http"] = compact_statuses(r.http_statuses)
    if r.grpc_codes:
        out["retry_grpc"] = sorted(r.grpc_codes)
    if r.per_try_timeout is not None:
        out["retry_timeout"] = r.per_try_timeout
    if t.request_timeout is not None:
        out["timeout_request"] = t.request_timeout
    a = t.accrual
    if a is not None:
        out["accrual"] = [a.max_failures, a.min_penalty, a.max_penalty, a.jitter]
    return out


def decode_traffic(obj: Any, where: str) -> TrafficPolicy:
    f = _Fields(obj, where)
    try:
        statuses = f.get("retry_http", str, None)
        codes = f.list("retry_grpc") if "retry_grpc" in f.obj else []
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 < c <= 16 for c in codes):
            raise ValueError("retry_grpc: expected gRPC codes 1-16")
        limit = f.get("retry_limit", int)
        if not 0 <= limit <= MAX_RETRY_LIMIT:
            raise ValueError(f"retry_limit {limit} out of range")
        timeouts = []
        for key in ("retry_timeout", "timeout_request"):
            v = f.get(key, (int, float), None)
            if v is not None and not 0 < v <= MAX_TIMEOUT:
                raise ValueError(f"{key} {v} out of range")
            timeouts.append(float(v) if v is not None else None)
        retry = RetryPolicy(
            http_statuses=parse_statuses(statuses) if statuses else frozenset(),
            grpc_codes=frozenset(codes),
            limit=limit,
            per_try_timeout=timeouts[0],
        )
        accrual = None
        if "accrual" in f.obj:
            a = f.list("accrual")
            numbers = len(a) == 4 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in a
            )
            if not (
                numbers
                and isinstance(a[0], int)
                and 1 <= a[0] <= 1000
                and 0 < a[1] <= a[2] <= MAX_TIMEOUT
                and 0 <= a[3] <= 1
            ):
                raise ValueError("accrual: expected [failures, min, max penalty, jitter]")
            accrual = AccrualPolicy(a[0], float(a[1]), float(a[2]), float(a[3]))
    except ValueError as e:
        raise MeshWireError(f"{where}: {e}") from None
    return TrafficPolicy(retry=retry, request_timeout=timeouts[1], accrual=accrual)


def encode_item(item: Item) -> dict[str, Any]:
    return encode_workload(item) if isinstance(item, Workload) else encode_service(item)


class _Fields:
    """Typed access to one JSON object, with errors that name the path."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise MeshWireError(f"{where}: expected an object, got {type(obj).__name__}")
        self.obj: dict[str, Any] = obj
        self.where = where

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.obj:
            if default is ...:
                raise MeshWireError(f"{self.where}.{key}: missing")
            return default
        value = self.obj[key]
        # bool is an int subclass: never let true pass for a number.
        if not isinstance(value, typ) or (isinstance(value, bool) and bool not in _tuple(typ)):
            raise MeshWireError(f"{self.where}.{key}: unexpected {type(value).__name__}")
        return value

    def text(self, key: str, default: Any = ...) -> str:
        return str(self.get(key, str, default))

    def port(self, value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise MeshWireError(f"{self.where}.{what}: not a port: {value!r}")
        return value

    def list(self, key: str) -> list[Any]:
        return list(self.get(key, list))


def _tuple(typ: type | tuple[type, ...]) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


def _ports_list(f: _Fields, name: str) -> tuple[int, ...]:
    """An optional list of ports (absent from an older control plane: none)."""
    raw = f.get(name, list, [])
    return tuple(sorted({f.port(p, name) for p in raw}))


def decode_workload(obj: Any, where: str = "workload") -> Workload:
    f = _Fields(obj, where)
    try:
        identity = SpiffeId.parse(f.text("identity"))
    except IdentityError as e:
        raise MeshWireError(f"{where}.identity: {e}") from None
    # The data path trusts this identity as what the pod must prove: it must be the
    # workload identity of the pod's own namespace and service account.
    if (identity.namespace, identity.service_account) != (
        f.text("namespace"),
        f.text("service_account"),
    ):
        raise MeshWireError(
            f"{where}.identity: {identity} is not the identity of namespace "
            f"{obj.get('namespace')!r}, service account {obj.get('service_account')!r}"
        )
    try:
        mode = InboundMode(f.text("inbound_mode"))
    except ValueError:
        raise MeshWireError(f"{where}.inbound_mode: {obj.get('inbound_mode')!r}") from None
    ports = []
    for i, p in enumerate(f.list("ports")):
        if not (isinstance(p, list) and len(p) == 3 and all(isinstance(x, str) for x in p[1:])):
            raise MeshWireError(f"{where}.ports[{i}]: expected [port, protocol, name]")
        ports.append(WorkloadPort(f.port(p[0], f"ports[{i}]"), p[1], p[2]))
    ips = f.list("ips")
    if not all(isinstance(ip, str) for ip in ips):
        raise MeshWireError(f"{where}.ips: expected strings")
    return Workload(
        uid=f.text("uid"),
        name=f.text("name"),
        namespace=f.text("namespace"),
        node=f.text("node"),
        node_ip=f.text("node_ip", ""),
        ips=tuple(ips),
        service_account=f.text("service_account"),
        identity=identity,
        captured=bool(f.get("captured", bool)),
        inbound_mode=mode,
        ports=tuple(ports),
        ready=bool(f.get("ready", bool, True)),
        opaque_ports=_ports_list(f, "opaque_ports"),
        default_policy=_default_policy(f, where),
        policies=_policies(f, where),
        open_to_plaintext=bool(f.get("open_to_plaintext", bool, False)),
    )


def _default_policy(f: _Fields, where: str) -> DefaultPolicy:
    value = f.text("default_policy", MESH_DEFAULT.value)
    try:
        return DefaultPolicy(value)
    except ValueError:
        raise MeshWireError(f"{where}.default_policy: {value!r}") from None


def _policies(f: _Fields, where: str) -> tuple[Policy, ...]:
    policies = []
    for i, obj in enumerate(f.list("policies") if "policies" in f.obj else []):
        if not isinstance(obj, dict):
            raise MeshWireError(f"{where}.policies[{i}]: not an object")
        try:
            policies.append(parse_policy(obj))
        except PolicyError as e:
            raise MeshWireError(f"{where}.policies[{i}]: {e}") from None
    return tuple(policies)


def decode_service(obj: Any, where: str = "service") -> Service:
    f = _Fields(obj, where)
    vips = f.list("vips")
    if not all(isinstance(v, str) for v in vips):
        raise MeshWireError(f"{where}.vips: expected strings")
    ports = []
    for i, p in enumerate(f.list("ports")):
        if not (isinstance(p, list) and len(p) == 4 and isinstance(p[2], str)
                and isinstance(p[3], str)):  # fmt: skip
            raise MeshWireError(f"{where}.ports[{i}]: expected [port, target, protocol, name]")
        target = p[1] if isinstance(p[1], str) else f.port(p[1], f"ports[{i}].target")
        ports.append(ServicePort(f.port(p[0], f"ports[{i}]"), target, p[2], p[3]))
    endpoints = []
    for i, e in enumerate(f.list("endpoints")):
        ef = _Fields(e, f"{where}.endpoints[{i}]")
        targets = []
        for t in ef.list("target_ports"):
            if not (isinstance(t, list) and len(t) == 2 and isinstance(t[0], str)):
                raise MeshWireError(f"{ef.where}.target_ports: expected [name, port]")
            targets.append((t[0], ef.port(t[1], "target_ports")))
        endpoints.append(
            Endpoint(
                address=ef.text("address"),
                workload_uid=ef.get("workload_uid", (str, type(None))),
                ready=bool(ef.get("ready", bool)),
                target_ports=tuple(targets),
            )
        )
    return Service(
        name=f.text("name"),
        namespace=f.text("namespace"),
        vips=tuple(vips),
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        opaque_ports=_ports_list(f, "opaque_ports"),
        traffic=(
            decode_traffic(f.obj["traffic"], f"{where}.traffic")
            if "traffic" in f.obj
            else DEFAULT_TRAFFIC
        ),
        routes=_routes(f, where),
    )


def _routes(f: _Fields, where: str) -> tuple[Route, ...]:
    routes = []
    for i, obj in enumerate(f.list("routes") if "routes" in f.obj else []):
        try:
            routes.append(parse_route(obj))
        except RouteError as e:  # parse_route turns any malformed shape into one
            raise MeshWireError(f"{where}.routes[{i}]: {e}") from None
    return tuple(routes)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Subscribe:
    """What an agent asks for: resume after ``revision`` of ``epoch``, or (None) start over."""

    epoch: str | None = None
    revision: int | None = None

    def encode(self) -> bytes:
        return json.dumps({"epoch": self.epoch, "revision": self.revision}).encode()

    @classmethod
    def decode(cls, body: bytes) -> Subscribe:
        try:
            obj = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise MeshWireError(f"subscribe: not JSON: {e}") from None
        f = _Fields(obj, "subscribe")
        epoch = f.get("epoch", (str, type(None)), None)
        revision = f.get("revision", (int, type(None)), None)
        if revision is not None and revision < 0:
            raise MeshWireError("subscribe.revision: negative")
        if (epoch is None) != (revision is None):
            raise MeshWireError("subscribe: epoch and revision go together")
        return cls(epoch, revision)


@dataclass(frozen=True)
class SnapshotMsg:
    epoch: str
    revision: int
    workloads: tuple[Workload, ...]
    services: tuple[Service, ...]


@dataclass(frozen=True)
class DeltasMsg:
    epoch: str
    deltas: tuple[Delta, ...]

    @property
    def revision(self) -> int:
        return self.deltas[-1].revision


@dataclass(frozen=True)
class HeartbeatMsg:
    epoch: str
    revision: int


Message = SnapshotMsg | DeltasMsg | HeartbeatMsg


def frame(obj: Mapping[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise MeshWireError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(payload)) + payload


def snapshot_frame(
    epoch: str, revision: int, workloads: Sequence[Workload], services: Sequence[Service]
) -> bytes:
    return frame(_snapshot(epoch, revision, workloads, services))


def snapshot_payload(
    epoch: str, revision: int, workloads: Sequence[Workload], services: Sequence[Service]
) -> bytes:
    """A snapshot message's payload (what `decode_message` takes), without the length
    prefix: how an agent hands its state to its proxy workers."""
    return json.dumps(
        _snapshot(epoch, revision, workloads, services), separators=(",", ":")
    ).encode()


def _snapshot(
    epoch: str, revision: int, workloads: Sequence[Workload], services: Sequence[Service]
) -> dict[str, Any]:
    return {
        "type": "snapshot",
        "epoch": epoch,
        "revision": revision,
        "workloads": [encode_workload(w) for w in workloads],
        "services": [encode_service(s) for s in services],
    }


def deltas_frame(epoch: str, deltas: Sequence[Delta]) -> bytes:
    return frame(
        {
            "type": "deltas",
            "epoch": epoch,
            "deltas": [
                {
                    "revision": d.revision,
                    "kind": d.kind.value,
                    "key": d.key,
                    "value": None if d.value is None else encode_item(d.value),
                }
                for d in deltas
            ],
        }
    )


def heartbeat_frame(epoch: str, revision: int) -> bytes:
    return frame({"type": "heartbeat", "epoch": epoch, "revision": revision})


def decode_message(payload: bytes) -> Message:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MeshWireError(f"frame is not JSON: {e}") from None
    f = _Fields(obj, "message")
    kind = f.text("type")
    epoch = f.text("epoch")
    if kind == "heartbeat":
        return HeartbeatMsg(epoch, _revision(f.get("revision", int), "heartbeat.revision"))
    if kind == "snapshot":
        return SnapshotMsg(
            epoch=epoch,
            revision=_revision(f.get("revision", int), "snapshot.revision"),
            workloads=tuple(
                decode_workload(w, f"workloads[{i}]") for i, w in enumerate(f.list("workloads"))
            ),
            services=tuple(
                decode_service(s, f"services[{i}]") for i, s in enumerate(f.list("services"))
            ),
        )
    if kind == "deltas":
        deltas: list[Delta] = []
        for i, d in enumerate(f.list("deltas")):
            df = _Fields(d, f"deltas[{i}]")
            revision = _revision(df.get("revision", int), f"deltas[{i}].revision")
            if deltas and revision != deltas[-1].revision + 1:
                raise MeshWireError(f"deltas[{i}].revision {revision} does not follow")
            try:
                item_kind = Kind(df.text("kind"))
            except ValueError:
                raise MeshWireError(f"deltas[{i}].kind: {d.get('kind')!r}") from None
            value = df.get("value", (dict, type(None)))
            item: Item | None = None
            if value is not None:
                where = f"deltas[{i}].value"
                item = (
                    decode_workload(value, where)
                    if item_kind is Kind.WORKLOAD
                    else decode_service(value, where)
                )
                if item.key != df.text("key"):
                    raise MeshWireError(f"deltas[{i}]: key does not match the value")
            deltas.append(Delta(revision, item_kind, df.text("key"), item))
        if not deltas:
            raise MeshWireError("deltas: empty")
        return DeltasMsg(epoch, tuple(deltas))
    raise MeshWireError(f"message.type: unknown {kind!r}")


def _revision(value: int, where: str) -> int:
    if value < 0:
        raise MeshWireError(f"{where}: negative")
    return value


class FrameDecoder:
    """Bytes in, complete frame payloads out.  Refuses an oversized frame on its header."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buf)
            if length > self.max_frame:
                raise MeshWireError(f"frame of {length} bytes exceeds the {self.max_frame} limit")
            end = _LENGTH.size + length
            if len(self._buf) < end:
                break
            out.append(bytes(self._buf[_LENGTH.size : end]))
            del self._buf[:end]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (0 between frames)."""
        return len(self._buf)
