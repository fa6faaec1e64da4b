"""The app's kubelet probes, run by the sidecar from inside the pod.

Why: in sidecar mode the pod's nftables accept new inbound TCP only from loopback and to
the tunnel and admin ports (strict inbound), so the kubelet's own plaintext connection
to an app port — from the node's address, or a CNI gateway address — is dropped, and
every HTTP, TCP or gRPC probe would fail.  ``weft inject`` therefore rewrites each such probe
to ``GET /app-health/<container>/<readyz|livez|startupz>`` on the sidecar's admin port
(15020, which the rules admit) and hands the originals over in ``$WEFT_APP_PROBES``; this
module runs the original against the app and answers for it, as Istio's pilot-agent
does with its ``/app-health/`` prober.

The alternative — exempting probe ports from the redirect and the input filter — was
not taken: a probe usually targets the port the app serves on, so exempting it would let
any plaintext caller in, and the kubelet's source address cannot be pinned down in
general (the CNI gateway is not the node's IP on kindnet, flannel or Cilium).

What a probe does, as the kubelet's prober does it: ``httpGet`` connects to the pod's
own address (where the kubelet would have connected; an app bound to ``0.0.0.0`` or to
the pod IP answers there, and loopback traffic passes the pod's rules), sends
``GET path`` with ``Host``, ``User-Agent: kube-probe/weft`` and the probe's headers, and
succeeds on a status from 200 to 399 (HTTPS without verifying, as the kubelet does);
``tcpSocket`` succeeds when a connection opens; ``grpc`` calls the app's
``grpc.health.v1.Health/Check`` (the probe's ``service``, default ``""``) over cleartext
HTTP/2 and succeeds only on ``SERVING`` with ``grpc-status: 0``.  All within the probe's
``timeoutSeconds``.  The answer is 200 or 503 with one line saying why — never the
app's body (anyone who may reach the admin port may ask for probes).

`parse_table` is sans-I/O; `AppProber.answer` does one probe's I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from weft.http import TEXT
from weft.inject import PROBE_PREFIX

USER_AGENT = "kube-probe/weft"
MAX_HEAD = 16 * 1024
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = 1
"""``grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING``."""
GRPC_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


class ProbeTableError(ValueError):
    """``$WEFT_APP_PROBES`` is not a table the sidecar can run."""


@dataclass(frozen=True)
class AppProbe:
    kind: str
    """``http``, ``tcp`` or ``grpc``."""
    port: int
    timeout: float
    path: str = "/"
    https: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    service: str = ""
    """gRPC: the service name asked of the health service."""


def parse_table(text: str) -> dict[str, AppProbe]:
    """``$WEFT_APP_PROBES`` (``weft inject`` writes it) -> probes by admin path."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ProbeTableError(f"$WEFT_APP_PROBES is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ProbeTableError("$WEFT_APP_PROBES must be an object: admin path -> probe")
    return {path: _probe(path, spec) for path, spec in raw.items()}


def _probe(path: str, spec: Any) -> AppProbe:
    if not path.startswith(PROBE_PREFIX) or not isinstance(spec, dict):
        raise ProbeTableError(f"$WEFT_APP_PROBES: {path!r} is not {PROBE_PREFIX}... -> object")
    timeout = spec.get("timeoutSeconds", 1)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise ProbeTableError(f"$WEFT_APP_PROBES: {path}: timeoutSeconds {timeout!r}")
    http, tcp, grpc = spec.get("httpGet"), spec.get("tcpSocket"), spec.get("grpc")
    handler: dict[str, Any] | None = next(
        (h for h in (http, tcp, grpc) if isinstance(h, dict)), None
    )
    if handler is None:
        raise ProbeTableError(f"$WEFT_APP_PROBES: {path}: needs httpGet, tcpSocket or grpc")
    port = handler.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ProbeTableError(f"$WEFT_APP_PROBES: {path}: port {port!r} is not a port number")
    service = str(handler.get("service") or "")
    if handler is grpc:
        return AppProbe("grpc", port, float(timeout), service=service)
    if not isinstance(http, dict):
        return AppProbe("tcp", port, float(timeout))
    target = http.get("path") or "/"
    scheme = str(http.get("scheme") or "HTTP").upper()
    headers = tuple(
        (str(h.get("name")), str(h.get("value", "")))
        for h in http.get("httpHeaders") or ()
        if isinstance(h, dict) and h.get("name")
    )
    if not isinstance(target, str) or not target.startswith("/") or scheme not in ("HTTP", "HTTPS"):
        raise ProbeTableError(f"$WEFT_APP_PROBES: {path}: bad path or scheme")  # fmt: skip
    for name, value in headers:
        if any(c in name + value for c in "\r\n"):
            raise ProbeTableError(f"$WEFT_APP_PROBES: {path}: header {name!r} has a newline")
    return AppProbe("http", port, float(timeout), target, scheme == "HTTPS", headers)


def _insecure_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the kubelet does not verify probe certificates
    return ctx


class AppProber:
    """Runs the app's probes against ``target_ip`` (the pod's address)."""

    def __init__(self, probes: dict[str, AppProbe], target_ip: str) -> None:
        self.probes = probes
        self.target_ip = target_ip
        self.runs: dict[str, dict[str, int]] = {p: {"ok": 0, "failed": 0} for p in probes}

    @staticmethod
    def handles(path: str) -> bool:
        return path.startswith(PROBE_PREFIX)

    async def answer(self, path: str) -> tuple[int, bytes, str]:
        """(status, body, content type) for ``GET path`` on the admin port."""
        probe = self.probes.get(path.split("?", 1)[0])
        if probe is None:
            known = ", ".join(sorted(self.probes)) or "none"
            return 404, f"no app probe at {path[:100]} (known: {known})\n".encode(), TEXT
        try:
            async with asyncio.timeout(probe.timeout):
                run = {"http": self._http, "tcp": self._tcp, "grpc": self._grpc}[probe.kind]
                ok, why = await run(probe)
        except TimeoutError:
            ok, why = False, f"no answer within {probe.timeout:g}s"
        except (OSError, ssl.SSLError, ValueError, h2.exceptions.H2Error) as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        self.runs[path]["ok" if ok else "failed"] += 1
        what = f"{probe.kind} probe of port {probe.port}"
        if ok:
            return 200, f"{what}: {why}\n".encode(), TEXT
        return 503, f"{what} failed: {why}\n".encode(), TEXT

    async def _tcp(self, probe: AppProbe) -> tuple[bool, str]:
        _, writer = await asyncio.open_connection(self.target_ip, probe.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True, "connected"

    async def _http(self, probe: AppProbe) -> tuple[bool, str]:
        reader, writer = await asyncio.open_connection(
            self.target_ip,
            probe.port,
            ssl=_insecure_context() if probe.https else None,
            server_hostname="" if probe.https else None,
            limit=MAX_HEAD,
        )
        try:
            names = {n.lower() for n, _ in probe.headers}
            head = [f"GET {probe.path} HTTP/1.1"]
            if "host" not in names:
                head.append(f"Host: {self.target_ip}:{probe.port}")
            if "user-agent" not in names:
                head.append(f"User-Agent: {USER_AGENT}")
            head += [f"{n}: {v}" for n, v in probe.headers]
            head += ["Connection: close", "", ""]
            writer.write("\r\n".join(head).encode("latin-1"))
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return False, f"not an HTTP answer: {line[:60]!r}"
        status = int(parts[1])
        return 200 <= status < 400, f"HTTP {status}"

    async def _grpc(self, probe: AppProbe) -> tuple[bool, str]:
        """One unary ``Health/Check`` over h2c (prior knowledge), sans-I/O `h2` driven
        by this loop: send, then read until the stream ends or is reset."""
        reader, writer = await asyncio.open_connection(self.target_ip, probe.port)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        try:
            conn.initiate_connection()
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, [
                (":method", "POST"), (":scheme", "http"), (":path", HEALTH_CHECK),
                (":authority", f"{self.target_ip}:{probe.port}"),
                ("content-type", "application/grpc"), ("te", "trailers"),
                ("user-agent", USER_AGENT),
            ])  # fmt: skip
            conn.send_data(stream, grpc_frame(health_request(probe.service)), end_stream=True)
            writer.write(conn.data_to_send())
            await writer.drain()
            body, fields = bytearray(), {}
            ended = False
            while not ended:
                data = await reader.read(65536)
                if not data:
                    return False, "the app closed the connection before answering"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        fields.update({str(k): str(v) for k, v in event.headers})
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, stream)
                        if len(body) > MAX_HEAD:
                            return False, "health answer too large"
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                    elif isinstance(event, h2.events.StreamReset):
                        return False, f"stream reset (error {event.error_code})"
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return False, f"connection closed (GOAWAY {event.error_code})"
                writer.write(conn.data_to_send())
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if fields.get(":status") != "200":
            return False, f"HTTP {fields.get(':status')}"
        if fields.get("grpc-status", "") != "0":
            message = fields.get("grpc-message", "")
            return (
                False,
                f"grpc-status {fields.get('grpc-status')}{': ' + message if message else ''}",
            )
        status = health_status(bytes(body))
        name = GRPC_STATUS.get(status, str(status)) if status is not None else "no status"
        return status == SERVING, name


def health_request(service: str) -> bytes:
    """``grpc.health.v1.HealthCheckRequest{service}`` in protobuf (field 1, a string)."""
    raw = service.encode()
    return b"\x0a" + _varint(len(raw)) + raw if raw else b""


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def health_status(body: bytes) -> int | None:
    """The ``status`` (field 1, a varint) of the one ``HealthCheckResponse`` in ``body``
    (a gRPC length-prefixed message); None if there is none or it does not parse."""
    if len(body) < 5 or body[0] != 0:
        return None
    size = int.from_bytes(body[1:5], "big")
    message = body[5 : 5 + size]
    if len(message) != size:
        return None
    i, status = 0, 0  # proto3: an absent field is its default, UNKNOWN (0)
    try:
        while i < len(message):
            key, i = _read_varint(message, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _read_varint(message, i)
                if field == 1:
                    status = value
            elif wire == 2:
                length, i = _read_varint(message, i)
                i += length
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                return None
    except IndexError:
        return None
    return status if i == len(message) else None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")
