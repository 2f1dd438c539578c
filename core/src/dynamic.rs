//! Dynamic plugins: shared libraries in `plugin_dir` that berthd loads at start.
//!
//! A plugin library is a `cdylib` that depends on `berth-core` and writes one line,
//! `berth_core::declare_plugin!(register);`, where `register` is a
//! `fn(&mut PluginRegistrar) -> berth_core::Result<()>` adding [`DynRegistration`]s. The macro
//! exports two C symbols:
//!
//! - [`ABI_SYMBOL`] (`berth_plugin_abi`): [`PLUGIN_ABI`] as a NUL-terminated string. berthd
//!   reads it before running any code of the library and refuses a library whose string differs
//!   from its own, naming both. The string is berth-core's version, a digest of berth-core's
//!   sources and the rustc version (see `build.rs`): Rust has no stable ABI, so sharing
//!   registrations and trait objects is sound only between builds of the same core by the same
//!   compiler.
//! - [`ENTRY_SYMBOL`] (`berth_plugin_register`): `extern "C" fn(&mut PluginRegistrar) -> u32`.
//!
//! # What may cross the boundary
//!
//! A library links its own copy of std, tokio and every other crate. Layouts of std types and
//! of berth-core's own types are fixed by the ABI string; those of other crates are not (their
//! features are unified per build, so the same version may lay out differently in berthd and in
//! the library), and `TypeId`s of berth-core types differ between the two builds as well (they
//! hash cargo's per-build metadata). So the boundary is narrow on purpose:
//!
//! - a registration names its kind through [`DynKind`] and its init returns a [`DynInstance`],
//!   an enum of trait objects, instead of the registry's `Any`-based `Instance` (berthd builds
//!   that on its side);
//! - the init context carries the plugin's configuration section as TOML text, parsed by the
//!   library's own `toml`, and no lookups of other plugins;
//! - only kinds whose traits take std and berth-core types are offered: snapshotters and
//!   differs. A snapshotter's `list` receives a match-all filter and berthd applies the real
//!   filter itself, because a filter holds compiled regular expressions (another crate's
//!   types). Content stores (filters, streams) and gRPC services (tonic types) stay compiled in
//!   or proxied.
//!
//! # Async code in a library
//!
//! The library's tokio is not berthd's: its thread-locals hold no runtime, so `tokio::spawn`,
//! `spawn_blocking`, `tokio::fs` or timers called from a future berthd polls panic with "no
//! reactor running". A library does its blocking work with [`blocking`], which runs a closure
//! on a thread of its own and completes through a waker, with no runtime on either side; its
//! futures await only that (or other runtime-agnostic primitives).
//!
//! # Other rules
//!
//! - Neither berthd nor a library may install a `#[global_allocator]`: memory allocated on one
//!   side is freed on the other, so both must use the system allocator.
//! - A panic must not leave the library: it is another std's panic, which berthd's std cannot
//!   catch (the process aborts). The entry point catches panics of `register`; a plugin's
//!   trait methods should return errors instead of panicking.
//! - A library is never unloaded: its code backs the trait objects for the daemon's lifetime.
//! - The library's `tracing` has no subscriber: its log lines go nowhere. Report through errors,
//!   statuses and `set_meta` exports.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::diff::Differ;
use crate::error::{Error, Result};
use crate::registry::{InitError, PluginConfig, PluginMeta, PluginType};
use crate::snapshot::Snapshotter;

/// The ABI string of this build of berth-core: `berth-core <version>+src.<digest> / rustc ...`.
pub const PLUGIN_ABI: &str = env!("BERTH_PLUGIN_ABI");

/// The exported NUL-terminated ABI string of a plugin library.
pub const ABI_SYMBOL: &str = "berth_plugin_abi";

/// The exported entry point of a plugin library.
pub const ENTRY_SYMBOL: &str = "berth_plugin_register";

/// The entry point's answer: every registration was added.
pub const ENTRY_OK: u32 = 0;
/// The entry point's answer: `register` returned an error (kept in the registrar).
pub const ENTRY_FAILED: u32 = 1;
/// The entry point's answer: `register` panicked (the message is kept in the registrar).
pub const ENTRY_PANICKED: u32 = 2;

/// The signature of [`ENTRY_SYMBOL`].
pub type EntryFn = extern "C" fn(&mut PluginRegistrar) -> u32;

/// The plugin kinds a library can register (see the module documentation for why not all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DynKind {
    /// `io.containerd.snapshotter.v1`.
    Snapshotter,
    /// `io.containerd.differ.v1`.
    Differ,
}

impl DynKind {
    /// The registry's plugin type of this kind.
    pub fn plugin_type(self) -> PluginType {
        match self {
            DynKind::Snapshotter => PluginType::SNAPSHOTTER,
            DynKind::Differ => PluginType::DIFFER,
        }
    }
}

/// What a library plugin's init produced.
pub enum DynInstance {
    /// A snapshotter.
    Snapshotter(Arc<dyn Snapshotter>),
    /// A differ.
    Differ(Arc<dyn Differ>),
}

impl DynInstance {
    /// The kind of the object inside.
    pub fn kind(&self) -> DynKind {
        match self {
            DynInstance::Snapshotter(_) => DynKind::Snapshotter,
            DynInstance::Differ(_) => DynKind::Differ,
        }
    }
}

/// The future a library plugin's init returns.
pub type DynInitFuture = Pin<Box<dyn Future<Output = Result<DynInstance, InitError>> + Send>>;
/// A library plugin's init, erased.
pub type DynInitFn = Box<dyn FnOnce(DynInitContext) -> DynInitFuture + Send>;

/// What a library plugin's init receives (built by berthd).
pub struct DynInitContext {
    uri: String,
    root: PathBuf,
    state: PathBuf,
    section: Option<String>,
    meta: Arc<Mutex<PluginMeta>>,
}

impl DynInitContext {
    /// A context for the plugin `uri` with its directories, its configuration section as TOML
    /// text and the metadata cell berthd reads back after init.
    pub fn new(
        uri: String,
        root: PathBuf,
        state: PathBuf,
        section: Option<String>,
        meta: Arc<Mutex<PluginMeta>>,
    ) -> Self {
        DynInitContext {
            uri,
            root,
            state,
            section,
            meta,
        }
    }
    /// The plugin's URI, `<type>.<id>`.
    pub fn uri(&self) -> &str {
        &self.uri
    }
    /// `<root>/<uri>`: the plugin's persistent directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `<state>/<uri>`: the plugin's runtime directory.
    pub fn state(&self) -> &Path {
        &self.state
    }
    /// The plugin's `[plugins."<uri>"]` section decoded into `T` (defaults where absent);
    /// unknown keys are ignored.
    pub fn config<T: PluginConfig>(&self) -> Result<T> {
        match &self.section {
            None => Ok(T::default()),
            Some(text) => toml::from_str(text).map_err(|e| {
                Error::invalid_argument(format!("section [plugins.{:?}]: {e}", self.uri))
            }),
        }
    }
    /// Declares platforms, exports and capabilities for introspection.
    pub fn set_meta(&self, update: impl FnOnce(&mut PluginMeta)) {
        update(&mut self.meta.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// A plugin registered by a library: its kind, its id and its init.
pub struct DynRegistration {
    kind: DynKind,
    id: String,
    init: DynInitFn,
}

impl DynRegistration {
    /// A snapshotter named `id` (URI `io.containerd.snapshotter.v1.<id>`).
    pub fn snapshotter<F, Fut>(id: impl Into<String>, init: F) -> Self
    where
        F: FnOnce(DynInitContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Arc<dyn Snapshotter>, InitError>> + Send + 'static,
    {
        DynRegistration {
            kind: DynKind::Snapshotter,
            id: id.into(),
            init: Box::new(move |ctx| {
                Box::pin(async move { init(ctx).await.map(DynInstance::Snapshotter) })
            }),
        }
    }

    /// A differ named `id` (URI `io.containerd.differ.v1.<id>`).
    pub fn differ<F, Fut>(id: impl Into<String>, init: F) -> Self
    where
        F: FnOnce(DynInitContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Arc<dyn Differ>, InitError>> + Send + 'static,
    {
        DynRegistration {
            kind: DynKind::Differ,
            id: id.into(),
            init: Box::new(move |ctx| {
                Box::pin(async move { init(ctx).await.map(DynInstance::Differ) })
            }),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> DynKind {
        self.kind
    }
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// `<type>.<id>`.
    pub fn uri(&self) -> String {
        format!("{}.{}", self.kind.plugin_type(), self.id)
    }
    /// Its kind, id and init, for berthd to wrap into a registry registration.
    pub fn into_parts(self) -> (DynKind, String, DynInitFn) {
        (self.kind, self.id, self.init)
    }
}

/// What a library's entry point receives: where its registrations go.
pub struct PluginRegistrar {
    library: PathBuf,
    registrations: Vec<DynRegistration>,
    error: Option<String>,
}

impl PluginRegistrar {
    /// An empty registrar for the library at `library`.
    pub fn new(library: impl Into<PathBuf>) -> Self {
        PluginRegistrar {
            library: library.into(),
            registrations: Vec::new(),
            error: None,
        }
    }
    /// The path berthd loaded the library from.
    pub fn library(&self) -> &Path {
        &self.library
    }
    /// Adds a plugin.
    pub fn register(&mut self, registration: DynRegistration) {
        self.registrations.push(registration);
    }
    /// Why the entry point failed, when it answered [`ENTRY_FAILED`] or [`ENTRY_PANICKED`].
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
    /// The registrations added.
    pub fn into_registrations(self) -> Vec<DynRegistration> {
        self.registrations
    }
}

/// Runs a library's `register` for its entry point (used by [`declare_plugin!`]): a panic is
/// caught here, in the library's own std, because berthd's std could not catch it.
#[doc(hidden)]
pub fn run_entry(
    registrar: &mut PluginRegistrar,
    register: fn(&mut PluginRegistrar) -> Result<()>,
) -> u32 {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| register(registrar)));
    match outcome {
        Ok(Ok(())) => ENTRY_OK,
        Ok(Err(e)) => {
            registrar.error = Some(e.to_string());
            ENTRY_FAILED
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            registrar.registrations.clear();
            registrar.error = Some(format!("register panicked: {message}"));
            ENTRY_PANICKED
        }
    }
}

/// `text` as a NUL-terminated byte array of length `N` (`text.len() + 1`), for the exported ABI
/// string (used by [`declare_plugin!`]).
#[doc(hidden)]
pub const fn nul_terminated<const N: usize>(text: &str) -> [u8; N] {
    let bytes = text.as_bytes();
    assert!(bytes.len() + 1 == N, "N must be the text's length plus one");
    let mut out = [0u8; N];
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i] != 0, "an ABI string cannot hold a NUL byte");
        out[i] = bytes[i];
        i += 1;
    }
    out
}

/// Exports a plugin library's ABI string and entry point; `register` is a
/// `fn(&mut PluginRegistrar) -> berth_core::Result<()>`.
///
/// ```ignore
/// fn register(registrar: &mut berth_core::dynamic::PluginRegistrar) -> berth_core::Result<()> {
///     registrar.register(berth_core::dynamic::DynRegistration::snapshotter("mine", init));
///     Ok(())
/// }
/// berth_core::declare_plugin!(register);
/// ```
///
/// `declare_plugin!(register, abi = "...")` exports another ABI string instead: only for tests
/// of berthd's refusal, since a library so built is never loaded.
#[macro_export]
macro_rules! declare_plugin {
    ($register:path) => {
        $crate::declare_plugin!($register, abi = $crate::dynamic::PLUGIN_ABI);
    };
    ($register:path, abi = $abi:expr) => {
        /// The ABI string berthd compares with its own before running any code of this library.
        #[allow(unsafe_code)]
        #[unsafe(export_name = "berth_plugin_abi")]
        pub static BERTH_PLUGIN_ABI: [u8; { $abi.len() + 1 }] =
            $crate::dynamic::nul_terminated::<{ $abi.len() + 1 }>($abi);

        /// The entry point berthd calls once, after the ABI check.
        #[allow(unsafe_code)]
        #[unsafe(export_name = "berth_plugin_register")]
        pub extern "C" fn berth_plugin_register(
            registrar: &mut $crate::dynamic::PluginRegistrar,
        ) -> u32 {
            $crate::dynamic::run_entry(registrar, $register)
        }
    };
}

/// A closure running on a thread of its own, awaitable from any executor (see [`blocking`]).
pub struct Blocking<T> {
    slot: Arc<Mutex<Slot<T>>>,
}

struct Slot<T> {
    result: Option<std::thread::Result<T>>,
    waker: Option<Waker>,
}

/// Runs `work` on a new thread and returns a future of its result that needs no runtime: it
/// completes through the waker of whoever polls it, so a plugin library can do blocking work
/// inside futures berthd polls (the library's own tokio has no runtime there). A panic of
/// `work` becomes an Internal error.
pub fn blocking<T, F>(work: F) -> Blocking<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let slot = Arc::new(Mutex::new(Slot {
        result: None,
        waker: None,
    }));
    let theirs = Arc::clone(&slot);
    let spawned = std::thread::Builder::new()
        .name("berth-plugin-work".to_owned())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            let waker = {
                let mut slot = theirs.lock().unwrap_or_else(PoisonError::into_inner);
                slot.result = Some(result);
                slot.waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        });
    if let Err(e) = spawned {
        let message = format!("cannot start a worker thread: {e}");
        slot.lock().unwrap_or_else(PoisonError::into_inner).result = Some(Err(Box::new(message)));
    }
    Blocking { slot }
}

impl<T> Future for Blocking<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        match slot.result.take() {
            Some(Ok(value)) => Poll::Ready(Ok(value)),
            Some(Err(panic)) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                Poll::Ready(Err(Error::internal(format!(
                    "plugin worker failed: {message}"
                ))))
            }
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_names_core_version_and_rustc() {
        assert!(
            PLUGIN_ABI.starts_with(&format!("berth-core {}+src.", env!("CARGO_PKG_VERSION"))),
            "{PLUGIN_ABI}"
        );
        assert!(PLUGIN_ABI.contains(" / rustc "), "{PLUGIN_ABI}");
    }

    #[test]
    fn nul_terminated_copies_and_terminates() {
        const TEXT: &str = "abc";
        let out = nul_terminated::<{ TEXT.len() + 1 }>(TEXT);
        assert_eq!(&out, b"abc\0");
    }

    /// Polls a future to completion on this thread with a waker that unparks it: no runtime.
    fn block_on<F: Future>(future: F) -> F::Output {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            match future.as_mut().poll(&mut cx) {
                Poll::Ready(out) => return out,
                Poll::Pending => std::thread::park(),
            }
        }
    }

    #[test]
    fn blocking_completes_without_a_runtime() {
        let out = block_on(blocking(|| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            41 + 1
        }));
        assert_eq!(out.expect("worker result"), 42);
    }

    #[test]
    fn blocking_turns_a_panic_into_an_error() {
        let err = block_on(blocking(|| -> u32 { panic!("disk gone") })).expect_err("panic");
        assert!(err.to_string().contains("disk gone"), "{err}");
    }

    fn failing(_: &mut PluginRegistrar) -> Result<()> {
        Err(Error::invalid_argument("bad plugin config"))
    }
    fn panicking(r: &mut PluginRegistrar) -> Result<()> {
        r.register(DynRegistration::snapshotter("x", |_ctx| async {
            Err(InitError::Skip("never".into()))
        }));
        panic!("boom")
    }

    #[test]
    fn entry_reports_errors_and_panics() {
        let mut r = PluginRegistrar::new("/lib/x.so");
        assert_eq!(run_entry(&mut r, failing), ENTRY_FAILED);
        assert!(r.error().is_some_and(|e| e.contains("bad plugin config")));
        let mut r = PluginRegistrar::new("/lib/x.so");
        assert_eq!(run_entry(&mut r, panicking), ENTRY_PANICKED);
        assert!(r.error().is_some_and(|e| e.contains("boom")));
        assert!(
            r.into_registrations().is_empty(),
            "half a registration is dropped"
        );
    }
}
