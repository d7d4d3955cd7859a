//! Node attestation by projected service-account token (`k8s_psat`), the agent's half and
//! what both halves share. The agent sends `{"cluster": "<name>", "token": "<jwt>"}`; its ID is
//! `spiffe://<td>/tessera/agent/k8s_psat/<cluster>/<node uid>`, the node UID read from the
//! token's `kubernetes.io.node.uid` claim (bound tokens carry it since Kubernetes 1.30). The
//! server proves the claim with a TokenReview and the pod's node from the API server.

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::K8sError;

/// The attestation type.
pub const KIND: &str = "k8s_psat";

/// What the agent sends.
#[derive(Clone, Serialize, Deserialize)]
pub struct Payload {
    /// The cluster's name, as configured on the server.
    pub cluster: String,
    /// The projected service-account token.
    pub token: String,
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payload").field("cluster", &self.cluster).finish_non_exhaustive()
    }
}

impl Payload {
    /// Parses the attestation payload.
    pub fn from_bytes(b: &[u8]) -> Result<Self, K8sError> {
        if b.len() > 64 * 1024 {
            return Err(K8sError::Unauthenticated("k8s_psat payload is over 64 KiB".into()));
        }
        serde_json::from_slice(b)
            .map_err(|_| K8sError::Unauthenticated("k8s_psat payload is not {\"cluster\", \"token\"} JSON".into()))
    }

    /// The unique part of the agent ID: `<cluster>/<node uid>`, from the token's claims
    /// (unverified: the server proves them before issuing anything).
    pub fn agent_suffix(&self) -> Result<String, K8sError> {
        let valid = |s: &str| {
            !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        };
        if !valid(&self.cluster) {
            return Err(K8sError::Unauthenticated(format!("cluster name {:?} is not a DNS label", self.cluster)));
        }
        let uid = node_uid_claim(&self.token)?;
        if !valid(&uid) {
            return Err(K8sError::Unauthenticated("token's node UID is malformed".into()));
        }
        Ok(format!("{}/{uid}", self.cluster))
    }
}

/// The `kubernetes.io.node.uid` claim of a token, without verifying it.
pub fn node_uid_claim(token: &str) -> Result<String, K8sError> {
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .ok_or_else(|| K8sError::Unauthenticated("token is not a JWT".into()))?;
    claims["kubernetes.io"]["node"]["uid"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| {
            K8sError::Unauthenticated(
                "token is not bound to a node (no kubernetes.io.node claim): use a projected service account token on Kubernetes 1.30 or later".into(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(claims: serde_json::Value) -> String {
        let e = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.c2ln", e(&serde_json::json!({"alg": "RS256"})), e(&claims))
    }

    #[test]
    fn the_agent_suffix_names_cluster_and_node_uid() {
        let t = token(serde_json::json!({"kubernetes.io": {"node": {"name": "n1", "uid": "1c2d-33"}}}));
        let p = Payload { cluster: "cluster-a".into(), token: t };
        assert_eq!(p.agent_suffix().unwrap(), "cluster-a/1c2d-33");
        let round = Payload::from_bytes(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(round.agent_suffix().unwrap(), "cluster-a/1c2d-33");
        assert!(!format!("{p:?}").contains(&p.token), "Debug must not print the token");
    }

    #[test]
    fn unbound_tokens_bad_clusters_and_garbage_are_refused() {
        let unbound = token(serde_json::json!({"sub": "system:serviceaccount:a:b"}));
        assert!(Payload { cluster: "c".into(), token: unbound }.agent_suffix().is_err());
        let bound = token(serde_json::json!({"kubernetes.io": {"node": {"uid": "u/../x"}}}));
        assert!(Payload { cluster: "c".into(), token: bound.clone() }.agent_suffix().is_err());
        assert!(Payload { cluster: "a/b".into(), token: bound }.agent_suffix().is_err());
        assert!(Payload::from_bytes(b"not json").is_err());
    }
}
