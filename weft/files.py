"""Atomic file writes, shared by the lab state, the CA files and the node's key material.

Readers (other commands, ``ssl.load_cert_chain``, the control plane's reloaders) must see
the old file or the new one, never a partial one; and a key must never be readable by
others, not even for an instant. So: a sibling temporary file created with the final
mode, written, fsynced, renamed over the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp makes it 0600; never wider than asked, never later
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented JSON, written atomically (readers never see half a file)."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
