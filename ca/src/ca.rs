//! [`Ca`]: the certificate authority of one server instance. It keeps its slots in memory
//! and its journal in the store, signs leaves and downstream CAs with the active X.509
//! authority, mints JWTs with the active JWT key, and runs the rotation policy
//! ([`crate::policy`]) against an injected [`Clock`].

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use parking_lot::RwLock;
use rcgen::PublicKeyData;
use tessera_identity::csr::CheckedCsr;
use tessera_identity::jwt::{Claims, mint_es256};
use tessera_identity::x509::{LeafSpec, RenewalGrant, ca_params, cert_facts, leaf_params, random_serial};
use tessera_identity::{Bundle, KeyType, PrivateKey, SpiffeId, TrustDomain};
use tessera_plugins::{KeyManager, UpstreamAuthority};
use tessera_store::{AuditEvent, AuditKind, JwtKeyEntry, SlotStatus, Store, X509CaEntry};
use tokio::sync::{Mutex, watch};
use tracing::{debug, info, warn};

use crate::authority::{
    AuthorityKind, BundleChange, BundleItem, JwtKind, JwtSigner, KeySigner, State, X509Authority, X509Kind, random_kid,
    spki_of, upstream_chain,
};
use crate::clock::Clock;
use crate::error::CaError;
use crate::policy::{Step, TaintRefusal, may_taint};
use crate::slot;

/// Clock skew allowance: certificates are valid from this many seconds before issuance.
const BACKDATE_SECS: i64 = 10;

/// The CA's settings (`[ca]` in the server's configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaConfig {
    /// CA key algorithm.
    pub key_type: KeyType,
    /// Lifetime of each CA certificate and JWT key.
    pub ca_ttl: Duration,
    /// X509-SVID lifetime when the entry sets none.
    pub default_x509_svid_ttl: Duration,
    /// JWT-SVID lifetime when the entry sets none.
    pub default_jwt_svid_ttl: Duration,
    /// Largest X509-SVID TTL an entry or mint may ask for.
    pub max_x509_svid_ttl: Duration,
    /// Largest JWT-SVID TTL an entry or mint may ask for.
    pub max_jwt_svid_ttl: Duration,
}

/// An issued X509-SVID (or downstream CA).
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

/// What the CA runs against: its trust domain and settings, the server instance whose
/// journal it keeps, its plugins, its store and its clock.
#[derive(Debug, Clone)]
pub struct CaDeps {
    /// Our trust domain.
    pub trust_domain: TrustDomain,
    /// Settings.
    pub config: CaConfig,
    /// The server instance (several replicas sharing a store each keep their own journal).
    pub instance: String,
    /// Holds the CA keys.
    pub key_manager: Arc<dyn KeyManager>,
    /// Signs our X.509 CA, when configured.
    pub upstream: Option<Arc<dyn UpstreamAuthority>>,
    /// Journal, bundle and audit log.
    pub store: Arc<dyn Store>,
    /// What "now" is.
    pub clock: Arc<dyn Clock>,
}

/// The certificate authority of one server instance.
pub struct Ca {
    td: TrustDomain,
    cfg: CaConfig,
    instance: String,
    km: Arc<dyn KeyManager>,
    upstream: Option<Arc<dyn UpstreamAuthority>>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    state: RwLock<State>,
    /// Serialises the operations that change the state (rotation, operator commands).
    ops: Mutex<()>,
    bundle_tx: watch::Sender<Arc<Bundle>>,
    health: parking_lot::Mutex<RotationHealth>,
}

/// How the rotation schedule has fared: what `doctor` and `/metrics` report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationHealth {
    /// Failed rotation checks since start.
    pub errors_total: u64,
    /// The last check's failure (Unix seconds, error), cleared by a successful check.
    pub last_error: Option<(i64, String)>,
    /// The last failure to read the upstream's roots, cleared by a success.
    pub upstream_error: Option<(i64, String)>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("trust_domain", &self.td).field("instance", &self.instance).finish_non_exhaustive()
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Ca {
    /// Loads the journal, restores the authorities whose keys are still in the key manager,
    /// makes sure one X.509 CA and one JWT key are active, and publishes the bundle.
    pub async fn start(deps: CaDeps) -> Result<Arc<Self>, CaError> {
        let CaDeps { trust_domain: td, config: cfg, instance, key_manager: km, upstream, store, clock } = deps;
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
            instance,
            km,
            upstream,
            store,
            clock,
            state: RwLock::new(State::default()),
            ops: Mutex::new(()),
            bundle_tx,
            health: parking_lot::Mutex::new(RotationHealth::default()),
        });
        let journal = ca.store.load_journal(&ca.instance).await?.unwrap_or_default();
        let mut state = State { journal, ..State::default() };
        for e in state.journal.x509.clone() {
            if e.status == SlotStatus::Old {
                continue;
            }
            match ca.restore_x509(&e).await {
                Ok(Some(a)) => slot::restore::<X509Kind>(&mut state, e.status, a),
                Ok(None) => {
                    warn!(authority_id = %e.authority_id, "X.509 CA key is gone from the key manager; the CA will be replaced")
                }
                Err(err) => warn!(authority_id = %e.authority_id, error = %err, "Cannot restore X.509 CA"),
            }
        }
        for e in state.journal.jwt.clone() {
            if e.status == SlotStatus::Old {
                continue;
            }
            match ca.km.get_key(&e.key_id).await? {
                Some(key) if STANDARD.encode(spki_of(key.as_ref())) == e.public_key => {
                    let status = e.status;
                    slot::restore::<JwtKind>(&mut state, status, Arc::new(JwtSigner { entry: e, key }));
                }
                _ => warn!(kid = %e.kid, "JWT key is gone from the key manager; it will be replaced"),
            }
        }
        // A restored authority whose key was lost is no longer usable: it becomes old.
        slot::retire_unusable::<X509Kind>(&mut state);
        slot::retire_unusable::<JwtKind>(&mut state);
        // The one active before the active one, while its key is still there and it may sign:
        // the bundle endpoint's own SVID comes from it ([`Ca::issue_endpoint_svid`]). Only an
        // old authority made no later than the active one can have been active (a prepared
        // one retired because its key was lost is newer).
        let active_made = state.x509.active.as_ref().map(|a| a.entry.issued_at);
        let mut before: Vec<X509CaEntry> = state
            .journal
            .x509
            .iter()
            .filter(|e| {
                e.status == SlotStatus::Old
                    && !e.tainted
                    && e.not_after > ca.clock.now()
                    && active_made.is_some_and(|t| e.issued_at <= t)
            })
            .cloned()
            .collect();
        before.sort_by_key(|e| e.issued_at);
        if let Some(e) = before.last()
            && let Ok(Some(a)) = ca.restore_x509(e).await
        {
            state.x509.previous = Some(a);
        }
        *ca.state.write() = state;
        ca.rotate_once().await?;
        Ok(ca)
    }

    async fn restore_x509(&self, e: &X509CaEntry) -> Result<Option<Arc<X509Authority>>, CaError> {
        let Some(key) = self.km.get_key(&e.key_id).await? else { return Ok(None) };
        let chain = e
            .chain
            .iter()
            .map(|c| STANDARD.decode(c).map_err(|_| CaError::DamagedJournal(e.authority_id.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(cert) = chain.first() else { return Ok(None) };
        if cert_facts(cert)?.spki != spki_of(key.as_ref()) {
            return Ok(None); // the slot now holds another key
        }
        Ok(Some(Arc::new(X509Authority::new(e.clone(), key, &chain)?)))
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

    /// The store the CA keeps its journal in (and audits to).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The clock the CA reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
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
        let now = self.clock.now();
        let s = self.state.read();
        s.x509.active.as_ref().is_some_and(|a| a.entry.not_after > now)
            && s.jwt.active.as_ref().is_some_and(|j| j.entry.not_after > now)
    }

    /// True when the active X.509 CA signs quickly in process (a software EC key), so one
    /// CSR may be checked and signed on an async worker; otherwise use the blocking pool.
    pub fn signs_inline(&self) -> bool {
        self.active_x509().is_ok_and(|a| a.quick)
    }

    /// The active X.509 CA's notAfter, Unix seconds.
    pub fn active_x509_not_after(&self) -> Option<i64> {
        self.state.read().x509.active.as_ref().map(|a| a.entry.not_after)
    }

    fn active_x509(&self) -> Result<Arc<X509Authority>, CaError> {
        self.state.read().x509.active.clone().ok_or(CaError::NoActiveAuthority("X.509"))
    }

    /// Signs an X509-SVID for `id` over a checked CSR's key. `ttl` = None uses the default;
    /// the result never outlives the CA. Blocking: call off the reactor.
    pub fn sign_x509_svid(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        csr: &CheckedCsr,
        ttl: Option<Duration>,
        renewal_grant: Option<&RenewalGrant>,
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
        let now = self.clock.now();
        let not_after = now.saturating_add(secs(ttl)).min(auth.entry.not_after);
        if not_after <= now + 60 {
            return Err(CaError::NoActiveAuthority("unexpired X.509"));
        }
        let serial = random_serial()?;
        let cert =
            ca_params(&self.td, now - BACKDATE_SECS, not_after, serial)?.signed_by(&req.public_key, &auth.issuer)?;
        Ok(auth.issued(&cert, &serial, not_after))
    }

    /// Issues an SVID for a key this process holds (the server's own TLS identity).
    pub fn issue_own_svid(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(IssuedX509, PrivateKey), CaError> {
        let key = PrivateKey::generate_ec_p256()?;
        let kp = key.to_rcgen()?;
        let issued = self.sign_leaf(id, dns_names, &kp, false, Some(ttl), None)?;
        Ok((issued, key))
    }

    /// The authority the bundle endpoint's own SVID comes from: the X.509 CA that was active
    /// before, while it is in the bundle, untainted, its key still held and valid for `ttl`
    /// more; else the active one. A peer cut off from before the new CA was prepared until
    /// after it became active still trusts only the old CA: an endpoint SVID from the old CA
    /// lets it authenticate the endpoint and fetch the new bundle, with no manual step.
    fn endpoint_authority(&self, ttl: Duration) -> Result<Arc<X509Authority>, CaError> {
        let s = self.state.read();
        if let Some(p) = &s.x509.previous
            && p.entry.not_after.saturating_sub(self.clock.now()) >= secs(ttl)
            && s.journal
                .x509
                .iter()
                .any(|e| e.authority_id == p.entry.authority_id && e.status == SlotStatus::Old && !e.tainted)
        {
            return Ok(p.clone());
        }
        s.x509.active.clone().ok_or(CaError::NoActiveAuthority("X.509"))
    }

    /// The ID of the authority [`Ca::issue_endpoint_svid`] signs with now.
    pub fn endpoint_authority_id(&self, ttl: Duration) -> Option<String> {
        self.endpoint_authority(ttl).ok().map(|a| a.entry.authority_id.clone())
    }

    /// Issues the server's SVID for its `https_spiffe` bundle endpoint, with a key made here,
    /// from the authority [`Ca::endpoint_authority_id`] names (the previous CA while it may
    /// still sign, so that peers that missed a rotation can still fetch the bundle); returns
    /// it with that authority's ID. Blocking with a key in an HSM: call off the reactor.
    pub fn issue_endpoint_svid(
        &self,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<(IssuedX509, PrivateKey, String), CaError> {
        let key = PrivateKey::generate_ec_p256()?;
        let kp = key.to_rcgen()?;
        let auth = self.endpoint_authority(ttl)?;
        let issued = self.sign_leaf_by(&auth, id, &[], &kp, false, Some(ttl), None)?;
        // A prepare forgets the previous authority before its key slot gets a new key: if it
        // did while this signed, the signature may be the new key's. Sign again.
        let still_known = {
            let s = self.state.read();
            [&s.x509.previous, &s.x509.active].into_iter().flatten().any(|a| Arc::ptr_eq(a, &auth))
        };
        if !still_known {
            let auth = self.active_x509()?;
            let issued = self.sign_leaf_by(&auth, id, &[], &kp, false, Some(ttl), None)?;
            return Ok((issued, key, auth.entry.authority_id.clone()));
        }
        Ok((issued, key, auth.entry.authority_id.clone()))
    }

    fn sign_leaf(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        public_key: &impl PublicKeyData,
        rsa: bool,
        ttl: Option<Duration>,
        renewal_grant: Option<&RenewalGrant>,
    ) -> Result<IssuedX509, CaError> {
        let auth = self.active_x509()?;
        self.sign_leaf_by(&auth, id, dns_names, public_key, rsa, ttl, renewal_grant)
    }

    #[allow(clippy::too_many_arguments)]
    fn sign_leaf_by(
        &self,
        auth: &X509Authority,
        id: &SpiffeId,
        dns_names: &[String],
        public_key: &impl PublicKeyData,
        rsa: bool,
        ttl: Option<Duration>,
        renewal_grant: Option<&RenewalGrant>,
    ) -> Result<IssuedX509, CaError> {
        let now = self.clock.now();
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
        let cert = leaf_params(&spec)?.signed_by(public_key, &auth.issuer)?;
        Ok(auth.issued(&cert, &serial, not_after))
    }

    /// Mints an ES256 JWT-SVID. Blocking: call off the reactor.
    pub fn mint_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Option<Duration>,
    ) -> Result<IssuedJwt, CaError> {
        let signer = self.state.read().jwt.active.clone().ok_or(CaError::NoActiveAuthority("JWT"))?;
        let now = self.clock.now();
        let exp = now.saturating_add(secs(ttl.unwrap_or(self.cfg.default_jwt_svid_ttl))).min(signer.entry.not_after);
        if exp <= now {
            return Err(CaError::NoActiveAuthority("unexpired JWT"));
        }
        let claims = Claims { sub: id.to_string(), aud: audience.to_vec(), exp, iat: now };
        let token = mint_es256(&signer.entry.kid, &claims, |m| signer.key.sign(m).map_err(|e| e.to_string()))?;
        Ok(IssuedJwt { token, issued_at: now, expires_at: exp })
    }

    /// How the rotation schedule has fared.
    pub fn rotation_health(&self) -> RotationHealth {
        self.health.lock().clone()
    }

    /// The certificate chain (DER, our CA first) of each X.509 authority that is prepared or
    /// active, with its status.
    pub fn x509_chains(&self) -> Vec<(&'static str, Vec<Vec<u8>>)> {
        self.state
            .read()
            .journal
            .x509
            .iter()
            .filter(|e| e.status != SlotStatus::Old)
            .map(|e| (e.status.as_str(), e.chain.iter().filter_map(|c| STANDARD.decode(c).ok()).collect()))
            .collect()
    }

    /// The X.509 authorities in the journal, oldest first.
    pub fn x509_authorities(&self) -> Vec<AuthorityView> {
        self.state
            .read()
            .journal
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
        self.activate_locked::<X509Kind>(expected).await
    }

    /// Subject key IDs of the tainted X.509 authorities (agents replace what they signed).
    pub fn tainted_authority_ids(&self) -> Vec<String> {
        self.state.read().journal.x509.iter().filter(|e| e.tainted).map(|e| e.authority_id.clone()).collect()
    }

    /// Marks an old X.509 authority as tainted: agents replace every SVID it signed at their
    /// next sync, and the server replaces its own TLS certificate.
    pub async fn taint_x509(&self, authority_id: &str) -> Result<(), CaError> {
        let _g = self.ops.lock().await;
        let journal = {
            let mut s = self.state.write();
            let e = s
                .journal
                .x509
                .iter_mut()
                .find(|e| e.authority_id == authority_id)
                .ok_or_else(|| CaError::UnknownAuthority(authority_id.to_owned()))?;
            may_taint(e.status, e.tainted).map_err(|r| match r {
                TaintRefusal::NotOld(status) => CaError::TaintNotOld { id: authority_id.to_owned(), status },
                TaintRefusal::AlreadyTainted => CaError::AlreadyTainted(authority_id.to_owned()),
            })?;
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
        let now = self.clock.now();
        self.refresh_bundle_from_store().await?;
        // New upstream roots are published as soon as the upstream shows them.
        if let Some(up) = &self.upstream {
            match up.roots().await {
                Ok(roots) => {
                    self.health.lock().upstream_error = None;
                    let change =
                        BundleChange { remove: Vec::new(), add: roots.into_iter().map(BundleItem::Root).collect() };
                    self.update_bundle(|b| change.apply(b)).await?
                }
                Err(e) => {
                    warn!(error = %e, "Cannot read the upstream roots");
                    self.health.lock().upstream_error = Some((now, e.to_string()));
                }
            }
        }
        let x509 = slot::step::<X509Kind>(&self.state.read(), now);
        if matches!(x509, Step::Prepare | Step::PrepareAndActivate) {
            self.prepare_x509_locked().await?;
        }
        if matches!(x509, Step::Activate | Step::PrepareAndActivate) {
            self.activate_locked::<X509Kind>(None).await?;
        }
        let jwt = slot::step::<JwtKind>(&self.state.read(), now);
        if matches!(jwt, Step::Prepare | Step::PrepareAndActivate) {
            self.prepare_jwt_locked().await?;
        }
        if matches!(jwt, Step::Activate | Step::PrepareAndActivate) {
            self.activate_locked::<JwtKind>(None).await?;
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
                    match self.rotate_once().await {
                        Ok(()) => self.health.lock().last_error = None,
                        Err(e) => {
                            warn!(error = %e, "CA rotation check failed");
                            let mut h = self.health.lock();
                            h.errors_total = h.errors_total.saturating_add(1);
                            h.last_error = Some((self.clock.now(), e.to_string()));
                        }
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    async fn prepare_x509_locked(&self) -> Result<(), CaError> {
        let key_slot = {
            let mut s = self.state.write();
            let key_slot = slot::next_key_slot::<X509Kind>(&s);
            // The new key replaces the previous authority's in the key manager: it must not
            // sign again from here on (an HSM signs by slot), also if this prepare fails.
            slot::forget_previous_in::<X509Kind>(&mut s, key_slot);
            key_slot
        };
        let key = self.km.generate_key(key_slot, self.cfg.key_type).await?;
        let now = self.clock.now();
        let not_after = now.saturating_add(secs(self.cfg.ca_ttl));
        let params = ca_params(&self.td, now - BACKDATE_SECS, not_after, random_serial()?)?;
        let signer = KeySigner { key: key.clone(), alg: self.cfg.key_type.signature_algorithm() };
        // `chain`: our CA certificate first, the root it ends under last (one element when
        // self-signed). `roots`: what joins the bundle.
        let (chain, roots) = match &self.upstream {
            None => {
                let cert = tokio::task::spawn_blocking(move || params.self_signed(&signer).map(|c| c.der().to_vec()))
                    .await
                    .map_err(|_| CaError::TaskFailed)??;
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
                    .map_err(|_| CaError::TaskFailed)??;
                let minted = up.mint_x509_ca(&csr, self.cfg.ca_ttl).await?;
                let chain = upstream_chain(&minted, &spki_of(key.as_ref()))?;
                (chain, minted.roots)
            }
        };
        let cert = chain.first().ok_or(CaError::UpstreamAnswer(crate::error::UpstreamAnswerError::NoCertificate))?;
        let facts = cert_facts(cert)?;
        let entry = X509CaEntry {
            key_id: key_slot.to_owned(),
            authority_id: facts.subject_key_id.clone().unwrap_or_else(|| facts.serial.clone()),
            chain: chain.iter().map(|c| STANDARD.encode(c)).collect(),
            issued_at: now,
            not_after: facts.not_after.min(not_after),
            status: SlotStatus::Prepared,
            tainted: false,
        };
        let authority = Arc::new(X509Authority::new(entry.clone(), key, &chain)?);
        let new_items = roots.into_iter().map(BundleItem::Root).collect();
        self.install_prepared::<X509Kind>(authority, new_items).await?;
        self.audit_ca(&entry).await;
        info!(authority_id = %entry.authority_id, not_after = entry.not_after, "X.509 CA prepared");
        Ok(())
    }

    async fn prepare_jwt_locked(&self) -> Result<(), CaError> {
        let key_slot = slot::next_key_slot::<JwtKind>(&self.state.read());
        let key = self.km.generate_key(key_slot, KeyType::EcP256).await?;
        let now = self.clock.now();
        let entry = JwtKeyEntry {
            key_id: key_slot.to_owned(),
            kid: random_kid()?,
            public_key: STANDARD.encode(spki_of(key.as_ref())),
            issued_at: now,
            not_after: now.saturating_add(secs(self.cfg.ca_ttl)),
            status: SlotStatus::Prepared,
        };
        let new_items = crate::authority::JournalEntry::bundle_items(&entry);
        let kid = entry.kid.clone();
        self.install_prepared::<JwtKind>(Arc::new(JwtSigner { entry, key }), new_items).await?;
        info!(kid = %kid, "JWT key prepared");
        Ok(())
    }

    /// Makes a new authority the prepared one. It is trusted everywhere before it signs
    /// anything: the bundle is written first, then the journal. A prepared authority it
    /// replaces never signed anything: its bundle items leave unless another authority (or
    /// the newcomer) still holds them.
    async fn install_prepared<K: AuthorityKind>(
        &self,
        authority: Arc<K::Authority>,
        new_items: Vec<BundleItem>,
    ) -> Result<(), CaError> {
        let change = slot::preparing_change::<K>(&self.state.read(), new_items);
        // Preparing always publishes a new bundle sequence, even when the items were there.
        self.update_bundle(|b| {
            change.apply(b);
            true
        })
        .await?;
        let journal = {
            let mut s = self.state.write();
            slot::install_prepared::<K>(&mut s, authority);
            s.journal.clone()
        };
        self.store.save_journal(&self.instance, &journal).await?;
        Ok(())
    }

    async fn activate_locked<K: AuthorityKind>(&self, expected: Option<&str>) -> Result<(), CaError> {
        let journal = {
            let mut s = self.state.write();
            slot::activate::<K>(&mut s, expected)?;
            s.journal.clone()
        };
        self.store.save_journal(&self.instance, &journal).await?;
        info!(kind = K::NAME, "Authority activated");
        Ok(())
    }

    /// Drops expired old authorities from the journal and the bundle.
    async fn prune_locked(&self, now: i64) -> Result<(), CaError> {
        let (x509, jwt, journal) = {
            let mut s = self.state.write();
            let x509 = slot::prune::<X509Kind>(&mut s, now);
            let jwt = slot::prune::<JwtKind>(&mut s, now);
            (x509, jwt, s.journal.clone())
        };
        if x509.1 == 0 && jwt.1 == 0 {
            return Ok(());
        }
        self.update_bundle(|b| x509.0.apply(b) | jwt.0.apply(b)).await?;
        self.store.save_journal(&self.instance, &journal).await?;
        info!(x509 = x509.0.remove.len(), jwt = jwt.0.remove.len(), "Expired authorities pruned");
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
        Err(CaError::BundleContention)
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
            at_ms: self.clock.now().saturating_mul(1000),
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
