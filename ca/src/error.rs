//! The CA's one error type. Every variant names what went wrong; none carries another
//! component's free text as its only content, and none is a catch-all.

use tessera_store::SlotStatus;

/// Why the CA could not do what it was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// No usable authority of this kind (the CA could not start, or it expired).
    #[error("no active {0} authority")]
    NoActiveAuthority(&'static str),
    /// The key manager failed.
    #[error(transparent)]
    KeyManager(#[from] tessera_plugins::KeyManagerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] tessera_store::StoreError),
    /// The certificate profile refused the request (a bad CSR, a lifetime past the CA's).
    #[error(transparent)]
    Profile(#[from] tessera_identity::x509::ProfileError),
    /// Encoding or signing a certificate failed.
    #[error("certificate signing failed: {0}")]
    Signing(#[from] rcgen::Error),
    /// Minting a JWT failed.
    #[error(transparent)]
    Jwt(#[from] tessera_identity::jwt::JwtError),
    /// Making a key in this process failed.
    #[error(transparent)]
    Key(#[from] tessera_identity::keys::KeyError),
    /// The system random generator failed.
    #[error("random generator failed")]
    Random,
    /// A signing task on the blocking pool did not finish (it panicked or was cancelled).
    #[error("a signing task did not finish")]
    TaskFailed,
    /// The named authority does not exist.
    #[error("no X.509 authority with ID {0:?}")]
    UnknownAuthority(String),
    /// Activation without a prepared authority.
    #[error("no prepared {0} authority to activate; run prepare first")]
    NothingPrepared(&'static str),
    /// Activation named another authority than the prepared one.
    #[error("authority {asked} is not the prepared one ({prepared})")]
    NotThePrepared {
        /// What the operator named.
        asked: String,
        /// What is prepared.
        prepared: String,
    },
    /// Only an old authority can be tainted.
    #[error("authority {id} is {}; only an old authority can be tainted (activate its successor first)", .status.as_str())]
    TaintNotOld {
        /// The authority.
        id: String,
        /// Its status.
        status: SlotStatus,
    },
    /// The authority is tainted already.
    #[error("authority {0} is already tainted")]
    AlreadyTainted(String),
    /// A journal entry cannot be read back.
    #[error("journal entry for authority {0} is damaged (a certificate is not base64, or there is none)")]
    DamagedJournal(String),
    /// The upstream authority failed.
    #[error(transparent)]
    Upstream(#[from] tessera_plugins::UpstreamError),
    /// The upstream authority answered with something we cannot use.
    #[error("upstream answer: {0}")]
    UpstreamAnswer(UpstreamAnswerError),
    /// The bundle kept changing under concurrent writers (server replicas) across every retry.
    #[error("the bundle kept changing under concurrent writers; try again")]
    BundleContention,
}

/// What is wrong with an upstream authority's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamAnswerError {
    /// The chain is empty.
    #[error("no CA certificate")]
    NoCertificate,
    /// Our CA certificate does not hold the key we asked to be certified.
    #[error("the CA certificate does not hold our key")]
    NotOurKey,
    /// Our certificate is not a CA.
    #[error("the certificate is not a CA")]
    NotACa,
    /// A certificate does not parse.
    #[error("a certificate does not parse")]
    Unparsable,
    /// None of the upstream's roots issued the chain.
    #[error("no upstream root issued the chain")]
    NoIssuingRoot,
}
