//! The snapshotter's own metadata: which keys exist, their numeric ids, kinds, parents,
//! labels and times, in a sled tree under the snapshotter's root (containerd keeps the same
//! facts in `metadata.db`, `core/snapshots/storage/bolt.go`).
//!
//! # Layout
//!
//! One sled tree, `snapshots.v1`, in `<root>/metadata.sled`:
//!
//! ```text
//! m \0 schema                         -> u32 big-endian: the schema version
//! m \0 next-id                        -> u64 big-endian: the last id handed out
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
//! Writers take one lock, read what they need, and apply one atomic sled batch (so the
//! children index never disagrees with the records); file-system steps that must agree with
//! the records (renaming a new snapshot's directory into place, listing orphan directories)
//! run under the same lock. A call returns after sled has flushed its batch to disk.
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
    db: sled::Db,
    tree: sled::Tree,
    writer: Mutex<()>,
    path: PathBuf,
}

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
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
        let db = sled::Config::new().path(dir).open().map_err(|e| match e {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => Error::new(
                ErrorKind::Unavailable,
                format!(
                    "snapshotter metadata {} is locked by another process: is another berthd \
                     using this root?",
                    dir.display()
                ),
            ),
            other => Error::internal(format!(
                "cannot open snapshotter metadata {}: {other}",
                dir.display()
            )),
        })?;
        let tree = db.open_tree(TREE).map_err(sled_error)?;
        let store = SnapshotStore {
            db,
            tree,
            writer: Mutex::new(()),
            path: dir.to_owned(),
        };
        match store.tree.get(SCHEMA_KEY).map_err(sled_error)? {
            None => {
                store
                    .tree
                    .insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())
                    .map_err(sled_error)?;
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
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(sled_error)
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
            let id = self.last_id()? + 1;
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
            let mut batch = sled::Batch::default();
            batch.insert(NEXT_ID_KEY, &id.to_be_bytes());
            batch.insert(snapshot_key(key), encode(&record)?);
            if let Some(&pid) = snapshot.parent_ids.first() {
                batch.insert(child_key(pid, id), key.as_bytes());
            }
            self.tree.apply_batch(batch).map_err(sled_error)?;
            snapshot
        };
        self.flush()?;
        Ok(snapshot)
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
            let mut batch = sled::Batch::default();
            batch.remove(snapshot_key(key));
            batch.insert(snapshot_key(name), encode(&record)?);
            if let Some(parent) = &record.parent {
                let pid = self
                    .record(parent)?
                    .ok_or_else(|| corrupt(format!("parent {parent:?} of {key:?} is missing")))?
                    .id;
                batch.insert(child_key(pid, record.id), name.as_bytes());
            }
            self.tree.apply_batch(batch).map_err(sled_error)?;
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
            let mut batch = sled::Batch::default();
            batch.remove(snapshot_key(key));
            if let Some(parent) = &record.parent
                && let Some(p) = self.record(parent)?
            {
                batch.remove(child_key(p.id, record.id));
            }
            self.tree.apply_batch(batch).map_err(sled_error)?;
            (record.id, record.kind.into())
        };
        self.flush()?;
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
            self.tree
                .insert(snapshot_key(key), encode(&record)?)
                .map_err(sled_error)?;
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
        // sled's background flusher can hold the file lock a moment after the store is
        // dropped in the same process; a restarted daemon is a new process and never waits.
        let mut reopened = SnapshotStore::open(&dir.path().join("meta"));
        for _ in 0..40 {
            if reopened.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            reopened = SnapshotStore::open(&dir.path().join("meta"));
        }
        let s = reopened.expect("reopen");
        assert_eq!(s.get("a").expect("get").info.kind, SnapshotKind::View);
        let c = s
            .create(SnapshotKind::Active, "c", None, Labels::new(), ok)
            .expect("c");
        assert_eq!(c.id, 3);
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
            s.tree
                .insert(SCHEMA_KEY, &(SCHEMA_VERSION + 1).to_be_bytes())
                .expect("insert");
            s.flush().expect("flush");
        }
        let err = SnapshotStore::open(&dir.path().join("meta")).expect_err("newer");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
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
