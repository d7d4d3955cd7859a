//! Tessera's CA server, as a library that the `tessera-server` binary (`src/bin/tessera-server`:
//! the command line and its output) only drives.
//!
//! What it is: configuration ([`config`]), the plugin catalog ([`catalog`]: builds the
//! configured plugins from their crates and hands the rest of the server only their traits), the CA core is the `tessera-ca` crate and storage the `tessera-store` crate; the gRPC services ([`api`]: Agent API over mTLS, Admin
//! API on a local socket; [`changes`] tells agents to sync now), federation ([`federation`]: our bundle endpoint and peers'
//! bundles), health and metrics ([`health`]), self-diagnosis ([`doctor`]: the findings of `doctor` and `debug info`; [`validate`]: a config's files; [`console`]: the read-only web console), process wiring ([`app`]) and the
//! Admin API client ([`client`]). The command line is the binary's (`src/bin/tessera-server`).
//!
//! What it is not: no plugin implementations (`tessera-plugins` has the traits and built-ins, each other plugin
//! has its own crate under `plugins/`), no agent logic,
//! no SPIFFE parsing rules (they live in `tessera-identity`).

#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod catalog;
pub mod changes;
pub mod client;
pub mod config;
pub mod console;
pub mod doctor;
pub mod federation;
pub mod health;
pub mod istio;
pub mod metrics;
pub mod publish;
pub mod validate;
