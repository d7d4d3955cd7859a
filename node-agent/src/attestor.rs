//! Workload attestation: who is calling on the socket?
//!
//! The caller's Unix peer credentials (`SO_PEERCRED`: pid, uid, gid) are turned into selectors
//! by each [`WorkloadAttestor`]. The built-in `unix` attestor produces `unix:uid:N`,
//! `unix:gid:N`, `unix:user:NAME`, `unix:group:NAME`, `unix:path:/abs/exe` and
//! `unix:sha256:HEX` (of the executable). The Kubernetes attestor (`k8s_attestor`) sits
//! behind the same trait.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use tessera_identity::Selector;

/// The kernel's view of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process ID, when the kernel reports it.
    pub pid: Option<i32>,
    /// User ID.
    pub uid: u32,
    /// Group ID.
    pub gid: u32,
}

/// Attestation failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The process is gone or unreadable.
    #[error("cannot inspect process {pid}: {reason}")]
    Process {
        /// The PID.
        pid: i32,
        /// Why.
        reason: String,
    },
}

/// Turns a caller into selectors.
#[async_trait]
pub trait WorkloadAttestor: Send + Sync + std::fmt::Debug {
    /// The selector type this attestor produces (`unix`).
    fn name(&self) -> &'static str;
    /// Selectors describing the caller.
    async fn attest(&self, peer: PeerCred) -> Result<Vec<Selector>, AttestError>;
}

/// Whether any entry asks for `unix:sha256`: hashing an executable (Envoy is ~100 MB) costs
/// tens of milliseconds on first sight, so it is skipped when no entry needs it.
pub type WantsExeHash = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

/// The `unix` attestor.
pub struct UnixAttestor {
    root: PathBuf,
    hashes: Mutex<HashMap<(PathBuf, u64, i64), String>>,
    wants_hash: WantsExeHash,
}

impl std::fmt::Debug for UnixAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixAttestor").field("root", &self.root).finish_non_exhaustive()
    }
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self::with_root("/")
    }
}

/// Looks `id` up in an `/etc/passwd`- or `/etc/group`-style file: `name:x:id:...`.
fn lookup_name(file: &Path, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _ = f.next()?;
        (f.next()?.parse::<u32>().ok()? == id).then(|| name.to_owned())
    })
}

impl UnixAttestor {
    /// An attestor reading `/proc` and `/etc` under `root` (tests use a fake root).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), hashes: Mutex::default(), wants_hash: std::sync::Arc::new(|| true) }
    }

    /// Hash executables only while `wants_hash` says some entry uses `unix:sha256`.
    pub fn hashing_when(mut self, wants_hash: WantsExeHash) -> Self {
        self.wants_hash = wants_hash;
        self
    }

    fn sha256_of(&self, exe: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(exe).ok()?;
        let key = (exe.to_owned(), meta.len(), meta.mtime());
        if let Some(h) = self.hashes.lock().ok()?.get(&key) {
            return Some(h.clone());
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut f = std::fs::File::open(exe).ok()?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).ok()?;
            if n == 0 {
                break;
            }
            ctx.update(buf.get(..n)?);
        }
        let hex = tessera_identity::x509::hex_lower(ctx.finish().as_ref());
        self.hashes.lock().ok()?.insert(key, hex.clone());
        Some(hex)
    }
}

#[async_trait]
impl WorkloadAttestor for UnixAttestor {
    fn name(&self) -> &'static str {
        "unix"
    }

    async fn attest(&self, peer: PeerCred) -> Result<Vec<Selector>, AttestError> {
        let mut out = vec![
            Selector { kind: "unix".into(), value: format!("uid:{}", peer.uid) },
            Selector { kind: "unix".into(), value: format!("gid:{}", peer.gid) },
        ];
        if let Some(name) = lookup_name(&self.root.join("etc/passwd"), peer.uid) {
            out.push(Selector { kind: "unix".into(), value: format!("user:{name}") });
        }
        if let Some(name) = lookup_name(&self.root.join("etc/group"), peer.gid) {
            out.push(Selector { kind: "unix".into(), value: format!("group:{name}") });
        }
        if let Some(pid) = peer.pid.filter(|p| *p > 0) {
            let link = self.root.join(format!("proc/{pid}/exe"));
            // A process that exits mid-attestation loses only its path selectors.
            if let Ok(exe) = std::fs::read_link(&link) {
                let exe_in_root = if self.root == Path::new("/") {
                    exe.clone()
                } else {
                    self.root.join(exe.strip_prefix("/").unwrap_or(&exe))
                };
                out.push(Selector { kind: "unix".into(), value: format!("path:{}", exe.display()) });
                if (self.wants_hash)()
                    && let Some(h) = self.sha256_of(&exe_in_root)
                {
                    out.push(Selector { kind: "unix".into(), value: format!("sha256:{h}") });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_attestor_reports_ids_names_path_and_hash() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("proc/42")).unwrap();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::write(r.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\nweb:x:1000:1000::/home/web:/bin/sh\n")
            .unwrap();
        std::fs::write(r.join("etc/group"), "root:x:0:\nwebgrp:x:1000:\n").unwrap();
        std::fs::write(r.join("usr/bin/app"), b"hello").unwrap();
        std::os::unix::fs::symlink("/usr/bin/app", r.join("proc/42/exe")).unwrap();
        let a = UnixAttestor::with_root(r);
        let sel: Vec<String> = a
            .attest(PeerCred { pid: Some(42), uid: 1000, gid: 1000 })
            .await
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            sel,
            vec![
                "unix:uid:1000",
                "unix:gid:1000",
                "unix:user:web",
                "unix:group:webgrp",
                "unix:path:/usr/bin/app",
                // sha256("hello")
                "unix:sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            ]
        );
    }

    #[tokio::test]
    async fn executables_are_hashed_only_when_an_entry_needs_it() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("proc/42")).unwrap();
        std::fs::create_dir_all(r.join("bin")).unwrap();
        std::fs::write(r.join("bin/app"), b"x").unwrap();
        std::os::unix::fs::symlink("/bin/app", r.join("proc/42/exe")).unwrap();
        let a = UnixAttestor::with_root(r).hashing_when(std::sync::Arc::new(|| false));
        let sel = a.attest(PeerCred { pid: Some(42), uid: 1, gid: 1 }).await.unwrap();
        assert!(sel.iter().any(|s| s.value == "path:/bin/app"));
        assert!(!sel.iter().any(|s| s.value.starts_with("sha256:")));
    }

    #[tokio::test]
    async fn a_vanished_process_still_gets_id_selectors() {
        let a = UnixAttestor::with_root(tempfile::tempdir().unwrap().path());
        let sel = a.attest(PeerCred { pid: Some(999_999), uid: 7, gid: 8 }).await.unwrap();
        assert_eq!(sel.len(), 2);
    }
}
