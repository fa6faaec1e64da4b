"""TLS for the tunnel: SSL contexts from workload material, SNI naming the destination
workload, and SPIFFE checks after the handshake.

What each side proves (DESIGN.md "Identity"):

* Both sides: TLS 1.3 only (``minimum_version = maximum_version = TLSv1_3``), a
  certificate chaining to the `CertSource`'s trust bundle, ECDSA P-256 keys. Our own
  material is checked for the key type when a context is built; a peer's key type is
  the CA's business (it signs P-256 only), the chain is OpenSSL's.
* The server requires a client certificate. After the handshake it reads the client's
  SPIFFE ID from the peer certificate with ``cryptography`` (`check_client_identity`):
  exactly one URI SAN, a *workload* ID (node identities do not open tunnels), in this
  node's trust domain.
* The client checks that the server's SPIFFE ID *equals* the identity discovery gave
  for the endpoint (`check_server_identity`). Chaining to the CA is not enough: every
  node holds certificates of some workloads, so "signed by our CA" only says "some
  workload"; a node serving the wrong identity is an impersonation
  (`ImpersonationError`), refused before the header names the target.
* Hostname checking is off: SPIFFE IDs are URIs, not hostnames, and Python's check
  looks at DNS/IP SANs only.

Server certificate selection, by SNI. One listener serves every local workload, so the
server must know which certificate to present before it sends one. The client names
the destination workload in SNI; the front context's ``sni_callback`` decodes it and
swaps in the context holding that workload's certificate (OpenSSL then uses the new
context's certificate *and* its trust store; the front context holds neither, so a
connection that is not switched cannot complete). An SNI that is missing, not a Weft
name, of another trust domain, or names a workload without material on this node fails
the handshake with ``unrecognized_name``; the server logs a line naming the SNI and the
reason (`HandshakeNotes`).

SNI encoding (`sni_for` / `identity_from_sni`): the SPIFFE ID without its ``spiffe://``
scheme, base32 (RFC 4648 alphabet, lowercase, no padding), cut into DNS labels of at
most 63 characters, followed by ``.weft``::

    spiffe://cluster.local/ns/default/sa/web
    -> mnwhk43umvzc43dpmnqwyl3oomxwizlgmf2wy5bponqs653fmi.weft

Why not something readable like ``<sa>.<ns>.<td>.weft``: service account names and
trust domains may contain dots, so that form cannot be decoded unambiguously, and the
server has to decode it (a `CertSource` looks material up by identity; it cannot list
what it holds, so a hash would need a second index). Base32 is reversible for every
ID, uses only ``[a-z2-7]`` (valid in any DNS tool, sslyze, tshark), and the trailing
``.weft`` label marks it as ours. The price is length: an SNI is at most 253
characters, which leaves 153 bytes of ID after the scheme (``ns`` + ``sa`` up to
132 characters with ``cluster.local``); longer IDs raise `SniError` at the client with
a message saying so. Operators read the identity in Weft's logs, decoded.

Caching: building a context parses the trust bundle and loads a key and chain from
files (~1 ms), so contexts are cached per identity, keyed by the material's
``generation`` and the source's ``trust_generation``; either changing rebuilds the
context on next use. Existing connections keep the context they were made with, which
is how an established tunnel survives a certificate rotation. Server session tickets
are off (``num_tickets = 0``): clients do not resume, and a resumed session would skip
the certificate checks this module exists for.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import logging
import ssl
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.certtypes import CertSource, TlsMaterial
from weft.identity import (
    DEFAULT_TRUST_DOMAIN,
    SPIFFE_SCHEME,
    IdentityError,
    SpiffeId,
    load_certs,
    spiffe_id_of,
)

log = logging.getLogger("weft.proxy.tunnel")

SNI_SUFFIX = ".weft"
MAX_SNI_LENGTH = 253
_LABEL = 63


class SniError(ValueError):
    """An identity cannot be put into SNI, or an SNI is not a Weft workload name."""


class TlsMaterialError(Exception):
    """Local certificate material is missing or unusable (names identity and file)."""


class PeerIdentityError(Exception):
    """The peer's certificate does not carry an identity this side accepts."""


class ImpersonationError(PeerIdentityError):
    """The server proved a valid identity, but not the one we meant to reach."""

    def __init__(self, expected: SpiffeId, actual: SpiffeId) -> None:
        super().__init__(
            f"the server presented {actual}, but discovery says this endpoint is {expected}; "
            "refusing (a misrouted or impersonating node, or stale discovery)"
        )
        self.expected = expected
        self.actual = actual


# --- SNI -------------------------------------------------------------------------------


def sni_for(identity: SpiffeId) -> str:
    """The SNI a client sends to reach ``identity`` (see the module docstring)."""
    raw = str(identity)[len(SPIFFE_SCHEME) :].encode()
    text = base64.b32encode(raw).decode("ascii").rstrip("=").lower()
    labels = [text[i : i + _LABEL] for i in range(0, len(text), _LABEL)]
    name = ".".join(labels) + SNI_SUFFIX
    if len(name) > MAX_SNI_LENGTH:
        raise SniError(
            f"{identity} is too long to name in SNI ({len(name)} > {MAX_SNI_LENGTH} "
            "characters encoded); shorten the namespace or service account name"
        )
    return name


def identity_from_sni(name: str) -> SpiffeId:
    """The identity ``name`` encodes; `SniError` if it is not a Weft workload name."""
    if not name.endswith(SNI_SUFFIX) or len(name) > MAX_SNI_LENGTH:
        raise SniError(f"SNI {name!r} is not a Weft workload name (no {SNI_SUFFIX} suffix)")
    labels = name[: -len(SNI_SUFFIX)].split(".")
    if any(not 0 < len(label) <= _LABEL for label in labels):
        raise SniError(f"SNI {name!r} has an empty or over-long label")
    if any(len(label) != _LABEL for label in labels[:-1]):
        raise SniError(f"SNI {name!r} is not in canonical form (labels of {_LABEL})")
    text = "".join(labels)
    try:
        raw = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
        identity = SpiffeId.parse(SPIFFE_SCHEME + raw.decode())
    except (binascii.Error, UnicodeDecodeError, IdentityError) as exc:
        raise SniError(f"SNI {name!r} does not decode to a SPIFFE ID ({exc})") from None
    if identity.is_node:
        raise SniError(f"SNI {name!r} names a node ({identity}), not a workload")
    if sni_for(identity) != name:  # one name per identity, so logs and caches agree
        raise SniError(f"SNI {name!r} is not in canonical form")
    return identity


# --- peer checks -----------------------------------------------------------------------


def peer_certificate(ssl_object: Any) -> x509.Certificate:
    """The peer's leaf certificate of a completed handshake (``ssl_object`` is the
    transport's ``ssl_object`` extra: an ``ssl.SSLObject``)."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise PeerIdentityError("the peer presented no certificate")
    return x509.load_der_x509_certificate(der)


def peer_identity(ssl_object: Any) -> SpiffeId:
    try:
        return spiffe_id_of(peer_certificate(ssl_object))
    except IdentityError as exc:
        raise PeerIdentityError(f"the peer certificate has no usable SPIFFE ID: {exc}") from None


def check_client_identity(ssl_object: Any, trust_domain: str) -> SpiffeId:
    """The client workload's identity; `PeerIdentityError` if it may not use tunnels."""
    identity = peer_identity(ssl_object)
    if identity.trust_domain != trust_domain:
        raise PeerIdentityError(
            f"client identity {identity} is not in this node's trust domain {trust_domain!r}"
        )
    if identity.is_node:
        raise PeerIdentityError(
            f"client identity {identity} is a node identity; tunnels carry workload identities"
        )
    return identity


def check_server_identity(ssl_object: Any, expected: SpiffeId) -> SpiffeId:
    """The server's identity if it is ``expected``; `ImpersonationError` otherwise."""
    actual = peer_identity(ssl_object)
    if actual != expected:
        raise ImpersonationError(expected, actual)
    return actual


# --- handshake notes -------------------------------------------------------------------


@dataclass
class HandshakeNotes:
    """What the SNI callback saw, for the server's log line about that connection.

    The callback runs inside OpenSSL with no reference to the connection, so the server
    puts a fresh `HandshakeNotes` into a context variable before the handshake
    (`begin_handshake_notes`); the transport's callbacks run in a copy of that context,
    so the callback finds the same object. If a loop ever breaks that chain the notes
    stay empty and the callback logs the rejection itself instead.
    """

    sni: str | None = None
    rejection: str | None = None
    """Why the SNI was refused; None if it was accepted (or never seen)."""
    presented: SpiffeId | None = None
    """The workload identity whose certificate the server presented."""


_NOTES: contextvars.ContextVar[HandshakeNotes] = contextvars.ContextVar("weft_tunnel_notes")


def begin_handshake_notes() -> HandshakeNotes:
    """A fresh `HandshakeNotes` for the handshake the current task is about to run."""
    notes = HandshakeNotes()
    _NOTES.set(notes)
    return notes


# --- contexts --------------------------------------------------------------------------


class WorkloadContext(ssl.SSLContext):
    """A server context holding one workload's certificate; knows which."""

    identity: SpiffeId


def presented_identity(ssl_object: Any) -> SpiffeId | None:
    """The workload identity the server side of ``ssl_object`` presented (after SNI)."""
    context = getattr(ssl_object, "context", None)
    return context.identity if isinstance(context, WorkloadContext) else None


def _check_material(material: TlsMaterial, identity: SpiffeId) -> None:
    if material.identity != identity:
        raise TlsMaterialError(
            f"the certificate source returned material for {material.identity} when asked "
            f"for {identity} (a bug in the certificate manager)"
        )
    try:
        leaf = load_certs(material.chain_path.read_bytes())[0]
    except (OSError, IdentityError, IndexError) as exc:
        raise TlsMaterialError(
            f"cannot read the certificate chain of {identity} at {material.chain_path}: {exc}"
        ) from None
    key = leaf.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"):
        raise TlsMaterialError(
            f"the certificate of {identity} at {material.chain_path} has a "
            f"{type(key).__name__} key; Weft uses ECDSA P-256 only"
        )
    try:
        in_cert = spiffe_id_of(leaf)
    except IdentityError as exc:
        raise TlsMaterialError(
            f"the certificate of {identity} at {material.chain_path}: {exc}"
        ) from None
    if in_cert != identity:
        raise TlsMaterialError(
            f"the certificate at {material.chain_path} is for {in_cert}, not {identity} "
            "(a bug in the certificate manager)"
        )


def _tls13(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED


@dataclass
class _Cached:
    key: tuple[int, int]
    context: ssl.SSLContext


class TlsContexts:
    """Builds and caches the tunnel's SSL contexts from a `CertSource`.

    ``server_context()`` is the listener's front context (SNI selects the rest);
    ``client_context(source)`` presents ``source``'s certificate. Both raise
    `TlsMaterialError` if material is unusable; ``client_context`` returns None if the
    source has no material for that identity (yet).
    """

    def __init__(self, certs: CertSource, *, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self.certs = certs
        self.trust_domain = trust_domain
        self.builds = 0
        """Contexts built so far (cache misses), for tests and /debug/state."""
        self._client: dict[SpiffeId, _Cached] = {}
        self._server: dict[SpiffeId, _Cached] = {}
        self._front: ssl.SSLContext | None = None

    def client_context(self, source: SpiffeId) -> ssl.SSLContext | None:
        return self._cached(self._client, source, server_side=False)

    def workload_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        """The server context presenting ``identity``'s certificate, None if there is
        no material for it on this node."""
        return self._cached(self._server, identity, server_side=True)

    def server_context(self) -> ssl.SSLContext:
        if self._front is None:
            front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            _tls13(front)
            front.num_tickets = 0
            front.sni_callback = self._select_workload
            self._front = front
        return self._front

    def _cached(
        self, cache: dict[SpiffeId, _Cached], identity: SpiffeId, *, server_side: bool
    ) -> ssl.SSLContext | None:
        material = self.certs.material(identity)
        if material is None:
            cache.pop(identity, None)
            return None
        key = (material.generation, self.certs.trust_generation)
        cached = cache.get(identity)
        if cached is not None and cached.key == key:
            return cached.context
        context = self._build(material, identity, server_side=server_side)
        cache[identity] = _Cached(key, context)
        return context

    def _build(
        self, material: TlsMaterial, identity: SpiffeId, *, server_side: bool
    ) -> ssl.SSLContext:
        _check_material(material, identity)
        context: ssl.SSLContext
        if server_side:
            context = WorkloadContext(ssl.PROTOCOL_TLS_SERVER)
            context.identity = identity
            context.num_tickets = 0
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False  # SPIFFE IDs are checked after the handshake
        _tls13(context)
        bundle = self.certs.trust_bundle_pem()
        try:
            context.load_verify_locations(cadata=bundle.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as exc:
            raise TlsMaterialError(f"the trust bundle is not usable PEM: {exc}") from None
        try:
            context.load_cert_chain(material.chain_path, material.key_path)
        except (OSError, ssl.SSLError) as exc:
            raise TlsMaterialError(
                f"cannot load the key and chain of {identity} ({material.key_path}, "
                f"{material.chain_path}): {exc}"
            ) from None
        self.builds += 1
        log.debug(
            "tunnel: built %s context for %s (generation %d, trust generation %d)",
            "server" if server_side else "client",
            identity,
            material.generation,
            self.certs.trust_generation,
        )
        return context

    def _select_workload(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: Any
    ) -> int | None:
        """The front context's SNI callback. Must not raise: an exception here would
        surface as an unraisable error, not as a failed handshake."""
        notes = _NOTES.get(None)
        if notes is not None:
            notes.sni = server_name
        try:
            reason = self._switch(ssl_object, server_name, notes)
        except Exception:
            log.exception("tunnel: choosing the certificate for SNI %r failed", server_name)
            reason = "internal error choosing the certificate (see the traceback above)"
        if reason is None:
            return None
        if notes is not None:
            notes.rejection = reason
        else:
            log.warning("tunnel: refused a TLS handshake: %s", reason)
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    def _switch(
        self,
        ssl_object: ssl.SSLObject | ssl.SSLSocket,
        server_name: str | None,
        notes: HandshakeNotes | None,
    ) -> str | None:
        if server_name is None:
            return "the client sent no SNI; Weft clients name the destination workload in it"
        try:
            identity = identity_from_sni(server_name)
        except SniError as exc:
            return str(exc)
        if identity.trust_domain != self.trust_domain:
            return (
                f"SNI {server_name!r} names {identity}, outside this node's trust domain "
                f"{self.trust_domain!r}"
            )
        try:
            context = self.workload_context(identity)
        except TlsMaterialError as exc:
            log.error("tunnel: cannot serve %s: %s", identity, exc)
            return f"SNI {server_name!r} names {identity}, whose material is unusable: {exc}"
        if context is None:
            return (
                f"SNI {server_name!r} names {identity}, which has no certificate on this node "
                "(no pod of it here, or its certificate is not issued yet)"
            )
        ssl_object.context = context
        if notes is not None:
            notes.presented = identity
        return None
