//! The agent socket's connections: accepted within a cap, closed when idle, and each carrying
//! what the kernel said about its peer **when it connected**: the peer credentials and the
//! [`ProcessStamp`] of the connecting pid, read right at accept. A request is answered only
//! while that pid still runs that same process ([`crate::callers::Caller::check`]): a
//! connection handed on by a process that has since exited, or whose pid now belongs to
//! another process, gets nothing.
//!
//! What it is not: attestation (that is [`crate::callers`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tessera_svc::listener::{Activity, ConnGate, ConnLimits, IdleIo, Share};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::attestor::{PeerCred, ProcessStamp};

/// Open connections on the agent socket at most.
pub const MAX_CONNECTIONS: usize = 8192;
/// Open connections of one caller at most: one uid, and within it one pod when the caller's
/// cgroup names one (many pods' containers share a uid, such as Istio's 1337).
pub const MAX_PER_CALLER: usize = 64;
/// A connection without an open stream or call for this long is closed (clients reconnect).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The peer of an agent socket connection, as the kernel reported it at accept.
#[derive(Debug, Clone)]
pub struct SocketPeer {
    /// uid, gid and pid.
    pub cred: PeerCred,
    /// The connecting process at accept (`None` without a pid, or when it is already gone).
    pub stamp: Option<ProcessStamp>,
    /// The connection's open streams, for the idle timeout.
    pub activity: Arc<Activity>,
}

/// The connection's [`Activity`], for [`tessera_svc::listener::TrackStreamsLayer`].
pub fn activity_of(ext: &tonic::codegen::http::Extensions) -> Option<Arc<Activity>> {
    ext.get::<SocketPeer>().map(|p| p.activity.clone())
}

/// One accepted connection.
#[derive(Debug)]
pub struct SocketConn {
    io: IdleIo<UnixStream>,
    peer: SocketPeer,
}

impl tonic::transport::server::Connected for SocketConn {
    type ConnectInfo = SocketPeer;
    fn connect_info(&self) -> SocketPeer {
        self.peer.clone()
    }
}

impl AsyncRead for SocketConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for SocketConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The socket's gate: [`MAX_CONNECTIONS`] connections, closed after [`IDLE_TIMEOUT`] idle.
pub fn gate(stats: Arc<tessera_svc::listener::ConnStats>) -> ConnGate {
    let limits = ConnLimits {
        max_connections: MAX_CONNECTIONS,
        idle_timeout: IDLE_TIMEOUT,
        max_anonymous_per_ip: MAX_PER_CALLER,
        max_per_peer: MAX_PER_CALLER,
    };
    ConnGate::new(limits, stats)
}

/// Accepts connections on `listener` within `gate`, stamping each peer at accept.
pub fn incoming(
    listener: UnixListener,
    gate: ConnGate,
) -> impl tokio_stream::Stream<Item = Result<SocketConn, std::io::Error>> {
    futures_util::stream::unfold((listener, gate), |(listener, gate)| async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "Agent socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(cred) = stream.peer_cred() else { continue };
            let cred = PeerCred { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() };
            // One caller's share: its uid, and its pod when its cgroup names one.
            let pod = cred
                .pid
                .filter(|p| *p > 0)
                .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/cgroup")).ok())
                .and_then(|t| tessera_k8s::cgroup::pod_uid_hint(&t));
            let share = Share::Name(format!("{}/{}", cred.uid, pod.unwrap_or_default()));
            let Some(slot) = gate.admit(Some(share)) else {
                debug!(
                    uid = cred.uid,
                    "Agent socket at its connection limit, or this caller's share; closing the new connection"
                );
                continue;
            };
            let stamp =
                cred.pid.filter(|p| *p > 0).and_then(|p| ProcessStamp::read(std::path::Path::new("/proc"), p).ok());
            let io = IdleIo::streams(stream, gate.limits().idle_timeout, Some(slot));
            let peer = SocketPeer { cred, stamp, activity: io.activity() };
            return Some((Ok(SocketConn { io, peer }), (listener, gate)));
        }
    })
}
