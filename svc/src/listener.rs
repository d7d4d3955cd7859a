//! Bounds for every TCP listener: a cap on open connections, a per-IP cap for callers that
//! present no client certificate, and the close of connections that stay idle.
//!
//! - [`ConnGate`] admits a connection ([`ConnSlot`]) or refuses it; the slot counts in
//!   [`ConnStats`] for as long as the connection lives.
//! - [`IdleIo`] wraps a connection's I/O and ends it (a clean end of stream for the protocol
//!   above) once it has been idle for the configured time. For gRPC, "idle" means no open
//!   stream: [`TrackStreamsLayer`] counts each request as an open stream until its response
//!   body is done, so a long-lived stream (`WatchChanges`, SDS) keeps its connection, and
//!   HTTP/2 keepalive pings are left to the server builder. For HTTP/1 listeners
//!   ([`IdleIo::bytes`]) any byte read or written counts as activity.
//!
//! What it is not: rate limits (per agent, per IP) live with the APIs that know the caller.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections at most; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// A connection without an open stream (request) for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections per share (a source IP, a local user), counted from accept; a
    /// listener may move an authenticated peer to a share of its own (agents on the Agent
    /// API).
    pub max_anonymous_per_ip: usize,
    /// Open connections per authenticated peer, once the listener moved it to its own share.
    pub max_per_peer: usize,
}

/// Counters of one listener, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Open connections now.
    pub open: AtomicU64,
    /// Connections refused at the cap.
    pub refused_limit: AtomicU64,
    /// Connections refused at the per-IP cap for callers without a client certificate.
    pub refused_per_ip: AtomicU64,
    /// Connections closed for being idle.
    pub idle_closed: AtomicU64,
}

impl ConnStats {
    /// Appends this listener's lines (`<prefix>_connections{listener}`,
    /// `<prefix>_connections_refused_total{listener,reason}`,
    /// `<prefix>_connections_idle_closed_total{listener}`) without HELP/TYPE headers; see
    /// [`render_headers`].
    pub fn render(&self, out: &mut String, prefix: &str, listener: &str) {
        use std::fmt::Write;
        let l = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let _ = writeln!(out, "{prefix}_connections{{listener=\"{listener}\"}} {}", l(&self.open));
        let _ = writeln!(
            out,
            "{prefix}_connections_refused_total{{listener=\"{listener}\",reason=\"limit\"}} {}",
            l(&self.refused_limit)
        );
        let _ = writeln!(
            out,
            "{prefix}_connections_refused_total{{listener=\"{listener}\",reason=\"per_ip\"}} {}",
            l(&self.refused_per_ip)
        );
        let _ =
            writeln!(out, "{prefix}_connections_idle_closed_total{{listener=\"{listener}\"}} {}", l(&self.idle_closed));
    }
}

/// HELP and TYPE lines for the metrics [`ConnStats::render`] writes, once per exposition.
pub fn render_headers(out: &mut String, prefix: &str) {
    use std::fmt::Write;
    let _ =
        writeln!(out, "# HELP {prefix}_connections Open connections, by listener.\n# TYPE {prefix}_connections gauge");
    let _ = writeln!(
        out,
        "# HELP {prefix}_connections_refused_total Connections refused at a listener's cap, by listener and reason.\n# TYPE {prefix}_connections_refused_total counter"
    );
    let _ = writeln!(
        out,
        "# HELP {prefix}_connections_idle_closed_total Connections closed after the idle timeout, by listener.\n# TYPE {prefix}_connections_idle_closed_total counter"
    );
}

/// Whose share of a listener's connections a connection counts in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Share {
    /// A source address (TCP listeners).
    Ip(IpAddr),
    /// A local user (the agent's Unix socket).
    Uid(u32),
    /// An authenticated peer, by name (an agent's SPIFFE ID on the Agent API).
    Name(String),
}

/// Open connections per share.
type Shares = Arc<Mutex<HashMap<Share, usize>>>;

/// Admits connections within a listener's bounds.
#[derive(Debug, Clone)]
pub struct ConnGate {
    limits: ConnLimits,
    stats: Arc<ConnStats>,
    permits: Arc<Semaphore>,
    shares: Shares,
}

impl ConnGate {
    /// A gate with `limits`, counting into `stats`.
    pub fn new(limits: ConnLimits, stats: Arc<ConnStats>) -> Self {
        Self {
            limits,
            stats,
            permits: Arc::new(Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS))),
            shares: Arc::default(),
        }
    }

    /// The limits.
    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// The counters.
    pub fn stats(&self) -> Arc<ConnStats> {
        self.stats.clone()
    }

    /// A slot for a new connection, counted against the listener's cap and, from the moment
    /// it is accepted, against `share` (at most `max_anonymous_per_ip` each: so that one
    /// address, or one local user, cannot take the whole listener nor hold its TLS handshakes
    /// in flight); `None` (counted) over either.
    pub fn admit(&self, share: Option<Share>) -> Option<ConnSlot> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.stats.refused_limit.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        let mut slot = ConnSlot { _permit: permit, stats: self.stats.clone(), share: None };
        if let Some(share) = share
            && !self.move_to(&mut slot, share, self.limits.max_anonymous_per_ip)
        {
            return None;
        }
        Some(slot)
    }

    /// Moves `slot` from its share to `share`, which holds at most `limit` connections
    /// (an authenticated agent moves from its address's share to its own). False (counted,
    /// and the slot keeps its share) when `share` is full.
    pub fn move_to(&self, slot: &mut ConnSlot, share: Share, limit: usize) -> bool {
        let mut m = self.shares.lock();
        let n = m.entry(share.clone()).or_insert(0);
        if *n >= limit {
            self.stats.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            if *n == 0 {
                m.remove(&share);
            }
            return false;
        }
        *n += 1;
        drop(m);
        slot.release_share();
        slot.share = Some((share, self.shares.clone()));
        true
    }
}

/// One admitted connection; frees its place when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<ConnStats>,
    share: Option<(Share, Shares)>,
}

impl ConnSlot {
    fn release_share(&mut self) {
        if let Some((share, m)) = self.share.take() {
            let mut m = m.lock();
            if let Some(n) = m.get_mut(&share) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&share);
                }
            }
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        self.release_share();
    }
}

/// What a connection is doing: its open streams, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    base: Instant,
    /// Nanoseconds after `base` of the last change to "no open stream" (or of the last byte,
    /// for byte-counted connections).
    quiet_since: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self { open: AtomicUsize::new(0), base: Instant::now(), quiet_since: AtomicU64::new(0) }
    }
}

impl Activity {
    fn touch(&self) {
        let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.quiet_since.store(ns, Ordering::Relaxed);
    }

    /// When the connection becomes idle for `idle`, or `None` while a stream is open.
    fn idle_at(&self, idle: Duration) -> Option<Instant> {
        if self.open.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.base + Duration::from_nanos(self.quiet_since.load(Ordering::Relaxed)) + idle)
    }

    /// Counts an open stream until the guard is dropped.
    pub fn stream(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }
}

/// An open stream of a connection.
#[derive(Debug)]
pub struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // Stamp first, so a reader that sees zero open streams sees the new quiet time.
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's I/O that ends once the connection has been idle for `idle`.
#[derive(Debug)]
pub struct IdleIo<T> {
    inner: T,
    activity: Arc<Activity>,
    idle: Duration,
    bytes: bool,
    timer: Pin<Box<Sleep>>,
    closed: bool,
    slot: Option<ConnSlot>,
}

impl<T> IdleIo<T> {
    /// Idle means no open stream, as counted through [`IdleIo::activity`] (gRPC).
    pub fn streams(inner: T, idle: Duration, slot: Option<ConnSlot>) -> Self {
        Self::new(inner, idle, slot, false)
    }

    /// Idle means no byte read or written (HTTP/1).
    pub fn bytes(inner: T, idle: Duration, slot: Option<ConnSlot>) -> Self {
        Self::new(inner, idle, slot, true)
    }

    fn new(inner: T, idle: Duration, slot: Option<ConnSlot>, bytes: bool) -> Self {
        let activity = Arc::new(Activity::default());
        let timer = Box::pin(tokio::time::sleep(idle));
        Self { inner, activity, idle, bytes, timer, closed: false, slot }
    }

    /// The connection's activity, to count its streams.
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    /// The wrapped I/O.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// True once the connection has been idle for the limit. Arms the timer to wake `cx`
    /// at the next moment that could be true.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.closed {
            return true;
        }
        loop {
            let at = self.activity.idle_at(self.idle).unwrap_or_else(|| Instant::now() + self.idle);
            if self.timer.deadline() != at {
                self.timer.as_mut().reset(at);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.activity.idle_at(self.idle).is_some_and(|t| t <= Instant::now()) {
                self.closed = true;
                if let Some(s) = &self.slot {
                    s.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                }
                return true;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if self.bytes && buf.filled().len() > before {
                    self.activity.touch();
                }
                Poll::Ready(r)
            }
            // No data now: end the connection (a clean end of stream) if it is idle.
            Poll::Pending if self.expired(cx) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if self.bytes && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if self.bytes && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Finds a request's connection [`Activity`] in its extensions (where the listener's
/// connect info put it).
pub type ActivityOf = fn(&http::Extensions) -> Option<Arc<Activity>>;

/// A tower layer counting each request as an open stream of its connection until its
/// response body ends (or is dropped).
#[derive(Debug, Clone, Copy)]
pub struct TrackStreamsLayer(pub ActivityOf);

impl<S> tower::Layer<S> for TrackStreamsLayer {
    type Service = TrackStreams<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TrackStreams { inner, of: self.0 }
    }
}

/// See [`TrackStreamsLayer`].
#[derive(Debug, Clone)]
pub struct TrackStreams<S> {
    inner: S,
    of: ActivityOf,
}

impl<S, B, RB> tower::Service<http::Request<B>> for TrackStreams<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<TrackedBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = (self.of)(req.extensions()).map(|a| a.stream());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| TrackedBody { inner: body, _guard: guard }))
        })
    }
}

/// A response body that keeps its stream counted until it is done or dropped.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    _guard: Option<StreamGuard>,
}

impl<B: http_body::Body + Unpin> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) {
            self._guard = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn gate(max: usize, per_ip: usize) -> ConnGate {
        ConnGate::new(
            ConnLimits {
                max_connections: max,
                idle_timeout: Duration::from_secs(1),
                max_anonymous_per_ip: per_ip,
                max_per_peer: per_ip,
            },
            Arc::default(),
        )
    }

    #[test]
    fn the_gate_holds_its_caps_and_frees_places_on_drop() {
        let g = gate(4, 2);
        let ip = |s: &str| Some(Share::Ip(s.parse().unwrap()));
        let a = g.admit(ip("10.0.0.1")).unwrap();
        let mut b = g.admit(ip("10.0.0.1")).unwrap();
        assert!(g.admit(ip("10.0.0.1")).is_none(), "over the per-IP cap, counted from accept");
        let _c = g.admit(ip("10.0.0.2")).unwrap();
        // An authenticated agent moves to a share of its own (of one connection here).
        assert!(g.move_to(&mut b, Share::Name("agent-1".into()), 1));
        let _d = g.admit(ip("10.0.0.1")).unwrap();
        assert!(g.admit(None).is_none(), "over the cap");
        drop(a);
        let mut e = g.admit(ip("10.0.0.1")).unwrap_or_else(|| panic!("the place of a closed connection is free again"));
        assert!(!g.move_to(&mut e, Share::Name("agent-1".into()), 1), "a second connection of the same agent");
        let s = g.stats();
        assert_eq!(s.open.load(Ordering::Relaxed), 4, "refusals leave the open count right");
        assert_eq!(s.refused_limit.load(Ordering::Relaxed), 1);
        assert_eq!(s.refused_per_ip.load(Ordering::Relaxed), 2);
        drop((b, e));
        assert_eq!(s.open.load(Ordering::Relaxed), 2);
    }

    // These two run on the real clock with short idle times: tokio's paused clock
    // (`start_paused`) needs its `test-util` feature, which would make this workspace's tokio
    // differ from the upgrade baseline's, so scripts/baseline.sh could not reuse the Build
    // step's compiled dependencies.
    #[tokio::test]
    async fn an_idle_connection_ends_and_one_with_an_open_stream_does_not() {
        const IDLE: Duration = Duration::from_millis(500);
        let (a, mut peer) = tokio::io::duplex(64);
        let g = gate(8, 8);
        let mut io = IdleIo::streams(a, IDLE, g.admit(None));
        let activity = io.activity();
        let stream = activity.stream();
        let mut buf = [0u8; 8];
        // A stream is open: two idle periods pass and the connection stays.
        assert!(tokio::time::timeout(IDLE * 2 + IDLE / 5, io.read(&mut buf)).await.is_err());
        // No stream any more: after the idle time, the read ends (end of stream).
        let t0 = Instant::now();
        drop(stream);
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        let waited = t0.elapsed();
        assert!(waited >= IDLE && waited < IDLE * 6, "ended after {waited:?}, idle time {IDLE:?}");
        assert_eq!(g.stats().idle_closed.load(Ordering::Relaxed), 1);
        peer.write_all(b"x").await.unwrap();
    }

    #[tokio::test]
    async fn bytes_keep_an_http1_connection_alive() {
        const IDLE: Duration = Duration::from_millis(1000);
        let (a, mut peer) = tokio::io::duplex(64);
        let mut io = IdleIo::bytes(a, IDLE, None);
        let mut buf = [0u8; 8];
        // Three pauses of 0.4× the idle time each, 1.2× of it in all, with the read waiting
        // through each: only the bytes themselves keep the connection open past the first
        // idle time.
        for _ in 0..3 {
            let write = async {
                tokio::time::sleep(IDLE * 2 / 5).await;
                peer.write_all(b"ping").await.unwrap();
            };
            let ((), read) = tokio::join!(write, io.read(&mut buf));
            assert_eq!(read.unwrap(), 4, "a connection that got bytes in time stays open");
        }
        let last_byte = Instant::now();
        assert_eq!(io.read(&mut buf).await.unwrap(), 0, "silent for the idle time: closed");
        let waited = last_byte.elapsed();
        assert!(waited >= IDLE * 9 / 10, "closed {waited:?} after the last byte, idle time {IDLE:?}");
    }
}
