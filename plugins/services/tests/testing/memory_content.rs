//! A small in-memory [`ContentStore`] that records the [`CallContext`] of every call, so tests
//! can see what reached the store through the adapters.
//!
//! It follows the content contract: one writer per ref (a second gets Unavailable), the ingest
//! kept on close, size and digest verified at commit (FailedPrecondition), AlreadyExists for a
//! blob that is there, OutOfRange for a read past the end. A writer that is dropped without
//! `close` or `commit` keeps its ref locked, so a test notices an adapter that forgets to
//! release one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use berth_core::content::{
    ByteStream, CallContext, ContentStore, ContentWriter, Digest, Info, Status, WriterRequest,
};
use berth_core::error::{Error, ErrorKind, Result};
use berth_core::filters::Filter;
use berth_core::labels::Labels;

struct Blob {
    data: Vec<u8>,
    info: Info,
}

struct Ingest {
    data: Vec<u8>,
    total: u64,
    expected: Option<Digest>,
    started_at: SystemTime,
    updated_at: SystemTime,
    locked: bool,
}

#[derive(Default)]
struct State {
    blobs: BTreeMap<Digest, Blob>,
    ingests: BTreeMap<String, Ingest>,
    calls: Vec<(&'static str, CallContext)>,
    /// Chunk size of read streams; 0 means the whole range in one chunk.
    read_chunk: usize,
}

/// The in-memory store; clones share their state.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, call: &'static str, cx: &CallContext) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        state.calls.push((call, cx.clone()));
        state
    }

    /// Read streams yield chunks of `size` bytes (0: one chunk).
    pub fn set_read_chunk(&self, size: usize) {
        self.lock().read_chunk = size;
    }

    /// Every call so far: the method name and its context.
    pub fn calls(&self) -> Vec<(&'static str, CallContext)> {
        self.lock().calls.clone()
    }

    /// Stores `data` directly (test setup), returning its digest.
    pub fn insert(&self, data: &[u8], labels: Labels) -> Digest {
        let digest = Digest::sha256_of(data);
        let now = SystemTime::now();
        self.lock().blobs.insert(
            digest.clone(),
            Blob {
                data: data.to_vec(),
                info: Info {
                    digest: digest.clone(),
                    size: data.len() as u64,
                    created_at: now,
                    updated_at: now,
                    labels,
                },
            },
        );
        digest
    }

    /// The stored bytes of `digest`, if any.
    pub fn blob(&self, digest: &Digest) -> Option<Vec<u8>> {
        self.lock().blobs.get(digest).map(|b| b.data.clone())
    }

    /// Number of stored blobs.
    pub fn blob_count(&self) -> usize {
        self.lock().blobs.len()
    }

    /// Whether the ingest `reference` is held by a writer.
    pub fn is_locked(&self, reference: &str) -> bool {
        self.lock().ingests.get(reference).is_some_and(|i| i.locked)
    }
}

fn status_of(reference: &str, ingest: &Ingest) -> Status {
    Status {
        reference: reference.to_owned(),
        offset: ingest.data.len() as u64,
        total: ingest.total,
        expected: ingest.expected.clone(),
        started_at: ingest.started_at,
        updated_at: ingest.updated_at,
    }
}

fn info_field(info: &Info, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str)? {
        "digest" => Some(info.digest.to_string()),
        "size" => Some(info.size.to_string()),
        "labels" => info.labels.get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

#[async_trait::async_trait]
impl ContentStore for MemoryStore {
    async fn info(&self, cx: &CallContext, digest: &Digest) -> Result<Info> {
        let state = self.record("info", cx);
        state
            .blobs
            .get(digest)
            .map(|b| b.info.clone())
            .ok_or_else(|| Error::not_found(format!("content {digest}")))
    }

    async fn update(&self, cx: &CallContext, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let mut state = self.record("update", cx);
        let blob = state
            .blobs
            .get_mut(&info.digest)
            .ok_or_else(|| Error::not_found(format!("content {}", info.digest)))?;
        let mut labels = blob.info.labels.clone();
        if fieldpaths.is_empty() {
            labels = info.labels.clone();
        }
        for path in fieldpaths {
            if path == "labels" {
                labels = info.labels.clone();
            } else if let Some(key) = path.strip_prefix("labels.") {
                match info.labels.get(key) {
                    Some(v) if !v.is_empty() => {
                        labels.insert(key.to_owned(), v.clone());
                    }
                    _ => {
                        labels.remove(key);
                    }
                }
            } else {
                return Err(Error::invalid_argument(format!(
                    "cannot update {path:?}: only labels can change"
                )));
            }
        }
        blob.info.labels = labels;
        blob.info.updated_at = SystemTime::now();
        Ok(blob.info.clone())
    }

    async fn list(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<Info>> {
        let state = self.record("list", cx);
        Ok(state
            .blobs
            .values()
            .filter(|b| filter.matches(&|path: &[String]| info_field(&b.info, path)))
            .map(|b| b.info.clone())
            .collect())
    }

    async fn delete(&self, cx: &CallContext, digest: &Digest) -> Result<()> {
        let mut state = self.record("delete", cx);
        state
            .blobs
            .remove(digest)
            .map(|_| ())
            .ok_or_else(|| Error::not_found(format!("content {digest}")))
    }

    async fn read(
        &self,
        cx: &CallContext,
        digest: &Digest,
        offset: u64,
        size: Option<u64>,
    ) -> Result<ByteStream> {
        let state = self.record("read", cx);
        let blob = state
            .blobs
            .get(digest)
            .ok_or_else(|| Error::not_found(format!("content {digest}")))?;
        let len = blob.data.len() as u64;
        if offset > len {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("offset {offset} past {len}"),
            ));
        }
        let end = size.map_or(len, |s| (offset + s).min(len));
        let data = blob.data[offset as usize..end as usize].to_vec();
        let chunks: Vec<Result<Vec<u8>>> = if state.read_chunk == 0 {
            vec![Ok(data)]
        } else {
            data.chunks(state.read_chunk)
                .map(|c| Ok(c.to_vec()))
                .collect()
        };
        Ok(Box::pin(tokio_stream::iter(chunks)))
    }

    async fn status(&self, cx: &CallContext, reference: &str) -> Result<Status> {
        let state = self.record("status", cx);
        state
            .ingests
            .get(reference)
            .map(|i| status_of(reference, i))
            .ok_or_else(|| Error::not_found(format!("ingest {reference:?}")))
    }

    async fn list_statuses(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<Status>> {
        let state = self.record("list_statuses", cx);
        Ok(state
            .ingests
            .iter()
            .map(|(r, i)| status_of(r, i))
            .filter(|s| {
                filter.matches(&|path: &[String]| match path.first().map(String::as_str) {
                    Some("ref") => Some(s.reference.clone()),
                    Some("expected") => s.expected.as_ref().map(Digest::to_string),
                    _ => None,
                })
            })
            .collect())
    }

    async fn abort(&self, cx: &CallContext, reference: &str) -> Result<()> {
        let mut state = self.record("abort", cx);
        state
            .ingests
            .remove(reference)
            .map(|_| ())
            .ok_or_else(|| Error::not_found(format!("ingest {reference:?}")))
    }

    async fn writer(
        &self,
        cx: &CallContext,
        request: WriterRequest,
    ) -> Result<Box<dyn ContentWriter>> {
        let mut state = self.record("writer", cx);
        if request.reference.is_empty() {
            return Err(Error::invalid_argument("ref must not be empty"));
        }
        if let Some(expected) = &request.expected
            && state.blobs.contains_key(expected)
        {
            return Err(Error::already_exists(format!("content {expected}")));
        }
        let now = SystemTime::now();
        let ingest = state
            .ingests
            .entry(request.reference.clone())
            .or_insert_with(|| Ingest {
                data: Vec::new(),
                total: request.total,
                expected: request.expected.clone(),
                started_at: now,
                updated_at: now,
                locked: false,
            });
        if ingest.locked {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("ref {:?} is locked", request.reference),
            ));
        }
        ingest.locked = true;
        if request.total > 0 {
            ingest.total = request.total;
        }
        Ok(Box::new(MemoryWriter {
            store: self.clone(),
            reference: request.reference,
        }))
    }
}

/// A writer: bytes go straight into the shared ingest.
struct MemoryWriter {
    store: MemoryStore,
    reference: String,
}

impl MemoryWriter {
    fn with_ingest<T>(&self, f: impl FnOnce(&mut Ingest) -> T) -> T {
        let mut state = self.store.lock();
        match state.ingests.get_mut(&self.reference) {
            Some(ingest) => f(ingest),
            // An abort from elsewhere: behave as an empty ingest.
            None => f(&mut Ingest {
                data: Vec::new(),
                total: 0,
                expected: None,
                started_at: SystemTime::UNIX_EPOCH,
                updated_at: SystemTime::UNIX_EPOCH,
                locked: true,
            }),
        }
    }
}

#[async_trait::async_trait]
impl ContentWriter for MemoryWriter {
    fn status(&self) -> Status {
        self.with_ingest(|i| status_of(&self.reference, i))
    }

    fn digest(&self) -> Digest {
        self.with_ingest(|i| Digest::sha256_of(&i.data))
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.with_ingest(|i| {
            i.data.extend_from_slice(data);
            i.updated_at = SystemTime::now();
        });
        Ok(())
    }

    async fn truncate(&mut self, size: u64) -> Result<()> {
        if size != 0 {
            return Err(Error::invalid_argument("only truncate(0) is supported"));
        }
        self.with_ingest(|i| i.data.clear());
        Ok(())
    }

    async fn commit(
        self: Box<Self>,
        size: u64,
        expected: Option<Digest>,
        labels: Labels,
    ) -> Result<()> {
        let mut state = self.store.lock();
        let ingest = state
            .ingests
            .get_mut(&self.reference)
            .ok_or_else(|| Error::not_found(format!("ingest {:?}", self.reference)))?;
        // Whatever happens next, this writer is done with the ref.
        ingest.locked = false;
        let actual = Digest::sha256_of(&ingest.data);
        let len = ingest.data.len() as u64;
        if size != 0 && size != len {
            return Err(Error::failed_precondition(format!(
                "unexpected commit size {len}, expected {size}"
            )));
        }
        if let Some(expected) = &expected
            && *expected != actual
        {
            return Err(Error::failed_precondition(format!(
                "unexpected commit digest {actual}, expected {expected}"
            )));
        }
        let Some(ingest) = state.ingests.remove(&self.reference) else {
            return Err(Error::internal("ingest vanished"));
        };
        if state.blobs.contains_key(&actual) {
            return Err(Error::already_exists(format!("content {actual}")));
        }
        let now = SystemTime::now();
        state.blobs.insert(
            actual.clone(),
            Blob {
                data: ingest.data,
                info: Info {
                    digest: actual,
                    size: len,
                    created_at: now,
                    updated_at: now,
                    labels,
                },
            },
        );
        Ok(())
    }

    async fn close(self: Box<Self>) -> Result<()> {
        self.with_ingest(|i| i.locked = false);
        Ok(())
    }
}
