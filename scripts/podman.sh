#!/usr/bin/env bash
# Runs podman with the settings this project's machines need, for the image tests and
# scripts/release.sh:
#
# - its own storage under target/podman (or $TESSERA_PODMAN_ROOT), so the suite neither
#   reads nor changes the machine's images and containers;
# - runc: crun fails on hybrid cgroup hierarchies such as this machine's;
# - cgroupfs and a file event log: no systemd is needed;
# - rlimits within the host's own hard limits (podman's defaults can exceed them, and then
#   every container fails to start; here nproc 65536 failed with a 96365 hard limit and
#   32768 ran).
#
#   scripts/podman.sh ARGS...     (exactly podman's arguments)
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
root=${TESSERA_PODMAN_ROOT:-$repo/target/podman}
mkdir -p "$root"
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] && nproc=4194304
[ "$nofile" -gt 65536 ] && nofile=65536
[ "$nproc" -gt 32768 ] && nproc=32768
tmp="$root/containers.conf.$$"
cat > "$tmp" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
mv "$tmp" "$root/containers.conf"
CONTAINERS_CONF="$root/containers.conf" exec podman \
  --root "$root/storage" --runroot "$root/run" --tmpdir "$root/tmp" "$@"
