//! What every client adapter does to a call: carry the caller's namespace and lease as
//! containerd's headers, and read a remote status back into the core's error.

use berth_core::content::CallContext;
use berth_core::error::{Classify, Error, Result};
use berth_core::namespace::{GRPC_HEADER, LEASE_HEADER};
use tonic::metadata::AsciiMetadataValue;

/// `message` with the call's namespace and lease as headers.
pub fn with_headers<T>(cx: &CallContext, message: T) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(namespace) = &cx.namespace {
        let value = AsciiMetadataValue::try_from(namespace.as_str()).map_err(|_| {
            Error::invalid_argument(format!("namespace {namespace:?} is not valid header text"))
        })?;
        request.metadata_mut().insert(GRPC_HEADER, value);
    }
    if let Some(lease) = &cx.lease {
        let value = AsciiMetadataValue::try_from(lease.as_str()).map_err(|_| {
            Error::invalid_argument(format!("lease {lease:?} is not valid header text"))
        })?;
        request.metadata_mut().insert(LEASE_HEADER, value);
    }
    Ok(request)
}

/// A status from the remote service as the core's error (the one mapping, read backwards).
pub fn remote(status: tonic::Status) -> Error {
    Error::from_status(&status)
}

/// Who a client adapter talks to, for its errors: "proxy plugin NAME at ADDRESS" (or nothing).
///
/// A call that cannot reach the service fails with Unavailable, and the message names the
/// service, so an operator sees which proxy is down instead of a bare transport error.
#[derive(Debug, Clone, Default)]
pub struct Remote {
    description: Option<std::sync::Arc<str>>,
}

impl Remote {
    /// A remote described as `description` in Unavailable errors.
    pub fn described(description: impl Into<String>) -> Self {
        Remote {
            description: Some(description.into().into()),
        }
    }

    /// A status from this remote as the core's error; Unavailable ones name the remote.
    pub fn error(&self, status: tonic::Status) -> Error {
        let err = remote(status);
        match &self.description {
            Some(what) if err.kind() == berth_core::ErrorKind::Unavailable => Error::new(
                berth_core::ErrorKind::Unavailable,
                format!("{what} is unavailable: {}", err.message()),
            ),
            _ => err,
        }
    }
}
