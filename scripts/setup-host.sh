#!/usr/bin/env bash
# Host preparation for Weft: Debian packages, the kernel-headers link bcc needs, and the
# cgroup v2 / bpffs mounts. Idempotent: every step checks first and says what it did.
# Run as root (make setup does). Safe to re-run.
set -euo pipefail

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "host setup needs root (apt, mounts, /lib/modules); run: sudo make setup"

arch=$(dpkg --print-architecture)
# python3-bpfcc: bcc's Python bindings over libbcc (the only way we compile eBPF);
# linux-headers-$arch: headers bcc compiles against; bpftool: inspect programs and maps;
# iproute2/curl/procps: lab plumbing and the demo client; python3-venv: Debian's venv.
# haproxy + nftables: the sidecar baseline of `weft bench` (HAProxy sidecars with nftables
# redirects, as a sidecar mesh's init container would install them); nghttp2-client: h2load,
# the HTTP/2 and gRPC load of `weft bench`.
packages=(python3-bpfcc "linux-headers-$arch" bpftool iproute2 curl procps python3-venv haproxy nftables nghttp2-client shellcheck ruby prometheus mmdebstrap podman runc chromium)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "apt: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "apt: all packages present (${packages[*]})"
fi

# Node.js and npm: the tests validate docs/examples against the Gateway API's schemas, which
# only an npm package carries (make schemas installs it). Checked by command, not by Debian
# package name: a machine may have them from another build of nodejs, which bundles npm.
if command -v node >/dev/null && command -v npm >/dev/null; then
    say "node: $(node --version), npm $(npm --version) present"
else
    say "apt: installing nodejs npm (the tests' Gateway API schemas are an npm package)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

# bcc looks for headers at /lib/modules/$(uname -r)/build. Debian may ship no headers for
# the running kernel; the packaged headers of another 6.x kernel work for the uapi program
# types Weft uses (see DESIGN.md "Machine facts"), so point the running release at them.
release=$(uname -r)
if [ -d "/lib/modules/$release/build/include" ]; then
    say "kernel headers: /lib/modules/$release/build present"
else
    candidate=""
    for d in $(ls -d /lib/modules/*/build 2>/dev/null | sort -V); do
        [ -d "$d/include" ] && [ "$d" != "/lib/modules/$release/build" ] && candidate=${d%/build}
    done
    [ -n "$candidate" ] || die "no kernel headers under /lib/modules/*/build; install linux-headers-$arch"
    if [ -e "/lib/modules/$release" ] || [ -L "/lib/modules/$release" ]; then
        if [ -L "/lib/modules/$release" ]; then
            ln -sfn "$candidate" "/lib/modules/$release"
        else
            ln -sfn "$candidate/build" "/lib/modules/$release/build"
        fi
    else
        ln -s "$candidate" "/lib/modules/$release"
    fi
    say "kernel headers: linked /lib/modules/$release -> $candidate (headers $(basename "$candidate"))"
fi

# cgroup v2: the capture hooks attach to cgroup v2 directories. Hybrid hosts (cgroup v1 at
# /sys/fs/cgroup) get a v2 hierarchy at /sys/fs/cgroup/unified, where systemd puts it too.
cg2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
if [ -n "$cg2" ]; then
    say "cgroup v2: mounted at $cg2"
else
    if [ "$(stat -f -c %T /sys/fs/cgroup 2>/dev/null)" = "tmpfs" ]; then
        target=/sys/fs/cgroup/unified
    else
        target=/run/weft/cgroup2
    fi
    mkdir -p "$target"
    mount -t cgroup2 none "$target"
    say "cgroup v2: mounted at $target"
fi

# bpffs: pinned maps survive agent restarts only on a bpf filesystem.
if awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts; then
    say "bpffs: mounted at /sys/fs/bpf"
else
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
    say "bpffs: mounted at /sys/fs/bpf"
fi
