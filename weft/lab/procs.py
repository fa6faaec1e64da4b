"""Processes and cgroups the lab owns: start them in pods, find them again, stop them.

The lab stops only what it started.  A recorded process is identified by PID *and* its
kernel start time, so a PID reused by an unrelated process after a reboot or a long pause
is never signalled.  Everything inside the lab's cgroup tree was started in a lab pod (by
``up`` or ``exec``), so after a crash ``down`` may kill by cgroup without any record.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from weft.lab.state import ProcessRecord


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has finished; only its parent's wait() is missing
        return None
    return int(fields[19])


def is_alive(rec: ProcessRecord) -> bool:
    return proc_start_time(rec.pid) == rec.start_time


def spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    where: str,
    preexec: Callable[[], None] | None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> ProcessRecord:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd=cwd,
        )
    start = proc_start_time(proc.pid)
    if start is None:
        raise RuntimeError(f"{name} exited at once; see {log_path}")
    return ProcessRecord(
        name=name, pid=proc.pid, start_time=start, argv=argv, log=str(log_path), where=where
    )


def stop(rec: ProcessRecord, grace: float = 3.0) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds.  False if it was already gone."""
    if not is_alive(rec):
        return False
    try:
        os.kill(rec.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not is_alive(rec):
            return True
        time.sleep(0.05)
    try:
        os.kill(rec.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def cgroup_dirs_bottom_up(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    dirs = [Path(d) for d, _, _ in os.walk(root)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def cgroup_pids(root: Path) -> list[int]:
    pids: list[int] = []
    for d in cgroup_dirs_bottom_up(root):
        try:
            pids.extend(int(x) for x in (d / "cgroup.procs").read_text().split())
        except FileNotFoundError:
            continue
    return pids


def kill_cgroup_tree(root: Path, timeout: float = 5.0) -> int:
    """SIGKILL every process in the tree; returns how many there were."""
    pids = cgroup_pids(root)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while cgroup_pids(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(pids)


def remove_cgroup_tree(root: Path, timeout: float = 5.0) -> list[Path]:
    """rmdir the tree bottom-up (a cgroup dir goes once its processes are reaped).

    Removing a cgroup also drops every BPF program attached to it.  Returns the
    directories that could not be removed before ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        left: list[Path] = []
        for d in cgroup_dirs_bottom_up(root):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(d)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)
