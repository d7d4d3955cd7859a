//! Plugin interfaces and the built-in plugins.
//!
//! What it is: the host-facing trait of each plugin kind — for now [`KeyManager`], which holds
//! the CA's signing keys — with the built-in implementations beside it (`memory`, `disk`) and
//! one conformance suite every key manager must pass ([`conformance`]).
//!
//! What it is not: no CA logic and no concrete HSM/Vault clients. Heavy plugins (PKCS#11,
//! Vault) come in their own crates under `plugins/` behind the same traits (external-CA issue).

#![forbid(unsafe_code)]

pub mod conformance;
pub mod fsutil;
pub mod key_manager;

pub use key_manager::{CaKey, KeyManager, KeyManagerError, disk::DiskKeyManager, memory::MemoryKeyManager};
