//! Crash-safe file writes: write a temp file, fsync it, rename over the target, fsync the
//! directory. A reader sees the old file or the new one, never a torn one.
//!
//! The temp file has a random name and is created with `O_CREAT | O_EXCL | O_NOFOLLOW` and
//! its final mode (0600 for keys) in the target directory, so nothing planted there (a
//! symlink, a file made in advance) receives the content; `rename` replaces a symlink at the
//! target rather than following it. A directory that other users may write to is refused,
//! sticky or not: whoever can write there could swap (or plant first) the files a workload
//! reads, its roots included.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Atomically replaces `path` with `data`, created with `mode` (e.g. 0o600 for keys).
pub fn atomic_write(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let meta = fs::metadata(dir)?;
    // Writable by others: anyone may replace the files, or (sticky, as /tmp) plant one at the
    // target's name first, for a workload to read.
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
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{:016x}", rand::random::<u64>()));
    let tmp = dir.join(tmp_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(mode)
        .open(&tmp)?;
    let result = (|| {
        f.write_all(data)?;
        f.sync_all()?;
        rename_durable(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Renames `from` over `to` and fsyncs the directory of `to`, so that the rename survives a
/// crash. Both must be in the same directory (a rename does not cross it atomically).
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    let dir = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::rename(from, to)?;
    fs::File::open(dir)?.sync_all()
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
}
