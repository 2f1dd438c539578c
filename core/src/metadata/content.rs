//! The namespaced content store: the metadata layer's wrapper around the content backend.
//!
//! Blobs are stored once in the backend and recorded per namespace at
//! `o\0<ns>\0content\0<digest>` (size, labels, times). A namespace sees only blobs it has a
//! record of. Ingests are recorded at `o\0<ns>\0ingests\0<ref>` with the backend's reference
//! (`<ns>/<sequence>/<ref>`, so the same ref in two namespaces never collides), the expected
//! digest when the blob already exists elsewhere (shared content), and an expiry of 24 hours
//! when no lease holds them. Creations under a lease join it. `/content/create` is published
//! when a namespace gains a blob, `/content/delete` when it drops one; removing bytes from the
//! backend is the garbage collector's job.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::content::{
    ByteStream, CallContext, ContentStore, ContentWriter, Digest, Info, Status, WriterRequest,
};
use crate::error::{Classify, Error, ErrorKind, Result};
use crate::filters::Filter;
use crate::labels::{self, Labels};
use crate::metadata::ObjectKind;
use crate::metadata::db::{DirtyMark, Metadata, Mutation, namespace_of};
use crate::metadata::leases::{self, Resource};
use crate::namespace::Namespace;

/// How long an ingest no lease holds survives without being committed (as containerd).
pub const INGEST_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);

/// A namespace's record of a blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ContentRecord {
    pub(crate) size: u64,
    pub(crate) created_at: SystemTime,
    pub(crate) updated_at: SystemTime,
    #[serde(default)]
    pub(crate) labels: Labels,
}

/// A namespace's record of an ingest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IngestRecord {
    /// The backend's reference for this ingest.
    pub(crate) backend_ref: String,
    /// The digest the client expects, if it named one.
    #[serde(default)]
    pub(crate) expected: Option<Digest>,
    /// The expected blob already exists in the backend for another namespace (shared
    /// content): the ingest needs no bytes, and the blob must be kept alive for it.
    #[serde(default)]
    pub(crate) shared: bool,
    #[serde(default)]
    pub(crate) size: u64,
    pub(crate) started_at: SystemTime,
    #[serde(default)]
    pub(crate) expires_at: Option<SystemTime>,
}

/// The namespaced content store.
pub(crate) struct MetaContent {
    db: Arc<Metadata>,
}

impl MetaContent {
    pub(crate) fn new(db: Arc<Metadata>) -> Self {
        MetaContent { db }
    }

    fn backend(&self) -> &Arc<dyn ContentStore> {
        // Only built by Metadata::content, which checks the backend exists.
        self.db
            .content_backend
            .as_ref()
            .unwrap_or_else(|| unreachable!("MetaContent without a content backend"))
    }

    fn record(&self, ns: &Namespace, digest: &Digest) -> Result<ContentRecord> {
        self.db
            .store
            .get_object(ns, &ObjectKind::Content, &digest.to_string())?
            .ok_or_else(|| Error::not_found(format!("content digest {digest}")))
    }

    fn ingest(&self, ns: &Namespace, reference: &str) -> Result<IngestRecord> {
        self.db
            .store
            .get_object(ns, &ObjectKind::Ingests, reference)?
            .ok_or_else(|| Error::not_found(format!("reference {reference:?}")))
    }

    async fn status_of(
        &self,
        cx: &CallContext,
        reference: &str,
        record: &IngestRecord,
    ) -> Result<Status> {
        if record.shared {
            return Ok(shared_status(reference, record));
        }
        match self.backend().status(cx, &record.backend_ref).await {
            Ok(mut status) => {
                status.reference = reference.to_owned();
                status.expected = record.expected.clone();
                Ok(status)
            }
            // Recorded but no byte written yet (or lost in a crash before the first write).
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Status {
                reference: reference.to_owned(),
                offset: 0,
                total: record.size,
                expected: record.expected.clone(),
                started_at: record.started_at,
                updated_at: record.started_at,
            }),
            Err(e) => Err(e),
        }
    }
}

fn shared_status(reference: &str, record: &IngestRecord) -> Status {
    Status {
        reference: reference.to_owned(),
        offset: record.size,
        total: record.size,
        expected: record.expected.clone(),
        started_at: record.started_at,
        updated_at: record.started_at,
    }
}

fn info_of(digest: Digest, record: ContentRecord) -> Info {
    Info {
        digest,
        size: record.size,
        created_at: record.created_at,
        updated_at: record.updated_at,
        labels: record.labels,
    }
}

/// Fields a content filter can name.
pub(crate) fn info_field(info: &Info, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str)? {
        "digest" => Some(info.digest.to_string()),
        "size" => Some(info.size.to_string()),
        "labels" => info.labels.get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

/// Applies an update's field paths to `labels` (containerd: `labels` replaces all,
/// `labels.<key>` sets or removes one key, no paths replaces all).
pub(crate) fn apply_label_paths(
    labels: &mut Labels,
    requested: &Labels,
    paths: &[String],
    object: &str,
) -> Result<()> {
    if paths.is_empty() {
        *labels = requested.clone();
        return Ok(());
    }
    for path in paths {
        if path == "labels" {
            *labels = requested.clone();
        } else if let Some(key) = path.strip_prefix("labels.") {
            match requested.get(key) {
                Some(v) if !v.is_empty() => {
                    labels.insert(key.to_owned(), v.clone());
                }
                _ => {
                    labels.remove(key);
                }
            }
        } else {
            return Err(Error::invalid_argument(format!(
                "cannot update {path:?} field on {object}: only labels can change"
            )));
        }
    }
    labels::validate_all(labels)
}

#[async_trait::async_trait]
impl ContentStore for MetaContent {
    async fn info(&self, cx: &CallContext, digest: &Digest) -> Result<Info> {
        let ns = namespace_of(cx)?;
        Ok(info_of(digest.clone(), self.record(&ns, digest)?))
    }

    async fn update(&self, cx: &CallContext, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let ns = namespace_of(cx)?;
        let id = info.digest.to_string();
        let object = format!("content {id}");
        let record = self
            .db
            .store
            .write_then(
                |txn| {
                    let mut record: ContentRecord = txn
                        .get_object(&ns, &ObjectKind::Content, &id)?
                        .ok_or_else(|| Error::not_found(format!("content digest {id}")))?;
                    apply_label_paths(&mut record.labels, &info.labels, fieldpaths, &object)?;
                    record.updated_at = SystemTime::now();
                    txn.put_object(&ns, &ObjectKind::Content, &id, &record)?;
                    Ok(record)
                },
                |_| {
                    // A dropped gc.ref label can leave garbage behind.
                    self.db.mutated(Mutation::Change);
                },
            )
            .await?;
        Ok(info_of(info.digest, record))
    }

    async fn list(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<Info>> {
        let ns = namespace_of(cx)?;
        let mut out = Vec::new();
        for (id, record) in self
            .db
            .store
            .list_objects::<ContentRecord>(&ns, &ObjectKind::Content)?
        {
            let info = info_of(Digest::parse(&id)?, record);
            if filter.matches(&|path: &[String]| info_field(&info, path)) {
                out.push(info);
            }
        }
        Ok(out)
    }

    async fn delete(&self, cx: &CallContext, digest: &Digest) -> Result<()> {
        let ns = namespace_of(cx)?;
        let _dirty = self.db.content_touched();
        let id = digest.to_string();
        self.db
            .store
            .write_then(
                |txn| {
                    if txn
                        .get_object::<ContentRecord>(&ns, &ObjectKind::Content, &id)?
                        .is_none()
                    {
                        return Err(Error::not_found(format!("content digest {id}")));
                    }
                    txn.remove_object(&ns, &ObjectKind::Content, &id)
                },
                |()| {
                    self.db.mutated(Mutation::Deletion);
                    self.db.publish(
                        ns.as_str(),
                        "/content/delete",
                        &berth_proto::containerd::events::ContentDelete { digest: id.clone() },
                    );
                },
            )
            .await?;
        Ok(())
    }

    async fn read(
        &self,
        cx: &CallContext,
        digest: &Digest,
        offset: u64,
        size: Option<u64>,
    ) -> Result<ByteStream> {
        let ns = namespace_of(cx)?;
        self.record(&ns, digest)?;
        self.backend().read(cx, digest, offset, size).await
    }

    async fn status(&self, cx: &CallContext, reference: &str) -> Result<Status> {
        let ns = namespace_of(cx)?;
        let record = self.ingest(&ns, reference)?;
        self.status_of(cx, reference, &record).await
    }

    async fn list_statuses(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<Status>> {
        let ns = namespace_of(cx)?;
        let mut out = Vec::new();
        for (reference, record) in self
            .db
            .store
            .list_objects::<IngestRecord>(&ns, &ObjectKind::Ingests)?
        {
            let status = self.status_of(cx, &reference, &record).await?;
            let matches =
                filter.matches(&|path: &[String]| match path.first().map(String::as_str) {
                    Some("ref") => Some(status.reference.clone()),
                    Some("expected") => status.expected.as_ref().map(Digest::to_string),
                    _ => None,
                });
            if matches {
                out.push(status);
            }
        }
        Ok(out)
    }

    async fn abort(&self, cx: &CallContext, reference: &str) -> Result<()> {
        let ns = namespace_of(cx)?;
        let _dirty = self.db.content_touched();
        let _gc = self.db.gc_lock.read().await;
        let record = self
            .db
            .store
            .write(|txn| {
                let record: IngestRecord = txn
                    .get_object(&ns, &ObjectKind::Ingests, reference)?
                    .ok_or_else(|| Error::not_found(format!("reference {reference:?}")))?;
                txn.remove_object(&ns, &ObjectKind::Ingests, reference)?;
                Ok(record)
            })
            .await?;
        if !record.shared {
            match self.backend().abort(cx, &record.backend_ref).await {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.db.mutated(Mutation::Deletion);
        Ok(())
    }

    async fn writer(
        &self,
        cx: &CallContext,
        request: WriterRequest,
    ) -> Result<Box<dyn ContentWriter>> {
        let ns = namespace_of(cx)?;
        if request.reference.is_empty() {
            return Err(Error::invalid_argument("ref must not be empty"));
        }
        let dirty = self.db.content_touched();
        let _gc = self.db.gc_lock.read().await;
        // Shared content: the blob is in the backend for another namespace already.
        let mut in_backend = false;
        let mut shared_size = None;
        if let Some(expected) = &request.expected
            && self
                .db
                .store
                .get_object::<ContentRecord>(&ns, &ObjectKind::Content, &expected.to_string())?
                .is_none()
            && let Ok(info) = self.backend().info(cx, expected).await
        {
            in_backend = true;
            if self.db.config.content_sharing_policy != "isolated"
                && (request.total == 0 || request.total == info.size)
            {
                shared_size = Some(info.size);
            }
        }
        let sequence = self.db.store.next_id()?;
        let lease = cx.lease.clone();
        let (record, exists) = self
            .db
            .store
            .write(|txn| {
                if let Some(expected) = &request.expected {
                    let id = expected.to_string();
                    if txn
                        .get_object::<ContentRecord>(&ns, &ObjectKind::Content, &id)?
                        .is_some()
                    {
                        // Keep it leased so a concurrent removal elsewhere cannot free it
                        // while the caller goes on to use it.
                        if let Some(lease) = &lease {
                            leases::attach(
                                txn,
                                &ns,
                                lease,
                                Resource {
                                    kind: "content".into(),
                                    id,
                                },
                            )?;
                        }
                        return Ok((None, true));
                    }
                }
                let existing: Option<IngestRecord> =
                    txn.get_object(&ns, &ObjectKind::Ingests, &request.reference)?;
                let mut record = existing.unwrap_or_else(|| IngestRecord {
                    backend_ref: format!("{ns}/{sequence}/{}", request.reference),
                    expected: None,
                    shared: false,
                    size: request.total,
                    started_at: SystemTime::now(),
                    expires_at: None,
                });
                match &lease {
                    Some(lease) => {
                        leases::attach(
                            txn,
                            &ns,
                            lease,
                            Resource {
                                kind: "ingests".into(),
                                id: request.reference.clone(),
                            },
                        )?;
                        record.expires_at = None;
                    }
                    None => record.expires_at = Some(SystemTime::now() + INGEST_EXPIRY),
                }
                if request.expected.is_some() {
                    record.expected = request.expected.clone();
                }
                if let Some(size) = shared_size {
                    record.shared = true;
                    record.size = size;
                }
                txn.put_object(&ns, &ObjectKind::Ingests, &request.reference, &record)?;
                Ok((Some(record), false))
            })
            .await?;
        if exists {
            return Err(Error::already_exists(format!(
                "content {}",
                request.expected.map(|d| d.to_string()).unwrap_or_default()
            )));
        }
        let record = record.unwrap_or_else(|| unreachable!("an ingest record when not exists"));
        let inner = if record.shared {
            None
        } else {
            Some(
                self.backend()
                    .writer(
                        cx,
                        WriterRequest {
                            reference: record.backend_ref.clone(),
                            total: request.total,
                            // Gives the backend the digest algorithm to hash with; withheld
                            // when the backend has the blob, so that it does not answer
                            // AlreadyExists for bytes this namespace has not proven it has.
                            expected: if in_backend {
                                None
                            } else {
                                request.expected.clone()
                            },
                        },
                    )
                    .await?,
            )
        };
        Ok(Box::new(MetaWriter {
            dirty,
            db: Arc::clone(&self.db),
            cx: cx.clone(),
            ns,
            reference: request.reference,
            record,
            inner,
        }))
    }
}

struct MetaWriter {
    /// Held until the writer commits or goes: its backend ingest and blob may outlive a
    /// failure without a record.
    dirty: DirtyMark,
    db: Arc<Metadata>,
    cx: CallContext,
    ns: Namespace,
    reference: String,
    record: IngestRecord,
    /// None for shared content until the caller writes bytes anyway.
    inner: Option<Box<dyn ContentWriter>>,
}

impl MetaWriter {
    /// Gives a shared ingest a backend writer of its own. With `copy`, the existing blob is
    /// copied in first, so the offset the client was told (the blob's size) stays true.
    async fn unshare(&mut self, copy: bool) -> Result<&mut Box<dyn ContentWriter>> {
        if self.inner.is_none() {
            let backend = self
                .db
                .content_backend
                .clone()
                .ok_or_else(|| Error::internal("content backend vanished"))?;
            let mut writer = backend
                .writer(
                    &self.cx,
                    WriterRequest {
                        reference: self.record.backend_ref.clone(),
                        total: 0,
                        expected: None,
                    },
                )
                .await?;
            if copy && let Some(shared) = self.record.expected.clone() {
                writer.truncate(0).await?;
                let mut stream = backend.read(&self.cx, &shared, 0, None).await?;
                while let Some(chunk) = tokio_stream::StreamExt::next(&mut stream).await {
                    writer.write(&chunk?).await?;
                }
            }
            self.record.shared = false;
            self.inner = Some(writer);
        }
        self.inner
            .as_mut()
            .ok_or_else(|| Error::internal("content writer vanished"))
    }
}

#[async_trait::async_trait]
impl ContentWriter for MetaWriter {
    fn status(&self) -> Status {
        match &self.inner {
            Some(w) => {
                let mut status = w.status();
                status.reference = self.reference.clone();
                status.expected = self.record.expected.clone();
                status
            }
            None => shared_status(&self.reference, &self.record),
        }
    }

    fn digest(&self) -> Digest {
        match (&self.inner, &self.record.expected) {
            (Some(w), _) => w.digest(),
            // A shared ingest "has" the whole expected blob.
            (None, Some(expected)) => expected.clone(),
            (None, None) => Digest::sha256_of(b""),
        }
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() && self.inner.is_none() {
            return Ok(());
        }
        self.unshare(true).await?.write(data).await
    }

    async fn truncate(&mut self, size: u64) -> Result<()> {
        if size != 0 {
            return Err(Error::invalid_argument(format!(
                "cannot truncate {:?} to {size}: only 0 (start over) is supported",
                self.reference
            )));
        }
        self.unshare(false).await?.truncate(0).await
    }

    async fn commit(
        self: Box<Self>,
        size: u64,
        expected: Option<Digest>,
        labels: Labels,
    ) -> Result<()> {
        let MetaWriter {
            dirty,
            db,
            ns,
            reference,
            record,
            inner,
            cx,
        } = *self;
        // Dropped when the commit returns, whatever it left.
        let _dirty = dirty;
        labels::validate_all(&labels)?;
        let _gc = db.gc_lock.read().await;
        let (digest, size) = match inner {
            None => {
                let shared = record
                    .expected
                    .clone()
                    .ok_or_else(|| Error::internal("shared ingest without a digest"))?;
                if size != 0 && size != record.size {
                    return Err(Error::failed_precondition(format!(
                        "{reference:?} failed size validation: {} != {size}",
                        record.size
                    )));
                }
                if expected.as_ref().is_some_and(|e| *e != shared) {
                    return Err(Error::failed_precondition(format!(
                        "{reference:?} unexpected digest"
                    )));
                }
                (shared, record.size)
            }
            Some(writer) => {
                let status = writer.status();
                if size != 0 && size != status.offset {
                    return Err(Error::failed_precondition(format!(
                        "{reference:?} failed size validation: {} != {size}",
                        status.offset
                    )));
                }
                // The backend verified `expected` (hashing again if it names another
                // algorithm), so the blob is stored under it.
                let digest = expected.clone().unwrap_or_else(|| writer.digest());
                match writer.commit(status.offset, expected, Labels::new()).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                (digest, status.offset)
            }
        };
        let id = digest.to_string();
        let lease = cx.lease.clone();
        let created = db
            .store
            .write_then(
                |txn| {
                    let exists = txn
                        .get_object::<ContentRecord>(&ns, &ObjectKind::Content, &id)?
                        .is_some();
                    if !exists {
                        let now = SystemTime::now();
                        txn.put_object(
                            &ns,
                            &ObjectKind::Content,
                            &id,
                            &ContentRecord {
                                size,
                                created_at: now,
                                updated_at: now,
                                labels,
                            },
                        )?;
                    }
                    txn.remove_object(&ns, &ObjectKind::Ingests, &reference)?;
                    if let Some(lease) = &lease {
                        leases::detach(
                            txn,
                            &ns,
                            lease,
                            &Resource {
                                kind: "ingests".into(),
                                id: reference.clone(),
                            },
                        )?;
                        leases::attach(
                            txn,
                            &ns,
                            lease,
                            Resource {
                                kind: "content".into(),
                                id: id.clone(),
                            },
                        )?;
                    }
                    Ok(!exists)
                },
                |created| {
                    db.mutated(Mutation::Change);
                    if *created {
                        db.publish(
                            ns.as_str(),
                            "/content/create",
                            &berth_proto::containerd::events::ContentCreate {
                                digest: id.clone(),
                                size: size as i64,
                                media_type: String::new(),
                            },
                        );
                    }
                },
            )
            .await?;
        drop(_gc);
        if !created {
            return Err(Error::already_exists(format!("content {id}")));
        }
        Ok(())
    }

    async fn close(self: Box<Self>) -> Result<()> {
        match self.inner {
            Some(w) => w.close().await,
            None => Ok(()),
        }
    }
}
