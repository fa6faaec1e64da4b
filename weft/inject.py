"""``weft inject``: sidecar mode for a Pod or a workload's pod template — pure data, no I/O.

What it adds, as a sidecar mesh's injector does (Istio's ``istio-init`` +
``istio-proxy``, Linkerd's ``linkerd-init`` + ``linkerd-proxy``):

* the annotation ``weft.io/mode: sidecar`` on the pod (template);
* an init container ``weft-init`` (``weft sidecar init``): installs the pod's nftables
  table — outbound TCP redirected to the sidecar except the sidecar's own uid, strict
  inbound (only 15008, 15020 and loopback) — with ``NET_ADMIN`` and nothing else;
* the container ``weft-sidecar`` (``weft sidecar run``) as uid 1337, no capabilities,
  read-only root; it declares ``weft-tunnel`` 15008 (which is how discovery, and so
  every node agent and sidecar, knows the pod serves its own tunnel: `weft.mesh.Workload.sidecar`)
  and ``weft-admin`` 15020; its environment from the downward API; a projected service
  account token for the control plane's audience, the trust bundle ConfigMap and an
  in-memory certificate directory.

* **kubelet probes rewritten** (as Istio's injector does): strict inbound drops the
  kubelet's plaintext connections to app ports (they come from the node, not loopback),
  so each app container's ``httpGet``, ``tcpSocket`` and ``grpc`` probe (readiness,
  liveness, startup) becomes an ``httpGet`` of the sidecar's admin port,
  ``/app-health/<container>/<readyz|livez|startupz>``, and the original goes to the
  sidecar in ``$WEFT_APP_PROBES`` (JSON: path -> the original handler and timeout); the
  sidecar runs it against the app from inside the pod and answers 200 or 503.  Timing
  fields stay.  ``grpc`` probes are rewritten the same way (the sidecar asks the app's
  ``grpc.health.v1.Health/Check``); ``exec`` probes need nothing.
  ``rewrite_probes=False`` (``weft inject --no-rewrite-probes``) leaves every probe alone.

Idempotent: Weft's own containers and volumes are replaced, never doubled, so injecting
an injected manifest gives it back unchanged (and a new ``--image`` updates it).
Objects that carry no pod template (Services, ConfigMaps, ...) pass through untouched.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from weft.mesh import MODE_KEY, SIDECAR_MODE, SIDECAR_TUNNEL_PORT

SIDECAR_UID = 1337
"""The sidecar's uid: the capture rules exempt it, so its own connections leave."""
INIT_NAME = "weft-init"
SIDECAR_NAME = "weft-sidecar"
VOLUMES = ("weft-token", "weft-trust", "weft-certs")
ADMIN_PORT = 15020
PROBES_ENV = "WEFT_APP_PROBES"
"""The sidecar's table of rewritten probes: JSON ``{path: {"httpGet"|"tcpSocket"|"grpc":
..., "timeoutSeconds": n}}``."""
PROBE_PREFIX = "/app-health/"
PROBE_KINDS = {"readinessProbe": "readyz", "livenessProbe": "livez", "startupProbe": "startupz"}
PROBE_TIMING = ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "successThreshold",
                "failureThreshold", "terminationGracePeriodSeconds")  # fmt: skip
TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
"""Kinds whose pods come from ``spec.template`` (CronJob: ``spec.jobTemplate``)."""


class InjectError(ValueError):
    """A document cannot be injected; the message names it."""


@dataclass(frozen=True)
class InjectOptions:
    image: str = "weft:latest"
    controlplane: str = "weft-controlplane.weft-system.svc"
    trust_domain: str = "cluster.local"
    trust_bundle_configmap: str = "weft-trust-bundle"
    """A copy of the trust anchors in the pod's namespace (a ConfigMap cannot be mounted
    across namespaces)."""
    log_level: str = "info"
    rewrite_probes: bool = True
    """Point the app's HTTP and TCP probes at the sidecar, which runs them inside the pod
    (strict inbound would drop the kubelet's own connections to the app)."""
    audience: str = "weft-controlplane"
    """The audience of the pod's projected token: the control plane's
    (``weft controlplane --audience``).  The sidecar presents that token for its own
    certificate; a token for another audience (the API server's) is refused there."""


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def init_container(opts: InjectOptions) -> dict[str, Any]:
    return {
        "name": INIT_NAME,
        "image": opts.image,
        "command": ["weft", "sidecar", "init", "--uid", str(SIDECAR_UID)],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
        },
    }


def sidecar_container(opts: InjectOptions, probes: dict[str, Any] | None = None) -> dict[str, Any]:
    env_probes = (
        [{"name": PROBES_ENV, "value": json.dumps(probes, sort_keys=True)}] if probes else []
    )
    return {
        "name": SIDECAR_NAME,
        "image": opts.image,
        "command": ["weft", "sidecar", "run"],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_IP", "status.podIP"),
            _field_env("NODE_NAME", "spec.nodeName"),
            _field_env("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            {"name": "WEFT_CONTROLPLANE", "value": opts.controlplane},
            {"name": "WEFT_TRUST_DOMAIN", "value": opts.trust_domain},
            {"name": "WEFT_TOKEN_FILE", "value": "/var/run/secrets/weft/token"},
            {"name": "WEFT_TRUST_BUNDLE", "value": "/etc/weft/trust/ca.crt"},
            {"name": "WEFT_CERT_DIR", "value": "/run/weft/certs"},
            {"name": "WEFT_LOG_LEVEL", "value": opts.log_level},
            *env_probes,
        ],
        "ports": [
            {"name": "weft-tunnel", "containerPort": SIDECAR_TUNNEL_PORT, "protocol": "TCP"},
            {"name": "weft-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": ADMIN_PORT}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/live", "port": ADMIN_PORT}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}},
        "securityContext": {
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "weft-token", "mountPath": "/var/run/secrets/weft", "readOnly": True},
            {"name": "weft-trust", "mountPath": "/etc/weft/trust", "readOnly": True},
            {"name": "weft-certs", "mountPath": "/run/weft"},
        ],
    }


def volumes(opts: InjectOptions) -> list[dict[str, Any]]:
    return [
        # The pod's own service account token, for the control plane's audience only:
        # TokenReview proves this pod and this service account, and the control plane
        # signs exactly that identity (/v1/pod-certificates).  Bound to the pod, so it
        # stops working when the pod is deleted; the kubelet rotates it in place.
        {
            "name": "weft-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": opts.audience,
                            "expirationSeconds": 3600,
                            "path": "token",
                        }
                    }
                ]
            },
        },
        {"name": "weft-trust", "configMap": {"name": opts.trust_bundle_configmap}},
        {"name": "weft-certs", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]


def _resolve_port(container: dict[str, Any], port: Any, what: str) -> int:
    """A probe's port as a number (a named port is one of the container's)."""
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        return port
    if isinstance(port, str):
        if port.isdigit() and 0 < int(port) < 65536:
            return int(port)
        for p in container.get("ports") or ():
            if p.get("name") == port and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    raise InjectError(f"{what}: port {port!r} is not a number nor a port the container names")


def _earlier_probes(spec: dict[str, Any]) -> dict[str, Any]:
    """The probe table of an earlier injection (its sidecar's env), to re-inject."""
    for c in spec.get("containers") or ():
        if c.get("name") == SIDECAR_NAME:
            for e in c.get("env") or ():
                if e.get("name") == PROBES_ENV:
                    try:
                        table = json.loads(e.get("value") or "{}")
                    except ValueError:
                        return {}
                    return table if isinstance(table, dict) else {}
    return {}


def rewrite_probes(containers: list[dict[str, Any]], earlier: dict[str, Any]) -> dict[str, Any]:
    """Point each container's HTTP, TCP and gRPC probes at the sidecar, in place; returns the
    sidecar's table (path -> original handler and timeout).  A probe an earlier injection
    rewrote keeps its original from ``earlier``."""
    table: dict[str, Any] = {}
    for c in containers:
        for field_name, kind in PROBE_KINDS.items():
            probe = c.get(field_name)
            if not isinstance(probe, dict):
                continue
            path = f"{PROBE_PREFIX}{c.get('name', '')}/{kind}"
            what = f"container {c.get('name')!r} {field_name}"
            http, tcp, grpc = probe.get("httpGet"), probe.get("tcpSocket"), probe.get("grpc")
            if (
                isinstance(http, dict)
                and http.get("port") == ADMIN_PORT
                and http.get("path") == path
            ):
                if path in earlier:  # ours already: keep the original we recorded
                    table[path] = earlier[path]
                continue
            if isinstance(http, dict):
                if http.get("host"):
                    continue  # probes another host: the kubelet's connection is not ours
                get = {
                    "path": http.get("path") or "/",
                    "port": _resolve_port(c, http.get("port"), what),
                    "scheme": (http.get("scheme") or "HTTP").upper(),
                }
                if http.get("httpHeaders"):
                    get["httpHeaders"] = http["httpHeaders"]
                original: dict[str, Any] = {"httpGet": get}
            elif isinstance(tcp, dict):
                if tcp.get("host"):
                    continue
                original = {"tcpSocket": {"port": _resolve_port(c, tcp.get("port"), what)}}
            elif isinstance(grpc, dict):
                port = grpc.get("port")
                if not isinstance(port, int) or isinstance(port, bool):
                    raise InjectError(f"{what}: a grpc probe's port must be a number")
                original = {"grpc": {"port": _resolve_port(c, port, what)}}
                if grpc.get("service"):
                    original["grpc"]["service"] = str(grpc["service"])
            else:
                continue  # exec runs inside the container
            original["timeoutSeconds"] = probe.get("timeoutSeconds") or 1
            table[path] = original
            c[field_name] = {
                "httpGet": {"path": path, "port": ADMIN_PORT, "scheme": "HTTP"},
                **{k: probe[k] for k in PROBE_TIMING if k in probe},
            }
    return table


def inject_pod_spec(meta: dict[str, Any], spec: dict[str, Any], opts: InjectOptions) -> None:
    """Inject in place: ``meta`` is the pod's (template's) metadata, ``spec`` its spec."""
    if spec.get("hostNetwork"):
        raise InjectError("a hostNetwork pod shares its node's network: no sidecar mode")
    meta.setdefault("annotations", {})[MODE_KEY] = SIDECAR_MODE
    ours = {INIT_NAME, SIDECAR_NAME}
    inits = [c for c in spec.get("initContainers") or () if c.get("name") not in ours]
    # The capture must be in place before any other init container makes a connection.
    spec["initContainers"] = [init_container(opts), *inits]
    earlier = _earlier_probes(spec)
    containers = [c for c in spec.get("containers") or () if c.get("name") not in ours]
    if not containers:
        raise InjectError("the pod has no containers of its own")
    probes = rewrite_probes(containers, earlier) if opts.rewrite_probes else {}
    spec["containers"] = [*containers, sidecar_container(opts, probes)]
    kept = [v for v in spec.get("volumes") or () if v.get("name") not in VOLUMES]
    spec["volumes"] = [*kept, *volumes(opts)]


def inject(doc: Any, opts: InjectOptions) -> Any:
    """One document, injected (a copy); documents without pods are returned as they are."""
    if not isinstance(doc, dict):
        return doc
    kind = doc.get("kind")
    out = copy.deepcopy(doc)
    where = f"{kind} {(doc.get('metadata') or {}).get('name', '?')}"
    try:
        if kind == "Pod":
            out.setdefault("metadata", {})
            inject_pod_spec(out["metadata"], out.setdefault("spec", {}), opts)
        elif kind in TEMPLATE_KINDS:
            template = out.setdefault("spec", {}).setdefault("template", {})
            inject_pod_spec(
                template.setdefault("metadata", {}), template.setdefault("spec", {}), opts
            )
        elif kind == "CronJob":
            template = out["spec"]["jobTemplate"]["spec"]["template"]
            inject_pod_spec(
                template.setdefault("metadata", {}), template.setdefault("spec", {}), opts
            )
        elif kind == "List":
            out["items"] = [inject(item, opts) for item in out.get("items") or ()]
    except InjectError as e:
        raise InjectError(f"{where}: {e}") from None
    except (KeyError, TypeError, AttributeError):
        raise InjectError(f"{where}: not a valid {kind}") from None
    return out


def inject_all(docs: Iterable[Any], opts: InjectOptions) -> list[Any]:
    return [inject(d, opts) for d in docs if d is not None]
