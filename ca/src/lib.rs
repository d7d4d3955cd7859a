//! The certificate authority: where a CSR becomes a certificate.
//!
//! What it is: the CA of one server instance ([`Ca`]) with an X.509 CA and a JWT key, each in
//! a pair of slots (prepared → active → old) recorded in the CA journal; the rotation policy
//! as pure functions of time and slots ([`policy`]); the clock it reads ([`clock`]), injected
//! so tests move time instead of sleeping; and [`Issuance`], the one path every SVID takes
//! (CSR check, signature, durable audit record, counters).
//!
//! What it is not: no network API (no tonic), no CLI, no configuration parsing, no storage
//! engine (the `tessera-store` trait), and it never sees CA key bytes (the key manager signs).

#![forbid(unsafe_code)]

mod authority;
mod ca;
pub mod clock;
mod error;
mod issuance;
pub mod policy;
mod slot;

pub use ca::{AuthorityView, Ca, CaConfig, CaDeps, IssuedJwt, IssuedX509, RotationHealth};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{CaError, UpstreamAnswerError};
pub use issuance::{AudienceError, Failure, Fault, Issuance, IssuanceCounters, IssueError, ResultCounter, X509Request};
