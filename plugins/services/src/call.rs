//! What every client adapter does to a call: carry the caller's namespace and lease as
//! containerd's headers, and read a remote status back into the core's error.

use berth_core::content::CallContext;
use berth_core::error::{Error, Result};
use berth_core::namespace::{GRPC_HEADER, LEASE_HEADER};
use tonic::metadata::AsciiMetadataValue;

/// `message` with the call's namespace and lease as headers.
pub(crate) fn with_headers<T>(cx: &CallContext, message: T) -> Result<tonic::Request<T>> {
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
pub(crate) fn remote(status: tonic::Status) -> Error {
    Error::from_status(&status)
}
