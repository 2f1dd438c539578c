//! The server adapter: any [`ContentStore`] served as `containerd.services.content.v1.Content`.
//!
//! Every RPC builds a [`CallContext`] from the request headers (`containerd-namespace`,
//! validated when present, and `containerd-lease`); the store decides whether it needs a
//! namespace. Errors become statuses through [`berth_core::error::to_status`] only, and input
//! that does not parse (digests, negative sizes, unknown actions) is InvalidArgument.
//!
//! # Write protocol
//!
//! As containerd's `contentserver.go` (identical in v1.6.20 and main):
//!
//! - The first message must name a `ref` (else InvalidArgument); it opens (or resumes) the
//!   ingest with its `total` and `expected`. Errors of [`ContentStore::writer`] reach the
//!   client unchanged: Unavailable for a locked ref (clients retry), AlreadyExists when
//!   `expected` is stored (`ctr`'s `WriteBlob` treats it as success).
//! - Every message, the first included, gets exactly one reply. `expected` and `total` may come
//!   on any message: a later `expected` that is already stored closes the writer, aborts the
//!   ingest and answers AlreadyExists; a later positive `total` replaces the earlier one.
//! - STAT reports the ingest: `offset` (bytes held, so a resumed ingest tells the client where
//!   to continue), `digest` of those bytes, `started_at`, `updated_at` and `total`.
//! - WRITE and COMMIT carry the client's `offset`: a positive offset other than the current
//!   one is OutOfRange; offset 0 on an ingest that holds bytes truncates it first (with or
//!   without data, which is how containerd's client restarts an ingest). Then the data is
//!   appended; the reply's `offset` is the new size and `digest` the digest so far.
//! - COMMIT (with any final data and its labels) verifies and stores the blob, replies with
//!   the final digest (the expected one when named, which may use another algorithm than the
//!   running digest) and ends the stream. A commit of a blob that is already stored is
//!   AlreadyExists (from the store); a size or digest mismatch is FailedPrecondition.
//! - A stream that ends without COMMIT closes the writer, keeping the ingest for a resume.
//!
//! Differences from containerd, none visible to its clients: every reply carries fresh
//! `started_at`/`updated_at`/`total` (containerd repeats those of the last STAT); `total` falls
//! back to the store's when no message gave one; containerd sends its last reply a second time
//! when the stream ends (a deferred send), berth sends one reply per request as its own
//! protocol comment promises; negative offsets and totals and unknown actions are
//! InvalidArgument instead of being taken as "append", "unknown" and a bare STAT.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use berth_core::content::{
    ByteStream, CallContext, ContentStore, ContentWriter, Digest, WriterRequest,
};
use berth_core::error::{Classify, Error, ErrorKind, Result, to_status};
use berth_core::filters::Filter;
use berth_core::namespace;
use berth_core::serve::{GrpcService, MessageLimits};
use berth_proto::containerd::services::content::v1::content_server::{Content, ContentServer};
use berth_proto::containerd::services::content::v1::{
    AbortRequest, DeleteContentRequest, InfoRequest, InfoResponse, ListContentRequest,
    ListContentResponse, ListStatusesRequest, ListStatusesResponse, ReadContentRequest,
    ReadContentResponse, StatusRequest, StatusResponse, UpdateRequest, UpdateResponse, WriteAction,
    WriteContentRequest, WriteContentResponse,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    LIST_BATCH, READ_CHUNK, info_from_wire, info_to_wire, optional_digest, size_from_wire,
    status_to_wire, timestamp, wire_size,
};

/// A boxed response stream of the content service.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

/// The content service over a [`ContentStore`].
#[derive(Clone)]
pub struct ContentService {
    store: Arc<dyn ContentStore>,
}

impl ContentService {
    /// Serves `store`.
    pub fn new(store: Arc<dyn ContentStore>) -> Self {
        ContentService { store }
    }
}

/// The caller's namespace and lease, from the request headers.
fn call_context(metadata: &tonic::metadata::MetadataMap) -> Result<CallContext> {
    let namespace = namespace::from_metadata(metadata)?;
    // Passed on as sent: whether a lease exists (an empty one does not) is the store's to
    // answer, as containerd's metadata layer does.
    let lease = match metadata.get(namespace::LEASE_HEADER) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| {
                    Error::invalid_argument(format!(
                        "{} header is not valid text",
                        namespace::LEASE_HEADER
                    ))
                })?
                .to_owned(),
        ),
    };
    Ok(CallContext { namespace, lease })
}

fn invalid(message: String) -> Error {
    Error::invalid_argument(message)
}

#[tonic::async_trait]
impl Content for ContentService {
    async fn info(
        &self,
        request: tonic::Request<InfoRequest>,
    ) -> Result<tonic::Response<InfoResponse>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let digest = Digest::parse(&request.get_ref().digest)?;
        let info = self.store.info(&cx, &digest).await?;
        Ok(tonic::Response::new(InfoResponse {
            info: Some(info_to_wire(info)),
        }))
    }

    async fn update(
        &self,
        request: tonic::Request<UpdateRequest>,
    ) -> Result<tonic::Response<UpdateResponse>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let request = request.into_inner();
        let info = request
            .info
            .ok_or_else(|| Error::invalid_argument("update request carries no info"))?;
        // The digest is checked first so that a bad one is named as such.
        Digest::parse(&info.digest)?;
        let info = info_from_wire(info).map_err(invalid)?;
        let fieldpaths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self.store.update(&cx, info, &fieldpaths).await?;
        Ok(tonic::Response::new(UpdateResponse {
            info: Some(info_to_wire(info)),
        }))
    }

    type ListStream = ResponseStream<ListContentResponse>;

    async fn list(
        &self,
        request: tonic::Request<ListContentRequest>,
    ) -> Result<tonic::Response<Self::ListStream>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let filter = Filter::parse_all(&request.get_ref().filters)?;
        let infos = self.store.list(&cx, &filter).await?;
        // Batches as containerd's, so clients see the same message pattern.
        let mut batches = Vec::with_capacity(infos.len().div_ceil(LIST_BATCH));
        let mut infos = infos.into_iter().map(info_to_wire).peekable();
        while infos.peek().is_some() {
            let info = infos.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(ListContentResponse { info }));
        }
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn delete(
        &self,
        request: tonic::Request<DeleteContentRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let digest = Digest::parse(&request.get_ref().digest)?;
        self.store.delete(&cx, &digest).await?;
        Ok(tonic::Response::new(()))
    }

    type ReadStream = ResponseStream<ReadContentResponse>;

    async fn read(
        &self,
        request: tonic::Request<ReadContentRequest>,
    ) -> Result<tonic::Response<Self::ReadStream>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let request = request.into_inner();
        let digest = Digest::parse(&request.digest)?;
        // containerd looks the blob up first: the size bounds the read, and a missing blob is
        // NotFound before any byte is streamed.
        let info = self.store.info(&cx, &digest).await?;
        // A negative offset reads from the start, as containerd.
        let offset = u64::try_from(request.offset).unwrap_or(0);
        if offset > info.size {
            return Err(to_status(&Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "read of {digest} at offset {offset} is past the object's length of {} bytes",
                    info.size
                ),
            )));
        }
        let available = info.size - offset;
        // Size 0 (or negative, or past the end) reads to the end.
        let size = match u64::try_from(request.size) {
            Ok(n) if n > 0 && n < available => Some(n),
            _ => None,
        };
        let source = self.store.read(&cx, &digest, offset, size).await?;
        Ok(tonic::Response::new(Box::pin(ReadChunks {
            source: Some(source),
            pending: Vec::new(),
            sent: 0,
            offset: 0,
        })))
    }

    async fn status(
        &self,
        request: tonic::Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusResponse>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let reference = &request.get_ref().r#ref;
        let status = self.store.status(&cx, reference).await.map_err(|e| {
            // containerd: "could not get status for ref %q: <cause>".
            Error::new(
                e.kind(),
                format!(
                    "could not get status for ref {reference:?}: {}",
                    e.message()
                ),
            )
        })?;
        Ok(tonic::Response::new(StatusResponse {
            status: Some(status_to_wire(status)),
        }))
    }

    async fn list_statuses(
        &self,
        request: tonic::Request<ListStatusesRequest>,
    ) -> Result<tonic::Response<ListStatusesResponse>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let filter = Filter::parse_all(&request.get_ref().filters)?;
        let statuses = self.store.list_statuses(&cx, &filter).await?;
        Ok(tonic::Response::new(ListStatusesResponse {
            statuses: statuses.into_iter().map(status_to_wire).collect(),
        }))
    }

    type WriteStream = ResponseStream<WriteContentResponse>;

    async fn write(
        &self,
        request: tonic::Request<tonic::Streaming<WriteContentRequest>>,
    ) -> Result<tonic::Response<Self::WriteStream>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        // The session runs on its own task and the response starts at once: a tonic client
        // waits for the response headers before it returns the stream, so waiting here for
        // the first message would deadlock a client that sends only after that.
        let (replies, rx) = mpsc::channel(1);
        let session = WriteSession {
            store: Arc::clone(&self.store),
            cx,
            incoming: request.into_inner(),
            replies,
        };
        tokio::spawn(session.run());
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn abort(
        &self,
        request: tonic::Request<AbortRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        self.store.abort(&cx, &request.get_ref().r#ref).await?;
        Ok(tonic::Response::new(()))
    }
}

/// Cuts the store's byte stream into messages of at most [`READ_CHUNK`] bytes.
///
/// Each message's `offset` counts from the start of the read, not of the blob: containerd's
/// server starts its `readResponseWriter` at 0 whatever the requested offset, and its clients
/// ignore the field.
struct ReadChunks {
    /// `None` once the source ended or failed.
    source: Option<ByteStream>,
    pending: Vec<u8>,
    sent: usize,
    offset: i64,
}

impl Stream for ReadChunks {
    type Item = Result<ReadContentResponse, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.sent < this.pending.len() {
                let end = this.pending.len().min(this.sent + READ_CHUNK);
                let data = if this.sent == 0 && end == this.pending.len() {
                    // The whole chunk fits: hand it on without copying.
                    std::mem::take(&mut this.pending)
                } else {
                    this.pending[this.sent..end].to_vec()
                };
                this.sent = if this.pending.is_empty() { 0 } else { end };
                let offset = this.offset;
                this.offset += wire_size(data.len() as u64);
                return Poll::Ready(Some(Ok(ReadContentResponse { offset, data })));
            }
            this.pending.clear();
            this.sent = 0;
            let Some(source) = this.source.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(source.as_mut().poll_next(cx)) {
                Some(Ok(chunk)) => this.pending = chunk,
                Some(Err(e)) => {
                    this.source = None;
                    return Poll::Ready(Some(Err(to_status(&e))));
                }
                None => {
                    this.source = None;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

type Reply = Result<WriteContentResponse, tonic::Status>;

/// One Write stream: the writer it holds and the replies it owes.
struct WriteSession {
    store: Arc<dyn ContentStore>,
    cx: CallContext,
    incoming: tonic::Streaming<WriteContentRequest>,
    replies: mpsc::Sender<Reply>,
}

/// What the negotiation so far expects of the blob.
struct Expectation {
    reference: String,
    total: u64,
    expected: Option<Digest>,
}

impl WriteSession {
    async fn run(mut self) {
        if let Err(status) = self.serve().await {
            // AlreadyExists is how a client learns it has nothing to write: not a failure.
            if status.code() != tonic::Code::AlreadyExists {
                tracing::debug!(error = %status.message(), code = ?status.code(), "content write failed");
            }
            // The writer is closed by now, so a client that retries on this error finds the
            // ref unlocked. If the client is gone, there is nobody to tell.
            let _ = self.replies.send(Err(status)).await;
        }
        // Dropping `replies` ends the response stream (status OK when nothing failed).
    }

    async fn serve(&mut self) -> Result<(), tonic::Status> {
        let Some(first) = self.incoming.message().await? else {
            // No request, so no reply is owed.
            return Ok(());
        };
        if first.r#ref.is_empty() {
            return Err(to_status(&Error::invalid_argument(
                "first message must have a reference",
            )));
        }
        let mut plan = Expectation {
            reference: first.r#ref.clone(),
            total: size_from_wire(first.total, "total").map_err(invalid)?,
            expected: optional_digest(&first.expected)?,
        };
        let writer = self
            .store
            .writer(
                &self.cx,
                WriterRequest {
                    reference: plan.reference.clone(),
                    total: plan.total,
                    expected: plan.expected.clone(),
                },
            )
            .await?;
        let mut slot = Some(writer);
        let result = self.exchange(&mut slot, &mut plan, first).await;
        // Every way out that did not commit releases the ingest (kept for a resume) before the
        // stream ends, so the client's next writer for this ref is not refused as locked.
        if let Some(writer) = slot.take()
            && let Err(e) = writer.close().await
        {
            tracing::warn!(reference = %plan.reference, error = %e, "cannot close content writer");
        }
        result
    }

    /// Answers `request` and every one after it until COMMIT or the end of the stream.
    async fn exchange(
        &mut self,
        slot: &mut Option<Box<dyn ContentWriter>>,
        plan: &mut Expectation,
        mut request: WriteContentRequest,
    ) -> Result<(), tonic::Status> {
        loop {
            let action = WriteAction::try_from(request.action).map_err(|_| {
                invalid(format!(
                    "unknown write action {} (STAT=0, WRITE=1, COMMIT=2)",
                    request.action
                ))
            })?;
            if let Some(expected) = optional_digest(&request.expected)? {
                if self.store.info(&self.cx, &expected).await.is_ok() {
                    // As containerd: nothing left to write, so the ingest goes.
                    if let Some(writer) = slot.take()
                        && let Err(e) = writer.close().await
                    {
                        tracing::warn!(reference = %plan.reference, error = %e, "cannot close content writer");
                    }
                    if let Err(e) = self.store.abort(&self.cx, &plan.reference).await {
                        tracing::debug!(reference = %plan.reference, error = %e, "cannot abort ingest");
                    }
                    return Err(to_status(&Error::already_exists(format!(
                        "blob with expected digest {expected} exists"
                    ))));
                }
                plan.expected = Some(expected);
            }
            let total = size_from_wire(request.total, "total").map_err(invalid)?;
            if total > 0 {
                plan.total = total;
            }
            let Some(writer) = slot.as_mut() else {
                return Err(to_status(&Error::internal(
                    "content writer already released",
                )));
            };
            if action != WriteAction::Stat {
                let offset = size_from_wire(request.offset, "offset").map_err(invalid)?;
                let current = writer.status().offset;
                if offset > 0 && offset != current {
                    return Err(to_status(&Error::new(
                        ErrorKind::OutOfRange,
                        format!("write @{offset} must occur at current offset {current}"),
                    )));
                }
                if offset == 0 && current > 0 {
                    writer.truncate(0).await?;
                }
                if !request.data.is_empty() {
                    writer.write(&request.data).await?;
                }
            }
            let status = writer.status();
            let mut reply = WriteContentResponse {
                action: request.action,
                started_at: timestamp(status.started_at),
                updated_at: timestamp(status.updated_at),
                offset: wire_size(status.offset),
                total: wire_size(if plan.total > 0 {
                    plan.total
                } else {
                    status.total
                }),
                digest: writer.digest().to_string(),
            };
            if action == WriteAction::Commit {
                let labels = std::mem::take(&mut request.labels).into_iter().collect();
                if let Some(writer) = slot.take() {
                    writer
                        .commit(plan.total, plan.expected.clone(), labels)
                        .await?;
                }
                // A successful commit stored the blob under the expected digest when one was
                // named, which may use another algorithm than the running digest (a sha384
                // named only at commit); the client checks the reply against it.
                if let Some(expected) = &plan.expected {
                    reply.digest = expected.to_string();
                }
            }
            if self.replies.send(Ok(reply)).await.is_err() {
                return Err(tonic::Status::cancelled("the client went away"));
            }
            if action == WriteAction::Commit {
                return Ok(());
            }
            request = match self.incoming.message().await? {
                Some(next) => next,
                None => return Ok(()),
            };
        }
    }
}

impl GrpcService for ContentService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(
            ContentServer::new(self.clone()),
            limits
        ));
    }
}
