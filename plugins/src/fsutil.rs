//! Crash-safe file writes: write a temp file, fsync it, rename over the target, fsync the
//! directory. A reader sees the old file or the new one, never a torn one.
//!
//! The temp file has a random name and is created with `O_CREAT | O_EXCL | O_NOFOLLOW` and
//! its final mode (0600 for keys) in the target directory, so nothing planted there (a
//! symlink, a file made in advance) receives the content; `rename` replaces a symlink at the
//! target rather than following it. A directory that other users may write to is refused,
//! sticky or not: whoever can write there could swap (or plant first) the files a workload
//! reads, its roots included.
//!
//! [`replace_set`] replaces several files as one (a key and its certificate chain), by a
//! symlink swap like the kubelet's for secret volumes.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Atomically replaces `path` with `data`, created with `mode` (e.g. 0o600 for keys).
pub fn atomic_write(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path);
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    refuse_open_dir(dir, name)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{:016x}", rand::random::<u64>()));
    let tmp = dir.join(tmp_name);
    write_new(&tmp, data, mode)?;
    rename_into_place(&tmp, path)
}

/// [`rename_durable`], and on failure the temp name removed (when the rename itself failed).
fn rename_into_place(tmp: &Path, to: &Path) -> io::Result<()> {
    let result = rename_durable(tmp, to);
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// The symlink in a [`replace_set`] directory that names the current version.
pub const CURRENT: &str = "..data";

/// Replaces a set of files in `dir` as one, the way the kubelet updates a mounted secret:
/// the files go into a new version directory `..<unix seconds>_<random>` beside them, the
/// symlink `..data` is swapped to it by one rename, and each name in `dir` is a symlink to
/// `..data/<name>`. A reader that resolves `..data` once (Envoy's `watched_directory`, or
/// `..data/key.pem` then `..data/cert-chain.pem` through one canonical path) sees one version
/// of every file; a reader opening the names one by one can still straddle a swap, as with
/// any Kubernetes secret volume. Versions that are not current (the previous one, one a crash
/// left before its swap) are removed afterwards; regular files already at the names (an
/// earlier release wrote them in place) become links, each by rename.
pub fn replace_set(dir: &Path, files: &[(&str, &[u8], u32)]) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    refuse_open_dir(dir, std::ffi::OsStr::new(CURRENT))?;
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let version = format!("..{unix}_{:016x}", rand::random::<u64>());
    let version_dir = dir.join(&version);
    fs::DirBuilder::new().mode(0o755).create(&version_dir)?;
    let written = (|| {
        for (name, data, mode) in files {
            write_new(&version_dir.join(name), data, *mode)?;
        }
        fs::File::open(&version_dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&version_dir);
        return Err(e);
    }
    // Not removed when this fails: the rename may have been done before the directory's fsync
    // failed, and ..data then names this version. One it does not name goes at the next write.
    link_durable(dir, CURRENT, Path::new(&version))?;
    for (name, ..) in files {
        let target = Path::new(CURRENT).join(name);
        if fs::read_link(dir.join(name)).ok().as_deref() != Some(target.as_path()) {
            link_durable(dir, name, &target)?;
        }
    }
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if name != version.as_str() && is_version_name(&name) && e.file_type()?.is_dir() {
            fs::remove_dir_all(e.path())?;
        }
    }
    Ok(())
}

/// `..<digits>_<16 hex digits>`: a version directory [`replace_set`] made, and nothing else.
fn is_version_name(name: &std::ffi::OsStr) -> bool {
    let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("..")) else { return false };
    let Some((secs, random)) = rest.split_once('_') else { return false };
    !secs.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 16
        && random.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Makes `dir/name` a symlink to `target` by renaming a new link over it (a rename replaces
/// whatever is there, and never follows it), durably.
fn link_durable(dir: &Path, name: &str, target: &Path) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.link-{:016x}", rand::random::<u64>()));
    std::os::unix::fs::symlink(target, &tmp)?;
    rename_into_place(&tmp, &dir.join(name))
}

/// Creates `path`, which must not exist, with `mode`, and writes `data` durably. `O_EXCL |
/// O_NOFOLLOW`: nothing planted at the name (a symlink, a file made in advance) receives it.
fn write_new(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(mode)
        .open(path)?;
    let result = f.write_all(data).and_then(|()| f.sync_all());
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
}

/// Refuses a directory other users may write to, sticky or not: anyone may replace the files
/// there, or (sticky, as /tmp) plant one at the target's name first, for a workload to read.
fn refuse_open_dir(dir: &Path, name: &std::ffi::OsStr) -> io::Result<()> {
    let meta = fs::metadata(dir)?;
    if meta.permissions().mode() & 0o002 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is writable by other users (mode {:o}): refusing to write {} there; make it writable by its owner only",
                dir.display(),
                meta.permissions().mode() & 0o7777,
                name.to_string_lossy()
            ),
        ));
    }
    Ok(())
}

fn parent(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Renames `from` over `to` and fsyncs the directory of `to`, so that the rename survives a
/// crash. Both must be in the same directory (a rename does not cross it atomically).
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    fs::File::open(parent(to))?.sync_all()
}

/// Creates `dir` (and parents) when missing, and makes `dir` itself mode 0700 even when it
/// already existed.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_content_with_the_given_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        atomic_write(&p, b"one", 0o600).unwrap();
        atomic_write(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1, "temp file left behind");
    }

    #[test]
    fn a_planted_symlink_or_file_does_not_receive_the_key_and_open_directories_are_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let stolen = elsewhere.path().join("stolen");
        // The old temp name was predictable (`.key.pem.tmp<pid>`): plant a symlink there.
        let old_tmp = d.path().join(format!(".key.pem.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&stolen, &old_tmp).unwrap();
        let target = d.path().join("key.pem");
        std::os::unix::fs::symlink(&stolen, &target).unwrap();
        atomic_write(&target, b"SECRET KEY", 0o600).unwrap();
        assert!(!stolen.exists(), "the key went through a planted symlink");
        assert_eq!(fs::read(&target).unwrap(), b"SECRET KEY");
        assert!(!fs::symlink_metadata(&target).unwrap().file_type().is_symlink(), "the target is still a symlink");
        assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
        // A directory anyone may write to is refused, and nothing is written there.
        let open = tempfile::tempdir().unwrap();
        fs::set_permissions(open.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = atomic_write(&open.path().join("key.pem"), b"SECRET KEY", 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("writable by other users"), "{e}");
        assert_eq!(fs::read_dir(open.path()).unwrap().count(), 0);
    }

    fn versions(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| is_version_name(std::ffi::OsStr::new(n)))
            .collect();
        v.sort();
        v
    }

    fn set<'a>(key: &'a [u8], chain: &'a [u8]) -> [(&'a str, &'a [u8], u32); 2] {
        [("key.pem", key, 0o600), ("cert-chain.pem", chain, 0o644)]
    }

    #[test]
    fn a_set_is_written_behind_links_and_a_second_one_replaces_it_whole() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        replace_set(dir, &set(b"key one", b"chain one")).unwrap();
        for (name, want) in [("key.pem", "key one"), ("cert-chain.pem", "chain one")] {
            assert_eq!(fs::read_link(dir.join(name)).unwrap(), Path::new("..data").join(name));
            assert_eq!(fs::read_to_string(dir.join(name)).unwrap(), want);
        }
        assert_eq!(fs::metadata(dir.join("key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
        let first = versions(dir);
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(fs::read_link(dir.join(CURRENT)).unwrap(), Path::new(&first[0]));

        replace_set(dir, &set(b"key two", b"chain two")).unwrap();
        assert_eq!(fs::read_to_string(dir.join("key.pem")).unwrap(), "key two");
        assert_eq!(fs::read_to_string(dir.join("cert-chain.pem")).unwrap(), "chain two");
        let second = versions(dir);
        assert_eq!(second.len(), 1, "the previous version is still there: {second:?}");
        assert_ne!(first, second);
        // Nothing else: the two links, ..data, the version; no temp name left.
        assert_eq!(fs::read_dir(dir).unwrap().count(), 4);
    }

    #[test]
    fn files_written_in_place_become_links_and_only_our_leftovers_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        // An earlier release wrote the files in place; a crash left a version unswapped.
        fs::write(dir.join("key.pem"), b"old key").unwrap();
        fs::write(dir.join("cert-chain.pem"), b"old chain").unwrap();
        fs::create_dir(dir.join("..1764000000_00000000deadbeef")).unwrap();
        fs::write(dir.join("..1764000000_00000000deadbeef/key.pem"), b"cut").unwrap();
        // Not ours: left alone.
        fs::create_dir(dir.join("..2024_01_02_03_04_05.123")).unwrap();
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        replace_set(dir, &set(b"new key", b"new chain")).unwrap();
        assert!(fs::symlink_metadata(dir.join("key.pem")).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(dir.join("key.pem")).unwrap(), "new key");
        assert_eq!(fs::read_to_string(dir.join("cert-chain.pem")).unwrap(), "new chain");
        assert_eq!(versions(dir).len(), 1);
        assert!(dir.join("..2024_01_02_03_04_05.123").is_dir());
        assert_eq!(fs::read(dir.join("notes.txt")).unwrap(), b"mine");
    }

    #[test]
    fn a_reader_through_one_resolved_version_never_sees_a_key_and_chain_from_two() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        replace_set(&dir, &set(b"0", b"0")).unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let swaps = std::sync::Arc::new(AtomicU64::new(0));
        let writer = {
            let (dir, stop, swaps) = (dir.clone(), stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let v = (swaps.load(Ordering::Relaxed) + 1).to_string();
                    replace_set(&dir, &set(v.as_bytes(), v.as_bytes())).unwrap();
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let (mut read, mut mismatched) = (0, 0);
        // Reads until the writer has swapped 50 times (each swap is a few fsyncs).
        while swaps.load(Ordering::Relaxed) < 50 && !writer.is_finished() {
            // A version removed between resolving and reading: resolve again.
            let Ok(version) = fs::canonicalize(dir.join(CURRENT)) else { continue };
            let (Ok(key), Ok(chain)) = (fs::read(version.join("key.pem")), fs::read(version.join("cert-chain.pem")))
            else {
                continue;
            };
            read += 1;
            mismatched += usize::from(key != chain);
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(read > 50, "only {read} reads while the writer swapped");
        assert_eq!(mismatched, 0, "{mismatched} of {read} reads mixed two versions");
    }

    #[test]
    fn a_set_in_an_open_directory_is_refused_and_nothing_is_written() {
        let open = tempfile::tempdir().unwrap();
        fs::set_permissions(open.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = replace_set(open.path(), &set(b"SECRET KEY", b"chain")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(fs::read_dir(open.path()).unwrap().count(), 0);
    }
}
