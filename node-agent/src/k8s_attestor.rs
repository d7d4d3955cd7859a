//! The `k8s` workload attestor: the caller's pid → its pod UID and container ID (from
//! `/proc/<pid>/cgroup`) → the pod in the kubelet's pod list → selectors `k8s:ns:`, `k8s:sa:`,
//! `k8s:pod-name:`, `k8s:pod-uid:`, `k8s:pod-label:K:V`, `k8s:container-name:`,
//! `k8s:container-image:`, `k8s:node-name:`.
//!
//! A pod that has just started may not be in the kubelet's list yet: the lookup is repeated
//! (`max_poll_attempts` × `poll_retry_interval`), then given up with one warning. A process
//! outside any pod gets no `k8s` selectors.

use std::sync::Arc;

use async_trait::async_trait;
use tessera_identity::Selector;
use tessera_k8s::kubelet::{KubeletClient, find_pod, pod_selectors};
use tracing::{debug, warn};

use crate::attestor::{AttestError, PeerCred, WorkloadAttestor};
use crate::config::K8sAttestorSettings;

/// Where a pod's service account CA lives, the default root for the kubelet.
const CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// The `k8s` attestor.
#[derive(Debug)]
pub struct K8sAttestor {
    kubelet: KubeletClient,
    settings: K8sAttestorSettings,
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
        Ok(Self { kubelet, settings })
    }
}

#[async_trait]
impl WorkloadAttestor for K8sAttestor {
    fn name(&self) -> &'static str {
        "k8s"
    }

    async fn attest(&self, peer: PeerCred) -> Result<Vec<Selector>, AttestError> {
        let Some(pid) = peer.pid.filter(|p| *p > 0) else { return Ok(Vec::new()) };
        let place = tessera_k8s::cgroup::for_pid(pid.unsigned_abs())
            .map_err(|e| AttestError::Process { pid, reason: e.to_string() })?;
        let Some(place) = place else {
            debug!(pid, "Caller is not in a Kubernetes pod");
            return Ok(Vec::new());
        };
        let mut last_error = String::from("not in the kubelet's pod list");
        for attempt in 1..=self.settings.max_poll_attempts {
            match self.kubelet.pods().await {
                Ok(pods) => {
                    if let Some(pod) = find_pod(&pods, &place.pod_uid) {
                        let values = pod_selectors(pod, place.container_id.as_deref());
                        return values
                            .iter()
                            .map(|v| Selector::new("k8s", v))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| AttestError::Process { pid, reason: e.to_string() });
                    }
                    last_error = "not in the kubelet's pod list".into();
                }
                Err(e) => last_error = e.to_string(),
            }
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
