//! Connecting to a cluster's API server: from a kubeconfig file, or in-cluster (the pod's
//! service account token and CA under `/var/run/secrets/kubernetes.io/serviceaccount`).

use std::path::Path;

use crate::K8sError;

/// A named cluster and its API client.
#[derive(Clone)]
pub struct ClusterClient {
    /// The cluster's name (Istio's cluster ID).
    pub name: String,
    /// The API client.
    pub client: kube::Client,
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Builds a client from `kubeconfig` (its current context), or from the in-cluster
/// environment when `None`.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<kube::Client, K8sError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| K8sError::Config(format!("kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| K8sError::Config(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::incluster().map_err(|e| K8sError::Config(format!("in-cluster configuration: {e}")))?,
    };
    kube::Client::try_from(config).map_err(|e| K8sError::Config(e.to_string()))
}
