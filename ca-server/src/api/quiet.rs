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

/// The most (entry ID, revision) pairs remembered over all agents; past it the map starts
/// over (a cache, not a record). Each agent holds its own copy of the entries under a shared
/// node alias, so the bound is on pairs, not agents.
const MAX_PAIRS: usize = 1_000_000;
/// An agent with more registered entries than this is not remembered: its syncs walk its
/// entries as before.
const MAX_PER_AGENT: usize = 4096;

/// (entry ID, entry revision), sorted by ID.
pub(crate) type Registered = Arc<[(String, u64)]>;

#[derive(Debug, Default)]
pub(crate) struct QuietSyncs {
    inner: parking_lot::Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_agent: HashMap<SpiffeId, (u64, Registered)>,
    /// Pairs held over all agents.
    pairs: usize,
}

impl QuietSyncs {
    /// `agent`'s registered entries as remembered at store revision `revision`, if so.
    pub(crate) fn get(&self, agent: &SpiffeId, revision: u64) -> Option<Registered> {
        self.inner.lock().by_agent.get(agent).filter(|(r, _)| *r == revision).map(|(_, e)| e.clone())
    }

    /// Remembers `agent`'s registered entries, read after the store was at `revision`.
    pub(crate) fn put(&self, agent: &SpiffeId, revision: u64, entries: Registered) {
        if entries.len() > MAX_PER_AGENT {
            return;
        }
        let mut inner = self.inner.lock();
        if let Some((_, old)) = inner.by_agent.remove(agent) {
            inner.pairs -= old.len();
        }
        // Full: start over, and free the old map after the lock is released.
        let dropped = (inner.pairs + entries.len() > MAX_PAIRS).then(|| std::mem::take(&mut *inner));
        inner.pairs += entries.len();
        inner.by_agent.insert(agent.clone(), (revision, entries));
        drop(inner);
        drop(dropped);
    }

    /// Pairs held over all agents.
    #[cfg(test)]
    fn pairs(&self) -> usize {
        self.inner.lock().pairs
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

    #[test]
    fn it_is_bounded_by_pairs_and_skips_agents_with_too_many_entries() {
        let q = QuietSyncs::default();
        let set = |n: usize| -> Registered { (0..n).map(|i| (format!("e{i}"), 1)).collect() };
        let id = |i: usize| SpiffeId::new(format!("spiffe://example.org/tessera/agent/{i}")).unwrap();
        q.put(&id(0), 1, set(MAX_PER_AGENT + 1));
        assert!(q.get(&id(0), 1).is_none(), "too many entries to remember");
        q.put(&id(1), 1, set(10));
        q.put(&id(1), 2, set(20));
        assert_eq!(q.pairs(), 20, "a new answer replaces the old one");
        let per = MAX_PER_AGENT;
        for i in 2..(2 + MAX_PAIRS / per + 1) {
            q.put(&id(i), 1, set(per));
            assert!(q.pairs() <= MAX_PAIRS);
        }
        assert!(q.get(&id(1), 2).is_none(), "the map started over when full");
    }
}
