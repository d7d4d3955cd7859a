//! The change feed: what tells connected agents to sync now instead of at their next poll.
//!
//! Writers that change what agents see call [`ChangeFeed::notify`] (bundles) or
//! [`ChangeFeed::entries_written`] (entries); each agent's `WatchChanges` stream then carries a new generation
//! and the agent syncs at once. A notice carries no data: the sync that follows is the same
//! authenticated, incremental `SyncEntries`/`FetchBundles` as a poll, so a lost notice costs at
//! most one poll interval.
//!
//! What it is not: a replication channel. Entry writes, here or through another replica, are
//! seen by [`ChangeFeed::run`] in the store's entry revision: at once for writes here, within a
//! second for the others.

use std::sync::Arc;
use std::time::Duration;

use tessera_identity::Bundle;
use tokio::sync::{Notify, watch};

use tessera_store::Store;

/// The feed's state: a generation that grows on every change, and whether the server is
/// stopping (streams end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Feed {
    /// Grows by one per change notice.
    pub generation: u64,
    /// True once the server stops.
    pub closed: bool,
}

/// A cheap, clonable handle on the feed.
#[derive(Debug, Clone)]
pub struct ChangeFeed {
    tx: Arc<watch::Sender<Feed>>,
    /// Wakes [`ChangeFeed::run`] to read the entry revision now.
    entries: Arc<Notify>,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        Self { tx: Arc::new(watch::Sender::new(Feed::default())), entries: Arc::new(Notify::new()) }
    }
}

impl ChangeFeed {
    /// Something agents see changed (a bundle).
    pub fn notify(&self) {
        self.tx.send_modify(|f| f.generation = f.generation.wrapping_add(1));
    }

    /// Entries were written here. The notice goes out once [`ChangeFeed::run`] has read the
    /// store's entry revision, the same way as for writes through other replicas, so that one
    /// write is announced once.
    pub fn entries_written(&self) {
        self.entries.notify_one();
    }

    /// Ends every open watch stream.
    pub fn close(&self) {
        self.tx.send_modify(|f| f.closed = true);
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
            if let Ok(c) = store.entry_changes(seen, 0).await
                && c.revision != seen
            {
                seen = c.revision;
                self.notify();
            }
        }
        self.close();
    }
}
