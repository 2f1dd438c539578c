//! The transfer plugin's errors: each names the archive entry, blob or layer it is about, and
//! says which [`ErrorKind`] it is (so a bad archive reaches a client as InvalidArgument, never
//! Internal).

use berth_core::content::Digest;
use berth_core::error::{Classify, ErrorKind};

/// Result with the transfer plugin's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in an import, unpack or export.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The stream is not an image archive berth can read: not a tar, compressed in a way berth
    /// does not know, corrupt or truncated, or without the files an OCI layout or a Docker
    /// archive must have.
    #[error("invalid image archive: {0}")]
    Archive(String),
    /// A blob stored under `blobs/<alg>/<hex>` does not hash to its name.
    #[error("blob {path:?} of the archive has digest {actual}, not the {expected} its name says")]
    BlobDigest {
        /// The entry's path in the archive.
        path: String,
        /// The digest its name says.
        expected: Digest,
        /// The digest of its bytes.
        actual: Digest,
    },
    /// An index or manifest names content the archive (and the store) does not have.
    #[error("{what} {digest} referenced by {parent} is not in the archive")]
    Missing {
        /// What the missing blob is (`manifest`, `config`, `layer 2`).
        what: String,
        /// Its digest.
        digest: Digest,
        /// Who names it (`index.json`, `manifest sha256:...`).
        parent: String,
    },
    /// A manifest, index or config that does not parse.
    #[error("{what} {digest} is not valid: {reason}")]
    InvalidBlob {
        /// What it should have been (`index`, `manifest`, `image config`).
        what: &'static str,
        /// Its digest.
        digest: Digest,
        /// What the parser said.
        reason: String,
    },
    /// Platform selection left nothing to import or export.
    #[error("no manifest matches platform {0}: choose another platform or all platforms")]
    NoMatchingPlatform(String),
    /// Applying a layer produced another uncompressed digest than the image config lists.
    #[error(
        "layer {index} ({layer}) unpacked to diff id {actual}, but the image config says \
         {expected}"
    )]
    DiffId {
        /// The layer's position in the manifest, from 0.
        index: usize,
        /// The layer blob's digest.
        layer: Digest,
        /// The diff id from the image config.
        expected: Digest,
        /// The digest the differ computed.
        actual: Digest,
    },
    /// A blob an unpack waited for never arrived: the fetch or the archive stopped first (its
    /// own error, or the missing blob, is what the transfer reports).
    #[error("the transfer stopped before {digest} was stored")]
    NotArrived {
        /// The blob waited for.
        digest: Digest,
    },
    /// An error of the core or of another plugin (content store, snapshotter, differ,
    /// metadata), passed through with its kind.
    #[error(transparent)]
    Core(#[from] berth_core::Error),
}

impl Error {
    /// Shorthand for [`Error::Archive`].
    pub fn archive(message: impl Into<String>) -> Self {
        Error::Archive(message.into())
    }
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            Error::Archive(_)
            | Error::BlobDigest { .. }
            | Error::Missing { .. }
            | Error::InvalidBlob { .. }
            | Error::DiffId { .. } => ErrorKind::InvalidArgument,
            Error::NoMatchingPlatform(_) => ErrorKind::NotFound,
            Error::NotArrived { .. } => ErrorKind::Aborted,
            Error::Core(e) => e.kind(),
        }
    }
}

impl From<Error> for berth_core::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Core(e) => e,
            other => berth_core::Error::new(other.kind(), other.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        berth_core::error::to_status(&err)
    }
}
