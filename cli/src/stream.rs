//! The client ends of containerd's Streaming protocol (`core/streaming/proxy`,
//! `core/transfer/streaming/stream.go`), which the transfer service reads archives from and
//! writes archives and progress to.
//!
//! [`ClientStream::open`] calls `Streaming.Stream`, sends `StreamInit{id}` and waits for the
//! daemon's acknowledgement (an empty `Any`); the id then goes into a transfer request.
//! Bytes travel as `containerd.types.transfer.Data` under flow control: the receiving side
//! grants credit with `WindowUpdate{update}` ([`WINDOW`] whenever what it has granted and not
//! yet received falls below [`WINDOW`]), and the sending side never has more than the granted
//! bytes in flight, in messages of at most [`MAX_DATA`] bytes. [`send_bytes`] and
//! [`receive_bytes`] are the two ends; [`receive_messages`] reads a stream of other messages
//! (progress).
//!
//! Each end keeps its half of the call open until the daemon ends the stream: closing early
//! would cancel the call, and the daemon could lose data it has not read yet.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use berth_proto::containerd::services::streaming::v1::StreamInit;
use berth_proto::containerd::services::streaming::v1::streaming_client::StreamingClient;
use berth_proto::containerd::types::transfer::{Data, WindowUpdate};
use berth_proto::type_url;
use prost_types::Any;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

use crate::client::Service;

/// Largest `Data` message sent. containerd's sender reads 32 KiB at a time (`maxRead`);
/// bigger messages, still within the credit granted, cut the per-message work on both ends
/// (berthd grants megabytes; containerd's 64 KiB grants just make them smaller).
pub const MAX_DATA: usize = 1 << 20;
/// Credit granted at a time (containerd's `windowSize`).
pub const WINDOW: i32 = 64 << 10;

/// What the daemon sends on a stream.
pub type Incoming = Pin<Box<dyn Stream<Item = Result<Any, tonic::Status>> + Send>>;

/// How a stream transfer failed.
#[derive(Debug)]
pub enum StreamError {
    /// Reading the local bytes to send failed.
    Source(io::Error),
    /// Writing the received bytes locally failed.
    Sink(io::Error),
    /// The daemon ended the stream with an error, or went away.
    Peer(tonic::Status),
    /// The daemon sent what the protocol does not allow, or ended the stream before taking
    /// everything.
    Protocol(String),
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Source(e) => write!(f, "reading: {e}"),
            StreamError::Sink(e) => write!(f, "writing: {e}"),
            StreamError::Peer(s) => write!(f, "the stream broke: {}", s.message()),
            StreamError::Protocol(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for StreamError {}

/// One acknowledged stream of the Streaming service.
pub struct ClientStream {
    id: String,
    tx: mpsc::Sender<Any>,
    rx: Incoming,
}

impl std::fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStream")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A stream id unique on this machine: `<prefix>-<pid>-<nanoseconds>-<counter>`.
fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl ClientStream {
    /// Opens a stream with an id starting with `prefix` and waits until the daemon has
    /// registered it, so a transfer request naming it finds it.
    pub async fn open(
        client: &mut StreamingClient<Service>,
        prefix: &str,
    ) -> Result<ClientStream, tonic::Status> {
        let id = new_id(prefix);
        let (tx, rx) = mpsc::channel(16);
        // The receiver is alive, so this cannot fail; the StreamInit leaves with the call.
        let _ = tx
            .send(type_url::to_any(&StreamInit { id: id.clone() }))
            .await;
        let mut incoming = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        if incoming.message().await?.is_none() {
            return Err(tonic::Status::unavailable(format!(
                "the daemon closed stream {id:?} before acknowledging it"
            )));
        }
        Ok(ClientStream::from_parts(id, tx, Box::pin(incoming)))
    }

    /// A stream from its halves: what to send on, and what the daemon sends.
    pub fn from_parts(id: String, tx: mpsc::Sender<Any>, rx: Incoming) -> ClientStream {
        ClientStream { id, tx, rx }
    }

    /// The stream's id, for the transfer request.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A handle sending messages to the daemon (answers on a request/response stream such as
    /// a pull's credentials stream) while the stream is being received.
    pub fn sender(&self) -> mpsc::Sender<Any> {
        self.tx.clone()
    }
}

/// Sends everything `source` yields as `Data` within the credit the daemon grants, then
/// closes the sending side and waits until the daemon ends the stream. Returns the bytes
/// sent.
pub async fn send_bytes<R: AsyncRead + Unpin>(
    stream: ClientStream,
    mut source: R,
) -> Result<u64, StreamError> {
    let ClientStream { id, tx, mut rx } = stream;
    let (grant, mut granted) = watch::channel(0u64);
    // Credit arrives on the receiving half while data goes out: a task follows that half for
    // the whole call, so window updates never wait unread.
    let follower = tokio::spawn(async move {
        let mut total = 0u64;
        while let Some(message) = rx.next().await {
            let any = message.map_err(StreamError::Peer)?;
            if !type_url::is::<WindowUpdate>(&any) {
                continue;
            }
            let update: WindowUpdate = type_url::from_any(&any)
                .map_err(|e| StreamError::Protocol(format!("a bad window update: {e}")))?;
            if update.update > 0 {
                total += update.update as u64;
                grant.send_replace(total);
            }
        }
        Ok::<(), StreamError>(())
    });
    let mut buf = vec![0u8; MAX_DATA];
    let mut sent = 0u64;
    let sending = async {
        loop {
            let Ok(limit) = granted.wait_for(|g| *g > sent).await.map(|g| *g) else {
                // The daemon ended the stream: the follower's result says how.
                return Err(None);
            };
            let room = (limit - sent).min(MAX_DATA as u64) as usize;
            let n = source
                .read(&mut buf[..room])
                .await
                .map_err(|e| Some(StreamError::Source(e)))?;
            if n == 0 {
                return Ok(());
            }
            let data = type_url::to_any(&Data {
                data: buf[..n].to_vec(),
            });
            if tx.send(data).await.is_err() {
                return Err(None);
            }
            sent += n as u64;
        }
    }
    .await;
    // End of data for the daemon, whatever happened.
    drop(tx);
    match sending {
        Ok(()) => {
            join(follower).await?;
            Ok(sent)
        }
        Err(Some(e)) => {
            follower.abort();
            Err(e)
        }
        Err(None) => {
            join(follower).await?;
            Err(StreamError::Protocol(format!(
                "the daemon ended stream {id:?} after {sent} bytes, before reading all of it"
            )))
        }
    }
}

async fn join(task: tokio::task::JoinHandle<Result<(), StreamError>>) -> Result<(), StreamError> {
    task.await
        .map_err(|e| StreamError::Protocol(format!("the stream task failed: {e}")))?
}

/// Writes the `Data` the daemon sends into `sink`, granting credit as containerd's receiver
/// does, until the daemon ends the stream; `on_data` hears the size of each piece. Returns the
/// bytes received. Messages of other types are ignored, as containerd does.
pub async fn receive_bytes<W: AsyncWrite + Unpin>(
    stream: ClientStream,
    sink: &mut W,
    mut on_data: impl FnMut(usize),
) -> Result<u64, StreamError> {
    let ClientStream { id, tx, mut rx } = stream;
    let mut window: i64 = 0;
    let mut total = 0u64;
    loop {
        if window < i64::from(WINDOW) {
            let update = type_url::to_any(&WindowUpdate { update: WINDOW });
            // A refused grant means the daemon is done with the stream; receiving says how.
            if tx.send(update).await.is_ok() {
                window += i64::from(WINDOW);
            }
        }
        let Some(message) = rx.next().await else {
            break;
        };
        let any = message.map_err(StreamError::Peer)?;
        if !type_url::is::<Data>(&any) {
            continue;
        }
        let data: Data = type_url::from_any(&any).map_err(|e| {
            StreamError::Protocol(format!("stream {id:?}: a bad Data message: {e}"))
        })?;
        if data.data.len() as i64 > window {
            return Err(StreamError::Protocol(format!(
                "stream {id:?}: the daemon sent {} bytes with only {window} granted",
                data.data.len()
            )));
        }
        sink.write_all(&data.data)
            .await
            .map_err(StreamError::Sink)?;
        window -= data.data.len() as i64;
        total += data.data.len() as u64;
        on_data(data.data.len());
    }
    sink.flush().await.map_err(StreamError::Sink)?;
    Ok(total)
}

/// Hands every message the daemon sends to `handle` until it ends the stream.
pub async fn receive_messages(
    stream: ClientStream,
    mut handle: impl FnMut(Any),
) -> Result<(), StreamError> {
    // The sending half stays open until the end: dropping it early would close the call.
    let ClientStream { tx, mut rx, .. } = stream;
    while let Some(message) = rx.next().await {
        handle(message.map_err(StreamError::Peer)?);
    }
    drop(tx);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(20);

    /// Bytes that differ from offset to offset, so a reordering or a loss shows.
    fn pattern(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A client stream wired to a fake daemon: what the client sends arrives on the first
    /// receiver; what the fake sends on the second sender reaches the client.
    fn fake() -> (
        ClientStream,
        mpsc::Receiver<Any>,
        mpsc::Sender<Result<Any, tonic::Status>>,
    ) {
        let (client_tx, daemon_rx) = mpsc::channel(16);
        let (daemon_tx, client_rx) = mpsc::channel(16);
        let stream = ClientStream::from_parts(
            "test".into(),
            client_tx,
            Box::pin(ReceiverStream::new(client_rx)),
        );
        (stream, daemon_rx, daemon_tx)
    }

    /// The largest message the fake daemon sends, as containerd's sender (`maxRead`): the
    /// CLI's own [`MAX_DATA`] is bigger and says nothing about what it receives.
    const DAEMON_DATA: usize = 32 << 10;

    fn grant(update: i32) -> Result<Any, tonic::Status> {
        Ok(type_url::to_any(&WindowUpdate { update }))
    }

    #[tokio::test]
    async fn sender_keeps_within_the_credit_granted() {
        let payload = pattern(300_000);
        let (stream, mut from_client, to_client) = fake();
        let sender = tokio::spawn(send_bytes(stream, std::io::Cursor::new(payload.clone())));
        // Grants of odd sizes, each given only once the previous one is used up: the sender
        // must stop at each boundary and must split messages to fit.
        let grants = [1, 7, 1000, 40_000, 33_000, 100_000, WINDOW, WINDOW];
        let mut granted = 0usize;
        let mut received = Vec::new();
        let mut next = grants.iter().cycle();
        let closed = loop {
            if received.len() == granted {
                let g = *next.next().expect("cycle");
                to_client.send(grant(g)).await.expect("grant");
                granted += g as usize;
            }
            let Some(msg) = from_client.recv().await else {
                break true;
            };
            let data: Data = type_url::from_any(&msg).expect("only Data is sent");
            assert!(data.data.len() <= MAX_DATA, "messages of at most 32 KiB");
            assert!(!data.data.is_empty(), "no empty messages");
            received.extend_from_slice(&data.data);
            assert!(
                received.len() <= granted,
                "{} bytes in flight with {granted} granted",
                received.len()
            );
        };
        assert!(closed);
        assert_eq!(received, payload);
        // The sender waits for the daemon to end the stream before it reports success.
        assert!(!sender.is_finished(), "the sender waits for the end");
        drop(to_client);
        let sent = tokio::time::timeout(LIMIT, sender)
            .await
            .expect("the sender finishes")
            .expect("task")
            .expect("sent");
        assert_eq!(sent, payload.len() as u64);
    }

    #[tokio::test]
    async fn sender_stops_when_the_daemon_ends_the_stream_early() {
        let (stream, mut from_client, to_client) = fake();
        let sender = tokio::spawn(send_bytes(stream, std::io::Cursor::new(vec![0u8; 1 << 20])));
        to_client.send(grant(WINDOW)).await.expect("grant");
        from_client.recv().await.expect("a first message");
        drop(to_client);
        let err = tokio::time::timeout(LIMIT, sender)
            .await
            .expect("no hang")
            .expect("task")
            .expect_err("not everything was taken");
        assert!(err.to_string().contains("before reading all"), "{err}");

        let (stream, _from_client, to_client) = fake();
        let sender = tokio::spawn(send_bytes(stream, std::io::Cursor::new(vec![0u8; 10])));
        to_client
            .send(Err(tonic::Status::cancelled("import failed")))
            .await
            .expect("error");
        let err = tokio::time::timeout(LIMIT, sender)
            .await
            .expect("no hang")
            .expect("task")
            .expect_err("the daemon broke the stream");
        assert!(
            matches!(err, StreamError::Peer(ref s) if s.message() == "import failed"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn sender_reports_a_local_read_error_as_its_own() {
        struct Failing;
        impl AsyncRead for Failing {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                std::task::Poll::Ready(Err(io::Error::other("disk on fire")))
            }
        }
        let (stream, _from_client, to_client) = fake();
        to_client.send(grant(WINDOW)).await.expect("grant");
        let err = tokio::time::timeout(LIMIT, send_bytes(stream, Failing))
            .await
            .expect("no hang")
            .expect_err("the read failed");
        assert!(
            matches!(err, StreamError::Source(ref e) if e.to_string() == "disk on fire"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn receiver_grants_credit_as_containerd_and_gets_everything() {
        let payload = pattern(1_000_003);
        let (stream, mut from_client, to_client) = fake();
        let expected = payload.clone();
        // A daemon that sends only within the credit it has seen, in 32 KiB messages, and
        // checks the receiver never grants far ahead of what it has taken.
        let daemon = tokio::spawn(async move {
            let mut credit: i64 = 0;
            let mut offset = 0;
            let mut first = None;
            while offset < payload.len() {
                while credit <= 0 {
                    let msg = from_client.recv().await.expect("credit comes");
                    let u: WindowUpdate = type_url::from_any(&msg).expect("window update");
                    first.get_or_insert(u.update);
                    credit += i64::from(u.update);
                }
                // Take any further grants already queued.
                while let Ok(msg) = from_client.try_recv() {
                    let u: WindowUpdate = type_url::from_any(&msg).expect("window update");
                    credit += i64::from(u.update);
                }
                assert!(
                    credit <= 2 * i64::from(WINDOW),
                    "the receiver grants at most a window ahead: {credit}"
                );
                let n = (payload.len() - offset)
                    .min(DAEMON_DATA)
                    .min(credit as usize);
                let data = Data {
                    data: payload[offset..offset + n].to_vec(),
                };
                to_client
                    .send(Ok(type_url::to_any(&data)))
                    .await
                    .expect("send");
                offset += n;
                credit -= n as i64;
            }
            first
        });
        let mut out = Vec::new();
        let mut pieces = 0;
        let got = tokio::time::timeout(LIMIT, receive_bytes(stream, &mut out, |_| pieces += 1))
            .await
            .expect("no deadlock")
            .expect("received");
        let first = daemon.await.expect("daemon");
        assert_eq!(first, Some(WINDOW), "the first grant is one window");
        assert_eq!(got, expected.len() as u64);
        assert_eq!(out, expected);
        assert!(pieces >= expected.len() / DAEMON_DATA, "{pieces} pieces");
    }

    #[tokio::test]
    async fn receiver_refuses_more_than_granted_and_reports_a_broken_stream() {
        let (stream, _from_client, to_client) = fake();
        let data = Data {
            data: vec![0; WINDOW as usize + 1],
        };
        to_client
            .send(Ok(type_url::to_any(&data)))
            .await
            .expect("send");
        let err = receive_bytes(stream, &mut Vec::new(), |_| {})
            .await
            .expect_err("more than the window");
        assert!(err.to_string().contains("granted"), "{err}");

        let (stream, _from_client, to_client) = fake();
        to_client
            .send(Ok(type_url::to_any(&Data { data: vec![1; 10] })))
            .await
            .expect("send");
        to_client
            .send(Err(tonic::Status::internal("export failed")))
            .await
            .expect("send");
        let mut out = Vec::new();
        let err = receive_bytes(stream, &mut out, |_| {})
            .await
            .expect_err("broken stream");
        assert!(matches!(err, StreamError::Peer(_)), "{err}");
        assert_eq!(out, vec![1; 10]);
    }

    /// Both ends against the daemon's own (berth-services) over a real socket.
    mod against_the_daemon {
        use std::sync::Arc;

        use berth_proto::containerd::services::streaming::v1::streaming_server::StreamingServer;
        use berth_services::streaming::{self, StreamManager, StreamingService};
        use tokio_stream::wrappers::UnixListenerStream;

        use super::*;
        use crate::client::Client;

        const NS: &str = "stream-test";

        async fn serve() -> (tempfile::TempDir, Arc<StreamManager>, Client) {
            let dir = tempfile::tempdir().expect("tempdir");
            let socket = dir.path().join("s.sock");
            let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
            let manager = Arc::new(StreamManager::new());
            let service = StreamingServer::new(StreamingService::new(manager.clone()));
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(UnixListenerStream::new(listener)),
            );
            let client = Client::connect(&socket, NS).await.expect("connect");
            (dir, manager, client)
        }

        #[tokio::test]
        async fn bytes_sent_arrive_whole() {
            let (_dir, manager, client) = serve().await;
            let stream = ClientStream::open(&mut client.streaming(), "import")
                .await
                .expect("open");
            let server_end = manager.take(NS, stream.id()).expect("registered on ack");
            let payload = pattern(700_001);
            let sender = tokio::spawn(send_bytes(stream, std::io::Cursor::new(payload.clone())));
            let mut incoming = streaming::receive_bytes(server_end);
            let mut got = Vec::new();
            while let Some(chunk) = incoming.next().await {
                got.extend_from_slice(&chunk.expect("chunk"));
            }
            drop(incoming);
            let sent = tokio::time::timeout(LIMIT, sender)
                .await
                .expect("the sender ends with the stream")
                .expect("task")
                .expect("sent");
            assert_eq!(sent, payload.len() as u64);
            assert_eq!(got, payload);
        }

        #[tokio::test]
        async fn bytes_received_arrive_whole() {
            let (_dir, manager, client) = serve().await;
            let stream = ClientStream::open(&mut client.streaming(), "export")
                .await
                .expect("open");
            let server_end = manager.take(NS, stream.id()).expect("registered on ack");
            let payload = pattern(900_017);
            let source = std::io::Cursor::new(payload.clone());
            let daemon = tokio::spawn(streaming::send_bytes(server_end, source));
            let mut got = Vec::new();
            let n = tokio::time::timeout(LIMIT, receive_bytes(stream, &mut got, |_| {}))
                .await
                .expect("no deadlock")
                .expect("received");
            daemon.await.expect("task").expect("daemon sent");
            assert_eq!(n, payload.len() as u64);
            assert_eq!(got, payload);
        }
    }
}
