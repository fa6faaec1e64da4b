#!/usr/bin/env bash
# Install Weft on the cluster kubectl points at, deploy the demo and run the smoke test:
# the part vagrant/weft.sh and kind/run.sh share once the image is on every node.
#
#   WEFT        the weft CLI (default: the repo's .venv/bin/weft)
#   WEFT_IMAGE  the agent image the nodes already hold (default weft:latest, what the
#               manifests name; another one is passed to `weft install --image`)
#   KUBECTL     kubectl, with its --kubeconfig/--context if needed (default kubectl)
#   WAIT        how long to wait for each rollout (default 300s)
set -euo pipefail

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
weft=${WEFT:-$root/.venv/bin/weft}
image=${WEFT_IMAGE:-weft:latest}
read -r -a kubectl <<< "${KUBECTL:-kubectl}"
wait=${WAIT:-300s}

command -v "${kubectl[0]}" >/dev/null || die "kubectl not found (KUBECTL=${kubectl[*]})"
[ -x "$weft" ] || die "weft CLI not found at $weft; run make venv, or set WEFT"
"${kubectl[@]}" version >/dev/null || die "no API server answers kubectl (${kubectl[*]})"

# 1. Weft: the control plane and the node agents. `weft install` renders daemonset/.
install_args=()
[ "$image" = weft:latest ] || install_args+=(--image "$image")
say "install: weft install ${install_args[*]} | kubectl apply -f -"
"$weft" install "${install_args[@]}" | "${kubectl[@]}" apply -f -
say "install: waiting for the control plane and the agents (up to $wait)"
"${kubectl[@]}" -n weft-system rollout status deployment/weft-controlplane --timeout="$wait"
"${kubectl[@]}" -n weft-system rollout status daemonset/weft-agent --timeout="$wait"

# 2. The demo, in a namespace labelled for capture before its pods start.
say "demo: namespace weft-demo, labelled weft.io/capture=enabled"
"${kubectl[@]}" create namespace weft-demo --dry-run=client -o yaml | "${kubectl[@]}" apply -f -
"${kubectl[@]}" label namespace weft-demo weft.io/capture=enabled --overwrite
say "demo: echo (2 replicas) and client, image $image"
sed "s|image: weft:latest|image: $image|" "$root/scripts/demo.yaml" | "${kubectl[@]}" apply -f -
"${kubectl[@]}" -n weft-demo rollout status deployment/echo --timeout="$wait"
"${kubectl[@]}" -n weft-demo rollout status deployment/client --timeout="$wait"

# 3. The smoke test, the same script the lab runs.
say "smoke: scripts/smoke.sh against the cluster"
SMOKE_TARGET=kube SMOKE_KUBECTL="${kubectl[*]}" SMOKE_NAMESPACE=weft-demo \
    "$root/scripts/smoke.sh"
