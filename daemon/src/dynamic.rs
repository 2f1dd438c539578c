//! Loading dynamic plugin libraries from `plugin_dir` (see `berth_core::dynamic` for what a
//! library exports and what may cross the boundary).
//!
//! Every `*.so` file directly in the directory is opened at start, in name order, with
//! `RTLD_NOW | RTLD_LOCAL` (unresolved symbols fail the open, and a library's symbols never
//! interpose berthd's or another library's). A library is refused, with the reason naming its
//! path, when it cannot be opened, lacks `berth_plugin_abi` or `berth_plugin_register`,
//! carries another ABI string than this berthd (both strings are named), or its entry point
//! fails. Each library, loaded or refused, appears in introspection as a plugin of type
//! [`LIBRARY_TYPE`] whose id is the file name: ok with the path and ABI as exports, or an
//! error with the reason; a refusal is also logged at error level.
//!
//! A refusal does not stop berthd. containerd stops at the first Go plugin that fails to load;
//! berth instead treats a library like any other optional plugin: the node keeps serving
//! without it. When `required_plugins` names a plugin that is missing and a library was
//! refused, start fails with the refusals in the error (the missing plugin was most likely
//! in one of them).
//!
//! A loaded library is never unloaded: its code backs the registered plugins for the
//! daemon's lifetime, so the handle is deliberately leaked.

// dlopen, dlsym and calling into a library are unsafe by nature; each use is commented.
#![allow(unsafe_code)]

use std::ffi::c_char;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use berth_core::config::Config;
use berth_core::content::CallContext;
use berth_core::diff::DifferKind;
use berth_core::dynamic::{
    ABI_SYMBOL, DynInitContext, DynInstance, DynKind, DynRegistration, ENTRY_OK, ENTRY_SYMBOL,
    EntryFn, PLUGIN_ABI, PluginRegistrar,
};
use berth_core::error::{Error, ErrorKind, Result};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::registry::{
    InitError, Instance, PluginKind, PluginMeta, PluginType, Registration, Registry,
};
use berth_core::snapshot::{Mount, SnapshotInfo, Snapshotter, SnapshotterKind, Usage};
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};

/// The introspection type of plugin library entries (one per `*.so` in `plugin_dir`).
pub const LIBRARY_TYPE: PluginType = PluginType::new("io.berth.plugin-library.v1");

/// The longest ABI string read from a library (a longer one is a mismatch anyway).
const MAX_ABI_LEN: usize = 4096;

/// Typed lookup of library entries: each instance is the library's path.
pub struct LibraryKind;
impl PluginKind for LibraryKind {
    const TYPE: PluginType = LIBRARY_TYPE;
    type Object = Path;
}

/// What loading `plugin_dir` produced.
#[derive(Default)]
pub struct Loaded {
    /// Plugins registered by libraries, and one entry per library for introspection.
    pub registrations: Vec<Registration>,
    /// Every refusal, as logged.
    pub refusals: Vec<String>,
}

/// Loads every library in `dir`; nothing here stops berthd (see the module documentation).
pub fn load_dir(dir: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(plugin_dir = %dir.display(), "plugin_dir does not exist; no plugin libraries loaded");
            return loaded;
        }
        Err(e) => {
            let reason = format!(
                "cannot list plugin_dir {}: {e}; no plugin libraries loaded",
                dir.display()
            );
            tracing::error!("{reason}");
            loaded.refusals.push(reason);
            return loaded;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "so") && p.is_file())
        .collect();
    paths.sort();
    for path in paths {
        let id = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        match load_library(&path) {
            Ok(registrations) => {
                let uris: Vec<String> = registrations.iter().map(DynRegistration::uri).collect();
                tracing::info!(library = %path.display(), plugins = ?uris, "loaded plugin library");
                loaded
                    .registrations
                    .extend(registrations.into_iter().map(|r| wrap(r, &path)));
                loaded.registrations.push(library_entry(id, path, Ok(uris)));
            }
            Err(e) => {
                tracing::error!(library = %path.display(), "plugin library refused: {}", e.message());
                loaded.refusals.push(e.message().to_owned());
                loaded.registrations.push(library_entry(id, path, Err(e)));
            }
        }
    }
    loaded
}

/// Adds what [`load_dir`] produced to `registry`: a library plugin whose URI is taken (by a
/// built-in or an earlier library) is refused, logged and reported, without stopping berthd.
pub fn register(registry: &mut Registry, loaded: Loaded) -> Vec<String> {
    let mut refusals = loaded.refusals;
    for registration in loaded.registrations {
        let uri = registration.uri();
        if let Err(e) = registry.register(registration) {
            let reason = format!("plugin {uri} from a plugin library is not registered: {e}");
            tracing::error!("{reason}");
            refusals.push(reason);
        }
    }
    refusals
}

/// Fails when a required plugin is missing while libraries were refused, naming both: the
/// registry alone would only say the plugin is "not registered".
pub fn check_required(config: &Config, registry: &Registry, refusals: &[String]) -> Result<()> {
    if refusals.is_empty() {
        return Ok(());
    }
    let known = registry.uris();
    let missing: Vec<&str> = config
        .required_plugins
        .iter()
        .filter(|uri| !known.contains(uri))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::failed_precondition(format!(
        "required plugins {} are missing, and plugin libraries were refused: {}",
        missing.join(", "),
        refusals.join("; ")
    )))
}

fn refused(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::failed_precondition(format!("plugin library {}: {why}", path.display()))
}

/// Opens one library, checks its symbols and ABI string, and runs its entry point.
fn load_library(path: &Path) -> Result<Vec<DynRegistration>> {
    // SAFETY: opening runs the library's initialisers. A library in plugin_dir is trusted
    // code by configuration (as a built-in is); what is checked below is that it was built
    // for this berthd, not that it is benign.
    let library = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
        .map_err(|e| refused(path, format!("cannot be opened: {e}")))?;
    let missing = |symbol: &str| {
        refused(
            path,
            format!(
                "has no symbol {symbol}: it was not built with berth_core::declare_plugin! \
                 (a berth plugin library exports {ABI_SYMBOL} and {ENTRY_SYMBOL})"
            ),
        )
    };
    // SAFETY: the symbol is only used as an address here; its bytes are read below, bounded.
    let abi_address: *const c_char = unsafe { library.get::<*const c_char>(ABI_SYMBOL) }
        .map(|symbol| *symbol)
        .map_err(|_| missing(ABI_SYMBOL))?;
    // SAFETY: the type is what declare_plugin! exports; it is not called before the ABI check.
    let entry: EntryFn = unsafe { library.get::<EntryFn>(ENTRY_SYMBOL) }
        .map(|symbol| *symbol)
        .map_err(|_| missing(ENTRY_SYMBOL))?;
    // SAFETY: the address is a symbol of a mapped library; reading stops at the first NUL or
    // after MAX_ABI_LEN bytes.
    let abi = unsafe { read_abi(abi_address) };
    if abi != PLUGIN_ABI {
        return Err(refused(
            path,
            format!(
                "was built for ABI {abi:?}, but this berthd has ABI {PLUGIN_ABI:?}: rebuild the \
                 library against this berthd's berth-core with the same rustc"
            ),
        ));
    }
    let mut registrar = PluginRegistrar::new(path);
    // Only now may the library's code run with berth's types: the ABI strings match.
    let code = entry(&mut registrar);
    if code != ENTRY_OK {
        let why = registrar.error().unwrap_or("no reason given").to_owned();
        return Err(refused(
            path,
            format!("{ENTRY_SYMBOL} failed (code {code}): {why}"),
        ));
    }
    // Never unloaded: the registrations' code lives in the library.
    let _handle = library.into_raw();
    Ok(registrar.into_registrations())
}

/// The ABI string at `address`, lossily decoded.
///
/// # Safety
/// `address` must point into readable memory holding a NUL within [`MAX_ABI_LEN`] bytes or
/// followed by at least that many readable bytes.
unsafe fn read_abi(address: *const c_char) -> String {
    let mut len = 0;
    // SAFETY: per the function's contract.
    while len < MAX_ABI_LEN && unsafe { *address.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes were just read from this address.
    let bytes = unsafe { std::slice::from_raw_parts(address.cast::<u8>(), len) };
    String::from_utf8_lossy(bytes).into_owned()
}

/// The introspection entry of a library: ready with its path, ABI and plugins, or failed.
fn library_entry(id: String, path: PathBuf, outcome: Result<Vec<String>>) -> Registration {
    Registration::new(LIBRARY_TYPE, id, move |ctx| async move {
        let plugins = outcome?;
        ctx.set_meta(|meta| {
            meta.exports
                .insert("path".to_owned(), path.display().to_string());
            meta.exports.insert("abi".to_owned(), PLUGIN_ABI.to_owned());
            meta.exports.insert("plugins".to_owned(), plugins.join(","));
        });
        Ok(Instance::new::<LibraryKind>(Arc::from(path.as_path())))
    })
}

/// A library's registration as a registry registration: berthd builds the context and the
/// instance on its side, so no `TypeId` or third-party type of the library crosses over.
fn wrap(registration: DynRegistration, library: &Path) -> Registration {
    let (kind, id, init) = registration.into_parts();
    let library = library.to_owned();
    Registration::new(kind.plugin_type(), id, move |ctx| async move {
        let section = ctx.config::<toml::Table>()?;
        let section =
            if section.is_empty() {
                None
            } else {
                Some(toml::to_string(&section).map_err(|e| {
                    Error::internal(format!("section [plugins.{:?}]: {e}", ctx.uri()))
                })?)
            };
        let meta = Arc::new(Mutex::new(PluginMeta::default()));
        let dyn_ctx = DynInitContext::new(
            ctx.uri().to_owned(),
            ctx.root().to_owned(),
            ctx.state().to_owned(),
            section,
            Arc::clone(&meta),
        );
        let instance = init(dyn_ctx).await?;
        let mut meta = meta.lock().unwrap_or_else(PoisonError::into_inner).clone();
        meta.exports
            .insert("library".to_owned(), library.display().to_string());
        ctx.set_meta(|m| *m = meta);
        match (kind, instance) {
            (DynKind::Snapshotter, DynInstance::Snapshotter(s)) => {
                Ok(Instance::new::<SnapshotterKind>(Arc::new(HostFiltered(s))))
            }
            (DynKind::Differ, DynInstance::Differ(d)) => Ok(Instance::new::<DifferKind>(d)),
            (kind, other) => Err(InitError::Failed(Error::new(
                ErrorKind::Internal,
                format!(
                    "plugin {} from {} was registered as {kind:?} but its init returned a {:?}",
                    ctx.uri(),
                    library.display(),
                    other.kind()
                ),
            ))),
        }
    })
    // The library decodes its own section (and says what it does not know): berthd only
    // hands the table over, so any key in it counts as known here.
    .with_config::<toml::Table>()
}

/// A library snapshotter whose `list` filters on berthd's side: a filter holds compiled
/// regular expressions, another crate's types, whose layout may differ in the library.
struct HostFiltered(Arc<dyn Snapshotter>);

#[async_trait::async_trait]
impl Snapshotter for HostFiltered {
    async fn stat(&self, cx: &CallContext, key: &str) -> Result<SnapshotInfo> {
        self.0.stat(cx, key).await
    }
    async fn update(
        &self,
        cx: &CallContext,
        info: SnapshotInfo,
        fieldpaths: &[String],
    ) -> Result<SnapshotInfo> {
        self.0.update(cx, info, fieldpaths).await
    }
    async fn usage(&self, cx: &CallContext, key: &str) -> Result<Usage> {
        self.0.usage(cx, key).await
    }
    async fn mounts(&self, cx: &CallContext, key: &str) -> Result<Vec<Mount>> {
        self.0.mounts(cx, key).await
    }
    async fn prepare(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        self.0.prepare(cx, key, parent, labels).await
    }
    async fn view(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        self.0.view(cx, key, parent, labels).await
    }
    async fn commit(&self, cx: &CallContext, name: &str, key: &str, labels: Labels) -> Result<()> {
        self.0.commit(cx, name, key, labels).await
    }
    async fn remove(&self, cx: &CallContext, key: &str) -> Result<()> {
        self.0.remove(cx, key).await
    }
    async fn list(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<SnapshotInfo>> {
        let all = self.0.list(cx, &Filter::default()).await?;
        Ok(all
            .into_iter()
            .filter(|info| {
                filter.matches(&|path: &[String]| {
                    berth_snapshot_native::storage::snapshot_field(info, path)
                })
            })
            .collect())
    }
    async fn cleanup(&self, cx: &CallContext) -> Result<()> {
        self.0.cleanup(cx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_dir_loads_nothing_and_refuses_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let loaded = load_dir(&dir.path().join("absent"));
        assert!(loaded.registrations.is_empty());
        assert!(loaded.refusals.is_empty());
    }

    #[test]
    fn a_file_that_is_no_library_is_refused_by_path_and_other_files_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("junk.so"), b"not an ELF file").expect("write");
        std::fs::write(dir.path().join("README"), b"ignored").expect("write");
        let loaded = load_dir(dir.path());
        assert_eq!(loaded.refusals.len(), 1, "{:?}", loaded.refusals);
        assert!(
            loaded.refusals[0].contains("junk.so"),
            "{:?}",
            loaded.refusals
        );
        assert!(
            loaded.refusals[0].contains("cannot be opened"),
            "{:?}",
            loaded.refusals
        );
        let uris: Vec<String> = loaded.registrations.iter().map(Registration::uri).collect();
        assert_eq!(uris, ["io.berth.plugin-library.v1.junk.so"]);
    }

    #[test]
    fn a_library_without_berth_symbols_is_refused_naming_the_symbol() {
        // libc is a real shared library without berth's symbols: the refusal must name
        // the first symbol that is missing, not fail to open.
        let Some(libc) = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/aarch64-linux-gnu/libc.so.6",
        ]
        .iter()
        .map(Path::new)
        .find(|p| p.exists()) else {
            println!("SKIP: no libc.so.6 at a known path to load");
            return;
        };
        let err = load_library(libc).err().expect("libc is refused");
        assert!(err.message().contains(ABI_SYMBOL), "{err}");
        assert!(err.message().contains(&libc.display().to_string()), "{err}");
    }

    /// A library snapshotter that records the filter it was handed and lists two snapshots.
    struct Recording(Mutex<Vec<bool>>);

    #[async_trait::async_trait]
    impl Snapshotter for Recording {
        async fn stat(&self, _: &CallContext, _: &str) -> Result<SnapshotInfo> {
            Err(Error::not_found("unused"))
        }
        async fn update(
            &self,
            _: &CallContext,
            _: SnapshotInfo,
            _: &[String],
        ) -> Result<SnapshotInfo> {
            Err(Error::not_found("unused"))
        }
        async fn usage(&self, _: &CallContext, _: &str) -> Result<Usage> {
            Err(Error::not_found("unused"))
        }
        async fn mounts(&self, _: &CallContext, _: &str) -> Result<Vec<Mount>> {
            Err(Error::not_found("unused"))
        }
        async fn prepare(
            &self,
            _: &CallContext,
            _: &str,
            _: Option<&str>,
            _: Labels,
        ) -> Result<Vec<Mount>> {
            Err(Error::not_found("unused"))
        }
        async fn view(
            &self,
            _: &CallContext,
            _: &str,
            _: Option<&str>,
            _: Labels,
        ) -> Result<Vec<Mount>> {
            Err(Error::not_found("unused"))
        }
        async fn commit(&self, _: &CallContext, _: &str, _: &str, _: Labels) -> Result<()> {
            Err(Error::not_found("unused"))
        }
        async fn remove(&self, _: &CallContext, _: &str) -> Result<()> {
            Err(Error::not_found("unused"))
        }
        async fn list(&self, _: &CallContext, filter: &Filter) -> Result<Vec<SnapshotInfo>> {
            // A match-all filter matches a snapshot named anything.
            let matches_all = filter.matches(&|_: &[String]| None);
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(matches_all);
            let info = |name: &str, kind| SnapshotInfo {
                name: name.to_owned(),
                parent: None,
                kind,
                created_at: std::time::SystemTime::UNIX_EPOCH,
                updated_at: std::time::SystemTime::UNIX_EPOCH,
                labels: Labels::new(),
            };
            Ok(vec![
                info("a", berth_core::snapshot::SnapshotKind::Committed),
                info("b", berth_core::snapshot::SnapshotKind::Active),
            ])
        }
    }

    #[test]
    fn a_library_snapshotter_gets_a_match_all_filter_and_berthd_filters() {
        let inner = Arc::new(Recording(Mutex::new(Vec::new())));
        let wrapped = HostFiltered(Arc::clone(&inner) as Arc<dyn Snapshotter>);
        let filter = Filter::parse_all(&["kind~=^act"]).expect("filter");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let listed = runtime
            .block_on(wrapped.list(&CallContext::default(), &filter))
            .expect("list");
        let names: Vec<&str> = listed.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(*inner.0.lock().expect("lock"), [true]);
    }

    #[test]
    fn a_missing_required_plugin_names_the_refusals() {
        let config = Config {
            required_plugins: vec!["io.containerd.snapshotter.v1.gone".to_owned()],
            ..Config::default()
        };
        let registry = Registry::new();
        assert!(check_required(&config, &registry, &[]).is_ok());
        let err = check_required(
            &config,
            &registry,
            &["plugin library /x.so: bad".to_owned()],
        )
        .expect_err("required and refused");
        assert!(
            err.message().contains("io.containerd.snapshotter.v1.gone"),
            "{err}"
        );
        assert!(err.message().contains("/x.so"), "{err}");
    }
}
