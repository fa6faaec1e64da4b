"""The capture manager: keep eBPF attachments equal to the set of captured local pods.

A reconciling state manager in the manner of ztunnel's ``inpod`` state manager: the pod
source delivers *snapshots* of this node's pods; for each pod the manager decides add
(attach), keep (nothing to do — but re-ensure, which is idempotent and cheap) or delete
(detach), and after the first snapshot ("snapshot done") it also detaches cgroups that an
earlier agent instance attached and that no longer belong to a captured pod — which is
how the manager converges after a restart even if pods went away meanwhile.  The cgroups
it attached are recorded in a small JSON file for exactly that purpose.

Failures are per pod: a pod whose cgroup vanished or whose attach failed is logged with
its name and retried on the next snapshot; the other pods are unaffected.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from weft.files import write_json_atomic
from weft.policy.plaintext import Entry as PlainEntry

log = logging.getLogger("weft.capture")


@dataclass(frozen=True)
class LocalPod:
    """A pod on this node, as the capture manager needs it."""

    name: str
    namespace: str
    ip: str
    service_account: str
    cgroup: Path | None
    """The pod's cgroup v2 directory, None if not (yet) known."""
    captured: bool
    strict: bool
    plaintext: tuple[PlainEntry, ...] | None = None
    """For a strict pod, its policies' verdicts for plaintext callers
    (`weft.policy.plaintext`); None: none is let in (only the node)."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Attacher(Protocol):
    def attach_pod(self, cgroup: Path, strict: bool) -> list[str]: ...

    def detach_pod(self, cgroup: Path) -> list[str]: ...

    def set_plaintext(self, pod_ip: str, table: Sequence[PlainEntry] | None) -> bool:
        """Put a strict pod's plaintext verdicts in force (None: remove them)."""
        ...


@dataclass
class CapturedPod:
    pod: LocalPod
    since: float


class CaptureManager:
    def __init__(
        self,
        attacher: Attacher,
        record_path: Path,
        protected: Sequence[Path] = (),
    ) -> None:
        self.attacher = attacher
        self.record_path = record_path
        self.protected = [p.resolve() for p in protected]
        """Cgroups that must never be captured: the proxy's own (it would capture itself)."""
        self.captured: dict[str, CapturedPod] = {}
        self.errors: dict[str, str] = {}
        self.snapshots = 0
        self._plaintext: dict[str, tuple[str, tuple[PlainEntry, ...]]] = {}
        """Pod key -> (address, table) in force in the kernel."""

    def _recorded(self) -> set[str]:
        try:
            return set(json.loads(self.record_path.read_text())["cgroups"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return set()

    def _record(self) -> None:
        cgroups = sorted(str(c.pod.cgroup) for c in self.captured.values() if c.pod.cgroup)
        write_json_atomic(self.record_path, {"cgroups": cgroups})

    def _protected(self, cgroup: Path) -> bool:
        resolved = cgroup.resolve()
        return any(p == resolved or resolved in p.parents for p in self.protected)

    def apply(self, pods: Sequence[LocalPod]) -> None:
        """Reconcile against one full snapshot of this node's pods."""
        first = self.snapshots == 0
        self.snapshots += 1
        wanted = {p.key: p for p in pods if p.captured and p.cgroup is not None}
        errors: dict[str, str] = {}
        for key, pod in wanted.items():
            assert pod.cgroup is not None
            if self._protected(pod.cgroup):
                errors[key] = (
                    f"cgroup {pod.cgroup} holds the node proxy; capturing it would loop: skipped"
                )
                log.error("pod %s: %s", key, errors[key])
                continue
            try:
                changes = self.attacher.attach_pod(pod.cgroup, pod.strict)
            except OSError as e:
                errors[key] = f"attach to {pod.cgroup} failed: {e}"
                log.error("pod %s (%s): %s", key, pod.ip, errors[key])
                continue
            self._sync_plaintext(key, pod)
            prev = self.captured.get(key)
            if prev is None:
                log.info(
                    "pod %s (%s, sa %s) captured%s: %s",
                    key, pod.ip, pod.service_account, ", strict inbound" if pod.strict else "",
                    ", ".join(changes) or "already attached",
                )  # fmt: skip
                self.captured[key] = CapturedPod(pod, time.time())
            else:
                if changes:
                    log.info("pod %s (%s) updated: %s", key, pod.ip, ", ".join(changes))
                self.captured[key] = CapturedPod(pod, prev.since)
        # delete: pods no longer captured (label removed) or gone from the node
        for key in [k for k in self.captured if k not in wanted]:
            gone = self.captured.pop(key).pod
            self._detach(key, gone.cgroup)
        for key in [k for k in self._plaintext if k not in self.captured]:
            self._sync_plaintext(key, None)
        # snapshot done: anything an earlier instance attached that nobody wants now
        if first:
            current = {str(c.pod.cgroup) for c in self.captured.values()}
            for cgroup in sorted(self._recorded() - current):
                self._detach(f"(recorded) {cgroup}", Path(cgroup))
        # uncaptured pods must have nothing of ours attached (e.g. labels changed while
        # the agent was down): detaching is idempotent and finds programs by name.
        for pod in pods:
            if pod.key not in wanted and pod.cgroup is not None and first:
                self._detach(pod.key, pod.cgroup, quiet=True)
        self.errors = errors
        self._record()

    def _sync_plaintext(self, key: str, pod: LocalPod | None) -> None:
        """Write a pod's plaintext verdicts when they change (a strict pod's only)."""
        want = (pod.ip, pod.plaintext) if pod and pod.strict and pod.plaintext else None
        have = self._plaintext.get(key)
        if want == have:
            return
        if have is not None and (want is None or want[0] != have[0]):
            self.attacher.set_plaintext(have[0], None)
            del self._plaintext[key]
        if want is not None:
            ok = self.attacher.set_plaintext(*want)
            allowed = sum(e.allow for e in want[1])
            log.info("pod %s (%s): plaintext verdicts of its policies in force (%d entries, "
                     "%d allowing)%s", key, want[0], len(want[1]), allowed,
                     "" if ok else "; the kernel refused them: plaintext refused")  # fmt: skip
            self._plaintext[key] = want
        elif have is not None:
            log.info("pod %s (%s): no policy lets plaintext in any more", key, have[0])

    def _detach(self, key: str, cgroup: Path | None, quiet: bool = False) -> None:
        if cgroup is None:
            return
        try:
            changes = self.attacher.detach_pod(cgroup)
        except OSError as e:
            log.error("pod %s: detach from %s failed: %s", key, cgroup, e)
            return
        if changes or not quiet:
            log.info("pod %s released: %s", key, ", ".join(changes) or "nothing was attached")

    def snapshot(self) -> dict[str, object]:
        return {
            "captured": {
                k: {
                    "ip": c.pod.ip,
                    "cgroup": str(c.pod.cgroup),
                    "strict": c.pod.strict,
                    "plaintext_entries": len(c.pod.plaintext or ()),
                    "since": c.since,
                }
                for k, c in sorted(self.captured.items())
            },
            "errors": dict(self.errors),
            "snapshots": self.snapshots,
        }
