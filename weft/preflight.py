"""Host preflight checks: can this machine run Weft's capture path?

Every check here is a plain function that takes what it inspects as parameters
(``/proc/self/mountinfo`` text, ``CapEff`` text, a modules directory, a ``which``
function; file paths default to the real locations) and returns a :class:`CheckResult`.
Only :func:`run_host_checks` and the ``read_*`` helpers gather input from the real
machine, so unit tests feed sample text and temp trees instead of needing root or a
particular kernel.

What cannot be judged from files -- whether bcc compiles, and whether the kernel
accepts and attaches our program types -- lives in ``nodeagent.ebpf.probe``, the only
place allowed to import bcc. It reuses :class:`CheckResult` from here (the node agent
may import the shared core; never the reverse).

The mount helpers (:func:`find_cgroup2_mount`, :func:`find_bpffs_mount`,
:func:`is_bpffs`) are shared with the lab and the node agent, which need the same
answers to know where to create cgroups and pin maps.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ParamSpec

DEFAULT_BPFFS = Path("/sys/fs/bpf")
DEFAULT_MODULES_DIR = Path("/lib/modules")
DEFAULT_BTF = Path("/sys/kernel/btf/vmlinux")
DEFAULT_NETNS = Path("/proc/self/ns/net")
MOUNTINFO = Path("/proc/self/mountinfo")
PROC_STATUS = Path("/proc/self/status")

# 5.10 is the oldest LTS kernel with everything the capture path relies on: cgroup
# sock_addr (connect4) hooks for transparent redirect, sockhash + sk_msg redirect with
# BPF_F_INGRESS for the same-node fast path, /sys/kernel/btf/vmlinux, and CAP_BPF. Each
# arrived piecemeal between 4.17 and 5.8; older kernels might half-work, which is worse
# than refusing.
MIN_KERNEL = (5, 10)

# Capability bit numbers from include/uapi/linux/capability.h.
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39

# Stable check names: JSON consumers and the probe's prerequisite lookups key on them.
KERNEL = "kernel"
BTF = "btf"
CGROUP2 = "cgroup2"
BPFFS = "bpffs"
CAPABILITIES = "capabilities"
KERNEL_HEADERS = "kernel-headers"
NETNS = "netns"
IPROUTE2 = "iproute2"

CGROUP2_HINT = (
    "run `make setup`, or: "
    "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified"
)
ROOT_HINT = "run as root (sudo weft check), or grant CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one preflight check."""

    name: str
    """Stable identifier, e.g. ``"cgroup2"``."""
    ok: bool
    required: bool
    """A failed required check means Weft cannot run here; others only degrade it."""
    detail: str
    """What was found, in one line."""
    hint: str | None = None
    """On failure: what to install or mount to fix it."""
    duration_ms: float = 0.0


def all_required_ok(results: Sequence[CheckResult]) -> bool:
    return all(r.ok for r in results if r.required)


_P = ParamSpec("_P")


def timed(fn: Callable[_P, CheckResult]) -> Callable[_P, CheckResult]:
    """Fill in ``duration_ms`` so a slow check shows up in ``weft check --json``."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> CheckResult:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        return replace(result, duration_ms=(time.perf_counter() - start) * 1000)

    return wrapper


# --- kernel version ------------------------------------------------------------------


def parse_kernel_release(release: str) -> tuple[int, int] | None:
    """``"6.18.44-fc-v595"`` -> ``(6, 18)``; None if it does not start with X.Y."""
    m = re.match(r"(\d+)\.(\d+)", release.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


@timed
def check_kernel(release: str) -> CheckResult:
    version = parse_kernel_release(release)
    want = ".".join(map(str, MIN_KERNEL))
    if version is None:
        return CheckResult(
            KERNEL,
            ok=False,
            required=True,
            detail=f"cannot parse kernel release {release!r}",
            hint=f"Weft needs Linux >= {want}; check `uname -r`",
        )
    ok = version >= MIN_KERNEL
    return CheckResult(
        KERNEL,
        ok=ok,
        required=True,
        detail=f"Linux {release} ({'>=' if ok else '<'} {want})",
        hint=None
        if ok
        else f"upgrade to Linux >= {want} (e.g. Debian 11+ or Ubuntu 22.04+ stock kernels)",
    )


# --- BTF -----------------------------------------------------------------------------


@timed
def check_btf(path: Path = DEFAULT_BTF) -> CheckResult:
    # bcc compiles against headers, so BTF is not strictly needed to load our programs;
    # it is required because operators inspect pinned maps with bpftool (which decodes
    # them via BTF) and because a kernel built without it usually lacks other eBPF bits.
    if path.exists():
        return CheckResult(BTF, ok=True, required=True, detail=f"{path} present")
    return CheckResult(
        BTF,
        ok=False,
        required=True,
        detail=f"{path} missing: kernel built without CONFIG_DEBUG_INFO_BTF",
        hint="use a kernel built with CONFIG_DEBUG_INFO_BTF=y (all major distro kernels are)",
    )


# --- mounts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo, reduced to what the checks need."""

    mount_point: str
    root: str
    """Path inside the filesystem that is mounted; ``/`` unless it is a bind mount."""
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse mountinfo text (proc(5)); malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        # The optional fields before "-" vary in number, so locate the separator
        # instead of indexing from the end.
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        mounts.append(
            Mount(
                mount_point=_unescape(fields[4]),
                root=_unescape(fields[3]),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
            )
        )
    return mounts


def _visible_mounts(mounts: Sequence[Mount]) -> list[Mount]:
    # A later mount on the same point hides an earlier one; only the topmost counts.
    top: dict[str, Mount] = {}
    for m in mounts:
        top.pop(m.mount_point, None)
        top[m.mount_point] = m
    return list(top.values())


def _find_mount(mountinfo_text: str, fstype: str, preferred: Sequence[str]) -> str | None:
    candidates = [m for m in _visible_mounts(parse_mountinfo(mountinfo_text)) if m.fstype == fstype]
    if not candidates:
        return None

    def rank(m: Mount) -> tuple[bool, int]:
        # A bind mount of a subtree is usable but surprising; prefer a whole-tree mount
        # at a conventional place.
        pref = preferred.index(m.mount_point) if m.mount_point in preferred else len(preferred)
        return (m.root != "/", pref)

    return min(candidates, key=rank).mount_point


def find_cgroup2_mount(mountinfo_text: str) -> str | None:
    """Where cgroup v2 is mounted, or None.

    Prefers ``/sys/fs/cgroup`` (pure v2 hosts), then ``/sys/fs/cgroup/unified`` (hybrid
    hosts such as systemd's hybrid mode, where v1 controllers sit in /sys/fs/cgroup/*).
    """
    return _find_mount(mountinfo_text, "cgroup2", ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"])


def find_bpffs_mount(mountinfo_text: str) -> str | None:
    """Where a BPF filesystem is mounted (preferring ``/sys/fs/bpf``), or None."""
    return _find_mount(mountinfo_text, "bpf", [str(DEFAULT_BPFFS)])


def is_bpffs(path: str | os.PathLike[str], mountinfo_text: str) -> bool:
    """Whether ``path`` itself is a bpffs mount point (not merely inside one).

    Pinning needs the mount point or a directory under it, but the agent creates its
    pin directories itself, so we insist on the configured path being the mount.
    """
    want = os.path.normpath(os.fspath(path))
    return any(
        m.mount_point == want and m.fstype == "bpf"
        for m in _visible_mounts(parse_mountinfo(mountinfo_text))
    )


@timed
def check_cgroup2(mountinfo_text: str) -> CheckResult:
    where = find_cgroup2_mount(mountinfo_text)
    if where is not None:
        return CheckResult(CGROUP2, ok=True, required=True, detail=f"cgroup2 mounted at {where}")
    v1 = any(m.fstype == "cgroup" for m in parse_mountinfo(mountinfo_text))
    return CheckResult(
        CGROUP2,
        ok=False,
        required=True,
        # Capture attaches connect4/sock_ops programs to cgroups, which only v2 supports.
        detail="no cgroup2 mount found" + (" (only cgroup v1 is mounted)" if v1 else ""),
        hint=CGROUP2_HINT,
    )


@timed
def check_bpffs(path: Path, mountinfo_text: str) -> CheckResult:
    if is_bpffs(path, mountinfo_text):
        return CheckResult(BPFFS, ok=True, required=True, detail=f"bpffs mounted at {path}")
    elsewhere = find_bpffs_mount(mountinfo_text)
    detail = f"{path} is not a bpffs mount"
    if elsewhere is not None:
        detail += f" (bpffs is mounted at {elsewhere}; pass --bpffs {elsewhere} to use it)"
    fix = f"mkdir -p {path} && mount -t bpf bpf {path}"
    hint = f"run `make setup`, or: {fix}" if path == DEFAULT_BPFFS else fix
    return CheckResult(BPFFS, ok=False, required=True, detail=detail, hint=hint)


# --- capabilities --------------------------------------------------------------------


def parse_cap_eff(status_text: str) -> int | None:
    """The effective capability mask from /proc/<pid>/status text, or None."""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", status_text, re.MULTILINE)
    return int(m.group(1), 16) if m else None


def has_cap(mask: int, cap: int) -> bool:
    return bool(mask >> cap & 1)


@timed
def check_capabilities(status_text: str) -> CheckResult:
    mask = parse_cap_eff(status_text)
    if mask is None:
        return CheckResult(
            CAPABILITIES,
            ok=False,
            required=True,
            detail="no CapEff line in /proc/self/status",
            hint=ROOT_HINT,
        )
    names = {CAP_BPF: "CAP_BPF", CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_NET_ADMIN: "CAP_NET_ADMIN"}
    held = [name for cap, name in names.items() if has_cap(mask, cap)]
    # Loading programs needs CAP_BPF (5.8+) or, on older kernels and some distros'
    # unprivileged_bpf settings, CAP_SYS_ADMIN; attaching to cgroups and sockmaps and
    # moving links between namespaces needs CAP_NET_ADMIN.
    missing = []
    if not (has_cap(mask, CAP_BPF) or has_cap(mask, CAP_SYS_ADMIN)):
        missing.append("CAP_BPF (or CAP_SYS_ADMIN)")
    if not has_cap(mask, CAP_NET_ADMIN):
        missing.append("CAP_NET_ADMIN")
    have = ", ".join(held) if held else "none of CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN"
    if not missing:
        return CheckResult(CAPABILITIES, ok=True, required=True, detail=f"effective: {have}")
    return CheckResult(
        CAPABILITIES,
        ok=False,
        required=True,
        detail=f"missing {'; '.join(missing)} (effective: {have})",
        hint=ROOT_HINT,
    )


# --- kernel headers ------------------------------------------------------------------


def _version_key(name: str) -> list[tuple[int, int | str]]:
    # Natural sort so 6.1.0-10 ranks above 6.1.0-9.
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name)]


def _headers_dir(build: Path) -> Path | None:
    """The resolved headers directory if ``build`` leads to one with include/."""
    try:
        resolved = build.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return resolved if (resolved / "include").is_dir() else None


def installed_header_versions(modules_dir: Path) -> list[str]:
    """Module directory names under ``modules_dir`` whose ``build`` has headers, newest first."""
    try:
        entries = list(modules_dir.iterdir())
    except OSError:
        return []
    found = [e.name for e in entries if _headers_dir(e / "build") is not None]
    return sorted(found, key=_version_key, reverse=True)


@timed
def check_kernel_headers(release: str, modules_dir: Path = DEFAULT_MODULES_DIR) -> CheckResult:
    """bcc compiles its C against ``<modules_dir>/<release>/build``; it must hold headers."""
    release_dir = modules_dir / release
    build = release_dir / "build"
    headers = _headers_dir(build)
    if headers is not None:
        via = f" -> {headers}" if headers != build else ""
        return CheckResult(KERNEL_HEADERS, ok=True, required=True, detail=f"{build}{via}")

    if build.is_symlink():
        detail = f"{build} is a dangling symlink to {build.readlink()}"
    elif build.is_dir():
        detail = f"{build} has no include/ directory"
    else:
        detail = f"{build} not found"

    others = [v for v in installed_header_versions(modules_dir) if v != release]
    if others:
        newest = others[0]
        detail += f"; headers installed for: {', '.join(others)}"
        if release_dir.is_dir() and not release_dir.is_symlink():
            # A real modules directory for this kernel exists (it has modules in it),
            # so link only its build entry rather than replacing the directory.
            target = _headers_dir(modules_dir / newest / "build")
            fix = f"ln -sfn {target} {build}"
        else:
            fix = f"ln -sfn {modules_dir / newest} {release_dir}"
        hint = (
            f"point bcc at the installed headers: {fix} (uapi program types work across "
            f"versions), or run `make setup`"
        )
    else:
        hint = (
            "on Debian: apt-get install linux-headers-amd64 && "
            f"ln -sfn {modules_dir}/<installed-version> {release_dir}; elsewhere install "
            "your distro's linux-headers-$(uname -r); or run `make setup`"
        )
    return CheckResult(KERNEL_HEADERS, ok=False, required=True, detail=detail, hint=hint)


# --- namespaces and tools ------------------------------------------------------------


@timed
def check_netns(path: Path = DEFAULT_NETNS) -> CheckResult:
    if path.exists():
        return CheckResult(NETNS, ok=True, required=True, detail=f"{path} present")
    return CheckResult(
        NETNS,
        ok=False,
        required=True,
        detail=f"{path} missing: kernel built without CONFIG_NET_NS",
        hint="use a kernel with CONFIG_NET_NS=y (pods and the lab each get a network namespace)",
    )


@timed
def check_iproute2(which: Callable[[str], str | None] = shutil.which) -> CheckResult:
    # Weft itself drives netlink through pyroute2; `ip` is only for operators and the
    # lab's troubleshooting output, hence not required.
    where = which("ip")
    if where is not None:
        return CheckResult(IPROUTE2, ok=True, required=False, detail=f"ip at {where}")
    return CheckResult(
        IPROUTE2,
        ok=False,
        required=False,
        detail="`ip` not found on PATH",
        hint="apt-get install iproute2 (used for inspecting lab namespaces by hand)",
    )


# --- the real machine ----------------------------------------------------------------


def read_mountinfo(path: Path = MOUNTINFO) -> str:
    """This process's mount table, for :func:`find_cgroup2_mount` and friends."""
    return path.read_text()


def kernel_release() -> str:
    return os.uname().release


def run_host_checks(
    *,
    bpffs: Path = DEFAULT_BPFFS,
    modules_dir: Path = DEFAULT_MODULES_DIR,
) -> list[CheckResult]:
    """Run every bcc-free check against this machine, in display order."""
    release = kernel_release()
    mountinfo = read_mountinfo()
    try:
        status = PROC_STATUS.read_text()
    except OSError:
        status = ""
    return [
        check_kernel(release),
        check_btf(),
        check_cgroup2(mountinfo),
        check_bpffs(bpffs, mountinfo),
        check_capabilities(status),
        check_kernel_headers(release, modules_dir),
        check_netns(),
        check_iproute2(),
    ]
