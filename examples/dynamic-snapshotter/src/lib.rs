//! An example dynamic plugin for berthd: a native-copy snapshotter,
//! `io.containerd.snapshotter.v1.dynamic-native`, built as a shared library that berthd loads
//! from its `plugin_dir` (see `examples/README.md`).
//!
//! Each snapshot is a directory, `<root>/snapshots/<id>`; preparing on a parent copies the
//! parent's tree; mounts are one `bind` mount (`rbind`, `rw` or `ro`). The records live in
//! memory and in `<root>/metadata.json`, rewritten (to a temporary file, then renamed) after
//! every change. One lock serialises every operation: simple, not fast.
//!
//! How it follows the rules of a library (`berth_core::dynamic`): every file-system step runs
//! through [`berth_core::dynamic::blocking`], on a thread of its own, never through this
//! library's tokio (which has no runtime inside berthd); `list` returns every snapshot and
//! leaves the filter to berthd; errors are returned, never panicked.
//!
//! Configuration, `[plugins."io.containerd.snapshotter.v1.dynamic-native"]`: `root_path`
//! (default: the plugin's root, `<root>/io.containerd.snapshotter.v1.dynamic-native`).

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use berth_core::content::CallContext;
use berth_core::dynamic::{DynInitContext, DynRegistration, PluginRegistrar, blocking};
use berth_core::error::{Error, Result};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::registry::InitError;
use berth_core::snapshot::{Mount, SnapshotInfo, SnapshotKind, Snapshotter, Usage};
use berth_snapshot_native::fsutil;
use serde::{Deserialize, Serialize};

/// The plugin's id: its URI is `io.containerd.snapshotter.v1.dynamic-native`.
pub const ID: &str = "dynamic-native";

fn register(registrar: &mut PluginRegistrar) -> Result<()> {
    registrar.register(DynRegistration::snapshotter(ID, init));
    Ok(())
}

#[cfg(not(feature = "foreign-abi"))]
berth_core::declare_plugin!(register);

// A build that berthd must refuse: the ABI string of no berth-core.
#[cfg(feature = "foreign-abi")]
berth_core::declare_plugin!(
    register,
    abi = "berth-core 0.0.0+src.0000000000000000 / rustc 0.0.0 (foreign-abi test build)"
);

/// `[plugins."io.containerd.snapshotter.v1.dynamic-native"]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where snapshots live; empty means the plugin's root directory.
    pub root_path: String,
}

async fn init(ctx: DynInitContext) -> Result<Arc<dyn Snapshotter>, InitError> {
    let config: Config = ctx.config()?;
    let root = if config.root_path.is_empty() {
        ctx.root().to_owned()
    } else {
        PathBuf::from(&config.root_path)
    };
    let opened = {
        let root = root.clone();
        blocking(move || Inner::open(root)).await??
    };
    ctx.set_meta(|meta| {
        meta.platforms.push(berth_snapshot_native::host_platform());
        meta.exports
            .insert("root".to_owned(), root.display().to_string());
    });
    Ok(Arc::new(DynamicNative {
        inner: Arc::new(opened),
    }))
}

/// A snapshot's record, as stored in `metadata.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: u64,
    /// `active`, `view` or `committed`.
    kind: String,
    parent: Option<String>,
    labels: Labels,
    created: SystemTime,
    updated: SystemTime,
    /// Whether `snapshots/<id>` exists (a view of a parent mounts the parent's directory).
    has_dir: bool,
    /// Measured at commit.
    usage: Option<(i64, i64)>,
}

impl Record {
    fn kind(&self) -> SnapshotKind {
        match self.kind.as_str() {
            "active" => SnapshotKind::Active,
            "view" => SnapshotKind::View,
            "committed" => SnapshotKind::Committed,
            _ => SnapshotKind::Unknown,
        }
    }
    fn info(&self, name: &str) -> SnapshotInfo {
        SnapshotInfo {
            name: name.to_owned(),
            parent: self.parent.clone(),
            kind: self.kind(),
            created_at: self.created,
            updated_at: self.updated,
            labels: self.labels.clone(),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    next_id: u64,
    snapshots: BTreeMap<String, Record>,
}

struct Inner {
    root: PathBuf,
    state: Mutex<State>,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!(
        "dynamic-native snapshotter: {what} {}: {e}",
        path.display()
    ))
}

impl Inner {
    fn open(root: PathBuf) -> Result<Inner> {
        std::fs::create_dir_all(root.join("snapshots"))
            .map_err(|e| io_error("create", &root.join("snapshots"), e))?;
        let path = root.join("metadata.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::internal(format!(
                    "dynamic-native snapshotter: {} is not valid: {e}; move it away to start empty",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_error("read", &path, e)),
        };
        Ok(Inner {
            root,
            state: Mutex::new(state),
        })
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn save(&self, state: &State) -> Result<()> {
        let path = self.root.join("metadata.json");
        let temp = self.root.join("metadata.json.tmp");
        let bytes = serde_json::to_vec(state)
            .map_err(|e| Error::internal(format!("dynamic-native snapshotter: encode: {e}")))?;
        std::fs::write(&temp, bytes).map_err(|e| io_error("write", &temp, e))?;
        std::fs::rename(&temp, &path).map_err(|e| io_error("rename", &temp, e))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mounts_of(&self, state: &State, record: &Record) -> Vec<Mount> {
        let (dir, flag) = match record.kind() {
            SnapshotKind::View if !record.has_dir => {
                let parent = record
                    .parent
                    .as_ref()
                    .and_then(|p| state.snapshots.get(p))
                    .map(|p| p.id)
                    .unwrap_or(record.id);
                (self.dir(parent), "ro")
            }
            SnapshotKind::View => (self.dir(record.id), "ro"),
            _ => (self.dir(record.id), "rw"),
        };
        vec![Mount {
            kind: "bind".to_owned(),
            source: dir.display().to_string(),
            target: String::new(),
            options: vec!["rbind".to_owned(), flag.to_owned()],
        }]
    }

    fn create(
        &self,
        kind: SnapshotKind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        let mut state = self.lock();
        if state.snapshots.contains_key(key) {
            return Err(Error::already_exists(format!(
                "snapshot {key:?} already exists"
            )));
        }
        let parent_id = match parent {
            None => None,
            Some(p) => {
                let record = state.snapshots.get(p).ok_or_else(|| {
                    Error::not_found(format!("parent snapshot {p:?} does not exist"))
                })?;
                if record.kind() != SnapshotKind::Committed {
                    return Err(Error::invalid_argument(format!(
                        "parent snapshot {p:?} is not committed"
                    )));
                }
                Some(record.id)
            }
        };
        state.next_id += 1;
        let id = state.next_id;
        let dir = self.dir(id);
        let has_dir = kind == SnapshotKind::Active || parent_id.is_none();
        if has_dir {
            // A directory left by a crash under a reused id would leak into the new snapshot.
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| io_error("remove", &dir, e))?;
            }
            match parent_id {
                Some(p) if kind == SnapshotKind::Active => {
                    fsutil::copy_tree(&self.dir(p), &dir)?;
                }
                _ => std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&dir)
                    .map_err(|e| io_error("create", &dir, e))?,
            }
        }
        let now = SystemTime::now();
        let record = Record {
            id,
            kind: kind.name().to_owned(),
            parent: parent.map(str::to_owned),
            labels,
            created: now,
            updated: now,
            has_dir,
            usage: None,
        };
        let mounts = self.mounts_of(&state, &record);
        state.snapshots.insert(key.to_owned(), record);
        if let Err(e) = self.save(&state) {
            state.snapshots.remove(key);
            if has_dir {
                let _ = std::fs::remove_dir_all(&dir);
            }
            return Err(e);
        }
        Ok(mounts)
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        let mut state = self.lock();
        if state.snapshots.contains_key(name) {
            return Err(Error::already_exists(format!(
                "snapshot {name:?} already exists"
            )));
        }
        let record = state
            .snapshots
            .get(key)
            .ok_or_else(|| Error::not_found(format!("snapshot {key:?} does not exist")))?;
        if record.kind() != SnapshotKind::Active {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is not active: only an active snapshot can be committed"
            )));
        }
        let usage = fsutil::disk_usage(&self.dir(record.id))?;
        let mut record = state
            .snapshots
            .remove(key)
            .ok_or_else(|| Error::internal(format!("snapshot {key:?} vanished under the lock")))?;
        record.kind = SnapshotKind::Committed.name().to_owned();
        record.labels = labels;
        record.updated = SystemTime::now();
        record.usage = Some((usage.size, usage.inodes));
        state.snapshots.insert(name.to_owned(), record);
        self.save(&state)
    }

    fn remove(&self, key: &str) -> Result<()> {
        let mut state = self.lock();
        let record = state
            .snapshots
            .get(key)
            .ok_or_else(|| Error::not_found(format!("snapshot {key:?} does not exist")))?;
        if state
            .snapshots
            .values()
            .any(|r| r.parent.as_deref() == Some(key))
        {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} has children: remove them first"
            )));
        }
        let (id, has_dir) = (record.id, record.has_dir);
        state.snapshots.remove(key);
        self.save(&state)?;
        if has_dir {
            let dir = self.dir(id);
            std::fs::remove_dir_all(&dir).map_err(|e| io_error("remove", &dir, e))?;
        }
        Ok(())
    }

    fn record(&self, key: &str) -> Result<(Record, Vec<Mount>)> {
        let state = self.lock();
        let record = state
            .snapshots
            .get(key)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("snapshot {key:?} does not exist")))?;
        let mounts = self.mounts_of(&state, &record);
        Ok((record, mounts))
    }

    fn update(&self, info: SnapshotInfo, fieldpaths: &[String]) -> Result<SnapshotInfo> {
        let mut state = self.lock();
        let key = info.name.clone();
        let record = state
            .snapshots
            .get_mut(&key)
            .ok_or_else(|| Error::not_found(format!("snapshot {key:?} does not exist")))?;
        let mut labels = record.labels.clone();
        berth_snapshot_native::storage::apply_label_paths(
            &mut labels,
            &info.labels,
            fieldpaths,
            &key,
        )?;
        record.labels = labels;
        record.updated = SystemTime::now();
        let out = record.info(&key);
        self.save(&state)?;
        Ok(out)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let (record, _) = self.record(key)?;
        match (record.kind(), record.usage) {
            (SnapshotKind::Committed, Some((size, inodes))) => Ok(Usage { size, inodes }),
            (SnapshotKind::Active, _) => Ok(fsutil::disk_usage(&self.dir(record.id))?),
            _ => Ok(Usage::default()),
        }
    }

    fn cleanup(&self) -> Result<()> {
        let state = self.lock();
        let live: Vec<String> = state
            .snapshots
            .values()
            .filter(|r| r.has_dir)
            .map(|r| r.id.to_string())
            .collect();
        let snapshots = self.root.join("snapshots");
        let entries = std::fs::read_dir(&snapshots).map_err(|e| io_error("list", &snapshots, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(&name) {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(|e| io_error("remove", &path, e))?;
            }
        }
        Ok(())
    }
}

/// The snapshotter: every call runs its work on a thread of its own (see the crate docs).
struct DynamicNative {
    inner: Arc<Inner>,
}

impl DynamicNative {
    async fn run<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        blocking(move || work(&inner)).await?
    }
}

#[async_trait::async_trait]
impl Snapshotter for DynamicNative {
    async fn stat(&self, _cx: &CallContext, key: &str) -> Result<SnapshotInfo> {
        let key = key.to_owned();
        self.run(move |i| i.record(&key).map(|(r, _)| r.info(&key)))
            .await
    }

    async fn update(
        &self,
        _cx: &CallContext,
        info: SnapshotInfo,
        fieldpaths: &[String],
    ) -> Result<SnapshotInfo> {
        let fieldpaths = fieldpaths.to_vec();
        self.run(move |i| i.update(info, &fieldpaths)).await
    }

    async fn usage(&self, _cx: &CallContext, key: &str) -> Result<Usage> {
        let key = key.to_owned();
        self.run(move |i| i.usage(&key)).await
    }

    async fn mounts(&self, _cx: &CallContext, key: &str) -> Result<Vec<Mount>> {
        let key = key.to_owned();
        self.run(move |i| {
            let (record, mounts) = i.record(&key)?;
            match record.kind() {
                SnapshotKind::Active | SnapshotKind::View => Ok(mounts),
                kind => Err(Error::failed_precondition(format!(
                    "snapshot {key:?} is {kind}: only active snapshots and views have mounts"
                ))),
            }
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
        let (key, parent) = (key.to_owned(), parent.map(str::to_owned));
        self.run(move |i| i.create(SnapshotKind::Active, &key, parent.as_deref(), labels))
            .await
    }

    async fn view(
        &self,
        _cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        let (key, parent) = (key.to_owned(), parent.map(str::to_owned));
        self.run(move |i| i.create(SnapshotKind::View, &key, parent.as_deref(), labels))
            .await
    }

    async fn commit(&self, _cx: &CallContext, name: &str, key: &str, labels: Labels) -> Result<()> {
        let (name, key) = (name.to_owned(), key.to_owned());
        self.run(move |i| i.commit(&name, &key, labels)).await
    }

    async fn remove(&self, _cx: &CallContext, key: &str) -> Result<()> {
        let key = key.to_owned();
        self.run(move |i| i.remove(&key)).await
    }

    /// Every snapshot: berthd applies the filter on its side, since a filter's compiled
    /// regular expressions are another crate's types (see `berth_core::dynamic`).
    async fn list(&self, _cx: &CallContext, _filter: &Filter) -> Result<Vec<SnapshotInfo>> {
        self.run(|i| {
            let state = i.lock();
            Ok(state
                .snapshots
                .iter()
                .map(|(name, record)| record.info(name))
                .collect())
        })
        .await
    }

    async fn cleanup(&self, _cx: &CallContext) -> Result<()> {
        self.run(|i| i.cleanup()).await
    }
}
