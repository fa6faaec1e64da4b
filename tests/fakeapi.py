"""A fake Kubernetes API server: real HTTP on 127.0.0.1, the real wire format, four
built-in kinds, the Gateway API's HTTPRoute and GRPCRoute and Weft's AuthorizationPolicy
(custom resources: list items keep kind/apiVersion; ``gateway_api = False`` or
``weft_crds = False`` answers 404 as a cluster without those CRDs).

What it serves, as kube-apiserver does (only what Weft's discovery reads):

* ``GET /api/v1/pods``, ``/api/v1/services``, ``/api/v1/namespaces``,
  ``/apis/discovery.k8s.io/v1/endpointslices`` — a list (``PodList`` ...) with
  ``metadata.resourceVersion``; items without ``kind``/``apiVersion``, as typed lists
  have.  ``limit`` + ``continue`` page through one consistent snapshot; an expired
  continue token is ``410 Expired``.
* the same with ``watch=true&resourceVersion=N`` — ``200``, ``Transfer-Encoding:
  chunked``, one JSON event per line and per chunk (``ADDED``/``MODIFIED``/``DELETED``
  with the whole object, ``BOOKMARK`` with only ``metadata.resourceVersion`` when
  ``allowWatchBookmarks=true``), replaying every change after N, then live ones.  Ends
  cleanly after ``timeoutSeconds``.  A version older than the last compaction gets an
  ``ERROR`` event whose object is a ``Status`` with ``code: 410`` (or, with
  ``gone_as_status``, an HTTP 410).
* the custom resources' ``status`` subresource (``/apis/gateway.networking.k8s.io/v1/
  namespaces/NS/httproutes/NAME/status``, ``/apis/weft.io/v1alpha1/namespaces/NS/
  authorizationpolicies/NAME/status``; ``GET`` of the object itself too): ``GET``; ``PATCH`` as
  ``application/merge-patch+json`` (RFC 7386: lists replaced whole) or
  ``application/json-patch+json`` (RFC 6902; a failed op is 422), what the ``kubernetes``
  client sends (it defaults to merge patch for ``patch_namespaced_custom_object_status``;
  Weft names the type anyway); ``PUT`` (``resourceVersion`` required, as for any custom
  resource).  As the apiextensions status strategy does: only ``status`` changes, the
  ``metadata.generation`` does not; a write that changes nothing is a no-op (no new
  resourceVersion, no event); else the resourceVersion moves and watches get MODIFIED.
  A ``resourceVersion`` in the body that is not the current one is ``409 Conflict``; an
  unknown object ``404``; strategic merge and apply patches ``415`` (custom resources
  have no strategic merge; the fake does no server-side apply).  Custom objects get
  ``metadata.generation`` 1 on create, +1 on an update that changes more than metadata
  and status, and keep their status across updates (create and update cannot set it).
  :attr:`status_failure` answers every status write with an HTTP error (403: no RBAC);
  :attr:`forbidden` answers a resource's list and watch with 403 (no RBAC for it).
* ``Authorization: Bearer <token>`` is checked when the fake has a token (else 401).
* ``TokenReview``: answers from :attr:`token_reviews` (fixed statuses), or for a token
  minted by :meth:`pod_token` — a projected token bound to a pod, as the kubelet gets one
  — the way the API server reviews bound tokens: the pod's service account, its name,
  UID and node in ``user.extra``, and not authenticated once that pod is gone.
* ``tls=True``: HTTPS with a serving certificate from a fresh cluster CA
  (:class:`ServingCerts`: SANs ``127.0.0.1``, ``localhost`` and the in-cluster names);
  :meth:`FakeKubeAPI.in_cluster` writes a service account volume (``token``, ``ca.crt``,
  ``namespace``) and returns the environment a pod gets, so the client is tested the
  way it runs in a pod (``KUBERNETES_SERVICE_HOST``/``_PORT`` + those two files, as
  ``kubernetes.config.load_incluster_config`` reads them).
* What a real server does that a client must cope with: :attr:`chunk_bytes` cuts the
  watch stream's chunks anywhere, inside events; :attr:`coalesce_events` sends events
  that are ready together in one chunk; :attr:`bookmark_interval` sends each watch that
  asked for bookmarks a periodic BOOKMARK at the current resourceVersion, as
  kube-apiserver does about once a minute; :meth:`throttle` answers requests with ``429
  Too Many Requests`` and ``Retry-After`` (API Priority and Fairness); :attr:`forbidden`
  and :attr:`forbidden_watch` answer 403 worded as RBAC words it (``cannot watch
  resource "pods" in API group "" at the cluster scope``); :meth:`compact` forgets
  history without ending current watches, as etcd's periodic compaction does.

* What ``weft check`` reads (:data:`OBJECTS`: Nodes, Secrets, ConfigMaps,
  ServiceAccounts, Deployments, DaemonSets, PodDisruptionBudgets, ClusterRoles and their
  bindings — stored as tests create them, status included, as a controller would have
  written it): one object by name (``/api/v1/namespaces/NS/secrets/NAME``,
  ``/apis/apps/v1/namespaces/NS/daemonsets/NAME``, ``/api/v1/nodes/NAME``; any kind), a
  namespaced list (``/api/v1/namespaces/NS/pods?labelSelector=a=b``: equality selectors;
  ``fieldSelector`` on ``metadata.name``/``metadata.namespace``); ConfigMaps are also
  created and replaced (:data:`WRITABLE`: 409 on a stale ``resourceVersion``);
  ``GET /version`` (:attr:`version`); API group discovery (``/apis/G/V``: an
  ``APIResourceList`` of the installed resources) and a CRD by name
  (``/apis/apiextensions.k8s.io/v1/customresourcedefinitions/PLURAL.GROUP``, Established,
  present as :attr:`gateway_api` and :attr:`weft_crds` say); ``SelfSubjectAccessReview``
  (allowed unless :attr:`denied` names the verb, group and resource); and the pod proxy
  (``/api/v1/namespaces/NS/pods/NAME:PORT/proxy/PATH``: :attr:`proxies` answers for the
  pod's port, status and body relayed as they are; a port without one is the API
  server's 503 ``error trying to reach service``; ``"pods/proxy"`` in :attr:`forbidden`
  is 403).

Resource versions are one counter across all kinds, like etcd's revision.  What tests
can do besides changing objects: :meth:`bookmark`, :meth:`expire` (compact history and
send open watches a 410), :meth:`compact`, :meth:`throttle`, :meth:`unobserved` (changes
no watch will see — the events a client misses while compacted away), :meth:`drop_watches`
(cut streams mid-chunk),
:meth:`partition` (refuse every connection).  :attr:`requests` records what the client
sent.

Threads rather than asyncio: the client under test blocks in its own threads, and a
server that does not share the test's event loop cannot be stalled by it.
"""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import json
import re
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

JSON = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    name: str
    kind: str
    api_version: str
    path: str
    namespaced: bool


RESOURCES = {
    r.name: r
    for r in (
        ResourceType("pods", "Pod", "v1", "/api/v1/pods", True),
        ResourceType("services", "Service", "v1", "/api/v1/services", True),
        ResourceType("namespaces", "Namespace", "v1", "/api/v1/namespaces", False),
        ResourceType(
            "endpointslices",
            "EndpointSlice",
            "discovery.k8s.io/v1",
            "/apis/discovery.k8s.io/v1/endpointslices",
            True,
        ),
        # The Gateway API's CRDs (served unless `FakeKubeAPI.gateway_api` is False).
        ResourceType(
            "httproutes",
            "HTTPRoute",
            "gateway.networking.k8s.io/v1",
            "/apis/gateway.networking.k8s.io/v1/httproutes",
            True,
        ),
        ResourceType(
            "grpcroutes",
            "GRPCRoute",
            "gateway.networking.k8s.io/v1",
            "/apis/gateway.networking.k8s.io/v1/grpcroutes",
            True,
        ),
        # Weft's own CRD (deploy/kubernetes; served unless `FakeKubeAPI.weft_crds` is False).
        ResourceType(
            "authorizationpolicies",
            "AuthorizationPolicy",
            "weft.io/v1alpha1",
            "/apis/weft.io/v1alpha1/authorizationpolicies",
            True,
        ),
    )
}
# What `weft check` reads besides (no discovery watches them): stored, listed (at the
# cluster path and namespaced, with an equality labelSelector) and read one by one.
OBJECTS = {
    r.name: r
    for r in (
        ResourceType("nodes", "Node", "v1", "/api/v1/nodes", False),
        ResourceType("secrets", "Secret", "v1", "/api/v1/secrets", True),
        ResourceType("configmaps", "ConfigMap", "v1", "/api/v1/configmaps", True),
        ResourceType("serviceaccounts", "ServiceAccount", "v1", "/api/v1/serviceaccounts", True),
        ResourceType("deployments", "Deployment", "apps/v1", "/apis/apps/v1/deployments", True),
        ResourceType("daemonsets", "DaemonSet", "apps/v1", "/apis/apps/v1/daemonsets", True),
        ResourceType(
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            "policy/v1",
            "/apis/policy/v1/poddisruptionbudgets",
            True,
        ),
        ResourceType(
            "clusterroles",
            "ClusterRole",
            "rbac.authorization.k8s.io/v1",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            False,
        ),
        ResourceType(
            "clusterrolebindings",
            "ClusterRoleBinding",
            "rbac.authorization.k8s.io/v1",
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            False,
        ),
    )
}
ALL = {**RESOURCES, **OBJECTS}
GATEWAY_API = ("httproutes", "grpcroutes")
WEFT_CRDS = ("authorizationpolicies",)
CUSTOM = GATEWAY_API + WEFT_CRDS
"""Custom resources: unstructured lists, the status subresource, generations."""
_BY_PATH = {r.path: r for r in ALL.values()}
_SINGLE_POD = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)$")
_SINGLE_CUSTOM = re.compile(
    r"^/apis/(?P<gv>[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/"
    r"(?P<plural>[^/]+)/(?P<name>[^/]+)(?P<status>/status)?$"
)
WRITABLE = ("configmaps",)
"""Objects the fake creates (POST to the namespaced collection) and replaces (PUT, with
the resourceVersion precondition) as the API server does: the trust bundle's ConfigMaps."""
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
_GROUP = r"(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
_SINGLE = re.compile(
    rf"^/{_GROUP}/(?:namespaces/(?P<ns>[^/]+)/)?(?P<plural>[a-z]+)/(?P<name>[^/:]+)$"
)
_NAMESPACED_LIST = re.compile(rf"^/{_GROUP}/namespaces/(?P<ns>[^/]+)/(?P<plural>[a-z]+)$")
_POD_PROXY = re.compile(
    r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?:https?:)?(?P<name>[^/:]+)(?::(?P<port>\d+))?"
    r"/proxy(?P<path>/.*)?$"
)
_GROUP_DISCOVERY = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/?$")
_CRD = re.compile(
    r"^/apis/apiextensions\.k8s\.io/v1/customresourcedefinitions/(?P<plural>[^/.]+)\.(?P<group>.+)$"
)
ProxyAnswer = tuple[int, bytes, str]
"""What a pod's port answers through the pod proxy: status, body, content type."""


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    """Names in lower case."""
    method: str = "GET"
    body: Any = None
    """The decoded JSON body of a POST, PUT or PATCH."""
    at: float = field(default_factory=time.monotonic)
    """When it arrived (``time.monotonic``): to check how long a client waited."""

    @property
    def resource(self) -> str | None:
        r = _BY_PATH.get(self.path)
        return r.name if r else None

    @property
    def watch(self) -> bool:
        return _parse_bool(self.query.get("watch"))


@dataclass(frozen=True)
class _Entry:
    rv: int
    type: str
    resource: str | None
    """None for BOOKMARK and ERROR entries, which go to every watch."""
    obj: JSON | None


def _parse_bool(value: str | None) -> bool:
    # The API server uses Go's strconv.ParseBool.
    return value in ("1", "t", "T", "true", "TRUE", "True")


def status(code: int, reason: str, message: str) -> JSON:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ServingCerts:
    """The cluster CA and the API server's serving certificate, as kubeadm makes them:
    a self-signed ``kubernetes`` CA (what pods find in their service account's
    ``ca.crt``) and a leaf for the names and addresses clients dial — here
    ``127.0.0.1`` and ``localhost`` besides the in-cluster names."""

    NAMES = ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local", "localhost")  # fmt: skip
    ADDRESSES = ("127.0.0.1", "10.96.0.1")

    def __init__(self, directory: Path) -> None:
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in self.NAMES]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in self.ADDRESSES]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        self.ca_file = directory / "ca.crt"
        self.ca_file.write_bytes(self.ca_pem)
        self.cert_file = directory / "apiserver.crt"
        self.cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        self.key_file = directory / "apiserver.key"
        self.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class FakeKubeAPI:
    def __init__(self, token: str | None = None, *, tls: bool = False) -> None:
        """``tls``: serve HTTPS with a serving certificate from a fresh cluster CA
        (:attr:`certs`); :meth:`in_cluster` writes what a pod would find."""
        self.token = token
        self._tmp = tempfile.TemporaryDirectory(prefix="fakeapi-") if tls else None
        self.certs = ServingCerts(Path(self._tmp.name)) if self._tmp is not None else None
        self.gone_as_status = False
        """Answer a too-old watch with HTTP 410 instead of a 200 + ERROR event."""
        self.after_list_page: Callable[[str], None] | None = None
        """Called with the resource name after each list page is sent (to expire a
        continue token between pages, say)."""
        self.requests: list[Request] = []
        self.token_reviews: dict[str, JSON] = {}
        """token -> the TokenReview ``status`` to answer (unknown tokens: not
        authenticated).  The answer's ``audiences`` is intersected with the request's, as
        the API server does."""
        self.gateway_api = True
        """Whether the Gateway API CRDs are installed: if not, their paths answer 404 as
        a cluster without them does."""
        self.weft_crds = True
        """Whether Weft's CRDs (AuthorizationPolicy) are installed; as ``gateway_api``."""
        self.forbidden: set[str] = set()
        """Resources whose list and watch answer 403 (the ClusterRole lacks them)."""
        self._pod_tokens: dict[str, tuple[str, str, str, str, str | None, tuple[str, ...]]] = {}
        """Tokens minted by :meth:`pod_token`: token -> (namespace, pod, uid, service
        account, node or None, audiences)."""
        self.token_review_failure: int | None = None
        """Answer every TokenReview with this HTTP status instead (an outage)."""
        self.forbidden_writes: set[str] = set()
        """Resources (of :data:`WRITABLE`) whose create and update answer 403."""
        self.status_failure: int | None = None
        """Answer every status write with this HTTP status (403: no RBAC)."""
        self.forbidden_watch: set[str] = set()
        """Resources whose watch (only) answers 403: a Role granting list but not watch."""
        self.chunk_bytes: int | None = None
        """Cut every chunk of a watch stream into chunks of at most this many bytes, so
        events arrive split across chunk boundaries (a large object does from a real
        server; proxies re-chunk anything)."""
        self.coalesce_events = False
        """Send the events that are ready together (the initial ADDEDs, a replay, changes
        made between two wake-ups) in one chunk, as the API server's buffered writer
        may; with :attr:`chunk_bytes` a chunk can then end inside the next event."""
        self.bookmark_interval: float | None = None
        """Send each watch that asked for bookmarks (``allowWatchBookmarks=true``) a
        BOOKMARK at the current resourceVersion this often, as kube-apiserver does (about
        once a minute) — even while nothing of its resource changes."""
        self._throttled: dict[str | None, list[int]] = {}
        self.version: JSON = {
            "major": "1", "minor": "31", "gitVersion": "v1.31.4", "gitTreeState": "clean",
            "goVersion": "go1.22.10", "compiler": "gc", "platform": "linux/amd64",
        }  # fmt: skip
        """What ``GET /version`` answers."""
        self.denied: set[tuple[str, str, str]] = set()
        """(verb, API group, resource) a SelfSubjectAccessReview answers not allowed; ``*``
        matches any.  Everything else is allowed (the caller is a cluster admin)."""
        self.proxies: dict[tuple[str, str, int], Callable[[str], ProxyAnswer]] = {}
        """(namespace, pod, port) -> what that port answers a GET of a path (with its query)
        through ``/api/v1/namespaces/NS/pods/NAME:PORT/proxy/PATH``.  A running pod without
        an entry is one whose port refuses: 503, as the API server words it."""
        self._cond = threading.Condition()
        self._rv = 1000
        self._compacted = self._rv
        self._objects: dict[str, dict[str, JSON]] = {name: {} for name in ALL}
        self._log: list[_Entry] = []
        self._observed = True
        self._continues: dict[str, tuple[int, list[JSON]]] = {}
        self._partitioned = False
        self._closing = False
        self._connections: set[socket.socket] = set()
        self._watch_connections: dict[socket.socket, str] = {}
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakeapi"
        )

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{'https' if self.certs else 'http'}://{host!s}:{port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def in_cluster(self, directory: Path) -> dict[str, str]:
        """Write what a pod's service account volume holds (``token``, ``ca.crt``,
        ``namespace``) into ``directory``, and return the settings a pod's environment
        gives: ``KUBERNETES_SERVICE_HOST``/``_PORT``, and the two files' paths under the
        names the control plane's `KubeConfig.from_mapping` takes (in a pod they default
        to ``/var/run/secrets/kubernetes.io/serviceaccount/``)."""
        if self.certs is None or self.token is None:
            raise ValueError("in_cluster needs FakeKubeAPI(token=..., tls=True)")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(self.token)
        (directory / "ca.crt").write_bytes(self.certs.ca_pem)
        (directory / "namespace").write_text("weft-system")
        return {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.port),
            "token_file": str(directory / "token"),
            "ca_file": str(directory / "ca.crt"),
        }

    def start(self) -> FakeKubeAPI:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.shutdown()
        with self._cond:
            conns = set(self._connections)
        self._shutdown(conns)
        self._server.server_close()  # joins the handler threads
        self._thread.join()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- objects ------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._rv)

    def get(self, resource: str, name: str, namespace: str | None = None) -> JSON | None:
        with self._cond:
            obj = self._objects[resource].get(_key(namespace, name))
            return copy.deepcopy(obj)

    def pod_token(
        self,
        namespace: str,
        name: str,
        *,
        audiences: Sequence[str] = ("weft-controlplane",),
        node_name: bool = True,
    ) -> str:
        """Mint a projected ServiceAccount token bound to the pod ``namespace/name``, as
        the kubelet asks for one (TokenRequest with a ``boundObjectRef``) for a
        ``serviceAccountToken`` volume.  TokenReview answers it as the API server does:
        the pod's service account as the user, ``extra`` with the pod's name and UID and,
        with ``node_name`` (Kubernetes 1.30+), the node it ran on when minted; once the
        pod is deleted or replaced (another UID), not authenticated."""
        obj = self.get("pods", name, namespace)
        if obj is None:
            raise KeyError(f"no pod {namespace}/{name}")
        spec = obj.get("spec") or {}
        token = f"pod-token-{uuid.uuid4().hex}"
        self._pod_tokens[token] = (
            namespace,
            name,
            obj["metadata"]["uid"],
            spec.get("serviceAccountName") or "default",
            spec.get("nodeName") if node_name else None,
            tuple(audiences),
        )
        return token

    def _review_pod_token(self, token: str) -> JSON | None:
        bound = self._pod_tokens.get(token)
        if bound is None:
            return None
        namespace, name, uid, sa, node, audiences = bound
        now = self.get("pods", name, namespace)
        if now is None or now["metadata"].get("uid") != uid:
            what = "not found" if now is None else f"has uid {now['metadata'].get('uid')}"
            return {
                "authenticated": False,
                "error": f"[invalid bearer token, pod {name!r} {what}, token bound to uid {uid}]",
            }
        extra = {
            "authentication.kubernetes.io/pod-name": [name],
            "authentication.kubernetes.io/pod-uid": [uid],
        }
        if node:
            extra["authentication.kubernetes.io/node-name"] = [node]
        return {
            "authenticated": True,
            "audiences": list(audiences),
            "user": {
                "username": f"system:serviceaccount:{namespace}:{sa}",
                "uid": f"sa-uid-{namespace}-{sa}",
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{namespace}",
                    "system:authenticated",
                ],
                "extra": extra,
            },
        }

    def create(self, resource: str, obj: JSON) -> JSON:
        r = ALL[resource]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = self._check(r, meta)
        with self._cond:
            if key in self._objects[resource]:
                raise KeyError(f"{resource} {key} exists")
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            if r.name in CUSTOM:
                # The status subresource's strategy: create cannot set status.
                obj.pop("status", None)
                meta["generation"] = 1
            return self._store(r, key, obj, "ADDED")

    def update(self, resource: str, obj: JSON) -> JSON:
        r = ALL[resource]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = self._check(r, meta)
        with self._cond:
            old = self._objects[resource].get(key)
            if old is None:
                raise KeyError(f"{resource} {key} does not exist")
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            if r.name in CUSTOM:
                # Update cannot set status; anything but metadata changed is a new
                # generation (apiextensions' customResourceStrategy.PrepareForUpdate).
                obj.pop("status", None)
                if "status" in old:
                    obj["status"] = copy.deepcopy(old["status"])
                gen = old["metadata"].get("generation", 1)
                changed = _non_meta(obj, old) != _non_meta(old, old)
                meta["generation"] = gen + 1 if changed else gen
            return self._store(r, key, obj, "MODIFIED")

    def update_status(self, resource: str, obj: JSON) -> JSON:
        """Write ``obj``'s status as a status-subresource PUT without a resourceVersion
        precondition would (another controller's write, say); only ``status`` changes."""
        meta = obj.get("metadata") or {}
        code, body = self._write_status(
            RESOURCES[resource], meta.get("namespace"), meta["name"], lambda _: obj, False
        )
        if code != 200:
            raise KeyError(body["message"])
        return body

    def apply(self, resource: str, obj: JSON) -> JSON:
        """Create or update."""
        meta = obj.get("metadata") or {}
        if self.get(resource, meta.get("name", ""), meta.get("namespace")) is None:
            return self.create(resource, obj)
        return self.update(resource, obj)

    def delete(self, resource: str, name: str, namespace: str | None = None) -> None:
        r = ALL[resource]
        with self._cond:
            obj = self._objects[resource].pop(_key(namespace, name))
            self._rv += 1
            # The DELETED event carries the last state, at the deletion's version.
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._emit(_Entry(self._rv, "DELETED", r.name, obj))

    def _check(self, r: ResourceType, meta: JSON) -> str:
        if not meta.get("name"):
            raise ValueError("metadata.name is required")
        if r.namespaced and not meta.get("namespace"):
            raise ValueError(f"{r.kind} needs metadata.namespace")
        if not r.namespaced:
            meta.pop("namespace", None)
        return _key(meta.get("namespace"), meta["name"])

    def _store(self, r: ResourceType, key: str, obj: JSON, event: str) -> JSON:
        self._rv += 1
        obj["kind"] = r.kind
        obj["apiVersion"] = r.api_version
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[r.name][key] = obj
        self._emit(_Entry(self._rv, event, r.name, copy.deepcopy(obj)))
        return copy.deepcopy(obj)

    def _write_status(
        self,
        r: ResourceType,
        namespace: str | None,
        name: str,
        change: Callable[[JSON], Any],
        check_version: bool,
    ) -> tuple[int, JSON]:
        """The status strategy: ``change`` (the old object -> the requested one) may
        change only ``status``; with ``check_version``, the requested object's
        resourceVersion, if it has one, must be the current one."""
        key = _key(namespace, name)
        with self._cond:
            old = self._objects[r.name].get(key)
            if old is None:
                return 404, _not_found(r, name)
            try:
                wanted = change(copy.deepcopy(old))
            except _PatchError as e:
                return e.code, status(e.code, e.reason, str(e))
            if not isinstance(wanted, dict):
                return 400, status(400, "BadRequest", "the patched object is not an object")
            rv = (wanted.get("metadata") or {}).get("resourceVersion")
            if check_version and rv is not None and rv != old["metadata"]["resourceVersion"]:
                return 409, status(
                    409,
                    "Conflict",
                    f"Operation cannot be fulfilled on {r.name}.{r.api_version.split('/')[0]} "
                    f'"{name}": the object has been modified; please apply your changes to '
                    "the latest version and try again",
                )
            new = copy.deepcopy(old)
            if "status" in wanted:
                new["status"] = copy.deepcopy(wanted["status"])
            else:
                new.pop("status", None)
            if new == old:
                return 200, copy.deepcopy(old)  # a no-op: no new version, no event
            return 200, self._store(r, key, new, "MODIFIED")

    def _emit(self, entry: _Entry) -> None:
        if self._observed or entry.resource is None:
            self._log.append(entry)
        self._cond.notify_all()

    # -- faults -------------------------------------------------------------------------

    def bookmark(self) -> str:
        """Send every open watch (that asked for bookmarks) the current resourceVersion."""
        with self._cond:
            self._emit(_Entry(self._rv, "BOOKMARK", None, None))
            return str(self._rv)

    def expire(self) -> None:
        """Compact: forget history up to now.  Open watches get ``ERROR 410`` and end;
        new watches from an older version, and old continue tokens, get 410 too."""
        with self._cond:
            self.compact()
            self._emit(_Entry(self._rv, "ERROR", None, None))

    def compact(self) -> str:
        """Forget history up to now, as etcd's periodic compaction does, without ending
        open watches (they are current): only a watch *from* an older version gets 410.
        Returns the compacted revision."""
        with self._cond:
            self._compacted = self._rv
            self._continues.clear()
            return str(self._rv)

    def throttle(self, times: int, retry_after: int = 1, resource: str | None = None) -> None:
        """Answer the next ``times`` list or watch requests (of ``resource``, or of any)
        with ``429 Too Many Requests`` and ``Retry-After: retry_after``, as API Priority
        and Fairness does when the control plane's priority level is full."""
        with self._cond:
            self._throttled[resource] = [times, retry_after]

    def _take_throttle(self, resource: str) -> int | None:
        """The Retry-After to answer this request with, or None to serve it."""
        with self._cond:
            for key in (resource, None):
                held = self._throttled.get(key)
                if held and held[0] > 0:
                    held[0] -= 1
                    return held[1]
        return None

    @contextmanager
    def unobserved(self) -> Iterator[None]:
        """Changes inside reach no watch — then :meth:`expire`, as compaction would."""
        with self._cond:
            self._observed = False
        try:
            yield
        finally:
            with self._cond:
                self._observed = True
            self.expire()

    def open_watches(self, resource: str | None = None) -> int:
        """Watch streams being served now (of one resource, or all)."""
        with self._cond:
            return sum(1 for r in self._watch_connections.values() if resource in (None, r))

    def drop_watches(self) -> int:
        """Cut every open watch stream mid-chunk (no terminating chunk)."""
        with self._cond:
            conns = set(self._watch_connections)
        self._shutdown(conns)
        return len(conns)

    @contextmanager
    def partition(self) -> Iterator[None]:
        """Inside, every connection (open or new) is cut without a response."""
        with self._cond:
            self._partitioned = True
            conns = set(self._connections)
        self._shutdown(conns)
        try:
            yield
        finally:
            with self._cond:
                self._partitioned = False

    @staticmethod
    def _shutdown(conns: set[socket.socket]) -> None:
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- requests (called on handler threads) -------------------------------------------

    def watch_requests(self, resource: str) -> list[Request]:
        return [r for r in self.requests if r.resource == resource and r.watch]

    def list_requests(self, resource: str) -> list[Request]:
        return [r for r in self.requests if r.resource == resource and not r.watch]

    def _serve(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in h.headers.items()}
        self.requests.append(Request(url.path, query, headers))
        if self._partitioned:
            h.close_connection = True
            self._shutdown({h.connection})
            return
        if not self._authorized(h):
            h.send_json(401, status(401, "Unauthorized", "Unauthorized"))
            return
        single = _SINGLE_POD.match(url.path)
        if single is not None:
            with self._cond:
                obj = self._objects["pods"].get(_key(single["ns"], single["name"]))
            if obj is None:
                h.send_json(404, status(404, "NotFound", f'pods "{single["name"]}" not found'))
            else:
                h.send_json(200, obj)
            return
        route = self._single_custom(url.path)
        if route is not None:
            res = RESOURCES[route["plural"]]
            with self._cond:
                obj = copy.deepcopy(self._objects[res.name].get(_key(route["ns"], route["name"])))
            if obj is None:
                h.send_json(404, _not_found(res, route["name"]))
            else:
                h.send_json(200, obj)
            return
        if self._serve_other(h, url.path, query):
            return
        namespace: str | None = None
        r = _BY_PATH.get(url.path)
        listed = _NAMESPACED_LIST.match(url.path)
        if r is None and listed is not None:
            r = self._type_at(listed)
            namespace = listed["ns"]
            if r is not None and (not r.namespaced or _parse_bool(query.get("watch"))):
                r = None  # the fake watches at the cluster path only
        if r is not None and not self._installed(r.name):
            r = None
        if r is None:
            h.send_json(
                404, status(404, "NotFound", "the server could not find the requested resource")
            )
            return
        watch = _parse_bool(query.get("watch"))
        if r.name in self.forbidden or (watch and r.name in self.forbidden_watch):
            h.send_json(403, _forbidden(r, "watch" if watch else "list"))
            return
        retry_after = self._take_throttle(r.name)
        if retry_after is not None:
            body = status(429, "TooManyRequests", "Too many requests, please try again later.")
            body["details"] = {"retryAfterSeconds": retry_after}
            h.send_json(429, body, {"Retry-After": str(retry_after)})
            return
        if watch:
            self._serve_watch(h, r, query)
        else:
            self._serve_list(h, r, query, namespace)

    @staticmethod
    def _type_at(m: re.Match[str]) -> ResourceType | None:
        """The resource a path's group, version and plural name, if the fake has it."""
        r = ALL.get(m["plural"])
        gv = f"{m['group']}/{m['version']}" if m["group"] else "v1"
        return r if r is not None and r.api_version == gv else None

    def _serve_other(self, h: _Handler, path: str, query: dict[str, str]) -> bool:
        """``/version``, API group discovery, a CRD by name, the pod proxy, and one object
        of any kind by name; False if ``path`` is none of them."""
        path = unquote(path)  # the client escapes path parameters (``pod%3A15020``)
        if path in ("/version", "/version/"):
            h.send_json(200, dict(self.version))
            return True
        proxy = _POD_PROXY.match(path)
        if proxy is not None:
            self._serve_proxy(h, proxy, query)
            return True
        crd = _CRD.match(path)
        if crd is not None:
            r = ALL.get(crd["plural"])
            if (
                r is None
                or r.name not in CUSTOM
                or not r.api_version.startswith(crd["group"] + "/")
            ):
                r = None
            if r is None or not self._installed(r.name):
                name = f"{crd['plural']}.{crd['group']}"
                what = f'customresourcedefinitions.apiextensions.k8s.io "{name}" not found'
                h.send_json(404, status(404, "NotFound", what))
            else:
                h.send_json(200, _crd(r))
            return True
        group = _GROUP_DISCOVERY.match(path)
        if group is not None:
            gv = f"{group['group']}/{group['version']}"
            served = [r for r in ALL.values() if r.api_version == gv and self._installed(r.name)]
            if not served:
                h.send_json(404, status(404, "NotFound",
                            "the server could not find the requested resource"))  # fmt: skip
            else:
                h.send_json(200, _resource_list(gv, served))
            return True
        single = _SINGLE.match(path)
        if single is None:
            return False
        r = self._type_at(single)
        if r is None or r.namespaced != (single["ns"] is not None):
            return False
        if not self._installed(r.name):
            return False
        if r.name in self.forbidden:
            h.send_json(403, _forbidden(r, "get"))
            return True
        with self._cond:
            obj = copy.deepcopy(self._objects[r.name].get(_key(single["ns"], single["name"])))
        if obj is None:
            h.send_json(404, _not_found(r, single["name"]))
        else:
            h.send_json(200, obj)
        return True

    def _serve_proxy(self, h: _Handler, m: re.Match[str], query: dict[str, str]) -> None:
        """The pod proxy (``pods/proxy``, verb get): the API server dials the pod's IP
        and port and relays the answer, status and body as they are."""
        ns, name = m["ns"], m["name"]
        port = int(m["port"] or 80)
        if "pods/proxy" in self.forbidden:
            body = status(403, "Forbidden", f'pods "{name}" is forbidden: User "kubernetes-admin" '
                          f'cannot get resource "pods/proxy" in API group "" in the namespace '
                          f'"{ns}"')  # fmt: skip
            h.send_json(403, body)
            return
        with self._cond:
            obj = copy.deepcopy(self._objects["pods"].get(_key(ns, name)))
        if obj is None:
            h.send_json(404, status(404, "NotFound", f'pods "{name}" not found'))
            return
        ip = (obj.get("status") or {}).get("podIP")
        answer = self.proxies.get((ns, name, port))
        if not ip or answer is None:
            where = f"{ip}:{port}" if ip else f"pod {name}: no IP address"
            message = (
                f"error trying to reach service: dial tcp {where}: connect: connection refused"
            )
            h.send_json(503, status(503, "ServiceUnavailable", message))
            return
        target = (m["path"] or "/") + (f"?{'&'.join(f'{k}={v}' for k, v in query.items())}"
                                       if query else "")  # fmt: skip
        code, data, ctype = answer(target)
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _authorized(self, h: _Handler) -> bool:
        """``Authorization: Bearer <token>``; the scheme is case-insensitive, as the API
        server's bearer-token authenticator reads it (``load_incluster_config`` sends
        ``bearer``)."""
        if self.token is None:
            return True
        scheme, _, token = (h.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and token.strip() == self.token

    def _installed(self, resource: str) -> bool:
        if resource in GATEWAY_API:
            return self.gateway_api
        return self.weft_crds if resource in WEFT_CRDS else True

    def _single_custom(self, path: str) -> re.Match[str] | None:
        """``/apis/G/V/namespaces/NS/PLURAL/NAME[/status]`` of an installed custom resource."""
        m = _SINGLE_CUSTOM.match(path)
        if m is None or m["plural"] not in CUSTOM or not self._installed(m["plural"]):
            return None
        return m if RESOURCES[m["plural"]].api_version == m["gv"] else None

    def _serve_post(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        headers = {k.lower(): v for k, v in h.headers.items()}
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length") or 0)) or b"{}")
        self.requests.append(Request(url.path, {}, headers, "POST", body))
        if not self._authorized(h):
            h.send_json(401, status(401, "Unauthorized", "Unauthorized"))
            return
        if url.path == ACCESS_REVIEWS:
            self._serve_access_review(h, body)
            return
        collection = _NAMESPACED_LIST.match(url.path)
        if collection is not None and collection["plural"] in WRITABLE:
            self._serve_object_write(h, collection, body)
            return
        if url.path != TOKEN_REVIEWS:
            h.send_json(405, status(405, "MethodNotAllowed", "the server does not allow this"))
            return
        if self.token_review_failure is not None:
            code = self.token_review_failure
            h.send_json(code, status(code, "InternalError", "token review failed"))
            return
        spec = body.get("spec") or {}
        token = spec.get("token", "")
        review = self._review_pod_token(token) or dict(self.token_reviews.get(token, {
            "authenticated": False, "error": "invalid bearer token"}))  # fmt: skip
        if review.get("authenticated"):
            wanted = spec.get("audiences") or []
            matched = [a for a in review.get("audiences", []) if not wanted or a in wanted]
            if wanted and not matched:
                review = {"authenticated": False, "error": "token audiences is invalid"}
            else:
                review["audiences"] = matched
        answer = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": review,
        }
        h.send_json(201, answer)

    def _serve_object_write(self, h: _Handler, m: re.Match[str], body: Any) -> None:
        """Create (POST to ``/api/v1/namespaces/NS/PLURAL``) or replace (PUT to
        ``.../PLURAL/NAME``) an object of :data:`WRITABLE`, answered as the API server
        does: 201 / 200 with the stored object, 404 for a missing namespace or object,
        409 ``AlreadyExists`` or ``Conflict`` (a stale ``resourceVersion``), 403 for
        :attr:`forbidden_writes`, 400 for a body that is not an object of the path's
        namespace and name."""
        r, namespace, name = ALL[m["plural"]], m["ns"], m.groupdict().get("name")
        verb = "update" if name else "create"
        if r.name in self.forbidden_writes:
            h.send_json(403, _forbidden(r, verb, namespace))
            return
        meta = body.get("metadata") if isinstance(body, dict) else None
        if (
            not isinstance(meta, dict)
            or meta.get("namespace", namespace) != namespace
            or (name and meta.get("name") != name)
        ):
            h.send_json(
                400, status(400, "BadRequest", "the body's metadata does not match the path")
            )
            return
        body = copy.deepcopy(body)
        body["metadata"]["namespace"] = namespace
        key = _key(namespace, meta.get("name", ""))
        with self._cond:
            if _key(None, namespace) not in self._objects["namespaces"]:
                h.send_json(404, status(404, "NotFound", f'namespaces "{namespace}" not found'))
                return
            old = self._objects[r.name].get(key)
            if name is None:
                if old is not None:
                    h.send_json(409, status(409, "AlreadyExists",
                                f'{r.name} "{meta.get("name")}" already exists'))  # fmt: skip
                    return
                h.send_json(201, self.create(r.name, body))
                return
            if old is None:
                h.send_json(404, _not_found(r, name))
                return
            wanted = meta.get("resourceVersion")
            if wanted and wanted != old["metadata"]["resourceVersion"]:
                h.send_json(409, status(409, "Conflict", f'Operation cannot be fulfilled on '
                            f'{r.name} "{name}": the object has been modified; please apply '
                            'your changes to the latest version and try again'))  # fmt: skip
                return
            h.send_json(200, self.update(r.name, body))

    def _serve_access_review(self, h: _Handler, body: JSON) -> None:
        """SelfSubjectAccessReview: may the caller do this?  RBAC's answer: allowed with
        the binding that allows it, or not allowed with no reason (RBAC never denies; it
        only fails to allow)."""
        spec = body.get("spec") or {}
        attrs = spec.get("resourceAttributes") or {}
        verb, group = attrs.get("verb", ""), attrs.get("group", "")
        resource = attrs.get("resource", "") + (f"/{attrs['subresource']}"
                                                 if attrs.get("subresource") else "")  # fmt: skip
        denied = any(
            all(want in ("*", got) for want, got in zip(rule, (verb, group, resource), strict=True))
            for rule in self.denied
        )
        answer: JSON = {"allowed": not denied}
        if not denied:
            answer["reason"] = (
                'RBAC: allowed by ClusterRoleBinding "cluster-admin" of '
                'ClusterRole "cluster-admin" to User "kubernetes-admin"'
            )
        h.send_json(201, {
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": answer,
        })  # fmt: skip

    def _serve_write(self, h: _Handler) -> None:
        """PUT and PATCH: of the custom resources' status subresource only."""
        url = urlsplit(h.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in h.headers.items()}
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = _UNDECODABLE
        self.requests.append(Request(url.path, query, headers, h.command, body))
        if not self._authorized(h):
            h.send_json(401, status(401, "Unauthorized", "Unauthorized"))
            return
        single = _SINGLE.match(url.path)
        if h.command == "PUT" and single is not None and single["plural"] in WRITABLE:
            self._serve_object_write(h, single, body)
            return
        route = self._single_custom(url.path)
        if route is None:
            h.send_json(
                404, status(404, "NotFound", "the server could not find the requested resource")
            )
            return
        if not route["status"]:
            only = "the fake serves writes of the status subresource only"
            h.send_json(405, status(405, "MethodNotAllowed", only))
            return
        r = RESOURCES[route["plural"]]
        if self.status_failure is not None:
            code = self.status_failure
            reason = {403: "Forbidden", 404: "NotFound", 409: "Conflict"}.get(code, "InternalError")
            h.send_json(code, status(code, reason, f"{r.name}/status {reason.lower()}"))
            return
        if body is _UNDECODABLE:
            h.send_json(400, status(400, "BadRequest", "the request body is not JSON"))
            return
        change: Callable[[JSON], Any]
        if h.command == "PUT":
            if not isinstance(body, dict):
                h.send_json(400, status(400, "BadRequest", "the body is not an object"))
                return
            if not (body.get("metadata") or {}).get("resourceVersion"):
                h.send_json(422, status(422, "Invalid", f'{r.kind}.{r.api_version.split("/")[0]} '
                            f'"{route["name"]}" is invalid: metadata.resourceVersion: Invalid '
                            'value: 0x0: must be specified for an update'))  # fmt: skip
                return

            def change(_old: JSON) -> JSON:
                return body

        else:
            ctype = headers.get("content-type", "").split(";")[0].strip()
            if ctype == "application/merge-patch+json":
                if not isinstance(body, dict):
                    h.send_json(400, status(400, "BadRequest", "a merge patch is an object"))
                    return

                def change(old: JSON) -> JSON:
                    return _merge_patch(old, body)

            elif ctype == "application/json-patch+json":
                if not isinstance(body, list) or not all(isinstance(op, dict) for op in body):
                    h.send_json(400, status(400, "BadRequest", "json: cannot unmarshal object "
                                "into Go value of type jsonpatch.Patch"))  # fmt: skip
                    return

                def change(old: JSON) -> JSON:
                    return _json_patch(old, body)

            else:
                unknown = (
                    "the body of the request was in an unknown format - accepted media "
                    "types include: application/json-patch+json, application/merge-patch+json"
                )
                h.send_json(415, status(415, "UnsupportedMediaType", unknown))
                return
        code, answer = self._write_status(r, route["ns"], route["name"], change, True)
        h.send_json(code, answer)

    def _serve_list(
        self, h: _Handler, r: ResourceType, query: dict[str, str], namespace: str | None = None
    ) -> None:
        limit = int(query["limit"]) if query.get("limit") else None
        try:
            wanted = _label_selector(query.get("labelSelector", ""))
            fields = _field_selector(query.get("fieldSelector", ""))
        except ValueError as e:
            h.send_json(400, status(400, "BadRequest", str(e)))
            return
        token = query.get("continue")
        with self._cond:
            if token:
                held = self._continues.pop(token, None)
                if held is None:
                    h.send_json(
                        410,
                        status(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a "
                            "consistent list result. You can start a new list without the "
                            "continue parameter.",
                        ),
                    )
                    return
                rv, items = held
            else:
                rv = self._rv
                items = [
                    copy.deepcopy(obj)
                    for _, obj in sorted(self._objects[r.name].items())
                    if namespace in (None, obj["metadata"].get("namespace"))
                    and _selects(wanted, obj["metadata"].get("labels") or {})
                    and all(obj["metadata"].get(k) == v for k, v in fields.items())
                ]
            page, rest = (items[:limit], items[limit:]) if limit else (items, [])
            meta: JSON = {"resourceVersion": str(rv)}
            if rest:
                next_token = uuid.uuid4().hex
                self._continues[next_token] = (rv, rest)
                meta["continue"] = next_token
                meta["remainingItemCount"] = len(rest)
        for obj in page:
            # Items of a typed list carry no kind/apiVersion; the list does. Custom
            # resources' lists are unstructured: their items keep both.
            if r.name not in CUSTOM:
                obj.pop("kind", None)
                obj.pop("apiVersion", None)
        h.send_json(
            200,
            {"kind": f"{r.kind}List", "apiVersion": r.api_version, "metadata": meta, "items": page},
        )
        if self.after_list_page is not None:
            self.after_list_page(r.name)

    def _serve_watch(self, h: _Handler, r: ResourceType, query: dict[str, str]) -> None:
        bookmarks = _parse_bool(query.get("allowWatchBookmarks"))
        timeout = int(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        deadline = time.monotonic() + timeout if timeout else None
        since = query.get("resourceVersion") or "0"
        initial: list[JSON] = []
        too_old = False
        with self._cond:
            if since == "0":
                # "Start at most recent": synthetic ADDED for what exists, then changes.
                initial = [copy.deepcopy(o) for _, o in sorted(self._objects[r.name].items())]
                cursor = len(self._log)
            else:
                rv = int(since)
                too_old = rv < self._compacted
                cursor = next((i for i, e in enumerate(self._log) if e.rv > rv), len(self._log))
        if too_old:
            gone = status(410, "Expired", f"too old resource version: {since} ({self._compacted})")
            if self.gone_as_status:
                h.send_json(410, gone)
            else:
                h.start_chunked()
                h.send_event({"type": "ERROR", "object": gone})
                h.end_chunked()
            return
        try:
            h.start_chunked()
            # Registered once the headers are out: dropping it now cuts a stream the
            # client has begun, rather than a request urllib3 would silently retry.
            with self._cond:
                self._watch_connections[h.connection] = r.name
            if initial:
                h.send_events([{"type": "ADDED", "object": obj} for obj in initial])
            next_bookmark = (
                time.monotonic() + self.bookmark_interval
                if bookmarks and self.bookmark_interval
                else None
            )
            while True:
                periodic: JSON | None = None
                with self._cond:
                    while cursor >= len(self._log) and not self._closing:
                        now = time.monotonic()
                        remaining = deadline - now if deadline else 0.5
                        if next_bookmark is not None:
                            remaining = min(remaining, next_bookmark - now)
                        if remaining <= 0:
                            break
                        self._cond.wait(min(remaining, 0.5))
                    entries, cursor = self._log[cursor:], len(self._log)
                    closing = self._closing
                    if next_bookmark is not None and time.monotonic() >= next_bookmark:
                        assert self.bookmark_interval is not None
                        next_bookmark = time.monotonic() + self.bookmark_interval
                        # Everything up to now is in `entries` (sent below, before it),
                        # so the bookmark promises nothing the stream has not carried.
                        # Not while changes go unobserved: that would skip them silently.
                        if self._observed:
                            periodic = _bookmark(r, self._rv)
                if closing or (
                    deadline and time.monotonic() >= deadline and not entries and not periodic
                ):
                    h.end_chunked()
                    return
                batch: list[JSON] = []
                for e in entries:
                    if e.type == "ERROR":
                        h.send_events(batch)
                        h.send_event(
                            {
                                "type": "ERROR",
                                "object": status(
                                    410, "Expired", f"too old resource version: {e.rv}"
                                ),
                            }
                        )
                        h.end_chunked()
                        return
                    if e.type == "BOOKMARK":
                        if bookmarks:
                            batch.append(_bookmark(r, e.rv))
                    elif e.resource == r.name:
                        batch.append({"type": e.type, "object": e.obj})
                if periodic is not None:
                    batch.append(periodic)
                if batch:
                    h.send_events(batch)
        except OSError:
            h.close_connection = True  # dropped: by the client, or by drop_watches()
        finally:
            with self._cond:
                self._watch_connections.pop(h.connection, None)


def _label_selector(text: str) -> list[tuple[str, str, bool]]:
    """An equality-based selector (``a=b,c==d,e!=f``) as (key, value, equal) terms."""
    terms = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        pieces = re.split(r"(!=|==|=)", part, maxsplit=1)
        if len(pieces) != 3:
            raise ValueError(f"unable to parse requirement: {part!r}")
        key, op, value = pieces
        terms.append((key.strip(), value.strip(), op != "!="))
    return terms


def _field_selector(text: str) -> dict[str, str]:
    """``metadata.name=x,metadata.namespace=y``: the field selectors every resource
    supports (equality only, as the fake needs); others are the API server's 400."""
    out: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.partition("=")
        key = key.rstrip("=")
        value = value.lstrip("=")
        if not sep or key not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"field label not supported: {key}")
        out[key.removeprefix("metadata.")] = value
    return out


def _selects(terms: Sequence[tuple[str, str, bool]], labels: dict[str, str]) -> bool:
    return all((labels.get(k) == v) == equal for k, v, equal in terms)


def _crd(r: ResourceType) -> JSON:
    """The CustomResourceDefinition of an installed custom resource, established."""
    group, version = r.api_version.split("/")
    conditions = [
        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
         "message": "no conflicts found"},
        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
         "message": "the initial names have been accepted"},
    ]  # fmt: skip
    return {
        "kind": "CustomResourceDefinition",
        "apiVersion": "apiextensions.k8s.io/v1",
        "metadata": {"name": f"{r.name}.{group}", "resourceVersion": "1"},
        "spec": {
            "group": group,
            "names": {"plural": r.name, "kind": r.kind},
            "scope": "Namespaced" if r.namespaced else "Cluster",
            "versions": [{"name": version, "served": True, "storage": True}],
        },
        "status": {"conditions": conditions, "storedVersions": [version]},
    }


def _resource_list(group_version: str, served: Sequence[ResourceType]) -> JSON:
    """API discovery of one group version (``/apis/G/V``): an APIResourceList."""
    resources: list[JSON] = []
    for r in served:
        resources.append({"name": r.name, "singularName": r.kind.lower(), "kind": r.kind,
                          "namespaced": r.namespaced,
                          "verbs": ["get", "list", "watch", "create", "update", "patch",
                                    "delete"]})  # fmt: skip
        if r.name in CUSTOM:
            resources.append({"name": f"{r.name}/status", "singularName": "", "kind": r.kind,
                              "namespaced": r.namespaced,
                              "verbs": ["get", "patch", "update"]})  # fmt: skip
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources}  # fmt: skip


def _key(namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def _bookmark(r: ResourceType, rv: int) -> JSON:
    return {
        "type": "BOOKMARK",
        "object": {
            "kind": r.kind,
            "apiVersion": r.api_version,
            "metadata": {"resourceVersion": str(rv)},
        },
    }


def _forbidden(r: ResourceType, verb: str, namespace: str | None = None) -> JSON:
    """RBAC's denial, worded as the API server words it."""
    group = r.api_version.split("/")[0] if "/" in r.api_version else ""
    qualified = f"{r.name}.{group}" if group else r.name
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    body = status(
        403,
        "Forbidden",
        f'{qualified} is forbidden: User "system:serviceaccount:weft-system:weft-controlplane" '
        f'cannot {verb} resource "{r.name}" in API group "{group}" {scope}',
    )
    body["details"] = {"group": group, "kind": r.name}
    return body


def _not_found(r: ResourceType, name: str) -> JSON:
    group = r.api_version.split("/")[0] if "/" in r.api_version else ""
    qualified = f"{r.name}.{group}" if group else r.name
    body = status(404, "NotFound", f'{qualified} "{name}" not found')
    body["details"] = {"name": name, "group": group, "kind": r.name}
    return body


def _non_meta(obj: JSON, _old: JSON) -> JSON:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


_UNDECODABLE = object()


class _PatchError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, ``null`` deletes, anything else (lists
    included) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _json_patch(doc: JSON, ops: list[JSON]) -> JSON:
    """RFC 6902 (add, remove, replace, move, copy, test); a failed op is 422, as
    kube-apiserver answers."""

    def fail(message: str) -> _PatchError:
        return _PatchError(422, "", message)

    def walk(root: Any, pointer: str) -> tuple[Any, str | int]:
        if not pointer.startswith("/"):
            raise fail(f"invalid path {pointer!r}")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]
        node = root
        for part in parts[:-1]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise fail(f"doc is missing path: {pointer}")
        last = parts[-1]
        if isinstance(node, list):
            if last == "-":
                return node, len(node)
            if not last.isdigit():
                raise fail(f"invalid array index {last!r} in {pointer}")
            return node, int(last)
        if not isinstance(node, dict):
            raise fail(f"doc is missing path: {pointer}")
        return node, last

    def get(root: Any, pointer: str) -> Any:
        if pointer == "":
            return root
        node, key = walk(root, pointer)
        try:
            return node[key]
        except (KeyError, IndexError):
            raise fail(f"doc is missing path: {pointer}") from None

    def remove(root: Any, pointer: str) -> Any:
        node, key = walk(root, pointer)
        try:
            return node.pop(key)
        except (KeyError, IndexError):
            raise fail(f"doc is missing path: {pointer}") from None

    def add(root: Any, pointer: str, value: Any) -> None:
        node, key = walk(root, pointer)
        if isinstance(node, list):
            assert isinstance(key, int)
            if key > len(node):
                raise fail(f"index out of range in {pointer}")
            node.insert(key, copy.deepcopy(value))
        else:
            node[key] = copy.deepcopy(value)

    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path")
        if not isinstance(path, str):
            raise _PatchError(400, "BadRequest", f"operation {op!r} has no path")
        if kind == "add":
            add(doc, path, op.get("value"))
        elif kind == "remove":
            remove(doc, path)
        elif kind == "replace":
            remove(doc, path)
            add(doc, path, op.get("value"))
        elif kind in ("move", "copy"):
            value = get(doc, str(op.get("from")))
            if kind == "move":
                remove(doc, str(op.get("from")))
            add(doc, path, value)
        elif kind == "test":
            if get(doc, path) != op.get("value"):
                raise fail(f"testing value {path} failed: test failed")
        else:
            raise _PatchError(400, "BadRequest", f"Unexpected kind: {kind}")
    return doc


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked responses
    # TCP_NODELAY, as Go's net/http sets: headers and body go out in separate writes, and
    # Nagle's algorithm would hold the body for the client's delayed ACK (40 ms a request).
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        with self.server.fake._cond:
            self.server.fake._connections.add(self.request)
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.settimeout(10)
                self.request.do_handshake()  # a client that does not trust us ends here
                self.request.settimeout(None)
            except BaseException:
                with self.server.fake._cond:
                    self.server.fake._connections.discard(self.request)
                raise
        super().setup()

    def finish(self) -> None:
        with self.server.fake._cond:
            self.server.fake._connections.discard(self.request)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:
        self.server.fake._serve(self)

    def do_POST(self) -> None:
        self.server.fake._serve_post(self)

    def do_PATCH(self) -> None:
        self.server.fake._serve_write(self)

    def do_PUT(self) -> None:
        self.server.fake._serve_write(self)

    def send_json(self, code: int, body: JSON, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def send_event(self, event: JSON) -> None:
        self.send_events([event])

    def send_events(self, events: Sequence[JSON]) -> None:
        """One chunk per event; or, with the fake's ``coalesce_events``, one for all;
        either cut to ``chunk_bytes`` if set."""
        fake = self.server.fake
        lines = [json.dumps(e).encode() + b"\n" for e in events]
        chunks = [b"".join(lines)] if fake.coalesce_events else lines
        if fake.chunk_bytes:
            n = fake.chunk_bytes
            chunks = [c[i : i + n] for c in chunks for i in range(0, len(c), n)]
        for data in chunks:
            if data:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is FakeKubeAPI.requests


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins handler threads: nothing outlives a test

    def __init__(self, fake: FakeKubeAPI) -> None:
        self.fake = fake
        self.tls = fake.certs.server_context() if fake.certs is not None else None
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        # The handshake happens on the handler's thread (_Handler.setup), so a client that
        # connects and says nothing cannot stall the accept loop.
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connections cut on purpose end in errors; the tests judge by outcomes


# -- objects shaped like the API's --------------------------------------------------------


def namespace(name: str, labels: dict[str, str] | None = None) -> JSON:
    return {
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def pod(
    name: str,
    namespace: str = "default",
    *,
    node: str | None = "node-1",
    ip: str | None = "10.244.1.2",
    ips: Sequence[str] | None = None,
    service_account: str = "default",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    ready: bool = True,
    phase: str = "Running",
    ports: Sequence[int | tuple[int, str]] = (8080,),
    host_network: bool = False,
    uid: str | None = None,
) -> JSON:
    addresses = list(ips) if ips is not None else ([ip] if ip else [])
    container_ports = [
        {"containerPort": p, "protocol": "TCP"}
        if isinstance(p, int)
        else {"name": p[1], "containerPort": p[0], "protocol": "TCP"}
        for p in ports
    ]
    metadata: JSON = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if annotations:
        metadata["annotations"] = dict(annotations)
    if uid:
        metadata["uid"] = uid
    spec: JSON = {
        "containers": [
            {
                "name": "app",
                "image": "registry.example/app:1",
                "ports": container_ports,
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "imagePullPolicy": "IfNotPresent",
            }
        ],
        "restartPolicy": "Always",
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": service_account,
        "serviceAccount": service_account,
        "schedulerName": "default-scheduler",
    }
    if node:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    condition = "True" if ready else "False"
    status: JSON = {
        "phase": phase,
        "conditions": [
            {"type": "PodScheduled", "status": "True" if node else "False"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": condition},
            {"type": "Ready", "status": condition},
        ],
        "qosClass": "BestEffort",
    }
    if node:
        status["hostIP"] = "10.240.0.11"
    if addresses:
        status["podIP"] = addresses[0]
        status["podIPs"] = [{"ip": a} for a in addresses]
    return {"metadata": metadata, "spec": spec, "status": status}


def service(
    name: str,
    namespace: str = "default",
    *,
    cluster_ip: str | None = "10.96.0.10",
    ports: Sequence[tuple[int, int | str] | tuple[int, int | str, str]] = ((80, 8080),),
    selector: dict[str, str] | None = None,
    type: str = "ClusterIP",
) -> JSON:
    spec: JSON = {
        "type": type,
        "sessionAffinity": "None",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
        "ports": [
            {
                **({"name": p[2]} if len(p) > 2 else {}),
                "port": p[0],
                "targetPort": p[1],
                "protocol": "TCP",
            }
            for p in ports
        ],
    }
    if selector is not None:
        spec["selector"] = dict(selector)
    if type == "ExternalName":
        spec["externalName"] = "db.example.com"
    elif cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
        spec["clusterIPs"] = [cluster_ip]
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(
    name: str,
    namespace: str = "default",
    *,
    service: str,
    endpoints: Sequence[tuple[str, JSON | None, bool | None]] = (),
    ports: Sequence[tuple[str, int]] = (("", 8080),),
    address_type: str = "IPv4",
) -> JSON:
    """``endpoints``: (address, the pod object or None, ready — None leaves it unset)."""
    eps = []
    for address, target, ready in endpoints:
        conditions: JSON = {}
        if ready is not None:
            conditions = {"ready": ready, "serving": ready, "terminating": False}
        ep: JSON = {"addresses": [address], "conditions": conditions}
        if target is not None:
            meta = target["metadata"]
            ep["targetRef"] = {
                "kind": "Pod",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            }
            if target.get("spec", {}).get("nodeName"):
                ep["nodeName"] = target["spec"]["nodeName"]
        eps.append(ep)
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": address_type,
        "endpoints": eps,
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
    }
