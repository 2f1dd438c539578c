//! The namespaced snapshotter: the metadata layer's wrapper around each snapshotter backend.
//!
//! Each namespace has its own keys: a snapshot is recorded at
//! `o\0<ns>\0snapshots/<snapshotter>\0<key>` with the backend's key (`<ns>/<sequence>/<key>`,
//! so keys never collide across namespaces), its parent (a key in the same namespace), its
//! kind, times and labels. Backends see only the labels meant for them
//! (`containerd.io/snapshot/*` and `containerd.io/snapshot.ref`). Creations under a lease join
//! it; `/snapshot/prepare|commit|remove` are published. Remove drops the record; the backend
//! snapshot goes with the next garbage collection, children before parents.

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::content::CallContext;
use crate::error::{Error, Result};
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

    async fn create(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
        kind: RecordKind,
    ) -> Result<Vec<Mount>> {
        let ns = namespace_of(cx)?;
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
        let (flushed, created) = tokio::join!(self.db.store.durable(seq), backend_create);
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
        let ns = namespace_of(cx)?;
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
        self.backend
            .commit(
                cx,
                &backend_name,
                &active.backend_key,
                backend_labels(&merged),
            )
            .await?;
        let now = SystemTime::now();
        let lease = cx.lease.clone();
        let committed = SnapshotRecord {
            backend_key: backend_name,
            parent: active.parent.clone(),
            kind: RecordKind::Committed,
            created_at: now,
            updated_at: now,
            labels: merged,
        };
        self.db
            .store
            .write(|txn| {
                if txn
                    .get_object::<SnapshotRecord>(&ns, &sn_kind, name)?
                    .is_some()
                {
                    return Err(Error::already_exists(format!("snapshot {name:?}")));
                }
                txn.remove_object(&ns, &sn_kind, key)?;
                txn.put_object(&ns, &sn_kind, name, &committed)?;
                if let Some(lease) = &lease {
                    // As containerd: the call's lease now holds the committed name instead of
                    // the active key, which no longer exists.
                    leases::detach(txn, &ns, lease, &self.resource(key))?;
                    leases::attach(txn, &ns, lease, self.resource(name))?;
                }
                Ok(())
            })
            .await?;
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

    async fn remove(&self, cx: &CallContext, key: &str) -> Result<()> {
        let ns = namespace_of(cx)?;
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
                let prefix_children = self
                    .db
                    .store
                    .list_objects::<SnapshotRecord>(&ns, &sn_kind)?;
                if prefix_children
                    .iter()
                    .any(|(_, r)| r.parent.as_deref() == Some(key))
                {
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
