//! Plugin interfaces and the built-in plugins.
//!
//! What it is: the host-facing trait of each plugin kind — [`KeyManager`], which holds the
//! CA's signing keys, [`UpstreamAuthority`], which signs our CA under someone else's root, and
//! [`NodeAttestor`], which proves an agent's node — with the built-in implementations beside
//! them (`memory` and `disk` key managers, the `disk` upstream, the `join_token` attestor) and
//! one conformance suite every key manager must pass ([`conformance`]).
//!
//! What it is not: no CA logic and no concrete HSM, Vault, Kubernetes or plugin-process
//! clients: those come in their own crates under `plugins/` behind the same traits.

#![forbid(unsafe_code)]

pub mod conformance;
pub mod fsutil;
pub mod key_manager;
pub mod node_attestor;
pub mod secret;
pub mod upstream;

pub use key_manager::{CaKey, KeyManager, KeyManagerError, disk::DiskKeyManager, memory::MemoryKeyManager};
pub use node_attestor::{AttestError, NodeAttestor, join_token::JoinTokenAttestor};
pub use secret::{SecretError, SecretSource};
pub use upstream::{MintedX509Ca, UpstreamAuthority, UpstreamError, disk::DiskUpstream};
