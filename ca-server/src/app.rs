//! Wiring: builds the catalog (key manager, store), the CA, and the listeners from a
//! [`Config`], and runs them until shutdown. Tests start a [`Server`] in-process on
//! `127.0.0.1:0` and a temp dir; `main.rs` does the same with the user's config.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_proto::admin::v1::admin_server::AdminServer;
use tessera_proto::agent::v1::agent_server::AgentServer;
use tessera_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::server::UdsConnectInfo;
use tracing::{Instrument, info, info_span};

use crate::api::Shared;
use crate::api::admin::AdminService;
use crate::api::agent::AgentService;
use crate::api::tls::{AgentTls, ServerIdentity, incoming};
use crate::catalog::Catalog;
use crate::changes::ChangeFeed;
use crate::config::{Config, ServingProfile, StoreKind};
use crate::federation::Federation;
use crate::federation::endpoint::{self, FileCert};
use crate::health::Health;
use crate::istio::IstioCa;
use crate::metrics::Metrics;
use tessera_ca::{Ca, CaDeps, Clock, Issuance, SystemClock};
use tessera_store::Store;
use tessera_store::postgres::PostgresStore;
use tessera_store::sled::SledStore;
use tessera_svc::listener::ConnGate;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A file or socket problem.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The store cannot open.
    #[error(transparent)]
    Store(#[from] tessera_store::StoreError),
    /// The key manager failed.
    #[error(transparent)]
    KeyManager(#[from] tessera_plugins::KeyManagerError),
    /// The CA cannot start.
    #[error(transparent)]
    Ca(#[from] tessera_ca::CaError),
    /// The server cannot make its own TLS identity.
    #[error(transparent)]
    ServerTls(#[from] crate::api::tls::ServerTlsError),
    /// Federation cannot start (a bootstrap bundle, the bundle endpoint's certificate).
    #[error(transparent)]
    Federation(#[from] crate::federation::FederationError),
    /// A plugin cannot start.
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    /// A secret named in the config (PIN, token, connection string) cannot be read.
    #[error(transparent)]
    Secret(#[from] tessera_plugins::SecretError),
    /// The bundle endpoint's certificate or TLS settings are unusable.
    #[error("bundle endpoint: {0}")]
    BundleEndpoint(String),
    /// The Istio CA API cannot start (a cluster's kubeconfig or JWKS).
    #[error(transparent)]
    Istio(#[from] crate::istio::IstioStartError),
    /// Another server holds the admin socket.
    #[error("admin socket {0} is in use by another server")]
    SocketInUse(PathBuf),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// Where the Agent API listens.
    pub agent_api_addr: SocketAddr,
    /// Where health and metrics listen.
    pub health_addr: SocketAddr,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// Where the Istio CA API listens, when configured.
    pub istio_addr: Option<SocketAddr>,
    /// Where the SPIFFE bundle endpoint listens, when configured.
    pub bundle_endpoint_addr: Option<SocketAddr>,
    /// Where the web console listens, when configured.
    pub console_addr: Option<SocketAddr>,
    /// The keeper of federated bundles.
    pub federation: Arc<Federation>,
    /// The CA.
    pub ca: Arc<Ca>,
    /// The store.
    pub store: Arc<dyn Store>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

async fn bind_admin_socket(path: &Path) -> Result<(UnixListener, u32), StartError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        tessera_plugins::fsutil::ensure_private_dir(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(StartError::SocketInUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io(format!("cannot remove stale socket {}", path.display())))?;
    }
    let listener = UnixListener::bind(path).map_err(io(format!("cannot bind admin socket {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io("cannot chmod admin socket"))?;
    let owner = std::fs::metadata(path).map_err(io("cannot stat admin socket"))?.uid();
    Ok((listener, owner))
}

/// Refuses admin callers other than the socket's owner and root (defence in depth behind the
/// socket's 0600 mode).
fn admin_peer_check(owner: u32) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req| {
        let uid = req.extensions().get::<UdsConnectInfo>().and_then(|i| i.peer_cred).map(|c| c.uid());
        match uid {
            Some(u) if u == owner || u == 0 => Ok(req),
            _ => Err(tonic::Status::permission_denied("admin API is restricted to the server's user")),
        }
    }
}

/// The gRPC server settings every TCP listener shares: a deadline per call, HTTP/2 keepalive
/// pings (a peer that stops answering them is dropped), and the count of open streams per
/// connection that the idle timeout reads.
fn grpc_server() -> tonic::transport::Server<
    tower::layer::util::Stack<tessera_svc::listener::TrackStreamsLayer, tower::layer::util::Identity>,
> {
    tonic::transport::Server::builder()
        .timeout(std::time::Duration::from_secs(30))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .layer(tessera_svc::listener::TrackStreamsLayer(crate::api::tls::activity_of))
}

impl Server {
    /// Opens the store, starts the CA and binds every listener.
    pub async fn start(cfg: Config) -> Result<Self, StartError> {
        Self::start_with_clock(cfg, Arc::new(SystemClock)).await
    }

    /// The same with the CA reading `clock` (its rotation schedule, certificate times), so a
    /// test drives rotation and expiry without waiting for them.
    pub async fn start_with_clock(cfg: Config, clock: Arc<dyn Clock>) -> Result<Self, StartError> {
        let cfg = Arc::new(cfg);
        tessera_plugins::fsutil::ensure_private_dir(&cfg.data_dir)
            .map_err(io(format!("cannot create data_dir {}", cfg.data_dir.display())))?;
        let store: Arc<dyn Store> = match &cfg.store {
            StoreKind::Sled => Arc::new(SledStore::open(&cfg.data_dir.join("store"))?),
            StoreKind::Postgres { connection_string, max_connections, tls_ca_file } => {
                let ca = match tls_ca_file {
                    Some(f) => {
                        Some(std::fs::read(f).map_err(io(format!("cannot read store.tls_ca_file {}", f.display())))?)
                    }
                    None => None,
                };
                Arc::new(
                    PostgresStore::open_with_tls(connection_string.expose(), *max_connections, ca.as_deref()).await?,
                )
            }
        };
        let catalog = Catalog::build(&cfg).await?;
        let ca = Ca::start(CaDeps {
            trust_domain: cfg.trust_domain.clone(),
            config: cfg.ca.clone(),
            instance: cfg.instance_id.clone(),
            key_manager: catalog.key_manager.clone(),
            upstream: catalog.upstream.clone(),
            store: store.clone(),
            clock,
        })
        .await?;
        let metrics = Arc::new(Metrics::default());
        let changes = ChangeFeed::default();
        let shared = Shared {
            issuance: Issuance::new(ca.clone(), metrics.issuance.clone()),
            metrics: metrics.clone(),
            changes: changes.clone(),
            activity: Arc::new(crate::api::AgentActivity::new(tessera_identity::unix_now())),
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(
            changes
                .clone()
                .run(store.clone(), ca.subscribe_bundle(), std::time::Duration::from_secs(1), shutdown_rx.clone())
                .instrument(info_span!("change_feed")),
        );

        tasks.spawn(
            ca.clone()
                .run_rotation(cfg.rotation_check_interval, shutdown_rx.clone())
                .instrument(info_span!("ca_rotation")),
        );
        if let Some(ext) = catalog.external.clone() {
            let rx = shutdown_rx.clone();
            tasks.spawn(async move { ext.supervise(rx).await }.instrument(info_span!("upstream_plugin")));
        }

        // Agent API: TCP + rustls, then tonic.
        let server_svid_ttl = cfg.agent_svid_ttl.min(cfg.ca.default_x509_svid_ttl);
        let dns_names = cfg.istio.as_ref().map(|i| i.dns_names.clone()).unwrap_or_default();
        let tls = AgentTls::new(&ca, server_svid_ttl, dns_names)?;
        tasks.spawn(
            tls.clone()
                .run_rotation(ca.clone(), server_svid_ttl, shutdown_rx.clone())
                .instrument(info_span!("server_svid")),
        );
        let listener = TcpListener::bind(cfg.agent_api_address)
            .await
            .map_err(io(format!("cannot bind Agent API on {}", cfg.agent_api_address)))?;
        let agent_api_addr = listener.local_addr().map_err(io("agent api address"))?;
        let agent = AgentServer::new(AgentService::new(shared.clone(), cfg.clone(), catalog.node_attestors.clone()))
            .max_decoding_message_size(cfg.max_message_bytes)
            .max_encoding_message_size(16 * 1024 * 1024);
        let mut rx = shutdown_rx.clone();
        let gate = |name: &'static str| ConnGate::new(cfg.connections, metrics.listener(name));
        let agents = Some((cfg.trust_domain.clone(), store.clone()));
        let incoming_tls = incoming(listener, tls.clone(), 1024, gate("agent_api"), agents);
        tasks.spawn(
            async move {
                let res = grpc_server()
                    .add_service(agent)
                    .serve_with_incoming_shutdown(incoming_tls, async move {
                        let _ = rx.changed().await;
                    })
                    .await;
                if let Err(e) = res {
                    tracing::error!(error = %e, "Agent API stopped");
                }
            }
            .instrument(info_span!("agent_api")),
        );

        // Istio's CA API: the same TLS (server SVID with the istio DNS names, optional client
        // certificates checked against our bundle), its own listener.
        let istio_addr = match &cfg.istio {
            None => None,
            Some(ic) => {
                let svc = IstioCa::new(shared.clone(), ic.clone(), cfg.rate_limit_svids_per_second).await?;
                let l = TcpListener::bind(ic.address)
                    .await
                    .map_err(io(format!("cannot bind the Istio CA API on {}", ic.address)))?;
                let a = l.local_addr().map_err(io("Istio CA API address"))?;
                let server = IstioCertificateServiceServer::new(svc).max_decoding_message_size(64 * 1024);
                let incoming_tls = incoming(l, tls.clone(), 1024, gate("istio_ca"), None);
                let mut rx = shutdown_rx.clone();
                tasks.spawn(
                    async move {
                        let res = grpc_server()
                            .add_service(server)
                            .serve_with_incoming_shutdown(incoming_tls, async move {
                                let _ = rx.changed().await;
                            })
                            .await;
                        if let Err(e) = res {
                            tracing::error!(error = %e, "Istio CA API stopped");
                        }
                    }
                    .instrument(info_span!("istio_ca")),
                );
                info!(address = %a, "Istio CA API listening");
                Some(a)
            }
        };

        // Kubernetes ConfigMaps holding our roots (istio-ca-root-cert), one writer per Lease.
        for p in &cfg.bundle_publishers {
            tasks.spawn(
                crate::publish::run(p.clone(), cfg.instance_id.clone(), ca.clone(), shutdown_rx.clone())
                    .instrument(info_span!("bundle_publisher", cluster = %p.cluster)),
            );
        }

        // Federation: peers' bundles on their schedule, and our bundle endpoint.
        let federation = Arc::new(Federation::new(cfg.trust_domain.clone(), store.clone(), changes.clone()));
        federation.apply_config(&cfg.federation.trust_domains).await?;
        tasks.spawn(federation.clone().run(shutdown_rx.clone()).instrument(info_span!("federation")));
        let bundle_endpoint_addr = match &cfg.federation.bundle_endpoint {
            None => None,
            Some(ep) => {
                let resolver: Arc<dyn rustls::server::ResolvesServerCert> = match &ep.profile {
                    ServingProfile::HttpsSpiffe => {
                        let id = ServerIdentity::bundle_endpoint(&ca, server_svid_ttl)?;
                        tasks.spawn(
                            id.clone()
                                .run_refresh(ca.clone(), server_svid_ttl, shutdown_rx.clone())
                                .instrument(info_span!("bundle_endpoint_svid")),
                        );
                        id
                    }
                    ServingProfile::HttpsWeb { cert_file, key_file } => Arc::new(
                        FileCert::load(cert_file.clone(), key_file.clone()).map_err(StartError::BundleEndpoint)?,
                    ),
                };
                let tls_cfg = endpoint::tls_config(resolver).map_err(StartError::BundleEndpoint)?;
                let l = TcpListener::bind(ep.address)
                    .await
                    .map_err(io(format!("cannot bind bundle endpoint on {}", ep.address)))?;
                let a = l.local_addr().map_err(io("bundle endpoint address"))?;
                tasks.spawn(
                    endpoint::serve(
                        l,
                        tls_cfg,
                        ca.clone(),
                        ep.refresh_hint,
                        gate("bundle_endpoint"),
                        shutdown_rx.clone(),
                    )
                    .instrument(info_span!("bundle_endpoint")),
                );
                info!(address = %a, "Bundle endpoint listening");
                Some(a)
            }
        };

        let diagnostics = Arc::new(crate::doctor::Diagnostics {
            ca: ca.clone(),
            store: store.clone(),
            federation: federation.clone(),
            activity: shared.activity.clone(),
            identity: tls.identity(),
            cfg: cfg.doctor,
            instance_id: cfg.instance_id.clone(),
            started: std::time::Instant::now(),
        });
        // The read-only web console, when configured.
        let console_addr = match &cfg.console {
            None => None,
            Some(c) => {
                let l = TcpListener::bind(c.address)
                    .await
                    .map_err(io(format!("cannot bind the console on {}", c.address)))?;
                let a = l.local_addr().map_err(io("console address"))?;
                let c = crate::console::ConsoleConfig { address: a, ..c.clone() };
                tasks.spawn(
                    crate::console::serve(l, c, diagnostics.clone(), shutdown_rx.clone())
                        .instrument(info_span!("console")),
                );
                Some(a)
            }
        };
        // Admin API: local Unix socket only.
        let (uds, owner) = bind_admin_socket(&cfg.admin_socket).await?;
        let admin = tonic::service::interceptor::InterceptedService::new(
            AdminServer::new(AdminService::new(shared.clone(), cfg.clone(), federation.clone(), diagnostics.clone()))
                .max_decoding_message_size(4 * 1024 * 1024),
            admin_peer_check(owner),
        );
        let mut rx = shutdown_rx.clone();
        tasks.spawn(
            async move {
                let res = tonic::transport::Server::builder()
                    .add_service(admin)
                    .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(uds), async move {
                        let _ = rx.changed().await;
                    })
                    .await;
                if let Err(e) = res {
                    tracing::error!(error = %e, "Admin API stopped");
                }
            }
            .instrument(info_span!("admin_api")),
        );

        // Health and metrics.
        let hl = TcpListener::bind(cfg.health_address)
            .await
            .map_err(io(format!("cannot bind health listener on {}", cfg.health_address)))?;
        let health_addr = hl.local_addr().map_err(io("health address"))?;
        // Probes and scrapers: a small share per address (loopback has a reserve).
        let health_limits = tessera_svc::listener::ConnLimits {
            max_anonymous_per_ip: cfg.connections.max_anonymous_per_ip.min(16),
            ..cfg.connections
        };
        let health_gate = ConnGate::new(health_limits, metrics.listener("health"));
        let health = Health { ca: ca.clone(), store: store.clone(), metrics, diagnostics, changes: changes.clone() };
        tasks.spawn(
            tessera_svc::health::serve(hl, Arc::new(health), health_gate, shutdown_rx).instrument(info_span!("health")),
        );

        info!(trust_domain = %cfg.trust_domain, agent_api = %agent_api_addr, health = %health_addr, admin_socket = %cfg.admin_socket.display(), "Server started");
        Ok(Self {
            agent_api_addr,
            health_addr,
            admin_socket: cfg.admin_socket.clone(),
            istio_addr,
            bundle_endpoint_addr,
            console_addr,
            federation,
            ca,
            store,
            shutdown,
            tasks,
        })
    }

    /// Stops every listener and task and removes the admin socket.
    /// Open connections get 5 s to drain, then are cut.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        tessera_svc::drain(&mut self.tasks, std::time::Duration::from_secs(5)).await;
        let _ = std::fs::remove_file(&self.admin_socket);
        info!("Server stopped");
    }
}
