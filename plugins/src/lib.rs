//! Plugin interfaces and the built-in plugins.
//!
//! What it is: the host-facing trait of each plugin kind — [`KeyManager`], which holds the
//! CA's signing keys, and [`UpstreamAuthority`], which signs our CA under someone else's root —
//! with the built-in implementations beside them (`memory` and `disk` key managers, the `disk`
//! upstream) and one conformance suite every key manager must pass ([`conformance`]).
//!
//! What it is not: no CA logic and no concrete HSM/Vault clients. Heavy plugins (PKCS#11,
//! Vault) come in their own crates under `plugins/` behind the same traits (external-CA issue).

#![forbid(unsafe_code)]

pub mod conformance;
pub mod fsutil;
pub mod key_manager;
pub mod upstream;

pub use key_manager::{CaKey, KeyManager, KeyManagerError, disk::DiskKeyManager, memory::MemoryKeyManager};
pub use upstream::{MintedX509Ca, UpstreamAuthority, UpstreamError, disk::DiskUpstream};
