"""Lab bootstrap tokens for the signer, and where a lab keeps its identity files.

The lab has no API server, so ``weft lab up`` writes one bootstrap token per node.  The
file is re-read when it changes, checked by ``stat`` on each call — a microsecond, against
a signing cost of ~0.3 ms.  (Node binding comes from discovery, for the lab as for
Kubernetes: :mod:`controlplane.identity.binding`.)

On Kubernetes the same protocol is served by TokenReview (see docs/identity.md); nothing
here is used there.

Layout inside a lab's state directory (``/run/weft/lab/<name>/``):

* ``state.json`` — the lab state (written by ``weft lab``)
* ``bootstrap-tokens.json`` — ``{node: sha256-hex(token)}``, 0600 (:func:`write_lab_tokens`)
* ``ca/`` — the lab's CA (``weft identity init --dir``)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from controlplane.identity.ca import write_file_atomic
from weft.lab.state import StateError

log = logging.getLogger("weft.controlplane.identity")

STATE_FILE = "state.json"
TOKENS_FILE = "bootstrap-tokens.json"
CA_DIR = "ca"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

T = TypeVar("T")


@dataclass(frozen=True)
class LabIdentityPaths:
    state_file: Path
    tokens_file: Path
    ca_dir: Path


def lab_identity_paths(state_dir: Path) -> LabIdentityPaths:
    return LabIdentityPaths(state_dir / STATE_FILE, state_dir / TOKENS_FILE, state_dir / CA_DIR)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class _Reloading(Generic[T]):
    """A value parsed from a file, re-parsed when the file's identity or mtime changes.

    Files are replaced by rename, so the inode changes on every write; mtime and size
    catch in-place edits.  A file that becomes unreadable or invalid keeps the last good
    value (and logs once): a half-edited token file should not lock every node out.  A
    file that never loaded gives ``empty`` — refusal, not a crash.
    """

    def __init__(self, path: Path, parse: Callable[[Path], T], empty: T, what: str) -> None:
        self.path = path
        self._parse = parse
        self._what = what
        self._value = empty
        self._key: tuple[int, int, int] | None = None
        self._failed_key: object = None
        self._lock = threading.Lock()

    def get(self) -> T:
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                key: object = "missing"
                if self._failed_key != key:
                    log.error("%s %s is missing; keeping the last one read", self._what, self.path)
                    self._failed_key = key
                return self._value
            current = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._failed_key == "missing":
                self._failed_key = None
            if current != self._key and current != self._failed_key:
                try:
                    self._value = self._parse(self.path)
                    self._key = current
                    self._failed_key = None
                    log.info("loaded %s %s", self._what, self.path)
                except (OSError, ValueError, StateError) as e:
                    self._failed_key = current
                    log.error("cannot load %s %s (%s); keeping the last one read", self._what,
                              self.path, e)  # fmt: skip
            return self._value


class LabBootstrapTokens:
    """Bootstrap tokens from a JSON file ``{node: sha256-hex(token)}``.

    Only hashes are stored, so reading the file does not yield a usable token.  Lookup
    compares the request's hash with *every* entry using :func:`hmac.compare_digest` and
    without stopping at a match, so its timing says nothing about which prefix or which
    node matched.  Tokens may be reused (an agent restart bootstraps again); node
    certificates are short-lived, so removing a node from the file locks it out within
    one node-certificate lifetime.
    """

    def __init__(self, path: Path) -> None:
        self._tokens: _Reloading[dict[str, str]] = _Reloading(
            path, self._load, {}, "bootstrap token file"
        )

    @staticmethod
    def _load(path: Path) -> dict[str, str]:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("%s is readable by others (mode %o): chmod 600 it", path, mode)
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _HEX64.match(v) for k, v in data.items()
        ):
            raise ValueError('expected {"<node>": "<sha256 hex of the token>", ...}')
        return data

    def node_for(self, token: str) -> str | None:
        digest = _hash_token(token)
        found: str | None = None
        for node, stored in self._tokens.get().items():
            if hmac.compare_digest(digest, stored):
                found = node
        return found


def write_lab_tokens(path: Path, nodes: Iterable[str]) -> dict[str, str]:
    """Make a random token per node, write their hashes to ``path`` (0600, atomically),
    and return ``{node: token}`` for the caller to hand each agent its own."""
    tokens = {node: secrets.token_urlsafe(32) for node in nodes}
    hashed = {node: _hash_token(token) for node, token in tokens.items()}
    write_file_atomic(path, (json.dumps(hashed, indent=2, sort_keys=True) + "\n").encode(), 0o600)
    return tokens
