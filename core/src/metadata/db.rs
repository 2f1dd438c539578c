//! [`Metadata`]: the resource graph over the raw store, with the backends it wraps.
//!
//! Plugins only store bytes; whether a blob or snapshot is alive is decided here. The
//! metadata object holds the backends (today the content store), wraps each in a namespaced
//! store that records labels, leases and events, tells the GC scheduler about mutations, and
//! runs garbage collection (see [`super::gc`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use crate::content::{CallContext, ContentStore};
use crate::error::{Error, Result};
use crate::events::{Envelope, Exchange};
use crate::metadata::{MetaStore, MetadataConfig};
use crate::snapshot::Snapshotter;

/// What a change did, for the GC scheduler's thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Something was created or changed (labels may have dropped references).
    Change,
    /// Something was deleted: garbage may now exist.
    Deletion,
}

/// Receives mutations (the GC scheduler).
pub type MutationHook = Arc<dyn Fn(Mutation) + Send + Sync>;

/// Runs a collection and waits for it (the GC scheduler's `ScheduleAndWait`).
#[async_trait::async_trait]
pub trait GcTrigger: Send + Sync {
    /// Schedules a collection now and returns once it finished.
    async fn schedule_and_wait(&self) -> Result<()>;
}

/// Whether a backend may hold objects no record names since its last sweep. A collection
/// walks a backend (lists its blobs or snapshots and removes what no record keeps) only when
/// it is dirty or the collection itself removed records of its kind, as containerd's
/// `dirtyCS` / `dirtySS`: a collection after lease or image changes alone then costs the
/// mark, not a walk of 10,000 files. Every backend starts dirty, so the first collection
/// after a start finds what a crash left behind.
#[derive(Debug)]
pub(crate) struct DirtyBackends {
    content: Arc<AtomicBool>,
    snapshotters: std::collections::BTreeMap<String, Arc<AtomicBool>>,
}

impl DirtyBackends {
    fn new<'a>(snapshotters: impl Iterator<Item = &'a String>) -> Self {
        DirtyBackends {
            content: Arc::new(AtomicBool::new(true)),
            snapshotters: snapshotters
                .map(|name| (name.clone(), Arc::new(AtomicBool::new(true))))
                .collect(),
        }
    }

    /// Clears the content store's mark; whether it was set.
    pub(crate) fn take_content(&self) -> bool {
        self.content.swap(false, Ordering::SeqCst)
    }

    /// Clears snapshotter `name`'s mark; whether it was set.
    pub(crate) fn take_snapshotter(&self, name: &str) -> bool {
        self.snapshotters
            .get(name)
            .is_some_and(|flag| flag.swap(false, Ordering::SeqCst))
    }

    /// Marks every backend dirty (a collection that failed part way).
    pub(crate) fn set_all(&self) {
        self.content.store(true, Ordering::SeqCst);
        for flag in self.snapshotters.values() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Marks a backend dirty when made and again when dropped. An operation that may leave a
/// backend object without a record (a removal, a commit that fails after the backend's part)
/// holds one for its whole run, so a sweep that ran in the middle of it cannot clear the
/// mark for what the operation leaves afterwards.
pub(crate) struct DirtyMark(Arc<AtomicBool>);

impl DirtyMark {
    fn new(flag: &Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::SeqCst);
        DirtyMark(Arc::clone(flag))
    }
}

impl Drop for DirtyMark {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The metadata layer.
pub struct Metadata {
    pub(crate) store: Arc<MetaStore>,
    pub(crate) events: Arc<Exchange>,
    pub(crate) content_backend: Option<Arc<dyn ContentStore>>,
    pub(crate) snapshot_backends: std::collections::BTreeMap<String, Arc<dyn Snapshotter>>,
    pub(crate) config: MetadataConfig,
    /// Held shared by content commits (from the backend commit until the record exists) and
    /// exclusively by the backend sweep, so a just-committed blob is never swept.
    pub(crate) gc_lock: tokio::sync::RwLock<()>,
    /// Which backends the next collection walks (see [`DirtyBackends`]).
    pub(crate) dirty: DirtyBackends,
    hook: Mutex<Option<MutationHook>>,
    trigger: Mutex<Option<Arc<dyn GcTrigger>>>,
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata")
            .field("store", &self.store)
            .field("content", &self.content_backend.is_some())
            .finish_non_exhaustive()
    }
}

impl Metadata {
    /// The metadata layer over `store`, wrapping `content_backend` if there is one.
    pub fn new(
        store: Arc<MetaStore>,
        events: Arc<Exchange>,
        content_backend: Option<Arc<dyn ContentStore>>,
        config: MetadataConfig,
    ) -> Arc<Metadata> {
        Self::with_snapshotters(store, events, content_backend, Default::default(), config)
    }

    /// The metadata layer over `store`, wrapping the content backend and each snapshotter
    /// backend (by name).
    pub fn with_snapshotters(
        store: Arc<MetaStore>,
        events: Arc<Exchange>,
        content_backend: Option<Arc<dyn ContentStore>>,
        snapshot_backends: std::collections::BTreeMap<String, Arc<dyn Snapshotter>>,
        config: MetadataConfig,
    ) -> Arc<Metadata> {
        let dirty = DirtyBackends::new(snapshot_backends.keys());
        Arc::new(Metadata {
            store,
            events,
            content_backend,
            snapshot_backends,
            config,
            dirty,
            gc_lock: tokio::sync::RwLock::new(()),
            hook: Mutex::new(None),
            trigger: Mutex::new(None),
        })
    }

    /// The raw record store.
    pub fn store(&self) -> &Arc<MetaStore> {
        &self.store
    }

    /// The event exchange this layer publishes to.
    pub fn events(&self) -> &Arc<Exchange> {
        &self.events
    }

    /// The namespaced content store (None when no content plugin is loaded).
    pub fn content(self: &Arc<Self>) -> Option<Arc<dyn ContentStore>> {
        self.content_backend.as_ref()?;
        Some(Arc::new(super::content::MetaContent::new(Arc::clone(self))))
    }

    /// The namespaced snapshotter `name` (None when no such snapshotter is loaded).
    pub fn snapshotter(self: &Arc<Self>, name: &str) -> Option<Arc<dyn Snapshotter>> {
        let backend = self.snapshot_backends.get(name)?;
        Some(Arc::new(super::snapshots::MetaSnapshotter::new(
            Arc::clone(self),
            name.to_owned(),
            Arc::clone(backend),
        )))
    }

    /// Names of the loaded snapshotters.
    pub fn snapshotter_names(&self) -> Vec<String> {
        self.snapshot_backends.keys().cloned().collect()
    }

    /// Marks the content store dirty for the operation holding the mark (see [`DirtyMark`]).
    pub(crate) fn content_touched(&self) -> DirtyMark {
        DirtyMark::new(&self.dirty.content)
    }

    /// Marks snapshotter `name` dirty for the operation holding the mark (None for a name
    /// this layer has no backend of).
    pub(crate) fn snapshotter_touched(&self, name: &str) -> Option<DirtyMark> {
        self.dirty.snapshotters.get(name).map(DirtyMark::new)
    }

    /// Installs the receiver of mutations (the GC scheduler).
    pub fn set_mutation_hook(&self, hook: MutationHook) {
        *self.hook.lock().unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    /// Installs what `sync` deletes wait on (the GC scheduler).
    pub fn set_gc_trigger(&self, trigger: Arc<dyn GcTrigger>) {
        *self.trigger.lock().unwrap_or_else(PoisonError::into_inner) = Some(trigger);
    }

    pub(crate) fn mutated(&self, mutation: Mutation) {
        let hook = self
            .hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook(mutation);
        }
    }

    /// Collects garbage now and waits for it: through the scheduler when one is installed
    /// (so collections never overlap), directly otherwise.
    pub async fn schedule_and_wait(&self) -> Result<()> {
        let trigger = self
            .trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match trigger {
            Some(t) => t.schedule_and_wait().await,
            None => self.collect_garbage().await.map(|_| ()),
        }
    }

    /// Publishes an event in `namespace`; a failure is logged, never returned, because the
    /// change it reports has already happened.
    pub(crate) fn publish<M: prost::Name>(&self, namespace: &str, topic: &str, event: &M) {
        let envelope = Envelope {
            timestamp: SystemTime::now(),
            namespace: namespace.to_owned(),
            topic: topic.to_owned(),
            type_url: M::full_name(),
            value: event.encode_to_vec(),
        };
        if let Err(e) = self.events.publish(envelope) {
            tracing::warn!(%topic, error = %e, "cannot publish event");
        }
    }
}

/// The namespace of a call that must have one, for stores that need it.
pub(crate) fn namespace_of(cx: &CallContext) -> Result<crate::namespace::Namespace> {
    cx.require_namespace().cloned()
}

/// An error for a lease named in a call that does not exist.
pub(crate) fn lease_missing(lease: &str) -> Error {
    Error::not_found(format!("lease {lease:?} does not exist"))
}
