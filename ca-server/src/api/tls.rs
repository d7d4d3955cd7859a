//! TLS for the Agent API, terminated with tokio-rustls so the server can present a rotating
//! SVID and verify clients against a rotating bundle (tonic's own TLS can do neither).
//!
//! The server presents its own X509-SVID (`spiffe://<td>/tessera/server`), re-issued at half
//! life and whenever the CA changes. Clients may connect without a certificate (that is how an
//! agent attests); with one, it must chain to our current bundle. Which calls need which peer
//! is decided per RPC in `api::agent`.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use tessera_identity::{Bundle, SpiffeId, unix_now};
use tessera_svc::listener::{Activity, ConnGate, IdleIo, Share};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use tessera_ca::{Ca, CaError};

/// Why the server cannot make or renew its own TLS identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerTlsError {
    /// The CA cannot sign it.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// rustls refuses the key.
    #[error("server key: {0}")]
    Key(rustls::Error),
    /// The trust domain makes no server ID.
    #[error("server ID: {0}")]
    Id(#[from] tessera_identity::IdError),
}

/// Time allowed for a TLS handshake before the connection is dropped (slow-loris bound).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's own rotating TLS identity.
#[derive(Debug)]
pub struct ServerIdentity {
    current: RwLock<Option<Held>>,
    dns_names: Vec<String>,
    source: Source,
}

/// The SVID a [`ServerIdentity`] presents.
#[derive(Debug)]
struct Held {
    key: Arc<CertifiedKey>,
    /// Unix seconds.
    issued_at: i64,
    /// Unix seconds.
    not_after: i64,
    /// The ID of the authority that signed it (empty for [`Source::Active`]).
    signer: String,
}

/// Which authority signs a [`ServerIdentity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The active CA (the Agent API, the Istio CA API).
    Active,
    /// [`Ca::issue_endpoint_svid`]: the previous CA while it may still sign (the
    /// `https_spiffe` bundle endpoint, which peers that missed a rotation must still trust).
    BundleEndpoint,
}

impl ResolvesServerCert for ServerIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().as_ref().map(|h| h.key.clone())
    }
}

impl ServerIdentity {
    fn new(dns_names: Vec<String>) -> Self {
        Self { current: RwLock::new(None), dns_names, source: Source::Active }
    }

    /// The bundle endpoint's identity (`https_spiffe`), issued now: the server's SPIFFE ID,
    /// signed by the CA that was active before while it may still sign, so that a peer that
    /// was cut off through a whole rotation still authenticates the endpoint. Keep it fresh
    /// with [`ServerIdentity::run_refresh`].
    pub fn bundle_endpoint(ca: &Ca, ttl: Duration) -> Result<Arc<Self>, ServerTlsError> {
        let me = Arc::new(Self { current: RwLock::new(None), dns_names: Vec::new(), source: Source::BundleEndpoint });
        me.refresh(ca, &tessera_identity::server_id(ca.trust_domain())?, ttl)?;
        Ok(me)
    }

    /// Re-issues the SVID when due ([`ServerIdentity::refresh`]'s rules), until shutdown.
    pub async fn run_refresh(self: Arc<Self>, ca: Arc<Ca>, ttl: Duration, mut shutdown: watch::Receiver<bool>) {
        let Ok(id) = tessera_identity::server_id(ca.trust_domain()) else { return };
        let mut tick = tokio::time::interval((ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Off the reactor: a CA key in an HSM signs blocking.
                    let (me, ca, id) = (self.clone(), ca.clone(), id.clone());
                    match tokio::task::spawn_blocking(move || me.refresh(&ca, &id, ttl)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => warn!(error = %e, "Cannot renew the bundle endpoint's SVID"),
                        Err(e) => warn!(error = %e, "The bundle endpoint's SVID renewal failed"),
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    /// The current SVID's chain, DER, leaf first (empty before the first issue).
    pub fn chain(&self) -> Vec<Vec<u8>> {
        self.current.read().as_ref().map(|h| h.key.cert.iter().map(|c| c.to_vec()).collect()).unwrap_or_default()
    }

    /// Re-issues the server SVID when missing, past half life, or issued by another CA (for
    /// the bundle endpoint: by another than [`Ca::endpoint_authority_id`] names).
    fn refresh(&self, ca: &Ca, id: &SpiffeId, ttl: Duration) -> Result<bool, ServerTlsError> {
        let ca_not_after = ca.active_x509_not_after().unwrap_or(0);
        let now = unix_now();
        let tainted = ca.tainted_authority_ids();
        let wanted = match self.source {
            Source::Active => None,
            Source::BundleEndpoint => ca.endpoint_authority_id(ttl),
        };
        if let Some(h) = self.current.read().as_ref()
            && now < h.issued_at + (h.not_after - h.issued_at) / 2
            && h.not_after <= ca_not_after
            && !issued_by_any(&h.key, &tainted)
            && wanted.is_none_or(|w| w == h.signer)
        {
            return Ok(false);
        }
        let (svid, key, signer) = match self.source {
            Source::Active => {
                let (svid, key) = ca.issue_own_svid(id, &self.dns_names, ttl)?;
                (svid, key, String::new())
            }
            Source::BundleEndpoint => ca.issue_endpoint_svid(id, ttl)?,
        };
        let chain: Vec<CertificateDer<'static>> = svid.chain.iter().map(|c| CertificateDer::from(c.clone())).collect();
        let signing_key =
            rustls::crypto::ring::sign::any_supported_type(&key.to_rustls()).map_err(ServerTlsError::Key)?;
        let ck = Arc::new(CertifiedKey::new(chain, signing_key));
        {
            let mut cur = self.current.write();
            *cur = Some(Held { key: ck, issued_at: now, not_after: svid.not_after, signer });
        }
        info!(serial = %svid.serial, not_after = svid.not_after, "Server SVID issued");
        Ok(true)
    }
}

/// True when the leaf of `ck` was signed by one of the authorities in `ids` (by AKI).
fn issued_by_any(ck: &CertifiedKey, ids: &[String]) -> bool {
    !ids.is_empty()
        && ck
            .cert
            .first()
            .and_then(|c| tessera_identity::x509::cert_facts(c).ok())
            .and_then(|f| f.authority_key_id)
            .is_some_and(|aki| ids.contains(&aki))
}

/// The Agent API's TLS configuration, rebuilt when the bundle changes.
#[derive(Debug)]
pub struct AgentTls {
    identity: Arc<ServerIdentity>,
    config: RwLock<Option<Arc<rustls::ServerConfig>>>,
}

fn server_config(bundle: &Bundle, identity: Arc<ServerIdentity>) -> Result<Arc<rustls::ServerConfig>, String> {
    tls13_config(bundle, identity, false, b"h2")
}

/// A TLS 1.3 server configuration presenting the server's SVID, verifying client certificates
/// against `bundle` (required when `client_required`, else optional), offering `alpn`.
pub(crate) fn tls13_config(
    bundle: &Bundle,
    identity: Arc<ServerIdentity>,
    client_required: bool,
    alpn: &[u8],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = tessera_identity::tls::provider();
    let mut roots = RootCertStore::empty();
    for c in &bundle.x509_authorities {
        roots.add(c.clone()).map_err(|e| e.to_string())?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if client_required { builder } else { builder.allow_unauthenticated() };
    let verifier = builder.build().map_err(|e| e.to_string())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

impl AgentTls {
    /// Issues the first server SVID (with `dns_names` as DNS SANs, for clients that check a
    /// host name, such as istio-agent) and builds the first configuration.
    pub fn new(ca: &Ca, ttl: Duration, dns_names: Vec<String>) -> Result<Arc<Self>, ServerTlsError> {
        let identity = Arc::new(ServerIdentity::new(dns_names));
        let id = tessera_identity::server_id(ca.trust_domain())?;
        identity.refresh(ca, &id, ttl)?;
        let tls = Arc::new(Self { identity, config: RwLock::new(None) });
        tls.rebuild(&ca.bundle());
        Ok(tls)
    }

    fn rebuild(&self, bundle: &Bundle) {
        match server_config(bundle, self.identity.clone()) {
            Ok(cfg) => {
                let mut c = self.config.write();
                *c = Some(cfg);
            }
            Err(e) => warn!(error = %e, "Cannot build Agent API TLS configuration; keeping the previous one"),
        }
    }

    /// The server's rotating SVID, for other listeners that present it (the bundle endpoint's
    /// `https_spiffe` profile).
    pub fn identity(&self) -> Arc<ServerIdentity> {
        self.identity.clone()
    }

    fn acceptor(&self) -> Option<TlsAcceptor> {
        self.config.read().clone().map(TlsAcceptor::from)
    }

    /// Keeps the server SVID fresh and the client roots equal to the bundle.
    pub async fn run_rotation(self: Arc<Self>, ca: Arc<Ca>, ttl: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut bundle_rx = ca.subscribe_bundle();
        let Ok(id) = tessera_identity::server_id(ca.trust_domain()) else { return };
        // Often enough that a short-lived server SVID is renewed well before it expires.
        let mut tick = tokio::time::interval((ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.identity.refresh(&ca, &id, ttl) {
                        warn!(error = %e, "Cannot renew the server SVID");
                    }
                }
                r = bundle_rx.changed() => {
                    if r.is_err() { break; }
                    let b = bundle_rx.borrow_and_update().clone();
                    self.rebuild(&b);
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}

/// The peer of an Agent API connection, available to handlers as a request extension: its
/// certificates, its IP address, and the connection's activity (open streams, for the idle
/// timeout).
#[derive(Debug, Clone)]
pub struct PeerCerts(
    pub Option<Arc<Vec<CertificateDer<'static>>>>,
    pub Option<std::net::IpAddr>,
    pub Option<Arc<Activity>>,
);

/// The connection's [`Activity`], for [`tessera_svc::listener::TrackStreamsLayer`].
pub fn activity_of(ext: &tonic::codegen::http::Extensions) -> Option<Arc<Activity>> {
    ext.get::<PeerCerts>().and_then(|p| p.2.clone())
}

/// An accepted Agent API connection: TLS over TCP, exposing the client's certificates, closed
/// after it has had no open stream for the idle timeout.
#[derive(Debug)]
pub struct AgentConn(IdleIo<TlsStream<TcpStream>>);

impl tonic::transport::server::Connected for AgentConn {
    type ConnectInfo = PeerCerts;
    fn connect_info(&self) -> PeerCerts {
        let tls = self.0.get_ref();
        PeerCerts(
            tls.get_ref().1.peer_certificates().map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())),
            tls.get_ref().0.peer_addr().ok().map(|a| a.ip()),
            Some(self.0.activity()),
        )
    }
}

impl tokio::io::AsyncRead for AgentConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for AgentConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The agent a TLS peer is, when it presents an SVID that is the current (or previous) one of
/// an attested, unbanned agent of `td`.
async fn current_agent(
    stream: &TlsStream<TcpStream>,
    td: &tessera_identity::TrustDomain,
    store: &dyn tessera_store::Store,
) -> Option<SpiffeId> {
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    let facts = tessera_identity::x509::cert_facts(leaf).ok()?;
    let id = facts.spiffe_id().filter(|id| tessera_identity::ids::is_agent_id(id, td))?;
    let rec = store.get_agent(&id).await.ok()??;
    (!rec.banned && (facts.serial == rec.serial || facts.serial == rec.previous_serial)).then_some(id)
}

/// Accepts TCP connections within `gate`'s bounds, completes TLS handshakes (bounded in time
/// and in number at once), and yields the TLS streams for tonic's `serve_with_incoming`. A
/// connection over the cap, or over its address's share (counted from accept, so one address
/// cannot hold the handshakes in flight), is closed at once. Once the handshake is done, a
/// peer presenting the current SVID of an attested, unbanned agent of `agents` moves from its
/// address's share to one of its own (`server.max_connections_per_agent`): many agents may sit
/// behind one address, and each holds one connection. No other certificate does (a workload
/// SVID proves nothing about how many connections its holder should have).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<AgentTls>,
    max_pending_handshakes: usize,
    gate: ConnGate,
    agents: Option<(tessera_identity::TrustDomain, Arc<dyn tessera_store::Store>)>,
) -> tokio_stream::wrappers::ReceiverStream<Result<AgentConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(max_pending_handshakes));
    tokio::spawn(async move {
        loop {
            let (tcp, peer): (TcpStream, SocketAddr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "Agent API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(mut slot) = gate.admit(Some(Share::Ip(peer.ip()))) else {
                debug!(%peer, "At the connection limit or this address's share; closing the new connection");
                continue;
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                debug!(%peer, "Too many TLS handshakes in flight; dropping connection");
                continue;
            };
            let Some(acceptor) = tls.acceptor() else { continue };
            if tx.is_closed() {
                break;
            }
            let (tx, gate, agents) = (tx.clone(), gate.clone(), agents.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        // The permit bounds handshakes in flight; tonic owns the stream now.
                        drop(permit);
                        if let Some((td, store)) = &agents
                            && let Some(agent) = current_agent(&stream, td, store.as_ref()).await
                            && !gate.move_to(&mut slot, Share::Name(agent.to_string()), gate.limits().max_per_peer)
                        {
                            debug!(%peer, "Too many connections for this agent");
                            return;
                        }
                        let idle = gate.limits().idle_timeout;
                        let _ = tx.send(Ok(AgentConn(IdleIo::streams(stream, idle, Some(slot))))).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
