"""Node bootstrap on Kubernetes: the agent's projected ServiceAccount token, checked with
the TokenReview API.

The agent DaemonSet mounts a projected token with ``audience: weft-controlplane`` and a
short expiry (the kubelet rotates it), and sends it as the bootstrap credential.  The
control plane asks the API server (``POST /apis/authentication.k8s.io/v1/tokenreviews``
with that audience) who it is.  Accepted only when:

* ``status.authenticated`` is true and the reviewed audiences include ours — a token
  minted for another audience (the default API audience, say) is refused, so a token
  stolen from some other workload's volume is useless here;
* the user is the agent's service account, ``system:serviceaccount:<ns>:<sa>`` (default
  ``weft-system/weft-agent``);
* the node is known: Kubernetes 1.30+ puts the node of the pod the token is bound to in
  ``user.extra["authentication.kubernetes.io/node-name"]``; older clusters give only the
  pod name and UID, and the node is read from that pod (``spec.nodeName``, and the UID
  must match, so a token of a deleted pod whose name was reused does not count).

The node certificate is then issued for *that* node only: the signer compares it with
the node the request names.  This is the same trust chain Istio's ztunnel uses — the
kubelet vouches for which pod a token belongs to, the API server for the pod's node.

**Sidecars** (:meth:`TokenReviewBootstrap.pod_for`) present their *own pod's* projected
token, for the same audience (``weft inject`` mounts it).  The review must name a service
account user *and* a bound pod (name and UID: a legacy Secret token names no pod and is
refused), and the pod, read from the API, must

* still be that pod (same UID), run as that service account, be scheduled (on the node
  the token names, when the API server names one) and not have finished;
* be in sidecar mode: the annotation ``weft.io/mode: sidecar`` or an injected
  ``weft-sidecar`` container — a node-mode pod's certificate belongs to its node agent,
  whose keys never leave the node, so its token gets nothing here.

The signer then signs only ``spiffe://<td>/ns/<pod's ns>/sa/<pod's sa>``.  This is how
Istio's istiod authenticates an istio-proxy's CSR (its pod's token, TokenReview, the
identity from the token's service account), with the pod read back as well.

:class:`TrustBundlePublisher` keeps the trust anchors in a ConfigMap of every labelled
namespace, for sidecar pods to mount (the identity side's one write to the API).

API errors (unreachable, 5xx, timeouts) raise :class:`TokenReviewUnavailable`: the API
server of the control plane answers 500 and the agent retries, instead of being told
its credential is bad.  This module and :mod:`controlplane.discovery.kube` are the only
control plane modules that import ``kubernetes``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.identity.signer import CredentialCheckUnavailable, CredentialRefused, PodClaim
from weft.mesh import MODE_KEY, SIDECAR_MODE
from weft.wire import RefusalCode

log = logging.getLogger("weft.controlplane.identity")

DEFAULT_AUDIENCE = "weft-controlplane"
DEFAULT_AGENT = ("weft-system", "weft-agent")
NODE_NAME = "authentication.kubernetes.io/node-name"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
SA_PREFIX = "system:serviceaccount:"
SIDECAR_CONTAINER = "weft-sidecar"
"""The container ``weft inject`` adds (weft.inject.SIDECAR_NAME)."""


class TokenReviewUnavailable(CredentialCheckUnavailable):
    """The API server could not review the token now; the agent should retry."""


class TokenReviewBootstrap:
    """:class:`~controlplane.identity.signer.BootstrapTokens` backed by TokenReview.

    Called from the signer's worker threads; the ``kubernetes`` client is synchronous and
    its ``ApiClient`` is safe to share between threads (urllib3 pool).
    """

    def __init__(
        self,
        api: k8s.ApiClient,
        *,
        audience: str = DEFAULT_AUDIENCE,
        agent: tuple[str, str] = DEFAULT_AGENT,
        timeout: float = 5.0,
    ) -> None:
        self.api = api
        self.audience = audience
        self.agent_namespace, self.agent_service_account = agent
        self.timeout = timeout

    @property
    def expected_user(self) -> str:
        return f"system:serviceaccount:{self.agent_namespace}:{self.agent_service_account}"

    def node_for(self, token: str) -> str | None:
        status = self._review(token)
        if not status.get("authenticated"):
            log.warning(
                "bootstrap token refused by TokenReview: %s",
                status.get("error") or "not authenticated",
            )
            return None
        audiences = status.get("audiences")
        # The API server answers with the audiences the token matched; an authenticator
        # that ignores audiences leaves it empty, which we cannot accept.
        if not isinstance(audiences, list) or self.audience not in audiences:
            log.warning(
                "bootstrap token is not for audience %r (it matched %r): mount a projected "
                "token with that audience", self.audience, audiences,
            )  # fmt: skip
            return None
        user = status.get("user") or {}
        username = user.get("username")
        if username != self.expected_user:
            log.warning(
                "bootstrap token belongs to %r, not the agent's service account %r",
                username, self.expected_user,
            )  # fmt: skip
            return None
        extra: dict[str, Any] = user.get("extra") or {}
        node = _single(extra.get(NODE_NAME))
        if node:
            return node
        pod, uid = _single(extra.get(POD_NAME)), _single(extra.get(POD_UID))
        if not pod:
            log.warning(
                "bootstrap token of %s is not bound to a pod: mount a projected token "
                "(serviceAccountToken volume), not a legacy Secret token", username,
            )  # fmt: skip
            return None
        return self._node_of_pod(pod, uid)

    def pod_for(self, token: str) -> PodClaim:
        """The sidecar-mode pod ``token`` is bound to; raises
        :class:`~controlplane.identity.signer.CredentialRefused` with the reason, or
        :class:`TokenReviewUnavailable`."""
        status = self._review(token)
        if not status.get("authenticated"):
            raise CredentialRefused(
                RefusalCode.UNAUTHENTICATED,
                f"the pod token is not valid: {status.get('error') or 'not authenticated'}",
            )
        audiences = status.get("audiences")
        if not isinstance(audiences, list) or self.audience not in audiences:
            raise CredentialRefused(
                RefusalCode.UNAUTHENTICATED,
                f"the pod token is not for audience {self.audience!r}: mount a projected "
                "serviceAccountToken with that audience (weft inject does)",
            )
        user = status.get("user") or {}
        username = user.get("username")
        namespace, _, service_account = (
            username[len(SA_PREFIX) :].partition(":")
            if isinstance(username, str) and username.startswith(SA_PREFIX)
            else ("", "", "")
        )
        if not namespace or not service_account:
            raise CredentialRefused(
                RefusalCode.UNAUTHENTICATED,
                f"the token belongs to {username!r}, not to a service account",
            )
        extra: dict[str, Any] = user.get("extra") or {}
        name, uid = _single(extra.get(POD_NAME)), _single(extra.get(POD_UID))
        if not name or not uid:
            raise CredentialRefused(
                RefusalCode.UNAUTHENTICATED,
                f"the token of {username} is not bound to a pod: mount a projected "
                "serviceAccountToken (weft inject does), not a legacy Secret token",
            )
        where = f"{namespace}/{name}"
        obj = self._read_pod(namespace, name)
        if obj is None:
            raise CredentialRefused(RefusalCode.UNAUTHENTICATED, f"pod {where} does not exist")
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        if meta.get("uid") != uid:
            raise CredentialRefused(
                RefusalCode.UNAUTHENTICATED,
                f"pod {where} was replaced (the token is for uid {uid}, the pod is "
                f"{meta.get('uid')})",
            )
        if (spec.get("serviceAccountName") or "default") != service_account:
            raise CredentialRefused(
                RefusalCode.UNAUTHENTICATED,
                f"pod {where} runs as service account {spec.get('serviceAccountName')!r}, "
                f"the token is {service_account!r}'s",
            )
        node = spec.get("nodeName")
        if not isinstance(node, str) or not node:
            raise CredentialRefused(
                RefusalCode.POD_NOT_SIDECAR, f"pod {where} is not scheduled on a node"
            )
        token_node = _single(extra.get(NODE_NAME))
        if token_node and token_node != node:
            raise CredentialRefused(
                RefusalCode.UNAUTHENTICATED,
                f"the token was issued on node {token_node}, pod {where} is on {node}",
            )
        phase = (obj.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            raise CredentialRefused(RefusalCode.POD_NOT_SIDECAR, f"pod {where} has {phase}")
        if not _in_sidecar_mode(meta, spec):
            raise CredentialRefused(
                RefusalCode.POD_NOT_SIDECAR,
                f"pod {where} is not in sidecar mode (no {MODE_KEY}: {SIDECAR_MODE} "
                f"annotation, no {SIDECAR_CONTAINER} container): its node agent holds its "
                "certificate",
            )
        return PodClaim(namespace, name, uid, service_account, node)

    def _review(self, token: str) -> dict[str, Any]:
        # A plain dict: the client serialises it as is (no model round trip).
        body: Any = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        try:
            resp: Any = k8s.AuthenticationV1Api(self.api).create_token_review(
                body, _preload_content=False, _request_timeout=self.timeout
            )
            data = json.loads(resp.data)
        except ApiException as e:
            raise TokenReviewUnavailable(
                f"TokenReview failed: HTTP {e.status} {e.reason} (does the control plane's "
                "service account may create tokenreviews? see docs/identity.md)"
            ) from None
        except Exception as e:  # urllib3 errors, timeouts, bad JSON
            raise TokenReviewUnavailable(f"TokenReview failed: {type(e).__name__}: {e}") from None
        status = data.get("status") if isinstance(data, dict) else None
        if not isinstance(status, dict):
            raise TokenReviewUnavailable("TokenReview answer has no status")
        return status

    def _read_pod(self, namespace: str, pod: str) -> dict[str, Any] | None:
        """The pod object, None if it does not exist."""
        try:
            resp: Any = k8s.CoreV1Api(self.api).read_namespaced_pod(
                pod, namespace, _preload_content=False, _request_timeout=self.timeout
            )
            obj = json.loads(resp.data)
        except ApiException as e:
            if e.status == 404:
                return None
            raise TokenReviewUnavailable(
                f"reading pod {namespace}/{pod}: HTTP {e.status}"
            ) from None
        except Exception as e:
            raise TokenReviewUnavailable(
                f"reading pod {namespace}/{pod}: {type(e).__name__}: {e}"
            ) from None
        if not isinstance(obj, dict):
            raise TokenReviewUnavailable(f"reading pod {namespace}/{pod}: not an object")
        return obj

    def _node_of_pod(self, pod: str, uid: str | None) -> str | None:
        obj = self._read_pod(self.agent_namespace, pod)
        if obj is None:
            log.warning("bootstrap token's pod %s/%s does not exist", self.agent_namespace, pod)
            return None
        meta = obj.get("metadata") or {}
        if uid and meta.get("uid") != uid:
            log.warning("bootstrap token's pod %s was replaced (uid %s, token for %s)", pod,
                        meta.get("uid"), uid)  # fmt: skip
            return None
        node = (obj.get("spec") or {}).get("nodeName")
        return node if isinstance(node, str) and node else None


def _in_sidecar_mode(meta: dict[str, Any], spec: dict[str, Any]) -> bool:
    annotations = meta.get("annotations") or {}
    if isinstance(annotations, dict) and annotations.get(MODE_KEY) == SIDECAR_MODE:
        return True
    containers = [*(spec.get("containers") or ()), *(spec.get("initContainers") or ())]
    return any(isinstance(c, dict) and c.get("name") == SIDECAR_CONTAINER for c in containers)


def _single(value: Any) -> str | None:
    """``extra`` values are lists of strings; take the one value, or None."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    return None


# --------------------------------------------------------------------------- trust bundle

TRUST_BUNDLE_NAME = "weft-trust-bundle"
"""The ConfigMap a sidecar mounts (``weft inject --trust-bundle-configmap``)."""
TRUST_BUNDLE_KEY = "ca.crt"
CAPTURED_NAMESPACES = "weft.io/capture=enabled"
MANAGED_LABELS = {"app.kubernetes.io/part-of": "weft", "app.kubernetes.io/managed-by": "weft"}


@dataclass
class PublishRound:
    """What one pass of :meth:`TrustBundlePublisher.publish_once` did."""

    namespaces: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: list[str] = field(default_factory=list)
    """``namespace: reason`` of each write that did not succeed (retried next pass)."""


class TrustBundlePublisher:
    """Keeps a ConfigMap ``weft-trust-bundle`` (``ca.crt``: the trust anchors) in every
    namespace labelled ``weft.io/capture=enabled``, as istiod keeps
    ``istio-ca-root-cert`` in each namespace.

    Why: a sidecar-mode pod needs the anchors before it has any certificate (to verify
    the control plane it asks), and a pod can mount only a ConfigMap of its own
    namespace; the anchors are public, so a copy per namespace costs nothing.  Which
    namespaces: the labelled ones — where capture (node mode) or injected pods live; a
    sidecar pod in an unlabelled namespace waits in ContainerCreating until the
    namespace is labelled (or the ConfigMap is made by hand: ``weft identity init
    --secret-manifest`` prints one).  A ConfigMap left in a namespace whose label was
    removed is left alone: it holds nothing secret, and deleting it could break a pod
    still mounting it.

    How: a pass lists the labelled namespaces and the ConfigMaps of that name (two list
    calls, whatever the number of namespaces), creates the missing ones and replaces
    those whose anchors differ (with the ``resourceVersion`` read: a concurrent writer
    makes it 409, and the next pass looks again).  Passes run at start, on every
    Namespace event of the Kubernetes source (:meth:`poke`), and every ``interval`` s
    (someone edited or deleted a copy).  Two control plane replicas write the same
    content, so no leader election: the loser of a race gets 409 and then finds the
    winner's copy equal to its own.  The anchors change only with a restart (a new CA
    is a restart, docs/identity.md), which publishes them in the first pass.
    """

    def __init__(
        self,
        api: k8s.ApiClient,
        bundle: Callable[[], str],
        *,
        trust_domain: str,
        name: str = TRUST_BUNDLE_NAME,
        selector: str = CAPTURED_NAMESPACES,
        interval: float = 60.0,
        retry: float = 5.0,
        timeout: float = 10.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.api = api
        self.bundle = bundle
        self.trust_domain = trust_domain
        self.name = name
        self.selector = selector
        self.interval = interval
        self.retry = retry
        self.timeout = timeout
        self.last: PublishRound | None = None
        self._wake = asyncio.Event()
        self._forbidden_logged = False
        registry = registry if registry is not None else CollectorRegistry()
        self.writes = Counter(
            "weft_trust_bundle_writes",
            "Writes of the per-namespace trust bundle ConfigMap, by outcome.",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("created", "updated", "failed"):
            self.writes.labels(outcome)
        self.current = Gauge(
            "weft_trust_bundle_namespaces",
            "Labelled namespaces whose trust bundle ConfigMap holds the current anchors.",
            registry=registry,
        )

    def poke(self) -> None:
        """Run a pass soon (a Namespace changed).  Loop thread only."""
        self._wake.set()

    def desired(self, namespace: str, pem: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "namespace": namespace,
                "labels": dict(MANAGED_LABELS),
                "annotations": {"weft.io/trust-domain": self.trust_domain},
            },
            "data": {TRUST_BUNDLE_KEY: pem},
        }

    def publish_once(self) -> PublishRound:
        """One pass (blocking: run it on a thread).  Raises :class:`ApiException` or a
        connection error when a list fails; a failed write is only counted."""
        pem = self.bundle()
        core = k8s.CoreV1Api(self.api)
        opts: dict[str, Any] = {"_preload_content": False, "_request_timeout": self.timeout}
        namespaces = [
            item["metadata"]["name"]
            for item in _items(core.list_namespace(label_selector=self.selector, **opts))
            if not (item["metadata"].get("deletionTimestamp"))
        ]
        existing = {
            item["metadata"]["namespace"]: item
            for item in _items(
                core.list_config_map_for_all_namespaces(
                    field_selector=f"metadata.name={self.name}", **opts
                )
            )
            if item["metadata"].get("name") == self.name
        }
        result = PublishRound(namespaces=len(namespaces))
        for namespace in sorted(namespaces):
            have = existing.get(namespace)
            want = self.desired(namespace, pem)
            try:
                if have is None:
                    try:
                        body: Any = want  # a plain dict: serialised as is
                        _close(core.create_namespaced_config_map(namespace, body, **opts))
                        result.created += 1
                        self.writes.labels("created").inc()
                        log.info("trust bundle: created ConfigMap %s/%s", namespace, self.name)
                        continue
                    except ApiException as e:
                        if e.status != 409:
                            raise
                        # Made meanwhile (another replica, or by hand): compare it.
                        have = json.loads(
                            _close(core.read_namespaced_config_map(self.name, namespace, **opts))
                        )
                assert have is not None
                if _holds(have, want):
                    result.unchanged += 1
                    continue
                want["metadata"]["resourceVersion"] = have["metadata"].get("resourceVersion")
                labels = {**((have["metadata"].get("labels")) or {}), **MANAGED_LABELS}
                want["metadata"]["labels"] = labels
                replacement: Any = want
                _close(
                    core.replace_namespaced_config_map(self.name, namespace, replacement, **opts)
                )
                result.updated += 1
                self.writes.labels("updated").inc()
                log.info("trust bundle: updated ConfigMap %s/%s to the current anchors",
                         namespace, self.name)  # fmt: skip
            except ApiException as e:
                if e.status == 404:  # the namespace went away meanwhile
                    result.namespaces -= 1
                    continue
                result.failed.append(f"{namespace}: HTTP {e.status} {e.reason}")
                self.writes.labels("failed").inc()
                if e.status == 403 and not self._forbidden_logged:
                    self._forbidden_logged = True
                    log.warning(
                        "trust bundle: cannot write ConfigMap %s/%s (HTTP 403): the control "
                        "plane's ClusterRole needs create and update on configmaps "
                        "(daemonset/weft.yaml); sidecar pods there cannot start until it "
                        "exists", namespace, self.name,
                    )  # fmt: skip
            except (urllib3.exceptions.HTTPError, OSError) as e:
                result.failed.append(f"{namespace}: {type(e).__name__}: {e}")
                self.writes.labels("failed").inc()
        self.current.set(result.namespaces - len(result.failed))
        return result

    async def run(self) -> None:
        """Passes until cancelled: at start, on :meth:`poke`, every ``interval`` s; a
        pass that failed is retried after ``retry`` s."""
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weft-trust")
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()
                delay = self.interval
                try:
                    self.last = await loop.run_in_executor(executor, self.publish_once)
                    if self.last.failed:
                        delay = self.retry
                        failed = self.last.failed
                        log.warning("trust bundle: %d write(s) failed: %s", len(failed),
                                    "; ".join(failed[:5]))  # fmt: skip
                except ApiException as e:
                    delay = self.retry
                    hint = (
                        " (the ClusterRole needs list on namespaces and configmaps)"
                        if e.status == 403
                        else ""
                    )
                    log.warning("trust bundle: listing failed: HTTP %s %s%s", e.status, e.reason,
                                hint)  # fmt: skip
                except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                    delay = self.retry
                    log.warning("trust bundle: listing failed: %s: %s", type(e).__name__, e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)


def _close(resp: Any) -> bytes:
    """The body of a ``_preload_content=False`` response, its connection released."""
    try:
        return bytes(resp.data)
    finally:
        with contextlib.suppress(Exception):
            resp.release_conn()


def _items(resp: Any) -> list[dict[str, Any]]:
    data = json.loads(_close(resp))
    items = data.get("items") if isinstance(data, dict) else None
    return [i for i in items or () if isinstance(i, dict) and isinstance(i.get("metadata"), dict)]


def _holds(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether a ConfigMap already holds what we would write (data and our labels)."""
    labels = (have.get("metadata") or {}).get("labels") or {}
    return (have.get("data") or {}) == want["data"] and all(
        labels.get(k) == v for k, v in MANAGED_LABELS.items()
    )
