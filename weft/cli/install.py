"""``weft install`` and ``weft uninstall``: the manifests of ``daemonset/``, rendered.

Rendering is templating of structured objects: ``daemonset/weft.yaml`` is loaded, the
options set fields of the objects that carry them (a container's image, an argument, an
environment variable, a namespace), and the objects are dumped again. Nothing is done to
the text, so an option cannot land in a comment or half a string, and the template stays
a valid manifest that the tests check on its own. Before anything is printed the agent's
and the control plane's arguments are parsed by their real click commands: an option this
build of the agent does not know fails here, not in a crash-looping pod.

What install leaves out: the CA. ``weft identity init --secret-manifest | kubectl create
-f -`` makes it; ``kubectl apply`` would copy the issuer key into the Secret's
``last-applied-configuration`` annotation (``kubectl describe`` prints annotations), and
an install pipeline re-run would replace the CA. The CRDs are in by default, so that
``weft install | kubectl apply -f -`` is the whole install; ``--crds`` prints only them and
``--skip-crds`` everything else, for those who keep CRDs in a lifecycle of their own
(Linkerd's ``install --crds`` then ``install``).

Uninstall is ordered, because SIGTERM deliberately leaves capture in place (the next
agent takes it over, docs/ebpf.md): deleting the agents while pods are captured leaves
those pods' connects redirected to a port nobody listens on. So:

1. release the workloads' capture: remove the ``weft.io/capture`` labels, and the
   running agents detach their pods themselves; wait until every agent reports
   ``weft_captured_pods 0``;
2. delete the agent DaemonSet and wait until its pods are gone;
3. run ``weft agent --kubernetes --uninstall`` once on every node (a short-lived
   DaemonSet): it detaches whatever is still attached and removes the pinned maps;
4. delete the control plane, then RBAC, CRDs and the namespace.

``weft uninstall --kubeconfig FILE`` runs these steps with ``kubectl``; without it the
objects are printed in that order and the steps are in docs/kubernetes.md. The steps
drive kubectl rather than the ``kubernetes`` client: kubectl is what the operator already
trusts with their cluster (exec and OIDC credential plugins, contexts), and the CLI stays
outside the import contract that keeps the client in the control plane's sources.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from weft import __version__
from weft.cli import output_option
from weft.identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId

TEMPLATE = Path(__file__).resolve().parents[1] / "daemonset" / "weft.yaml"
"""The manifests ``weft install`` renders: ``weft/daemonset`` is a symlink to the
top-level ``daemonset/`` in a source checkout, and its files are package data in a wheel
(pyproject.toml), so an installed ``weft`` renders the same manifests."""

DEFAULT_NAMESPACE = "weft-system"
DEFAULT_IMAGE = "weft:latest"
"""What ``docker build -f daemonset/Dockerfile -t weft:latest .`` builds."""
LOG_LEVELS = ("debug", "info", "warning", "error")
CAPTURE_LABEL = "weft.io/capture"
AGENT = "weft-agent"
CONTROLPLANE = "weft-controlplane"
NODE_CLEANUP = "weft-node-cleanup"
CA_SECRET = "weft-ca"
TRUST_BUNDLE = "weft-trust-bundle"
"""Made by ``weft identity init --secret-manifest``, not by install; uninstall deletes them."""
AGENT_ADMIN_PORT = 15020
CLUSTER_SCOPED = frozenset(
    {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
)
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class InstallError(ValueError):
    """The options do not make a working install; the message says which and why."""


@dataclass(frozen=True)
class InstallOptions:
    """What ``weft install`` sets in the template; each field's default is the template's."""

    image: str = DEFAULT_IMAGE
    """Container image of both the control plane and the agent (``REPO[:TAG|@DIGEST]``)."""
    namespace: str = DEFAULT_NAMESPACE
    """Where the control plane, the agents and their ServiceAccounts live."""
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    """SPIFFE trust domain: the control plane signs in it, the agents expect it."""
    controlplane_replicas: int = 2
    """Control plane pods; with one, no PodDisruptionBudget (it would block every drain)."""
    log_level: str = "info"
    """``WEFT_LOG_LEVEL`` of both (``weft --log-level``)."""
    trace_collector: str | None = None
    """``HOST:PORT`` of an OTLP collector, as the agent's ``--trace-collector``."""
    default_inbound_policy: str | None = None
    """The control plane's ``--default-inbound-policy`` (None: its own default)."""

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.namespace):
            raise InstallError(
                f"namespace {self.namespace!r} is not a DNS-1123 label (lowercase letters, "
                "digits and '-', at most 63)"
            )
        try:
            SpiffeId.workload(self.namespace, AGENT, self.trust_domain)
        except IdentityError as e:
            raise InstallError(f"trust domain: {e}") from None
        if self.controlplane_replicas < 1:
            raise InstallError("the control plane needs at least one replica")
        if self.log_level not in LOG_LEVELS:
            raise InstallError(f"log level {self.log_level!r} is not one of {LOG_LEVELS}")
        if self.trace_collector is not None:
            host_port(self.trace_collector)
        split_image(self.image)


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """``REPO[:TAG][@DIGEST]`` -> (repo, tag, digest). A ``:`` before the last ``/`` is a
    registry's port (``localhost:5000/weft``), not a tag."""
    if not ref or any(c.isspace() for c in ref):
        raise InstallError(f"image {ref!r}: expected REPO[:TAG] or REPO@sha256:DIGEST")
    rest, _, digest = ref.partition("@")
    if "@" in ref and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise InstallError(f"image {ref!r}: a digest is sha256: and 64 hex digits")
    repo, tag = rest, None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        repo, tag = rest[:colon], rest[colon + 1 :]
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
            raise InstallError(f"image {ref!r}: {tag!r} is not a valid tag")
    if not repo:
        raise InstallError(f"image {ref!r}: no repository")
    return repo, tag, digest or None


def image_ref(image: str, tag: str | None) -> str:
    """``--image`` with ``--tag`` applied: the tag goes on a repository without one."""
    if tag is None:
        return image
    repo, own_tag, digest = split_image(image)
    if own_tag is not None or digest is not None:
        raise InstallError(f"--tag {tag} given, but --image {image} already has a tag or digest")
    ref = f"{repo}:{tag}"
    split_image(ref)
    return ref


def host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InstallError(f"{value!r} is not HOST:PORT")
    return host, int(port)


# -- rendering ------------------------------------------------------------------------------


def load_template(path: Path = TEMPLATE) -> list[dict[str, Any]]:
    import yaml  # type: ignore[import-untyped]

    if not path.is_file():
        raise InstallError(
            f"{path} not found: weft install renders daemonset/weft.yaml, which the weft "
            "package carries (weft/daemonset -> ../daemonset in a checkout); reinstall weft"
        )
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _find(docs: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise InstallError(f"the template has no {kind} {name}")


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    for c in workload["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            assert isinstance(c, dict)
            return c
    raise InstallError(f"{workload['metadata']['name']} has no container {name}")


def set_env(container: dict[str, Any], name: str, value: str) -> None:
    env: list[dict[str, Any]] = container.setdefault("env", [])
    for entry in env:
        if entry["name"] == name:
            entry.pop("valueFrom", None)
            entry["value"] = value
            return
    env.append({"name": name, "value": value})


def set_flag(args: list[str], flag: str, value: str) -> None:
    """Set ``--flag=value`` in an argv (replacing ``--flag=x`` or ``--flag x``)."""
    for i, arg in enumerate(args):
        if arg == flag:
            args[i : i + 2] = [f"{flag}={value}"]
            return
        if arg.startswith(f"{flag}="):
            args[i] = f"{flag}={value}"
            return
    args.append(f"{flag}={value}")


def render(template: Sequence[dict[str, Any]], opts: InstallOptions) -> list[dict[str, Any]]:
    """The template's objects with ``opts`` set in them (the template is not changed)."""
    docs = copy.deepcopy(list(template))
    ns = opts.namespace
    for d in docs:
        meta = d["metadata"]
        if d["kind"] == "Namespace":
            meta["name"] = ns
        elif d["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = ns
        elif d["kind"] == "ClusterRoleBinding":
            for subject in d.get("subjects", []):
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = ns
    cp = _find(docs, "Deployment", CONTROLPLANE)
    cp["spec"]["replicas"] = opts.controlplane_replicas
    if opts.controlplane_replicas == 1:
        docs = [d for d in docs if d["kind"] != "PodDisruptionBudget"]
    cp_container = _container(cp, "controlplane")
    cp_args: list[str] = cp_container["args"]
    set_flag(cp_args, "--trust-domain", opts.trust_domain)
    set_flag(cp_args, "--agent-identity", f"{ns}/{AGENT}")
    if opts.default_inbound_policy is not None:
        set_flag(cp_args, "--default-inbound-policy", opts.default_inbound_policy)
    set_env(cp_container, "WEFT_LOG_LEVEL", opts.log_level)
    agent = _container(_find(docs, "DaemonSet", AGENT), "agent")
    set_env(agent, "WEFT_CONTROLPLANE", f"{CONTROLPLANE}.{ns}.svc")
    set_env(agent, "WEFT_TRUST_DOMAIN", opts.trust_domain)
    set_env(agent, "WEFT_LOG_LEVEL", opts.log_level)
    if opts.trace_collector is not None:
        set_flag(agent["args"], "--trace-collector", opts.trace_collector)
    agent_spec = _find(docs, "DaemonSet", AGENT)["spec"]["template"]["spec"]
    for container in (cp_container, agent, *agent_spec.get("initContainers", ())):
        container["image"] = opts.image
    return docs


def is_crd(doc: dict[str, Any]) -> bool:
    return bool(doc["kind"] == "CustomResourceDefinition")


def select(docs: Sequence[dict[str, Any]], *, crds: bool, skip_crds: bool) -> list[dict[str, Any]]:
    if crds and skip_crds:
        raise InstallError("--crds prints only the CRDs, --skip-crds all but them: give one")
    if crds:
        return [d for d in docs if is_crd(d)]
    if skip_crds:
        return [d for d in docs if not is_crd(d)]
    return list(docs)


def verify(docs: Sequence[dict[str, Any]]) -> None:
    """Parse the rendered agent's and control plane's argv with their real commands, with
    the environment the pods get, as ``weft`` in the container would."""
    from weft.cli import cli
    from weft.cli.agent import agent
    from weft.cli.controlplane import controlplane

    for kind, name, container, command in (
        ("DaemonSet", AGENT, "agent", agent),
        ("Deployment", CONTROLPLANE, "controlplane", controlplane),
    ):
        found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
        if not found:
            continue  # --crds
        c = _container(found[0], container)
        argv = list(c["args"])
        env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
        (level,) = [p for p in cli.params if p.name == "log_level"]
        try:
            level.type.convert(env.get("WEFT_LOG_LEVEL", "info"), level, None)
        except click.BadParameter as e:
            raise InstallError(f"the {container}'s log level: {e.format_message()}") from None
        try:
            command.make_context(argv[0], argv[1:])
        except click.exceptions.NoSuchOption as e:
            why = " (the tracing exporter is not in this build)" if "trace" in e.option_name else ""
            raise InstallError(
                f"the {container} of this weft ({__version__}) does not accept "
                f"{e.option_name}{why}; install without that option, or with a weft that has it"
            ) from None
        except click.UsageError as e:
            raise InstallError(
                f"the {container}'s arguments {argv}: {e.format_message()}"
            ) from None


def dump(docs: Sequence[dict[str, Any]], output: str, header: str = "") -> str:
    if output == "json":
        return (
            json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}, indent=2) + "\n"
        )
    import yaml

    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    text: str = yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)
    return comment + text


# -- uninstall ------------------------------------------------------------------------------


def node_cleanup_daemonset(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A DaemonSet that runs ``weft agent --kubernetes --uninstall`` once per node (an init
    container; the pod then idles so ``kubectl rollout status`` tells when every node is
    done). Derived from the agent's DaemonSet, so it sees the same mounts and environment."""
    ds = copy.deepcopy(_find(docs, "DaemonSet", AGENT))
    labels = {"app.kubernetes.io/name": NODE_CLEANUP, "app.kubernetes.io/part-of": "weft"}
    ds["metadata"] = {
        "name": NODE_CLEANUP,
        "namespace": ds["metadata"]["namespace"],
        "labels": labels,
    }
    spec = ds["spec"]
    spec.pop("updateStrategy", None)
    spec["selector"] = {"matchLabels": {"app.kubernetes.io/name": NODE_CLEANUP}}
    pod = spec["template"]
    pod["metadata"] = {"labels": labels}
    pod_spec = pod["spec"]
    agent = _container(ds, "agent")
    keep = {"state", "bpffs", "host-cgroup"}
    pod_spec["volumes"] = [v for v in pod_spec["volumes"] if v["name"] in keep]
    pod_spec["terminationGracePeriodSeconds"] = 1
    release = {
        "name": "release",
        "image": agent["image"],
        "imagePullPolicy": agent.get("imagePullPolicy", "IfNotPresent"),
        "args": ["agent", "--kubernetes", "--uninstall"],
        "env": agent["env"],
        "securityContext": agent["securityContext"],
        "volumeMounts": [m for m in agent["volumeMounts"] if m["name"] in keep],
    }
    idle = {
        "name": "done",
        "image": agent["image"],
        "imagePullPolicy": release["imagePullPolicy"],
        "command": ["sleep", "infinity"],
        "resources": {"requests": {"cpu": "1m", "memory": "8Mi"}},
    }
    pod_spec["initContainers"] = [release]
    pod_spec["containers"] = [idle]
    return ds


def uninstall_order(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every object of the install (and the CA, which install leaves to ``weft identity
    init``) as a reference for ``kubectl delete -f -``, in the order it is safe to delete:
    the agents, the node cleanup, the control plane, then RBAC, CRDs and the namespace."""
    ns = _find(docs, "DaemonSet", AGENT)["metadata"]["namespace"]
    everything = [
        *docs,
        node_cleanup_daemonset(docs),
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": CA_SECRET, "namespace": ns}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": TRUST_BUNDLE, "namespace": ns},
        },
    ]

    def rank(d: dict[str, Any]) -> int:
        name, kind = d["metadata"]["name"], d["kind"]
        if (kind, name) == ("DaemonSet", AGENT):
            return 0
        if (kind, name) == ("DaemonSet", NODE_CLEANUP):
            return 1
        order = ["Deployment", "PodDisruptionBudget", "Service", "Secret", "ConfigMap",
                 "ClusterRoleBinding", "ClusterRole", "ServiceAccount",
                 "CustomResourceDefinition", "Namespace"]  # fmt: skip
        return 2 + (order.index(kind) if kind in order else len(order) - 2)

    refs = []
    for d in sorted(everything, key=rank):
        meta = {"name": d["metadata"]["name"]}
        if "namespace" in d["metadata"]:
            meta["namespace"] = d["metadata"]["namespace"]
        refs.append({"apiVersion": d["apiVersion"], "kind": d["kind"], "metadata": meta})
    return refs


Kubectl = Callable[[Sequence[str], str | None], str]
"""Runs ``kubectl ARGS`` (with the chosen kubeconfig), stdin optional; returns stdout,
raises UninstallError with kubectl's message when it fails."""


class UninstallError(RuntimeError):
    """A step failed; nothing after it ran. The message says which and what to do."""


def real_kubectl(kubeconfig: str, context: str | None, binary: str = "kubectl") -> Kubectl:
    base = [binary, f"--kubeconfig={kubeconfig}"] + ([f"--context={context}"] if context else [])

    def run(args: Sequence[str], stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                [*base, *args], input=stdin, capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            raise UninstallError(f"{binary} not found: install kubectl or pass --kubectl") from None
        if done.returncode != 0:
            raise UninstallError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    return run


@dataclass
class Uninstaller:
    """The uninstall steps (module docstring), over an injected ``kubectl``."""

    kubectl: Kubectl
    docs: Sequence[dict[str, Any]]
    """The rendered install (for the namespace and the node cleanup's pod)."""
    release_labels: bool = True
    """Step 1: remove the capture labels so the agents release their pods themselves."""
    timeout: float = 180.0
    """Seconds each waiting step may take."""
    force: bool = False
    """Go on when the agents cannot confirm capture is released (the node cleanup still
    detaches it, after a few seconds in which those pods' connects are refused)."""
    say: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    poll: float = 2.0
    namespace: str = field(init=False)

    def __post_init__(self) -> None:
        self.namespace = _find(self.docs, "DaemonSet", AGENT)["metadata"]["namespace"]

    def run(self) -> None:
        if self.release_labels:
            self.release_capture()
            self.wait_released()
        self.delete_agents()
        self.clean_nodes()
        self.delete_rest()

    def _names(self, *args: str) -> list[str]:
        return [n for n in self.kubectl(["get", *args, "-o", "name"], None).split() if n]

    def release_capture(self) -> None:
        namespaces = self._names("namespaces", "-l", CAPTURE_LABEL)
        if namespaces:
            self.kubectl(["label", *namespaces, f"{CAPTURE_LABEL}-"], None)
        pods = self.kubectl(
            ["get", "pods", "--all-namespaces", "-l", CAPTURE_LABEL, "-o",
             "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{'\\n'}{end}"],
            None,
        ).split()  # fmt: skip
        by_ns: dict[str, list[str]] = {}
        for ref in pods:
            ns, _, name = ref.partition("/")
            by_ns.setdefault(ns, []).append(name)
        for ns, names in sorted(by_ns.items()):
            self.kubectl(["label", "pods", "-n", ns, *names, f"{CAPTURE_LABEL}-"], None)
        self.say(
            f"1. capture released: label {CAPTURE_LABEL} removed from {len(namespaces)} "
            f"namespace(s) and {len(pods)} pod(s)"
        )

    def captured(self) -> dict[str, int | None]:
        """``weft_captured_pods`` of each agent pod (None: could not be read)."""
        out: dict[str, int | None] = {}
        for pod in self._names(
            "pods", "-n", self.namespace, "-l", f"app.kubernetes.io/name={AGENT}"
        ):
            name = pod.removeprefix("pod/")
            path = (
                f"/api/v1/namespaces/{self.namespace}/pods/{name}:{AGENT_ADMIN_PORT}/proxy/metrics"
            )
            try:
                out[name] = captured_pods(self.kubectl(["get", "--raw", path], None))
            except UninstallError:
                out[name] = None
        return out

    def wait_released(self) -> None:
        deadline = self.clock() + self.timeout
        while True:
            counts = self.captured()
            left = {p: n for p, n in counts.items() if n != 0}
            if not left:
                self.say(f"   every agent ({len(counts)}) reports weft_captured_pods 0")
                return
            if self.clock() >= deadline:
                what = ", ".join(
                    f"{p}: {'unreadable' if n is None else n}" for p, n in left.items()
                )
                if self.force:
                    self.say(f"   not confirmed ({what}); going on (--force)")
                    return
                raise UninstallError(
                    f"agents still capture pods after {self.timeout:.0f}s ({what}): is the "
                    "control plane running (it tells the agents)? Nothing was deleted; rerun "
                    "with --force to go on (those pods' connects are refused for the few "
                    "seconds between their agent leaving and the node cleanup)"
                )
            self.sleep(self.poll)

    def _wait_gone(self, selector: str, what: str) -> None:
        deadline = self.clock() + self.timeout
        while self._names("pods", "-n", self.namespace, "-l", selector):
            if self.clock() >= deadline:
                raise UninstallError(f"{what} pods still there after {self.timeout:.0f}s")
            self.sleep(self.poll)

    def delete_agents(self) -> None:
        self.kubectl(
            ["delete", "daemonset", AGENT, "-n", self.namespace, "--cascade=foreground",
             "--ignore-not-found", "--wait", f"--timeout={self.timeout:.0f}s"],
            None,
        )  # fmt: skip
        self._wait_gone(f"app.kubernetes.io/name={AGENT}", "agent")
        self.say("2. agent DaemonSet deleted, its pods gone")

    def clean_nodes(self) -> None:
        cleanup = node_cleanup_daemonset(self.docs)
        self.kubectl(["apply", "-f", "-"], dump([cleanup], "json"))
        self.kubectl(
            ["rollout", "status", f"daemonset/{NODE_CLEANUP}", "-n", self.namespace,
             f"--timeout={self.timeout:.0f}s"],
            None,
        )  # fmt: skip
        try:
            logs = self.kubectl(
                ["logs", "-n", self.namespace, "-l", f"app.kubernetes.io/name={NODE_CLEANUP}",
                 "-c", "release", "--prefix", "--tail=-1"],
                None,
            )  # fmt: skip
        except UninstallError:
            logs = ""
        self.kubectl(
            ["delete", "daemonset", NODE_CLEANUP, "-n", self.namespace, "--ignore-not-found",
             "--wait", f"--timeout={self.timeout:.0f}s"],
            None,
        )  # fmt: skip
        self.say("3. every node released by weft agent --uninstall (eBPF detached, pins removed)")
        for line in logs.splitlines():
            self.say(f"   {line}")

    def delete_rest(self) -> None:
        rest = [r for r in uninstall_order(self.docs) if r["kind"] != "DaemonSet"]
        self.kubectl(
            ["delete", "-f", "-", "--ignore-not-found", "--wait", f"--timeout={self.timeout:.0f}s"],
            dump(rest, "json"),
        )
        self.say("4. control plane, CA, RBAC, CRDs and namespace deleted")


def captured_pods(metrics: str) -> int:
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name == "weft_captured_pods":
            return int(float(value))
    raise UninstallError("no weft_captured_pods in the agent's /metrics")


# -- the commands ---------------------------------------------------------------------------


def _policy_choices() -> list[str]:
    from weft.cli.controlplane import controlplane

    for p in controlplane.params:
        if p.name == "default_inbound_policy" and isinstance(p.type, click.Choice):
            return [str(c) for c in p.type.choices]
    raise AssertionError("weft controlplane has no --default-inbound-policy")


def _render_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--image",
            default=DEFAULT_IMAGE,
            show_default=True,
            help="Image of the control plane and the agents: REPO[:TAG] or REPO@sha256:...",
        ),
        click.option("--tag", help="Tag for an --image given without one."),
        click.option("--namespace", "-n", default=DEFAULT_NAMESPACE, show_default=True),
        click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _options(image: str, tag: str | None, **kw: Any) -> InstallOptions:
    return InstallOptions(image=image_ref(image, tag), **kw)


@click.command()
@_render_options
@click.option(
    "--controlplane-replicas",
    type=click.IntRange(1, 32),
    default=2,
    show_default=True,
    help="Control plane pods (spread over nodes; a PodDisruptionBudget from 2 on).",
)
@click.option(
    "--log-level",
    "log_level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    help="Log verbosity of the control plane and the agents.",
)
@click.option(
    "--trace-collector",
    metavar="HOST:PORT",
    help="OTLP collector the agents send spans to (the agent's --trace-collector).",
)
@click.option(
    "--default-inbound-policy",
    type=click.Choice(_policy_choices()),
    help="Mesh-wide default for pods and namespaces without weft.io/default-inbound-policy.",
)
@click.option("--crds", is_flag=True, help="Only the CustomResourceDefinitions.")
@click.option("--skip-crds", is_flag=True, help="Everything but the CustomResourceDefinitions.")
@output_option("yaml", "json")
def install(
    image: str,
    tag: str | None,
    namespace: str,
    trust_domain: str,
    controlplane_replicas: int,
    log_level: str,
    trace_collector: str | None,
    default_inbound_policy: str | None,
    crds: bool,
    skip_crds: bool,
    output: str,
) -> None:
    """Print the manifests that install Weft (control plane, agent DaemonSet, RBAC, CRDs).

    \b
    weft identity init --secret-manifest | kubectl create -f -    # the CA, once
    weft install | kubectl apply -f -
    weft install --crds | kubectl apply -f -; weft install --skip-crds | kubectl apply -f -

    The CA is not part of it (docs/kubernetes.md says why `create`, not `apply`).
    """
    try:
        opts = _options(
            image, tag, namespace=namespace, trust_domain=trust_domain,
            controlplane_replicas=controlplane_replicas, log_level=log_level,
            trace_collector=trace_collector, default_inbound_policy=default_inbound_policy,
        )  # fmt: skip
        docs = select(render(load_template(), opts), crds=crds, skip_crds=skip_crds)
        verify(docs)
    except InstallError as e:
        raise click.UsageError(str(e)) from None
    header = f"Weft {__version__}, rendered by weft install: " + ", ".join(
        f"{k.replace('_', '-')}={v}" for k, v in vars(opts).items() if v is not None
    )
    click.echo(dump(docs, output, header if output == "yaml" else ""), nl=False)
    if not crds:
        click.echo(
            f"next, once: weft identity init --secret-manifest --namespace {namespace} "
            f"--trust-domain {trust_domain} | kubectl create -f -   (create, not apply)",
            err=True,
        )


@click.command()
@_render_options
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False),
    help="Run the uninstall steps against this cluster (with kubectl); without it, print "
    "the objects in the order they are safe to delete.",
)
@click.option("--context", help="kubeconfig context (with --kubeconfig).")
@click.option("--kubectl", "kubectl_bin", default="kubectl", show_default=True)
@click.option(
    "--keep-labels",
    is_flag=True,
    help="Leave the weft.io/capture labels: the node cleanup releases capture, with a few "
    "seconds per node in which captured pods' connects are refused.",
)
@click.option("--timeout", default=180.0, show_default=True, help="Seconds per waiting step.")
@click.option("--force", is_flag=True, help="Go on when agents cannot confirm the release.")
@click.option(
    "--node-cleanup",
    is_flag=True,
    help="Print only the DaemonSet that releases every node (step 3 by hand).",
)
@output_option("yaml", "json")
def uninstall(
    image: str,
    tag: str | None,
    namespace: str,
    trust_domain: str,
    kubeconfig: str | None,
    context: str | None,
    kubectl_bin: str,
    keep_labels: bool,
    timeout: float,
    force: bool,
    node_cleanup: bool,
    output: str,
) -> None:
    """Remove Weft without leaving a pod redirected to a dead port.

    \b
    weft uninstall --kubeconfig ~/.kube/config     # every step, waiting for each
    By hand (docs/kubernetes.md#uninstall): release capture (remove the weft.io/capture
    labels, wait for weft_captured_pods 0 on every agent), delete the agent DaemonSet and
    wait, `weft uninstall --node-cleanup | kubectl apply -f -` and wait for its rollout,
    then `weft uninstall | kubectl delete --ignore-not-found -f -`.
    """
    try:
        docs = render(
            load_template(),
            _options(image, tag, namespace=namespace, trust_domain=trust_domain),
        )
    except InstallError as e:
        raise click.UsageError(str(e)) from None
    if node_cleanup:
        click.echo(dump([node_cleanup_daemonset(docs)], output), nl=False)
        return
    if kubeconfig is None:
        header = (
            "Weft's objects in the order they are safe to delete. Deleting them is the\n"
            "LAST step: release capture on every node first (docs/kubernetes.md#uninstall),\n"
            "or run `weft uninstall --kubeconfig FILE`, which does every step."
        )
        click.echo(
            dump(uninstall_order(docs), output, header if output == "yaml" else ""), nl=False
        )
        if not sys.stdout.isatty():
            click.echo(
                "weft uninstall: delete these only after capture is released on every node "
                "(docs/kubernetes.md#uninstall), or use --kubeconfig",
                err=True,
            )
        return
    steps = Uninstaller(
        real_kubectl(kubeconfig, context, kubectl_bin),
        docs,
        release_labels=not keep_labels,
        timeout=timeout,
        force=force,
        say=click.echo,
    )
    try:
        steps.run()
    except UninstallError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo("Weft is uninstalled.")
