//! Long-lived response streams on the agent socket (SDS and the Workload API), as state
//! machines polled by their connection's task: no task and no channel per stream.
//!
//! What it is not: what a stream sends. Each API keeps its own state type and implements
//! [`Responder`] for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_stream::Stream;
use tonic::Status;

use crate::manager::AgentMetrics;

/// A response stream as tonic serves it.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The state of one open stream.
pub trait Responder: Send + 'static {
    /// What the stream sends.
    type Message: Send + 'static;
    /// The next message (or error) to send; `None` ends the stream.
    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Message, Status>>> + Send;
}

/// Turns `state` into the stream tonic polls.
pub fn respond<R: Responder>(state: R) -> ResponseStream<R::Message> {
    Box::pin(futures_util::stream::unfold(state, |mut st| async move {
        let item = st.next().await?;
        Some((item, st))
    }))
}

/// Which gauge an open stream counts in.
#[derive(Debug, Clone, Copy)]
pub enum StreamKind {
    /// `tessera_agent_sds_streams`.
    Sds,
    /// `tessera_agent_workload_api_streams`.
    Workload,
}

/// Counts an open stream in the agent's metrics for as long as it lives.
#[derive(Debug)]
pub struct OpenStream(Arc<AgentMetrics>, StreamKind);

impl OpenStream {
    /// Counts one more stream of `kind`.
    pub fn new(m: Arc<AgentMetrics>, kind: StreamKind) -> Self {
        Self::gauge(&m, kind).fetch_add(1, Ordering::Relaxed);
        Self(m, kind)
    }

    fn gauge(m: &AgentMetrics, kind: StreamKind) -> &AtomicU64 {
        match kind {
            StreamKind::Sds => &m.sds_streams,
            StreamKind::Workload => &m.workload_streams,
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        Self::gauge(&self.0, self.1).fetch_sub(1, Ordering::Relaxed);
    }
}
