//! Tessera's gRPC wire definitions: the code protox + tonic-prost-build generate from the
//! `.proto` files under `proto/`, checked in under `src/gen/` (no build compiles a protobuf
//! compiler; `tests/generated.rs` generates it again and fails when it differs).
//!
//! This crate has no logic: it is the `.proto` files and the code generated from them. The Agent API (`tessera.agent.v1`) is spoken between agent and server over mTLS;
//! the Admin API (`tessera.admin.v1`) only on the server's local Unix socket; the plugin
//! protocol (`tessera.plugin.v1`) between the server and external plugin processes. The
//! SPIFFE Workload API and the Agent API are generated with [`codec::LeanCodec`], whose stream
//! buffers start small.

#![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod codec;

/// Types shared by both APIs.
pub mod types {
    /// Version 1.
    pub mod v1 {
        include!("gen/tessera.types.v1.rs");
    }
}

/// The Agent API.
pub mod agent {
    /// Version 1.
    pub mod v1 {
        include!("gen/tessera.agent.v1.rs");
    }
}

/// The Admin API.
pub mod admin {
    /// Version 1.
    pub mod v1 {
        include!("gen/tessera.admin.v1.rs");
    }
}

/// The external plugin protocol (served by plugin processes on a Unix socket).
pub mod plugin {
    /// Version 1.
    pub mod v1 {
        include!("gen/tessera.plugin.v1.rs");
    }
}

/// Istio's CA API (`istio.v1.auth.IstioCertificateService`), served by the server for
/// istio-agent and ztunnel.
pub mod istio {
    /// Version 1.
    pub mod v1 {
        /// Certificate signing.
        pub mod auth {
            include!("gen/istio.v1.auth.rs");
        }
    }
}

/// The SPIFFE Workload API (the spec's proto has no package).
pub mod workload {
    include!("gen/_.rs");
}
