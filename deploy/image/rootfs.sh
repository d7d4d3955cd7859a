#!/bin/sh
# Lays out the file system of a Tessera image made FROM scratch, as distroless's static
# image is made: the binary, the CA certificates and the user database, all taken from
# Debian packages, and nothing else (no shell, no package manager, no libc: the binary is
# static).
#
#   deploy/image/rootfs.sh BINARY OUT_DIR
#
# OUT_DIR/ then holds usr/local/bin/<binary's name>, etc/ssl/certs/ca-certificates.crt
# (Debian's ca-certificates), etc/passwd and etc/group (root and nobody from Debian's
# base-passwd, plus nonroot 65532, the user the images run as), etc/nsswitch.conf, tmp/
# (1777) and home/nonroot/. Both deploy/Containerfile (for machines that reach registries)
# and deploy/image/Containerfile (offline, from binaries built here) copy this layout.
set -eu
if [ $# -ne 2 ]; then
  echo "usage: $0 BINARY OUT_DIR" >&2
  exit 2
fi
bin=$1
out=$2
for f in "$bin" /etc/ssl/certs/ca-certificates.crt /usr/share/base-passwd/passwd.master /usr/share/base-passwd/group.master; do
  [ -f "$f" ] || { echo "rootfs.sh: $f is missing (packages: ca-certificates, base-passwd)" >&2; exit 1; }
done
rm -rf "$out"
mkdir -p "$out/usr/local/bin" "$out/etc/ssl/certs" "$out/tmp" "$out/home/nonroot"
chmod 1777 "$out/tmp"
install -m 0755 "$bin" "$out/usr/local/bin/$(basename "$bin")"
install -m 0644 /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/ca-certificates.crt"
{
  grep -E '^(root|nobody):' /usr/share/base-passwd/passwd.master | sed 's#:/bin/bash$#:/sbin/nologin#'
  echo 'nonroot:*:65532:65532:nonroot:/home/nonroot:/sbin/nologin'
} > "$out/etc/passwd"
{
  grep -E '^(root|nogroup):' /usr/share/base-passwd/group.master
  echo 'nonroot:*:65532:'
} > "$out/etc/group"
chmod 0644 "$out/etc/passwd" "$out/etc/group"
printf 'hosts: files dns\n' > "$out/etc/nsswitch.conf"
chmod 0644 "$out/etc/nsswitch.conf"
# The same modification time everywhere, so that two builds of one binary give one layer.
find "$out" -exec touch -h -d @0 {} +
