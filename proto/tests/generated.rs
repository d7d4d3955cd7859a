//! `src/gen/` is what protox + tonic-prost-build make of the `.proto` files under `proto/`,
//! checked in so that no build compiles a protobuf compiler (each profile and target did: the
//! shipped `dist` build, the aarch64 build, fuzzing). This test generates the code again and
//! fails when a file differs, is missing or is left over. After changing a `.proto` file (or
//! the lock file moves prost or tonic):
//!
//! `TESSERA_REGENERATE=1 cargo test -p tessera-proto --test generated`, then commit `src/gen/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;

/// The Workload API's streams stay open as long as their workloads run, and so does every
/// agent's change-notice stream on the server's Agent API (10,000 agents: 10,000 streams): both
/// are generated with small buffers (`src/codec.rs`).
fn generate(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let compile = |files: &[&str]| protox::compile(files, ["proto"]);
    let files = [
        "proto/tessera/types/v1/types.proto",
        "proto/tessera/admin/v1/admin.proto",
        "proto/tessera/plugin/v1/upstream.proto",
        "proto/istio/v1/auth/ca.proto",
    ];
    tonic_prost_build::configure().build_server(true).build_client(true).out_dir(out).compile_fds(compile(&files)?)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::LeanCodec")
        .out_dir(out)
        .compile_fds(compile(&["proto/spiffe/workload.proto"])?)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::LeanCodec")
        .extern_path(".tessera.types.v1", "crate::types::v1")
        .out_dir(out)
        .compile_fds(compile(&["proto/tessera/agent/v1/agent.proto"])?)?;
    Ok(())
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".rs"))
        .collect()
}

#[test]
fn the_checked_in_code_is_what_the_protos_generate() {
    // Tests run in the package's directory: the paths above are relative to it.
    let fresh = tempfile::tempdir().unwrap();
    generate(fresh.path()).unwrap();
    let checked_in = Path::new("src/gen");
    let made = names(fresh.path());
    assert!(made.len() >= 6, "protox generated only {made:?}");
    let mut stale: Vec<String> = made
        .iter()
        .filter(|n| std::fs::read(fresh.path().join(n)).ok() != std::fs::read(checked_in.join(n)).ok())
        .cloned()
        .collect();
    let left_over: Vec<String> = names(checked_in).difference(&made).cloned().collect();
    stale.extend(left_over.iter().cloned());
    if stale.is_empty() {
        return;
    }
    if std::env::var_os("TESSERA_REGENERATE").is_some_and(|v| v == "1") {
        for n in &made {
            std::fs::copy(fresh.path().join(n), checked_in.join(n)).unwrap();
        }
        for n in &left_over {
            std::fs::remove_file(checked_in.join(n)).unwrap();
        }
        eprintln!("regenerated src/gen: {stale:?}; commit them");
        return;
    }
    panic!(
        "src/gen differs from what the .proto files generate: {stale:?}. Run \
         `TESSERA_REGENERATE=1 cargo test -p tessera-proto --test generated` and commit src/gen/"
    );
}
