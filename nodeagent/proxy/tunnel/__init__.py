"""The node-to-node mTLS tunnel: many proxied connections multiplexed over pooled TLS 1.3
connections between node agents, on port 15008.

A captured connection from pod A on node 1 to pod B on node 2 travels
``A -> node 1 outbound proxy -> stream -> node 2 tunnel server -> B``
(DESIGN.md "Data path")::

    client (node 1)                                   server (node 2, :15008)
    pooled connection for (A's identity, node 2, B's identity), made once:
      TCP, TLS 1.3, SNI = B's identity, A's cert -->  picks B's certificate by SNI,
                                                      requires and verifies A's
      checks the server is B (else impersonation)
      preface (settings) <-------------------------> preface (settings)
    per proxied connection, one stream:
      OPEN target=B-pod-ip:port ------------------->  authorizes A for the target, checks
                                                      the target is a local pod running as
                                                      B, connects to it
                         <-------------------------  ANSWER OK | a refusal code
      DATA / END / RESET both ways, per-stream flow control (WINDOW)

Modules: `wire` (the format, sans-I/O), `session` (one connection: streams as
transports, flow control), `server`, `client` (the pool), `hooks` (the server's seams),
`errors`, `config`, and `bench` (a measurement tool, not on the data path).
"""

from nodeagent.proxy.tunnel.client import (
    RouteLookup,
    TunnelClient,
    TunnelRoute,
    tunnel_connector,
)
from nodeagent.proxy.tunnel.config import (
    TunnelClientConfig,
    TunnelClientStats,
    TunnelServerConfig,
    TunnelServerStats,
)
from nodeagent.proxy.tunnel.errors import (
    HANDSHAKE_HINTS,
    Failure,
    TunnelError,
    TunnelHandshakeError,
    TunnelImpersonation,
    TunnelLost,
    TunnelNoRoute,
    TunnelOverloaded,
    TunnelProtocolError,
    TunnelRefused,
    TunnelSetupError,
    TunnelStreamRefused,
    TunnelTimeout,
    TunnelUnreachable,
)
from nodeagent.proxy.tunnel.hooks import (
    Authorize,
    Decision,
    LocateTarget,
    NotLocal,
    TargetConnector,
    allow_trust_domain,
    connect_target_plaintext,
)
from nodeagent.proxy.tunnel.server import TUNNEL_PORT, TunnelServer, tunnel_listener
from nodeagent.proxy.tunnel.session import Session, Stream, StreamLost

__all__ = [
    "HANDSHAKE_HINTS",
    "TUNNEL_PORT",
    "Authorize",
    "Decision",
    "Failure",
    "LocateTarget",
    "NotLocal",
    "RouteLookup",
    "Session",
    "Stream",
    "StreamLost",
    "TargetConnector",
    "TunnelClient",
    "TunnelClientConfig",
    "TunnelClientStats",
    "TunnelError",
    "TunnelHandshakeError",
    "TunnelImpersonation",
    "TunnelLost",
    "TunnelNoRoute",
    "TunnelOverloaded",
    "TunnelProtocolError",
    "TunnelRefused",
    "TunnelRoute",
    "TunnelServer",
    "TunnelServerConfig",
    "TunnelServerStats",
    "TunnelSetupError",
    "TunnelStreamRefused",
    "TunnelTimeout",
    "TunnelUnreachable",
    "allow_trust_domain",
    "connect_target_plaintext",
    "tunnel_connector",
    "tunnel_listener",
]
