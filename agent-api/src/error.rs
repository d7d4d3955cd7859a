//! The crate's one error type.

use std::path::PathBuf;

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
        move |s| ClientError::Refused { call, code: s.code(), message: s.message().to_owned() }
    }
}
