//! The `walking` differ: unpacks an OCI layer (a tar stream, plain or compressed with gzip,
//! zstd or xz) into a directory safely ([`apply`]), and writes the difference of two trees as
//! a layer ([`write_diff`], see its module for the semantics).
//!
//! Both are plain blocking file system code. The differ plugin ([`plugin`]) runs [`apply`] on
//! a blocking thread and checks [`ApplyReport::diff_id`] (or passes
//! [`ApplyOptions::expected_diff_id`]) against the image config; for Compare it mounts both
//! sides read-only in a private mount namespace ([`compare`]) and streams the compressed
//! [`write_diff`] output into the content store.
//!
//! # Semantics (containerd's `archive.Apply`)
//!
//! - Compression is detected by magic number ([`decompress`]); the *uncompressed* stream,
//!   trailing bytes after the tar's end included, is hashed into the diff id.
//! - Names are cleaned lexically (`./a//b/` is `a/b`, `a/../b` is `b`); a leading `/` is
//!   dropped, as containerd joins every name to the root (set
//!   [`ApplyOptions::refuse_absolute_names`] to refuse them instead). An entry naming the root
//!   itself is ignored.
//! - An existing path is replaced unless both it and the entry are directories, which merge
//!   (the entry's metadata wins). Missing parent directories are created with mode 0755.
//! - Regular files, directories, symlinks, hard links (to a path of the layer root, not
//!   following symlinks: a hard link to a symlink links the symlink), character and block
//!   devices and fifos. GNU sparse files are written out in full. PAX global headers are
//!   ignored; any other entry type is refused. Device nodes need CAP_MKNOD: where containerd
//!   silently skips them inside a user namespace, this fails with an error saying so.
//! - Owner (`lchown`, unless [`ApplyOptions::no_same_owner`]), then xattrs from PAX
//!   `SCHILY.xattr.*` records, then mode (permission, setuid, setgid and sticky bits), then
//!   times (`utimensat` with `AT_SYMLINK_NOFOLLOW`; atime is the later of atime and mtime, a
//!   time before 1970 or after 2262 becomes the epoch). Directory times are set after the whole
//!   layer so their contents do not change them.
//! - Xattrs that cannot be set are skipped and reported ([`ApplyReport::ignored_xattrs`])
//!   where containerd skips them: `trusted.*` (never taken from a layer, so a layer cannot
//!   forge overlay whiteouts), any attribute the file system does not support (ENOTSUP), and
//!   `user.*` on anything but files and directories (EPERM). Beyond containerd, `security.*`
//!   refused with EPERM or EACCES is skipped too: an unprivileged or LSM-confined daemon cannot
//!   set `security.capability` or a foreign SELinux label, and failing the whole layer for it
//!   helps no one. Any other failure is an error.
//! - Whiteouts ([`Whiteouts`]): `.wh.<name>` removes `<name>`; `.wh..wh..opq` makes its
//!   directory opaque: everything in it that this layer did not add is removed, recursively
//!   (a directory this layer added or wrote into is kept, but emptied of older contents). The
//!   markers may come before or after the layer's own entries in that directory.
//!   [`Whiteouts::Overlay`] writes overlayfs' form instead. A whiteout below a symlink that
//!   the same layer created is ignored: umoci writes a directory turned symlink as the
//!   symlink followed by whiteouts of the old directory's entries, which are already gone.
//!   Below a symlink of an earlier layer it is refused as any path through a symlink.
//! - PAX extended headers are parsed by record length, as Go's archive/tar does, so binary
//!   xattr values may hold newlines; an entry whose path, link target or size the records
//!   and the header disagree on is refused.
//!
//! # Safety
//!
//! Every path is resolved beneath the root one component at a time with `O_NOFOLLOW`; no
//! symlink is ever followed, so an entry whose path goes through a symlink is refused even if
//! the symlink points inside the layer. containerd resolves such symlinks inside the root;
//! Docker and BuildKit never write such entries, but tools that build layers from file lists
//! can (`lib/x.so` over a usrmerged base's `lib -> usr/lib`), and berth refuses those layers.
//! Refused with [`Error::Refused`] naming the entry (nothing of it is created; at most
//! missing parent directories inside the root already are): names climbing above the root
//! with `..`; paths
//! through a symlink or a non-directory; hard links whose target climbs out, goes through a
//! symlink, is missing or is a directory; whiteouts of `.`, `..` or nothing; names with NUL
//! or longer than PATH_MAX; device numbers or ids that do not fit; unsupported entry types.
//! A stream that decompresses beyond [`ApplyOptions::max_uncompressed_bytes`] (or whose file
//! data would) fails with [`Error::TooLarge`]; extension headers larger than
//! [`MAX_ENTRY_HEADER_BYTES`] fail with [`Error::HeadersTooLarge`] before the tar parser
//! buffers them. Corrupt or truncated streams fail with [`Error::Corrupt`].
//!
//! A failed apply leaves the directory partly written: the caller discards the snapshot.
//!
//! # Threads
//!
//! Decompression and the diff id's hash run on one helper thread, and small regular files
//! are created on another while the applying thread reads on (creating files dominates a
//! layer of many small files). The file helper only creates files in a directory the
//! applying thread resolved, through its descriptor; before any entry that could see or
//! change a file still in flight, the applying thread waits for it (see `apply::files`), so
//! the result is the archive's order.

mod apply;
mod changes;
pub mod compare;
mod compression;
mod error;
mod mount;
mod path;
pub mod plugin;
mod tar_write;
mod tree;

use std::path::PathBuf;

use berth_core::content::Digest;

pub use apply::apply;
pub use changes::{DiffReport, DiffWriteOptions, write_diff};
pub use compression::{Compression, Decompressor, MAGIC_LEN, decompress};
pub use error::{Error, Result};

/// Prefix of a whiteout entry: `.wh.<name>` deletes `<name>` from the layers below.
pub const WHITEOUT_PREFIX: &str = ".wh.";

/// The opaque directory marker: the directory hides everything the layers below put in it.
pub const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// The xattr overlayfs reads to treat a directory as opaque (value `y`).
pub const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// The most bytes of extension headers (GNU long names and links, PAX records, GNU sparse
/// maps) one entry may have. The tar parser buffers them whole, so without a bound a small
/// compressed layer could make it allocate without limit. Go's archive/tar, and so
/// containerd, refuses PAX records and long names over 1 MiB; this leaves room for all three
/// plus a sparse map.
pub const MAX_ENTRY_HEADER_BYTES: u64 = 8 << 20;

/// What to do with OCI whiteouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Whiteouts {
    /// Carry them out in the directory, which holds the lower layers' files: a mounted
    /// overlay, or a copy of the parent (the walking differ on any snapshotter).
    #[default]
    Remove,
    /// Write overlayfs whiteouts into a directory that will be an overlay layer (an upper
    /// directory, or the tree the erofs differ packs): `.wh.<name>` becomes a 0/0 character
    /// device `<name>` owned as the marker, and an opaque marker sets
    /// [`OVERLAY_OPAQUE_XATTR`] on its directory. Nothing of the lower layers is removed
    /// (an entry of this layer with the whited-out name is replaced by the device, where
    /// containerd fails). Needs the privileges mknod and `trusted.*` xattrs need.
    Overlay,
}

/// How to apply a layer. `Default` is containerd's behaviour with no bounds.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// How whiteouts are applied.
    pub whiteouts: Whiteouts,
    /// Refuse the layer when its uncompressed stream (or the file data it describes, which
    /// GNU sparse entries can make larger) exceeds this many bytes: a decompression bomb
    /// bound. `None` is unbounded, as containerd; the daemon should set one.
    pub max_uncompressed_bytes: Option<u64>,
    /// Call syncfs(2) on the root's file system after a successful apply (containerd's
    /// `sync_fs`, PR 9401), so the layer is durable before it is committed.
    pub sync_fs: bool,
    /// Do not set owners from the layer; files belong to the applying user
    /// (containerd's `WithNoSameOwner`).
    pub no_same_owner: bool,
    /// Refuse absolute entry names instead of reading them relative to the root.
    pub refuse_absolute_names: bool,
    /// Fail with [`Error::DiffIdMismatch`] when the uncompressed stream's digest differs; its
    /// algorithm is the one hashed (sha256 when `None`).
    pub expected_diff_id: Option<Digest>,
    /// Lower layer directories, most immediate first, from which a parent directory this
    /// apply must create inherits owner, mode, times and xattrs (containerd's `WithParents`,
    /// for applying straight into an overlay upper directory).
    pub parents: Vec<PathBuf>,
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Digest of the uncompressed stream: the layer's diff id.
    pub diff_id: Digest,
    /// Length of the uncompressed stream in bytes.
    pub uncompressed_size: u64,
    /// The compression detected.
    pub compression: Compression,
    /// Tar entries read (whiteouts and ignored entries included).
    pub entries: u64,
    /// The first [`MAX_REPORTED_XATTRS`] xattrs that were skipped.
    pub ignored_xattrs: Vec<IgnoredXattr>,
    /// How many xattrs were skipped in all.
    pub ignored_xattr_count: u64,
}

/// How many skipped xattrs [`ApplyReport::ignored_xattrs`] lists.
pub const MAX_REPORTED_XATTRS: usize = 64;

/// An xattr of the layer that was not set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredXattr {
    /// The entry it belongs to.
    pub entry: String,
    /// The attribute's name.
    pub name: String,
    /// Why it was skipped.
    pub reason: IgnoredReason,
}

/// Why an xattr was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoredReason {
    /// A `trusted.*` attribute: never taken from a layer.
    Trusted,
    /// The file system does not support it (ENOTSUP).
    NotSupported,
    /// Not permitted: `user.*` on a symlink, device or fifo, or `security.*` without the
    /// privilege to set it.
    NotPermitted,
}
