"""weft install / weft uninstall: every rendered variant valid against the newest Kubernetes
schemas kubernetes-validate ships; each option lands where the agent and the control plane
read it (their real commands run on the rendered argv and environment, up to the config
they would start with); --crds only CRDs; the CA never in the output; uninstall's order,
and its steps against a fake kubectl that stands for a cluster. Negative tests show each
check can fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]  # comes with the kubernetes client
from click.testing import CliRunner

from tests.unit.test_manifests import K8S_VERSION
from weft.cli import cli
from weft.cli import install as inst
from weft.cli.agent import agent as agent_command
from weft.cli.controlplane import controlplane as controlplane_command
from weft.identity import DEFAULT_TRUST_DOMAIN

VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "everything": [
        "--image",
        "registry.local:5000/weft",
        "--tag",
        "0.1.0",
        "-n",
        "mesh",
        "--trust-domain",
        "example.org",
        "--controlplane-replicas",
        "3",
        "--log-level",
        "debug",
        "--default-inbound-policy",
        "deny",
    ],
    "one-replica": ["--controlplane-replicas", "1"],
    "digest": ["--image", "ghcr.io/acme/weft@sha256:" + "a" * 64],
    "crds": ["--crds"],
    "skip-crds": ["--skip-crds", "--namespace", "weft"],
    **{f"policy-{p}": ["--default-inbound-policy", p] for p in inst._policy_choices()},
}


def _install(args: list[str], output: str = "yaml") -> list[dict[str, Any]]:
    result = CliRunner().invoke(cli, ["install", *args, "-o", output])
    assert result.exit_code == 0, result.output
    if output == "json":
        listed = json.loads(result.stdout)
        assert listed["kind"] == "List"
        return list(listed["items"])
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("args", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_variant_is_valid_for_the_newest_kubernetes(args: list[str]) -> None:
    docs = _install(args)
    assert docs
    for doc in docs:
        _validate(doc)
    assert _install(args, "json") == docs  # -o json: the same objects, as a v1 List


def test_a_broken_object_fails_validation() -> None:
    """The validation above is live: a wrong type and an unknown field are refused."""
    docs = _install([])
    cp = _one(docs, "Deployment")
    cp["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(cp)
    ds = _one(docs, "DaemonSet")
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(ds)


# -- options land where the code reads them -------------------------------------------------


def _pod_env(container: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """The container's environment as the kubelet would give it: downward-API fields
    filled in, and the host mounts pointed at directories of this test."""
    fields = {"spec.nodeName": "node-a", "status.hostIP": "192.0.2.10", "metadata.uid": "u-1"}
    env = {}
    for e in container["env"]:
        env[e["name"]] = (
            e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        )
    for name in ("cgroup", "bpf"):
        (tmp_path / name).mkdir(exist_ok=True)
    return env | {"WEFT_CGROUP2": str(tmp_path / "cgroup"), "WEFT_BPFFS": str(tmp_path / "bpf")}


def _agent_config(container: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run the real ``weft agent`` on the rendered argv and environment; stop where it
    would start the agent, and return the AgentConfig it built."""
    import nodeagent.agent

    started: list[Any] = []

    def run(cfg: Any) -> int:
        started.append(cfg)
        return 0

    def uninstall(cfg: Any) -> list[str]:
        started.append(cfg)
        return []

    monkeypatch.setattr(nodeagent.agent, "run", run)
    monkeypatch.setattr(nodeagent.agent, "uninstall", uninstall)
    monkeypatch.delenv("WEFT_LAB", raising=False)
    argv = container["args"]
    assert argv[0] == "agent"
    result = CliRunner().invoke(agent_command, argv[1:], env=_pod_env(container, tmp_path))
    assert result.exit_code == 0, result.output
    (cfg,) = started
    return cfg


def _controlplane_start(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch):
    """Run the real ``weft controlplane`` on the rendered argv, up to its config."""
    import controlplane.identity.server

    started: list[Any] = []
    monkeypatch.setattr(
        controlplane.identity.server, "run_controlplane", lambda c, k: started.append((c, k))
    )
    monkeypatch.delenv("WEFT_LAB", raising=False)
    argv = container["args"]
    assert argv[0] == "controlplane"
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    result = CliRunner().invoke(
        controlplane_command, [*argv[1:], "--kube-server", "https://10.96.0.1"], env=env
    )
    assert result.exit_code == 0, result.output
    (got,) = started
    return got


def _log_level(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    """``weft``'s own --log-level default comes from $WEFT_LOG_LEVEL."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    monkeypatch.setenv("WEFT_LOG_LEVEL", env["WEFT_LOG_LEVEL"])
    ctx = cli.make_context("weft", list(container["args"]))
    return str(ctx.params["log_level"])


def test_options_reach_the_agent_and_control_plane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = _install(VARIANTS["everything"])
    ds, cp = _one(docs, "DaemonSet"), _one(docs, "Deployment")
    agent, control = _container(ds), _container(cp)
    assert agent["image"] == control["image"] == "registry.local:5000/weft:0.1.0"
    cfg = _agent_config(agent, tmp_path, monkeypatch)
    assert cfg.trust_domain == "example.org"
    # The agent dials the Service of this install, in this namespace.
    service = _one(docs, "Service")
    assert cfg.controlplane == f"{service['metadata']['name']}.mesh.svc"
    assert service["metadata"]["namespace"] == "mesh"
    assert (cfg.node, cfg.proxy_ip, cfg.pod_uid) == ("node-a", "192.0.2.10", "u-1")
    config, kube = _controlplane_start(control, monkeypatch)
    assert config.identity.trust_domain == "example.org"
    assert config.mesh.default_inbound_policy == "deny"
    # Only the agents of this namespace bootstrap: their ServiceAccount, TokenReview-checked.
    assert kube.agent == ("mesh", ds["spec"]["template"]["spec"]["serviceAccountName"])
    assert _one(docs, "ServiceAccount", kube.agent[1])["metadata"]["namespace"] == "mesh"
    assert cp["spec"]["replicas"] == 3 and _one(docs, "PodDisruptionBudget")
    assert _log_level(agent, monkeypatch) == _log_level(control, monkeypatch) == "debug"
    (subject,) = _one(docs, "ClusterRoleBinding")["subjects"]
    assert subject == subject | {"name": "weft-controlplane", "namespace": "mesh"}
    assert _one(docs, "Namespace")["metadata"]["name"] == "mesh"
    for doc in docs:
        if doc["kind"] not in inst.CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == "mesh", doc["metadata"]


def test_defaults_are_the_codes_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _install([])
    cfg = _agent_config(_container(_one(docs, "DaemonSet")), tmp_path, monkeypatch)
    assert cfg.trust_domain == DEFAULT_TRUST_DOMAIN
    assert cfg.controlplane == "weft-controlplane.weft-system.svc"
    config, kube = _controlplane_start(_container(_one(docs, "Deployment")), monkeypatch)
    assert config.identity.trust_domain == DEFAULT_TRUST_DOMAIN
    assert kube.agent == ("weft-system", "weft-agent")
    assert config.mesh.default_inbound_policy == ""  # the control plane's own default
    assert _one(docs, "Deployment")["spec"]["replicas"] == 2
    assert _container(_one(docs, "DaemonSet"))["image"] == "weft:latest"


def test_policy_choices_are_the_control_planes() -> None:
    (param,) = [p for p in controlplane_command.params if p.name == "default_inbound_policy"]
    assert inst._policy_choices() == list(param.type.choices)  # type: ignore[attr-defined]
    result = CliRunner().invoke(cli, ["install", "--default-inbound-policy", "allow-all"])
    assert result.exit_code == 2 and "allow-all" in result.output


def test_one_replica_has_no_disruption_budget() -> None:
    """minAvailable 1 of 1 replica would block every node drain."""
    docs = _install(VARIANTS["one-replica"])
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert _one(docs, "Deployment")["spec"]["replicas"] == 1


def test_trace_collector_is_the_agents_flag_or_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--trace-collector", "otel-collector.observability:4317"]
    if any(p.name == "trace_collector" for p in agent_command.params):
        agent = _container(_one(_install(args), "DaemonSet"))
        assert "--trace-collector=otel-collector.observability:4317" in agent["args"]
        _agent_config(agent, tmp_path, monkeypatch)  # the agent takes it
    else:
        # This build's agent has no tracing exporter yet: install says so rather than
        # rendering an agent that would exit with "no such option" on every node.
        result = CliRunner().invoke(cli, ["install", *args])
        assert result.exit_code == 2
        assert "does not accept --trace-collector" in result.output
    result = CliRunner().invoke(cli, ["install", "--trace-collector", "otel"])
    assert result.exit_code == 2 and "HOST:PORT" in result.output


def test_verify_refuses_what_the_real_commands_refuse() -> None:
    docs = inst.render(inst.load_template(), inst.InstallOptions())
    inst.verify(docs)
    _container(_one(docs, "DaemonSet"))["args"].append("--no-such-flag")
    with pytest.raises(inst.InstallError, match="--no-such-flag"):
        inst.verify(docs)
    docs = inst.render(inst.load_template(), inst.InstallOptions())
    inst.set_flag(_container(_one(docs, "Deployment"))["args"], "--api-port", "many")
    with pytest.raises(inst.InstallError, match="api-port"):
        inst.verify(docs)
    docs = inst.render(inst.load_template(), inst.InstallOptions())
    inst.set_env(_container(_one(docs, "Deployment")), "WEFT_LOG_LEVEL", "chatty")
    with pytest.raises(inst.InstallError, match="log level"):
        inst.verify(docs)


@pytest.mark.parametrize(
    ("ref", "parts"),
    [
        ("weft", ("weft", None, None)),
        ("weft:0.1", ("weft", "0.1", None)),
        ("localhost:5000/weft", ("localhost:5000/weft", None, None)),
        ("localhost:5000/team/weft:v1", ("localhost:5000/team/weft", "v1", None)),
        ("ghcr.io/a/weft@sha256:" + "0" * 64, ("ghcr.io/a/weft", None, "sha256:" + "0" * 64)),
    ],
)
def test_image_references(ref: str, parts: tuple[str, str | None, str | None]) -> None:
    assert inst.split_image(ref) == parts


@pytest.mark.parametrize(
    "args",
    [
        ["--image", "weft:1", "--tag", "2"],
        ["--image", "weft@sha256:abc"],
        ["--image", "weft:bad tag"],
        ["--namespace", "Weft_System"],
        ["--trust-domain", "Not A Domain"],
        ["--controlplane-replicas", "0"],
        ["--crds", "--skip-crds"],
    ],
    ids=["tag-twice", "short-digest", "space", "namespace", "trust-domain", "replicas", "both"],
)
def test_bad_options_are_refused(args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["install", *args])
    assert result.exit_code == 2, result.output


def test_rendering_sets_fields_not_text() -> None:
    """A namespace that also appears in comments and unrelated strings changes only the
    fields that name the namespace; the template itself is left as it was."""
    template = inst.load_template()
    before = json.dumps(template)
    docs = inst.render(template, inst.InstallOptions(namespace="weft-agent"))
    assert json.dumps(template) == before
    assert _one(docs, "DaemonSet")["metadata"]["name"] == "weft-agent"
    crd = _one(docs, "CustomResourceDefinition")
    assert "namespace" not in crd["metadata"]
    assert crd == _one(template, "CustomResourceDefinition")


# -- what is in and out of the output ---------------------------------------------------------


def test_crds_only_crds_and_skip_crds_none() -> None:
    everything = _install([])
    crds = _install(["--crds"])
    assert crds and {d["kind"] for d in crds} == {"CustomResourceDefinition"}
    rest = _install(["--skip-crds"])
    assert "CustomResourceDefinition" not in {d["kind"] for d in rest}
    # Together they are the default install: `weft install | kubectl apply -f -` is whole.
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, crds + rest)) == sorted(map(key, everything))
    assert {"Namespace", "DaemonSet", "Deployment", "CustomResourceDefinition"} <= {
        d["kind"] for d in everything
    }


def test_only_crds_check_fails_on_a_mixed_list() -> None:
    docs = inst.render(inst.load_template(), inst.InstallOptions())
    mixed = inst.select(docs, crds=False, skip_crds=False)
    assert not all(inst.is_crd(d) for d in mixed)  # the check used above can say no


def test_the_ca_key_is_never_in_the_output() -> None:
    result = CliRunner().invoke(cli, ["install"])
    assert result.exit_code == 0
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert "Secret" not in {d["kind"] for d in docs}
    assert "PRIVATE KEY" not in result.stdout and "tls.key" not in result.stdout
    # The CA comes from weft identity init, with create (no last-applied annotation).
    assert "| kubectl create -f -" in result.stderr
    # Both pods still mount what identity init makes.
    cp_volumes = _one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "ca", "secret": {"secretName": inst.CA_SECRET, "defaultMode": 0o440}} in (
        cp_volumes
    )
    ds_volumes = _one(docs, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "trust-bundle", "configMap": {"name": inst.TRUST_BUNDLE}} in ds_volumes


# -- uninstall ------------------------------------------------------------------------------


def _check_uninstall_order(refs: list[dict[str, Any]]) -> None:
    """Agents first, then the node cleanup, then the control plane, then what the control
    plane needs (RBAC), then CRDs, the namespace last."""
    names = [(r["kind"], r["metadata"]["name"]) for r in refs]
    at = names.index
    assert names[0] == ("DaemonSet", inst.AGENT), names
    assert at(("DaemonSet", inst.NODE_CLEANUP)) < at(("Deployment", inst.CONTROLPLANE))
    rbac = [("ClusterRole", inst.CONTROLPLANE), ("ClusterRoleBinding", inst.CONTROLPLANE),
            ("ServiceAccount", inst.CONTROLPLANE), ("ServiceAccount", inst.AGENT)]  # fmt: skip
    for later in rbac:
        assert at(("Deployment", inst.CONTROLPLANE)) < at(later), later
        assert at(later) < at(("CustomResourceDefinition", "authorizationpolicies.weft.io"))
    assert names[-1][0] == "Namespace", names


def test_uninstall_prints_every_object_in_a_safe_order() -> None:
    result = CliRunner().invoke(cli, ["uninstall", "-n", "mesh"])
    assert result.exit_code == 0
    refs = [d for d in yaml.safe_load_all(result.stdout) if d]
    _check_uninstall_order(refs)
    installed = {(d["kind"], d["metadata"]["name"]) for d in _install(["-n", "mesh"])}
    listed = {(r["kind"], r["metadata"]["name"]) for r in refs}
    assert installed | {("Secret", inst.CA_SECRET), ("ConfigMap", inst.TRUST_BUNDLE),
                        ("DaemonSet", inst.NODE_CLEANUP)} == listed  # fmt: skip
    for r in refs:
        assert r["metadata"].get("namespace", "mesh") == "mesh"
    assert "LAST step" in result.stdout and "capture is released" in result.stderr


@pytest.mark.parametrize(
    "swap",
    [(0, 1), (2, -1), (0, -1)],
    ids=["cleanup-before-agents", "namespace-first", "agents-last"],
)
def test_the_order_check_catches_a_wrong_order(swap: tuple[int, int]) -> None:
    refs = inst.uninstall_order(inst.render(inst.load_template(), inst.InstallOptions()))
    i, j = swap
    refs[i], refs[j] = refs[j], refs[i]
    with pytest.raises(AssertionError):
        _check_uninstall_order(refs)


def test_node_cleanup_runs_the_agents_uninstall_with_its_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = inst.render(inst.load_template(), inst.InstallOptions(image="weft:9"))
    cleanup = inst.node_cleanup_daemonset(docs)
    _validate(cleanup)
    pod = cleanup["spec"]["template"]["spec"]
    (release,) = pod["initContainers"]
    assert release["args"] == ["agent", "--kubernetes", "--uninstall"]
    assert release["image"] == _container(cleanup)["image"] == "weft:9"
    assert release["securityContext"]["privileged"] is True
    cfg = _agent_config(release, tmp_path, monkeypatch)  # the agent's config, as uninstall sees it
    agent = _container(_one(docs, "DaemonSet"))
    agent_mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    mounts = {m["mountPath"]: m["name"] for m in release["volumeMounts"]}
    # What uninstall reads and changes: the record of attached cgroups, the pins, cgroup2.
    for path in (cfg.state_dir, Path("/sys/fs/bpf"), Path("/host/cgroup")):
        assert mounts[str(path)] == agent_mounts[str(path)]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert host == {"state": "/var/run/weft/agent", "bpffs": "/sys/fs/bpf",
                    "host-cgroup": "/sys/fs/cgroup"}  # fmt: skip
    assert pod["tolerations"] == [{"operator": "Exists"}]  # every node, like the agents
    assert cleanup["spec"]["selector"]["matchLabels"] != _one(docs, "DaemonSet")["spec"][
        "selector"]["matchLabels"]  # fmt: skip


class FakeCluster:
    """Stands for kubectl and a cluster: capture labels on namespaces and pods, agents
    whose weft_captured_pods falls to 0 a few polls after the labels go (discovery takes a
    moment), DaemonSets whose pods go when they are deleted."""

    def __init__(self, *, releases_after: int | None = 2, readable: bool = True) -> None:
        self.calls: list[list[str]] = []
        self.labelled_ns = ["namespace/shop"]
        self.labelled_pods = {"shop": ["web-1", "web-2"], "batch": ["job-1"]}
        self.agents = ["weft-agent-a", "weft-agent-b"]
        self.captured = {a: 3 for a in self.agents}
        self.releases_after = releases_after
        self.readable = readable
        self.polls_since_release = 0
        self.applied: list[dict[str, Any]] = []
        self.deleted: list[tuple[str, str]] = []

    def __call__(self, args: Any, stdin: str | None) -> str:
        args = list(args)
        self.calls.append(args)
        verb = args[0]
        if verb == "get" and args[1] == "namespaces":
            return "\n".join(self.labelled_ns)
        if verb == "get" and args[1] == "pods" and "--all-namespaces" in args:
            return "\n".join(f"{ns}/{p}" for ns, ps in self.labelled_pods.items() for p in ps)
        if verb == "get" and args[1] == "pods":
            return "\n".join(f"pod/{a}" for a in self.agents)
        if verb == "get" and args[1] == "--raw":
            if not self.readable:
                raise inst.UninstallError("the server is currently unable to handle the request")
            name = args[2].split("/pods/")[1].split(":")[0]
            return f"# TYPE weft_captured_pods gauge\nweft_captured_pods {self.captured[name]}.0\n"
        if verb == "label":
            if args[1].startswith("namespace/"):
                self.labelled_ns = []
            else:
                self.labelled_pods.pop(args[3])
            if not self.labelled_ns and not self.labelled_pods:
                self._on_release()
            return ""
        if verb == "delete" and args[1] == "daemonset":
            self.deleted.append(("DaemonSet", args[2]))
            if args[2] == inst.AGENT:
                self.agents = []
            return ""
        if verb == "delete":
            assert stdin is not None
            self.deleted += [(d["kind"], d["metadata"]["name"]) for d in json.loads(stdin)["items"]]
            return ""
        if verb == "apply":
            assert stdin is not None
            self.applied += json.loads(stdin)["items"]
            return ""
        if verb in ("rollout", "logs"):
            return "[pod/weft-node-cleanup-x/release] removed pins /sys/fs/bpf/weft/node-a\n"
        raise AssertionError(f"unexpected kubectl {args}")

    def _on_release(self) -> None:
        self.release_requested = True

    def tick(self, _seconds: float) -> None:
        if getattr(self, "release_requested", False) and self.releases_after is not None:
            self.polls_since_release += 1
            if self.polls_since_release >= self.releases_after:
                self.captured = dict.fromkeys(self.captured, 0)

    def verbs(self) -> list[str]:
        return [" ".join(c[:3]) for c in self.calls]


def _uninstaller(cluster: FakeCluster, **kw: Any) -> inst.Uninstaller:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s
        cluster.tick(s)

    docs = inst.render(inst.load_template(), inst.InstallOptions())
    return inst.Uninstaller(
        cluster, docs, say=lambda _l: None, sleep=sleep, clock=lambda: now[0], timeout=30, **kw
    )


def test_uninstall_steps_release_capture_before_the_agents_go() -> None:
    cluster = FakeCluster()
    _uninstaller(cluster).run()
    calls = cluster.calls
    first = lambda pred: next(i for i, c in enumerate(calls) if pred(c))  # noqa: E731
    last_label = max(i for i, c in enumerate(calls) if c[0] == "label")
    zero = max(i for i, c in enumerate(calls) if c[:2] == ["get", "--raw"])
    delete_agents = first(lambda c: c[:3] == ["delete", "daemonset", inst.AGENT])
    apply_cleanup = first(lambda c: c[0] == "apply")
    rollout = first(lambda c: c[0] == "rollout")
    delete_cleanup = first(lambda c: c[:3] == ["delete", "daemonset", inst.NODE_CLEANUP])
    delete_rest = first(lambda c: c[:2] == ["delete", "-f"])
    assert last_label < zero < delete_agents < apply_cleanup < rollout < delete_cleanup
    assert delete_cleanup < delete_rest == len(calls) - 1
    # Every label removed; the agents read until each said 0; the agents' pods waited for.
    assert not cluster.labelled_ns and not cluster.labelled_pods
    assert set(cluster.captured.values()) == {0}
    assert "--cascade=foreground" in calls[delete_agents]
    assert any(c[:2] == ["get", "pods"] and "--all-namespaces" not in c
               for c in calls[delete_agents:apply_cleanup])  # fmt: skip
    (cleanup,) = cluster.applied
    assert cleanup["metadata"]["name"] == inst.NODE_CLEANUP
    # The rest went in the safe order, the agents' DaemonSet not twice.
    rest = json.loads(inst.dump([r for r in inst.uninstall_order(_uninstaller(FakeCluster()).docs)
                                 if r["kind"] != "DaemonSet"], "json"))["items"]  # fmt: skip
    assert cluster.deleted[2:] == [(r["kind"], r["metadata"]["name"]) for r in rest]
    assert cluster.deleted[-1][0] == "Namespace"


def test_uninstall_deletes_nothing_while_agents_still_capture() -> None:
    cluster = FakeCluster(releases_after=None)
    with pytest.raises(inst.UninstallError, match="still capture"):
        _uninstaller(cluster).run()
    assert not [c for c in cluster.calls if c[0] in ("delete", "apply")]
    unreadable = FakeCluster(readable=False)
    with pytest.raises(inst.UninstallError, match="unreadable"):
        _uninstaller(unreadable).run()
    assert not [c for c in unreadable.calls if c[0] in ("delete", "apply")]


def test_uninstall_force_and_keep_labels() -> None:
    forced = FakeCluster(releases_after=None)
    _uninstaller(forced, force=True).run()
    assert ("DaemonSet", inst.AGENT) in forced.deleted  # the node cleanup then releases
    kept = FakeCluster()
    _uninstaller(kept, release_labels=False).run()
    assert not [c for c in kept.calls if c[0] == "label"]
    assert kept.labelled_pods and kept.deleted[0] == ("DaemonSet", inst.AGENT)


def test_uninstall_node_cleanup_is_printable_for_the_manual_steps() -> None:
    result = CliRunner().invoke(cli, ["uninstall", "--node-cleanup", "--image", "weft:9"])
    assert result.exit_code == 0
    (ds,) = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert ds["metadata"]["name"] == inst.NODE_CLEANUP
    _validate(ds)


def test_captured_pods_reads_the_agents_gauge() -> None:
    assert inst.captured_pods("# HELP x\nweft_captured_pods 4.0\nweft_captured_podsx 1\n") == 4
    with pytest.raises(inst.UninstallError):
        inst.captured_pods("weft_other 1\n")


def test_real_kubectl_passes_the_kubeconfig_and_reports_kubectls_error(tmp_path: Path) -> None:
    """The subprocess seam itself, with a stand-in kubectl binary that records its argv."""
    log = tmp_path / "argv"
    fake = tmp_path / "kubectl"
    fake.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {log}\n'
        "cat > /dev/null\n"
        'case "$*" in *forbidden*) echo "Error from server (Forbidden): no" >&2; exit 1;; esac\n'
        "echo ok\n"
    )
    fake.chmod(0o755)
    run = inst.real_kubectl(str(tmp_path / "cfg"), "kind-weft", binary=str(fake))
    assert run(["get", "pods"], "stdin text") == "ok\n"
    assert log.read_text().split() == [f"--kubeconfig={tmp_path / 'cfg'}", "--context=kind-weft",
                                       "get", "pods"]  # fmt: skip
    with pytest.raises(inst.UninstallError, match=r"kubectl get forbidden: .*Forbidden"):
        run(["get", "forbidden"], None)
    missing = inst.real_kubectl("cfg", None, binary=str(tmp_path / "nope"))
    with pytest.raises(inst.UninstallError, match="not found"):
        missing(["version"], None)


def test_uninstall_command_stops_at_the_first_failed_step(tmp_path: Path) -> None:
    fake = tmp_path / "kubectl"
    fake.write_text('#!/bin/sh\necho "The connection to the server was refused" >&2\nexit 1\n')
    fake.chmod(0o755)
    result = CliRunner().invoke(
        cli, ["uninstall", "--kubeconfig", str(tmp_path / "cfg"), "--kubectl", str(fake)]
    )
    assert result.exit_code == 1
    assert "error: kubectl get namespaces" in result.output and "refused" in result.output
    assert "uninstalled" not in result.output
