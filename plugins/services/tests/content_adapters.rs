//! The content adapters end to end: an in-memory store served by `ContentService` on a real
//! unix socket, driven both by the `ContentClient` adapter and by raw generated-client streams
//! (which is what `ctr` sends).

mod testing;

use std::sync::Arc;
use std::time::Duration;

use berth_core::content::{CallContext, ContentStore, Digest, WriterRequest};
use berth_core::error::{Classify, ErrorKind};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::namespace::{GRPC_HEADER, LEASE_HEADER, Namespace};
use berth_core::testing::MemoryContentStore as MemoryStore;
use berth_proto::containerd::services::content::v1 as wire;
use berth_proto::containerd::services::content::v1::content_client::ContentClient as RawClient;
use berth_proto::containerd::services::content::v1::{WriteAction, WriteContentRequest};
use berth_services::content::{ContentClient, LIST_BATCH, READ_CHUNK};
use testing::serving::Served;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// The in-memory store, served; both go when dropped.
struct Server {
    store: MemoryStore,
    served: Served,
}

impl Server {
    async fn start() -> Server {
        let store = MemoryStore::new();
        // A dropped writer must be released by the adapter, not by the store's Drop.
        store.keep_dropped_writers_locked();
        let served = Served::start(Arc::new(store.clone()));
        Server { store, served }
    }

    async fn raw(&self) -> RawClient<Channel> {
        RawClient::new(self.served.channel().await).max_decoding_message_size(16 << 20)
    }

    async fn adapter(&self) -> ContentClient {
        ContentClient::new(self.served.channel().await)
    }
}

fn cx(namespace: &str) -> CallContext {
    CallContext {
        namespace: Some(Namespace::parse(namespace).expect("namespace")),
        lease: None,
    }
}

fn with_ns<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(GRPC_HEADER, "default".parse().expect("ascii"));
    request
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A raw Write stream, as `ctr` drives it: one request, then its one reply.
struct RawWrite {
    requests: Option<mpsc::Sender<WriteContentRequest>>,
    replies: tonic::Streaming<wire::WriteContentResponse>,
}

impl RawWrite {
    /// Opens the call before sending anything (a client may well do so).
    async fn open(client: &mut RawClient<Channel>) -> RawWrite {
        let (tx, rx) = mpsc::channel(4);
        let replies = client
            .write(with_ns(ReceiverStream::new(rx)))
            .await
            .expect("write call")
            .into_inner();
        RawWrite {
            requests: Some(tx),
            replies,
        }
    }

    async fn send(
        &mut self,
        request: WriteContentRequest,
    ) -> Result<wire::WriteContentResponse, tonic::Status> {
        if let Some(tx) = &self.requests {
            let _ = tx.send(request).await;
        }
        match self.replies.message().await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => panic!("stream ended without a reply"),
            Err(status) => Err(status),
        }
    }

    /// Ends the sending side and collects whatever the server still sends.
    async fn finish(mut self) -> Vec<wire::WriteContentResponse> {
        self.requests = None;
        let mut rest = Vec::new();
        while let Some(reply) = self.replies.message().await.expect("clean end") {
            rest.push(reply);
        }
        rest
    }
}

fn stat(reference: &str) -> WriteContentRequest {
    WriteContentRequest {
        action: WriteAction::Stat.into(),
        r#ref: reference.to_owned(),
        ..Default::default()
    }
}

fn write(offset: i64, data: &[u8]) -> WriteContentRequest {
    WriteContentRequest {
        action: WriteAction::Write.into(),
        offset,
        data: data.to_vec(),
        ..Default::default()
    }
}

fn commit(offset: i64, total: i64, expected: &str) -> WriteContentRequest {
    WriteContentRequest {
        action: WriteAction::Commit.into(),
        offset,
        total,
        expected: expected.to_owned(),
        ..Default::default()
    }
}

async fn read_all(stream: berth_core::content::ByteStream) -> Vec<u8> {
    let chunks: Vec<_> = stream.collect().await;
    chunks.into_iter().flat_map(|c| c.expect("chunk")).collect()
}

#[tokio::test]
async fn adapter_round_trip() {
    let server = Server::start().await;
    let store = server.adapter().await;
    let cx = cx("default");
    let expected = Digest::sha256_of(b"hello world");

    let mut writer = store
        .writer(
            &cx,
            WriterRequest {
                reference: "r1".into(),
                total: 11,
                expected: Some(expected.clone()),
            },
        )
        .await
        .expect("writer");
    assert_eq!(writer.status().offset, 0);
    assert_eq!(writer.status().total, 11);
    writer.write(b"hello ").await.expect("write");
    assert_eq!(writer.status().offset, 6);
    assert_eq!(writer.digest(), Digest::sha256_of(b"hello "));
    let remote = store.status(&cx, "r1").await.expect("status");
    assert_eq!((remote.reference.as_str(), remote.offset), ("r1", 6));
    writer.write(b"world").await.expect("write");
    writer
        .commit(11, Some(expected.clone()), labels(&[("a", "1")]))
        .await
        .expect("commit");

    let info = store.info(&cx, &expected).await.expect("info");
    assert_eq!(info.size, 11);
    assert_eq!(info.labels, labels(&[("a", "1")]));
    let all = read_all(store.read(&cx, &expected, 0, None).await.expect("read")).await;
    assert_eq!(all, b"hello world");
    let part = read_all(store.read(&cx, &expected, 6, Some(3)).await.expect("read")).await;
    assert_eq!(part, b"wor");
    let clamped = read_all(
        store
            .read(&cx, &expected, 6, Some(100))
            .await
            .expect("read"),
    )
    .await;
    assert_eq!(clamped, b"world");
    let at_end = read_all(store.read(&cx, &expected, 11, None).await.expect("read")).await;
    assert!(at_end.is_empty());
    let empty = read_all(store.read(&cx, &expected, 3, Some(0)).await.expect("read")).await;
    assert!(empty.is_empty());
    for size in [None, Some(0)] {
        let past = store
            .read(&cx, &expected, 12, size)
            .await
            .err()
            .expect("past the end");
        assert_eq!(past.kind(), ErrorKind::OutOfRange, "{past}");
    }

    let mut change = info.clone();
    change.labels = labels(&[("b", "2")]);
    let updated = store
        .update(&cx, change, &["labels.b".into(), "labels.a".into()])
        .await
        .expect("update");
    assert_eq!(updated.labels, labels(&[("b", "2")]));

    let other = Digest::sha256_of(b"other");
    server.store.insert(b"other", labels(&[("b", "3")]));
    let matching = store
        .list(&cx, &Filter::parse_all(&["labels.b==2"]).expect("filter"))
        .await
        .expect("list");
    assert_eq!(
        matching.iter().map(|i| &i.digest).collect::<Vec<_>>(),
        [&expected]
    );
    let by_digest = store
        .list(
            &cx,
            &Filter::parse_all(&[format!("digest=={other}")]).expect("filter"),
        )
        .await
        .expect("list");
    assert_eq!(by_digest.len(), 1);
    assert_eq!(
        store
            .list(&cx, &Filter::default())
            .await
            .expect("list")
            .len(),
        2
    );

    store.delete(&cx, &expected).await.expect("delete");
    let gone = store.info(&cx, &expected).await.expect_err("deleted");
    assert_eq!(gone.kind(), ErrorKind::NotFound);
    // The kind phrase is not repeated by the round trip through a status.
    assert!(!gone.message().ends_with("not found"), "{gone}");
    let missing = store.status(&cx, "nope").await.expect_err("no ingest");
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    let missing = store.abort(&cx, "nope").await.expect_err("no ingest");
    assert_eq!(missing.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn first_message_must_carry_a_ref() {
    let server = Server::start().await;
    let mut client = server.raw().await;
    let mut session = RawWrite::open(&mut client).await;
    let err = session.send(stat("")).await.expect_err("no ref");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("reference"), "{}", err.message());

    let mut session = RawWrite::open(&mut client).await;
    let mut bad = stat("r");
    bad.expected = "sha256:nothex".into();
    let err = session.send(bad).await.expect_err("bad digest");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let mut session = RawWrite::open(&mut client).await;
    session.send(stat("r")).await.expect("stat");
    let mut unknown = write(0, b"x");
    unknown.action = 7;
    let err = session.send(unknown).await.expect_err("unknown action");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // A stream closed before any request is owed no reply and ends cleanly.
    let session = RawWrite::open(&mut client).await;
    assert!(session.finish().await.is_empty());
}

#[tokio::test]
async fn exactly_one_reply_per_request_and_commit_ends_the_stream() {
    let server = Server::start().await;
    let mut client = server.raw().await;
    let mut session = RawWrite::open(&mut client).await;
    let mut first = stat("one-each");
    first.total = 9;
    let reply = session.send(first).await.expect("stat");
    assert_eq!(reply.action, i32::from(WriteAction::Stat));
    assert_eq!((reply.offset, reply.total), (0, 9));
    assert_eq!(reply.digest, Digest::sha256_of(b"").to_string());
    assert!(reply.started_at.is_some() && reply.updated_at.is_some());

    let reply = session.send(write(0, b"abc")).await.expect("write");
    assert_eq!(reply.action, i32::from(WriteAction::Write));
    assert_eq!(reply.offset, 3);
    assert_eq!(reply.digest, Digest::sha256_of(b"abc").to_string());
    let reply = session.send(write(3, b"def")).await.expect("write");
    assert_eq!(reply.offset, 6);
    let reply = session
        .send(WriteContentRequest {
            action: WriteAction::Stat.into(),
            ..Default::default()
        })
        .await
        .expect("stat");
    assert_eq!((reply.offset, reply.total), (6, 9));

    let expected = Digest::sha256_of(b"abcdefghi");
    let mut last = commit(6, 9, &expected.to_string());
    last.data = b"ghi".to_vec();
    last.labels = [("k".to_owned(), "v".to_owned())].into();
    let reply = session.send(last).await.expect("commit");
    assert_eq!(reply.action, i32::from(WriteAction::Commit));
    assert_eq!(reply.offset, 9);
    assert_eq!(reply.digest, expected.to_string());
    assert!(
        session.finish().await.is_empty(),
        "no second reply after COMMIT"
    );
    assert_eq!(
        server.store.blob(&expected).as_deref(),
        Some(&b"abcdefghi"[..])
    );
    let info = server
        .store
        .info(&CallContext::default(), &expected)
        .await
        .expect("info");
    assert_eq!(info.labels, labels(&[("k", "v")]));
}

#[tokio::test]
async fn a_write_away_from_the_current_offset_is_out_of_range() {
    let server = Server::start().await;
    let mut client = server.raw().await;
    let mut session = RawWrite::open(&mut client).await;
    session.send(stat("gap")).await.expect("stat");
    session.send(write(0, b"abc")).await.expect("write");
    let err = session.send(write(5, b"x")).await.expect_err("gap");
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    assert!(
        err.message().contains("current offset 3"),
        "{}",
        err.message()
    );
    assert!(
        matches!(session.replies.message().await, Ok(None)),
        "the stream is over after an error"
    );

    // The writer was released and the ingest kept.
    assert!(!server.store.is_locked("gap"));
    let status = client
        .status(with_ns(wire::StatusRequest {
            r#ref: "gap".into(),
        }))
        .await
        .expect("status")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(status.offset, 3);

    let mut session = RawWrite::open(&mut client).await;
    session.send(stat("neg")).await.expect("stat");
    let err = session.send(write(-4, b"x")).await.expect_err("negative");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn offset_zero_restarts_an_ingest() {
    let server = Server::start().await;
    let mut client = server.raw().await;
    let mut session = RawWrite::open(&mut client).await;
    session.send(stat("restart")).await.expect("stat");
    session.send(write(0, b"abc")).await.expect("write");
    let reply = session.send(write(0, b"xy")).await.expect("rewrite");
    assert_eq!(reply.offset, 2);
    assert_eq!(reply.digest, Digest::sha256_of(b"xy").to_string());
    session.send(commit(2, 2, "")).await.expect("commit");
    assert_eq!(
        server.store.blob(&Digest::sha256_of(b"xy")).as_deref(),
        Some(&b"xy"[..])
    );

    // The adapter's truncate is a WRITE at offset 0 without data.
    let store = server.adapter().await;
    let mut writer = store
        .writer(
            &cx("default"),
            WriterRequest {
                reference: "again".into(),
                total: 0,
                expected: None,
            },
        )
        .await
        .expect("writer");
    writer.write(b"wrong").await.expect("write");
    writer.truncate(0).await.expect("truncate");
    assert_eq!(writer.status().offset, 0);
    assert_eq!(writer.digest(), Digest::sha256_of(b""));
    let err = writer.truncate(2).await.expect_err("only 0");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    writer.write(b"right").await.expect("write");
    writer
        .commit(5, Some(Digest::sha256_of(b"right")), Labels::new())
        .await
        .expect("commit");
}

#[tokio::test]
async fn an_ingest_resumes_at_its_offset_after_a_reconnect() {
    let server = Server::start().await;
    let mut client = server.raw().await;
    let mut session = RawWrite::open(&mut client).await;
    let first = session.send(stat("resume")).await.expect("stat");
    session.send(write(0, b"0123456789")).await.expect("write");
    // The stream ends without COMMIT, as when ctr is killed.
    assert!(session.finish().await.is_empty());
    assert!(!server.store.is_locked("resume"));

    let mut client = server.raw().await;
    let mut session = RawWrite::open(&mut client).await;
    let reply = session.send(stat("resume")).await.expect("stat");
    assert_eq!(reply.offset, 10, "STAT tells where to continue");
    assert_eq!(reply.digest, Digest::sha256_of(b"0123456789").to_string());
    assert_eq!(reply.started_at, first.started_at, "same ingest");
    drop(session.finish().await);

    let listed = client
        .list_statuses(with_ns(wire::ListStatusesRequest {
            filters: vec!["ref==resume".into()],
        }))
        .await
        .expect("list statuses")
        .into_inner()
        .statuses;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].offset, 10);

    // The adapter picks up where the ingest stands, as content.Copy does.
    let store = server.adapter().await;
    let mut writer = store
        .writer(
            &cx("default"),
            WriterRequest {
                reference: "resume".into(),
                total: 16,
                expected: None,
            },
        )
        .await
        .expect("writer");
    assert_eq!(writer.status().offset, 10);
    writer.write(b"abcdef").await.expect("write");
    writer
        .commit(
            16,
            Some(Digest::sha256_of(b"0123456789abcdef")),
            Labels::new(),
        )
        .await
        .expect("commit");
}

#[tokio::test]
async fn an_existing_blob_is_already_exists() {
    let server = Server::start().await;
    let existing = server.store.insert(b"blob", Labels::new());
    let mut client = server.raw().await;

    // Expected on the first message: the store's writer refuses.
    let mut session = RawWrite::open(&mut client).await;
    let mut first = stat("known");
    first.expected = existing.to_string();
    let err = session.send(first).await.expect_err("exists");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);

    let store = server.adapter().await;
    let err = store
        .writer(
            &cx("default"),
            WriterRequest {
                reference: "known".into(),
                total: 4,
                expected: Some(existing.clone()),
            },
        )
        .await
        .err()
        .expect("exists");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);

    // Expected on a later message: the ingest is dropped, as containerd does.
    let mut session = RawWrite::open(&mut client).await;
    session.send(stat("late")).await.expect("stat");
    session.send(write(0, b"blob")).await.expect("write");
    let err = session
        .send(commit(4, 4, &existing.to_string()))
        .await
        .expect_err("exists");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let status = client
        .status(with_ns(wire::StatusRequest {
            r#ref: "late".into(),
        }))
        .await
        .expect_err("aborted");
    assert_eq!(status.code(), tonic::Code::NotFound);

    // No expected digest at all: the store's commit finds the blob.
    let mut writer = store
        .writer(
            &cx("default"),
            WriterRequest {
                reference: "dup".into(),
                total: 0,
                expected: None,
            },
        )
        .await
        .expect("writer");
    writer.write(b"blob").await.expect("write");
    let err = writer
        .commit(0, None, Labels::new())
        .await
        .expect_err("exists");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(server.store.blob_count(), 1);
}

#[tokio::test]
async fn a_commit_that_does_not_verify_is_failed_precondition() {
    let server = Server::start().await;
    let mut client = server.raw().await;
    let mut session = RawWrite::open(&mut client).await;
    session.send(stat("bad-digest")).await.expect("stat");
    session.send(write(0, b"abc")).await.expect("write");
    let wrong = Digest::sha256_of(b"abd");
    let err = session
        .send(commit(3, 3, &wrong.to_string()))
        .await
        .expect_err("digest");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(server.store.blob_count(), 0);

    let mut session = RawWrite::open(&mut client).await;
    session.send(stat("bad-size")).await.expect("stat");
    session.send(write(0, b"abc")).await.expect("write");
    let err = session.send(commit(3, 5, "")).await.expect_err("size");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(server.store.blob_count(), 0);

    let store = server.adapter().await;
    let mut writer = store
        .writer(
            &cx("default"),
            WriterRequest {
                reference: "adapter".into(),
                total: 0,
                expected: None,
            },
        )
        .await
        .expect("writer");
    writer.write(b"abc").await.expect("write");
    let err = writer
        .commit(0, Some(wrong), Labels::new())
        .await
        .expect_err("digest");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(server.store.blob_count(), 0);
}

#[tokio::test]
async fn a_held_ref_is_unavailable_until_released() {
    let server = Server::start().await;
    let store = server.adapter().await;
    let request = || WriterRequest {
        reference: "busy".into(),
        total: 0,
        expected: None,
    };
    let mut first = store
        .writer(&cx("default"), request())
        .await
        .expect("first");
    first.write(b"x").await.expect("write");
    let err = store
        .writer(&cx("default"), request())
        .await
        .err()
        .expect("locked");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    first.close().await.expect("close");
    // close returns only once the server released the ref.
    let again = store
        .writer(&cx("default"), request())
        .await
        .expect("again");
    assert_eq!(again.status().offset, 1);
    again.close().await.expect("close");
}

#[tokio::test]
async fn read_is_chunked_like_containerd() {
    let server = Server::start().await;
    let data: Vec<u8> = (0..3 * READ_CHUNK + 5).map(|i| (i % 251) as u8).collect();
    let digest = server.store.insert(&data, Labels::new());
    let mut client = server.raw().await;
    let read = |offset: i64, size: i64| wire::ReadContentRequest {
        digest: digest.to_string(),
        offset,
        size,
    };

    for chunk in [0, 1000, 5 * READ_CHUNK / 2] {
        server.store.set_read_chunk(chunk);
        let mut stream = client
            .read(with_ns(read(0, 0)))
            .await
            .expect("read")
            .into_inner();
        let mut all = Vec::new();
        while let Some(message) = stream.message().await.expect("message") {
            assert!(message.data.len() <= READ_CHUNK);
            assert_eq!(message.offset, all.len() as i64);
            all.extend_from_slice(&message.data);
        }
        assert_eq!(all, data, "chunk {chunk}");
    }
    server.store.set_read_chunk(0);

    let messages: Vec<_> = client
        .read(with_ns(read(0, 0)))
        .await
        .expect("read")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("messages");
    assert_eq!(
        messages.iter().map(|m| m.data.len()).collect::<Vec<_>>(),
        [READ_CHUNK, READ_CHUNK, READ_CHUNK, 5]
    );

    let read_range = |offset: i64, size: i64| {
        let mut client = client.clone();
        let request = read(offset, size);
        async move {
            let messages: Vec<_> = client
                .read(with_ns(request))
                .await?
                .into_inner()
                .collect::<Result<_, _>>()
                .await?;
            // Offsets count from the start of the read, as containerd's server sends them.
            assert_eq!(messages.first().map_or(0, |m| m.offset), 0);
            Ok::<_, tonic::Status>(
                messages
                    .into_iter()
                    .flat_map(|m| m.data)
                    .collect::<Vec<_>>(),
            )
        }
    };
    assert_eq!(read_range(100, 10).await.expect("range"), &data[100..110]);
    assert_eq!(
        read_range(-5, 3).await.expect("negative offset"),
        &data[..3]
    );
    let tail = data.len() as i64 - 4;
    assert_eq!(
        read_range(tail, 100).await.expect("clamped"),
        &data[data.len() - 4..]
    );
    assert!(
        read_range(data.len() as i64, 0)
            .await
            .expect("at end")
            .is_empty()
    );
    let past = read_range(data.len() as i64 + 1, 0)
        .await
        .expect_err("past end");
    assert_eq!(past.code(), tonic::Code::OutOfRange);

    let missing = client
        .read(with_ns(wire::ReadContentRequest {
            digest: Digest::sha256_of(b"missing").to_string(),
            offset: 0,
            size: 0,
        }))
        .await
        .expect_err("missing");
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn list_is_sent_in_batches() {
    let server = Server::start().await;
    for i in 0..250 {
        let labels = if i % 10 == 0 {
            labels(&[("containerd.io/uncompressed", "yes")])
        } else {
            Labels::new()
        };
        server.store.insert(format!("blob {i}").as_bytes(), labels);
    }
    let mut client = server.raw().await;
    let batches: Vec<_> = client
        .list(with_ns(wire::ListContentRequest { filters: vec![] }))
        .await
        .expect("list")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("batches");
    assert_eq!(
        batches.iter().map(|b| b.info.len()).collect::<Vec<_>>(),
        [LIST_BATCH, LIST_BATCH, 50]
    );

    let filtered: Vec<_> = client
        .list(with_ns(wire::ListContentRequest {
            filters: vec![r#"labels."containerd.io/uncompressed"==yes"#.into()],
        }))
        .await
        .expect("list")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("batches");
    assert_eq!(filtered.iter().map(|b| b.info.len()).sum::<usize>(), 25);

    let bad = client
        .list(with_ns(wire::ListContentRequest {
            filters: vec!["labels.a==1,,".into()],
        }))
        .await
        .expect_err("bad filter");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // The adapter lists everything and filters on its side.
    let store = server.adapter().await;
    let filter = Filter::parse_all(&[r#"labels."containerd.io/uncompressed"==yes"#]).expect("f");
    assert_eq!(
        store
            .list(&cx("default"), &filter)
            .await
            .expect("list")
            .len(),
        25
    );
    assert_eq!(
        store
            .list(&cx("default"), &Filter::default())
            .await
            .expect("list")
            .len(),
        250
    );
}

#[tokio::test]
async fn bad_digests_are_invalid_argument() {
    let server = Server::start().await;
    let mut client = server.raw().await;
    let bad = "sha256:not-a-digest".to_owned();
    let info = client
        .info(with_ns(wire::InfoRequest {
            digest: bad.clone(),
        }))
        .await
        .expect_err("info");
    let delete = client
        .delete(with_ns(wire::DeleteContentRequest {
            digest: bad.clone(),
        }))
        .await
        .expect_err("delete");
    let read = client
        .read(with_ns(wire::ReadContentRequest {
            digest: bad.clone(),
            offset: 0,
            size: 0,
        }))
        .await
        .expect_err("read");
    let update = client
        .update(with_ns(wire::UpdateRequest {
            info: Some(wire::Info {
                digest: bad,
                ..Default::default()
            }),
            update_mask: None,
        }))
        .await
        .expect_err("update");
    let no_info = client
        .update(with_ns(wire::UpdateRequest {
            info: None,
            update_mask: None,
        }))
        .await
        .expect_err("no info");
    for status in [info, delete, read, update, no_info] {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
}

#[tokio::test]
async fn namespace_and_lease_headers_reach_the_store() {
    let server = Server::start().await;
    let digest = server.store.insert(b"x", Labels::new());
    let mut client = server.raw().await;

    let mut request = tonic::Request::new(wire::InfoRequest {
        digest: digest.to_string(),
    });
    request
        .metadata_mut()
        .insert(GRPC_HEADER, "team-a".parse().expect("ascii"));
    request
        .metadata_mut()
        .insert(LEASE_HEADER, "lease-1".parse().expect("ascii"));
    client.info(request).await.expect("info");
    let (call, seen) = server.store.calls().pop().expect("a call");
    assert_eq!(call, "info");
    assert_eq!(
        seen.namespace.as_ref().map(Namespace::as_str),
        Some("team-a")
    );
    assert_eq!(seen.lease.as_deref(), Some("lease-1"));

    // No headers: the store gets no namespace and decides itself.
    client
        .info(tonic::Request::new(wire::InfoRequest {
            digest: digest.to_string(),
        }))
        .await
        .expect("info");
    assert_eq!(
        server.store.calls().pop().expect("a call").1,
        CallContext::default()
    );

    let mut request = tonic::Request::new(wire::InfoRequest {
        digest: digest.to_string(),
    });
    request
        .metadata_mut()
        .insert(GRPC_HEADER, "bad..name".parse().expect("ascii"));
    let err = client.info(request).await.expect_err("invalid namespace");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // The adapter sends both headers on unary calls, streams and writes.
    let store = server.adapter().await;
    let context = CallContext {
        namespace: Some(Namespace::parse("team-b").expect("ns")),
        lease: Some("lease-2".into()),
    };
    store.info(&context, &digest).await.expect("info");
    read_all(store.read(&context, &digest, 0, None).await.expect("read")).await;
    store
        .list(&context, &Filter::default())
        .await
        .expect("list");
    let writer = store
        .writer(
            &context,
            WriterRequest {
                reference: "leased".into(),
                total: 0,
                expected: None,
            },
        )
        .await
        .expect("writer");
    writer.close().await.expect("close");
    store.abort(&context, "leased").await.expect("abort");
    let calls = server.store.calls();
    let tail: Vec<_> = calls[calls.len() - 5..].iter().map(|(c, _)| *c).collect();
    assert_eq!(tail, ["info", "read", "list", "writer", "abort"]);
    for (call, seen) in &calls[calls.len() - 5..] {
        assert_eq!(seen, &context, "{call}");
    }
}

#[tokio::test]
async fn a_vanished_client_releases_its_ingest() {
    let server = Server::start().await;
    {
        // Its own connection, dropped mid-ingest as when ctr is killed.
        let mut client = server.raw().await;
        let mut session = RawWrite::open(&mut client).await;
        session.send(stat("killed")).await.expect("stat");
        session.send(write(0, b"partial")).await.expect("write");
        assert!(server.store.is_locked("killed"));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.store.is_locked("killed") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ingest stayed locked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = server
        .store
        .status(&CallContext::default(), "killed")
        .await
        .expect("kept for a resume");
    assert_eq!(status.offset, 7);
}

#[tokio::test]
async fn one_commit_message_can_carry_a_whole_blob() {
    let server = Server::start().await;
    let mut client = server.raw().await;
    let mut session = RawWrite::open(&mut client).await;
    let digest = Digest::sha256_of(b"all at once");
    let mut only = commit(0, 11, &digest.to_string());
    only.r#ref = "oneshot".into();
    only.data = b"all at once".to_vec();
    let reply = session.send(only).await.expect("commit");
    assert_eq!((reply.offset, reply.total), (11, 11));
    assert_eq!(reply.digest, digest.to_string());
    assert!(session.finish().await.is_empty());
    assert!(server.store.blob(&digest).is_some());
}
