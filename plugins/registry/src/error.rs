//! The registry client's errors: each names the registry, reference, digest or file involved.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A reference string that is not `[host[:port]/]repo[:tag][@digest]`.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A digest that is not `sha256:<64 lowercase hex>`.
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest(String),
    /// A `hosts.toml` that cannot be read or understood.
    #[error("registry hosts config {}: {reason}", path.display())]
    HostsConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate or key file for TLS that cannot be used.
    #[error("TLS setup for {host} from {}: {reason}", path.display())]
    Tls {
        /// The registry host.
        host: String,
        /// The CA, certificate or key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No host of the registry has the object (404 from every host tried).
    #[error("{what} not found at {registry}")]
    NotFound {
        /// The registry host.
        registry: String,
        /// The reference or digest asked for.
        what: String,
    },
    /// The registry refused our credentials or tokens for a scope.
    #[error(
        "authorization failed at {registry} for scope {scope:?}: {message} \
         (check the credentials for this registry)"
    )]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// The token scope, e.g. `repository:library/busybox:pull`.
        scope: String,
        /// The registry's or token server's reason.
        message: String,
    },
    /// An unexpected HTTP status.
    #[error("{method} {url} returned {status}: {body}")]
    Status {
        /// Request method.
        method: String,
        /// Request URL.
        url: String,
        /// Response status.
        status: u16,
        /// The start of the response body (registries explain errors there).
        body: String,
    },
    /// Content whose digest is not the one asked for.
    #[error(
        "content of {expected} does not match its digest: got {actual}; the registry or a proxy served other bytes"
    )]
    DigestMismatch {
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// Content whose length is not the descriptor's size.
    #[error("content of {digest} has {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        /// The digest asked for.
        digest: String,
        /// The descriptor's size.
        expected: u64,
        /// What arrived (so far, when it ran over).
        actual: u64,
    },
    /// A transport error (connect, TLS handshake, read).
    #[error("{context}: {source}")]
    Http {
        /// What was being done, with the URL.
        context: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// A response body that is not what the protocol says.
    #[error("{context}: {reason}")]
    Protocol {
        /// What was being done, with the URL.
        context: String,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// Whether this is a [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}
