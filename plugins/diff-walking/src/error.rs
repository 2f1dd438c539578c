//! The crate's one error type and its [`Classify`] mapping.

use std::io;
use std::path::PathBuf;

use berth_core::content::Digest;
use berth_core::error::{Classify, ErrorKind};

/// Why applying a layer, or writing one from a diff, failed. Every variant about a tar entry
/// or a file names it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A hostile, malformed or unsupported entry: `..` escaping the root, a path through a
    /// symlink, a hard link outside the layer, an escaping whiteout, an unknown entry type.
    /// Nothing was written for it.
    #[error("layer entry {entry:?}: {reason}")]
    Refused {
        /// The entry's name as stored in the tar (lossy UTF-8).
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file system refused an operation while applying an entry.
    #[error("layer entry {entry:?}: {op}: {source}")]
    Fs {
        /// The entry's name as stored in the tar.
        entry: String,
        /// What was being done (`create file`, `set owner`, ...).
        op: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The stream is not a valid tar, or its compression is corrupt or truncated.
    #[error("layer stream is corrupt or truncated ({at}): {source}")]
    Corrupt {
        /// Where: `at the start`, `in entry "x"`, `after entry "x"`.
        at: String,
        /// The decoder's or tar parser's error.
        #[source]
        source: io::Error,
    },
    /// The caller's reader failed; the layer itself may be fine.
    #[error("reading the layer: {source}")]
    Source {
        /// The reader's error (a `berth_core::Error` inside keeps its kind).
        #[source]
        source: io::Error,
    },
    /// The uncompressed stream, or the file data it describes, exceeds
    /// [`ApplyOptions::max_uncompressed_bytes`](crate::ApplyOptions::max_uncompressed_bytes).
    #[error("layer is larger than the configured bound of {limit} uncompressed bytes ({at})")]
    TooLarge {
        /// The bound.
        limit: u64,
        /// Where it was exceeded.
        at: String,
    },
    /// The extension headers of one entry (GNU long names, PAX records, sparse maps) exceed
    /// [`MAX_ENTRY_HEADER_BYTES`](crate::MAX_ENTRY_HEADER_BYTES): the parser would buffer them.
    #[error(
        "layer entry headers exceed {} bytes ({at}): GNU long names or PAX records that large are refused",
        crate::MAX_ENTRY_HEADER_BYTES
    )]
    HeadersTooLarge {
        /// Where.
        at: String,
    },
    /// The uncompressed stream does not have the expected diff id.
    #[error("layer diff id is {actual}, expected {expected}")]
    DiffIdMismatch {
        /// What the caller expected (the image config's diff id).
        expected: Digest,
        /// What the stream hashed to.
        actual: Digest,
    },
    /// The directory to apply into cannot be opened.
    #[error("layer root {path:?}: {source}")]
    Root {
        /// The directory.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A parent layer directory (for inherited attributes) cannot be opened.
    #[error("parent layer {path:?}: {source}")]
    Parent {
        /// The directory.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// syncfs(2) on the root failed after the layer was applied.
    #[error("syncfs of {path:?}: {source}")]
    Sync {
        /// The root.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Diffing: a file could not be read.
    #[error("diff of {path:?}: {op}: {source}")]
    Walk {
        /// The path inside the tree (`.` for the root).
        path: String,
        /// What was being done (`list directory`, `read file`, ...).
        op: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Diffing: a file changed while it was being read (a snapshot still in use).
    #[error("diff of {path:?}: {reason}; diff a snapshot nothing is writing to")]
    Changed {
        /// The path inside the tree.
        path: String,
        /// What changed.
        reason: String,
    },
    /// Diffing: a file has something a tar header cannot carry.
    #[error("diff of {path:?}: {reason}")]
    Unencodable {
        /// The path inside the tree.
        path: String,
        /// What cannot be written.
        reason: String,
    },
    /// Diffing: the layer could not be written out (compression, or the content store
    /// stopped taking it).
    #[error("writing the diff layer: {source}")]
    Output {
        /// The writer's error (a `berth_core::Error` inside keeps its kind).
        #[source]
        source: io::Error,
    },
    /// Diffing: a temporary mount could not be made.
    #[error("{what}: {source}")]
    Mount {
        /// The mount, or the step, that failed.
        what: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn refused(entry: &str, reason: impl Into<String>) -> Self {
        Error::Refused {
            entry: entry.to_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn fs(entry: &str, op: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Fs {
            entry: entry.to_owned(),
            op: op.into(),
            source: source.into(),
        }
    }
}

/// The kind of a system error the file system returned: a full disk is a limit, a refused
/// permission is the caller's, anything else is the daemon's own failure.
fn errno_kind(err: &io::Error) -> ErrorKind {
    match err.raw_os_error() {
        Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT) => ErrorKind::ResourceExhausted,
        Some(nix::libc::EPERM) | Some(nix::libc::EACCES) => ErrorKind::PermissionDenied,
        Some(nix::libc::EROFS) => ErrorKind::FailedPrecondition,
        _ => ErrorKind::Internal,
    }
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            // Bad layer bytes are bad input from the client, never the daemon's fault.
            Error::Refused { .. }
            | Error::Corrupt { .. }
            | Error::TooLarge { .. }
            | Error::HeadersTooLarge { .. } => ErrorKind::InvalidArgument,
            Error::Fs { source, .. } => errno_kind(source),
            // A reader bridged from the content store can carry the store's own error.
            Error::Source { source } => source
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<berth_core::Error>())
                .map_or(ErrorKind::Internal, Classify::kind),
            // As the content store's commit with a wrong expected digest.
            Error::DiffIdMismatch { .. } => ErrorKind::FailedPrecondition,
            Error::Root { source, .. } | Error::Parent { source, .. } => {
                if source.kind() == io::ErrorKind::NotFound {
                    ErrorKind::NotFound
                } else {
                    errno_kind(source)
                }
            }
            Error::Sync { source, .. } => errno_kind(source),
            Error::Walk { source, .. } => errno_kind(source),
            // Another writer raced the diff: retrying on a quiet snapshot works.
            Error::Changed { .. } => ErrorKind::Aborted,
            Error::Unencodable { .. } => ErrorKind::FailedPrecondition,
            Error::Output { source } => source
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<berth_core::Error>())
                .map_or(ErrorKind::Internal, Classify::kind),
            Error::Mount { source, .. } => match source.raw_os_error() {
                Some(nix::libc::ENOENT) | Some(nix::libc::ENOTDIR) => ErrorKind::NotFound,
                _ if source.kind() == io::ErrorKind::Unsupported => ErrorKind::NotImplemented,
                _ => errno_kind(source),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_input_is_invalid_argument_and_names_the_entry() {
        let err = Error::refused("../x", "escapes the layer root");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let status = berth_core::error::to_status(&err);
        assert_eq!(
            ErrorKind::from_code(status.code()),
            ErrorKind::InvalidArgument
        );
        assert!(
            status.message().contains("\"../x\""),
            "{}",
            status.message()
        );
    }

    #[test]
    fn a_source_error_keeps_the_kind_of_a_wrapped_core_error() {
        let inner = berth_core::Error::not_found("content sha256:abc");
        let err = Error::Source {
            source: io::Error::other(inner),
        };
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let plain = Error::Source {
            source: io::Error::other("pipe closed"),
        };
        assert_eq!(plain.kind(), ErrorKind::Internal);
    }

    #[test]
    fn file_system_errors_map_by_errno() {
        let full = Error::fs(
            "a",
            "write file",
            io::Error::from_raw_os_error(nix::libc::ENOSPC),
        );
        assert_eq!(full.kind(), ErrorKind::ResourceExhausted);
        let io = Error::fs(
            "a",
            "write file",
            io::Error::from_raw_os_error(nix::libc::EIO),
        );
        assert_eq!(io.kind(), ErrorKind::Internal);
    }
}
