//! The connection to berthd: a tonic channel over its unix socket, every call carrying the
//! namespace in the `containerd-namespace` header, and the one-line failures the CLI prints.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_proto::containerd::services::images::v1::images_client::ImagesClient;
use berth_proto::containerd::services::streaming::v1::streaming_client::StreamingClient;
use berth_proto::containerd::services::transfer::v1::transfer_client::TransferClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The gRPC metadata key of the namespace (containerd's).
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// Largest message either way, as containerd's clients.
const MAX_MESSAGE: usize = 16 << 20;
/// How long connecting to the socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a command failed: printed as `berth: <this>` before exiting 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(String);

impl Failure {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>) -> Failure {
        Failure(message.into())
    }

    /// `what` failed because the daemon answered `status`: `<what>: <server message>`, with a
    /// hint when the daemon lacks the service.
    pub fn status(what: impl fmt::Display, status: &tonic::Status) -> Failure {
        let message = if status.message().is_empty() {
            status.code().description().to_owned()
        } else {
            status.message().to_owned()
        };
        let hint = if status.code() == tonic::Code::Unimplemented {
            " (the daemon does not offer this: berthd, or containerd 1.7 and later, do)"
        } else {
            ""
        };
        Failure(format!("{what}: {message}{hint}"))
    }

    /// `what` failed on a local I/O error.
    pub fn io(what: impl fmt::Display, err: &std::io::Error) -> Failure {
        Failure(format!("{what}: {err}"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Puts the namespace header on every request.
#[derive(Debug, Clone)]
pub struct NamespaceHeader(AsciiMetadataValue);

impl Interceptor for NamespaceHeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(NAMESPACE_HEADER, self.0.clone());
        Ok(request)
    }
}

/// A channel with the namespace header, which every client below is built on.
pub type Service = InterceptedService<Channel, NamespaceHeader>;

/// A connection to berthd, in one namespace.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    namespace: NamespaceHeader,
}

impl Client {
    /// Connects to the socket `address` for calls in `namespace`. A socket that does not
    /// answer fails naming it and the ways to choose another.
    pub async fn connect(address: &Path, namespace: &str) -> Result<Client, Failure> {
        let header: AsciiMetadataValue = MetadataValue::try_from(namespace).map_err(|_| {
            Failure::new(format!(
                "namespace {namespace:?} is not valid: use letters, digits, '.', '_' and '-'"
            ))
        })?;
        let socket: PathBuf = address.to_path_buf();
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| {
                Failure::new(format!(
                    "cannot connect to berthd at {}: {} (is berthd running? choose its socket \
                     with --address or BERTH_ADDRESS)",
                    address.display(),
                    root_cause(&e)
                ))
            })?;
        Ok(Client {
            channel,
            namespace: NamespaceHeader(header),
        })
    }

    fn service(&self) -> Service {
        InterceptedService::new(self.channel.clone(), self.namespace.clone())
    }

    /// The images service.
    pub fn images(&self) -> ImagesClient<Service> {
        ImagesClient::new(self.service())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// The streaming service.
    pub fn streaming(&self) -> StreamingClient<Service> {
        StreamingClient::new(self.service())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// The transfer service.
    pub fn transfer(&self) -> TransferClient<Service> {
        TransferClient::new(self.service())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

/// The innermost error's message: tonic's own ("transport error") says nothing about why.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_failures_are_one_line_with_the_server_message() {
        let f = Failure::status(
            "importing x.tar",
            &tonic::Status::invalid_argument("invalid image archive: truncated"),
        );
        assert_eq!(
            f.to_string(),
            "importing x.tar: invalid image archive: truncated"
        );
        let f = Failure::status("listing images", &tonic::Status::unimplemented(""));
        assert!(f.to_string().starts_with("listing images: "), "{f}");
        assert!(f.to_string().contains("containerd 1.7"), "{f}");
    }

    #[tokio::test]
    async fn a_missing_socket_is_named_with_the_way_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("absent.sock");
        let err = Client::connect(&socket, "default")
            .await
            .expect_err("nothing listens");
        let text = err.to_string();
        assert!(text.contains(&socket.display().to_string()), "{text}");
        assert!(text.contains("--address"), "{text}");
        assert!(text.contains("No such file"), "{text}");
    }

    #[tokio::test]
    async fn a_namespace_that_cannot_be_a_header_is_refused() {
        let err = Client::connect(Path::new("/nonexistent.sock"), "bad\nname")
            .await
            .expect_err("invalid header value");
        assert!(err.to_string().contains("namespace"), "{err}");
    }
}
