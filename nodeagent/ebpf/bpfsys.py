"""The few bpf(2) commands bcc's Python API lacks: query, attach, detach, info by id.

bcc 0.26 can attach a program it loaded, but cannot list what is attached to a cgroup,
open a program by id, or read a program's name — which is exactly what reconciling after
an agent restart needs (the programs attached by the previous agent instance are not
ours any more: we must find them by name and replace them).  libbcc does not export
libbpf's wrappers for these, so this module issues the syscall itself with ctypes.
Layouts follow ``union bpf_attr`` and ``struct bpf_prog_info`` in ``uapi/linux/bpf.h``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from collections.abc import Iterator
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
"""bpf(2)'s syscall number: 321 on x86_64, 280 on arm64 (asm-generic); others unverified."""

BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16

BPF_F_ALLOW_MULTI = 2

# enum bpf_attach_type
CGROUP_INET_INGRESS = 0
CGROUP_SOCK_OPS = 3
SK_MSG_VERDICT = 7
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11

ATTACH_TYPE_NAMES = {
    CGROUP_INET_INGRESS: "cgroup_inet_ingress",
    CGROUP_SOCK_OPS: "sock_ops",
    SK_MSG_VERDICT: "sk_msg_verdict",
    CGROUP_INET4_CONNECT: "cgroup_inet4_connect",
    CGROUP_INET6_CONNECT: "cgroup_inet6_connect",
}

_ATTR_SIZE = 128


class BpfError(OSError):
    pass


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret: int = _libc.syscall(_SYS_BPF, cmd, attr, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("IIII", attr, 0, target_fd, prog_fd, attach_type, flags)
    _bpf(BPF_PROG_ATTACH, attr, f"attach program ({ATTACH_TYPE_NAMES.get(attach_type)})")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("III", attr, 0, target_fd, prog_fd, attach_type)
    _bpf(BPF_PROG_DETACH, attr, f"detach program ({ATTACH_TYPE_NAMES.get(attach_type)})")


def prog_query(target_fd: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """IDs of the programs attached to ``target_fd`` (a cgroup) for ``attach_type``."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("IIII", attr, 0, target_fd, attach_type, 0, 0)
    struct.pack_into("QI", attr, 16, ctypes.addressof(ids), max_progs)
    _bpf(BPF_PROG_QUERY, attr, f"query programs ({ATTACH_TYPE_NAMES.get(attach_type)})")
    (count,) = struct.unpack_from("I", attr, 24)
    return list(ids[: min(count, max_progs)])


def prog_fd_by_id(prog_id: int) -> int:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("I", attr, 0, prog_id)
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr, f"open program id {prog_id}")


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str


def prog_info(prog_fd: int) -> ProgInfo:
    info = ctypes.create_string_buffer(256)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("IIQ", attr, 0, prog_fd, len(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "program info")
    prog_type, prog_id = struct.unpack_from("II", info, 0)
    tag = info.raw[8:16].hex()
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(id=prog_id, type=prog_type, name=name, tag=tag)


def attached_programs(target_fd: int, attach_type: int) -> list[ProgInfo]:
    """The programs attached to a cgroup for one hook, with their names."""
    out = []
    for prog_id in prog_query(target_fd, attach_type):
        try:
            fd = prog_fd_by_id(prog_id)
        except BpfError:
            continue  # detached and freed between the query and now
        try:
            out.append(prog_info(fd))
        finally:
            os.close(fd)
    return out


def detach_by_id(target_fd: int, attach_type: int, prog_id: int) -> None:
    fd = prog_fd_by_id(prog_id)
    try:
        prog_detach(fd, target_fd, attach_type)
    finally:
        os.close(fd)


# -- pinned objects and map elements (the agent's side, without bcc) ---------------------

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7


def obj_pin(fd: int, path: str) -> None:
    """Pin a program or map fd at ``path`` on bpffs (the path must not exist)."""
    name = ctypes.create_string_buffer(path.encode())
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("QI", attr, 0, ctypes.addressof(name), fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


def obj_get(path: str) -> int:
    """Open a pinned program or map; returns a new fd (the caller closes it)."""
    name = ctypes.create_string_buffer(path.encode())
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("QI", attr, 0, ctypes.addressof(name), 0)
    return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under ``key``, or None if absent."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("IIQQ", attr, 0, map_fd, 0, ctypes.addressof(k), ctypes.addressof(v))
    ret: int = _libc.syscall(_SYS_BPF, BPF_MAP_LOOKUP_ELEM, attr, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        if err == 2:  # ENOENT
            return None
        raise BpfError(err, f"map lookup: {os.strerror(err)}")
    return v.raw


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    """Set ``key`` to ``value`` (BPF_ANY: insert or replace)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("IIQQQ", attr, 0, map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, "map update")


def map_delete(map_fd: int, key: bytes) -> bool:
    """Remove ``key``; False if it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("IIQ", attr, 0, map_fd, 0, ctypes.addressof(k))
    ret: int = _libc.syscall(_SYS_BPF, BPF_MAP_DELETE_ELEM, attr, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        if err == 2:  # ENOENT
            return False
        raise BpfError(err, f"map delete: {os.strerror(err)}")
    return True


def _walk_keys(map_fd: int, key_size: int, limit: int) -> Iterator[bytes]:
    """The map's keys, at most ``limit`` (GET_NEXT_KEY from no key, then each one)."""
    cur = ctypes.create_string_buffer(key_size)
    nxt = ctypes.create_string_buffer(key_size)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    for n in range(limit):
        struct.pack_into("IIQQ", attr, 0, map_fd, 0, ctypes.addressof(cur) if n else 0,
                         ctypes.addressof(nxt))  # fmt: skip
        ret: int = _libc.syscall(_SYS_BPF, BPF_MAP_GET_NEXT_KEY, attr, _ATTR_SIZE)
        if ret < 0:
            err = ctypes.get_errno()
            if err == 2:  # ENOENT: no more keys
                return
            raise BpfError(err, f"map walk: {os.strerror(err)}")
        yield nxt.raw
        ctypes.memmove(cur, nxt, key_size)


def map_key_list(map_fd: int, key_size: int, limit: int = 4096) -> list[bytes]:
    """The keys of a small map."""
    return list(_walk_keys(map_fd, key_size, limit))


def map_keys(map_fd: int, key_size: int, limit: int = 1 << 20) -> int:
    """How many keys the map holds (for /debug/state)."""
    return sum(1 for _ in _walk_keys(map_fd, key_size, limit))


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def map_info(map_fd: int) -> MapInfo:
    """``struct bpf_map_info``'s head: type, id, key/value sizes, max_entries, name."""
    info = ctypes.create_string_buffer(128)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("IIQ", attr, 0, map_fd, len(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "map info")
    map_type, map_id, key_size, value_size, max_entries = struct.unpack_from("5I", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(map_id, map_type, key_size, value_size, max_entries, name)


def map_memlock(map_fd: int) -> int:
    """Bytes of kernel memory the map is charged (its ``memlock`` in fdinfo)."""
    with open(f"/proc/self/fdinfo/{map_fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split(":", 1)[1])
    return 0
