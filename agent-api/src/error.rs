//! The crate's one error type.

use std::path::PathBuf;

/// The response-trailer key that marks a `PermissionDenied` as "this agent is not attested
/// (evicted)", so that an agent can tell it from a ban or a refused request and attest again.
/// A server that does not send it leaves the agent as it was: refused until an operator acts.
pub const EVICTED_METADATA: &str = "tessera-agent-evicted";

/// Why a call to the server, or the agent's own files, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// TLS configuration failed (bad roots or key).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server cannot be reached.
    #[error("cannot connect to the server at {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A persisted file is unreadable or damaged.
    #[error("agent state file {path}: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The server refused a call.
    #[error("server refused {call}: {code:?}: {message}")]
    Refused {
        /// Which call.
        call: &'static str,
        /// The gRPC code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// The server refused the call because it holds no record of this agent: an operator
    /// evicted it (or it never attested). The agent may attest again ([`EVICTED_METADATA`]).
    #[error("server refused {call}: the agent was evicted: {message}")]
    Evicted {
        /// Which call.
        call: &'static str,
        /// The server's message.
        message: String,
    },
    /// The call did not finish in time.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The server's answer is unusable.
    #[error("{call}: {reason}")]
    Malformed {
        /// Which call.
        call: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Making the key or the CSR failed.
    #[error("key generation: {0}")]
    Key(String),
}

impl ClientError {
    /// A refusal of `call` from its status.
    pub fn refused(call: &'static str) -> impl FnOnce(tonic::Status) -> ClientError {
        move |s| {
            if s.code() == tonic::Code::PermissionDenied && s.metadata().get(EVICTED_METADATA).is_some() {
                ClientError::Evicted { call, message: s.message().to_owned() }
            } else {
                ClientError::Refused { call, code: s.code(), message: s.message().to_owned() }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_permission_denied_marked_as_an_eviction_is_one() {
        let mut marked = tonic::Status::permission_denied("not attested");
        marked.metadata_mut().insert(EVICTED_METADATA, tonic::metadata::MetadataValue::from_static("1"));
        assert!(matches!(
            ClientError::refused("SyncEntries")(marked),
            ClientError::Evicted { call: "SyncEntries", .. }
        ));
        let banned = tonic::Status::permission_denied("banned");
        assert!(matches!(
            ClientError::refused("SyncEntries")(banned),
            ClientError::Refused { code: tonic::Code::PermissionDenied, .. }
        ));
        let mut other = tonic::Status::unauthenticated("no");
        other.metadata_mut().insert(EVICTED_METADATA, tonic::metadata::MetadataValue::from_static("1"));
        assert!(matches!(ClientError::refused("SyncEntries")(other), ClientError::Refused { .. }));
    }
}
