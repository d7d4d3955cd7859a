//! Tessera's gRPC wire definitions, generated at build time by protox + tonic-prost-build.
//!
//! This crate has no logic: it is the `.proto` files under `proto/` and the code generated
//! from them. The Agent API (`tessera.agent.v1`) is spoken between agent and server over mTLS;
//! the Admin API (`tessera.admin.v1`) only on the server's local Unix socket; the plugin
//! protocol (`tessera.plugin.v1`) between the server and external plugin processes. The
//! SPIFFE Workload API, the Agent API and the SDS subset of Envoy's API ([`envoy`]) are
//! generated with [`codec::LeanCodec`], whose stream buffers start small.

#![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod codec;

/// Types shared by both APIs.
pub mod types {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tessera.types.v1");
    }
}

/// The Agent API.
pub mod agent {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tessera.agent.v1");
    }
}

/// The Admin API.
pub mod admin {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tessera.admin.v1");
    }
}

/// The external plugin protocol (served by plugin processes on a Unix socket).
pub mod plugin {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tessera.plugin.v1");
    }
}

/// Istio's CA API (`istio.v1.auth.IstioCertificateService`), served by the server for
/// istio-agent and ztunnel.
pub mod istio {
    /// Version 1.
    pub mod v1 {
        /// Certificate signing.
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

/// The SPIFFE Workload API (the spec's proto has no package).
pub mod workload {
    tonic::include_proto!("_");
}

/// The part of Envoy's API that SDS uses, with Envoy's packages and field numbers
/// (`proto/envoy/README.md`). The modules mirror the packages, as the generated code refers
/// to its neighbours by relative paths.
pub mod envoy {
    /// `envoy.config.*`.
    pub mod config {
        /// `envoy.config.core.*`.
        pub mod core {
            /// `envoy.config.core.v3`: data sources, typed extension configs.
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// `envoy.extensions.*`.
    pub mod extensions {
        /// `envoy.extensions.transport_sockets.*`.
        pub mod transport_sockets {
            /// `envoy.extensions.transport_sockets.tls.*`.
            pub mod tls {
                /// `envoy.extensions.transport_sockets.tls.v3`: secrets.
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                }
            }
        }
    }
    /// `envoy.service.*`.
    pub mod service {
        /// `envoy.service.discovery.*`.
        pub mod discovery {
            /// `envoy.service.discovery.v3`: xDS requests and responses.
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        /// `envoy.service.secret.*`.
        pub mod secret {
            /// `envoy.service.secret.v3`: the SDS client.
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
    }
}

/// `google.rpc.Status`, as xDS carries it.
pub mod google {
    /// `google.rpc`.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}
