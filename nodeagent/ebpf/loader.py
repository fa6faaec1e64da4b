"""Load Weft's capture programs (capture.c) with bcc and attach them to cgroups.

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

import ctypes
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcc import BPF, BPFAttachType

from nodeagent.ebpf import bpfsys

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
)

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


def _ip_key(ip: str) -> int:
    # The programs compare IPs as u32 holding network-order bytes; on this little-endian
    # host that is the address bytes read as a little-endian integer.
    return int.from_bytes(socket.inet_aton(ip), "little")


def _ip_str(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "little"))


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


@dataclass
class CapturePrograms:
    config: CaptureConfig
    bpf: Any
    fds: dict[int, int]
    """Program fd per hook (attach type)."""
    ids: dict[int, int]
    compile_seconds: float
    sk_msg_fd: int
    sockhash_fd: int
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, config: CaptureConfig) -> CapturePrograms:
        config.pin_dir.mkdir(parents=True, exist_ok=True)
        text = SOURCE.read_text().replace("__PIN_DIR__", str(config.pin_dir))
        started = time.monotonic()
        try:
            bpf = BPF(text=text, cflags=["-w"])
        except Exception as e:
            raise CaptureError(
                f"compiling {SOURCE.name} with bcc failed ({e}); run `weft check` for the cause "
                "(kernel headers, capabilities, bpffs)"
            ) from e
        compile_seconds = time.monotonic() - started
        connect4 = bpf.load_func(
            "weft_connect4", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET4_CONNECT
        )
        connect6 = bpf.load_func(
            "weft_connect6", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET6_CONNECT
        )
        sockops = bpf.load_func("weft_sockops", BPF.SOCK_OPS)
        ingress = bpf.load_func("weft_ingress", BPF.CGROUP_SKB)
        sk_msg = bpf.load_func("weft_sk_msg", BPF.SK_MSG)
        fds = {
            HOOK_CONNECT4: connect4.fd,
            HOOK_CONNECT6: connect6.fd,
            HOOK_SOCKOPS: sockops.fd,
            HOOK_INGRESS: ingress.fd,
        }
        ids = {hook: bpfsys.prog_info(fd).id for hook, fd in fds.items()}
        # bcc's table wrapper cannot open SOCKHASH maps; ask libbcc for the fd directly.
        import bcc.libbcc

        sockhash_fd = bcc.libbcc.lib.bpf_table_fd(bpf.module, b"weft_socks")
        if sockhash_fd < 0:
            raise CaptureError("sockhash map weft_socks not found after load")
        progs = cls(
            config=config,
            bpf=bpf,
            fds=fds,
            ids=ids,
            compile_seconds=compile_seconds,
            sk_msg_fd=sk_msg.fd,
            sockhash_fd=sockhash_fd,
        )
        progs.configure()
        # sk_msg attaches to the map, not a cgroup; attaching replaces a previous agent's.
        bpfsys.prog_attach(sk_msg.fd, sockhash_fd, bpfsys.SK_MSG_VERDICT)
        return progs

    def configure(self) -> None:
        cfg = self.config
        table = self.bpf["weft_config"]
        leaf = table.Leaf(
            _ip_key(cfg.proxy_ip), socket.htons(cfg.proxy_port), 1 if cfg.sockmap else 0, 0
        )
        table[ctypes.c_uint32(0)] = leaf
        addrs = self.bpf["weft_node_addr"]
        wanted = {_ip_key(a) for a in (cfg.proxy_ip, *cfg.node_addrs)}
        for key in list(addrs.keys()):
            if key.value not in wanted:
                del addrs[key]
        for a in wanted:
            addrs[ctypes.c_uint32(a)] = ctypes.c_uint32(1)
        ports = self.bpf["weft_skip_port"]
        for key in list(ports.keys()):
            if key.value not in cfg.skip_ports:
                del ports[key]
        for p in cfg.skip_ports:
            ports[ctypes.c_uint32(p)] = ctypes.c_uint32(1)

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
        table = self.bpf["weft_orig_dst"]
        try:
            val = table[table.Key(_ip_key(peer_ip), peer_port)]
        except KeyError:
            return None
        return _ip_str(val.ip), int(val.port)

    def stats(self) -> dict[str, int]:
        table = self.bpf["weft_stats"]
        return {name: int(table[ctypes.c_uint32(i)].value) for i, name in enumerate(STATS)}

    def map_entries(self, name: str) -> int:
        return sum(1 for _ in self.bpf[name])

    def close(self) -> None:
        """Release our references; attachments and pins stay (that is the point)."""
        self.bpf.cleanup()


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
