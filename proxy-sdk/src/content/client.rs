//! The client adapter: a remote `containerd.services.content.v1.Content` as a [`ContentStore`].
//!
//! Works against berth's [`ContentService`](super::ContentService) and against containerd
//! itself. Each call carries the [`CallContext`] as the `containerd-namespace` and
//! `containerd-lease` headers; statuses come back as errors through
//! [`Error::from_status`], so codes (NotFound, AlreadyExists, Unavailable...) survive the trip.
//!
//! Writers speak the client side of the write protocol as containerd's
//! `core/content/proxy/content_writer.go`: the opening STAT names the ref, total and expected
//! digest, and its reply's offset is where a resumed ingest continues; each WRITE carries the
//! offset the client believes current and waits for its reply; COMMIT carries the size, the
//! offset, the expected digest and the labels, and the reply is checked against them.
//!
//! `list` and `list_statuses` send the filter's source strings to the remote store and apply
//! the parsed filter again to what comes back (fields `digest`, `size`, `labels.<key>`; `ref`,
//! `expected`), so a remote store that ignores filters still gives the right answer.

use std::time::SystemTime;

use crate::call::{Remote, with_headers};
use berth_core::content::{
    ByteStream, CallContext, ContentStore, ContentWriter, Digest, Info, Status, WriterRequest,
};
use berth_core::error::{Error, ErrorKind, Result};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_proto::containerd::services::content::v1::content_client;
use berth_proto::containerd::services::content::v1::{
    AbortRequest, DeleteContentRequest, InfoRequest, ListContentRequest, ListStatusesRequest,
    ReadContentRequest, StatusRequest, UpdateRequest, WriteAction, WriteContentRequest,
    WriteContentResponse,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{
    info_from_wire, info_to_wire, optional_digest, size_from_wire, status_from_wire, time_from_wire,
};

/// containerd's message limit (16 MiB each way).
const MAX_MESSAGE: usize = 16 << 20;
/// Largest WRITE payload: half the message limit, as containerd's proxy writer.
pub const WRITE_CHUNK: usize = MAX_MESSAGE / 2;

/// A [`ContentStore`] reached over gRPC.
#[derive(Debug, Clone)]
pub struct ContentClient {
    inner: content_client::ContentClient<Channel>,
    remote: Remote,
}

impl ContentClient {
    /// A store behind `channel` (one channel can be shared by many clients).
    pub fn new(channel: Channel) -> Self {
        ContentClient {
            inner: content_client::ContentClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            remote: Remote::default(),
        }
    }

    /// Names the service in Unavailable errors (e.g. "proxy plugin blobs at /run/b.sock").
    pub fn described_as(mut self, description: impl Into<String>) -> Self {
        self.remote = Remote::described(description);
        self
    }

    /// The generated client (cheap to clone: the channel is shared).
    fn client(&self) -> content_client::ContentClient<Channel> {
        self.inner.clone()
    }
}

/// The service answered something that does not fit the protocol: its fault, not the caller's.
fn bad_reply(what: impl std::fmt::Display) -> Error {
    Error::internal(format!("content service sent an invalid reply: {what}"))
}

fn checked_offset(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| Error::invalid_argument(format!("{what} {value} is too large for the wire")))
}

fn info_field(info: &Info, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str)? {
        "digest" => Some(info.digest.to_string()),
        "size" => Some(info.size.to_string()),
        "labels" => info.labels.get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

fn status_field(status: &Status, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str)? {
        "ref" => Some(status.reference.clone()),
        "expected" => status.expected.as_ref().map(Digest::to_string),
        _ => None,
    }
}

#[async_trait::async_trait]
impl ContentStore for ContentClient {
    async fn info(&self, cx: &CallContext, digest: &Digest) -> Result<Info> {
        let call = with_headers(
            cx,
            InfoRequest {
                digest: digest.to_string(),
            },
        )?;
        let info = self
            .client()
            .info(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        info_from_wire(info.info.ok_or_else(|| bad_reply("Info without info"))?).map_err(bad_reply)
    }

    async fn update(&self, cx: &CallContext, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let call = with_headers(
            cx,
            UpdateRequest {
                info: Some(info_to_wire(info)),
                update_mask: Some(prost_types::FieldMask {
                    paths: fieldpaths.to_vec(),
                }),
            },
        )?;
        let info = self
            .client()
            .update(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        info_from_wire(info.info.ok_or_else(|| bad_reply("Update without info"))?)
            .map_err(bad_reply)
    }

    async fn list(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<Info>> {
        let call = with_headers(
            cx,
            ListContentRequest {
                filters: filter.sources().to_vec(),
            },
        )?;
        let mut batches = self
            .client()
            .list(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        let mut infos = Vec::new();
        while let Some(batch) = batches.message().await.map_err(|s| self.remote.error(s))? {
            for info in batch.info {
                let info = info_from_wire(info).map_err(bad_reply)?;
                if filter.matches(&|path: &[String]| info_field(&info, path)) {
                    infos.push(info);
                }
            }
        }
        Ok(infos)
    }

    async fn delete(&self, cx: &CallContext, digest: &Digest) -> Result<()> {
        let call = with_headers(
            cx,
            DeleteContentRequest {
                digest: digest.to_string(),
            },
        )?;
        self.client()
            .delete(call)
            .await
            .map_err(|s| self.remote.error(s))?;
        Ok(())
    }

    async fn read(
        &self,
        cx: &CallContext,
        digest: &Digest,
        offset: u64,
        size: Option<u64>,
    ) -> Result<ByteStream> {
        if size == Some(0) {
            // On the wire size 0 means "to the end"; an empty read only needs the checks.
            let info = self.info(cx, digest).await?;
            if offset > info.size {
                return Err(Error::new(
                    ErrorKind::OutOfRange,
                    format!(
                        "read of {digest} at offset {offset} is past the object's length of {} bytes",
                        info.size
                    ),
                ));
            }
            return Ok(Box::pin(tokio_stream::empty()));
        }
        let call = with_headers(
            cx,
            ReadContentRequest {
                digest: digest.to_string(),
                offset: checked_offset(offset, "offset")?,
                size: checked_offset(size.unwrap_or(0), "size")?,
            },
        )?;
        let chunks = self
            .client()
            .read(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        // Response offsets are ignored, as containerd's client does (its server counts them
        // from the start of the read, the documentation says from the blob).
        let remote = self.remote.clone();
        Ok(Box::pin(chunks.map(move |chunk| {
            chunk.map(|c| c.data).map_err(|s| remote.error(s))
        })))
    }

    async fn status(&self, cx: &CallContext, reference: &str) -> Result<Status> {
        let call = with_headers(
            cx,
            StatusRequest {
                r#ref: reference.to_owned(),
            },
        )?;
        let status = self
            .client()
            .status(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        status_from_wire(
            status
                .status
                .ok_or_else(|| bad_reply("Status without status"))?,
        )
        .map_err(bad_reply)
    }

    async fn list_statuses(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<Status>> {
        let call = with_headers(
            cx,
            ListStatusesRequest {
                filters: filter.sources().to_vec(),
            },
        )?;
        let statuses = self
            .client()
            .list_statuses(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        let mut matching = Vec::new();
        for status in statuses.statuses {
            let status = status_from_wire(status).map_err(bad_reply)?;
            if filter.matches(&|path: &[String]| status_field(&status, path)) {
                matching.push(status);
            }
        }
        Ok(matching)
    }

    async fn abort(&self, cx: &CallContext, reference: &str) -> Result<()> {
        let call = with_headers(
            cx,
            AbortRequest {
                r#ref: reference.to_owned(),
            },
        )?;
        self.client()
            .abort(call)
            .await
            .map_err(|s| self.remote.error(s))?;
        Ok(())
    }

    async fn writer(
        &self,
        cx: &CallContext,
        request: WriterRequest,
    ) -> Result<Box<dyn ContentWriter>> {
        let (requests, outgoing) = mpsc::channel(1);
        let stat = WriteContentRequest {
            action: WriteAction::Stat.into(),
            r#ref: request.reference.clone(),
            total: checked_offset(request.total, "total")?,
            expected: request
                .expected
                .as_ref()
                .map(Digest::to_string)
                .unwrap_or_default(),
            ..Default::default()
        };
        // Queued before the call starts, so the server has it whatever order it reads in.
        requests
            .send(stat)
            .await
            .map_err(|_| Error::internal("write request queue closed"))?;
        let call = with_headers(cx, ReceiverStream::new(outgoing))?;
        let replies = self
            .client()
            .write(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        let now = SystemTime::now();
        let mut writer = RemoteWriter {
            requests: Some(requests),
            replies,
            remote: self.remote.clone(),
            status: Status {
                reference: request.reference,
                offset: 0,
                total: request.total,
                expected: request.expected,
                started_at: now,
                updated_at: now,
            },
            digest: Digest::sha256_of(b""),
        };
        let reply = writer.next_reply().await?;
        writer.absorb(&reply)?;
        Ok(Box::new(writer))
    }
}

/// A writer holding a Write stream open (and so the ingest's lock on the server).
struct RemoteWriter {
    /// `None` once the sending side is closed.
    requests: Option<mpsc::Sender<WriteContentRequest>>,
    replies: tonic::Streaming<WriteContentResponse>,
    remote: Remote,
    status: Status,
    digest: Digest,
}

impl RemoteWriter {
    async fn next_reply(&mut self) -> Result<WriteContentResponse> {
        match self.replies.message().await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err(Error::new(
                ErrorKind::Unknown,
                "content service ended the write stream before replying",
            )),
            Err(status) => Err(self.remote.error(status)),
        }
    }

    /// One request, one reply: the protocol is synchronous.
    async fn exchange(&mut self, request: WriteContentRequest) -> Result<WriteContentResponse> {
        let sender = self
            .requests
            .as_ref()
            .ok_or_else(|| Error::failed_precondition("content writer is closed"))?;
        // When the server has already ended the stream the send fails; its status is then
        // the next thing on the reply stream, and more telling than a closed queue.
        let _ = sender.send(request).await;
        self.next_reply().await
    }

    /// Keeps what the server reported.
    fn absorb(&mut self, reply: &WriteContentResponse) -> Result<()> {
        self.status.offset = size_from_wire(reply.offset, "offset").map_err(bad_reply)?;
        let total = size_from_wire(reply.total, "total").map_err(bad_reply)?;
        if total > 0 {
            self.status.total = total;
        }
        if reply.started_at.is_some() {
            self.status.started_at =
                time_from_wire(reply.started_at, "started_at").map_err(bad_reply)?;
        }
        if reply.updated_at.is_some() {
            self.status.updated_at =
                time_from_wire(reply.updated_at, "updated_at").map_err(bad_reply)?;
        }
        if let Some(digest) = optional_digest(&reply.digest).map_err(|e| bad_reply(e.message()))? {
            self.digest = digest;
        }
        Ok(())
    }

    /// Closes the sending side and waits for the server to end the stream, which it does only
    /// after releasing the ingest: a writer opened after this returns is not refused as locked.
    async fn finish(mut self) {
        self.requests = None;
        while let Ok(Some(_)) = self.replies.message().await {}
    }
}

#[async_trait::async_trait]
impl ContentWriter for RemoteWriter {
    fn status(&self) -> Status {
        self.status.clone()
    }

    fn digest(&self) -> Digest {
        self.digest.clone()
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(WRITE_CHUNK) {
            let before = self.status.offset;
            let reply = self
                .exchange(WriteContentRequest {
                    action: WriteAction::Write.into(),
                    offset: checked_offset(before, "offset")?,
                    data: chunk.to_vec(),
                    ..Default::default()
                })
                .await?;
            self.absorb(&reply)?;
            let written = self.status.offset.saturating_sub(before);
            if written != chunk.len() as u64 {
                return Err(Error::new(
                    ErrorKind::DataLoss,
                    format!(
                        "short write to ingest {:?}: {written} of {} bytes at offset {before}",
                        self.status.reference,
                        chunk.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn truncate(&mut self, size: u64) -> Result<()> {
        if size != 0 {
            return Err(Error::invalid_argument(format!(
                "cannot truncate ingest {:?} to {size} bytes: only 0 (start over) is supported",
                self.status.reference
            )));
        }
        // A WRITE at offset 0 truncates an ingest that holds bytes (containerd's protocol).
        let reply = self
            .exchange(WriteContentRequest {
                action: WriteAction::Write.into(),
                offset: 0,
                ..Default::default()
            })
            .await?;
        self.absorb(&reply)
    }

    async fn commit(
        mut self: Box<Self>,
        size: u64,
        expected: Option<Digest>,
        labels: Labels,
    ) -> Result<()> {
        let result = async {
            let reply = self
                .exchange(WriteContentRequest {
                    action: WriteAction::Commit.into(),
                    total: checked_offset(size, "size")?,
                    offset: checked_offset(self.status.offset, "offset")?,
                    expected: expected.as_ref().map(Digest::to_string).unwrap_or_default(),
                    labels: labels.into_iter().collect(),
                    ..Default::default()
                })
                .await?;
            self.absorb(&reply)?;
            // The server verified both; checked again as containerd's client does, in case
            // the server is not as careful.
            if size != 0 && self.status.offset != size {
                return Err(Error::failed_precondition(format!(
                    "ingest {:?} committed {} bytes, expected {size}",
                    self.status.reference, self.status.offset
                )));
            }
            if let Some(expected) = &expected
                && self.digest != *expected
            {
                return Err(Error::failed_precondition(format!(
                    "ingest {:?} committed as {}, expected {expected}",
                    self.status.reference, self.digest
                )));
            }
            Ok(())
        }
        .await;
        self.finish().await;
        result
    }

    async fn close(self: Box<Self>) -> Result<()> {
        self.finish().await;
        Ok(())
    }
}
