//! The namespaced snapshotter: the metadata layer's wrapper around each snapshotter backend.
//!
//! Each namespace has its own keys: a snapshot is recorded at
//! `o\0<ns>\0snapshots/<snapshotter>\0<key>` with the backend's key (`<ns>/<sequence>/<key>`,
//! so keys never collide across namespaces), its parent (a key in the same namespace), its
//! kind, times and labels. Backends see only the labels meant for them
//! (`containerd.io/snapshot/*` and `containerd.io/snapshot.ref`). Creations under a lease join
//! it; `/snapshot/prepare|commit|remove` are published. Remove drops the record; the backend
//! snapshot goes with the next garbage collection, children before parents.
//!
//! Prepare and Commit write the record first (in memory) and then call the backend. A
//! compiled-in snapshotter that keeps its records in the core's database (see
//! [`crate::metadata::SharedDb`]) flushes that database before its call returns, which makes
//! the record durable too: one flush per call, and the record never reaches the disk after
//! the backend's (the redo log replays a prefix of its records, and the record is earlier
//! in it). For any other backend (a proxy, with a database of its own) the record's flush
//! and the backend's call run at the same time rather than one after the other, so a crash
//! can also keep the backend's change without the record (a backend snapshot no record
//! names, swept by the next collection). In both cases a crash can keep the record without the backend's
//! change: a record without its backend snapshot is found missing on use and collected, and
//! Commit records an intent with the committed record, so that a crash which kept the record
//! but not the backend's commit is finished (or undone) by
//! [`Metadata::recover_snapshot_commits`] at the next start.

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::content::CallContext;
use crate::error::{Classify, Error, ErrorKind, Result};
use crate::filters::Filter;
use crate::labels::{self, Labels};
use crate::metadata::ObjectKind;
use crate::metadata::content::apply_label_paths;
use crate::metadata::db::{Metadata, Mutation, namespace_of};
use crate::metadata::leases::{self, Resource};
use crate::snapshot::{Mount, SnapshotInfo, SnapshotKind, Snapshotter, Usage};

/// A namespace's record of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub(crate) backend_key: String,
    #[serde(default)]
    pub(crate) parent: Option<String>,
    pub(crate) kind: RecordKind,
    pub(crate) created_at: SystemTime,
    pub(crate) updated_at: SystemTime,
    #[serde(default)]
    pub(crate) labels: Labels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RecordKind {
    View,
    Active,
    Committed,
}

impl From<RecordKind> for SnapshotKind {
    fn from(k: RecordKind) -> Self {
        match k {
            RecordKind::View => SnapshotKind::View,
            RecordKind::Active => SnapshotKind::Active,
            RecordKind::Committed => SnapshotKind::Committed,
        }
    }
}

/// Labels a backend gets to see.
fn backend_labels(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| {
            k.starts_with("containerd.io/snapshot/") || *k == "containerd.io/snapshot.ref"
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The namespaced view of one snapshotter.
#[derive(Clone)]
pub(crate) struct MetaSnapshotter {
    db: Arc<Metadata>,
    name: String,
    backend: Arc<dyn Snapshotter>,
}

impl MetaSnapshotter {
    pub(crate) fn new(db: Arc<Metadata>, name: String, backend: Arc<dyn Snapshotter>) -> Self {
        MetaSnapshotter { db, name, backend }
    }

    /// The lease resource naming snapshot `key` of this snapshotter.
    fn resource(&self, key: &str) -> Resource {
        Resource {
            kind: format!("snapshots/{}", self.name),
            id: key.to_owned(),
        }
    }

    /// Whether the backend keeps its records in the core's database and flushes it before
    /// its Prepare, View and Commit return (see [`crate::metadata::SharedDb`]).
    fn co_flushed(&self) -> bool {
        self.db.store.shared.is_co_flushed_snapshotter(&self.name)
    }

    fn kind(&self) -> ObjectKind {
        ObjectKind::Snapshots(self.name.clone())
    }

    fn record(&self, ns: &crate::namespace::Namespace, key: &str) -> Result<SnapshotRecord> {
        self.db
            .store
            .get_object(ns, &self.kind(), key)?
            .ok_or_else(|| Error::not_found(format!("snapshot {key:?} does not exist")))
    }

    fn info(key: &str, record: SnapshotRecord) -> SnapshotInfo {
        SnapshotInfo {
            name: key.to_owned(),
            parent: record.parent,
            kind: record.kind.into(),
            created_at: record.created_at,
            updated_at: record.updated_at,
            labels: record.labels,
        }
    }

    fn publish_event<M: prost::Name>(&self, ns: &str, topic: &str, event: &M) {
        self.db.publish(ns, topic, event);
    }

    /// Prepare or View, run whole ([`super::run_whole`]).
    async fn create(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
        kind: RecordKind,
    ) -> Result<Vec<Mount>> {
        let (this, cx, key) = (self.clone(), cx.clone(), key.to_owned());
        let parent = parent.map(str::to_owned);
        super::run_whole(async move {
            this.create_whole(&cx, &key, parent.as_deref(), labels, kind)
                .await
        })
        .await
    }

    /// [`MetaSnapshotter::create`]'s work.
    async fn create_whole(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
        kind: RecordKind,
    ) -> Result<Vec<Mount>> {
        let ns = namespace_of(cx)?;
        // Held for the whole creation: a failed one undoes its record and leaves the backend
        // snapshot to the next collection, which must then walk this snapshotter.
        let _dirty = self.db.snapshotter_touched(&self.name);
        if key.is_empty() {
            return Err(Error::invalid_argument("snapshot key must not be empty"));
        }
        labels::validate_all(&labels)?;
        let parent_backend = match parent.filter(|p| !p.is_empty()) {
            None => None,
            Some(p) => {
                let record = self.record(&ns, p).map_err(|_| {
                    Error::not_found(format!("parent snapshot {p:?} does not exist"))
                })?;
                if record.kind != RecordKind::Committed {
                    return Err(Error::invalid_argument(format!(
                        "parent snapshot {p:?} is not committed"
                    )));
                }
                Some(record.backend_key)
            }
        };
        let sequence = self.db.store.next_id()?;
        let backend_key = format!("{ns}/{sequence}/{key}");
        let now = SystemTime::now();
        let record = SnapshotRecord {
            backend_key: backend_key.clone(),
            parent: parent.filter(|p| !p.is_empty()).map(str::to_owned),
            kind,
            created_at: now,
            updated_at: now,
            labels: labels.clone(),
        };
        let lease = cx.lease.clone();
        let sn_kind = self.kind();
        // Hold GC off from the backend create until the record exists.
        let _gc = self.db.gc_lock.read().await;
        let ((), seq) = self.db.store.write_unflushed(|txn| {
            if txn
                .get_object::<SnapshotRecord>(&ns, &sn_kind, key)?
                .is_some()
            {
                return Err(Error::already_exists(format!("snapshot {key:?}")));
            }
            if let Some(lease) = &lease {
                leases::attach(txn, &ns, lease, self.resource(key))?;
            }
            txn.put_object(&ns, &sn_kind, key, &record)
        })?;
        // The record's flush and the backend's create (directories, its own flush) run at the
        // same time; the reply waits for both. Whichever reaches the disk alone before a crash
        // leaves what a crash between two sequential steps could leave too: a record without
        // a backend snapshot (found missing on use, collected with its lease) or a backend
        // snapshot without a record (swept by the next collection).
        let backend_create = async {
            match kind {
                RecordKind::View => {
                    self.backend
                        .view(
                            cx,
                            &backend_key,
                            parent_backend.as_deref(),
                            backend_labels(&labels),
                        )
                        .await
                }
                _ => {
                    self.backend
                        .prepare(
                            cx,
                            &backend_key,
                            parent_backend.as_deref(),
                            backend_labels(&labels),
                        )
                        .await
                }
            }
        };
        let (flushed, created) = if self.co_flushed() {
            // The backend's flush covers the record written above: one flush for both.
            let created = backend_create.await;
            let flushed = match &created {
                Ok(_) => self.db.store.durable(seq).await,
                // The undo below writes and flushes anyway.
                Err(_) => Ok(()),
            };
            (flushed, created)
        } else {
            tokio::join!(self.db.store.durable(seq), backend_create)
        };
        let mounts = match created.and_then(|m| flushed.map(|()| m)) {
            Ok(m) => m,
            Err(e) => {
                // Undo the record; a leftover backend snapshot is collected later.
                let _ = self
                    .db
                    .store
                    .write(|txn| txn.remove_object(&ns, &sn_kind, key))
                    .await;
                return Err(e);
            }
        };
        drop(_gc);
        self.db.mutated(Mutation::Change);
        self.publish_event(
            ns.as_str(),
            "/snapshot/prepare",
            &berth_proto::containerd::events::SnapshotPrepare {
                key: key.to_owned(),
                parent: parent.unwrap_or_default().to_owned(),
                snapshotter: self.name.clone(),
            },
        );
        Ok(mounts)
    }

    /// [`Snapshotter::commit`]'s work, which that method runs through [`super::run_whole`].
    async fn commit_whole(
        &self,
        cx: &CallContext,
        name: &str,
        key: &str,
        labels: Labels,
    ) -> Result<()> {
        let ns = namespace_of(cx)?;
        // Held for the whole commit, as for a creation (an undone commit leaves its backend
        // snapshot to the next collection).
        let _dirty = self.db.snapshotter_touched(&self.name);
        if name.is_empty() {
            return Err(Error::invalid_argument(
                "committed snapshot name must not be empty",
            ));
        }
        labels::validate_all(&labels)?;
        let active = self.record(&ns, key)?;
        if active.kind != RecordKind::Active {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is a {} snapshot: only active snapshots can be committed",
                SnapshotKind::from(active.kind)
            )));
        }
        let sn_kind = self.kind();
        if self
            .db
            .store
            .get_object::<SnapshotRecord>(&ns, &sn_kind, name)?
            .is_some()
        {
            return Err(Error::already_exists(format!("snapshot {name:?}")));
        }
        let sequence = self.db.store.next_id()?;
        let backend_name = format!("{ns}/{sequence}/{name}");
        // As containerd: the committed snapshot has the labels given to Commit, not the
        // active snapshot's.
        let merged = labels;
        let _gc = self.db.gc_lock.read().await;
        let now = SystemTime::now();
        let lease = cx.lease.clone();
        let committed = SnapshotRecord {
            backend_key: backend_name.clone(),
            parent: active.parent.clone(),
            kind: RecordKind::Committed,
            created_at: now,
            updated_at: now,
            labels: merged.clone(),
        };
        let intent = CommitIntent {
            namespace: ns.as_str().to_owned(),
            key: key.to_owned(),
            name: name.to_owned(),
            active: active.clone(),
            lease: lease.clone(),
        };
        let intent_key = intent_key(&self.name, &backend_name);
        // The record and the backend commit reach the disk at the same time, each with its
        // own flush, instead of one after the other. The record goes first in memory, with an
        // intent naming the active snapshot, so a crash that keeps the record but loses the
        // backend's commit is finished (or undone) by `recover_snapshot_commits` on the next
        // start, before any collection could sweep the still-active backend snapshot.
        let ((), seq) = self.db.store.write_unflushed(|txn| {
            if txn
                .get_object::<SnapshotRecord>(&ns, &sn_kind, name)?
                .is_some()
            {
                return Err(Error::already_exists(format!("snapshot {name:?}")));
            }
            match txn.get_object::<SnapshotRecord>(&ns, &sn_kind, key)? {
                Some(r) if r.backend_key == active.backend_key && r.kind == RecordKind::Active => {}
                _ => {
                    return Err(Error::not_found(format!(
                        "snapshot {key:?} does not exist (removed or committed meanwhile)"
                    )));
                }
            }
            txn.remove_object(&ns, &sn_kind, key)?;
            txn.put_object(&ns, &sn_kind, name, &committed)?;
            if let Some(lease) = &lease {
                // As containerd: the call's lease now holds the committed name instead of
                // the active key, which no longer exists.
                leases::detach(txn, &ns, lease, &self.resource(key))?;
                leases::attach(txn, &ns, lease, self.resource(name))?;
            }
            txn.put(intent_key.clone(), encode_intent(&intent)?);
            Ok(())
        })?;
        let backend_commit = self.backend.commit(
            cx,
            &backend_name,
            &active.backend_key,
            backend_labels(&merged),
        );
        let (flushed, backend_result) = if self.co_flushed() {
            // The backend's flush covers the record and intent written above.
            let committed = backend_commit.await;
            let flushed = match &committed {
                Ok(()) => self.db.store.durable(seq).await,
                Err(_) => Ok(()),
            };
            (flushed, committed)
        } else {
            tokio::join!(self.db.store.durable(seq), backend_commit)
        };
        if let Err(e) = backend_result {
            // Nothing was committed: the active record comes back.
            if let Err(undo) = self
                .db
                .store
                .write(|txn| undo_commit(txn, &intent, &backend_name, &intent_key, &sn_kind))
                .await
            {
                tracing::warn!(snapshotter = %self.name, %key, error = %undo, "cannot restore the active record after a failed commit");
            }
            return Err(e);
        }
        flushed?;
        // Both sides are durable: the intent has nothing left to recover. Its removal rides
        // on the next write (no batch and no flush of its own); if a crash loses it, recovery
        // finds the commit complete and drops it then.
        self.db.store.remove_with_next_write(intent_key);
        drop(_gc);
        self.db.mutated(Mutation::Change);
        self.publish_event(
            ns.as_str(),
            "/snapshot/commit",
            &berth_proto::containerd::events::SnapshotCommit {
                key: key.to_owned(),
                name: name.to_owned(),
                snapshotter: self.name.clone(),
            },
        );
        Ok(())
    }

    /// [`Snapshotter::remove`]'s work, which that method runs through [`super::run_whole`].
    async fn remove_whole(&self, cx: &CallContext, key: &str) -> Result<()> {
        let ns = namespace_of(cx)?;
        let _dirty = self.db.snapshotter_touched(&self.name);
        let sn_kind = self.kind();
        let lease = cx.lease.clone();
        self.db
            .store
            .write(|txn| {
                if txn
                    .get_object::<SnapshotRecord>(&ns, &sn_kind, key)?
                    .is_none()
                {
                    return Err(Error::not_found(format!("snapshot {key:?} does not exist")));
                }
                if txn.has_snapshot_children(&ns, &self.name, key)? {
                    return Err(Error::failed_precondition(format!(
                        "cannot remove snapshot {key:?}: it has children"
                    )));
                }
                if let Some(lease) = &lease {
                    // As containerd: a removal under a lease also drops the lease's reference,
                    // so a later snapshot with the same key does not inherit it.
                    leases::detach(txn, &ns, lease, &self.resource(key))?;
                }
                txn.remove_object(&ns, &sn_kind, key)
            })
            .await?;
        self.db.mutated(Mutation::Deletion);
        self.publish_event(
            ns.as_str(),
            "/snapshot/remove",
            &berth_proto::containerd::events::SnapshotRemove {
                key: key.to_owned(),
                snapshotter: self.name.clone(),
            },
        );
        Ok(())
    }
}

#[async_trait::async_trait]
impl Snapshotter for MetaSnapshotter {
    async fn stat(&self, cx: &CallContext, key: &str) -> Result<SnapshotInfo> {
        let ns = namespace_of(cx)?;
        Ok(Self::info(key, self.record(&ns, key)?))
    }

    async fn update(
        &self,
        cx: &CallContext,
        info: SnapshotInfo,
        fieldpaths: &[String],
    ) -> Result<SnapshotInfo> {
        let ns = namespace_of(cx)?;
        let key = info.name.clone();
        let object = format!("snapshot {key:?}");
        let sn_kind = self.kind();
        let record = self
            .db
            .store
            .write(|txn| {
                let mut record: SnapshotRecord = txn
                    .get_object(&ns, &sn_kind, &key)?
                    .ok_or_else(|| Error::not_found(format!("snapshot {key:?} does not exist")))?;
                apply_label_paths(&mut record.labels, &info.labels, fieldpaths, &object)?;
                record.updated_at = SystemTime::now();
                txn.put_object(&ns, &sn_kind, &key, &record)?;
                Ok(record)
            })
            .await?;
        let backend_info = SnapshotInfo {
            name: record.backend_key.clone(),
            labels: backend_labels(&record.labels),
            ..Self::info(&key, record.clone())
        };
        // Backends keep only their own labels; one that keeps none may refuse.
        if let Err(e) = self
            .backend
            .update(cx, backend_info, &["labels".to_owned()])
            .await
        {
            tracing::debug!(snapshotter = %self.name, %key, error = %e, "backend label update refused");
        }
        self.db.mutated(Mutation::Change);
        Ok(Self::info(&key, record))
    }

    async fn usage(&self, cx: &CallContext, key: &str) -> Result<Usage> {
        let ns = namespace_of(cx)?;
        let record = self.record(&ns, key)?;
        self.backend.usage(cx, &record.backend_key).await
    }

    async fn mounts(&self, cx: &CallContext, key: &str) -> Result<Vec<Mount>> {
        let ns = namespace_of(cx)?;
        let record = self.record(&ns, key)?;
        self.backend.mounts(cx, &record.backend_key).await
    }

    async fn prepare(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        self.create(cx, key, parent, labels, RecordKind::Active)
            .await
    }

    async fn view(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        self.create(cx, key, parent, labels, RecordKind::View).await
    }

    async fn commit(&self, cx: &CallContext, name: &str, key: &str, labels: Labels) -> Result<()> {
        let (this, cx, name, key) = (self.clone(), cx.clone(), name.to_owned(), key.to_owned());
        super::run_whole(async move { this.commit_whole(&cx, &name, &key, labels).await }).await
    }

    async fn remove(&self, cx: &CallContext, key: &str) -> Result<()> {
        let (this, cx, key) = (self.clone(), cx.clone(), key.to_owned());
        super::run_whole(async move { this.remove_whole(&cx, &key).await }).await
    }

    async fn list(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<SnapshotInfo>> {
        let ns = namespace_of(cx)?;
        Ok(self
            .db
            .store
            .list_objects::<SnapshotRecord>(&ns, &self.kind())?
            .into_iter()
            .map(|(key, record)| Self::info(&key, record))
            .filter(|info| {
                filter.matches(&|path: &[String]| match path.first().map(String::as_str) {
                    Some("name") => Some(info.name.clone()),
                    Some("parent") => info.parent.clone(),
                    Some("kind") => Some(info.kind.name().to_owned()),
                    Some("labels") => info.labels.get(&path[1..].join(".")).cloned(),
                    _ => None,
                })
            })
            .collect())
    }

    async fn cleanup(&self, cx: &CallContext) -> Result<()> {
        self.backend.cleanup(cx).await
    }
}

/// Prefix of commit intents: `j\0<snapshotter>\0<backend name>`.
const INTENT_PREFIX: &[u8] = b"j\0";

fn intent_key(snapshotter: &str, backend_name: &str) -> Vec<u8> {
    [
        INTENT_PREFIX,
        &crate::metadata::escape_id(snapshotter),
        b"\0",
        &crate::metadata::escape_id(backend_name),
    ]
    .concat()
}

/// A commit whose namespace record may be on disk before the backend's commit: what
/// recovery needs to finish it or to put the active snapshot back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CommitIntent {
    namespace: String,
    key: String,
    name: String,
    /// The active snapshot's record as it was before the commit.
    active: SnapshotRecord,
    /// The lease of the commit call, which held the active key.
    #[serde(default)]
    lease: Option<String>,
}

fn encode_intent(intent: &CommitIntent) -> Result<Vec<u8>> {
    serde_json::to_vec(intent).map_err(|e| Error::internal(format!("encode commit intent: {e}")))
}

/// Puts the active record of `intent` back in place of the committed one (if the committed
/// record is still the one the intent made) and drops the intent.
fn undo_commit(
    txn: &mut crate::metadata::WriteTxn<'_>,
    intent: &CommitIntent,
    backend_name: &str,
    intent_key: &[u8],
    sn_kind: &ObjectKind,
) -> Result<()> {
    let ns = crate::namespace::Namespace::parse(&intent.namespace)?;
    let ours = txn
        .get_object::<SnapshotRecord>(&ns, sn_kind, &intent.name)?
        .is_some_and(|r| r.backend_key == backend_name);
    if ours {
        txn.remove_object(&ns, sn_kind, &intent.name)?;
        if txn
            .get_object::<SnapshotRecord>(&ns, sn_kind, &intent.key)?
            .is_none()
        {
            txn.put_object(&ns, sn_kind, &intent.key, &intent.active)?;
        }
        if let Some(lease) = &intent.lease {
            let kind = sn_kind.encode();
            leases::detach(
                txn,
                &ns,
                lease,
                &Resource {
                    kind: kind.clone(),
                    id: intent.name.clone(),
                },
            )?;
            // A lease deleted meanwhile holds nothing any more.
            let _ = leases::attach(
                txn,
                &ns,
                lease,
                Resource {
                    kind,
                    id: intent.key.clone(),
                },
            );
        }
    }
    txn.remove(intent_key.to_vec());
    Ok(())
}

impl Metadata {
    /// Backend keys of active snapshots that a pending commit intent still needs: a
    /// collection must not sweep them before recovery has finished the commit.
    pub(crate) fn snapshot_intent_keys(&self, snapshotter: &str) -> Result<Vec<String>> {
        let prefix = [
            INTENT_PREFIX,
            &crate::metadata::escape_id(snapshotter),
            b"\0",
        ]
        .concat();
        let mut out = Vec::new();
        for item in self.store.tree.scan_prefix(&prefix) {
            let (_, value) = item?;
            if let Ok(intent) = serde_json::from_slice::<CommitIntent>(&value) {
                out.push(intent.active.backend_key);
            }
        }
        Ok(out)
    }

    /// Finishes or undoes the snapshot commits a crash interrupted (see `commit`): where the
    /// namespace record is committed but the backend still has the active snapshot, the
    /// backend commit is done again; where that fails, the active record comes back. Run at
    /// start, before any collection. Returns how many intents were settled.
    pub async fn recover_snapshot_commits(&self) -> Result<usize> {
        let mut settled = 0;
        let pending: Vec<(Vec<u8>, Vec<u8>)> = self
            .store
            .tree
            .scan_prefix(INTENT_PREFIX)
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<std::result::Result<_, _>>()?;
        for (key, value) in pending {
            let mut parts = key[INTENT_PREFIX.len()..].splitn(2, |&b| b == 0);
            let snapshotter = crate::metadata::unescape_id(parts.next().unwrap_or_default());
            let backend_name = crate::metadata::unescape_id(parts.next().unwrap_or_default());
            let Some(backend) = self.snapshot_backends.get(&snapshotter) else {
                tracing::warn!(%snapshotter, %backend_name, "a commit intent names a snapshotter that is not loaded: kept for a later start");
                continue;
            };
            let sn_kind = ObjectKind::Snapshots(snapshotter.clone());
            let intent: CommitIntent = match serde_json::from_slice(&value) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(%snapshotter, %backend_name, error = %e, "dropping an unreadable commit intent");
                    self.store
                        .write(|txn| {
                            txn.remove(key.clone());
                            Ok(())
                        })
                        .await?;
                    continue;
                }
            };
            let cx = CallContext::default();
            let finished = match backend.stat(&cx, &backend_name).await {
                Ok(_) => true,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    let labels = self
                        .store
                        .get_object::<SnapshotRecord>(
                            &crate::namespace::Namespace::parse(&intent.namespace)?,
                            &sn_kind,
                            &intent.name,
                        )?
                        .filter(|r| r.backend_key == backend_name)
                        .map(|r| backend_labels(&r.labels));
                    match labels {
                        // The committed record is gone (undone or removed): nothing to finish.
                        None => false,
                        Some(labels) => match backend
                            .commit(&cx, &backend_name, &intent.active.backend_key, labels)
                            .await
                        {
                            Ok(()) => {
                                tracing::info!(%snapshotter, name = %intent.name, "finished a snapshot commit interrupted by a crash");
                                true
                            }
                            Err(e) => {
                                tracing::warn!(%snapshotter, name = %intent.name, key = %intent.key, error = %e, "cannot finish a snapshot commit interrupted by a crash: the active snapshot comes back");
                                false
                            }
                        },
                    }
                }
                Err(e) => return Err(e),
            };
            self.store
                .write(|txn| {
                    if finished {
                        txn.remove(key.clone());
                        Ok(())
                    } else {
                        undo_commit(txn, &intent, &backend_name, &key, &sn_kind)
                    }
                })
                .await?;
            settled += 1;
        }
        Ok(settled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Exchange;
    use crate::metadata::{MetaStore, MetadataConfig};
    use crate::testing::MemorySnapshotter;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A backend whose commits wait while `stall` is set, until `release` is notified:
    /// dropping the metadata layer's commit there leaves the state a crash between the
    /// record and the backend's commit leaves.
    struct Stalling {
        inner: MemorySnapshotter,
        stall: AtomicBool,
        release: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl Snapshotter for Stalling {
        async fn stat(&self, cx: &CallContext, key: &str) -> Result<SnapshotInfo> {
            self.inner.stat(cx, key).await
        }
        async fn update(
            &self,
            cx: &CallContext,
            info: SnapshotInfo,
            fieldpaths: &[String],
        ) -> Result<SnapshotInfo> {
            self.inner.update(cx, info, fieldpaths).await
        }
        async fn usage(&self, cx: &CallContext, key: &str) -> Result<Usage> {
            self.inner.usage(cx, key).await
        }
        async fn mounts(&self, cx: &CallContext, key: &str) -> Result<Vec<Mount>> {
            self.inner.mounts(cx, key).await
        }
        async fn prepare(
            &self,
            cx: &CallContext,
            key: &str,
            parent: Option<&str>,
            labels: Labels,
        ) -> Result<Vec<Mount>> {
            self.inner.prepare(cx, key, parent, labels).await
        }
        async fn view(
            &self,
            cx: &CallContext,
            key: &str,
            parent: Option<&str>,
            labels: Labels,
        ) -> Result<Vec<Mount>> {
            self.inner.view(cx, key, parent, labels).await
        }
        async fn commit(
            &self,
            cx: &CallContext,
            name: &str,
            key: &str,
            labels: Labels,
        ) -> Result<()> {
            if self.stall.load(Ordering::SeqCst) {
                self.release.notified().await;
            }
            self.inner.commit(cx, name, key, labels).await
        }
        async fn remove(&self, cx: &CallContext, key: &str) -> Result<()> {
            self.inner.remove(cx, key).await
        }
        async fn list(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<SnapshotInfo>> {
            self.inner.list(cx, filter).await
        }
    }

    fn setup() -> (tempfile::TempDir, Arc<Metadata>, Arc<Stalling>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            MetaStore::open(&dir.path().join("meta"), &MetadataConfig::default()).expect("open");
        let backend = Arc::new(Stalling {
            inner: MemorySnapshotter::new(),
            stall: AtomicBool::new(false),
            release: tokio::sync::Notify::new(),
        });
        let metadata = Metadata::with_snapshotters(
            Arc::new(store),
            Arc::new(Exchange::default()),
            None,
            [(
                "mem".to_owned(),
                Arc::clone(&backend) as Arc<dyn Snapshotter>,
            )]
            .into(),
            MetadataConfig::default(),
        );
        (dir, metadata, backend)
    }

    fn cx() -> CallContext {
        CallContext {
            namespace: Some(crate::namespace::Namespace::parse("a").expect("namespace")),
            ..CallContext::default()
        }
    }

    /// A context under lease `l` (so a collection keeps what the test creates).
    async fn leased(metadata: &Metadata) -> CallContext {
        metadata
            .create_lease(
                &crate::namespace::Namespace::parse("a").expect("namespace"),
                "l",
                Labels::new(),
            )
            .await
            .expect("lease");
        CallContext {
            lease: Some("l".to_owned()),
            ..cx()
        }
    }

    async fn backend_kinds(backend: &Stalling) -> Vec<SnapshotKind> {
        backend
            .list(&CallContext::default(), &Filter::default())
            .await
            .expect("list")
            .into_iter()
            .map(|i| i.kind)
            .collect()
    }

    /// The metadata layer's commit stopped while the backend commits (stalled meanwhile), as
    /// a crash stops it (not through `Snapshotter::commit`, which finishes in a task of its
    /// own).
    async fn crash_during_commit(
        metadata: &Arc<Metadata>,
        backend: &Arc<Stalling>,
        cx: &CallContext,
        name: &str,
        key: &str,
    ) -> std::result::Result<Result<()>, tokio::time::error::Elapsed> {
        let sn = MetaSnapshotter::new(
            Arc::clone(metadata),
            "mem".to_owned(),
            Arc::clone(backend) as Arc<dyn Snapshotter>,
        );
        backend.stall.store(true, Ordering::SeqCst);
        let cut = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            sn.commit_whole(cx, name, key, Labels::new()),
        )
        .await;
        backend.stall.store(false, Ordering::SeqCst);
        cut
    }

    #[tokio::test]
    async fn a_commit_whose_caller_goes_away_still_finishes() {
        let (_dir, metadata, backend) = setup();
        let sn = metadata.snapshotter("mem").expect("snapshotter");
        let a = leased(&metadata).await;
        sn.prepare(&a, "k", None, Labels::new())
            .await
            .expect("prepare");
        backend.stall.store(true, Ordering::SeqCst);
        let gone = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            sn.commit(&a, "base", "k", Labels::new()),
        )
        .await;
        assert!(
            gone.is_err(),
            "the commit was meant to wait for the backend"
        );
        backend.stall.store(false, Ordering::SeqCst);
        backend.release.notify_waiters();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while backend_kinds(&backend).await != [SnapshotKind::Committed] {
            assert!(
                std::time::Instant::now() < deadline,
                "the backend's commit did not finish after its caller went away: {:?}",
                backend_kinds(&backend).await
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // Without a restart (no recovery): the commit is whole and usable.
        sn.prepare(&a, "child", Some("base"), Labels::new())
            .await
            .expect("a child of the finished commit");
        assert_eq!(
            metadata.recover_snapshot_commits().await.expect("recover"),
            0,
            "nothing was left for recovery"
        );
    }

    #[tokio::test]
    async fn a_commit_cut_off_after_its_record_is_finished_by_recovery() {
        let (_dir, metadata, backend) = setup();
        let sn = metadata.snapshotter("mem").expect("snapshotter");
        let a = leased(&metadata).await;
        sn.prepare(&a, "k", None, Labels::new())
            .await
            .expect("prepare");
        let cut = crash_during_commit(&metadata, &backend, &a, "base", "k").await;
        assert!(cut.is_err(), "the commit was meant to stall");
        // The record says committed; the backend still has the active snapshot, and a
        // collection before recovery must not take it.
        assert_eq!(
            sn.stat(&a, "base").await.expect("stat").kind,
            SnapshotKind::Committed
        );
        metadata.collect_garbage().await.expect("gc");
        assert_eq!(backend_kinds(&backend).await, [SnapshotKind::Active]);

        assert_eq!(
            metadata.recover_snapshot_commits().await.expect("recover"),
            1
        );
        assert_eq!(backend_kinds(&backend).await, [SnapshotKind::Committed]);
        sn.prepare(&a, "child", Some("base"), Labels::new())
            .await
            .expect("a child of the recovered commit");
        assert_eq!(
            metadata.recover_snapshot_commits().await.expect("again"),
            0,
            "the intent is gone"
        );
    }

    #[tokio::test]
    async fn a_commit_recovery_cannot_finish_brings_the_active_record_back() {
        let (_dir, metadata, backend) = setup();
        let sn = metadata.snapshotter("mem").expect("snapshotter");
        let a = cx();
        sn.prepare(&a, "k", None, Labels::new())
            .await
            .expect("prepare");
        let _ = crash_during_commit(&metadata, &backend, &a, "base", "k").await;
        // The backend lost the active snapshot as well: nothing can be committed.
        let active = backend
            .list(&CallContext::default(), &Filter::default())
            .await
            .expect("list");
        backend
            .remove(&CallContext::default(), &active[0].name)
            .await
            .expect("lose it");
        assert_eq!(
            metadata.recover_snapshot_commits().await.expect("recover"),
            1
        );
        assert_eq!(
            sn.stat(&a, "base").await.expect_err("undone").kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            sn.stat(&a, "k").await.expect("back").kind,
            SnapshotKind::Active
        );
    }

    #[tokio::test]
    async fn a_commit_the_backend_refuses_keeps_the_active_snapshot_and_its_lease() {
        let (_dir, metadata, backend) = setup();
        let sn = metadata.snapshotter("mem").expect("snapshotter");
        let a = leased(&metadata).await;
        sn.prepare(&a, "k", None, Labels::new())
            .await
            .expect("prepare");
        let active = backend
            .list(&CallContext::default(), &Filter::default())
            .await
            .expect("list");
        backend
            .remove(&CallContext::default(), &active[0].name)
            .await
            .expect("lose it");
        let err = sn
            .commit(&a, "base", "k", Labels::new())
            .await
            .expect_err("nothing to commit");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(
            sn.stat(&a, "k").await.expect("kept").kind,
            SnapshotKind::Active
        );
        assert_eq!(
            sn.stat(&a, "base").await.expect_err("not made").kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            metadata.recover_snapshot_commits().await.expect("recover"),
            0
        );
        let held: Vec<String> = metadata
            .list_lease_resources(
                &crate::namespace::Namespace::parse("a").expect("namespace"),
                "l",
            )
            .expect("resources")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(held, ["k"]);
    }
}
