//! The agent's admin socket: `doctor`, `debug info` and `debug sds` for the local operator.
//! A Unix socket, mode 0600, answering only its owner and root, in the agent's data
//! directory by default (never in the directory workloads see). One request line
//! (`doctor`, `info` or `sds`), one JSON answer, then the connection closes. Bounded: 16
//! connections at once, a 64-byte request, 5 seconds to send it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::manager::Manager;

/// Most connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// Longest request line.
const MAX_REQUEST: u64 = 64;
/// Time to send the request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the admin socket at `path` (0600), replacing a stale one; returns it and its owner.
pub async fn bind(path: &Path) -> std::io::Result<(UnixListener, u32)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        tessera_plugins::fsutil::ensure_private_dir(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("admin socket {} is in use by another agent", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let owner = std::fs::metadata(path)?.uid();
    Ok((l, owner))
}

/// The JSON answer to one request line.
pub fn answer(mgr: &Arc<Manager>, request: &str) -> String {
    let v = match request.trim() {
        "doctor" => serde_json::to_value(crate::doctor::doctor(mgr)),
        "info" => serde_json::to_value(crate::doctor::info(mgr)),
        "sds" => serde_json::to_value(serde_json::json!({"streams": mgr.observed.sds.list()})),
        other => Ok(serde_json::json!({"error": format!("unknown request {other:?}: expected doctor, info or sds")})),
    };
    v.map(|v| v.to_string()).unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}).to_string())
}

async fn serve_one(mut conn: UnixStream, mgr: Arc<Manager>, owner: u32) {
    let uid = conn.peer_cred().map(|c| c.uid()).ok();
    if !uid.is_some_and(|u| u == owner || u == 0) {
        let _ = conn.write_all(b"{\"error\":\"the admin socket answers only the agent's user and root\"}\n").await;
        return;
    }
    let (r, mut w) = conn.split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(r.take(MAX_REQUEST));
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            debug!(error = %e, "Admin socket: cannot read the request");
            return;
        }
        Err(_) => return,
    }
    let body = answer(&mgr, &line);
    let _ = w.write_all(body.as_bytes()).await;
    let _ = w.write_all(b"\n").await;
}

/// Serves until shutdown, then removes the socket.
pub async fn serve(
    l: UnixListener,
    path: std::path::PathBuf,
    mgr: Arc<Manager>,
    owner: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            a = l.accept() => match a {
                Ok((conn, _)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        debug!("Admin socket: connection refused at the cap");
                        continue;
                    };
                    let mgr = mgr.clone();
                    tokio::spawn(async move {
                        serve_one(conn, mgr, owner).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!(error = %e, "Admin socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Asks the agent at `socket` for `request`; the JSON answer.
pub async fn ask(socket: &Path, request: &str) -> std::io::Result<serde_json::Value> {
    let mut conn = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(socket))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting timed out"))??;
    conn.write_all(format!("{request}\n").as_bytes()).await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.take(64 * 1024 * 1024).read_to_end(&mut body))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 30 s"))??;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an admin answer: {e}")))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(std::io::Error::other(e.to_owned()));
    }
    Ok(v)
}
