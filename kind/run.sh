#!/usr/bin/env bash
# Weft on kind: check the host, create the cluster (kind/cluster.yaml), build the image and
# load it into the nodes, install Weft, deploy the demo, run the smoke test
# (scripts/install-and-smoke.sh, shared with vagrant/), then delete the cluster —
# whatever happened, unless WEFT_KEEP=1.
#
#   KIND_CLUSTER    cluster name (default weft-smoke)
#   WEFT_IMAGE      image name and tag (default weft:latest)
#   WEFT_IMAGE_TAR  an image archive to load instead of building one
#   ENGINE          docker or podman (default: what kind uses; podman sets
#                   KIND_EXPERIMENTAL_PROVIDER=podman)
# The image is built by `make image` (daemonset/Dockerfile); if your checkout has no such
# target yet, build the Dockerfile yourself and pass WEFT_IMAGE_TAR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

cluster=${KIND_CLUSTER:-weft-smoke}
image=${WEFT_IMAGE:-weft:latest}
engine=${ENGINE:-$([ "${KIND_EXPERIMENTAL_PROVIDER:-}" = podman ] && echo podman || echo docker)}

# The host: what the agent inside the kind nodes will need from it.
for tool in kind kubectl "$engine"; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
[ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ] \
    || die "/sys/fs/cgroup is not cgroup v2: kind nodes would get cgroup v1 and the agent cannot capture (boot with systemd.unified_cgroup_hierarchy=1)"
awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts \
    || die "no bpffs at /sys/fs/bpf on the host: sudo mount -t bpf bpffs /sys/fs/bpf"
headers=/lib/modules/$(uname -r)/build
[ -d "$headers/include" ] \
    || die "no kernel headers at $headers (bcc in the agent needs them): install linux-headers-$(uname -r)"
case $(readlink -f "$headers") in
    /usr/src/* | /lib/modules/*) ;;
    *) die "$headers points outside /usr/src and /lib/modules, which are all kind/cluster.yaml mounts" ;;
esac

cleanup() {
    status=$?
    if [ "${WEFT_KEEP:-0}" = 1 ]; then
        say "WEFT_KEEP=1: cluster $cluster kept (kind delete cluster --name $cluster)"
    else
        say "deleting kind cluster $cluster"
        kind delete cluster --name "$cluster" || true
    fi
    exit "$status"
}
trap cleanup EXIT

say "kind: creating cluster $cluster (1 control plane, 2 workers; kind/cluster.yaml)"
[ "$engine" = podman ] && export KIND_EXPERIMENTAL_PROVIDER=podman
kind create cluster --name "$cluster" --config "$here/cluster.yaml" --wait 180s

tar=${WEFT_IMAGE_TAR:-}
if [ -z "$tar" ]; then
    say "image: make image (builds $image)"
    make -C "$root" image \
        || die "make image failed (no such target yet? build daemonset/Dockerfile and set WEFT_IMAGE_TAR)"
    mkdir -p "$here/.cache"
    tar=$here/.cache/weft-image.tar
    rm -f "$tar"
    "$engine" save -o "$tar" "$image"
fi
say "image: loading $tar into every node of $cluster"
kind load image-archive "$tar" --name "$cluster"

KUBECTL="kubectl --context kind-$cluster" WEFT_IMAGE=$image "$root/scripts/install-and-smoke.sh"
say "kind recipe: PASSED"
