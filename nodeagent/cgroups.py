"""Find a pod's cgroup v2 directory on a node: the place where capture is attached.

The agent attaches ``cgroup/connect4``, ``sock_ops`` and ``cgroup_skb`` programs to the
cgroup of each captured pod, so it has to turn a pod UID (and, as a hint, its QoS class)
into a directory under the cgroup v2 mount. kubelet names pod cgroups by cgroup driver
and QoS class (``<uid_>`` is the UID with ``-`` replaced by ``_``, because ``-`` is the
separator in systemd slice names)::

    cgroupfs  Guaranteed  kubepods/pod<uid>
              Burstable   kubepods/burstable/pod<uid>
              BestEffort  kubepods/besteffort/pod<uid>
    systemd   Guaranteed  kubepods.slice/kubepods-pod<uid_>.slice
              Burstable   kubepods.slice/kubepods-burstable.slice/
                              kubepods-burstable-pod<uid_>.slice
              BestEffort  (as Burstable, with ``besteffort``)

The same layout appears below the v2 mount whether cgroup v2 is mounted at
``/sys/fs/cgroup`` (unified) or beside v1 controllers (hybrid, typically
``/sys/fs/cgroup/unified``); callers pass the v2 mount in (``weft.preflight`` finds it).
Container directories (``cri-containerd-<id>.scope``, ``<id>``, ...) sit inside the pod
directory; we always return the pod directory, because a pod's containers come and go
and attachments on a pod cgroup cover all of them (cgroup programs are inherited).

Why a bounded walk after the direct probes: kubelet's ``--cgroup-root`` can nest the
whole tree (kind uses ``/kubelet``, giving ``kubelet/kubepods/...`` or
``kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/...``), and an
agent that sees the node from outside a container finds it further down still
(``system.slice/docker-<id>.scope/kubelet.slice/...``). Hard-coding every prefix would
miss the next distribution's; an unbounded walk would visit every container and service
cgroup on a busy node on each lookup. So :func:`find_pod_cgroup` probes the known paths
first (a dozen ``stat`` calls, which covers almost every real node), then walks
breadth-first to ``max_depth``, matching on the pod directory's name alone, never
following symlinks and never descending into a matched pod directory.

More than one match is an error rather than a guess: attaching to a stale or foreign
directory would leave the real pod silently uncaptured.

Not supported: hosts with cgroup v1 only (eBPF cgroup hooks attach to v2 directories
only; mount cgroup2 somewhere, see ``weft check``), hybrid hosts whose runtime creates
pod cgroups in the v1 hierarchies but not in the v2 one (the lookup finds nothing), and
kubelet with ``--cgroups-per-qos=false`` (there is no pod-level cgroup to attach to).

The lab lays its pods out itself as ``<root>/weft-lab-<lab>/<node>/<pod>``, so it needs
no search: :func:`lab_pod_cgroup` builds that path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

from weft.preflight import CGROUP2_HINT

Driver = Literal["systemd", "cgroupfs"]

QOS_CLASSES: dict[str, tuple[str, ...]] = {
    # Kubernetes ``status.qosClass`` (lowercased) -> the QoS level between kubepods and
    # the pod. Guaranteed pods sit directly under kubepods.
    "guaranteed": (),
    "burstable": ("burstable",),
    "besteffort": ("besteffort",),
}

# Roots kubelet is commonly configured with (``--cgroup-root``): the default, and kind's
# ``/kubelet``. Both are probed directly; anything else is left to the walk.
_KUBELET_ROOTS: tuple[tuple[str, ...], ...] = ((), ("kubelet",))

# Pod UIDs are UUIDs from the API server, or 32 hex digits for static pods (kubelet
# hashes the manifest). Allowing only letters, digits and dashes keeps the UID a single
# path component (no ``/``, no ``..``), keeps glob and escape characters out, and rules
# out ``_``, which the systemd driver's ``-`` -> ``_`` escaping would make ambiguous.
_POD_UID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}$")

_V2_DELETED_SUFFIX = " (deleted)"


class CgroupError(RuntimeError):
    """The host's cgroups are not as the agent needs them (a hint says what to do)."""


def validate_pod_uid(pod_uid: str) -> str:
    """Return ``pod_uid`` unchanged if it is safe to build a cgroup name from, else raise."""
    if not _POD_UID_RE.match(pod_uid):
        raise ValueError(
            f"invalid pod UID {pod_uid!r}: expected a Kubernetes UID (letters, digits and "
            "dashes, e.g. 3f9a2b1c-7d4e-4f60-9a8b-1c2d3e4f5a6b); refusing to build a cgroup "
            "path from it (no '/', '..' or '_')"
        )
    return pod_uid


def _parse_qos(qos: str | None) -> Sequence[tuple[str, ...]]:
    if qos is None:
        return tuple(QOS_CLASSES.values())
    try:
        return (QOS_CLASSES[qos.lower()],)
    except KeyError:
        raise ValueError(
            f"unknown QoS class {qos!r}: expected Guaranteed, Burstable or BestEffort "
            "(or None to try all three)"
        ) from None


def _systemd_escape(part: str) -> str:
    # kubelet's systemd cgroup driver: "-" separates ancestry in slice names.
    return part.replace("-", "_")


def _cgroupfs_rel(parts: Sequence[str]) -> PurePosixPath:
    return PurePosixPath(*parts)


def _systemd_rel(parts: Sequence[str]) -> PurePosixPath:
    # systemd spells a slice's whole ancestry in its name: a/b/c -> a.slice/a-b.slice/a-b-c.slice
    escaped = [_systemd_escape(p) for p in parts]
    return PurePosixPath(*("-".join(escaped[: i + 1]) + ".slice" for i in range(len(escaped))))


def _direct_candidates(
    pod_uid: str, qos_levels: Sequence[tuple[str, ...]]
) -> Iterator[PurePosixPath]:
    for kubelet_root in _KUBELET_ROOTS:
        for level in qos_levels:
            parts = (*kubelet_root, "kubepods", *level, f"pod{pod_uid}")
            yield _cgroupfs_rel(parts)
            yield _systemd_rel(parts)


def _is_pod_dir_name(name: str, pod_uid: str) -> bool:
    # Exact names only: a prefix or substring match would also take pods whose UID merely
    # starts or ends like this one. The systemd prefix varies with the nesting
    # (kubepods-burstable-, kubelet-kubepods-, ...), so only the suffix is fixed.
    return name == f"pod{pod_uid}" or name.endswith(f"-pod{_systemd_escape(pod_uid)}.slice")


def _walk_for_pod(root: Path, pod_uid: str, max_depth: int) -> list[Path]:
    matches: list[Path] = []
    level = [root]
    for _ in range(max_depth):
        below: list[Path] = []
        for directory in level:
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        # Symlinks are not cgroups; following them could leave the
                        # mount or loop.
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        if _is_pod_dir_name(entry.name, pod_uid):
                            # Its children are containers: nothing more to find there.
                            matches.append(Path(entry.path))
                        else:
                            below.append(Path(entry.path))
            except OSError:
                # Cgroups vanish while we walk (pods and containers are deleted all the
                # time); an unreadable or vanished directory holds nothing we can use.
                continue
        level = below
    return matches


def _one_or_none(matches: Sequence[Path], pod_uid: str) -> Path | None:
    if len(matches) > 1:
        listed = ", ".join(str(m) for m in sorted(matches))
        raise CgroupError(
            f"pod {pod_uid} has {len(matches)} cgroup directories ({listed}); refusing to "
            "guess which one its processes are in. Remove the stale one (a leftover from a "
            "changed cgroup driver or kubelet root) or check --cgroup-root"
        )
    return matches[0] if matches else None


def find_pod_cgroup(
    cgroup2_root: Path, pod_uid: str, qos: str | None = None, max_depth: int = 5
) -> Path | None:
    """The pod-level cgroup v2 directory of pod ``pod_uid``, or None if there is none yet.

    ``qos`` (a Kubernetes ``status.qosClass``, any case) only narrows the cheap direct
    probes; the walk matches on the UID alone, since the UID is unique in the cluster and
    a wrong hint should cost time, not the pod's capture. ``max_depth`` bounds the walk
    in directory levels below ``cgroup2_root`` (0 disables it).

    Raises ValueError for an unsafe UID or unknown QoS class, and CgroupError when the
    root is not a directory or more than one directory claims the pod.
    """
    validate_pod_uid(pod_uid)
    qos_levels = _parse_qos(qos)
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    if not cgroup2_root.is_dir():
        # Otherwise every pod would look "not created yet" forever.
        raise CgroupError(
            f"cgroup v2 root {cgroup2_root} is not a directory; pass the cgroup2 mount point "
            f"({CGROUP2_HINT})"
        )

    direct = {cgroup2_root / rel for rel in _direct_candidates(pod_uid, qos_levels)}
    found = _one_or_none([p for p in direct if p.is_dir()], pod_uid)
    if found is not None:
        return found
    return _one_or_none(_walk_for_pod(cgroup2_root, pod_uid, max_depth), pod_uid)


def detect_driver(cgroup2_root: Path) -> Driver | None:
    """kubelet's cgroup driver, judged from the kubepods directories that exist.

    Looks at the default root and kind's ``/kubelet`` root. Returns None when there is
    no kubepods tree there, or when both drivers' trees exist (a leftover from a driver
    change): then the answer would be a guess, and :func:`find_pod_cgroup` tries both.
    """
    systemd = any(
        (cgroup2_root / _systemd_rel((*kubelet_root, "kubepods"))).is_dir()
        for kubelet_root in _KUBELET_ROOTS
    )
    cgroupfs = any(
        (cgroup2_root / _cgroupfs_rel((*kubelet_root, "kubepods"))).is_dir()
        for kubelet_root in _KUBELET_ROOTS
    )
    if systemd == cgroupfs:
        return None
    return "systemd" if systemd else "cgroupfs"


def own_cgroup(proc_self_cgroup_text: str, cgroup2_root: Path) -> Path:
    """The cgroup v2 directory of the process whose ``/proc/<pid>/cgroup`` text is given.

    Only the ``0::<path>`` line counts; hybrid hosts also list v1 hierarchies
    (``12:memory:/...``), which capture never uses. The path is relative to the reader's
    cgroup namespace, so the result is right only if ``cgroup2_root`` is the v2 mount as
    seen from that namespace (run the agent with the host's cgroup namespace).
    """
    v2_paths: list[str] = []
    for number, line in enumerate(proc_self_cgroup_text.splitlines(), start=1):
        if not line.strip():
            continue
        hierarchy, sep1, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep1 and sep2 and hierarchy.isdigit()):
            raise ValueError(
                f"line {number} of /proc/self/cgroup is not 'ID:controllers:path': {line!r}"
            )
        if hierarchy == "0" and not controllers:
            v2_paths.append(path)

    if not v2_paths:
        raise CgroupError(
            "no cgroup v2 entry ('0::/...') in /proc/self/cgroup: cgroup v2 is not mounted "
            "on this host, and Weft's eBPF capture attaches only to v2 cgroups "
            f"({CGROUP2_HINT})"
        )
    if len(v2_paths) > 1:
        raise ValueError(f"/proc/self/cgroup has {len(v2_paths)} cgroup v2 ('0::') lines")
    path = v2_paths[0]
    if path.endswith(_V2_DELETED_SUFFIX):
        raise CgroupError(f"this process's cgroup {path} has been removed")
    if not path.startswith("/"):
        raise ValueError(f"cgroup v2 path in /proc/self/cgroup is not absolute: {path!r}")
    if ".." in PurePosixPath(path).parts:
        # The kernel prints paths outside the reader's cgroup namespace as /../..
        raise CgroupError(
            f"cgroup {path} lies outside this process's cgroup namespace, so it cannot be "
            "found under the v2 mount; run the agent in the host's cgroup namespace"
        )
    return cgroup2_root / path.lstrip("/")


def is_same_or_below(path: Path, ancestor: Path) -> bool:
    """Whether ``path`` is ``ancestor`` or inside it, after resolving symlinks and ``..``.

    cgroup eBPF programs act on the cgroup they are attached to and every cgroup below
    it, so an agent whose own cgroup is a captured pod's, or inside one, would redirect
    its own proxy sockets back into itself. Compared component by component, so
    ``pod<uid>0`` is not below ``pod<uid>``.
    """
    return path.resolve().is_relative_to(ancestor.resolve())


def _check_component(what: str, value: str) -> str:
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise ValueError(f"invalid lab {what} {value!r}: must be a single path component")
    return value


def lab_pod_cgroup(cgroup2_root: Path, lab: str, node: str, pod: str) -> Path:
    """The cgroup the lab creates for ``pod`` on ``node`` (mirrors ``weft.lab.state``)."""
    return (
        cgroup2_root
        / f"weft-lab-{_check_component('name', lab)}"
        / _check_component("node", node)
        / _check_component("pod", pod)
    )
