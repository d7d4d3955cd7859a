//! Online token validation: a `TokenReview` against the cluster's API server, which checks
//! the signature, expiry, revocation (deleted pod or service account) and audiences.

use async_trait::async_trait;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::token::{ServiceAccountToken, TokenAuthenticator};
use crate::{ClusterClient, K8sError};

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";

/// Validates tokens with `TokenReview`.
#[derive(Debug, Clone)]
pub struct TokenReviewer {
    cluster: ClusterClient,
    audiences: Vec<String>,
}

impl TokenReviewer {
    /// A reviewer that requires one of `audiences` (empty: the API server's own audience).
    pub fn new(cluster: ClusterClient, audiences: Vec<String>) -> Self {
        Self { cluster, audiences }
    }
}

#[async_trait]
impl TokenAuthenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<ServiceAccountToken, K8sError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.cluster.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| K8sError::Api(format!("TokenReview on cluster {}: {e}", self.cluster.name)))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "token is not valid".into());
            return Err(K8sError::Unauthenticated(format!("cluster {} refused the token: {why}", self.cluster.name)));
        }
        // The API server answers the requested audiences the token is valid for; an older
        // server that ignores audiences answers none, and then nothing proves the audience.
        if !self.audiences.is_empty() {
            let granted = status.audiences.unwrap_or_default();
            if !granted.iter().any(|a| self.audiences.contains(a)) {
                return Err(K8sError::Unauthenticated(format!(
                    "token is not valid for audience {:?}",
                    self.audiences.join(",")
                )));
            }
        }
        let user = status.user.unwrap_or_default();
        let mut sat = ServiceAccountToken::from_username(user.username.as_deref().unwrap_or_default())?;
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).filter(|s| !s.is_empty()).cloned();
        sat.pod_name = first(EXTRA_POD_NAME);
        sat.pod_uid = first(EXTRA_POD_UID);
        sat.node_name = first(EXTRA_NODE_NAME);
        sat.node_uid = first(EXTRA_NODE_UID);
        Ok(sat)
    }
}
