"""Entering Linux namespaces and cgroups from Python (3.11 has no ``os.setns``).

Two ways in, for two needs:

* :func:`in_netns` — a context manager that moves the *calling thread* into a network
  namespace and always moves it back.  Sockets created inside keep that namespace after
  the thread leaves, which is how a process in one namespace listens or connects in
  another (the node agent will open its listeners this way; the lab uses it for
  readiness probes).
* :func:`enter_pod` — a one-way trip for a process about to ``exec``: join the pod's
  cgroup, get a private mount namespace with the pod's hosts file bound over
  ``/etc/hosts``, then join the pod's network namespace.  Used in ``weft lab exec`` and
  as ``preexec_fn`` for processes the lab starts in pods.

Network namespaces are named files under ``/run/netns`` (the ``ip netns`` convention), so
anything made here is also visible to ``ip netns``.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19

_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(OSError):
    """Entering a namespace or cgroup failed; the message names which and why."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise NamespaceError(err, f"{what}: {os.strerror(err)}")


def netns_path(name: str) -> Path:
    return NETNS_RUN_DIR / name


def setns(fd: int, nstype: int, what: str = "setns") -> None:
    _check(_libc.setns(fd, nstype), what)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            None,
        ),
        f"mount {source} on {target}",
    )


def open_netns(name: str) -> int:
    try:
        return os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(
            errno.ENOENT, f"network namespace {name!r} does not exist ({netns_path(name)})"
        ) from None


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with this thread in network namespace ``name``; always come back."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = open_netns(name)
        try:
            setns(target, CLONE_NEWNET, f"enter network namespace {name!r}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            # Failing to return would leave this thread in the wrong namespace for good:
            # better to crash loudly than to open later sockets in a pod.
            setns(original, CLONE_NEWNET, "return to the original network namespace")
    finally:
        os.close(original)


def join_cgroup(cgroup_dir: Path, pid: int = 0) -> None:
    """Move ``pid`` (0: the caller) into a cgroup v2 directory."""
    try:
        (cgroup_dir / "cgroup.procs").write_text(f"{pid}\n")
    except OSError as e:
        raise NamespaceError(e.errno, f"join cgroup {cgroup_dir}: {e.strerror}") from None


def enter_pod(netns: str, cgroup_dir: Path | None, hosts_file: Path | None) -> None:
    """Make the calling (single-threaded) process live in a pod, for good.

    Order matters: the cgroup first (so every later child is accounted to the pod), the
    mount namespace next (bind mounts must not leak to the host), the network namespace
    last (nothing above needs the network).
    """
    if cgroup_dir is not None:
        join_cgroup(cgroup_dir)
    if hosts_file is not None:
        unshare(CLONE_NEWNS)
        # Stop our bind mount propagating back to the host's mount namespace.
        mount(None, "/", None, MS_REC | MS_SLAVE)
        mount(str(hosts_file), "/etc/hosts", None, MS_BIND)
    fd = open_netns(netns)
    try:
        setns(fd, CLONE_NEWNET, f"enter network namespace {netns!r}")
    finally:
        os.close(fd)
