//! Bundle publishing to Kubernetes (`[[bundle_publisher]]`): our X.509 roots written to
//! Istio's `istio-ca-root-cert` ConfigMap (key `root-cert.pem`) in every namespace or the
//! selected ones, and to any other named ConfigMaps, whenever the bundle changes and on a
//! resync period (which also covers namespaces created since). One replica writes at a time:
//! the holder of a `coordination.k8s.io` Lease; writes are idempotent server-side applies, so
//! a replica that loses the lease mid-write changes nothing it should not.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tessera_k8s::lease::LeaderElector;
use tessera_k8s::publish::{apply_configmap, target_namespaces};
use tokio::sync::watch;
use tracing::{info, warn};

use tessera_ca::Ca;
use tessera_svc::config::ConfigError;

/// Istio's root certificate ConfigMap and key.
pub const ISTIO_ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// The key istio-agent reads.
pub const ISTIO_ROOT_KEY: &str = "root-cert.pem";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPublisher {
    cluster: String,
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    istio_root_cert: bool,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    configmaps: Vec<RawConfigMap>,
    #[serde(default = "default_lease_ns")]
    lease_namespace: String,
    #[serde(default = "default_lease_name")]
    lease_name: String,
    #[serde(default = "default_lease_duration")]
    lease_duration: String,
    #[serde(default = "default_resync")]
    resync_interval: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfigMap {
    namespace: String,
    name: String,
    #[serde(default = "default_key")]
    key: String,
}

fn default_lease_ns() -> String {
    "tessera-system".into()
}
fn default_lease_name() -> String {
    "tessera-bundle-publisher".into()
}
fn default_lease_duration() -> String {
    "15s".into()
}
fn default_resync() -> String {
    "60s".into()
}
fn default_key() -> String {
    "bundle.crt".into()
}

/// One `[[bundle_publisher]]`.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// A name for logs.
    pub cluster: String,
    /// API server access; `None`: in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Keep `istio-ca-root-cert` in the namespaces.
    pub istio_root_cert: bool,
    /// Namespaces for `istio-ca-root-cert`; empty: all.
    pub namespaces: Vec<String>,
    /// Other ConfigMaps: `(namespace, name, key)`, holding the roots as PEM.
    pub configmaps: Vec<(String, String, String)>,
    /// The Lease that elects the writer.
    pub lease_namespace: String,
    /// Its name.
    pub lease_name: String,
    /// How long a leader holds the Lease without renewing it.
    pub lease_duration: Duration,
    /// How often everything is written again (new namespaces, drift).
    pub resync_interval: Duration,
}

impl RawPublisher {
    pub(crate) fn validate(self) -> Result<PublisherConfig, ConfigError> {
        let dur = |key: &'static str, s: &str| tessera_svc::config::duration(key, s, Duration::from_secs(1));
        if !self.istio_root_cert && self.configmaps.is_empty() {
            return Err(ConfigError::Invalid {
                key: "bundle_publisher",
                reason: format!("cluster {:?}: set istio_root_cert = true or list configmaps", self.cluster),
            });
        }
        Ok(PublisherConfig {
            cluster: self.cluster,
            kubeconfig: self.kubeconfig,
            istio_root_cert: self.istio_root_cert,
            namespaces: self.namespaces,
            configmaps: self.configmaps.into_iter().map(|c| (c.namespace, c.name, c.key)).collect(),
            lease_namespace: self.lease_namespace,
            lease_name: self.lease_name,
            lease_duration: dur("bundle_publisher.lease_duration", &self.lease_duration)?,
            resync_interval: dur("bundle_publisher.resync_interval", &self.resync_interval)?,
        })
    }
}

/// The name this replica holds the Lease under: host name and instance ID.
fn holder_identity(instance_id: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}/{instance_id}", host.trim())
}

/// Writes every ConfigMap, stopping once half the lease has passed since it was renewed: a
/// replica that may have lost the lease writes no more (the rest waits for the next renewal).
async fn publish_once(
    client: &kube::Client,
    cfg: &PublisherConfig,
    pem: &str,
    renewed: tokio::time::Instant,
) -> Result<usize, tessera_k8s::K8sError> {
    let in_time = || renewed.elapsed() < cfg.lease_duration / 2;
    let stop = || tessera_k8s::K8sError::Api("the lease may have expired; stopping until it is renewed".into());
    let mut written = 0;
    let mut targets: Vec<(String, &str, &str)> = Vec::new();
    if cfg.istio_root_cert {
        for ns in target_namespaces(client, &cfg.namespaces).await? {
            targets.push((ns, ISTIO_ROOT_CONFIGMAP, ISTIO_ROOT_KEY));
        }
    }
    for (ns, name, key) in &cfg.configmaps {
        targets.push((ns.clone(), name, key));
    }
    for (ns, name, key) in targets {
        if !in_time() {
            return Err(stop());
        }
        if apply_configmap(client, &ns, name, key, pem).await? {
            written += 1;
        }
    }
    Ok(written)
}

/// Runs one publisher until shutdown.
pub async fn run(cfg: PublisherConfig, instance_id: String, ca: Arc<Ca>, mut shutdown: watch::Receiver<bool>) {
    let client = loop {
        match tessera_k8s::connect(cfg.kubeconfig.as_deref()).await {
            Ok(c) => break c,
            Err(e) => {
                warn!(cluster = %cfg.cluster, error = %e, "Bundle publisher cannot reach the cluster; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    let secs = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let elector =
        LeaderElector::new(client.clone(), &cfg.lease_namespace, &cfg.lease_name, &holder_identity(&instance_id), secs);
    let mut bundle_rx = ca.subscribe_bundle();
    let mut renew = tokio::time::interval(cfg.lease_duration / 3);
    let mut leading = false;
    let mut last_full = None::<tokio::time::Instant>;
    let mut published = String::new();
    loop {
        tokio::select! {
            _ = renew.tick() => {}
            r = bundle_rx.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
        let renewed = tokio::time::Instant::now();
        match elector.try_acquire_or_renew().await {
            Ok(now) => {
                if now != leading {
                    info!(cluster = %cfg.cluster, leading = now, "Bundle publisher leadership changed");
                    published.clear();
                }
                leading = now;
            }
            Err(e) => {
                warn!(cluster = %cfg.cluster, error = %e, "Cannot renew the publisher Lease; not writing");
                leading = false;
            }
        }
        if !leading {
            continue;
        }
        let pem = ca.bundle().x509_pem();
        let due = last_full.is_none_or(|t| t.elapsed() >= cfg.resync_interval);
        if pem == published && !due {
            continue;
        }
        match publish_once(&client, &cfg, &pem, renewed).await {
            Ok(n) => {
                if n > 0 {
                    info!(cluster = %cfg.cluster, configmaps = n, "Published the trust bundle");
                }
                published = pem;
                last_full = Some(tokio::time::Instant::now());
            }
            Err(e) => warn!(cluster = %cfg.cluster, error = %e, "Cannot publish the trust bundle; will retry"),
        }
    }
}
