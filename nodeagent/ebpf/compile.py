"""Compile, load, configure and pin the capture programs — in a short-lived child process.

``python -m nodeagent.ebpf.compile`` reads a :class:`~.loader.CaptureConfig` as JSON on
stdin, compiles ``capture.c`` with bcc, loads the five programs, writes the agent's
configuration into the (pinned) maps, attaches the sk_msg program to the pinned sockhash,
pins each program as ``<pin dir>/prog_<name>`` and prints what it did as JSON.  Then it
exits.

Why a child: bcc compiles with clang/LLVM *inside the calling process*.  After one
compile, LLVM's code and the compiler's leftovers stay mapped — about 130 MB of the
agent's 190 MB RSS when this ran in-process.  The agent only needs the loaded programs
and maps, which outlive the compiler once pinned, so it opens them by path with plain
bpf(2) calls (:mod:`.bpfsys`) and never maps LLVM at all.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from bcc import BPF, BPFAttachType

from nodeagent.ebpf import bpfsys

SOURCE = Path(__file__).with_name("capture.c")
PROGRAMS = {
    "weft_connect4": bpfsys.CGROUP_INET4_CONNECT,
    "weft_connect6": bpfsys.CGROUP_INET6_CONNECT,
    "weft_sockops": bpfsys.CGROUP_SOCK_OPS,
    "weft_ingress": bpfsys.CGROUP_INET_INGRESS,
    "weft_sk_msg": bpfsys.SK_MSG_VERDICT,
}


def ip_key(ip: str) -> int:
    # The programs compare IPs as u32 holding network-order bytes; on this little-endian
    # host that is the address bytes read as a little-endian integer.
    return int.from_bytes(socket.inet_aton(ip), "little")


def compile_and_pin(config: dict[str, Any]) -> dict[str, Any]:
    pin_dir = Path(config["pin_dir"])
    pin_dir.mkdir(parents=True, exist_ok=True)
    text = SOURCE.read_text().replace("__PIN_DIR__", str(pin_dir))
    started = time.monotonic()
    entries = int(config["map_entries"])
    bpf = BPF(text=text, cflags=["-w", f"-DWEFT_MAP_ENTRIES={entries}"])
    compile_seconds = time.monotonic() - started
    loaded = {
        "weft_connect4": bpf.load_func(
            "weft_connect4", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET4_CONNECT
        ),
        "weft_connect6": bpf.load_func(
            "weft_connect6", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET6_CONNECT
        ),
        "weft_sockops": bpf.load_func("weft_sockops", BPF.SOCK_OPS),
        "weft_ingress": bpf.load_func("weft_ingress", BPF.CGROUP_SKB),
        "weft_sk_msg": bpf.load_func("weft_sk_msg", BPF.SK_MSG),
    }
    _configure(bpf, config)
    # bcc's table wrapper cannot open SOCKHASH maps; ask libbcc for the fd directly.
    import bcc.libbcc

    sockhash_fd = bcc.libbcc.lib.bpf_table_fd(bpf.module, b"weft_socks")
    if sockhash_fd < 0:
        raise RuntimeError("sockhash map weft_socks not found after load")
    # sk_msg attaches to the map, not a cgroup; attaching replaces a previous agent's.
    bpfsys.prog_attach(loaded["weft_sk_msg"].fd, sockhash_fd, bpfsys.SK_MSG_VERDICT)
    ids = {}
    for name, fn in loaded.items():
        pin = pin_dir / f"prog_{name}"
        # Replacing the pin does not affect attachments: those hold the old program.
        pin.unlink(missing_ok=True)
        bpfsys.obj_pin(fn.fd, str(pin))
        ids[name] = bpfsys.prog_info(fn.fd).id
    return {"compile_seconds": round(compile_seconds, 3), "program_ids": ids}


def _configure(bpf: Any, config: dict[str, Any]) -> None:
    table = bpf["weft_config"]
    leaf = table.Leaf(
        ip_key(config["proxy_ip"]),
        socket.htons(int(config["proxy_port"])),
        1 if config["sockmap"] else 0,
        0,
    )
    table[ctypes.c_uint32(0)] = leaf
    addrs = bpf["weft_node_addr"]
    wanted = {ip_key(a) for a in (config["proxy_ip"], *config["node_addrs"])}
    for key in list(addrs.keys()):
        if key.value not in wanted:
            del addrs[key]
    for a in wanted:
        addrs[ctypes.c_uint32(a)] = ctypes.c_uint32(1)
    ports = bpf["weft_skip_port"]
    skip = set(config["skip_ports"])
    for key in list(ports.keys()):
        if key.value not in skip:
            del ports[key]
    for p in skip:
        ports[ctypes.c_uint32(p)] = ctypes.c_uint32(1)


def main() -> None:
    config = json.load(sys.stdin)
    try:
        result = compile_and_pin(config)
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.stdout.flush()
        os._exit(1)
    print(json.dumps(result))
    sys.stdout.flush()
    # Skip interpreter teardown: bcc's cleanup would detach nothing we need, but it
    # closes fds one by one and unloads LLVM — wasted time on the agent's start path.
    os._exit(0)


if __name__ == "__main__":
    main()
