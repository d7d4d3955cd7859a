//! The change feed: what tells connected agents to sync now instead of at their next poll.
//!
//! Writers that change what agents see (entries, bundles, our own CA's bundle) call
//! [`ChangeFeed::notify`]; each agent's `WatchChanges` stream then carries a new generation
//! and the agent syncs at once. A notice carries no data: the sync that follows is the same
//! authenticated, incremental `SyncEntries`/`FetchBundles` as a poll, so a lost notice costs at
//! most one poll interval.
//!
//! What it is not: a replication channel. Writes made by another replica are seen here by
//! [`ChangeFeed::run`], which checks the store's entry revision every second.

use std::sync::Arc;
use std::time::Duration;

use tessera_identity::Bundle;
use tokio::sync::watch;

use crate::store::Store;

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
pub struct ChangeFeed(Arc<watch::Sender<Feed>>);

impl Default for ChangeFeed {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(Feed::default())))
    }
}

impl ChangeFeed {
    /// Something agents see changed.
    pub fn notify(&self) {
        self.0.send_modify(|f| f.generation = f.generation.wrapping_add(1));
    }

    /// Ends every open watch stream.
    pub fn close(&self) {
        self.0.send_modify(|f| f.closed = true);
    }

    /// Receives the feed.
    pub fn subscribe(&self) -> watch::Receiver<Feed> {
        self.0.subscribe()
    }

    /// Feeds the feed until `shutdown`, then closes it: our CA's bundle changes (including
    /// those another replica made and this one loaded), and entry writes made through other
    /// replicas, seen by reading the store's entry revision every `every` (one cheap read,
    /// O(changes)).
    pub async fn run(
        self,
        store: Arc<dyn Store>,
        mut ca_bundle: watch::Receiver<Arc<Bundle>>,
        every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut seen = store.entry_changes(u64::MAX).await.map(|c| c.revision).unwrap_or(0);
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
                _ = tokio::time::sleep(every) => {}
            }
            if let Ok(c) = store.entry_changes(seen).await
                && c.revision != seen
            {
                seen = c.revision;
                self.notify();
            }
        }
        self.close();
    }
}
