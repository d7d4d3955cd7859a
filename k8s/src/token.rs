//! The facts a service-account token proves, and the trait both validators implement.

use async_trait::async_trait;
use tessera_identity::{SpiffeId, TrustDomain};

use crate::K8sError;

/// A service account proven by a token, with the pod and node it is bound to when the token
/// is a bound (projected) token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountToken {
    /// Namespace of the service account.
    pub namespace: String,
    /// Name of the service account.
    pub service_account: String,
    /// The pod the token is bound to.
    pub pod_name: Option<String>,
    /// That pod's UID.
    pub pod_uid: Option<String>,
    /// The node the pod runs on (bound tokens since Kubernetes 1.30).
    pub node_name: Option<String>,
    /// That node's UID.
    pub node_uid: Option<String>,
}

impl ServiceAccountToken {
    /// Parses the `system:serviceaccount:<ns>:<sa>` user name.
    pub fn from_username(username: &str) -> Result<Self, K8sError> {
        let rest = username.strip_prefix("system:serviceaccount:").ok_or_else(|| {
            K8sError::Unauthenticated(format!(
                "{username:?} is not a service account (system:serviceaccount:<ns>:<sa>)"
            ))
        })?;
        let (ns, sa) = rest
            .split_once(':')
            .filter(|(n, s)| !n.is_empty() && !s.is_empty() && !s.contains(':'))
            .ok_or_else(|| K8sError::Unauthenticated(format!("malformed service account user name {username:?}")))?;
        Ok(Self {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
            pod_name: None,
            pod_uid: None,
            node_name: None,
            node_uid: None,
        })
    }

    /// The Istio workload identity of this service account: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn istio_identity(&self, td: &TrustDomain) -> Result<SpiffeId, K8sError> {
        istio_identity(td, &self.namespace, &self.service_account)
    }
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>`, the identity Istio gives a service account.
pub fn istio_identity(td: &TrustDomain, namespace: &str, service_account: &str) -> Result<SpiffeId, K8sError> {
    SpiffeId::new(format!("spiffe://{td}/ns/{namespace}/sa/{service_account}"))
        .map_err(|e| K8sError::Unauthenticated(format!("service account {namespace}/{service_account}: {e}")))
}

/// Splits an Istio identity `spiffe://<td>/ns/<ns>/sa/<sa>` into namespace and service account.
pub fn parse_istio_identity<'a>(id: &'a SpiffeId, td: &TrustDomain) -> Option<(&'a str, &'a str)> {
    if id.trust_domain() != td {
        return None;
    }
    let mut parts = id.path().strip_prefix('/')?.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
        _ => None,
    }
}

/// Validates a service-account token for one cluster.
#[async_trait]
pub trait TokenAuthenticator: Send + Sync + std::fmt::Debug {
    /// Checks `token` (signature or TokenReview, expiry, audience) and returns what it proves.
    async fn authenticate(&self, token: &str) -> Result<ServiceAccountToken, K8sError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_user_names_parse_and_others_are_refused() {
        let t = ServiceAccountToken::from_username("system:serviceaccount:shop:cart").unwrap();
        assert_eq!((t.namespace.as_str(), t.service_account.as_str()), ("shop", "cart"));
        for bad in ["system:node:n1", "system:serviceaccount:shop", "system:serviceaccount::cart", "alice"] {
            assert!(ServiceAccountToken::from_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn istio_identities_round_trip_and_other_paths_do_not_match() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = istio_identity(&td, "shop", "cart").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(parse_istio_identity(&id, &td), Some(("shop", "cart")));
        let other = SpiffeId::new("spiffe://cluster.local/ns/shop/sa/cart/x").unwrap();
        assert_eq!(parse_istio_identity(&other, &td), None);
        let foreign = TrustDomain::new("other.org").unwrap();
        assert_eq!(parse_istio_identity(&id, &foreign), None);
    }
}
