"""The agent names a node's missing prerequisites before compiling (`nodeagent.prereqs`),
and marks itself ready in a file its readiness probe tests (`Readiness.on_ready`)."""

from __future__ import annotations

from pathlib import Path

from nodeagent.admin import Readiness
from nodeagent.prereqs import node_prerequisites

BPF_MOUNT = "40 25 0:34 / /sys/fs/bpf rw,nosuid - bpf bpf rw\n"


def _headers(tmp_path: Path, release: str) -> Path:
    modules = tmp_path / "lib-modules"
    build = tmp_path / "usr-src" / f"linux-headers-{release}"
    (build / "include").mkdir(parents=True)
    (modules / release).mkdir(parents=True)
    (modules / release / "build").symlink_to(build)
    return modules


def test_a_node_with_headers_and_bpffs_has_nothing_missing(tmp_path: Path) -> None:
    modules = _headers(tmp_path, "6.1.0-9")
    assert node_prerequisites(Path("/sys/fs/bpf"), release="6.1.0-9", modules_dir=modules,
                              mountinfo=BPF_MOUNT) == []  # fmt: skip


def test_missing_headers_and_bpffs_are_named_with_their_paths(tmp_path: Path) -> None:
    modules = _headers(tmp_path, "6.1.0-9")
    missing = node_prerequisites(Path("/sys/fs/bpf"), release="6.5.0-1", modules_dir=modules,
                                 mountinfo="")  # fmt: skip
    assert len(missing) == 2
    assert missing[0].startswith("kernel headers: ") and "6.5.0-1/build not found" in missing[0]
    assert "6.1.0-9" in missing[0]  # the headers that are installed, and how to use them
    assert missing[1].startswith("bpffs: /sys/fs/bpf is not a bpffs mount")
    # kind mounts /lib/modules but not /usr/src: the build link dangles.
    (tmp_path / "usr-src" / "linux-headers-6.1.0-9" / "include").rmdir()
    (tmp_path / "usr-src" / "linux-headers-6.1.0-9").rmdir()
    (dangling,) = node_prerequisites(Path("/sys/fs/bpf"), release="6.1.0-9",
                                     modules_dir=modules, mountinfo=BPF_MOUNT)  # fmt: skip
    assert "dangling symlink" in dangling


def test_readiness_calls_back_once_when_the_last_blocker_is_done() -> None:
    calls: list[int] = []
    r = Readiness("a", "b")
    r.on_ready = lambda: calls.append(1)
    r.done("a")
    assert calls == []
    r.done("b")
    r.done("b")
    assert calls == [1] and r.ready
