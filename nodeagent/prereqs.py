"""What a node must give the agent before it compiles its eBPF programs: kernel headers
for bcc and a mounted bpffs for the pinned maps — checked first, so a node without them
gets one clear line naming the missing path instead of a compiler's error (kind mounts
neither by default; docs/kubernetes.md "Node prerequisites"). The checks are `weft
check`'s own (`weft.preflight`)."""

from __future__ import annotations

import os
from pathlib import Path

from weft.preflight import DEFAULT_MODULES_DIR, check_bpffs, check_kernel_headers

MOUNTINFO = Path("/proc/self/mountinfo")


def node_prerequisites(
    bpffs: Path,
    *,
    release: str | None = None,
    modules_dir: Path = DEFAULT_MODULES_DIR,
    mountinfo: str | None = None,
) -> list[str]:
    """What is missing, one sentence each with its fix (empty: nothing)."""
    missing = []
    headers = check_kernel_headers(release or os.uname().release, modules_dir)
    if not headers.ok:
        missing.append(f"kernel headers: {headers.detail}"
                       + (f" ({headers.hint})" if headers.hint else ""))  # fmt: skip
    try:
        text = mountinfo if mountinfo is not None else MOUNTINFO.read_text()
    except OSError as e:
        text = ""
        missing.append(f"cannot read {MOUNTINFO}: {e}")
    fs = check_bpffs(bpffs, text)
    if not fs.ok:
        missing.append(f"bpffs: {fs.detail}" + (f" ({fs.hint})" if fs.hint else ""))
    return missing
