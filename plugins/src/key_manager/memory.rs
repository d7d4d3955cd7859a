//! The `memory` key manager: keys live in process memory and die with it. For tests and for
//! throwaway deployments; a restart means a new CA.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use async_trait::async_trait;
use tessera_identity::KeyType;

use super::{CaKey, KeyManager, KeyManagerError, SoftwareKey, check_key_id};

/// Keys in memory.
#[derive(Debug, Default)]
pub struct MemoryKeyManager {
    keys: Mutex<HashMap<String, Arc<SoftwareKey>>>,
}

impl MemoryKeyManager {
    /// An empty key manager.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl KeyManager for MemoryKeyManager {
    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn CaKey>, KeyManagerError> {
        check_key_id(id)?;
        let owned = id.to_owned();
        let key = tokio::task::spawn_blocking(move || SoftwareKey::generate(&owned, key_type))
            .await
            .map_err(|e| KeyManagerError::Generate(key_type, e.to_string()))??;
        let key = Arc::new(key);
        self.keys.lock().insert(id.to_owned(), key.clone());
        Ok(key)
    }

    async fn get_key(&self, id: &str) -> Result<Option<Arc<dyn CaKey>>, KeyManagerError> {
        check_key_id(id)?;
        let keys = self.keys.lock();
        Ok(keys.get(id).map(|k| k.clone() as Arc<dyn CaKey>))
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_key_manager_passes_the_conformance_suite() {
        crate::conformance::run(&super::MemoryKeyManager::new()).await;
    }
}
