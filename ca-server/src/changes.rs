//! The change feed: what tells connected agents to sync now instead of at their next poll.
//!
//! Writers that change what agents see call [`ChangeFeed::notify`] (bundles) or
//! [`ChangeFeed::entries_written`] (entries); each agent's `WatchChanges` stream then carries a new generation
//! and the agent syncs at once. A notice carries no data: the sync that follows is the same
//! authenticated, incremental `SyncEntries`/`FetchBundles` as a poll, so a lost notice costs at
//! most one poll interval.
//!
//! Each notice has a [`Scope`]: everything (a bundle changed, or too much changed to say), or
//! the parent IDs of the entries that changed. An agent's stream carries a notice only when
//! the scope reaches it: a parent is the agent itself or one of the entries its authorized set
//! hangs under (node aliases, downstream entries). So one entry change at 10,000 agents wakes
//! the agent it concerns, not all of them.
//!
//! What it is not: a replication channel. Entry writes, here or through another replica, are
//! seen by [`ChangeFeed::run`] in the store's entry revision: at once for writes here, within a
//! second for the others. An entry moved to another parent through another replica wakes its
//! new agents at once and its old ones at their next poll (this replica does not know its old
//! parent).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tessera_identity::{Bundle, SpiffeId};
use tokio::sync::{Notify, watch};

use tessera_store::Store;

/// Most entry changes one notice names parents for; beyond, the notice goes to everyone.
const MAX_SCOPED_CHANGES: usize = 10_000;

/// Whom a notice concerns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every agent: a bundle changed, or the changes could not be read in full.
    #[default]
    All,
    /// The agents whose authorized set hangs under one of these parents.
    Parents(HashSet<SpiffeId>),
}

impl Scope {
    /// Whether an agent whose authorized set hangs under `parents` is concerned.
    pub fn reaches(&self, parents: &HashSet<SpiffeId>) -> bool {
        match self {
            Self::All => true,
            Self::Parents(p) => p.iter().any(|x| parents.contains(x)),
        }
    }
}

/// The feed's state: a generation that grows on every change, whom the newest change
/// concerns, and whether the server is stopping (streams end).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Feed {
    /// Grows by one per change notice.
    pub generation: u64,
    /// Whom the notice of `generation` concerns (a reader that missed a generation must
    /// assume it concerned it).
    pub scope: Arc<Scope>,
    /// True once the server stops.
    pub closed: bool,
}

/// A cheap, clonable handle on the feed.
#[derive(Debug, Clone)]
pub struct ChangeFeed {
    tx: Arc<watch::Sender<Feed>>,
    /// Wakes [`ChangeFeed::run`] to read the entry revision now.
    entries: Arc<Notify>,
    /// Parents that entries written here left (an update that moved an entry): the changes
    /// read from the store name only the new parent.
    left: Arc<parking_lot::Mutex<HashSet<SpiffeId>>>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    skipped: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(Feed::default())),
            entries: Arc::new(Notify::new()),
            left: Arc::default(),
            sent: Arc::default(),
            skipped: Arc::default(),
        }
    }
}

impl ChangeFeed {
    /// Something every agent sees changed (a bundle).
    pub fn notify(&self) {
        self.announce(Scope::All);
    }

    fn announce(&self, scope: Scope) {
        let scope = Arc::new(scope);
        self.tx.send_modify(|f| {
            f.generation = f.generation.wrapping_add(1);
            f.scope = scope;
        });
    }

    /// Entries were written here. The notice goes out once [`ChangeFeed::run`] has read the
    /// store's entry revision, the same way as for writes through other replicas, so that one
    /// write is announced once.
    pub fn entries_written(&self) {
        self.entries.notify_one();
    }

    /// An entry written here moved away from `old_parent`: its agents are told too.
    pub fn entry_moved_from(&self, old_parent: SpiffeId) {
        self.left.lock().insert(old_parent);
        self.entries.notify_one();
    }

    /// Ends every open watch stream.
    pub fn close(&self) {
        self.tx.send_modify(|f| f.closed = true);
    }

    /// Notices: (sent, skipped because they did not concern the agent).
    pub fn counts(&self) -> (u64, u64) {
        (self.sent.load(std::sync::atomic::Ordering::Relaxed), self.skipped.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Counts one notice a stream sent (`true`) or skipped.
    pub fn count(&self, sent: bool) {
        let c = if sent { &self.sent } else { &self.skipped };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Receives the feed.
    pub fn subscribe(&self) -> watch::Receiver<Feed> {
        self.tx.subscribe()
    }

    /// Feeds the feed until `shutdown`, then closes it: our CA's bundle changes (including
    /// those another replica made and this one loaded), and entry writes, seen by reading the
    /// store's entry revision when this replica wrote entries and every `every` for writes
    /// through other replicas (one cheap read, O(changes)).
    pub async fn run(
        self,
        store: Arc<dyn Store>,
        mut ca_bundle: watch::Receiver<Arc<Bundle>>,
        every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut seen = store.entry_changes(u64::MAX, 0).await.map(|c| c.revision).unwrap_or(0);
        let mut bundle_open = true;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                r = ca_bundle.changed(), if bundle_open => {
                    match r {
                        Ok(()) => self.notify(),
                        Err(_) => bundle_open = false,
                    }
                    continue;
                }
                _ = self.entries.notified() => {}
                _ = tokio::time::sleep(every) => {}
            }
            if let Ok(c) = store.entry_changes(seen, MAX_SCOPED_CHANGES).await
                && c.revision != seen
            {
                seen = c.revision;
                let left: HashSet<SpiffeId> = std::mem::take(&mut *self.left.lock());
                let scope = if c.truncated || c.deleted.iter().any(|d| d.parent_id.is_none()) {
                    Scope::All
                } else {
                    Scope::Parents(
                        c.changed
                            .iter()
                            .map(|e| e.parent_id.clone())
                            .chain(c.deleted.into_iter().filter_map(|d| d.parent_id))
                            .chain(left)
                            .collect(),
                    )
                };
                self.announce(scope);
            }
        }
        self.close();
    }
}
