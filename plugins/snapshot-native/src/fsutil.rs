//! File-system helpers of the directory snapshotters: a careful recursive copy and disk
//! usage. Both are blocking; callers run them on tokio's blocking pool.
//!
//! Errors carry the operation and the path they failed on ([`FsError`]).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use berth_core::error::{Classify, ErrorKind};
use berth_core::snapshot::Usage;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// A file-system step that failed, with the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct FsError {
    /// What was being done (`copy`, `read directory`, ...).
    pub op: &'static str,
    /// Where.
    pub path: PathBuf,
    /// The system's error.
    #[source]
    pub source: io::Error,
}

impl FsError {
    /// An error of `op` on `path`.
    pub fn new(op: &'static str, path: &Path, source: impl Into<io::Error>) -> Self {
        FsError {
            op,
            path: path.to_owned(),
            source: source.into(),
        }
    }
}

impl Classify for FsError {
    fn kind(&self) -> ErrorKind {
        // The snapshotter's own directories: whatever fails there is the daemon's problem,
        // not the caller's.
        match self.source.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                ErrorKind::ResourceExhausted
            }
            _ => ErrorKind::Internal,
        }
    }
}

impl From<FsError> for berth_core::Error {
    fn from(err: FsError) -> Self {
        berth_core::Error::new(err.kind(), err.to_string())
    }
}

/// Result of the helpers here.
pub type FsResult<T> = std::result::Result<T, FsError>;

fn at<T>(op: &'static str, path: &Path, r: io::Result<T>) -> FsResult<T> {
    r.map_err(|e| FsError::new(op, path, e))
}

fn nix_at<T>(op: &'static str, path: &Path, r: nix::Result<T>) -> FsResult<T> {
    r.map_err(|e| FsError::new(op, path, io::Error::from(e)))
}

/// Copies the directory tree `src` to `dst` (which must not exist), as containerd's
/// `continuity/fs.CopyDir` does for the native snapshotter: regular files (contents through
/// `copy_file_range` where the kernel offers it), directories, symlinks (their targets
/// verbatim, never followed), hard links (recreated as links, one copy per inode), devices,
/// FIFOs and sockets; with owners, modes (setuid/setgid/sticky included), extended
/// attributes and access/modification times.
///
/// Metadata is applied after contents, and a directory's after its children, so writing the
/// children does not change the times copied onto it and a read-only directory can still be
/// filled. Extended attributes the target file system refuses (`security.*` without
/// privilege, `user.*` on a symlink) are skipped with a debug log, as containerd does.
pub fn copy_tree(src: &Path, dst: &Path) -> FsResult<()> {
    let mut links = HashMap::new();
    copy_dir(src, dst, &mut links)
}

fn copy_dir(src: &Path, dst: &Path, links: &mut HashMap<(u64, u64), PathBuf>) -> FsResult<()> {
    let meta = at("stat", src, fs::symlink_metadata(src))?;
    at(
        "create directory",
        dst,
        fs::DirBuilder::new().mode(0o700).create(dst),
    )?;
    for entry in at("read directory", src, fs::read_dir(src))? {
        let entry = at("read directory", src, entry)?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let m = at("stat", &from, fs::symlink_metadata(&from))?;
        let ft = m.file_type();
        if ft.is_dir() {
            copy_dir(&from, &to, links)?;
            continue;
        }
        if m.nlink() > 1 {
            match links.get(&(m.dev(), m.ino())) {
                Some(first) => {
                    at("hard link", &to, fs::hard_link(first, &to))?;
                    continue;
                }
                None => {
                    links.insert((m.dev(), m.ino()), to.clone());
                }
            }
        }
        if ft.is_file() {
            copy_file(&from, &to)?;
        } else if ft.is_symlink() {
            let target = at("read link", &from, fs::read_link(&from))?;
            at(
                "create symlink",
                &to,
                std::os::unix::fs::symlink(&target, &to),
            )?;
        } else {
            let kind = if ft.is_char_device() {
                SFlag::S_IFCHR
            } else if ft.is_block_device() {
                SFlag::S_IFBLK
            } else if ft.is_fifo() {
                SFlag::S_IFIFO
            } else if ft.is_socket() {
                SFlag::S_IFSOCK
            } else {
                tracing::warn!(path = %from.display(), "unsupported file type, not copied");
                continue;
            };
            nix_at(
                "create special file",
                &to,
                nix::sys::stat::mknod(
                    &to,
                    kind,
                    Mode::from_bits_truncate(m.mode() & 0o7777),
                    m.rdev(),
                ),
            )?;
        }
        copy_metadata(&from, &to, &m)?;
    }
    copy_metadata(src, dst, &meta)
}

fn copy_file(from: &Path, to: &Path) -> FsResult<()> {
    let mut source = at("open", from, fs::File::open(from))?;
    let mut target = at(
        "create",
        to,
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to),
    )?;
    // std uses copy_file_range (a reflink where the file system can) and falls back to
    // read/write.
    at("copy", to, io::copy(&mut source, &mut target))?;
    Ok(())
}

fn copy_metadata(from: &Path, to: &Path, m: &fs::Metadata) -> FsResult<()> {
    at(
        "change owner",
        to,
        std::os::unix::fs::lchown(to, Some(m.uid()), Some(m.gid())),
    )?;
    if !m.file_type().is_symlink() {
        // After chown, which clears setuid and setgid.
        at(
            "change mode",
            to,
            fs::set_permissions(
                to,
                std::os::unix::fs::PermissionsExt::from_mode(m.mode() & 0o7777),
            ),
        )?;
    }
    copy_xattrs(from, to)?;
    nix_at(
        "set times",
        to,
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            to,
            &TimeSpec::new(m.atime(), m.atime_nsec()),
            &TimeSpec::new(m.mtime(), m.mtime_nsec()),
            UtimensatFlags::NoFollowSymlink,
        ),
    )
}

/// Names of the extended attributes of `path` (not following a symlink).
pub fn xattr_names(path: &Path) -> FsResult<Vec<Vec<u8>>> {
    loop {
        let size = match rustix::fs::llistxattr_query(path) {
            Ok(n) => n,
            Err(e) if e == rustix::io::Errno::NOTSUP => return Ok(Vec::new()),
            Err(e) => return Err(FsError::new("list xattrs", path, e)),
        };
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf
                    .split(|&b| b == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect());
            }
            // Grew between the two calls: ask again.
            Err(e) if e == rustix::io::Errno::RANGE => continue,
            Err(e) => return Err(FsError::new("list xattrs", path, e)),
        }
    }
}

/// The value of the extended attribute `name` of `path` (not following a symlink).
pub fn xattr_value(path: &Path, name: &[u8]) -> FsResult<Vec<u8>> {
    let name: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(name);
    loop {
        let size = rustix::fs::lgetxattr_query(path, name)
            .map_err(|e| FsError::new("read xattr", path, e))?;
        let mut buf = vec![0u8; size];
        if size == 0 {
            return Ok(buf);
        }
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e == rustix::io::Errno::RANGE => continue,
            Err(e) => return Err(FsError::new("read xattr", path, e)),
        }
    }
}

fn copy_xattrs(from: &Path, to: &Path) -> FsResult<()> {
    let names = match xattr_names(from) {
        Ok(names) => names,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list xattrs; none copied");
            return Ok(());
        }
    };
    for name in names {
        let value = match xattr_value(from, &name) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read xattr; not copied");
                continue;
            }
        };
        let os_name: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(&name);
        if let Err(e) = rustix::fs::lsetxattr(to, os_name, &value, rustix::fs::XattrFlags::empty())
        {
            // containerd ignores these too (moby/buildkit#1189): security.* often cannot be
            // set, and user.* cannot be set on symlinks.
            tracing::debug!(
                path = %to.display(),
                xattr = %String::from_utf8_lossy(&name),
                error = %e,
                "cannot copy xattr"
            );
        }
    }
    Ok(())
}

/// Disk usage of the tree at `root`: the bytes of its regular files and the number of its
/// inodes (`root` itself included), each hard-linked inode counted once. A missing `root` is
/// an empty usage (a view that has no directory of its own).
pub fn disk_usage(root: &Path) -> FsResult<Usage> {
    let top = match fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Usage::default()),
        Err(e) => return Err(FsError::new("stat", root, e)),
    };
    let mut seen = HashSet::new();
    let mut size: u64 = 0;
    let mut count = |m: &fs::Metadata| {
        if seen.insert((m.dev(), m.ino())) && m.file_type().is_file() {
            size = size.saturating_add(m.len());
        }
    };
    count(&top);
    let mut pending = Vec::new();
    if top.is_dir() {
        pending.push(root.to_owned());
    }
    while let Some(dir) = pending.pop() {
        for entry in at("read directory", &dir, fs::read_dir(&dir))? {
            let entry = at("read directory", &dir, entry)?;
            let path = entry.path();
            let m = at("stat", &path, fs::symlink_metadata(&path))?;
            count(&m);
            if m.is_dir() {
                pending.push(path);
            }
        }
    }
    let inodes = seen.len();
    Ok(Usage {
        size: i64::try_from(size).unwrap_or(i64::MAX),
        inodes: i64::try_from(inodes).unwrap_or(i64::MAX),
    })
}

/// Flushes a directory's entries (a rename into it) to disk.
pub fn sync_dir(dir: &Path) -> FsResult<()> {
    let f = at("open directory", dir, fs::File::open(dir))?;
    at("sync directory", dir, f.sync_all())
}

/// Marks `dir` as the top of unrelated directory hierarchies (ext4's `FS_TOPDIR_FL`, what
/// `chattr +T` sets): the Orlov allocator then chooses a block group afresh for each directory
/// made in it, spreading them over the groups with the fewest directories, instead of putting
/// it in its parent's group; the files below follow their directory. Each snapshot is such a
/// hierarchy. It matters most on ext4 without a journal, whose inode allocator skips every
/// free inode deleted in the last minute, one by one and again for the next file: without the
/// flag, an unpack after an image was removed lands in the group the removal just emptied and
/// pays that scan per file. Other flags are kept. Returns whether the flag is set; file
/// systems that do not take it (tmpfs, xfs, btrfs) leave the allocator as it is, which is no
/// error.
pub fn mark_top_of_hierarchies(dir: &Path) -> FsResult<bool> {
    use rustix::fs::{IFlags, ioctl_getflags, ioctl_setflags};
    let f = at("open directory", dir, fs::File::open(dir))?;
    // ENOTTY: no inode flags at all; EOPNOTSUPP: flags, but not this one (tmpfs, xfs, btrfs);
    // EINVAL: what some file systems answer for a flag they do not know.
    let unsupported = |e: rustix::io::Errno| {
        matches!(
            e,
            rustix::io::Errno::NOTTY | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL
        )
    };
    let flags = match ioctl_getflags(&f) {
        Ok(flags) => flags,
        Err(e) if unsupported(e) => return Ok(false),
        Err(e) => return at("read inode flags of", dir, Err(e.into())),
    };
    if flags.contains(IFlags::TOPDIR) {
        return Ok(true);
    }
    match ioctl_setflags(&f, flags | IFlags::TOPDIR) {
        Ok(()) => Ok(true),
        Err(e) if unsupported(e) => Ok(false),
        Err(e) => at("set the top-directory flag on", dir, Err(e.into())),
    }
}

/// Whether the file system of `dir` takes `FS_TOPDIR_FL`, found out by setting it on a
/// scratch directory made there with the ioctls themselves: tests skip where it does not
/// without trusting the function they test.
#[cfg(test)]
pub(crate) fn file_system_takes_topdir(dir: &Path) -> bool {
    use rustix::fs::{IFlags, ioctl_getflags, ioctl_setflags};
    let scratch = dir.join("topdir-probe");
    if fs::create_dir(&scratch).is_err() {
        return false;
    }
    let takes = fs::File::open(&scratch).is_ok_and(|f| {
        ioctl_getflags(&f).is_ok_and(|flags| {
            ioctl_setflags(&f, flags | IFlags::TOPDIR).is_ok()
                && ioctl_getflags(&f).is_ok_and(|after| after.contains(IFlags::TOPDIR))
        })
    });
    let _ = fs::remove_dir(&scratch);
    takes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn marking_the_top_directory_keeps_other_flags() {
        use rustix::fs::{IFlags, ioctl_getflags, ioctl_setflags};
        let dir = tempfile::tempdir().expect("tempdir");
        let top = dir.path().join("top");
        fs::create_dir(&top).expect("mkdir");
        if !file_system_takes_topdir(dir.path()) {
            eprintln!(
                "SKIPPED: the file system of {} does not take FS_TOPDIR_FL",
                dir.path().display()
            );
            return;
        }
        let f = fs::File::open(&top).expect("open");
        let before = ioctl_getflags(&f).expect("flags");
        // A flag of the user's, which marking must not clear.
        ioctl_setflags(&f, before | IFlags::NODUMP).expect("set NODUMP");
        assert!(mark_top_of_hierarchies(&top).expect("mark"));
        let after = ioctl_getflags(&f).expect("flags");
        assert!(after.contains(IFlags::TOPDIR | IFlags::NODUMP), "{after:?}");
        // Marking again changes nothing.
        assert!(mark_top_of_hierarchies(&top).expect("again"));
        assert_eq!(ioctl_getflags(&f).expect("flags"), after);
    }

    #[test]
    fn copy_keeps_links_modes_times_and_xattrs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        fs::create_dir(&src).expect("mkdir");
        fs::write(src.join("a"), b"hello").expect("write");
        fs::hard_link(src.join("a"), src.join("a-link")).expect("link");
        fs::create_dir(src.join("d")).expect("mkdir d");
        fs::hard_link(src.join("a"), src.join("d/a-link2")).expect("link 2");
        std::os::unix::fs::symlink("../nowhere", src.join("d/dangling")).expect("symlink");
        fs::set_permissions(src.join("a"), fs::Permissions::from_mode(0o4750)).expect("chmod");
        fs::set_permissions(src.join("d"), fs::Permissions::from_mode(0o500)).expect("chmod d");
        nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o640)).expect("fifo");
        let xattr = rustix::fs::lsetxattr(
            src.join("a"),
            "user.berth",
            b"v",
            rustix::fs::XattrFlags::empty(),
        );
        if is_root() {
            nix::sys::stat::mknod(
                &src.join("null"),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(1, 3),
            )
            .expect("mknod");
            std::os::unix::fs::lchown(src.join("a"), Some(1), Some(2)).expect("chown");
            // chown cleared setuid.
            fs::set_permissions(src.join("a"), fs::Permissions::from_mode(0o4750)).expect("chmod");
        }
        let old = TimeSpec::new(1_000_000, 5);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &src.join("a"),
            &old,
            &old,
            UtimensatFlags::NoFollowSymlink,
        )
        .expect("utimes");

        let dst = dir.path().join("dst");
        copy_tree(&src, &dst).expect("copy");

        let a = fs::symlink_metadata(dst.join("a")).expect("a");
        assert_eq!(a.mode() & 0o7777, 0o4750);
        assert_eq!(a.mtime(), 1_000_000);
        assert_eq!(a.mtime_nsec(), 5);
        assert_eq!(a.nlink(), 3, "hard links stay one inode");
        assert_eq!(
            fs::symlink_metadata(dst.join("d/a-link2"))
                .expect("link2")
                .ino(),
            a.ino()
        );
        assert_eq!(fs::read(dst.join("a-link")).expect("read"), b"hello");
        assert_eq!(
            fs::read_link(dst.join("d/dangling")).expect("readlink"),
            Path::new("../nowhere")
        );
        assert_eq!(
            fs::symlink_metadata(dst.join("d")).expect("d").mode() & 0o7777,
            0o500
        );
        assert!(
            fs::symlink_metadata(dst.join("fifo"))
                .expect("fifo")
                .file_type()
                .is_fifo()
        );
        if xattr.is_ok() {
            assert_eq!(
                xattr_value(&dst.join("a"), b"user.berth").expect("xattr"),
                b"v"
            );
        }
        if is_root() {
            let null = fs::symlink_metadata(dst.join("null")).expect("null");
            assert!(null.file_type().is_char_device());
            assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
            assert_eq!((a.uid(), a.gid()), (1, 2));
        }
    }

    #[test]
    fn usage_counts_files_once_and_every_inode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("r");
        fs::create_dir(&root).expect("mkdir");
        fs::write(root.join("a"), vec![1u8; 1000]).expect("a");
        fs::hard_link(root.join("a"), root.join("b")).expect("link");
        fs::create_dir(root.join("d")).expect("d");
        fs::write(root.join("d/c"), vec![2u8; 24]).expect("c");
        std::os::unix::fs::symlink("a", root.join("s")).expect("symlink");
        let usage = disk_usage(&root).expect("usage");
        // root, a (= b), d, d/c, s
        assert_eq!(
            usage,
            Usage {
                size: 1024,
                inodes: 5
            }
        );
        assert_eq!(
            disk_usage(&dir.path().join("missing")).expect("missing"),
            Usage::default()
        );
    }
}
