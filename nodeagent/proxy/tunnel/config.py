"""Tuning and counters of the tunnel server and client; the defaults suit a node proxy."""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.proxy.tunnel.errors import Failure
from nodeagent.proxy.tunnel.wire import Settings


def _check_positive(**values: float) -> None:
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        raise ValueError(
            "must be positive: " + ", ".join(f"{k}={v!r}" for k, v in sorted(bad.items()))
        )


def _check_water(high: int, low: int) -> None:
    if not 0 <= low <= high:
        raise ValueError(
            f"need 0 <= low_water <= high_water, got low_water={low}, high_water={high}"
        )


@dataclass(frozen=True)
class TunnelServerConfig:
    handshake_timeout: float = 5.0
    """Seconds from accept to a completed TLS handshake; stalled clients are dropped."""

    header_timeout: float = 5.0
    """Seconds after the handshake for the client's complete preface."""

    target_connect_timeout: float = 5.0
    """Seconds to connect to the local pod before answering TARGET_UNREACHABLE."""

    close_timeout: float = 5.0
    """Seconds TLS's closing handshake may take before the connection is reset
    (asyncio's default is 30 s)."""

    idle_timeout: float = 3600.0
    """Seconds without a byte either way after which a relayed stream is closed."""

    connection_idle_timeout: float = 600.0
    """Seconds a tunnel connection may stay without any stream before the server
    closes it (clients close theirs sooner, see `TunnelClientConfig`)."""

    high_water: int = 256 * 1024
    """Bytes buffered towards one side above which the other side is no longer read."""

    low_water: int = 64 * 1024
    """Bytes buffered towards one side below which reading the other side resumes."""

    max_streams: int = 100
    """Streams a client may have open at once on one connection (announced in the
    preface); more are refused unprocessed and the client opens another connection."""

    window: int = 1024 * 1024
    """Bytes a client may send on a stream before this server returns credit (1 MiB:
    256 KiB halved bulk throughput, measured with both ends on loopback)."""

    max_frame: int = 64 * 1024
    """Largest frame payload accepted."""

    rapid_resets: int = 200
    """Streams a client may cancel before their answer, per connection, in a burst
    (refilled at this many per 10 s); past it the connection is closed (the HTTP/2
    "rapid reset" attack: opening and cancelling streams to make the server work)."""

    max_handshakes: int = 64
    """TLS handshakes served at once; more wait their turn (within ``handshake_timeout``,
    which counts from accept), so that many client nodes bursting at once cannot put
    thousands of handshakes on this loop together (each client node bounds its own)."""

    handshake_queue: int = 10_000
    """Connections that may wait for a handshake turn; beyond, they are reset at once."""

    def __post_init__(self) -> None:
        if self.max_handshakes < 1 or self.handshake_queue < 0 or self.rapid_resets < 1:
            raise ValueError(
                f"need max_handshakes >= 1, handshake_queue >= 0 and rapid_resets >= 1, got "
                f"{self.max_handshakes}, {self.handshake_queue}, {self.rapid_resets}"
            )
        _check_positive(
            handshake_timeout=self.handshake_timeout,
            header_timeout=self.header_timeout,
            target_connect_timeout=self.target_connect_timeout,
            close_timeout=self.close_timeout,
            idle_timeout=self.idle_timeout,
            connection_idle_timeout=self.connection_idle_timeout,
        )
        _check_water(self.high_water, self.low_water)
        self.settings()  # range checks of the preface values

    def settings(self) -> Settings:
        return Settings(max_streams=self.max_streams, window=self.window, max_frame=self.max_frame)


@dataclass(frozen=True)
class TunnelClientConfig:
    """The outbound proxy's own ``connect_timeout`` bounds the whole connect too; these
    make the error name the stage that stalled."""

    connect_timeout: float = 3.0
    """Seconds for the TCP connection to the destination node's tunnel port."""

    handshake_timeout: float = 3.0
    """Seconds for the TLS handshake and the server's preface."""

    answer_timeout: float = 3.0
    """Seconds from OPEN to the server's answer (it connects to the pod in between)."""

    close_timeout: float = 5.0
    """Seconds TLS's closing handshake may take before the connection is reset."""

    idle_timeout: float = 60.0
    """Seconds a pooled connection stays open without any stream before it is closed."""

    max_streams: int = 100
    """Streams this client puts on one connection at most (the server's own limit, from
    its preface, applies too); past it, another connection to the same peer opens."""

    window: int = 1024 * 1024
    """Bytes the server may send on a stream before this client returns credit."""

    max_frame: int = 64 * 1024
    """Largest frame payload accepted."""

    max_handshakes: int = 32
    """Fresh connections (TCP connect + TLS handshake) in progress at once; more wait
    their turn (see `nodeagent.proxy.admission`).  ``connect_timeout`` and
    ``handshake_timeout`` start only once a connection has its turn."""

    handshake_queue: int = 10_000
    """Fresh connections that may wait for a turn; beyond, they fail at once."""

    handshake_queue_timeout: float = 30.0
    """Seconds a fresh connection may wait for its turn before it fails (overloaded)."""

    def __post_init__(self) -> None:
        _check_positive(
            connect_timeout=self.connect_timeout,
            handshake_timeout=self.handshake_timeout,
            answer_timeout=self.answer_timeout,
            close_timeout=self.close_timeout,
            idle_timeout=self.idle_timeout,
            handshake_queue_timeout=self.handshake_queue_timeout,
        )
        if self.max_handshakes < 1 or self.handshake_queue < 0:
            raise ValueError(
                f"need max_handshakes >= 1 and handshake_queue >= 0, got "
                f"{self.max_handshakes}, {self.handshake_queue}"
            )
        self.settings()

    def settings(self) -> Settings:
        return Settings(max_streams=self.max_streams, window=self.window, max_frame=self.max_frame)


@dataclass
class TunnelServerStats:
    """Counters of the tunnel server, for /debug/state and metrics. Every connection
    that does not become a tunnel, and every stream that is not relayed, increments
    exactly one failure counter."""

    accepted: int = 0
    """TCP connections accepted."""
    active: int = 0
    """Connections in any stage right now."""
    sessions: int = 0
    """Connections that completed TLS and the preface (tunnel connections)."""
    sessions_active: int = 0
    """Tunnel connections open now."""
    streams_active: int = 0
    """Streams open now, on all connections."""
    established: int = 0
    """Streams answered OK and relayed."""
    idle_closed: int = 0
    """Tunnel connections closed after ``connection_idle_timeout`` without streams, or
    closed by their client before any stream: not failures."""
    streams_refused: int = 0
    """OPENs refused unprocessed: past ``max_streams``, or while draining."""
    goaways: int = 0
    """Connections told to go away (drain, certificate rotation, expiry)."""
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
    preface_truncated: int = 0
    """The client closed the connection inside its preface."""
    protocol_violation: int = 0
    """Connections closed because the client broke the framing (oversized frames, data
    beyond the window, unknown streams, rapid resets, not reading)."""
    bad_header: int = 0
    """A malformed preface (connection closed) or OPEN (stream refused BAD_HEADER)."""
    unsupported_version: int = 0
    """A client of another tunnel version (answered in version 1's format)."""
    header_too_large: int = 0
    """A preface or OPEN above the size limit."""
    header_timeout: int = 0
    """No complete preface within ``header_timeout``."""
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
    """Streams opened and answered OK."""
    reused: int = 0
    """Of those, streams on a connection that already existed (no handshake)."""
    connections: int = 0
    """Tunnel connections made (TLS handshake + preface)."""
    connection_failures: int = 0
    """Tunnel connections that could not be made (each failing the connects waiting)."""
    drained: int = 0
    """Connections retired for new streams: the server went away, or the certificate
    they were made with was rotated."""
    no_route: int = 0
    setup_failed: int = 0
    unreachable: int = 0
    timeouts: int = 0
    handshake_failed: int = 0
    impersonation: int = 0
    refused: int = 0
    refused_streams: int = 0
    """Streams the server refused unprocessed on every connection tried."""
    stream_retries: int = 0
    """Streams retried on another connection after an unprocessed refusal."""
    lost: int = 0
    protocol_errors: int = 0
    overloaded: int = 0
    """Connects refused by this node's own handshake admission (queue full or too long
    a wait): not a failure of the destination."""
