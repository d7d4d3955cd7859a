//! Tessera's node agent, as a library that `main.rs` only wires.
//!
//! What it is: the SVID cache and rotation, with attestation and the agent's own SVID
//! through `tessera-agent-api` ([`manager`]; the bundle file in [`client`]), the one mapping
//! of its errors to gRPC statuses ([`status`]), workload attestation ([`attestor`], [`k8s_attestor`], [`callers`]), the SPIFFE
//! Workload API ([`workload_api`]) and Envoy SDS ([`sds`], routed by [`sds_server`]; both APIs stream through [`streams`]) on one Unix socket, cert files for
//! proxyless gRPC ([`files`]), health ([`health`]), self-diagnosis on a private admin socket
//! ([`doctor`], [`admin`], SDS stream state in [`sds_state`]), wiring ([`app`]) and the CLI ([`cli`]).
//!
//! What it is not: no CA, no storage beyond its own SVID, key and bundle files. Workload
//! private keys are generated here and never leave the node.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod attestor;
pub mod callers;
pub mod cli;
pub mod client;
pub mod config;
pub mod diagnose;
pub mod doctor;
pub mod files;
pub mod health;
pub mod k8s_attestor;
pub mod manager;
pub mod sds;
pub mod sds_server;
pub mod sds_state;
pub mod socket;
pub mod status;
pub mod streams;
pub mod workload_api;
