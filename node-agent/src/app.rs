//! Wiring: the manager, the socket (Workload API + SDS), cert files and health, run until
//! shutdown. Tests start an [`Agent`] in-process; `main.rs` does the same from a config file.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use tessera_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, info, info_span, warn};

use crate::attestor::{UnixAttestor, WorkloadAttestor};
use crate::callers::Callers;
use crate::config::{Config, WorkloadAttestorKind};
use crate::k8s_attestor::K8sAttestor;
use crate::manager::{AgentError, Manager};
use crate::sds::Sds;
use crate::sds_server::SdsServer;
use crate::workload_api::WorkloadApi;

/// Errors starting the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Attestation or state.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Socket or listener.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A workload attestor cannot start (the kubelet's CA).
    #[error("workload attestor {0}")]
    Attestor(String),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The SVID manager.
    pub manager: Arc<Manager>,
    /// The Workload API + SDS socket.
    pub socket_path: PathBuf,
    /// Health listener address.
    pub health_addr: std::net::SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Agent {
    /// Attests (or loads its SVID), syncs once, and starts serving.
    pub async fn start(cfg: Config) -> Result<Self, StartError> {
        let cfg = Arc::new(cfg);
        let manager = Manager::start(cfg.clone()).await?;
        if let Err(e) = manager.sync_once().await {
            warn!(error = %e, "First sync failed; serving what is cached and retrying");
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(manager.clone().run(shutdown_rx.clone()).instrument(info_span!("svid_manager")));
        tasks.spawn(manager.clone().watch_changes(shutdown_rx.clone()).instrument(info_span!("change_notices")));

        let io = |what: String| move |source| StartError::Io { what, source };
        if let Some(dir) = cfg.socket_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        }
        if cfg.socket_path.exists() {
            if tokio::net::UnixStream::connect(&cfg.socket_path).await.is_ok() {
                return Err(StartError::Io {
                    what: format!("socket {} is in use by another agent", cfg.socket_path.display()),
                    source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
                });
            }
            std::fs::remove_file(&cfg.socket_path)
                .map_err(io(format!("cannot remove stale socket {}", cfg.socket_path.display())))?;
        }
        let uds =
            UnixListener::bind(&cfg.socket_path).map_err(io(format!("cannot bind {}", cfg.socket_path.display())))?;
        // Any local process may connect; attestation decides what it gets.
        std::fs::set_permissions(&cfg.socket_path, std::fs::Permissions::from_mode(0o777))
            .map_err(io("cannot chmod the socket".into()))?;
        let mut attestors: Vec<Arc<dyn WorkloadAttestor>> = Vec::new();
        for a in &cfg.workload_attestors {
            attestors.push(match a {
                WorkloadAttestorKind::Unix => {
                    let snaps = manager.clone();
                    Arc::new(UnixAttestor::default().hashing_when(Arc::new(move || snaps.snapshot().wants_exe_hash)))
                }
                WorkloadAttestorKind::K8s(s) => {
                    Arc::new(K8sAttestor::new(s.clone()).map_err(|e| StartError::Attestor(format!("k8s: {e}")))?)
                }
            });
        }
        let callers = Callers::new(attestors);
        let workload = SpiffeWorkloadApiServer::new(WorkloadApi::new(manager.clone(), callers.clone()))
            .max_decoding_message_size(64 * 1024);
        let sds = SdsServer::new(Sds::new(manager.clone(), callers), 1024 * 1024);
        let mut rx = shutdown_rx.clone();
        let incoming = crate::socket::incoming(uds, crate::socket::gate(manager.metrics.socket_connections.clone()));
        tasks.spawn(
            async move {
                let res = tonic::transport::Server::builder()
                    .layer(tessera_svc::listener::TrackStreamsLayer(crate::socket::activity_of))
                    .add_service(workload)
                    .add_service(sds)
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = rx.changed().await;
                    })
                    .await;
                if let Err(e) = res {
                    tracing::error!(error = %e, "Agent socket stopped");
                }
            }
            .instrument(info_span!("agent_socket")),
        );

        tasks.spawn(
            crate::files::run(manager.clone(), cfg.cert_files.clone(), shutdown_rx.clone())
                .instrument(info_span!("cert_files")),
        );

        let (admin_l, owner) = crate::admin::bind(&cfg.admin_socket_path)
            .await
            .map_err(io(format!("cannot bind the admin socket {}", cfg.admin_socket_path.display())))?;
        tasks.spawn(
            crate::admin::serve(admin_l, cfg.admin_socket_path.clone(), manager.clone(), owner, shutdown_rx.clone())
                .instrument(info_span!("admin_socket")),
        );

        let hl = TcpListener::bind(cfg.health_address)
            .await
            .map_err(io(format!("cannot bind health listener on {}", cfg.health_address)))?;
        let health_addr = hl.local_addr().map_err(io("health address".into()))?;
        let probe = Arc::new(crate::health::AgentProbe(manager.clone()));
        // Probes and scrapers only: a small cap, a small share per address, idle connections
        // closed after 10 s (loopback, where the chart's probes come from, has a reserve).
        let limits = tessera_svc::listener::ConnLimits {
            max_connections: 256,
            idle_timeout: std::time::Duration::from_secs(10),
            max_anonymous_per_ip: 16,
            max_per_peer: 16,
        };
        let gate = tessera_svc::listener::ConnGate::new(limits, manager.metrics.health_connections.clone());
        tasks.spawn(tessera_svc::health::serve(hl, probe, gate, shutdown_rx).instrument(info_span!("health")));

        info!(agent_id = %tessera_identity::ids::LogId(&manager.agent_id()), socket = %cfg.socket_path.display(), health = %health_addr, "Agent started");
        Ok(Self { manager, socket_path: cfg.socket_path.clone(), health_addr, shutdown, tasks })
    }

    /// Stops everything and removes the socket.
    /// Open streams (Envoy keeps SDS streams open) get 5 s to drain, then are cut.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        tessera_svc::drain(&mut self.tasks, std::time::Duration::from_secs(5)).await;
        let _ = std::fs::remove_file(&self.socket_path);
        info!("Agent stopped");
    }
}
