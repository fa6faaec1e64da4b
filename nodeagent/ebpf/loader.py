"""Load Weft's capture programs (capture.c) and attach them to cgroups.

Compiling happens in a child process (:mod:`.compile`, which imports bcc): it loads and
pins the programs and maps and exits, and this module opens the pins with bpf(2) — so
the agent never maps clang/LLVM (about 130 MB of RSS it would otherwise keep).

One :class:`CapturePrograms` per node agent.  Its maps are pinned under the agent's
bpffs directory, so a restarted agent compiles the programs again but binds them to the
same maps: recorded original destinations and sockhash entries of live connections stay
valid.  Attachments to pod cgroups outlive the agent process (the kernel keeps an
attached program alive), which keeps pods captured while the agent restarts; the new
instance then *replaces* the previous instance's programs hook by hook (attach the new
one first, then detach the old by id), so there is no instant where a captured pod's
connect goes uncaptured.

Programs are attached with ``BPF_F_ALLOW_MULTI`` so Weft coexists with other cgroup
programs (systemd's, a CNI's), and are recognised by their name prefix ``weft_``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.ebpf import bpfsys
from weft.policy.plaintext import Entry as PlainEntry

log = logging.getLogger("weft.ebpf")

SOURCE = Path(__file__).with_name("capture.c")
PROG_PREFIX = "weft_"
STATS = (
    "redirected",
    "passed",
    "recorded",
    "cleaned",
    "strict_dropped",
    "msg_redirected",
    "msg_passed",
    "socks_added",
    "plaintext_allowed",
)

MAPS = (
    "weft_config",
    "weft_stats",
    "weft_skip_port",
    "weft_node_addr",
    "weft_cookie_dst",
    "weft_orig_dst",
    "weft_socks",
    "weft_sock_keys",
    "weft_plaintext",
    "weft_plain_gen",
)
DEFAULT_MAP_ENTRIES = 16_384
"""Captured connections the maps are sized for (``weft agent --ebpf-map-entries``)."""
MAP_ENTRIES_RANGE = (1_024, 1 << 20)

# Which program goes on which cgroup hook.
HOOK_CONNECT4 = bpfsys.CGROUP_INET4_CONNECT
HOOK_CONNECT6 = bpfsys.CGROUP_INET6_CONNECT
HOOK_SOCKOPS = bpfsys.CGROUP_SOCK_OPS
HOOK_INGRESS = bpfsys.CGROUP_INET_INGRESS
POD_HOOKS = (HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SOCKOPS, HOOK_INGRESS)


class CaptureError(RuntimeError):
    """Capture cannot be set up; the message names what is missing and what to do."""


@dataclass(frozen=True)
class CaptureConfig:
    pin_dir: Path
    """bpffs directory for this agent's maps (one per node agent)."""
    proxy_ip: str
    """Address captured connects are rewritten to: the node's address as seen from pods."""
    proxy_port: int = 15001
    """The node proxy's outbound listener."""
    node_addrs: tuple[str, ...] = ()
    """The node's own addresses: never captured; the only sources strict pods accept."""
    skip_ports: tuple[int, ...] = ()
    """Destination ports never captured (e.g. an API server port)."""
    sockmap: bool = True
    """Shortcut pod<->proxy bytes on this node with sk_msg redirects."""
    map_entries: int = DEFAULT_MAP_ENTRIES
    """Size of the per-connection maps: weft_cookie_dst and weft_orig_dst hold this many
    entries, the sockhash and its key mirror twice as many (docs/ebpf.md "Map sizes")."""

    def map_sizes(self) -> dict[str, int]:
        """The max_entries each connection-sized map is compiled with."""
        n = self.map_entries
        return {"weft_cookie_dst": n, "weft_orig_dst": n, "weft_socks": 2 * n,
                "weft_sock_keys": 2 * n}  # fmt: skip


def _ip_key(ip: str) -> int:
    # The programs compare IPs as u32 holding network-order bytes; on this little-endian
    # host that is the address bytes read as a little-endian integer.
    return int.from_bytes(socket.inet_aton(ip), "little")


def _ip_str(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "little"))


_PLAIN_KEY = struct.Struct("<I4sII4s")
"""``struct plain_key``: prefix length, pod (network order), generation, port, source."""
_ADDR = struct.Struct("<II")
"""``struct addr_key`` and ``struct orig_dst``: (ip as network-order u32, port)."""
COMPILE_TIMEOUT = 120.0


@contextmanager
def _open_dir(path: Path) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CaptureError(f"cgroup {path} does not exist") from None
    try:
        yield fd
    finally:
        os.close(fd)


def lookup_destination(map_fd: int, peer_ip: str, peer_port: int) -> tuple[str, int] | None:
    """Where the captured connection from (peer_ip, peer_port) was headed."""
    value = bpfsys.map_lookup(map_fd, _ADDR.pack(_ip_key(peer_ip), peer_port), _ADDR.size)
    if value is None:
        return None
    ip, port = _ADDR.unpack(value)
    return _ip_str(ip), int(port)


class PinnedDestinations:
    """The original-destination map, opened read-only from its pin: what a proxy worker
    process (`nodeagent.workers`) needs of eBPF.  The agent compiled, loaded and pinned
    the programs; a worker opens only this map, by path, and never the programs."""

    MAP = "weft_orig_dst"

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, pin_dir: Path) -> PinnedDestinations:
        path = pin_dir / cls.MAP
        try:
            return cls(bpfsys.obj_get(str(path)), path)
        except OSError as e:
            raise CaptureError(
                f"cannot open the pinned map {path} ({e}): the agent pins it when it loads "
                "the capture programs; is bpffs mounted and the agent running?"
            ) from e

    def original_destination(self, peer_ip: str, peer_port: int) -> tuple[str, int] | None:
        return lookup_destination(self.fd, peer_ip, peer_port)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class CapturePrograms:
    config: CaptureConfig
    fds: dict[int, int]
    """Program fd per hook (attach type)."""
    ids: dict[int, int]
    compile_seconds: float
    map_fds: dict[str, int]
    notes: list[str] = field(default_factory=list)
    _plain: dict[str, tuple[int, list[bytes]]] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, config: CaptureConfig) -> CapturePrograms:
        """Compile, load and pin in a child (:mod:`.compile`), then open the pins."""
        request = {
            "pin_dir": str(config.pin_dir),
            "proxy_ip": config.proxy_ip,
            "proxy_port": config.proxy_port,
            "node_addrs": list(config.node_addrs),
            "skip_ports": list(config.skip_ports),
            "sockmap": config.sockmap,
            "map_entries": config.map_entries,
        }
        low, high = MAP_ENTRIES_RANGE
        if not low <= config.map_entries <= high:
            raise CaptureError(
                f"--ebpf-map-entries {config.map_entries} is out of range ({low:,}-{high:,})"
            )
        try:
            out = subprocess.run(
                [sys.executable, "-m", "nodeagent.ebpf.compile"],
                input=json.dumps(request),
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise CaptureError(
                f"compiling {SOURCE.name} took more than {COMPILE_TIMEOUT:.0f}s"
            ) from None
        try:
            result = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {"error": out.stderr.strip()[-800:] or f"exit status {out.returncode}"}
        if out.returncode != 0 or "error" in result:
            raise CaptureError(
                f"compiling {SOURCE.name} with bcc failed ({result.get('error')}); run "
                "`weft check` for the cause (kernel headers, capabilities, bpffs)"
            )
        fds: dict[int, int] = {}
        map_fds: dict[str, int] = {}
        try:
            for name, hook in (
                ("weft_connect4", HOOK_CONNECT4),
                ("weft_connect6", HOOK_CONNECT6),
                ("weft_sockops", HOOK_SOCKOPS),
                ("weft_ingress", HOOK_INGRESS),
            ):
                fds[hook] = bpfsys.obj_get(str(config.pin_dir / f"prog_{name}"))
            # Every map, not only those the proxy reads: holding them open is what makes
            # the agent's /proc/PID/fdinfo show all the kernel memory it costs.
            for name in MAPS:
                map_fds[name] = bpfsys.obj_get(str(config.pin_dir / name))
        except bpfsys.BpfError as e:
            for fd in (*fds.values(), *map_fds.values()):
                os.close(fd)
            raise CaptureError(f"opening the pinned programs and maps failed: {e}") from e
        ids = {hook: bpfsys.prog_info(fd).id for hook, fd in fds.items()}
        progs = cls(
            config=config,
            fds=fds,
            ids=ids,
            compile_seconds=float(result["compile_seconds"]),
            map_fds=map_fds,
        )
        progs._check_sizes()
        return progs

    def _check_sizes(self) -> None:
        # bcc binds to a map already pinned at the path whatever size it was made with,
        # which is what keeps live connections' entries across a restart.  So a changed
        # size takes effect only once the pins are gone; say so rather than pretend.
        for name, want in self.config.map_sizes().items():
            have = bpfsys.map_info(self.map_fds[name]).max_entries
            if have != want:
                note = (
                    f"{name} is pinned with {have:,} entries, not the {want:,} configured: "
                    f"kept, so live connections keep their state; the new size applies "
                    f"after the pins under {self.config.pin_dir} are removed (`weft agent "
                    f"--uninstall`, `weft lab down`, or a node reboot)"
                )
                self.notes.append(note)
                log.warning("%s", note)

    def maps(self) -> dict[str, dict[str, int]]:
        """Each pinned map's size and the kernel memory it is charged (/debug/state)."""
        out = {}
        for name, fd in self.map_fds.items():
            info = bpfsys.map_info(fd)
            out[name] = {"max_entries": info.max_entries, "kernel_bytes": bpfsys.map_memlock(fd)}
        return out

    # -- attachments -------------------------------------------------------------------

    def _ensure(self, cgroup_fd: int, hook: int, want: bool) -> list[str]:
        """Make exactly our program (or none) be the weft program on one hook."""
        changes: list[str] = []
        ours = self.ids[hook]
        attached = [
            p for p in bpfsys.attached_programs(cgroup_fd, hook) if p.name.startswith(PROG_PREFIX)
        ]
        name = bpfsys.ATTACH_TYPE_NAMES[hook]
        if want and ours not in {p.id for p in attached}:
            bpfsys.prog_attach(self.fds[hook], cgroup_fd, hook, bpfsys.BPF_F_ALLOW_MULTI)
            changes.append(f"attached {name}")
        for p in attached:
            if p.id != ours or not want:
                bpfsys.detach_by_id(cgroup_fd, hook, p.id)
                changes.append(f"detached {name} (prog {p.id}{'' if p.id == ours else ', stale'})")
        return changes

    def attach_pod(self, cgroup: Path, strict: bool) -> list[str]:
        with _open_dir(cgroup) as fd:
            return (
                self._ensure(fd, HOOK_CONNECT4, True)
                + self._ensure(fd, HOOK_CONNECT6, True)
                + self._ensure(fd, HOOK_SOCKOPS, True)
                + self._ensure(fd, HOOK_INGRESS, strict)
            )

    def detach_pod(self, cgroup: Path) -> list[str]:
        if not cgroup.exists():
            return []
        with _open_dir(cgroup) as fd:
            return [c for hook in POD_HOOKS for c in self._ensure(fd, hook, False)]

    def attach_proxy(self, cgroup: Path) -> list[str]:
        """sockops on the proxy's own cgroup: its accepted sockets join the sockhash."""
        with _open_dir(cgroup) as fd:
            return self._ensure(fd, HOOK_SOCKOPS, True)

    def detach_proxy(self, cgroup: Path) -> list[str]:
        if not cgroup.exists():
            return []
        with _open_dir(cgroup) as fd:
            return self._ensure(fd, HOOK_SOCKOPS, False)

    # -- the proxy's questions ---------------------------------------------------------

    def original_destination(self, peer_ip: str, peer_port: int) -> tuple[str, int] | None:
        return lookup_destination(self.map_fds["weft_orig_dst"], peer_ip, peer_port)

    def node_addrs(self) -> set[str]:
        """The addresses strict pods accept new connections from (``weft_node_addr``)."""
        keys = bpfsys.map_key_list(self.map_fds["weft_node_addr"], 4)
        return {socket.inet_ntoa(k) for k in keys}

    def set_node_addrs(self, addrs: set[str]) -> tuple[set[str], set[str]]:
        """Make ``weft_node_addr`` hold exactly ``addrs`` (the node's own IPv4
        addresses, the proxy's among them): new ones first, then the stale ones go, so
        no address the node still has is ever missing. Returns (added, removed)."""
        fd = self.map_fds["weft_node_addr"]
        have = self.node_addrs()
        added, removed = addrs - have, have - addrs
        one = struct.pack("<I", 1)
        for a in sorted(added):
            bpfsys.map_update(fd, socket.inet_aton(a), one)
        for a in sorted(removed):
            bpfsys.map_delete(fd, socket.inet_aton(a))
        return added, removed

    # -- plaintext verdicts (weft.policy.plaintext) ------------------------------------

    def _plain_state(self) -> dict[str, tuple[int, list[bytes]]]:
        """Pod address -> (the generation in force, the trie keys written for the pod),
        read from the pinned maps once (they may come from the previous agent) with
        the keys of other generations removed."""
        if self._plain is None:
            gens = {}
            for key in bpfsys.map_key_list(self.map_fds["weft_plain_gen"], 4):
                value = bpfsys.map_lookup(self.map_fds["weft_plain_gen"], key, 4)
                if value is not None:
                    gens[key] = struct.unpack("<I", value)[0]
            state: dict[str, tuple[int, list[bytes]]] = {
                socket.inet_ntoa(k): (g, []) for k, g in gens.items()
            }
            trie = self.map_fds["weft_plaintext"]
            for key in bpfsys.map_key_list(trie, _PLAIN_KEY.size, limit=1 << 16):
                _, pod, gen, _, _ = _PLAIN_KEY.unpack(key)
                mine = state.get(socket.inet_ntoa(pod))
                if mine is not None and mine[0] == gen:
                    mine[1].append(key)
                else:
                    bpfsys.map_delete(trie, key)  # an abandoned generation
            self._plain = state
        return self._plain

    def set_plaintext(self, pod_ip: str, table: Sequence[PlainEntry] | None) -> bool:
        """Put ``table`` in force for plaintext to ``pod_ip`` (None: no plaintext caller
        is let in, only the node): written whole under a new generation, switched to,
        then the old one removed. False if the kernel refused it (full table): the pod
        then refuses plaintext — fail closed."""
        state = self._plain_state()
        trie, gens = self.map_fds["weft_plaintext"], self.map_fds["weft_plain_gen"]
        pod = socket.inet_aton(pod_ip)
        old_gen, old_keys = state.pop(pod_ip, (0, []))
        written: list[bytes] = []
        ok = True
        if table:
            gen = old_gen % 0xFFFFFFFE + 1
            try:
                for e in table:
                    key = _PLAIN_KEY.pack(96 + e.network.prefixlen, pod, gen, e.port,
                                          e.network.network_address.packed)  # fmt: skip
                    bpfsys.map_update(trie, key, struct.pack("<I", 1 if e.allow else 2))
                    written.append(key)
                bpfsys.map_update(gens, pod, struct.pack("<I", gen))
                state[pod_ip] = (gen, written)
            except bpfsys.BpfError as e:
                log.error("plaintext verdicts for %s not written (%s): it refuses plaintext",
                          pod_ip, e)  # fmt: skip
                ok = False
                old_keys += written
        if pod_ip not in state:
            bpfsys.map_delete(gens, pod)
        for key in old_keys:
            bpfsys.map_delete(trie, key)
        return ok

    def plaintext_entries(self) -> int:
        return sum(len(keys) for _, keys in self._plain_state().values())

    def stats(self) -> dict[str, int]:
        fd = self.map_fds["weft_stats"]
        out = {}
        for i, name in enumerate(STATS):
            value = bpfsys.map_lookup(fd, struct.pack("<I", i), 8)
            out[name] = struct.unpack("<Q", value)[0] if value else 0
        return out

    def map_entries(self, name: str) -> int:
        key_size = {"weft_orig_dst": _ADDR.size, "weft_cookie_dst": 8}[name]
        fd = self.map_fds[name]
        # Bounded by the map's max_entries: at most that many syscalls.
        return bpfsys.map_keys(fd, key_size, limit=bpfsys.map_info(fd).max_entries)

    def close(self) -> None:
        """Release our references; attachments and pins stay (that is the point)."""
        for fd in (*self.fds.values(), *self.map_fds.values()):
            os.close(fd)
        self.fds.clear()
        self.map_fds.clear()


def detach_all(cgroup: Path) -> list[str]:
    """Detach every Weft program (any instance's) from a cgroup; no compile needed."""
    if not cgroup.exists():
        return []
    done = []
    with _open_dir(cgroup) as fd:
        for hook in POD_HOOKS:
            for p in bpfsys.attached_programs(fd, hook):
                if p.name.startswith(PROG_PREFIX):
                    bpfsys.detach_by_id(fd, hook, p.id)
                    done.append(f"{cgroup}: detached {bpfsys.ATTACH_TYPE_NAMES[hook]} ({p.name})")
    return done


def remove_pins(pin_dir: Path) -> bool:
    if not pin_dir.exists():
        return False
    shutil.rmtree(pin_dir)
    return True
