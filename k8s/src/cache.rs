//! A bounded cache in front of a [`TokenAuthenticator`]: a token that passed in the last few
//! seconds is not checked again (no second signature verification, no second TokenReview).
//! istio-agent sends the same token with every call of a pod, and ztunnel one node token
//! for every workload on its node, so a rollout repeats each token many times within seconds.
//!
//! Entries are keyed by the token's SHA-256 (the token itself is not kept) and live until the
//! earlier of the token's own `exp` and `ttl` after the check. Refusals are not cached: a bad
//! token costs its own check every time, and cannot push good ones out. The kube-apiserver
//! caches successful token authentications for 10 s in the same way; in front of a
//! TokenReview the two add up, so a deleted pod's token may pass for up to about 20 s.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::K8sError;
use crate::token::{ServiceAccountToken, TokenAuthenticator};

/// How long a validated token is trusted without a new check, at most.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// The most tokens held; past it, expired ones are dropped and, if none has expired, new
/// ones are checked but not kept.
pub const DEFAULT_CAPACITY: usize = 16_384;

type Digest = [u8; 32];

/// A [`TokenAuthenticator`] that remembers recent successes of the one it wraps.
pub struct CachedAuthenticator<A> {
    inner: A,
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<Digest, (ServiceAccountToken, Instant)>>,
}

impl<A: std::fmt::Debug> std::fmt::Debug for CachedAuthenticator<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedAuthenticator")
            .field("inner", &self.inner)
            .field("ttl", &self.ttl)
            .field("capacity", &self.capacity)
            .field("held", &self.entries.lock().len())
            .finish()
    }
}

impl<A> CachedAuthenticator<A> {
    /// Wraps `inner`: successes are kept for at most `ttl`, `capacity` of them at a time.
    pub fn new(inner: A, ttl: Duration, capacity: usize) -> Self {
        Self { inner, ttl, capacity, entries: Mutex::new(HashMap::new()) }
    }

    /// Tokens held now (expired ones included until they are swept).
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// True when no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn digest(token: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Seconds until the token's own `exp`, read from its payload without verification: it is
/// only called on a token the wrapped authenticator has just accepted. None when the token
/// carries no readable `exp` (then only the cache's ttl bounds the entry).
fn seconds_left(token: &str) -> Option<i64> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(v.get("exp")?.as_i64()? - tessera_identity::unix_now())
}

#[async_trait]
impl<A: TokenAuthenticator> TokenAuthenticator for CachedAuthenticator<A> {
    async fn authenticate(&self, token: &str) -> Result<ServiceAccountToken, K8sError> {
        let key = digest(token);
        let now = Instant::now();
        if let Some((sat, until)) = self.entries.lock().get(&key)
            && *until > now
        {
            return Ok(sat.clone());
        }
        let sat = self.inner.authenticate(token).await?;
        let life = match seconds_left(token) {
            Some(s) if s <= 0 => return Ok(sat),
            Some(s) => self.ttl.min(Duration::from_secs(s.unsigned_abs())),
            None => self.ttl,
        };
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity {
            entries.retain(|_, (_, until)| *until > now);
        }
        if entries.len() < self.capacity {
            entries.insert(key, (sat.clone(), now + life));
        }
        Ok(sat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Accepts tokens starting with "good", counting the checks.
    #[derive(Debug, Default)]
    struct Counting(Arc<AtomicUsize>);

    #[async_trait]
    impl TokenAuthenticator for Counting {
        async fn authenticate(&self, token: &str) -> Result<ServiceAccountToken, K8sError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            if token.starts_with("good") {
                ServiceAccountToken::from_username(&format!("system:serviceaccount:ns:{}", token.len()))
            } else {
                Err(K8sError::Unauthenticated("bad".into()))
            }
        }
    }

    fn jwt_with_exp(prefix: &str, exp: i64) -> String {
        use base64::Engine;
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{{\"exp\":{exp}}}"));
        format!("{prefix}.{p}.sig")
    }

    #[tokio::test]
    async fn a_repeated_good_token_is_checked_once_and_a_bad_one_every_time() {
        let n = Arc::new(AtomicUsize::new(0));
        let c = CachedAuthenticator::new(Counting(n.clone()), DEFAULT_TTL, 8);
        let good = jwt_with_exp("good", tessera_identity::unix_now() + 3600);
        for _ in 0..5 {
            assert_eq!(c.authenticate(&good).await.unwrap().service_account, good.len().to_string());
        }
        assert_eq!(n.load(Ordering::SeqCst), 1);
        for _ in 0..3 {
            assert!(c.authenticate("bad.token.x").await.is_err());
        }
        assert_eq!(n.load(Ordering::SeqCst), 4, "refusals are not cached");
    }

    #[tokio::test]
    async fn entries_end_at_the_ttl_or_the_tokens_expiry() {
        let n = Arc::new(AtomicUsize::new(0));
        let c = CachedAuthenticator::new(Counting(n.clone()), Duration::from_millis(50), 8);
        let good = jwt_with_exp("good", tessera_identity::unix_now() + 3600);
        c.authenticate(&good).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        c.authenticate(&good).await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 2, "checked again after the ttl");
        // A token past its exp (the wrapped authenticator's leeway let it pass) is not kept.
        let c = CachedAuthenticator::new(Counting(n.clone()), DEFAULT_TTL, 8);
        let stale = jwt_with_exp("good", tessera_identity::unix_now() - 5);
        c.authenticate(&stale).await.unwrap();
        assert!(c.is_empty());
    }

    #[tokio::test]
    async fn it_never_holds_more_than_its_capacity() {
        let n = Arc::new(AtomicUsize::new(0));
        let c = CachedAuthenticator::new(Counting(n.clone()), DEFAULT_TTL, 4);
        let exp = tessera_identity::unix_now() + 3600;
        for i in 0..10 {
            c.authenticate(&jwt_with_exp(&format!("good{i}"), exp)).await.unwrap();
        }
        assert_eq!(c.len(), 4);
        // The first four stay cached; the rest were checked and answered but not kept.
        c.authenticate(&jwt_with_exp("good0", exp)).await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 10);
    }
}
