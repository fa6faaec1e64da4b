"""Where the node agents spend their CPU under saturation: py-spy on both agents while a
captured client saturates a pod on the other node.

A two-node lab with the echo demo; ``client-1`` (node-1) runs the closed-loop saturation
client (`weft.bench.openloop saturate`, 16 keep-alive connections) against ``echo-2``
(node-2) by its pod address, so every request crosses node-1's outbound proxy, a tunnel
stream, and node-2's tunnel server. ``py-spy record`` samples each agent meanwhile
(100 Hz, raw collapsed stacks; with ``native`` the C frames too: the TLS library, the
event loop, the parsers, syscalls); the result is each agent's top frames by *self* time
(where the CPU is) and by *total* time (which stage it is under), as shares of samples.
Figures go to docs/results/profile.json and docs/benchmarks.md.
"""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weft.bench.mesh import IdentitySetup
from weft.lab.lab import Lab

LAB = "wprof"


def _frame(entry: str) -> str:
    """``function (path/to/file.py:LINE)`` -> ``function (file.py)``, as py-spy writes it."""
    name, _, where = entry.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1].rstrip(")")
    return f"{name} ({file})" if file else name


def top_frames(collapsed: str, n: int = 15) -> dict[str, Any]:
    """Self and total shares of the frames in py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        samples += k
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += k
        for f in set(frames):
            total[f] += k
    share = (lambda c: round(100 * c / samples, 1)) if samples else (lambda c: 0.0)
    return {
        "samples": samples,
        "self": [{"frame": f, "percent": share(c)} for f, c in own.most_common(n)],
        "total": [{"frame": f, "percent": share(c)} for f, c in total.most_common(n)],
    }


def py_spy() -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise RuntimeError("py-spy is not installed (it is a dev dependency: make setup)")
    return spy


def spy_on(pids: dict[str, int], seconds: float, native: bool = False) -> dict[str, Any]:
    """``py-spy record`` on each process at once for ``seconds`` (100 Hz); each one's
    `top_frames`. Also used by ``weft bench tracing`` on the agents it restarted."""
    spy = py_spy()
    with tempfile.TemporaryDirectory() as tmp:
        spies = {
            name: subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    "100",
                    "--format",
                    "raw",
                    # Native frames need the process stopped for each sample; Python
                    # frames alone can be read without stopping it.
                    *(["--native"] if native else ["--nonblocking"]),
                    "--output",
                    f"{tmp}/{name}.txt",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, pid in pids.items()
        }
        profiles = {}
        for name, proc in spies.items():
            _, err = proc.communicate(timeout=seconds + 60)
            path = Path(f"{tmp}/{name}.txt")
            if proc.returncode != 0 or not path.exists():
                raise RuntimeError(f"py-spy on {name} failed: {err[-500:]}")
            profiles[name] = top_frames(path.read_text())
    return profiles


def run(
    identity_setup: IdentitySetup,
    seconds: float = 20.0,
    report: Callable[[str], None] = print,
    native: bool = False,
    load: str = "h1",
) -> dict[str, Any]:
    py_spy()  # before the lab: fail early
    lab = Lab(LAB, report=lambda m: None, identity_setup=identity_setup)
    report(f"bringing up a two-node lab {LAB!r} with the echo demo")
    lab.up(nodes=2, demo=True, replace=True)
    try:
        state = lab.load()
        target = state.pod("echo-2").ip
        agents = {r.name: r.pid for r in state.processes if r.name.startswith("agent-")}
        loads = {
            "h1": ["weft.bench.openloop", "saturate", target, "8080", str(seconds + 4), "16"],
            "h2": ["weft.bench.h2load", "h2", target, "8080", str(seconds + 4), "16", "8"],
            "grpc": ["weft.bench.h2load", "grpc", target, "9090", str(seconds + 4), "16", "8"],
        }
        client = subprocess.Popen(
            [sys.executable, "-m", "weft.cli", "lab", "--lab", LAB, "exec", "client-1", "--",
             sys.executable, "-m", *loads[load]],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(2.0)  # past the client's warm-up
        report(f"sampling {', '.join(agents)} for {seconds:g}s under saturation")
        profiles = spy_on(agents, seconds, native)
        out, _ = client.communicate(timeout=seconds + 60)
        result = json.loads(out)
    finally:
        report(f"removing lab {LAB!r}")
        lab.down()
    return {"seconds": seconds, "native": native, "scenario": load, "load": result,
            "agents": profiles}  # fmt: skip
