//! Keeping the trust bundle in ConfigMaps: Istio's `istio-ca-root-cert` (key `root-cert.pem`)
//! in every namespace or the selected ones, and a general bundle ConfigMap for other
//! consumers. Writes are server-side apply with field manager `tessera`, so they are
//! idempotent and two replicas writing the same content change nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::K8sError;

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "tessera";

/// Server-side applies ConfigMap `namespace/name` with `data[key] = value`. Returns false when
/// the ConfigMap already held exactly that value (nothing was written).
pub async fn apply_configmap(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    key: &str,
    value: &str,
) -> Result<bool, K8sError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    if let Some(cm) =
        api.get_opt(name).await.map_err(|e| K8sError::Api(format!("ConfigMap {namespace}/{name}: {e}")))?
        && cm.data.as_ref().and_then(|d| d.get(key)).is_some_and(|v| v == value)
    {
        return Ok(false);
    }
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), "tessera".to_owned())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(key.to_owned(), value.to_owned())])),
        ..Default::default()
    };
    let mut obj = serde_json::to_value(&cm).map_err(|e| K8sError::Api(e.to_string()))?;
    obj["apiVersion"] = "v1".into();
    obj["kind"] = "ConfigMap".into();
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj))
        .await
        .map_err(|e| K8sError::Api(format!("ConfigMap {namespace}/{name}: {e}")))?;
    Ok(true)
}

/// The namespaces to publish into: `selected` when not empty, otherwise every namespace that
/// is not terminating.
pub async fn target_namespaces(client: &kube::Client, selected: &[String]) -> Result<Vec<String>, K8sError> {
    if !selected.is_empty() {
        return Ok(selected.to_vec());
    }
    let api: Api<Namespace> = Api::all(client.clone());
    let list = api.list(&ListParams::default()).await.map_err(|e| K8sError::Api(format!("namespaces: {e}")))?;
    Ok(list
        .items
        .into_iter()
        .filter(|n| n.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating"))
        .filter_map(|n| n.metadata.name)
        .collect())
}
