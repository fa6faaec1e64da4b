"""Pod cgroup lookup on sample directory trees: every kubelet layout, no root needed."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from nodeagent.cgroups import (
    CgroupError,
    detect_driver,
    find_pod_cgroup,
    is_same_or_below,
    lab_pod_cgroup,
    own_cgroup,
)
from weft.lab.plan import plan_lab
from weft.lab.state import LabState, lab_paths

UID = "3f9a2b1c-7d4e-4f60-9a8b-1c2d3e4f5a6b"
U_ = UID.replace("-", "_")
# Decoys differ from UID by one character, or contain it as a prefix or suffix.
DECOY_UIDS = [
    "3f9a2b1c-7d4e-4f60-9a8b-1c2d3e4f5a6c",
    UID[:-1],
    UID + "0",
    "0" + UID,
    "9-" + UID,
]
STATIC_POD_UID = "e7a2c0a0f1b53c3d4d7f6e5a4b3c2d1e"  # kubelet's hash for a static pod
CONTAINER_ID = "a" * 64

# Pod directories relative to the kubelet's root, written out rather than computed so
# that the tests do not share the module's naming logic.
TOP_LEVEL = {
    ("cgroupfs", "Guaranteed"): f"kubepods/pod{UID}",
    ("cgroupfs", "Burstable"): f"kubepods/burstable/pod{UID}",
    ("cgroupfs", "BestEffort"): f"kubepods/besteffort/pod{UID}",
    ("systemd", "Guaranteed"): f"kubepods.slice/kubepods-pod{U_}.slice",
    ("systemd", "Burstable"): (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice"
    ),
    ("systemd", "BestEffort"): (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice"
    ),
}
# kind: kubelet runs with --cgroup-root=/kubelet.
NESTED = {
    ("cgroupfs", "Guaranteed"): f"kubelet/kubepods/pod{UID}",
    ("cgroupfs", "Burstable"): f"kubelet/kubepods/burstable/pod{UID}",
    ("cgroupfs", "BestEffort"): f"kubelet/kubepods/besteffort/pod{UID}",
    (
        "systemd",
        "Guaranteed",
    ): f"kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{U_}.slice",
    ("systemd", "Burstable"): (
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
        f"kubelet-kubepods-burstable-pod{U_}.slice"
    ),
    ("systemd", "BestEffort"): (
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{U_}.slice"
    ),
}
DRIVERS = ("cgroupfs", "systemd")
QOS = ("Guaranteed", "Burstable", "BestEffort")
MOUNTS = ("unified", "hybrid", "nested")


def _mkdirs(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).mkdir(parents=True, exist_ok=True)


def _with_uid(rel: str, uid: str) -> str:
    return rel.replace(UID, uid).replace(U_, uid.replace("-", "_"))


def _containers(driver: str) -> list[str]:
    # What runtimes put inside a pod directory: one directory per container.
    if driver == "systemd":
        return [f"cri-containerd-{CONTAINER_ID}.scope", f"crio-{'b' * 64}.scope"]
    return [CONTAINER_ID, "c" * 64]


def _node(tmp_path: Path, driver: str, qos: str, mount: str) -> tuple[Path, Path]:
    """A node's cgroup tree: returns (v2 root to pass in, expected pod directory).

    Every QoS level gets decoy pods, and the pod itself has container directories.
    """
    if mount == "hybrid":
        # v1 controllers beside the v2 mount, each with its own copy of the pod: the
        # lookup must only ever look below the v2 mount it is given.
        v1 = tmp_path / "sys/fs/cgroup"
        for controller in ("memory", "cpu,cpuacct", "systemd"):
            _mkdirs(v1 / controller, TOP_LEVEL[(driver, qos)])
        root = v1 / "unified"
    else:
        root = tmp_path / "cgroup2"
    _mkdirs(root, "system.slice/containerd.service", "user.slice", "init.scope")

    layout = NESTED if mount == "nested" else TOP_LEVEL
    for other_qos in QOS:
        for decoy in DECOY_UIDS:
            _mkdirs(root, _with_uid(layout[(driver, other_qos)], decoy))
    pod = root / layout[(driver, qos)]
    for container in _containers(driver):
        _mkdirs(pod, container)
    return root, pod


LAYOUT_CASES = list(itertools.product(DRIVERS, QOS, MOUNTS))


@pytest.mark.parametrize(("driver", "qos", "mount"), LAYOUT_CASES)
def test_finds_the_pod_directory_with_the_qos_hint(tmp_path, driver, qos, mount):
    root, pod = _node(tmp_path, driver, qos, mount)
    assert find_pod_cgroup(root, UID, qos) == pod


@pytest.mark.parametrize(("driver", "qos", "mount"), LAYOUT_CASES)
def test_finds_the_pod_directory_without_a_qos_hint(tmp_path, driver, qos, mount):
    root, pod = _node(tmp_path, driver, qos, mount)
    assert find_pod_cgroup(root, UID) == pod


@pytest.mark.parametrize(("driver", "qos", "mount"), LAYOUT_CASES)
def test_a_wrong_qos_hint_still_finds_the_pod(tmp_path, driver, qos, mount):
    root, pod = _node(tmp_path, driver, qos, mount)
    wrong = next(q for q in QOS if q != qos)
    assert find_pod_cgroup(root, UID, wrong) == pod


@pytest.mark.parametrize("qos", ["burstable", "BURSTABLE", "Burstable"])
def test_qos_class_is_case_insensitive(tmp_path, qos):
    root, pod = _node(tmp_path, "systemd", "Burstable", "unified")
    assert find_pod_cgroup(root, UID, qos) == pod


@pytest.mark.parametrize("driver", DRIVERS)
def test_only_decoys_means_not_found(tmp_path, driver):
    root, pod = _node(tmp_path, driver, "Burstable", "unified")
    for container in _containers(driver):
        (pod / container).rmdir()
    pod.rmdir()
    assert find_pod_cgroup(root, UID) is None
    assert find_pod_cgroup(root, UID, "Burstable") is None


def test_known_layouts_need_no_walk(tmp_path, monkeypatch):
    roots_and_pods = [_node(tmp_path / d, d, "BestEffort", "nested") for d in DRIVERS]

    def no_walk(path):
        raise AssertionError(f"walked {path} although a direct probe would do")

    monkeypatch.setattr(os, "scandir", no_walk)
    for root, pod in roots_and_pods:
        assert find_pod_cgroup(root, UID, "BestEffort") == pod


# A kind node seen from the host: the node container's cgroup holds kubelet's tree.
KIND_FROM_HOST = {
    "systemd": (
        f"system.slice/docker-{CONTAINER_ID}.scope/kubelet.slice/kubelet-kubepods.slice/"
        f"kubelet-kubepods-pod{U_}.slice"
    ),
    "cgroupfs": f"docker/{CONTAINER_ID}/kubelet/kubepods/besteffort/pod{UID}",
}


@pytest.mark.parametrize("driver", DRIVERS)
def test_walk_finds_deeper_nesting_within_max_depth(tmp_path, driver):
    rel = KIND_FROM_HOST[driver]
    root = tmp_path / "cgroup2"
    _mkdirs(root, rel, *(f"{rel}/{c}" for c in _containers(driver)))
    depth = len(Path(rel).parts)
    assert find_pod_cgroup(root, UID, max_depth=depth) == root / rel
    assert find_pod_cgroup(root, UID, max_depth=depth - 1) is None


def test_default_depth_covers_kind_from_the_host_with_systemd(tmp_path):
    rel = KIND_FROM_HOST["systemd"]
    _mkdirs(tmp_path, rel)
    assert find_pod_cgroup(tmp_path, UID) == tmp_path / rel


def test_max_depth_zero_only_probes_known_paths(tmp_path):
    _mkdirs(tmp_path, KIND_FROM_HOST["systemd"], TOP_LEVEL[("cgroupfs", "Guaranteed")])
    assert find_pod_cgroup(tmp_path, UID, max_depth=0) == tmp_path / f"kubepods/pod{UID}"
    (tmp_path / f"kubepods/pod{UID}").rmdir()
    assert find_pod_cgroup(tmp_path, UID, max_depth=0) is None


def test_walk_does_not_follow_symlinks(tmp_path):
    outside = tmp_path / "outside"
    _mkdirs(outside, f"kubepods/pod{UID}")
    root = tmp_path / "cgroup2"
    _mkdirs(root, "system.slice")
    (root / "system.slice" / "elsewhere").symlink_to(outside, target_is_directory=True)
    assert find_pod_cgroup(root, UID) is None


def test_walk_skips_unreadable_and_vanished_directories(tmp_path, monkeypatch):
    # Faked rather than chmod-ed: the tests may run as root, which reads any directory.
    rel = "custom/root/kubepods/burstable"
    _mkdirs(tmp_path, f"{rel}/pod{UID}", "locked/inner", "vanishing/inner")
    real_scandir = os.scandir
    failures = {
        str(tmp_path / "locked"): PermissionError(13, "Permission denied"),
        str(tmp_path / "vanishing"): FileNotFoundError(2, "No such file or directory"),
    }

    def scandir(path):
        if str(path) in failures:
            raise failures[str(path)]
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert find_pod_cgroup(tmp_path, UID) == tmp_path / rel / f"pod{UID}"


def test_static_pod_uid_without_dashes(tmp_path):
    rel = f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{STATIC_POD_UID}.slice"
    _mkdirs(tmp_path, rel)
    assert find_pod_cgroup(tmp_path, STATIC_POD_UID, "BestEffort") == tmp_path / rel


def test_two_drivers_claiming_the_pod_is_an_error(tmp_path):
    _mkdirs(tmp_path, TOP_LEVEL[("cgroupfs", "Burstable")], TOP_LEVEL[("systemd", "Burstable")])
    with pytest.raises(CgroupError, match="2 cgroup directories"):
        find_pod_cgroup(tmp_path, UID)


def test_two_walk_matches_is_an_error(tmp_path):
    _mkdirs(
        tmp_path,
        f"a.slice/x-kubepods-pod{U_}.slice",
        f"b/kubepods/pod{UID}",
    )
    with pytest.raises(CgroupError, match="refusing to guess"):
        find_pod_cgroup(tmp_path, UID)


def test_missing_root_is_an_error_not_a_missing_pod(tmp_path):
    with pytest.raises(CgroupError, match=r"not a directory.*mount -t cgroup2"):
        find_pod_cgroup(tmp_path / "nope", UID)


@pytest.mark.parametrize(
    "bad_uid",
    [
        "",
        "..",
        "../../etc",
        "a/b",
        f"{UID}/..",
        "/abs",
        f"{U_}",
        "*",
        "pod?",
        "a b",
        "-leading-dash",
        "x" * 129,
        "nul\0byte",
    ],
)
def test_invalid_uid_is_rejected(tmp_path, bad_uid):
    with pytest.raises(ValueError, match="invalid pod UID"):
        find_pod_cgroup(tmp_path, bad_uid)


def test_unknown_qos_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown QoS class 'Best-Effort'"):
        find_pod_cgroup(tmp_path, UID, "Best-Effort")


def test_negative_max_depth_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="max_depth"):
        find_pod_cgroup(tmp_path, UID, max_depth=-1)


@pytest.mark.parametrize(("driver", "mount"), list(itertools.product(DRIVERS, MOUNTS)))
def test_detect_driver(tmp_path, driver, mount):
    root, _ = _node(tmp_path, driver, "Burstable", mount)
    assert detect_driver(root) == driver


def test_detect_driver_without_kubepods(tmp_path):
    _mkdirs(tmp_path, "system.slice", "user.slice", "init.scope")
    assert detect_driver(tmp_path) is None


def test_detect_driver_with_both_trees_does_not_guess(tmp_path):
    _mkdirs(tmp_path, "kubepods.slice", "kubepods")
    assert detect_driver(tmp_path) is None


def test_detect_driver_ignores_files_named_like_trees(tmp_path):
    (tmp_path / "kubepods").write_text("")
    _mkdirs(tmp_path, "kubepods.slice")
    assert detect_driver(tmp_path) == "systemd"


POD_CONTAINER = (
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/"
    f"cri-containerd-{CONTAINER_ID}.scope"
)
PURE_V2 = f"0::{POD_CONTAINER}\n"
HYBRID = """\
12:memory:/system.slice/weft-agent.service
11:cpu,cpuacct:/system.slice/weft-agent.service
10:pids:/system.slice/weft-agent.service
1:name=systemd:/system.slice/weft-agent.service
0::/system.slice/weft-agent.service
"""
V1_ONLY = """\
12:memory:/system.slice/weft-agent.service
1:name=systemd:/system.slice/weft-agent.service
"""


def test_own_cgroup_pure_v2(tmp_path):
    assert own_cgroup(PURE_V2, tmp_path) == tmp_path / POD_CONTAINER.lstrip("/")


def test_own_cgroup_hybrid_uses_only_the_v2_line(tmp_path):
    unified = tmp_path / "sys/fs/cgroup/unified"
    assert own_cgroup(HYBRID, unified) == unified / "system.slice/weft-agent.service"


def test_own_cgroup_at_the_root(tmp_path):
    assert own_cgroup("0::/\n", tmp_path) == tmp_path


def test_own_cgroup_keeps_colons_in_the_path(tmp_path):
    assert own_cgroup("0::/lab/a:b\n", tmp_path) == tmp_path / "lab/a:b"


@pytest.mark.parametrize("text", [V1_ONLY, "", "\n"])
def test_own_cgroup_without_v2_says_what_to_do(tmp_path, text):
    with pytest.raises(CgroupError, match=r"no cgroup v2 entry.*mount -t cgroup2"):
        own_cgroup(text, tmp_path)


@pytest.mark.parametrize("text", ["garbage\n", "0:/only-one-colon\n", "x::/a\n"])
def test_own_cgroup_rejects_malformed_lines(tmp_path, text):
    with pytest.raises(ValueError, match="not 'ID:controllers:path'"):
        own_cgroup(text, tmp_path)


def test_own_cgroup_rejects_two_v2_lines(tmp_path):
    with pytest.raises(ValueError, match="2 cgroup v2"):
        own_cgroup("0::/a\n0::/b\n", tmp_path)


def test_own_cgroup_rejects_a_removed_cgroup(tmp_path):
    with pytest.raises(CgroupError, match="has been removed"):
        own_cgroup("0::/gone (deleted)\n", tmp_path)


def test_own_cgroup_outside_the_cgroup_namespace(tmp_path):
    with pytest.raises(CgroupError, match="host's cgroup namespace"):
        own_cgroup("0::/../../system.slice/weft-agent.service\n", tmp_path)


def test_own_cgroup_rejects_a_relative_path(tmp_path):
    with pytest.raises(ValueError, match="not absolute"):
        own_cgroup("0::relative\n", tmp_path)


def test_is_same_or_below(tmp_path):
    pod = tmp_path / f"kubepods/pod{UID}"
    _mkdirs(pod, CONTAINER_ID)
    assert is_same_or_below(pod, pod)
    assert is_same_or_below(pod / CONTAINER_ID, pod)
    assert not is_same_or_below(pod.parent, pod)
    assert not is_same_or_below(tmp_path / "system.slice", pod)
    # A string prefix is not an ancestor.
    assert not is_same_or_below(tmp_path / f"kubepods/pod{UID}0", pod)
    # ".." is resolved, not compared as text.
    assert not is_same_or_below(pod / ".." / "besteffort", pod)
    assert is_same_or_below(tmp_path / "kubepods" / "x" / ".." / f"pod{UID}", pod)


def test_is_same_or_below_resolves_symlinks(tmp_path):
    pod = tmp_path / f"kubepods/pod{UID}"
    _mkdirs(pod)
    (tmp_path / "link").symlink_to(pod, target_is_directory=True)
    assert is_same_or_below(tmp_path / "link" / CONTAINER_ID, pod)


def test_agent_inside_a_captured_pod_is_detected(tmp_path):
    # How the agent uses these together: refuse to capture a pod that contains itself.
    root, _ = _node(tmp_path, "systemd", "Burstable", "unified")
    captured = find_pod_cgroup(root, UID, "Burstable")
    assert captured is not None
    assert is_same_or_below(own_cgroup(PURE_V2, root), captured)
    assert not is_same_or_below(own_cgroup(HYBRID, root), captured)


def test_lab_pod_cgroup(tmp_path):
    assert lab_pod_cgroup(tmp_path, "weft", "node-1", "echo-1") == (
        tmp_path / "weft-lab-weft" / "node-1" / "echo-1"
    )


def test_lab_pod_cgroup_matches_the_labs_own_layout():
    plan = plan_lab("weft", nodes=2, pods_per_node=2, demo=True)
    mount = "/sys/fs/cgroup/unified"
    state = LabState(plan=plan, phase="ready", paths=lab_paths("weft", mount))
    for pod in plan.pods:
        expected = state.pod_cgroup(pod)
        assert lab_pod_cgroup(Path(mount), "weft", pod.node, pod.name) == expected


@pytest.mark.parametrize(
    ("lab", "node", "pod"),
    [("", "n", "p"), ("l", "..", "p"), ("l", "n", "a/b"), ("l", ".", "p"), ("l/x", "n", "p")],
)
def test_lab_pod_cgroup_rejects_path_tricks(tmp_path, lab, node, pod):
    with pytest.raises(ValueError, match="single path component"):
        lab_pod_cgroup(tmp_path, lab, node, pod)
