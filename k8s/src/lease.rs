//! Leader election with a `coordination.k8s.io/v1` Lease, so that one replica at a time runs
//! the cluster writers (ConfigMap publishing). Optimistic concurrency on `resourceVersion`
//! decides races: a replica that loses a write is not the leader. As in client-go, another
//! holder's lease is judged expired by this replica's own clock: from when it last saw the
//! holder or `renewTime` change, never by comparing `renewTime` with the local time, so
//! clock skew between replicas cannot steal a live lease.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::K8sError;

/// One replica's view of a Lease.
#[derive(Debug)]
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration_secs: i32,
    /// Another holder's `(holder, renewTime)` as last seen, and when it was first seen.
    observed: parking_lot::Mutex<Option<(String, std::time::Instant)>>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    /// Elects among holders of Lease `namespace/name`; this replica is `identity`.
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str, duration_secs: i32) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration_secs: duration_secs.max(1),
            observed: parking_lot::Mutex::new(None),
        }
    }

    /// Takes the Lease when it is free or expired, renews it when we hold it. Returns whether
    /// this replica leads now. Call it more often than the lease duration (a third of it).
    pub async fn try_acquire_or_renew(&self) -> Result<bool, K8sError> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await.map_err(|e| K8sError::Api(format!("Lease: {e}")))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(K8sError::Api(format!("Lease: {e}"))),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        let seen = format!("{holder}|{:?}", spec.renew_time);
        let duration = std::time::Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(self.duration_secs)).unwrap_or(1),
        );
        let expired = {
            let mut o = self.observed.lock();
            match o.as_ref() {
                Some((last, at)) if *last == seen => at.elapsed() > duration,
                _ => {
                    *o = Some((seen, std::time::Instant::now()));
                    false
                }
            }
        };
        if !ours && !holder.is_empty() && !expired {
            return Ok(false);
        }
        if !ours {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(self.duration_secs);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(K8sError::Api(format!("Lease: {e}"))),
        }
    }
}
