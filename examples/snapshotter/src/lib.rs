//! An example proxy snapshotter built on berth's proxy-sdk: what a vendor writes.
//!
//! [`CopySnapshotter`] is a "native" snapshotter: every active snapshot is a plain directory
//! holding a full copy of its parent, handed out as a `bind` mount (`rbind`, `rw`); a view
//! binds its parent's directory read-only instead of copying it. It works on any file system
//! and needs nothing but mounting binds, at the price of copying each layer's parent.
//!
//! On disk, under the root:
//!
//! - `snapshots/<id>/`: one directory per snapshot, named by a number, never by the key
//!   (keys are arbitrary text: `../x`, 1000 characters...);
//! - `metadata.json`: every snapshot's record (key, kind, parent, labels, times, id),
//!   replaced atomically (write, fsync, rename) after each change.
//!
//! Crash safety follows from the order of operations: a directory is made before its record
//! is written and removed after its record is gone, so a crash leaves at worst a directory
//! without a record, which [`Snapshotter::cleanup`] removes.
//!
//! All state sits behind one lock and every operation runs on tokio's blocking pool, so
//! operations are serialised: simple and correct, not fast (a production snapshotter would
//! copy outside the lock).

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use berth_proxy_sdk::snapshots::info_field;
use berth_proxy_sdk::{
    CallContext, Error, Filter, Labels, Mount, Result, SnapshotInfo, SnapshotKind, Snapshotter,
    Usage,
};
use serde::{Deserialize, Serialize};

/// The records file under the root.
const RECORDS: &str = "metadata.json";

/// A snapshot's kind as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Active,
    View,
    Committed,
}

impl From<Kind> for SnapshotKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Active => SnapshotKind::Active,
            Kind::View => SnapshotKind::View,
            Kind::Committed => SnapshotKind::Committed,
        }
    }
}

/// One snapshot as `metadata.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: u64,
    kind: Kind,
    parent: Option<String>,
    labels: Labels,
    created_at: SystemTime,
    updated_at: SystemTime,
}

/// Everything `metadata.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Records {
    /// The id the next snapshot gets (ids are never reused, so a leftover directory of a
    /// crashed creation can never be mistaken for a live snapshot's).
    next_id: u64,
    snapshots: BTreeMap<String, Record>,
}

struct Inner {
    root: PathBuf,
    records: Mutex<Records>,
}

/// The example's copying snapshotter (see the crate documentation).
#[derive(Clone)]
pub struct CopySnapshotter {
    inner: Arc<Inner>,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", path.display()))
}

fn not_found(key: &str) -> Error {
    Error::not_found(format!("snapshot {key:?} does not exist"))
}

impl CopySnapshotter {
    /// Opens (creating when absent) the snapshotter whose data lives under `root`.
    pub async fn open(root: &Path) -> Result<Self> {
        let root = root.to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(root))
            .await
            .map_err(|e| Error::internal(format!("open task failed: {e}")))?
    }

    fn open_blocking(root: PathBuf) -> Result<Self> {
        let snapshots = root.join("snapshots");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&snapshots)
            .map_err(|e| io_error("create directory", &snapshots, e))?;
        let path = root.join(RECORDS);
        let records = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::internal(format!(
                    "{} is not a valid records file ({e}): restore it from a backup, or remove \
                     the root to start empty",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Records::default(),
            Err(e) => return Err(io_error("read", &path, e)),
        };
        Ok(CopySnapshotter {
            inner: Arc::new(Inner {
                root,
                records: Mutex::new(records),
            }),
        })
    }

    /// Runs `op` on the blocking pool with the records locked.
    async fn locked<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Inner, &mut Records) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut records = inner.records.lock().unwrap_or_else(PoisonError::into_inner);
            op(&inner, &mut records)
        })
        .await
        .map_err(|e| Error::internal(format!("snapshot task failed: {e}")))?
    }

    async fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        let key = key.to_owned();
        let parent = parent.map(str::to_owned);
        self.locked(move |inner, records| {
            if key.is_empty() {
                return Err(Error::invalid_argument("a snapshot key must not be empty"));
            }
            if records.snapshots.contains_key(&key) {
                return Err(Error::already_exists(format!(
                    "snapshot {key:?} already exists"
                )));
            }
            let parent_id = match &parent {
                None => None,
                Some(p) => {
                    let record = records.snapshots.get(p).ok_or_else(|| {
                        Error::not_found(format!("parent snapshot {p:?} does not exist"))
                    })?;
                    if record.kind != Kind::Committed {
                        return Err(Error::invalid_argument(format!(
                            "parent snapshot {p:?} is not committed: commit it first"
                        )));
                    }
                    Some(record.id)
                }
            };
            let id = records.next_id;
            records.next_id += 1;
            // A view of a parent binds the parent's directory: it needs none of its own.
            let own_dir = !(kind == Kind::View && parent_id.is_some());
            if own_dir {
                let dir = inner.dir(id);
                make_dir(&dir)?;
                if let Some(parent_id) = parent_id
                    && let Err(e) = copy_tree(&inner.dir(parent_id), &dir)
                {
                    remove_dir(&dir);
                    return Err(e);
                }
            }
            let now = SystemTime::now();
            let record = Record {
                id,
                kind,
                parent,
                labels,
                created_at: now,
                updated_at: now,
            };
            let mounts = inner.mounts(records, &record);
            records.snapshots.insert(key.clone(), record);
            if let Err(e) = inner.save(records) {
                records.snapshots.remove(&key);
                if own_dir {
                    remove_dir(&inner.dir(id));
                }
                return Err(e);
            }
            Ok(mounts)
        })
        .await
    }
}

impl Inner {
    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The directory a snapshot's mounts show.
    fn source(&self, records: &Records, record: &Record) -> PathBuf {
        match (record.kind, &record.parent) {
            (Kind::View, Some(parent)) => match records.snapshots.get(parent) {
                Some(p) => self.dir(p.id),
                None => self.dir(record.id),
            },
            _ => self.dir(record.id),
        }
    }

    fn mounts(&self, records: &Records, record: &Record) -> Vec<Mount> {
        let access = if record.kind == Kind::View {
            "ro"
        } else {
            "rw"
        };
        vec![Mount {
            kind: "bind".to_owned(),
            source: self.source(records, record).display().to_string(),
            target: String::new(),
            options: vec!["rbind".to_owned(), access.to_owned()],
        }]
    }

    /// Replaces `metadata.json` atomically with `records`.
    fn save(&self, records: &Records) -> Result<()> {
        let path = self.root.join(RECORDS);
        let tmp = self.root.join(format!("{RECORDS}.tmp"));
        let bytes = serde_json::to_vec(records)
            .map_err(|e| Error::internal(format!("encode snapshot records: {e}")))?;
        let mut file = std::fs::File::create(&tmp).map_err(|e| io_error("create", &tmp, e))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_error("replace", &path, e))?;
        std::fs::File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("sync directory", &self.root, e))
    }
}

fn info(name: &str, record: &Record) -> SnapshotInfo {
    SnapshotInfo {
        name: name.to_owned(),
        parent: record.parent.clone(),
        kind: record.kind.into(),
        created_at: record.created_at,
        updated_at: record.updated_at,
        labels: record.labels.clone(),
    }
}

fn make_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(dir)
        .map_err(|e| io_error("create snapshot directory", dir, e))?;
    // The mode must not depend on the process's umask: a new root is 0755, as containerd's.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| io_error("set mode of", dir, e))
}

/// Removes a directory that is being given up; a failure only leaves work for cleanup.
fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), "cannot remove snapshot directory: {e}");
    }
}

/// Copies the tree `from` into the empty directory `to`, with owners, modes, times, hard
/// links, special files and extended attributes, and `from`'s own attributes onto `to`.
///
/// GNU `cp -a` does all of that and is on every system that runs containers; writing the walk
/// by hand (as berth's built-in native snapshotter does) is a few hundred lines more.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let output = std::process::Command::new("cp")
        .arg("-a")
        .arg("--no-target-directory")
        .arg(from.join("."))
        .arg(to)
        .output()
        .map_err(|e| Error::internal(format!("cannot run cp to copy {}: {e}", from.display())))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "copying {} to {} failed ({}): {}",
            from.display(),
            to.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Bytes of regular files (each inode once) and the number of inodes under `root`, itself
/// included, as containerd's native snapshotter counts them.
fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut size: u64 = 0;
    let mut pending = vec![root.to_owned()];
    let top = std::fs::symlink_metadata(root).map_err(|e| io_error("stat", root, e))?;
    seen.insert((top.dev(), top.ino()));
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| io_error("read directory", &dir, e))?;
        for entry in entries {
            let path = entry
                .map_err(|e| io_error("read directory", &dir, e))?
                .path();
            let meta = std::fs::symlink_metadata(&path).map_err(|e| io_error("stat", &path, e))?;
            if seen.insert((meta.dev(), meta.ino())) && meta.is_file() {
                size = size.saturating_add(meta.len());
            }
            if meta.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok(Usage {
        size: i64::try_from(size).unwrap_or(i64::MAX),
        inodes: i64::try_from(seen.len()).unwrap_or(i64::MAX),
    })
}

#[berth_proxy_sdk::async_trait]
impl Snapshotter for CopySnapshotter {
    async fn stat(&self, _cx: &CallContext, key: &str) -> Result<SnapshotInfo> {
        let key = key.to_owned();
        self.locked(move |_, records| {
            let record = records.snapshots.get(&key).ok_or_else(|| not_found(&key))?;
            Ok(info(&key, record))
        })
        .await
    }

    async fn update(
        &self,
        _cx: &CallContext,
        new: SnapshotInfo,
        fieldpaths: &[String],
    ) -> Result<SnapshotInfo> {
        let fieldpaths = fieldpaths.to_vec();
        self.locked(move |inner, records| {
            let name = new.name.clone();
            let record = records
                .snapshots
                .get_mut(&name)
                .ok_or_else(|| not_found(&name))?;
            let mut labels = record.labels.clone();
            if fieldpaths.is_empty() {
                labels = new.labels.clone();
            }
            for path in &fieldpaths {
                if path == "labels" {
                    labels = new.labels.clone();
                } else if let Some(label) = path.strip_prefix("labels.") {
                    match new.labels.get(label) {
                        Some(value) => labels.insert(label.to_owned(), value.clone()),
                        None => labels.remove(label),
                    };
                } else {
                    return Err(Error::invalid_argument(format!(
                        "cannot update field {path:?} of snapshot {name:?}: only labels change"
                    )));
                }
            }
            let old = record.clone();
            record.labels = labels;
            record.updated_at = SystemTime::now();
            let updated = info(&name, record);
            if let Err(e) = inner.save(records) {
                records.snapshots.insert(name, old);
                return Err(e);
            }
            Ok(updated)
        })
        .await
    }

    async fn usage(&self, _cx: &CallContext, key: &str) -> Result<Usage> {
        let key = key.to_owned();
        self.locked(move |inner, records| {
            let record = records.snapshots.get(&key).ok_or_else(|| not_found(&key))?;
            disk_usage(&inner.source(records, record))
        })
        .await
    }

    async fn mounts(&self, _cx: &CallContext, key: &str) -> Result<Vec<Mount>> {
        let key = key.to_owned();
        self.locked(move |inner, records| {
            let record = records.snapshots.get(&key).ok_or_else(|| not_found(&key))?;
            if record.kind == Kind::Committed {
                return Err(Error::failed_precondition(format!(
                    "snapshot {key:?} is committed and has no mounts: prepare or view a child \
                     of it"
                )));
            }
            Ok(inner.mounts(records, record))
        })
        .await
    }

    async fn prepare(
        &self,
        _cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels).await
    }

    async fn view(
        &self,
        _cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels).await
    }

    async fn commit(&self, _cx: &CallContext, name: &str, key: &str, labels: Labels) -> Result<()> {
        let (name, key) = (name.to_owned(), key.to_owned());
        self.locked(move |inner, records| {
            if name.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "cannot commit snapshot {key:?} to an empty name"
                )));
            }
            let record = records.snapshots.get(&key).ok_or_else(|| not_found(&key))?;
            if record.kind != Kind::Active {
                return Err(Error::failed_precondition(format!(
                    "snapshot {key:?} is not active: only an active snapshot can be committed"
                )));
            }
            if records.snapshots.contains_key(&name) {
                return Err(Error::already_exists(format!(
                    "snapshot {name:?} already exists: commit {key:?} under another name"
                )));
            }
            let active = records
                .snapshots
                .remove(&key)
                .ok_or_else(|| not_found(&key))?;
            let now = SystemTime::now();
            let committed = Record {
                kind: Kind::Committed,
                labels,
                created_at: now,
                updated_at: now,
                ..active.clone()
            };
            records.snapshots.insert(name.clone(), committed);
            if let Err(e) = inner.save(records) {
                records.snapshots.remove(&name);
                records.snapshots.insert(key, active);
                return Err(e);
            }
            Ok(())
        })
        .await
    }

    async fn remove(&self, _cx: &CallContext, key: &str) -> Result<()> {
        let key = key.to_owned();
        self.locked(move |inner, records| {
            let record = records.snapshots.get(&key).ok_or_else(|| not_found(&key))?;
            let children: Vec<&str> = records
                .snapshots
                .iter()
                .filter(|(_, r)| r.parent.as_deref() == Some(key.as_str()))
                .map(|(k, _)| k.as_str())
                .collect();
            if !children.is_empty() {
                return Err(Error::failed_precondition(format!(
                    "snapshot {key:?} has children ({}): remove them first",
                    children.join(", ")
                )));
            }
            let id = record.id;
            let removed = records
                .snapshots
                .remove(&key)
                .ok_or_else(|| not_found(&key))?;
            if let Err(e) = inner.save(records) {
                records.snapshots.insert(key, removed);
                return Err(e);
            }
            remove_dir(&inner.dir(id));
            Ok(())
        })
        .await
    }

    async fn list(&self, _cx: &CallContext, filter: &Filter) -> Result<Vec<SnapshotInfo>> {
        let filter = filter.clone();
        self.locked(move |_, records| {
            Ok(records
                .snapshots
                .iter()
                .map(|(name, record)| info(name, record))
                .filter(|info| filter.matches(&|path: &[String]| info_field(info, path)))
                .collect())
        })
        .await
    }

    async fn cleanup(&self, _cx: &CallContext) -> Result<()> {
        self.locked(move |inner, records| {
            let live: HashSet<String> = records
                .snapshots
                .values()
                .map(|r| r.id.to_string())
                .collect();
            let dir = inner.root.join("snapshots");
            let entries =
                std::fs::read_dir(&dir).map_err(|e| io_error("read directory", &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| io_error("read directory", &dir, e))?;
                if !live.contains(entry.file_name().to_string_lossy().as_ref()) {
                    tracing::info!(dir = %entry.path().display(), "removing unused snapshot directory");
                    remove_dir(&entry.path());
                }
            }
            Ok(())
        })
        .await
    }
}
