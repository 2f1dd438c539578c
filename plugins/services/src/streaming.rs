//! `containerd.services.streaming.v1.Streaming` and the stream manager
//! (`io.containerd.streaming.v1.manager`), as containerd's `plugins/services/streaming` and
//! `plugins/streaming/manager.go`.
//!
//! A client opens a bidirectional `Stream`, sends `StreamInit{id}` first, and waits for an
//! empty `Any` as the acknowledgement; from then on the stream is registered under the
//! call's namespace and id until a service (the transfer service) takes it. The RPC ends when
//! that service is done with it, or when the client goes away (an untaken stream is then
//! forgotten).
//!
//! Bytes travel as `containerd.types.transfer.Data` messages with containerd's flow control
//! (`core/transfer/streaming/stream.go`): the receiver grants credit with
//! `WindowUpdate{update}` (64 KiB whenever its window falls below 64 KiB) and the sender
//! never has more than the granted bytes in flight, in messages of at most 32 KiB.
//! [`receive_bytes`] and [`send_bytes`] are the two ends.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use berth_core::content::ByteStream;
use berth_core::error::{Error, ErrorKind, Result};
use berth_core::namespace;
use berth_core::registry::{InitError, Instance, PluginKind, PluginType, Registration};
use berth_core::serve::{GrpcService, GrpcServiceKind, MessageLimits};
use berth_proto::containerd::services::streaming::v1::StreamInit;
use berth_proto::containerd::services::streaming::v1::streaming_server::{
    Streaming, StreamingServer,
};
use berth_proto::containerd::types::transfer::{Data, WindowUpdate};
use berth_proto::type_url;
use prost_types::Any;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// Largest `Data` message sent (containerd's `maxRead`).
pub const MAX_DATA: usize = 32 << 10;
/// Credit a receiver grants at a time (containerd's `windowSize`).
pub const WINDOW: i32 = 64 << 10;
/// Credit berthd grants at a time when it receives (an archive to import). containerd's
/// receiver grants [`WINDOW`]; any sender honours what it is granted, and a bigger window
/// keeps the client sending while berthd writes instead of waiting for a grant every 64 KiB.
pub const RECEIVE_WINDOW: i32 = 4 << 20;

/// What a client sends on a stream.
pub type Incoming = Pin<Box<dyn tokio_stream::Stream<Item = Result<Any, tonic::Status>> + Send>>;

/// One registered stream: what its client sends, and a way to send to it.
pub struct Stream {
    id: String,
    incoming: Incoming,
    outgoing: mpsc::Sender<Result<Any, tonic::Status>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Stream {
    /// A stream from its two directions (the gRPC service builds these; tests may too).
    pub fn new(
        id: impl Into<String>,
        incoming: Incoming,
        outgoing: mpsc::Sender<Result<Any, tonic::Status>>,
    ) -> Stream {
        Stream {
            id: id.into(),
            incoming,
            outgoing,
        }
    }

    /// The client's id for it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next message from the client; `None` when it closed its side.
    pub async fn recv(&mut self) -> Option<Result<Any>> {
        self.incoming
            .next()
            .await
            .map(|r| r.map_err(|s| Error::from_status(&s)))
    }

    /// Sends a message to the client; Unavailable when it is gone. The future does not
    /// borrow the stream (whose incoming half is not `Sync`), so it can be sent to a task.
    pub fn send(&self, message: Any) -> impl Future<Output = Result<()>> + Send + 'static {
        let outgoing = self.outgoing.clone();
        let id = self.id.clone();
        async move { outgoing.send(Ok(message)).await.map_err(|_| gone(&id)) }
    }
}

fn gone(id: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("stream {id:?}: the client is gone"),
    )
}

struct Entry {
    serial: u64,
    stream: Stream,
}

/// Streams registered by clients, by namespace and id, until a service takes them.
#[derive(Default)]
pub struct StreamManager {
    streams: Mutex<HashMap<(String, String), Entry>>,
    serial: AtomicU64,
}

impl std::fmt::Debug for StreamManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamManager").finish_non_exhaustive()
    }
}

impl StreamManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `stream` in `namespace` (empty for calls without one); AlreadyExists when
    /// the id is taken. Returns the registration's serial, for [`StreamManager::forget`].
    pub fn register(&self, namespace: &str, stream: Stream) -> Result<u64> {
        let key = (namespace.to_owned(), stream.id.clone());
        let mut streams = self.lock();
        if streams.contains_key(&key) {
            return Err(Error::already_exists(format!(
                "stream {:?} in namespace {namespace:?}",
                stream.id
            )));
        }
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        streams.insert(key, Entry { serial, stream });
        Ok(serial)
    }

    /// Takes the stream `id` of `namespace` for use (a stream has one user); NotFound when
    /// there is none.
    pub fn take(&self, namespace: &str, id: &str) -> Result<Stream> {
        self.lock()
            .remove(&(namespace.to_owned(), id.to_owned()))
            .map(|e| e.stream)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "stream {id:?} in namespace {namespace:?}: open it with the Streaming \
                     service first"
                ))
            })
    }

    /// Whether a stream `id` of `namespace` waits to be taken.
    pub fn is_registered(&self, namespace: &str, id: &str) -> bool {
        self.lock()
            .contains_key(&(namespace.to_owned(), id.to_owned()))
    }

    /// Drops the registration `serial` of `id` if nobody took it (its client went away).
    pub fn forget(&self, namespace: &str, id: &str, serial: u64) {
        let mut streams = self.lock();
        let key = (namespace.to_owned(), id.to_owned());
        if streams.get(&key).is_some_and(|e| e.serial == serial) {
            streams.remove(&key);
        }
    }
}

/// Typed lookup of the stream manager.
pub struct StreamManagerKind;
impl PluginKind for StreamManagerKind {
    const TYPE: PluginType = PluginType::STREAMING;
    type Object = StreamManager;
}

/// `io.containerd.streaming.v1.manager`.
pub fn manager_registration() -> Registration {
    Registration::new(PluginType::STREAMING, "manager", |_ctx| async move {
        Ok(Instance::new::<StreamManagerKind>(Arc::new(
            StreamManager::new(),
        )))
    })
}

/// The response stream of one `Stream` call: forgets an untaken registration when tonic
/// drops it (the client went away, or the stream's user finished).
pub struct ResponseStream {
    inner: ReceiverStream<Result<Any, tonic::Status>>,
    manager: Arc<StreamManager>,
    namespace: String,
    id: String,
    serial: u64,
}

impl tokio_stream::Stream for ResponseStream {
    type Item = Result<Any, tonic::Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        self.manager.forget(&self.namespace, &self.id, self.serial);
    }
}

/// containerd's acknowledgement: an `Any` holding `google.protobuf.Empty`.
fn empty_any() -> Any {
    Any {
        type_url: "google.protobuf.Empty".to_owned(),
        value: Vec::new(),
    }
}

/// The streaming service.
#[derive(Clone, Debug)]
pub struct StreamingService {
    manager: Arc<StreamManager>,
}

impl StreamingService {
    /// A service registering streams with `manager`.
    pub fn new(manager: Arc<StreamManager>) -> Self {
        StreamingService { manager }
    }
}

#[tonic::async_trait]
impl Streaming for StreamingService {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<Any>>,
    ) -> std::result::Result<tonic::Response<ResponseStream>, tonic::Status> {
        let ns = namespace::from_metadata(request.metadata())?
            .map(|n| n.to_string())
            .unwrap_or_default();
        let mut incoming = request.into_inner();
        let first = incoming.message().await?.ok_or_else(|| {
            Error::invalid_argument("the stream closed before its StreamInit message")
        })?;
        let init: StreamInit = type_url::from_any(&first).map_err(|e| {
            Error::invalid_argument(format!("the first stream message must be StreamInit: {e}"))
        })?;
        if init.id.is_empty() {
            return Err(Error::invalid_argument("StreamInit needs an id").into());
        }
        let (tx, rx) = mpsc::channel(16);
        let serial = self.manager.register(
            &ns,
            Stream::new(init.id.clone(), Box::pin(incoming), tx.clone()),
        )?;
        tracing::debug!(stream = %init.id, namespace = %ns, "stream registered");
        // The ack goes out once registered, so the client's next call finds the stream.
        let _ = tx.send(Ok(empty_any())).await;
        drop(tx);
        Ok(tonic::Response::new(ResponseStream {
            inner: ReceiverStream::new(rx),
            manager: Arc::clone(&self.manager),
            namespace: ns,
            id: init.id,
            serial,
        }))
    }
}

impl GrpcService for StreamingService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(
            StreamingServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.grpc.v1.streaming`.
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "streaming", |ctx| async move {
        let manager = ctx
            .get::<StreamManagerKind>("manager")
            .map_err(|e| InitError::Skip(format!("no stream manager: {}", e.message())))?;
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(
            StreamingService::new(manager),
        )))
    })
    .requires(&[PluginType::STREAMING])
}

/// The bytes a client sends on `stream` as `Data` messages, granting it credit as containerd's
/// `ReceiveStream` does. The stream ends when the client closes its side; an error of the
/// stream (the client cancelled) ends it with that error. Other message types are ignored.
pub fn receive_bytes(mut stream: Stream) -> ByteStream {
    let (tx, rx) = mpsc::channel::<Result<Vec<u8>>>(4);
    tokio::spawn(async move {
        let mut window: i64 = 0;
        loop {
            if window < i64::from(RECEIVE_WINDOW) {
                let update = type_url::to_any(&WindowUpdate {
                    update: RECEIVE_WINDOW,
                });
                // A failed send means the client is gone; the receive below says how.
                if stream.send(update).await.is_ok() {
                    window += i64::from(RECEIVE_WINDOW);
                }
            }
            match stream.recv().await {
                None => break,
                Some(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
                Some(Ok(any)) => {
                    if !type_url::is::<Data>(&any) {
                        tracing::warn!(stream = %stream.id, type_url = %any.type_url, "ignoring a stream message");
                        continue;
                    }
                    let data = match type_url::from_any::<Data>(&any) {
                        Ok(d) => d.data,
                        Err(e) => {
                            let _ = tx
                                .send(Err(Error::invalid_argument(format!(
                                    "stream {:?}: bad Data message: {e}",
                                    stream.id
                                ))))
                                .await;
                            break;
                        }
                    };
                    window -= data.len() as i64;
                    if tx.send(Ok(data)).await.is_err() {
                        // The reader stopped; dropping the stream ends the call.
                        break;
                    }
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// Sends everything `source` yields to the client on `stream` as `Data` messages, within the
/// credit its `WindowUpdate`s grant (containerd's `SendStream`), then ends the stream.
pub async fn send_bytes<R: AsyncRead + Unpin>(stream: Stream, mut source: R) -> Result<()> {
    let Stream {
        id,
        mut incoming,
        outgoing,
    } = stream;
    let credit = Arc::new(Semaphore::new(0));
    let granted = Arc::clone(&credit);
    // Set when the client stops sending: credit it granted before still counts (it may have
    // half-closed after its last update), but a send that needs more can never proceed.
    let (done_tx, mut done) = tokio::sync::watch::channel(false);
    let updates = tokio::spawn(async move {
        while let Some(message) = incoming.next().await {
            match message {
                Ok(any) if type_url::is::<WindowUpdate>(&any) => {
                    if let Ok(u) = type_url::from_any::<WindowUpdate>(&any)
                        && u.update > 0
                    {
                        granted.add_permits(u.update as usize);
                    }
                }
                Ok(any) => tracing::warn!(type_url = %any.type_url, "ignoring a stream message"),
                Err(_) => {
                    // The client is gone: nothing more will be granted.
                    granted.close();
                    return;
                }
            }
        }
        let _ = done_tx.send(true);
    });
    let mut buf = vec![0u8; MAX_DATA];
    let result = async {
        loop {
            let n = source.read(&mut buf).await.map_err(|e| {
                Error::internal(format!("stream {id:?}: reading what to send: {e}"))
            })?;
            if n == 0 {
                return Ok(());
            }
            let permit = tokio::select! {
                biased;
                permit = credit.acquire_many(n as u32) => permit.map_err(|_| gone(&id))?,
                _ = done.wait_for(|ended| *ended) => return Err(gone(&id)),
            };
            permit.forget();
            let data = type_url::to_any(&Data {
                data: buf[..n].to_vec(),
            });
            outgoing.send(Ok(data)).await.map_err(|_| gone(&id))?;
        }
    }
    .await;
    updates.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::error::Classify;

    fn update(n: i32) -> Result<Any, tonic::Status> {
        Ok(type_url::to_any(&WindowUpdate { update: n }))
    }

    /// A stream whose client sends `grants` and then closes its sending side; what the
    /// service sends lands in the returned receiver.
    fn half_closed(grants: Vec<i32>) -> (Stream, mpsc::Receiver<Result<Any, tonic::Status>>) {
        let (tx, rx) = mpsc::channel(64);
        let incoming: Incoming = Box::pin(tokio_stream::iter(
            grants.into_iter().map(update).collect::<Vec<_>>(),
        ));
        (Stream::new("s", incoming, tx), rx)
    }

    #[tokio::test]
    async fn a_half_closed_client_with_too_little_credit_fails_instead_of_hanging() {
        let (stream, _rx) = half_closed(vec![10]);
        let sent = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            send_bytes(stream, &[7u8; 100][..]),
        )
        .await
        .expect("send_bytes must not wait for credit that can never come");
        let err = sent.expect_err("100 bytes do not fit in 10 bytes of credit");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    }

    #[tokio::test]
    async fn credit_granted_before_a_half_close_is_still_used() {
        let (stream, mut rx) = half_closed(vec![60, 40]);
        send_bytes(stream, &[7u8; 100][..])
            .await
            .expect("100 bytes fit in the 100 bytes granted");
        let mut got = 0;
        while let Ok(Some(Ok(any))) =
            tokio::time::timeout(std::time::Duration::from_millis(100), rx.recv()).await
        {
            got += type_url::from_any::<Data>(&any).expect("data").data.len();
        }
        assert_eq!(got, 100);
    }

    #[tokio::test]
    async fn the_receiver_grants_a_big_window_first_and_reads_every_byte() {
        // The client sends two 1 MiB messages right after the first grant, as berth's CLI
        // does when it is granted megabytes.
        let (client_tx, client_rx) = mpsc::channel::<Result<Any, tonic::Status>>(4);
        let (to_client, mut from_service) = mpsc::channel(64);
        let stream = Stream::new(
            "r",
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(client_rx)),
            to_client,
        );
        let mut bytes = receive_bytes(stream);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(chunk) = bytes.next().await {
                got.extend(chunk.expect("data"));
            }
            got
        });
        let first = from_service.recv().await.expect("a grant").expect("ok");
        let first: WindowUpdate = type_url::from_any(&first).expect("window update");
        assert_eq!(first.update, RECEIVE_WINDOW);
        assert!(first.update >= 2 << 20, "too small for two 1 MiB messages");
        for fill in [1u8, 2] {
            let data = Data {
                data: vec![fill; 1 << 20],
            };
            client_tx
                .send(Ok(type_url::to_any(&data)))
                .await
                .expect("send");
        }
        drop(client_tx);
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), 2 << 20);
        assert!(got[..1 << 20].iter().all(|b| *b == 1) && got[1 << 20..].iter().all(|b| *b == 2));
    }
}
