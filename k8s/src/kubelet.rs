//! The kubelet's pod list (`GET /pods` on the kubelet's port, 10250 with TLS and a token, or
//! the read-only port), and the selectors the Kubernetes workload attestor derives from a pod.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use crate::K8sError;

/// The largest pod list accepted (a node with hundreds of pods is a few MiB).
const MAX_PODS_BYTES: usize = 64 * 1024 * 1024;

/// Reads the pod list of one kubelet.
#[derive(Debug, Clone)]
pub struct KubeletClient {
    url: tessera_svc::http::Url,
    tls: Option<Arc<rustls::ClientConfig>>,
    token_path: Option<PathBuf>,
}

impl KubeletClient {
    /// `url` is the kubelet's base URL (`https://127.0.0.1:10250`); `tls` verifies it;
    /// `token_path` holds the bearer token, read at every call because projected tokens rotate.
    pub fn new(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        token_path: Option<PathBuf>,
    ) -> Result<Self, K8sError> {
        let url = tessera_svc::http::Url::parse(url).map_err(|e| K8sError::Config(format!("kubelet URL: {e}")))?;
        Ok(Self { url: url.with_path("/pods"), tls, token_path })
    }

    /// The pods on this node.
    pub async fn pods(&self) -> Result<Vec<Pod>, K8sError> {
        let token = match &self.token_path {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| K8sError::Config(format!("kubelet token {}: {e}", p.display())))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("authorization", a)]).unwrap_or_default();
        let req = tessera_svc::http::Request { method: "GET", url: &self.url, headers: &headers, body: Vec::new() };
        let (status, body) = tessera_svc::http::send(req, self.tls.clone(), MAX_PODS_BYTES, Duration::from_secs(10))
            .await
            .map_err(|e| K8sError::Api(format!("kubelet: {e}")))?;
        if status != 200 {
            return Err(K8sError::Api(format!("kubelet answered HTTP {status}")));
        }
        let list: k8s_openapi::List<Pod> =
            serde_json::from_slice(&body).map_err(|e| K8sError::Api(format!("kubelet pod list: {e}")))?;
        Ok(list.items)
    }
}

/// The `k8s` selector values of a pod (without the `k8s:` type): `ns:`, `sa:`, `pod-name:`,
/// `pod-uid:`, `node-name:`, `pod-label:K:V` for every label, and `container-name:` and
/// `container-image:` when `container_id` names one of its containers.
pub fn pod_selectors(pod: &Pod, container_id: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    let meta = &pod.metadata;
    if let Some(ns) = &meta.namespace {
        out.push(format!("ns:{ns}"));
    }
    if let Some(name) = &meta.name {
        out.push(format!("pod-name:{name}"));
    }
    if let Some(uid) = &meta.uid {
        out.push(format!("pod-uid:{uid}"));
    }
    if let Some(spec) = &pod.spec {
        out.push(format!("sa:{}", spec.service_account_name.as_deref().unwrap_or("default")));
        if let Some(node) = &spec.node_name {
            out.push(format!("node-name:{node}"));
        }
    }
    for (k, v) in meta.labels.iter().flatten() {
        out.push(format!("pod-label:{k}:{v}"));
    }
    if let (Some(cid), Some(status)) = (container_id, &pod.status) {
        let all = status.container_statuses.iter().flatten().chain(status.init_container_statuses.iter().flatten());
        for c in all {
            let runtime_id = c.container_id.as_deref().and_then(|s| s.split_once("://")).map(|(_, id)| id);
            if runtime_id == Some(cid) {
                out.push(format!("container-name:{}", c.name));
                out.push(format!("container-image:{}", c.image));
            }
        }
    }
    out
}

/// True when the kubelet reports the container with runtime ID `container_id` of `pod` as
/// running (an app or init container). A process whose cgroup names a container that has
/// stopped, or that the pod does not list, is not that pod's workload.
pub fn container_is_running(pod: &Pod, container_id: &str) -> bool {
    let Some(status) = &pod.status else { return false };
    let all = status.container_statuses.iter().flatten().chain(status.init_container_statuses.iter().flatten());
    all.filter(|c| c.container_id.as_deref().and_then(|s| s.split_once("://")).map(|(_, id)| id) == Some(container_id))
        .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

/// Finds the pod with `uid` in `pods`.
pub fn find_pod<'a>(pods: &'a [Pod], uid: &str) -> Option<&'a Pod> {
    pods.iter().find(|p| p.metadata.uid.as_deref() == Some(uid))
}
