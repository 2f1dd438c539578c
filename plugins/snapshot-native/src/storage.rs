//! The snapshotter's own metadata: which keys exist, their numeric ids, kinds, parents,
//! labels and times, in a sled tree (containerd keeps the same facts in `metadata.db` under
//! the snapshotter's root, `core/snapshots/storage/bolt.go`).
//!
//! # Where
//!
//! - Served outside berthd (a proxy, [`SnapshotStore::open`]): the tree `snapshots.v1` of the
//!   store's own database, `<root>/metadata.sled`, with a redo log of its own
//!   (`berth_core::metadata::redo`), as the core's database has.
//! - Compiled into berthd ([`SnapshotStore::open_shared`]): a tree of the core's metadata
//!   database, the one the metadata layer keeps its namespaced records in. One sync of the
//!   database's redo log makes every write logged before it durable, so the flush that makes
//!   this store's write durable also covers the metadata layer's record written just before
//!   it: one flush per Prepare, View or Commit instead of one per database. A
//!   `<root>/metadata.sled` found at open (an older berth's) is copied into the tree,
//!   flushed, and removed, once.
//!
//! # Layout
//!
//! The same keys in either place:
//!
//! ```text
//! m \0 schema                         -> u32 big-endian: the schema version
//! m \0 next-id                        -> u64 big-endian: the last id reserved (ids are
//!                                        reserved in blocks; none up to it is handed out
//!                                        again)
//! s \0 <key bytes>                    -> SnapshotRecord (JSON): id, kind, parent key, labels,
//!                                        created/updated, usage (committed snapshots)
//! c \0 <parent id BE> <child id BE>   -> the child's key: the children index, so a parent
//!                                        with children is found without a scan
//! ```
//!
//! Keys are stored as raw bytes after the prefix: any text, `/`, `..` and NUL included, is a
//! key and never a path. On disk a snapshot is `snapshots/<id>` (the id in decimal); ids are
//! never reused, so a directory left by a removal can never be mistaken for a new snapshot.
//!
//! # Writes
//!
//! Writers take one lock, read what they need, and apply their keys atomically (through the
//! tree's journal, so the children index never disagrees with the records) and log them in
//! the redo log; file-system steps that must agree with the records (renaming a new
//! snapshot's directory into place, listing orphan directories) run under the same lock. A
//! call returns after the redo log was synced (but for a removal in the shared database, see
//! [`SnapshotStore::remove`]). Ids are reserved in blocks, so the id counter is written once
//! per block, not with every record.
//!
//! # Schema versions
//!
//! [`SCHEMA_VERSION`] is stored under `m\0schema`; opening a store written by a newer berth is
//! refused. Version 1 is the first layout, so there is nothing to migrate yet.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use berth_core::error::{Error, ErrorKind, Result};
use berth_core::filters::Filter;
use berth_core::labels::{self, Labels};
use berth_core::metadata::redo::RedoLog;
use berth_core::metadata::{SharedTree, open_redo_log, open_sled};
use berth_core::snapshot::{SnapshotInfo, SnapshotKind, Usage};
use serde::{Deserialize, Serialize};

/// The schema version this berth writes.
pub const SCHEMA_VERSION: u32 = 1;

const TREE: &str = "snapshots.v1";
const SCHEMA_KEY: &[u8] = b"m\0schema";
const NEXT_ID_KEY: &[u8] = b"m\0next-id";
const SNAPSHOT_PREFIX: &[u8] = b"s\0";
const CHILD_PREFIX: &[u8] = b"c\0";

/// Longest parent chain followed before the store is taken to be corrupt (a loop).
const MAX_CHAIN: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoredKind {
    View,
    Active,
    Committed,
}

impl From<StoredKind> for SnapshotKind {
    fn from(k: StoredKind) -> Self {
        match k {
            StoredKind::View => SnapshotKind::View,
            StoredKind::Active => SnapshotKind::Active,
            StoredKind::Committed => SnapshotKind::Committed,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct StoredUsage {
    size: i64,
    inodes: i64,
}

/// One snapshot as stored (JSON, so fields can be added with defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotRecord {
    id: u64,
    kind: StoredKind,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    labels: Labels,
    created_at: SystemTime,
    updated_at: SystemTime,
    /// Measured at commit: a committed snapshot's directory never changes again.
    #[serde(default)]
    usage: Option<StoredUsage>,
}

/// A snapshot's record as the snapshotter needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its numeric id: its directory is `snapshots/<id>`.
    pub id: u64,
    /// Its info (name, parent, kind, labels, times).
    pub info: SnapshotInfo,
    /// The usage measured at commit (zero for active snapshots and views).
    pub usage: Usage,
}

/// An active snapshot or view with its ancestry, enough to compute its mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its id.
    pub id: u64,
    /// Active or view.
    pub kind: SnapshotKind,
    /// Ids of its parent, grandparent, ... (nearest first).
    pub parent_ids: Vec<u64>,
}

/// The metadata store of one snapshotter.
pub struct SnapshotStore {
    backing: Backing,
    tree: sled::Tree,
    writer: Mutex<()>,
    ids: Mutex<IdState>,
    path: PathBuf,
}

/// Ids are reserved [`ID_BLOCK`] at a time: the stored counter is the last id reserved, so
/// most creations write their record alone (see [`SnapshotStore::apply`]). Reserved ids a
/// restart skips are never handed out.
#[derive(Debug, Default)]
struct IdState {
    /// The next id to hand out; 0 until the stored counter was read.
    next: u64,
    /// The last id the stored counter covers.
    reserved: u64,
}

/// How many ids one write of the counter reserves.
const ID_BLOCK: u64 = 1024;

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Whose database the tree is in, which decides how a write is flushed.
enum Backing {
    /// `<root>/metadata.sled`, the store's own (a snapshotter served outside berthd), with
    /// a redo log of its own, as the core's database has.
    Own(RedoLog),
    /// A tree of the core's metadata database (a compiled-in snapshotter in berthd).
    Shared(SharedTree),
}

fn snapshot_key(key: &str) -> Vec<u8> {
    [SNAPSHOT_PREFIX, key.as_bytes()].concat()
}

fn child_key(parent: u64, child: u64) -> Vec<u8> {
    [CHILD_PREFIX, &parent.to_be_bytes(), &child.to_be_bytes()].concat()
}

fn children_prefix(parent: u64) -> Vec<u8> {
    [CHILD_PREFIX, &parent.to_be_bytes()].concat()
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::DataLoss,
        format!("snapshotter metadata is corrupt: {what}"),
    )
}

fn sled_error(err: sled::Error) -> Error {
    Error::internal(format!("snapshotter metadata store: {err}"))
}

fn encode(record: &SnapshotRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|e| Error::internal(format!("encode snapshot record: {e}")))
}

fn decode(key: &str, bytes: &[u8]) -> Result<SnapshotRecord> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(format!("record of {key:?}: {e}")))
}

fn not_found(key: &str) -> Error {
    Error::not_found(format!("snapshot {key:?} does not exist"))
}

/// Fields of a snapshot for filters, as containerd's `adaptSnapshot`.
pub fn snapshot_field(info: &SnapshotInfo, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str)? {
        "name" => Some(info.name.clone()),
        "parent" => info.parent.clone(),
        "kind" => Some(info.kind.name().to_owned()),
        "labels" => info.labels.get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

/// Applies an Update's field paths to `labels`, as containerd's `storage.UpdateInfo`: no path
/// or `labels` replaces them all, `labels.<key>` sets one (an absent or empty value removes
/// it), anything else is InvalidArgument (only labels can change).
pub fn apply_label_paths(
    labels: &mut Labels,
    requested: &Labels,
    paths: &[String],
    key: &str,
) -> Result<()> {
    if paths.is_empty() {
        *labels = requested.clone();
    }
    for path in paths {
        if path == "labels" {
            *labels = requested.clone();
        } else if let Some(label) = path.strip_prefix("labels.") {
            match requested.get(label).filter(|v| !v.is_empty()) {
                Some(v) => {
                    labels.insert(label.to_owned(), v.clone());
                }
                None => {
                    labels.remove(label);
                }
            }
        } else {
            return Err(Error::invalid_argument(format!(
                "cannot update {path:?} field on snapshot {key:?}: only labels can change"
            )));
        }
    }
    labels::validate_all(labels)
}

impl SnapshotStore {
    /// Opens (creating) the store in the directory `dir`. Blocking.
    pub fn open(dir: &Path) -> Result<SnapshotStore> {
        let db = open_sled(sled::Config::new().path(dir), dir, "snapshotter metadata")?;
        let redo = open_redo_log(&db, dir)?;
        let tree = db.open_tree(TREE).map_err(sled_error)?;
        let store = SnapshotStore {
            backing: Backing::Own(redo),
            tree,
            writer: Mutex::new(()),
            ids: Mutex::new(IdState::default()),
            path: dir.to_owned(),
        };
        store.check_schema()?;
        Ok(store)
    }

    /// Opens the store in `shared`, a tree of the core's metadata database, so that a write's
    /// flush also makes the metadata layer's pending records durable (one flush per call).
    /// A store the snapshotter kept in its own database at `legacy_dir` (`<root>/metadata.sled`,
    /// written by an older berth or by this snapshotter served outside berthd) is copied in
    /// once, flushed, and then removed. Blocking.
    pub fn open_shared(shared: SharedTree, legacy_dir: &Path) -> Result<SnapshotStore> {
        let store = SnapshotStore {
            tree: shared.tree().clone(),
            path: shared.path().to_owned(),
            backing: Backing::Shared(shared),
            writer: Mutex::new(()),
            ids: Mutex::new(IdState::default()),
        };
        if legacy_dir.exists() {
            store.migrate_from(legacy_dir)?;
        }
        store.check_schema()?;
        store.repair_split_commits()?;
        Ok(store)
    }

    /// An earlier berth wrote a commit's keys in the shared database one by one (before
    /// writes of several keys went through the tree's journal): the committed record first,
    /// the active one's removal last. sled recovers a prefix of its log, so a crash in between
    /// left both records with the same id, never the removal alone. Such a pair is settled
    /// here, at open and before anything can use the active record: the committed one stays
    /// (the metadata layer's commit intent names it as done), the active one goes, and the
    /// directory they share is kept.
    fn repair_split_commits(&self) -> Result<()> {
        let mut by_id: std::collections::BTreeMap<u64, Vec<(Vec<u8>, StoredKind)>> =
            std::collections::BTreeMap::new();
        for entry in self.tree.scan_prefix(SNAPSHOT_PREFIX) {
            let (k, v) = entry.map_err(sled_error)?;
            let key = String::from_utf8_lossy(&k[SNAPSHOT_PREFIX.len()..]).into_owned();
            let record = decode(&key, &v)?;
            by_id
                .entry(record.id)
                .or_default()
                .push((k.to_vec(), record.kind));
        }
        let mut repaired = 0usize;
        for (id, records) in by_id {
            if records.len() < 2 || !records.iter().any(|(_, k)| *k == StoredKind::Committed) {
                continue;
            }
            for (key, kind) in records {
                if kind == StoredKind::Active {
                    tracing::info!(id, key = %String::from_utf8_lossy(&key[SNAPSHOT_PREFIX.len()..]), "dropping the active record of a snapshot commit a crash cut off after its committed record");
                    self.apply(vec![(key, None)])?;
                    repaired += 1;
                }
            }
        }
        if repaired > 0 {
            self.flush()?;
        }
        Ok(())
    }

    /// Copies the records of the store at `dir` into this (empty) one, flushes, and removes
    /// `dir`. A crash before the flush leaves `dir` to copy again; after it, the copy has the
    /// schema record, so the next start only removes `dir`.
    fn migrate_from(&self, dir: &Path) -> Result<()> {
        if self.tree.get(SCHEMA_KEY).map_err(sled_error)?.is_none() {
            let old = SnapshotStore::open(dir)?;
            let mut ops = Vec::new();
            for entry in old.tree.iter() {
                let (k, v) = entry.map_err(sled_error)?;
                ops.push((k.to_vec(), Some(v.to_vec())));
            }
            drop(old);
            let records = ops.len();
            self.apply(ops)?;
            self.flush()?;
            tracing::info!(from = %dir.display(), into = %self.path.display(), records, "snapshotter metadata moved into the core's metadata database");
        } else {
            tracing::info!(path = %dir.display(), "removing snapshotter metadata already moved into the core's metadata database");
        }
        std::fs::remove_dir_all(dir).map_err(|e| {
            Error::internal(format!(
                "cannot remove the moved snapshotter metadata {}: {e}: remove it by hand",
                dir.display()
            ))
        })
    }

    /// Writes the schema version into a new store; refuses one written by a newer berth.
    /// (Writes a crash cut off were finished when the database was opened, by
    /// `open_redo_log`, before it replayed its redo log.)
    fn check_schema(&self) -> Result<()> {
        let store = self;
        let dir = &self.path;
        match store.tree.get(SCHEMA_KEY).map_err(sled_error)? {
            None => {
                store.apply(vec![(
                    SCHEMA_KEY.to_vec(),
                    Some(SCHEMA_VERSION.to_be_bytes().to_vec()),
                )])?;
                store.flush()?;
            }
            Some(bytes) => {
                let raw: [u8; 4] = bytes
                    .as_ref()
                    .try_into()
                    .map_err(|_| corrupt("schema version record"))?;
                let version = u32::from_be_bytes(raw);
                if version > SCHEMA_VERSION {
                    return Err(Error::failed_precondition(format!(
                        "snapshotter metadata {} has schema version {version}, newer than this \
                         berth's {SCHEMA_VERSION}: run a berth at least as new as the one that \
                         wrote it",
                        dir.display()
                    )));
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn flush(&self) -> Result<()> {
        match &self.backing {
            Backing::Own(redo) => redo.sync(),
            Backing::Shared(shared) => shared.flush(),
        }
    }

    fn record(&self, key: &str) -> Result<Option<SnapshotRecord>> {
        match self.tree.get(snapshot_key(key)).map_err(sled_error)? {
            None => Ok(None),
            Some(bytes) => decode(key, &bytes).map(Some),
        }
    }

    fn info(key: &str, record: &SnapshotRecord) -> SnapshotInfo {
        SnapshotInfo {
            name: key.to_owned(),
            parent: record.parent.clone(),
            kind: record.kind.into(),
            created_at: record.created_at,
            updated_at: record.updated_at,
            labels: record.labels.clone(),
        }
    }

    fn stored(key: &str, record: &SnapshotRecord) -> Stored {
        let usage = record.usage.unwrap_or_default();
        Stored {
            id: record.id,
            info: Self::info(key, record),
            usage: Usage {
                size: usage.size,
                inodes: usage.inodes,
            },
        }
    }

    /// Ids of `parent` and its ancestors, nearest first.
    fn chain(&self, parent: &str) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        let mut next = Some(parent.to_owned());
        while let Some(key) = next {
            if ids.len() > MAX_CHAIN {
                return Err(corrupt(format!("the parents of {parent:?} form a loop")));
            }
            let record = self
                .record(&key)?
                .ok_or_else(|| corrupt(format!("ancestor {key:?} of {parent:?} is missing")))?;
            ids.push(record.id);
            next = record.parent;
        }
        Ok(ids)
    }

    /// The record of `key`.
    pub fn get(&self, key: &str) -> Result<Stored> {
        let record = self.record(key)?.ok_or_else(|| not_found(key))?;
        Ok(Self::stored(key, &record))
    }

    /// The active snapshot or view `key` with its ancestry; a committed one is
    /// FailedPrecondition (it has no mounts of its own), as containerd's `GetSnapshot`.
    pub fn snapshot(&self, key: &str) -> Result<Snapshot> {
        let record = self.record(key)?.ok_or_else(|| not_found(key))?;
        if record.kind == StoredKind::Committed {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is committed: only active snapshots and views have mounts"
            )));
        }
        let parent_ids = match &record.parent {
            Some(p) => self.chain(p)?,
            None => Vec::new(),
        };
        Ok(Snapshot {
            id: record.id,
            kind: record.kind.into(),
            parent_ids,
        })
    }

    /// Checks that `key` can be created on `parent` and returns the parent chain's ids.
    /// Read-only, so a caller can do slow preparation (a copy) before [`Self::create`], which
    /// checks again.
    pub fn check_create(&self, key: &str, parent: Option<&str>) -> Result<Vec<u64>> {
        if key.is_empty() {
            return Err(Error::invalid_argument("snapshot key must not be empty"));
        }
        if self.record(key)?.is_some() {
            return Err(Error::already_exists(format!("snapshot {key:?}")));
        }
        let Some(parent) = parent else {
            return Ok(Vec::new());
        };
        let record = self.record(parent)?.ok_or_else(|| {
            Error::not_found(format!("parent snapshot {parent:?} does not exist"))
        })?;
        if record.kind != StoredKind::Committed {
            return Err(Error::invalid_argument(format!(
                "parent snapshot {parent:?} is not committed"
            )));
        }
        self.chain(parent)
    }

    /// Records a new active snapshot or view. `place` runs under the writer lock once the id
    /// is known and before the record is written (to move the snapshot's directory into
    /// place); if it fails nothing is recorded.
    pub fn create(
        &self,
        kind: SnapshotKind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
        place: impl FnOnce(&Snapshot) -> Result<()>,
    ) -> Result<Snapshot> {
        let stored_kind = match kind {
            SnapshotKind::Active => StoredKind::Active,
            SnapshotKind::View => StoredKind::View,
            other => {
                return Err(Error::invalid_argument(format!(
                    "snapshot kind {other} cannot be created: only active snapshots and views"
                )));
            }
        };
        labels::validate_all(&labels)?;
        let snapshot = {
            let _writer = self.lock();
            let parent_ids = self.check_create(key, parent)?;
            let id = self.next_id()?;
            let snapshot = Snapshot {
                id,
                kind,
                parent_ids,
            };
            place(&snapshot)?;
            let now = SystemTime::now();
            let record = SnapshotRecord {
                id,
                kind: stored_kind,
                parent: parent.map(str::to_owned),
                labels,
                created_at: now,
                updated_at: now,
                usage: None,
            };
            let mut ops = vec![(snapshot_key(key), Some(encode(&record)?))];
            let reserve = (id > self.reserved()).then(|| id + ID_BLOCK - 1);
            if let Some(reserve) = reserve {
                ops.push((NEXT_ID_KEY.to_vec(), Some(reserve.to_be_bytes().to_vec())));
            }
            if let Some(&pid) = snapshot.parent_ids.first() {
                ops.push((child_key(pid, id), Some(key.as_bytes().to_vec())));
            }
            self.apply(ops)?;
            let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
            ids.next = id + 1;
            if let Some(reserve) = reserve {
                ids.reserved = reserve;
            }
            snapshot
        };
        self.flush()?;
        Ok(snapshot)
    }

    /// The id the next creation gets (called under the writer lock).
    fn next_id(&self) -> Result<u64> {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if ids.next == 0 {
            // First creation since open: ids up to the stored mark may have been handed out.
            let stored = self.last_id()?;
            *ids = IdState {
                next: stored + 1,
                reserved: stored,
            };
        }
        Ok(ids.next)
    }

    fn reserved(&self) -> u64 {
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reserved
    }

    /// Applies `ops` atomically without a sled batch (see `berth_core::metadata::journal`)
    /// and logs them in the database's redo log. Durable after the next flush. Every write of
    /// the store goes through here.
    fn apply(&self, ops: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<()> {
        match &self.backing {
            Backing::Own(redo) => redo.write(&self.tree, ops),
            Backing::Shared(shared) => shared.apply(ops),
        }
    }

    fn last_id(&self) -> Result<u64> {
        match self.tree.get(NEXT_ID_KEY).map_err(sled_error)? {
            None => Ok(0),
            Some(bytes) => {
                let raw: [u8; 8] = bytes
                    .as_ref()
                    .try_into()
                    .map_err(|_| corrupt("id counter"))?;
                Ok(u64::from_be_bytes(raw))
            }
        }
    }

    /// Turns the active snapshot `key` into the committed snapshot `name` (same id and
    /// directory), with `labels` (replacing the active's, as containerd's `CommitActive`) and
    /// the usage measured by the caller. Returns the id.
    pub fn commit(&self, key: &str, name: &str, labels: Labels, usage: Usage) -> Result<u64> {
        if name.is_empty() {
            return Err(Error::invalid_argument(
                "committed snapshot name must not be empty",
            ));
        }
        labels::validate_all(&labels)?;
        let id = {
            let _writer = self.lock();
            let mut record = self.record(key)?.ok_or_else(|| not_found(key))?;
            if record.kind != StoredKind::Active {
                return Err(Error::failed_precondition(format!(
                    "snapshot {key:?} is a {} snapshot: only active snapshots can be committed",
                    SnapshotKind::from(record.kind)
                )));
            }
            if self.record(name)?.is_some() {
                return Err(Error::already_exists(format!("snapshot {name:?}")));
            }
            let now = SystemTime::now();
            record.kind = StoredKind::Committed;
            record.labels = labels;
            record.created_at = now;
            record.updated_at = now;
            record.usage = Some(StoredUsage {
                size: usage.size,
                inodes: usage.inodes,
            });
            let mut ops = vec![(snapshot_key(name), Some(encode(&record)?))];
            if let Some(parent) = &record.parent {
                let pid = self
                    .record(parent)?
                    .ok_or_else(|| corrupt(format!("parent {parent:?} of {key:?} is missing")))?
                    .id;
                ops.push((child_key(pid, record.id), Some(name.as_bytes().to_vec())));
            }
            ops.push((snapshot_key(key), None));
            self.apply(ops)?;
            record.id
        };
        self.flush()?;
        Ok(id)
    }

    /// Forgets `key`; a snapshot with children is FailedPrecondition. Returns its id and kind
    /// so the caller can remove its directory.
    pub fn remove(&self, key: &str) -> Result<(u64, SnapshotKind)> {
        let removed = {
            let _writer = self.lock();
            let record = self.record(key)?.ok_or_else(|| not_found(key))?;
            if let Some(child) = self.tree.scan_prefix(children_prefix(record.id)).next() {
                let (_, child) = child.map_err(sled_error)?;
                return Err(Error::failed_precondition(format!(
                    "cannot remove snapshot {key:?}: it has children (for example {:?})",
                    String::from_utf8_lossy(&child)
                )));
            }
            let mut ops = vec![(snapshot_key(key), None)];
            if let Some(parent) = &record.parent
                && let Some(p) = self.record(parent)?
            {
                ops.push((child_key(p.id, record.id), None));
            }
            self.apply(ops)?;
            (record.id, record.kind.into())
        };
        match &self.backing {
            Backing::Own(..) => self.flush()?,
            // In berthd only the metadata layer's collection removes backend snapshots, and
            // only those no namespace record names (backend keys are never reused): a removal
            // a crash loses brings back a record nothing names, which the next collection
            // removes again. Not flushing spares a collection one synced log write per
            // snapshot, while it holds Prepare and Commit off. The next flush of the database
            // makes the removal durable.
            Backing::Shared(_) => {}
        }
        Ok(removed)
    }

    /// Changes the labels of `info.name` by `fieldpaths`; returns the new record.
    pub fn update(&self, info: &SnapshotInfo, fieldpaths: &[String]) -> Result<Stored> {
        let key = info.name.as_str();
        let stored = {
            let _writer = self.lock();
            let mut record = self.record(key)?.ok_or_else(|| not_found(key))?;
            apply_label_paths(&mut record.labels, &info.labels, fieldpaths, key)?;
            record.updated_at = SystemTime::now();
            self.apply(vec![(snapshot_key(key), Some(encode(&record)?))])?;
            Self::stored(key, &record)
        };
        self.flush()?;
        Ok(stored)
    }

    /// Every snapshot matching `filter`, ordered by key.
    pub fn list(&self, filter: &Filter) -> Result<Vec<Stored>> {
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix(SNAPSHOT_PREFIX) {
            let (k, v) = entry.map_err(sled_error)?;
            let key = std::str::from_utf8(&k[SNAPSHOT_PREFIX.len()..])
                .map_err(|_| corrupt("a key is not UTF-8"))?;
            let stored = Self::stored(key, &decode(key, &v)?);
            if filter.matches(&|path: &[String]| snapshot_field(&stored.info, path)) {
                out.push(stored);
            }
        }
        Ok(out)
    }

    /// Runs `f` with the ids of every recorded snapshot while no writer can change them
    /// (to find directories that belong to no snapshot).
    pub fn with_ids<T>(&self, f: impl FnOnce(&BTreeSet<u64>) -> Result<T>) -> Result<T> {
        let _writer = self.lock();
        let mut ids = BTreeSet::new();
        for entry in self.tree.scan_prefix(SNAPSHOT_PREFIX) {
            let (k, v) = entry.map_err(sled_error)?;
            let key = String::from_utf8_lossy(&k[SNAPSHOT_PREFIX.len()..]).into_owned();
            ids.insert(decode(&key, &v)?.id);
        }
        f(&ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::error::Classify;

    fn open() -> (tempfile::TempDir, SnapshotStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open(&dir.path().join("meta")).expect("open");
        (dir, store)
    }

    fn ok(_: &Snapshot) -> Result<()> {
        Ok(())
    }

    #[test]
    fn keys_are_bytes_and_children_are_indexed() {
        let (_dir, s) = open();
        let odd = "a/../../b\0c";
        s.create(SnapshotKind::Active, odd, None, Labels::new(), ok)
            .expect("create");
        s.commit(odd, "base/1", Labels::new(), Usage::default())
            .expect("commit");
        let child = s
            .create(SnapshotKind::Active, "c", Some("base/1"), Labels::new(), ok)
            .expect("child");
        assert_eq!(child.parent_ids, vec![1]);
        assert_eq!(
            s.remove("base/1").expect_err("has a child").kind(),
            ErrorKind::FailedPrecondition
        );
        s.commit("c", "top", Labels::new(), Usage::default())
            .expect("commit child");
        // The index follows the commit: the parent still has a child.
        assert_eq!(
            s.remove("base/1").expect_err("has a child").kind(),
            ErrorKind::FailedPrecondition
        );
        s.remove("top").expect("remove top");
        s.remove("base/1").expect("remove base");
        assert!(s.list(&Filter::default()).expect("list").is_empty());
    }

    #[test]
    fn ids_are_never_reused_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SnapshotStore::open(&dir.path().join("meta")).expect("open");
            let a = s
                .create(SnapshotKind::Active, "a", None, Labels::new(), ok)
                .expect("a");
            s.remove("a").expect("remove");
            let b = s
                .create(SnapshotKind::View, "a", None, Labels::new(), ok)
                .expect("b");
            assert!(b.id > a.id);
        }
        let s = reopen(&dir.path().join("meta"));
        assert_eq!(s.get("a").expect("get").info.kind, SnapshotKind::View);
        let c = s
            .create(SnapshotKind::Active, "c", None, Labels::new(), ok)
            .expect("c");
        assert!(c.id > 2, "ids handed out before the restart are not reused");
    }

    /// Opens the store at `dir` once sled's file lock is free.
    fn open_when_unlocked(dir: &Path) -> Result<SnapshotStore> {
        berth_core::testing::open_when_unlocked(|| SnapshotStore::open(dir))
    }

    fn reopen(dir: &Path) -> SnapshotStore {
        open_when_unlocked(dir).expect("reopen")
    }

    #[test]
    fn an_own_database_moves_into_the_shared_tree_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let legacy = dir.path().join("metadata.sled");
        {
            let s = SnapshotStore::open(&legacy).expect("open own");
            s.create(SnapshotKind::Active, "base", None, Labels::new(), ok)
                .expect("base");
            s.commit("base", "layer", Labels::new(), Usage { size: 7, inodes: 2 })
                .expect("commit");
            s.create(
                SnapshotKind::Active,
                "top",
                Some("layer"),
                Labels::new(),
                ok,
            )
            .expect("top");
        }
        // Wait until the old database can be opened again (see `reopen`), as a new process
        // always can.
        drop(reopen(&legacy));
        let shared = berth_core::metadata::SharedDb::open(&dir.path().join("meta"), false)
            .expect("shared db");
        let s = SnapshotStore::open_shared(shared.tree("snapshots").expect("tree"), &legacy)
            .expect("migrate");
        assert!(
            !legacy.exists(),
            "the old database is removed after the move"
        );
        let layer = s.get("layer").expect("moved record");
        assert_eq!(layer.info.kind, SnapshotKind::Committed);
        assert_eq!(layer.usage.size, 7);
        assert_eq!(
            s.snapshot("top").expect("active").parent_ids,
            vec![layer.id],
            "ids and the children index moved too"
        );
        assert_eq!(
            s.remove("layer").expect_err("has a child").kind(),
            ErrorKind::FailedPrecondition
        );
        let next = s
            .create(SnapshotKind::Active, "new", None, Labels::new(), ok)
            .expect("new");
        assert!(next.id > layer.id, "ids are not reused after the move");
        // Opening again finds nothing to move and keeps the records.
        drop(s);
        let s = SnapshotStore::open_shared(shared.tree("snapshots").expect("tree"), &legacy)
            .expect("reopen shared");
        assert_eq!(s.list(&Filter::default()).expect("list").len(), 3);
    }

    #[test]
    fn a_move_cut_off_after_its_flush_only_removes_the_old_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let legacy = dir.path().join("metadata.sled");
        let shared = berth_core::metadata::SharedDb::open(&dir.path().join("meta"), false)
            .expect("shared db");
        {
            let s = SnapshotStore::open_shared(shared.tree("snapshots").expect("tree"), &legacy)
                .expect("fresh shared");
            s.create(SnapshotKind::Active, "kept", None, Labels::new(), ok)
                .expect("kept");
        }
        // What a crash between the copy's flush and the removal leaves: the old database
        // (here with a stale record) next to a shared tree that has the records.
        {
            let old = SnapshotStore::open(&legacy).expect("old");
            old.create(SnapshotKind::Active, "stale", None, Labels::new(), ok)
                .expect("stale");
        }
        drop(reopen(&legacy));
        let s = SnapshotStore::open_shared(shared.tree("snapshots").expect("tree"), &legacy)
            .expect("open");
        assert!(!legacy.exists());
        assert!(s.get("kept").is_ok());
        assert_eq!(
            s.get("stale").expect_err("not copied twice").kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn a_commit_cut_off_between_its_keys_is_settled_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let legacy = dir.path().join("metadata.sled");
        let shared = berth_core::metadata::SharedDb::open(&dir.path().join("meta"), false)
            .expect("shared db");
        let tree = shared.tree("snapshots").expect("tree");
        let id = {
            let s = SnapshotStore::open_shared(tree.clone(), &legacy).expect("open");
            s.create(SnapshotKind::Active, "base", None, Labels::new(), ok)
                .expect("base");
            s.commit("base", "layer", Labels::new(), Usage::default())
                .expect("commit");
            s.create(SnapshotKind::Active, "active", None, Labels::new(), ok)
                .expect("active")
                .id
        };
        // What survives a crash after the committed record of "active" reached the log but
        // before its removal did: both records, one id.
        let mut committed: SnapshotRecord = serde_json::from_slice(
            &tree
                .tree()
                .get(snapshot_key("active"))
                .expect("get")
                .expect("record"),
        )
        .expect("decode");
        committed.kind = StoredKind::Committed;
        tree.tree()
            .insert(snapshot_key("done"), encode(&committed).expect("encode"))
            .expect("insert");
        let s = SnapshotStore::open_shared(tree, &legacy).expect("reopen");
        assert_eq!(
            s.get("active").expect_err("settled").kind(),
            ErrorKind::NotFound
        );
        let done = s.get("done").expect("committed stays");
        assert_eq!((done.id, done.info.kind), (id, SnapshotKind::Committed));
        assert_eq!(
            s.get("layer").expect("untouched").info.kind,
            SnapshotKind::Committed
        );
    }

    #[test]
    fn a_failed_place_records_nothing() {
        let (_dir, s) = open();
        let err = s
            .create(SnapshotKind::Active, "k", None, Labels::new(), |_| {
                Err(Error::internal("no room"))
            })
            .expect_err("place fails");
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert_eq!(s.get("k").expect_err("gone").kind(), ErrorKind::NotFound);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SnapshotStore::open(&dir.path().join("meta")).expect("open");
            s.apply(vec![(
                SCHEMA_KEY.to_vec(),
                Some((SCHEMA_VERSION + 1).to_be_bytes().to_vec()),
            )])
            .expect("write");
            s.flush().expect("flush");
        }
        let err = open_when_unlocked(&dir.path().join("meta")).expect_err("newer");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    }

    #[test]
    fn label_paths_as_containerd() {
        let mut labels: Labels = [("l1", "v1"), ("l2", "v2"), ("l3", "v3")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let requested: Labels = [("l1", "updated"), ("l4", "v4")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        apply_label_paths(
            &mut labels,
            &requested,
            &["labels.l1".into(), "labels.l2".into()],
            "k",
        )
        .expect("apply");
        assert_eq!(
            labels.into_iter().collect::<Vec<_>>(),
            [
                ("l1".to_owned(), "updated".to_owned()),
                ("l3".to_owned(), "v3".to_owned())
            ]
        );
        let err = apply_label_paths(&mut Labels::new(), &requested, &["parent".into()], "k")
            .expect_err("parent is immutable");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }
}
