//! The directory snapshotter engine: everything `native` and `overlayfs` share. A
//! [`Layout`] says what a snapshot's directory holds and which mounts present it; the engine
//! does the rest (metadata, ids, staging, commit, removal, usage, cleanup).
//!
//! ```text
//! <root>/
//!   metadata.sled/     the snapshotter's records (see [`crate::storage`]) when it runs
//!                      outside berthd; in berthd they are in a tree of the core's
//!                      metadata database ([`DirSnapshotter::with_shared_metadata`])
//!   snapshots/<id>/    one directory per snapshot that has one (the layout decides what
//!                      is inside: the tree itself for native, fs/ and work/ for overlay)
//!   staging/new-<n>/   a snapshot being created: filled here (a copy can be slow), then
//!                      renamed to snapshots/<id> under the metadata lock; emptied on open
//!   staging/spare-<n>/ a directory made ahead of time for the next creation that copies
//!                      nothing from a parent (see [`Layout::spare_fits`])
//!   staging/gc-<n>/    a directory no snapshot uses, moved here by Cleanup under the
//!                      metadata lock and deleted after it
//! ```
//!
//! staging/ carries ext4's top-directory flag, so the block group of each snapshot's tree is
//! chosen afresh rather than inherited from staging/ ([`fsutil::mark_top_of_hierarchies`]).
//!
//! Creation fills a staging directory without holding the metadata lock, then re-checks the
//! key and parent, renames the directory into place and writes the record under the lock: a
//! crash leaves at worst a staging directory (removed on the next open) or a directory
//! without a record (removed by [`Snapshotter::cleanup`]), never a record without its
//! directory. Removal forgets the record first; the directory goes at once
//! ([`EngineOptions::sync_remove`]) or at the next cleanup (containerd's asynchronous remove,
//! which keeps Remove fast and leaves the slow part to garbage collection).
//!
//! Every file-system step runs on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use berth_core::content::CallContext;
use berth_core::error::{Error, ErrorKind, Result};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::metadata::SharedMetadata;
use berth_core::snapshot::{Mount, SnapshotInfo, SnapshotKind, Snapshotter, Usage};

use crate::fsutil::{self, FsError};
use crate::storage::{Snapshot, SnapshotStore, Stored};

/// Where a snapshotter keeps things under its root.
#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    /// The paths of a snapshotter rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Paths { root: root.into() }
    }
    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `<root>/snapshots`.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    /// `<root>/snapshots/<id>`.
    pub fn snapshot(&self, id: u64) -> PathBuf {
        self.snapshots().join(id.to_string())
    }
    fn staging(&self) -> PathBuf {
        self.root.join("staging")
    }
    fn metadata(&self) -> PathBuf {
        self.root.join("metadata.sled")
    }
}

/// What differs between directory snapshotters.
pub trait Layout: Send + Sync + 'static {
    /// Whether a new snapshot of `kind` on the parents `parent_ids` (nearest first) gets a
    /// directory of its own (a native view of a parent mounts the parent's instead).
    fn needs_dir(&self, kind: SnapshotKind, parent_ids: &[u64]) -> bool;

    /// Refuses a snapshot before anything is created (e.g. a chain too deep to mount).
    fn check(&self, _paths: &Paths, _kind: SnapshotKind, _parent_ids: &[u64]) -> Result<()> {
        Ok(())
    }

    /// Whether a snapshot of `kind` on `parent_ids` can start from a spare directory: one
    /// [`Layout::populate`] made ahead of time for an active snapshot without parents, then
    /// finished by [`Layout::adopt_spare`]. Only for what copies nothing from a parent.
    fn spare_fits(&self, _kind: SnapshotKind, _parent_ids: &[u64]) -> bool {
        false
    }

    /// Finishes the spare directory `dir` for a snapshot on `parent_ids` (see
    /// [`Layout::spare_fits`]).
    fn adopt_spare(&self, _paths: &Paths, _parent_ids: &[u64], _dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Creates `dir` (it does not exist yet) with what the new snapshot starts with.
    fn populate(
        &self,
        paths: &Paths,
        kind: SnapshotKind,
        parent_ids: &[u64],
        dir: &Path,
    ) -> Result<()>;

    /// The mounts presenting an active snapshot or view.
    fn mounts(&self, paths: &Paths, snapshot: &Snapshot) -> Vec<Mount>;

    /// The directory whose usage is the snapshot's own (its layer).
    fn usage_dir(&self, paths: &Paths, id: u64) -> PathBuf;

    /// Labels added to what Stat, Update and List report; never stored.
    fn report_labels(&self, _paths: &Paths, _id: u64, _labels: &mut Labels) {}
}

/// Engine behaviour chosen by the plugin's configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineOptions {
    /// Remove a snapshot's directory during Remove instead of at the next Cleanup.
    pub sync_remove: bool,
}

struct Engine<L> {
    paths: Paths,
    layout: Arc<L>,
    options: EngineOptions,
    store: SnapshotStore,
    staging_seq: AtomicU64,
    /// Directories made ahead of time in staging for the next creations (see
    /// [`Layout::spare_fits`]): a Prepare then only renames one into place, and making the
    /// next one overlaps the reply instead of delaying it.
    spares: std::sync::Mutex<Vec<PathBuf>>,
    refilling: std::sync::atomic::AtomicBool,
}

/// Spare directories an engine keeps ready.
const SPARES: usize = 2;

/// A snapshotter over directories under one root, shaped by a [`Layout`].
///
/// [`DirSnapshotter::new`] touches nothing; the root is created and the metadata opened by
/// [`DirSnapshotter::open`] (which the plugin's init calls, so errors show at start) or by
/// the first call.
pub struct DirSnapshotter<L> {
    paths: Paths,
    layout: Arc<L>,
    options: EngineOptions,
    shared: Option<SharedMetadata>,
    engine: tokio::sync::OnceCell<Arc<Engine<L>>>,
}

impl<L> std::fmt::Debug for DirSnapshotter<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirSnapshotter")
            .field("root", &self.paths.root)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("snapshotter task failed: {e}")))?
}

fn create_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(FsError::new("create directory", path, e).into()),
    }
}

/// Where a start's staging names begin: the clock's nanoseconds, different at each start.
fn staging_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn remove_logged(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // The record is gone already; the directory is an orphan that Cleanup retries.
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove snapshot directory")
        }
    }
}

impl<L: Layout> DirSnapshotter<L> {
    /// A snapshotter rooted at `root`; nothing is touched until [`Self::open`].
    pub fn new(root: impl Into<PathBuf>, layout: L, options: EngineOptions) -> Self {
        DirSnapshotter {
            paths: Paths::new(root),
            layout: Arc::new(layout),
            options,
            shared: None,
            engine: tokio::sync::OnceCell::new(),
        }
    }

    /// Keeps the records in a tree of the core's metadata database instead of
    /// `<root>/metadata.sled` (which is moved in when [`Self::open`] finds one), so that one
    /// flush makes a call's records and the metadata layer's durable together. For the
    /// compiled-in plugin; a snapshotter served outside berthd keeps its own database.
    pub fn with_shared_metadata(mut self, shared: SharedMetadata) -> Self {
        self.shared = Some(shared);
        self
    }

    /// The name of this snapshotter's tree in the core's database: by root, so a snapshotter
    /// moved to another `root_path` starts empty there, as with a database under the root.
    fn tree_name(&self) -> String {
        format!("snapshotter.v1:{}", self.paths.root().display())
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        self.paths.root()
    }

    /// The layout.
    pub fn layout(&self) -> &L {
        &self.layout
    }

    /// Creates the root and its directories, empties `staging/` (creations a crash
    /// interrupted) and opens the metadata. Idempotent.
    pub async fn open(&self) -> Result<()> {
        self.engine().await.map(|_| ())
    }

    async fn engine(&self) -> Result<Arc<Engine<L>>> {
        self.engine
            .get_or_try_init(|| {
                let paths = self.paths.clone();
                let layout = Arc::clone(&self.layout);
                let options = self.options;
                let shared = self.shared.clone();
                let tree_name = self.tree_name();
                blocking(move || {
                    create_private_dir(paths.root())?;
                    create_private_dir(&paths.snapshots())?;
                    let store = match shared {
                        Some(shared) => {
                            SnapshotStore::open_shared(shared.tree(&tree_name)?, &paths.metadata())?
                        }
                        None => SnapshotStore::open(&paths.metadata())?,
                    };
                    // Only after the store's lock is ours: no other process is using staging.
                    let staging = paths.staging();
                    remove_logged(&staging);
                    create_private_dir(&staging)?;
                    // Snapshot directories are made in staging/ and renamed out of it, so
                    // their block group is chosen here.
                    match fsutil::mark_top_of_hierarchies(&staging) {
                        Ok(true) => {}
                        Ok(false) => tracing::debug!(path = %staging.display(), "no top-directory flag on this file system; snapshots stay in their parent's block group"),
                        Err(e) => tracing::warn!(error = %e, "cannot mark staging/ as the top of unrelated hierarchies; unpacks after removals may be slower"),
                    }
                    Ok(Arc::new(Engine {
                        paths,
                        layout,
                        options,
                        store,
                        // Names differ from one start to the next: ext4 hashes a new
                        // directory's name to pick where its search for a block group starts
                        // (see `mark_top_of_hierarchies`), and names repeated after a restart
                        // would lead it back to the group the last run's removals emptied.
                        staging_seq: AtomicU64::new(staging_seed()),
                        spares: std::sync::Mutex::new(Vec::new()),
                        refilling: std::sync::atomic::AtomicBool::new(false),
                    }))
                })
            })
            .await
            .cloned()
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Arc<Engine<L>>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let engine = self.engine().await?;
        blocking(move || f(&engine)).await
    }

    async fn create(
        &self,
        kind: SnapshotKind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        let key = owned(key);
        let parent = parent.map(owned);
        self.run(move |e| e.create(kind, &key, parent.as_deref(), labels))
            .await
    }
}

impl<L: Layout> Engine<L> {
    fn report(&self, stored: Stored) -> SnapshotInfo {
        let mut info = stored.info;
        self.layout
            .report_labels(&self.paths, stored.id, &mut info.labels);
        info
    }

    /// Creates the snapshot, then has the spare directories topped up in the background if
    /// it could have used one.
    fn create(
        self: &Arc<Self>,
        kind: SnapshotKind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        let parent = parent.filter(|p| !p.is_empty());
        let parent_ids = self.store.check_create(key, parent)?;
        self.layout.check(&self.paths, kind, &parent_ids)?;
        let spare_fits = self.layout.spare_fits(kind, &parent_ids);
        let staged = if self.layout.needs_dir(kind, &parent_ids) {
            let spare = if spare_fits { self.take_spare() } else { None };
            let (dir, made) = match spare {
                Some(dir) => {
                    let adopted = self.layout.adopt_spare(&self.paths, &parent_ids, &dir);
                    (dir, adopted)
                }
                None => {
                    let n = self.staging_seq.fetch_add(1, Ordering::Relaxed);
                    let dir = self.paths.staging().join(format!("new-{n}"));
                    let made = self.layout.populate(&self.paths, kind, &parent_ids, &dir);
                    (dir, made)
                }
            };
            if let Err(e) = made {
                remove_logged(&dir);
                return Err(e);
            }
            Some(dir)
        } else {
            None
        };
        let created = self.store.create(kind, key, parent, labels, |snapshot| {
            if snapshot.parent_ids != parent_ids {
                // The parent was removed and another committed under its name while the
                // staging directory was filled from the old one.
                return Err(Error::new(
                    ErrorKind::Aborted,
                    format!("parent of snapshot {key:?} changed while it was being created"),
                ));
            }
            if let Some(dir) = &staged {
                let target = self.paths.snapshot(snapshot.id);
                // An id is taken for good only with its record. A creation that a crash cut
                // off after its rename left a directory under an id that is handed out again
                // now; no record can name it, so it goes (a non-empty directory would make the
                // rename fail).
                if target.symlink_metadata().is_ok() {
                    tracing::info!(path = %target.display(), "removing the directory of a snapshot creation interrupted by a crash");
                    std::fs::remove_dir_all(&target)
                        .map_err(|e| FsError::new("remove leftover directory", &target, e))?;
                }
                std::fs::rename(dir, &target).map_err(|e| FsError::new("rename", dir, e))?;
                // No fsync of snapshots/ here (it cost more than the record's flush), as in
                // containerd's snapshotters: a killed daemon's renames are in the page cache,
                // which survives it. Against a power loss, on a journaled file system the
                // record's flush (an fdatasync of the metadata redo log) commits the journal
                // transaction that holds the rename as well; on one without a journal the
                // rename can be lost while the record stays.
            }
            Ok(())
        });
        if spare_fits && self.spares_short() {
            // Detached: the reply does not wait for it, and a failure only means the next
            // creation makes its directory itself.
            let engine = Arc::clone(self);
            drop(tokio::task::spawn_blocking(move || engine.refill_spares()));
        }
        match created {
            Ok(snapshot) => Ok(self.layout.mounts(&self.paths, &snapshot)),
            Err(e) => {
                if let Some(dir) = &staged {
                    remove_logged(dir);
                }
                Err(e)
            }
        }
    }

    fn take_spare(&self) -> Option<PathBuf> {
        self.spares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    }

    fn spares_short(&self) -> bool {
        self.spares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
            < SPARES
    }

    /// Makes spare directories until [`SPARES`] are ready; one refill at a time.
    fn refill_spares(&self) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        while self.spares_short() {
            let n = self.staging_seq.fetch_add(1, Ordering::Relaxed);
            let dir = self.paths.staging().join(format!("spare-{n}"));
            match self
                .layout
                .populate(&self.paths, SnapshotKind::Active, &[], &dir)
            {
                Ok(()) => self
                    .spares
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(dir),
                Err(e) => {
                    remove_logged(&dir);
                    tracing::debug!(error = %e, "cannot make a spare snapshot directory; creations make their own");
                    break;
                }
            }
        }
        self.refilling.store(false, Ordering::Release);
    }

    /// Moves the directories under `snapshots/` that belong to no snapshot into staging and
    /// returns their new paths. The move happens while no writer can record a snapshot: after
    /// a crash an id can be handed out again, and a creation taking such an id must not see
    /// its new directory removed by a cleanup that listed the old one.
    fn orphans(&self) -> Result<Vec<PathBuf>> {
        let dir = self.paths.snapshots();
        self.store.with_ids(|ids| {
            let mut out = Vec::new();
            let entries =
                std::fs::read_dir(&dir).map_err(|e| FsError::new("read directory", &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| FsError::new("read directory", &dir, e))?;
                let name = entry.file_name();
                let known = name
                    .to_str()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|id| ids.contains(&id));
                if known {
                    continue;
                }
                let n = self.staging_seq.fetch_add(1, Ordering::Relaxed);
                let aside = self.paths.staging().join(format!("gc-{n}"));
                match std::fs::rename(entry.path(), &aside) {
                    Ok(()) => out.push(aside),
                    Err(e) => {
                        tracing::warn!(path = %entry.path().display(), error = %e, "cannot move an unused snapshot directory aside; the next cleanup tries again");
                    }
                }
            }
            Ok(out)
        })
    }

    /// Removes what no snapshot uses; the slow part, deleting the trees, runs without the
    /// writer lock (what a crash leaves in staging goes when the store next opens).
    fn cleanup(&self) -> Result<()> {
        for dir in self.orphans()? {
            remove_logged(&dir);
        }
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        let (id, _) = self.store.remove(key)?;
        if self.options.sync_remove {
            // Only this snapshot's directory, so a removal costs the same however many
            // snapshots exist; what a failed removal leaves behind goes at Cleanup.
            remove_logged(&self.paths.snapshot(id));
        }
        tracing::debug!(%key, id, "snapshot removed");
        Ok(())
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        let stored = self.store.get(key)?;
        if stored.info.kind != SnapshotKind::Active {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is a {} snapshot: only active snapshots can be committed",
                stored.info.kind
            )));
        }
        // Measured before the lock: the caller has stopped writing to a snapshot it commits.
        let usage = fsutil::disk_usage(&self.layout.usage_dir(&self.paths, stored.id))?;
        self.store.commit(key, name, labels, usage).map(|_| ())
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let stored = self.store.get(key)?;
        match stored.info.kind {
            SnapshotKind::Active => Ok(fsutil::disk_usage(
                &self.layout.usage_dir(&self.paths, stored.id),
            )?),
            SnapshotKind::Committed => Ok(stored.usage),
            // As containerd: a view has no layer of its own.
            _ => Ok(Usage::default()),
        }
    }
}

fn owned(key: &str) -> String {
    key.to_owned()
}

#[async_trait::async_trait]
impl<L: Layout> Snapshotter for DirSnapshotter<L> {
    async fn stat(&self, _cx: &CallContext, key: &str) -> Result<SnapshotInfo> {
        let key = owned(key);
        self.run(move |e| Ok(e.report(e.store.get(&key)?))).await
    }

    async fn update(
        &self,
        _cx: &CallContext,
        info: SnapshotInfo,
        fieldpaths: &[String],
    ) -> Result<SnapshotInfo> {
        let fieldpaths = fieldpaths.to_vec();
        self.run(move |e| Ok(e.report(e.store.update(&info, &fieldpaths)?)))
            .await
    }

    async fn usage(&self, _cx: &CallContext, key: &str) -> Result<Usage> {
        let key = owned(key);
        self.run(move |e| e.usage(&key)).await
    }

    async fn mounts(&self, _cx: &CallContext, key: &str) -> Result<Vec<Mount>> {
        let key = owned(key);
        self.run(move |e| {
            let snapshot = e.store.snapshot(&key)?;
            Ok(e.layout.mounts(&e.paths, &snapshot))
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
        self.create(SnapshotKind::Active, key, parent, labels).await
    }

    async fn view(
        &self,
        _cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        self.create(SnapshotKind::View, key, parent, labels).await
    }

    async fn commit(&self, _cx: &CallContext, name: &str, key: &str, labels: Labels) -> Result<()> {
        let (name, key) = (owned(name), owned(key));
        self.run(move |e| e.commit(&name, &key, labels)).await
    }

    async fn remove(&self, _cx: &CallContext, key: &str) -> Result<()> {
        let key = owned(key);
        self.run(move |e| e.remove(&key)).await
    }

    async fn list(&self, _cx: &CallContext, filter: &Filter) -> Result<Vec<SnapshotInfo>> {
        let filter = filter.clone();
        self.run(move |e| {
            Ok(e.store
                .list(&filter)?
                .into_iter()
                .map(|s| e.report(s))
                .collect())
        })
        .await
    }

    async fn cleanup(&self, _cx: &CallContext) -> Result<()> {
        self.run(|e| e.cleanup()).await
    }
}
