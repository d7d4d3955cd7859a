#!/usr/bin/env bash
# Builds the previous release that the upgrade test starts from: the commit named in
# tests/upgrade-from, taken from this clone's git history, built in the dev profile
# (unoptimised) in a target directory of its own, its two binaries kept in target/baseline/<commit>/bin/ and
# reused while they are there (the build directory is removed afterwards: about 6 GB).
#
#   scripts/baseline.sh        (prints the bin directory; exit status 3: the commit is not
#                               in this clone's history)
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(grep -v '^#' tests/upgrade-from | awk 'NF { print $1; exit }')
if ! full=$(git rev-parse --verify --quiet "$commit^{commit}"); then
  echo "baseline.sh: commit $commit (tests/upgrade-from) is not in this clone's history; a shallow clone cannot run the upgrade test" >&2
  exit 3
fi
out="$PWD/target/baseline/$full"
if [ -x "$out/bin/tessera-server" ] && [ -x "$out/bin/tessera-agent" ]; then
  echo "$out/bin"
  exit 0
fi
rm -rf "$out"
mkdir -p "$out/src"
git archive "$full" | tar -x -C "$out/src"
# Unoptimised, without debug information or incremental caches (built once): it builds in
# about half the time, and the upgrade test asks little speed of it.
CARGO_TARGET_DIR="$out/target" cargo build --quiet --locked --bins -p tessera-server -p tessera-agent \
  --config 'profile.dev.debug=false' --config 'profile.dev.incremental=false' --config 'profile.dev.package."*".opt-level=0' \
  --manifest-path "$out/src/Cargo.toml" >&2
mkdir -p "$out/bin.new"
cp "$out/target/debug/tessera-server" "$out/target/debug/tessera-agent" "$out/bin.new/"
mv "$out/bin.new" "$out/bin"
rm -rf "$out/target" "$out/src"
echo "$out/bin"
