//! Small file-system helpers: error mapping with paths, timestamp files, durable renames.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_core::{Error, ErrorKind};

/// Mode of files the store creates before they are committed.
pub(crate) const FILE_MODE: u32 = 0o644;
/// Mode of committed blobs: read-only, so nothing rewrites bytes that a digest vouches for.
pub(crate) const BLOB_MODE: u32 = 0o444;

/// An I/O failure as an error that names what was being done and the path.
pub(crate) fn io_error(what: &str, path: &Path, err: io::Error) -> Error {
    let kind = match err.kind() {
        // A full disk is a limit the operator can lift, not a fault of the daemon.
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorKind::ResourceExhausted,
        _ => ErrorKind::Internal,
    };
    Error::new(kind, format!("{what} {}: {err}", path.display()))
}

/// Runs blocking file-system work off the async threads.
pub(crate) async fn blocking<T, F>(work: F) -> berth_core::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> berth_core::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::internal(format!("content store task failed: {e}")))?
}

/// Nanoseconds since the epoch; times before it (a badly set clock) count as the epoch.
pub(crate) fn to_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

fn from_nanos(nanos: u128) -> Option<SystemTime> {
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    // The remainder of a division by 10^9 always fits.
    let sub = (nanos % 1_000_000_000) as u32;
    UNIX_EPOCH.checked_add(Duration::new(secs, sub))
}

/// Reads a small text file; `Ok(None)` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> berth_core::Result<Option<String>> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| Error::internal(format!("{} is not UTF-8", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", path, e)),
    }
}

/// Reads a timestamp file (decimal unix nanoseconds); `Ok(None)` when absent.
pub(crate) fn read_time(path: &Path) -> berth_core::Result<Option<SystemTime>> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    text.trim()
        .parse::<u128>()
        .ok()
        .and_then(from_nanos)
        .map(Some)
        .ok_or_else(|| Error::internal(format!("{} holds no timestamp", path.display())))
}

/// Replaces a small file through a temporary file and a rename, so a reader never sees it
/// half written. Not fsynced: these files describe ingests, whose data is re-verified on
/// resume, so losing the newest version to a power cut costs nothing but a restart.
pub(crate) fn replace_file(path: &Path, contents: &[u8]) -> berth_core::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(tmp)
        .map_err(|e| io_error("create", tmp, e))?;
    file.write_all(contents)
        .map_err(|e| io_error("write", tmp, e))?;
    drop(file);
    fs::rename(tmp, path).map_err(|e| io_error("rename into", path, e))
}

/// Writes a timestamp file.
pub(crate) fn write_time(path: &Path, t: SystemTime) -> berth_core::Result<()> {
    replace_file(path, to_nanos(t).to_string().as_bytes())
}

/// Removes a file; a missing one is fine.
pub(crate) fn remove_if_present(path: &Path) -> berth_core::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error("remove", path, e)),
        _ => Ok(()),
    }
}

/// Flushes a directory's entries, so a rename into it survives a power cut.
pub(crate) fn sync_dir(dir: &Path) -> berth_core::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync directory", dir, e))
}

/// Renames `from` to `to` unless `to` exists; `Ok(false)` when it does.
///
/// `renameat2(RENAME_NOREPLACE)` makes the check and the rename one step, so two commits of
/// the same blob from different refs cannot both report a new blob. File systems without it
/// fall back to a check then a plain rename, whose race only ever replaces a blob with
/// identical bytes.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> berth_core::Result<bool> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::errno::Errno;
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(true),
            Err(Errno::EEXIST) => return Ok(false),
            Err(Errno::EINVAL | Errno::ENOSYS) => {}
            Err(e) => return Err(io_error("rename into", to, io::Error::from(e))),
        }
    }
    if fs::symlink_metadata(to).is_ok() {
        return Ok(false);
    }
    fs::rename(from, to).map_err(|e| io_error("rename into", to, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_to_the_nanosecond() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t");
        let now = SystemTime::now();
        write_time(&path, now).expect("write");
        assert_eq!(read_time(&path).expect("read"), Some(now));
        assert_eq!(read_time(&dir.path().join("absent")).expect("read"), None);
        fs::write(&path, "garbage").expect("write");
        assert!(read_time(&path).is_err());
    }

    #[test]
    fn rename_noreplace_refuses_an_existing_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, "a").expect("write");
        fs::write(&b, "b").expect("write");
        assert!(!rename_noreplace(&a, &b).expect("rename"));
        assert_eq!(fs::read(&b).expect("read"), b"b");
        fs::remove_file(&b).expect("remove");
        assert!(rename_noreplace(&a, &b).expect("rename"));
        assert_eq!(fs::read(&b).expect("read"), b"a");
    }
}
