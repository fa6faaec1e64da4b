"""Request paths in the form policies judge them (see `weft.policy`)."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

_PLAIN = re.compile(r"/[^%\\\x00-\x1f\x7f]*\Z")
"""A path with no percent-encoding, backslash or control character."""


class PathError(ValueError):
    """A request path with no normal form (the request is denied)."""


def normalize_path(raw: str) -> str:
    """The path policies judge: query dropped, percent-decoded (once), ``\\`` as ``/``,
    dot segments removed (RFC 3986 5.2.4), repeated slashes merged. `PathError` for bad
    percent-encoding, non-UTF-8 or control bytes, ``..`` above the root, or a path that
    is not absolute."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if _PLAIN.match(path) and "//" not in path and "/." not in path:
        return path  # the common case: nothing to decode, remove or merge
    if not path.startswith("/"):
        if path == "*":  # OPTIONS *
            return path
        raise PathError(f"path {raw!r} is not absolute")
    if re.search(r"%(?![0-9A-Fa-f]{2})", path):
        raise PathError(f"path {raw!r} has a bad percent-encoding")
    try:
        decoded = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise PathError(f"path {raw!r} is not UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise PathError(f"path {raw!r} has control characters")
    out: list[str] = []
    segments = decoded.replace("\\", "/").split("/")
    for seg in segments[1:]:
        if seg in ("", "."):
            continue
        if seg == "..":
            if not out:
                raise PathError(f"path {raw!r} climbs above the root")
            out.pop()
            continue
        out.append(seg)
    trailing = segments[-1] in ("", ".", "..") and len(segments) > 2 and out
    return "/" + "/".join(out) + ("/" if trailing else "")
