//! Who is calling on the agent socket: peer credentials from the Unix socket, turned into
//! selectors by the configured workload attestors.
//!
//! The pid the kernel reports is the process that connected. Its [`ProcessStamp`] (start time
//! and executable inode) is taken before the attestors run and checked again after they ran
//! and before every answer ([`Caller::check`]): a pid reused by another process, or a process
//! that exec()s another program meanwhile, gets nothing.

use std::path::Path;
use std::sync::Arc;

use tessera_identity::Selector;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::attestor::{PeerCred, ProcessStamp, WorkloadAttestor};

/// The attestors, in order.
#[derive(Debug, Clone)]
pub struct Callers {
    attestors: Vec<Arc<dyn WorkloadAttestor>>,
}

/// An attested caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Its selectors, from every attestor.
    pub selectors: Vec<Selector>,
    /// The calling process as it was when attested (`None` when the kernel gave no pid).
    stamp: Option<(i32, ProcessStamp)>,
}

fn changed() -> Status {
    Status::permission_denied(
        "the calling process exited or started another program while it was attested; connect again from the process that calls",
    )
}

impl Caller {
    /// Refuses when the calling pid no longer runs the process that was attested.
    pub fn check(&self) -> Result<(), Status> {
        match &self.stamp {
            None => Ok(()),
            Some((pid, stamp)) => match ProcessStamp::read(Path::new("/proc"), *pid) {
                Ok(now) if now == *stamp => Ok(()),
                _ => Err(changed()),
            },
        }
    }
}

impl Callers {
    /// Callers attested by `attestors`.
    pub fn new(attestors: Vec<Arc<dyn WorkloadAttestor>>) -> Self {
        Self { attestors }
    }

    /// Attests the caller of `req`.
    pub async fn attest<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .ok_or_else(|| Status::permission_denied("caller has no Unix peer credentials"))?;
        let peer = PeerCred { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() };
        let stamp = match peer.pid.filter(|p| *p > 0) {
            Some(pid) => Some((pid, ProcessStamp::read(Path::new("/proc"), pid).map_err(|_| changed())?)),
            None => None,
        };
        let mut selectors = Vec::new();
        for a in &self.attestors {
            match a.attest(peer).await {
                Ok(s) => selectors.extend(s),
                Err(e) => tracing::debug!(attestor = a.name(), error = %e, "Workload attestor failed"),
            }
        }
        let caller = Caller { selectors, stamp };
        caller.check()?;
        Ok(caller)
    }
}
