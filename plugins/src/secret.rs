//! Where a plugin's secret (an HSM PIN, a Vault token, an AppRole secret ID) comes from. The
//! configuration names the source; the secret is read when the plugin starts, never while
//! the configuration is parsed.

use std::path::PathBuf;

use tessera_identity::Secret;

/// A secret's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file (one trailing newline is not part of the secret).
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

/// Why a secret cannot be read. The message names the source, never the secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The file cannot be read.
    #[error("cannot read the {what} file {path}: {source}")]
    File {
        /// What the secret is.
        what: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The variable is not set (or not UTF-8).
    #[error("environment variable {var} (the {what}) is not set")]
    Env {
        /// What the secret is.
        what: String,
        /// The variable.
        var: String,
    },
}

impl SecretSource {
    /// Reads the secret; `what` names it in errors ("HSM PIN").
    pub fn read(&self, what: &str) -> Result<Secret, SecretError> {
        match self {
            SecretSource::File(path) => Ok(std::fs::read_to_string(path)
                .map_err(|source| SecretError::File { what: what.to_owned(), path: path.clone(), source })?
                .trim_end_matches(['\r', '\n'])
                .into()),
            SecretSource::Env(var) => std::env::var(var)
                .map(Secret::new)
                .map_err(|_| SecretError::Env { what: what.to_owned(), var: var.clone() }),
        }
    }
}
