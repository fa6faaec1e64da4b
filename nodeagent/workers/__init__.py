"""Proxy worker processes: the node proxy across the node's cores (issue #18).

`supervisor` is the agent's side (spawn, feed, replace, scrape, drain), `worker` the
worker's process, `channel` the framing between them, `certs` how workload certificates
reach a worker without keys crossing the channel, `aggregate` the node's ``/metrics``
from every process's text.  docs/architecture.md ("Workers") has the picture.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

AUTO_CAP = 8
"""``--workers auto`` never starts more than this many (a node proxy past 8 busy cores
is better served by a second look at the profile than by more processes)."""


def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity, within its cgroup's CPU limit (a pod's
    ``resources.limits.cpu`` becomes ``cpu.max``: quota and period), rounded up."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):
        return max(1, cpus)
    if quota != "max" and int(period) > 0:
        cpus = min(cpus, math.ceil(int(quota) / int(period)))
    return max(1, cpus)


def auto_workers() -> int:
    return min(AUTO_CAP, usable_cpus())
