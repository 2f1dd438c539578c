//! A gRPC channel to a unix socket, for the client adapters.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint, Uri};

/// How long connecting to the socket may take before the call fails (a socket file whose
/// listener never accepts must not hang the caller).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel to the gRPC server on the unix socket `socket`, for
/// [`SnapshotsClient`](crate::snapshots::SnapshotsClient) and
/// [`ContentClient`](crate::content::ContentClient).
///
/// It connects lazily, on the first call, and again on the call after the connection broke
/// (e.g. the server restarted), so it can be made before the server runs. While nothing
/// listens, calls fail at once with Unavailable.
pub fn connect(socket: impl AsRef<Path>) -> Channel {
    let socket: PathBuf = socket.as_ref().to_owned();
    // The URI is required by the HTTP/2 layer but never resolved: the connector below dials
    // the socket.
    Endpoint::from_static("http://localhost")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
}
