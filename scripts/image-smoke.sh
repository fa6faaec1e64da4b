#!/usr/bin/env bash
# The Weft image as a lab node's agent: replaces the agent process the lab started for
# one node with the same `weft agent` command run from the image (make image), then runs
# the mesh smoke test (scripts/smoke.sh) through it and shows its metrics.
#
#   scripts/image-smoke.sh LAB [NODE]      NODE defaults to node-1 (where client-1 runs)
#
#   WEFT_IMAGE  the image (default weft:latest)
#   WEFT        the weft CLI (default: the checkout's .venv/bin/weft)
#   ENGINE      the container engine (podman, the only one that can join a named netns)
#   WEFT_KEEP   1: leave the containerised agent running at the end (default: remove it
#               and start the lab's own agent again)
#
# weft lab has no hook to run an agent in a container, so this does by hand what the lab
# does for its agents (weft/lab/lab.py, _start_agent): the agent runs in the node's
# network namespace and in the lab's agent cgroup of that node, with the lab's state
# under /run/weft. The container is privileged, shares the host's PID and cgroup
# namespaces (the agent finds its own cgroup in /proc/self/cgroup, and the lab's PID
# checks and `weft lab down` see it), and mounts what the DaemonSet mounts: bpffs, the
# cgroup hierarchies, and the kernel headers bcc compiles against (/lib/modules,
# /usr/src). The lab's agent is stopped with `weft lab stop` (by the PID and start time
# recorded in the lab's state) before the container starts; only that process and the
# container this script starts are ever stopped.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
# shellcheck source=image-engine.sh
. "$here/image-engine.sh"

if [ $# -lt 1 ] || [ $# -gt 2 ]; then printf 'usage: %s LAB [NODE]\n' "$0" >&2; exit 2; fi
lab=$1
node=${2:-node-1}
image=${WEFT_IMAGE:-weft:latest}
weft=${WEFT:-$root/.venv/bin/weft}
python=$root/.venv/bin/python
state=/run/weft/lab/$lab/state.json
container=weft-agent-$lab-$node
export WEFT_LAB=$lab

[ "$(id -u)" -eq 0 ] || die "needs root (the lab's namespaces and cgroups)"
[ -x "$python" ] || die "no $python: run make venv"
[ -f "$state" ] || die "no lab $lab ($state missing): weft lab up --demo --name $lab"
pick_engine
# Joining a named network namespace (`--network ns:PATH`) is podman's; docker has no such mode.
[ "$engine" = podman ] || die "needs podman (docker cannot run a container in the node's named network namespace)"
"$engine" image inspect "$image" >/dev/null 2>&1 || die "no image $image: run make image"
engine_probe "$image"

# From the lab's state: the agent's arguments (after `weft.cli agent`) and its cgroup.
lab_agent() {  # FIELD: args | cgroup | running
    "$python" - "$state" "$node" "$1" <<'EOF'
import json, sys
from pathlib import Path
state, node, field = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2], sys.argv[3]
recs = [r for r in state["processes"] if r["name"] == f"agent-{node}"]
if field == "running":
    print(len(recs))
elif field == "cgroup":
    print(Path(state["paths"]["cgroup_root"]) / node / "weft-agent")
elif not recs:
    sys.exit(f"lab state has no agent-{node} process (see weft lab status)")
else:
    argv = recs[0]["argv"]
    print("\n".join(argv[argv.index("agent") + 1:]))
EOF
}
mapfile -t args < <(lab_agent args)
[ ${#args[@]} -gt 0 ] || die "no agent-$node in lab $lab (see weft lab status)"
cgroup=$(lab_agent cgroup)
[ -d "$cgroup" ] || die "the lab's agent cgroup $cgroup is missing"

stopped=""
cleanup() {
    local rc=$?
    if [ "${WEFT_KEEP:-0}" = 1 ] && [ $rc -eq 0 ]; then
        say "keeping container $container (WEFT_KEEP=1): $engine rm -f $container"
        return
    fi
    if "$engine" container exists "$container" 2>/dev/null \
        || "$engine" container inspect "$container" >/dev/null 2>&1; then
        [ $rc -eq 0 ] || { say "container logs:"; "$engine" logs --tail 40 "$container" 2>&1 || true; }
        say "removing container $container"
        "$engine" stop -t 15 "$container" >/dev/null 2>&1 || true
        "$engine" rm -f "$container" >/dev/null 2>&1 || true
    fi
    if [ -n "$stopped" ] && [ -f "$state" ] && [ "$(lab_agent running)" = 0 ]; then
        say "starting the lab's own agent-$node again"
        "$weft" lab start "agent-$node" >/dev/null || say "could not: weft lab start agent-$node"
    fi
}
trap cleanup EXIT

say "stopping the lab's agent-$node (weft lab stop: its recorded PID)"
"$weft" lab stop "agent-$node"
stopped=1

say "starting $image as agent-$node: weft agent ${args[*]}"
# The entrypoint shell moves itself into the lab's agent cgroup, then becomes the agent
# (its $$ and "$@" are the container shell's, hence single quotes).
# shellcheck disable=SC2016
"$engine" "${engine_args[@]}" run -d --name "$container" "${run_args[@]}" \
    --privileged --network "ns:/run/netns/$lab-$node" --pid host --cgroupns host \
    -v /sys/fs/bpf:/sys/fs/bpf -v /sys/fs/cgroup:/sys/fs/cgroup -v /run/weft:/run/weft \
    -v /run/netns:/run/netns -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro \
    --entrypoint /bin/sh "$image" \
    -c 'echo $$ > "$1/cgroup.procs" && shift && exec /opt/weft/bin/weft agent "$@"' \
    agent "$cgroup" "${args[@]}" >/dev/null
pid=$("$engine" inspect --format '{{.State.Pid}}' "$container")
say "container $container: agent pid $pid, compiling eBPF"

# Ready: the agent answering on the node's admin port must be this one (by PID).
deadline=$((SECONDS + ${IMAGE_SMOKE_TIMEOUT:-120}))
while :; do
    answer=$("$weft" lab exec "$node" -- \
        curl -s --max-time 2 http://127.0.0.1:15020/debug/state 2>/dev/null || true)
    seen=$(printf '%s' "$answer" | "$python" -c '
import json, sys
try:
    d = json.load(sys.stdin)
except ValueError:
    sys.exit()
print(d.get("pid"), d.get("ready"))' 2>/dev/null || true)
    [ "$seen" = "$pid True" ] && break
    "$engine" container inspect --format '{{.State.Running}}' "$container" 2>/dev/null | grep -q true \
        || die "the containerised agent exited (logs above)"
    [ $SECONDS -lt $deadline ] || die "the containerised agent was not ready in time (seen: ${seen:-no answer})"
    sleep 1
done
say "agent-$node: ready, pid $pid, cgroup $(sed -n 's/^0:://p' "/proc/$pid/cgroup")"

say "the mesh through it: scripts/smoke.sh"
WEFT_LAB=$lab SMOKE_TARGET=lab SMOKE_WEFT="$weft" "$here/smoke.sh"

say "metrics of the containerised agent-$node (request_total):"
"$weft" lab exec "$node" -- curl -s http://127.0.0.1:15020/metrics \
    | grep '^request_total{' | sed 's/^/    /'
say "PASSED: $image served the mesh as agent-$node of lab $lab"
