#!/usr/bin/env bash
# From the host, on the joined cluster (join.sh): build the Weft image, import it into
# every VM's containerd, then install Weft, deploy the demo and run the smoke test
# (../scripts/install-and-smoke.sh, shared with kind/).
#
#   WEFT_IMAGE      image name and tag (default weft:latest)
#   WEFT_IMAGE_TAR  an image archive (docker/OCI) to import instead of building one
#   ENGINE          the container engine that holds the built image (default: podman if
#                   present, else docker)
# The image is built by `make image` (the top-level Makefile, from daemonset/Dockerfile on
# a locally bootstrapped Debian base). If your checkout's Makefile has no `image` target
# yet, build daemonset/Dockerfile with your engine and pass WEFT_IMAGE_TAR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

image=${WEFT_IMAGE:-weft:latest}
nodes=(cp worker-1 worker-2)
[ -f "$here/.kube/config" ] || die "no $here/.kube/config: run ./join.sh first (or ./run.sh)"

tar=${WEFT_IMAGE_TAR:-}
if [ -z "$tar" ]; then
    engine=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
    say "image: make image (builds $image)"
    make -C "$root" image \
        || die "make image failed (no such target yet? build daemonset/Dockerfile and set WEFT_IMAGE_TAR)"
    mkdir -p "$here/.cache"
    tar=$here/.cache/weft-image.tar
    say "image: $engine save $image -> $tar"
    rm -f "$tar"
    "$engine" save -o "$tar" "$image"
fi
[ -s "$tar" ] || die "image archive $tar is missing or empty"

for node in "${nodes[@]}"; do
    say "image: importing into $node's containerd (namespace k8s.io, where kubelet looks)"
    vagrant upload "$tar" /tmp/weft-image.tar "$node" >/dev/null
    vagrant ssh "$node" -c 'sudo ctr -n k8s.io images import /tmp/weft-image.tar && rm -f /tmp/weft-image.tar'
done

KUBECTL="kubectl --kubeconfig $here/.kube/config" WEFT_IMAGE=$image \
    "$root/scripts/install-and-smoke.sh"
