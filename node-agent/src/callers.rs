//! Who is calling on the agent socket: peer credentials from the Unix socket, turned into
//! selectors by the configured workload attestors.

use std::sync::Arc;

use tessera_identity::Selector;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::attestor::{PeerCred, WorkloadAttestor};

/// The attestors, in order.
#[derive(Debug, Clone)]
pub struct Callers {
    attestors: Vec<Arc<dyn WorkloadAttestor>>,
}

impl Callers {
    /// Callers attested by `attestors`.
    pub fn new(attestors: Vec<Arc<dyn WorkloadAttestor>>) -> Self {
        Self { attestors }
    }

    /// The caller's selectors, from every attestor.
    pub async fn selectors<T>(&self, req: &Request<T>) -> Result<Vec<Selector>, Status> {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .ok_or_else(|| Status::permission_denied("caller has no Unix peer credentials"))?;
        let peer = PeerCred { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() };
        let mut out = Vec::new();
        for a in &self.attestors {
            match a.attest(peer).await {
                Ok(s) => out.extend(s),
                Err(e) => tracing::debug!(attestor = a.name(), error = %e, "Workload attestor failed"),
            }
        }
        Ok(out)
    }
}
