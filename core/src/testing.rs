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
