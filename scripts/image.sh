#!/usr/bin/env bash
# Builds weft's OCI image from scratch, offline: the weft binary, the shared
# libraries it links (as ldd lists them), CA certificates and a passwd entry,
# nothing else.
#
#   scripts/image.sh [--bin PATH] [--tag NAME]
#
# --bin   the weft binary to put in (default: a release build, made here)
# --tag   the image's name (default: localhost/weft:VERSION)
# Needs podman or buildah.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="" tag=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) bin="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
tag=${tag:-localhost/weft:$version}
if [ -z "$bin" ]; then
    target=${CARGO_TARGET_DIR:-target}
    cargo build --release -p weft-node
    bin=$target/release/weft
fi
[ -x "$bin" ] || { echo "image.sh: $bin is not an executable" >&2; exit 1; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/bin" "$root/etc/ssl/certs" "$root/var/lib/weft" "$root/var/cache/weft" "$root/tmp"
# a stripped copy: the image carries no debug info
cp "$bin" "$root/usr/bin/weft"
strip "$root/usr/bin/weft" 2>/dev/null || true
# every library the binary links, at the path the loader looks for it
ldd "$bin" | awk '/=> \//{print $3} /^[[:space:]]*\/[^ ]+ \(/{print $1}' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/nonexistent\nweft:x:65532:65532:weft:/tmp:/nonexistent\n' > "$root/etc/passwd"
printf 'root:x:0:\nweft:x:65532:\n' > "$root/etc/group"
chown -R 65532:65532 "$root/var/lib/weft" "$root/var/cache/weft"
chmod 1777 "$root/tmp"
cp image/Containerfile "$ctx/Containerfile"

if command -v podman >/dev/null 2>&1; then
    podman build --quiet --pull=never --build-arg VERSION="$version" --build-arg COMMIT="$commit" -t "$tag" "$ctx" >/dev/null
elif command -v buildah >/dev/null 2>&1; then
    buildah bud --quiet --pull=false --build-arg VERSION="$version" --build-arg COMMIT="$commit" -t "$tag" "$ctx" >/dev/null
else
    echo "image.sh: needs podman or buildah (Debian: apt-get install podman)" >&2
    exit 1
fi
echo "$tag"
