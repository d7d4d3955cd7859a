//! What both ends of the Agent API share beyond the generated code.
//!
//! What it is: bundle conversion between [`tessera_identity::Bundle`] and the wire
//! ([`wire`]); the client side of the API ([`client`]: TLS toward the server authenticated by
//! its SPIFFE ID, connecting to the first replica that answers, `AttestAgent` and
//! `RenewAgent` with a key made here); and the agent identity with its files ([`identity`]:
//! SVID and key, 0600, replaced atomically). `tessera-agent` and the nested upstream
//! (`plugins/nested`, a server acting as an agent of its parent) both use it.
//!
//! What it is not: no sync loop, no workload logic, no server logic; it never sends a private
//! key anywhere.

#![forbid(unsafe_code)]

pub mod client;
mod error;
pub mod identity;
pub mod wire;

pub use client::{attest, connect, connect_any, renew, server_tls};
pub use error::{ClientError, EVICTED_METADATA};
pub use identity::{AgentIdentity, IdentityFiles};
