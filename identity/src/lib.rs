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
pub mod der;
pub mod ids;
pub mod jwt;
pub mod keys;
pub mod pem;
pub mod secret;
pub mod serde_str;
pub mod tls;
pub mod x509;

pub use bundle::{Bundle, BundleError, JwtAuthority};
pub use ids::{IdError, Selector, agent_id, server_id};
pub use keys::{KeyType, PrivateKey};
pub use secret::Secret;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Seconds since the Unix epoch, now. A clock before 1970 reads as 0.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The Agent API's digest of an agent's authorized entry set: SHA-256 over each
/// (entry ID, 0x00, revision as 8 big-endian bytes), in ascending ID order. The server sends
/// it with every sync; the agent computes it over its cache to know whether a delta left it
/// equal to the server's view. Both sides must call this one function.
pub fn authorized_digest<'a>(entries_by_id: impl IntoIterator<Item = (&'a str, u64)>) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (id, revision) in entries_by_id {
        ctx.update(id.as_bytes());
        ctx.update(&[0]);
        ctx.update(&revision.to_be_bytes());
    }
    ctx.finish().as_ref().to_vec()
}
