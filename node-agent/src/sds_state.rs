//! The state of every open SDS stream, for `tessera-agent debug sds` (our `istioctl
//! proxy-config secret`): who is on the other end, what it asked for, what was sent last
//! (version, nonce, each certificate's serial and notAfter, each validation context's trust
//! domains) and how Envoy answered (the last ACK, the last NACK with its error).
//!
//! What it is not: no secret material. Serials, names and times only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::Serialize;

/// One resource as last sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SentResource {
    /// The resource name (`default`, `ROOTCA`, `ALL`, a SPIFFE ID, a trust domain ID).
    pub name: String,
    /// `tls_certificate` or `validation_context`.
    pub kind: &'static str,
    /// The certificate's SPIFFE ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// The certificate's hex serial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The certificate's notAfter, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
    /// The trust domains a validation context holds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
}

/// An ACK or NACK from Envoy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reply {
    /// Unix seconds.
    pub at: i64,
    /// The nonce it answered.
    pub nonce: String,
    /// The version it names (for a NACK: the version it kept).
    pub version: String,
    /// A NACK's gRPC code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// A NACK's error detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One open stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamState {
    /// A number for this stream, unique in the agent's life.
    pub stream: u64,
    /// `sotw` (StreamSecrets) or `delta` (DeltaSecrets).
    pub api: &'static str,
    /// The calling process, as the kernel reported it.
    pub pid: Option<i32>,
    /// Its uid.
    pub uid: Option<u32>,
    /// The SPIFFE IDs it is entitled to (at the last send).
    pub spiffe_ids: Vec<String>,
    /// Unix seconds.
    pub opened_at: i64,
    /// The resource names it asked for (subscribed to).
    pub resource_names: Vec<String>,
    /// The version last sent (SotW: the response's; delta: the system version).
    pub version: String,
    /// The nonce last sent.
    pub nonce: String,
    /// Unix seconds of the last response (0: none yet).
    pub sent_at: i64,
    /// What the last response (delta: every response so far) held, by name.
    pub resources: BTreeMap<String, SentResource>,
    /// Envoy's last ACK.
    pub last_ack: Option<Reply>,
    /// Envoy's last NACK.
    pub last_nack: Option<Reply>,
}

/// Every open stream.
#[derive(Debug, Default)]
pub struct SdsStreams {
    next: AtomicU64,
    open: Arc<Mutex<BTreeMap<u64, StreamState>>>,
}

impl SdsStreams {
    /// Registers a stream; it is forgotten when the returned handle drops.
    pub fn open(&self, api: &'static str, pid: Option<i32>, uid: Option<u32>) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let state = StreamState {
            stream: id,
            api,
            pid,
            uid,
            spiffe_ids: Vec::new(),
            opened_at: tessera_identity::unix_now(),
            resource_names: Vec::new(),
            version: String::new(),
            nonce: String::new(),
            sent_at: 0,
            resources: BTreeMap::new(),
            last_ack: None,
            last_nack: None,
        };
        self.open.lock().insert(id, state);
        Tracked { id, open: self.open.clone() }
    }

    /// Every open stream, oldest first.
    pub fn list(&self) -> Vec<StreamState> {
        self.open.lock().values().cloned().collect()
    }
}

/// One stream's entry, removed on drop.
#[derive(Debug)]
pub struct Tracked {
    id: u64,
    open: Arc<Mutex<BTreeMap<u64, StreamState>>>,
}

impl Tracked {
    /// Changes this stream's state.
    pub fn update(&self, f: impl FnOnce(&mut StreamState)) {
        if let Some(s) = self.open.lock().get_mut(&self.id) {
            f(s);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.open.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_listed_while_open_and_updates_show() {
        let all = SdsStreams::default();
        let a = all.open("sotw", Some(7), Some(1000));
        let b = all.open("delta", None, None);
        a.update(|s| s.nonce = "3".into());
        let l = all.list();
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].api, l[0].pid, l[0].nonce.as_str()), ("sotw", Some(7), "3"));
        drop(a);
        assert_eq!(all.list().iter().map(|s| s.stream).collect::<Vec<_>>(), vec![2]);
        drop(b);
        assert!(all.list().is_empty());
    }
}
