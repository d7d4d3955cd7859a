//! The CA core: where a CSR becomes a certificate.
//!
//! Two X.509 CA slots and two JWT key slots (A and B), each authority moving prepared → active
//! → old, recorded in the CA journal. A new authority is prepared at half of the active one's
//! life and joins the trust bundle right then, so every peer trusts it before it signs
//! anything; it becomes active at five sixths. Old authorities stay in the bundle until they
//! expire. The CA keys live in the key manager; this module never sees key bytes.
//!
//! Signing is CPU work (and an HSM round trip with the PKCS#11 key manager): callers run
//! [`Ca::sign_x509_svid`] and [`Ca::mint_jwt_svid`] off the async reactor.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rcgen::{Issuer, PublicKeyData, SigningKey};
use tessera_identity::csr::CheckedCsr;
use tessera_identity::jwt::{Claims, mint_es256};
use tessera_identity::x509::{LeafSpec, ca_params, cert_facts, leaf_params, random_serial};
use tessera_identity::{Bundle, JwtAuthority, KeyType, PrivateKey, SpiffeId, TrustDomain, unix_now};
use tessera_plugins::{CaKey, KeyManager, KeyManagerError, MintedX509Ca, UpstreamAuthority};
use tokio::sync::{Mutex, watch};
use tracing::{debug, info, warn};

use crate::config::CaConfig;
use tessera_store::{AuditEvent, AuditKind, CaJournal, JwtKeyEntry, SlotStatus, Store, StoreError, X509CaEntry};

/// Clock skew allowance: leaves are valid from this many seconds before issuance.
const BACKDATE_SECS: i64 = 10;

/// CA errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// No active authority (the CA could not start or has expired).
    #[error("no active {0} authority")]
    NoActiveAuthority(&'static str),
    /// The key manager failed.
    #[error(transparent)]
    KeyManager(#[from] KeyManagerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The certificate profile refused the request.
    #[error(transparent)]
    Profile(#[from] tessera_identity::x509::ProfileError),
    /// Certificate encoding or signing failed.
    #[error("certificate signing failed: {0}")]
    Signing(String),
    /// The named authority does not exist.
    #[error("no X.509 authority with ID {0:?}")]
    UnknownAuthority(String),
    /// The operation does not fit the authority's state.
    #[error("{0}")]
    InvalidState(String),
    /// The upstream authority failed or returned something unusable.
    #[error(transparent)]
    Upstream(#[from] tessera_plugins::UpstreamError),
}

/// An rcgen signing key backed by a key manager key.
struct KeySigner {
    key: Arc<dyn CaKey>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl PublicKeyData for KeySigner {
    fn der_bytes(&self) -> &[u8] {
        self.key.public_key_raw()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl SigningKey for KeySigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key.sign(msg).map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// A usable X.509 authority: its journal entry, certificate and signer.
struct X509Authority {
    entry: X509CaEntry,
    /// Certificates that follow a leaf in an SVID chain (empty for a self-signed CA).
    chain_tail: Vec<Vec<u8>>,
    issuer: Issuer<'static, KeySigner>,
    /// Signing takes microseconds in this process (a software EC key): cheaper on an async
    /// worker than a hop to the blocking pool. False for RSA and for HSM keys.
    quick: bool,
}

struct JwtSigner {
    entry: JwtKeyEntry,
    key: Arc<dyn CaKey>,
}

#[derive(Default)]
struct State {
    journal: CaJournal,
    x509_active: Option<Arc<X509Authority>>,
    x509_prepared: Option<Arc<X509Authority>>,
    jwt_active: Option<Arc<JwtSigner>>,
    jwt_prepared: Option<Arc<JwtSigner>>,
}

/// An issued X509-SVID.
#[derive(Debug, Clone)]
pub struct IssuedX509 {
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// Hex serial.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// An issued JWT-SVID. `Debug` hides the token.
#[derive(Clone)]
pub struct IssuedJwt {
    /// The compact JWS.
    pub token: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for IssuedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedJwt").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// One row of `localauthority x509 show`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuthorityView {
    /// Hex SKI.
    pub authority_id: String,
    /// prepared / active / old.
    pub status: &'static str,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Tainted by an operator.
    pub tainted: bool,
    /// DER.
    pub certificate: Vec<u8>,
}

/// The certificate authority of one server instance.
pub struct Ca {
    td: TrustDomain,
    cfg: CaConfig,
    instance: String,
    km: Arc<dyn KeyManager>,
    upstream: Option<Arc<dyn UpstreamAuthority>>,
    store: Arc<dyn Store>,
    state: RwLock<State>,
    ops: Mutex<()>,
    bundle_tx: watch::Sender<Arc<Bundle>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("trust_domain", &self.td).field("instance", &self.instance).finish_non_exhaustive()
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn other_slot(id: Option<&str>, a: &'static str, b: &'static str) -> &'static str {
    if id == Some(a) { b } else { a }
}

/// The roots (last chain element) the given journal entries end under.
fn roots_in_use<'a>(entries: impl Iterator<Item = &'a X509CaEntry>) -> Vec<Vec<u8>> {
    entries.filter_map(|e| e.chain.last().and_then(|c| STANDARD.decode(c).ok())).collect()
}

/// Checks an upstream's answer and returns our journal chain: our CA certificate (which must
/// hold our key and be a CA), the intermediates, and the root the chain ends under.
fn upstream_chain(minted: &MintedX509Ca, our_spki: &[u8]) -> Result<Vec<Vec<u8>>, CaError> {
    let bad = |m: String| CaError::InvalidState(format!("upstream answer: {m}"));
    let ours = minted.chain.first().ok_or_else(|| bad("no CA certificate".into()))?;
    let facts = cert_facts(ours)?;
    if facts.spki != our_spki {
        return Err(bad("the CA certificate does not hold our key".into()));
    }
    if !facts.is_ca {
        return Err(bad("the certificate is not a CA".into()));
    }
    let last = minted.chain.last().unwrap_or(ours);
    let (_, last_cert) = x509_parser::parse_x509_certificate(last).map_err(|e| bad(e.to_string()))?;
    let root = minted
        .roots
        .iter()
        .find(|r| {
            x509_parser::parse_x509_certificate(r)
                .is_ok_and(|(_, rc)| rc.subject().as_raw() == last_cert.issuer().as_raw())
        })
        .ok_or_else(|| bad("no upstream root issued the chain".into()))?;
    let mut chain = minted.chain.clone();
    chain.push(root.clone());
    Ok(chain)
}

impl Ca {
    /// Loads the journal, restores the authorities whose keys are still in the key manager,
    /// makes sure one X.509 CA and one JWT key are active, and publishes the bundle.
    pub async fn start(
        td: TrustDomain,
        cfg: CaConfig,
        instance: &str,
        km: Arc<dyn KeyManager>,
        upstream: Option<Arc<dyn UpstreamAuthority>>,
        store: Arc<dyn Store>,
    ) -> Result<Arc<Self>, CaError> {
        let bundle = match store.get_bundle(&td).await? {
            Some(b) => b,
            None => {
                let mut b = Bundle::new(td.clone());
                b.refresh_hint = Some(300);
                b
            }
        };
        let (bundle_tx, _) = watch::channel(Arc::new(bundle));
        let ca = Arc::new(Self {
            td,
            cfg,
            instance: instance.to_owned(),
            km,
            upstream,
            store,
            state: RwLock::new(State::default()),
            ops: Mutex::new(()),
            bundle_tx,
        });
        let journal = ca.store.load_journal(instance).await?.unwrap_or_default();
        let mut state = State { journal, ..State::default() };
        for e in &state.journal.x509 {
            if !matches!(e.status, SlotStatus::Active | SlotStatus::Prepared) {
                continue;
            }
            match ca.restore_x509(e).await {
                Ok(Some(a)) if e.status == SlotStatus::Active => state.x509_active = Some(a),
                Ok(Some(a)) => state.x509_prepared = Some(a),
                Ok(None) => {
                    warn!(authority_id = %e.authority_id, "X.509 CA key is gone from the key manager; the CA will be replaced")
                }
                Err(err) => warn!(authority_id = %e.authority_id, error = %err, "Cannot restore X.509 CA"),
            }
        }
        for e in &state.journal.jwt {
            if !matches!(e.status, SlotStatus::Active | SlotStatus::Prepared) {
                continue;
            }
            match ca.km.get_key(&e.key_id).await? {
                Some(key) if STANDARD.encode(spki_of(key.as_ref())) == e.public_key => {
                    let s = Arc::new(JwtSigner { entry: e.clone(), key });
                    if e.status == SlotStatus::Active {
                        state.jwt_active = Some(s)
                    } else {
                        state.jwt_prepared = Some(s)
                    }
                }
                _ => warn!(kid = %e.kid, "JWT key is gone from the key manager; it will be replaced"),
            }
        }
        // A restored authority whose key was lost is no longer usable: mark it old.
        let usable: Vec<String> = [&state.x509_active, &state.x509_prepared]
            .into_iter()
            .flatten()
            .map(|a| a.entry.authority_id.clone())
            .collect();
        for e in &mut state.journal.x509 {
            if e.status != SlotStatus::Old && !usable.contains(&e.authority_id) {
                e.status = SlotStatus::Old;
            }
        }
        let usable_jwt: Vec<String> =
            [&state.jwt_active, &state.jwt_prepared].into_iter().flatten().map(|s| s.entry.kid.clone()).collect();
        for e in &mut state.journal.jwt {
            if e.status != SlotStatus::Old && !usable_jwt.contains(&e.kid) {
                e.status = SlotStatus::Old;
            }
        }
        if let Ok(mut s) = ca.state.write() {
            *s = state;
        }
        ca.rotate_once().await?;
        Ok(ca)
    }

    async fn restore_x509(&self, e: &X509CaEntry) -> Result<Option<Arc<X509Authority>>, CaError> {
        let Some(key) = self.km.get_key(&e.key_id).await? else { return Ok(None) };
        let chain = e
            .chain
            .iter()
            .map(|c| {
                STANDARD.decode(c).map_err(|_| {
                    CaError::InvalidState(format!("journal certificate for {} is not base64", e.authority_id))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Some(cert) = chain.first() else { return Ok(None) };
        if cert_facts(cert)?.spki != spki_of(key.as_ref()) {
            return Ok(None); // the slot now holds another key
        }
        Ok(Some(Arc::new(self.authority(e.clone(), key, chain)?)))
    }

    fn authority(
        &self,
        entry: X509CaEntry,
        key: Arc<dyn CaKey>,
        chain: Vec<Vec<u8>>,
    ) -> Result<X509Authority, CaError> {
        let alg = key.key_type().signature_algorithm();
        let quick = !key.blocks() && !key.key_type().is_rsa();
        let cert = chain.first().ok_or_else(|| CaError::InvalidState("authority without certificate".into()))?;
        let issuer = Issuer::from_ca_cert_der(&cert.as_slice().into(), KeySigner { key, alg })
            .map_err(|e| CaError::Signing(e.to_string()))?;
        // Self-signed: nothing follows the leaf. Upstream-signed: our CA and its intermediates.
        let chain_tail = if chain.len() > 1 { chain[..chain.len() - 1].to_vec() } else { Vec::new() };
        Ok(X509Authority { entry, chain_tail, issuer, quick })
    }

    /// The out-of-process upstream plugin's state, if there is one.
    pub fn upstream_health(&self) -> Option<tessera_plugins::upstream::PluginHealth> {
        self.upstream.as_ref().and_then(|u| u.health())
    }

    /// Our trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// CA settings.
    pub fn config(&self) -> &CaConfig {
        &self.cfg
    }

    /// The current bundle of our trust domain.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle_tx.borrow().clone()
    }

    /// Notified on every bundle change.
    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle_tx.subscribe()
    }

    /// True when an X.509 CA and a JWT key are active and unexpired.
    pub fn is_ready(&self) -> bool {
        let now = unix_now();
        self.state
            .read()
            .map(|s| {
                s.x509_active.as_ref().is_some_and(|a| a.entry.not_after > now)
                    && s.jwt_active.as_ref().is_some_and(|j| j.entry.not_after > now)
            })
            .unwrap_or(false)
    }

    /// The active X.509 CA's notAfter, Unix seconds.
    /// True when the active X.509 CA signs quickly in process (a software EC key), so one
    /// CSR may be checked and signed on an async worker; otherwise use the blocking pool.
    pub fn signs_inline(&self) -> bool {
        self.active_x509().is_ok_and(|a| a.quick)
    }

    pub fn active_x509_not_after(&self) -> Option<i64> {
        self.state.read().ok()?.x509_active.as_ref().map(|a| a.entry.not_after)
    }

    fn active_x509(&self) -> Result<Arc<X509Authority>, CaError> {
        self.state.read().ok().and_then(|s| s.x509_active.clone()).ok_or(CaError::NoActiveAuthority("X.509"))
    }

    /// Signs an X509-SVID for `id` over a checked CSR's key. `ttl` = None uses the default;
    /// the result never outlives the CA. Blocking: call off the reactor.
    pub fn sign_x509_svid(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        csr: &CheckedCsr,
        ttl: Option<Duration>,
        renewal_grant: Option<&tessera_identity::x509::RenewalGrant>,
    ) -> Result<IssuedX509, CaError> {
        self.sign_leaf(id, dns_names, csr.public_key(), csr.is_rsa(), ttl, renewal_grant)
    }

    /// Signs a downstream server's CA (nested upstream): the CSR's only URI SAN must be our
    /// trust domain ID; the certificate gets our CA profile, lives at most `ttl` and never
    /// past our active CA. The chain is the new CA, then our chain without the root.
    pub fn sign_downstream_ca(&self, csr_der: &[u8], ttl: Duration) -> Result<IssuedX509, CaError> {
        let bad = |m: String| CaError::Profile(tessera_identity::x509::ProfileError::Malformed(m));
        let req = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| bad(format!("downstream CSR: {e}")))?;
        match req.params.subject_alt_names.as_slice() {
            [rcgen::SanType::URI(u)] if u.as_str() == self.td.id_string() => {}
            _ => {
                return Err(bad(format!(
                    "a downstream CA CSR must carry exactly one URI SAN, {}",
                    self.td.id_string()
                )));
            }
        }
        let auth = self.active_x509()?;
        let now = unix_now();
        let not_after = now.saturating_add(secs(ttl)).min(auth.entry.not_after);
        if not_after <= now + 60 {
            return Err(CaError::NoActiveAuthority("unexpired X.509"));
        }
        let serial = random_serial()?;
        let cert = ca_params(&self.td, now - BACKDATE_SECS, not_after, serial)?
            .signed_by(&req.public_key, &auth.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut chain = Vec::with_capacity(1 + auth.chain_tail.len());
        chain.push(cert.der().to_vec());
        chain.extend(auth.chain_tail.iter().cloned());
        Ok(IssuedX509 { chain, serial: tessera_identity::x509::hex_lower(&serial), not_after })
    }

    /// Issues an SVID for a key this process holds (the server's own TLS identity).
    pub fn issue_own_svid(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(IssuedX509, PrivateKey), CaError> {
        let key = PrivateKey::generate_ec_p256().map_err(|e| CaError::Signing(e.to_string()))?;
        let kp = key.to_rcgen().map_err(|e| CaError::Signing(e.to_string()))?;
        let issued = self.sign_leaf(id, dns_names, &kp, false, Some(ttl), None)?;
        Ok((issued, key))
    }

    fn sign_leaf(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        public_key: &impl PublicKeyData,
        rsa: bool,
        ttl: Option<Duration>,
        renewal_grant: Option<&tessera_identity::x509::RenewalGrant>,
    ) -> Result<IssuedX509, CaError> {
        let auth = self.active_x509()?;
        let now = unix_now();
        let ttl = secs(ttl.unwrap_or(self.cfg.default_x509_svid_ttl));
        let not_after = now.saturating_add(ttl).min(auth.entry.not_after);
        if not_after <= now {
            return Err(CaError::NoActiveAuthority("unexpired X.509"));
        }
        let serial = random_serial()?;
        let spec = LeafSpec {
            spiffe_id: id,
            dns_names,
            rsa_key: rsa,
            not_before: now - BACKDATE_SECS,
            not_after,
            issuer_not_after: auth.entry.not_after,
            serial,
            renewal_grant,
        };
        let cert =
            leaf_params(&spec)?.signed_by(public_key, &auth.issuer).map_err(|e| CaError::Signing(e.to_string()))?;
        let mut chain = Vec::with_capacity(1 + auth.chain_tail.len());
        chain.push(cert.der().to_vec());
        chain.extend(auth.chain_tail.iter().cloned());
        Ok(IssuedX509 { chain, serial: tessera_identity::x509::hex_lower(&serial), not_after })
    }

    /// Mints an ES256 JWT-SVID. Blocking: call off the reactor.
    pub fn mint_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Option<Duration>,
    ) -> Result<IssuedJwt, CaError> {
        let signer =
            self.state.read().ok().and_then(|s| s.jwt_active.clone()).ok_or(CaError::NoActiveAuthority("JWT"))?;
        let now = unix_now();
        let exp = now.saturating_add(secs(ttl.unwrap_or(self.cfg.default_jwt_svid_ttl))).min(signer.entry.not_after);
        if exp <= now {
            return Err(CaError::NoActiveAuthority("unexpired JWT"));
        }
        let claims = Claims { sub: id.to_string(), aud: audience.to_vec(), exp, iat: now };
        let token = mint_es256(&signer.entry.kid, &claims, |m| signer.key.sign(m).map_err(|e| e.to_string()))
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(IssuedJwt { token, issued_at: now, expires_at: exp })
    }

    /// The X.509 authorities in the journal, oldest first.
    pub fn x509_authorities(&self) -> Vec<AuthorityView> {
        let Ok(s) = self.state.read() else { return Vec::new() };
        s.journal
            .x509
            .iter()
            .map(|e| AuthorityView {
                authority_id: e.authority_id.clone(),
                status: e.status.as_str(),
                issued_at: e.issued_at,
                expires_at: e.not_after,
                tainted: e.tainted,
                certificate: e.chain.first().and_then(|c| STANDARD.decode(c).ok()).unwrap_or_default(),
            })
            .collect()
    }

    /// Prepares a new X.509 CA (replacing a prepared one) and adds it to the bundle.
    pub async fn prepare_x509(&self) -> Result<(), CaError> {
        let _g = self.ops.lock().await;
        self.prepare_x509_locked().await
    }

    /// Activates the prepared X.509 CA; the active one becomes old. `expected` must name the
    /// prepared authority when given.
    pub async fn activate_x509(&self, expected: Option<&str>) -> Result<(), CaError> {
        let _g = self.ops.lock().await;
        self.activate_x509_locked(expected).await
    }

    /// Subject key IDs of the tainted X.509 authorities (agents replace what they signed).
    pub fn tainted_authority_ids(&self) -> Vec<String> {
        self.state
            .read()
            .map(|s| s.journal.x509.iter().filter(|e| e.tainted).map(|e| e.authority_id.clone()).collect())
            .unwrap_or_default()
    }

    /// Marks an old X.509 authority as tainted: agents replace every SVID it signed at their
    /// next sync, and the server replaces its own TLS certificate.
    pub async fn taint_x509(&self, authority_id: &str) -> Result<(), CaError> {
        let _g = self.ops.lock().await;
        let journal = {
            let mut s = self.state.write().map_err(|_| CaError::InvalidState("CA state poisoned".into()))?;
            let e = s
                .journal
                .x509
                .iter_mut()
                .find(|e| e.authority_id == authority_id)
                .ok_or_else(|| CaError::UnknownAuthority(authority_id.to_owned()))?;
            if e.status != SlotStatus::Old {
                return Err(CaError::InvalidState(format!(
                    "authority {authority_id} is {}; only an old authority can be tainted (activate its successor first)",
                    e.status.as_str()
                )));
            }
            if e.tainted {
                return Err(CaError::InvalidState(format!("authority {authority_id} is already tainted")));
            }
            e.tainted = true;
            s.journal.clone()
        };
        self.store.save_journal(&self.instance, &journal).await?;
        warn!(authority_id, "X.509 authority tainted");
        Ok(())
    }

    /// One pass of the rotation schedule. Run it periodically with [`Ca::run_rotation`].
    pub async fn rotate_once(&self) -> Result<(), CaError> {
        let _g = self.ops.lock().await;
        let now = unix_now();
        self.refresh_bundle_from_store().await?;
        // New upstream roots are published as soon as the upstream shows them.
        if let Some(up) = &self.upstream {
            match up.roots().await {
                Ok(roots) => {
                    self.update_bundle(|b| {
                        let mut changed = false;
                        for r in &roots {
                            changed |= b.add_x509_authority(r);
                        }
                        changed
                    })
                    .await?
                }
                Err(e) => warn!(error = %e, "Cannot read the upstream roots"),
            }
        }
        let (x_active, x_prepared, j_active, j_prepared) = {
            let s = self.state.read().map_err(|_| CaError::InvalidState("CA state poisoned".into()))?;
            (
                s.x509_active.as_ref().map(|a| (a.entry.issued_at, a.entry.not_after)),
                s.x509_prepared.is_some(),
                s.jwt_active.as_ref().map(|a| (a.entry.issued_at, a.entry.not_after)),
                s.jwt_prepared.is_some(),
            )
        };
        match x_active {
            None => {
                if !x_prepared {
                    self.prepare_x509_locked().await?;
                }
                self.activate_x509_locked(None).await?;
            }
            Some((issued, not_after)) => {
                let life = not_after - issued;
                if not_after <= now {
                    if !x_prepared {
                        self.prepare_x509_locked().await?;
                    }
                    self.activate_x509_locked(None).await?;
                } else if !x_prepared && now >= issued + life / 2 {
                    self.prepare_x509_locked().await?;
                } else if x_prepared && now >= issued + life * 5 / 6 {
                    self.activate_x509_locked(None).await?;
                }
            }
        }
        match j_active {
            None => {
                if !j_prepared {
                    self.prepare_jwt_locked().await?;
                }
                self.activate_jwt_locked().await?;
            }
            Some((issued, not_after)) => {
                let life = not_after - issued;
                if not_after <= now || (j_prepared && now >= issued + life * 5 / 6) {
                    if !j_prepared {
                        self.prepare_jwt_locked().await?;
                    }
                    self.activate_jwt_locked().await?;
                } else if !j_prepared && now >= issued + life / 2 {
                    self.prepare_jwt_locked().await?;
                }
            }
        }
        self.prune_locked(now).await
    }

    /// Runs the rotation schedule every `interval` until `shutdown` fires.
    pub async fn run_rotation(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.rotate_once().await {
                        warn!(error = %e, "CA rotation check failed");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    async fn prepare_x509_locked(&self) -> Result<(), CaError> {
        let slot = {
            let s = self.state.read().map_err(|_| CaError::InvalidState("CA state poisoned".into()))?;
            other_slot(s.x509_active.as_ref().map(|a| a.entry.key_id.as_str()), "x509-CA-A", "x509-CA-B")
        };
        let key = self.km.generate_key(slot, self.cfg.key_type).await?;
        let now = unix_now();
        let not_after = now.saturating_add(secs(self.cfg.ca_ttl));
        let params = ca_params(&self.td, now - BACKDATE_SECS, not_after, random_serial()?)?;
        let signer = KeySigner { key: key.clone(), alg: self.cfg.key_type.signature_algorithm() };
        // `chain`: our CA certificate first, the root it ends under last (one element when
        // self-signed). `roots`: what joins the bundle.
        let (chain, roots) = match &self.upstream {
            None => {
                let cert = tokio::task::spawn_blocking(move || params.self_signed(&signer).map(|c| c.der().to_vec()))
                    .await
                    .map_err(|e| CaError::Signing(e.to_string()))?
                    .map_err(|e| CaError::Signing(e.to_string()))?;
                (vec![cert.clone()], vec![cert])
            }
            Some(up) => {
                // A CSR carries only the subject and the trust domain ID; the upstream sets the
                // CA profile and lifetime.
                let mut req = rcgen::CertificateParams::default();
                req.distinguished_name = params.distinguished_name.clone();
                req.subject_alt_names = params.subject_alt_names.clone();
                let csr = tokio::task::spawn_blocking(move || req.serialize_request(&signer).map(|c| c.der().to_vec()))
                    .await
                    .map_err(|e| CaError::Signing(e.to_string()))?
                    .map_err(|e| CaError::Signing(e.to_string()))?;
                let minted = up.mint_x509_ca(&csr, self.cfg.ca_ttl).await?;
                let chain = upstream_chain(&minted, &spki_of(key.as_ref()))?;
                (chain, minted.roots)
            }
        };
        let cert = chain.first().cloned().ok_or_else(|| CaError::InvalidState("empty CA chain".into()))?;
        let facts = cert_facts(&cert)?;
        let entry = X509CaEntry {
            key_id: slot.to_owned(),
            authority_id: facts.subject_key_id.clone().unwrap_or_else(|| facts.serial.clone()),
            chain: chain.iter().map(|c| STANDARD.encode(c)).collect(),
            issued_at: now,
            not_after: facts.not_after.min(not_after),
            status: SlotStatus::Prepared,
            tainted: false,
        };
        let authority = Arc::new(self.authority(entry.clone(), key, chain)?);
        // Trusted everywhere before it signs anything: the bundle first, then the journal.
        // A prepared authority being replaced never signed anything: its root leaves the bundle
        // unless another authority (or the upstream) still ends under it.
        let replaced: Vec<Vec<u8>> = {
            let s = self.state.read().map_err(|_| CaError::InvalidState("CA state poisoned".into()))?;
            let keep = roots_in_use(s.journal.x509.iter().filter(|e| e.status != SlotStatus::Prepared));
            s.journal
                .x509
                .iter()
                .filter(|e| e.status == SlotStatus::Prepared)
                .filter_map(|e| e.chain.last().and_then(|c| STANDARD.decode(c).ok()))
                .filter(|r| !keep.contains(r) && !roots.contains(r))
                .collect()
        };
        self.update_bundle(|b| {
            b.x509_authorities.retain(|c| !replaced.iter().any(|r| r.as_slice() == c.as_ref()));
            for r in &roots {
                b.add_x509_authority(r);
            }
            true
        })
        .await?;
        let journal = {
            let mut s = self.state.write().map_err(|_| CaError::InvalidState("CA state poisoned".into()))?;
            s.journal.x509.retain(|e| e.status != SlotStatus::Prepared);
            s.journal.x509.push(entry.clone());
            s.x509_prepared = Some(authority);
            s.journal.clone()
        };
        self.store.save_journal(&self.instance, &journal).await?;
        self.audit_ca(&entry).await;
        info!(authority_id = %entry.authority_id, not_after = entry.not_after, "X.509 CA prepared");
        Ok(())
    }

    async fn activate_x509_locked(&self, expected: Option<&str>) -> Result<(), CaError> {
        let journal = {
            let mut s = self.state.write().map_err(|_| CaError::InvalidState("CA state poisoned".into()))?;
            let prepared = s.x509_prepared.clone().ok_or_else(|| {
                CaError::InvalidState("no prepared X.509 authority to activate; run prepare first".into())
            })?;
            if let Some(want) = expected.filter(|w| !w.is_empty())
                && want != prepared.entry.authority_id
            {
                return Err(CaError::InvalidState(format!(
                    "authority {want} is not the prepared one ({})",
                    prepared.entry.authority_id
                )));
            }
            let prepared_id = prepared.entry.authority_id.clone();
            for e in &mut s.journal.x509 {
                if e.status == SlotStatus::Active {
                    e.status = SlotStatus::Old;
                }
                if e.authority_id == prepared_id {
                    e.status = SlotStatus::Active;
                }
            }
            // The authority's own copy of its entry keeps the prepared status; the journal is
            // the record of status.
            s.x509_active = s.x509_prepared.take();
            s.journal.clone()
        };
        self.store.save_journal(&self.instance, &journal).await?;
        info!("X.509 CA activated");
        Ok(())
    }

    async fn prepare_jwt_locked(&self) -> Result<(), CaError> {
        let slot = {
            let s = self.state.read().map_err(|_| CaError::InvalidState("CA state poisoned".into()))?;
            other_slot(s.jwt_active.as_ref().map(|a| a.entry.key_id.as_str()), "JWT-Signer-A", "JWT-Signer-B")
        };
        let key = self.km.generate_key(slot, KeyType::EcP256).await?;
        let now = unix_now();
        let spki = spki_of(key.as_ref());
        let entry = JwtKeyEntry {
            key_id: slot.to_owned(),
            kid: random_kid()?,
            public_key: STANDARD.encode(&spki),
            issued_at: now,
            not_after: now.saturating_add(secs(self.cfg.ca_ttl)),
            status: SlotStatus::Prepared,
        };
        let auth = JwtAuthority { key_id: entry.kid.clone(), public_key: spki, expires_at: entry.not_after };
        let replaced: Vec<String> = {
            let s = self.state.read().map_err(|_| CaError::InvalidState("CA state poisoned".into()))?;
            s.journal.jwt.iter().filter(|e| e.status == SlotStatus::Prepared).map(|e| e.kid.clone()).collect()
        };
        self.update_bundle(|b| {
            b.jwt_authorities.retain(|k| !replaced.contains(&k.key_id));
            b.add_jwt_authority(auth.clone());
            true
        })
        .await?;
        let journal = {
            let mut s = self.state.write().map_err(|_| CaError::InvalidState("CA state poisoned".into()))?;
            s.journal.jwt.retain(|e| e.status != SlotStatus::Prepared);
            s.journal.jwt.push(entry.clone());
            s.jwt_prepared = Some(Arc::new(JwtSigner { entry: entry.clone(), key }));
            s.journal.clone()
        };
        self.store.save_journal(&self.instance, &journal).await?;
        info!(kid = %entry.kid, "JWT key prepared");
        Ok(())
    }

    async fn activate_jwt_locked(&self) -> Result<(), CaError> {
        let journal = {
            let mut s = self.state.write().map_err(|_| CaError::InvalidState("CA state poisoned".into()))?;
            let prepared = s.jwt_prepared.take().ok_or_else(|| CaError::InvalidState("no prepared JWT key".into()))?;
            for e in &mut s.journal.jwt {
                if e.status == SlotStatus::Active {
                    e.status = SlotStatus::Old;
                }
                if e.kid == prepared.entry.kid {
                    e.status = SlotStatus::Active;
                }
            }
            let mut entry = prepared.entry.clone();
            entry.status = SlotStatus::Active;
            s.jwt_active = Some(Arc::new(JwtSigner { entry, key: prepared.key.clone() }));
            s.journal.clone()
        };
        self.store.save_journal(&self.instance, &journal).await?;
        info!("JWT key activated");
        Ok(())
    }

    /// Drops expired old authorities from the journal and the bundle.
    async fn prune_locked(&self, now: i64) -> Result<(), CaError> {
        let (expired_certs, expired_kids, journal) = {
            let mut s = self.state.write().map_err(|_| CaError::InvalidState("CA state poisoned".into()))?;
            let certs: Vec<Vec<u8>> = s
                .journal
                .x509
                .iter()
                .filter(|e| e.status == SlotStatus::Old && e.not_after <= now)
                .filter_map(|e| e.chain.last().and_then(|c| STANDARD.decode(c).ok()))
                .collect();
            let kids: Vec<String> = s
                .journal
                .jwt
                .iter()
                .filter(|e| e.status == SlotStatus::Old && e.not_after <= now)
                .map(|e| e.kid.clone())
                .collect();
            if certs.is_empty() && kids.is_empty() {
                return Ok(());
            }
            s.journal.x509.retain(|e| !(e.status == SlotStatus::Old && e.not_after <= now));
            s.journal.jwt.retain(|e| !(e.status == SlotStatus::Old && e.not_after <= now));
            // A root shared with a remaining authority (one upstream root, several
            // intermediates) stays.
            let keep = roots_in_use(s.journal.x509.iter());
            let certs: Vec<Vec<u8>> = certs.into_iter().filter(|c| !keep.contains(c)).collect();
            (certs, kids, s.journal.clone())
        };
        self.update_bundle(|b| {
            let before = b.x509_authorities.len() + b.jwt_authorities.len();
            b.x509_authorities.retain(|c| !expired_certs.iter().any(|e| e.as_slice() == c.as_ref()));
            b.jwt_authorities.retain(|k| !expired_kids.contains(&k.key_id));
            before != b.x509_authorities.len() + b.jwt_authorities.len()
        })
        .await?;
        self.store.save_journal(&self.instance, &journal).await?;
        info!(x509 = expired_certs.len(), jwt = expired_kids.len(), "Expired authorities pruned");
        Ok(())
    }

    /// Applies `change` to the stored bundle of our trust domain; when it reports a change,
    /// bumps the sequence number and stores it with a compare-and-set on the sequence (server
    /// replicas sharing a store each add their own CAs), retrying on a concurrent write, then
    /// publishes it.
    async fn update_bundle(&self, mut change: impl FnMut(&mut Bundle) -> bool) -> Result<(), CaError> {
        for _ in 0..16 {
            let stored = self.store.get_bundle(&self.td).await?;
            let expected = stored.as_ref().map(|b| b.sequence_number);
            let mut b = stored.unwrap_or_else(|| (*self.bundle()).clone());
            if !change(&mut b) {
                self.publish_if_newer(b);
                return Ok(());
            }
            b.sequence_number += 1;
            if self.store.compare_and_put_bundle(&b, expected).await? {
                self.bundle_tx.send_replace(Arc::new(b));
                return Ok(());
            }
            debug!("Bundle changed concurrently (another replica); retrying");
        }
        Err(CaError::InvalidState("the bundle kept changing under concurrent writers; try again".into()))
    }

    fn publish_if_newer(&self, b: Bundle) {
        if b.sequence_number > self.bundle().sequence_number {
            info!(sequence = b.sequence_number, roots = b.x509_authorities.len(), "Bundle updated by another replica");
            self.bundle_tx.send_replace(Arc::new(b));
        }
    }

    /// Picks up bundle changes written by other replicas sharing the store.
    async fn refresh_bundle_from_store(&self) -> Result<(), CaError> {
        if let Some(b) = self.store.get_bundle(&self.td).await? {
            self.publish_if_newer(b);
        }
        Ok(())
    }

    async fn audit_ca(&self, e: &X509CaEntry) {
        let ev = AuditEvent {
            at_ms: unix_now() * 1000,
            kind: AuditKind::CaIssued,
            spiffe_id: self.td.id_string(),
            serial: e.authority_id.clone(),
            not_after: e.not_after,
            caller: "server".into(),
            detail: format!("self-signed {} CA", self.cfg.key_type),
        };
        if let Err(err) = self.store.append_audit(ev).await {
            warn!(error = %err, "Cannot audit CA issuance");
        }
    }
}

/// A bare public key, to compute a SubjectPublicKeyInfo.
struct RawPublic<'a>(&'a [u8], &'static rcgen::SignatureAlgorithm);

impl PublicKeyData for RawPublic<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.1
    }
}

/// The DER SubjectPublicKeyInfo of a key manager key.
fn spki_of(key: &dyn CaKey) -> Vec<u8> {
    RawPublic(key.public_key_raw(), key.key_type().signature_algorithm()).subject_public_key_info()
}

fn random_kid() -> Result<String, CaError> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 16];
    SystemRandom::new().fill(&mut b).map_err(|_| CaError::Signing("random generator failed".into()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}
