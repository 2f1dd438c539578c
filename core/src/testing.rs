//! Test doubles for the core's plugin kinds: explicit, never picked by `cfg!(test)` in
//! production code.
//!
//! [`MemoryContentStore`] keeps blobs and ingests in memory and follows the content contract
//! (one writer per ref, verification at commit, AlreadyExists), so the metadata layer and the
//! gRPC adapters can be tested without a file system.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use crate::content::{
    Algorithm, ByteStream, CallContext, ContentStore, ContentWriter, Digest, Digester, Info,
    Status, WriterRequest,
};
use crate::error::{Error, ErrorKind, Result};
use crate::filters::Filter;
use crate::labels::Labels;

#[derive(Default)]
struct State {
    blobs: BTreeMap<Digest, (Vec<u8>, SystemTime)>,
    ingests: BTreeMap<String, Ingest>,
}

struct Ingest {
    data: Vec<u8>,
    total: u64,
    expected: Option<Digest>,
    started_at: SystemTime,
    updated_at: SystemTime,
    locked: bool,
}

/// An in-memory content store.
#[derive(Clone, Default)]
pub struct MemoryContentStore {
    state: Arc<Mutex<State>>,
}

impl MemoryContentStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Digests of every stored blob (for tests that look behind the metadata layer).
    pub fn digests(&self) -> Vec<Digest> {
        self.lock().blobs.keys().cloned().collect()
    }

    /// References of every ingest.
    pub fn ingest_refs(&self) -> Vec<String> {
        self.lock().ingests.keys().cloned().collect()
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

#[async_trait::async_trait]
impl ContentStore for MemoryContentStore {
    async fn info(&self, _cx: &CallContext, digest: &Digest) -> Result<Info> {
        let state = self.lock();
        let (data, at) = state
            .blobs
            .get(digest)
            .ok_or_else(|| Error::not_found(format!("content digest {digest}")))?;
        Ok(Info {
            digest: digest.clone(),
            size: data.len() as u64,
            created_at: *at,
            updated_at: *at,
            labels: Labels::new(),
        })
    }

    async fn update(&self, cx: &CallContext, info: Info, _fieldpaths: &[String]) -> Result<Info> {
        self.info(cx, &info.digest).await
    }

    async fn list(&self, _cx: &CallContext, filter: &Filter) -> Result<Vec<Info>> {
        let state = self.lock();
        Ok(state
            .blobs
            .iter()
            .map(|(digest, (data, at))| Info {
                digest: digest.clone(),
                size: data.len() as u64,
                created_at: *at,
                updated_at: *at,
                labels: Labels::new(),
            })
            .filter(|info| {
                filter.matches(&|path: &[String]| match path.first().map(String::as_str) {
                    Some("digest") => Some(info.digest.to_string()),
                    Some("size") => Some(info.size.to_string()),
                    _ => None,
                })
            })
            .collect())
    }

    async fn delete(&self, _cx: &CallContext, digest: &Digest) -> Result<()> {
        self.lock()
            .blobs
            .remove(digest)
            .map(|_| ())
            .ok_or_else(|| Error::not_found(format!("content digest {digest}")))
    }

    async fn read(
        &self,
        _cx: &CallContext,
        digest: &Digest,
        offset: u64,
        size: Option<u64>,
    ) -> Result<ByteStream> {
        let data = {
            let state = self.lock();
            let (data, _) = state
                .blobs
                .get(digest)
                .ok_or_else(|| Error::not_found(format!("content digest {digest}")))?;
            let len = data.len() as u64;
            if offset > len {
                return Err(Error::new(
                    ErrorKind::OutOfRange,
                    format!("offset {offset} is past the end of {digest} ({len} bytes)"),
                ));
            }
            let end = size.map_or(len, |s| (offset + s).min(len));
            data[offset as usize..end as usize].to_vec()
        };
        Ok(Box::pin(tokio_stream::iter(
            data.chunks(64 * 1024)
                .map(|c| Ok(c.to_vec()))
                .collect::<Vec<_>>(),
        )))
    }

    async fn status(&self, _cx: &CallContext, reference: &str) -> Result<Status> {
        let state = self.lock();
        state
            .ingests
            .get(reference)
            .map(|i| status_of(reference, i))
            .ok_or_else(|| Error::not_found(format!("reference {reference:?}")))
    }

    async fn list_statuses(&self, _cx: &CallContext, filter: &Filter) -> Result<Vec<Status>> {
        let state = self.lock();
        Ok(state
            .ingests
            .iter()
            .map(|(r, i)| status_of(r, i))
            .filter(|s| {
                filter.matches(&|path: &[String]| match path.first().map(String::as_str) {
                    Some("ref") => Some(s.reference.clone()),
                    _ => None,
                })
            })
            .collect())
    }

    async fn abort(&self, _cx: &CallContext, reference: &str) -> Result<()> {
        self.lock()
            .ingests
            .remove(reference)
            .map(|_| ())
            .ok_or_else(|| Error::not_found(format!("reference {reference:?}")))
    }

    async fn writer(
        &self,
        _cx: &CallContext,
        request: WriterRequest,
    ) -> Result<Box<dyn ContentWriter>> {
        let mut state = self.lock();
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
                format!("ref {:?} locked", request.reference),
            ));
        }
        ingest.locked = true;
        let mut digester = Digester::new(Algorithm::Sha256);
        digester.update(&ingest.data);
        Ok(Box::new(MemoryWriter {
            store: self.clone(),
            reference: request.reference,
            digester,
            open: true,
        }))
    }
}

struct MemoryWriter {
    store: MemoryContentStore,
    reference: String,
    digester: Digester,
    open: bool,
}

impl MemoryWriter {
    fn with_ingest<T>(&self, f: impl FnOnce(&mut Ingest) -> T) -> Result<T> {
        let mut state = self.store.lock();
        let ingest = state
            .ingests
            .get_mut(&self.reference)
            .ok_or_else(|| Error::not_found(format!("reference {:?}", self.reference)))?;
        Ok(f(ingest))
    }

    fn release(&mut self) {
        if self.open {
            self.open = false;
            let _ = self.with_ingest(|i| i.locked = false);
        }
    }
}

impl Drop for MemoryWriter {
    fn drop(&mut self) {
        self.release();
    }
}

#[async_trait::async_trait]
impl ContentWriter for MemoryWriter {
    fn status(&self) -> Status {
        let state = self.store.lock();
        match state.ingests.get(&self.reference) {
            Some(i) => status_of(&self.reference, i),
            None => Status {
                reference: self.reference.clone(),
                offset: 0,
                total: 0,
                expected: None,
                started_at: SystemTime::now(),
                updated_at: SystemTime::now(),
            },
        }
    }

    fn digest(&self) -> Digest {
        self.digester.digest()
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.digester.update(data);
        self.with_ingest(|i| {
            i.data.extend_from_slice(data);
            i.updated_at = SystemTime::now();
        })
    }

    async fn truncate(&mut self, size: u64) -> Result<()> {
        if size != 0 {
            return Err(Error::invalid_argument("truncate only supports 0"));
        }
        self.digester = Digester::new(Algorithm::Sha256);
        self.with_ingest(|i| i.data.clear())
    }

    async fn commit(
        mut self: Box<Self>,
        size: u64,
        expected: Option<Digest>,
        _labels: Labels,
    ) -> Result<()> {
        let digest = self.digester.digest();
        let mut state = self.store.lock();
        let ingest = state
            .ingests
            .get(&self.reference)
            .ok_or_else(|| Error::not_found(format!("reference {:?}", self.reference)))?;
        let len = ingest.data.len() as u64;
        if size != 0 && size != len {
            return Err(Error::failed_precondition(format!(
                "unexpected commit size {len}, expected {size}"
            )));
        }
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(Error::failed_precondition(format!(
                "unexpected commit digest {digest}, expected {expected}"
            )));
        }
        let ingest = state
            .ingests
            .remove(&self.reference)
            .ok_or_else(|| Error::internal("ingest vanished"))?;
        self.open = false;
        if state.blobs.contains_key(&digest) {
            return Err(Error::already_exists(format!("content {digest}")));
        }
        state.blobs.insert(digest, (ingest.data, SystemTime::now()));
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.release();
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
