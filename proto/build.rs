//! Compiles the `.proto` files with protox (pure Rust), so no `protoc` is needed.

use std::io;

fn main() -> io::Result<()> {
    let files = [
        "proto/tessera/types/v1/types.proto",
        "proto/tessera/admin/v1/admin.proto",
        "proto/tessera/plugin/v1/upstream.proto",
        "proto/istio/v1/auth/ca.proto",
    ];
    // The Workload API's streams stay open as long as their workloads run, and so does every
    // agent's change-notice stream on the server's Agent API (10,000 agents: 10,000 streams):
    // small buffers (`src/codec.rs`).
    let workload = "proto/spiffe/workload.proto";
    let agent = "proto/tessera/agent/v1/agent.proto";
    // Envoy's SDS, the subset the agent speaks (proto/envoy/README.md): its client here, for
    // the tests and the bench; the agent routes the server side itself.
    let envoy =
        ["proto/envoy/service/secret/v3/sds.proto", "proto/envoy/extensions/transport_sockets/tls/v3/secret.proto"];
    let imported = [
        "proto/envoy/service/discovery/v3/discovery.proto",
        "proto/envoy/config/core/v3/base.proto",
        "proto/google/rpc/status.proto",
    ];
    for f in files.iter().chain([&workload, &agent]).chain(&envoy).chain(&imported) {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-changed=src/codec.rs");
    let compile = |files: &[&str]| protox::compile(files, ["proto"]).map_err(|e| io::Error::other(e.to_string()));
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(compile(&files)?)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(compile(&[workload])?)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::LeanCodec")
        .extern_path(".tessera.types.v1", "crate::types::v1")
        .compile_fds(compile(&[agent])?)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(compile(&envoy)?)
}
