//! Cert files for proxyless gRPC and for applications that read files: for each configured
//! SPIFFE ID, `cert-chain.pem`, `key.pem` (0600) and `root-cert.pem` (our bundle), rewritten
//! whenever the SVID or the bundle changes (the names Istio's proxyless gRPC bootstrap
//! expects). The three are replaced as one set by a `..data` symlink swap, as the kubelet
//! updates a secret volume ([`replace_set`]).

use std::path::Path;
use std::sync::Arc;

use tessera_plugins::fsutil::replace_set;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::CertFiles;
use crate::manager::{Manager, Snapshot};

/// Writes the files for `target` from `snap`; returns what was written (serial, bundle
/// sequence), or None when the SVID is not there yet.
pub fn write_once(target: &CertFiles, snap: &Snapshot) -> std::io::Result<Option<(String, u64)>> {
    let Some(svid) = snap.svids.iter().find(|s| s.entry.spiffe_id == target.spiffe_id) else { return Ok(None) };
    let dir: &Path = &target.dir;
    std::fs::create_dir_all(dir)?;
    let key = svid.key.to_pem();
    let chain = tessera_identity::pem::encode_certs(svid.chain.iter().map(Vec::as_slice));
    let roots = snap.bundle.x509_pem();
    replace_set(
        dir,
        &[
            ("key.pem", key.as_bytes(), 0o600),
            ("cert-chain.pem", chain.as_bytes(), 0o644),
            ("root-cert.pem", roots.as_bytes(), 0o644),
        ],
    )?;
    Ok(Some((svid.serial.clone(), snap.bundle.sequence_number)))
}

/// Keeps every target's files current until shutdown.
pub async fn run(mgr: Arc<Manager>, targets: Vec<CertFiles>, mut shutdown: watch::Receiver<bool>) {
    if targets.is_empty() {
        return;
    }
    let mut snaps = mgr.subscribe();
    let mut written: Vec<Option<(String, u64)>> = vec![None; targets.len()];
    loop {
        let snap = snaps.borrow_and_update().clone();
        for (t, last) in targets.iter().zip(written.iter_mut()) {
            let current = snap
                .svids
                .iter()
                .find(|s| s.entry.spiffe_id == t.spiffe_id)
                .map(|s| (s.serial.clone(), snap.bundle.sequence_number));
            if current.is_none() || current == *last {
                continue;
            }
            match write_once(t, &snap) {
                Ok(w) => {
                    info!(spiffe_id = %t.spiffe_id, dir = %t.dir.display(), "Cert files written");
                    *last = w;
                }
                Err(e) => {
                    warn!(spiffe_id = %t.spiffe_id, dir = %t.dir.display(), error = %e, "Cannot write cert files")
                }
            }
        }
        tokio::select! {
            c = snaps.changed() => if c.is_err() { break },
            _ = shutdown.changed() => break,
        }
    }
}
