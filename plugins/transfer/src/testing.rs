//! Test doubles for import and unpack: explicit, never picked by `cfg!(test)`.
//!
//! - [`RecordingDiffer`] reads the layer from the content store, decompresses it (gzip, zstd,
//!   xz or plain) and returns its digest as the diff id, without writing anything; it records
//!   every call and can be told to report a wrong diff id for a layer.
//! - [`RecordingSnapshotter`] wraps any snapshotter and records the calls unpack makes.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex, PoisonError};

use berth_core::content::{CallContext, ContentStore, Digest};
use berth_core::diff::{ApplyOptions, DiffOptions, Differ};
use berth_core::error::{Error, Result};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::snapshot::{Descriptor, Mount, SnapshotInfo, Snapshotter, Usage};
use tokio_stream::StreamExt;

/// One apply the [`RecordingDiffer`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyCall {
    /// The layer blob applied.
    pub layer: Digest,
    /// Its media type.
    pub media_type: String,
    /// The mounts it was applied to.
    pub mounts: Vec<Mount>,
}

/// A differ that computes diff ids without touching any file system.
pub struct RecordingDiffer {
    content: Arc<dyn ContentStore>,
    calls: Mutex<Vec<ApplyCall>>,
    lies: Mutex<HashMap<Digest, Digest>>,
}

impl RecordingDiffer {
    /// A differ reading layers from `content` (the namespaced store the unpack uses).
    pub fn new(content: Arc<dyn ContentStore>) -> Self {
        RecordingDiffer {
            content,
            calls: Mutex::new(Vec::new()),
            lies: Mutex::new(HashMap::new()),
        }
    }

    /// Every apply so far, in order.
    pub fn calls(&self) -> Vec<ApplyCall> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes applies of `layer` report `diff_id` (to test diff id verification).
    pub fn report_diff_id(&self, layer: Digest, diff_id: Digest) {
        self.lies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(layer, diff_id);
    }
}

/// Decompresses a whole layer by its magic number.
pub fn decompress_layer(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (_, mut reader) = berth_diff_walking::decompress(data)?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out)?;
    Ok(out)
}

#[async_trait::async_trait]
impl Differ for RecordingDiffer {
    async fn apply(
        &self,
        cx: &CallContext,
        desc: &Descriptor,
        mounts: &[Mount],
        _options: &ApplyOptions,
    ) -> Result<Descriptor> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(ApplyCall {
                layer: desc.digest.clone(),
                media_type: desc.media_type.clone(),
                mounts: mounts.to_vec(),
            });
        let mut stream = self.content.read(cx, &desc.digest, 0, None).await?;
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?);
        }
        let plain = decompress_layer(&data)
            .map_err(|e| Error::invalid_argument(format!("layer {}: {e}", desc.digest)))?;
        let lie = self
            .lies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&desc.digest)
            .cloned();
        Ok(Descriptor {
            media_type: crate::media::OCI_LAYER.to_owned(),
            digest: lie.unwrap_or_else(|| Digest::sha256_of(&plain)),
            size: plain.len() as u64,
            annotations: Default::default(),
        })
    }

    async fn compare(
        &self,
        _cx: &CallContext,
        _lower: &[Mount],
        _upper: &[Mount],
        _options: &DiffOptions,
    ) -> Result<Descriptor> {
        Err(Error::not_implemented("the recording differ cannot diff"))
    }
}

/// A snapshotter call the [`RecordingSnapshotter`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotCall {
    /// `stat(key)`.
    Stat(String),
    /// `prepare(key, parent, labels)`.
    Prepare {
        /// The key.
        key: String,
        /// The parent.
        parent: Option<String>,
        /// The labels.
        labels: Labels,
    },
    /// `commit(name, key)`.
    Commit {
        /// The committed name.
        name: String,
        /// The active key.
        key: String,
    },
    /// `remove(key)`.
    Remove(String),
    /// Any other call, by name.
    Other(&'static str),
}

/// Wraps a snapshotter and records calls.
pub struct RecordingSnapshotter {
    inner: Arc<dyn Snapshotter>,
    calls: Mutex<Vec<SnapshotCall>>,
}

impl RecordingSnapshotter {
    /// Records calls to `inner`.
    pub fn new(inner: Arc<dyn Snapshotter>) -> Self {
        RecordingSnapshotter {
            inner,
            calls: Mutex::new(Vec::new()),
        }
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<SnapshotCall> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, call: SnapshotCall) {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(call);
    }
}

#[async_trait::async_trait]
impl Snapshotter for RecordingSnapshotter {
    async fn stat(&self, cx: &CallContext, key: &str) -> Result<SnapshotInfo> {
        self.record(SnapshotCall::Stat(key.to_owned()));
        self.inner.stat(cx, key).await
    }

    async fn update(
        &self,
        cx: &CallContext,
        info: SnapshotInfo,
        fieldpaths: &[String],
    ) -> Result<SnapshotInfo> {
        self.record(SnapshotCall::Other("update"));
        self.inner.update(cx, info, fieldpaths).await
    }

    async fn usage(&self, cx: &CallContext, key: &str) -> Result<Usage> {
        self.record(SnapshotCall::Other("usage"));
        self.inner.usage(cx, key).await
    }

    async fn mounts(&self, cx: &CallContext, key: &str) -> Result<Vec<Mount>> {
        self.record(SnapshotCall::Other("mounts"));
        self.inner.mounts(cx, key).await
    }

    async fn prepare(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        self.record(SnapshotCall::Prepare {
            key: key.to_owned(),
            parent: parent.map(str::to_owned),
            labels: labels.clone(),
        });
        self.inner.prepare(cx, key, parent, labels).await
    }

    async fn view(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        self.record(SnapshotCall::Other("view"));
        self.inner.view(cx, key, parent, labels).await
    }

    async fn commit(&self, cx: &CallContext, name: &str, key: &str, labels: Labels) -> Result<()> {
        self.record(SnapshotCall::Commit {
            name: name.to_owned(),
            key: key.to_owned(),
        });
        self.inner.commit(cx, name, key, labels).await
    }

    async fn remove(&self, cx: &CallContext, key: &str) -> Result<()> {
        self.record(SnapshotCall::Remove(key.to_owned()));
        self.inner.remove(cx, key).await
    }

    async fn list(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<SnapshotInfo>> {
        self.record(SnapshotCall::Other("list"));
        self.inner.list(cx, filter).await
    }

    async fn cleanup(&self, cx: &CallContext) -> Result<()> {
        self.record(SnapshotCall::Other("cleanup"));
        self.inner.cleanup(cx).await
    }
}
