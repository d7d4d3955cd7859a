//! The `k8s_psat` node attestor: an agent proves its node with a projected service-account
//! token of its DaemonSet pod, checked by a TokenReview in the named cluster, and the pod and
//! node it names are looked up in that cluster's API. Optionally (`auto_pod_identity`) every
//! service account with a live pod on the agent's node gets its Istio-shaped identity without
//! a registration entry.
//!
//! What it is not: not the agent side (the agent reads its token in `tessera-agent`), and no
//! Kubernetes client code of its own: TokenReview, pod liveness and the payload format are in
//! `tessera-k8s`.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use async_trait::async_trait;
use tessera_identity::{Selector, SpiffeId, TrustDomain, agent_id};
use tessera_plugins::{AttestError, NodeAttestor};
use tessera_store::{AgentRecord, Entry, Store};
use tessera_svc::config::{ConfigError, invalid};

/// One cluster of the `k8s_psat` node attestor (`[[node_attestor]] clusters.<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsatCluster {
    /// The name agents send (and that appears in their IDs).
    pub name: String,
    /// API server access; `None`: in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Audiences the agent's token must carry.
    pub audience: Vec<String>,
    /// `(namespace, service account)` of the agent DaemonSet.
    pub service_account_allow_list: Vec<(String, String)>,
    /// Node labels that become selectors.
    pub allowed_node_label_keys: Vec<String>,
    /// Agent pod labels that become selectors.
    pub allowed_pod_label_keys: Vec<String>,
    /// Every service account with a pod on the agent's node gets
    /// `spiffe://<td>/ns/<ns>/sa/<sa>` without a registration entry.
    pub auto_pod_identity: bool,
}

/// One cluster's keys (`[[node_attestor]] type = "k8s_psat"`, `[node_attestor.clusters.<name>]`), as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPsatCluster {
    kubeconfig: Option<PathBuf>,
    #[serde(default = "default_audience")]
    audience: Vec<String>,
    service_account_allow_list: Vec<String>,
    #[serde(default)]
    allowed_node_label_keys: Vec<String>,
    #[serde(default)]
    allowed_pod_label_keys: Vec<String>,
    #[serde(default)]
    auto_pod_identity: bool,
}

fn default_audience() -> Vec<String> {
    vec!["tessera-server".into()]
}

impl PsatCluster {
    /// Checks the `clusters` table: at least one cluster, each named with letters, digits,
    /// `-`, `.` or `_`, with an audience and the agent's service account.
    pub fn from_raw(
        raw: Option<std::collections::BTreeMap<String, RawPsatCluster>>,
    ) -> Result<Vec<PsatCluster>, ConfigError> {
        let raw = raw
            .filter(|m| !m.is_empty())
            .ok_or_else(|| invalid("node_attestor.clusters", "k8s_psat needs at least one cluster"))?;
        let mut out = Vec::new();
        for (name, c) in raw {
            let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if !ok {
                return Err(invalid(
                    "node_attestor.clusters",
                    format!("cluster name {name:?}: use letters, digits, '-', '.', '_'"),
                ));
            }
            if c.audience.is_empty() {
                return Err(invalid("node_attestor.clusters.audience", "must not be empty"));
            }
            let mut allow = Vec::new();
            for a in &c.service_account_allow_list {
                let (ns, sa) = a.split_once(':').filter(|(n, s)| !n.is_empty() && !s.is_empty()).ok_or_else(|| {
                    invalid(
                        "node_attestor.clusters.service_account_allow_list",
                        format!("{a:?}: expected \"namespace:serviceaccount\""),
                    )
                })?;
                allow.push((ns.to_owned(), sa.to_owned()));
            }
            if allow.is_empty() {
                return Err(invalid(
                    "node_attestor.clusters.service_account_allow_list",
                    format!("cluster {name:?}: name the agent's service account"),
                ));
            }
            out.push(PsatCluster {
                name,
                kubeconfig: c.kubeconfig,
                audience: c.audience,
                service_account_allow_list: allow,
                allowed_node_label_keys: c.allowed_node_label_keys,
                allowed_pod_label_keys: c.allowed_pod_label_keys,
                auto_pod_identity: c.auto_pod_identity,
            });
        }
        Ok(out)
    }
}

/// `k8s_psat`: a projected service-account token of the agent's DaemonSet pod, proven by a
/// TokenReview in the named cluster. The agent ID is
/// `spiffe://<td>/tessera/agent/k8s_psat/<cluster>/<node uid>`; the selectors (`k8s_psat:…`)
/// describe the cluster, the agent's pod and its node. A token is not one-use: an agent whose
/// SVID expired attests again with a fresh token and keeps its ID.
pub struct PsatAttestor {
    clusters: Vec<Cluster>,
    /// `(cluster, node)` → when listed, and the `(namespace, service account)` pairs of its pods.
    node_pods: parking_lot::Mutex<std::collections::HashMap<NodeKey, (std::time::Instant, Vec<ServiceAccountRef>)>>,
}

/// `(cluster, node)`.
type NodeKey = (String, String);
/// `(namespace, service account)`.
type ServiceAccountRef = (String, String);

/// How long a node's pod list is reused for implied entries.
const NODE_PODS_TTL: std::time::Duration = std::time::Duration::from_secs(5);

struct Cluster {
    cfg: PsatCluster,
    client: kube::Client,
    reviewer: tessera_k8s::review::TokenReviewer,
}

impl std::fmt::Debug for PsatAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.clusters.iter().map(|c| c.cfg.name.as_str()).collect();
        f.debug_struct("PsatAttestor").field("clusters", &names).finish()
    }
}

fn psat_refused(e: tessera_k8s::K8sError) -> AttestError {
    match e {
        tessera_k8s::K8sError::Unauthenticated(m) => AttestError::Refused(m),
        other => AttestError::Unavailable(other.to_string()),
    }
}

impl PsatAttestor {
    /// Connects to every cluster's API server.
    pub async fn new(clusters: &[PsatCluster]) -> Result<Self, tessera_k8s::K8sError> {
        let mut out = Vec::with_capacity(clusters.len());
        for c in clusters {
            let client = tessera_k8s::connect(c.kubeconfig.as_deref()).await?;
            let reviewer = tessera_k8s::review::TokenReviewer::new(
                tessera_k8s::ClusterClient { name: c.name.clone(), client: client.clone() },
                c.audience.clone(),
            );
            out.push(Cluster { cfg: c.clone(), client, reviewer });
        }
        Ok(Self { clusters: out, node_pods: parking_lot::Mutex::default() })
    }

    /// The service accounts with a live pod on `node`, cached for [`NODE_PODS_TTL`]; none
    /// when the node named `node` is no longer the node with UID `node_uid` (a node name
    /// reused after the agent's node was replaced).
    async fn service_accounts_on(
        &self,
        cluster: &Cluster,
        node: &str,
        node_uid: &str,
    ) -> Result<Vec<(String, String)>, AttestError> {
        let key = (cluster.cfg.name.clone(), format!("{node}/{node_uid}"));
        if let Some((at, sas)) = self.node_pods.lock().get(&key)
            && at.elapsed() < NODE_PODS_TTL
        {
            return Ok(sas.clone());
        }
        let listed = self.list_service_accounts(cluster, node, node_uid).await;
        let sas = match listed {
            Ok(sas) => sas,
            Err(e) => {
                // The API server is unreachable: keep the last answer rather than taking the
                // node's identities away, and say so.
                let stale = self.node_pods.lock().get(&key).map(|(_, sas)| sas.clone());
                return match stale {
                    Some(sas) => {
                        tracing::warn!(error = %e, node, "Cannot list the node's pods; using the last list");
                        Ok(sas)
                    }
                    None => Err(e),
                };
            }
        };
        {
            let mut cache = self.node_pods.lock();
            cache.retain(|_, (at, _)| at.elapsed() < NODE_PODS_TTL * 60);
            cache.insert(key, (std::time::Instant::now(), sas.clone()));
        }
        Ok(sas)
    }

    async fn list_service_accounts(
        &self,
        cluster: &Cluster,
        node: &str,
        node_uid: &str,
    ) -> Result<Vec<(String, String)>, AttestError> {
        let api_err = |e: kube::Error| AttestError::Unavailable(format!("cluster {}: {node}: {e}", cluster.cfg.name));
        let current = kube::Api::<k8s_openapi::api::core::v1::Node>::all(cluster.client.clone())
            .get_opt(node)
            .await
            .map_err(api_err)?
            .and_then(|n| n.metadata.uid);
        if current.as_deref() != Some(node_uid) {
            return Ok(Vec::new());
        }
        let pods = kube::Api::<k8s_openapi::api::core::v1::Pod>::all(cluster.client.clone())
            .list(&kube::api::ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(api_err)?;
        let mut sas: Vec<(String, String)> = pods
            .items
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .filter(|p| tessera_k8s::pod_is_live(p))
            .filter_map(|p| {
                let ns = p.metadata.namespace.clone()?;
                let sa = p.spec.as_ref()?.service_account_name.clone().unwrap_or_else(|| "default".into());
                Some((ns, sa))
            })
            .collect();
        sas.sort();
        sas.dedup();
        Ok(sas)
    }

    fn cluster(&self, name: &str) -> Result<&Cluster, AttestError> {
        self.clusters
            .iter()
            .find(|c| c.cfg.name == name)
            .ok_or_else(|| AttestError::Refused(format!("cluster {name:?} is not configured for k8s_psat")))
    }
}

#[async_trait]
impl NodeAttestor for PsatAttestor {
    fn kind(&self) -> &'static str {
        tessera_k8s::psat::KIND
    }

    fn identify(&self, td: &TrustDomain, payload: &[u8]) -> Result<SpiffeId, AttestError> {
        let p = tessera_k8s::psat::Payload::from_bytes(payload).map_err(|e| AttestError::Malformed(e.to_string()))?;
        self.cluster(&p.cluster)?;
        let suffix = p.agent_suffix().map_err(|e| AttestError::Malformed(e.to_string()))?;
        Ok(agent_id(td, tessera_k8s::psat::KIND, &suffix)?)
    }

    async fn verify(&self, _store: &dyn Store, payload: &[u8]) -> Result<Vec<Selector>, AttestError> {
        use k8s_openapi::api::core::v1::{Node, Pod};
        let p = tessera_k8s::psat::Payload::from_bytes(payload).map_err(|e| AttestError::Malformed(e.to_string()))?;
        let cluster = self.cluster(&p.cluster)?;
        let claimed_node_uid = tessera_k8s::psat::node_uid_claim(&p.token).map_err(psat_refused)?;
        let sat =
            tessera_k8s::TokenAuthenticator::authenticate(&cluster.reviewer, &p.token).await.map_err(psat_refused)?;
        let allowed = cluster
            .cfg
            .service_account_allow_list
            .iter()
            .any(|(ns, sa)| *ns == sat.namespace && *sa == sat.service_account);
        if !allowed {
            return Err(AttestError::Refused(format!(
                "service account {}:{} is not in the k8s_psat allow list of cluster {}",
                sat.namespace, sat.service_account, cluster.cfg.name
            )));
        }
        let pod_name = sat.pod_name.clone().ok_or_else(|| {
            AttestError::Refused("token is not bound to a pod (use a projected service account token)".into())
        })?;
        let api_err = |e: kube::Error| AttestError::Unavailable(format!("cluster {}: {e}", cluster.cfg.name));
        let pod = kube::Api::<Pod>::namespaced(cluster.client.clone(), &sat.namespace)
            .get_opt(&pod_name)
            .await
            .map_err(api_err)?
            .ok_or_else(|| AttestError::Refused(format!("pod {}/{pod_name} does not exist", sat.namespace)))?;
        if sat.pod_uid.is_some() && pod.metadata.uid != sat.pod_uid {
            return Err(AttestError::Refused(format!("pod {}/{pod_name} was replaced", sat.namespace)));
        }
        let node_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .ok_or_else(|| AttestError::Refused(format!("pod {}/{pod_name} is not scheduled", sat.namespace)))?;
        let node = kube::Api::<Node>::all(cluster.client.clone())
            .get_opt(&node_name)
            .await
            .map_err(api_err)?
            .ok_or_else(|| AttestError::Refused(format!("node {node_name} does not exist")))?;
        let node_uid = node.metadata.uid.clone().unwrap_or_default();
        if node_uid != claimed_node_uid {
            return Err(AttestError::Refused(format!(
                "the token names node UID {claimed_node_uid}, but the pod runs on node {node_name} ({node_uid})"
            )));
        }
        let mut values = vec![
            format!("cluster:{}", cluster.cfg.name),
            format!("agent_ns:{}", sat.namespace),
            format!("agent_sa:{}", sat.service_account),
            format!("agent_pod_name:{pod_name}"),
            format!("agent_pod_uid:{}", pod.metadata.uid.clone().unwrap_or_default()),
            format!("agent_node_name:{node_name}"),
            format!("agent_node_uid:{node_uid}"),
        ];
        if let Some(ip) = pod.status.as_ref().and_then(|s| s.host_ip.clone()) {
            values.push(format!("agent_node_ip:{ip}"));
        }
        for (k, v) in node.metadata.labels.iter().flatten() {
            if cluster.cfg.allowed_node_label_keys.contains(k) {
                values.push(format!("agent_node_label:{k}:{v}"));
            }
        }
        for (k, v) in pod.metadata.labels.iter().flatten() {
            if cluster.cfg.allowed_pod_label_keys.contains(k) {
                values.push(format!("agent_pod_label:{k}:{v}"));
            }
        }
        values.iter().map(|v| Selector::new(tessera_k8s::psat::KIND, v).map_err(AttestError::from)).collect()
    }

    async fn implied_entries(&self, agent: &AgentRecord, td: &TrustDomain) -> Result<Vec<Entry>, AttestError> {
        let Some(cluster_name) =
            agent.spiffe_id.path().strip_prefix("/tessera/agent/k8s_psat/").and_then(|r| r.split('/').next())
        else {
            return Ok(Vec::new());
        };
        let Some(cluster) = self.clusters.iter().find(|c| c.cfg.name == cluster_name && c.cfg.auto_pod_identity) else {
            return Ok(Vec::new());
        };
        let selector = |prefix: &str| {
            agent
                .selectors
                .iter()
                .find_map(|s| (s.kind == tessera_k8s::psat::KIND).then(|| s.value.strip_prefix(prefix)).flatten())
        };
        let (Some(node), Some(node_uid)) = (selector("agent_node_name:"), selector("agent_node_uid:")) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (ns, sa) in self.service_accounts_on(cluster, node, node_uid).await? {
            let Ok(id) = tessera_k8s::token::istio_identity(td, &ns, &sa) else { continue };
            let selectors =
                vec![Selector::new("k8s", &format!("ns:{ns}"))?, Selector::new("k8s", &format!("sa:{sa}"))?];
            // Never stored: revision 1 stands for "as it was derived".
            let entry =
                Entry::new(format!("k8s-auto.{cluster_name}.{ns}.{sa}"), id, agent.spiffe_id.clone(), selectors, 0);
            out.push(Entry { revision: 1, ..entry });
        }
        Ok(out)
    }
}
