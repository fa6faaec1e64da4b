"""The app's kubelet probes, run by the sidecar from inside the pod.

Why: in sidecar mode the pod's nftables accept new inbound TCP only from loopback and to
the tunnel and admin ports (strict inbound), so the kubelet's own plaintext connection
to an app port — from the node's address, or a CNI gateway address — is dropped, and
every HTTP or TCP probe would fail.  ``weft inject`` therefore rewrites each such probe
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
``tcpSocket`` succeeds when a connection opens.  Both within the probe's
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

from weft.http import TEXT
from weft.inject import PROBE_PREFIX

USER_AGENT = "kube-probe/weft"
MAX_HEAD = 16 * 1024


class ProbeTableError(ValueError):
    """``$WEFT_APP_PROBES`` is not a table the sidecar can run."""


@dataclass(frozen=True)
class AppProbe:
    kind: str
    """``http`` or ``tcp``."""
    port: int
    timeout: float
    path: str = "/"
    https: bool = False
    headers: tuple[tuple[str, str], ...] = ()


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
    http, tcp = spec.get("httpGet"), spec.get("tcpSocket")
    handler = http if isinstance(http, dict) else tcp
    if not isinstance(handler, dict):
        raise ProbeTableError(f"$WEFT_APP_PROBES: {path}: needs httpGet or tcpSocket")
    port = handler.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ProbeTableError(f"$WEFT_APP_PROBES: {path}: port {port!r} is not a port number")
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
                ok, why = await (self._http(probe) if probe.kind == "http" else self._tcp(probe))
        except TimeoutError:
            ok, why = False, f"no answer within {probe.timeout:g}s"
        except (OSError, ssl.SSLError, ValueError) as e:
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
