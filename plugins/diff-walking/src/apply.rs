//! The apply loop: reading entries, creating them beneath the root, whiteouts, metadata.

mod files;

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};

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
/// Size of the chunks the decoding thread hands to the applying thread: the tar parser's
/// 512-byte header reads are served from memory, never by a decompressor call.
const STREAM_CHUNK: usize = 256 * 1024;
/// Chunks decoded ahead of the applier: enough to keep both threads busy, few enough that a
/// layer refused early (or a decompression bomb) costs little decoding past the refusal.
const CHUNKS_AHEAD: usize = 4;

/// Applies the layer read from `reader` to the directory `root` (see the crate
/// documentation for the semantics and what is refused).
///
/// Blocking: run it on a blocking thread. To stop an apply early, make `reader` fail; the
/// error is [`Error::Source`], whose kind is that of a `berth_core::Error` wrapped in the
/// `io::Error` (`io::Error::other(err)`), else Internal.
///
/// Decompression and the diff id's hash run on a second thread, a few chunks ahead of the
/// thread that creates the entries (the two share a layer's cost on separate cores).
pub fn apply<R: Read + Send>(
    reader: R,
    root: &Path,
    options: &ApplyOptions,
) -> Result<ApplyReport> {
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
        failed: state.source_failed.clone(),
    };
    let (compression, decoder) = decompress(source).map_err(|source| Error::Source { source })?;
    let algorithm = options
        .expected_diff_id
        .as_ref()
        .map_or(Algorithm::Sha256, Digest::algorithm);
    std::thread::scope(|scope| {
        let (chunks_tx, chunks_rx) = sync_channel(CHUNKS_AHEAD);
        let (spent_tx, spent_rx) = std::sync::mpsc::channel();
        let decoding = std::thread::Builder::new()
            .name("layer-decode".to_owned())
            .spawn_scoped(scope, move || {
                decode_ahead(decoder, Digester::new(algorithm), chunks_tx, spent_rx)
            })
            .map_err(|source| Error::Source { source })?;
        let chunks = ChunkReader {
            chunks: chunks_rx,
            spent: spent_tx,
            current: Vec::new(),
            at: 0,
            failed: false,
        };
        let meter = Meter {
            inner: chunks,
            state: state.clone(),
            limit: options.max_uncompressed_bytes,
        };
        let files =
            files::Files::start(scope, options).map_err(|source| Error::Source { source })?;
        apply_stream(
            meter,
            decoding,
            files,
            tree,
            inherit,
            &state,
            compression,
            root,
            options,
        )
    })
}

/// The applying half of [`apply`]: parses the decoded stream from `meter` and creates the
/// entries; `decoding` (the other half) hands back the diff id once the stream is drained.
#[allow(clippy::too_many_arguments)]
fn apply_stream(
    meter: Meter<ChunkReader>,
    decoding: std::thread::ScopedJoinHandle<'_, Option<Digest>>,
    files: files::Files<'_>,
    tree: Tree,
    inherit: Inherit,
    state: &Rc<StreamState>,
    compression: Compression,
    root: &Path,
    options: &ApplyOptions,
) -> Result<ApplyReport> {
    let mut archive = tar::Archive::new(meter);
    let mut applier = Applier {
        options,
        tree,
        inherit,
        state: state.clone(),
        compression,
        kept: HashSet::new(),
        symlinks: HashSet::new(),
        dirs: Vec::new(),
        ignored: Ignored::default(),
        file_bytes: 0,
        buffer: vec![0; COPY_BUFFER],
        files: Some(files),
    };

    let mut entries_read = 0u64;
    let mut last: Option<String> = None;
    {
        let mut entries = archive
            .entries()
            .map_err(|e| applier.stream_error(e, &Place::Start))?;
        loop {
            // Everything read until the parser hands out the next entry is header data.
            let header_start = state.pos.get();
            state.headers.borrow_mut().clear();
            state.header_start.set(Some(header_start));
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
            let headers = state.headers.take();
            let headers = EntryHeaders::parse(&headers, header_start)
                .map_err(|reason| Error::refused(&name, reason))?;
            applier.ignored.entry = entries_read;
            applier.entry(&mut entry, &raw, &name, &headers)?;
            // Data of entries that have none for us (a directory with a size) is skipped
            // here rather than inside the parser, so it never counts as header data.
            io::copy(&mut entry, &mut io::sink())
                .map_err(|e| applier.stream_error(e, &Place::In(&name)))?;
            entries_read += 1;
            last = Some(name);
        }
    }
    if let Some(files) = applier.files.take() {
        let ignored = files.finish()?;
        applier.ignored.merge(ignored);
    }
    applier.finish_directories()?;

    // The diff id covers the whole uncompressed stream: the end-of-archive blocks and any
    // padding after them too, as containerd reads to the end before taking the digest.
    let mut meter = archive.into_inner();
    io::copy(&mut meter, &mut io::sink()).map_err(|e| applier.stream_error(e, &Place::End))?;
    drop(meter);
    let diff_id = decoding
        .join()
        .ok()
        .flatten()
        .ok_or_else(|| Error::Corrupt {
            at: Place::End.describe(),
            source: io::Error::other("the layer's decoding thread ended before the stream did"),
        })?;
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
        ignored_xattrs: applier.ignored.list.into_iter().map(|(_, i)| i).collect(),
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
    /// The caller's reader failed (set on the decoding thread).
    source_failed: Arc<AtomicBool>,
    /// The bytes the parser read for the current entry's headers (bounded by
    /// [`MAX_ENTRY_HEADER_BYTES`]): its PAX records are parsed from them again, see
    /// [`EntryHeaders::parse`].
    headers: RefCell<Vec<u8>>,
}

/// The caller's reader, remembering whether it failed: the decoders and the tar parser wrap
/// or replace errors, and a failing source is not a corrupt layer.
struct SourceReader<R> {
    inner: R,
    failed: Arc<AtomicBool>,
}

impl<R: Read> Read for SourceReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                self.failed.store(true, Ordering::Relaxed);
            }
        })
    }
}

/// The decoding thread of [`apply`]: reads the decompressed stream in chunks, hashes them
/// and sends them on, reusing the chunks the applier has finished with. Returns the digest
/// of the whole stream, or None when it stopped early (a read failed, or the applier gave
/// up and dropped its end).
fn decode_ahead<D: Read>(
    mut decoder: D,
    mut digester: Digester,
    chunks: SyncSender<io::Result<Vec<u8>>>,
    spent: Receiver<Vec<u8>>,
) -> Option<Digest> {
    loop {
        // A chunk the applier is done with, or a new one while it still holds them all.
        let mut chunk = spent.try_recv().unwrap_or_default();
        chunk.resize(STREAM_CHUNK, 0);
        let n = loop {
            match decoder.read(&mut chunk) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = chunks.send(Err(e));
                    return None;
                }
            }
        };
        if n == 0 {
            return Some(digester.finish());
        }
        chunk.truncate(n);
        digester.update(&chunk);
        if chunks.send(Ok(chunk)).is_err() {
            return None;
        }
    }
}

/// The applying thread's end of the decoded stream.
struct ChunkReader {
    chunks: Receiver<io::Result<Vec<u8>>>,
    spent: Sender<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
    /// The stream failed: it never reads as ended afterwards.
    failed: bool,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            if self.failed {
                return Err(io::Error::other("the layer stream failed earlier"));
            }
            match self.chunks.recv() {
                Ok(Ok(chunk)) => {
                    let done = std::mem::replace(&mut self.current, chunk);
                    self.at = 0;
                    if done.capacity() > 0 {
                        // The decoder may have finished already; then the chunk just goes.
                        let _ = self.spent.send(done);
                    }
                }
                Ok(Err(e)) => {
                    self.failed = true;
                    return Err(e);
                }
                // The decoder sends every chunk before it ends: this is the end.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Counts the uncompressed stream and enforces the bounds (the decoding thread hashes it).
struct Meter<R> {
    inner: R,
    state: Rc<StreamState>,
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
        if self.state.header_start.get().is_some() {
            self.state.headers.borrow_mut().extend_from_slice(&buf[..n]);
        }
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

struct Applier<'o, 's> {
    options: &'o ApplyOptions,
    tree: Tree,
    inherit: Inherit,
    state: Rc<StreamState>,
    compression: Compression,
    /// Paths this layer created, and their ancestors: what an opaque marker keeps.
    kept: HashSet<Vec<u8>>,
    /// Symlinks this layer created: whiteouts below them are ignored (see `entry`).
    symlinks: HashSet<Vec<u8>>,
    dirs: Vec<DirTimes>,
    ignored: Ignored,
    /// Regular file bytes written, bounded like the stream (sparse entries can expand).
    file_bytes: u64,
    buffer: Vec<u8>,
    /// The helper creating small files (see `files`); None once finished.
    files: Option<files::Files<'s>>,
}

impl Applier<'_, '_> {
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
        if self.state.source_failed.load(Ordering::Relaxed) {
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
        headers: &EntryHeaders,
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
        let meta = read_meta(entry, name, headers)?;
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

        if let Some(files) = self.files.as_mut() {
            let by_path = match kind {
                _ if whiteout.is_some() => false,
                Kind::Dir => true,
                Kind::File => files::takes(entry.size()),
                _ => false,
            };
            if by_path {
                files.wait_for_path(&rel)?;
            } else {
                files.settle()?;
            }
        }

        if let Err(e) = self.tree.walk(&parents, Some(&self.inherit)) {
            // A whiteout (or opaque marker) below a symlink this layer created names nothing:
            // the symlink replaced whatever the lower layers had at that path. umoci writes
            // such entries when a directory becomes a symlink (the symlink, then whiteouts of
            // the directory's old entries). containerd resolves the symlink and removes, or
            // on overlayfs whites out, the name in its target directory, which never held it
            // here; ignoring the entry gives the same tree without acting through a symlink.
            // Below a symlink of an earlier layer it is refused like any other entry.
            let own_symlink = match e {
                WalkError::Symlink { at } => self.symlinks.contains(&parents[..=at].join(&b'/')),
                _ => false,
            };
            if whiteout.is_some() && own_symlink {
                tracing::debug!(
                    entry = name,
                    "whiteout below a symlink ignored: {}",
                    e.describe(&parents)
                );
                return Ok(());
            }
            return Err(walk_error(name, "parent directory", &e, &parents));
        }

        if let Some(target) = whiteout {
            if base == OPAQUE_WHITEOUT.as_bytes() {
                return self.opaque(&parents, name);
            }
            return self.whiteout(target, &meta, name);
        }

        match kind {
            Kind::Dir => self.directory(&rel, base, &meta, name)?,
            Kind::File => self.file(entry, &rel, base, meta, name)?,
            Kind::Symlink => {
                self.symlink(entry, base, &meta, name)?;
                self.symlinks.insert(rel.clone());
            }
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
        rel: &[u8],
        base: &[u8],
        meta: Meta,
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
        if let Some(files) = self.files.as_mut()
            && files::takes(size)
        {
            let mut data = Vec::with_capacity(size as usize);
            if let Err(e) = entry.read_to_end(&mut data) {
                return Err(self.stream_error(e, &Place::In(name)));
            }
            check_file_size(data.len() as u64, size, name)?;
            let dir = dir
                .try_clone_to_owned()
                .map_err(|e| Error::fs(name, "duplicate directory descriptor", e))?;
            return files.send(self.ignored.entry, rel, dir, base, data, meta, name);
        }
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
        check_file_size(written, size, name)?;
        set_meta(
            self.options,
            &mut self.ignored,
            Node::Fd(file.as_fd()),
            Kind::File,
            &meta,
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

/// The parser ends an entry's data quietly at the end of the stream: a file shorter than its
/// header says is a corrupt layer.
fn check_file_size(written: u64, size: u64, name: &str) -> Result<()> {
    if written == size {
        return Ok(());
    }
    Err(Error::Corrupt {
        at: Place::In(name).describe(),
        source: io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("file data ends after {written} of {size} bytes"),
        ),
    })
}

/// The layer's xattrs that were skipped.
#[derive(Default)]
struct Ignored {
    /// With the number of the entry each came from, to report them in archive order (the
    /// file helper keeps a list of its own).
    list: Vec<(u64, IgnoredXattr)>,
    count: u64,
    /// The number of the entry being applied.
    entry: u64,
}

impl Ignored {
    /// Adds what another thread skipped, keeping archive order and the report's bound.
    fn merge(&mut self, other: Ignored) {
        self.count += other.count;
        self.list.extend(other.list);
        self.list.sort_by_key(|(entry, _)| *entry);
        self.list.truncate(MAX_REPORTED_XATTRS);
    }
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
            self.list.push((
                self.entry,
                IgnoredXattr {
                    entry: name.to_owned(),
                    name: key,
                    reason,
                },
            ));
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

/// Reads owner, mode, times and xattrs from the header and the entry's PAX records (as
/// [`EntryHeaders::parse`] read them).
fn read_meta<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    name: &str,
    headers: &EntryHeaders,
) -> Result<Meta> {
    let bad = |field: &str, e: io::Error| Error::refused(name, format!("invalid {field}: {e}"));
    headers.check_parser_agrees(entry, name)?;
    let pax = headers.pax.as_slice();
    // The header as read, before the parser copied (its reading of) PAX ids into it.
    let header = headers.header.as_ref().unwrap_or(entry.header());
    let id = |field: &str, value: io::Result<u64>| {
        let value = value.map_err(|e| bad(field, e))?;
        u32::try_from(value)
            .map_err(|_| Error::refused(name, format!("{field} {value} does not fit in 32 bits")))
    };
    // As Go's reader: a PAX uid or gid replaces the header's.
    let pax_id = |key: &[u8]| {
        last_record(pax, key).map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| io::Error::other(format!("PAX value {:?}", show(v))))
        })
    };
    let uid = id("uid", pax_id(b"uid").unwrap_or_else(|| header.uid()))?;
    let gid = id("gid", pax_id(b"gid").unwrap_or_else(|| header.gid()))?;
    let mode = header.mode().map_err(|e| bad("mode", e))? & 0o7777;
    let mtime = header.mtime().map_err(|e| bad("mtime", e))?;
    let mut mtime = (i64::try_from(mtime).unwrap_or(i64::MAX), 0i64);
    // GNU headers may carry an access time; Go's reader takes it when the field is set.
    let mut atime = header
        .as_gnu()
        .filter(|gnu| gnu.atime[0] != 0)
        .and_then(|gnu| gnu.atime().ok())
        .map(|t| (i64::try_from(t).unwrap_or(i64::MAX), 0i64));

    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for (key, value) in pax {
        if key == b"mtime" {
            mtime = pax_time(value).ok_or_else(|| Error::refused(name, "invalid PAX mtime"))?;
        } else if key == b"atime" {
            atime = Some(pax_time(value).ok_or_else(|| Error::refused(name, "invalid PAX atime"))?);
        } else if let Some(xattr) = key.strip_prefix(b"SCHILY.xattr.") {
            if xattr.is_empty() || xattr.contains(&0) {
                return Err(Error::refused(name, "invalid xattr name in PAX record"));
            }
            // A repeated record replaces the earlier one, as in Go's record map.
            xattrs.retain(|(k, _)| k != xattr);
            xattrs.push((xattr.to_vec(), value.clone()));
        } else if key.starts_with(b"GNU.sparse.") {
            // PAX sparse formats would be written out as their raw map: refuse them.
            return Err(Error::refused(
                name,
                "PAX (GNU 0.x/1.0) sparse files are not supported",
            ));
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

/// One PAX record: key and value, as bytes.
type PaxRecord = (Vec<u8>, Vec<u8>);

/// The tar block size.
const BLOCK: usize = 512;

/// What the parser read before handing out an entry, read again: see [`EntryHeaders::parse`].
struct EntryHeaders {
    /// The entry's PAX records, in order.
    pax: Vec<PaxRecord>,
    /// A GNU long name member came before the entry.
    long_name: bool,
    /// A GNU long link member came before the entry.
    long_link: bool,
    /// The entry's own header block, unmodified.
    header: Option<tar::Header>,
}

impl EntryHeaders {
    /// Walks the bytes the parser consumed for one entry (`headers`, from uncompressed offset
    /// `start`, where the previous entry's data ended) as the parser walks them: padding up
    /// to the next block, then any GNU long name (`L`), long link (`K`) and PAX (`x`) members
    /// of a recognised (ustar or GNU) header, each with its data, then the entry's header.
    ///
    /// The `tar` crate splits PAX data at every newline, so it misreads a record whose value
    /// holds one (binary xattr values such as `security.capability` can): it refuses the
    /// record, it stops looking for `size`, `uid` and `gid` records there, and it would take
    /// a `path` or `linkpath` record forged inside such a value. Go's reader, and so
    /// containerd, reads each record by its length; so does [`parse_pax`], and the entry's
    /// owner, times and xattrs come from those records and the unmodified header.
    /// [`EntryHeaders::check_parser_agrees`] refuses an entry whose path, link or size the
    /// parser took differently.
    fn parse(headers: &[u8], start: u64) -> std::result::Result<EntryHeaders, String> {
        let mut at = (BLOCK - (start % BLOCK as u64) as usize) % BLOCK;
        let mut out = EntryHeaders {
            pax: Vec::new(),
            long_name: false,
            long_link: false,
            header: None,
        };
        let mut pax: Option<&[u8]> = None;
        while let Some(block) = headers.get(at..at + BLOCK) {
            at += BLOCK;
            let magic = &block[257..265];
            let recognised = magic == b"ustar\x0000" || magic == b"ustar  \x00";
            let flag = block[156];
            if !(recognised && matches!(flag, b'L' | b'K' | b'x')) {
                let mut header = tar::Header::new_old();
                header.as_mut_bytes().copy_from_slice(block);
                out.header = Some(header);
                break;
            }
            let size = header_size(&block[124..136])
                .ok_or_else(|| "invalid size in an extension header".to_owned())?;
            let size =
                usize::try_from(size).map_err(|_| "extension header too large".to_owned())?;
            let data = headers
                .get(at..at.saturating_add(size))
                .ok_or_else(|| "extension header data ends early".to_owned())?;
            match flag {
                b'x' => pax = Some(data),
                b'L' => out.long_name = true,
                _ => out.long_link = true,
            }
            at = at.saturating_add(size.div_ceil(BLOCK) * BLOCK);
        }
        if let Some(data) = pax {
            out.pax = parse_pax(data)?;
        }
        Ok(out)
    }

    /// Refuses an entry whose path, link target or size the `tar` crate did not take as Go's
    /// reader does (PAX records first, then GNU long names, then the header): the layer would
    /// mean something else here than in containerd.
    fn check_parser_agrees<R: Read>(&self, entry: &tar::Entry<'_, R>, name: &str) -> Result<()> {
        let Some(header) = &self.header else {
            return Ok(());
        };
        let differs = |what: &str| {
            Error::refused(
                name,
                format!(
                    "the tar parser misread its {what} (a PAX record whose value holds a newline?)"
                ),
            )
        };
        let path = entry.path_bytes();
        match last_record(&self.pax, b"path") {
            Some(p) if *path != *p => return Err(differs("path")),
            None if !self.long_name && *path != *header.path_bytes() => {
                return Err(differs("path"));
            }
            _ => {}
        }
        let link = entry.link_name_bytes();
        match last_record(&self.pax, b"linkpath") {
            Some(l) if link.as_deref() != Some(l) => return Err(differs("link target")),
            None if !self.long_link && link != header.link_name_bytes() => {
                return Err(differs("link target"));
            }
            _ => {}
        }
        if header.entry_type() == EntryType::GNUSparse {
            // The parser reports a GNU sparse file's expanded size; its own map sets that.
            return Ok(());
        }
        let size = match last_record(&self.pax, b"size") {
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| Error::refused(name, "invalid PAX size"))?,
            None => header
                .entry_size()
                .map_err(|e| Error::refused(name, format!("invalid size: {e}")))?,
        };
        if size != entry.size() {
            return Err(differs("size"));
        }
        Ok(())
    }
}

/// A header's size field: octal, or base-256 when its first byte has the top bit set.
fn header_size(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut value = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(value);
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// PAX records as Go's `archive/tar` reads them: `<length> <key>=<value>\n`, the length (in
/// decimal, counting the whole record) deciding where the value ends, so values may hold
/// newlines and NUL bytes (not those of `path`, `linkpath`, `uname` and `gname`).
fn parse_pax(mut data: &[u8]) -> std::result::Result<Vec<PaxRecord>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let bad = || format!("invalid PAX record {:?}", show(&data[..data.len().min(64)]));
        let space = data.iter().position(|b| *b == b' ').ok_or_else(bad)?;
        let digits = data[..space].strip_prefix(b"+").unwrap_or(&data[..space]);
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        let len: usize = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(bad)?;
        if len < 5 || len > data.len() || len <= space + 1 {
            return Err(bad());
        }
        let (record, rest) = data.split_at(len);
        let body = record[space + 1..].strip_suffix(b"\n").ok_or_else(bad)?;
        let equals = body.iter().position(|b| *b == b'=').ok_or_else(bad)?;
        let (key, value) = (&body[..equals], &body[equals + 1..]);
        let nul_free = matches!(key, b"path" | b"linkpath" | b"uname" | b"gname");
        if key.is_empty() || key.contains(&0) || (nul_free && value.contains(&0)) {
            return Err(bad());
        }
        out.push((key.to_vec(), value.to_vec()));
        data = rest;
    }
    Ok(out)
}

/// The value of the last record named `key` (later records replace earlier ones).
fn last_record<'a>(pax: &'a [PaxRecord], key: &[u8]) -> Option<&'a [u8]> {
    pax.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_slice())
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

    /// `<len> <key>=<value>\n`, the length counting itself.
    fn record(key: &str, value: &[u8]) -> Vec<u8> {
        let body = key.len() + value.len() + 3;
        let mut len = body + 1;
        while body + len.to_string().len() != len {
            len = body + len.to_string().len();
        }
        let mut out = format!("{len} {key}=").into_bytes();
        out.extend_from_slice(value);
        out.push(b'\n');
        out
    }

    /// A layer: a PAX member with `records`, then a 0644 file `f` owned by 0:0.
    fn layer_with_pax(records: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut x = tar::Header::new_ustar();
        x.set_entry_type(EntryType::XHeader);
        x.set_size(records.len() as u64);
        x.set_mode(0o644);
        b.append_data(&mut x, "PaxHeaders/f", records)
            .expect("pax member");
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_size(4);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, "f", &b"data"[..]).expect("file");
        b.into_inner().expect("tar")
    }

    /// umoci 0.4 writes a directory that became a symlink as the symlink followed by
    /// whiteouts of the directory's old entries (the multilayer test image has one).
    #[test]
    fn whiteouts_below_a_symlink_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("d")).expect("d");
        std::fs::write(root.join("d/x"), b"lower").expect("d/x");
        std::fs::create_dir(root.join("target")).expect("target");
        std::fs::write(root.join("target/x"), b"not the layer's").expect("target/x");
        let header = |kind: EntryType, mode: u32| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h
        };
        let mut b = tar::Builder::new(Vec::new());
        b.append_link(&mut header(EntryType::Symlink, 0o777), "d", "target")
            .expect("symlink");
        for marker in ["d/.wh.x", "d/.wh..wh..opq"] {
            b.append_data(
                &mut header(EntryType::Regular, 0o644),
                marker,
                std::io::empty(),
            )
            .expect("whiteout");
        }
        let layer = b.into_inner().expect("tar");
        for whiteouts in [Whiteouts::Remove, Whiteouts::Overlay] {
            let options = ApplyOptions {
                whiteouts,
                ..ApplyOptions::default()
            };
            let report = apply(&layer[..], root, &options).expect("applied");
            assert_eq!(report.entries, 3);
            assert_eq!(
                std::fs::read_link(root.join("d")).expect("symlink"),
                Path::new("target")
            );
            assert_eq!(
                std::fs::read(root.join("target/x")).expect("untouched"),
                b"not the layer's"
            );
        }
        // Below a symlink an earlier layer made, a whiteout is refused as any entry.
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(
            &mut header(EntryType::Regular, 0o644),
            "d/.wh.x",
            std::io::empty(),
        )
        .expect("whiteout");
        let layer = b.into_inner().expect("tar");
        let err = apply(&layer[..], root, &ApplyOptions::default()).expect_err("refused");
        assert!(err.to_string().contains("is a symlink"), "{err}");
        assert!(root.join("target/x").exists());
    }

    #[test]
    fn pax_records_are_read_by_their_length() {
        let mut data = record("SCHILY.xattr.user.bin", b"a\n\0b\n");
        data.extend(record("path", b"dir/name with\nnewline"));
        data.extend(record("mtime", b"1.5"));
        let records = parse_pax(&data).expect("parse");
        assert_eq!(
            records,
            vec![
                (b"SCHILY.xattr.user.bin".to_vec(), b"a\n\0b\n".to_vec()),
                (b"path".to_vec(), b"dir/name with\nnewline".to_vec()),
                (b"mtime".to_vec(), b"1.5".to_vec()),
            ]
        );
        assert_eq!(last_record(&records, b"mtime"), Some(&b"1.5"[..]));
        assert_eq!(parse_pax(b"").expect("empty"), vec![]);
        assert_eq!(
            parse_pax(b"+9 a=bcd\n").expect("a sign, as Go's ParseInt"),
            vec![(b"a".to_vec(), b"bcd".to_vec())]
        );
        for bad in [
            &b"10 a=b\n"[..],  // longer than the data
            b"6 a=bc\n",       // the length does not end at the newline
            b"7 abcd\n",       // no '='
            b"6 =ab\n",        // empty key
            b"3 a\n",          // shorter than any record
            b"x a=b\n",        // not a number
            b"11 path=a\0b\n", // NUL in a path
            b"7 a=bc\n\0\0",   // padding after the records
        ] {
            assert!(parse_pax(bad).is_err(), "{:?} parsed", show(bad));
        }
        assert!(parse_pax(&record("SCHILY.xattr.user.x", b"\0")).is_ok());
    }

    #[test]
    fn header_sizes_are_octal_or_base_256() {
        assert_eq!(header_size(b"00000001750\0"), Some(1000));
        assert_eq!(header_size(b"     1750 \0\0"), Some(1000));
        assert_eq!(header_size(b"\0\0\0\0\0\0\0\0\0\0\0\0"), Some(0));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[7] = 0x02;
        assert_eq!(header_size(&big), Some(2 << 32));
        assert_eq!(header_size(b"0000000019\0\0"), None);
    }

    /// A binary xattr value with a newline (the differential test's multilayer image has
    /// one): the `tar` crate's record iterator refused the whole entry.
    #[test]
    fn xattr_values_with_newlines_are_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Err(e) = rustix::fs::setxattr(
            dir.path(),
            "user.probe",
            b"1",
            rustix::fs::XattrFlags::empty(),
        ) {
            eprintln!("SKIP: user xattrs unsupported in {:?}: {e}", dir.path());
            return;
        }
        let value = b"\x00\x01\n\xff\n";
        let layer = layer_with_pax(&record("SCHILY.xattr.user.bin", value));
        let report = apply(&layer[..], dir.path(), &ApplyOptions::default()).expect("apply");
        assert_eq!(report.ignored_xattr_count, 0);
        let mut buf = [0u8; 64];
        let n = rustix::fs::getxattr(dir.path().join("f"), "user.bin", &mut buf[..])
            .expect("xattr set");
        assert_eq!(&buf[..n], value);
    }

    /// Records hidden in a value, which the `tar` crate's newline splitting finds, never take
    /// effect (a forged path refuses the entry); records after such a value, which it stops
    /// reading at, do (a PAX uid).
    #[test]
    fn records_are_those_go_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut value = b"x\n".to_vec();
        value.extend(record("path", b"elsewhere"));
        let layer = layer_with_pax(&record("SCHILY.xattr.user.v", &value));
        let err = apply(&layer[..], dir.path(), &ApplyOptions::default()).expect_err("forged path");
        assert!(
            err.to_string().contains("misread its path"),
            "unexpected error: {err}"
        );
        assert!(!dir.path().join("elsewhere").exists());

        let mut records = record("SCHILY.xattr.user.v", b"x\ny");
        records.extend(record("uid", b"4242"));
        let layer = layer_with_pax(&records);
        let mut archive = tar::Archive::new(&layer[..]);
        let mut entries = archive.entries().expect("entries");
        let mut entry = entries.next().expect("entry").expect("entry");
        let headers = EntryHeaders::parse(&layer, 0).expect("headers");
        assert_eq!(entry.header().uid().expect("uid"), 0, "the crate's reading");
        let meta = read_meta(&mut entry, "f", &headers).expect("meta");
        assert_eq!(meta.uid, 4242);
        assert_eq!(meta.xattrs, vec![(b"user.v".to_vec(), b"x\ny".to_vec())]);
    }

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
