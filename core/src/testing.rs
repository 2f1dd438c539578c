//! Test doubles for the core's plugin kinds: explicit, never picked by `cfg!(test)` in
//! production code.
//!
//! [`MemoryContentStore`] keeps blobs (with labels) and ingests in memory and follows the
//! content contract: one writer per ref (a second gets Unavailable), the ingest kept on close,
//! size and digest verified at commit (FailedPrecondition), AlreadyExists for a blob that is
//! there, OutOfRange for a read past the end. It records the [`CallContext`] of every call so
//! adapter tests can see what reached the store, and can be told to keep a dropped writer's
//! ref locked, so a test notices an adapter that forgets to close or commit one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use crate::content::{
    ByteStream, CallContext, ContentStore, ContentWriter, Digest, Info, Status, WriterRequest,
};
use crate::error::{Classify, Error, ErrorKind, Result};
use crate::filters::Filter;
use crate::labels::Labels;

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
    /// Whether dropping a writer without close or commit leaves its ref locked.
    keep_dropped_locked: bool,
}

/// The in-memory store; clones share their state.
#[derive(Clone, Default)]
pub struct MemoryContentStore {
    state: Arc<Mutex<State>>,
}

impl MemoryContentStore {
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

    /// Leaves the ref of a writer dropped without `close` or `commit` locked, as a store
    /// whose client vanished would until it notices; adapter tests use this to catch a
    /// forgotten release. By default a drop releases the ref.
    pub fn keep_dropped_writers_locked(&self) {
        self.lock().keep_dropped_locked = true;
    }

    /// Digests of every stored blob (for tests that look behind the metadata layer).
    pub fn digests(&self) -> Vec<Digest> {
        self.lock().blobs.keys().cloned().collect()
    }

    /// References of every ingest.
    pub fn ingest_refs(&self) -> Vec<String> {
        self.lock().ingests.keys().cloned().collect()
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
impl ContentStore for MemoryContentStore {
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
            open: true,
        }))
    }
}

/// A writer: bytes go straight into the shared ingest.
struct MemoryWriter {
    store: MemoryContentStore,
    reference: String,
    /// Still holds the ref (neither closed nor committed).
    open: bool,
}

impl Drop for MemoryWriter {
    fn drop(&mut self) {
        if self.open && !self.store.lock().keep_dropped_locked {
            self.with_ingest(|i| i.locked = false);
        }
    }
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
        mut self: Box<Self>,
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
        self.open = false;
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

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.open = false;
        self.with_ingest(|i| i.locked = false);
        Ok(())
    }
}

/// An in-memory snapshotter: keeps snapshot records only, and hands out `bind` mounts of
/// made-up paths. Enough to test the metadata layer's bookkeeping and GC.
#[derive(Clone, Default)]
pub struct MemorySnapshotter {
    snapshots: Arc<Mutex<BTreeMap<String, crate::snapshot::SnapshotInfo>>>,
}

impl MemorySnapshotter {
    /// An empty snapshotter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys of every snapshot the backend holds.
    pub fn keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, crate::snapshot::SnapshotInfo>> {
        self.snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn create(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
        kind: crate::snapshot::SnapshotKind,
    ) -> Result<Vec<crate::snapshot::Mount>> {
        let mut all = self.lock();
        if all.contains_key(key) {
            return Err(Error::already_exists(format!("snapshot {key:?}")));
        }
        if let Some(p) = parent {
            match all.get(p) {
                Some(i) if i.kind == crate::snapshot::SnapshotKind::Committed => {}
                Some(_) => {
                    return Err(Error::invalid_argument(format!(
                        "parent {p:?} is not committed"
                    )));
                }
                None => return Err(Error::not_found(format!("parent {p:?}"))),
            }
        }
        let now = SystemTime::now();
        all.insert(
            key.to_owned(),
            crate::snapshot::SnapshotInfo {
                name: key.to_owned(),
                parent: parent.map(str::to_owned),
                kind,
                created_at: now,
                updated_at: now,
                labels,
            },
        );
        Ok(vec![crate::snapshot::Mount {
            kind: "bind".into(),
            source: format!("/memory/{key}"),
            target: String::new(),
            options: vec!["rbind".into(), "rw".into()],
        }])
    }
}

#[async_trait::async_trait]
impl crate::snapshot::Snapshotter for MemorySnapshotter {
    async fn stat(&self, _cx: &CallContext, key: &str) -> Result<crate::snapshot::SnapshotInfo> {
        self.lock()
            .get(key)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("snapshot {key:?}")))
    }

    async fn update(
        &self,
        cx: &CallContext,
        info: crate::snapshot::SnapshotInfo,
        _fieldpaths: &[String],
    ) -> Result<crate::snapshot::SnapshotInfo> {
        if let Some(s) = self.lock().get_mut(&info.name) {
            s.labels = info.labels;
        }
        self.stat(cx, &info.name).await
    }

    async fn usage(&self, cx: &CallContext, key: &str) -> Result<crate::snapshot::Usage> {
        self.stat(cx, key)
            .await
            .map(|_| crate::snapshot::Usage::default())
    }

    async fn mounts(&self, cx: &CallContext, key: &str) -> Result<Vec<crate::snapshot::Mount>> {
        self.stat(cx, key).await?;
        Ok(vec![crate::snapshot::Mount {
            kind: "bind".into(),
            source: format!("/memory/{key}"),
            target: String::new(),
            options: vec!["rbind".into()],
        }])
    }

    async fn prepare(
        &self,
        _cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<crate::snapshot::Mount>> {
        self.create(key, parent, labels, crate::snapshot::SnapshotKind::Active)
    }

    async fn view(
        &self,
        _cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<crate::snapshot::Mount>> {
        self.create(key, parent, labels, crate::snapshot::SnapshotKind::View)
    }

    async fn commit(&self, _cx: &CallContext, name: &str, key: &str, labels: Labels) -> Result<()> {
        let mut all = self.lock();
        if all.contains_key(name) {
            return Err(Error::already_exists(format!("snapshot {name:?}")));
        }
        let mut info = all
            .remove(key)
            .ok_or_else(|| Error::not_found(format!("snapshot {key:?}")))?;
        info.name = name.to_owned();
        info.kind = crate::snapshot::SnapshotKind::Committed;
        info.labels.extend(labels);
        all.insert(name.to_owned(), info);
        Ok(())
    }

    async fn remove(&self, _cx: &CallContext, key: &str) -> Result<()> {
        let mut all = self.lock();
        if all.values().any(|i| i.parent.as_deref() == Some(key)) {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} has children"
            )));
        }
        all.remove(key)
            .map(|_| ())
            .ok_or_else(|| Error::not_found(format!("snapshot {key:?}")))
    }

    async fn list(
        &self,
        _cx: &CallContext,
        _filter: &Filter,
    ) -> Result<Vec<crate::snapshot::SnapshotInfo>> {
        Ok(self.lock().values().cloned().collect())
    }
}

/// `open()`'s answer once sled's file lock is free: a database this process dropped a moment
/// ago lets go of the lock shortly after (its log threads finish), so a test that reopens one
/// retries while the answer is Unavailable, for up to 2 s. Any other answer is returned as it
/// is. A restarted daemon is a new process and never waits.
pub fn open_when_unlocked<T>(open: impl Fn() -> Result<T>) -> Result<T> {
    let mut opened = open();
    for _ in 0..40 {
        match &opened {
            Err(e) if e.kind() == ErrorKind::Unavailable => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                opened = open();
            }
            _ => break,
        }
    }
    opened
}
