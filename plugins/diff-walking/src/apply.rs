//! The apply loop: reading entries, creating them beneath the root, whiteouts, metadata.

use std::cell::Cell;
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;

use berth_core::content::{Algorithm, Digest, Digester};
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, makedev, mkdirat, mknodat};
use nix::sys::time::TimeSpec;
use nix::unistd::{linkat, symlinkat};
use tar::EntryType;

use crate::compression::{Compression, decompress};
use crate::error::{Error, Result};
use crate::path::{clean, show, split};
use crate::tree::{
    Inherit, Node, Tree, WalkError, dir_flags, lstat_at, open_beneath, remove_all_at,
};
use crate::{
    ApplyOptions, ApplyReport, IgnoredReason, IgnoredXattr, MAX_ENTRY_HEADER_BYTES,
    MAX_REPORTED_XATTRS, OPAQUE_WHITEOUT, OVERLAY_OPAQUE_XATTR, WHITEOUT_PREFIX, Whiteouts,
};

/// Size of the buffer file data is copied through.
const COPY_BUFFER: usize = 128 * 1024;
/// Size of the buffer between the decompressor and the tar parser, which reads 512-byte
/// headers: without it every header would be a decompressor call.
const STREAM_BUFFER: usize = 64 * 1024;

/// Applies the layer read from `reader` to the directory `root` (see the crate
/// documentation for the semantics and what is refused).
///
/// Blocking: run it on a blocking thread. To stop an apply early, make `reader` fail; the
/// error is [`Error::Source`], whose kind is that of a `berth_core::Error` wrapped in the
/// `io::Error` (`io::Error::other(err)`), else Internal.
pub fn apply<R: Read>(reader: R, root: &Path, options: &ApplyOptions) -> Result<ApplyReport> {
    let tree = Tree::open(root).map_err(|source| Error::Root {
        path: root.to_owned(),
        source,
    })?;
    let inherit = Inherit::open(&options.parents).map_err(|(i, source)| Error::Parent {
        path: options.parents[i].clone(),
        source,
    })?;

    let state = Rc::new(StreamState::default());
    let source = SourceReader {
        inner: reader,
        state: state.clone(),
    };
    let (compression, decoder) = decompress(source).map_err(|source| Error::Source { source })?;
    let algorithm = options
        .expected_diff_id
        .as_ref()
        .map_or(Algorithm::Sha256, Digest::algorithm);
    let meter = Meter {
        inner: BufReader::with_capacity(STREAM_BUFFER, decoder),
        state: state.clone(),
        digester: Digester::new(algorithm),
        limit: options.max_uncompressed_bytes,
    };
    let mut archive = tar::Archive::new(meter);
    let mut applier = Applier {
        options,
        tree,
        inherit,
        state: state.clone(),
        compression,
        kept: HashSet::new(),
        dirs: Vec::new(),
        ignored: Ignored::default(),
        file_bytes: 0,
        buffer: vec![0; COPY_BUFFER],
    };

    let mut entries_read = 0u64;
    let mut last: Option<String> = None;
    {
        let mut entries = archive
            .entries()
            .map_err(|e| applier.stream_error(e, &Place::Start))?;
        loop {
            // Everything read until the parser hands out the next entry is header data.
            state.header_start.set(Some(state.pos.get()));
            let next = entries.next();
            state.header_start.set(None);
            let mut entry = match next {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(e)) => {
                    let place = last.as_deref().map_or(Place::Start, Place::After);
                    return Err(applier.stream_error(e, &place));
                }
            };
            let raw = entry.path_bytes().into_owned();
            let name = show(&raw);
            applier.entry(&mut entry, &raw, &name)?;
            // Data of entries that have none for us (a directory with a size) is skipped
            // here rather than inside the parser, so it never counts as header data.
            io::copy(&mut entry, &mut io::sink())
                .map_err(|e| applier.stream_error(e, &Place::In(&name)))?;
            entries_read += 1;
            last = Some(name);
        }
    }
    applier.finish_directories()?;

    // The diff id covers the whole uncompressed stream: the end-of-archive blocks and any
    // padding after them too, as containerd reads to the end before taking the digest.
    let mut meter = archive.into_inner();
    io::copy(&mut meter, &mut io::sink()).map_err(|e| applier.stream_error(e, &Place::End))?;
    let diff_id = meter.digester.finish();
    if let Some(expected) = &options.expected_diff_id
        && *expected != diff_id
    {
        return Err(Error::DiffIdMismatch {
            expected: expected.clone(),
            actual: diff_id,
        });
    }
    if options.sync_fs {
        nix::unistd::syncfs(applier.tree.root()).map_err(|errno| Error::Sync {
            path: root.to_owned(),
            source: errno.into(),
        })?;
    }
    Ok(ApplyReport {
        diff_id,
        uncompressed_size: state.pos.get(),
        compression,
        entries: entries_read,
        ignored_xattrs: applier.ignored.list,
        ignored_xattr_count: applier.ignored.count,
    })
}

/// What the readers of one apply observed, shared with the loop that classifies errors.
#[derive(Default)]
struct StreamState {
    /// Uncompressed bytes read so far.
    pos: Cell<u64>,
    /// Where the parser started reading the current entry's headers, while it does.
    header_start: Cell<Option<u64>>,
    /// The uncompressed bound was exceeded.
    limit_hit: Cell<bool>,
    /// One entry's headers exceeded [`MAX_ENTRY_HEADER_BYTES`].
    headers_hit: Cell<bool>,
    /// The caller's reader failed.
    source_failed: Cell<bool>,
}

/// The caller's reader, remembering whether it failed: the decoders and the tar parser wrap
/// or replace errors, and a failing source is not a corrupt layer.
struct SourceReader<R> {
    inner: R,
    state: Rc<StreamState>,
}

impl<R: Read> Read for SourceReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                self.state.source_failed.set(true);
            }
        })
    }
}

/// Hashes and counts the uncompressed stream, and enforces the bounds.
struct Meter<R> {
    inner: R,
    state: Rc<StreamState>,
    digester: Digester,
    limit: Option<u64>,
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let pos = self.state.pos.get() + n as u64;
        if let Some(limit) = self.limit
            && pos > limit
        {
            self.state.limit_hit.set(true);
            return Err(io::Error::other("uncompressed size bound exceeded"));
        }
        if let Some(start) = self.state.header_start.get()
            && pos - start > MAX_ENTRY_HEADER_BYTES
        {
            self.state.headers_hit.set(true);
            return Err(io::Error::other("entry headers too large"));
        }
        self.state.pos.set(pos);
        self.digester.update(&buf[..n]);
        Ok(n)
    }
}

/// Where in the stream an error happened, for messages.
enum Place<'a> {
    Start,
    In(&'a str),
    After(&'a str),
    End,
}

impl Place<'_> {
    fn describe(&self) -> String {
        match self {
            Place::Start => "at the first entry".to_owned(),
            Place::In(name) => format!("in entry {name:?}"),
            Place::After(name) => format!("after entry {name:?}"),
            Place::End => "after the end of the tar archive".to_owned(),
        }
    }
}

/// The kind of object an entry makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Char,
    Block,
    Fifo,
}

/// An entry's metadata, from its header and PAX records.
struct Meta {
    uid: u32,
    gid: u32,
    /// Permission, setuid, setgid and sticky bits.
    mode: u32,
    atime: TimeSpec,
    mtime: TimeSpec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A directory whose times are set once the whole layer is applied.
struct DirTimes {
    rel: Vec<u8>,
    name: String,
    atime: TimeSpec,
    mtime: TimeSpec,
}

struct Applier<'o> {
    options: &'o ApplyOptions,
    tree: Tree,
    inherit: Inherit,
    state: Rc<StreamState>,
    compression: Compression,
    /// Paths this layer created, and their ancestors: what an opaque marker keeps.
    kept: HashSet<Vec<u8>>,
    dirs: Vec<DirTimes>,
    ignored: Ignored,
    /// Regular file bytes written, bounded like the stream (sparse entries can expand).
    file_bytes: u64,
    buffer: Vec<u8>,
}

impl Applier<'_> {
    /// The error for a failed read of the stream: what the readers observed decides.
    fn stream_error(&self, source: io::Error, place: &Place<'_>) -> Error {
        if self.state.limit_hit.get() {
            return Error::TooLarge {
                limit: self.options.max_uncompressed_bytes.unwrap_or_default(),
                at: place.describe(),
            };
        }
        if self.state.headers_hit.get() {
            return Error::HeadersTooLarge {
                at: place.describe(),
            };
        }
        if self.state.source_failed.get() {
            return Error::Source { source };
        }
        let mut at = place.describe();
        if matches!(place, Place::Start) && self.compression == Compression::Uncompressed {
            at.push_str(": not a tar archive, nor gzip, zstd or xz compressed");
        }
        Error::Corrupt { at, source }
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
        name: &str,
    ) -> Result<()> {
        let header = entry.header();
        let kind = match header.entry_type() {
            // Old tars mark directories with a trailing slash on a '\0' entry; Go's reader
            // reads them as directories.
            EntryType::Regular if header.as_bytes()[156] == 0 && raw.ends_with(b"/") => Kind::Dir,
            // tar-rs reads GNU sparse entries as their full contents.
            EntryType::Regular | EntryType::GNUSparse => Kind::File,
            EntryType::Directory => Kind::Dir,
            EntryType::Symlink => Kind::Symlink,
            EntryType::Link => Kind::HardLink,
            EntryType::Char => Kind::Char,
            EntryType::Block => Kind::Block,
            EntryType::Fifo => Kind::Fifo,
            EntryType::XGlobalHeader => {
                tracing::debug!(entry = name, "PAX global header ignored");
                return Ok(());
            }
            other => {
                let flag = other.as_byte();
                return Err(Error::refused(
                    name,
                    format!(
                        "unsupported entry type {:?} ({})",
                        char::from(flag),
                        type_name(flag)
                    ),
                ));
            }
        };
        let Some(rel) = clean(raw, self.options.refuse_absolute_names)
            .map_err(|reason| Error::refused(name, reason))?
        else {
            tracing::debug!(entry = name, "entry resolves to the root: ignored");
            return Ok(());
        };
        let meta = read_meta(entry, name)?;
        let (parents, base) = split(&rel);

        // Check whiteout names before creating anything for them.
        let whiteout = base.strip_prefix(WHITEOUT_PREFIX.as_bytes());
        if let Some(target) = whiteout
            && base != OPAQUE_WHITEOUT.as_bytes()
            && matches!(target, b"" | b"." | b"..")
        {
            return Err(Error::refused(
                name,
                "whiteout does not name an entry of its directory",
            ));
        }

        self.tree
            .walk(&parents, Some(&self.inherit))
            .map_err(|e| walk_error(name, "parent directory", &e, &parents))?;

        if let Some(target) = whiteout {
            if base == OPAQUE_WHITEOUT.as_bytes() {
                return self.opaque(&parents, name);
            }
            return self.whiteout(target, &meta, name);
        }

        match kind {
            Kind::Dir => self.directory(&rel, base, &meta, name)?,
            Kind::File => self.file(entry, base, &meta, name)?,
            Kind::Symlink => self.symlink(entry, base, &meta, name)?,
            Kind::HardLink => self.hard_link(entry, base, &meta, name)?,
            Kind::Char | Kind::Block | Kind::Fifo => {
                self.special(entry.header(), kind, base, &meta, name)?
            }
        }
        self.keep(&rel);
        Ok(())
    }

    /// Records a path this layer created, with its ancestors, for opaque markers.
    fn keep(&mut self, rel: &[u8]) {
        if self.options.whiteouts != Whiteouts::Remove {
            return;
        }
        let mut end = rel.len();
        self.kept.insert(rel.to_vec());
        // Every insert adds all ancestors, so the first ancestor already there ends it.
        while let Some(slash) = rel[..end].iter().rposition(|b| *b == b'/') {
            if !self.kept.insert(rel[..slash].to_vec()) {
                break;
            }
            end = slash;
        }
    }

    /// `.wh.<target>` in the walked directory.
    fn whiteout(&mut self, target: &[u8], meta: &Meta, name: &str) -> Result<()> {
        let dir = self.tree.dir();
        remove_all_at(dir, target).map_err(|e| Error::fs(name, "remove whited-out path", e))?;
        if self.options.whiteouts == Whiteouts::Overlay {
            mknodat(dir, target, SFlag::S_IFCHR, Mode::empty(), 0)
                .map_err(|e| Error::fs(name, "create overlay whiteout device", e))?;
            if !self.options.no_same_owner {
                Node::At(dir, target)
                    .chown(meta.uid, meta.gid)
                    .map_err(|e| Error::fs(name, "set whiteout owner", e))?;
            }
        }
        Ok(())
    }

    /// `.wh..wh..opq` in the walked directory `parents`.
    fn opaque(&mut self, parents: &[&[u8]], name: &str) -> Result<()> {
        let fd = openat(self.tree.dir(), ".", dir_flags(), Mode::empty())
            .map_err(|e| Error::fs(name, "open opaque directory", e))?;
        if self.options.whiteouts == Whiteouts::Overlay {
            rustix::fs::fsetxattr(
                &fd,
                OVERLAY_OPAQUE_XATTR,
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| Error::fs(name, "set overlay opaque xattr", e))?;
            return Ok(());
        }
        // Remove, depth first, everything this layer did not add; recurse into kept
        // directories, whose older contents are hidden too.
        struct Frame {
            dir: Dir,
            rel: Vec<u8>,
            pending: Vec<Vec<u8>>,
        }
        let open = |fd: OwnedFd, rel: Vec<u8>| -> nix::Result<Frame> {
            let mut dir = Dir::from_fd(fd)?;
            let pending = crate::tree::list_names(&mut dir)?;
            Ok(Frame { dir, rel, pending })
        };
        let fail = |e: Errno| Error::fs(name, "clear opaque directory", e);
        let mut stack = vec![open(fd, parents.join(&b'/')).map_err(fail)?];
        while let Some(top) = stack.last_mut() {
            let Some(child) = top.pending.pop() else {
                stack.pop();
                continue;
            };
            let mut rel = top.rel.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(&child);
            let dir = top.dir.as_fd();
            if !self.kept.contains(&rel) {
                remove_all_at(dir, &child).map_err(fail)?;
                continue;
            }
            match openat(dir, &child[..], dir_flags(), Mode::empty()) {
                Ok(fd) => {
                    let frame = open(fd, rel).map_err(fail)?;
                    stack.push(frame);
                }
                // A kept file, or a kept symlink: nothing below it.
                Err(Errno::ENOTDIR | Errno::ELOOP) => {}
                Err(e) => return Err(fail(e)),
            }
        }
        Ok(())
    }

    fn directory(&mut self, rel: &[u8], base: &[u8], meta: &Meta, name: &str) -> Result<()> {
        let dir = self.tree.dir();
        let mode = Mode::from_bits_truncate(meta.mode);
        match mkdirat(dir, base, mode) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                let existing = lstat_at(dir, base).map_err(|e| Error::fs(name, "stat", e))?;
                // An existing directory merges; anything else is replaced.
                if !crate::tree::is_type(&existing, nix::libc::S_IFDIR) {
                    remove_all_at(dir, base).map_err(|e| Error::fs(name, "replace", e))?;
                    mkdirat(dir, base, mode).map_err(|e| Error::fs(name, "create directory", e))?;
                }
            }
            Err(e) => return Err(Error::fs(name, "create directory", e)),
        }
        let fd = openat(dir, base, dir_flags(), Mode::empty())
            .map_err(|e| Error::fs(name, "open directory", e))?;
        set_meta(
            self.options,
            &mut self.ignored,
            Node::Fd(fd.as_fd()),
            Kind::Dir,
            meta,
            name,
            false,
        )?;
        self.dirs.push(DirTimes {
            rel: rel.to_vec(),
            name: name.to_owned(),
            atime: meta.atime,
            mtime: meta.mtime,
        });
        // Its entries usually follow: keep it open as their parent.
        self.tree.push(base, fd);
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        base: &[u8],
        meta: &Meta,
        name: &str,
    ) -> Result<()> {
        let size = entry.size();
        if let Some(limit) = self.options.max_uncompressed_bytes
            && self.file_bytes.saturating_add(size) > limit
        {
            return Err(Error::TooLarge {
                limit,
                at: Place::In(name).describe(),
            });
        }
        self.file_bytes += size;
        let dir = self.tree.dir();
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        // Mode 0600 until the final chmod, which happens after chown (chown clears setuid).
        let create = || openat(dir, base, flags, Mode::from_bits_truncate(0o600));
        let fd = match create() {
            Ok(fd) => fd,
            Err(Errno::EEXIST) => {
                remove_all_at(dir, base).map_err(|e| Error::fs(name, "replace", e))?;
                create().map_err(|e| Error::fs(name, "create file", e))?
            }
            Err(e) => return Err(Error::fs(name, "create file", e)),
        };
        let mut file = File::from(fd);
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.stream_error(e, &Place::In(name))),
            };
            file.write_all(&self.buffer[..n])
                .map_err(|e| Error::fs(name, "write file", e))?;
            written += n as u64;
        }
        if written != size {
            // The parser ends an entry's data quietly at the end of the stream.
            return Err(Error::Corrupt {
                at: Place::In(name).describe(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file data ends after {written} of {size} bytes"),
                ),
            });
        }
        set_meta(
            self.options,
            &mut self.ignored,
            Node::Fd(file.as_fd()),
            Kind::File,
            meta,
            name,
            true,
        )
    }

    fn symlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        base: &[u8],
        meta: &Meta,
        name: &str,
    ) -> Result<()> {
        let target = entry.link_name_bytes().unwrap_or_default();
        if target.is_empty() {
            return Err(Error::refused(name, "symlink has an empty target"));
        }
        if target.contains(&0) {
            return Err(Error::refused(name, "symlink target contains a NUL byte"));
        }
        // The target is stored as is: it is only ever resolved inside the container.
        let dir = self.tree.dir();
        let create = || symlinkat(&target[..], dir, base);
        match create() {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                remove_all_at(dir, base).map_err(|e| Error::fs(name, "replace", e))?;
                create().map_err(|e| Error::fs(name, "create symlink", e))?;
            }
            Err(e) => return Err(Error::fs(name, "create symlink", e)),
        }
        set_meta(
            self.options,
            &mut self.ignored,
            Node::At(dir, base),
            Kind::Symlink,
            meta,
            name,
            true,
        )
    }

    fn hard_link<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        base: &[u8],
        meta: &Meta,
        name: &str,
    ) -> Result<()> {
        let raw_target = entry.link_name_bytes().unwrap_or_default().into_owned();
        let shown = show(&raw_target);
        let refuse = |why: String| Error::refused(name, format!("hard link to {shown:?}: {why}"));
        // A hard link names another member of the archive: cleaned like entry names, so
        // `/etc/passwd` is the layer's own etc/passwd and `../x` is refused.
        let target = clean(&raw_target, self.options.refuse_absolute_names)
            .map_err(refuse)?
            .ok_or_else(|| refuse("the target is the layer root".to_owned()))?;
        let (target_parents, target_base) = split(&target);
        let target_dir = open_beneath(self.tree.root(), &target_parents, crate::tree::walk_flags())
            .map_err(|e| match e {
                WalkError::Io { errno, .. } => Error::fs(name, "resolve hard link target", errno),
                e => refuse(e.describe(&target_parents)),
            })?;
        let target_stat = match lstat_at(target_dir.as_fd(), target_base) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Err(refuse("the target does not exist".to_owned())),
            Err(e) => return Err(Error::fs(name, "stat hard link target", e)),
        };
        if crate::tree::is_type(&target_stat, nix::libc::S_IFDIR) {
            return Err(refuse("the target is a directory".to_owned()));
        }
        let dir = self.tree.dir();
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        let create = || linkat(target_dir.as_fd(), target_base, dir, base, AtFlags::empty());
        match create() {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                remove_all_at(dir, base).map_err(|e| Error::fs(name, "replace", e))?;
                create().map_err(|e| Error::fs(name, "create hard link", e))?;
            }
            Err(e) => return Err(Error::fs(name, "create hard link", e)),
        }
        // As containerd, the link's header sets the (shared) inode's metadata.
        let linked = if crate::tree::is_type(&target_stat, nix::libc::S_IFLNK) {
            Kind::Symlink
        } else if crate::tree::is_type(&target_stat, nix::libc::S_IFREG) {
            Kind::File
        } else {
            Kind::HardLink
        };
        set_meta(
            self.options,
            &mut self.ignored,
            Node::At(dir, base),
            linked,
            meta,
            name,
            true,
        )
    }

    /// Character and block devices and fifos.
    fn special(
        &mut self,
        header: &tar::Header,
        kind: Kind,
        base: &[u8],
        meta: &Meta,
        name: &str,
    ) -> Result<()> {
        let number = |field: io::Result<Option<u32>>| {
            field
                .map(Option::unwrap_or_default)
                .map_err(|e| Error::refused(name, format!("invalid device number: {e}")))
        };
        let (major, minor) = if kind == Kind::Fifo {
            (0, 0)
        } else {
            (
                number(header.device_major())?,
                number(header.device_minor())?,
            )
        };
        let sflag = match kind {
            Kind::Char => SFlag::S_IFCHR,
            Kind::Block => SFlag::S_IFBLK,
            _ => SFlag::S_IFIFO,
        };
        let dir = self.tree.dir();
        let mode = Mode::from_bits_truncate(meta.mode);
        let create = || {
            mknodat(
                dir,
                base,
                sflag,
                mode,
                makedev(u64::from(major), u64::from(minor)),
            )
        };
        let made = match create() {
            Err(Errno::EEXIST) => {
                remove_all_at(dir, base).map_err(|e| Error::fs(name, "replace", e))?;
                create()
            }
            other => other,
        };
        made.map_err(|e| {
            let op = if e == Errno::EPERM && kind != Kind::Fifo {
                "create device node (needs CAP_MKNOD, which a user namespace does not give)"
            } else {
                "create node"
            };
            Error::fs(name, op, e)
        })?;
        set_meta(
            self.options,
            &mut self.ignored,
            Node::At(dir, base),
            kind,
            meta,
            name,
            true,
        )
    }

    /// Sets the times of the layer's directories, now that nothing more is created in them.
    /// One removed or replaced later in the layer is skipped.
    fn finish_directories(&mut self) -> Result<()> {
        for dir in std::mem::take(&mut self.dirs) {
            let (parents, base) = split(&dir.rel);
            if self.tree.walk(&parents, None).is_err() {
                continue;
            }
            let parent = self.tree.dir();
            match lstat_at(parent, base) {
                Ok(st) if crate::tree::is_type(&st, nix::libc::S_IFDIR) => {}
                _ => continue,
            }
            Node::At(parent, base)
                .set_times(&dir.atime, &dir.mtime)
                .map_err(|e| Error::fs(&dir.name, "set directory times", e))?;
        }
        Ok(())
    }
}

/// The layer's xattrs that were skipped.
#[derive(Default)]
struct Ignored {
    list: Vec<IgnoredXattr>,
    count: u64,
}

/// Owner, then xattrs, then mode, then (unless deferred) times: chown clears setuid bits
/// and `security.capability`, so it comes first.
fn set_meta(
    options: &ApplyOptions,
    ignored: &mut Ignored,
    node: Node<'_>,
    kind: Kind,
    meta: &Meta,
    name: &str,
    times: bool,
) -> Result<()> {
    if !options.no_same_owner {
        node.chown(meta.uid, meta.gid).map_err(|e| {
            let op = if e == Errno::EINVAL {
                format!(
                    "set owner {}:{} (not mapped in this user namespace?)",
                    meta.uid, meta.gid
                )
            } else {
                format!("set owner {}:{}", meta.uid, meta.gid)
            };
            Error::fs(name, op, e)
        })?;
    }
    for (key, value) in &meta.xattrs {
        ignored.set_xattr(node, kind, key, value, name)?;
    }
    if kind != Kind::Symlink {
        node.chmod(meta.mode)
            .map_err(|e| Error::fs(name, format!("set mode {:o}", meta.mode), e))?;
    }
    if times {
        node.set_times(&meta.atime, &meta.mtime)
            .map_err(|e| Error::fs(name, "set times", e))?;
    }
    Ok(())
}

impl Ignored {
    fn set_xattr(
        &mut self,
        node: Node<'_>,
        kind: Kind,
        key: &[u8],
        value: &[u8],
        name: &str,
    ) -> Result<()> {
        let reason = if key.starts_with(b"trusted.") {
            IgnoredReason::Trusted
        } else {
            let Err(err) = node.set_xattr(key, value) else {
                return Ok(());
            };
            let errno = err.raw_os_error();
            let file_or_dir = matches!(kind, Kind::File | Kind::Dir);
            if errno == Some(nix::libc::ENOTSUP) {
                IgnoredReason::NotSupported
            } else if errno == Some(nix::libc::EPERM) && key.starts_with(b"user.") && !file_or_dir {
                // Linux allows user.* only on files and directories.
                IgnoredReason::NotPermitted
            } else if matches!(errno, Some(nix::libc::EPERM) | Some(nix::libc::EACCES))
                && key.starts_with(b"security.")
            {
                IgnoredReason::NotPermitted
            } else {
                return Err(Error::fs(name, format!("set xattr {:?}", show(key)), err));
            }
        };
        let key = show(key);
        tracing::warn!(
            entry = name,
            xattr = key,
            ?reason,
            "xattr of the layer ignored"
        );
        self.count += 1;
        if self.list.len() < MAX_REPORTED_XATTRS {
            self.list.push(IgnoredXattr {
                entry: name.to_owned(),
                name: key,
                reason,
            });
        }
        Ok(())
    }
}

/// What an unsupported typeflag is, for messages.
fn type_name(flag: u8) -> &'static str {
    match flag {
        b'7' => "contiguous file",
        b'D' => "GNU dump directory",
        b'M' => "GNU multi-volume continuation",
        b'N' => "GNU old long name",
        b'V' => "GNU volume header",
        b'x' | b'g' | b'L' | b'K' => "extension header in a pre-POSIX tar header",
        _ => "unknown",
    }
}

/// The error for a directory chain that cannot be resolved.
fn walk_error(name: &str, what: &str, err: &WalkError, comps: &[&[u8]]) -> Error {
    match err {
        WalkError::Io { errno, .. } => {
            Error::fs(name, format!("{what} {:?}", err.path(comps)), *errno)
        }
        _ => Error::refused(name, format!("{what} {}", err.describe(comps))),
    }
}

/// Reads owner, mode, times and xattrs from the header and PAX records.
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>, name: &str) -> Result<Meta> {
    let bad = |field: &str, e: io::Error| Error::refused(name, format!("invalid {field}: {e}"));
    let header = entry.header();
    let id = |field: &str, value: io::Result<u64>| {
        let value = value.map_err(|e| bad(field, e))?;
        u32::try_from(value)
            .map_err(|_| Error::refused(name, format!("{field} {value} does not fit in 32 bits")))
    };
    let uid = id("uid", header.uid())?;
    let gid = id("gid", header.gid())?;
    let mode = header.mode().map_err(|e| bad("mode", e))? & 0o7777;
    let mtime = header.mtime().map_err(|e| bad("mtime", e))?;
    let mut mtime = (i64::try_from(mtime).unwrap_or(i64::MAX), 0i64);
    // GNU headers may carry an access time; Go's reader takes it when the field is set.
    let mut atime = header
        .as_gnu()
        .filter(|gnu| gnu.atime[0] != 0)
        .and_then(|gnu| gnu.atime().ok())
        .map(|t| (i64::try_from(t).unwrap_or(i64::MAX), 0i64));

    let mut xattrs = Vec::new();
    if let Some(records) = entry.pax_extensions().map_err(|e| bad("PAX header", e))? {
        for record in records {
            let record = record.map_err(|e| bad("PAX record", e))?;
            let key = record.key_bytes();
            if key == b"mtime" {
                mtime = pax_time(record.value_bytes())
                    .ok_or_else(|| Error::refused(name, "invalid PAX mtime"))?;
            } else if key == b"atime" {
                atime = Some(
                    pax_time(record.value_bytes())
                        .ok_or_else(|| Error::refused(name, "invalid PAX atime"))?,
                );
            } else if let Some(xattr) = key.strip_prefix(b"SCHILY.xattr.") {
                if xattr.is_empty() || xattr.contains(&0) {
                    return Err(Error::refused(name, "invalid xattr name in PAX record"));
                }
                xattrs.push((xattr.to_vec(), record.value_bytes().to_vec()));
            } else if key.starts_with(b"GNU.sparse.") {
                // PAX sparse formats would be written out as their raw map: refuse them.
                return Err(Error::refused(
                    name,
                    "PAX (GNU 0.x/1.0) sparse files are not supported",
                ));
            }
        }
    }
    let mtime = bound_time(mtime);
    let atime = bound_time(atime.map_or(mtime, |a| a.max(mtime)));
    Ok(Meta {
        uid,
        gid,
        mode,
        atime: TimeSpec::new(atime.0, atime.1),
        mtime: TimeSpec::new(mtime.0, mtime.1),
        xattrs,
    })
}

/// A PAX time, `[-]seconds[.fraction]`, as seconds and nanoseconds (negative times are
/// returned as a negative second count; [`bound_time`] makes them the epoch).
fn pax_time(value: &[u8]) -> Option<(i64, i64)> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos = 0i64;
    for digit in frac.bytes().chain(std::iter::repeat(b'0')).take(9) {
        nanos = nanos * 10 + i64::from(digit - b'0');
    }
    if negative {
        // Any negative time is before the epoch; its exact value does not matter.
        return Some((-secs - 1, 0));
    }
    Some((secs, nanos))
}

/// containerd's `boundTime`: a time before the epoch or beyond what a 64-bit nanosecond
/// count holds (year 2262) becomes the epoch.
fn bound_time((secs, nanos): (i64, i64)) -> (i64, i64) {
    const MAX: (i64, i64) = (9_223_372_036, 854_775_807);
    if secs < 0 || (secs, nanos) > MAX {
        (0, 0)
    } else {
        (secs, nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse_like_go() {
        assert_eq!(pax_time(b"1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(
            pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(
            pax_time(b"1.1234567891"),
            Some((1, 123_456_789)),
            "digits beyond nanoseconds are dropped"
        );
        assert_eq!(bound_time(pax_time(b"-5.5").expect("negative")), (0, 0));
        assert_eq!(pax_time(b""), None);
        assert_eq!(pax_time(b"1e9"), None);
        assert_eq!(pax_time(b".5"), None);
    }

    #[test]
    fn times_are_bounded_as_containerd() {
        assert_eq!(bound_time((5, 1)), (5, 1));
        assert_eq!(bound_time((-1, 0)), (0, 0));
        assert_eq!(bound_time((i64::MAX, 0)), (0, 0));
        assert_eq!(bound_time((9_223_372_036, 0)), (9_223_372_036, 0));
    }
}
