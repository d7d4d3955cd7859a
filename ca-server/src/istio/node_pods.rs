//! Which service accounts have a live pod on a node: what a ztunnel's impersonation is checked
//! against. ztunnel asks for every workload on its node at once when it starts, so the
//! answers are shared: one pod list per (cluster, namespace, node) serves every request that
//! waited for it, and a "yes" stands for [`FRESH`] after the list began. A "no" from an older
//! list is never trusted: the request lists again, so a pod that just started is found.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a list's "yes" is reused. A pod deleted within it may still be impersonated for
/// this long, which ztunnel on that node could have done a moment earlier anyway.
pub(crate) const FRESH: Duration = Duration::from_secs(2);
/// The most (namespace, node) slots kept; past it, idle ones are dropped.
const MAX_SLOTS: usize = 4096;

/// The service accounts with a live pod (or why the list failed), and when the list began.
type Listed = Option<(Instant, Result<Arc<HashSet<String>>, String>)>;
/// One (namespace, node): its last list, locked while a new one is made.
type Slot = Arc<tokio::sync::Mutex<Listed>>;

#[derive(Debug, Default)]
pub(crate) struct NodeAccounts {
    slots: parking_lot::Mutex<HashMap<(String, String), Slot>>,
}

impl NodeAccounts {
    /// Whether service account `sa` of `ns` has a live pod on `node`; `list` gives the service
    /// accounts of the live pods of `ns` on `node` when a new list is needed. A failed list
    /// is the answer of every request that waited for it (they do not each ask again, one
    /// after another, an API server that is failing); later requests list again.
    pub(crate) async fn has<F, Fut>(&self, ns: &str, node: &str, sa: &str, list: F) -> Result<bool, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HashSet<String>, String>>,
    {
        let arrived = Instant::now();
        let slot = {
            let mut slots = self.slots.lock();
            if slots.len() >= MAX_SLOTS {
                slots.retain(|_, s| Arc::strong_count(s) > 1);
            }
            slots.entry((ns.to_owned(), node.to_owned())).or_default().clone()
        };
        let mut held = slot.lock().await;
        if let Some((began, listed)) = held.as_ref() {
            // A list that began after this request arrived answers it either way.
            if *began >= arrived {
                return listed.as_ref().map(|a| a.contains(sa)).map_err(Clone::clone);
            }
            if began.elapsed() < FRESH && listed.as_ref().is_ok_and(|a| a.contains(sa)) {
                return Ok(true);
            }
        }
        let began = Instant::now();
        let listed = list().await.map(Arc::new);
        let answer = listed.as_ref().map(|a| a.contains(sa)).map_err(Clone::clone);
        *held = Some((began, listed));
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn set(sas: &[&str]) -> HashSet<String> {
        sas.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn concurrent_asks_for_one_node_share_a_list() {
        let n = Arc::new(AtomicUsize::new(0));
        let accounts = Arc::new(NodeAccounts::default());
        let mut tasks = Vec::new();
        for i in 0..50 {
            let (n, accounts) = (n.clone(), accounts.clone());
            tasks.push(tokio::spawn(async move {
                let sa = if i % 2 == 0 { "cart" } else { "pay" };
                accounts
                    .has("shop", "node-1", sa, || async move {
                        n.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, String>(set(&["cart", "pay"]))
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(true));
        }
        assert!(n.load(Ordering::SeqCst) <= 2, "{} lists for 50 asks", n.load(Ordering::SeqCst));
        // Another node, another list.
        let other = accounts.has("shop", "node-2", "cart", || async { Ok(set(&[])) }).await;
        assert_eq!(other, Ok(false));
    }

    #[tokio::test]
    async fn a_no_from_an_older_list_lists_again_and_a_failure_is_not_kept() {
        let accounts = NodeAccounts::default();
        assert_eq!(accounts.has("shop", "n", "cart", || async { Ok(set(&["pay"])) }).await, Ok(false));
        // cart's pod started since: the old "no" is not reused.
        assert_eq!(accounts.has("shop", "n", "cart", || async { Ok(set(&["pay", "cart"])) }).await, Ok(true));
        // A "yes" is reused while fresh, without listing.
        assert_eq!(accounts.has("shop", "n", "cart", || async { Err("not called".to_owned()) }).await, Ok(true));
        // A failed list is the caller's error; the next request lists again.
        assert_eq!(accounts.has("shop", "n", "gone", || async { Err("down".to_owned()) }).await, Err("down".into()));
        assert_eq!(accounts.has("shop", "n", "pay", || async { Ok(set(&["pay"])) }).await, Ok(true));
    }

    #[tokio::test]
    async fn requests_that_waited_for_a_failed_list_share_its_failure() {
        let n = Arc::new(AtomicUsize::new(0));
        let accounts = Arc::new(NodeAccounts::default());
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (n, accounts) = (n.clone(), accounts.clone());
            tasks.push(tokio::spawn(async move {
                accounts
                    .has("shop", "node-1", "cart", || async move {
                        n.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err::<HashSet<String>, _>("API server unavailable".to_owned())
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err("API server unavailable".to_owned()));
        }
        assert!(n.load(Ordering::SeqCst) <= 2, "{} lists for 20 waiting requests", n.load(Ordering::SeqCst));
    }
}
