"""The node-to-node mTLS tunnel: `TunnelServer` (port 15008) and `TunnelClient`.

A captured connection from pod A on node 1 to pod B on node 2 travels
``A -> node 1 outbound proxy -> tunnel -> node 2 tunnel server -> B``
(DESIGN.md "Data path"). One tunnel is one TLS 1.3 connection carrying one proxied TCP
connection::

    client (node 1)                                   server (node 2, :15008)
    TCP connect ------------------------------------>
    TLS 1.3, SNI = B's identity, A's certificate ---> picks B's certificate by SNI,
                                                      requires and verifies A's
    checks the server is B (else impersonation)
    CONNECT target=B-pod-ip:port ------------------->  authorizes A for the target, checks
                                                      the target is a local pod running as B,
                                                      connects to it
                         <------------------------- ANSWER OK | a refusal code, then close
    frames both ways (DATA, END) <================> relayed to and from the pod

The wire format is in :mod:`nodeagent.proxy.tunnel_header`, certificates and SNI in
:mod:`nodeagent.proxy.tls`; this module is the asyncio adapter around them.

Server design:

* Accepting is an ``add_reader`` + non-blocking ``accept()`` loop like the outbound
  listener's, and each connection is handed to ``connect_accepted_socket(ssl=...)``
  inside its own task. That call, unlike ``create_server(ssl=...)``, raises the
  handshake's failure to us, so every failure becomes a counter and a log line naming
  the client address and what went wrong (`TunnelServerStats` has one counter per
  failure; `HANDSHAKE_HINTS` says what the operator should do about each).
* Each stage has its own deadline: handshake, header, target connect; a refusal's
  answer gets ``close_timeout`` to be delivered before the connection is reset.
* The server never reads more than the header before it has decided: the first
  protocol (`_Stage`) pauses reading when the header is complete. After OK, the TLS
  transport is handed to the existing `Relay` (same flow control and idle handling as
  the outbound path) through `FramedTransport`, which turns the frames back into bytes
  and half-closes.
* Seams (STYLE.md §9): ``locate_target`` (discovery: which local pod, running as which
  identity, is at an address), ``authorize`` (policy), ``connect_target`` (the socket
  to the pod). ``locate_target`` is also what stops the tunnel from being an open
  relay: it must answer `NotLocal.UNKNOWN` for anything that is not a local pod's
  address (the node's own 127.0.0.1:15020 admin port, for instance).
* Besides authorization, the server checks that the target pod runs as the identity
  whose certificate it presented (``TARGET_IDENTITY_MISMATCH``). Without that, the
  client's check of the server's SPIFFE ID would prove nothing about the pod that
  receives its bytes.

Errors, each with its own status code, counter and log line: see `Status` for the
answers and `TunnelServerStats` for the counters. The client raises a `TunnelError`
subclass per kind of failure; all are ``ConnectionError`` so the outbound proxy treats
them as an expected upstream failure and resets the application's connection.

Half-close: carried. TLS transports cannot half-close in asyncio or uvloop, so after
the header both directions are framed and an END frame is a half-close (see
:mod:`nodeagent.proxy.tunnel_header`). `FramedTransport.can_write_eof` is true, so the
relays on both nodes pass an application's ``shutdown(SHUT_WR)`` through and the reply
still flows back. Closing the TLS connection ends both directions; a TCP reset on
either end becomes a reset on the other.

Connection reuse: not implemented; each proxied connection opens a fresh tunnel.
`bench_handshakes` measures what that costs. Reuse without multiplexing (a pool of
idle tunnels per source identity and destination node, each used by one connection at
a time) saves the handshake only for sequential connections and must discard a tunnel
after any error, since its state is unknown. Real reuse needs multiplexing, as HBONE
(HTTP/2 CONNECT) or linkerd's transport do: stream IDs in the frame header, a CONNECT
per stream, per-stream flow-control windows (otherwise one slow reader stalls every
stream on the connection: head-of-line blocking), per-stream reset, a cap on
concurrent streams, and a policy for draining a connection whose certificate rotated.
That is version 2 of the header, when numbers say it pays.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import ssl
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

from nodeagent.proxy import tls
from nodeagent.proxy.admission import Admission, Overloaded
from nodeagent.proxy.hold import ReadyHold
from nodeagent.proxy.listener import (
    Address,
    Listener,
    endpoint,
    format_address,
    reset_socket,
    set_nodelay,
)
from nodeagent.proxy.outbound import UpstreamConnector
from nodeagent.proxy.relay import ByteMeter, Relay, reset_transport
from nodeagent.proxy.tunnel_header import (
    MAX_HEADER_SIZE,
    Answer,
    ConnectRequest,
    FrameDecoder,
    HeaderDecoder,
    HeaderError,
    Invalid,
    Kind,
    NeedMore,
    Status,
    StreamData,
    StreamEnd,
    encode_answer,
    encode_connect,
    encode_data,
    encode_end,
)
from weft.identity import SpiffeId

log = logging.getLogger("weft.proxy.tunnel")

TUNNEL_PORT = 15008


# --- hooks ---------------------------------------------------------------------------


class NotLocal(enum.Enum):
    """Why `LocateTarget` found no local pod at an address."""

    UNKNOWN = "unknown"
    """No pod is known at that address anywhere (or it is not a pod address at all)."""
    ELSEWHERE = "elsewhere"
    """A pod is there, but it runs on another node."""


LocateTarget = Callable[[Address], SpiffeId | NotLocal]
"""The workload identity of the local pod at a target address, or why there is none.

Deliberately not a bool: the client needs to tell stale discovery (``ELSEWHERE``: retry
after an update) from an address that is no pod at all, and the server needs the pod's
identity to check it against the certificate it presented."""


@dataclass(frozen=True)
class Decision:
    """An authorization verdict; ``reason`` goes into the server's log line."""

    allowed: bool
    reason: str = ""

    @classmethod
    def allow(cls, reason: str = "") -> Decision:
        return cls(True, reason)

    @classmethod
    def deny(cls, reason: str) -> Decision:
        return cls(False, reason)


Authorize = Callable[[SpiffeId, Address], Decision]
"""Whether a client workload may reach a target; called for every tunnel, on the loop,
so it must be quick and must not block (the policy issue extends it)."""


def allow_trust_domain(trust_domain: str) -> Authorize:
    """The default policy: any workload of ``trust_domain`` may reach any local pod."""

    def authorize(client: SpiffeId, target: Address) -> Decision:
        if client.trust_domain == trust_domain and not client.is_node:
            return Decision.allow()
        return Decision.deny(f"{client} is not a workload of trust domain {trust_domain!r}")

    return authorize


class TargetConnector(Protocol):
    """Opens the connection to the local pod: attach a protocol made by
    ``protocol_factory`` and return the transport once ``connection_made`` has run."""

    def __call__(
        self, target: Address, protocol_factory: Callable[[], asyncio.Protocol], /
    ) -> Awaitable[asyncio.BaseTransport]: ...


async def connect_target_plaintext(
    target: Address, protocol_factory: Callable[[], asyncio.Protocol]
) -> asyncio.BaseTransport:
    transport, _ = await asyncio.get_running_loop().create_connection(protocol_factory, *target)
    return transport


def tunnel_listener(host: str, port: int = TUNNEL_PORT, backlog: int = 1024) -> socket.socket:
    """A listening socket for `TunnelServer.serve` on the node address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


# --- configuration and counters ------------------------------------------------------


def _check_positive(**values: float) -> None:
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        raise ValueError(
            "must be positive: " + ", ".join(f"{k}={v!r}" for k, v in sorted(bad.items()))
        )


@dataclass(frozen=True)
class TunnelServerConfig:
    """Tuning of the tunnel server; the defaults suit a node proxy."""

    handshake_timeout: float = 5.0
    """Seconds from accept to a completed TLS handshake; stalled clients are dropped."""

    header_timeout: float = 5.0
    """Seconds after the handshake for the complete CONNECT header."""

    target_connect_timeout: float = 5.0
    """Seconds to connect to the local pod before answering TARGET_UNREACHABLE."""

    close_timeout: float = 5.0
    """Seconds a refusal's answer, or TLS's closing handshake, may take before the
    connection is reset (asyncio's default for the latter is 30 s)."""

    idle_timeout: float = 3600.0
    """Seconds without a byte either way after which a relayed tunnel is closed."""

    high_water: int = 256 * 1024
    """Bytes buffered towards one side above which the other side is no longer read."""

    low_water: int = 64 * 1024
    """Bytes buffered towards one side below which reading the other side resumes."""

    max_header_size: int = MAX_HEADER_SIZE
    """Largest CONNECT header accepted; larger ones are refused HEADER_TOO_LARGE."""

    max_handshakes: int = 64
    """TLS handshakes served at once; more wait their turn (within ``handshake_timeout``,
    which counts from accept), so that many client nodes bursting at once cannot put
    thousands of handshakes on this loop together (each client node bounds its own)."""

    handshake_queue: int = 10_000
    """Connections that may wait for a handshake turn; beyond, they are reset at once."""

    def __post_init__(self) -> None:
        if self.max_handshakes < 1 or self.handshake_queue < 0:
            raise ValueError(
                f"need max_handshakes >= 1 and handshake_queue >= 0, got "
                f"{self.max_handshakes}, {self.handshake_queue}"
            )
        _check_positive(
            handshake_timeout=self.handshake_timeout,
            header_timeout=self.header_timeout,
            target_connect_timeout=self.target_connect_timeout,
            close_timeout=self.close_timeout,
            idle_timeout=self.idle_timeout,
        )
        if not 0 <= self.low_water <= self.high_water:
            raise ValueError(
                f"need 0 <= low_water <= high_water, got low_water={self.low_water}, "
                f"high_water={self.high_water}"
            )
        if not 64 <= self.max_header_size <= MAX_HEADER_SIZE:
            raise ValueError(
                f"max_header_size must be 64..{MAX_HEADER_SIZE} (an IPv6 CONNECT is 28 bytes), "
                f"got {self.max_header_size}"
            )


@dataclass(frozen=True)
class TunnelClientConfig:
    """Tuning of the tunnel client. The outbound proxy's own ``connect_timeout`` bounds
    the whole connect too; these make the error name the stage that stalled."""

    connect_timeout: float = 3.0
    """Seconds for the TCP connection to the destination node's tunnel port."""

    handshake_timeout: float = 3.0
    """Seconds for the TLS handshake."""

    answer_timeout: float = 3.0
    """Seconds from sending the header to the server's answer (it connects to the pod
    in between)."""

    close_timeout: float = 5.0
    """Seconds TLS's closing handshake may take before the connection is reset."""

    warm: int = 0
    """Handshaken, idle tunnels kept ready per (source identity, node, destination
    identity) that was used in the last ``warm_ttl`` seconds; 0 (the library default)
    turns the pool off; the node agent uses 1."""

    warm_ttl: float = 2.5
    """Seconds an idle warm tunnel is kept; below the server's header timeout (5 s)."""

    max_handshakes: int = 32
    """Fresh tunnels (TCP connect + TLS handshake) in progress at once; more wait their
    turn (see `nodeagent.proxy.admission`).  ``connect_timeout`` and
    ``handshake_timeout`` start only once a tunnel has its turn."""

    handshake_queue: int = 10_000
    """Fresh tunnels that may wait for a turn; beyond, they fail at once (overloaded)."""

    handshake_queue_timeout: float = 30.0
    """Seconds a fresh tunnel may wait for its turn before it fails (overloaded)."""

    def __post_init__(self) -> None:
        _check_positive(
            connect_timeout=self.connect_timeout,
            handshake_timeout=self.handshake_timeout,
            answer_timeout=self.answer_timeout,
            close_timeout=self.close_timeout,
            warm_ttl=self.warm_ttl,
            handshake_queue_timeout=self.handshake_queue_timeout,
        )
        if self.warm < 0:
            raise ValueError(f"warm must be >= 0, got {self.warm}")
        if self.max_handshakes < 1 or self.handshake_queue < 0:
            raise ValueError(
                f"need max_handshakes >= 1 and handshake_queue >= 0, got "
                f"{self.max_handshakes}, {self.handshake_queue}"
            )


class Failure(enum.Enum):
    """Why the server dropped or refused a tunnel; the value is the `TunnelServerStats`
    counter it increments."""

    HANDSHAKE_TIMEOUT = "handshake_timeout"
    HANDSHAKE_ABORTED = "handshake_aborted"
    OVERLOADED = "overloaded"
    NOT_TLS = "not_tls"
    TLS_VERSION = "tls_version"
    UNKNOWN_SNI = "unknown_sni"
    CLIENT_CERT_MISSING = "client_cert_missing"
    CLIENT_CERT_UNTRUSTED = "client_cert_untrusted"
    CLIENT_CERT_EXPIRED = "client_cert_expired"
    CLIENT_CERT_NOT_YET_VALID = "client_cert_not_yet_valid"
    CLIENT_CERT_INVALID = "client_cert_invalid"
    HANDSHAKE_FAILED = "handshake_failed"
    CLIENT_IDENTITY_REFUSED = "client_identity_refused"
    HEADER_TRUNCATED = "header_truncated"
    # One per refusal status: the value is the status name in lower case.
    BAD_HEADER = "bad_header"
    UNSUPPORTED_VERSION = "unsupported_version"
    HEADER_TOO_LARGE = "header_too_large"
    HEADER_TIMEOUT = "header_timeout"
    UNKNOWN_TARGET = "unknown_target"
    TARGET_NOT_ON_NODE = "target_not_on_node"
    POLICY_DENIED = "policy_denied"
    TARGET_UNREACHABLE = "target_unreachable"
    TARGET_IDENTITY_MISMATCH = "target_identity_mismatch"
    INTERNAL_ERROR = "internal_error"

    @classmethod
    def of(cls, status: Status) -> Failure:
        return cls(status.name.lower())


HANDSHAKE_HINTS: dict[Failure, str] = {
    Failure.HANDSHAKE_TIMEOUT: (
        "a stalled client, a scanner, a network dropping packets, or more handshakes "
        "waiting for a turn than this node serves in that time"
    ),
    Failure.OVERLOADED: (
        "too many handshakes were already waiting for a turn on this node "
        "(TunnelServerConfig.handshake_queue); the client fails over"
    ),
    Failure.HANDSHAKE_ABORTED: (
        "the client gave up; if it is a Weft node, it probably does not trust this node's "
        "certificate (see its log)"
    ),
    Failure.NOT_TLS: "something that is not a Weft node agent connected to the tunnel port",
    Failure.TLS_VERSION: "the client does not offer TLS 1.3, the only version Weft accepts",
    Failure.UNKNOWN_SNI: (
        "the client asked for a workload this node holds no certificate for (stale "
        "discovery on the client's node, or a certificate not issued yet)"
    ),
    Failure.CLIENT_CERT_MISSING: "the client presented no certificate; Weft requires one",
    Failure.CLIENT_CERT_UNTRUSTED: (
        "it does not chain to this node's trust bundle: another mesh's CA, or an anchor "
        "rotation this node has not picked up"
    ),
    Failure.CLIENT_CERT_EXPIRED: (
        "the client's node agent must renew it: can it reach the control plane, and is "
        "its clock right?"
    ),
    Failure.CLIENT_CERT_NOT_YET_VALID: "check the clocks of both nodes",
    Failure.CLIENT_CERT_INVALID: "the client's certificate is malformed or misused",
    Failure.HANDSHAKE_FAILED: "see the TLS error",
}

_UNTRUSTED_CODES = frozenset({2, 7, 18, 19, 20, 21})  # issuer unknown, bad signature, self-signed
_NOT_TLS_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "UNKNOWN_PROTOCOL",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LENGTH_MISMATCH",
        "UNEXPECTED_RECORD",
        "RECORD_LAYER_FAILURE",
    }
)
_TLS_VERSION_REASONS = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "VERSION_TOO_LOW",
        "TLSV1_ALERT_PROTOCOL_VERSION",
    }
)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _classify_handshake(exc: BaseException, notes: tls.HandshakeNotes) -> tuple[Failure, str]:
    """The failure kind of a server-side handshake exception, and what to log."""
    if isinstance(exc, Overloaded):  # the queue was full (a wait ends as a timeout)
        return Failure.OVERLOADED, str(exc)
    if isinstance(exc, TimeoutError):
        return Failure.HANDSHAKE_TIMEOUT, "it did not complete in time"
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        if exc.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
            return Failure.CLIENT_CERT_EXPIRED, f"client certificate: {message}"
        if exc.verify_code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
            return Failure.CLIENT_CERT_NOT_YET_VALID, f"client certificate: {message}"
        if exc.verify_code in _UNTRUSTED_CODES:
            return Failure.CLIENT_CERT_UNTRUSTED, f"client certificate: {message}"
        return Failure.CLIENT_CERT_INVALID, f"client certificate: {message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return Failure.CLIENT_CERT_MISSING, "no client certificate"
        if reason in _TLS_VERSION_REASONS:
            return Failure.TLS_VERSION, f"protocol version not accepted ({reason})"
        if reason == "CALLBACK_FAILED":
            why = notes.rejection or f"SNI {notes.sni!r} refused"
            return Failure.UNKNOWN_SNI, why
        if reason in _NOT_TLS_REASONS:
            return Failure.NOT_TLS, f"not a TLS client ({reason})"
        if reason == "UNEXPECTED_EOF_WHILE_READING" or isinstance(exc, ssl.SSLEOFError):
            return Failure.HANDSHAKE_ABORTED, "the client closed the connection mid-handshake"
        return Failure.HANDSHAKE_FAILED, _describe(exc)
    if isinstance(exc, (ConnectionError, EOFError)):
        return Failure.HANDSHAKE_ABORTED, f"the client went away mid-handshake ({_describe(exc)})"
    return Failure.HANDSHAKE_FAILED, _describe(exc)


@dataclass
class TunnelServerStats:
    """Counters of the tunnel server, for /debug/state and metrics. Every connection
    that does not become a relayed tunnel increments exactly one failure counter."""

    accepted: int = 0
    """TCP connections accepted."""
    active: int = 0
    """Connections in any stage right now, relaying included."""
    established: int = 0
    """Tunnels answered OK and relayed."""
    idle_closed: int = 0
    """Clients' spare (warm) tunnels closed unused before any header byte: not failures."""
    handshake_timeout: int = 0
    """No complete TLS handshake within ``handshake_timeout``."""
    handshake_aborted: int = 0
    """The client closed or reset the connection during the handshake."""
    overloaded: int = 0
    """Reset before the handshake: ``handshake_queue`` connections already waited."""
    not_tls: int = 0
    """The client's first bytes were not a TLS ClientHello."""
    tls_version: int = 0
    """The client did not offer TLS 1.3."""
    unknown_sni: int = 0
    """The SNI named no workload this node holds a certificate for (or none at all)."""
    client_cert_missing: int = 0
    """The client sent no certificate."""
    client_cert_untrusted: int = 0
    """The client's certificate does not chain to the trust bundle (another CA)."""
    client_cert_expired: int = 0
    """The client's certificate has expired."""
    client_cert_not_yet_valid: int = 0
    """The client's certificate is not valid yet."""
    client_cert_invalid: int = 0
    """The client's certificate failed verification for another reason."""
    handshake_failed: int = 0
    """Any other TLS handshake failure."""
    client_identity_refused: int = 0
    """The certificate verified but its SPIFFE ID may not use tunnels."""
    header_truncated: int = 0
    """The client closed the connection before its header was complete."""
    bad_header: int = 0
    """Answered BAD_HEADER."""
    unsupported_version: int = 0
    """Answered UNSUPPORTED_VERSION."""
    header_too_large: int = 0
    """Answered HEADER_TOO_LARGE."""
    header_timeout: int = 0
    """Answered HEADER_TIMEOUT."""
    unknown_target: int = 0
    """Answered UNKNOWN_TARGET."""
    target_not_on_node: int = 0
    """Answered TARGET_NOT_ON_NODE."""
    policy_denied: int = 0
    """Answered POLICY_DENIED."""
    target_unreachable: int = 0
    """Answered TARGET_UNREACHABLE."""
    target_identity_mismatch: int = 0
    """Answered TARGET_IDENTITY_MISMATCH."""
    internal_error: int = 0
    """Answered INTERNAL_ERROR (a hook raised; the log has the traceback)."""
    bytes_out: int = 0
    """Bytes relayed from tunnel clients to pods."""
    bytes_in: int = 0
    """Bytes relayed from pods to tunnel clients."""

    def count(self, failure: Failure) -> None:
        setattr(self, failure.value, getattr(self, failure.value) + 1)


@dataclass
class TunnelClientStats:
    """Counters of the tunnel client; every failed `TunnelClient.connect` increments
    the counter named by its exception's ``stat``."""

    attempts: int = 0
    opened: int = 0
    no_route: int = 0
    setup_failed: int = 0
    unreachable: int = 0
    timeouts: int = 0
    handshake_failed: int = 0
    impersonation: int = 0
    refused: int = 0
    protocol_errors: int = 0
    warm_opened: int = 0
    """Tunnels handshaken ahead of need."""
    warm_used: int = 0
    """Connections that took a warm tunnel (no handshake on their path)."""
    warm_expired: int = 0
    """Warm tunnels closed unused after ``warm_ttl``."""
    overloaded: int = 0
    """Connects refused by this node's own handshake admission (queue full or too long
    a wait): not a failure of the destination."""


# --- client errors -------------------------------------------------------------------


class TunnelError(ConnectionError):
    """A tunnel could not be opened. A ``ConnectionError``, so callers that handle
    connect failures (the outbound proxy resets the app) handle these too."""

    stat: ClassVar[str] = "setup_failed"

    @property
    def retryable(self) -> bool:
        """Whether nothing can have reached the target and another attempt (or another
        endpoint) may succeed."""
        return False


class TunnelSetupError(TunnelError):
    """This node cannot even try: no certificate for the source identity, or an
    identity or target that cannot be encoded."""


class TunnelOverloaded(TunnelError):
    """This node had too many handshakes waiting, or this one waited too long for its
    turn.  Says nothing about the destination: not retried elsewhere (another endpoint
    would wait in the same queue) and not counted against the endpoint."""

    stat = "overloaded"


class TunnelNoRoute(TunnelError):
    """The route lookup of `tunnel_connector` knows no tunnel for the destination."""

    stat = "no_route"


class TunnelUnreachable(TunnelError):
    """The destination node's tunnel port refused or could not be reached."""

    stat = "unreachable"

    @property
    def retryable(self) -> bool:
        return True


class TunnelTimeout(TunnelError):
    """A stage (``connect``, ``handshake`` or ``answer``) did not finish in time."""

    stat = "timeouts"

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage

    @property
    def retryable(self) -> bool:
        return self.stage != "answer"  # the server may have connected to the pod


class TunnelHandshakeError(TunnelError):
    """TLS failed, or the server closed the connection without answering (in TLS 1.3
    a server that rejects the client's certificate does so after the client has
    finished its handshake, so that is how such a rejection looks from here)."""

    stat = "handshake_failed"

    @property
    def retryable(self) -> bool:
        # Nothing reached the target, and the cause is usually that node (no certificate
        # for the identity there, an agent in trouble): another endpoint may well work.
        return True


class TunnelImpersonation(TunnelError):
    """The server proved a valid identity that is not the one discovery expected."""

    stat = "impersonation"

    def __init__(self, message: str, expected: SpiffeId, actual: SpiffeId) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual

    @property
    def retryable(self) -> bool:
        # That endpoint's node is wrong (or compromised): fail over, and let consecutive
        # failures eject it.  Nothing was sent to it.
        return True


class TunnelRefused(TunnelError):
    """The server answered with a refusal; ``code`` is the raw answer, ``status`` the
    `Status` (None for a code from a newer agent)."""

    stat = "refused"

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
        try:
            self.status: Status | None = Status(code)
        except ValueError:
            self.status = None

    @property
    def retryable(self) -> bool:
        return self.status is not None and self.status.retryable


class TunnelProtocolError(TunnelError):
    """The server's answer is not a valid header."""

    stat = "protocol_errors"


_REFUSAL_HINTS = {
    Status.BAD_HEADER: "the node could not parse our header (a bug, or mismatched releases)",
    Status.UNSUPPORTED_VERSION: "the node speaks an older header version; upgrade it",
    Status.HEADER_TOO_LARGE: "our header exceeds the node's limit",
    Status.HEADER_TIMEOUT: "our header reached the node too late",
    Status.UNKNOWN_TARGET: "the node knows no pod at that address",
    Status.TARGET_NOT_ON_NODE: "the pod runs on another node; discovery here is stale",
    Status.POLICY_DENIED: "an authorization policy denies this source",
    Status.TARGET_UNREACHABLE: "the pod refused the connection or did not accept it in time",
    Status.TARGET_IDENTITY_MISMATCH: "the pod runs as another identity; discovery is stale",
    Status.INTERNAL_ERROR: "the node failed; its log has the traceback",
}

# --- transports and protocols --------------------------------------------------------


@dataclass(frozen=True)
class _Closed:
    """The connection ended before a complete header arrived."""

    exc: Exception | None


_StageResult = ConnectRequest | Answer | Invalid | _Closed


class _Stage(asyncio.Protocol):
    """The protocol of a tunnel's TLS transport until its header is read.

    Feeds the sans-I/O decoder, resolves `result` with the first complete event and then
    stops reading, so nothing past the header is consumed before the caller decides.
    Whatever arrived meanwhile (bytes after the header, EOF, loss) is replayed into the
    protocol that `switch` hands the transport to.
    """

    def __init__(self, decoder: HeaderDecoder) -> None:
        loop = asyncio.get_running_loop()
        self.decoder = decoder
        self.transport: asyncio.Transport | None = None
        self.result: asyncio.Future[_StageResult] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._extra = bytearray()
        self._eof = False
        self._lost = False
        self._lost_exc: Exception | None = None
        self._write_paused = False
        self._switched: _Framed | None = None
        """Once `switch` ran: where late events go.  The TLS layer may have scheduled a
        call into this protocol (``call_soon(protocol.connection_lost)``) before the
        switch; without forwarding, the new protocol would never hear of the loss and
        its relay would wait for it forever."""

    @property
    def lost(self) -> bool:
        return self._lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass

    def data_received(self, data: bytes) -> None:
        if self._switched is not None:
            self._switched.data_received(data)
            return
        if self.result.done():
            if isinstance(self.result.result(), (ConnectRequest, Answer)):
                self._extra += data  # at most what was decrypted before the pause
            return
        event = self.decoder.feed(data)
        if isinstance(event, NeedMore):
            return
        if not isinstance(event, Invalid):
            self._extra += self.decoder.trailing
        self.result.set_result(event)
        assert self.transport is not None
        self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self._switched is not None:
            return self._switched.eof_received()
        self._eof = True
        if not self.result.done():
            self.result.set_result(_Closed(None))
        return None  # TLS closes the transport after EOF whatever we answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self._switched is not None and not self._lost:
            self._lost = True
            if not self.closed.done():
                self.closed.set_result(None)
            self._switched.connection_lost(exc)
            return
        self._lost = True
        self._lost_exc = exc
        if not self.result.done():
            self.result.set_result(_Closed(exc))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False

    def switch(self, inner: asyncio.Protocol) -> FramedTransport:
        """Hand the transport, framed, to ``inner`` and replay what arrived."""
        transport = self.transport
        assert transport is not None
        framed = self._switched = _Framed(inner)
        wrapper = FramedTransport(transport, framed)
        transport.set_protocol(framed)
        if not self._lost and not transport.is_closing():
            transport.resume_reading()  # before connection_made, so inner may pause it
        inner.connection_made(wrapper)
        if self._write_paused:
            inner.pause_writing()
        if self._extra:
            data, self._extra = bytes(self._extra), bytearray()
            framed.data_received(data)
        if self._eof:
            framed.eof_received()
        if self._lost:
            framed.connection_lost(self._lost_exc)
        return wrapper


class _Framed(asyncio.Protocol):
    """The TLS transport's protocol once the header is done: decodes frames for the
    inner protocol, turning END into ``eof_received``."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self.transport: FramedTransport | None = None
        self._decoder = FrameDecoder()
        self._eof_delivered = False
        self._lost_delivered = False

    def data_received(self, data: bytes) -> None:
        for event in self._decoder.feed(data):
            if self._lost_delivered:
                return  # reset by a frame error, or the inner protocol aborted
            if isinstance(event, StreamData):
                self.inner.data_received(event.data)
            elif isinstance(event, StreamEnd):
                self._deliver_eof()
            else:
                self._broken(event.detail)

    def _deliver_eof(self) -> None:
        if self._eof_delivered:
            return
        self._eof_delivered = True
        keep_open = self.inner.eof_received()
        if not keep_open and self.transport is not None:
            self.transport.close()  # what a plain transport does when EOF isn't kept open

    def _broken(self, detail: str) -> None:
        log.warning("tunnel: the peer broke the frame protocol (%s); resetting", detail)
        self._lost_delivered = True
        if self.transport is not None:
            reset_transport(self.transport)
        self.inner.connection_lost(ConnectionResetError(f"tunnel frame error: {detail}"))

    def eof_received(self) -> bool | None:
        # The peer closed TLS: nothing more comes in either direction. Without an END
        # before it (the peer closed both directions at once), this is the stream's end.
        if not self._lost_delivered:
            self._deliver_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost_delivered:
            self._lost_delivered = True
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class FramedTransport(asyncio.Transport):
    """A tunnel's byte stream as a transport: writes become DATA frames, ``write_eof``
    an END frame; everything else is the TLS transport's (flow control, extras such as
    ``ssl_object`` and ``socket``, close and abort)."""

    def __init__(self, tls_transport: asyncio.Transport, protocol: _Framed) -> None:
        super().__init__()
        self._tls = tls_transport
        self._framed = protocol
        protocol.transport = self
        self._eof_written = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._tls.is_closing()

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._framed.inner = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._framed.inner

    def is_reading(self) -> bool:
        return self._tls.is_reading()

    def pause_reading(self) -> None:
        self._tls.pause_reading()

    def resume_reading(self) -> None:
        self._tls.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._tls.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls.get_write_buffer_limits()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_written:
            raise RuntimeError("cannot write to a tunnel after write_eof()")
        if data:
            self._tls.write(encode_data(data))

    def write_eof(self) -> None:
        if not self._eof_written and not self._tls.is_closing():
            self._eof_written = True
            self._tls.write(encode_end())

    def can_write_eof(self) -> bool:
        return True


# --- server --------------------------------------------------------------------------


@dataclass
class _Conn:
    """What a connection's task owns, for cleanup when it is cancelled."""

    transport: asyncio.Transport | None = None
    relay: Relay | None = None
    relaying: bool = False
    stage: str = "handshaking"


class ConnectionMeter(ByteMeter, Protocol):
    """A per-connection byte meter that is told when its connection has closed."""

    def close(self) -> None: ...


MeterFactory = Callable[[SpiffeId, "SpiffeId | None", Address], ConnectionMeter]
"""(client identity, identity the server presented, target) -> a meter for one relayed
tunnel (the agent's golden metrics)."""


class TunnelServer(Listener):
    """Accepts tunnels, checks them, and relays them to local pods.

    ``contexts`` supplies the TLS material (and the trust domain); ``locate_target``,
    ``authorize`` and ``connect_target`` are the seams described in the module
    docstring.
    """

    def __init__(
        self,
        *,
        contexts: tls.TlsContexts,
        locate_target: LocateTarget,
        authorize: Authorize | None = None,
        connect_target: TargetConnector = connect_target_plaintext,
        config: TunnelServerConfig | None = None,
        meter: MeterFactory | None = None,
        hold: ReadyHold | None = None,
    ) -> None:
        super().__init__("tunnel", hold)
        self._meter = meter
        self.config = config or TunnelServerConfig()
        self.stats = TunnelServerStats()
        self.trust_domain = contexts.trust_domain
        self._tls = contexts
        self._locate = locate_target
        self._authorize = authorize or allow_trust_domain(contexts.trust_domain)
        self._connect_target = connect_target
        self.admission = Admission(
            self.config.max_handshakes,
            max_queued=self.config.handshake_queue,
            # Longer than the handshake timeout around it, so a wait that is too long
            # ends as that timeout (HANDSHAKE_TIMEOUT), not as "overloaded".
            queue_timeout=self.config.handshake_timeout + 1.0,
        )

    def _before_accepting(self) -> str:
        self._tls.server_context()  # built now, so a broken setup fails at start
        return f" (trust domain {self.trust_domain})"

    def _admit(self, conn: socket.socket, peer: Any) -> None:
        self.stats.accepted += 1
        conn.setblocking(False)
        set_nodelay(conn)
        where = format_address(endpoint(peer))
        self._spawn(self._run(conn, where), f"weft.proxy.tunnel from {where}")

    # --- one connection ---------------------------------------------------------------

    async def _run(self, conn: socket.socket, where: str) -> None:
        state = _Conn()
        self.stats.active += 1
        try:
            await self._tunnel(conn, where, state)
        except asyncio.CancelledError:
            log.info(
                "tunnel from %s: still %s at the shutdown deadline; resetting",
                where,
                state.stage,
            )
            if state.relay is not None:
                state.relay.abort("proxy shut down")
            if state.transport is not None and not state.relaying:
                reset_transport(state.transport)
            if state.relay is not None:
                await state.relay.wait_closed()
            raise
        finally:
            self.stats.active -= 1

    def _fail(
        self, failure: Failure, message: str, *, level: int = logging.WARNING, exc: Any = None
    ) -> None:
        self.stats.count(failure)
        log.log(level, "%s [%s]", message, failure.value, exc_info=exc)

    async def _tunnel(self, conn: socket.socket, where: str, state: _Conn) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        notes = tls.begin_handshake_notes()  # read by the SNI callback of this handshake
        stage = _Stage(HeaderDecoder(Kind.CONNECT, max_size=config.max_header_size))
        handed = False  # once connect_accepted_socket has it, the loop closes ``conn``
        try:
            # The wait for a turn counts towards the handshake timeout: a connection may
            # hold this node for that long in all, whatever it waits for.
            async with asyncio.timeout(config.handshake_timeout), self.admission.slot():
                handed = True
                transport, _ = await loop.connect_accepted_socket(
                    lambda: stage,
                    conn,
                    ssl=self._tls.server_context(),
                    ssl_shutdown_timeout=config.close_timeout,
                )
        except Exception as exc:
            if not handed:
                reset_socket(conn)
            failure, detail = _classify_handshake(exc, notes)
            if failure is Failure.HANDSHAKE_TIMEOUT:
                detail = f"no complete TLS handshake within {config.handshake_timeout:g}s"
            quiet = failure in (Failure.HANDSHAKE_TIMEOUT, Failure.HANDSHAKE_ABORTED)
            self._fail(
                failure,
                f"tunnel from {where}: TLS handshake refused: {detail}; {HANDSHAKE_HINTS[failure]}",
                level=logging.INFO if quiet else logging.WARNING,
            )
            return
        # uvloop's transports are not asyncio.Transport subclasses but implement it.
        state.transport = tls_transport = transport
        ssl_object = tls_transport.get_extra_info("ssl_object")
        try:
            client = tls.check_client_identity(ssl_object, self.trust_domain)
        except tls.PeerIdentityError as exc:
            self._fail(Failure.CLIENT_IDENTITY_REFUSED, f"tunnel from {where}: refused: {exc}")
            reset_transport(tls_transport)
            return
        presented = tls.presented_identity(ssl_object)
        label = f"tunnel from {where} ({client})"

        state.stage = "reading the header"
        try:
            async with asyncio.timeout(config.header_timeout):
                event = await stage.result
        except TimeoutError:
            detail = (
                f"no complete header within {config.header_timeout:g}s "
                f"({stage.decoder.received} bytes received)"
            )
            await self._refuse(stage, Status.HEADER_TIMEOUT, label, detail)
            return
        if isinstance(event, _Closed) and stage.decoder.received == 0 and event.exc is None:
            # A client's spare (warm) tunnel closed unused: normal, not a failure.
            self.stats.idle_closed += 1
            log.debug("%s: closed before sending a header (an unused warm tunnel)", label)
            tls_transport.close()
            return
        if isinstance(event, _Closed):
            how = f" ({_describe(event.exc)})" if event.exc else ""
            self._fail(
                Failure.HEADER_TRUNCATED,
                f"{label}: the client closed the connection after {stage.decoder.received} "
                f"bytes of header{how}",
                level=logging.INFO,
            )
            tls_transport.close()
            return
        if isinstance(event, Invalid):
            await self._refuse(stage, event.status, label, event.detail)
            return
        assert isinstance(event, ConnectRequest)  # the CONNECT decoder yields no Answer
        target = event.target
        label = f"{label} to {format_address(target)}"

        status, detail, error = self._decide(client, presented, target)
        if status is not Status.OK:
            await self._refuse(stage, status, label, detail, exc=error)
            return

        state.stage = "connecting to the target"
        relay = state.relay = Relay(
            label=label,
            high_water=config.high_water,
            low_water=config.low_water,
            idle_timeout=config.idle_timeout,
            meter=self.stats,
        )
        try:
            async with asyncio.timeout(config.target_connect_timeout):
                await self._connect_target(target, lambda: relay.upstream)
            if relay.upstream.transport is None:
                raise RuntimeError("the target connector returned without attaching the relay")
        except Exception as exc:
            relay.abort("target connect failed")
            await relay.wait_closed()
            expected = isinstance(exc, OSError)
            why = (
                f"connecting timed out after {config.target_connect_timeout:g}s"
                if isinstance(exc, TimeoutError)
                else f"connecting failed ({_describe(exc)})"
            )
            await self._refuse(
                stage,
                Status.TARGET_UNREACHABLE if expected else Status.INTERNAL_ERROR,
                label,
                why,
                exc=None if expected else exc,
            )
            return

        tls_transport.write(encode_answer(Status.OK))
        state.relaying = True
        state.stage = "relaying"
        stage.switch(relay.client)
        self.stats.established += 1
        log.debug("%s: relaying", label)
        conn_meter = self._meter(client, presented, target) if self._meter else None
        if conn_meter is not None:
            relay.add_meter(conn_meter)
        try:
            await relay.wait_closed()
        finally:
            if conn_meter is not None:
                conn_meter.close()
        log.debug(
            "%s: closed (%s); %d bytes out, %d bytes in",
            label,
            relay.close_reason,
            relay.bytes_out,
            relay.bytes_in,
        )

    def _decide(
        self, client: SpiffeId, presented: SpiffeId | None, target: Address
    ) -> tuple[Status, str, BaseException | None]:
        try:
            located = self._locate(target)
        except Exception as exc:
            return Status.INTERNAL_ERROR, "the target lookup raised", exc
        if located is NotLocal.UNKNOWN:
            return Status.UNKNOWN_TARGET, "no pod is known at this address", None
        if located is NotLocal.ELSEWHERE:
            return (
                Status.TARGET_NOT_ON_NODE,
                "the pod at this address runs on another node (stale discovery at the client)",
                None,
            )
        assert isinstance(located, SpiffeId)
        if presented is None:
            return (
                Status.INTERNAL_ERROR,
                "cannot tell which identity this connection presented; refusing",
                None,
            )
        if located != presented:
            return (
                Status.TARGET_IDENTITY_MISMATCH,
                f"the pod runs as {located}, but the client asked for {presented} "
                "(stale discovery at the client)",
                None,
            )
        try:
            decision = self._authorize(client, target)
        except Exception as exc:
            return Status.INTERNAL_ERROR, "the authorization hook raised", exc
        if not decision.allowed:
            return Status.POLICY_DENIED, decision.reason or "denied by policy", None
        return Status.OK, "", None

    async def _refuse(
        self,
        stage: _Stage,
        status: Status,
        label: str,
        detail: str,
        *,
        exc: BaseException | None = None,
    ) -> None:
        """Log and count the refusal, send the answer, close, and wait (bounded) for it
        to be delivered."""
        level = logging.ERROR if status is Status.INTERNAL_ERROR else logging.WARNING
        self._fail(
            Failure.of(status), f"{label}: refused {status.name}: {detail}", level=level, exc=exc
        )
        transport = stage.transport
        assert transport is not None
        if stage.lost:
            return
        transport.write(encode_answer(status))
        transport.close()
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await stage.closed
        except TimeoutError:
            reset_transport(transport)


# --- client --------------------------------------------------------------------------


@dataclass(frozen=True)
class TunnelRoute:
    """How to reach a destination through a tunnel (from discovery)."""

    source: SpiffeId
    """The identity of the pod that opened the connection: the certificate presented."""
    node: Address
    """The destination node's tunnel address (its node IP, port 15008)."""
    expected: SpiffeId
    """The identity the destination endpoint must prove."""


RouteLookup = Callable[[Address, Address], TunnelRoute | None]
"""(app client address, original destination) -> the tunnel to use, None if none."""


@dataclass
class _Warm:
    transport: asyncio.Transport
    stage: _Stage
    expiry: asyncio.TimerHandle | None = None


_PoolKey = tuple[SpiffeId, Address, SpiffeId]


class TunnelClient:
    """Opens tunnels to other nodes' tunnel servers.

    `connect` is usable as the outbound proxy's `UpstreamConnector` through
    `tunnel_connector`, which adds the lookup of source and destination identities.

    **Warm tunnels.**  A tunnel carries one connection, and its TLS handshake (two P-256
    signatures and verifications, ~3 ms in Python) is most of the cost of a new
    connection.  After each use of a (source identity, node, destination identity), the
    client handshakes ``warm`` spare tunnels for it in the background; the next
    connection takes one and only sends its header.  Spares that stay unused for
    ``warm_ttl`` seconds are closed (before the server's header timeout), so idle pairs
    hold nothing.  A spare is verified exactly like a fresh tunnel (chain, SPIFFE ID of
    the server) and presents the certificate current when it was made, at most
    ``warm_ttl`` old.
    """

    def __init__(
        self, contexts: tls.TlsContexts, *, config: TunnelClientConfig | None = None
    ) -> None:
        self.config = config or TunnelClientConfig()
        self.stats = TunnelClientStats()
        self.admission = Admission(
            self.config.max_handshakes,
            max_queued=self.config.handshake_queue,
            queue_timeout=self.config.handshake_queue_timeout,
        )
        self._tls = contexts
        self._warm: dict[_PoolKey, list[_Warm]] = {}
        self._refills: dict[_PoolKey, asyncio.Task[None]] = {}
        self._closed = False

    @property
    def warm_tunnels(self) -> int:
        return sum(len(v) for v in self._warm.values())

    async def connect(
        self,
        source: SpiffeId,
        dest_node: Address,
        target: Address,
        expected: SpiffeId,
        protocol_factory: Callable[[], asyncio.Protocol],
    ) -> asyncio.BaseTransport:
        """Open a tunnel to ``target`` via the tunnel server at ``dest_node``,
        presenting ``source``'s certificate and requiring the server to be
        ``expected``. Returns a `FramedTransport` whose protocol, made by
        ``protocol_factory``, has seen ``connection_made``. Raises a `TunnelError`
        subclass naming the failure; cancelling it closes whatever it opened."""
        self.stats.attempts += 1
        what = (
            f"tunnel from {source} to {format_address(target)} ({expected}) via "
            f"{format_address(dest_node)}"
        )
        key = (source, dest_node, expected)
        try:
            try:
                header = encode_connect(target)
            except HeaderError as exc:
                raise TunnelSetupError(f"{what}: {exc}") from None
            warm = self._take(key)
            self._refill(key)
            transport: asyncio.BaseTransport | None = None
            if warm is not None:
                try:
                    transport = await self._request(
                        warm.transport, warm.stage, header, what, source, protocol_factory
                    )
                    self.stats.warm_used += 1
                except (TunnelHandshakeError, TunnelRefused) as exc:
                    if isinstance(exc, TunnelRefused) and exc.status is not Status.HEADER_TIMEOUT:
                        raise  # a real answer about the target: a fresh tunnel gets the same
                    # The spare died idle (the server restarted, or timed it out while this
                    # loop was busy): open a fresh one.
                    transport = None
            if transport is None:
                # The whole set-up of a fresh tunnel holds a turn: the answer comes after
                # the server reached the pod, and under a burst it must not wait behind
                # thousands of handshakes on this loop either.
                async with self._turn(what):
                    tls_transport, stage = await self._open(source, dest_node, expected, what)
                    transport = await self._request(
                        tls_transport, stage, header, what, source, protocol_factory
                    )
        except TunnelError as exc:
            setattr(self.stats, exc.stat, getattr(self.stats, exc.stat) + 1)
            raise
        self.stats.opened += 1
        return transport

    # -- the warm pool ---------------------------------------------------------------

    def _take(self, key: _PoolKey) -> _Warm | None:
        spares = self._warm.get(key)
        found = None
        while spares and found is None:
            w = spares.pop()
            if w.expiry is not None:
                w.expiry.cancel()
            # A spare the server already answered (its header timeout) or closed is dead.
            if not w.stage.lost and not w.transport.is_closing() and not w.stage.result.done():
                found = w
            else:
                w.transport.close()
        if spares is not None and not spares:
            del self._warm[key]
        return found

    def _refill(self, key: _PoolKey) -> None:
        if self.config.warm == 0 or self._closed or key in self._refills:
            return
        if len(self._warm.get(key, ())) >= self.config.warm:
            return
        task = asyncio.create_task(self._fill(key), name="tunnel-warm")
        self._refills[key] = task
        task.add_done_callback(lambda t: self._refills.pop(key, None))

    async def _fill(self, key: _PoolKey) -> None:
        source, dest_node, expected = key
        what = f"warm tunnel from {source} ({expected}) via {format_address(dest_node)}"
        loop = asyncio.get_running_loop()
        while len(self._warm.get(key, ())) < self.config.warm and not self._closed:
            try:
                async with self._turn(what):
                    tls_transport, stage = await self._open(source, dest_node, expected, what)
            except TunnelError as exc:
                log.debug("%s: not opened (%s)", what, exc)
                if not self._warm.get(key):
                    self._warm.pop(key, None)
                return
            except asyncio.CancelledError:
                raise
            w = _Warm(tls_transport, stage)
            w.expiry = loop.call_later(self.config.warm_ttl, self._expire, key, w)
            self._warm.setdefault(key, []).append(w)
            self.stats.warm_opened += 1

    def _expire(self, key: _PoolKey, w: _Warm) -> None:
        spares = self._warm.get(key)
        if spares is not None and w in spares:
            spares.remove(w)
            if not spares:
                del self._warm[key]
            self.stats.warm_expired += 1
            w.transport.close()

    async def close(self) -> None:
        """Close spare tunnels and stop refilling (shutdown)."""
        self._closed = True
        for task in list(self._refills.values()):
            task.cancel()
        await asyncio.gather(*self._refills.values(), return_exceptions=True)
        for spares in self._warm.values():
            for w in spares:
                if w.expiry is not None:
                    w.expiry.cancel()
                w.transport.close()
        self._warm.clear()

    # -- one tunnel ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _turn(self, what: str) -> AsyncIterator[None]:
        """A handshake slot (`Admission`) for the body; `TunnelOverloaded` instead."""
        try:
            await self.admission.acquire()
        except Overloaded as exc:
            raise TunnelOverloaded(f"{what}: {exc}") from None
        try:
            yield
        finally:
            self.admission.release()

    async def _open(
        self, source: SpiffeId, dest_node: Address, expected: SpiffeId, what: str
    ) -> tuple[asyncio.Transport, _Stage]:
        """TCP + TLS 1.3 to the node's tunnel port, server identity checked.  Callers
        hold a `_turn`, so the stage timeouts measure the remote end, not handshakes
        queued on this node's own event loop."""
        try:
            context = self._tls.client_context(source)
            server_name = tls.sni_for(expected)
        except (tls.TlsMaterialError, tls.SniError) as exc:
            raise TunnelSetupError(f"{what}: {exc}") from None
        if context is None:
            raise TunnelSetupError(
                f"{what}: this node has no certificate for {source} (not issued yet, or no "
                "pod of that identity here)"
            )
        transport, stage = await self._handshake(context, server_name, dest_node, expected, what)
        try:
            tls.check_server_identity(transport.get_extra_info("ssl_object"), expected)
        except tls.ImpersonationError as exc:
            reset_transport(transport)
            raise TunnelImpersonation(f"{what}: {exc}", exc.expected, exc.actual) from None
        except tls.PeerIdentityError as exc:
            reset_transport(transport)
            raise TunnelHandshakeError(f"{what}: {exc}") from None
        except BaseException:
            reset_transport(transport)
            raise
        return transport, stage

    async def _handshake(
        self,
        context: ssl.SSLContext,
        server_name: str,
        dest_node: Address,
        expected: SpiffeId,
        what: str,
    ) -> tuple[asyncio.Transport, _Stage]:
        loop = asyncio.get_running_loop()
        config = self.config
        family = socket.AF_INET6 if ":" in dest_node[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            set_nodelay(sock)
            async with asyncio.timeout(config.connect_timeout):
                await loop.sock_connect(sock, dest_node)
        except TimeoutError:
            sock.close()
            raise TunnelTimeout(
                f"{what}: no TCP connection to the node's tunnel port within "
                f"{config.connect_timeout:g}s (node down, or packets dropped?)",
                "connect",
            ) from None
        except OSError as exc:
            sock.close()
            raise TunnelUnreachable(
                f"{what}: cannot connect to the node's tunnel port ({_describe(exc)}); is its "
                "node agent running?"
            ) from None
        except BaseException:
            sock.close()
            raise

        # From here the event loop owns ``sock``: when the handshake fails or is cancelled,
        # create_connection closes its transport.  Closing ``sock`` ourselves would close
        # a descriptor number that, under load, may already belong to another connection
        # — and, mid-handshake, makes the TLS layer write to a closed transport ("Fatal
        # error on SSL protocol").  See `_disown` for the one thing left to do.
        stage = _Stage(HeaderDecoder(Kind.ANSWER))
        try:
            async with asyncio.timeout(config.handshake_timeout):
                transport, _ = await loop.create_connection(
                    lambda: stage,
                    sock=sock,
                    ssl=context,
                    server_hostname=server_name,
                    ssl_shutdown_timeout=config.close_timeout,
                )
        except BaseException as exc:
            _disown(loop, sock)
            if isinstance(exc, TimeoutError):
                raise TunnelTimeout(
                    f"{what}: TLS handshake did not complete within {config.handshake_timeout:g}s",
                    "handshake",
                ) from None
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise TunnelHandshakeError(
                    f"{what}: the node's certificate did not verify ({exc.verify_message}); "
                    "is it from another mesh, expired, or is this node's trust bundle out "
                    "of date?"
                ) from None
            if isinstance(exc, (ssl.SSLError, OSError)):
                raise TunnelHandshakeError(
                    f"{what}: TLS handshake failed ({_describe(exc)}); the node refused it "
                    f"(no certificate for {expected} there, or TLS settings) and its log "
                    "says why"
                ) from None
            raise
        return transport, stage

    async def _request(
        self,
        tls_transport: asyncio.Transport,
        stage: _Stage,
        header: bytes,
        what: str,
        source: SpiffeId,
        protocol_factory: Callable[[], asyncio.Protocol],
    ) -> asyncio.BaseTransport:
        """Send the CONNECT header on an open tunnel and wait for the server's answer."""
        config = self.config
        refused = False
        try:
            tls_transport.write(header)
            try:
                async with asyncio.timeout(config.answer_timeout):
                    event = await stage.result
            except TimeoutError:
                raise TunnelTimeout(
                    f"{what}: no answer within {config.answer_timeout:g}s after the header",
                    "answer",
                ) from None
            if isinstance(event, _Closed):
                how = f" ({_describe(event.exc)})" if event.exc else ""
                raise TunnelHandshakeError(
                    f"{what}: the node closed the connection without answering{how}; it "
                    f"rejected our certificate for {source} (untrusted, expired, not yet "
                    "valid) or our identity — its log names the reason"
                )
            if isinstance(event, Invalid):
                raise TunnelProtocolError(f"{what}: malformed answer: {event.detail}")
            assert isinstance(event, Answer)
            if not event.ok:
                refused = True
                status = event.status
                name = status.name if status is not None else f"code {event.code:#04x}"
                hint = (
                    _REFUSAL_HINTS.get(status, "")
                    if status is not None
                    else "a code from a newer node agent"
                )
                raise TunnelRefused(f"{what}: refused {name}: {hint}", event.code)
        except BaseException:
            if refused:
                tls_transport.close()  # orderly: the server is waiting for our close
            else:
                reset_transport(tls_transport)
            raise
        try:
            return stage.switch(protocol_factory())
        except BaseException:
            reset_transport(tls_transport)
            raise


def _disown(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """After a failed ``create_connection(sock=sock)``: the loop owns the descriptor.
    asyncio's own loops keep and close this very socket object.  uvloop takes the
    descriptor by number and, when the TLS handshake fails, closes it without detaching
    our object (seen with uvloop 0.23: ``sock.fileno()`` still names the closed number),
    which would close that number again when collected — by then, possibly another
    connection's.  So for any other loop, let go of the number."""
    if not isinstance(loop, asyncio.BaseEventLoop) and sock.fileno() != -1:
        sock.detach()


def tunnel_connector(client: TunnelClient, route: RouteLookup) -> UpstreamConnector:
    """The outbound proxy's `UpstreamConnector` over ``client``: ``route`` says, for each
    (app client, original destination), which identities and node to use."""

    async def connect(
        app: Address, destination: Address, protocol_factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.BaseTransport:
        found = route(app, destination)
        if found is None:
            client.stats.attempts += 1
            client.stats.no_route += 1
            raise TunnelNoRoute(
                f"no tunnel route from {format_address(app)} to {format_address(destination)} "
                "(no workload known at that address, or the client pod has no identity yet)"
            )
        return await client.connect(
            found.source, found.node, destination, found.expected, protocol_factory
        )

    return connect


# --- benchmark -----------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeBench:
    """Result of `bench_handshakes`. Client and server run on one event loop (one
    core), so the rates include the CPU work of *both* ends of every tunnel."""

    tunnels: int
    concurrency: int
    seconds: float
    """Wall time to open, use (one byte echoed) and close all tunnels."""
    plain_seconds: float
    """The same with plain TCP straight to the target, for comparison."""
    open_ms: tuple[float, ...]
    """Time each `TunnelClient.connect` took (TCP + TLS + header + answer), ms."""

    @property
    def ms_per_tunnel(self) -> float:
        return 1000 * self.seconds / self.tunnels

    @property
    def tunnels_per_second(self) -> float:
        return self.tunnels / self.seconds

    @property
    def plain_ms_per_connection(self) -> float:
        return 1000 * self.plain_seconds / self.tunnels

    @property
    def open_ms_p50(self) -> float:
        return statistics.median(self.open_ms)

    @property
    def open_ms_p99(self) -> float:
        ordered = sorted(self.open_ms)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def summary(self) -> str:
        return (
            f"{self.tunnels} tunnels, concurrency {self.concurrency}: "
            f"{self.ms_per_tunnel:.2f} ms each ({self.tunnels_per_second:.0f}/s, both ends on "
            f"one core); open p50 {self.open_ms_p50:.2f} ms, p99 {self.open_ms_p99:.2f} ms; "
            f"plain TCP {self.plain_ms_per_connection:.3f} ms each"
        )


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _Ping(asyncio.Protocol):
    """Sends one byte, waits for it to come back, closes."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(b"x")

    def data_received(self, data: bytes) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def bench_handshakes(
    n: int,
    *,
    contexts: tls.TlsContexts,
    source: SpiffeId,
    destination: SpiffeId,
    concurrency: int = 1,
) -> HandshakeBench:
    """Open ``n`` fresh tunnels (``concurrency`` at a time) through a server on
    127.0.0.1, each to an echo target, send one byte and close; and the same over
    plain TCP. ``contexts`` must hold material for ``source`` and ``destination``.
    The number to compare with a pool is ``ms_per_tunnel`` minus the plain cost."""
    if n < 1 or concurrency < 1:
        raise ValueError(f"need n >= 1 and concurrency >= 1, got {n} and {concurrency}")
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(_Echo, "127.0.0.1", 0)
    target: Address = echo.sockets[0].getsockname()[:2]
    server = TunnelServer(
        contexts=contexts,
        locate_target=lambda address: destination if address == target else NotLocal.UNKNOWN,
    )
    listener = tunnel_listener("127.0.0.1", 0)
    node: Address = listener.getsockname()[:2]
    serving = loop.create_task(server.serve(listener), name="weft.bench tunnel server")
    client = TunnelClient(contexts)
    open_ms: list[float] = []

    async def one_tunnel() -> None:
        ping = _Ping()
        start = time.perf_counter()
        await client.connect(source, node, target, destination, lambda: ping)
        open_ms.append(1000 * (time.perf_counter() - start))
        await ping.done

    async def one_plain() -> None:
        ping = _Ping()
        await loop.create_connection(lambda: ping, *target)
        await ping.done

    async def run(one: Callable[[], Awaitable[None]]) -> float:
        remaining = n

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await one()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
        return time.perf_counter() - start

    try:
        await one_tunnel()  # warm the context cache, as a running node would be
        open_ms.clear()
        seconds = await run(one_tunnel)
        plain = await run(one_plain)
    finally:
        await server.close(grace=1.0)
        await serving
        echo.close()
        await echo.wait_closed()
    return HandshakeBench(n, concurrency, seconds, plain, tuple(open_ms))
