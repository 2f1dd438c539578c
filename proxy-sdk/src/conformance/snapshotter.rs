//! The snapshotter suite: [`run`] checks the contract of [`berth_core::snapshot`] against any
//! [`Snapshotter`], following containerd's `core/snapshots/testsuite` (its Basic,
//! StatActive/StatCommitted, Transitivity, PrepareView, Update, Remove, Walk, the layering
//! issue checks, ViewReadonly, RootPermission, Rename and 128LayersMount cases) and adding
//! error codes, odd keys, concurrency, namespaces and restarts.
//!
//! A [`SnapshotterFactory`] makes one fresh snapshotter per case, wrapped in a [`Fixture`]
//! with the [`CallContext`] to call it with and a guard that keeps its resources alive. The
//! same suite runs against the snapshotters themselves, behind the core's metadata wrapper
//! (whose context carries a namespace), and through the gRPC client and server adapters.
//!
//! Cases that look at file contents mount the returned mounts into a temporary directory
//! ([`mount`]) and always unmount, whatever happens. They need root, and overlay support
//! when a mount is an overlay; without either they are reported as **skipped**, with the
//! reason (and a line on stderr), never as passed. Differences between snapshotters are
//! declared [`Capabilities`], never inferred from names.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use berth_core::content::CallContext;
//! # use berth_core::snapshot::Snapshotter;
//! use berth_proxy_sdk::conformance::snapshotter::{self, Capabilities, Fixture, SnapshotterFactory};
//!
//! struct Mine;
//!
//! #[async_trait::async_trait]
//! impl SnapshotterFactory for Mine {
//!     type Guard = ();
//!     fn capabilities(&self) -> Capabilities {
//!         Capabilities { mountable: true, ..Capabilities::default() }
//!     }
//!     async fn create(&self) -> berth_core::Result<Fixture<()>> {
//!         # let sn: Arc<dyn Snapshotter> = unimplemented!();
//!         Ok(Fixture::new(sn, CallContext::default(), ()))
//!     }
//! }
//!
//! # async fn test() {
//! if let Err(failure) = snapshotter::run(Mine).await {
//!     panic!("{failure}");
//! }
//! # }
//! ```

pub mod mount;
pub mod tree;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use berth_core::content::CallContext;
use berth_core::error::Classify;
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::snapshot::{Mount, SnapshotInfo, SnapshotKind, Snapshotter, Usage};
use berth_core::{Error, ErrorKind, Result};

use super::{Outcome, Report, Stop, SuiteFailure, Window, run_guarded, run_suite};
use mount::MountError;
use tree::{Op, Tree, chown, dir, file, remove};

/// What an implementation does that others legitimately do not. Build it with
/// `Capabilities { mountable: true, ..Capabilities::default() }`, so new flags default to off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The mounts are real and this process can perform them (as root): the cases that
    /// check file contents run. Without it they are skipped.
    pub mountable: bool,
    /// An active snapshot on parents is an overlay whose `upperdir=` holds only its changes,
    /// with overlay's on-disk whiteouts (0/0 character devices) and opaque directories (the
    /// `overlay.opaque` xattr).
    pub overlay_upper: bool,
    /// Usage of an active snapshot on a parent counts only what it changed (a layered
    /// snapshotter), not the parent's files (a copying one, like native).
    pub usage_counts_only_changes: bool,
    /// Every call needs a namespace: a [`CallContext`] without one is FailedPrecondition.
    pub requires_namespace: bool,
    /// [`SnapshotterFactory::reopen`] works: snapshots survive a new instance on the same
    /// storage (a daemon restart).
    pub reopen: bool,
}

/// One snapshotter under test, as a factory made it.
pub struct Fixture<G> {
    /// The snapshotter.
    pub snapshotter: Arc<dyn Snapshotter>,
    /// The context every call is made with (a namespace for namespaced snapshotters).
    pub cx: CallContext,
    /// A context for a second namespace; when given, the suite checks that namespaces do not
    /// see each other's snapshots.
    pub other_namespace: Option<CallContext>,
    /// Whatever must live as long as the snapshotter (a temp dir, a server); dropped after
    /// the case, or handed back to [`SnapshotterFactory::reopen`].
    pub guard: G,
}

impl<G> Fixture<G> {
    /// A fixture with no second namespace.
    pub fn new(snapshotter: Arc<dyn Snapshotter>, cx: CallContext, guard: G) -> Self {
        Fixture {
            snapshotter,
            cx,
            other_namespace: None,
            guard,
        }
    }

    /// Declares a second namespace of the same snapshotter.
    pub fn with_other_namespace(mut self, cx: CallContext) -> Self {
        self.other_namespace = Some(cx);
        self
    }
}

/// Makes the snapshotters the suite runs against.
#[async_trait::async_trait]
pub trait SnapshotterFactory: Send + Sync + 'static {
    /// What a fixture keeps alive besides the snapshotter.
    type Guard: Send + Sync + 'static;

    /// What the snapshotters can do.
    fn capabilities(&self) -> Capabilities;

    /// A fresh, empty snapshotter.
    async fn create(&self) -> Result<Fixture<Self::Guard>>;

    /// A new instance on the storage `guard` kept, after the suite dropped the old one (as
    /// after a daemon restart). Called only when [`Capabilities::reopen`] is set.
    async fn reopen(&self, guard: Self::Guard) -> Result<Fixture<Self::Guard>> {
        drop(guard);
        Err(Error::not_implemented(
            "this factory cannot reopen a snapshotter",
        ))
    }
}

/// Runs every case in [`CASES`]; `Ok` lists what passed and what was skipped.
pub async fn run<F: SnapshotterFactory>(factory: F) -> std::result::Result<Report, SuiteFailure> {
    run_cases(factory, CASES).await
}

/// Runs the named cases (names from [`CASES`]; an unknown name is a failure).
pub async fn run_cases<F: SnapshotterFactory>(
    factory: F,
    names: &[&'static str],
) -> std::result::Result<Report, SuiteFailure> {
    let factory = Arc::new(factory);
    let caps = factory.capabilities();
    run_suite("snapshotter", names, |name| run_case(&factory, caps, name)).await
}

/// The cases that mount: skipped when [`Capabilities::mountable`] is off or the process
/// cannot mount.
pub const MOUNTING_CASES: &[&str] = &[
    "basic",
    "parent_chain",
    "usage",
    "whiteouts_and_opaque_dirs",
    "overlay_whiteouts_on_disk",
    "owners_and_permissions",
    "special_files",
    "renames",
    "views_are_read_only",
    "many_layers",
];

/// How long one case may take before it counts as hung (the many-layer case mounts 130
/// times; a copying snapshotter copies a growing tree each time).
const CASE_TIMEOUT: Duration = Duration::from_secs(300);

impl From<MountError> for Stop {
    fn from(e: MountError) -> Self {
        match e {
            MountError::Unsupported(why) => Stop::Skip(why),
            MountError::Failed(why) => Stop::Fail(why),
        }
    }
}

type CaseResult = std::result::Result<Outcome, Stop>;
type Step<T = ()> = std::result::Result<T, Stop>;
type CaseFuture = Pin<Box<dyn Future<Output = CaseResult> + Send>>;
type CaseFn<F> = fn(Env<F>) -> CaseFuture;

async fn run_case<F: SnapshotterFactory>(
    factory: &Arc<F>,
    caps: Capabilities,
    name: &'static str,
) -> std::result::Result<Outcome, String> {
    let case = case_fn::<F>(name).ok_or_else(|| format!("no such case (cases: {CASES:?})"))?;
    let fixture = factory
        .create()
        .await
        .map_err(|e| format!("the factory could not create a snapshotter: {e}"))?;
    let work = tempfile::Builder::new()
        .prefix("berth-snapshot-suite-")
        .tempdir()
        .map_err(|e| format!("cannot create a work directory: {e}"))?;
    let env = Env {
        factory: Arc::clone(factory),
        caps,
        fixture,
        work: Arc::new(work),
        seq: Arc::new(AtomicUsize::new(0)),
    };
    let outcome = run_guarded(CASE_TIMEOUT, case(env)).await?;
    match outcome {
        Ok(o) => Ok(o),
        Err(Stop::Skip(why)) => Ok(Outcome::Skipped(why)),
        Err(Stop::Fail(message)) => Err(message),
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        /// Every case, in the order [`run`] runs them.
        pub const CASES: &[&str] = &[$(stringify!($name)),*];

        fn case_fn<F: SnapshotterFactory>(name: &str) -> Option<CaseFn<F>> {
            match name {
                $(stringify!($name) => Some(|env| Box::pin($name(env))),)*
                _ => None,
            }
        }
    };
}

suite![
    basic,
    stat_kinds_and_parents,
    same_key_twice,
    bad_parents_and_keys,
    commit_rules,
    update_labels,
    remove_rules,
    list_filters,
    mounts_again,
    odd_keys,
    concurrent_creates,
    cleanup,
    parent_chain,
    usage,
    whiteouts_and_opaque_dirs,
    overlay_whiteouts_on_disk,
    owners_and_permissions,
    special_files,
    renames,
    views_are_read_only,
    many_layers,
    namespaces_are_isolated,
    namespace_is_required,
    reopen_keeps_snapshots,
];

struct Env<F: SnapshotterFactory> {
    factory: Arc<F>,
    caps: Capabilities,
    fixture: Fixture<F::Guard>,
    /// Mount points and flat trees; removed after the case (mounts are undone first).
    work: Arc<tempfile::TempDir>,
    seq: Arc<AtomicUsize>,
}

/// A snapshotter and the context to call it with.
#[derive(Clone, Copy)]
struct On<'a> {
    sn: &'a dyn Snapshotter,
    cx: &'a CallContext,
}

trait StepExt<T> {
    fn step(self, what: &str) -> Step<T>;
}

impl<T> StepExt<T> for Result<T> {
    fn step(self, what: &str) -> Step<T> {
        self.map_err(|e| Stop::Fail(format!("{what}: unexpected error {:?}: {e}", e.kind())))
    }
}

/// Expects an error of `kind`.
fn expect_kind<T>(result: Result<T>, kind: ErrorKind, what: &str) -> Step {
    match result {
        Ok(_) => Err(Stop::Fail(format!("{what}: succeeded, expected {kind:?}"))),
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => Err(Stop::Fail(format!(
            "{what}: got {:?} ({e}), expected {kind:?}",
            e.kind()
        ))),
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// containerd's testsuite gives every snapshot this label, so that a garbage collector in
/// the layer under test keeps it.
fn gc_root() -> Labels {
    labels(&[("containerd.io/gc.root", "2024-01-01T00:00:00Z")])
}

fn passed() -> CaseResult {
    Ok(Outcome::Passed)
}

impl On<'_> {
    async fn prepare(&self, key: &str, parent: Option<&str>) -> Step<Vec<Mount>> {
        self.sn
            .prepare(self.cx, key, parent, gc_root())
            .await
            .step(&format!("prepare {key:?} on {parent:?}"))
    }

    async fn view(&self, key: &str, parent: Option<&str>) -> Step<Vec<Mount>> {
        self.sn
            .view(self.cx, key, parent, gc_root())
            .await
            .step(&format!("view {key:?} of {parent:?}"))
    }

    async fn commit(&self, name: &str, key: &str) -> Step {
        self.sn
            .commit(self.cx, name, key, gc_root())
            .await
            .step(&format!("commit {key:?} as {name:?}"))
    }

    async fn stat(&self, key: &str) -> Step<SnapshotInfo> {
        self.sn
            .stat(self.cx, key)
            .await
            .step(&format!("stat {key:?}"))
    }

    async fn remove(&self, key: &str) -> Step {
        self.sn
            .remove(self.cx, key)
            .await
            .step(&format!("remove {key:?}"))
    }

    async fn list(&self, filters: &[&str]) -> Step<Vec<SnapshotInfo>> {
        let filter = Filter::parse_all(filters).step(&format!("parse filters {filters:?}"))?;
        self.sn
            .list(self.cx, &filter)
            .await
            .step(&format!("list {filters:?}"))
    }

    async fn names(&self, filters: &[&str]) -> Step<BTreeSet<String>> {
        Ok(self
            .list(filters)
            .await?
            .into_iter()
            .map(|i| i.name)
            .collect())
    }

    /// A committed snapshot `name` with no parent and nothing in it.
    async fn committed(&self, name: &str, parent: Option<&str>) -> Step {
        let key = format!("{name}-active");
        self.prepare(&key, parent).await?;
        self.commit(name, &key).await
    }
}

impl<F: SnapshotterFactory> Env<F> {
    fn on(&self) -> On<'_> {
        On {
            sn: &*self.fixture.snapshotter,
            cx: &self.fixture.cx,
        }
    }

    /// Skips the case unless its mounts can be made.
    fn need_mounts(&self) -> Step {
        if !self.caps.mountable {
            return Err(Stop::Skip(
                "the factory does not declare mountable snapshots".to_owned(),
            ));
        }
        if let Some(why) = mount::cannot_mount() {
            return Err(Stop::Skip(why));
        }
        Ok(())
    }

    /// A new empty directory in the work area.
    fn new_dir(&self, what: &str) -> Step<PathBuf> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.work.path().join(format!("{what}-{n}"));
        std::fs::create_dir(&path)
            .map_err(|e| format!("create work directory {}: {e}", path.display()))?;
        Ok(path)
    }

    /// Mounts `mounts`, runs `f` on the mount point, unmounts (whatever `f` did).
    async fn with_mounted<T: Send + 'static>(
        &self,
        mounts: &[Mount],
        what: &str,
        f: impl FnOnce(&Path) -> std::result::Result<T, String> + Send + 'static,
    ) -> Step<T> {
        let target = self.new_dir("mnt")?;
        let mounts = mounts.to_vec();
        let owned = what.to_owned();
        tokio::task::spawn_blocking(move || -> Step<T> {
            let what = owned;
            let mounted = mount::mount_all(&mounts, &target).map_err(|e| match e {
                MountError::Unsupported(why) => Stop::Skip(why),
                MountError::Failed(why) => Stop::Fail(format!("{what}: {why}")),
            })?;
            let result = f(&target).map_err(|e| Stop::Fail(format!("{what}: {e}")));
            mounted
                .unmount()
                .map_err(|e| Stop::Fail(format!("{what}: {e}")))?;
            result
        })
        .await
        .map_err(|e| Stop::Fail(format!("{what}: task failed: {e}")))?
    }

    /// Applies `ops` through `mounts`.
    async fn write(&self, mounts: &[Mount], ops: &[Op], what: &str) -> Step {
        let ops = ops.to_vec();
        self.with_mounted(mounts, what, move |root| tree::apply(root, &ops))
            .await
    }

    /// The tree `mounts` show.
    async fn read(&self, mounts: &[Mount], what: &str) -> Step<Tree> {
        self.with_mounted(mounts, what, tree::read).await
    }

    /// Checks that `mounts` show exactly the tree at `flat`.
    async fn check(&self, mounts: &[Mount], flat: &Path, what: &str) -> Step {
        let want = read_plain(flat).await?;
        let got = self.read(mounts, what).await?;
        tree::compare(&want, &got).map_err(|e| Stop::Fail(format!("{what}: {e}")))
    }

    /// Builds committed layers `<prefix>-0`, `<prefix>-1`, ... (on `parent`), each from its
    /// ops, checking before and after each apply that the active snapshot shows what the flat
    /// tree at the returned path holds.
    async fn layers(
        &self,
        prefix: &str,
        parent: Option<&str>,
        layers: &[Vec<Op>],
        flat: Option<PathBuf>,
    ) -> Step<(PathBuf, Vec<String>)> {
        let on = self.on();
        let flat = match flat {
            Some(f) => f,
            None => self.new_dir("flat")?,
        };
        let mut parent = parent.map(str::to_owned);
        let mut names = Vec::new();
        for (i, ops) in layers.iter().enumerate() {
            let key = format!("{prefix}-active-{i}");
            let name = format!("{prefix}-{i}");
            let mounts = on.prepare(&key, parent.as_deref()).await?;
            ensure!(!mounts.is_empty(), "prepare {key:?} returned no mounts");
            self.check(&mounts, &flat, &format!("layer {i} before its changes"))
                .await?;
            apply_plain(&flat, ops).await?;
            self.write(&mounts, ops, &format!("apply layer {i}"))
                .await?;
            self.check(&mounts, &flat, &format!("layer {i} after its changes"))
                .await?;
            on.commit(&name, &key).await?;
            parent = Some(name.clone());
            names.push(name);
        }
        Ok((flat, names))
    }
}

async fn read_plain(path: &Path) -> Step<Tree> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || tree::read(&path))
        .await
        .map_err(|e| format!("read task failed: {e}"))?
        .map_err(Stop::Fail)
}

async fn apply_plain(path: &Path, ops: &[Op]) -> Step {
    let path = path.to_owned();
    let ops = ops.to_vec();
    tokio::task::spawn_blocking(move || tree::apply(&path, &ops))
        .await
        .map_err(|e| format!("apply task failed: {e}"))?
        .map_err(|e| Stop::Fail(format!("flat tree: {e}")))
}

/// Checks a Stat answer's name, kind and parent.
fn check_info(info: &SnapshotInfo, name: &str, kind: SnapshotKind, parent: Option<&str>) -> Step {
    ensure_eq!(info.name.as_str(), name, "stat {name:?}: name");
    ensure_eq!(info.kind, kind, "stat {name:?}: kind");
    ensure_eq!(info.parent.as_deref(), parent, "stat {name:?}: parent");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Cases that need no mounts.

/// containerd's StatActive, StatCommitted and Transitivity: kinds, parents, names, and
/// created == updated for a new snapshot, inside the window of its creation.
async fn stat_kinds_and_parents<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let on = t.on();
    let window = Window::start();
    on.prepare("a", None).await?;
    let window = window.close();
    let a = on.stat("a").await?;
    check_info(&a, "a", SnapshotKind::Active, None)?;
    window.check(a.created_at, "active a: created_at")?;
    ensure_eq!(a.updated_at, a.created_at, "active a: updated_at");
    ensure_eq!(a.labels, gc_root(), "active a: labels");

    let window = Window::start();
    on.commit("c1", "a").await?;
    let window = window.close();
    expect_kind(
        on.sn.stat(on.cx, "a").await,
        ErrorKind::NotFound,
        "stat a after commit",
    )?;
    let c1 = on.stat("c1").await?;
    check_info(&c1, "c1", SnapshotKind::Committed, None)?;
    window.check(c1.created_at, "committed c1: created_at")?;
    ensure_eq!(c1.updated_at, c1.created_at, "committed c1: updated_at");

    on.committed("c2", Some("c1")).await?;
    on.committed("c3", Some("c2")).await?;
    on.prepare("a3", Some("c3")).await?;
    on.view("v3", Some("c3")).await?;
    on.view("v0", None).await?;
    check_info(
        &on.stat("c2").await?,
        "c2",
        SnapshotKind::Committed,
        Some("c1"),
    )?;
    check_info(
        &on.stat("c3").await?,
        "c3",
        SnapshotKind::Committed,
        Some("c2"),
    )?;
    check_info(
        &on.stat("a3").await?,
        "a3",
        SnapshotKind::Active,
        Some("c3"),
    )?;
    check_info(&on.stat("v3").await?, "v3", SnapshotKind::View, Some("c3"))?;
    check_info(&on.stat("v0").await?, "v0", SnapshotKind::View, None)?;
    // Transitivity: the parent of a parent is found by following Stat.
    let mut chain = Vec::new();
    let mut next = Some("a3".to_owned());
    while let Some(key) = next {
        let info = on.stat(&key).await?;
        chain.push(info.name);
        next = info.parent;
    }
    ensure_eq!(chain, ["a3", "c3", "c2", "c1"], "parents of a3");
    expect_kind(
        on.sn.stat(on.cx, "missing").await,
        ErrorKind::NotFound,
        "stat missing",
    )?;
    passed()
}

/// containerd's PrepareView: a key that exists (active, view or committed) cannot be taken
/// again by Prepare or View.
async fn same_key_twice<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let on = t.on();
    on.committed("base", None).await?;
    on.prepare("k", Some("base")).await?;
    on.view("v", Some("base")).await?;
    for key in ["k", "v", "base"] {
        expect_kind(
            on.sn.prepare(on.cx, key, Some("base"), Labels::new()).await,
            ErrorKind::AlreadyExists,
            &format!("prepare existing {key:?}"),
        )?;
        expect_kind(
            on.sn.view(on.cx, key, None, Labels::new()).await,
            ErrorKind::AlreadyExists,
            &format!("view existing {key:?}"),
        )?;
    }
    check_info(
        &on.stat("k").await?,
        "k",
        SnapshotKind::Active,
        Some("base"),
    )?;
    check_info(&on.stat("v").await?, "v", SnapshotKind::View, Some("base"))?;
    passed()
}

/// A parent must exist (NotFound) and be committed (InvalidArgument); a key must not be
/// empty (InvalidArgument). Nothing is left behind by a refused creation.
async fn bad_parents_and_keys<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let on = t.on();
    expect_kind(
        on.sn
            .prepare(on.cx, "x", Some("missing"), Labels::new())
            .await,
        ErrorKind::NotFound,
        "prepare on a missing parent",
    )?;
    expect_kind(
        on.sn.view(on.cx, "x", Some("missing"), Labels::new()).await,
        ErrorKind::NotFound,
        "view of a missing parent",
    )?;
    on.prepare("active", None).await?;
    on.view("view", None).await?;
    for parent in ["active", "view"] {
        expect_kind(
            on.sn.prepare(on.cx, "x", Some(parent), Labels::new()).await,
            ErrorKind::InvalidArgument,
            &format!("prepare on the uncommitted {parent}"),
        )?;
        expect_kind(
            on.sn.view(on.cx, "x", Some(parent), Labels::new()).await,
            ErrorKind::InvalidArgument,
            &format!("view of the uncommitted {parent}"),
        )?;
    }
    expect_kind(
        on.sn.prepare(on.cx, "", None, Labels::new()).await,
        ErrorKind::InvalidArgument,
        "prepare with an empty key",
    )?;
    expect_kind(
        on.sn.stat(on.cx, "x").await,
        ErrorKind::NotFound,
        "stat after refused creations",
    )?;
    ensure_eq!(
        on.names(&[]).await?,
        BTreeSet::from(["active".to_owned(), "view".to_owned()]),
        "snapshots after refused creations"
    );
    passed()
}

/// Only active snapshots commit (a view or a committed one is FailedPrecondition), to a name
/// that is free (AlreadyExists) and not empty; a refused commit leaves the active snapshot
/// as it was.
async fn commit_rules<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let on = t.on();
    on.view("v", None).await?;
    expect_kind(
        on.sn.commit(on.cx, "c", "v", Labels::new()).await,
        ErrorKind::FailedPrecondition,
        "commit of a view",
    )?;
    check_info(&on.stat("v").await?, "v", SnapshotKind::View, None)?;
    on.committed("c1", None).await?;
    expect_kind(
        on.sn.commit(on.cx, "c9", "c1", Labels::new()).await,
        ErrorKind::FailedPrecondition,
        "commit of a committed snapshot",
    )?;
    on.prepare("b", Some("c1")).await?;
    expect_kind(
        on.sn.commit(on.cx, "c1", "b", Labels::new()).await,
        ErrorKind::AlreadyExists,
        "commit onto an existing name",
    )?;
    expect_kind(
        on.sn.commit(on.cx, "v", "b", Labels::new()).await,
        ErrorKind::AlreadyExists,
        "commit onto the name of a view",
    )?;
    expect_kind(
        on.sn.commit(on.cx, "", "b", Labels::new()).await,
        ErrorKind::InvalidArgument,
        "commit to an empty name",
    )?;
    expect_kind(
        on.sn.commit(on.cx, "c2", "missing", Labels::new()).await,
        ErrorKind::NotFound,
        "commit of a missing key",
    )?;
    check_info(&on.stat("b").await?, "b", SnapshotKind::Active, Some("c1"))?;
    let with = labels(&[("containerd.io/gc.root", "x"), ("k", "v")]);
    on.sn
        .commit(on.cx, "c2", "b", with.clone())
        .await
        .step("commit b as c2")?;
    let c2 = on.stat("c2").await?;
    check_info(&c2, "c2", SnapshotKind::Committed, Some("c1"))?;
    for (k, v) in &with {
        ensure_eq!(
            c2.labels.get(k),
            Some(v),
            "committed c2: label {k:?} given at commit"
        );
    }
    expect_kind(
        on.sn.stat(on.cx, "b").await,
        ErrorKind::NotFound,
        "stat b after commit",
    )?;
    passed()
}

/// containerd's Update: for each kind, replace all labels (no field paths), set and drop
/// single labels (`labels.<key>`), replace again (`labels`); name, kind, parent and created
/// never change, updated moves; `parent` (any other path) is InvalidArgument.
async fn update_labels<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let on = t.on();
    let window = Window::start();
    on.committed("c1", None).await?;
    on.committed("c2", Some("c1")).await?;
    on.prepare("a1", Some("c2")).await?;
    on.prepare("a2", None).await?;
    on.view("v1", Some("c2")).await?;
    on.view("v2", None).await?;
    let window = window.close();
    let cases = [
        ("c1", SnapshotKind::Committed, None),
        ("c2", SnapshotKind::Committed, Some("c1")),
        ("a1", SnapshotKind::Active, Some("c2")),
        ("a2", SnapshotKind::Active, None),
        ("v1", SnapshotKind::View, Some("c2")),
        ("v2", SnapshotKind::View, None),
    ];
    for (name, kind, parent) in cases {
        let st = on.stat(name).await?;
        check_info(&st, name, kind, parent)?;
        window.check(st.created_at, &format!("{name}: created_at"))?;
        ensure_eq!(
            st.updated_at,
            st.created_at,
            "{name}: updated_at before updates"
        );
        let created = st.created_at;

        let expected = labels(&[
            ("l1", "v1"),
            ("l2", "v2"),
            ("l3", "v3"),
            ("containerd.io/gc.root", "2025-01-01T00:00:00Z"),
        ]);
        let mut request = st.clone();
        request.parent = Some("doesnotexist".to_owned());
        request.labels = expected.clone();
        let w = Window::start();
        let got = on
            .sn
            .update(on.cx, request, &[])
            .await
            .step(&format!("update {name} (all labels)"))?;
        let w = w.close();
        check_info(&got, name, kind, parent)?;
        ensure_eq!(got.labels, expected, "{name}: labels after replacing all");
        ensure_eq!(got.created_at, created, "{name}: created_at after update");
        w.check(got.updated_at, &format!("{name}: updated_at after update"))?;

        let mut request = got.clone();
        request.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
        let got = on
            .sn
            .update(
                on.cx,
                request,
                &["labels.l1".to_owned(), "labels.l2".to_owned()],
            )
            .await
            .step(&format!("update {name} (labels.l1, labels.l2)"))?;
        ensure_eq!(
            got.labels,
            labels(&[
                ("l1", "updated"),
                ("l3", "v3"),
                ("containerd.io/gc.root", "2025-01-01T00:00:00Z"),
            ]),
            "{name}: labels after labels.l1 and labels.l2"
        );

        let expected = labels(&[("l4", "v4"), ("containerd.io/gc.root", "x")]);
        let mut request = got.clone();
        request.labels = expected.clone();
        let got = on
            .sn
            .update(on.cx, request, &["labels".to_owned()])
            .await
            .step(&format!("update {name} (labels)"))?;
        ensure_eq!(got.labels, expected, "{name}: labels after `labels`");
        ensure_eq!(
            on.stat(name).await?.labels,
            expected,
            "{name}: labels in Stat after updates"
        );

        let mut request = got.clone();
        request.parent = Some("doesnotexist".to_owned());
        expect_kind(
            on.sn.update(on.cx, request, &["parent".to_owned()]).await,
            ErrorKind::InvalidArgument,
            &format!("update {name} with field path `parent`"),
        )?;
        check_info(&on.stat(name).await?, name, kind, parent)?;
    }
    let mut missing = on.stat("c1").await?;
    missing.name = "missing".to_owned();
    expect_kind(
        on.sn.update(on.cx, missing, &[]).await,
        ErrorKind::NotFound,
        "update of a missing snapshot",
    )?;
    passed()
}

/// containerd's Remove and RemoveIntermediateSnapshot: a parent of an active snapshot or a
/// view is FailedPrecondition; keys are free again after removal; top-down removal works.
async fn remove_rules<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let on = t.on();
    on.committed("committed-1", None).await?;
    on.prepare("reuse-1", Some("committed-1")).await?;
    expect_kind(
        on.sn.remove(on.cx, "committed-1").await,
        ErrorKind::FailedPrecondition,
        "remove the parent of an active snapshot",
    )?;
    on.remove("reuse-1").await?;
    on.view("reuse-1", Some("committed-1")).await?;
    expect_kind(
        on.sn.remove(on.cx, "committed-1").await,
        ErrorKind::FailedPrecondition,
        "remove the parent of a view",
    )?;
    on.remove("reuse-1").await?;
    on.prepare("reuse-1", None).await?;
    on.remove("committed-1").await?;
    on.commit("committed-1", "reuse-1").await?;
    check_info(
        &on.stat("committed-1").await?,
        "committed-1",
        SnapshotKind::Committed,
        None,
    )?;

    on.committed("base", None).await?;
    on.committed("inter", Some("base")).await?;
    on.prepare("top", Some("inter")).await?;
    expect_kind(
        on.sn.remove(on.cx, "inter").await,
        ErrorKind::FailedPrecondition,
        "remove an intermediate snapshot",
    )?;
    expect_kind(
        on.sn.remove(on.cx, "base").await,
        ErrorKind::FailedPrecondition,
        "remove the base of a chain",
    )?;
    on.remove("top").await?;
    on.remove("inter").await?;
    on.remove("base").await?;
    expect_kind(
        on.sn.remove(on.cx, "base").await,
        ErrorKind::NotFound,
        "remove twice",
    )?;
    expect_kind(
        on.sn.remove(on.cx, "missing").await,
        ErrorKind::NotFound,
        "remove a missing snapshot",
    )?;
    ensure_eq!(
        on.names(&[]).await?,
        BTreeSet::from(["committed-1".to_owned()]),
        "snapshots left"
    );
    passed()
}

/// containerd's Walk: filters on kind, name, parent and labels (presence and values), and
/// several filters as alternatives.
async fn list_filters<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let on = t.on();
    let root = labels(&[("containerd.io/gc.root", "check-walk")]);
    let with = |l: &str| {
        let mut all = root.clone();
        all.insert("l".to_owned(), l.to_owned());
        all
    };
    let sn = on.sn;
    let cx = on.cx;
    sn.prepare(cx, "a-np", None, root.clone())
        .await
        .step("prepare a-np")?;
    sn.prepare(cx, "p-tmp", None, root.clone())
        .await
        .step("prepare p-tmp")?;
    sn.commit(cx, "p", "p-tmp", root.clone())
        .await
        .step("commit p")?;
    sn.prepare(cx, "a", Some("p"), root.clone())
        .await
        .step("prepare a")?;
    sn.view(cx, "v", Some("p"), root.clone())
        .await
        .step("view v")?;
    sn.prepare(cx, "p-wl-tmp", None, root.clone())
        .await
        .step("prepare p-wl-tmp")?;
    sn.commit(cx, "p-wl", "p-wl-tmp", with("1"))
        .await
        .step("commit p-wl")?;
    sn.prepare(cx, "a-wl", Some("p-wl"), with("2"))
        .await
        .step("prepare a-wl")?;
    sn.view(cx, "v-wl", Some("p-wl"), with("3"))
        .await
        .step("view v-wl")?;
    sn.prepare(cx, "a-np-wl", None, with("2"))
        .await
        .step("prepare a-np-wl")?;

    let cases: &[(&[&str], &[&str])] = &[
        (
            &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["a-np", "a", "a-wl", "a-np-wl"],
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["v", "v-wl"],
            &[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["p", "p-wl"],
            &[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["p", "a-np-wl"], &["name==p", "name==a-np-wl"]),
        (&["a-wl"], &["name==a-wl,labels.l"]),
        (&["a", "v"], &["parent==p"]),
        (
            &["a", "v", "a-wl", "v-wl"],
            &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["p-wl", "a-wl", "v-wl", "a-np-wl"], &["labels.l"]),
        (&["a-wl", "a-np-wl"], &["labels.l==2"]),
        (&["a-np", "a-np-wl"], &["name~=^a-np"]),
    ];
    for (want, filters) in cases {
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        ensure_eq!(on.names(filters).await?, want, "list {filters:?}");
    }
    // Listed infos are what Stat says.
    for info in on.list(&[]).await? {
        ensure_eq!(
            on.stat(&info.name).await?,
            info,
            "stat of listed {:?}",
            info.name
        );
    }
    passed()
}

/// Mounts returns again what Prepare and View returned; a committed snapshot has no mounts
/// (FailedPrecondition), a missing one is NotFound.
async fn mounts_again<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let on = t.on();
    let first = on.prepare("a0", None).await?;
    ensure_eq!(
        on.sn.mounts(on.cx, "a0").await.step("mounts a0")?,
        first,
        "mounts of a0"
    );
    on.commit("c1", "a0").await?;
    on.committed("c2", Some("c1")).await?;
    for (key, parent, view) in [
        ("a1", Some("c1"), false),
        ("a2", Some("c2"), false),
        ("v0", None, true),
        ("v1", Some("c1"), true),
        ("v2", Some("c2"), true),
    ] {
        let made = if view {
            on.view(key, parent).await?
        } else {
            on.prepare(key, parent).await?
        };
        ensure!(!made.is_empty(), "{key}: no mounts");
        ensure_eq!(
            on.sn
                .mounts(on.cx, key)
                .await
                .step(&format!("mounts {key}"))?,
            made,
            "mounts of {key}"
        );
    }
    expect_kind(
        on.sn.mounts(on.cx, "c1").await,
        ErrorKind::FailedPrecondition,
        "mounts of a committed snapshot",
    )?;
    expect_kind(
        on.sn.mounts(on.cx, "missing").await,
        ErrorKind::NotFound,
        "mounts of a missing snapshot",
    )?;
    passed()
}

/// Keys are opaque text: slashes, dots, `..`, spaces, punctuation, non-ASCII and long keys
/// work for every call, and never become paths (no mount names them).
async fn odd_keys<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let on = t.on();
    let long = "k".repeat(1000);
    let keys = [
        "a/b/c",
        "/leading/slash",
        "trailing/",
        "../../escape-attempt",
        "..",
        ".",
        "with space and\ttab",
        "ünïcödé/雪/🙂",
        "semi;colon:colon,comma=eq\"quote'",
        long.as_str(),
    ];
    for key in keys {
        let committed = format!("{key}@committed");
        let child = format!("{key}/child");
        let view = format!("{key}#view");
        let mounts = on.prepare(key, None).await?;
        on.commit(&committed, key).await?;
        let mut all = mounts;
        all.extend(on.prepare(&child, Some(&committed)).await?);
        all.extend(on.view(&view, Some(&committed)).await?);
        check_info(
            &on.stat(&committed).await?,
            &committed,
            SnapshotKind::Committed,
            None,
        )?;
        check_info(
            &on.stat(&child).await?,
            &child,
            SnapshotKind::Active,
            Some(&committed),
        )?;
        check_info(
            &on.stat(&view).await?,
            &view,
            SnapshotKind::View,
            Some(&committed),
        )?;
        for m in &all {
            let text = format!("{} {}", m.source, m.options.join(","));
            for marker in ["escape-attempt", "雪", "semi;colon", "kkkkkkkk"] {
                ensure!(
                    !key.contains(marker) || !text.contains(marker),
                    "a mount of key {key:?} names the key: {text}"
                );
            }
        }
    }
    let listed = on.names(&[]).await?;
    ensure_eq!(listed.len(), keys.len() * 3, "number of snapshots listed");
    for key in keys {
        for name in [
            format!("{key}@committed"),
            format!("{key}/child"),
            format!("{key}#view"),
        ] {
            ensure!(listed.contains(&name), "list lacks {name:?}");
        }
    }
    for key in keys {
        on.remove(&format!("{key}/child")).await?;
        on.remove(&format!("{key}#view")).await?;
        on.remove(&format!("{key}@committed")).await?;
    }
    ensure!(
        on.names(&[]).await?.is_empty(),
        "snapshots left after removal"
    );
    passed()
}

/// Many creations on one parent at once all succeed; racing creations of one key leave
/// exactly one winner, the others AlreadyExists.
async fn concurrent_creates<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let on = t.on();
    on.committed("base", None).await?;
    let sn = Arc::clone(&t.fixture.snapshotter);
    let cx = t.fixture.cx.clone();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (sn, cx) = (Arc::clone(&sn), cx.clone());
        tasks.push(tokio::spawn(async move {
            sn.prepare(&cx, &format!("c-{i}"), Some("base"), Labels::new())
                .await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        task.await
            .map_err(|e| format!("task {i}: {e}"))?
            .step(&format!("concurrent prepare c-{i}"))?;
    }
    ensure_eq!(
        on.names(&["parent==base"]).await?.len(),
        16,
        "children of base"
    );
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (sn, cx) = (Arc::clone(&sn), cx.clone());
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                sn.prepare(&cx, "same", Some("base"), Labels::new()).await
            } else {
                sn.view(&cx, "same", Some("base"), Labels::new()).await
            }
        }));
    }
    let mut won = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.map_err(|e| format!("task {i}: {e}"))? {
            Ok(_) => won += 1,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Stop::Fail(format!(
                    "racing creation {i} of one key: {:?}: {e}",
                    e.kind()
                )));
            }
        }
    }
    ensure_eq!(won, 1, "racing creations of one key that succeeded");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (sn, cx) = (Arc::clone(&sn), cx.clone());
        tasks.push(tokio::spawn(async move {
            sn.remove(&cx, &format!("c-{i}")).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        task.await
            .map_err(|e| format!("task {i}: {e}"))?
            .step(&format!("concurrent remove c-{i}"))?;
    }
    ensure_eq!(
        on.names(&[]).await?,
        BTreeSet::from(["base".to_owned(), "same".to_owned()]),
        "snapshots left"
    );
    passed()
}

/// Cleanup after removals succeeds, can be repeated, and leaves live snapshots intact.
async fn cleanup<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let on = t.on();
    on.committed("keep", None).await?;
    let kept = on.prepare("keep-child", Some("keep")).await?;
    for i in 0..4 {
        on.committed(&format!("gone-{i}"), None).await?;
        on.view(&format!("gone-view-{i}"), None).await?;
    }
    for i in 0..4 {
        on.remove(&format!("gone-{i}")).await?;
        on.remove(&format!("gone-view-{i}")).await?;
    }
    on.sn.cleanup(on.cx).await.step("cleanup")?;
    on.sn.cleanup(on.cx).await.step("second cleanup")?;
    ensure_eq!(
        on.names(&[]).await?,
        BTreeSet::from(["keep".to_owned(), "keep-child".to_owned()]),
        "snapshots after cleanup"
    );
    ensure_eq!(
        on.sn
            .mounts(on.cx, "keep-child")
            .await
            .step("mounts after cleanup")?,
        kept,
        "mounts of keep-child after cleanup"
    );
    if t.caps.mountable && mount::cannot_mount().is_none() {
        t.write(
            &kept,
            &[file("still-writable", b"yes", 0o644)],
            "write after cleanup",
        )
        .await?;
    }
    on.commit("keep-2", "keep-child").await?;
    passed()
}

// ---------------------------------------------------------------------------------------
// Cases that mount.

/// containerd's Basic: a layer written through its mounts, committed, a second layer on it
/// that sees the first and changes it, a view of the result; Stat and List agree; a parent
/// cannot be removed before its child.
async fn basic<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    t.need_mounts()?;
    let on = t.on();
    let initial = vec![
        file("foo", b"foo\n", 0o777),
        dir("a", 0o755),
        dir("a/b", 0o755),
        dir("a/b/c", 0o755),
    ];
    let diff = vec![
        file("bar", b"bar\n", 0o777),
        file("foo", b"bar\n", 0o777),
        remove("a/b"),
    ];
    let flat = t.new_dir("flat")?;
    let mounts = on.prepare("preparing", None).await?;
    ensure!(!mounts.is_empty(), "prepare returned no mounts");
    t.write(&mounts, &initial, "write the first layer").await?;
    apply_plain(&flat, &initial).await?;
    on.commit("committed", "preparing").await?;
    let si = on.stat("committed").await?;
    check_info(&si, "committed", SnapshotKind::Committed, None)?;
    expect_kind(
        on.sn.stat(on.cx, "preparing").await,
        ErrorKind::NotFound,
        "stat preparing after commit",
    )?;

    let mounts = on.prepare("next", Some("committed")).await?;
    t.check(&mounts, &flat, "the second layer before changes")
        .await?;
    t.write(&mounts, &diff, "write the second layer").await?;
    apply_plain(&flat, &diff).await?;
    check_info(
        &on.stat("next").await?,
        "next",
        SnapshotKind::Active,
        Some("committed"),
    )?;
    on.commit("committed-next", "next").await?;
    let si2 = on.stat("committed-next").await?;
    check_info(
        &si2,
        "committed-next",
        SnapshotKind::Committed,
        Some("committed"),
    )?;
    expect_kind(
        on.sn.stat(on.cx, "next").await,
        ErrorKind::NotFound,
        "stat next after commit",
    )?;
    let listed = on.list(&[]).await?;
    for want in [&si, &si2] {
        let got = listed.iter().find(|i| i.name == want.name);
        ensure_eq!(got, Some(want), "listed {:?}", want.name);
    }

    let mounts = on.view("view", Some("committed-next")).await?;
    t.check(&mounts, &flat, "view of both layers").await?;
    on.remove("view").await?;
    expect_kind(
        on.sn.remove(on.cx, "committed").await,
        ErrorKind::FailedPrecondition,
        "remove a parent",
    )?;
    on.remove("committed-next").await?;
    on.remove("committed").await?;
    passed()
}

/// A chain of four layers: each layer's view shows exactly the layers up to it, and an
/// active snapshot on the top shows them all (lower dirs in the right order).
async fn parent_chain<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    t.need_mounts()?;
    let on = t.on();
    let mut flat_of = Vec::new();
    let mut parent: Option<String> = None;
    let flat = t.new_dir("flat")?;
    for i in 0..4 {
        let ops = vec![
            file(&format!("layer-{i}"), format!("{i}").as_bytes(), 0o644),
            file("top", format!("top is {i}").as_bytes(), 0o644),
        ];
        let (_, names) = t
            .layers(
                &format!("chain{i}"),
                parent.as_deref(),
                &[ops],
                Some(flat.clone()),
            )
            .await?;
        let name = names[0].clone();
        let snapshot = t.new_dir(&format!("flat-{i}"))?;
        let (from, to) = (flat.clone(), snapshot.clone());
        tokio::task::spawn_blocking(move || copy_plain(&from, &to))
            .await
            .map_err(|e| format!("copy task: {e}"))??;
        flat_of.push((name.clone(), snapshot));
        parent = Some(name);
    }
    for (i, (name, snapshot)) in flat_of.iter().enumerate() {
        let mounts = on.view(&format!("view-{i}"), Some(name)).await?;
        t.check(&mounts, snapshot, &format!("view of layer {i}"))
            .await?;
    }
    let mounts = on.prepare("on-top", parent.as_deref()).await?;
    t.check(&mounts, &flat, "active snapshot on the chain")
        .await?;
    passed()
}

/// Copies a plain test tree (files and directories only).
fn copy_plain(from: &Path, to: &Path) -> std::result::Result<(), String> {
    for entry in std::fs::read_dir(from).map_err(|e| format!("read {}: {e}", from.display()))? {
        let entry = entry.map_err(|e| format!("read {}: {e}", from.display()))?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir(&target).map_err(|e| format!("mkdir: {e}"))?;
            copy_plain(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(|e| format!("copy: {e}"))?;
        }
    }
    Ok(())
}

/// Usage: bytes of regular files (a hard-linked file once) and inodes (the root included),
/// for an active snapshot, the same once committed, and for a child what the snapshotter
/// stores for it (only its changes, or its full copy).
async fn usage<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    t.need_mounts()?;
    let on = t.on();
    let mounts = on.prepare("a", None).await?;
    ensure_eq!(
        on.sn
            .usage(on.cx, "a")
            .await
            .step("usage of an empty snapshot")?,
        Usage { size: 0, inodes: 1 },
        "usage of an empty active snapshot"
    );
    let layer = vec![
        file("a", &[1u8; 1000], 0o644),
        Op::Link("a".into(), "b".into()),
        dir("d", 0o755),
        file("d/c", &[2u8; 24], 0o644),
        Op::Symlink("a".into(), "s".into()),
    ];
    t.write(&mounts, &layer, "write the layer").await?;
    let want = Usage {
        size: 1024,
        inodes: 5,
    };
    ensure_eq!(
        on.sn.usage(on.cx, "a").await.step("usage of a")?,
        want,
        "usage of the active snapshot"
    );
    on.commit("c", "a").await?;
    ensure_eq!(
        on.sn.usage(on.cx, "c").await.step("usage of c")?,
        want,
        "usage of the committed snapshot"
    );
    let mounts = on.prepare("child", Some("c")).await?;
    t.write(&mounts, &[file("e", &[3u8; 777], 0o644)], "write the child")
        .await?;
    let want_child = if t.caps.usage_counts_only_changes {
        Usage {
            size: 777,
            inodes: 2,
        }
    } else {
        Usage {
            size: 1024 + 777,
            inodes: 6,
        }
    };
    ensure_eq!(
        on.sn.usage(on.cx, "child").await.step("usage of child")?,
        want_child,
        "usage of the child"
    );
    expect_kind(
        on.sn.usage(on.cx, "missing").await,
        ErrorKind::NotFound,
        "usage of a missing snapshot",
    )?;
    passed()
}

fn whiteout_layers() -> Vec<Vec<Op>> {
    vec![
        vec![
            file("a", b"a", 0o644),
            file("b", b"b", 0o644),
            dir("d", 0o755),
            file("d/x", b"x", 0o644),
            file("d/y", b"y", 0o644),
            dir("e", 0o755),
            file("e/z", b"z", 0o644),
            dir("lib", 0o700),
            file("lib/hidden", b"", 0o644),
        ],
        vec![
            remove("a"),
            remove("d"),
            dir("d", 0o755),
            file("d/w", b"w", 0o644),
            remove("e/z"),
            remove("lib"),
            dir("lib", 0o700),
            file("lib/not-hidden", b"", 0o644),
        ],
        vec![file("lib/newfile", b"", 0o644), remove("b")],
    ]
}

/// containerd's DeletedFilesInChildSnapshot, RemoveDirectoryInLowerLayer and
/// MoveFileFromLowerLayer: what a layer deletes is gone from views of it and of its
/// children, a directory removed and made again shows only its new contents (an opaque
/// directory), and a file moved by a hard link keeps its contents.
async fn whiteouts_and_opaque_dirs<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    t.need_mounts()?;
    let on = t.on();
    let mut layers = whiteout_layers();
    layers.push(vec![
        dir("dir1", 0o700),
        file("dir1/f1", b"Hello", 0o644),
        dir("dir2", 0o700),
        file("dir2/f2", b"...", 0o644),
    ]);
    layers.push(vec![
        dir("dir3", 0o700),
        file("dir3/f1", b"Hello", 0o644),
        remove("dir1"),
        Op::Link("dir2/f2".into(), "dir3/f2".into()),
        remove("dir2/f2"),
    ]);
    let (flat, names) = t.layers("wo", None, &layers, None).await?;
    let top = names.last().cloned().unwrap_or_default();
    let mounts = on.view("view", Some(&top)).await?;
    t.check(&mounts, &flat, "view of the top layer").await?;
    let got = t.read(&mounts, "view of the top layer").await?;
    for gone in [
        "a",
        "b",
        "d/x",
        "d/y",
        "e/z",
        "lib/hidden",
        "dir1",
        "dir2/f2",
    ] {
        ensure!(!got.contains_key(gone), "{gone:?} is visible in the view");
    }
    passed()
}

/// With overlay semantics, the child's upper dir holds whiteouts (character devices 0/0)
/// for deleted files and marks a directory made again as opaque.
async fn overlay_whiteouts_on_disk<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    if !t.caps.overlay_upper {
        return Err(Stop::Skip(
            "the factory does not declare overlay upper dirs".to_owned(),
        ));
    }
    t.need_mounts()?;
    let on = t.on();
    let layers = whiteout_layers();
    let (_, names) = t.layers("base", None, &layers[..1], None).await?;
    let mounts = on.prepare("child", Some(&names[0])).await?;
    let upper = mounts
        .iter()
        .filter(|m| m.kind == "overlay")
        .flat_map(|m| m.options.iter())
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
        .ok_or_else(|| format!("the child's mounts have no overlay upper dir: {mounts:?}"))?;
    t.write(&mounts, &layers[1], "write the child").await?;
    let upper_tree = read_plain(&upper).await?;
    for whiteout in ["a", "e/z"] {
        let node = upper_tree
            .get(whiteout)
            .ok_or_else(|| format!("no whiteout for {whiteout:?} in the upper dir"))?;
        ensure!(
            node.kind == "char" && node.rdev == Some(0),
            "{whiteout:?} in the upper dir is {node:?}, expected a 0/0 character device"
        );
    }
    ensure!(
        !upper_tree.contains_key("b"),
        "an unchanged file was copied up"
    );
    for opaque in ["d", "lib"] {
        let path = upper.join(opaque);
        let marked = tokio::task::spawn_blocking(move || {
            ["trusted.overlay.opaque", "user.overlay.opaque"]
                .iter()
                .any(|name| {
                    let mut value = [0u8; 8];
                    matches!(
                        rustix::fs::lgetxattr(&path, *name, &mut value[..]),
                        Ok(1) if value[0] == b'y'
                    )
                })
        })
        .await
        .map_err(|e| format!("xattr task: {e}"))?;
        ensure!(marked, "{opaque:?} in the upper dir is not marked opaque");
    }
    passed()
}

/// containerd's Chown, DirectoryPermissionOnCommit and RootPermission: owners and modes
/// set in one layer and changed in the next show in views; a new snapshot's root is 0755.
async fn owners_and_permissions<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    t.need_mounts()?;
    let on = t.on();
    let mounts = on.prepare("root-check", None).await?;
    let mode = t
        .with_mounted(&mounts, "root permission", |root| {
            std::fs::metadata(root)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                .map_err(|e| e.to_string())
        })
        .await?;
    ensure_eq!(mode, 0o755, "mode of a new snapshot's root");
    let layers = vec![
        vec![
            dir("opt", 0o700),
            dir("opt/a", 0o700),
            dir("opt/a/b", 0o700),
            file("opt/a/b/file.txt", b"hello", 0o644),
            dir("dir1", 0o700),
            dir("dir2", 0o700),
            dir("dir3", 0o700),
            dir("dir4", 0o700),
            file("dir4/f1", b"...", 0o644),
            dir("dir5", 0o700),
            file("dir5/f1", b"...", 0o644),
            chown("dir1", 1, 1),
            chown("dir2", 1, 1),
            chown("dir3", 1, 1),
            chown("dir5", 1, 1),
            chown("dir5/f1", 1, 1),
        ],
        vec![
            chown("opt", 1, 1),
            chown("opt/a", 1, 1),
            chown("opt/a/b", 1, 1),
            chown("opt/a/b/file.txt", 1, 1),
            chown("dir2", 0, 0),
            remove("dir3"),
            chown("dir4", 1, 1),
            chown("dir4/f1", 1, 1),
            Op::Chmod("dir4/f1".into(), 0o4755),
        ],
        vec![
            dir("dir3", 0o700),
            chown("dir3", 1, 1),
            remove("dir5"),
            dir("dir5", 0o700),
            chown("dir5", 1, 1),
            Op::Chmod("opt".into(), 0o1777),
        ],
    ];
    let (flat, names) = t.layers("perm", None, &layers, None).await?;
    let mounts = on.view("view", names.last().map(String::as_str)).await?;
    t.check(&mounts, &flat, "view of the top layer").await?;
    passed()
}

/// Hard links, symlinks (relative, absolute, dangling), a FIFO, a device, setuid and user
/// xattrs survive into children and views.
async fn special_files<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    t.need_mounts()?;
    let on = t.on();
    let layers = vec![vec![
        file("f", b"contents", 0o640),
        Op::Xattr("f".into(), "user.berth".into(), b"value".to_vec()),
        Op::Link("f".into(), "f-link".into()),
        dir("d", 0o755),
        Op::Link("f".into(), "d/f-link2".into()),
        Op::Symlink("f".into(), "rel".into()),
        Op::Symlink("/etc/passwd".into(), "abs".into()),
        Op::Symlink("../missing".into(), "d/dangling".into()),
        Op::Fifo("fifo".into(), 0o600),
        Op::CharDev("null".into(), 0o666, 1, 3),
        file("suid", b"#!/bin/sh\n", 0o4755),
        file("sgid-dir-file", b"", 0o2755),
    ]];
    let (flat, names) = t.layers("special", None, &layers, None).await?;
    let mounts = on.prepare("child", Some(&names[0])).await?;
    t.check(&mounts, &flat, "child of the layer").await?;
    let mounts = on.view("view", Some(&names[0])).await?;
    t.check(&mounts, &flat, "view of the layer").await?;
    passed()
}

/// containerd's Rename: files renamed over and away in a child layer (directories from a
/// lower layer are not renamed: overlay without `redirect_dir` cannot).
async fn renames<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    t.need_mounts()?;
    let on = t.on();
    let layers = vec![
        vec![
            dir("dir1", 0o700),
            dir("somefiles", 0o700),
            file("somefiles/f1", b"was here first!", 0o644),
            file("somefiles/f2", b"nothing interesting", 0o644),
        ],
        vec![
            file("somefiles/f1-overwrite", b"new content 1", 0o644),
            Op::Rename("somefiles/f1-overwrite".into(), "somefiles/f1".into()),
            Op::Rename("somefiles/f2".into(), "somefiles/f3".into()),
            dir("fresh", 0o755),
            Op::Rename("fresh".into(), "renamed-fresh".into()),
        ],
    ];
    let (flat, names) = t.layers("rename", None, &layers, None).await?;
    let mounts = on.view("view", names.last().map(String::as_str)).await?;
    t.check(&mounts, &flat, "view of the top layer").await?;
    passed()
}

fn write_fails(root: &Path) -> std::result::Result<(), String> {
    match std::fs::write(root.join("testfile"), b"testcontent") {
        Ok(()) => Err("writing to a read-only mount succeeded".to_owned()),
        Err(_) => Ok(()),
    }
}

/// containerd's ViewReadonly, for views of no layer, one layer and two layers, and for the
/// read-only form of an active snapshot's mounts (PR 8259's `WithReadonlyTempMount`): all
/// mount read-only and show their contents.
async fn views_are_read_only<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    t.need_mounts()?;
    let on = t.on();
    let (flat, names) = t
        .layers(
            "ro",
            None,
            &[
                vec![file("one", b"1", 0o644)],
                vec![file("two", b"2", 0o644)],
            ],
            None,
        )
        .await?;
    let v0 = on.view("v0", None).await?;
    t.with_mounted(&v0, "empty view", write_fails).await?;
    let v1 = on.view("v1", Some(&names[0])).await?;
    t.with_mounted(&v1, "view of one layer", write_fails)
        .await?;
    let got = t.read(&v1, "view of one layer").await?;
    ensure!(
        got.contains_key("one") && !got.contains_key("two"),
        "view of one layer shows {:?}",
        got.keys().collect::<Vec<_>>()
    );
    let v2 = on.view("v2", Some(&names[1])).await?;
    t.with_mounted(&v2, "view of two layers", write_fails)
        .await?;
    t.check(&v2, &flat, "view of two layers").await?;

    let active = on.prepare("active", Some(&names[1])).await?;
    t.write(
        &active,
        &[file("three", b"3", 0o644)],
        "write the active snapshot",
    )
    .await?;
    apply_plain(&flat, &[file("three", b"3", 0o644)]).await?;
    let read_only: Vec<Mount> = active.iter().map(Mount::read_only).collect();
    t.with_mounted(&read_only, "read-only active mounts", write_fails)
        .await?;
    t.check(&read_only, &flat, "read-only active mounts")
        .await?;
    // The read-only form did not disturb the snapshot: it still takes writes.
    t.write(
        &active,
        &[file("four", b"4", 0o644)],
        "write after a read-only mount",
    )
    .await?;
    passed()
}

/// containerd's 128LayersMount, with 130: the lower dirs of a deep chain make mount data
/// longer than a page unless shortened; every layer and the final view still show exactly
/// the flat tree.
async fn many_layers<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    t.need_mounts()?;
    let on = t.on();
    let mut layers = vec![vec![
        file("bottom", b"way at the bottom\n", 0o777),
        file("overwriteme", b"FIRST!\n", 0o777),
        dir("addhere", 0o755),
        dir("onlyme", 0o755),
        file("onlyme/bottom", b"bye!\n", 0o777),
    ]];
    for i in 1..130 {
        layers.push(vec![
            file("overwriteme", format!("{i} WAS HERE!\n").as_bytes(), 0o777),
            file(&format!("addhere/file-{i}"), b"same\n", 0o755),
            remove("onlyme"),
            dir("onlyme", 0o755),
            file(&format!("onlyme/file-{i}"), b"only me!\n", 0o777),
        ]);
    }
    let (flat, names) = t.layers("deep", None, &layers, None).await?;
    let mounts = on
        .view("fullview", names.last().map(String::as_str))
        .await?;
    t.check(&mounts, &flat, "view of 130 layers").await?;
    passed()
}

// ---------------------------------------------------------------------------------------
// Namespaces and restarts.

/// The same key in two namespaces names two snapshots; neither namespace sees the other's.
async fn namespaces_are_isolated<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    let Some(other_cx) = t.fixture.other_namespace.clone() else {
        return Err(Stop::Skip("the snapshotter is not namespaced".to_owned()));
    };
    let on = t.on();
    let other = On {
        sn: on.sn,
        cx: &other_cx,
    };
    on.committed("k", None).await?;
    expect_kind(
        other.sn.stat(other.cx, "k").await,
        ErrorKind::NotFound,
        "stat of the other namespace's snapshot",
    )?;
    expect_kind(
        other
            .sn
            .prepare(other.cx, "x", Some("k"), Labels::new())
            .await,
        ErrorKind::NotFound,
        "prepare on the other namespace's snapshot",
    )?;
    other.prepare("k", None).await?;
    ensure!(
        other.names(&[]).await? == BTreeSet::from(["k".to_owned()]),
        "the other namespace lists more than its own snapshot"
    );
    check_info(&other.stat("k").await?, "k", SnapshotKind::Active, None)?;
    check_info(&on.stat("k").await?, "k", SnapshotKind::Committed, None)?;
    other.remove("k").await?;
    check_info(&on.stat("k").await?, "k", SnapshotKind::Committed, None)?;
    passed()
}

/// A call without a namespace is FailedPrecondition.
async fn namespace_is_required<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    if !t.caps.requires_namespace {
        return Err(Stop::Skip(
            "the snapshotter does not require a namespace".to_owned(),
        ));
    }
    let sn = &*t.fixture.snapshotter;
    let cx = CallContext::default();
    expect_kind(
        sn.prepare(&cx, "k", None, Labels::new()).await,
        ErrorKind::FailedPrecondition,
        "prepare without a namespace",
    )?;
    expect_kind(
        sn.stat(&cx, "k").await,
        ErrorKind::FailedPrecondition,
        "stat without a namespace",
    )?;
    expect_kind(
        sn.list(&cx, &Filter::default()).await,
        ErrorKind::FailedPrecondition,
        "list without a namespace",
    )?;
    passed()
}

/// Snapshots, their kinds, parents, labels, times and mounts survive a restart; new
/// snapshots after it do not collide with old ones.
async fn reopen_keeps_snapshots<F: SnapshotterFactory>(t: Env<F>) -> CaseResult {
    if !t.caps.reopen {
        return Err(Stop::Skip(
            "the factory cannot reopen a snapshotter".to_owned(),
        ));
    }
    let mountable = t.caps.mountable && mount::cannot_mount().is_none();
    let on = t.on();
    on.committed("c1", None).await?;
    on.committed("c2", Some("c1")).await?;
    let active = on.prepare("a", Some("c2")).await?;
    let view = on.view("v", Some("c1")).await?;
    if mountable {
        t.write(
            &active,
            &[file("kept", b"across restarts", 0o644)],
            "write a",
        )
        .await?;
    }
    let before = on.list(&[]).await?;
    let Env {
        factory,
        caps,
        fixture,
        work,
        seq,
    } = t;
    drop(fixture.snapshotter);
    let fixture = factory
        .reopen(fixture.guard)
        .await
        .map_err(|e| format!("reopen: {e}"))?;
    let t = Env {
        factory,
        caps,
        fixture,
        work,
        seq,
    };
    let on = t.on();
    ensure_eq!(on.list(&[]).await?, before, "snapshots after reopening");
    ensure_eq!(
        on.sn
            .mounts(on.cx, "a")
            .await
            .step("mounts a after reopening")?,
        active,
        "mounts of a after reopening"
    );
    ensure_eq!(
        on.sn
            .mounts(on.cx, "v")
            .await
            .step("mounts v after reopening")?,
        view,
        "mounts of v after reopening"
    );
    if mountable {
        let got = t.read(&active, "read a after reopening").await?;
        ensure_eq!(
            got.get("kept").and_then(|n| n.contents.clone()),
            Some(b"across restarts".to_vec()),
            "a's file after reopening"
        );
    }
    let fresh = on.prepare("fresh", Some("c2")).await?;
    ensure!(
        fresh != active,
        "a snapshot made after reopening got the mounts of an old one"
    );
    on.commit("c3", "a").await?;
    on.remove("v").await?;
    passed()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Broken;

    #[async_trait::async_trait]
    impl SnapshotterFactory for Broken {
        type Guard = ();
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        async fn create(&self) -> Result<Fixture<()>> {
            Err(Error::internal("no snapshotter today"))
        }
    }

    #[test]
    fn every_case_is_dispatchable_and_named_once() {
        let names: BTreeSet<&str> = CASES.iter().copied().collect();
        assert_eq!(names.len(), CASES.len());
        for name in CASES {
            assert!(case_fn::<Broken>(name).is_some(), "{name}");
        }
        for name in MOUNTING_CASES {
            assert!(names.contains(name), "{name} is not a case");
        }
    }

    #[tokio::test]
    async fn a_factory_failure_fails_each_case_by_name() {
        let failure = run_cases(Broken, &["basic", "odd_keys", "nonsense"])
            .await
            .expect_err("fails");
        let cases: Vec<&str> = failure.failures.iter().map(|f| f.case).collect();
        assert_eq!(cases, ["basic", "odd_keys", "nonsense"]);
        assert!(failure.failures[0].message.contains("no snapshotter today"));
        assert!(failure.failures[2].message.contains("no such case"));
        assert!(failure.to_string().contains("case `odd_keys`"));
    }
}
