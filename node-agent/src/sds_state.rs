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
    pub spiffe_ids: Entitled,
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
    pub resources: SentResources,
    /// Envoy's last ACK.
    pub last_ack: Option<Reply>,
    /// Envoy's last NACK.
    pub last_nack: Option<Reply>,
}

/// What a stream has sent, one [`SentResource`] per name, kept sorted by name. It serializes
/// as an object keyed by name. A stream sends a few resources; a `BTreeMap` would allocate a
/// whole node (about 1.7 KiB) for them in each of a node's thousand streams.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SentResources(Vec<SentResource>);

impl SentResources {
    /// Forgets everything.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Forgets the resource `name`.
    pub fn remove(&mut self, name: &str) {
        if let Ok(i) = self.0.binary_search_by(|r| r.name.as_str().cmp(name)) {
            self.0.remove(i);
        }
    }

    /// Adds `r`, or replaces the resource of the same name.
    pub fn insert(&mut self, r: SentResource) {
        match self.0.binary_search_by(|x| x.name.cmp(&r.name)) {
            Ok(i) => self.0[i] = r,
            Err(i) => self.0.insert(i, r),
        }
    }

    /// The resources, by name.
    pub fn iter(&self) -> impl Iterator<Item = &SentResource> {
        self.0.iter()
    }
}

impl Serialize for SentResources {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|r| (&r.name, r)))
    }
}

/// The SPIFFE IDs a stream's caller is entitled to, shared by every stream with the same list
/// (one caller's streams usually are): a caller entitled to 1,000 SVIDs with 1,000 streams
/// holds one list, not 1,000 copies (70 MiB in the agent bench).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entitled(Arc<[String]>);

impl Entitled {
    /// The IDs.
    pub fn ids(&self) -> &[String] {
        &self.0
    }
}

impl Serialize for Entitled {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.as_ref().serialize(s)
    }
}

/// The distinct lists held by open streams (few: about one per calling workload).
type Interned = Arc<Mutex<Vec<Arc<[String]>>>>;

/// Every open stream.
#[derive(Debug, Default)]
pub struct SdsStreams {
    next: AtomicU64,
    open: Open,
    entitled: Interned,
}

/// The open streams by number. Each state is boxed: a tree node holds eleven slots, and a
/// state is a few hundred bytes.
type Open = Arc<Mutex<BTreeMap<u64, Box<StreamState>>>>;

impl SdsStreams {
    /// Registers a stream; it is forgotten when the returned handle drops.
    pub fn open(&self, api: &'static str, pid: Option<i32>, uid: Option<u32>) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let state = StreamState {
            stream: id,
            api,
            pid,
            uid,
            spiffe_ids: Entitled::default(),
            opened_at: tessera_identity::unix_now(),
            resource_names: Vec::new(),
            version: String::new(),
            nonce: String::new(),
            sent_at: 0,
            resources: SentResources::default(),
            last_ack: None,
            last_nack: None,
        };
        self.open.lock().insert(id, Box::new(state));
        Tracked { id, open: self.open.clone(), entitled: self.entitled.clone() }
    }

    /// Every open stream, oldest first.
    pub fn list(&self) -> Vec<StreamState> {
        self.open.lock().values().map(|s| StreamState::clone(s)).collect()
    }
}

/// One stream's entry, removed on drop.
#[derive(Debug)]
pub struct Tracked {
    id: u64,
    open: Open,
    entitled: Interned,
}

impl Tracked {
    /// `ids` as an [`Entitled`] list shared with every stream that holds the same one (`same`
    /// compares a held name with an ID without allocating; `name` makes one). Lists no stream
    /// holds any more are dropped when a new one is added.
    pub fn entitled<T>(&self, ids: &[T], same: impl Fn(&str, &T) -> bool, name: impl Fn(&T) -> String) -> Entitled {
        let mut lists = self.entitled.lock();
        let found = lists.iter().find(|l| l.len() == ids.len() && l.iter().zip(ids).all(|(a, b)| same(a, b)));
        if let Some(shared) = found {
            return Entitled(shared.clone());
        }
        lists.retain(|l| Arc::strong_count(l) > 1);
        let shared: Arc<[String]> = ids.iter().map(name).collect();
        lists.push(shared.clone());
        Entitled(shared)
    }

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

    #[test]
    fn sent_resources_stay_one_per_name_in_name_order_and_serialize_as_an_object() {
        let r = |name: &str, serial: &str| SentResource {
            name: name.into(),
            kind: "tls_certificate",
            spiffe_id: None,
            serial: Some(serial.into()),
            not_after: None,
            trust_domains: Vec::new(),
        };
        let mut sent = SentResources::default();
        sent.insert(r("b", "1"));
        sent.insert(r("a", "2"));
        sent.insert(r("b", "3"));
        let names: Vec<_> = sent.iter().map(|x| (x.name.as_str(), x.serial.as_deref())).collect();
        assert_eq!(names, [("a", Some("2")), ("b", Some("3"))]);
        let json = serde_json::to_value(&sent).unwrap();
        assert_eq!(json["b"]["serial"], "3");
        assert_eq!(json.as_object().unwrap().len(), 2);
        sent.remove("a");
        sent.remove("missing");
        assert_eq!(sent.iter().count(), 1);
        sent.clear();
        assert_eq!(serde_json::to_string(&sent).unwrap(), "{}");
    }

    #[test]
    fn streams_with_the_same_entitlement_share_one_list_and_it_goes_with_them() {
        let streams = SdsStreams::default();
        let ids = || (0..1000).map(|i| format!("spiffe://example.org/w/{i}")).collect::<Vec<_>>();
        let (a, b) = (streams.open("sotw", None, None), streams.open("sotw", None, None));
        let ent = |t: &Tracked, v: Vec<String>| t.entitled(&v, |a, b| a == b, Clone::clone);
        let (ea, eb) = (ent(&a, ids()), ent(&b, ids()));
        assert!(Arc::ptr_eq(&ea.0, &eb.0), "one list for both streams");
        a.update(|s| s.spiffe_ids = ea.clone());
        b.update(|s| s.spiffe_ids = eb.clone());
        assert_eq!(streams.list()[1].spiffe_ids.ids().len(), 1000);
        let json = serde_json::to_value(&streams.list()[0]).unwrap();
        assert_eq!(json["spiffe_ids"][999], "spiffe://example.org/w/999");
        let other = ent(&a, vec!["spiffe://example.org/x".into()]);
        assert_ne!(other, ea);
        drop((a, b, ea, eb));
        // The next new list drops the one no stream holds any more.
        let c = streams.open("delta", None, None);
        let _ = ent(&c, vec!["spiffe://example.org/y".into()]);
        assert!(streams.entitled.lock().iter().all(|l| l.len() == 1), "the 1,000-ID list is gone");
    }
}
