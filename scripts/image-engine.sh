#!/usr/bin/env bash
# Sourced by scripts/image.sh and scripts/image-smoke.sh: picks the container engine and
# the flags it needs on this host. Defines, for the caller:
#   engine          podman or docker (ENGINE=... chooses)
#   engine_args     global flags, before the subcommand (podman: --runtime runc)
#   run_args        flags for `run` and `build` (resource limits)
#   engine_probe IMAGE   runs IMAGE once, adding flags until it starts; dies with the
#                        engine's own error and what was tried if it never does
#
# Why the flags: on a host with hybrid cgroups (v1 at /sys/fs/cgroup, v2 beside it) crun
# refuses to start ("cgroups in hybrid mode not supported"), runc does not; and a root
# without CAP_SYS_RESOURCE cannot give a container more open files than its own hard
# limit, nor more processes than the engine has (podman clamps its own RLIMIT_NPROC to
# kernel.pid_max), while both engines ask for more by default. Probed rather than assumed:
# on a host where the defaults work, no flag is added.
set -euo pipefail

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

engine=""
engine_args=()
run_args=()

pick_engine() {
    local candidates=(podman docker) c
    if [ -n "${ENGINE:-}" ]; then candidates=("$ENGINE"); fi
    for c in "${candidates[@]}"; do
        command -v "$c" >/dev/null || continue
        if [ "$c" = docker ] && ! docker info >/dev/null 2>&1; then
            say "engine: docker found but its daemon does not answer (systemctl start docker?)"
            continue
        fi
        engine=$c
        say "engine: $engine ($("$engine" --version | head -n 1))"
        return 0
    done
    die "no usable container engine (tried: ${candidates[*]}); install Debian's podman and runc (make host), or set ENGINE"
}

# The resource limits a container can be given here: the hard limits of this shell, and
# no more processes than the kernel has PIDs.
capped_ulimits() {
    local files procs pidmax
    files=$(ulimit -Hn)
    procs=$(ulimit -Hu)
    pidmax=$(cat /proc/sys/kernel/pid_max)
    if [ "$procs" = unlimited ] || [ "$procs" -gt "$pidmax" ]; then procs=$pidmax; fi
    if [ "$files" = unlimited ]; then files=1048576; fi
    printf '%s\n' --ulimit "nofile=$files:$files" --ulimit "nproc=$procs:$procs"
}

engine_probe() {
    local image=$1 out tried="" attempt
    for attempt in 1 2 3; do
        if out=$("$engine" "${engine_args[@]}" run --rm "${run_args[@]}" --network none \
                --entrypoint /bin/true "$image" 2>&1); then
            say "engine: containers start here${tried:+ (with $tried)}"
            return 0
        fi
        case $out in
            *"hybrid mode not supported"*)
                if [ "$engine" != podman ] || [ ${#engine_args[@]} -gt 0 ] || ! command -v runc >/dev/null; then
                    die "$engine cannot start a container: $out (install Debian's runc: on hybrid cgroups podman needs it instead of crun)"
                fi
                engine_args=(--runtime runc)
                tried="${tried:+$tried; }--runtime runc: crun refuses hybrid cgroups"
                ;;
            *rlimit*)
                if [ ${#run_args[@]} -gt 0 ]; then
                    die "$engine cannot start a container even with ${run_args[*]}: $out"
                fi
                mapfile -t run_args < <(capped_ulimits)
                tried="${tried:+$tried; }${run_args[*]}: the engine's default limits exceed this host's"
                ;;
            *)
                die "$engine cannot start a container (attempt $attempt${tried:+, with $tried}): $out"
                ;;
        esac
    done
    die "$engine cannot start a container with ${engine_args[*]} ${run_args[*]}: $out"
}
