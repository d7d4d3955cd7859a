//! Workload attestation: who is calling on the socket?
//!
//! The caller's Unix peer credentials (`SO_PEERCRED`: pid, uid, gid) are turned into selectors
//! by each [`WorkloadAttestor`]. The built-in `unix` attestor produces `unix:uid:N`,
//! `unix:gid:N`, `unix:user:NAME`, `unix:group:NAME`, `unix:path:/abs/exe` and
//! `unix:sha256:HEX` (of the executable). The Kubernetes attestor (`k8s_attestor`) sits
//! behind the same trait.
//!
//! The executable is the file the kernel runs, reached through `/proc/<pid>/exe` itself, never
//! through the path that link names: a process in another mount namespace (any container, or
//! `unshare -m` with a bind mount) names a path that means another file here. So
//! `unix:sha256` is the hash of the file the process really runs, and `unix:path` is given
//! only when that path, resolved in the agent's own mount namespace, is that very file (same
//! device and inode). Hashes are cached by device, inode, size and nanosecond mtime and
//! ctime (a rewrite changes ctime, which no call can set back), files over
//! [`MAX_HASHED_BYTES`] are not hashed, and hashing runs on the blocking pool.
//!
//! [`ProcessStamp`] lets a caller check, once its answer is built, that the pid still runs
//! the same executable (same inode, same start time): a process that exits, or exec()s
//! another program, while it is being attested gets nothing. What this cannot catch: a
//! process that connects, forks, and lets a child that runs other code use the inherited
//! socket while the parent stays as it was (see SECURITY.md).

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use async_trait::async_trait;
use tessera_identity::Selector;

/// Executables larger than this are not hashed (no `unix:sha256` selector).
pub const MAX_HASHED_BYTES: u64 = 256 << 20;
/// Executables not in the cache that one uid may have hashed: a burst, then a steady rate.
/// Past it a caller gets no `unix:sha256` selector (fails closed) until the budget refills.
const HASHES_BURST: f64 = 20.0;
const HASHES_PER_SECOND: f64 = 1.0;
/// Hashes kept, most recently used first.
const HASH_CACHE_ENTRIES: usize = 1024;

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
pub type WantsExeHash = Arc<dyn Fn() -> bool + Send + Sync>;

/// What identifies a process over time: its start time (clock ticks since boot, from
/// `/proc/<pid>/stat`, readable by anyone) and the device and inode of the executable it runs
/// (when the agent may read `/proc/<pid>/exe`: the same user, or `CAP_SYS_PTRACE`). A pid
/// reused by another process has another start time; a process that exec()s another file
/// has another executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessStamp {
    start_time: u64,
    exe: Option<(u64, u64)>,
}

impl ProcessStamp {
    /// The stamp of `pid` now, under `proc_root` (`/proc`).
    pub fn read(proc_root: &Path, pid: i32) -> std::io::Result<Self> {
        let dir = proc_root.join(pid.to_string());
        let stat = std::fs::read_to_string(dir.join("stat"))?;
        // The command name (field 2) is in parentheses and may hold spaces: count after it.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let start_time = after
            .split_whitespace()
            .nth(19)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "unreadable /proc/<pid>/stat"))?;
        let exe = std::fs::metadata(dir.join("exe")).ok().map(|m| (m.dev(), m.ino()));
        Ok(Self { start_time, exe })
    }
}

/// What the hash cache is keyed by: the file, and everything a rewrite changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A small LRU of executable hashes.
#[derive(Debug, Default)]
struct HashCache {
    entries: HashMap<FileKey, (String, u64)>,
    tick: u64,
}

impl HashCache {
    fn get(&mut self, k: &FileKey) -> Option<String> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(k).map(|(h, used)| {
            *used = tick;
            h.clone()
        })
    }

    fn put(&mut self, k: FileKey, h: String) {
        self.tick += 1;
        if self.entries.len() >= HASH_CACHE_ENTRIES
            && let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k)
        {
            self.entries.remove(&oldest);
        }
        self.entries.insert(k, (h, self.tick));
    }
}

/// The `unix` attestor.
pub struct UnixAttestor {
    root: PathBuf,
    hashes: Arc<Mutex<HashCache>>,
    wants_hash: WantsExeHash,
    /// One hash at a time (held on the blocking pool while hashing), and how many wait.
    hashing: Arc<(Mutex<()>, std::sync::atomic::AtomicUsize)>,
    /// Uncached hashes left per uid, and when that was counted.
    budgets: Arc<Mutex<HashMap<u32, (f64, std::time::Instant)>>>,
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

/// SHA-256 of an open file, read to its end (at most `limit` bytes; `None` beyond).
fn sha256_of(mut f: std::fs::File, limit: u64) -> Option<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return None;
        }
        ctx.update(buf.get(..n)?);
    }
    Some(tessera_identity::x509::hex_lower(ctx.finish().as_ref()))
}

/// Callers that may wait for the hashing lock; past that, no hash.
const MAX_HASH_WAITERS: usize = 8;

/// Decrements a waiting count when dropped.
struct Leave<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What hashing may use: the cache, the one-at-a-time lock, and the caller's budget.
struct Hashing<'a> {
    cache: &'a Mutex<HashCache>,
    lock: &'a (Mutex<()>, std::sync::atomic::AtomicUsize),
    budgets: &'a Mutex<HashMap<u32, (f64, std::time::Instant)>>,
    uid: u32,
}

impl Hashing<'_> {
    /// Takes one uncached hash from the uid's budget.
    fn spend(&self) -> bool {
        let mut b = self.budgets.lock();
        let now = std::time::Instant::now();
        if b.len() > 10_000 {
            b.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * HASHES_PER_SECOND < HASHES_BURST);
        }
        let (tokens, at) = b.entry(self.uid).or_insert((HASHES_BURST, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * HASHES_PER_SECOND).min(HASHES_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The executable's selectors, computed off the async workers: `path` when the path the link
/// names is, in our mount namespace, the file the process runs; `sha256` of that file.
fn exe_selectors(root: &Path, pid: i32, hashing: Option<Hashing<'_>>) -> Vec<Selector> {
    let link = root.join(format!("proc/{pid}/exe"));
    // Opening the link itself opens the file the kernel runs, whatever mount namespace the
    // process is in. A process that exits mid-attestation loses only these selectors.
    let Ok(file) = std::fs::File::open(&link) else { return Vec::new() };
    let Ok(meta) = file.metadata() else { return Vec::new() };
    let mut out = Vec::new();
    if let Ok(named) = std::fs::read_link(&link) {
        let here =
            if root == Path::new("/") { named.clone() } else { root.join(named.strip_prefix("/").unwrap_or(&named)) };
        let same = std::fs::metadata(&here).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino());
        if same && named.is_absolute() {
            out.push(Selector { kind: "unix".into(), value: format!("path:{}", named.display()) });
        }
    }
    if let Some(hs) = hashing
        && meta.is_file()
        && meta.len() <= MAX_HASHED_BYTES
    {
        let key = FileKey::of(&meta);
        let cached = hs.cache.lock().get(&key);
        let h = match cached {
            Some(h) => Some(h),
            None if !hs.spend() => {
                tracing::warn!(
                    pid,
                    uid = hs.uid,
                    "Caller's uid is over its executable-hashing budget: no unix:sha256 selector"
                );
                None
            }
            None => {
                // A bounded queue: past it, callers get no hash rather than a blocking-pool
                // thread each, waiting.
                use std::sync::atomic::Ordering;
                let waiting = hs.lock.1.fetch_add(1, Ordering::SeqCst);
                let _leave = Leave(&hs.lock.1);
                if waiting >= MAX_HASH_WAITERS {
                    tracing::warn!(pid, "Too many executables waiting to be hashed: no unix:sha256 selector");
                    return out;
                }
                let _one_at_a_time = hs.lock.0.lock();
                let h = sha256_of(file, MAX_HASHED_BYTES);
                if let Some(h) = &h {
                    hs.cache.lock().put(key, h.clone());
                }
                h
            }
        };
        if let Some(h) = h {
            out.push(Selector { kind: "unix".into(), value: format!("sha256:{h}") });
        }
    }
    out
}

impl UnixAttestor {
    /// An attestor reading `/proc` and `/etc` under `root` (tests use a fake root).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            hashes: Arc::default(),
            wants_hash: Arc::new(|| true),
            hashing: Arc::default(),
            budgets: Arc::default(),
        }
    }

    /// Hash executables only while `wants_hash` says some entry uses `unix:sha256`.
    pub fn hashing_when(mut self, wants_hash: WantsExeHash) -> Self {
        self.wants_hash = wants_hash;
        self
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
            let (root, cache, hash) = (self.root.clone(), self.hashes.clone(), (self.wants_hash)());
            let (lock, budgets, uid) = (self.hashing.clone(), self.budgets.clone(), peer.uid);
            let exe = tokio::task::spawn_blocking(move || {
                let hashing = hash.then(|| Hashing { cache: &cache, lock: &lock, budgets: &budgets, uid });
                exe_selectors(&root, pid, hashing)
            })
            .await
            .map_err(|e| AttestError::Process { pid, reason: e.to_string() })?;
            out.extend(exe);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    /// A copy of `sleep` with `pad` appended (still runs), so that tests own its file.
    fn padded_sleep(dir: &Path, name: &str, pad: u8) -> PathBuf {
        let p = dir.join(name);
        let mut bytes = std::fs::read("/bin/sleep").unwrap();
        bytes.extend(std::iter::repeat_n(pad, 4096));
        std::fs::write(&p, bytes).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn run(exe: &Path) -> Kill {
        Kill(Command::new(exe).arg("30").spawn().unwrap())
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        tessera_identity::x509::hex_lower(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    }

    async fn selectors(a: &UnixAttestor, pid: u32) -> Vec<String> {
        let pid = i32::try_from(pid).unwrap();
        a.attest(PeerCred { pid: Some(pid), uid: 0, gid: 0 }).await.unwrap().iter().map(ToString::to_string).collect()
    }

    /// Waits until `/proc/<pid>/exe` names `exe` (the child has exec()ed).
    fn wait_exec(pid: u32, exe: &Path) {
        for _ in 0..400 {
            if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("process {pid} did not exec {}", exe.display());
    }

    #[tokio::test]
    async fn unix_attestor_reports_ids_names_path_and_hash_of_the_running_file() {
        let d = tempfile::tempdir().unwrap();
        let exe = padded_sleep(d.path(), "app", b'a');
        let p = run(&exe);
        wait_exec(p.0.id(), &exe);
        let sel = selectors(&UnixAttestor::default(), p.0.id()).await;
        assert!(sel.contains(&"unix:uid:0".to_owned()) && sel.contains(&"unix:user:root".to_owned()), "{sel:?}");
        assert!(sel.contains(&format!("unix:path:{}", exe.display())), "{sel:?}");
        assert!(sel.contains(&format!("unix:sha256:{}", sha256_hex(&std::fs::read(&exe).unwrap()))), "{sel:?}");
    }

    #[tokio::test]
    async fn names_come_from_the_passwd_and_group_files() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\nweb:x:1000:1000::/home/web:/bin/sh\n")
            .unwrap();
        std::fs::write(r.join("etc/group"), "root:x:0:\nwebgrp:x:1000:\n").unwrap();
        let a = UnixAttestor::with_root(r);
        let sel: Vec<String> = a
            .attest(PeerCred { pid: None, uid: 1000, gid: 1000 })
            .await
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(sel, vec!["unix:uid:1000", "unix:gid:1000", "unix:user:web", "unix:group:webgrp"]);
    }

    #[tokio::test]
    async fn executables_are_hashed_only_when_an_entry_needs_it() {
        let d = tempfile::tempdir().unwrap();
        let exe = padded_sleep(d.path(), "app", b'x');
        let p = run(&exe);
        wait_exec(p.0.id(), &exe);
        let a = UnixAttestor::default().hashing_when(Arc::new(|| false));
        let sel = selectors(&a, p.0.id()).await;
        assert!(sel.iter().any(|s| s.starts_with("unix:path:")), "{sel:?}");
        assert!(!sel.iter().any(|s| s.starts_with("unix:sha256:")), "{sel:?}");
    }

    #[tokio::test]
    async fn a_vanished_process_still_gets_id_selectors() {
        let a = UnixAttestor::with_root(tempfile::tempdir().unwrap().path());
        let sel = a.attest(PeerCred { pid: Some(999_999), uid: 7, gid: 8 }).await.unwrap();
        assert_eq!(sel.len(), 2);
    }

    /// F3(b) of the second review: the hash cache was keyed by path, size and mtime in
    /// seconds, so a file replaced at the same path and size, with its mtime set back, was
    /// given the old file's hash.
    #[tokio::test]
    async fn a_replaced_executable_with_the_same_size_and_mtime_gets_its_own_hash() {
        let d = tempfile::tempdir().unwrap();
        let exe = padded_sleep(d.path(), "app", b'a');
        let a = UnixAttestor::default();
        let first = run(&exe);
        wait_exec(first.0.id(), &exe);
        let before = selectors(&a, first.0.id()).await;
        let mtime = std::fs::metadata(&exe).unwrap().modified().unwrap();
        // Same path, same size, other content, mtime put back.
        let other = padded_sleep(d.path(), "other", b'b');
        std::fs::rename(&other, &exe).unwrap();
        std::fs::File::options().write(true).open(&exe).unwrap().set_modified(mtime).unwrap();
        let second = run(&exe);
        wait_exec(second.0.id(), &exe);
        let after = selectors(&a, second.0.id()).await;
        let want = format!("unix:sha256:{}", sha256_hex(&std::fs::read(&exe).unwrap()));
        assert!(after.contains(&want), "the replaced file got a stale hash: {after:?}");
        assert_ne!(before.iter().find(|s| s.contains("sha256")), after.iter().find(|s| s.contains("sha256")));
    }

    /// F3(a) of the second review: a process in its own mount namespace bind-mounts its own
    /// program over `/usr/bin/env` and runs it. It must get neither `unix:path:/usr/bin/env`
    /// nor the hash of our `/usr/bin/env`.
    #[tokio::test]
    async fn a_process_in_another_mount_namespace_cannot_borrow_a_host_path_or_hash() {
        let d = tempfile::tempdir().unwrap();
        let fake = padded_sleep(d.path(), "fake", b'f');
        let probe = Command::new("unshare").args(["-Urm", "true"]).status();
        if !probe.is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED: this machine does not allow `unshare -Urm` (user and mount namespaces)");
            return;
        }
        let script = format!("mount --bind {} /usr/bin/env && exec /usr/bin/env 30", fake.display());
        let p = Kill(Command::new("unshare").args(["-Urm", "sh", "-c", &script]).spawn().unwrap());
        let pid = p.0.id();
        // Wait until the process runs the fake (its exe link names /usr/bin/env, its own view).
        let fake_ino = std::fs::metadata(&fake).unwrap().ino();
        for _ in 0..400 {
            if std::fs::metadata(format!("/proc/{pid}/exe")).is_ok_and(|m| m.ino() == fake_ino) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(), Path::new("/usr/bin/env"));
        let sel = selectors(&UnixAttestor::default(), pid).await;
        assert!(!sel.contains(&"unix:path:/usr/bin/env".to_owned()), "borrowed the host path: {sel:?}");
        let host_env = format!("unix:sha256:{}", sha256_hex(&std::fs::read("/usr/bin/env").unwrap()));
        assert!(!sel.contains(&host_env), "borrowed the host file's hash: {sel:?}");
        let own = format!("unix:sha256:{}", sha256_hex(&std::fs::read(&fake).unwrap()));
        assert!(sel.contains(&own), "the hash is not of the file it runs: {sel:?}");
    }

    #[test]
    fn a_process_stamp_changes_when_the_process_execs_another_file() {
        let d = tempfile::tempdir().unwrap();
        let exe = padded_sleep(d.path(), "app", b's');
        let script = format!("read x; exec {} 30", exe.display());
        let mut child = Command::new("sh").args(["-c", &script]).stdin(std::process::Stdio::piped()).spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let before = ProcessStamp::read(Path::new("/proc"), pid).unwrap();
        assert_eq!(before, ProcessStamp::read(Path::new("/proc"), pid).unwrap(), "a stamp is stable");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        wait_exec(child.id(), &exe);
        let after = ProcessStamp::read(Path::new("/proc"), pid).unwrap();
        assert_ne!(before, after, "exec() went unnoticed");
        let _ = child.kill();
        let _ = child.wait();
        assert!(ProcessStamp::read(Path::new("/proc"), pid).is_err(), "a reaped process has no stamp");
    }
}
