//! The `k8s` workload attestor: the caller's pid → its pod UID and container ID (from
//! `/proc/<pid>/cgroup`, anchored at the kubelet's cgroup root) → the pod in the kubelet's pod
//! list, with that container running → selectors `k8s:ns:`, `k8s:sa:`, `k8s:pod-name:`,
//! `k8s:pod-uid:`, `k8s:pod-label:K:V`, `k8s:container-name:`, `k8s:container-image:`,
//! `k8s:node-name:`.
//!
//! A pod that has just started may not be in the kubelet's list yet: the lookup is repeated
//! (`max_poll_attempts` × `poll_retry_interval`), then given up with one warning. A process
//! outside any pod, or whose cgroup is not where the kubelet puts pods, gets no `k8s`
//! selectors. The pod list is fetched at most once a second and shared by concurrent callers
//! (a node's list can be megabytes); a caller that did not find its pod waits for a list
//! fetched after it looked.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use tessera_identity::Selector;
use tessera_k8s::cgroup::NotAPod;
use tessera_k8s::kubelet::{KubeletClient, container_is_running, find_pod, pod_selectors};
use tracing::{debug, warn};

use crate::attestor::{AttestError, PeerCred, WorkloadAttestor};
use crate::config::K8sAttestorSettings;

/// Where a pod's service account CA lives, the default root for the kubelet.
const CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// A pod list younger than this is reused.
const POD_LIST_MAX_AGE: Duration = Duration::from_secs(1);

/// The kubelet's pod list, fetched at most once per [`POD_LIST_MAX_AGE`] and by one caller
/// at a time.
#[derive(Debug, Default)]
struct PodList {
    last: tokio::sync::Mutex<Option<(Instant, Arc<Vec<Pod>>)>>,
}

impl PodList {
    /// A list fetched after `not_before` (when given) and less than a second old.
    async fn get(&self, kubelet: &KubeletClient, not_before: Option<Instant>) -> Result<Arc<Vec<Pod>>, String> {
        let mut last = self.last.lock().await;
        if let Some((at, pods)) = last.as_ref()
            && at.elapsed() < POD_LIST_MAX_AGE
            && not_before.is_none_or(|t| *at >= t)
        {
            return Ok(pods.clone());
        }
        let started = Instant::now();
        let pods = Arc::new(kubelet.pods().await.map_err(|e| e.to_string())?);
        *last = Some((started, pods.clone()));
        Ok(pods)
    }
}

/// The `k8s` attestor.
#[derive(Debug)]
pub struct K8sAttestor {
    kubelet: KubeletClient,
    settings: K8sAttestorSettings,
    proc_root: PathBuf,
    pods: PodList,
    warned_relative: std::sync::atomic::AtomicBool,
}

impl K8sAttestor {
    /// Builds the kubelet client (TLS roots read now).
    pub fn new(settings: K8sAttestorSettings) -> Result<Self, String> {
        let tls = if !settings.kubelet_url.starts_with("https://") {
            None
        } else if settings.skip_kubelet_verification {
            let provider = tessera_identity::tls::provider();
            let verifier = Arc::new(tessera_identity::tls::danger::AcceptAnyServer::new(&provider));
            let cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            Some(Arc::new(cfg))
        } else {
            let ca = settings.kubelet_ca_path.clone().unwrap_or_else(|| CLUSTER_CA.into());
            let pem = std::fs::read(&ca).map_err(|e| format!("kubelet CA {}: {e}", ca.display()))?;
            let cfg = tessera_identity::tls::web_client_config(&pem).map_err(|e| format!("kubelet CA: {e}"))?;
            Some(Arc::new(cfg))
        };
        let kubelet =
            KubeletClient::new(&settings.kubelet_url, tls, settings.token_path.clone()).map_err(|e| e.to_string())?;
        Ok(Self {
            kubelet,
            settings,
            proc_root: PathBuf::from("/proc"),
            pods: PodList::default(),
            warned_relative: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

#[async_trait]
impl WorkloadAttestor for K8sAttestor {
    fn name(&self) -> &'static str {
        "k8s"
    }

    async fn attest(&self, peer: PeerCred) -> Result<Vec<Selector>, AttestError> {
        let Some(pid) = peer.pid.filter(|p| *p > 0) else { return Ok(Vec::new()) };
        let place = tessera_k8s::cgroup::for_pid(
            &self.proc_root,
            pid.unsigned_abs(),
            &self.settings.cgroup_root,
            &self.settings.cgroupfs_path,
        )
        .map_err(|e| AttestError::Process { pid, reason: e.to_string() })?;
        let place = match place {
            Ok(p) => p,
            Err(NotAPod::RelativePaths) => {
                if !self.warned_relative.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    warn!(
                        pid,
                        cgroupfs = %self.settings.cgroupfs_path.display(),
                        "Cgroup paths are relative to the agent's cgroup namespace and the host's cgroup file system at cgroupfs_path does not confirm them: mount the host's /sys/fs/cgroup (read-only) and point cgroupfs_path at it, or run the agent in the host's cgroup namespace; callers get no k8s selectors"
                    );
                }
                return Ok(Vec::new());
            }
            Err(why) => {
                debug!(pid, ?why, root = %self.settings.cgroup_root, "Caller is not in a Kubernetes pod");
                return Ok(Vec::new());
            }
        };
        let Some(container_id) = place.container_id.clone() else {
            debug!(pid, pod_uid = %place.pod_uid, "Caller's cgroup names its pod but no container");
            return Ok(Vec::new());
        };
        let mut last_error = String::from("not in the kubelet's pod list");
        let mut not_before = None;
        for attempt in 1..=self.settings.max_poll_attempts {
            match self.pods.get(&self.kubelet, not_before).await {
                Ok(pods) => match find_pod(&pods, &place.pod_uid) {
                    Some(pod) if container_is_running(pod, &container_id) => {
                        let values = pod_selectors(pod, Some(container_id.as_str()));
                        return values
                            .iter()
                            .map(|v| Selector::new("k8s", v))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| AttestError::Process { pid, reason: e.to_string() });
                    }
                    Some(_) => last_error = format!("container {container_id} is not running in the pod"),
                    None => last_error = "not in the kubelet's pod list".into(),
                },
                Err(e) => last_error = e,
            }
            not_before = Some(Instant::now());
            if attempt < self.settings.max_poll_attempts {
                tokio::time::sleep(self.settings.poll_retry_interval).await;
            }
        }
        warn!(
            pid,
            pod_uid = %place.pod_uid,
            attempts = self.settings.max_poll_attempts,
            reason = %last_error,
            "Giving up on the caller's pod: it gets no k8s selectors"
        );
        Ok(Vec::new())
    }
}
