//! Federation (SPIFFE Federation spec): our bundle endpoint ([`endpoint`]) and the keeper of
//! peers' bundles ([`Federation`]), which fetches each peer's document at a quarter of its
//! refresh hint, checks it, and stores it only when it passes.
//!
//! A fetched document is refused, logged, and the stored bundle kept, when: the endpoint
//! fails TLS or SPIFFE authentication; it answers anything but 200; the body is over
//! [`MAX_BUNDLE_JSON_LEN`], not JSON, or not a bundle; its sequence number is lower than the
//! stored one; one of its X.509 authorities names another trust domain; or its key set is
//! empty and the relationship does not allow that (the spec's "revoke all").
//!
//! Not here: delivering bundles to agents (the Agent API does that from the store).

pub mod endpoint;
mod fetch;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use tessera_identity::bundle::MAX_BUNDLE_JSON_LEN;
use tessera_identity::{Bundle, TrustDomain, unix_now};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::changes::ChangeFeed;
use tessera_store::{EndpointProfile, FederationRelationship, Store, StoreError};

/// One `[[federation.trust_domains]]`.
#[derive(Debug, Clone)]
pub struct ConfiguredPeer {
    /// The relationship, written to the store at start (config wins over the Admin API).
    pub relationship: FederationRelationship,
    /// The peer's bundle to start from (SPIFFE JWKS or PEM), used while none is stored.
    pub bootstrap_bundle_path: Option<std::path::PathBuf>,
}

/// Refresh period when the peer's document carries no hint.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Shortest refresh period, whatever the hint says.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest refresh period, whatever the hint says.
const MAX_REFRESH: Duration = Duration::from_secs(3600);

/// Federation failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FederationError {
    /// No relationship with this trust domain.
    #[error("no federation relationship with {0}")]
    NotFound(TrustDomain),
    /// The relationship itself is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The endpoint could not be reached or authenticated, or answered badly.
    #[error("fetching the bundle of {td} from {url}: {reason}")]
    Fetch {
        /// The peer.
        td: TrustDomain,
        /// The endpoint.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The document arrived but was refused; the stored bundle is unchanged.
    #[error("refused the bundle of {td}: {reason}")]
    Refused {
        /// The peer.
        td: TrustDomain,
        /// Why.
        reason: String,
    },
    /// The bootstrap bundle file cannot be used.
    #[error("bootstrap bundle {path}: {reason}")]
    Bootstrap {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks what a relationship needs before it is stored: an `https` URL with a host, a peer
/// other than us.
pub fn check_relationship(own: &TrustDomain, rel: &FederationRelationship) -> Result<(), FederationError> {
    if &rel.trust_domain == own {
        return Err(FederationError::Invalid(format!("{own} is our own trust domain")));
    }
    fetch::parse_url(&rel.bundle_endpoint_url).map_err(FederationError::Invalid)?;
    Ok(())
}

/// Reads a bundle file: a SPIFFE bundle (JWKS) when it starts with `{`, else PEM certificates.
pub fn read_bundle_file(td: &TrustDomain, path: &Path) -> Result<Bundle, FederationError> {
    let bad = |reason: String| FederationError::Bootstrap { path: path.display().to_string(), reason };
    let data = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let b = if data.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'{') {
        Bundle::from_jwks(td.clone(), &data).map_err(|e| bad(e.to_string()))?
    } else {
        let mut b = Bundle::new(td.clone());
        for c in tessera_identity::pem::decode_certs(&data).map_err(|e| bad(e.to_string()))? {
            b.add_x509_authority(&c);
        }
        b
    };
    if b.is_empty() {
        return Err(bad("holds no keys".into()));
    }
    Ok(b)
}

/// Checks a fetched document against the relationship and the stored bundle; returns the
/// bundle to store.
pub fn accept(rel: &FederationRelationship, stored: Option<&Bundle>, doc: &[u8]) -> Result<Bundle, String> {
    let b = Bundle::from_jwks(rel.trust_domain.clone(), doc).map_err(|e| e.to_string())?;
    if b.is_empty() && !rel.allow_empty_bundle {
        return Err("the document has no keys (an empty key set is honoured only with allow_empty_bundle)".into());
    }
    if let Some(s) = stored
        && b.sequence_number < s.sequence_number
    {
        return Err(format!("sequence number {} is lower than the stored {}", b.sequence_number, s.sequence_number));
    }
    for (i, c) in b.x509_authorities.iter().enumerate() {
        let facts = tessera_identity::x509::cert_facts(c).map_err(|e| format!("X.509 authority {i}: {e}"))?;
        for uri in &facts.uris {
            if let Ok(id) = tessera_identity::SpiffeId::new(uri)
                && id.trust_domain() != &rel.trust_domain
            {
                return Err(format!("X.509 authority {i} belongs to trust domain {}", id.trust_domain()));
            }
        }
    }
    Ok(b)
}

/// What a refresh did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refreshed {
    /// A new bundle was stored, with this sequence number.
    Updated(u64),
    /// The document matched the stored bundle.
    Unchanged(u64),
}

/// Where a peer stands, for `federation show` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct PeerStatus {
    /// Unix seconds of the last attempt, 0 = never.
    pub last_attempt: i64,
    /// Unix seconds of the last accepted document, 0 = never.
    pub last_success: i64,
    /// The last failure, cleared by a success.
    pub last_error: Option<String>,
    /// Unix seconds of the next scheduled fetch.
    pub next_refresh: i64,
    failures: u32,
    due: Option<Instant>,
}

/// Keeps peers' bundles fresh.
#[derive(Debug)]
pub struct Federation {
    own: TrustDomain,
    store: Arc<dyn Store>,
    wake: Notify,
    status: Mutex<HashMap<TrustDomain, PeerStatus>>,
    // One fetch-and-store at a time, so a manual refresh and the schedule never interleave.
    fetching: tokio::sync::Mutex<()>,
    fetch_timeout: Duration,
    changes: ChangeFeed,
}

impl Federation {
    /// A keeper over `store` for the server of `own`; bundle updates are told to `changes`.
    pub fn new(own: TrustDomain, store: Arc<dyn Store>, changes: ChangeFeed) -> Self {
        Self {
            own,
            store,
            wake: Notify::new(),
            status: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
            fetch_timeout: Duration::from_secs(30),
            changes,
        }
    }

    /// Our trust domain.
    pub fn own(&self) -> &TrustDomain {
        &self.own
    }

    /// Writes the configured relationships to the store (config wins) and stores each
    /// bootstrap bundle when no bundle of that peer is stored yet.
    pub async fn apply_config(&self, peers: &[ConfiguredPeer]) -> Result<(), FederationError> {
        for p in peers {
            let td = &p.relationship.trust_domain;
            if let Some(path) = &p.bootstrap_bundle_path
                && self.store.get_bundle(td).await?.is_none()
            {
                let b = read_bundle_file(td, path)?;
                self.store.put_bundle(&b).await?;
                self.changes.notify();
                info!(trust_domain = %td, path = %path.display(), "Bootstrap bundle stored");
            }
            self.store.put_federation(&p.relationship).await?;
        }
        Ok(())
    }

    /// Tells the schedule that relationships changed.
    pub fn relationships_changed(&self, td: &TrustDomain) {
        {
            let mut s = self.status.lock();
            s.remove(td);
        }
        self.wake.notify_one();
    }

    /// The status of the peer `td`.
    pub fn status(&self, td: &TrustDomain) -> PeerStatus {
        self.status.lock().get(td).cloned().unwrap_or_default()
    }

    /// Fetches `td`'s bundle now.
    pub async fn refresh(&self, td: &TrustDomain) -> Result<Refreshed, FederationError> {
        let rel = self.store.get_federation(td).await?.ok_or_else(|| FederationError::NotFound(td.clone()))?;
        self.refresh_rel(&rel).await
    }

    async fn refresh_rel(&self, rel: &FederationRelationship) -> Result<Refreshed, FederationError> {
        let _one = self.fetching.lock().await;
        let td = &rel.trust_domain;
        let stored = self.store.get_bundle(td).await?;
        let result = self.fetch_and_check(rel, stored.as_ref()).await;
        let outcome = match result {
            Ok(b) => {
                let same = stored.as_ref().is_some_and(|s| {
                    s.sequence_number == b.sequence_number
                        && s.x509_authorities == b.x509_authorities
                        && s.jwt_authorities == b.jwt_authorities
                        && s.refresh_hint == b.refresh_hint
                });
                if same {
                    Ok((Refreshed::Unchanged(b.sequence_number), b.refresh_hint))
                } else {
                    self.store.put_bundle(&b).await?;
                    self.changes.notify();
                    info!(trust_domain = %td, sequence = b.sequence_number, x509 = b.x509_authorities.len(), jwt = b.jwt_authorities.len(), "Federated bundle updated");
                    Ok((Refreshed::Updated(b.sequence_number), b.refresh_hint))
                }
            }
            Err(e) => {
                warn!(trust_domain = %td, error = %e, "Federated bundle refresh failed; keeping the stored bundle");
                Err(e)
            }
        };
        let now = unix_now();
        let hint = match &outcome {
            Ok((_, h)) => *h,
            Err(_) => stored.as_ref().and_then(|s| s.refresh_hint),
        };
        let period = refresh_period(hint);
        {
            let mut all = self.status.lock();
            let st = all.entry(td.clone()).or_default();
            st.last_attempt = now;
            let wait = match &outcome {
                Ok(_) => {
                    st.failures = 0;
                    st.last_success = now;
                    st.last_error = None;
                    period
                }
                Err(e) => {
                    st.failures = st.failures.saturating_add(1);
                    st.last_error = Some(e.to_string());
                    backoff(st.failures).min(period)
                }
            };
            st.due = Some(Instant::now() + wait);
            st.next_refresh = now + i64::try_from(wait.as_secs()).unwrap_or(i64::MAX);
        }
        outcome.map(|(r, _)| r)
    }

    async fn fetch_and_check(
        &self,
        rel: &FederationRelationship,
        stored: Option<&Bundle>,
    ) -> Result<Bundle, FederationError> {
        let td = &rel.trust_domain;
        let fail =
            |reason: String| FederationError::Fetch { td: td.clone(), url: rel.bundle_endpoint_url.clone(), reason };
        let trust = match &rel.profile {
            EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                let etd = endpoint_spiffe_id.trust_domain();
                let anchors = if etd == td {
                    stored.cloned()
                } else if etd == &self.own {
                    return Err(FederationError::Invalid(format!(
                        "endpoint {endpoint_spiffe_id} is in our own trust domain; use https_web or a peer ID"
                    )));
                } else {
                    self.store.get_bundle(etd).await?
                };
                let anchors = anchors.filter(|b| !b.x509_authorities.is_empty()).ok_or_else(|| {
                    fail(format!(
                        "no bundle of {etd} is stored to authenticate {endpoint_spiffe_id}: set a bootstrap bundle"
                    ))
                })?;
                fetch::Trust::Spiffe { roots: anchors.x509_authorities, id: endpoint_spiffe_id.clone() }
            }
            EndpointProfile::HttpsWeb { ca_bundle_path } => fetch::Trust::Web { ca_file: ca_bundle_path.clone() },
        };
        let doc =
            fetch::get(&rel.bundle_endpoint_url, trust, MAX_BUNDLE_JSON_LEN, self.fetch_timeout).await.map_err(fail)?;
        accept(rel, stored, &doc).map_err(|reason| FederationError::Refused { td: td.clone(), reason })
    }

    /// Refreshes every relationship on its schedule until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let mut next = Instant::now() + DEFAULT_REFRESH;
            match self.store.list_federations().await {
                Ok(rels) => {
                    {
                        let mut s = self.status.lock();
                        s.retain(|td, _| rels.iter().any(|r| &r.trust_domain == td));
                    }
                    for rel in rels {
                        let due = self.status(&rel.trust_domain).due;
                        if due.is_none_or(|d| d <= Instant::now()) {
                            // Failures are logged and recorded in the status.
                            let _ = self.refresh_rel(&rel).await;
                        }
                        if let Some(d) = self.status(&rel.trust_domain).due {
                            next = next.min(d);
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "Cannot list federation relationships");
                    next = Instant::now() + Duration::from_secs(5);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => break,
            }
        }
    }
}

/// A quarter of the hint (SPIFFE Federation §4.2 leaves the rate to us; a quarter gives three
/// more tries before the peer expects us to have its update), bounded.
fn refresh_period(hint: Option<u64>) -> Duration {
    match hint {
        Some(h) if h > 0 => {
            Duration::from_secs(h).checked_div(4).unwrap_or(MIN_REFRESH).clamp(MIN_REFRESH, MAX_REFRESH)
        }
        _ => DEFAULT_REFRESH,
    }
}

/// 1 s, 2 s, 4 s … after consecutive failures.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(12))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_identity::SpiffeId;

    #[test]
    fn refresh_is_a_quarter_of_the_hint_within_bounds() {
        assert_eq!(refresh_period(None), DEFAULT_REFRESH);
        assert_eq!(refresh_period(Some(0)), DEFAULT_REFRESH);
        assert_eq!(refresh_period(Some(300)), Duration::from_secs(75));
        assert_eq!(refresh_period(Some(2)), MIN_REFRESH);
        assert_eq!(refresh_period(Some(86400)), MAX_REFRESH);
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(1000), Duration::from_secs(4096));
    }

    #[test]
    fn relationships_need_an_https_url_and_a_peer() {
        let own = TrustDomain::new("a.example").unwrap();
        let mut rel = FederationRelationship {
            trust_domain: TrustDomain::new("b.example").unwrap(),
            bundle_endpoint_url: "https://b.example:8443".into(),
            profile: EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: SpiffeId::new("spiffe://b.example/tessera/server").unwrap(),
            },
            allow_empty_bundle: false,
        };
        check_relationship(&own, &rel).unwrap();
        rel.bundle_endpoint_url = "http://b.example".into();
        assert!(check_relationship(&own, &rel).unwrap_err().to_string().contains("https"));
        rel.bundle_endpoint_url = "https://".into();
        assert!(check_relationship(&own, &rel).is_err());
        rel.bundle_endpoint_url = "https://b.example".into();
        rel.trust_domain = own.clone();
        assert!(check_relationship(&own, &rel).unwrap_err().to_string().contains("own trust domain"));
    }
}
