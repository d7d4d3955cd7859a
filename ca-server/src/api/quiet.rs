//! What an unchanged entry sync needs, remembered per agent: the IDs and revisions of its
//! registered entries as of an entry revision of the store. While the store's entry revision
//! has not moved, an agent's registered entries cannot have changed (entry writes are
//! ordered: sled in one process, PostgreSQL under one advisory lock), so a sync that brings
//! nothing new costs the agent record and the revision read, not a walk of its entries and
//! node aliases. At 10,000 agents syncing every 5 s that walk was most of the server's
//! store reads.

use std::collections::HashMap;
use std::sync::Arc;

use tessera_identity::SpiffeId;

/// The most agents remembered; past it the map starts over (a cache, not a record).
const CAPACITY: usize = 200_000;

/// (entry ID, entry revision), sorted by ID.
pub(crate) type Registered = Arc<[(String, u64)]>;

#[derive(Debug, Default)]
pub(crate) struct QuietSyncs {
    by_agent: parking_lot::Mutex<HashMap<SpiffeId, (u64, Registered)>>,
}

impl QuietSyncs {
    /// `agent`'s registered entries as remembered at store revision `revision`, if so.
    pub(crate) fn get(&self, agent: &SpiffeId, revision: u64) -> Option<Registered> {
        self.by_agent.lock().get(agent).filter(|(r, _)| *r == revision).map(|(_, e)| e.clone())
    }

    /// Remembers `agent`'s registered entries, read after the store was at `revision`.
    pub(crate) fn put(&self, agent: &SpiffeId, revision: u64, entries: Registered) {
        let mut m = self.by_agent.lock();
        if m.len() >= CAPACITY && !m.contains_key(agent) {
            m.clear();
        }
        m.insert(agent.clone(), (revision, entries));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_holds_only_at_its_revision() {
        let q = QuietSyncs::default();
        let a = SpiffeId::new("spiffe://example.org/tessera/agent/x").unwrap();
        assert!(q.get(&a, 7).is_none());
        q.put(&a, 7, Arc::from(vec![("e1".to_owned(), 3)]));
        assert_eq!(q.get(&a, 7).unwrap().as_ref(), &[("e1".to_owned(), 3)]);
        assert!(q.get(&a, 8).is_none(), "the store moved on");
    }
}
