//! Namespaced metadata records in sled, with one writer at a time and group-committed flushes.
//!
//! # Layout
//!
//! Everything lives in one sled tree, `berth.v1`, so a write that touches several records is
//! atomic (through the tree's write journal, see [`journal`]). Keys are byte strings of
//! NUL-separated parts (no part may contain NUL):
//!
//! ```text
//! m \0 schema                          -> u32 big-endian: the schema version
//! n \0 <namespace>                     -> NamespaceRecord (JSON): labels
//! o \0 <namespace> \0 <kind> \0 <id>   -> the object's record (JSON), kind one of
//!                                         images, containers, content, snapshots/<snapshotter>,
//!                                         sandboxes, leases, ingests
//! l \0 <namespace> \0 <lease> \0 <type> \0 <id>
//!                                      -> empty: the lease holds that resource (see
//!                                         `leases.rs`)
//! c \0 <namespace> \0 <snapshotter> \0 <parent> \0 <child>
//!                                      -> empty: a snapshot record names that parent, kept
//!                                         by `WriteTxn::put_object` / `remove_object`
//! j \0 <snapshotter> \0 <backend name> -> a snapshot commit whose backend half may be
//!                                         missing after a crash (see `snapshots.rs`)
//! w \0 journal                         -> a write of several keys until they are all
//!                                         written (see [`journal`])
//! ```
//!
//! Namespaces exist implicitly: creating an object creates its namespace record. A namespace
//! can only be deleted once no `o\0<namespace>\0` key is left.
//!
//! # Writes and durability
//!
//! Writes run one at a time under a short lock (never held across an await) and are applied
//! atomically through the tree's write journal ([`journal`]; sled batches write out log
//! buffers of their own at once, each synced), then appended to the database's redo log
//! ([`redo`]): an in-memory sled write and a write to the page cache, and once the log is
//! full a checkpoint (a durable sled flush) first. The caller's reply waits for a flush that
//! covers its write, an `fdatasync` of the redo log; concurrent writers share one flush
//! (group commit), so durability does not cost one fsync per call. sled writes its own log in
//! the background; opening the database replays the redo log. With `no_sync` there is no redo
//! log and no wait.
//!
//! The database is the core's [`SharedDb`]: compiled-in plugins (the `native` and `overlayfs`
//! snapshotters) keep their own records in trees of it, and their flushes count for the
//! group commit too, so a snapshot call whose backend flushed after the metadata record was
//! written waits for no second flush (see `snapshots.rs`).
//!
//! # Schema versions
//!
//! [`SCHEMA_VERSION`] is stored under `m\0schema`. Opening runs the ordered [`MIGRATIONS`]
//! from the stored version, each in one atomic write, and refuses a store written by a newer berth.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

mod content;
mod db;
pub mod gc;
pub mod images;
pub mod journal;
pub mod leases;
pub mod redo;
pub mod scheduler;
mod snapshots;
#[cfg(test)]
mod tests_layer;

pub use content::INGEST_EXPIRY;
pub use db::{GcTrigger, Metadata, Mutation, MutationHook};

use crate::error::{Error, Result};
use crate::labels::{self, Labels};
use crate::namespace::Namespace;
use crate::registry::{PluginKind, PluginType};
use redo::RedoLog;

/// The schema version this berth writes.
pub const SCHEMA_VERSION: u32 = 3;

const TREE: &str = "berth.v1";
const SCHEMA_KEY: &[u8] = b"m\0schema";

/// A schema migration: brings a store from `to - 1` to `to` in one batch.
pub struct Migration {
    /// The version the store has after this migration.
    pub to: u32,
    /// What it changes, for the log.
    pub name: &'static str,
    /// The change itself.
    pub apply: fn(&mut WriteTxn<'_>) -> Result<()>,
}

/// Every migration, in order; the last one's `to` is [`SCHEMA_VERSION`].
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        to: 1,
        name: "initial layout: namespaces and namespaced objects in one tree",
        // A fresh store has nothing to convert; the version record alone marks the layout.
        apply: |_txn| Ok(()),
    },
    Migration {
        to: 2,
        name: "lease resources in records of their own",
        apply: leases::migrate_resources_out_of_records,
    },
    Migration {
        to: 3,
        name: "an index of snapshot children",
        apply: index_snapshot_children,
    },
];

/// The kinds of namespaced object records.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectKind {
    /// Image records.
    Images,
    /// Container records.
    Containers,
    /// Content blob records.
    Content,
    /// Snapshot records of one snapshotter.
    Snapshots(String),
    /// Sandbox records.
    Sandboxes,
    /// Leases.
    Leases,
    /// Content ingests in progress.
    Ingests,
}

impl ObjectKind {
    /// The kind's name in keys and lease resources (`content`, `snapshots/<name>`, ...).
    pub fn encode(&self) -> String {
        match self {
            ObjectKind::Images => "images".into(),
            ObjectKind::Containers => "containers".into(),
            ObjectKind::Content => "content".into(),
            ObjectKind::Snapshots(sn) => format!("snapshots/{sn}"),
            ObjectKind::Sandboxes => "sandboxes".into(),
            ObjectKind::Leases => "leases".into(),
            ObjectKind::Ingests => "ingests".into(),
        }
    }
}

fn check_part(part: &str, what: &str) -> Result<()> {
    if part.as_bytes().contains(&0) {
        return Err(Error::invalid_argument(format!(
            "{what} {part:?} contains a NUL byte"
        )));
    }
    Ok(())
}

fn namespace_key(ns: &Namespace) -> Vec<u8> {
    [b"n\0", ns.as_str().as_bytes()].concat()
}

fn objects_prefix(ns: &Namespace) -> Vec<u8> {
    [b"o\0", ns.as_str().as_bytes(), b"\0"].concat()
}

fn kind_prefix(ns: &Namespace, kind: &ObjectKind) -> Result<Vec<u8>> {
    let kind = kind.encode();
    check_part(&kind, "object kind")?;
    Ok([objects_prefix(ns), kind.into_bytes(), b"\0".to_vec()].concat())
}

/// Ids are client text (an ingest ref may hold any byte), so NUL and the escape byte are
/// escaped: `\0` as `\x01\x01` and `\x01` as `\x01\x02`. Keys stay NUL-separated.
pub(crate) fn escape_id(id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(id.len());
    for &b in id.as_bytes() {
        match b {
            0 => out.extend_from_slice(&[1, 1]),
            1 => out.extend_from_slice(&[1, 2]),
            b => out.push(b),
        }
    }
    out
}

/// The inverse of [`escape_id`].
pub(crate) fn unescape_id(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut iter = bytes.iter();
    while let Some(&b) = iter.next() {
        if b == 1 {
            match iter.next() {
                Some(1) => out.push(0),
                Some(2) => out.push(1),
                Some(&other) => out.extend_from_slice(&[1, other]),
                None => out.push(1),
            }
        } else {
            out.push(b);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn object_key(ns: &Namespace, kind: &ObjectKind, id: &str) -> Result<Vec<u8>> {
    Ok([kind_prefix(ns, kind)?, escape_id(id)].concat())
}

/// Where the child edges of snapshot `parent` of `snapshotter` start. A snapshot record
/// names its parent; each such edge is also an empty record at
/// `c\0<ns>\0<snapshotter>\0<parent>\0<child>` (escaped like ids), kept by
/// [`WriteTxn::put_object`] and [`WriteTxn::remove_object`], so whether a snapshot has
/// children is one prefix look rather than a decode of every snapshot of the namespace (as
/// containerd keeps a children bucket per snapshot).
fn children_prefix(ns: &Namespace, snapshotter: &str, parent: &str) -> Vec<u8> {
    [
        b"c\0".as_slice(),
        ns.as_str().as_bytes(),
        b"\0",
        &escape_id(snapshotter),
        b"\0",
        &escape_id(parent),
        b"\0",
    ]
    .concat()
}

fn child_key(ns: &Namespace, snapshotter: &str, parent: &str, child: &str) -> Vec<u8> {
    [children_prefix(ns, snapshotter, parent), escape_id(child)].concat()
}

/// The parent a stored snapshot record names, if any.
fn parent_in(record: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ParentOf {
        #[serde(default)]
        parent: Option<String>,
    }
    serde_json::from_slice::<ParentOf>(record)
        .ok()
        .and_then(|r| r.parent)
        .filter(|p| !p.is_empty())
}

/// Schema 3: the child edges of the snapshot records already stored.
fn index_snapshot_children(txn: &mut WriteTxn<'_>) -> Result<()> {
    for (key, value) in txn.scan_prefix(b"o\0")? {
        let Some((ns, kind, id)) = key_parts(&key) else {
            continue;
        };
        let Some(snapshotter) = kind.strip_prefix(b"snapshots/") else {
            continue;
        };
        if let Some(parent) = parent_in(&value) {
            let ns = Namespace::parse(&String::from_utf8_lossy(ns))?;
            let snapshotter = String::from_utf8_lossy(snapshotter);
            txn.put(
                child_key(&ns, &snapshotter, &parent, &unescape_id(id)),
                Vec::new(),
            );
        }
    }
    Ok(())
}

/// The three NUL-separated parts after a key's one-letter prefix: namespace, kind and id of
/// `o\0<ns>\0<kind>\0<id>`, or namespace, lease and the rest of `l\0<ns>\0<lease>\0...`.
pub(crate) fn key_parts(key: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut parts = key.get(2..)?.splitn(3, |b| *b == 0);
    Some((parts.next()?, parts.next()?, parts.next()?))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::internal(format!("encode record: {e}")))
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::internal(format!(
            "metadata record {:?} is corrupt: {e}",
            String::from_utf8_lossy(key)
        ))
    })
}

/// A namespace's own record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NamespaceRecord {
    /// The namespace's labels.
    pub labels: Labels,
}

/// Options of the metadata store (`[plugins."io.containerd.metadata.v1.sled"]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MetadataConfig {
    /// Reply before the change is flushed to disk: faster, but a power loss may lose
    /// acknowledged changes. For ephemeral nodes only (containerd PR 10745).
    pub no_sync: bool,
    /// `shared` (default) or `isolated`: whether a blob one namespace has is visible to another
    /// that proves it has the bytes. Read by the content plugin.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub content_sharing_policy: String,
}

/// Typed lookup of the metadata store in the registry.
pub struct MetadataKind;
impl PluginKind for MetadataKind {
    const TYPE: PluginType = PluginType::METADATA;
    type Object = Metadata;
}

/// The metadata store.
pub struct MetaStore {
    shared: Arc<SharedDb>,
    tree: sled::Tree,
    writer: Mutex<()>,
    /// Keys to remove with the next write (see [`MetaStore::remove_with_next_write`]).
    deferred: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore")
            .field("db", &self.shared)
            .finish_non_exhaustive()
    }
}

impl MetaStore {
    /// Opens (creating) the store at `dir` and brings its schema up to date. Blocking.
    pub fn open(dir: &Path, config: &MetadataConfig) -> Result<MetaStore> {
        Self::open_with(dir, config, MIGRATIONS)
    }

    fn open_with(
        dir: &Path,
        config: &MetadataConfig,
        migrations: &[Migration],
    ) -> Result<MetaStore> {
        let shared = SharedDb::open(dir, config.no_sync)?;
        Self::open_shared_with(shared, migrations)
    }

    /// Opens the store in the shared database `shared` (whose other trees belong to
    /// compiled-in plugins, see [`SharedMetadata`]; it was opened with the store's `no_sync`)
    /// and brings its schema up to date. Blocking.
    pub fn open_shared(shared: Arc<SharedDb>) -> Result<MetaStore> {
        Self::open_shared_with(shared, MIGRATIONS)
    }

    fn open_shared_with(shared: Arc<SharedDb>, migrations: &[Migration]) -> Result<MetaStore> {
        let tree = shared.db.open_tree(TREE)?;
        let store = MetaStore {
            shared,
            tree,
            writer: Mutex::new(()),
            deferred: Mutex::new(Vec::new()),
        };
        // The tree's journal was finished by `SharedDb::open`, before the redo log's replay.
        store.migrate(migrations)?;
        store.shared.flush.flush_now()?;
        Ok(store)
    }

    /// The stored schema version (0 for a store that has none yet).
    pub fn schema_version(&self) -> Result<u32> {
        Ok(match self.tree.get(SCHEMA_KEY)? {
            None => 0,
            Some(bytes) => {
                let raw: [u8; 4] = bytes
                    .as_ref()
                    .try_into()
                    .map_err(|_| Error::internal("metadata schema version record is corrupt"))?;
                u32::from_be_bytes(raw)
            }
        })
    }

    fn migrate(&self, migrations: &[Migration]) -> Result<()> {
        let target = migrations.last().map_or(0, |m| m.to);
        let mut version = self.schema_version()?;
        if version > target {
            return Err(Error::failed_precondition(format!(
                "metadata schema version {version} is newer than this berth's {target}: \
                 run a berth at least as new as the one that wrote it"
            )));
        }
        let start = version;
        for migration in migrations.iter().filter(|m| m.to > start) {
            if migration.to != version + 1 {
                return Err(Error::internal(format!(
                    "metadata migrations skip from {version} to {}",
                    migration.to
                )));
            }
            self.write_sync(|txn| {
                (migration.apply)(txn)?;
                txn.put(SCHEMA_KEY.to_vec(), migration.to.to_be_bytes().to_vec());
                Ok(())
            })?;
            // A new store passes through every version: only a real upgrade is news.
            if start == 0 {
                tracing::debug!(
                    to = migration.to,
                    name = migration.name,
                    "metadata schema set up"
                );
            } else {
                tracing::info!(
                    to = migration.to,
                    name = migration.name,
                    "metadata schema migrated"
                );
            }
            version = migration.to;
        }
        Ok(())
    }

    fn lock_writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` as the only writer and applies its changes atomically; returns the write's
    /// sequence number for [`MetaStore::durable`]. Nothing is written if `f` fails.
    fn write_sync<T>(&self, f: impl FnOnce(&mut WriteTxn<'_>) -> Result<T>) -> Result<(T, u64)> {
        let _guard = self.lock_writer();
        let mut txn = WriteTxn {
            tree: &self.tree,
            pending: BTreeMap::new(),
        };
        let out = f(&mut txn)?;
        if txn.pending.is_empty() {
            return Ok((out, 0));
        }
        let deferred =
            std::mem::take(&mut *self.deferred.lock().unwrap_or_else(PoisonError::into_inner));
        for key in deferred {
            txn.pending.entry(key).or_insert(None);
        }
        self.shared
            .apply(&self.tree, txn.pending.into_iter().collect())?;
        Ok((out, self.shared.flush.wrote()))
    }

    /// Runs `f` as the only writer, applies its changes atomically, and returns once they are
    /// durable (sharing the flush with concurrent writers).
    pub async fn write<T>(&self, f: impl FnOnce(&mut WriteTxn<'_>) -> Result<T>) -> Result<T> {
        self.write_then(f, |_| {}).await
    }

    /// [`MetaStore::write`], then `then` with the result once the change is durable: for
    /// what follows a write (its event, the collector's trigger). `then` runs even when the
    /// caller stops waiting for the flush (a cancelled call), as the change is applied and the
    /// flush goes on without it; it does not run when the write or the flush fails.
    pub async fn write_then<T>(
        &self,
        f: impl FnOnce(&mut WriteTxn<'_>) -> Result<T>,
        then: impl FnOnce(&T),
    ) -> Result<T> {
        let (out, seq) = self.write_sync(f)?;
        let mut after = AfterWrite {
            out: Some(out),
            then: Some(then),
        };
        if let Err(e) = self.durable(seq).await {
            after.then = None;
            return Err(e);
        }
        Ok(after.finish())
    }

    /// Applies `f` like [`MetaStore::write`] but returns before the change is durable, with
    /// the sequence number to pass to [`MetaStore::durable`]: a caller that has slow work of
    /// its own to do next (a backend creating a snapshot) overlaps that work with the flush.
    /// It must not reply before [`MetaStore::durable`] returned.
    pub(crate) fn write_unflushed<T>(
        &self,
        f: impl FnOnce(&mut WriteTxn<'_>) -> Result<T>,
    ) -> Result<(T, u64)> {
        self.write_sync(f)
    }

    /// Returns once the write numbered `seq` (from [`MetaStore::write_unflushed`]) is durable,
    /// sharing the flush with concurrent writers; at once for `seq` 0 or with `no_sync`.
    pub(crate) async fn durable(&self, seq: u64) -> Result<()> {
        if seq != 0 && !self.shared.no_sync() {
            self.shared.flush.wait(seq).await?;
        }
        Ok(())
    }

    /// Removes `key` as part of the next write that changes anything, instead of in a write
    /// (and a flush) of its own: for records whose removal may be lost in a crash because
    /// whoever reads them after a restart finds them stale (a settled commit intent).
    pub(crate) fn remove_with_next_write(&self, key: Vec<u8>) {
        self.deferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(key);
    }

    /// A number never handed out before by this store (monotonic across restarts).
    pub fn next_id(&self) -> Result<u64> {
        Ok(self.shared.db.generate_id()?)
    }

    /// A view of the records for reads through [`WriteTxn`]'s helpers; nothing done to it
    /// is ever applied.
    pub(crate) fn reader(&self) -> WriteTxn<'_> {
        WriteTxn {
            tree: &self.tree,
            pending: BTreeMap::new(),
        }
    }

    /// Reads one record.
    pub fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    /// Creates a namespace; AlreadyExists if it exists.
    pub async fn create_namespace(&self, ns: &Namespace, labels: Labels) -> Result<()> {
        labels::validate_all(&labels)?;
        self.write(|txn| {
            let key = namespace_key(ns);
            if txn.get(&key)?.is_some() {
                return Err(Error::already_exists(format!(
                    "namespace {:?}",
                    ns.as_str()
                )));
            }
            txn.put(key, encode(&NamespaceRecord { labels })?);
            Ok(())
        })
        .await
    }

    /// A namespace's labels; empty for a namespace that does not exist, as in containerd.
    pub fn namespace_labels(&self, ns: &Namespace) -> Result<Labels> {
        let key = namespace_key(ns);
        Ok(match self.tree.get(&key)? {
            None => Labels::new(),
            Some(bytes) => decode::<NamespaceRecord>(&key, &bytes)?.labels,
        })
    }

    /// Every namespace with its labels, by name.
    pub fn list_namespaces(&self) -> Result<Vec<(Namespace, Labels)>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"n\0") {
            let (key, value) = item?;
            let name = String::from_utf8_lossy(&key[2..]).into_owned();
            let ns = Namespace::parse(&name)?;
            out.push((ns, decode::<NamespaceRecord>(&key, &value)?.labels));
        }
        Ok(out)
    }

    /// Changes a namespace's labels (creating the namespace): each `(key, value)` is set, an
    /// empty value removes the key. With `replace`, labels not named are removed first.
    pub async fn update_namespace_labels(
        &self,
        ns: &Namespace,
        changes: &[(String, String)],
        replace: bool,
    ) -> Result<Labels> {
        for (k, v) in changes {
            labels::validate(k, v)?;
        }
        self.write(|txn| {
            let key = namespace_key(ns);
            let mut record: NamespaceRecord = match txn.get(&key)? {
                Some(bytes) => decode(&key, &bytes)?,
                None => NamespaceRecord::default(),
            };
            if replace {
                record.labels.clear();
            }
            for (k, v) in changes {
                if v.is_empty() {
                    record.labels.remove(k);
                } else {
                    record.labels.insert(k.clone(), v.clone());
                }
            }
            txn.put(key, encode(&record)?);
            Ok(record.labels)
        })
        .await
    }

    /// Deletes an empty namespace: NotFound if absent, FailedPrecondition naming what it
    /// still holds otherwise.
    pub async fn delete_namespace(&self, ns: &Namespace) -> Result<()> {
        self.write(|txn| {
            let key = namespace_key(ns);
            if txn.get(&key)?.is_none() {
                return Err(Error::not_found(format!("namespace {:?}", ns.as_str())));
            }
            let prefix = objects_prefix(ns);
            let mut kinds: Vec<String> = Vec::new();
            for (k, _) in txn.scan_prefix(&prefix)? {
                let rest = &k[prefix.len()..];
                let kind = rest.split(|&b| b == 0).next().unwrap_or_default();
                let kind = String::from_utf8_lossy(kind).into_owned();
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                }
            }
            if !kinds.is_empty() {
                return Err(Error::failed_precondition(format!(
                    "namespace {:?} must be empty, but it still has {}",
                    ns.as_str(),
                    kinds.join(", ")
                )));
            }
            txn.remove(key);
            Ok(())
        })
        .await
    }

    /// One object record, decoded.
    pub fn get_object<T: DeserializeOwned>(
        &self,
        ns: &Namespace,
        kind: &ObjectKind,
        id: &str,
    ) -> Result<Option<T>> {
        let key = object_key(ns, kind, id)?;
        self.tree.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Every object of a kind in a namespace, by id.
    pub fn list_objects<T: DeserializeOwned>(
        &self,
        ns: &Namespace,
        kind: &ObjectKind,
    ) -> Result<Vec<(String, T)>> {
        let prefix = kind_prefix(ns, kind)?;
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (key, value) = item?;
            let id = unescape_id(&key[prefix.len()..]);
            out.push((id, decode(&key, &value)?));
        }
        Ok(out)
    }
}

/// The changes of one write, seen by later reads of the same write.
pub struct WriteTxn<'a> {
    tree: &'a sled::Tree,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl WriteTxn<'_> {
    /// Reads a record as this write sees it.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.pending.get(key) {
            Some(pending) => Ok(pending.clone()),
            None => Ok(self.tree.get(key)?.map(|v| v.to_vec())),
        }
    }

    /// Sets a record.
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending.insert(key, Some(value));
    }

    /// Removes a record.
    pub fn remove(&mut self, key: Vec<u8>) {
        self.pending.insert(key, None);
    }

    /// Every record under `prefix` as this write sees it, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            merged.insert(k.to_vec(), v.to_vec());
        }
        let range = self
            .pending
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix));
        for (k, v) in range {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }

    /// One object record as this write sees it, decoded.
    pub fn get_object<T: DeserializeOwned>(
        &self,
        ns: &Namespace,
        kind: &ObjectKind,
        id: &str,
    ) -> Result<Option<T>> {
        let key = object_key(ns, kind, id)?;
        self.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Sets an object record, creating its namespace if needed.
    pub fn put_object<T: Serialize>(
        &mut self,
        ns: &Namespace,
        kind: &ObjectKind,
        id: &str,
        record: &T,
    ) -> Result<()> {
        let ns_key = namespace_key(ns);
        if self.get(&ns_key)?.is_none() {
            self.put(ns_key, encode(&NamespaceRecord::default())?);
        }
        let key = object_key(ns, kind, id)?;
        let value = encode(record)?;
        if let ObjectKind::Snapshots(snapshotter) = kind {
            self.unlink_from_parent(ns, snapshotter, id, &key)?;
            if let Some(parent) = parent_in(&value) {
                self.put(child_key(ns, snapshotter, &parent, id), Vec::new());
            }
        }
        self.put(key, value);
        Ok(())
    }

    /// Removes an object record.
    pub fn remove_object(&mut self, ns: &Namespace, kind: &ObjectKind, id: &str) -> Result<()> {
        let key = object_key(ns, kind, id)?;
        match kind {
            ObjectKind::Snapshots(snapshotter) => {
                self.unlink_from_parent(ns, snapshotter, id, &key)?;
            }
            // A lease's resource records go with it, whoever removes it (a delete, or the
            // collector for an expired lease).
            ObjectKind::Leases => {
                for (resource, _) in self.scan_prefix(&leases::resources_prefix(ns, id))? {
                    self.remove(resource);
                }
            }
            _ => {}
        }
        self.remove(key);
        Ok(())
    }

    /// Drops the child edge of the snapshot record at `key` (`id`), if it has one.
    fn unlink_from_parent(
        &mut self,
        ns: &Namespace,
        snapshotter: &str,
        id: &str,
        key: &[u8],
    ) -> Result<()> {
        if let Some(parent) = self.get(key)?.as_deref().and_then(parent_in) {
            self.remove(child_key(ns, snapshotter, &parent, id));
        }
        Ok(())
    }

    /// Whether snapshot `key` of `snapshotter` has a child, as this write sees the records.
    /// Each edge is checked against the child's record, so an edge left stale by whatever
    /// could never block a removal.
    pub(crate) fn has_snapshot_children(
        &self,
        ns: &Namespace,
        snapshotter: &str,
        key: &str,
    ) -> Result<bool> {
        let prefix = children_prefix(ns, snapshotter, key);
        let kind = ObjectKind::Snapshots(snapshotter.to_owned());
        for (edge, _) in self.scan_prefix(&prefix)? {
            let child = unescape_id(&edge[prefix.len()..]);
            let record = self.get(&object_key(ns, &kind, &child)?)?;
            if record.as_deref().and_then(parent_in).as_deref() == Some(key) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Runs a call that changes records and then acts on them (a backend's snapshot, an event)
/// so that a caller that goes away (a cancelled gRPC call, the unpack of a pull whose download
/// failed) cannot stop it halfway: the call finishes or is undone whole. It runs in the
/// caller's task, and only a caller dropped before the end hands the rest to a task of its
/// own: a task per call cost each call a hand-off between threads.
pub async fn run_whole<T: Send + 'static>(
    call: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let mut whole = Whole(Some(Box::pin(call)));
    std::future::poll_fn(|cx| {
        let Some(call) = whole.0.as_mut() else {
            return std::task::Poll::Ready(Err(Error::internal("call polled after its end")));
        };
        let out = std::task::ready!(call.as_mut().poll(cx));
        whole.0 = None;
        std::task::Poll::Ready(out)
    })
    .await
}

/// A call of [`run_whole`] until it ends.
struct Whole<T: Send + 'static>(
    Option<std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send>>>,
);

impl<T: Send + 'static> Drop for Whole<T> {
    fn drop(&mut self) {
        let Some(call) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move {
                if let Err(e) = call.await {
                    tracing::debug!(error = %e, "a call whose caller went away failed");
                }
            })),
            // Only a runtime that is shutting down drops its tasks without one.
            Err(_) => tracing::warn!("a call whose caller went away could not be finished"),
        }
    }
}

/// A write's result with what is to follow it ([`MetaStore::write_then`]), run when this is
/// finished or dropped.
struct AfterWrite<T, F: FnOnce(&T)> {
    out: Option<T>,
    then: Option<F>,
}

impl<T, F: FnOnce(&T)> AfterWrite<T, F> {
    fn run(&mut self) {
        if let (Some(then), Some(out)) = (self.then.take(), self.out.as_ref()) {
            then(out);
        }
    }

    fn finish(mut self) -> T {
        self.run();
        self.out
            .take()
            .unwrap_or_else(|| unreachable!("a write's result is taken once"))
    }
}

impl<T, F: FnOnce(&T)> Drop for AfterWrite<T, F> {
    fn drop(&mut self) {
        self.run();
    }
}

/// Group commit: writers wait for a flush that covers their write; one flush serves all the
/// writers that arrived while it was pending.
struct GroupFlush {
    inner: Arc<FlushInner>,
}

struct FlushInner {
    state: Mutex<FlushState>,
    /// The redo log a flush syncs; None with `no_sync`.
    redo: Option<Arc<RedoLog>>,
    flushes: std::sync::atomic::AtomicU64,
    flushed: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct FlushState {
    written: u64,
    flushing: bool,
}

impl FlushInner {
    fn lock(&self) -> MutexGuard<'_, FlushState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes every write logged so far durable: a sync of the redo log. Blocking.
    fn sync(&self) -> Result<()> {
        match &self.redo {
            Some(redo) => redo.sync(),
            None => Ok(()),
        }
    }

    /// The leader's flush covering writes up to `target`, with its bookkeeping. It runs whole
    /// on the blocking pool even when the writer that started it is cancelled: stopping
    /// between setting `flushing` and clearing it would leave every later writer waiting
    /// for a flush that never ends.
    fn lead(&self, target: u64) -> Result<()> {
        let mut leading = Leading {
            inner: self,
            covered: None,
        };
        let result = self.sync();
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if result.is_ok() {
            leading.covered = Some(target);
        }
        drop(leading);
        result
    }
}

/// The leader's turn: however it ends (a failed flush, even a panic), `flushing` is cleared
/// and the waiters are woken, once, to find their write covered or to flush it themselves.
struct Leading<'a> {
    inner: &'a FlushInner,
    /// Writes up to this number are durable (the flush succeeded).
    covered: Option<u64>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.inner.lock().flushing = false;
        let covered = self.covered;
        self.inner.flushed.send_modify(|f| {
            if let Some(covered) = covered {
                *f = (*f).max(covered);
            }
        });
    }
}

impl GroupFlush {
    fn new(redo: Option<Arc<RedoLog>>) -> Self {
        GroupFlush {
            inner: Arc::new(FlushInner {
                state: Mutex::new(FlushState::default()),
                redo,
                flushes: std::sync::atomic::AtomicU64::new(0),
                flushed: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FlushState> {
        self.inner.lock()
    }

    /// Counts a write applied to the tree; called under the writer lock so numbers follow
    /// the order of writes.
    fn wrote(&self) -> u64 {
        let mut state = self.lock();
        state.written += 1;
        state.written
    }

    /// Returns once write `seq` is durable: at once when a flush covered it, else after the
    /// flush in progress, or after a flush this writer starts. Cancel-safe.
    async fn wait(&self, seq: u64) -> Result<()> {
        loop {
            let mut changes = self.inner.flushed.subscribe();
            if *changes.borrow() >= seq {
                return Ok(());
            }
            let target = {
                let mut state = self.lock();
                if state.flushing {
                    None
                } else {
                    state.flushing = true;
                    Some(state.written)
                }
            };
            let Some(target) = target else {
                // Another writer is flushing; its flush may or may not cover us: look again
                // when it finishes.
                let _ = changes.changed().await;
                continue;
            };
            let inner = Arc::clone(&self.inner);
            return tokio::task::spawn_blocking(move || inner.lead(target))
                .await
                .map_err(|e| Error::internal(format!("metadata flush task: {e}")))?;
        }
    }

    /// Flushes on the calling thread (blocking) and counts the flush for every write
    /// numbered so far, so the waiters of [`GroupFlush::wait`] whose writes it covers return
    /// without a flush of their own.
    fn flush_now(&self) -> Result<()> {
        // Read before the flush: every write numbered up to here is in the redo log already
        // (numbers are taken after the record is appended), so the flush covers it.
        let target = self.lock().written;
        self.inner.sync()?;
        self.inner
            .flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.flushed.send_modify(|f| *f = (*f).max(target));
        Ok(())
    }
}

/// sled's log file (`<dir>/db`), opened beside the database to make a checkpoint durable.
///
/// sled 0.34 ends a flush with `sync_file_range`, which writes the log's pages and waits for
/// them but commits no file metadata (the log grows as it fills segments) and asks the disk
/// for no cache flush: a flushed change survives the daemon's death, not a power loss.
/// Durability needs both (SPEC: durability unless `no_sync`), so a checkpoint ends with an
/// `fdatasync` of the same file.
struct SledLog {
    file: std::fs::File,
    path: PathBuf,
}

impl SledLog {
    /// Opens the log of the sled database at `dir` (open already). Blocking.
    fn open(dir: &Path) -> Result<SledLog> {
        let path = dir.join("db");
        let file = std::fs::File::open(&path).map_err(|e| {
            Error::internal(format!(
                "cannot open the metadata log {} to sync it: {e}",
                path.display()
            ))
        })?;
        Ok(SledLog { file, path })
    }

    /// `db.flush()`, then an `fdatasync` of the log: everything applied to `db` is durable.
    /// Blocking.
    fn flush_durably(&self, db: &sled::Db) -> Result<()> {
        db.flush()?;
        self.file.sync_data().map_err(|e| {
            Error::internal(format!(
                "cannot sync the metadata log {}: {e}",
                self.path.display()
            ))
        })
    }
}

/// Opens the sled database `config` describes, at `dir`; `what` names it in errors. sled
/// reports a lock another process holds as an `Other` error naming it: that becomes
/// Unavailable with a hint (two berthds on one root), anything else Internal.
pub fn open_sled(config: sled::Config, dir: &Path, what: &str) -> Result<sled::Db> {
    config.open().map_err(|e| match e {
        sled::Error::Io(io)
            if io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().starts_with("could not acquire lock") =>
        {
            Error::new(
                crate::ErrorKind::Unavailable,
                format!(
                    "{what} {} is locked by another process: is another berthd using this root?",
                    dir.display()
                ),
            )
        }
        other => Error::internal(format!("cannot open {what} {}: {other}", dir.display())),
    })
}

/// Opens the redo log of the sled database `db` at `dir` (see [`redo`]) and finishes what a
/// crash cut off: first the tree journals sled recovered (writes torn between their keys),
/// then each record newer than its tree's marker, oldest first; then checkpoints (see
/// [`RedoLog::start`]). Every write to `db` must then go through [`RedoLog::write`].
/// Blocking.
pub fn open_redo_log(db: &sled::Db, dir: &Path) -> Result<RedoLog> {
    let mut markers = BTreeMap::new();
    let mut finished = false;
    for name in db.tree_names() {
        let tree = db.open_tree(&name)?;
        finished |= journal::recover(&tree)?;
        markers.insert(name.to_vec(), redo::read_marker(&tree)?);
    }
    let newest = markers.values().map(|m| m.0).max().unwrap_or(0);
    let sled_log = SledLog::open(dir)?;
    let checkpoint_db = db.clone();
    let (redo, records) = RedoLog::open(
        &dir.join(redo::FILE_NAME),
        newest + 1,
        Box::new(move || sled_log.flush_durably(&checkpoint_db)),
    )?;
    let mut replayed = 0usize;
    for record in &records {
        let (tree, ops) = redo::decode(&record.payload)?;
        if record.newer_than(markers.get(&tree).copied().unwrap_or((0, 0))) {
            journal::apply(&db.open_tree(tree)?, ops)?;
            replayed += 1;
        }
    }
    if replayed > 0 {
        tracing::debug!(path = %dir.display(), replayed, "writes replayed from the redo log");
    }
    redo.start(finished || !records.is_empty())?;
    Ok(redo)
}

/// The core's sled database with its redo log and group commit: the metadata store's tree
/// and the trees compiled-in plugins keep their own records in (see [`SharedMetadata`]).
/// Every write goes through [`SharedDb::apply`] (or [`SharedTree::apply`]), and one sync of
/// the redo log makes all writes so far durable, so a plugin's flush makes the metadata
/// records written before it durable too, and the metadata layer's writers then wait for no
/// flush of their own.
pub struct SharedDb {
    db: sled::Db,
    flush: GroupFlush,
    path: PathBuf,
    co_flushed: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for SharedDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDb")
            .field("path", &self.path)
            .field("no_sync", &self.no_sync())
            .finish_non_exhaustive()
    }
}

impl SharedDb {
    /// Opens (creating) the database at `dir`, finishing the writes a crash cut off (see
    /// [`redo`]); with `no_sync`, there is no redo log, [`SharedTree::flush`] does nothing and
    /// only sled's background flushes write. Blocking.
    pub fn open(dir: &Path, no_sync: bool) -> Result<Arc<SharedDb>> {
        // sled flushes in the background either way: with a redo log, so that a checkpoint
        // has little left to write.
        let db = open_sled(
            sled::Config::new().path(dir).flush_every_ms(Some(1000)),
            dir,
            "metadata store",
        )?;
        let redo_path = dir.join(redo::FILE_NAME);
        let redo = if no_sync && !redo_path.exists() {
            None
        } else {
            let redo = open_redo_log(&db, dir)?;
            if no_sync {
                // Left by a start without `no_sync`; replayed and durable now.
                drop(redo);
                std::fs::remove_file(&redo_path).map_err(|e| {
                    Error::internal(format!(
                        "cannot remove the metadata redo log {}: {e}",
                        redo_path.display()
                    ))
                })?;
                None
            } else {
                Some(Arc::new(redo))
            }
        };
        Ok(Arc::new(SharedDb {
            db,
            flush: GroupFlush::new(redo),
            path: dir.to_owned(),
            co_flushed: Mutex::new(BTreeSet::new()),
        }))
    }

    /// Whether replies wait for no flush: the database was opened with `no_sync`, so it has
    /// no redo log.
    fn no_sync(&self) -> bool {
        self.flush.inner.redo.is_none()
    }

    /// Applies `ops` to `tree` (a tree of this database) atomically and logs them; they are
    /// durable after the next flush. Call it under the tree's writer lock. Blocking: besides
    /// the in-memory write, an append to the redo log, and when it is full a checkpoint.
    fn apply(&self, tree: &sled::Tree, ops: Vec<journal::Op>) -> Result<()> {
        match &self.flush.inner.redo {
            Some(redo) => redo.write(tree, ops),
            None => journal::apply(tree, ops),
        }
    }

    /// The tree `name` for a plugin's own records. Names are the plugin's business; the
    /// metadata store's own tree is `berth.v1`, which is refused here.
    pub fn tree(self: &Arc<Self>, name: &str) -> Result<SharedTree> {
        if name == TREE {
            return Err(Error::invalid_argument(format!(
                "tree {name:?} of the metadata database belongs to the metadata store"
            )));
        }
        Ok(SharedTree {
            tree: self.db.open_tree(name)?,
            shared: Arc::clone(self),
        })
    }

    /// Declares that snapshotter `name` keeps its records in this database and flushes it
    /// before each Prepare, View and Commit returns: the metadata layer then writes its record
    /// first and lets that flush cover it, instead of flushing at the same time.
    pub fn declare_co_flushed_snapshotter(&self, name: &str) {
        self.co_flushed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned());
    }

    pub(crate) fn is_co_flushed_snapshotter(&self, name: &str) -> bool {
        self.co_flushed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(name)
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A plugin's tree in the core's database ([`SharedDb::tree`]).
#[derive(Clone)]
pub struct SharedTree {
    tree: sled::Tree,
    shared: Arc<SharedDb>,
}

impl std::fmt::Debug for SharedTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTree")
            .field("db", &self.shared.path)
            .field("tree", &String::from_utf8_lossy(&self.tree.name()))
            .finish()
    }
}

impl SharedTree {
    /// The sled tree, for reads: writes go through [`SharedTree::apply`], or the redo log
    /// misses them.
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Writes `ops` (a key's new value, or None to remove it) atomically; they are durable
    /// after the next [`SharedTree::flush`]. Call it under the plugin's own writer lock.
    /// Blocking.
    pub fn apply(&self, ops: Vec<journal::Op>) -> Result<()> {
        self.shared.apply(&self.tree, ops)
    }

    /// Makes everything applied to the database so far durable, the metadata store's
    /// pending writes included (they then need no flush of their own). Blocking; nothing to
    /// do with `no_sync`.
    pub fn flush(&self) -> Result<()> {
        if self.shared.no_sync() {
            return Ok(());
        }
        self.shared.flush.flush_now()
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

/// The core's metadata database as the registry hands it to plugins
/// ([`crate::registry::InitContext::shared_metadata`]): opened on first use, by the first
/// compiled-in plugin that asks for a tree or by the metadata plugin, whichever comes first,
/// and then shared by all of them. Out-of-process and dynamic plugins keep their own stores.
#[derive(Clone)]
pub struct SharedMetadata {
    inner: Arc<SharedMetadataInner>,
}

struct SharedMetadataInner {
    path: PathBuf,
    no_sync: bool,
    db: Mutex<Option<Arc<SharedDb>>>,
}

impl std::fmt::Debug for SharedMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMetadata")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl SharedMetadata {
    /// The database at `path` (not opened yet).
    pub fn new(path: impl Into<PathBuf>, no_sync: bool) -> Self {
        SharedMetadata {
            inner: Arc::new(SharedMetadataInner {
                path: path.into(),
                no_sync,
                db: Mutex::new(None),
            }),
        }
    }

    /// The database, opened on the first call. Blocking.
    pub fn db(&self) -> Result<Arc<SharedDb>> {
        let mut slot = self.inner.db.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(db) = &*slot {
            return Ok(Arc::clone(db));
        }
        let db = SharedDb::open(&self.inner.path, self.inner.no_sync)?;
        *slot = Some(Arc::clone(&db));
        Ok(db)
    }

    /// The tree `name` of the database (see [`SharedDb::tree`]). Blocking.
    pub fn tree(&self, name: &str) -> Result<SharedTree> {
        self.db()?.tree(name)
    }
}

/// The metadata layer as a plugin, `io.containerd.metadata.v1.sled`: opens the store under
/// its root and wraps the content backend (when a content plugin is loaded).
pub fn registration() -> crate::registry::Registration {
    use crate::content::ContentKind;
    use crate::events::EventsKind;
    use crate::registry::{Instance, Registration};
    Registration::new(PluginType::METADATA, "sled", |ctx| async move {
        let config: MetadataConfig = ctx.config()?;
        if config.no_sync {
            tracing::warn!(
                "metadata no_sync is set: replies do not wait for disk flushes, so a power loss \
                 can lose acknowledged changes; use it only on ephemeral nodes"
            );
        }
        let events = ctx.single::<EventsKind>()?;
        let mut content = ctx.all::<ContentKind>();
        if content.len() > 1 {
            let ids: Vec<String> = content.into_iter().map(|(id, _)| id).collect();
            return Err(Error::failed_precondition(format!(
                "{} content stores are loaded ({}): disable all but one",
                ids.len(),
                ids.join(", ")
            ))
            .into());
        }
        let content = content.pop().map(|(_, store)| store);
        let snapshotters = ctx
            .all::<crate::snapshot::SnapshotterKind>()
            .into_iter()
            .collect();
        let shared = ctx.shared_metadata();
        let store = tokio::task::spawn_blocking(move || MetaStore::open_shared(shared.db()?))
            .await
            .map_err(|e| Error::internal(format!("metadata open task: {e}")))??;
        let metadata = Metadata::with_snapshotters(
            std::sync::Arc::new(store),
            events,
            content,
            snapshotters,
            config,
        );
        // Before anything can collect: a commit a crash interrupted still owns its active
        // backend snapshot.
        let settled = metadata.recover_snapshot_commits().await?;
        if settled > 0 {
            tracing::info!(settled, "snapshot commits interrupted by a crash settled");
        }
        Ok(Instance::new::<MetadataKind>(metadata))
    })
    .requires(&[
        PluginType::EVENT,
        PluginType::CONTENT,
        PluginType::SNAPSHOTTER,
    ])
    .with_config::<MetadataConfig>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::error::Classify;
    use std::sync::Arc;

    fn ns(name: &str) -> Namespace {
        Namespace::parse(name).expect("valid")
    }

    fn open(dir: &Path) -> MetaStore {
        open_migrated(&dir.join("meta"), MIGRATIONS)
    }

    /// Opens the store at `path`, waiting while a store of this process dropped a moment ago
    /// still holds sled's file lock (its log threads let go shortly after; a restarted daemon
    /// is a new process and never waits).
    fn open_migrated(path: &Path, migrations: &[Migration]) -> MetaStore {
        when_unlocked(|| MetaStore::open_with(path, &MetadataConfig::default(), migrations))
    }

    /// `open()`'s result once sled's file lock is free.
    fn when_unlocked<T>(open: impl Fn() -> Result<T>) -> T {
        crate::testing::open_when_unlocked(open).expect("open")
    }

    #[tokio::test]
    async fn namespaces_create_label_list_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let a = ns("a");
        store
            .create_namespace(&a, Labels::from([("k".into(), "v".into())]))
            .await
            .expect("create");
        let err = store
            .create_namespace(&a, Labels::new())
            .await
            .expect_err("twice");
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        let labels = store
            .update_namespace_labels(
                &a,
                &[("x".into(), "1".into()), ("k".into(), String::new())],
                false,
            )
            .await
            .expect("label");
        assert_eq!(labels, Labels::from([("x".into(), "1".into())]));
        let labels = store
            .update_namespace_labels(&a, &[("y".into(), "2".into())], true)
            .await
            .expect("replace");
        assert_eq!(labels, Labels::from([("y".into(), "2".into())]));
        assert_eq!(
            store.namespace_labels(&ns("absent")).expect("get"),
            Labels::new()
        );
        let names: Vec<String> = store
            .list_namespaces()
            .expect("list")
            .into_iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(names, ["a"]);
        store.delete_namespace(&a).await.expect("delete");
        let err = store.delete_namespace(&a).await.expect_err("gone");
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn a_namespace_with_records_cannot_be_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let busy = ns("busy");
        store
            .write(|txn| {
                txn.put_object(
                    &busy,
                    &ObjectKind::Images,
                    "docker.io/library/busybox:latest",
                    &1,
                )?;
                txn.put_object(&busy, &ObjectKind::Snapshots("overlayfs".into()), "k", &2)
            })
            .await
            .expect("put");
        let err = store.delete_namespace(&busy).await.expect_err("not empty");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        let text = err.to_string();
        assert!(
            text.contains("images") && text.contains("snapshots/overlayfs"),
            "{text}"
        );
        store
            .write(|txn| {
                txn.remove_object(
                    &busy,
                    &ObjectKind::Images,
                    "docker.io/library/busybox:latest",
                )?;
                txn.remove_object(&busy, &ObjectKind::Snapshots("overlayfs".into()), "k")
            })
            .await
            .expect("remove");
        store.delete_namespace(&busy).await.expect("now empty");
    }

    #[tokio::test]
    async fn a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let a = ns("a");
        let err = store
            .write(|txn| {
                txn.put_object(&a, &ObjectKind::Leases, "l1", &"x")?;
                Err::<(), _>(Error::invalid_argument("no"))
            })
            .await
            .expect_err("fails");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(store.list_namespaces().expect("list").is_empty());
        assert!(
            store
                .get_object::<String>(&a, &ObjectKind::Leases, "l1")
                .expect("get")
                .is_none()
        );
    }

    #[tokio::test]
    async fn writes_see_their_own_changes_and_records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = ns("a");
        {
            let store = open(dir.path());
            store
                .write(|txn| {
                    txn.put_object(&a, &ObjectKind::Content, "sha256:1", &10u64)?;
                    txn.put_object(&a, &ObjectKind::Content, "sha256:2", &20u64)?;
                    txn.remove_object(&a, &ObjectKind::Content, "sha256:1")?;
                    let seen = txn.scan_prefix(&kind_prefix(&a, &ObjectKind::Content)?)?;
                    assert_eq!(seen.len(), 1);
                    Ok(())
                })
                .await
                .expect("write");
        }
        let store = open(dir.path());
        let all: Vec<(String, u64)> = store.list_objects(&a, &ObjectKind::Content).expect("list");
        assert_eq!(all, [("sha256:2".to_owned(), 20)]);
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
    }

    /// Schema 2 moves the resource set a schema-1 lease record embeds into records of their
    /// own, and leaves the lease's other fields as they were.
    #[test]
    fn migration_2_moves_lease_resources_out_of_the_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta");
        let a = ns("a");
        let key = object_key(&a, &ObjectKind::Leases, "old\0one").expect("key");
        {
            let store = open_migrated(&path, &MIGRATIONS[..1]);
            let v1 = serde_json::json!({
                "created_at": {"secs_since_epoch": 7, "nanos_since_epoch": 0},
                "labels": {"x": "y"},
                "resources": [{"type": "content", "id": "sha256:1"},
                              {"type": "snapshots/overlayfs", "id": "k\0ey"}],
            });
            store
                .tree
                .insert(namespace_key(&a), b"{}".to_vec())
                .expect("put");
            let v1 = serde_json::to_vec(&v1).expect("encode");
            store.tree.insert(key.clone(), v1).expect("put");
            store.shared.db.flush().expect("flush");
        }
        let store = open_migrated(&path, MIGRATIONS);
        assert_eq!(store.schema_version().expect("v"), SCHEMA_VERSION);
        let record: serde_json::Value =
            serde_json::from_slice(&store.get_raw(&key).expect("get").expect("record"))
                .expect("decode");
        assert_eq!(
            record,
            serde_json::json!({
                "created_at": {"secs_since_epoch": 7, "nanos_since_epoch": 0},
                "labels": {"x": "y"},
            })
        );
        let mut held = leases::resources_of(&store.reader(), &a, "old\0one").expect("list");
        held.sort();
        assert_eq!(
            held,
            [
                leases::Resource {
                    kind: "content".into(),
                    id: "sha256:1".into()
                },
                leases::Resource {
                    kind: "snapshots/overlayfs".into(),
                    id: "k\0ey".into()
                },
            ]
        );
    }

    /// Schema 3 indexes the child edges of the snapshot records a schema-2 store holds, and
    /// writes keep the index: a removed or re-parented record takes its edge along.
    #[test]
    fn migration_3_indexes_snapshot_children_and_writes_keep_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta");
        let a = ns("a");
        let kind = ObjectKind::Snapshots("overlayfs".into());
        let record =
            |parent: Option<&str>| serde_json::json!({"parent": parent, "kind": "committed"});
        {
            let store = open_migrated(&path, &MIGRATIONS[..2]);
            store
                .tree
                .insert(namespace_key(&a), b"{}".to_vec())
                .expect("put");
            for (id, parent) in [("base", None), ("mid", Some("base")), ("top", Some("mid"))] {
                let key = object_key(&a, &kind, id).expect("key");
                let value = serde_json::to_vec(&record(parent)).expect("encode");
                store.tree.insert(key, value).expect("put");
            }
            store.shared.db.flush().expect("flush");
        }
        let store = open_migrated(&path, MIGRATIONS);
        assert_eq!(store.schema_version().expect("v"), SCHEMA_VERSION);
        let children = |store: &MetaStore, id: &str| {
            store
                .reader()
                .has_snapshot_children(&a, "overlayfs", id)
                .expect("children")
        };
        assert!(children(&store, "base"));
        assert!(children(&store, "mid"));
        assert!(!children(&store, "top"));

        let mut txn = store.reader();
        txn.remove_object(&a, &kind, "top").expect("remove");
        assert!(
            !txn.has_snapshot_children(&a, "overlayfs", "mid")
                .expect("children")
        );
        // Re-parented: the old parent loses the edge, the new one gains it.
        txn.put_object(&a, &kind, "mid", &record(Some("other")))
            .expect("put");
        assert!(
            !txn.has_snapshot_children(&a, "overlayfs", "base")
                .expect("children")
        );
        assert!(
            txn.has_snapshot_children(&a, "overlayfs", "other")
                .expect("children")
        );
        // Every edge the write left is a live one.
        let edges: Vec<_> = txn.scan_prefix(b"c\0").expect("scan");
        assert_eq!(edges.len(), 1, "{edges:?}");
    }

    /// A call runs in its caller's task, and what is left of it when the caller goes away
    /// still runs, to its end.
    #[tokio::test]
    async fn run_whole_finishes_a_call_whose_caller_went_away() {
        assert_eq!(run_whole(async { Ok(7) }).await.expect("run"), 7);

        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (done, finished) = tokio::sync::oneshot::channel::<&str>();
        let mut caller = Box::pin(run_whole(async move {
            let _ = wait.await;
            let _ = done.send("finished");
            Ok(())
        }));
        let polled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(caller.as_mut().poll(cx))).await;
        assert!(polled.is_pending(), "the call waits for `go`");
        drop(caller);
        go.send(()).expect("the call is still there");
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), finished)
            .await
            .expect("the rest of the call ran")
            .expect("the call sent its end");
        assert_eq!(end, "finished");
    }

    /// Writers waiting for durability at the same time share one flush. The 64 writes are
    /// all applied before anyone waits, so the test does not depend on how fast this
    /// machine runs them against a flush (spawned writers raced it: under a loaded full run
    /// their writes spread over 19 flushes once).
    #[tokio::test]
    async fn concurrent_writers_share_flushes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(open(dir.path()));
        let flushes = || {
            store
                .shared
                .flush
                .inner
                .flushes
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let before = flushes();
        let mut seqs = Vec::new();
        for i in 0..64 {
            let ((), seq) = store
                .write_unflushed(|txn| {
                    txn.put(namespace_key(&ns(&format!("n{i}"))), b"{}".to_vec());
                    Ok(())
                })
                .expect("write");
            seqs.push(seq);
        }
        let mut waits = tokio::task::JoinSet::new();
        for seq in seqs {
            let store = Arc::clone(&store);
            waits.spawn(async move { store.durable(seq).await });
        }
        while let Some(waited) = waits.join_next().await {
            waited.expect("join").expect("durable");
        }
        assert_eq!(store.list_namespaces().expect("list").len(), 64);
        let written = store.shared.flush.lock().written;
        let flushed = *store.shared.flush.inner.flushed.borrow();
        assert_eq!(flushed, written, "every write is covered by a flush");
        assert_eq!(
            flushes() - before,
            1,
            "64 writers waiting together did not share one flush"
        );
    }

    /// A database another holder has open is Unavailable with the hint, naming the store.
    #[test]
    fn a_locked_database_is_unavailable_with_a_hint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta");
        let _held = SharedDb::open(&path, false).expect("first open");
        let e = SharedDb::open(&path, false).expect_err("second open must fail");
        assert_eq!(e.kind(), crate::ErrorKind::Unavailable, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("metadata store") && text.contains("another berthd"),
            "{text}"
        );
    }

    /// A reply means durable against a power loss too: each write waits for an `fdatasync`
    /// of the redo log; `no_sync` has none.
    #[tokio::test]
    async fn a_write_returns_after_the_redo_log_is_synced_unless_no_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let log = store
            .shared
            .flush
            .inner
            .redo
            .as_ref()
            .expect("a log to sync");
        let before = log.syncs();
        store
            .create_namespace(&ns("durable"), Labels::new())
            .await
            .expect("create");
        assert!(log.syncs() > before, "the write returned before a log sync");

        let unsynced = tempfile::tempdir().expect("tempdir");
        let config = MetadataConfig {
            no_sync: true,
            ..MetadataConfig::default()
        };
        let store = MetaStore::open(unsynced.path(), &config).expect("open no_sync");
        assert!(store.shared.flush.inner.redo.is_none());
        assert!(!unsynced.path().join(redo::FILE_NAME).exists());
    }

    /// What the redo log holds is in the trees after the next open, whatever sled itself
    /// kept (here: nothing of those writes, as after a kill before sled's own flush), and a
    /// start with `no_sync` replays it too before removing the log.
    #[test]
    fn the_redo_log_is_replayed_at_open() {
        for no_sync in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("meta");
            drop(open_migrated(&path, MIGRATIONS));
            let key = namespace_key(&ns("replayed"));
            let plugin_key = b"plugin-key".to_vec();
            {
                // The records are written through trees of another database, so the one
                // under test has none of them.
                let elsewhere = sled::Config::new()
                    .path(dir.path().join("elsewhere"))
                    .open()
                    .expect("scratch db");
                let flushed = elsewhere.clone();
                let (log, _) = RedoLog::open(
                    &path.join(redo::FILE_NAME),
                    1,
                    Box::new(move || {
                        flushed.flush()?;
                        Ok(())
                    }),
                )
                .expect("log");
                log.checkpoint().expect("checkpoint");
                let store_tree = elsewhere.open_tree(TREE).expect("tree");
                let plugin_tree = elsewhere.open_tree("plugin").expect("tree");
                let labels = |v: &str| format!("{{\"labels\":{{\"a\":\"{v}\"}}}}").into_bytes();
                log.write(&store_tree, vec![(key.clone(), Some(labels("1")))])
                    .expect("write");
                log.write(
                    &plugin_tree,
                    vec![(plugin_key.clone(), Some(b"v1".to_vec()))],
                )
                .expect("write");
                // A later write of the same key wins.
                log.write(&store_tree, vec![(key.clone(), Some(labels("2")))])
                    .expect("write");
                log.sync().expect("sync");
            }
            let shared = when_unlocked(|| SharedDb::open(&path, no_sync));
            let store = MetaStore::open_shared(Arc::clone(&shared)).expect("open store");
            let labels = store
                .namespace_labels(&ns("replayed"))
                .expect("replayed namespace");
            assert_eq!(labels.get("a").map(String::as_str), Some("2"), "{no_sync}");
            let plugin = shared.tree("plugin").expect("tree");
            assert_eq!(
                plugin.tree().get(&plugin_key).expect("get").as_deref(),
                Some(&b"v1"[..])
            );
            assert_eq!(path.join(redo::FILE_NAME).exists(), !no_sync);
        }
    }

    /// sled can keep a write whose record the log lost (a power loss after sled's background
    /// flush, before the log's sync). The records before it must not roll its keys back, or a
    /// write of several keys would come back torn: each tree's marker says how far sled got.
    #[test]
    fn replay_skips_what_the_tree_already_has() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta");
        let key = |n: &str| namespace_key(&ns(n));
        {
            let shared = SharedDb::open(&path, false).expect("open");
            let tree = shared.db.open_tree(TREE).expect("tree");
            shared
                .apply(&tree, vec![(key("a"), Some(b"{}".to_vec()))])
                .expect("write");
            shared
                .apply(
                    &tree,
                    vec![(key("a"), None), (key("b"), Some(b"{}".to_vec()))],
                )
                .expect("write");
            shared.db.flush().expect("sled keeps both writes");
        }
        // The second record never reached the disk: its last byte is missing.
        let log_path = path.join(redo::FILE_NAME);
        let mut bytes = std::fs::read(&log_path).expect("read");
        let last = bytes.iter().rposition(|&b| b != 0).expect("records");
        bytes[last] = 0;
        std::fs::write(&log_path, &bytes).expect("damage");

        let store = open(dir.path());
        let names: Vec<String> = store
            .list_namespaces()
            .expect("list")
            .into_iter()
            .map(|(n, _)| n.as_str().to_owned())
            .collect();
        assert_eq!(names, ["b"], "the first record brought \"a\" back");
    }

    /// A writer cancelled while its flush runs (a dropped gRPC call, the unpack of a pull
    /// whose download failed) must not leave the group waiting for a flush that never ends.
    #[tokio::test]
    async fn a_writer_cancelled_during_its_flush_does_not_stall_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        // Polled once: the write is applied and this writer starts the flush, then it is
        // dropped. A fast disk may finish that flush within the one poll; only rounds where
        // it did not count.
        let mut cancelled_mid_flush = 0;
        for round in 0..50 {
            let name = ns(&format!("a{round}"));
            let mut first = Box::pin(store.create_namespace(&name, Labels::new()));
            let polled =
                std::future::poll_fn(|cx| std::task::Poll::Ready(first.as_mut().poll(cx))).await;
            drop(first);
            if polled.is_pending() {
                cancelled_mid_flush += 1;
            }
            tokio::time::timeout(
                std::time::Duration::from_secs(20),
                store.create_namespace(&ns(&format!("b{round}")), Labels::new()),
            )
            .await
            .expect("the next writer's flush must not wait forever")
            .expect("create");
            if cancelled_mid_flush >= 3 {
                break;
            }
        }
        assert!(
            cancelled_mid_flush > 0,
            "no writer could be cancelled while flushing: the test proves nothing"
        );
    }

    #[tokio::test]
    async fn a_plugin_flush_of_the_shared_db_covers_pending_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = SharedDb::open(&dir.path().join("meta"), false).expect("shared");
        let store = MetaStore::open_shared(Arc::clone(&shared)).expect("open");
        let plugin = shared.tree("plugin").expect("tree");
        assert!(
            shared.tree(TREE).is_err(),
            "the store's own tree is not handed out"
        );
        let ((), seq) = store
            .write_unflushed(|txn| {
                txn.put_object(&ns("a"), &ObjectKind::Leases, "l", &1)?;
                Ok(())
            })
            .expect("write");
        plugin
            .apply(vec![(b"k".to_vec(), Some(b"v".to_vec()))])
            .expect("plugin write");
        let before = shared
            .flush
            .inner
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed);
        plugin.flush().expect("plugin flush");
        store.durable(seq).await.expect("durable");
        let after = shared
            .flush
            .inner
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            after - before,
            1,
            "the plugin's flush served the store's write: no second flush"
        );
        // A write after the plugin's flush still gets a flush of its own.
        let ((), seq) = store
            .write_unflushed(|txn| {
                txn.put_object(&ns("a"), &ObjectKind::Leases, "m", &2)?;
                Ok(())
            })
            .expect("write");
        store.durable(seq).await.expect("durable");
        assert_eq!(
            shared
                .flush
                .inner
                .flushes
                .load(std::sync::atomic::Ordering::Relaxed),
            after + 1
        );
    }

    #[test]
    fn migrations_are_ordered_and_end_at_the_schema_version() {
        let mut previous = 0;
        for m in MIGRATIONS {
            assert_eq!(m.to, previous + 1, "{}", m.name);
            previous = m.to;
        }
        assert_eq!(previous, SCHEMA_VERSION);
    }

    #[test]
    fn migrations_run_in_order_once_and_a_newer_store_is_refused() {
        const V2: &[Migration] = &[
            Migration {
                to: 1,
                name: "initial",
                apply: |_| Ok(()),
            },
            Migration {
                to: 2,
                name: "add a marker",
                apply: |txn| {
                    assert!(txn.get(b"m\0marker")?.is_none(), "runs once");
                    txn.put(b"m\0marker".to_vec(), b"2".to_vec());
                    Ok(())
                },
            },
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta");
        {
            let store = open_migrated(&path, &MIGRATIONS[..1]);
            assert_eq!(store.schema_version().expect("v"), 1);
        }
        {
            let store = open_migrated(&path, V2);
            assert_eq!(store.schema_version().expect("v"), 2);
            assert_eq!(
                store.get_raw(b"m\0marker").expect("get"),
                Some(b"2".to_vec())
            );
        }
        {
            let store = open_migrated(&path, V2);
            assert_eq!(store.schema_version().expect("v"), 2);
        }
        let err = crate::testing::open_when_unlocked(|| {
            MetaStore::open_with(&path, &MetadataConfig::default(), &MIGRATIONS[..1])
        })
        .expect_err("newer");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[tokio::test]
    async fn any_bytes_in_ids_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let a = ns("a");
        let ids = ["nul\0inside", "esc\u{1}ape", "\u{1}\0\u{1}\u{2}", "plain"];
        store
            .write(|txn| {
                for (i, id) in ids.iter().enumerate() {
                    txn.put_object(&a, &ObjectKind::Ingests, id, &i)?;
                }
                Ok(())
            })
            .await
            .expect("put");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                store
                    .get_object::<usize>(&a, &ObjectKind::Ingests, id)
                    .expect("get"),
                Some(i)
            );
        }
        let mut listed: Vec<String> = store
            .list_objects::<usize>(&a, &ObjectKind::Ingests)
            .expect("list")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        listed.sort();
        let mut expected: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(listed, expected);
    }
}
