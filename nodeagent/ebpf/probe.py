"""Live eBPF probes for ``weft check``: does the kernel really take our programs?

File-based preflight (``weft.preflight``) can say headers and mounts look right, but
only compiling and loading settles it: a distro may lock down BPF, a verifier may reject
a helper, a cgroup mount may refuse attachments. So this module compiles tiny versions
of the three program types capture uses, loads them, attaches each the way the agent
will, and detaches again.

All programs are compiled in one ``BPF(text=...)`` because the clang step dominates the
cost; loading and attaching is cheap. The programs call the same helpers the agent does
(``sock_hash_update``, ``msg_redirect_hash`` with ``BPF_F_INGRESS``, a ``user_ip4``
rewrite) so the verifier checks what matters, not just that the program type exists.

bcc is imported lazily so that importing this module never fails on a machine without
bcc: that absence is itself a check result, with a hint.

cgroup attachments outlive the process that made them, so connect4 and sock_ops go to a
scratch cgroup that is detached from and removed in ``finally`` blocks, never to a
cgroup where real processes live.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from weft.preflight import (
    CAPABILITIES,
    CGROUP2,
    CGROUP2_HINT,
    KERNEL_HEADERS,
    ROOT_HINT,
    CheckResult,
)

BCC = "bcc"
COMPILE = "bpf-compile"
CONNECT4 = "cgroup-connect4"
SOCK_OPS = "sock-ops"
SK_MSG = "sk-msg-sockhash"

SCRATCH_CGROUP_PREFIX = "weft-check-"

BCC_HINT = (
    "apt-get install python3-bpfcc; from a virtualenv, run `make setup`, which links only "
    "the bcc package directory into the venv (not all of dist-packages)"
)

_PROGRAMS = b"""
#include <uapi/linux/bpf.h>

BPF_SOCKHASH(weft_check_sockhash, u32, 8);

int weft_check_connect4(struct bpf_sock_addr *ctx) {
    /* Never true for a real connect: the scratch cgroup holds no processes. It exists
       so the verifier checks that user_ip4 is writable, which is what capture needs. */
    if (ctx->user_ip4 == 0)
        ctx->user_ip4 = 0x0100007f;
    return 1;
}

int weft_check_sockops(struct bpf_sock_ops *skops) {
    u32 key = skops->local_port;
    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        weft_check_sockhash.sock_hash_update(skops, &key, BPF_NOEXIST);
    return 0;
}

int weft_check_msg(struct sk_msg_md *msg) {
    u32 key = msg->local_port;
    return weft_check_sockhash.msg_redirect_hash(msg, &key, BPF_F_INGRESS);
}
"""


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _by_name(results: Sequence[CheckResult], name: str) -> CheckResult | None:
    return next((r for r in results if r.name == name), None)


def _skipped(name: str, reason: str, hint: str | None) -> CheckResult:
    return CheckResult(name, ok=False, required=True, detail=f"skipped: {reason}", hint=hint)


CGROUP_BPF_HINT = (
    "the kernel refused the cgroup program: it needs CONFIG_CGROUP_BPF=y; the verifier's "
    "log, if any, is on stderr"
)
SOCKMAP_HINT = (
    "the kernel refused sk_msg/sockhash: it needs CONFIG_BPF_STREAM_PARSER=y; the "
    "verifier's log, if any, is on stderr"
)


def _error_hint(exc: BaseException, otherwise: str) -> str:
    # bcc raises bare Exception with strerror text; EPERM is the common, fixable case.
    text = str(exc)
    if (
        isinstance(exc, PermissionError)
        or os.strerror(errno.EPERM) in text
        or os.strerror(errno.EACCES) in text
    ):
        return ROOT_HINT
    return otherwise


def check_bcc_import() -> tuple[CheckResult, Any]:
    """Import bcc; returns the result and the module (None if it failed)."""
    start = time.perf_counter()
    try:
        import bcc
    except Exception as exc:  # bcc fails with OSError when libbcc.so is missing, too
        return (
            CheckResult(
                BCC,
                ok=False,
                required=True,
                detail=f"cannot import bcc: {exc}",
                hint=BCC_HINT,
                duration_ms=_ms_since(start),
            ),
            None,
        )
    version = getattr(bcc, "__version__", "unknown version")
    return (
        CheckResult(
            BCC,
            ok=True,
            required=True,
            detail=f"bcc {version} from {Path(bcc.__file__).parent}",
            duration_ms=_ms_since(start),
        ),
        bcc,
    )


def remove_stale_scratch_cgroups(cgroup2_mount: str) -> None:
    """Remove scratch cgroups left by a ``weft check`` that was killed mid-probe.

    Only those whose pid is gone (or is ours, recycled, since we have not made ours
    yet): a concurrent ``weft check`` keeps its own.
    """
    for path in Path(cgroup2_mount).glob(f"{SCRATCH_CGROUP_PREFIX}*"):
        pid = path.name.removeprefix(SCRATCH_CGROUP_PREFIX)
        if pid.isdigit() and (int(pid) == os.getpid() or not Path("/proc", pid).exists()):
            try:
                path.rmdir()
            except OSError:
                pass  # e.g. someone put a process in it; then it is not ours to remove


@contextmanager
def scratch_cgroup(cgroup2_mount: str) -> Iterator[int]:
    """A fresh, empty cgroup under ``cgroup2_mount``; yields an fd to attach to.

    Removed on exit even if attaching failed; rmdir also drops any attachment a failed
    detach left behind, so nothing keeps steering traffic after ``weft check``.
    """
    remove_stale_scratch_cgroups(cgroup2_mount)
    path = Path(cgroup2_mount) / f"{SCRATCH_CGROUP_PREFIX}{os.getpid()}"
    path.mkdir()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        path.rmdir()


def _attach_cgroup_probe(
    bcc: Any,
    bpf: Any,
    name: str,
    func: bytes,
    prog_type: int,
    attach_type: int,
    cgroup2_mount: str,
) -> CheckResult:
    start = time.perf_counter()
    try:
        # attach_type must be given at load time for sock_addr programs (the kernel
        # checks the expected attach type); bcc 0.26 accepts it only as a keyword.
        fn = bpf.load_func(func, prog_type, attach_type=attach_type)
        with ExitStack() as stack:
            fd = stack.enter_context(scratch_cgroup(cgroup2_mount))
            bcc.BPF.attach_func(fn, fd, attach_type)
            stack.callback(bcc.BPF.detach_func, fn, fd, attach_type)
    except Exception as exc:
        return CheckResult(
            name,
            ok=False,
            required=True,
            detail=f"{func.decode()}: {exc}",
            hint=_error_hint(exc, CGROUP_BPF_HINT),
            duration_ms=_ms_since(start),
        )
    return CheckResult(
        name,
        ok=True,
        required=True,
        detail=f"loaded, attached to a scratch cgroup under {cgroup2_mount}, detached",
        duration_ms=_ms_since(start),
    )


def _sk_msg_probe(bcc: Any, bpf: Any) -> CheckResult:
    start = time.perf_counter()
    try:
        fn = bpf.load_func(b"weft_check_msg", bcc.BPF.SK_MSG)
        # bcc's table wrapper has no class for SOCKHASH (map type 18) and raises on
        # bpf[...]; the raw fd from libbcc is all attach needs.
        map_fd = bcc.libbcc.lib.bpf_table_fd(bpf.module, b"weft_check_sockhash")
        if map_fd < 0:
            raise OSError(f"no fd for weft_check_sockhash ({map_fd})")
        verdict = bcc.BPFAttachType.SK_MSG_VERDICT
        bcc.BPF.attach_func(fn, map_fd, verdict)
        bcc.BPF.detach_func(fn, map_fd, verdict)
    except Exception as exc:
        return CheckResult(
            SK_MSG,
            ok=False,
            required=True,
            detail=f"weft_check_msg: {exc}",
            hint=_error_hint(exc, SOCKMAP_HINT),
            duration_ms=_ms_since(start),
        )
    return CheckResult(
        SK_MSG,
        ok=True,
        required=True,
        detail="sockhash created; sk_msg loaded, attached as SK_MSG_VERDICT, detached",
        duration_ms=_ms_since(start),
    )


def _compile_hint(host: Sequence[CheckResult]) -> str:
    # BPF() both compiles and creates maps, so it fails for want of privileges as well
    # as for want of headers; the host checks already know which it is.
    for name in (CAPABILITIES, KERNEL_HEADERS):
        prior = _by_name(host, name)
        if prior is not None and not prior.ok and prior.hint:
            return prior.hint
    return (
        "see bcc's errors on stderr; usually the headers at "
        "/lib/modules/$(uname -r)/build do not match the running kernel, the kernel lacks "
        "sockhash (CONFIG_BPF_STREAM_PARSER=y), or BPF is locked down (lockdown=confidentiality)"
    )


def run_probes(
    cgroup2_mount: str | None,
    host: Sequence[CheckResult] = (),
    on_compile: Callable[[], None] | None = None,
) -> list[CheckResult]:
    """Import bcc, compile the test programs, load and attach each; in display order.

    ``host`` are the results of ``weft.preflight.run_host_checks``: their hints explain
    a failure better than bcc's error text (a missing cgroup2 mount, missing headers).
    ``on_compile`` is called just before the slow compile so a CLI can say so.
    """
    bcc_result, bcc = check_bcc_import()
    results = [bcc_result]
    if bcc is None:
        reason = "bcc is not importable"
        return results + [
            _skipped(name, reason, BCC_HINT) for name in (COMPILE, CONNECT4, SOCK_OPS, SK_MSG)
        ]

    if on_compile is not None:
        on_compile()
    start = time.perf_counter()
    try:
        # -w: the kernel headers bcc compiles against produce pages of harmless warnings.
        bpf = bcc.BPF(text=_PROGRAMS, cflags=["-w"])
    except Exception as exc:
        results.append(
            CheckResult(
                COMPILE,
                ok=False,
                required=True,
                # bcc's exception text is generic; clang's or the kernel's actual
                # complaint went to stderr.
                detail=f"bcc could not compile the test programs or create their map: {exc}",
                hint=_compile_hint(host),
                duration_ms=_ms_since(start),
            )
        )
        reason = "test programs did not compile"
        return results + [
            _skipped(name, reason, results[-1].hint) for name in (CONNECT4, SOCK_OPS, SK_MSG)
        ]
    compile_ms = _ms_since(start)
    results.append(
        CheckResult(
            COMPILE,
            ok=True,
            required=True,
            detail=f"compiled connect4, sock_ops and sk_msg test programs in {compile_ms:.0f} ms",
            duration_ms=compile_ms,
        )
    )

    try:
        if cgroup2_mount is None:
            cg2 = _by_name(host, CGROUP2)
            hint = cg2.hint if cg2 is not None and cg2.hint else CGROUP2_HINT
            results += [_skipped(n, "no cgroup2 mount", hint) for n in (CONNECT4, SOCK_OPS)]
        else:
            attach = bcc.BPFAttachType
            results.append(
                _attach_cgroup_probe(
                    bcc,
                    bpf,
                    CONNECT4,
                    b"weft_check_connect4",
                    bcc.BPF.CGROUP_SOCK_ADDR,
                    attach.CGROUP_INET4_CONNECT,
                    cgroup2_mount,
                )
            )
            results.append(
                _attach_cgroup_probe(
                    bcc,
                    bpf,
                    SOCK_OPS,
                    b"weft_check_sockops",
                    bcc.BPF.SOCK_OPS,
                    attach.CGROUP_SOCK_OPS,
                    cgroup2_mount,
                )
            )
        results.append(_sk_msg_probe(bcc, bpf))
    finally:
        # Closes program and map fds; attachments were already detached above.
        bpf.cleanup()
    return results
