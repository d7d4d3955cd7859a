//! SPIFFE identity core for Tessera.
//!
//! What it is: SPIFFE ID and trust-domain types (re-exported from the `spiffe` crate, which
//! implements the spec's parsing rules), well-known Tessera IDs, the X509-SVID leaf and CA
//! certificate profiles, CSR inspection, SPIFFE bundles (JWKS) both ways, JWT-SVIDs, PEM, and
//! private keys that zeroize and never print. Plus rustls verifiers that authenticate a peer by
//! SPIFFE ID.
//!
//! What it is not: no I/O, no async, no storage, no gRPC. Everything here is sync and pure, so
//! the server, the agent and the CLI share one definition of what a valid identity is.

#![forbid(unsafe_code)]

pub mod bundle;
pub mod csr;
mod der;
pub mod ids;
pub mod jwt;
pub mod keys;
pub mod pem;
pub mod serde_str;
pub mod tls;
pub mod x509;

pub use bundle::{Bundle, BundleError, JwtAuthority};
pub use ids::{IdError, Selector, agent_id, server_id};
pub use keys::{KeyType, PrivateKey};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Seconds since the Unix epoch, now. A clock before 1970 reads as 0.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
