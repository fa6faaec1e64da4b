#!/usr/bin/env bash
# `make image`: the Weft image (daemonset/Dockerfile) without pulling anything from an
# image registry. A minimal Debian 12 root filesystem is bootstrapped with mmdebstrap
# from the Debian archive this host's apt uses, cached as a tarball, imported as a local
# base image, and the Dockerfile is built FROM it (Debian's bcc, Weft and its Python
# dependencies from PyPI).
#
#   scripts/image.sh             build it
#   scripts/image.sh run ARGS... run it once with ARGS (e.g. --version), with the flags
#                                this host's engine needs (scripts/image-engine.sh)
#
#   WEFT_IMAGE        the image to build (default weft:latest)
#   WEFT_IMAGE_CACHE  where the base tarball is kept (default /var/cache/weft)
#   ENGINE            podman or docker (default: the first that works, podman first)
#
# The tarball is rebuilt only when it is missing or its inputs change (the host's Debian
# sources and apt options, the package set, this script's bootstrap settings): its name
# carries a hash of them. Needs root (mmdebstrap's root mode, the engine's storage).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
# shellcheck source=image-engine.sh
. "$here/image-engine.sh"

image=${WEFT_IMAGE:-weft:latest}
cache=${WEFT_IMAGE_CACHE:-/var/cache/weft}
suite=bookworm
started=$SECONDS

if [ "${1:-}" = run ]; then
    shift
    pick_engine >&2
    "$engine" image inspect "$image" >/dev/null 2>&1 || die "no image $image: run make image"
    engine_probe "$image" >&2
    exec "$engine" "${engine_args[@]}" run --rm "${run_args[@]}" --network none "$image" "$@"
fi
[ $# -eq 0 ] || die "usage: $0 [run ARGS...]"

[ "$(id -u)" -eq 0 ] || die "make image needs root (mmdebstrap, the engine's image store); run: sudo make image"
command -v mmdebstrap >/dev/null || die "mmdebstrap not found: apt-get install mmdebstrap (make host installs it)"
[ -f "$root/daemonset/Dockerfile" ] || die "no $root/daemonset/Dockerfile"
pick_engine

# -- the Debian sources: the host's own, for this suite -------------------------------
# One-line `deb URI SUITE COMPONENTS` entries from /etc/apt/sources.list(.d), both
# formats, for bookworm and its -updates/-security suites. The archive is whatever this
# host uses; nothing here names one.
host_sources() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$suite" '
            $1 != "deb" { next }
            { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } }
            $(i + 1) ~ ("^" suite "(-updates|-security)?$") {
                line = "deb " $i " " $(i + 1)
                for (j = i + 2; j <= NF && $j !~ /^#/; j++) line = line " " $j
                print line
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$suite" '
            function flush(   u, s, nu, ns, us, ss) {
                if (types ~ /(^| )deb( |$)/ && enabled != "no") {
                    nu = split(uris, us, " "); ns = split(suites, ss, " ")
                    for (u = 1; u <= nu; u++) for (s = 1; s <= ns; s++)
                        if (ss[s] ~ ("^" suite "(-updates|-security)?$"))
                            print "deb " us[u] " " ss[s] " " comps
                }
                types = uris = suites = comps = enabled = ""
            }
            /^#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[A-Za-z-]+:/ {
                key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
                if (key == "types") types = $0; else if (key == "uris") uris = $0
                else if (key == "suites") suites = $0; else if (key == "components") comps = $0
                else if (key == "enabled") enabled = tolower($0)
            }
            END { flush() }' "$f"
    done
}
mapfile -t sources < <(host_sources | awk '!seen[$0]++')
[ ${#sources[@]} -gt 0 ] \
    || die "no Debian $suite entries in /etc/apt/sources.list or /etc/apt/sources.list.d/: mmdebstrap needs the archive this host installs from"

# apt options of the host that the archive needs (a snapshot archive's Release files
# are past their Valid-Until): carried into the base, so apt-get in the Dockerfile works.
aptopts=()
for opt in Acquire::Check-Valid-Until Acquire::Check-Date; do
    value=$(apt-config dump "$opt" | awk -v k="$opt" '$1 == k { gsub(/[";]/, "", $2); print $2 }')
    [ "$value" = false ] && aptopts+=(--aptopt="$opt \"false\"")
done

# What a minimal base leaves out (as Debian's -slim images do): documentation, manual
# pages and translations, also for every package the Dockerfile installs later.
dpkgopts=()
for p in doc man info locale lintian linda; do
    dpkgopts+=(--dpkgopt="path-exclude=/usr/share/$p/*")
done
dpkgopts+=(--dpkgopt="path-include=/usr/share/doc/*/copyright")
# The variant `apt`: the Essential packages and apt. The merged-usr hook lays out /usr
# before they are installed, so Debian's usrmerge (and the Perl it needs) is not.
hooks=/usr/share/mmdebstrap/hooks/merged-usr
[ -d "$hooks" ] || die "$hooks not found: mmdebstrap >= 1.0 ships it (apt-get install mmdebstrap)"
bootstrap=(--variant=apt --format=tar --hook-dir="$hooks" "${aptopts[@]}" "${dpkgopts[@]}")

key=$( { printf '%s\n' "$suite" "${sources[@]}" "${bootstrap[@]}"; mmdebstrap --version; } \
    | sha256sum | cut -c1-12)
tarball=$cache/debian-$suite-$key.tar
base=localhost/weft-base:$suite-$key

# -- 1. the base root filesystem ------------------------------------------------------
mkdir -p "$cache"
if [ -s "$tarball" ]; then
    say "base: cached $tarball ($(du -h "$tarball" | cut -f1))"
else
    say "base: mmdebstrap $suite from the archive this host uses (${#sources[@]} apt sources)"
    t=$SECONDS
    rm -f "$cache"/debian-"$suite"-*.tar "$cache"/debian-"$suite"-*.tar.part
    mmdebstrap --quiet "${bootstrap[@]}" "$suite" "$tarball.part" "${sources[@]}" \
        || die "mmdebstrap failed (above); is the Debian archive of /etc/apt/sources reachable?"
    mv "$tarball.part" "$tarball"
    say "base: $tarball ($(du -h "$tarball" | cut -f1)) in $((SECONDS - t))s"
fi

# -- 2. the base image ----------------------------------------------------------------
if "$engine" image inspect "$base" >/dev/null 2>&1; then
    say "base: image $base present"
else
    say "base: importing $tarball as $base"
    for old in $("$engine" images --format '{{.Repository}}:{{.Tag}}' localhost/weft-base); do
        # An earlier base: dropped if no image is built on it any more.
        "$engine" rmi "$old" >/dev/null 2>&1 || true
    done
    "$engine" import \
        --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
        "$tarball" "$base" >/dev/null
fi
# Also under the name the Dockerfile's BASE defaults to, for a build by hand.
"$engine" tag "$base" "localhost/weft-base:$suite"
engine_probe "$base"

# -- 3. the Weft image ----------------------------------------------------------------
# Only what the Dockerfile copies goes into the build context (not .venv, node_modules
# or caches), so the context is small and its layers are cached by content.
context=$(mktemp -d /tmp/weft-image-context.XXXXXX)
trap 'rm -rf "$context"' EXIT
tar -C "$root" --exclude=__pycache__ --exclude='*.pyc' -cf - \
    pyproject.toml README.md weft nodeagent controlplane daemonset | tar -C "$context" -xf -

# pip in the build trusts what this host's pip trusts: where pip is configured with a CA
# bundle (PIP_CERT, or `cert` in a pip.conf; e.g. behind a TLS-inspecting proxy), that
# bundle is mounted read-only for the build's RUN steps and named by a build argument. It
# is not copied into the image.
host_pip_setting() {  # ENV_NAME CONF_KEY
    local value=${!1:-} f
    if [ -z "$value" ]; then
        for f in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
            [ -f "$f" ] || continue
            value=$(awk -v k="$2" -F'[ \t]*=[ \t]*' '$1 == k { v = $2 } END { print v }' "$f")
        done
    fi
    printf '%s' "$value"
}
build_args=(--build-arg "BASE=$base")
cert=$(host_pip_setting PIP_CERT cert)
if [ -n "$cert" ]; then
    [ -r "$cert" ] || die "this host's pip uses CA bundle $cert, which is not readable"
    [ "$engine" = podman ] \
        || die "this host's pip needs CA bundle $cert; only podman can mount it into a build (ENGINE=podman)"
    build_args+=(--volume "$(readlink -f "$cert"):/run/weft-build/ca.crt:ro"
                 --build-arg PIP_CERT=/run/weft-build/ca.crt)
    say "image: pip in the build uses this host's CA bundle ($cert)"
fi
index=$(host_pip_setting PIP_INDEX_URL index-url)
case $index in
    http://* | https://*)
        build_args+=(--build-arg "PIP_INDEX_URL=$index")
        say "image: pip in the build uses this host's package index"
        ;;
esac

say "image: $engine build $image FROM $base (daemonset/Dockerfile)"
t=$SECONDS
previous=$("$engine" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
# Host network for the build's RUN steps: apt and pip reach the archives as this host
# does, and no bridge or NAT rule is set up on the host for a build.
"$engine" "${engine_args[@]}" build "${run_args[@]}" --network host \
    "${build_args[@]}" -f "$root/daemonset/Dockerfile" -t "$image" "$context" \
    || die "$engine build failed (above)"
say "image: built in $((SECONDS - t))s"
if [ -n "$previous" ] && [ "$previous" != "$("$engine" image inspect --format '{{.Id}}' "$image")" ]; then
    # The image this build replaced, now untagged (kept if a container still uses it).
    "$engine" rmi "$previous" >/dev/null 2>&1 || true
fi

version=$("$engine" "${engine_args[@]}" run --rm "${run_args[@]}" --network none "$image" --version) \
    || die "the built image does not run: $engine run $image --version failed"
size=$("$engine" image inspect --format '{{.Size}}' "$image")
say "image: $image ready: $version, $((size / 1000000)) MB, $((SECONDS - started))s in all"
