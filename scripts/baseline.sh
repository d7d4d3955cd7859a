#!/usr/bin/env bash
# Builds the previous release that the upgrade test starts from: the commit named in
# tests/upgrade-from, taken from this clone's git history, built in the dev profile, its two
# binaries kept in target/baseline/<commit>/bin/ and reused while they are there.
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
# In the dev profile, with its intermediate files in this clone's own target/ (cargo's
# build-dir) and only the two binaries in a target directory of its own: every dependency the
# workspace's own build compiled in that profile (same version, features and source) is
# reused, and only what changed since (the workspace crates, the patched h2 and what depends
# on it) is compiled. Features are resolved as scripts/test.sh's Build step resolves them
# (`--workspace --examples`: dev-dependencies' features included), or nothing would match.
# Without incremental caches: it is built once.
CARGO_INCREMENTAL=0 CARGO_BUILD_BUILD_DIR="$PWD/target" CARGO_TARGET_DIR="$out/target" \
  cargo build --quiet --locked --workspace --examples --bin tessera-server --bin tessera-agent \
  --manifest-path "$out/src/Cargo.toml" >&2
mkdir -p "$out/bin.new"
cp "$out/target/debug/tessera-server" "$out/target/debug/tessera-agent" "$out/bin.new/"
mv "$out/bin.new" "$out/bin"
rm -rf "$out/target" "$out/src"
echo "$out/bin"
