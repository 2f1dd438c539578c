//! The differ suite: [`run`] checks the contract of [`berth_core::diff`] against any
//! [`Differ`]: applying plain, gzip and zstd layers onto mounts (whiteouts and opaque
//! directories, in place and in an overlay's upper directory), the applied descriptor (the
//! uncompressed layer's digest, its diff id), the errors for a media type the differ does
//! not apply, a blob the store does not have and a corrupt layer, compare of two mounts into
//! a layer whose apply reproduces the upper tree (media types, labels, the
//! `containerd.io/uncompressed` label, a named ingest), and a cancelled compare leaving no
//! ingest or blob behind.
//!
//! A differ needs a content store to read layers from and write diffs to; the suite supplies
//! it. [`DifferFactory::create`] gets a fresh in-memory store
//! ([`MemoryContentStore`](berth_core::testing::MemoryContentStore)) and returns a differ
//! working on it: a compiled-in differ takes it directly; a proxy differ reaches it as it
//! would reach berthd's content service in a deployment (the store served by the content
//! server adapter, the differ given the content client adapter). Every call carries a
//! namespace and a lease, and the suite checks that they reach the store.
//!
//! Cases that write trees need root (owners, devices); compare mounts, so it also needs
//! root. Without it those cases are reported as **skipped**, with the reason, never as
//! passed.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use berth_core::content::ContentStore;
//! # use berth_core::diff::Differ;
//! use berth_proxy_sdk::conformance::differ::{self, Capabilities, DifferFactory, Fixture};
//!
//! struct Mine;
//!
//! #[async_trait::async_trait]
//! impl DifferFactory for Mine {
//!     type Guard = ();
//!     fn capabilities(&self) -> Capabilities {
//!         Capabilities { compare: true, overlay: true }
//!     }
//!     async fn create(&self, content: Arc<dyn ContentStore>) -> berth_core::Result<Fixture<()>> {
//!         # let differ: Arc<dyn Differ> = unimplemented!();
//!         Ok(Fixture::new(differ, ()))
//!     }
//! }
//!
//! # async fn test() {
//! if let Err(failure) = differ::run(Mine).await {
//!     panic!("{failure}");
//! }
//! # }
//! ```

use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use berth_core::content::{CallContext, ContentStore, Digest};
use berth_core::diff::{ApplyOptions, DiffOptions, Differ};
use berth_core::error::Classify;
use berth_core::labels::Labels;
use berth_core::namespace::Namespace;
use berth_core::snapshot::{Descriptor, Mount};
use berth_core::testing::MemoryContentStore;
use berth_core::{ErrorKind, Result};

use super::snapshotter::tree::{self, Op, Tree, dir, file, remove};
use super::{Outcome, Report, Stop, SuiteFailure, run_guarded, run_suite};

/// The OCI media type of an uncompressed layer: what an apply returns.
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// A gzip-compressed layer: what a compare writes by default.
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// A zstd-compressed layer.
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The label a compare puts on the blob it writes: the digest of the uncompressed tar.
pub const UNCOMPRESSED_LABEL: &str = "containerd.io/uncompressed";

/// What an implementation does that others legitimately do not. Build it with
/// `Capabilities { compare: true, ..Capabilities::default() }`, so new flags default to off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Compares two bind mounts into a layer (plain, gzip and zstd media types). Without it
    /// the compare cases are skipped.
    pub compare: bool,
    /// Applies onto an `overlay` mount by writing into its `upperdir`, with overlay's
    /// whiteouts (0/0 character devices) and opaque directories (`trusted.overlay.opaque`).
    pub overlay: bool,
}

/// One differ under test, as a factory made it.
pub struct Fixture<G> {
    /// The differ, reading and writing layers in the store the suite gave the factory.
    pub differ: Arc<dyn Differ>,
    /// Whatever must live as long as the differ (temp dirs, servers); dropped after the case.
    pub guard: G,
}

impl<G> Fixture<G> {
    /// A differ and what keeps it alive.
    pub fn new(differ: Arc<dyn Differ>, guard: G) -> Self {
        Fixture { differ, guard }
    }
}

/// Makes the differs the suite runs against.
#[async_trait::async_trait]
pub trait DifferFactory: Send + Sync + 'static {
    /// What a fixture keeps alive besides the differ.
    type Guard: Send + Sync + 'static;

    /// What the differs can do.
    fn capabilities(&self) -> Capabilities;

    /// A fresh differ that reads layers from `content` and writes diffs into it (a proxy
    /// differ: through the content adapters, as it would reach berthd's content service).
    async fn create(&self, content: Arc<dyn ContentStore>) -> Result<Fixture<Self::Guard>>;
}

/// Runs every case in [`CASES`]; `Ok` lists what passed and what was skipped.
pub async fn run<F: DifferFactory>(factory: F) -> std::result::Result<Report, SuiteFailure> {
    run_cases(factory, CASES).await
}

/// Runs the named cases (names from [`CASES`]; an unknown name is a failure).
pub async fn run_cases<F: DifferFactory>(
    factory: F,
    names: &[&'static str],
) -> std::result::Result<Report, SuiteFailure> {
    let factory = Arc::new(factory);
    let caps = factory.capabilities();
    run_suite("differ", names, |name| run_case(&factory, caps, name)).await
}

/// How long one case may take before it counts as hung.
const CASE_TIMEOUT: Duration = Duration::from_secs(120);

type CaseResult = std::result::Result<(), Stop>;
type CaseFuture = Pin<Box<dyn Future<Output = CaseResult> + Send>>;
type CaseFn = fn(Env) -> CaseFuture;

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        /// Every case, in the order [`run`] runs them.
        pub const CASES: &[&str] = &[$(stringify!($name)),*];

        fn case_fn(name: &str) -> Option<CaseFn> {
            match name {
                $(stringify!($name) => Some(|env| Box::pin($name(env))),)*
                _ => None,
            }
        }
    };
}

suite![
    apply_plain_tar,
    apply_gzip,
    apply_zstd,
    whiteouts_and_opaque_dirs,
    overlay_upper_whiteouts,
    unknown_media_type_is_not_implemented,
    unknown_digest_is_not_found,
    corrupt_layer_is_refused,
    namespace_and_lease_reach_the_store,
    compare_round_trip,
    compare_media_types,
    compare_labels,
    compare_named_reference,
    compare_unknown_media_type,
    cancelled_compare_leaves_nothing,
];

/// What a case works with: the differ, the store the suite gave it, the context of every
/// call, and a scratch directory for trees.
struct Env {
    differ: Arc<dyn Differ>,
    store: MemoryContentStore,
    cx: CallContext,
    caps: Capabilities,
    scratch: PathBuf,
}

async fn run_case<F: DifferFactory>(
    factory: &Arc<F>,
    caps: Capabilities,
    name: &'static str,
) -> std::result::Result<Outcome, String> {
    let case = case_fn(name).ok_or_else(|| format!("no such case (cases: {CASES:?})"))?;
    let store = MemoryContentStore::new();
    let fixture = factory
        .create(Arc::new(store.clone()))
        .await
        .map_err(|e| format!("the factory could not create a differ: {e}"))?;
    let scratch = tempfile::tempdir().map_err(|e| format!("scratch directory: {e}"))?;
    let env = Env {
        differ: Arc::clone(&fixture.differ),
        store,
        cx: suite_context(),
        caps,
        scratch: scratch.path().to_owned(),
    };
    let result = run_guarded(CASE_TIMEOUT, case(env)).await;
    drop(fixture);
    drop(scratch);
    match result? {
        Ok(()) => Ok(Outcome::Passed),
        Err(Stop::Skip(why)) => Ok(Outcome::Skipped(why)),
        Err(Stop::Fail(message)) => Err(message),
    }
}

/// The namespace and lease of every call: a proxy differ must pass both on to the store.
fn suite_context() -> CallContext {
    CallContext {
        namespace: Namespace::parse("differ-conformance").ok(),
        lease: Some("differ-conformance-lease".to_owned()),
    }
}

trait StepExt<T> {
    fn step(self, what: &str) -> std::result::Result<T, Stop>;
}

impl<T> StepExt<T> for Result<T> {
    fn step(self, what: &str) -> std::result::Result<T, Stop> {
        self.map_err(|e| Stop::Fail(format!("{what}: {e} ({:?})", e.kind())))
    }
}

impl<T> StepExt<T> for std::result::Result<T, String> {
    fn step(self, what: &str) -> std::result::Result<T, Stop> {
        self.map_err(|e| Stop::Fail(format!("{what}: {e}")))
    }
}

/// Skips a case that writes owners and devices when the process is not root.
fn needs_root() -> CaseResult {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Stop::Skip(
            "not running as root: layers with owners and devices cannot be applied".to_owned(),
        ))
    }
}

fn needs_compare(caps: Capabilities) -> CaseResult {
    if !caps.compare {
        return Err(Stop::Skip(
            "the factory does not declare the compare capability".to_owned(),
        ));
    }
    needs_root()
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, String> + Send + 'static,
) -> std::result::Result<T, Stop> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Stop::Fail(format!("blocking task: {e}")))?
        .map_err(Stop::Fail)
}

/// One entry of a layer the suite builds.
#[derive(Debug, Clone)]
enum Entry {
    Dir(&'static str, u32),
    File(&'static str, &'static [u8], u32),
    Symlink(&'static str, &'static str),
    /// `.wh.<name>` next to `path`: removes `path` from the layers below.
    Whiteout(&'static str),
    /// `<dir>/.wh..wh..opq`: hides what the layers below have in `dir`.
    Opaque(&'static str),
}

/// The tar of `entries`, owned by root, in order.
fn layer_tar(entries: &[Entry]) -> std::result::Result<Vec<u8>, String> {
    let mut builder = tar::Builder::new(Vec::new());
    let fail = |what: &str, e: std::io::Error| format!("build layer entry {what}: {e}");
    for entry in entries {
        let mut header = tar::Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        match entry {
            Entry::Dir(path, mode) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder
                    .append_data(&mut header, format!("{path}/"), std::io::empty())
                    .map_err(|e| fail(path, e))?;
            }
            Entry::File(path, data, mode) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder
                    .append_data(&mut header, path, *data)
                    .map_err(|e| fail(path, e))?;
            }
            Entry::Symlink(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder
                    .append_link(&mut header, path, target)
                    .map_err(|e| fail(path, e))?;
            }
            Entry::Whiteout(path) => {
                let (parent, name) = match path.rsplit_once('/') {
                    Some((parent, name)) => (format!("{parent}/"), name),
                    None => (String::new(), *path),
                };
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(0);
                builder
                    .append_data(&mut header, format!("{parent}.wh.{name}"), std::io::empty())
                    .map_err(|e| fail(path, e))?;
            }
            Entry::Opaque(dir) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(0);
                builder
                    .append_data(&mut header, format!("{dir}/.wh..wh..opq"), std::io::empty())
                    .map_err(|e| fail(dir, e))?;
            }
        }
    }
    builder
        .into_inner()
        .map_err(|e| format!("finish layer tar: {e}"))
}

fn gzip(data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder
        .write_all(data)
        .and_then(|()| encoder.finish())
        .map_err(|e| format!("gzip layer: {e}"))
}

fn gunzip(data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .map_err(|e| format!("gunzip the written layer: {e}"))?;
    Ok(out)
}

fn zstd(data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    zstd::stream::encode_all(data, 1).map_err(|e| format!("zstd layer: {e}"))
}

fn unzstd(data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    zstd::stream::decode_all(data).map_err(|e| format!("decompress the zstd layer: {e}"))
}

/// The uncompressed tar of a blob written with `media_type`.
fn uncompressed(media_type: &str, blob: &[u8]) -> std::result::Result<Vec<u8>, String> {
    match media_type {
        MEDIA_TYPE_LAYER_GZIP => gunzip(blob),
        MEDIA_TYPE_LAYER_ZSTD => unzstd(blob),
        _ => Ok(blob.to_vec()),
    }
}

/// A read-write bind mount of `dir`: where the walking differ applies in place.
fn bind(dir: &Path) -> Vec<Mount> {
    vec![Mount {
        kind: "bind".to_owned(),
        source: dir.to_string_lossy().into_owned(),
        target: String::new(),
        options: vec!["rbind".to_owned(), "rw".to_owned()],
    }]
}

/// A read-only bind mount of `dir`: what compare gets for each side.
fn ro_bind(dir: &Path) -> Vec<Mount> {
    vec![Mount {
        kind: "bind".to_owned(),
        source: dir.to_string_lossy().into_owned(),
        target: String::new(),
        options: vec!["rbind".to_owned(), "ro".to_owned()],
    }]
}

/// A fresh directory of the scratch space, with `ops` applied.
async fn tree_dir(env: &Env, name: &str, ops: Vec<Op>) -> std::result::Result<PathBuf, Stop> {
    let path = env.scratch.join(name);
    let at = path.clone();
    blocking(move || {
        std::fs::create_dir(&at).map_err(|e| format!("create {}: {e}", at.display()))?;
        tree::apply(&at, &ops)
    })
    .await?;
    Ok(path)
}

async fn read_tree(path: &Path) -> std::result::Result<Tree, Stop> {
    let path = path.to_owned();
    blocking(move || tree::read(&path)).await
}

/// Checks that the tree under `got` is the one `ops` build from nothing.
async fn expect_tree(env: &Env, got: &Path, ops: Vec<Op>, what: &str) -> CaseResult {
    let want_dir = tree_dir(env, &format!("want-{}", uuid_like()), ops).await?;
    let want = read_tree(&want_dir).await?;
    let have = read_tree(got).await?;
    tree::compare(&want, &have).map_err(|e| Stop::Fail(format!("{what}: {e}")))
}

/// A name unique within the scratch directory.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed).to_string()
}

impl Env {
    /// Puts `blob` in the store and describes it as `media_type`.
    fn put(&self, blob: &[u8], media_type: &str) -> Descriptor {
        let digest = self.store.insert(blob, Labels::new());
        Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size: blob.len() as u64,
            annotations: Default::default(),
        }
    }

    async fn apply(&self, desc: &Descriptor, mounts: &[Mount]) -> Result<Descriptor> {
        self.differ
            .apply(&self.cx, desc, mounts, &ApplyOptions::default())
            .await
    }

    async fn compare(
        &self,
        lower: &Path,
        upper: &Path,
        options: &DiffOptions,
    ) -> Result<Descriptor> {
        self.differ
            .compare(&self.cx, &ro_bind(lower), &ro_bind(upper), options)
            .await
    }
}

/// A first layer: directories, files of several modes, a symlink, an empty file.
fn base_entries() -> Vec<Entry> {
    vec![
        Entry::Dir("etc", 0o755),
        Entry::File("etc/hosts", b"127.0.0.1 localhost\n", 0o644),
        Entry::File("etc/empty", b"", 0o600),
        Entry::Dir("bin", 0o755),
        Entry::File("bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
        Entry::Symlink("bin/sh", "tool"),
    ]
}

/// The tree [`base_entries`] gives.
fn base_ops() -> Vec<Op> {
    vec![
        dir("etc", 0o755),
        file("etc/hosts", b"127.0.0.1 localhost\n", 0o644),
        file("etc/empty", b"", 0o600),
        dir("bin", 0o755),
        file("bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
        Op::Symlink("tool".to_owned(), "bin/sh".to_owned()),
    ]
}

/// Applies the base layer compressed with `compress` as `media_type` onto an empty bind
/// mount and checks the tree and the applied descriptor.
async fn apply_compressed(
    env: Env,
    media_type: &str,
    compress: fn(&[u8]) -> std::result::Result<Vec<u8>, String>,
) -> CaseResult {
    needs_root()?;
    let tar = layer_tar(&base_entries())?;
    let blob = compress(&tar)?;
    let desc = env.put(&blob, media_type);
    let target = tree_dir(&env, "target", Vec::new()).await?;
    let applied = env
        .apply(&desc, &bind(&target))
        .await
        .step(&format!("apply the {media_type} layer {}", desc.digest))?;
    ensure_eq!(
        applied.digest,
        Digest::sha256_of(&tar),
        "the applied descriptor's digest must be the uncompressed tar's (the diff id)"
    );
    ensure_eq!(
        applied.size,
        tar.len() as u64,
        "the applied descriptor's size (the uncompressed tar's)"
    );
    ensure_eq!(
        applied.media_type.as_str(),
        MEDIA_TYPE_LAYER,
        "the applied descriptor's media type"
    );
    expect_tree(&env, &target, base_ops(), "the applied tree").await
}

async fn apply_plain_tar(env: Env) -> CaseResult {
    apply_compressed(env, MEDIA_TYPE_LAYER, |tar| Ok(tar.to_vec())).await
}

async fn apply_gzip(env: Env) -> CaseResult {
    apply_compressed(env, MEDIA_TYPE_LAYER_GZIP, gzip).await
}

async fn apply_zstd(env: Env) -> CaseResult {
    apply_compressed(env, MEDIA_TYPE_LAYER_ZSTD, zstd).await
}

/// A lower layer for the whiteout cases.
fn lower_entries() -> Vec<Entry> {
    vec![
        Entry::Dir("a", 0o755),
        Entry::File("a/keep", b"keep", 0o644),
        Entry::File("a/gone", b"gone", 0o644),
        Entry::Dir("b", 0o750),
        Entry::File("b/x", b"x", 0o644),
        Entry::Dir("b/sub", 0o755),
        Entry::File("b/sub/y", b"y", 0o644),
        Entry::File("top", b"top", 0o644),
    ]
}

fn lower_ops() -> Vec<Op> {
    vec![
        dir("a", 0o755),
        file("a/keep", b"keep", 0o644),
        file("a/gone", b"gone", 0o644),
        dir("b", 0o750),
        file("b/x", b"x", 0o644),
        dir("b/sub", 0o755),
        file("b/sub/y", b"y", 0o644),
        file("top", b"top", 0o644),
    ]
}

/// The layer above: removes a file and a top-level file, makes `b` opaque with one new
/// file, adds a file.
fn upper_entries() -> Vec<Entry> {
    vec![
        Entry::Whiteout("a/gone"),
        Entry::Dir("b", 0o750),
        Entry::Opaque("b"),
        Entry::File("b/new", b"new", 0o600),
        Entry::Whiteout("top"),
        Entry::File("c", b"c", 0o644),
    ]
}

async fn whiteouts_and_opaque_dirs(env: Env) -> CaseResult {
    needs_root()?;
    let lower = env.put(&layer_tar(&lower_entries())?, MEDIA_TYPE_LAYER);
    let upper_tar = layer_tar(&upper_entries())?;
    let upper = env.put(&gzip(&upper_tar)?, MEDIA_TYPE_LAYER_GZIP);
    let target = tree_dir(&env, "target", Vec::new()).await?;
    env.apply(&lower, &bind(&target))
        .await
        .step("apply the lower layer")?;
    let applied = env
        .apply(&upper, &bind(&target))
        .await
        .step("apply the layer with whiteouts")?;
    ensure_eq!(
        applied.digest,
        Digest::sha256_of(&upper_tar),
        "the diff id of the layer with whiteouts"
    );
    let mut ops = lower_ops();
    ops.extend([
        remove("a/gone"),
        remove("b"),
        dir("b", 0o750),
        file("b/new", b"new", 0o600),
        remove("top"),
        file("c", b"c", 0o644),
    ]);
    expect_tree(&env, &target, ops, "whiteouts applied in place").await
}

/// The `trusted.overlay.opaque` value of `path`, if set.
fn opaque_xattr(path: &Path) -> std::result::Result<Option<Vec<u8>>, String> {
    let mut value = vec![0u8; 16];
    match rustix::fs::lgetxattr(path, "trusted.overlay.opaque", &mut value[..]) {
        Ok(n) => {
            value.truncate(n);
            Ok(Some(value))
        }
        Err(e) if e == rustix::io::Errno::NODATA => Ok(None),
        Err(e) => Err(format!(
            "read trusted.overlay.opaque of {}: {e}",
            path.display()
        )),
    }
}

async fn overlay_upper_whiteouts(env: Env) -> CaseResult {
    if !env.caps.overlay {
        return Err(Stop::Skip(
            "the factory does not declare the overlay capability".to_owned(),
        ));
    }
    needs_root()?;
    let lower = tree_dir(&env, "lower", lower_ops()).await?;
    let upper = tree_dir(&env, "upper", Vec::new()).await?;
    let work = tree_dir(&env, "work", Vec::new()).await?;
    let mounts = vec![Mount {
        kind: "overlay".to_owned(),
        source: "overlay".to_owned(),
        target: String::new(),
        options: vec![
            format!("workdir={}", work.display()),
            format!("upperdir={}", upper.display()),
            format!("lowerdir={}", lower.display()),
        ],
    }];
    let upper_tar = layer_tar(&upper_entries())?;
    let desc = env.put(&upper_tar, MEDIA_TYPE_LAYER);
    let applied = env
        .apply(&desc, &mounts)
        .await
        .step("apply the layer with whiteouts to an overlay")?;
    ensure_eq!(
        applied.digest,
        Digest::sha256_of(&upper_tar),
        "the diff id of the layer applied to an overlay"
    );
    let got = read_tree(&upper).await?;
    let kinds: Vec<(&str, &str)> = got.iter().map(|(p, n)| (p.as_str(), n.kind)).collect();
    ensure_eq!(
        kinds,
        vec![
            ("a", "dir"),
            ("a/gone", "char"),
            ("b", "dir"),
            ("b/new", "file"),
            ("c", "file"),
            ("top", "char"),
        ],
        "the upper directory holds only the changes, whiteouts as devices"
    );
    for whiteout in ["a/gone", "top"] {
        ensure_eq!(
            got[whiteout].rdev,
            Some(0),
            "{whiteout} must be a 0/0 character device (overlay's whiteout)"
        );
    }
    ensure_eq!(
        got["a"].mode,
        0o755,
        "a parent copied up keeps the lower mode"
    );
    ensure_eq!(got["b"].mode, 0o750, "the opaque directory's mode");
    let b = upper.join("b");
    let a = upper.join("a");
    let (opaque_b, opaque_a) = blocking(move || Ok((opaque_xattr(&b)?, opaque_xattr(&a)?))).await?;
    ensure_eq!(
        opaque_b,
        Some(b"y".to_vec()),
        "b must carry trusted.overlay.opaque=y"
    );
    ensure_eq!(opaque_a, None, "a is not opaque");
    // The lower directory is the layers below: an apply must never touch it.
    expect_tree(
        &env,
        &lower,
        lower_ops(),
        "the lower directory after the apply",
    )
    .await
}

async fn unknown_media_type_is_not_implemented(env: Env) -> CaseResult {
    let desc = env.put(
        &layer_tar(&base_entries())?,
        "application/vnd.example.not-a-layer",
    );
    let target = tree_dir(&env, "target", Vec::new()).await?;
    match env.apply(&desc, &bind(&target)).await {
        Ok(d) => {
            return Err(Stop::Fail(format!(
                "applied a blob of an unknown media type (got {d:?}); expected NotImplemented, \
                 so the diff service can try the next differ"
            )));
        }
        Err(e) => ensure_eq!(e.kind(), ErrorKind::NotImplemented, "error {e}"),
    }
    expect_tree(
        &env,
        &target,
        Vec::new(),
        "the target after a refused apply",
    )
    .await
}

async fn unknown_digest_is_not_found(env: Env) -> CaseResult {
    let tar = layer_tar(&base_entries())?;
    // A descriptor naming bytes the store does not have (the layer plus one byte).
    let mut other = tar.clone();
    other.push(0);
    env.put(&tar, MEDIA_TYPE_LAYER);
    let desc = Descriptor {
        media_type: MEDIA_TYPE_LAYER.to_owned(),
        digest: Digest::sha256_of(&other),
        size: other.len() as u64,
        annotations: Default::default(),
    };
    let target = tree_dir(&env, "target", Vec::new()).await?;
    match env.apply(&desc, &bind(&target)).await {
        Ok(d) => {
            return Err(Stop::Fail(format!(
                "applied {} which is not in the store (got {d:?}); expected NotFound",
                desc.digest
            )));
        }
        Err(e) => {
            ensure_eq!(e.kind(), ErrorKind::NotFound, "error {e}");
            ensure!(
                e.to_string().contains(desc.digest.hex()),
                "the error must name the missing digest {}: {e}",
                desc.digest
            );
        }
    }
    expect_tree(&env, &target, Vec::new(), "the target after a failed apply").await
}

async fn corrupt_layer_is_refused(env: Env) -> CaseResult {
    let tar = layer_tar(&base_entries())?;
    let mut truncated_gzip = gzip(&tar)?;
    truncated_gzip.truncate(truncated_gzip.len() / 2);
    let mut not_a_tar = b"this is not a tar archive, ".repeat(64);
    not_a_tar.resize(2048, b'x');
    for (what, blob, media_type) in [
        (
            "a truncated gzip layer",
            truncated_gzip,
            MEDIA_TYPE_LAYER_GZIP,
        ),
        ("bytes that are not a tar", not_a_tar, MEDIA_TYPE_LAYER),
    ] {
        let desc = env.put(&blob, media_type);
        let target = tree_dir(&env, &format!("target-{}", uuid_like()), Vec::new()).await?;
        if let Ok(d) = env.apply(&desc, &bind(&target)).await {
            return Err(Stop::Fail(format!(
                "applied {what} ({}) without an error: {d:?}",
                desc.digest
            )));
        }
    }
    Ok(())
}

async fn namespace_and_lease_reach_the_store(env: Env) -> CaseResult {
    needs_root()?;
    let desc = env.put(&gzip(&layer_tar(&base_entries())?)?, MEDIA_TYPE_LAYER_GZIP);
    let target = tree_dir(&env, "target", Vec::new()).await?;
    env.apply(&desc, &bind(&target)).await.step("apply")?;
    let calls = env.store.calls();
    ensure!(
        calls.iter().any(|(call, _)| *call == "read"),
        "the differ did not read the layer from the store it was given (calls: {:?})",
        calls.iter().map(|(c, _)| *c).collect::<Vec<_>>()
    );
    for (call, cx) in &calls {
        ensure_eq!(
            cx,
            &env.cx,
            "the store's {call} call must carry the caller's namespace and lease"
        );
    }
    Ok(())
}

/// The tree compare starts from.
fn compare_lower_ops() -> Vec<Op> {
    vec![
        dir("etc", 0o755),
        file("etc/a", b"a1", 0o644),
        file("etc/b", b"b", 0o644),
        dir("d", 0o755),
        file("d/x", b"x", 0o644),
        dir("d/deep", 0o700),
        file("d/deep/y", b"y", 0o600),
        file("f", b"f", 0o644),
        dir("keep", 0o755),
        file("keep/same", b"same", 0o644),
    ]
}

/// What changes between the two sides of a compare.
fn compare_changes() -> Vec<Op> {
    vec![
        file("etc/a", b"a2, longer", 0o644),
        remove("etc/b"),
        remove("d"),
        dir("d2", 0o711),
        file("d2/new", b"new", 0o640),
        Op::Symlink("../f".to_owned(), "d2/link".to_owned()),
        Op::Chmod("f".to_owned(), 0o600),
    ]
}

/// Lower and upper directories for a compare (the upper a full copy with changes, as a
/// copying snapshotter's active snapshot), and the ops of the upper tree.
async fn compare_sides(env: &Env) -> std::result::Result<(PathBuf, PathBuf, Vec<Op>), Stop> {
    let lower = tree_dir(env, "lower", compare_lower_ops()).await?;
    let mut upper_ops = compare_lower_ops();
    upper_ops.extend(compare_changes());
    let upper = tree_dir(env, "upper", upper_ops.clone()).await?;
    Ok((lower, upper, upper_ops))
}

/// Compares with `options`, checks the blob and its labels, applies it onto a copy of the
/// lower tree and checks the upper tree comes back. Returns the written descriptor.
async fn round_trip(env: &Env, options: DiffOptions) -> std::result::Result<Descriptor, Stop> {
    let (lower, upper, upper_ops) = compare_sides(env).await?;
    let written = env
        .compare(&lower, &upper, &options)
        .await
        .step("compare lower and upper")?;
    let want_type = options
        .media_type
        .clone()
        .unwrap_or_else(|| MEDIA_TYPE_LAYER_GZIP.to_owned());
    ensure_eq!(
        written.media_type,
        want_type,
        "the written layer's media type"
    );
    let blob = env.store.blob(&written.digest).ok_or_else(|| {
        Stop::Fail(format!(
            "the written layer {} is not in the store",
            written.digest
        ))
    })?;
    ensure_eq!(
        written.size,
        blob.len() as u64,
        "the written descriptor's size"
    );
    ensure_eq!(
        Digest::sha256_of(&blob),
        written.digest,
        "the stored bytes' digest"
    );
    let tar = uncompressed(&want_type, &blob)?;
    let info = env
        .store
        .info(&env.cx, &written.digest)
        .await
        .step("info of the written layer")?;
    let diff_id = Digest::sha256_of(&tar);
    ensure_eq!(
        info.labels.get(UNCOMPRESSED_LABEL).cloned(),
        Some(diff_id.to_string()),
        "the written layer's {UNCOMPRESSED_LABEL} label"
    );
    for (key, value) in &options.labels {
        ensure_eq!(
            info.labels.get(key),
            Some(value),
            "the caller's label {key} on the written layer"
        );
    }
    ensure!(
        env.store.ingest_refs().is_empty(),
        "a successful compare left ingests: {:?}",
        env.store.ingest_refs()
    );
    let target = tree_dir(env, "replay", compare_lower_ops()).await?;
    let applied = env
        .apply(&written, &bind(&target))
        .await
        .step("apply the written layer onto a copy of the lower tree")?;
    ensure_eq!(
        applied.digest,
        diff_id,
        "applying the written layer gives its {UNCOMPRESSED_LABEL} digest"
    );
    expect_tree(
        env,
        &target,
        upper_ops,
        "the lower tree with the written layer applied (must be the upper tree)",
    )
    .await?;
    Ok(written)
}

async fn compare_round_trip(env: Env) -> CaseResult {
    needs_compare(env.caps)?;
    round_trip(&env, DiffOptions::default()).await.map(drop)
}

async fn compare_media_types(env: Env) -> CaseResult {
    needs_compare(env.caps)?;
    for media_type in [
        MEDIA_TYPE_LAYER,
        MEDIA_TYPE_LAYER_ZSTD,
        MEDIA_TYPE_LAYER_GZIP,
    ] {
        let scratch = env.scratch.join(format!("case-{}", uuid_like()));
        std::fs::create_dir(&scratch)
            .map_err(|e| Stop::Fail(format!("create {}: {e}", scratch.display())))?;
        let sub = Env {
            differ: Arc::clone(&env.differ),
            store: env.store.clone(),
            cx: env.cx.clone(),
            caps: env.caps,
            scratch,
        };
        let options = DiffOptions {
            media_type: Some(media_type.to_owned()),
            ..DiffOptions::default()
        };
        round_trip(&sub, options).await.map_err(|stop| match stop {
            Stop::Fail(message) => Stop::Fail(format!("{media_type}: {message}")),
            skip => skip,
        })?;
    }
    Ok(())
}

async fn compare_labels(env: Env) -> CaseResult {
    needs_compare(env.caps)?;
    let labels: Labels = [
        ("example.com/owner".to_owned(), "conformance".to_owned()),
        ("containerd.io/gc.root".to_owned(), "kept".to_owned()),
    ]
    .into();
    round_trip(
        &env,
        DiffOptions {
            labels,
            ..DiffOptions::default()
        },
    )
    .await
    .map(drop)
}

async fn compare_named_reference(env: Env) -> CaseResult {
    needs_compare(env.caps)?;
    let options = DiffOptions {
        reference: Some("conformance-diff-ref".to_owned()),
        ..DiffOptions::default()
    };
    let first = round_trip(&env, options.clone()).await?;
    // The same diff under the same reference again: the blob is there already, and that is
    // the answer (containerd ignores AlreadyExists at commit).
    let (lower, upper) = (env.scratch.join("lower"), env.scratch.join("upper"));
    let again = env
        .compare(&lower, &upper, &options)
        .await
        .step("compare again under the same reference")?;
    ensure_eq!(again.digest, first.digest, "the same diff twice");
    ensure!(
        env.store.ingest_refs().is_empty(),
        "compares under a named reference left ingests: {:?}",
        env.store.ingest_refs()
    );
    Ok(())
}

async fn compare_unknown_media_type(env: Env) -> CaseResult {
    needs_compare(env.caps)?;
    let (lower, upper, _) = compare_sides(&env).await?;
    let options = DiffOptions {
        media_type: Some("application/vnd.example.not-a-layer".to_owned()),
        ..DiffOptions::default()
    };
    match env.compare(&lower, &upper, &options).await {
        Ok(d) => {
            return Err(Stop::Fail(format!(
                "wrote a layer of an unknown media type: {d:?}"
            )));
        }
        Err(e) => ensure!(
            matches!(
                e.kind(),
                ErrorKind::InvalidArgument | ErrorKind::NotImplemented
            ),
            "a media type no differ writes must be InvalidArgument or NotImplemented, got \
             {:?}: {e}",
            e.kind()
        ),
    }
    ensure_eq!(env.store.blob_count(), 0, "blobs after a refused compare");
    ensure_eq!(
        env.store.ingest_refs(),
        Vec::<String>::new(),
        "ingests after a refused compare"
    );
    Ok(())
}

/// Size of the file that keeps a compare busy long enough to be cancelled midway (sparse
/// on disk, but read and written in full).
const BUSY_FILE: u64 = 512 << 20;

async fn cancelled_compare_leaves_nothing(env: Env) -> CaseResult {
    needs_compare(env.caps)?;
    let lower = tree_dir(&env, "lower", vec![dir("data", 0o755)]).await?;
    let upper = tree_dir(&env, "upper", vec![dir("data", 0o755)]).await?;
    let big = upper.join("data/big");
    blocking(move || {
        std::fs::File::create(&big)
            .and_then(|f| f.set_len(BUSY_FILE))
            .map_err(|e| format!("create {}: {e}", big.display()))
    })
    .await?;
    let options = DiffOptions {
        media_type: Some(MEDIA_TYPE_LAYER.to_owned()),
        ..DiffOptions::default()
    };
    let compare = env.compare(&lower, &upper, &options);
    let started = async {
        // Cancel once the layer is being written: an ingest exists with bytes in it.
        loop {
            if !env.store.ingest_refs().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::select! {
        done = compare => {
            return Err(Stop::Fail(format!(
                "the compare of a {BUSY_FILE}-byte file finished before it could be cancelled \
                 ({done:?})"
            )));
        }
        () = started => {}
    }
    // The compare future is dropped: what it started must go away on its own.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ingests = env.store.ingest_refs();
        let blobs = env.store.digests();
        if ingests.is_empty() && blobs.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Stop::Fail(format!(
                "30 s after a compare was cancelled the store still holds ingests {ingests:?} \
                 and blobs {blobs:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The differ still works after a cancelled call.
    let small = tree_dir(&env, "small", vec![file("one", b"1", 0o644)]).await?;
    env.compare(&lower, &small, &DiffOptions::default())
        .await
        .step("compare after a cancelled compare")?;
    Ok(())
}
