//! Writing the difference of two directory trees as an OCI layer tar, as containerd's
//! `archive.WriteDiff` over continuity's double-walk `fs.Changes` does.
//!
//! # What is written
//!
//! Both trees are walked together, each directory's names in byte order, parents before
//! their contents (so the layer is sorted by path, a directory's entries right after it):
//!
//! - a name only in the upper tree is added, with everything below it;
//! - a name only in the lower tree gets a whiteout `.wh.<name>` (mode 0, owner 0:0, mtime 0),
//!   and nothing is said about what was below it;
//! - a name in both is written when it differs: type, permission bits, owner, device number
//!   or xattrs differ, or (not for directories) size, mtime in seconds, mtime nanoseconds
//!   when either has any, or symlink target; when both mtimes are whole seconds (a copy that
//!   lost precision) regular files are compared byte by byte. A directory that replaced a
//!   non-directory has all its contents added; a non-directory that replaced a directory
//!   hides the directory's contents without whiteouts, as applying it removes the directory.
//!
//! Like containerd, a changed directory's own entry appears only when its metadata changed,
//! but every written entry is preceded by any parent directory not yet written (with the
//! upper tree's metadata), so a layer never relies on a parent the lower tree may lack.
//! Deletions are always per entry: containerd only writes opaque markers when diffing an
//! overlay upper directory directly, which it (and berth) never does for mounts.
//!
//! Hard links: a file with several links whose inode is written gets one full entry; every
//! other name of it in the upper tree that the walk meets, changed or not, is written as a
//! hard link to it, so link groups survive in the layer. Sockets are left out.
//!
//! Entries carry mode (permission, setuid, setgid, sticky), owner, mtime truncated to the
//! second (and clamped to `source_date_epoch` when given, for reproducible layers), device
//! numbers, and every xattr except `trusted.*` (overlayfs' own and privileged) and
//! `security.selinux` (the host's label, not the image's). containerd records only
//! `security.capability`; berth keeps `user.*` attributes and ACLs as well, and compares the
//! same set when deciding whether a file changed.
//!
//! # Safety
//!
//! The trees are read through directory descriptors, each name opened relative to its parent
//! with `O_NOFOLLOW`: a symlink is never followed, so a tree that changes while it is read
//! cannot make the walk read files outside it. A regular file is checked to be the inode that
//! was listed before its data is copied; a file that changes size while being copied fails
//! the diff.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, readlinkat};
use nix::libc;
use nix::sys::stat::{FileStat, Mode, fstat};

use crate::WHITEOUT_PREFIX;
use crate::error::{Error, Result};
use crate::path::show;
use crate::tar_write::{Header, HeaderError, TarWriter, kind};
use crate::tree::{dir_flags, list_names, lstat_at};

/// Options of [`write_diff`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffWriteOptions {
    /// Clamp entry mtimes to this time (SOURCE_DATE_EPOCH, for reproducible layers); whiteouts
    /// always carry the epoch of 1970.
    pub source_date_epoch: Option<SystemTime>,
}

/// What a diff wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffReport {
    /// Tar entries written, whiteouts and hard links included.
    pub entries: u64,
    /// Of which whiteouts.
    pub whiteouts: u64,
}

/// Writes the layer that turns the tree `lower` into the tree `upper` to `out`, as an
/// uncompressed tar (see the module documentation), and returns `out`.
///
/// Blocking. Both trees should be quiet (mounted read-only); nothing in them is written.
pub fn write_diff<W: Write>(
    lower: &Path,
    upper: &Path,
    out: W,
    options: &DiffWriteOptions,
) -> Result<(W, DiffReport)> {
    let open_root = |root: &Path| {
        Dir::open(root, dir_flags(), Mode::empty()).map_err(|errno| Error::Walk {
            path: root.display().to_string(),
            op: "open the tree".to_owned(),
            source: errno.into(),
        })
    };
    let mut lower_root = open_root(lower)?;
    let mut upper_root = open_root(upper)?;
    let epoch = options
        .source_date_epoch
        .map(|t| match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                i64::from(d.subsec_nanos()),
            ),
            Err(e) => {
                let d = e.duration();
                let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                match d.subsec_nanos() {
                    0 => (-secs, 0),
                    n => (-secs - 1, i64::from(1_000_000_000 - n)),
                }
            }
        });
    let upper_fd = upper_root
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::Walk {
            path: ".".to_owned(),
            op: "duplicate the root descriptor".to_owned(),
            source: e,
        })?;
    let mut walker = Walker {
        upper_root: upper_fd,
        tar: TarWriter::new(out),
        epoch,
        added_dirs: HashSet::new(),
        inode_src: HashMap::new(),
        inode_refs: HashMap::new(),
        buffer: vec![0; 128 * 1024],
        other: vec![0; 128 * 1024],
        report: DiffReport::default(),
    };
    walker.walk(Some(&mut lower_root), &mut upper_root, b"")?;
    let out = walker
        .tar
        .finish()
        .map_err(|source| Error::Output { source })?;
    Ok((out, walker.report))
}

/// Whether a change was found, or the entry is unchanged but must be seen for its links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Added,
    Modified,
    Unmodified,
}

struct Walker<W: Write> {
    upper_root: OwnedFd,
    tar: TarWriter<W>,
    epoch: Option<(i64, i64)>,
    /// Directories written (without the trailing `/`).
    added_dirs: HashSet<Vec<u8>>,
    /// Inode (device, number) -> the entry name that carries its data.
    inode_src: HashMap<(u64, u64), Vec<u8>>,
    /// Inode -> unchanged names met before any name of it was written.
    inode_refs: HashMap<(u64, u64), Vec<Vec<u8>>>,
    buffer: Vec<u8>,
    other: Vec<u8>,
    report: DiffReport,
}

fn file_type(st: &FileStat) -> libc::mode_t {
    st.st_mode & libc::S_IFMT
}

fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        return name.to_vec();
    }
    let mut p = Vec::with_capacity(prefix.len() + 1 + name.len());
    p.extend_from_slice(prefix);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

fn walk_err(path: &[u8], op: &str) -> impl Fn(Errno) -> Error {
    let path = if path.is_empty() {
        ".".to_owned()
    } else {
        show(path)
    };
    let op = op.to_owned();
    move |errno| Error::Walk {
        path: path.clone(),
        op: op.clone(),
        source: errno.into(),
    }
}

fn header_err(path: &[u8]) -> impl Fn(HeaderError) -> Error {
    let path = show(path);
    move |e| match e {
        HeaderError::Unencodable(reason) => Error::Unencodable {
            path: path.clone(),
            reason,
        },
        HeaderError::Io(source) => Error::Output { source },
    }
}

/// The xattrs a layer records (see the module documentation).
fn recorded_xattr(name: &[u8]) -> bool {
    !name.starts_with(b"trusted.") && name != b"security.selinux"
}

/// `/proc/self/fd/<dir>/<name>`: the object `name` in an open directory, for the xattr
/// calls, which have no `*at` form; with the `l*` calls the last component is not followed.
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name);
    path
}

/// The recorded xattrs of `name` in `dir`, sorted by name.
fn xattrs(dir: BorrowedFd<'_>, name: &[u8], path: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let proc = proc_path(dir, name);
    let proc = Path::new(OsStr::from_bytes(&proc));
    let fail = |op: &str, e: rustix::io::Errno| Error::Walk {
        path: show(path),
        op: op.to_owned(),
        source: e.into(),
    };
    let mut list = vec![0u8; 1024];
    let n = loop {
        match rustix::fs::llistxattr(proc, &mut list[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => {
                let need =
                    rustix::fs::llistxattr_query(proc).map_err(|e| fail("list xattrs", e))?;
                list.resize(need.max(list.len() * 2), 0);
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(fail("list xattrs", e)),
        }
    };
    let mut out = Vec::new();
    for key in list[..n].split(|b| *b == 0).filter(|k| !k.is_empty()) {
        if !recorded_xattr(key) {
            continue;
        }
        let mut value = vec![0u8; 256];
        loop {
            match rustix::fs::lgetxattr(proc, key, &mut value[..]) {
                Ok(n) => {
                    value.truncate(n);
                    out.push((key.to_vec(), value));
                    break;
                }
                Err(rustix::io::Errno::RANGE) => {
                    let need = rustix::fs::lgetxattr_query(proc, key)
                        .map_err(|e| fail("read an xattr", e))?;
                    value.resize(need.max(value.len() * 2), 0);
                }
                // Removed between listing and reading.
                Err(rustix::io::Errno::NODATA) => break,
                Err(e) => return Err(fail("read an xattr", e)),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Opens the regular file `name` for reading, checking it is still the inode `st` describes.
fn open_file(dir: BorrowedFd<'_>, name: &[u8], st: &FileStat, path: &[u8]) -> Result<File> {
    // O_NONBLOCK: if a fifo took the file's place, opening must not wait for a writer.
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(walk_err(path, "open file"))?;
    let now = fstat(&fd).map_err(walk_err(path, "stat file"))?;
    if now.st_ino != st.st_ino || now.st_dev != st.st_dev || file_type(&now) != libc::S_IFREG {
        return Err(Error::Changed {
            path: show(path),
            reason: "the file was replaced while the diff read it".to_owned(),
        });
    }
    Ok(File::from(fd))
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

impl<W: Write> Walker<W> {
    /// Walks the directory `path` of both trees (`lower` absent: everything is added).
    fn walk(&mut self, lower: Option<&mut Dir>, upper: &mut Dir, path: &[u8]) -> Result<()> {
        let mut unames = list_names(upper).map_err(walk_err(path, "list directory"))?;
        unames.sort_unstable();
        let (lower, lnames) = match lower {
            Some(dir) => {
                let mut names = list_names(dir).map_err(walk_err(path, "list lower directory"))?;
                names.sort_unstable();
                (Some(dir), names)
            }
            None => (None, Vec::new()),
        };
        let (mut l, mut u) = (0, 0);
        while l < lnames.len() || u < unames.len() {
            let order = match (lnames.get(l), unames.get(u)) {
                (Some(a), Some(b)) => a.cmp(b),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    self.whiteout(path, &lnames[l])?;
                    l += 1;
                }
                std::cmp::Ordering::Greater => {
                    let name = &unames[u];
                    let child = join(path, name);
                    let st = lstat_at(upper.as_fd(), name).map_err(walk_err(&child, "stat"))?;
                    self.emit(Change::Added, upper.as_fd(), name, &child, &st)?;
                    if file_type(&st) == libc::S_IFDIR {
                        let mut sub = open_dir(upper.as_fd(), name, &child)?;
                        self.walk(None, &mut sub, &child)?;
                    }
                    u += 1;
                }
                std::cmp::Ordering::Equal => {
                    let name = &unames[u];
                    let child = join(path, name);
                    // Equal names only happen when there is a lower directory.
                    let Some(ldir) = lower.as_deref() else {
                        return Err(Error::Walk {
                            path: show(&child),
                            op: "compare".to_owned(),
                            source: io::Error::other("no lower directory"),
                        });
                    };
                    let lst =
                        lstat_at(ldir.as_fd(), name).map_err(walk_err(&child, "stat lower"))?;
                    let ust = lstat_at(upper.as_fd(), name).map_err(walk_err(&child, "stat"))?;
                    let same = self.same(ldir.as_fd(), &lst, upper.as_fd(), &ust, name, &child)?;
                    let linked = file_type(&ust) != libc::S_IFDIR && ust.st_nlink > 1;
                    if !same {
                        self.emit(Change::Modified, upper.as_fd(), name, &child, &ust)?;
                    } else if linked {
                        self.emit(Change::Unmodified, upper.as_fd(), name, &child, &ust)?;
                    }
                    if file_type(&ust) == libc::S_IFDIR {
                        let mut sub = open_dir(upper.as_fd(), name, &child)?;
                        if file_type(&lst) == libc::S_IFDIR {
                            let mut lsub = open_dir(ldir.as_fd(), name, &child)?;
                            self.walk(Some(&mut lsub), &mut sub, &child)?;
                        } else {
                            self.walk(None, &mut sub, &child)?;
                        }
                    }
                    l += 1;
                    u += 1;
                }
            }
        }
        Ok(())
    }

    /// continuity's `sameFile`, comparing xattrs and symlink targets as well.
    fn same(
        &mut self,
        ldir: BorrowedFd<'_>,
        lst: &FileStat,
        udir: BorrowedFd<'_>,
        ust: &FileStat,
        name: &[u8],
        path: &[u8],
    ) -> Result<bool> {
        if lst.st_dev == ust.st_dev && lst.st_ino == ust.st_ino {
            return Ok(true);
        }
        if lst.st_mode != ust.st_mode
            || lst.st_uid != ust.st_uid
            || lst.st_gid != ust.st_gid
            || lst.st_rdev != ust.st_rdev
        {
            return Ok(false);
        }
        if xattrs(ldir, name, path)? != xattrs(udir, name, path)? {
            return Ok(false);
        }
        let ftype = file_type(ust);
        if ftype == libc::S_IFDIR {
            return Ok(true);
        }
        if lst.st_size != ust.st_size || lst.st_mtime != ust.st_mtime {
            return Ok(false);
        }
        if ftype == libc::S_IFLNK {
            let a = readlinkat(ldir, name).map_err(walk_err(path, "read lower symlink"))?;
            let b = readlinkat(udir, name).map_err(walk_err(path, "read symlink"))?;
            if a != b {
                return Ok(false);
            }
        }
        if lst.st_mtime_nsec != ust.st_mtime_nsec {
            return Ok(false);
        }
        // Equal whole-second times may be a copy that lost precision: only the bytes tell.
        if lst.st_mtime_nsec == 0 && ftype == libc::S_IFREG && ust.st_size > 0 {
            return self.same_content(ldir, lst, udir, ust, name, path);
        }
        Ok(true)
    }

    fn same_content(
        &mut self,
        ldir: BorrowedFd<'_>,
        lst: &FileStat,
        udir: BorrowedFd<'_>,
        ust: &FileStat,
        name: &[u8],
        path: &[u8],
    ) -> Result<bool> {
        let mut a = open_file(ldir, name, lst, path)?;
        let mut b = open_file(udir, name, ust, path)?;
        let read = |e: io::Error| Error::Walk {
            path: show(path),
            op: "compare contents".to_owned(),
            source: e,
        };
        loop {
            let n = read_full(&mut a, &mut self.buffer).map_err(read)?;
            let m = read_full(&mut b, &mut self.other).map_err(read)?;
            if n != m || self.buffer[..n] != self.other[..m] {
                return Ok(false);
            }
            if n < self.buffer.len() {
                return Ok(true);
            }
        }
    }

    /// The whiteout of `name`, deleted from the directory `dir`.
    fn whiteout(&mut self, dir: &[u8], name: &[u8]) -> Result<()> {
        let mut base = WHITEOUT_PREFIX.as_bytes().to_vec();
        base.extend_from_slice(name);
        let header = Header {
            name: join(dir, &base),
            typeflag: kind::REGULAR,
            ..Header::default()
        };
        self.include_parents(&header.name, header.typeflag)?;
        self.tar
            .write_header(&header)
            .map_err(header_err(&header.name))?;
        self.report.entries += 1;
        self.report.whiteouts += 1;
        Ok(())
    }

    /// containerd's `HandleChange` for an upper-tree object `name` in `dir` at `path`.
    fn emit(
        &mut self,
        change: Change,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
        st: &FileStat,
    ) -> Result<()> {
        let ftype = file_type(st);
        let typeflag = match ftype {
            libc::S_IFREG => kind::REGULAR,
            libc::S_IFDIR => kind::DIR,
            libc::S_IFLNK => kind::SYMLINK,
            libc::S_IFCHR => kind::CHAR,
            libc::S_IFBLK => kind::BLOCK,
            libc::S_IFIFO => kind::FIFO,
            // Sockets belong to a running process, not to an image.
            _ => return Ok(()),
        };
        let mut header = Header {
            name: path.to_vec(),
            typeflag,
            mode: st.st_mode & 0o7777,
            uid: u64::from(st.st_uid),
            gid: u64::from(st.st_gid),
            size: if ftype == libc::S_IFREG {
                u64::try_from(st.st_size).unwrap_or(0)
            } else {
                0
            },
            mtime: self.mtime(st.st_mtime, st.st_mtime_nsec),
            ..Header::default()
        };
        if ftype == libc::S_IFDIR {
            header.name.push(b'/');
        }
        if ftype == libc::S_IFLNK {
            header.linkname = readlinkat(dir, name)
                .map_err(walk_err(path, "read symlink"))?
                .as_bytes()
                .to_vec();
        }
        if ftype == libc::S_IFCHR || ftype == libc::S_IFBLK {
            header.devmajor = nix::sys::stat::major(st.st_rdev);
            header.devminor = nix::sys::stat::minor(st.st_rdev);
        }

        let mut more_links = Vec::new();
        if ftype != libc::S_IFDIR && st.st_nlink > 1 {
            let inode = (st.st_dev, st.st_ino);
            if let Some(source) = self.inode_src.get(&inode) {
                header.typeflag = kind::LINK;
                header.linkname = source.clone();
                header.size = 0;
            } else {
                if change == Change::Unmodified {
                    self.inode_refs.entry(inode).or_default().push(header.name);
                    return Ok(());
                }
                self.inode_src.insert(inode, header.name.clone());
                more_links = self.inode_refs.remove(&inode).unwrap_or_default();
            }
        } else if change == Change::Unmodified {
            return Ok(());
        }

        header.xattrs = xattrs(dir, name, path)?;
        self.include_parents(&header.name, header.typeflag)?;
        self.tar.write_header(&header).map_err(header_err(path))?;
        self.report.entries += 1;
        if header.typeflag == kind::REGULAR && header.size > 0 {
            self.copy_data(dir, name, path, st)?;
        }
        if !more_links.is_empty() {
            let source = header.name.clone();
            for extra in more_links {
                header.name = extra;
                header.typeflag = kind::LINK;
                header.linkname = source.clone();
                header.size = 0;
                self.include_parents(&header.name, header.typeflag)?;
                self.tar
                    .write_header(&header)
                    .map_err(header_err(&header.name))?;
                self.report.entries += 1;
            }
        }
        Ok(())
    }

    fn copy_data(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
        st: &FileStat,
    ) -> Result<()> {
        let mut file = open_file(dir, name, st, path)?;
        let read = |e: io::Error| Error::Walk {
            path: show(path),
            op: "read file".to_owned(),
            source: e,
        };
        while self.tar.remaining() > 0 {
            let want = self
                .buffer
                .len()
                .min(usize::try_from(self.tar.remaining()).unwrap_or(usize::MAX));
            let n = read_full(&mut file, &mut self.buffer[..want]).map_err(read)?;
            if n == 0 {
                return Err(Error::Changed {
                    path: show(path),
                    reason: "the file shrank while the diff read it".to_owned(),
                });
            }
            self.tar
                .write_data(&self.buffer[..n])
                .map_err(|source| Error::Output { source })?;
        }
        let mut probe = [0u8; 1];
        if read_full(&mut file, &mut probe).map_err(read)? != 0 {
            return Err(Error::Changed {
                path: show(path),
                reason: "the file grew while the diff read it".to_owned(),
            });
        }
        Ok(())
    }

    /// containerd's `includeParents`: writes the parent directories of `name` that are not in
    /// the layer yet, outermost first, and records `name` if it is a directory.
    fn include_parents(&mut self, name: &[u8], typeflag: u8) -> Result<()> {
        let trimmed = name.strip_suffix(b"/").unwrap_or(name);
        if let Some(i) = trimmed.iter().rposition(|b| *b == b'/') {
            let parent = &trimmed[..i];
            if !self.added_dirs.contains(parent) {
                self.added_dirs.insert(parent.to_vec());
                self.emit_upper_path(parent)?;
            }
        }
        if typeflag == kind::DIR {
            self.added_dirs.insert(trimmed.to_vec());
        }
        Ok(())
    }

    /// Writes the upper tree's directory `path` (a parent of a written entry).
    fn emit_upper_path(&mut self, path: &[u8]) -> Result<()> {
        let comps: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
        let Some((last, parents)) = comps.split_last() else {
            return Ok(());
        };
        let dir = crate::tree::open_beneath(self.upper_root.as_fd(), parents, dir_flags())
            .map_err(|e| Error::Changed {
                path: show(path),
                reason: format!("parent directory vanished: {}", e.describe(parents)),
            })?;
        let st = lstat_at(dir.as_fd(), last).map_err(walk_err(path, "stat"))?;
        if file_type(&st) != libc::S_IFDIR {
            return Err(Error::Changed {
                path: show(path),
                reason: "a parent directory was replaced while the diff read it".to_owned(),
            });
        }
        self.emit(Change::Modified, dir.as_fd(), last, path, &st)
    }

    /// The mtime an entry records: clamped to the source date epoch, whole seconds.
    fn mtime(&self, secs: i64, nanos: i64) -> i64 {
        match self.epoch {
            Some(epoch) if (secs, nanos) > epoch => epoch.0,
            _ => secs,
        }
    }
}

fn open_dir(parent: BorrowedFd<'_>, name: &[u8], path: &[u8]) -> Result<Dir> {
    Dir::openat(parent, name, dir_flags(), Mode::empty()).map_err(walk_err(path, "open directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_xattrs_leave_out_overlay_and_host_labels() {
        assert!(recorded_xattr(b"user.a"));
        assert!(recorded_xattr(b"security.capability"));
        assert!(recorded_xattr(b"system.posix_acl_access"));
        assert!(!recorded_xattr(b"trusted.overlay.opaque"));
        assert!(!recorded_xattr(b"security.selinux"));
    }

    #[test]
    fn paths_join_below_the_root() {
        assert_eq!(join(b"", b"a"), b"a");
        assert_eq!(join(b"a/b", b"c"), b"a/b/c");
    }
}
