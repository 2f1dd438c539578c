//! The error vocabulary shared by every berth crate, and its one mapping to gRPC.
//!
//! Clients branch on status codes (`ctr images import` creates an image when Update returns
//! NotFound, content writers retry on Unavailable), so the mapping mirrors containerd's
//! `errdefs` exactly. Each crate keeps its own error enum and says which [`ErrorKind`] each
//! variant is through [`Classify`]; [`to_status`] is the only place a kind becomes a code.

use std::fmt;

/// What went wrong, in containerd's `errdefs` vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Nothing more precise is known.
    Unknown,
    /// The caller sent something malformed; never used for the daemon's own faults.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// The named object exists already.
    AlreadyExists,
    /// The caller may not do this.
    PermissionDenied,
    /// A limit was reached.
    ResourceExhausted,
    /// The system is not in a state that allows the operation (e.g. non-empty namespace).
    FailedPrecondition,
    /// The operation was aborted, typically by a concurrent change.
    Aborted,
    /// An offset or size lies outside what exists.
    OutOfRange,
    /// The operation is not implemented by this plugin or server.
    NotImplemented,
    /// The daemon itself failed.
    Internal,
    /// Temporarily unavailable (e.g. a locked ingest); the caller may retry.
    Unavailable,
    /// Data was lost or corrupted.
    DataLoss,
    /// The caller is not authenticated.
    Unauthenticated,
    /// The call was cancelled.
    Canceled,
    /// The call ran out of time.
    DeadlineExceeded,
}

impl ErrorKind {
    /// The phrase containerd appends to messages of this kind ("not found", ...).
    pub fn phrase(self) -> &'static str {
        match self {
            ErrorKind::Unknown => "unknown",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::ResourceExhausted => "resource exhausted",
            ErrorKind::FailedPrecondition => "failed precondition",
            ErrorKind::Aborted => "aborted",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::NotImplemented => "not implemented",
            ErrorKind::Internal => "internal",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DataLoss => "data loss",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Canceled => "context canceled",
            ErrorKind::DeadlineExceeded => "context deadline exceeded",
        }
    }

    /// The gRPC code for this kind.
    pub fn code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            ErrorKind::Unknown => Code::Unknown,
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Aborted => Code::Aborted,
            ErrorKind::OutOfRange => Code::OutOfRange,
            ErrorKind::NotImplemented => Code::Unimplemented,
            ErrorKind::Internal => Code::Internal,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::DataLoss => Code::DataLoss,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::Canceled => Code::Cancelled,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        }
    }

    /// The kind a gRPC code stands for (the inverse of [`ErrorKind::code`]).
    pub fn from_code(code: tonic::Code) -> ErrorKind {
        use tonic::Code;
        match code {
            Code::InvalidArgument => ErrorKind::InvalidArgument,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            Code::Aborted => ErrorKind::Aborted,
            Code::OutOfRange => ErrorKind::OutOfRange,
            Code::Unimplemented => ErrorKind::NotImplemented,
            Code::Internal => ErrorKind::Internal,
            Code::Unavailable => ErrorKind::Unavailable,
            Code::DataLoss => ErrorKind::DataLoss,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::Cancelled => ErrorKind::Canceled,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Code::Ok | Code::Unknown => ErrorKind::Unknown,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.phrase())
    }
}

/// Implemented by every crate's error type: which kind each error is.
pub trait Classify {
    /// The kind of this error, deciding its gRPC code.
    fn kind(&self) -> ErrorKind;
}

/// The core's error: a kind and a message that names the object and what to do.
///
/// Displays as containerd does, `"<message>: <kind phrase>"`, so `ctr` prints familiar text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}: {kind}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// Result with the core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` whose message names the object and, where useful, the remedy.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// The message without the kind phrase.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// Shorthand for [`ErrorKind::AlreadyExists`].
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AlreadyExists, message)
    }
    /// Shorthand for [`ErrorKind::FailedPrecondition`].
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }
    /// Shorthand for [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// Shorthand for [`ErrorKind::NotImplemented`].
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotImplemented, message)
    }

    /// Reads a status received from a peer (a proxy plugin, a remote daemon) back into an error.
    pub fn from_status(status: &tonic::Status) -> Self {
        let kind = ErrorKind::from_code(status.code());
        let suffix = format!(": {}", kind.phrase());
        let message = status.message();
        let message = message.strip_suffix(&suffix).unwrap_or(message);
        Error::new(kind, message)
    }
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// The one mapping of an error to a gRPC status.
pub fn to_status<E: Classify + fmt::Display + ?Sized>(err: &E) -> tonic::Status {
    tonic::Status::new(err.kind().code(), err.to_string())
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        to_status(&err)
    }
}

impl From<sled::Error> for Error {
    fn from(err: sled::Error) -> Self {
        Error::internal(format!("metadata store: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorKind; 16] = [
        ErrorKind::Unknown,
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::PermissionDenied,
        ErrorKind::ResourceExhausted,
        ErrorKind::FailedPrecondition,
        ErrorKind::Aborted,
        ErrorKind::OutOfRange,
        ErrorKind::NotImplemented,
        ErrorKind::Internal,
        ErrorKind::Unavailable,
        ErrorKind::DataLoss,
        ErrorKind::Unauthenticated,
        ErrorKind::Canceled,
        ErrorKind::DeadlineExceeded,
    ];

    #[test]
    fn every_kind_round_trips_through_a_status() {
        for kind in ALL {
            let err = Error::new(kind, format!("object \"x\" in {kind:?}"));
            let status = to_status(&err);
            assert_eq!(
                status.message(),
                format!("object \"x\" in {kind:?}: {}", kind.phrase())
            );
            let back = Error::from_status(&status);
            assert_eq!(back, err, "{kind:?} did not round-trip");
        }
    }

    #[test]
    fn codes_match_containerd_errdefs() {
        assert_eq!(ErrorKind::NotImplemented.code(), tonic::Code::Unimplemented);
        assert_eq!(ErrorKind::Canceled.code(), tonic::Code::Cancelled);
        assert_eq!(
            ErrorKind::from_code(tonic::Code::Ok),
            ErrorKind::Unknown,
            "OK is never an error kind"
        );
    }

    #[test]
    fn a_foreign_status_keeps_its_whole_message() {
        let status = tonic::Status::not_found("no such thing");
        let err = Error::from_status(&status);
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(err.message(), "no such thing");
    }
}
