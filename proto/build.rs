//! Compiles the `.proto` files with protox (pure Rust), so no `protoc` is needed.

use std::io;

fn main() -> io::Result<()> {
    let files = [
        "proto/tessera/types/v1/types.proto",
        "proto/tessera/agent/v1/agent.proto",
        "proto/tessera/admin/v1/admin.proto",
        "proto/tessera/plugin/v1/upstream.proto",
        "proto/spiffe/workload.proto",
        "proto/istio/v1/auth/ca.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"]).map_err(|e| io::Error::other(e.to_string()))?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)
}
