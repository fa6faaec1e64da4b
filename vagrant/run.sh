#!/usr/bin/env bash
# The whole VM recipe: bring the VMs up (provisioning them), join the workers, build and
# import the image, install Weft, deploy the demo, run the smoke test — then destroy the
# VMs, unless WEFT_KEEP=1 (then: vagrant destroy -f, when done).
#   WEFT_KUBEADM_APT_REPO=... ./run.sh          (see the Vagrantfile for the settings)
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '==> %s\n' "$*"; }

command -v vagrant >/dev/null || { echo "error: vagrant not found" >&2; exit 1; }
command -v kubectl >/dev/null || { echo "error: kubectl not found (the host drives the cluster)" >&2; exit 1; }

cleanup() {
    status=$?
    if [ "${WEFT_KEEP:-0}" = 1 ]; then
        say "WEFT_KEEP=1: VMs left running (vagrant destroy -f to remove them)"
    else
        say "destroying the VMs"
        vagrant destroy -f || true
    fi
    exit "$status"
}
trap cleanup EXIT

say "vagrant up (3 VMs: cp, worker-1, worker-2)"
vagrant up
./join.sh
./weft.sh
say "vagrant recipe: PASSED"
