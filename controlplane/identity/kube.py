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

API errors (unreachable, 5xx, timeouts) raise :class:`TokenReviewUnavailable`: the API
server of the control plane answers 500 and the agent retries, instead of being told
its credential is bad.  This module and :mod:`controlplane.discovery.kube` are the only
control plane modules that import ``kubernetes``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from controlplane.identity.signer import CredentialCheckUnavailable

log = logging.getLogger("weft.controlplane.identity")

DEFAULT_AUDIENCE = "weft-controlplane"
DEFAULT_AGENT = ("weft-system", "weft-agent")
NODE_NAME = "authentication.kubernetes.io/node-name"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"


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

    def _node_of_pod(self, pod: str, uid: str | None) -> str | None:
        try:
            resp: Any = k8s.CoreV1Api(self.api).read_namespaced_pod(
                pod, self.agent_namespace, _preload_content=False, _request_timeout=self.timeout
            )
            obj = json.loads(resp.data)
        except ApiException as e:
            if e.status == 404:
                log.warning("bootstrap token's pod %s/%s does not exist", self.agent_namespace,
                            pod)  # fmt: skip
                return None
            raise TokenReviewUnavailable(f"reading pod {pod}: HTTP {e.status}") from None
        except Exception as e:
            raise TokenReviewUnavailable(f"reading pod {pod}: {type(e).__name__}: {e}") from None
        meta = obj.get("metadata") or {}
        if uid and meta.get("uid") != uid:
            log.warning("bootstrap token's pod %s was replaced (uid %s, token for %s)", pod,
                        meta.get("uid"), uid)  # fmt: skip
            return None
        node = (obj.get("spec") or {}).get("nodeName")
        return node if isinstance(node, str) and node else None


def _single(value: Any) -> str | None:
    """``extra`` values are lists of strings; take the one value, or None."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    return None
