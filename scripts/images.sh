#!/bin/sh
# Builds the two images, tessera-server and tessera-agent, from static binaries built on this
# machine, with no registry: deploy/image/rootfs.sh lays out each file system and
# deploy/image/Containerfile (FROM scratch) turns it into an image, through scripts/podman.sh.
#
#   scripts/images.sh BIN_DIR TAG [ARCH]
#
# BIN_DIR holds tessera-server and tessera-agent (static: musl or crt-static glibc); ARCH is
# the image's architecture (amd64, the default, or arm64). The images are tagged
# localhost/tessera-server:TAG and localhost/tessera-agent:TAG. Timestamps are zero, so the
# same binaries give the same image IDs.
set -eu
if [ $# -lt 2 ]; then
  echo "usage: $0 BIN_DIR TAG [ARCH]" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
bin_dir=$1
tag=$2
arch=${3:-amd64}
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
for name in server agent; do
  "$repo/deploy/image/rootfs.sh" "$bin_dir/tessera-$name" "$context/$name"
done
for name in server agent; do
  "$repo/scripts/podman.sh" build --quiet --arch "$arch" --timestamp 0 \
    -f "$repo/deploy/image/Containerfile" --target "$name" -t "localhost/tessera-$name:$tag" "$context"
done
