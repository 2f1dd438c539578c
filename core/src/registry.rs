//! The plugin registry: registrations as plain data, ordered by what they require.
//!
//! A [`Registration`] names a versioned [`PluginType`], an id, the types it requires, its
//! default configuration and an async init function. [`Registry::init`] orders registrations
//! so that every plugin of a required type initialises first (a cycle is an error naming the
//! plugins in it), hands each one an [`InitContext`] (its decoded config section, its root and
//! state dirs, typed lookups of what initialised before it) and records the outcome: ready,
//! skipped with a reason, or failed. Only a plugin listed in `required_plugins` can stop start.
//!
//! Lookups are typed through [`PluginKind`]: a kind binds a plugin type to the trait object
//! its instances are, so callers write `ctx.get::<SnapshotterKind>("overlayfs")` and receive
//! an `Arc<dyn Snapshotter>`; the downcast happens once, here.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::error::{Classify, Error, ErrorKind, Result};

/// A versioned plugin type such as `io.containerd.snapshotter.v1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PluginType(&'static str);

impl PluginType {
    /// A plugin type from its full name.
    pub const fn new(name: &'static str) -> Self {
        PluginType(name)
    }
    /// The full name.
    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// gRPC services registered on the daemon's socket.
    pub const GRPC: PluginType = PluginType("io.containerd.grpc.v1");
    /// In-process services wrapped by the gRPC layer.
    pub const SERVICE: PluginType = PluginType("io.containerd.service.v1");
    /// Internal helpers with no API of their own.
    pub const INTERNAL: PluginType = PluginType("io.containerd.internal.v1");
    /// The metadata store (berth: sled).
    pub const METADATA: PluginType = PluginType("io.containerd.metadata.v1");
    /// The event exchange.
    pub const EVENT: PluginType = PluginType("io.containerd.event.v1");
    /// Content stores.
    pub const CONTENT: PluginType = PluginType("io.containerd.content.v1");
    /// Snapshotters.
    pub const SNAPSHOTTER: PluginType = PluginType("io.containerd.snapshotter.v1");
    /// Differs (layer apply and diff).
    pub const DIFFER: PluginType = PluginType("io.containerd.differ.v1");
    /// Garbage collection schedulers.
    pub const GC: PluginType = PluginType("io.containerd.gc.v1");
    /// Lease managers.
    pub const LEASE: PluginType = PluginType("io.containerd.lease.v1");
    /// The transfer service.
    pub const TRANSFER: PluginType = PluginType("io.containerd.transfer.v1");
    /// Stream managers.
    pub const STREAMING: PluginType = PluginType("io.containerd.streaming.v1");
    /// Sandbox stores.
    pub const SANDBOX_STORE: PluginType = PluginType("io.containerd.sandbox.store.v1");
    /// Sandbox controllers.
    pub const SANDBOX_CONTROLLER: PluginType = PluginType("io.containerd.sandbox.controller.v1");
    /// Task runtimes.
    pub const RUNTIME: PluginType = PluginType("io.containerd.runtime.v2");

    /// Every plugin type containerd defines: a config section for one of these that berth
    /// has no plugin for is a containerd setting berth ignores, not a typo.
    pub const CONTAINERD_TYPES: &'static [&'static str] = &[
        "io.containerd.internal.v1",
        "io.containerd.runtime.v1",
        "io.containerd.runtime.v2",
        "io.containerd.service.v1",
        "io.containerd.grpc.v1",
        "io.containerd.ttrpc.v1",
        "io.containerd.snapshotter.v1",
        "io.containerd.differ.v1",
        "io.containerd.metadata.v1",
        "io.containerd.content.v1",
        "io.containerd.gc.v1",
        "io.containerd.event.v1",
        "io.containerd.lease.v1",
        "io.containerd.streaming.v1",
        "io.containerd.transfer.v1",
        "io.containerd.sandbox.store.v1",
        "io.containerd.sandbox.controller.v1",
        "io.containerd.podsandbox.controller.v1",
        "io.containerd.image-verifier.v1",
        "io.containerd.warning.v1",
        "io.containerd.cri.v1",
        "io.containerd.shim.v1",
        "io.containerd.monitor.v1",
        "io.containerd.monitor.task.v1",
        "io.containerd.monitor.container.v1",
        "io.containerd.tracing.processor.v1",
        "io.containerd.nri.v1",
        "io.containerd.server.v1",
        "io.containerd.mount-manager.v1",
        "io.containerd.mount-handler.v1",
        "io.containerd.transfer.v1",
    ];
}

impl fmt::Display for PluginType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Binds a plugin type to the trait object its instances are, for typed lookups.
pub trait PluginKind: 'static {
    /// The plugin type whose instances this kind describes.
    const TYPE: PluginType;
    /// What an instance is, usually `dyn SomeTrait`.
    type Object: ?Sized + Send + Sync + 'static;
}

/// What a plugin's init produced, typed by its kind.
pub struct Instance {
    kind: PluginType,
    object: Box<dyn Any + Send + Sync>,
}

impl Instance {
    /// Wraps an initialised plugin object of kind `K`.
    pub fn new<K: PluginKind>(object: Arc<K::Object>) -> Self {
        Instance {
            kind: K::TYPE,
            object: Box::new(object),
        }
    }

    fn get<K: PluginKind>(&self) -> Option<Arc<K::Object>> {
        if self.kind != K::TYPE {
            return None;
        }
        self.object.downcast_ref::<Arc<K::Object>>().cloned()
    }
}

/// What a plugin tells introspection about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginMeta {
    /// Platforms served, as `os/arch[/variant]`.
    pub platforms: Vec<String>,
    /// Free-form facts (e.g. a snapshotter's root, a proxy's address).
    pub exports: BTreeMap<String, String>,
    /// Capabilities other plugins may branch on (never parsed from text).
    pub capabilities: Vec<String>,
}

/// Why a plugin did not become ready.
#[derive(Debug)]
pub enum InitError {
    /// The plugin declines to run here; the reason is shown by introspection.
    Skip(String),
    /// The plugin tried and failed.
    Failed(Error),
}

impl From<Error> for InitError {
    fn from(err: Error) -> Self {
        InitError::Failed(err)
    }
}

/// The outcome of a plugin's init.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginStatus {
    /// Initialised and usable.
    Ready,
    /// Declined, with the reason.
    Skipped(String),
    /// Failed, with the error.
    Failed(Error),
}

/// One plugin as introspection shows it.
#[derive(Clone, Debug)]
pub struct PluginInfo {
    /// Its type.
    pub plugin_type: PluginType,
    /// Its id, unique within the type.
    pub id: String,
    /// The types it required.
    pub requires: Vec<PluginType>,
    /// Platforms, exports and capabilities it declared.
    pub meta: PluginMeta,
    /// How its init ended.
    pub status: PluginStatus,
}

impl PluginInfo {
    /// `<type>.<id>`.
    pub fn uri(&self) -> String {
        format!("{}.{}", self.plugin_type, self.id)
    }
}

/// What a plugin configuration struct must be: TOML in and out, with a default.
pub trait PluginConfig: Serialize + DeserializeOwned + Default + Send + 'static {}
impl<T: Serialize + DeserializeOwned + Default + Send + 'static> PluginConfig for T {}

/// A plugin's configuration schema, erased to functions so the registry can print defaults
/// and check sections without initialising anything.
#[derive(Clone, Copy)]
struct ConfigSpec {
    default: fn() -> Result<toml::Table>,
    unknown_keys: fn(&toml::Value) -> Result<Vec<String>>,
}

fn default_table<T: PluginConfig>() -> Result<toml::Table> {
    toml::Table::try_from(T::default())
        .map_err(|e| Error::internal(format!("default plugin config does not serialise: {e}")))
}

fn decode<T: PluginConfig>(value: &toml::Value) -> Result<(T, Vec<String>)> {
    let mut unknown = Vec::new();
    let decoded = serde_ignored::deserialize(value.clone(), |path| unknown.push(path.to_string()))
        .map_err(|e: toml::de::Error| Error::invalid_argument(e.to_string()))?;
    Ok((decoded, unknown))
}

fn unknown_keys<T: PluginConfig>(value: &toml::Value) -> Result<Vec<String>> {
    decode::<T>(value).map(|(_, unknown)| unknown)
}

type InitFuture = Pin<Box<dyn Future<Output = Result<Instance, InitError>> + Send>>;
type InitFn = Box<dyn FnOnce(InitContext) -> InitFuture + Send>;

/// A plugin as plain data: what it is, what it needs, how to start it.
pub struct Registration {
    plugin_type: PluginType,
    id: String,
    requires: Vec<PluginType>,
    requires_everything: bool,
    config: Option<ConfigSpec>,
    init: InitFn,
}

impl Registration {
    /// A plugin of `plugin_type` named `id` whose `init` builds its instance.
    pub fn new<F, Fut>(plugin_type: PluginType, id: impl Into<String>, init: F) -> Self
    where
        F: FnOnce(InitContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Instance, InitError>> + Send + 'static,
    {
        Registration {
            plugin_type,
            id: id.into(),
            requires: Vec::new(),
            requires_everything: false,
            config: None,
            init: Box::new(move |ctx| Box::pin(init(ctx))),
        }
    }

    /// Initialise after every plugin of these types.
    pub fn requires(mut self, types: &[PluginType]) -> Self {
        self.requires.extend_from_slice(types);
        self
    }

    /// Initialise after every plugin that does not itself require everything (containerd's
    /// `Requires: ["*"]`), e.g. introspection-like services.
    pub fn requires_everything(mut self) -> Self {
        self.requires_everything = true;
        self
    }

    /// Declares the plugin's configuration struct: its default is printed by
    /// `berthd config default` and its section is checked for unknown keys.
    pub fn with_config<T: PluginConfig>(mut self) -> Self {
        self.config = Some(ConfigSpec {
            default: default_table::<T>,
            unknown_keys: unknown_keys::<T>,
        });
        self
    }

    /// `<type>.<id>`.
    pub fn uri(&self) -> String {
        format!("{}.{}", self.plugin_type, self.id)
    }

    /// The plugin's type.
    pub fn plugin_type(&self) -> PluginType {
        self.plugin_type
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("uri", &self.uri())
            .field("requires", &self.requires)
            .field("requires_everything", &self.requires_everything)
            .finish_non_exhaustive()
    }
}

/// A configuration remark found while checking plugin sections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SectionNotice {
    /// A key the plugin does not know (logged as a warning).
    UnknownKey {
        /// The section, `plugins."<uri>"`.
        section: String,
        /// The key path inside it.
        key: String,
    },
    /// A section that does not decode (wrong type of value).
    Invalid {
        /// The section.
        section: String,
        /// What is wrong.
        error: String,
    },
    /// A section for a plugin type containerd has and berth does not build (informational).
    NotBuilt {
        /// The section's URI.
        uri: String,
    },
    /// A section for no plugin type known to berth or containerd (logged as a warning).
    UnknownPlugin {
        /// The section's URI.
        uri: String,
    },
}

impl fmt::Display for SectionNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SectionNotice::UnknownKey { section, key } => {
                write!(
                    f,
                    "unknown key {key:?} in section [{section}]; it is ignored"
                )
            }
            SectionNotice::Invalid { section, error } => write!(f, "section [{section}]: {error}"),
            SectionNotice::NotBuilt { uri } => write!(
                f,
                "berth has no plugin {uri:?} (a containerd plugin); its section is ignored"
            ),
            SectionNotice::UnknownPlugin { uri } => write!(
                f,
                "section [plugins.{uri:?}] names no plugin berth or containerd knows; it is ignored"
            ),
        }
    }
}

/// All registrations of one daemon, before init.
#[derive(Default, Debug)]
pub struct Registry {
    registrations: Vec<Registration>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a registration; an empty type or id, or a URI already present, is an error.
    pub fn register(&mut self, registration: Registration) -> Result<()> {
        if registration.plugin_type.as_str().is_empty() || registration.id.is_empty() {
            return Err(Error::invalid_argument(format!(
                "plugin {:?} needs a type and an id",
                registration.uri()
            )));
        }
        let uri = registration.uri();
        if self.registrations.iter().any(|r| r.uri() == uri) {
            return Err(Error::already_exists(format!(
                "plugin {uri} is registered twice: each type and id pair must be unique"
            )));
        }
        self.registrations.push(registration);
        Ok(())
    }

    /// URIs of every registration, in registration order.
    pub fn uris(&self) -> Vec<String> {
        self.registrations.iter().map(Registration::uri).collect()
    }

    /// Default configuration sections of every plugin that has one, keyed by URI.
    pub fn default_configs(&self) -> Result<BTreeMap<String, toml::Table>> {
        let mut out = BTreeMap::new();
        for r in &self.registrations {
            if let Some(spec) = r.config {
                out.insert(r.uri(), (spec.default)()?);
            }
        }
        Ok(out)
    }

    /// Checks every `[plugins."<uri>"]` section against the plugins registered here.
    pub fn check_sections(&self, sections: &BTreeMap<String, toml::Value>) -> Vec<SectionNotice> {
        let mut notices = Vec::new();
        for (uri, value) in sections {
            let section = format!("plugins.{uri:?}");
            match self.registrations.iter().find(|r| r.uri() == *uri) {
                Some(r) => match r.config {
                    Some(spec) => match (spec.unknown_keys)(value) {
                        Ok(keys) => {
                            notices.extend(keys.into_iter().map(|key| SectionNotice::UnknownKey {
                                section: section.clone(),
                                key,
                            }))
                        }
                        Err(e) => notices.push(SectionNotice::Invalid {
                            section,
                            error: e.message().to_owned(),
                        }),
                    },
                    None => {
                        if let Some(table) = value.as_table() {
                            notices.extend(table.keys().map(|key| SectionNotice::UnknownKey {
                                section: section.clone(),
                                key: key.clone(),
                            }));
                        }
                    }
                },
                None => {
                    let known_type = PluginType::CONTAINERD_TYPES.iter().any(|t| {
                        uri.strip_prefix(t)
                            .is_some_and(|rest| rest.starts_with('.'))
                    });
                    notices.push(if known_type {
                        SectionNotice::NotBuilt { uri: uri.clone() }
                    } else {
                        SectionNotice::UnknownPlugin { uri: uri.clone() }
                    });
                }
            }
        }
        notices
    }

    /// The init order: indices into the registrations, every required type first.
    fn order(&self) -> Result<Vec<usize>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Visiting,
            Done,
        }
        struct Walk<'a> {
            regs: &'a [Registration],
            marks: Vec<Mark>,
            stack: Vec<usize>,
            out: Vec<usize>,
        }
        impl Walk<'_> {
            fn dependencies(&self, i: usize) -> Vec<usize> {
                let me = &self.regs[i];
                self.regs
                    .iter()
                    .enumerate()
                    .filter(|&(j, other)| {
                        j != i
                            && if me.requires_everything {
                                !other.requires_everything
                            } else {
                                me.requires.contains(&other.plugin_type)
                            }
                    })
                    .map(|(j, _)| j)
                    .collect()
            }
            fn visit(&mut self, i: usize) -> Result<()> {
                match self.marks[i] {
                    Mark::Done => return Ok(()),
                    Mark::Visiting => {
                        let start = self.stack.iter().position(|&s| s == i).unwrap_or(0);
                        let mut cycle: Vec<String> = self.stack[start..]
                            .iter()
                            .map(|&s| self.regs[s].uri())
                            .collect();
                        cycle.push(self.regs[i].uri());
                        return Err(Error::invalid_argument(format!(
                            "plugin dependency cycle: {}",
                            cycle.join(" -> ")
                        )));
                    }
                    Mark::New => {}
                }
                self.marks[i] = Mark::Visiting;
                self.stack.push(i);
                for j in self.dependencies(i) {
                    self.visit(j)?;
                }
                self.stack.pop();
                self.marks[i] = Mark::Done;
                self.out.push(i);
                Ok(())
            }
        }
        let mut walk = Walk {
            regs: &self.registrations,
            marks: vec![Mark::New; self.registrations.len()],
            stack: Vec::new(),
            out: Vec::new(),
        };
        for i in 0..self.registrations.len() {
            walk.visit(i)?;
        }
        Ok(walk.out)
    }

    /// URIs in init order (for tests and `berthd config check`).
    pub fn init_order(&self) -> Result<Vec<String>> {
        Ok(self
            .order()?
            .into_iter()
            .map(|i| self.registrations[i].uri())
            .collect())
    }

    /// Initialises every plugin not disabled by `config`, in dependency order.
    ///
    /// Fails only for a cycle, or when a plugin in `required_plugins` is missing, skipped or
    /// failed; every other outcome is recorded in the returned set for introspection.
    pub async fn init(self, config: &Config) -> Result<Arc<PluginSet>> {
        let order = self.order()?;
        let mut slots: Vec<Option<Registration>> =
            self.registrations.into_iter().map(Some).collect();
        let plugins = Arc::new(PluginSet::default());
        let shared_metadata = shared_metadata(config);
        let disabled: BTreeSet<&str> = config.disabled_plugins.iter().map(String::as_str).collect();
        let mut required: BTreeSet<&str> =
            config.required_plugins.iter().map(String::as_str).collect();

        for i in order {
            let Some(reg) = slots[i].take() else { continue };
            let uri = reg.uri();
            if disabled.contains(uri.as_str()) {
                tracing::info!(plugin = %uri, "plugin disabled by configuration");
                continue;
            }
            let meta = Arc::new(Mutex::new(PluginMeta::default()));
            let ctx = InitContext {
                root: config.root.join(&uri),
                state: config.state.join(&uri),
                grpc_address: config.grpc.address.clone(),
                section: config.plugins.get(&uri).cloned(),
                uri: uri.clone(),
                plugins: Arc::clone(&plugins),
                meta: Arc::clone(&meta),
                shared_metadata: shared_metadata.clone(),
            };
            tracing::debug!(plugin = %uri, "loading plugin");
            let outcome = (reg.init)(ctx).await;
            let meta = meta.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let (status, instance) = match outcome {
                Ok(instance) => (PluginStatus::Ready, Some(instance)),
                Err(InitError::Skip(reason)) => {
                    tracing::info!(plugin = %uri, %reason, "skip loading plugin");
                    (PluginStatus::Skipped(reason), None)
                }
                Err(InitError::Failed(err)) => {
                    tracing::warn!(plugin = %uri, error = %err, "failed to load plugin");
                    (PluginStatus::Failed(err), None)
                }
            };
            if required.remove(uri.as_str()) {
                match &status {
                    PluginStatus::Ready => {}
                    PluginStatus::Skipped(reason) => {
                        return Err(Error::failed_precondition(format!(
                            "required plugin {uri} skipped loading: {reason}"
                        )));
                    }
                    PluginStatus::Failed(err) => {
                        return Err(Error::new(
                            err.kind(),
                            format!("required plugin {uri} failed to load: {}", err.message()),
                        ));
                    }
                }
            }
            plugins.push(
                PluginInfo {
                    plugin_type: reg.plugin_type,
                    id: reg.id,
                    requires: reg.requires,
                    meta,
                    status,
                },
                instance,
            );
        }
        if !required.is_empty() {
            let missing: Vec<&str> = required.into_iter().collect();
            return Err(Error::failed_precondition(format!(
                "required plugins not included (not registered or disabled): {}",
                missing.join(", ")
            )));
        }
        Ok(plugins)
    }
}

struct Loaded {
    info: PluginInfo,
    instance: Option<Instance>,
}

/// The plugins initialised so far, with their outcomes; shared by the daemon and services.
#[derive(Default)]
pub struct PluginSet {
    loaded: RwLock<Vec<Loaded>>,
}

impl PluginSet {
    fn push(&self, info: PluginInfo, instance: Option<Instance>) {
        self.loaded
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Loaded { info, instance });
    }

    /// Every plugin that went through init, in init order.
    pub fn infos(&self) -> Vec<PluginInfo> {
        self.loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|l| l.info.clone())
            .collect()
    }

    /// The ready instance of kind `K` named `id`.
    pub fn get<K: PluginKind>(&self, id: &str) -> Result<Arc<K::Object>> {
        let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
        let entry = loaded
            .iter()
            .find(|l| l.info.plugin_type == K::TYPE && l.info.id == id)
            .ok_or_else(|| Error::not_found(format!("plugin {}.{id} is not loaded", K::TYPE)))?;
        match (&entry.info.status, &entry.instance) {
            (PluginStatus::Ready, Some(instance)) => instance.get::<K>().ok_or_else(|| {
                Error::internal(format!(
                    "plugin {}.{id} does not provide the interface of its kind",
                    K::TYPE
                ))
            }),
            (PluginStatus::Skipped(reason), _) => Err(Error::not_found(format!(
                "plugin {}.{id} was skipped: {reason}",
                K::TYPE
            ))),
            (status, _) => Err(Error::failed_precondition(format!(
                "plugin {}.{id} is not ready: {status:?}",
                K::TYPE
            ))),
        }
    }

    /// Every ready instance of kind `K`, with its id, in init order.
    pub fn all<K: PluginKind>(&self) -> Vec<(String, Arc<K::Object>)> {
        let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
        loaded
            .iter()
            .filter(|l| l.info.plugin_type == K::TYPE)
            .filter_map(|l| {
                let object = l.instance.as_ref()?.get::<K>()?;
                Some((l.info.id.clone(), object))
            })
            .collect()
    }

    /// The one ready instance of kind `K`; an error if there is none or more than one.
    pub fn single<K: PluginKind>(&self) -> Result<Arc<K::Object>> {
        let mut all = self.all::<K>();
        match all.len() {
            1 => Ok(all.remove(0).1),
            0 => Err(Error::not_found(format!("no {} plugin is loaded", K::TYPE))),
            n => Err(Error::failed_precondition(format!(
                "{n} {} plugins are loaded where one is expected ({}); disable all but one",
                K::TYPE,
                all.iter()
                    .map(|(id, _)| id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

/// What a plugin's init receives.
pub struct InitContext {
    uri: String,
    root: PathBuf,
    state: PathBuf,
    grpc_address: PathBuf,
    section: Option<toml::Value>,
    plugins: Arc<PluginSet>,
    meta: Arc<Mutex<PluginMeta>>,
    shared_metadata: crate::metadata::SharedMetadata,
}

/// The core's metadata database, where the metadata plugin keeps its records, with its
/// `no_sync` option read from that plugin's section.
fn shared_metadata(config: &Config) -> crate::metadata::SharedMetadata {
    let uri = format!("{}.sled", PluginType::METADATA);
    let no_sync = config
        .plugins
        .get(&uri)
        .and_then(|v| decode::<crate::metadata::MetadataConfig>(v).ok())
        .is_some_and(|(c, _)| c.no_sync);
    crate::metadata::SharedMetadata::new(config.root.join(&uri).join("meta.sled"), no_sync)
}

impl InitContext {
    /// The plugin's URI, `<type>.<id>`.
    pub fn uri(&self) -> &str {
        &self.uri
    }
    /// `<root>/<uri>`: the plugin's persistent directory (created by the plugin if it needs it).
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `<state>/<uri>`: the plugin's runtime directory.
    pub fn state(&self) -> &Path {
        &self.state
    }
    /// The daemon's gRPC socket.
    pub fn grpc_address(&self) -> &Path {
        &self.grpc_address
    }

    /// The plugin's `[plugins."<uri>"]` section decoded into `T` (defaults where absent).
    /// Unknown keys were reported when the daemon started; here they are ignored.
    pub fn config<T: PluginConfig>(&self) -> Result<T> {
        match &self.section {
            None => Ok(T::default()),
            Some(value) => decode::<T>(value).map(|(t, _)| t).map_err(|e| {
                Error::invalid_argument(format!(
                    "section [plugins.{:?}]: {}",
                    self.uri,
                    e.message()
                ))
            }),
        }
    }

    /// A ready plugin of kind `K` named `id`, initialised before this one.
    pub fn get<K: PluginKind>(&self, id: &str) -> Result<Arc<K::Object>> {
        self.plugins.get::<K>(id)
    }
    /// Every ready plugin of kind `K` initialised before this one.
    pub fn all<K: PluginKind>(&self) -> Vec<(String, Arc<K::Object>)> {
        self.plugins.all::<K>()
    }
    /// The one ready plugin of kind `K`.
    pub fn single<K: PluginKind>(&self) -> Result<Arc<K::Object>> {
        self.plugins.single::<K>()
    }
    /// The live plugin set (plugins initialised later appear in it too), for introspection.
    pub fn plugin_set(&self) -> Arc<PluginSet> {
        Arc::clone(&self.plugins)
    }

    /// The core's metadata database, for a compiled-in plugin that keeps its records in a
    /// tree of it (so that one flush makes them durable together with the metadata layer's).
    pub fn shared_metadata(&self) -> crate::metadata::SharedMetadata {
        self.shared_metadata.clone()
    }

    /// Declares platforms, exports and capabilities for introspection.
    pub fn set_meta(&self, update: impl FnOnce(&mut PluginMeta)) {
        update(&mut self.meta.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// Convenience for init functions: an error kind for a failed init.
pub fn init_failed(kind: ErrorKind, message: impl Into<String>) -> InitError {
    InitError::Failed(Error::new(kind, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    trait Greeter: Send + Sync {
        fn greet(&self) -> String;
    }
    struct Hello(String);
    impl Greeter for Hello {
        fn greet(&self) -> String {
            format!("hello from {}", self.0)
        }
    }
    struct GreeterKind;
    impl PluginKind for GreeterKind {
        const TYPE: PluginType = PluginType::new("test.greeter.v1");
        type Object = dyn Greeter;
    }
    const USER: PluginType = PluginType::new("test.user.v1");
    const OTHER: PluginType = PluginType::new("test.other.v1");

    fn greeter(id: &'static str) -> Registration {
        Registration::new(GreeterKind::TYPE, id, move |_ctx| async move {
            Ok(Instance::new::<GreeterKind>(Arc::new(Hello(id.to_owned()))))
        })
    }

    fn config_in(dir: &Path) -> Config {
        Config {
            root: dir.join("root"),
            state: dir.join("state"),
            ..Config::default()
        }
    }

    #[tokio::test]
    async fn init_follows_requires_and_lookups_are_typed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reg = Registry::new();
        // Registered before the greeters it needs: the order must still put them first.
        reg.register(
            Registration::new(USER, "user", |ctx| async move {
                let all = ctx.all::<GreeterKind>();
                assert_eq!(all.len(), 2, "both greeters initialised before the user");
                let one = ctx.get::<GreeterKind>("b")?;
                assert_eq!(one.greet(), "hello from b");
                Ok(Instance::new::<GreeterKind>(Arc::new(Hello("user".into()))))
            })
            .requires(&[GreeterKind::TYPE]),
        )
        .expect("register");
        reg.register(greeter("a")).expect("register");
        reg.register(greeter("b")).expect("register");
        assert_eq!(
            reg.init_order().expect("order"),
            [
                "test.greeter.v1.a",
                "test.greeter.v1.b",
                "test.user.v1.user"
            ]
        );
        let set = reg.init(&config_in(dir.path())).await.expect("init");
        assert!(set.infos().iter().all(|i| i.status == PluginStatus::Ready));
        // A kind whose type does not match finds nothing rather than a wrong object.
        assert!(set.get::<GreeterKind>("user").is_err());
        assert_eq!(
            set.single::<GreeterKind>()
                .map(|_| ())
                .map_err(|e| e.kind()),
            Err(ErrorKind::FailedPrecondition)
        );
    }

    #[test]
    fn a_cycle_is_an_error_naming_its_plugins() {
        let mut reg = Registry::new();
        let noop = |_ctx: InitContext| async { Err::<Instance, _>(InitError::Skip("x".into())) };
        reg.register(Registration::new(USER, "u", noop).requires(&[OTHER]))
            .expect("register");
        reg.register(Registration::new(OTHER, "o", noop).requires(&[USER]))
            .expect("register");
        reg.register(greeter("free")).expect("register");
        let err = reg.init_order().expect_err("cycle");
        let text = err.to_string();
        assert!(text.contains("cycle"), "{text}");
        assert!(text.contains("test.user.v1.u"), "{text}");
        assert!(text.contains("test.other.v1.o"), "{text}");
        assert!(!text.contains("free"), "{text}");
    }

    #[test]
    fn a_duplicate_uri_is_an_error() {
        let mut reg = Registry::new();
        reg.register(greeter("a")).expect("first");
        let err = reg.register(greeter("a")).expect_err("duplicate");
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("test.greeter.v1.a"));
    }

    #[test]
    fn requires_everything_runs_last() {
        let mut reg = Registry::new();
        let noop = |_ctx: InitContext| async { Err::<Instance, _>(InitError::Skip("x".into())) };
        reg.register(Registration::new(USER, "last", noop).requires_everything())
            .expect("register");
        reg.register(greeter("a")).expect("register");
        reg.register(Registration::new(OTHER, "o", noop))
            .expect("register");
        assert_eq!(
            reg.init_order().expect("order"),
            ["test.greeter.v1.a", "test.other.v1.o", "test.user.v1.last"]
        );
    }

    #[tokio::test]
    async fn skips_and_failures_are_recorded_and_only_required_ones_abort() {
        let dir = tempfile::tempdir().expect("tempdir");
        let build = || {
            let mut reg = Registry::new();
            reg.register(Registration::new(USER, "skipper", |_ctx| async {
                Err::<Instance, _>(InitError::Skip("erofs is not in /proc/filesystems".into()))
            }))
            .expect("register");
            reg.register(Registration::new(OTHER, "broken", |_ctx| async {
                Err::<Instance, _>(init_failed(ErrorKind::Internal, "disk on fire"))
            }))
            .expect("register");
            reg.register(greeter("a")).expect("register");
            reg
        };

        let set = build()
            .init(&config_in(dir.path()))
            .await
            .expect("non-required failures do not abort");
        let infos = set.infos();
        let by_uri = |uri: &str| {
            infos
                .iter()
                .find(|i| i.uri() == uri)
                .map(|i| i.status.clone())
                .expect(uri)
        };
        assert_eq!(
            by_uri("test.user.v1.skipper"),
            PluginStatus::Skipped("erofs is not in /proc/filesystems".into())
        );
        assert!(matches!(
            by_uri("test.other.v1.broken"),
            PluginStatus::Failed(_)
        ));

        let mut config = config_in(dir.path());
        config.required_plugins = vec!["test.other.v1.broken".into()];
        let err = build()
            .init(&config)
            .await
            .err()
            .expect("required failure aborts");
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert!(err.to_string().contains("test.other.v1.broken"), "{err}");

        config.required_plugins = vec!["test.user.v1.skipper".into()];
        let err = build()
            .init(&config)
            .await
            .err()
            .expect("required skip aborts");
        assert!(err.to_string().contains("erofs"), "{err}");

        config.required_plugins = vec!["test.greeter.v1.nope".into()];
        let err = build()
            .init(&config)
            .await
            .err()
            .expect("missing required aborts");
        assert!(err.to_string().contains("test.greeter.v1.nope"), "{err}");
    }

    #[tokio::test]
    async fn disabled_plugins_are_never_initialised() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reg = Registry::new();
        reg.register(Registration::new(USER, "boom", |_ctx| async {
            panic!("a disabled plugin must not be initialised")
        }))
        .expect("register");
        reg.register(greeter("a")).expect("register");
        let mut config = config_in(dir.path());
        config.disabled_plugins = vec!["test.user.v1.boom".into()];
        let set = reg.init(&config).await.expect("init");
        let uris: Vec<String> = set.infos().iter().map(PluginInfo::uri).collect();
        assert_eq!(uris, ["test.greeter.v1.a"]);
    }

    #[derive(serde::Serialize, serde::Deserialize, Default, Debug, PartialEq)]
    #[serde(default)]
    struct Knobs {
        depth: u32,
        name: String,
    }

    #[tokio::test]
    async fn plugin_config_is_decoded_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reg = Registry::new();
        reg.register(
            Registration::new(USER, "knobby", |ctx| async move {
                let knobs: Knobs = ctx.config()?;
                assert_eq!(
                    knobs,
                    Knobs {
                        depth: 3,
                        name: String::new()
                    }
                );
                assert!(ctx.root().ends_with("root/test.user.v1.knobby"));
                Ok(Instance::new::<GreeterKind>(Arc::new(Hello("k".into()))))
            })
            .with_config::<Knobs>(),
        )
        .expect("register");
        let mut config = config_in(dir.path());
        let section: toml::Value = toml::from_str("depth = 3\ncolour = 'red'").expect("toml");
        config.plugins.insert("test.user.v1.knobby".into(), section);
        config.plugins.insert(
            "io.containerd.cri.v1.runtime".into(),
            toml::Value::Table(Default::default()),
        );
        config.plugins.insert(
            "io.containerd.snaphotter.v1.typo".into(),
            toml::Value::Table(Default::default()),
        );
        let notices = reg.check_sections(&config.plugins);
        assert!(notices.contains(&SectionNotice::UnknownKey {
            section: "plugins.\"test.user.v1.knobby\"".into(),
            key: "colour".into()
        }));
        assert!(notices.contains(&SectionNotice::NotBuilt {
            uri: "io.containerd.cri.v1.runtime".into()
        }));
        assert!(notices.contains(&SectionNotice::UnknownPlugin {
            uri: "io.containerd.snaphotter.v1.typo".into()
        }));
        let defaults = reg.default_configs().expect("defaults");
        assert_eq!(
            defaults["test.user.v1.knobby"]["depth"].as_integer(),
            Some(0)
        );
        let set = reg.init(&config).await.expect("init");
        assert_eq!(set.infos()[0].status, PluginStatus::Ready);
    }
}
