//! The content store suite: [`run`] checks the contract of [`berth_core::content`] (and the
//! cases of containerd's `core/content/testsuite`) against any [`ContentStore`].
//!
//! A [`ContentStoreFactory`] makes one fresh, empty store per case, wrapped in a [`Fixture`]
//! with the [`CallContext`] to call it with and a guard that keeps its resources alive (a
//! temporary directory, a server task). The same suite runs against the local store, the
//! store behind the core's metadata wrapper (whose context carries a namespace), and the
//! store behind the gRPC client and server adapters.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use berth_core::content::{CallContext, ContentStore};
//! use berth_proxy_sdk::conformance::content::{self, Capabilities, ContentStoreFactory, Fixture};
//!
//! struct Local;
//!
//! #[async_trait::async_trait]
//! impl ContentStoreFactory for Local {
//!     type Guard = ();
//!     fn capabilities(&self) -> Capabilities {
//!         Capabilities::default()
//!     }
//!     async fn create(&self) -> berth_core::Result<Fixture<()>> {
//!         # let store: Arc<dyn ContentStore> = unimplemented!();
//!         Ok(Fixture::new(store, CallContext::default(), ()))
//!     }
//! }
//!
//! # async fn test() {
//! if let Err(failure) = content::run(Local).await {
//!     panic!("{failure}");
//! }
//! # }
//! ```

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use berth_core::content::{
    CallContext, ContentStore, ContentWriter, Digest, Digester, Info, Status, WriterRequest,
};
use berth_core::error::Classify;
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::{Error, ErrorKind, Result};
use tokio_stream::StreamExt;

use super::{Outcome, Report, SLACK, SuiteFailure, Window, run_guarded, run_suite};

/// What an implementation does that others legitimately do not. Build it with
/// `Capabilities { labels: true, ..Capabilities::default() }`, so new flags default to off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Keeps labels: given at commit, changed by `update` (with field paths), matched by
    /// `labels.<key>` filters. Without it (the local store: labels are the metadata layer's
    /// job) committed blobs have no labels and `update` of a stored blob is
    /// FailedPrecondition.
    pub labels: bool,
    /// Every call needs a namespace: a [`CallContext`] without one is FailedPrecondition.
    pub requires_namespace: bool,
    /// [`ContentStoreFactory::reopen`] works: blobs and ingests survive a new instance on
    /// the same storage (a daemon restart).
    pub reopen: bool,
}

/// One store under test, as a factory made it.
pub struct Fixture<G> {
    /// The store.
    pub store: Arc<dyn ContentStore>,
    /// The context every call is made with (a namespace for namespaced stores).
    pub cx: CallContext,
    /// A context for a second namespace of the same store; when given, the suite checks
    /// that namespaces do not see each other's blobs and ingests.
    pub other_namespace: Option<CallContext>,
    /// Whatever must live as long as the store (a temp dir, a server); dropped after the
    /// case, or handed back to [`ContentStoreFactory::reopen`].
    pub guard: G,
}

impl<G> Fixture<G> {
    /// A fixture with no second namespace.
    pub fn new(store: Arc<dyn ContentStore>, cx: CallContext, guard: G) -> Self {
        Fixture {
            store,
            cx,
            other_namespace: None,
            guard,
        }
    }

    /// Declares a second namespace of the same store.
    pub fn with_other_namespace(mut self, cx: CallContext) -> Self {
        self.other_namespace = Some(cx);
        self
    }
}

/// Makes the stores the suite runs against.
#[async_trait::async_trait]
pub trait ContentStoreFactory: Send + Sync + 'static {
    /// What a fixture keeps alive besides the store.
    type Guard: Send + Sync + 'static;

    /// What the stores can do.
    fn capabilities(&self) -> Capabilities;

    /// A fresh, empty store.
    async fn create(&self) -> Result<Fixture<Self::Guard>>;

    /// A new store instance on the storage `guard` kept, after the suite dropped the old
    /// store (as after a daemon restart). Called only when [`Capabilities::reopen`] is set.
    async fn reopen(&self, guard: Self::Guard) -> Result<Fixture<Self::Guard>> {
        drop(guard);
        Err(Error::not_implemented("this factory cannot reopen a store"))
    }
}

/// Runs every case in [`CASES`]; `Ok` lists what passed and what was skipped.
pub async fn run<F: ContentStoreFactory>(factory: F) -> std::result::Result<Report, SuiteFailure> {
    run_cases(factory, CASES).await
}

/// Runs the named cases (names from [`CASES`]; an unknown name is a failure).
pub async fn run_cases<F: ContentStoreFactory>(
    factory: F,
    names: &[&'static str],
) -> std::result::Result<Report, SuiteFailure> {
    let factory = Arc::new(factory);
    let caps = factory.capabilities();
    run_suite("content", names, |name| run_case(&factory, caps, name)).await
}

/// How long one case may take before it counts as hung.
const CASE_TIMEOUT: Duration = Duration::from_secs(120);

async fn run_case<F: ContentStoreFactory>(
    factory: &Arc<F>,
    caps: Capabilities,
    name: &'static str,
) -> CaseResult {
    let case = case_fn::<F>(name).ok_or_else(|| format!("no such case (cases: {CASES:?})"))?;
    let fixture = factory
        .create()
        .await
        .map_err(|e| format!("the factory could not create a store: {e}"))?;
    let env = Env {
        factory: Arc::clone(factory),
        caps,
        fixture,
    };
    run_guarded(CASE_TIMEOUT, case(env)).await?
}

type CaseResult = std::result::Result<Outcome, String>;
type Step<T = ()> = std::result::Result<T, String>;
type CaseFuture = Pin<Box<dyn Future<Output = CaseResult> + Send>>;
type CaseFn<F> = fn(Env<F>) -> CaseFuture;

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        /// Every case, in the order [`run`] runs them.
        pub const CASES: &[&str] = &[$(stringify!($name)),*];

        fn case_fn<F: ContentStoreFactory>(name: &str) -> Option<CaseFn<F>> {
            match name {
                $(stringify!($name) => Some(|env| Box::pin($name(env))),)*
                _ => None,
            }
        }
    };
}

suite![
    write_commit_info_read,
    status_while_writing,
    resume_after_close,
    resume_matrix,
    resume_after_drop,
    locked_ref_is_unavailable,
    commit_of_existing_blob,
    writer_for_existing_blob,
    commit_error_state,
    read_ranges,
    abort,
    list_statuses_filters,
    list_filters,
    delete,
    truncate_restarts,
    large_blob,
    labels,
    other_algorithms,
    empty_blob,
    hostile_refs,
    concurrent_writers,
    namespaces_are_isolated,
    namespace_is_required,
    reopen_keeps_blobs_and_ingests,
];

struct Env<F: ContentStoreFactory> {
    factory: Arc<F>,
    caps: Capabilities,
    fixture: Fixture<F::Guard>,
}

impl<F: ContentStoreFactory> Env<F> {
    fn main(&self) -> On<'_> {
        On {
            store: &*self.fixture.store,
            cx: &self.fixture.cx,
        }
    }

    fn expected_labels(&self, given: &Labels) -> Labels {
        if self.caps.labels {
            given.clone()
        } else {
            Labels::new()
        }
    }
}

/// A store and the context to call it with.
#[derive(Clone, Copy)]
struct On<'a> {
    store: &'a dyn ContentStore,
    cx: &'a CallContext,
}

impl On<'_> {
    async fn open(
        &self,
        reference: &str,
        total: u64,
        expected: Option<&Digest>,
    ) -> Result<Box<dyn ContentWriter>> {
        self.store
            .writer(
                self.cx,
                WriterRequest {
                    reference: reference.to_owned(),
                    total,
                    expected: expected.cloned(),
                },
            )
            .await
    }

    /// Opens a writer, waiting while the ref is still held: a dropped writer may release it
    /// asynchronously (a cancelled stream is noticed by the server a moment later).
    async fn open_retrying(
        &self,
        reference: &str,
        total: u64,
        expected: Option<&Digest>,
    ) -> Result<Box<dyn ContentWriter>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.open(reference, total, expected).await {
                Err(e)
                    if e.kind() == ErrorKind::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Writes and commits `data` with its size and digest; returns the digest.
    async fn put(&self, reference: &str, data: &[u8], labels: Labels) -> Step<Digest> {
        let digest = Digest::sha256_of(data);
        let mut w = self
            .open(reference, data.len() as u64, Some(&digest))
            .await
            .step(&format!("open writer {reference:?}"))?;
        // As containerd's `content.Copy`: a writer may already hold bytes (a resumed ingest,
        // or shared content that is all there), so write only what comes after its offset.
        let offset = usize::try_from(w.status().offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        write_chunks(&mut w, &data[offset..], 4096)
            .await
            .step(&format!("write {reference:?}"))?;
        w.commit(data.len() as u64, Some(digest.clone()), labels)
            .await
            .step(&format!("commit {reference:?}"))?;
        Ok(digest)
    }

    /// Reads into memory; an error may come from `read` or from the stream.
    async fn read_all(&self, digest: &Digest, offset: u64, size: Option<u64>) -> Result<Vec<u8>> {
        let mut stream = self.store.read(self.cx, digest, offset, size).await?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    async fn statuses(&self, filter: &str) -> Step<Vec<Status>> {
        let parsed = Filter::parse_all(&[filter]).step(&format!("parse filter {filter:?}"))?;
        self.store
            .list_statuses(self.cx, &parsed)
            .await
            .step(&format!("list_statuses {filter:?}"))
    }

    async fn status_refs(&self, filter: &str) -> Step<BTreeSet<String>> {
        Ok(self
            .statuses(filter)
            .await?
            .into_iter()
            .map(|s| s.reference)
            .collect())
    }

    async fn list_digests(&self, filter: &str) -> Step<BTreeSet<Digest>> {
        let parsed = Filter::parse_all(&[filter]).step(&format!("parse filter {filter:?}"))?;
        Ok(self
            .store
            .list(self.cx, &parsed)
            .await
            .step(&format!("list {filter:?}"))?
            .into_iter()
            .map(|i| i.digest)
            .collect())
    }

    /// Checks `info(digest)`: size, labels, and both times inside `window`.
    async fn check_info(
        &self,
        digest: &Digest,
        size: u64,
        labels: &Labels,
        created: Window,
        updated: Window,
    ) -> Step<Info> {
        let info = self
            .store
            .info(self.cx, digest)
            .await
            .step(&format!("info {digest}"))?;
        ensure_eq!(info.digest, *digest, "info {digest}: digest");
        ensure_eq!(info.size, size, "info {digest}: size");
        ensure_eq!(info.labels, *labels, "info {digest}: labels");
        created.check(info.created_at, &format!("info {digest}: created_at"))?;
        updated.check(info.updated_at, &format!("info {digest}: updated_at"))?;
        Ok(info)
    }
}

async fn write_chunks(w: &mut Box<dyn ContentWriter>, data: &[u8], chunk: usize) -> Result<()> {
    for piece in data.chunks(chunk) {
        w.write(piece).await?;
    }
    Ok(())
}

/// Context for a failed step.
trait StepExt<T> {
    fn step(self, what: &str) -> Step<T>;
}

impl<T> StepExt<T> for Result<T> {
    fn step(self, what: &str) -> Step<T> {
        self.map_err(|e| format!("{what}: unexpected error {:?}: {e}", e.kind()))
    }
}

/// Expects an error of `kind`.
fn expect_kind<T>(result: Result<T>, kind: ErrorKind, what: &str) -> Step {
    match result {
        Ok(_) => Err(format!("{what}: succeeded, expected {kind:?}")),
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => Err(format!(
            "{what}: got {:?} ({e}), expected {kind:?}",
            e.kind()
        )),
    }
}

fn same_bytes(got: &[u8], want: &[u8], what: &str) -> Step {
    if got == want {
        return Ok(());
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Err(format!(
        "{what}: got {} bytes, expected {}; first difference at byte {first}",
        got.len(),
        want.len()
    ))
}

/// Deterministic pseudo-random bytes, different for every seed.
fn content(seed: u64, size: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

fn label_set(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn empty_digest() -> Digest {
    Digest::sha256_of(b"")
}

fn passed() -> CaseResult {
    Ok(Outcome::Passed)
}

// ---------------------------------------------------------------------------------------
// Cases.

/// Writers with and without a total and an expected digest, open at the same time; each
/// commits, and info and read agree with what was written.
async fn write_commit_info_read<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let given = label_set(&[
        ("containerd.io/gc.root", "2024-01-01T00:00:00Z"),
        ("k", "v"),
    ]);
    let mut writers = Vec::new();
    for (i, (reference, with_total, with_expected)) in [
        ("c1", false, false),
        ("c2", true, false),
        ("c3", false, true),
        ("c4", true, true),
    ]
    .into_iter()
    .enumerate()
    {
        let data = content(i as u64 + 1, 256);
        let digest = Digest::sha256_of(&data);
        let w = on
            .open(
                reference,
                if with_total { 256 } else { 0 },
                with_expected.then_some(&digest),
            )
            .await
            .step(&format!("open writer {reference}"))?;
        writers.push((reference, data, digest, w));
    }
    for (reference, data, digest, mut w) in writers {
        write_chunks(&mut w, &data, 32)
            .await
            .step(&format!("write {reference}"))?;
        ensure_eq!(
            w.digest(),
            digest,
            "writer {reference}: digest before commit"
        );
        ensure_eq!(w.status().offset, 256, "writer {reference}: offset");
        let window = Window::start();
        w.commit(0, None, given.clone())
            .await
            .step(&format!("commit {reference}"))?;
        let window = window.close();
        on.check_info(&digest, 256, &t.expected_labels(&given), window, window)
            .await?;
        let back = on
            .read_all(&digest, 0, None)
            .await
            .step(&format!("read {digest}"))?;
        same_bytes(&back, &data, &format!("read back {reference}"))?;
    }
    passed()
}

/// Writer status and store status follow each write; a committed ingest is gone.
async fn status_while_writing<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let data = content(11, 256);
    let digest = Digest::sha256_of(&data);
    let start = Window::start();
    let mut w = on
        .open("c1", 256, Some(&digest))
        .await
        .step("open writer c1")?;
    let start = start.close();
    let st = w.status();
    ensure_eq!(st.reference, "c1", "new writer: reference");
    ensure_eq!(st.offset, 0, "new writer: offset");
    ensure_eq!(st.total, 256, "new writer: total");
    ensure_eq!(st.expected, Some(digest.clone()), "new writer: expected");
    start.check(st.started_at, "new writer: started_at")?;
    start.check(st.updated_at, "new writer: updated_at")?;
    ensure_eq!(w.digest(), empty_digest(), "new writer: digest");
    let started_at = st.started_at;

    for (from, to) in [(0, 64), (64, 192), (192, 256)] {
        let window = Window::start();
        w.write(&data[from..to])
            .await
            .step(&format!("write [{from}, {to})"))?;
        let window = window.close();
        let st = w.status();
        ensure_eq!(st.offset, to as u64, "after writing [{from}, {to}): offset");
        ensure_eq!(st.total, 256, "after writing [{from}, {to}): total");
        ensure_eq!(
            st.started_at,
            started_at,
            "after writing [{from}, {to}): started_at"
        );
        window.check(
            st.updated_at,
            &format!("after writing [{from}, {to}): updated_at"),
        )?;
        ensure_eq!(
            w.digest(),
            Digest::sha256_of(&data[..to]),
            "after writing [{from}, {to}): digest"
        );
    }

    let st = on.store.status(on.cx, "c1").await.step("status c1")?;
    ensure_eq!(st.reference, "c1", "store status: reference");
    ensure_eq!(st.offset, 256, "store status: offset");
    ensure_eq!(st.total, 256, "store status: total");
    ensure_eq!(st.expected, Some(digest.clone()), "store status: expected");
    start.check(st.started_at, "store status: started_at")?;
    ensure_eq!(
        on.status_refs("ref==c1").await?,
        BTreeSet::from(["c1".to_owned()]),
        "list_statuses ref==c1 while writing"
    );

    let window = Window::start();
    w.commit(0, None, Labels::new()).await.step("commit c1")?;
    let window = window.close();
    on.check_info(&digest, 256, &Labels::new(), window, window)
        .await?;
    expect_kind(
        on.store.status(on.cx, "c1").await,
        ErrorKind::NotFound,
        "status of a committed ingest",
    )?;
    ensure!(
        on.status_refs("ref==c1").await?.is_empty(),
        "list_statuses still shows the committed ingest c1"
    );
    passed()
}

/// Close keeps the ingest: a new writer resumes at its offset with the digest of what is
/// there, and the started time of the first.
async fn resume_after_close<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let data = content(21, 256);
    let digest = Digest::sha256_of(&data);
    let (first, second) = data.split_at(128);
    let start = Window::start();
    let mut w = on
        .open("cb", 256, Some(&digest))
        .await
        .step("open writer")?;
    let start = start.close();
    let update = Window::start();
    w.write(first).await.step("write first half")?;
    let update = update.close();
    w.close().await.step("close")?;
    // Long enough that a started time reset on resume falls outside the window.
    tokio::time::sleep(SLACK * 2).await;

    let mut w = on
        .open("cb", 256, Some(&digest))
        .await
        .step("reopen writer")?;
    let st = w.status();
    ensure_eq!(st.reference, "cb", "resumed writer: reference");
    ensure_eq!(st.offset, 128, "resumed writer: offset");
    ensure_eq!(st.total, 256, "resumed writer: total");
    start.check(st.started_at, "resumed writer: started_at")?;
    update.check(st.updated_at, "resumed writer: updated_at")?;
    ensure_eq!(
        w.digest(),
        Digest::sha256_of(first),
        "resumed writer: digest"
    );

    w.write(second).await.step("write second half")?;
    ensure_eq!(w.status().offset, 256, "after second half: offset");
    ensure_eq!(w.digest(), digest, "after second half: digest");
    let window = Window::start();
    w.commit(0, None, Labels::new()).await.step("commit")?;
    let window = window.close();
    on.check_info(&digest, 256, &Labels::new(), window, window)
        .await?;
    passed()
}

/// containerd's resume cases: for several sizes and cut points, close part-way, reopen,
/// then either finish or truncate and start over; the committed blob is right either way.
async fn resume_matrix<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let mut seed = 100;
    for size in [500usize, 5000, 50_000] {
        for percent in [0usize, 10, 50, 90, 100] {
            for restart in [false, true] {
                seed += 1;
                let data = content(seed, size);
                let digest = Digest::sha256_of(&data);
                let cut = size * percent / 100;
                let reference = format!("ref-{size}-{percent}-{restart}");
                let what = |step: &str| format!("{reference}: {step}");
                let mut w = on
                    .open(&reference, size as u64, Some(&digest))
                    .await
                    .step(&what("open"))?;
                write_chunks(&mut w, &data[..cut], 1024)
                    .await
                    .step(&what("write"))?;
                w.close().await.step(&what("close"))?;

                let mut w = on
                    .open(&reference, size as u64, Some(&digest))
                    .await
                    .step(&what("reopen"))?;
                ensure_eq!(w.status().offset, cut as u64, "{}", what("resumed offset"));
                let window = Window::start();
                if restart {
                    w.truncate(0).await.step(&what("truncate"))?;
                    write_chunks(&mut w, &data, 1024)
                        .await
                        .step(&what("rewrite"))?;
                } else {
                    write_chunks(&mut w, &data[cut..], 1024)
                        .await
                        .step(&what("write the rest"))?;
                }
                w.commit(size as u64, Some(digest.clone()), Labels::new())
                    .await
                    .step(&what("commit"))?;
                let window = window.close();
                on.check_info(&digest, size as u64, &Labels::new(), window, window)
                    .await?;
            }
        }
    }
    passed()
}

/// A writer dropped without close (a client that died) releases the ref and keeps the
/// ingest.
async fn resume_after_drop<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let data = content(31, 10_000);
    let digest = Digest::sha256_of(&data);
    let mut w = on
        .open("dropped", 10_000, Some(&digest))
        .await
        .step("open")?;
    write_chunks(&mut w, &data[..3000], 1000)
        .await
        .step("write")?;
    drop(w);
    let mut w = on
        .open_retrying("dropped", 10_000, Some(&digest))
        .await
        .step("reopen after drop")?;
    ensure_eq!(w.status().offset, 3000, "offset after drop");
    ensure_eq!(
        w.digest(),
        Digest::sha256_of(&data[..3000]),
        "digest after drop"
    );
    w.write(&data[3000..]).await.step("write the rest")?;
    w.commit(10_000, Some(digest.clone()), Labels::new())
        .await
        .step("commit")?;
    let back = on.read_all(&digest, 0, None).await.step("read")?;
    same_bytes(&back, &data, "read back")?;
    passed()
}

/// One writer per ref: a second gets Unavailable until the first closes; other refs and
/// status are not blocked.
async fn locked_ref_is_unavailable<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let data = content(41, 100);
    let digest = Digest::sha256_of(&data);
    let mut w = on.open("held", 0, None).await.step("open")?;
    w.write(&data[..40]).await.step("write")?;
    expect_kind(
        on.open("held", 0, None).await,
        ErrorKind::Unavailable,
        "second writer on a held ref",
    )?;
    expect_kind(
        on.open("held", 100, Some(&digest)).await,
        ErrorKind::Unavailable,
        "second writer on a held ref, with total and expected",
    )?;
    let other = on
        .open("other", 0, None)
        .await
        .step("writer on another ref while one is held")?;
    other.close().await.step("close the other writer")?;
    let st = on
        .store
        .status(on.cx, "held")
        .await
        .step("status of a held ref")?;
    ensure_eq!(st.offset, 40, "status of a held ref: offset");
    w.close().await.step("close")?;
    let mut w = on
        .open("held", 0, None)
        .await
        .step("writer after the first closed")?;
    ensure_eq!(w.status().offset, 40, "reopened offset");
    w.write(&data[40..]).await.step("write the rest")?;
    w.commit(100, Some(digest), Labels::new())
        .await
        .step("commit")?;
    passed()
}

/// Committing a blob that is already stored is AlreadyExists, with or without an expected
/// digest, and drops the ingest.
async fn commit_of_existing_blob<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let data = content(51, 256);
    let digest = on.put("c1", &data, Labels::new()).await?;
    for (i, expected) in [Some(digest.clone()), None].into_iter().enumerate() {
        let reference = format!("c1-commitexists-{i}");
        let mut w = on
            .open(&reference, 0, None)
            .await
            .step(&format!("open {reference}"))?;
        w.write(&data).await.step(&format!("write {reference}"))?;
        expect_kind(
            w.commit(data.len() as u64, expected.clone(), Labels::new())
                .await,
            ErrorKind::AlreadyExists,
            &format!("commit of a stored blob (expected {expected:?})"),
        )?;
        expect_kind(
            on.store.status(on.cx, &reference).await,
            ErrorKind::NotFound,
            "status of the ingest after an AlreadyExists commit",
        )?;
    }
    let back = on.read_all(&digest, 0, None).await.step("read")?;
    same_bytes(&back, &data, "the stored blob after AlreadyExists commits")?;
    passed()
}

/// A writer whose expected digest is stored is refused with AlreadyExists and leaves no
/// ingest.
async fn writer_for_existing_blob<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let data = content(61, 300);
    let digest = on.put("first", &data, Labels::new()).await?;
    expect_kind(
        on.open("second", 300, Some(&digest)).await,
        ErrorKind::AlreadyExists,
        "writer with a stored expected digest",
    )?;
    expect_kind(
        on.open("second", 0, Some(&digest)).await,
        ErrorKind::AlreadyExists,
        "writer with a stored expected digest and no total",
    )?;
    ensure!(
        on.status_refs("ref==second").await?.is_empty(),
        "a refused writer left an ingest"
    );
    passed()
}

/// containerd's CommitErrorState: failed commits keep the ingest and store nothing;
/// AlreadyExists drops it; the ref stays locked while a writer holds it.
async fn commit_error_state<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let c1 = content(71, 256);
    let d1 = on.put("c1", &c1, Labels::new()).await?;
    let d2 = Digest::sha256_of(&content(72, 256));
    let reference = "c1-commiterror-state";
    let len = c1.len() as u64;
    let mut more = c1.clone();
    more.extend_from_slice(b"more");
    let d_more = Digest::sha256_of(&more);
    let locked = |w: &str| format!("second writer while {w}");

    let mut w = on.open(reference, 0, None).await.step("open 1")?;
    w.write(&c1).await.step("write 1")?;
    expect_kind(
        on.open(reference, 0, None).await,
        ErrorKind::Unavailable,
        &locked("writer 1 is open"),
    )?;
    expect_kind(
        w.commit(len, Some(d1.clone()), Labels::new()).await,
        ErrorKind::AlreadyExists,
        "commit 1 (stored digest, expected given)",
    )?;

    let mut w = on.open(reference, 0, None).await.step("open 2")?;
    ensure_eq!(w.status().offset, 0, "offset after an AlreadyExists commit");
    expect_kind(
        on.open(reference, 0, None).await,
        ErrorKind::Unavailable,
        &locked("writer 2 is open"),
    )?;
    w.write(&c1).await.step("write 2")?;
    expect_kind(
        w.commit(len, None, Labels::new()).await,
        ErrorKind::AlreadyExists,
        "commit 2 (stored digest, no expected)",
    )?;

    let mut w = on.open(reference, 0, None).await.step("open 3")?;
    w.write(&more).await.step("write 3")?;
    expect_kind(
        w.commit(len + 4, Some(d2.clone()), Labels::new()).await,
        ErrorKind::FailedPrecondition,
        "commit 3 (wrong digest)",
    )?;
    for d in [&d2, &d_more] {
        expect_kind(
            on.store.info(on.cx, d).await,
            ErrorKind::NotFound,
            &format!("info {d} after a commit with a wrong digest"),
        )?;
    }

    let w = on.open(reference, 0, None).await.step("open 4")?;
    ensure_eq!(
        w.status().offset,
        len + 4,
        "offset after a failed commit (the ingest must stay)"
    );
    expect_kind(
        on.open(reference, 0, None).await,
        ErrorKind::Unavailable,
        &locked("writer 4 is open"),
    )?;
    expect_kind(
        w.commit(len, None, Labels::new()).await,
        ErrorKind::FailedPrecondition,
        "commit 4 (wrong size)",
    )?;
    expect_kind(
        on.store.info(on.cx, &d_more).await,
        ErrorKind::NotFound,
        "info after a commit with a wrong size",
    )?;

    let w = on.open(reference, 0, None).await.step("open 5")?;
    let window = Window::start();
    w.commit(len + 4, None, Labels::new())
        .await
        .step("commit 5 (right size)")?;
    let window = window.close();
    on.check_info(&d_more, len + 4, &Labels::new(), window, window)
        .await?;

    let mut w = on.open(reference, 0, None).await.step("open 6")?;
    ensure_eq!(w.status().offset, 0, "offset after a successful commit");
    w.write(&c1).await.step("write 6")?;
    expect_kind(
        on.open(reference, 0, None).await,
        ErrorKind::Unavailable,
        &locked("writer 6 is open"),
    )?;
    expect_kind(
        w.commit(len, Some(d1), Labels::new()).await,
        ErrorKind::AlreadyExists,
        "commit 6 (stored digest)",
    )?;

    for i in [7, 8] {
        let mut w = on
            .open(reference, 0, None)
            .await
            .step(&format!("open {i}"))?;
        w.truncate(0).await.step(&format!("truncate {i}"))?;
        w.close().await.step(&format!("close {i}"))?;
    }
    passed()
}

/// Reads with offsets and sizes: sizes past the end are clipped, an offset at the end reads
/// nothing, past it is OutOfRange; a missing blob is NotFound.
async fn read_ranges<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let data = content(81, 1000);
    let digest = on.put("ranges", &data, Labels::new()).await?;
    for (offset, size, want) in [
        (0u64, None, &data[..]),
        (0, Some(1000u64), &data[..]),
        (0, Some(5000), &data[..]),
        (10, Some(20), &data[10..30]),
        (990, Some(100), &data[990..]),
        (500, None, &data[500..]),
        (999, Some(1), &data[999..]),
        (1000, None, &data[1000..]),
        (1000, Some(10), &data[1000..]),
    ] {
        let what = format!("read offset {offset} size {size:?}");
        let got = on.read_all(&digest, offset, size).await.step(&what)?;
        same_bytes(&got, want, &what)?;
    }
    expect_kind(
        on.read_all(&digest, 1001, None).await,
        ErrorKind::OutOfRange,
        "read past the end",
    )?;
    expect_kind(
        on.read_all(&digest, u64::MAX / 2, Some(1)).await,
        ErrorKind::OutOfRange,
        "read far past the end",
    )?;
    let small = b"foobar";
    let small_digest = on.put("small", small, Labels::new()).await?;
    let got = on
        .read_all(&small_digest, 0, Some(7))
        .await
        .step("read a blob smaller than the size asked")?;
    same_bytes(&got, small, "small blob")?;
    let missing = Digest::sha256_of(b"not stored");
    expect_kind(
        on.read_all(&missing, 0, None).await,
        ErrorKind::NotFound,
        "read of a missing blob",
    )?;
    expect_kind(
        on.store.info(on.cx, &missing).await,
        ErrorKind::NotFound,
        "info of a missing blob",
    )?;
    passed()
}

/// Abort drops an ingest and its data; unknown refs are NotFound.
async fn abort<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let mut w = on.open("to-abort", 0, None).await.step("open")?;
    w.write(b"some bytes").await.step("write")?;
    w.close().await.step("close")?;
    let st = on.store.status(on.cx, "to-abort").await.step("status")?;
    ensure_eq!(st.offset, 10, "status before abort: offset");
    on.store.abort(on.cx, "to-abort").await.step("abort")?;
    expect_kind(
        on.store.status(on.cx, "to-abort").await,
        ErrorKind::NotFound,
        "status after abort",
    )?;
    ensure!(
        on.status_refs("ref==to-abort").await?.is_empty(),
        "list_statuses shows an aborted ingest"
    );
    expect_kind(
        on.store.abort(on.cx, "to-abort").await,
        ErrorKind::NotFound,
        "second abort",
    )?;
    expect_kind(
        on.store.abort(on.cx, "never-written").await,
        ErrorKind::NotFound,
        "abort of an unknown ref",
    )?;
    expect_kind(
        on.store.status(on.cx, "never-written").await,
        ErrorKind::NotFound,
        "status of an unknown ref",
    )?;
    let w = on
        .open("to-abort", 0, None)
        .await
        .step("open after abort")?;
    ensure_eq!(w.status().offset, 0, "offset after abort");
    ensure_eq!(w.digest(), empty_digest(), "digest after abort");
    w.close().await.step("close after abort")?;
    passed()
}

/// list_statuses with `ref` equality and regular expressions, and `expected`.
async fn list_statuses_filters<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let expected = Digest::sha256_of(&content(91, 64));
    for (reference, digest, n) in [
        ("list-a-1", Some(&expected), 10usize),
        ("list-a-2", None, 20),
        ("list-b-1", None, 30),
    ] {
        let mut w = on
            .open(reference, 0, digest)
            .await
            .step(&format!("open {reference}"))?;
        w.write(&content(92, n))
            .await
            .step(&format!("write {reference}"))?;
        w.close().await.step(&format!("close {reference}"))?;
    }
    let set = |refs: &[&str]| {
        refs.iter()
            .map(|r| (*r).to_owned())
            .collect::<BTreeSet<_>>()
    };
    let by_expected = format!("expected=={expected}");
    let all = on.statuses("").await?;
    ensure_eq!(
        all.iter()
            .map(|s| s.reference.clone())
            .collect::<BTreeSet<_>>(),
        set(&["list-a-1", "list-a-2", "list-b-1"]),
        "list_statuses without a filter"
    );
    for st in &all {
        let want = match st.reference.as_str() {
            "list-a-1" => 10,
            "list-a-2" => 20,
            _ => 30,
        };
        ensure_eq!(st.offset, want, "list_statuses: offset of {}", st.reference);
    }
    for (filter, want) in [
        ("ref==list-a-1", set(&["list-a-1"])),
        ("ref~=^list-a-", set(&["list-a-1", "list-a-2"])),
        ("ref~=/-1$/", set(&["list-a-1", "list-b-1"])),
        ("ref!=list-a-2", set(&["list-a-1", "list-b-1"])),
        ("ref==list-a-1,ref==list-b-1", set(&[])),
        ("ref==nothing", set(&[])),
        (by_expected.as_str(), set(&["list-a-1"])),
    ] {
        ensure_eq!(
            on.status_refs(filter).await?,
            want,
            "list_statuses {filter:?}"
        );
    }
    passed()
}

/// list with `digest` (and, with labels, `labels.<key>`) filters.
async fn list_filters<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let tagged = label_set(&[("purpose", "test")]);
    let d1 = on.put("l1", &content(101, 100), tagged.clone()).await?;
    let d2 = on.put("l2", &content(102, 200), Labels::new()).await?;
    let d3 = on.put("l3", &content(103, 300), Labels::new()).await?;
    let all = BTreeSet::from([d1.clone(), d2.clone(), d3.clone()]);
    ensure_eq!(on.list_digests("").await?, all, "list without a filter");
    ensure_eq!(
        on.list_digests(&format!("digest=={d2}")).await?,
        BTreeSet::from([d2.clone()]),
        "list digest=={d2}"
    );
    ensure_eq!(
        on.list_digests("digest~=^sha256:").await?,
        all,
        "list digest~=^sha256:"
    );
    ensure_eq!(
        on.list_digests(&format!("digest=={}", empty_digest()))
            .await?,
        BTreeSet::new(),
        "list for a digest not stored"
    );
    let by_label = on.list_digests("labels.purpose==test").await?;
    let want = if t.caps.labels {
        BTreeSet::from([d1.clone()])
    } else {
        BTreeSet::new()
    };
    ensure_eq!(by_label, want, "list labels.purpose==test");
    let infos = on
        .store
        .list(on.cx, &Filter::default())
        .await
        .step("list")?;
    let none = Labels::new();
    for info in infos {
        let want = if info.digest == d1 {
            100
        } else if info.digest == d2 {
            200
        } else {
            300
        };
        ensure_eq!(info.size, want, "list: size of {}", info.digest);
        ensure_eq!(
            info.labels,
            t.expected_labels(if info.digest == d1 { &tagged } else { &none }),
            "list: labels of {}",
            info.digest
        );
    }
    passed()
}

/// Delete removes a blob for good; deleting or reading it again is NotFound; the same bytes
/// can be stored again.
async fn delete<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let data = content(111, 500);
    let digest = on.put("del", &data, Labels::new()).await?;
    let keep = on.put("keep", &content(112, 500), Labels::new()).await?;
    on.store.delete(on.cx, &digest).await.step("delete")?;
    expect_kind(
        on.store.info(on.cx, &digest).await,
        ErrorKind::NotFound,
        "info after delete",
    )?;
    expect_kind(
        on.read_all(&digest, 0, None).await,
        ErrorKind::NotFound,
        "read after delete",
    )?;
    expect_kind(
        on.store.delete(on.cx, &digest).await,
        ErrorKind::NotFound,
        "second delete",
    )?;
    ensure_eq!(
        on.list_digests("").await?,
        BTreeSet::from([keep]),
        "list after delete"
    );
    let again = on.put("del-again", &data, Labels::new()).await?;
    ensure_eq!(again, digest, "digest of the stored-again blob");
    let back = on.read_all(&digest, 0, None).await.step("read")?;
    same_bytes(&back, &data, "read after storing again")?;
    passed()
}

/// Truncate(0) starts an ingest over (digest and offset too), also on a resumed ingest with
/// stray bytes; other sizes fail and change nothing.
async fn truncate_restarts<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let data = content(121, 700);
    let digest = Digest::sha256_of(&data);
    let mut w = on.open("trunc", 0, None).await.step("open")?;
    w.write(b"garbage that must go").await.step("write")?;
    let failed = w.truncate(5).await;
    ensure!(
        failed.is_err(),
        "truncate to 5 bytes succeeded; only 0 is supported"
    );
    ensure_eq!(w.status().offset, 20, "offset after a refused truncate");
    w.truncate(0).await.step("truncate")?;
    ensure_eq!(w.status().offset, 0, "offset after truncate");
    ensure_eq!(w.digest(), empty_digest(), "digest after truncate");
    write_chunks(&mut w, &data, 99).await.step("rewrite")?;
    w.commit(700, Some(digest.clone()), Labels::new())
        .await
        .step("commit")?;
    let back = on.read_all(&digest, 0, None).await.step("read")?;
    same_bytes(&back, &data, "read after truncate and rewrite")?;

    // containerd's TestWriterTruncateRecoversFromIncompleteWrite.
    let good = b"this is the content";
    let mut w = on
        .open("incomplete", good.len() as u64, None)
        .await
        .step("open")?;
    w.write(b"bad data").await.step("write bad data")?;
    w.close().await.step("close")?;
    let mut w = on
        .open("incomplete", good.len() as u64, None)
        .await
        .step("reopen")?;
    w.truncate(0).await.step("truncate the resumed ingest")?;
    w.write(good).await.step("write")?;
    w.commit(
        good.len() as u64,
        Some(Digest::sha256_of(good)),
        Labels::new(),
    )
    .await
    .step("commit after truncating a resumed ingest")?;
    passed()
}

/// 16 MiB and a few bytes in odd-sized writes; digest, size and ranged reads are right.
async fn large_blob<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let size = (16 << 20) + 7;
    let data = content(131, size);
    let digest = Digest::sha256_of(&data);
    let mut w = on
        .open("large", size as u64, Some(&digest))
        .await
        .step("open")?;
    let sizes = [65_521usize, 1, 1_048_573, 4093, 777_777, 3];
    let mut at = 0;
    for n in sizes.iter().cycle() {
        if at == size {
            break;
        }
        let end = (at + n).min(size);
        w.write(&data[at..end])
            .await
            .step(&format!("write [{at}, {end})"))?;
        at = end;
    }
    ensure_eq!(w.status().offset, size as u64, "offset");
    ensure_eq!(w.digest(), digest, "writer digest");
    w.commit(size as u64, Some(digest.clone()), Labels::new())
        .await
        .step("commit")?;
    let info = on.store.info(on.cx, &digest).await.step("info")?;
    ensure_eq!(info.size, size as u64, "info size");

    let mut stream = on.store.read(on.cx, &digest, 0, None).await.step("read")?;
    let mut hasher = Digester::new(digest.algorithm());
    let mut read = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.step("read chunk")?;
        read += chunk.len() as u64;
        hasher.update(&chunk);
    }
    ensure_eq!(read, size as u64, "bytes read");
    ensure_eq!(hasher.finish(), digest, "digest of what was read");
    let offset = (8 << 20) + 3;
    let got = on
        .read_all(&digest, offset as u64, Some(100_000))
        .await
        .step("ranged read")?;
    same_bytes(&got, &data[offset..offset + 100_000], "ranged read")?;
    passed()
}

/// Labels at commit and through update (all, or by field path); or, for a store that keeps
/// none, no labels and a refused update. Update of a missing blob is NotFound either way.
async fn labels<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let root = ("containerd.io/gc.root", "2024-01-01T00:00:00Z");
    let given = label_set(&[("k1", "v1"), ("k2", "v2"), root]);
    let window = Window::start();
    let digest = on
        .put("labelled", &content(141, 256), given.clone())
        .await?;
    let window = window.close();
    let info = on
        .check_info(&digest, 256, &t.expected_labels(&given), window, window)
        .await?;

    let missing = Info {
        digest: Digest::sha256_of(b"missing"),
        ..info.clone()
    };
    expect_kind(
        on.store.update(on.cx, missing, &[]).await,
        ErrorKind::NotFound,
        "update of a missing blob",
    )?;

    if !t.caps.labels {
        let changed = Info {
            labels: label_set(&[("k", "v")]),
            ..info
        };
        expect_kind(
            on.store.update(on.cx, changed, &[]).await,
            ErrorKind::FailedPrecondition,
            "update on a store without labels",
        )?;
        on.check_info(&digest, 256, &Labels::new(), window, window)
            .await?;
        return passed();
    }

    let replaced = label_set(&[("k1", "newvalue"), ("k3", "v3"), root]);
    let update = Window::start();
    let got = on
        .store
        .update(
            on.cx,
            Info {
                labels: replaced.clone(),
                ..info.clone()
            },
            &[],
        )
        .await
        .step("update all labels")?;
    let update = update.close();
    ensure_eq!(got.labels, replaced, "update all labels: returned labels");
    on.check_info(&digest, 256, &replaced, window, update)
        .await?;

    // Paths name the keys to set; a key absent from the info is removed.
    let by_path = label_set(&[("k1", "v1"), root]);
    let update = Window::start();
    let got = on
        .store
        .update(
            on.cx,
            Info {
                labels: by_path.clone(),
                ..info.clone()
            },
            &["labels.k3".to_owned(), "labels.k1".to_owned()],
        )
        .await
        .step("update labels.k3 and labels.k1")?;
    let update = update.close();
    ensure_eq!(got.labels, by_path, "update by path: returned labels");
    on.check_info(&digest, 256, &by_path, window, update)
        .await?;

    let everything = label_set(&[("only", "this")]);
    on.store
        .update(
            on.cx,
            Info {
                labels: everything.clone(),
                ..info.clone()
            },
            &["labels".to_owned()],
        )
        .await
        .step("update with path `labels`")?;
    on.check_info(&digest, 256, &everything, window, Window::start().close())
        .await?;

    expect_kind(
        on.store.update(on.cx, info, &["size".to_owned()]).await,
        ErrorKind::InvalidArgument,
        "update of field `size`",
    )?;
    passed()
}

/// SHA-512 from the start (expected given at open), and SHA-384 named only at commit.
async fn other_algorithms<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let data = content(151, 3000);
    let sha512 = {
        let mut d = Digester::new(berth_core::content::Algorithm::Sha512);
        d.update(&data);
        d.finish()
    };
    let mut w = on
        .open("sha512", 3000, Some(&sha512))
        .await
        .step("open with a sha512 digest")?;
    write_chunks(&mut w, &data, 1000).await.step("write")?;
    ensure_eq!(
        w.digest(),
        sha512,
        "writer digest with a sha512 expectation"
    );
    w.commit(3000, Some(sha512.clone()), Labels::new())
        .await
        .step("commit sha512")?;
    let back = on.read_all(&sha512, 0, None).await.step("read sha512")?;
    same_bytes(&back, &data, "sha512 blob")?;

    let data = content(152, 3000);
    let sha384 = {
        let mut d = Digester::new(berth_core::content::Algorithm::Sha384);
        d.update(&data);
        d.finish()
    };
    let mut w = on.open("sha384", 0, None).await.step("open")?;
    write_chunks(&mut w, &data, 1000).await.step("write")?;
    w.commit(3000, Some(sha384.clone()), Labels::new())
        .await
        .step("commit with a sha384 digest named only at commit")?;
    let info = on.store.info(on.cx, &sha384).await.step("info sha384")?;
    ensure_eq!(info.size, 3000, "sha384 blob size");
    ensure!(
        on.list_digests("").await?.contains(&sha512),
        "list does not show the sha512 blob"
    );
    passed()
}

/// A zero-byte blob is a blob like any other.
async fn empty_blob<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let digest = empty_digest();
    let w = on.open("empty", 0, Some(&digest)).await.step("open")?;
    w.commit(0, Some(digest.clone()), Labels::new())
        .await
        .step("commit")?;
    let info = on.store.info(on.cx, &digest).await.step("info")?;
    ensure_eq!(info.size, 0, "size");
    let back = on.read_all(&digest, 0, None).await.step("read")?;
    ensure!(back.is_empty(), "read of the empty blob returned bytes");
    expect_kind(
        on.read_all(&digest, 1, None).await,
        ErrorKind::OutOfRange,
        "read past the end of the empty blob",
    )?;
    passed()
}

/// Refs are opaque text: path syntax, control characters and long refs round-trip and stay
/// separate; an empty ref is InvalidArgument.
async fn hostile_refs<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let on = t.main();
    let long = "r".repeat(4096);
    let refs = [
        "../../escape",
        "/absolute/path",
        "a/../../b",
        ".",
        "..",
        "with\nnewline",
        "nul\0byte",
        "ünïcödé ✓",
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        long.as_str(),
    ];
    for (i, reference) in refs.iter().enumerate() {
        let mut w = on
            .open(reference, 0, None)
            .await
            .step(&format!("open ref {reference:?}"))?;
        w.write(&content(160 + i as u64, i + 1))
            .await
            .step(&format!("write ref {reference:?}"))?;
        w.close().await.step(&format!("close ref {reference:?}"))?;
    }
    for (i, reference) in refs.iter().enumerate() {
        let st = on
            .store
            .status(on.cx, reference)
            .await
            .step(&format!("status of ref {reference:?}"))?;
        ensure_eq!(st.reference, *reference, "status reference");
        ensure_eq!(
            st.offset,
            i as u64 + 1,
            "status offset of ref {reference:?}"
        );
    }
    ensure_eq!(
        on.status_refs("").await?,
        refs.iter()
            .map(|r| (*r).to_owned())
            .collect::<BTreeSet<_>>(),
        "list_statuses of hostile refs"
    );
    for reference in refs {
        on.store
            .abort(on.cx, reference)
            .await
            .step(&format!("abort ref {reference:?}"))?;
    }
    ensure!(
        on.statuses("").await?.is_empty(),
        "ingests left after aborting every hostile ref"
    );
    expect_kind(
        on.open("", 0, None).await,
        ErrorKind::InvalidArgument,
        "writer with an empty ref",
    )?;
    passed()
}

/// Many ingests at once; writers of the same bytes under different refs race to commit and
/// exactly one blob results.
async fn concurrent_writers<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let mut tasks = Vec::new();
    let same = content(171, 100_000);
    for i in 0..20u64 {
        let store = Arc::clone(&t.fixture.store);
        let cx = t.fixture.cx.clone();
        let data = if i < 16 {
            content(172 + i, 100_000)
        } else {
            same.clone()
        };
        tasks.push(tokio::spawn(async move {
            let on = On {
                store: &*store,
                cx: &cx,
            };
            let reference = format!("concurrent-{i}");
            let mut w = on
                .open(&reference, data.len() as u64, None)
                .await
                .step(&format!("open {reference}"))?;
            write_chunks(&mut w, &data, 4096)
                .await
                .step(&format!("write {reference}"))?;
            let digest = Digest::sha256_of(&data);
            let result = w
                .commit(data.len() as u64, Some(digest.clone()), Labels::new())
                .await;
            Ok::<_, String>((digest, result))
        }));
    }
    let mut digests = BTreeSet::new();
    let mut new_same = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let (digest, result) = task.await.map_err(|e| format!("writer task {i}: {e}"))??;
        match result {
            Ok(()) if i >= 16 => new_same += 1,
            Ok(()) => {}
            Err(e) if i >= 16 && e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("commit concurrent-{i}: {e}")),
        }
        digests.insert(digest);
    }
    ensure!(
        new_same >= 1,
        "no writer of the shared bytes committed them"
    );
    let on = t.main();
    ensure_eq!(
        on.list_digests("").await?,
        digests,
        "list after concurrent commits"
    );
    let back = on
        .read_all(&Digest::sha256_of(&same), 0, None)
        .await
        .step("read the raced blob")?;
    same_bytes(&back, &same, "the raced blob")?;
    passed()
}

/// A second namespace sees neither the first's blobs nor its ingests, can use the same ref,
/// and keeps its own copy of a blob the first deletes.
async fn namespaces_are_isolated<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    let Some(other_cx) = t.fixture.other_namespace.clone() else {
        return Ok(Outcome::Skipped(
            "the factory declares no second namespace".into(),
        ));
    };
    let on = t.main();
    let other = On {
        store: &*t.fixture.store,
        cx: &other_cx,
    };
    let data = content(191, 1000);
    let digest = on.put("shared-ref", &data, Labels::new()).await?;
    expect_kind(
        other.store.info(other.cx, &digest).await,
        ErrorKind::NotFound,
        "info from the other namespace",
    )?;
    expect_kind(
        other.read_all(&digest, 0, None).await,
        ErrorKind::NotFound,
        "read from the other namespace",
    )?;
    ensure!(
        other.list_digests("").await?.is_empty(),
        "the other namespace lists the first's blob"
    );

    let mut held = on.open("ingest-ref", 0, None).await.step("open")?;
    held.write(b"first namespace").await.step("write")?;
    expect_kind(
        other.store.status(other.cx, "ingest-ref").await,
        ErrorKind::NotFound,
        "status from the other namespace",
    )?;
    let mut theirs = other
        .open("ingest-ref", 0, None)
        .await
        .step("the same ref in the other namespace, while held in the first")?;
    ensure_eq!(
        theirs.status().offset,
        0,
        "the other namespace's ingest offset"
    );
    theirs
        .write(&data)
        .await
        .step("write in the other namespace")?;
    theirs
        .commit(1000, Some(digest.clone()), Labels::new())
        .await
        .step("commit in the other namespace a blob only the first has")?;
    held.close().await.step("close")?;

    on.store
        .delete(on.cx, &digest)
        .await
        .step("delete in the first namespace")?;
    let back = other
        .read_all(&digest, 0, None)
        .await
        .step("read in the other namespace after the first deleted")?;
    same_bytes(&back, &data, "the other namespace's blob")?;
    passed()
}

/// A call without a namespace is FailedPrecondition on a namespaced store.
async fn namespace_is_required<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    if !t.caps.requires_namespace {
        return Ok(Outcome::Skipped("the store is not namespaced".into()));
    }
    let on = t.main();
    let digest = on.put("exists", &content(201, 10), Labels::new()).await?;
    let bare = CallContext::default();
    let store = &*t.fixture.store;
    let all = Filter::default();
    let fp = ErrorKind::FailedPrecondition;
    expect_kind(store.info(&bare, &digest).await, fp, "info")?;
    let info = store.info(on.cx, &digest).await.step("info")?;
    expect_kind(store.update(&bare, info, &[]).await, fp, "update")?;
    expect_kind(store.list(&bare, &all).await, fp, "list")?;
    expect_kind(store.list_statuses(&bare, &all).await, fp, "list_statuses")?;
    expect_kind(store.status(&bare, "x").await, fp, "status")?;
    expect_kind(store.abort(&bare, "x").await, fp, "abort")?;
    let bare_on = On { store, cx: &bare };
    expect_kind(bare_on.read_all(&digest, 0, None).await, fp, "read")?;
    expect_kind(bare_on.open("x", 0, None).await, fp, "writer")?;
    expect_kind(store.delete(&bare, &digest).await, fp, "delete")?;
    passed()
}

/// Blobs, closed ingests and ingests whose writer was dropped all survive a new instance of
/// the store, and the ingests resume where they stopped.
async fn reopen_keeps_blobs_and_ingests<F: ContentStoreFactory>(t: Env<F>) -> CaseResult {
    if !t.caps.reopen {
        return Ok(Outcome::Skipped("the factory cannot reopen a store".into()));
    }
    let blob = content(211, 5000);
    let closed = content(212, 5000);
    let dropped = content(213, 5000);
    let digest = {
        let on = t.main();
        let digest = on.put("blob", &blob, Labels::new()).await?;
        let mut w = on.open("closed", 5000, None).await.step("open closed")?;
        w.write(&closed[..1234]).await.step("write closed")?;
        w.close().await.step("close")?;
        let mut w = on.open("dropped", 0, None).await.step("open dropped")?;
        w.write(&dropped[..4321]).await.step("write dropped")?;
        drop(w);
        digest
    };
    let Env {
        factory, fixture, ..
    } = t;
    let Fixture { store, guard, .. } = fixture;
    drop(store);
    let fixture = factory.reopen(guard).await.step("reopen")?;
    let on = On {
        store: &*fixture.store,
        cx: &fixture.cx,
    };

    let back = on
        .read_all(&digest, 0, None)
        .await
        .step("read after reopen")?;
    same_bytes(&back, &blob, "blob after reopen")?;
    let st = on
        .store
        .status(on.cx, "closed")
        .await
        .step("status closed")?;
    ensure_eq!(st.offset, 1234, "closed ingest offset after reopen");
    ensure_eq!(st.total, 5000, "closed ingest total after reopen");
    ensure_eq!(
        on.status_refs("").await?,
        BTreeSet::from(["closed".to_owned(), "dropped".to_owned()]),
        "ingests after reopen"
    );
    for (reference, data, cut) in [("closed", &closed, 1234), ("dropped", &dropped, 4321)] {
        let mut w = on
            .open_retrying(reference, 5000, None)
            .await
            .step(&format!("resume {reference} after reopen"))?;
        ensure_eq!(w.status().offset, cut as u64, "{reference}: resumed offset");
        ensure_eq!(
            w.digest(),
            Digest::sha256_of(&data[..cut]),
            "{reference}: resumed digest"
        );
        w.write(&data[cut..])
            .await
            .step(&format!("{reference}: write the rest"))?;
        w.commit(5000, Some(Digest::sha256_of(data)), Labels::new())
            .await
            .step(&format!("{reference}: commit"))?;
    }
    passed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_is_dispatchable_and_named_once() {
        struct Nothing;
        #[async_trait::async_trait]
        impl ContentStoreFactory for Nothing {
            type Guard = ();
            fn capabilities(&self) -> Capabilities {
                Capabilities::default()
            }
            async fn create(&self) -> Result<Fixture<()>> {
                Err(Error::internal("never called"))
            }
        }
        let unique: BTreeSet<_> = CASES.iter().collect();
        assert_eq!(unique.len(), CASES.len());
        for name in CASES {
            assert!(case_fn::<Nothing>(name).is_some(), "{name}");
        }
        assert!(case_fn::<Nothing>("nope").is_none());
    }

    #[tokio::test]
    async fn a_factory_failure_fails_each_case_by_name() {
        struct Broken;
        #[async_trait::async_trait]
        impl ContentStoreFactory for Broken {
            type Guard = ();
            fn capabilities(&self) -> Capabilities {
                Capabilities::default()
            }
            async fn create(&self) -> Result<Fixture<()>> {
                Err(Error::internal("no store today"))
            }
        }
        let failure = run_cases(Broken, &["abort", "delete", "nope"])
            .await
            .expect_err("must fail");
        let names: Vec<_> = failure.failures.iter().map(|f| f.case).collect();
        assert_eq!(names, ["abort", "delete", "nope"]);
        let text = failure.to_string();
        assert!(
            text.contains("case `abort`: the factory could not create a store"),
            "{text}"
        );
        assert!(text.contains("case `nope`: no such case"), "{text}");
    }

    #[test]
    fn content_is_deterministic_and_seeded() {
        assert_eq!(content(1, 100), content(1, 100));
        assert_ne!(content(1, 100), content(2, 100));
        assert_eq!(content(3, 13).len(), 13);
    }
}
