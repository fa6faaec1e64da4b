"""What goes wrong in a tunnel, named: the server's `Failure` kinds (one counter and
one log line each, with `HANDSHAKE_HINTS` for the operator), and the client's
`TunnelError` family (one per kind of failure, each saying whether another attempt
may succeed)."""

from __future__ import annotations

import copy
import enum
import ssl
from typing import ClassVar

from nodeagent.proxy import tls
from nodeagent.proxy.admission import Overloaded
from nodeagent.proxy.tunnel.wire import Status
from weft.identity import SpiffeId


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
    PREFACE_TRUNCATED = "preface_truncated"
    PROTOCOL_VIOLATION = "protocol_violation"
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


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def classify_handshake(exc: BaseException, notes: tls.HandshakeNotes) -> tuple[Failure, str]:
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
        return Failure.HANDSHAKE_FAILED, describe(exc)
    if isinstance(exc, (ConnectionError, EOFError)):
        return Failure.HANDSHAKE_ABORTED, f"the client went away mid-handshake ({describe(exc)})"
    return Failure.HANDSHAKE_FAILED, describe(exc)


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

    def again(self) -> TunnelError:
        """A copy to raise in another task (several connects waiting for one dial)."""
        return copy.copy(self)


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
    """A stage (``connect``, ``handshake``, ``preface`` or ``answer``) did not finish in
    time."""

    stat = "timeouts"

    def __init__(self, message: str, stage: str = "connect") -> None:
        super().__init__(message)
        self.stage = stage

    @property
    def retryable(self) -> bool:
        return self.stage != "answer"  # the server may have connected to the pod


class TunnelLost(TunnelError):
    """The tunnel connection (or the stream) was lost after the OPEN was sent and
    before its answer: the server may have connected to the pod, so not retried."""

    stat = "lost"


class TunnelStreamRefused(TunnelError):
    """The server refused the stream unprocessed (its stream limit, or it is going away)
    on every connection tried: nothing reached a pod."""

    stat = "refused_streams"

    @property
    def retryable(self) -> bool:
        return True


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

    def __init__(
        self, message: str, expected: SpiffeId | None = None, actual: SpiffeId | None = None
    ) -> None:
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

    def __init__(self, message: str, code: int = Status.INTERNAL_ERROR) -> None:
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
    """The server broke the tunnel protocol (a malformed preface or answer)."""

    stat = "protocol_errors"


REFUSAL_HINTS = {
    Status.BAD_HEADER: "the node could not parse our OPEN (a bug, or mismatched releases)",
    Status.UNSUPPORTED_VERSION: "the node speaks an older tunnel version; upgrade it",
    Status.HEADER_TOO_LARGE: "our OPEN exceeds the node's limit",
    Status.HEADER_TIMEOUT: "our preface reached the node too late",
    Status.UNKNOWN_TARGET: "the node knows no pod at that address",
    Status.TARGET_NOT_ON_NODE: "the pod runs on another node; discovery here is stale",
    Status.POLICY_DENIED: "an authorization policy denies this source",
    Status.TARGET_UNREACHABLE: "the pod refused the connection or did not accept it in time",
    Status.TARGET_IDENTITY_MISMATCH: "the pod runs as another identity; discovery is stale",
    Status.INTERNAL_ERROR: "the node failed; its log has the traceback",
}
