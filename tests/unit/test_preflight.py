"""Preflight checks on sample text and temp trees: no root, no particular kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from weft.preflight import (
    CAP_BPF,
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    CGROUP2_HINT,
    CheckResult,
    all_required_ok,
    check_bpffs,
    check_btf,
    check_capabilities,
    check_cgroup2,
    check_iproute2,
    check_kernel,
    check_kernel_headers,
    check_netns,
    find_bpffs_mount,
    find_cgroup2_mount,
    installed_header_versions,
    is_bpffs,
    parse_cap_eff,
    parse_kernel_release,
    parse_mountinfo,
)

# This project's machines: cgroup v1 controllers under /sys/fs/cgroup, v2 beside them.
HYBRID = """\
22 1 0:20 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
23 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

# A systemd unified-hierarchy host, with optional fields before the separator.
PURE_V2 = """\
24 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
25 24 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
30 25 0:27 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
31 25 0:28 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:5 - bpf bpf rw,mode=700
"""

NO_CGROUPS = """\
22 1 0:20 / / rw,relatime - overlay overlay rw
23 22 0:21 / /sys rw,relatime - sysfs sysfs rw
"""

V1_ONLY = NO_CGROUPS + "32 23 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"

RELEASE = "6.18.44-fc-v595"


def caps_status(*caps: int) -> str:
    mask = sum(1 << c for c in caps)
    return (
        "Name:\tpython\n"
        "CapInh:\t0000000000000000\n"
        f"CapEff:\t{mask:016x}\n"
        "CapBnd:\t000001ffffffffff\n"
    )


# --- results -------------------------------------------------------------------------


def test_all_required_ok_ignores_optional_failures():
    ok = CheckResult("a", ok=True, required=True, detail="")
    warn = CheckResult("b", ok=False, required=False, detail="")
    fail = CheckResult("c", ok=False, required=True, detail="")
    assert all_required_ok([ok, warn])
    assert not all_required_ok([ok, warn, fail])


def test_checks_are_timed():
    assert check_kernel(RELEASE).duration_ms > 0


# --- kernel version ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("release", "version"),
    [
        ("6.18.44-fc-v595", (6, 18)),
        ("5.10.0-28-amd64", (5, 10)),
        ("4.19.0", (4, 19)),
        ("6.1", (6, 1)),
        ("  5.15.0-91-generic\n", (5, 15)),
        ("garbage", None),
        ("6", None),
    ],
)
def test_parse_kernel_release(release, version):
    assert parse_kernel_release(release) == version


@pytest.mark.parametrize(
    ("release", "ok"),
    [("6.18.44-fc-v595", True), ("5.10.0", True), ("5.9.16", False), ("4.19.0", False)],
)
def test_check_kernel_minimum(release, ok):
    result = check_kernel(release)
    assert result.ok is ok
    assert result.required
    assert (result.hint is None) is ok


def test_kernel_comparison_is_numeric_not_lexical():
    # "5.9" > "5.10" as strings; the check must not fall for that.
    assert not check_kernel("5.9.0").ok
    assert check_kernel("5.10.0").ok


def test_unparseable_kernel_fails_with_hint():
    result = check_kernel("weird")
    assert not result.ok
    assert result.hint is not None and "uname -r" in result.hint


# --- mountinfo -----------------------------------------------------------------------


def test_parse_mountinfo_handles_optional_fields_and_escapes():
    text = PURE_V2 + "40 24 0:50 / /mnt/with\\040space rw - tmpfs none rw\n"
    mounts = parse_mountinfo(text)
    assert [m.fstype for m in mounts] == ["ext4", "sysfs", "cgroup2", "bpf", "tmpfs"]
    assert mounts[-1].mount_point == "/mnt/with space"
    assert mounts[0].source == "/dev/nvme0n1p2"


def test_parse_mountinfo_skips_malformed_lines():
    assert parse_mountinfo("garbage\n\n1 2 3\n") == []


def test_find_cgroup2_hybrid():
    assert find_cgroup2_mount(HYBRID) == "/sys/fs/cgroup/unified"


def test_find_cgroup2_pure_v2():
    assert find_cgroup2_mount(PURE_V2) == "/sys/fs/cgroup"


def test_find_cgroup2_none():
    assert find_cgroup2_mount(NO_CGROUPS) is None
    assert find_cgroup2_mount(V1_ONLY) is None
    assert find_cgroup2_mount("") is None


def test_find_cgroup2_prefers_whole_tree_over_bind_mount():
    text = (
        "50 1 0:38 /kubepods /mnt/kube rw - cgroup2 cgroup2 rw\n"
        "51 1 0:38 / /run/cg2 rw - cgroup2 cgroup2 rw\n"
    )
    assert find_cgroup2_mount(text) == "/run/cg2"


def test_find_cgroup2_ignores_overmounted():
    text = HYBRID + "60 31 0:60 / /sys/fs/cgroup/unified rw - tmpfs tmpfs rw\n"
    assert find_cgroup2_mount(text) is None


def test_bpffs_detection():
    assert find_bpffs_mount(PURE_V2) == "/sys/fs/bpf"
    assert find_bpffs_mount(HYBRID) is None
    assert is_bpffs("/sys/fs/bpf", PURE_V2)
    assert is_bpffs(Path("/sys/fs/bpf/"), PURE_V2)
    assert not is_bpffs("/sys/fs/bpf/weft", PURE_V2)  # inside, not the mount itself
    assert not is_bpffs("/sys/fs/bpf", HYBRID)


def test_check_cgroup2_reports_location():
    result = check_cgroup2(HYBRID)
    assert result.ok
    assert "/sys/fs/cgroup/unified" in result.detail


def test_check_cgroup2_v1_only_hints_mount():
    result = check_cgroup2(V1_ONLY)
    assert not result.ok and result.required
    assert "only cgroup v1" in result.detail
    assert result.hint == CGROUP2_HINT
    assert "mount -t cgroup2 none /sys/fs/cgroup/unified" in result.hint
    assert "make setup" in result.hint


def test_check_bpffs_missing_default_path():
    result = check_bpffs(Path("/sys/fs/bpf"), HYBRID)
    assert not result.ok and result.required
    assert result.hint is not None
    assert "mount -t bpf bpf /sys/fs/bpf" in result.hint
    assert "make setup" in result.hint


def test_check_bpffs_points_at_other_mount():
    result = check_bpffs(Path("/run/weft/bpf"), PURE_V2)
    assert not result.ok
    assert "--bpffs /sys/fs/bpf" in result.detail
    assert result.hint == "mkdir -p /run/weft/bpf && mount -t bpf bpf /run/weft/bpf"


def test_check_bpffs_ok():
    assert check_bpffs(Path("/sys/fs/bpf"), PURE_V2).ok


# --- capabilities --------------------------------------------------------------------


def test_parse_cap_eff():
    assert parse_cap_eff("CapEff:\t000001fffeffffff\n") == 0x1FFFEFFFFFF
    assert parse_cap_eff(caps_status(CAP_NET_ADMIN)) == 1 << CAP_NET_ADMIN
    assert parse_cap_eff("CapPrm:\tffff\n") is None
    assert parse_cap_eff("") is None


def test_root_caps_pass():
    # CapEff of root on this project's machines.
    result = check_capabilities("CapEff:\t000001fffeffffff\n")
    assert result.ok
    assert "CAP_BPF" in result.detail


@pytest.mark.parametrize(
    "caps", [(CAP_BPF, CAP_NET_ADMIN), (CAP_SYS_ADMIN, CAP_NET_ADMIN)], ids=["bpf", "sys_admin"]
)
def test_either_bpf_or_sys_admin_suffices(caps):
    assert check_capabilities(caps_status(*caps)).ok


@pytest.mark.parametrize(
    ("caps", "missing"),
    [
        ((CAP_BPF,), "CAP_NET_ADMIN"),
        ((CAP_NET_ADMIN,), "CAP_BPF"),
        ((), "CAP_NET_ADMIN"),
    ],
)
def test_missing_caps_fail_with_root_hint(caps, missing):
    result = check_capabilities(caps_status(*caps))
    assert not result.ok and result.required
    assert missing in result.detail
    assert result.hint is not None and "root" in result.hint


def test_no_capeff_line_fails():
    assert not check_capabilities("Name:\tx\n").ok


# --- kernel headers ------------------------------------------------------------------


def make_headers(root: Path, name: str) -> Path:
    headers = root / "usr-src" / f"linux-headers-{name}"
    (headers / "include").mkdir(parents=True)
    return headers


def test_headers_via_symlinked_release_dir(tmp_path):
    # This machine's layout: the running release links to the installed 6.1 tree.
    modules = tmp_path / "modules"
    (modules / "6.1.0-56-amd64").mkdir(parents=True)
    headers = make_headers(tmp_path, "6.1.0-56-amd64")
    (modules / "6.1.0-56-amd64" / "build").symlink_to(headers)
    (modules / RELEASE).symlink_to(modules / "6.1.0-56-amd64")

    result = check_kernel_headers(RELEASE, modules)
    assert result.ok, result.detail
    assert str(headers) in result.detail


def test_headers_build_dir_without_symlink(tmp_path):
    (tmp_path / RELEASE / "build" / "include").mkdir(parents=True)
    assert check_kernel_headers(RELEASE, tmp_path).ok


def test_headers_missing_release_suggests_installed_version(tmp_path):
    for version in ("6.1.0-9-amd64", "6.1.0-56-amd64"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "build").symlink_to(make_headers(tmp_path, version))
    (tmp_path / "5.10.0-1-amd64").mkdir()  # modules only, no headers

    assert installed_header_versions(tmp_path) == ["6.1.0-56-amd64", "6.1.0-9-amd64"]
    result = check_kernel_headers(RELEASE, tmp_path)
    assert not result.ok and result.required
    assert "not found" in result.detail
    assert "6.1.0-56-amd64, 6.1.0-9-amd64" in result.detail
    assert result.hint is not None
    assert f"ln -sfn {tmp_path / '6.1.0-56-amd64'} {tmp_path / RELEASE}" in result.hint


def test_headers_real_release_dir_links_only_build(tmp_path):
    # A kernel whose modules are installed but headers are not: replacing the whole
    # directory would hide its modules, so the hint must link just build.
    (tmp_path / RELEASE).mkdir()
    headers = make_headers(tmp_path, "6.1.0-56-amd64")
    (tmp_path / "6.1.0-56-amd64").mkdir()
    (tmp_path / "6.1.0-56-amd64" / "build").symlink_to(headers)

    result = check_kernel_headers(RELEASE, tmp_path)
    assert not result.ok
    assert result.hint is not None
    assert f"ln -sfn {headers} {tmp_path / RELEASE / 'build'}" in result.hint


def test_headers_dangling_link(tmp_path):
    (tmp_path / RELEASE).mkdir()
    (tmp_path / RELEASE / "build").symlink_to(tmp_path / "usr-src" / "gone")

    result = check_kernel_headers(RELEASE, tmp_path)
    assert not result.ok
    assert "dangling symlink" in result.detail
    assert result.hint is not None and "apt-get install linux-headers-amd64" in result.hint


def test_headers_build_without_include(tmp_path):
    (tmp_path / RELEASE / "build").mkdir(parents=True)
    result = check_kernel_headers(RELEASE, tmp_path)
    assert not result.ok
    assert "no include/" in result.detail


def test_headers_empty_modules_dir(tmp_path):
    result = check_kernel_headers(RELEASE, tmp_path)
    assert not result.ok
    assert result.hint is not None
    assert "apt-get install linux-headers-amd64" in result.hint
    assert f"ln -sfn {tmp_path}/<installed-version> {tmp_path / RELEASE}" in result.hint
    assert "make setup" in result.hint


def test_headers_missing_modules_dir(tmp_path):
    assert not check_kernel_headers(RELEASE, tmp_path / "nope").ok


# --- files and tools -----------------------------------------------------------------


def test_btf_and_netns_follow_the_given_path(tmp_path):
    present = tmp_path / "vmlinux"
    present.touch()
    assert check_btf(present).ok
    missing = check_btf(tmp_path / "absent")
    assert not missing.ok and missing.required and missing.hint
    assert check_netns(present).ok
    assert not check_netns(tmp_path / "absent").ok


def test_iproute2_is_optional():
    assert check_iproute2(lambda _: "/usr/sbin/ip").ok
    result = check_iproute2(lambda _: None)
    assert not result.ok
    assert not result.required
    assert result.hint is not None and "iproute2" in result.hint
