//! The server's gRPC services and what they share ([`Shared`]: the issuance path of
//! `tessera-ca`, the metrics, the change feed), the one mapping of errors to
//! `tonic::Status` ([`status`]) and proto conversions.

pub mod admin;
pub mod agent;
pub mod convert;
pub mod limits;
pub mod status;
pub mod tls;

use std::sync::Arc;

use tessera_ca::Issuance;

use crate::changes::ChangeFeed;
use crate::metrics::Metrics;
pub use status::ApiError;

/// What every gRPC service shares: the one issuance path, the metrics and the change feed.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Every SVID is signed through it.
    pub issuance: Issuance,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Tells watching agents that entries or bundles changed.
    pub changes: ChangeFeed,
}
