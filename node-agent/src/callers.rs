//! Who is calling on the agent socket: the peer the kernel reported when the connection was
//! accepted ([`crate::socket::SocketPeer`]), turned into selectors by the configured workload
//! attestors.
//!
//! The pid the kernel reports is the process that connected, and its [`ProcessStamp`] (start
//! time and executable) was read at accept. Every request checks that the pid still runs that
//! same process, before the attestors run, after they ran, and before every answer
//! ([`Caller::check`]): a connection handed on by a process that has exited (its pid perhaps
//! reused, by another pod's process even), or whose process has exec()ed another program
//! since it connected, gets nothing.

use std::path::Path;
use std::sync::Arc;

use tessera_identity::Selector;
use tonic::{Request, Status};

use crate::attestor::{ProcessStamp, WorkloadAttestor};
use crate::socket::SocketPeer;

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
    /// The connecting process as it was at accept (`None` when the kernel gave no pid).
    stamp: Option<(i32, ProcessStamp)>,
    /// Its uid, as the kernel reported it.
    pub uid: Option<u32>,
}

fn changed() -> Status {
    Status::permission_denied(
        "the process that opened this connection has exited or started another program since; connect again from the process that calls",
    )
}

impl Caller {
    /// The connecting process's pid, when the kernel gave one.
    pub fn pid(&self) -> Option<i32> {
        self.stamp.as_ref().map(|(p, _)| *p)
    }

    /// Refuses when the connecting pid no longer runs the process that connected.
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
        let peer = req
            .extensions()
            .get::<SocketPeer>()
            .cloned()
            .ok_or_else(|| Status::permission_denied("caller has no Unix peer credentials"))?;
        let stamp = match peer.cred.pid.filter(|p| *p > 0) {
            // The process was already gone (or unreadable) when the connection was accepted.
            Some(pid) => Some((pid, peer.stamp.ok_or_else(changed)?)),
            None => None,
        };
        let caller = Caller { selectors: Vec::new(), stamp, uid: Some(peer.cred.uid) };
        caller.check()?;
        let mut selectors = Vec::new();
        for a in &self.attestors {
            match a.attest(peer.cred).await {
                Ok(s) => selectors.extend(s),
                Err(e) => tracing::debug!(attestor = a.name(), error = %e, "Workload attestor failed"),
            }
        }
        let caller = Caller { selectors, ..caller };
        caller.check()?;
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::attestor::{PeerCred, UnixAttestor};
    use std::process::Command;

    fn request(pid: u32, stamp: Option<ProcessStamp>) -> Request<()> {
        let mut r = Request::new(());
        let cred = PeerCred { pid: Some(i32::try_from(pid).unwrap()), uid: 0, gid: 0 };
        r.extensions_mut().insert(SocketPeer { cred, stamp, activity: Arc::default() });
        r
    }

    fn callers() -> Callers {
        Callers::new(vec![Arc::new(UnixAttestor::default())])
    }

    #[tokio::test]
    async fn a_connection_whose_process_is_gone_gets_nothing() {
        let mut p = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = p.id();
        let stamp = ProcessStamp::read(Path::new("/proc"), i32::try_from(pid).unwrap()).unwrap();
        assert!(callers().attest(&request(pid, Some(stamp))).await.is_ok());
        // The connecting process exits (it handed its connection on, say): refused.
        p.kill().unwrap();
        p.wait().unwrap();
        let e = callers().attest(&request(pid, Some(stamp))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // A process gone before the connection was even accepted: refused too.
        let e = callers().attest(&request(pid, None)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }

    #[tokio::test]
    async fn a_connection_whose_process_execs_another_program_gets_nothing() {
        let mut child = Command::new("sh")
            .args(["-c", "read x; exec sleep 30"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let at_accept = ProcessStamp::read(Path::new("/proc"), i32::try_from(pid).unwrap()).unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        for _ in 0..400 {
            if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p.ends_with("sleep")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let e = callers().attest(&request(pid, Some(at_accept))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let _ = child.kill();
        let _ = child.wait();
    }
}
