"""``weft check --pre`` and ``weft check`` against a cluster, through the API server.

Before install (:func:`run_pre`): is the API server reachable and new enough, may the
caller create what ``weft install`` renders (a ``SelfSubjectAccessReview`` per kind and
verb ``kubectl apply`` uses, and RBAC's escalation rule for the ClusterRole), are the
Gateway API CRDs there (optional), do the nodes run a kernel the capture path supports,
and will Pod Security admission let a privileged agent into the namespace.

After install (:func:`run_installed`): the objects install made, the CRDs established,
the CA Secret valid and the trust bundle matching it, the control plane Deployment's and
the agent DaemonSet's numbers, each agent's readiness and what its ``/metrics`` says
(eBPF capture loaded, discovery connected) through the API server's pod proxy, and
whether the control plane replicas have a complete discovery view (their ``/ready``).

Layout.  :class:`Cluster` is the only code that calls the API server: every read returns
an :class:`Answer` (an HTTP status and body, or ``code`` 0 and the connection error),
never an exception, so one unreachable object becomes one failed line rather than an
aborted run.  The ``judge_*`` functions take API objects as plain dicts and return
:class:`weft.preflight.CheckResult`, the host checks' type (the CLI renders both with one
table and one JSON shape); tests can feed them dicts.  The ``run_*`` functions only
sequence reads and judgements.

Why a module of its own, named in the import contract that keeps the ``kubernetes``
client in the control plane's Kubernetes modules: those two (``discovery.kube``,
``identity.kube``) run inside the control plane process, long-lived, with its service
account; this is a one-shot reader run from an operator's machine with their kubeconfig.
It shares the kubeconfig loading (:func:`api_client_from_kubeconfig`) and the CA
validation (:func:`controlplane.identity.ca.validate_ca`, the control plane's own start-up
check), and nothing in the control plane imports it.

What the API cannot tell: whether a node mounts cgroup v2 (nothing in ``Node`` says;
the agent checks it at start and exits naming it), kernel headers and bpffs (the same);
the agents report those by not becoming ready, which the agent lines show.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cryptography import x509
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from controlplane.discovery.kube import api_client_from_kubeconfig
from controlplane.identity.ca import (
    SECRET_CA,
    SECRET_CERT,
    SECRET_KEY,
    CaError,
    describe,
    validate_ca,
)
from weft.preflight import MIN_KERNEL, CheckResult, parse_kernel_release

JSON = dict[str, Any]

MIN_KUBERNETES = (1, 25)
"""What the manifests need: Pod Security admission (GA in 1.25; before, the namespace's
``privileged`` label means nothing and PodSecurityPolicy decides), DaemonSet ``maxSurge``
(GA in 1.25; the make-before-break rollout), CRD validation rules
(``x-kubernetes-validations``, on by default from 1.25; an older server drops them).  The
rendered manifests validate strictly against 1.25's schemas (kubernetes-validate).  An
older server is refused, not half-run."""
AGENT_ADMIN_PORT = 15020
"""The agent's /ready and /metrics (nodeagent/admin.py); /debug/state answers loopback only."""
CONTROLPLANE_ADMIN_PORT = 15014
"""The control plane's /ready (blockers: issuer, discovery) and /metrics."""
CA_SECRET = "weft-ca"
TRUST_BUNDLE = "weft-trust-bundle"
PRIVILEGED = "privileged"
ENFORCE = "pod-security.kubernetes.io/enforce"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
GATEWAY_GROUP, GATEWAY_VERSION = "gateway.networking.k8s.io", "v1"
GATEWAY_ROUTES = ("httproutes", "grpcroutes")
APPLY_VERBS = ("get", "create", "patch")
"""What ``kubectl apply`` does to each object: reads it, creates it or patches it."""


@dataclass(frozen=True)
class Answer:
    """One API response: ``code`` 0 means none came (refused, timed out, TLS failed)."""

    code: int
    body: bytes = b""
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def json(self) -> JSON:
        try:
            obj = json.loads(self.body)
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def why(self) -> str:
        """What went wrong, in one line: the connection error, the API's Status message,
        or the status code."""
        if self.code == 0:
            return self.error or "no answer"
        message = self.json().get("message") if self.body[:1] == b"{" else None
        return f"HTTP {self.code}: {message or self.text.strip()[:200] or 'no body'}"


class Cluster:
    """The API server, read with the ``kubernetes`` client's typed calls (``_preload_content
    False``: the bodies are kept as JSON, as the discovery source does)."""

    def __init__(self, api: Any, *, timeout: float = 10.0, context: str | None = None) -> None:
        self.api = api
        self.timeout = timeout
        self.context = context
        self.server: str = str(getattr(api.configuration, "host", "?"))
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)

    @classmethod
    def from_kubeconfig(cls, path: str | None, context: str | None) -> Cluster:
        """Raises whatever the client's kubeconfig loading raises (no common base)."""
        return cls(api_client_from_kubeconfig(path, context), context=context)

    def close(self) -> None:
        self.api.close()

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Answer:
        try:
            response = fn(*args, _preload_content=False, _request_timeout=self.timeout, **kw)
        except ApiException as e:
            if not e.status:
                return Answer(0, error=_first_line(str(e.reason)))
            body = e.body if isinstance(e.body, bytes) else str(e.body or "").encode()
            return Answer(int(e.status), body)
        except Exception as e:  # urllib3's connection errors, a bad URL: no common base
            return Answer(0, error=_first_line(f"{type(e).__name__}: {e}"))
        return Answer(int(response.status), bytes(response.data))

    def version(self) -> Answer:
        return self._call(k8s.VersionApi(self.api).get_code)

    def read(self, api_version: str, kind: str, name: str, namespace: str | None) -> Answer:
        """Any object by kind and name: ``/api/v1/...`` or ``/apis/GROUP/VERSION/...``."""
        plural = plural_of(kind)
        if "/" not in api_version:  # the core group: no generic call, one per kind
            if kind == "Namespace":
                return self._call(self.core.read_namespace, name)
            reads = {
                "ServiceAccount": self.core.read_namespaced_service_account,
                "Service": self.core.read_namespaced_service,
                "Secret": self.core.read_namespaced_secret,
                "ConfigMap": self.core.read_namespaced_config_map,
            }
            if kind not in reads or namespace is None:
                return Answer(0, error=f"weft check cannot read a core {kind}")
            return self._call(reads[kind], name, namespace)
        group, version = api_version.split("/")
        if namespace is None:
            return self._call(self.custom.get_cluster_custom_object, group, version, plural, name)
        return self._call(
            self.custom.get_namespaced_custom_object, group, version, namespace, plural, name
        )

    def list_nodes(self) -> Answer:
        return self._call(self.core.list_node)

    def list_pods(self, namespace: str, selector: Mapping[str, str]) -> Answer:
        labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return self._call(self.core.list_namespaced_pod, namespace, label_selector=labels)

    def api_resources(self, group: str, version: str) -> Answer:
        return self._call(self.custom.get_api_resources, group, version)

    def may(
        self,
        verb: str,
        group: str,
        resource: str,
        namespace: str | None = None,
        name: str | None = None,
    ) -> Answer:
        """A SelfSubjectAccessReview: may the kubeconfig's user do this?"""
        attrs = {"verb": verb, "group": group, "resource": resource}
        if namespace:
            attrs["namespace"] = namespace
        if name:
            attrs["name"] = name
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attrs},
        }
        return self._call(k8s.AuthorizationV1Api(self.api).create_self_subject_access_review, body)

    def proxy(self, namespace: str, pod: str, port: int, path: str) -> Answer:
        """GET ``path`` of a pod's port through the API server (``pods/proxy``)."""
        return self._call(
            self.core.connect_get_namespaced_pod_proxy_with_path,
            f"{pod}:{port}",
            namespace,
            path.lstrip("/"),
        )


def plural_of(kind: str) -> str:
    """The resource name of the kinds ``weft install`` renders (Kubernetes' own rule for
    regular English plurals; none of these is irregular)."""
    lower = kind.lower()
    if lower.endswith("s"):
        return lower + "es"
    if lower.endswith("y"):
        return lower[:-1] + "ies"
    return lower + "s"


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def _qualified(kind: str, api_version: str) -> str:
    group = _group(api_version)
    return f"{plural_of(kind)}.{group}" if group else plural_of(kind)


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


@dataclass
class Report:
    """What one run found: the results in order, and what the API cannot answer."""

    server: str
    mode: str
    """``pre`` or ``installed``."""
    namespace: str
    checks: list[CheckResult] = field(default_factory=list)
    version: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.checks if r.required)

    def as_json(self) -> JSON:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "namespace": self.namespace,
            "cluster": {"server": self.server, "version": self.version},
            "checks": [asdict(r) for r in self.checks],
            "notes": list(self.notes),
        }


# --- the API server ------------------------------------------------------------------


def parse_version(info: Mapping[str, Any]) -> tuple[int, int] | None:
    """``/version``'s major and minor (managed clusters write minor as ``"29+"``)."""
    try:
        major = int(str(info.get("major", "")).rstrip("+"))
        minor = int(str(info.get("minor", "")).rstrip("+"))
    except ValueError:
        return None
    return major, minor


def judge_api_server(server: str, answer: Answer) -> CheckResult:
    want = ".".join(map(str, MIN_KUBERNETES))
    if answer.code == 0:
        return CheckResult(
            "api-server",
            False,
            True,
            f"{server}: unreachable: {answer.why()}",
            "check the kubeconfig's server and that the cluster is up (kubectl cluster-info)",
        )
    if answer.code in (401, 403):
        return CheckResult(
            "api-server",
            False,
            True,
            f"{server}: {answer.why()}",
            "the kubeconfig's credentials were refused: log in again or pick another --context",
        )
    if not answer.ok:
        return CheckResult("api-server", False, True, f"{server}: /version: {answer.why()}")
    info = answer.json()
    version = parse_version(info)
    git = info.get("gitVersion") or "?"
    if version is None:
        return CheckResult("api-server", False, True, f"{server}: unreadable version {info!r}")
    if version < MIN_KUBERNETES:
        return CheckResult(
            "api-server",
            False,
            True,
            f"{server}: Kubernetes {git} < {want}",
            f"Weft's manifests need Kubernetes >= {want} (Pod Security "
            "admission, DaemonSet maxSurge, CRD validation rules): upgrade "
            "the cluster",
        )
    return CheckResult("api-server", True, True, f"{server}: Kubernetes {git} (>= {want})")


# --- RBAC ----------------------------------------------------------------------------


def _allowed(answer: Answer) -> bool | None:
    """A SelfSubjectAccessReview's verdict, or None if there was none."""
    if not answer.ok:
        return None
    return bool((answer.json().get("status") or {}).get("allowed"))


@dataclass
class _Access:
    """What one kind needs: its scope (a namespace, or None cluster-wide) and verbs."""

    namespace: str | None
    verbs: list[str]


def access_checks(cluster: Cluster, docs: Sequence[JSON], namespace: str) -> list[CheckResult]:
    """One line per kind: may the caller get, create and patch every object of that kind
    that ``weft install`` renders (``kubectl apply``), and create the CA's Secret and
    ConfigMap (``weft identity init --secret-manifest | kubectl create -f -``)?"""
    wanted: dict[tuple[str, str], _Access] = {}
    for d in docs:
        scoped = d["kind"] != "Namespace" and (d.get("metadata") or {}).get("namespace")
        wanted[(d["kind"], d["apiVersion"])] = _Access(namespace if scoped else None,
                                                       list(APPLY_VERBS))  # fmt: skip
    for kind in ("Secret", "ConfigMap"):
        wanted[(kind, "v1")] = _Access(namespace, ["create"])
    out = []
    for (kind, api_version), access in wanted.items():
        resource, group = plural_of(kind), _group(api_version)
        denied, unknown = [], []
        for verb in access.verbs:
            answer = cluster.may(verb, group, resource, access.namespace)
            verdict = _allowed(answer)
            if verdict is None:
                unknown.append(f"{verb}: {answer.why()}")
            elif not verdict:
                denied.append(verb)
        where = f" in {access.namespace}" if access.namespace else " (cluster-wide)"
        verbs = access.verbs
        what = _qualified(kind, api_version)
        label = f"rbac {kind}"
        if denied:
            ns_flag = f" -n {access.namespace}" if access.namespace else ""
            out.append(
                CheckResult(
                    label,
                    False,
                    True,
                    f"cannot {', '.join(denied)} {what}{where}",
                    f"ask for a role that grants it (kubectl auth can-i "
                    f"{denied[0]} {what}{ns_flag}), or use a cluster-admin "
                    "kubeconfig",
                )
            )
        elif unknown:
            out.append(
                CheckResult(label, False, True, f"{what}: access review failed: {unknown[0]}")
            )
        else:
            out.append(CheckResult(label, True, True, f"may {', '.join(verbs)} {what}{where}"))
    return out


def check_grants(cluster: Cluster, docs: Sequence[JSON]) -> CheckResult:
    """RBAC's escalation rule: creating a ClusterRole (or binding one) needs either the
    ``escalate`` and ``bind`` verbs on it, or holding every permission it grants."""
    roles = [d for d in docs if d["kind"] == "ClusterRole"]
    names = ", ".join(d["metadata"]["name"] for d in roles) or "none"
    group = "rbac.authorization.k8s.io"
    if all(
        _allowed(cluster.may(v, group, "clusterroles", name=d["metadata"]["name"]))
        for d in roles
        for v in ("escalate", "bind")
    ):
        return CheckResult("rbac grants", True, True, f"may escalate and bind ClusterRole {names}")
    missing = []
    for d in roles:
        for rule in d.get("rules") or []:
            for g in rule.get("apiGroups") or [""]:
                for resource in rule.get("resources") or []:
                    for verb in rule.get("verbs") or []:
                        if not _allowed(cluster.may(verb, g, resource)):
                            missing.append(f"{verb} {resource}{'.' + g if g else ''}")
    if missing:
        return CheckResult(
            "rbac grants",
            False,
            True,
            f"ClusterRole {names} grants what you do not hold: "
            f"{', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}",
            "RBAC refuses to create or bind a role granting more than its "
            "creator holds: use a cluster-admin kubeconfig, or get the "
            "escalate and bind verbs on clusterroles",
        )
    return CheckResult(
        "rbac grants", True, True, f"hold every permission ClusterRole {names} grants"
    )


# --- CRDs ----------------------------------------------------------------------------


def judge_gateway_api(answer: Answer) -> CheckResult:
    """The Gateway API's routes (optional: Weft runs without them)."""
    without = (
        "without the Gateway API, Services are balanced, mTLS'd, measured and authorised as "
        "usual; HTTPRoute/GRPCRoute splits, retries and timeouts are not applied"
    )
    label = "gateway-api"
    if answer.code == 404:
        return CheckResult(
            label,
            False,
            False,
            f"{GATEWAY_GROUP}/{GATEWAY_VERSION} is not served: {without}",
            "install the Gateway API CRDs (standard channel, v1.1 or later "
            "for GRPCRoute v1) to use routes",
        )
    if not answer.ok:
        return CheckResult(label, False, False, f"API discovery failed: {answer.why()}")
    served = {r.get("name") for r in answer.json().get("resources") or []}
    missing = [r for r in GATEWAY_ROUTES if r not in served]
    if missing:
        return CheckResult(
            label,
            False,
            False,
            f"{GATEWAY_GROUP}/{GATEWAY_VERSION} lacks {', '.join(missing)}: "
            "those routes are not applied",
            "install the Gateway API standard channel v1.1 or later",
        )
    return CheckResult(
        label,
        True,
        False,
        f"{', '.join(GATEWAY_ROUTES)} served ({GATEWAY_GROUP}/{GATEWAY_VERSION})",
    )


def judge_crd(name: str, answer: Answer) -> CheckResult:
    label = f"crd {name}"
    if answer.code == 404:
        return CheckResult(
            label,
            False,
            True,
            "not installed: AuthorizationPolicies cannot be "
            "created and the control plane enforces none",
            "weft install --crds | kubectl apply -f -",
        )
    if not answer.ok:
        return CheckResult(label, False, True, f"cannot read it: {answer.why()}")
    obj = answer.json()
    conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}
    established = conditions.get("Established") or {}
    if established.get("status") != "True":
        return CheckResult(
            label,
            False,
            True,
            f"not Established: {established.get('message') or 'no condition yet'}",
            f"kubectl wait --for condition=established crd/{name}",
        )
    served = [v["name"] for v in (obj.get("spec") or {}).get("versions") or [] if v.get("served")]
    return CheckResult(label, True, True, f"established, serves {', '.join(served) or '?'}")


# --- nodes ---------------------------------------------------------------------------


def _kernel_problem(release: str) -> str | None:
    version = parse_kernel_release(release)
    want = ".".join(map(str, MIN_KERNEL))
    if version is None:
        return f"kernel {release!r} is not a Linux release"
    if version < MIN_KERNEL:
        return f"kernel {release} < {want}"
    return None


def _ready(obj: JSON) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def judge_nodes(nodes: Sequence[JSON]) -> list[CheckResult]:
    """A line per node that cannot run an agent (kernel too old) or will not get one
    (not Linux), then one line for all."""
    want = ".".join(map(str, MIN_KERNEL))
    out, kernels = [], []
    linux = 0
    for node in nodes:
        name = node["metadata"]["name"]
        info = (node.get("status") or {}).get("nodeInfo") or {}
        os_name = info.get("operatingSystem", "?")
        image = info.get("osImage", "?")
        if os_name != "linux":
            out.append(
                CheckResult(
                    f"node {name}",
                    False,
                    False,
                    f"{os_name} ({image}): no agent runs there (nodeSelector "
                    "kubernetes.io/os: linux), its pods are not in the mesh",
                )
            )
            continue
        linux += 1
        release = info.get("kernelVersion", "")
        problem = _kernel_problem(release)
        if problem:
            out.append(
                CheckResult(
                    f"node {name}",
                    False,
                    True,
                    f"{problem} ({image})",
                    f"the capture path needs Linux >= {want} (docs/ebpf.md): "
                    "upgrade the node's kernel, or keep Weft off it with a "
                    "node selector",
                )
            )
        else:
            kernels.append(release)
        if not _ready(node):
            out.append(
                CheckResult(
                    f"node {name}", False, False, "not Ready: its agent will not start until it is"
                )
            )
    if not linux:
        out.append(
            CheckResult(
                "nodes",
                False,
                True,
                f"no Linux node among {len(nodes)}",
                "Weft's agent runs on Linux nodes only",
            )
        )
    elif len(kernels) == linux:
        shown = sorted(set(kernels), key=lambda r: parse_kernel_release(r) or (0, 0))
        span = shown[0] if len(shown) == 1 else f"{shown[0]} … {shown[-1]}"
        out.append(
            CheckResult(
                "nodes",
                True,
                True,
                f"{linux} Linux node{'s' * (linux != 1)}, kernel {span} (>= {want})",
            )
        )
    return out


def judge_pod_security(namespace: str, answer: Answer, *, installed: bool) -> CheckResult:
    label = "pod-security"
    if answer.code == 404:
        if installed:
            return CheckResult(
                label,
                False,
                True,
                f"namespace {namespace} does not exist",
                "weft install | kubectl apply -f -",
            )
        return CheckResult(
            label,
            True,
            True,
            f"namespace {namespace} does not exist yet: "
            f"weft install creates it with {ENFORCE}={PRIVILEGED}",
        )
    if not answer.ok:
        return CheckResult(label, False, installed, f"namespace {namespace}: {answer.why()}")
    labels = (answer.json().get("metadata") or {}).get("labels") or {}
    level = labels.get(ENFORCE)
    if level == PRIVILEGED:
        return CheckResult(label, True, True, f"namespace {namespace}: {ENFORCE}={PRIVILEGED}")
    said = f"{ENFORCE}={level}" if level else f"no {ENFORCE} label (the cluster's default applies)"
    if not installed:
        return CheckResult(
            label,
            False,
            False,
            f"namespace {namespace} exists with {said}: "
            f"weft install sets {PRIVILEGED} (the agent is privileged); an "
            "admission policy that locks namespace labels would keep the "
            "agents from starting",
        )
    if level is None:
        return CheckResult(
            label,
            False,
            False,
            f"namespace {namespace}: {said}, which the "
            "API does not show; the agents are privileged",
            f"kubectl label namespace {namespace} {ENFORCE}={PRIVILEGED}",
        )
    return CheckResult(
        label,
        False,
        True,
        f"namespace {namespace}: {said}: the privileged agent pods are refused",
        f"kubectl label --overwrite namespace {namespace} {ENFORCE}={PRIVILEGED}",
    )


# --- after install: objects, CA ------------------------------------------------------


def check_objects(cluster: Cluster, docs: Sequence[JSON], namespace: str) -> CheckResult:
    """Every object ``weft install`` renders, CRDs aside (their own lines), exists."""
    missing, unreadable, present = [], [], 0
    replicas: int | None = None
    for d in docs:
        if d["kind"] == "CustomResourceDefinition":
            continue
        meta = d["metadata"]
        ns = None if d["kind"] == "Namespace" or meta.get("namespace") is None else namespace
        answer = cluster.read(d["apiVersion"], d["kind"], meta["name"], ns)
        where = f"{d['kind']} {ns + '/' if ns else ''}{meta['name']}"
        if answer.ok:
            present += 1
            if d["kind"] == "Deployment":
                replicas = (answer.json().get("spec") or {}).get("replicas")
        elif answer.code == 404:
            missing.append((d["kind"], where))
        else:
            unreadable.append(f"{where} ({answer.why()})")
    # `weft install --controlplane-replicas 1` leaves the PodDisruptionBudget out.
    if replicas == 1:
        missing = [m for m in missing if m[0] != "PodDisruptionBudget"]
    if missing or unreadable:
        said = [f"missing {w}" for _, w in missing] + [f"unreadable {w}" for w in unreadable]
        return CheckResult(
            "objects",
            False,
            True,
            "; ".join(said),
            "weft install | kubectl apply -f -" if missing else None,
        )
    return CheckResult("objects", True, True, f"all {present} objects of weft install present")


def _pems(secret: JSON, key: str) -> bytes:
    value = (secret.get("data") or {}).get(key)
    return base64.b64decode(value) if value else b""


def judge_ca(
    namespace: str, secret: Answer, bundle: Answer, now: dt.datetime | None = None
) -> list[CheckResult]:
    """The CA Secret as the control plane loads it (``validate_ca``: chain, key, expiry),
    and the agents' trust bundle ConfigMap holding its anchor."""
    where = f"Secret {namespace}/{CA_SECRET}"
    make = f"weft identity init --secret-manifest --namespace {namespace} | kubectl create -f -"
    if secret.code == 404:
        return [
            CheckResult(
                "ca", False, True, f"{where} not found: the control plane cannot start", make
            )
        ]
    if not secret.ok:
        return [
            CheckResult(
                "ca",
                False,
                False,
                f"{where}: {secret.why()}: CA not checked "
                "(the control plane's readiness checks it too)",
                f"kubectl auth can-i get secrets -n {namespace}",
            )
        ]
    obj = secret.json()
    out = []
    try:
        issuer = validate_ca(
            _pems(obj, SECRET_CA),
            _pems(obj, SECRET_CERT),
            _pems(obj, SECRET_KEY),
            names=(SECRET_CA, SECRET_CERT, SECRET_KEY),
            now=now,
        )
    except CaError as e:
        return [
            CheckResult(
                "ca",
                False,
                True,
                f"{where}: {'; '.join(e.problems)}",
                "install a valid CA (docs/identity.md), then restart the control plane",
            )
        ]
    domain = ((obj.get("metadata") or {}).get("annotations") or {}).get("weft.io/trust-domain")
    out.append(
        CheckResult(
            "ca",
            True,
            True,
            f"{where}: issuer '{describe(issuer.cert)}' valid until "
            f"{issuer.not_after:%Y-%m-%d}" + (f", trust domain {domain}" if domain else ""),
        )
    )
    for warning in issuer.warnings:
        out.append(CheckResult("ca-expiry", False, False, f"{where}: {warning}"))
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    if SECRET_KEY in annotations.get(LAST_APPLIED, ""):
        out.append(
            CheckResult(
                "ca-secret",
                False,
                False,
                f"{where} was applied: its issuer key is also in the {LAST_APPLIED} annotation",
                "recreate it with kubectl create (docs/kubernetes.md#install)",
            )
        )
    out.append(_judge_bundle(namespace, bundle, issuer.anchors))
    return out


def _judge_bundle(
    namespace: str, bundle: Answer, anchors: Sequence[x509.Certificate]
) -> CheckResult:
    where = f"ConfigMap {namespace}/{TRUST_BUNDLE}"
    if bundle.code == 404:
        return CheckResult(
            "trust-bundle",
            False,
            True,
            f"{where} not found: the agents cannot start (it is their trust bundle volume)",
            "weft identity init --secret-manifest makes it with the Secret",
        )
    if not bundle.ok:
        return CheckResult("trust-bundle", False, False, f"{where}: {bundle.why()}")
    text = ((bundle.json().get("data") or {}).get(SECRET_CA) or "").encode()
    try:
        held = x509.load_pem_x509_certificates(text) if text else []
    except ValueError as e:
        return CheckResult("trust-bundle", False, True, f"{where}: {SECRET_CA} is not PEM ({e})")
    if not set(held) & set(anchors):
        return CheckResult(
            "trust-bundle",
            False,
            True,
            f"{where} holds none of the Secret's anchors: agents would refuse "
            "the control plane's certificates",
            "put the Secret's ca.crt into the ConfigMap (docs/identity.md)",
        )
    return CheckResult(
        "trust-bundle",
        True,
        True,
        f"{where}: {len(held)} anchor{'s' * (len(held) != 1)}, the CA's among them",
    )


# --- after install: workloads --------------------------------------------------------


def judge_deployment(name: str, answer: Answer) -> CheckResult:
    label = "controlplane"
    if not answer.ok:
        return CheckResult(label, False, True, f"deployment {name}: {answer.why()}")
    obj = answer.json()
    want = (obj.get("spec") or {}).get("replicas", 1)
    st = obj.get("status") or {}
    ready, updated = st.get("readyReplicas", 0), st.get("updatedReplicas", 0)
    detail = (
        f"deployment {name}: {ready}/{want} ready, {updated} updated, "
        f"{st.get('availableReplicas', 0)} available"
    )
    if not ready:
        return CheckResult(
            label,
            False,
            True,
            detail + ": agents get no certificates or discovery",
            f"kubectl -n {obj['metadata'].get('namespace')} logs "
            f"deploy/{name} (a CA problem is named there)",
        )
    if ready < want or updated < want:
        return CheckResult(label, False, False, detail)
    return CheckResult(label, True, True, detail)


def _pod_node(pod: JSON) -> str:
    return str((pod.get("spec") or {}).get("nodeName") or "?")


def judge_daemonset(name: str, answer: Answer, pods: Sequence[JSON]) -> CheckResult:
    label = "agents"
    if not answer.ok:
        return CheckResult(label, False, True, f"daemonset {name}: {answer.why()}")
    obj = answer.json()
    st = obj.get("status") or {}
    desired = st.get("desiredNumberScheduled", 0)
    ready, updated = st.get("numberReady", 0), st.get("updatedNumberScheduled", 0)
    available = st.get("numberAvailable", 0)
    detail = (
        f"daemonset {name}: {desired} desired, {ready} ready, {updated} updated, "
        f"{available} available"
    )
    ns = obj["metadata"].get("namespace")
    if not desired:
        return CheckResult(
            label,
            False,
            True,
            detail + ": no node runs an agent",
            "check the nodes' taints and kubernetes.io/os labels",
        )
    if ready < desired:
        unready = sorted(_pod_node(p) for p in pods if not _ready(p))
        nodes = f" (not ready on {', '.join(unready)})" if unready else ""
        return CheckResult(
            label,
            False,
            True,
            detail + nodes,
            f"kubectl -n {ns} describe daemonset {name}; the agent lines below say why",
        )
    generation = obj["metadata"].get("generation")
    if updated < desired or st.get("observedGeneration", generation) != generation:
        return CheckResult(
            label,
            False,
            False,
            detail + ": a rollout is in progress",
            f"kubectl -n {ns} rollout status daemonset/{name}",
        )
    return CheckResult(label, True, True, detail)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> sample name -> the sum of its samples (labels summed over)."""
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    except ValueError:
        pass
    return out


def judge_agent(pod: JSON, node: JSON | None, ready: Answer, metrics: Answer) -> CheckResult:
    """One node's agent: the pod's Ready condition (the kubelet's exec probe of the agent's
    own marker file, which an old agent sharing port 15020 cannot answer), why not (its
    /ready), the node's kernel, and its /metrics: eBPF capture loaded, discovery up."""
    node_name = _pod_node(pod)
    label = f"agent {node_name}"
    pod_name = pod["metadata"]["name"]
    release = (((node or {}).get("status") or {}).get("nodeInfo") or {}).get("kernelVersion", "")
    kernel = _kernel_problem(release) if release else None
    if kernel:
        return CheckResult(
            label,
            False,
            True,
            f"pod {pod_name}: {kernel}",
            f"the capture path needs Linux >= {'.'.join(map(str, MIN_KERNEL))} "
            "(docs/ebpf.md): upgrade the node's kernel",
        )
    if not _ready(pod):
        # The agent's 503 reads "not ready: waiting for ebpf, pods".
        why = ready.text.strip().removeprefix("not ready: ") if ready.code == 503 else _waiting(pod)
        return CheckResult(
            label,
            False,
            True,
            f"pod {pod_name} not ready: {why}",
            f"kubectl -n {pod['metadata'].get('namespace')} logs {pod_name} "
            "(a missing kernel header, bpffs or cgroup v2 is named there)",
        )
    facts = [f"pod {pod_name} ready", f"kernel {release or '?'}"]
    if not metrics.ok:
        return CheckResult(
            label,
            False,
            False,
            ", ".join(facts) + f"; /metrics through the API server: {metrics.why()}",
            "the API server dials the node's address on port 15020: allow it, "
            "or read /metrics from Prometheus",
        )
    m = parse_metrics(metrics.text)
    if not any(name.startswith("weft_capture_events") for name in m):
        return CheckResult(
            label,
            False,
            True,
            ", ".join(facts) + ": no eBPF capture programs loaded (weft_capture_events absent)",
            "the agent's log names the kernel feature it lacks",
        )
    facts.append("eBPF capture loaded")
    captured = int(m.get("weft_captured_pods", 0))
    facts.append(f"{captured} pod{'s' * (captured != 1)} captured")
    revision = int(m.get("weft_agent_discovery_revision", 0))
    if m.get("weft_agent_discovery_connected", 0) != 1:
        return CheckResult(
            label,
            False,
            False,
            ", ".join(facts) + f"; discovery stream down "
            f"(last revision {revision}): it serves what it last knew",
            "check the control plane (the discovery line)",
        )
    facts.append(f"discovery connected (revision {revision})")
    return CheckResult(label, True, True, ", ".join(facts))


def _waiting(pod: JSON) -> str:
    """Why a pod's container is not running, as the kubelet says."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting:
            return f"{waiting.get('reason')}: {waiting.get('message', '')}".rstrip(": ") + (
                f", {cs.get('restartCount')} restarts" if cs.get("restartCount") else ""
            )
    return f"phase {(pod.get('status') or {}).get('phase', '?')}"


def judge_discovery(replicas: Sequence[tuple[JSON, Answer, Answer]]) -> CheckResult:
    """The control plane replicas' /ready (blockers ``discovery``, ``issuer``), their
    discovery revision and subscribed agents (``weft_discovery_*``).  Where the pod proxy
    gives no answer, the pod's Ready condition stands in: its readiness probe is that
    same /ready."""
    label = "discovery"
    if not replicas:
        return CheckResult(label, False, True, "no control plane pod is running")
    synced, problems, streams, inferred = [], [], 0.0, 0
    for pod, ready, metrics in replicas:
        name = pod["metadata"]["name"]
        m = parse_metrics(metrics.text) if metrics.ok else {}
        streams += m.get("weft_discovery_subscribers", 0)
        if ready.ok:
            synced.append(str(int(m.get("weft_discovery_revision", 0))))
        elif ready.code == 503 and "not ready" in ready.text:
            problems.append(f"{name}: {'; '.join(ready.text.strip().splitlines())}")
        elif _ready(pod):
            synced.append("?")
            inferred += 1
        else:
            problems.append(f"{name}: not Ready, and /ready through the API server: {ready.why()}")
    n = len(replicas)
    detail = f"{len(synced)}/{n} control plane replica{'s' * (n != 1)} synced"
    if synced:
        detail += f" (revision {', '.join(synced)}), {int(streams)} agent stream"
        detail += "s" * (int(streams) != 1)
    if inferred:
        detail += f"; {inferred} judged by the pod's Ready condition (the pod proxy gave no answer)"
    if problems:
        detail += "; " + "; ".join(problems)
    if not synced:
        return CheckResult(label, False, True, detail,
                           "the control plane's log says which list or watch fails (RBAC, "
                           "API errors)")  # fmt: skip
    return CheckResult(label, not problems, not problems, detail)


# --- runs ----------------------------------------------------------------------------


def _find(docs: Iterable[JSON], kind: str) -> JSON:
    return next(d for d in docs if d["kind"] == kind)


Add = Callable[[CheckResult | Iterable[CheckResult]], None]


def _adder(report: Report) -> Add:
    """Appends results to ``report``, each with its share of the time since the last
    append (the reads its judgement needed): ``duration_ms`` in ``-o json``."""
    last = time.perf_counter()

    def add(results: CheckResult | Iterable[CheckResult]) -> None:
        nonlocal last
        now = time.perf_counter()
        items = [results] if isinstance(results, CheckResult) else list(results)
        each = (now - last) * 1000 / max(len(items), 1)
        report.checks += [replace(r, duration_ms=round(each, 1)) for r in items]
        last = now

    return add


def _start(cluster: Cluster, mode: str, namespace: str) -> tuple[Report, Add, bool]:
    report = Report(cluster.server, mode, namespace)
    add = _adder(report)
    answer = cluster.version()
    add(judge_api_server(cluster.server, answer))
    if answer.ok:
        report.version = answer.json().get("gitVersion")
    return report, add, answer.ok


def run_pre(cluster: Cluster, docs: Sequence[JSON], namespace: str) -> Report:
    """Before ``weft install``: ``docs`` is what it would render."""
    report, add, reachable = _start(cluster, "pre", namespace)
    if not reachable:
        return report  # everything else would fail the same way
    add(access_checks(cluster, docs, namespace))
    add(check_grants(cluster, docs))
    add(judge_gateway_api(cluster.api_resources(GATEWAY_GROUP, GATEWAY_VERSION)))
    nodes = cluster.list_nodes()
    if nodes.ok:
        add(judge_nodes(nodes.json().get("items") or []))
    else:
        add(CheckResult("nodes", False, True, f"listing nodes: {nodes.why()}"))
    add(
        judge_pod_security(
            namespace, cluster.read("v1", "Namespace", namespace, None), installed=False
        )
    )
    report.notes.append(
        "cgroup v2, kernel headers and bpffs on the nodes cannot be read through the API: "
        "the agent checks them when it starts and names what is missing (weft check on a "
        "node runs the same checks)"
    )
    return report


def run_installed(
    cluster: Cluster, docs: Sequence[JSON], namespace: str, now: dt.datetime | None = None
) -> Report:
    """After ``weft install``: ``docs`` is what it rendered (names and selectors)."""
    report, add, reachable = _start(cluster, "installed", namespace)
    if not reachable:
        return report
    add(
        judge_pod_security(
            namespace, cluster.read("v1", "Namespace", namespace, None), installed=True
        )
    )
    add(check_objects(cluster, docs, namespace))
    for crd in (d for d in docs if d["kind"] == "CustomResourceDefinition"):
        name = crd["metadata"]["name"]
        add(
            judge_crd(
                name,
                cluster.read("apiextensions.k8s.io/v1", "CustomResourceDefinition", name, None),
            )
        )
    add(judge_gateway_api(cluster.api_resources(GATEWAY_GROUP, GATEWAY_VERSION)))
    add(
        judge_ca(
            namespace,
            cluster.read("v1", "Secret", CA_SECRET, namespace),
            cluster.read("v1", "ConfigMap", TRUST_BUNDLE, namespace),
            now,
        )
    )

    deployment = _find(docs, "Deployment")
    add(
        judge_deployment(
            deployment["metadata"]["name"],
            cluster.read("apps/v1", "Deployment", deployment["metadata"]["name"], namespace),
        )
    )
    daemonset = _find(docs, "DaemonSet")
    ds_name = daemonset["metadata"]["name"]
    listed = cluster.list_pods(namespace, daemonset["spec"]["selector"]["matchLabels"])
    pods = sorted(listed.json().get("items") or [], key=_pod_node) if listed.ok else []
    add(judge_daemonset(ds_name, cluster.read("apps/v1", "DaemonSet", ds_name, namespace), pods))
    if not listed.ok:
        add(CheckResult("agent pods", False, True, f"listing: {listed.why()}"))
    nodes_answer = cluster.list_nodes()
    nodes = {n["metadata"]["name"]: n for n in nodes_answer.json().get("items") or []}
    for pod in pods:
        name = pod["metadata"]["name"]
        running = (pod.get("status") or {}).get("phase") == "Running"
        ready = cluster.proxy(namespace, name, AGENT_ADMIN_PORT, "ready") if running else Answer(0)
        metrics = (
            cluster.proxy(namespace, name, AGENT_ADMIN_PORT, "metrics")
            if running
            else Answer(0, error="pod not running")
        )
        add(judge_agent(pod, nodes.get(_pod_node(pod)), ready, metrics))

    selector = deployment["spec"]["selector"]["matchLabels"]
    cp = cluster.list_pods(namespace, selector)
    if not cp.ok:
        add(CheckResult("controlplane pods", False, True, f"listing: {cp.why()}"))
    replicas = []
    for pod in cp.json().get("items") or []:
        if (pod.get("status") or {}).get("phase") != "Running":
            continue
        name = pod["metadata"]["name"]
        replicas.append(
            (
                pod,
                cluster.proxy(namespace, name, CONTROLPLANE_ADMIN_PORT, "ready"),
                cluster.proxy(namespace, name, CONTROLPLANE_ADMIN_PORT, "metrics"),
            )
        )
    add(judge_discovery(replicas))
    return report
