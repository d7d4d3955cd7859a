//! The `disk` key manager: keys as files (mode 0600, in a 0700 directory), written atomically,
//! so the CA survives restarts. One JSON file per slot: `{ "key_type", "pkcs8" }`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tessera_identity::{KeyType, PrivateKey};
use zeroize::Zeroizing;

use super::{CaKey, KeyManager, KeyManagerError, SoftwareKey, check_key_id};
use crate::fsutil::{atomic_write, ensure_private_dir};

/// Keys on disk under one directory.
#[derive(Debug)]
pub struct DiskKeyManager {
    dir: PathBuf,
    cache: Mutex<HashMap<String, Arc<SoftwareKey>>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct KeyFile {
    key_type: KeyType,
    pkcs8: String,
}

impl DiskKeyManager {
    /// Keys under `dir` (created 0700 if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, KeyManagerError> {
        let dir = dir.into();
        ensure_private_dir(&dir)?;
        Ok(Self { dir, cache: Mutex::default() })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.key.json"))
    }

    fn load(path: &Path, id: &str) -> Result<Option<SoftwareKey>, KeyManagerError> {
        let raw = match std::fs::read(path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let corrupt = |reason: &str| KeyManagerError::Corrupt { id: id.to_owned(), reason: reason.to_owned() };
        let file: KeyFile = serde_json::from_slice(&raw).map_err(|_| corrupt("not a key file"))?;
        let der = STANDARD.decode(file.pkcs8.as_bytes()).map_err(|_| corrupt("pkcs8 is not base64"))?;
        let key = SoftwareKey::from_pkcs8(id, file.key_type, PrivateKey::from_pkcs8_der(der))?;
        Ok(Some(key))
    }
}

#[async_trait]
impl KeyManager for DiskKeyManager {
    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn CaKey>, KeyManagerError> {
        check_key_id(id)?;
        let owned = id.to_owned();
        let path = self.path(id);
        let key = tokio::task::spawn_blocking(move || -> Result<SoftwareKey, KeyManagerError> {
            let key = SoftwareKey::generate(&owned, key_type)?;
            let file = KeyFile { key_type, pkcs8: STANDARD.encode(key.pkcs8().pkcs8_der()) };
            let json = Zeroizing::new(
                serde_json::to_vec(&file).map_err(|e| KeyManagerError::Generate(key_type, e.to_string()))?,
            );
            drop(Zeroizing::new(file.pkcs8));
            atomic_write(&path, &json, 0o600)?;
            Ok(key)
        })
        .await
        .map_err(|e| KeyManagerError::Generate(key_type, e.to_string()))??;
        let key = Arc::new(key);
        self.cache.lock().insert(id.to_owned(), key.clone());
        Ok(key)
    }

    async fn get_key(&self, id: &str) -> Result<Option<Arc<dyn CaKey>>, KeyManagerError> {
        check_key_id(id)?;
        if let Some(k) = self.cache.lock().get(id) {
            return Ok(Some(k.clone()));
        }
        let (path, owned) = (self.path(id), id.to_owned());
        let loaded = tokio::task::spawn_blocking(move || Self::load(&path, &owned))
            .await
            .map_err(|e| KeyManagerError::Corrupt { id: id.to_owned(), reason: e.to_string() })??;
        let Some(key) = loaded else { return Ok(None) };
        let key = Arc::new(key);
        self.cache.lock().insert(id.to_owned(), key.clone());
        Ok(Some(key))
    }

    fn name(&self) -> &'static str {
        "disk"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn disk_key_manager_passes_the_conformance_suite() {
        let d = tempfile::tempdir().unwrap();
        crate::conformance::run(&DiskKeyManager::new(d.path().join("keys")).unwrap()).await;
    }

    #[tokio::test]
    async fn keys_survive_a_restart_and_files_are_private() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("keys");
        let km = DiskKeyManager::new(&dir).unwrap();
        let k = km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
        let pub1 = k.public_key_raw().to_vec();
        let km2 = DiskKeyManager::new(&dir).unwrap();
        let k2 = km2.get_key("x509-CA-A").await.unwrap().unwrap();
        assert_eq!(k2.public_key_raw(), pub1.as_slice());
        let mode = std::fs::metadata(dir.join("x509-CA-A.key.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[tokio::test]
    async fn corrupt_key_file_is_a_precise_error() {
        let d = tempfile::tempdir().unwrap();
        let km = DiskKeyManager::new(d.path()).unwrap();
        std::fs::write(d.path().join("x509-CA-A.key.json"), b"{\"key_type\":\"ec-p256\",\"pkcs8\":\"AAAA\"}").unwrap();
        let err = km.get_key("x509-CA-A").await.unwrap_err();
        assert!(matches!(err, KeyManagerError::Corrupt { ref id, .. } if id == "x509-CA-A"), "{err}");
    }
}
