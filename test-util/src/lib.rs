//! Fixtures shared by every test crate of the workspace, so a test says what it checks and not
//! how to start things.
//!
//! What it is: the real binaries as processes ([`procs`]: `ServerProc`, `Proc`, `Mesh`,
//! `Traffic`), a server and agents in the test's process ([`inprocess`]: `TestServer`,
//! `TestAgent`), the one server config template ([`config`]), waiting with a deadline
//! ([`wait`]), and the real or faked peers: Envoy ([`envoy`]), PostgreSQL ([`postgres`]), the
//! Kubernetes API ([`fake_k8s`], a fake that speaks the real JSON shapes; there is no real API
//! server here), the Helm chart rendered by the real Helm ([`chart`]), `/proc` helpers ([`procfs`]), and
//! network namespaces with veth links that a test can slow down or cut ([`netns`]).
//!
//! What it is not: no test of its own beyond its helpers', and never a dependency of a
//! shipped binary. It fails the calling test (`panic`) instead of returning errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod bench;
pub mod chart;
pub mod config;
pub mod envoy;
pub mod fake_k8s;
pub mod inprocess;
pub mod netns;
pub mod postgres;
pub mod procfs;
pub mod procs;
pub mod wait;

pub use config::{ServerToml, server_config, server_config_for};
pub use procs::*;
pub use wait::{eventually, poll, wait_for};
