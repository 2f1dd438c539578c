//! Safe resolution inside the layer root, and the file system operations the applier needs.
//!
//! Every path is resolved one component at a time from a descriptor of the root, each
//! component opened with `O_NOFOLLOW | O_DIRECTORY` relative to its parent's descriptor.
//! Names are cleaned lexically first (no `..`, no empty or `.` components), so this is the
//! walk `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` would do, without needing Linux 5.6:
//! no symlink is ever followed and nothing above the root can be reached. Objects are then
//! created and changed relative to the parent descriptor (`mkdirat`, `openat`, `linkat`,
//! `fchownat(AT_SYMLINK_NOFOLLOW)`, `utimensat(AT_SYMLINK_NOFOLLOW)`, ...) or through a
//! descriptor of the object itself.
//!
//! [`Tree`] caches the descriptors of the last parent chain: layers list entries depth first,
//! so most entries reuse their predecessor's parent and cost no lookups at all.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, UtimensatFlags, fchmod, fchmodat, fstat, fstatat, futimens,
    mkdirat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, unlinkat};

/// Flags to open a directory we only resolve names in.
pub(crate) fn walk_flags() -> OFlag {
    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Flags to open a directory we read or change (owner, mode, xattrs, entries).
pub(crate) fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Why a directory chain could not be resolved; `at` indexes the offending component.
#[derive(Debug)]
pub(crate) enum WalkError {
    /// The component does not exist (and creation was not asked for).
    Missing { at: usize },
    /// The component is a symlink: never followed.
    Symlink { at: usize },
    /// The component exists and is not a directory.
    NotDir { at: usize },
    /// The system refused.
    Io { at: usize, errno: Errno },
}

impl WalkError {
    /// The path of the offending component.
    pub(crate) fn path(&self, comps: &[&[u8]]) -> String {
        let (WalkError::Missing { at }
        | WalkError::Symlink { at }
        | WalkError::NotDir { at }
        | WalkError::Io { at, .. }) = self;
        let end = (at + 1).min(comps.len());
        crate::path::show(&comps[..end].join(&b'/'))
    }

    /// A sentence for an error message, naming the component's path.
    pub(crate) fn describe(&self, comps: &[&[u8]]) -> String {
        let path = self.path(comps);
        match self {
            WalkError::Missing { .. } => format!("{path:?} does not exist"),
            WalkError::Symlink { .. } => {
                format!("{path:?} is a symlink; paths are never resolved through symlinks")
            }
            WalkError::NotDir { .. } => format!("{path:?} is not a directory"),
            WalkError::Io { errno, .. } => format!("{path:?}: {}", errno.desc()),
        }
    }
}

/// What an existing name is, diagnosed after an open failed.
fn diagnose(dir: BorrowedFd<'_>, name: &[u8], errno: Errno, at: usize) -> WalkError {
    match errno {
        Errno::ENOENT => WalkError::Missing { at },
        Errno::ENOTDIR | Errno::ELOOP => match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is_type(&st, nix::libc::S_IFLNK) => WalkError::Symlink { at },
            Ok(_) => WalkError::NotDir { at },
            Err(errno) => WalkError::Io { at, errno },
        },
        errno => WalkError::Io { at, errno },
    }
}

/// Whether a stat result has the file type `fmt` (`S_IFDIR`, ...).
pub(crate) fn is_type(st: &FileStat, fmt: nix::libc::mode_t) -> bool {
    st.st_mode & nix::libc::S_IFMT == fmt
}

/// `fstatat` without following a final symlink.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<FileStat> {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

/// Opens the directory `comps` below `root` without following symlinks or creating anything;
/// the last component is opened with `last` flags (which must include `O_DIRECTORY` and
/// `O_NOFOLLOW`). An empty chain opens the root itself.
pub(crate) fn open_beneath(
    root: BorrowedFd<'_>,
    comps: &[&[u8]],
    last: OFlag,
) -> Result<OwnedFd, WalkError> {
    let mut current: Option<OwnedFd> = None;
    if comps.is_empty() {
        return openat(root, ".", last, Mode::empty())
            .map_err(|errno| WalkError::Io { at: 0, errno });
    }
    for (at, comp) in comps.iter().enumerate() {
        let dir = current.as_ref().map_or(root, |fd| fd.as_fd());
        let flags = if at + 1 == comps.len() {
            last
        } else {
            walk_flags()
        };
        let next = openat(dir, *comp, flags, Mode::empty())
            .map_err(|errno| diagnose(dir, comp, errno, at))?;
        current = Some(next);
    }
    current.ok_or(WalkError::Missing { at: 0 })
}

/// The layer root with a cache of the last resolved parent chain.
pub(crate) struct Tree {
    root: OwnedFd,
    /// Descriptors of `root/c0`, `root/c0/c1`, ...: the last chain resolved.
    stack: Vec<(Vec<u8>, OwnedFd)>,
}

impl Tree {
    /// Opens the root directory (following symlinks in the caller's own path to it).
    pub(crate) fn open(root: &Path) -> io::Result<Tree> {
        let root = nix::fcntl::open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Tree {
            root,
            stack: Vec::new(),
        })
    }

    /// The root directory.
    pub(crate) fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The directory the last [`Tree::walk`] resolved (or pushed).
    pub(crate) fn dir(&self) -> BorrowedFd<'_> {
        self.stack
            .last()
            .map_or(self.root.as_fd(), |(_, fd)| fd.as_fd())
    }

    /// Records that the last walked directory now has the child directory `name`, open as
    /// `fd`, so entries inside it need no lookup.
    pub(crate) fn push(&mut self, name: &[u8], fd: OwnedFd) {
        self.stack.push((name.to_vec(), fd));
    }

    /// Resolves the directory chain `comps` and makes it [`Tree::dir`].
    ///
    /// Missing directories are created when `create` is given (mode 0755 exactly, as
    /// containerd's `mkparent`, then attributes inherited through `create`); otherwise they
    /// are [`WalkError::Missing`]. The cached chain stays valid because the applier only ever
    /// removes children of the directory it has just walked to.
    pub(crate) fn walk(
        &mut self,
        comps: &[&[u8]],
        create: Option<&Inherit>,
    ) -> Result<(), WalkError> {
        let common = self
            .stack
            .iter()
            .zip(comps)
            .take_while(|((have, _), want)| have.as_slice() == **want)
            .count();
        self.stack.truncate(common);
        for (at, comp) in comps.iter().enumerate().skip(common) {
            let fd = {
                let dir = self.dir();
                match openat(dir, *comp, walk_flags(), Mode::empty()) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT) => match create {
                        Some(inherit) => make_parent(dir, comps, at, inherit)?,
                        None => return Err(WalkError::Missing { at }),
                    },
                    Err(errno) => return Err(diagnose(dir, comp, errno, at)),
                }
            };
            self.stack.push((comp.to_vec(), fd));
        }
        Ok(())
    }
}

/// Creates the missing directory `comps[at]` in `dir`.
fn make_parent(
    dir: BorrowedFd<'_>,
    comps: &[&[u8]],
    at: usize,
    inherit: &Inherit,
) -> Result<OwnedFd, WalkError> {
    let io = |errno| WalkError::Io { at, errno };
    // Missing here but a symlink or a file in a lower layer: creating a directory would hide
    // it, where applying onto the merged tree would refuse the path. Refuse it the same way.
    match inherit.lower_kind(&comps[..=at]).map_err(io)? {
        LowerKind::Symlink => return Err(WalkError::Symlink { at }),
        LowerKind::Other => return Err(WalkError::NotDir { at }),
        LowerKind::Directory | LowerKind::Absent => {}
    }
    let name = comps[at];
    match mkdirat(dir, name, Mode::from_bits_truncate(0o755)) {
        // EEXIST: made concurrently; opening it below checks what it is.
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(errno) => return Err(io(errno)),
    }
    let fd = openat(dir, name, dir_flags(), Mode::empty())
        .map_err(|errno| diagnose(dir, name, errno, at))?;
    // mkdir applies the umask; containerd chmods to get 0755 whatever the umask.
    fchmod(&fd, Mode::from_bits_truncate(0o755)).map_err(io)?;
    inherit
        .copy_to(&comps[..=at], fd.as_fd())
        .map_err(|e| io(Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO))))?;
    Ok(fd)
}

/// What a path is in the lower layers of an overlay upper directory.
enum LowerKind {
    Directory,
    Symlink,
    /// A file, device or fifo.
    Other,
    /// In no layer, or deleted by a whiteout.
    Absent,
}

/// Lower layer directories whose attributes an implicitly created parent inherits.
///
/// When a layer is applied directly into an overlay upper directory, a directory it needs but
/// does not list would otherwise appear with mode 0755 root:root and hide the lower layer's
/// owner and mode; containerd's `WithParents` copies them from the first lower layer that has
/// the directory. On a mounted or copied tree the directory already exists and this is unused.
pub(crate) struct Inherit {
    layers: Vec<OwnedFd>,
}

impl Inherit {
    /// Opens the parent layers, most immediate first.
    pub(crate) fn open(paths: &[std::path::PathBuf]) -> Result<Inherit, (usize, io::Error)> {
        let mut layers = Vec::with_capacity(paths.len());
        for (i, path) in paths.iter().enumerate() {
            let fd = nix::fcntl::open(
                path.as_path(),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|errno| (i, io::Error::from(errno)))?;
            layers.push(fd);
        }
        Ok(Inherit { layers })
    }

    /// What `comps` is in the merged lower layers: the first layer that has an entry there
    /// decides (an overlay whiteout, a 0/0 character device, means deleted).
    fn lower_kind(&self, comps: &[&[u8]]) -> Result<LowerKind, Errno> {
        let Some((name, parent)) = comps.split_last() else {
            return Ok(LowerKind::Directory);
        };
        for layer in &self.layers {
            let dir = match open_beneath(layer.as_fd(), parent, walk_flags()) {
                Ok(dir) => dir,
                // The parent chain is not a directory chain in this layer: the caller has
                // already judged the parents, so this layer has nothing to say.
                Err(WalkError::Missing { .. } | WalkError::Symlink { .. }) => continue,
                Err(WalkError::NotDir { .. }) => continue,
                Err(WalkError::Io { errno, .. }) => return Err(errno),
            };
            match lstat_at(dir.as_fd(), name) {
                Ok(st) if is_type(&st, nix::libc::S_IFDIR) => return Ok(LowerKind::Directory),
                Ok(st) if is_type(&st, nix::libc::S_IFLNK) => return Ok(LowerKind::Symlink),
                Ok(st) if is_type(&st, nix::libc::S_IFCHR) && st.st_rdev == 0 => {
                    return Ok(LowerKind::Absent);
                }
                Ok(_) => return Ok(LowerKind::Other),
                Err(Errno::ENOENT) => continue,
                Err(errno) => return Err(errno),
            }
        }
        Ok(LowerKind::Absent)
    }

    /// Copies owner, mode, times and (non-`trusted.`) xattrs of `comps` from the first layer
    /// that has it as a directory onto `dst`. A layer where the path is something else
    /// replaced the directory: nothing is inherited then.
    fn copy_to(&self, comps: &[&[u8]], dst: BorrowedFd<'_>) -> io::Result<()> {
        for layer in &self.layers {
            match open_beneath(layer.as_fd(), comps, dir_flags()) {
                Ok(src) => return copy_dir_info(src.as_fd(), dst),
                Err(WalkError::Missing { .. }) => continue,
                Err(WalkError::Symlink { .. } | WalkError::NotDir { .. }) => return Ok(()),
                Err(WalkError::Io { errno, .. }) => return Err(errno.into()),
            }
        }
        Ok(())
    }
}

/// containerd's `copyDirInfo` + `copyUpXAttrs`.
fn copy_dir_info(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> io::Result<()> {
    let st = fstat(src)?;
    if let Err(errno) = fchown(
        dst,
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
    ) {
        // As containerd: some file systems (NFS) refuse a no-op chown.
        let same = fstat(dst).is_ok_and(|d| d.st_uid == st.st_uid && d.st_gid == st.st_gid);
        if errno != Errno::EPERM || !same {
            return Err(errno.into());
        }
    }
    fchmod(dst, Mode::from_bits_truncate(st.st_mode & 0o7777))?;
    futimens(
        dst,
        &TimeSpec::new(st.st_atime, st.st_atime_nsec),
        &TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    )?;
    for name in list_xattrs(src)? {
        // Overlay's own attributes (trusted.overlay.*) describe the lower layer, not this one.
        if name.starts_with(b"trusted.") {
            continue;
        }
        let value = match get_xattr(src, &name) {
            Ok(v) => v,
            Err(e) if ignorable_copy_error(&e) => continue,
            Err(e) => return Err(e),
        };
        match rustix::fs::fsetxattr(dst, &name[..], &value, rustix::fs::XattrFlags::CREATE) {
            Ok(()) => {}
            Err(e) if ignorable_copy_error(&e.into()) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn ignorable_copy_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOTSUP) | Some(nix::libc::ENODATA) | Some(nix::libc::EEXIST)
    )
}

/// The names of the xattrs of an open file.
fn list_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 1024];
    loop {
        match rustix::fs::flistxattr(fd, &mut buf[..]) {
            Ok(n) => {
                return Ok(buf[..n]
                    .split(|b| *b == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect());
            }
            Err(rustix::io::Errno::RANGE) => {
                let need = rustix::fs::flistxattr_query(fd)?;
                buf.resize(need.max(buf.len() * 2), 0);
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    }
}

fn get_xattr(fd: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        match rustix::fs::fgetxattr(fd, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {
                let need = rustix::fs::fgetxattr_query(fd, name)?;
                buf.resize(need.max(buf.len() * 2), 0);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The names in an open directory, `.` and `..` left out.
pub(crate) fn list_names(dir: &mut Dir) -> nix::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// Removes `name` in `dir` and, if it is a directory, everything below it, without ever
/// following a symlink. A missing `name` is not an error (containerd's `os.RemoveAll`).
///
/// Iterative, holding one descriptor per level, so a deep tree cannot overflow the stack.
pub(crate) fn remove_all_at(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        // Linux refuses to unlink a directory with EISDIR: empty it first.
        Err(Errno::EISDIR) => {}
        Err(errno) => return Err(errno),
    }
    struct Frame {
        dir: Dir,
        name: Vec<u8>,
        pending: Vec<Vec<u8>>,
    }
    let open = |parent: BorrowedFd<'_>, name: Vec<u8>| -> nix::Result<Frame> {
        let mut dir = Dir::openat(parent, &name[..], dir_flags(), Mode::empty())?;
        let pending = list_names(&mut dir)?;
        Ok(Frame { dir, name, pending })
    };
    let mut stack = vec![open(dir, name.to_vec())?];
    loop {
        let Some(top) = stack.last_mut() else {
            return Ok(());
        };
        if let Some(child) = top.pending.pop() {
            match unlinkat(top.dir.as_fd(), &child[..], UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(Errno::EISDIR) => {
                    let frame = open(top.dir.as_fd(), child)?;
                    stack.push(frame);
                }
                Err(errno) => return Err(errno),
            }
        } else if let Some(done) = stack.pop() {
            drop(done.dir);
            let parent = stack.last().map_or(dir, |f| f.dir.as_fd());
            match unlinkat(parent, &done.name[..], UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(errno) => return Err(errno),
            }
        }
    }
}

/// An object to change: through its own descriptor, or by name in its parent directory
/// (symlinks, devices and fifos, which must not be opened).
#[derive(Clone, Copy)]
pub(crate) enum Node<'a> {
    /// An open regular file or directory.
    Fd(BorrowedFd<'a>),
    /// `name` in the directory `dir`.
    At(BorrowedFd<'a>, &'a [u8]),
}

impl Node<'_> {
    pub(crate) fn chown(self, uid: u32, gid: u32) -> nix::Result<()> {
        let (uid, gid) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
        match self {
            Node::Fd(fd) => fchown(fd, uid, gid),
            Node::At(dir, name) => fchownat(dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW),
        }
    }

    /// Never called for symlinks (Linux has no symlink modes). By name, the object is one the
    /// applier has just created in a directory it holds open, so following is harmless.
    pub(crate) fn chmod(self, mode: u32) -> nix::Result<()> {
        let mode = Mode::from_bits_truncate(mode);
        match self {
            Node::Fd(fd) => fchmod(fd, mode),
            Node::At(dir, name) => fchmodat(dir, name, mode, FchmodatFlags::FollowSymlink),
        }
    }

    pub(crate) fn set_times(self, atime: &TimeSpec, mtime: &TimeSpec) -> nix::Result<()> {
        match self {
            Node::Fd(fd) => futimens(fd, atime, mtime),
            Node::At(dir, name) => {
                utimensat(dir, name, atime, mtime, UtimensatFlags::NoFollowSymlink)
            }
        }
    }

    /// Sets an xattr. By name it goes through `/proc/self/fd/<dir>/<name>` with
    /// `lsetxattr`: the directory is the one we hold open and the last component is not
    /// followed; Linux has no `setxattrat` before 6.13.
    pub(crate) fn set_xattr(self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let flags = rustix::fs::XattrFlags::empty();
        match self {
            Node::Fd(fd) => rustix::fs::fsetxattr(fd, key, value, flags)?,
            Node::At(dir, name) => {
                let path = proc_path(dir, name);
                rustix::fs::lsetxattr(OsStr::from_bytes(&path), key, value, flags)?;
            }
        }
        Ok(())
    }
}

fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name);
    path
}
