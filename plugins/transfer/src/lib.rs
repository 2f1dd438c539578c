//! berth's local transfer plugin (`io.containerd.transfer.v1.local`): image archives in and
//! out of a namespace's stores.
//!
//! - [`import`]: an archive stream (OCI image layout or Docker archive; plain tar, gzip, zstd
//!   or xz, detected by magic number) into the content store under a lease, gc.ref labels on
//!   indexes and manifests, optional unpack, image records last.
//! - [`unpack`]: an image's layers into a snapshotter through a differ, one chain id per
//!   layer, verified against the config's diff ids.
//! - [`export`]: images to an OCI archive stream, with a Docker-compatible `manifest.json`.
//! - [`progress`]: per-blob progress events with containerd's words.
//!
//! [`LocalTransfer`] is the plugin object: the stores of the metadata layer, the loaded
//! differs and the `[plugins."io.containerd.transfer.v1.local"]` configuration, which picks
//! snapshotter and differ for an unpack request as containerd does. The gRPC Transfer and
//! Streaming services (in `berth-services`) call it.
//!
//! The library functions take the stores as arguments, so they run as well against the
//! core's test doubles ([`berth_core::testing`]) and this crate's [`testing`] differ.

pub mod compression;
mod error;
pub mod export;
pub mod import;
pub mod media;
pub mod oci;
pub mod platform;
pub mod progress;
pub mod pull;
pub mod push;
pub mod reference;
pub mod store;
pub mod testing;
pub mod unpack;

mod archive;

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_core::content::{ByteStream, CallContext};
use berth_core::diff::{ApplyOptions, Differ, DifferKind};
use berth_core::metadata::{Metadata, MetadataKind};
use berth_core::registry::{InitError, Instance, PluginKind, PluginType, Registration};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWrite;

/// The registry client pulls go through, for callers building one.
pub use berth_registry as registry;
pub use error::{Error, Result};
pub use export::ExportOptions;
pub use import::{ImageReference, ImportOptions, ImportReport, Stores};
pub use platform::{Platform, PlatformSelection};
pub use progress::{NoProgress, Progress, ProgressSink};
pub use pull::{PullOptions, PullReport};
pub use push::{PushOptions, PushReport};
pub use unpack::{UnpackReport, UnpackTarget};

/// containerd's default snapshotter, preferred when an unpack request names none.
pub const DEFAULT_SNAPSHOTTER: &str = "overlayfs";
/// containerd's default differ, preferred when an unpack configuration names none.
pub const DEFAULT_DIFFER: &str = "walking";

/// One `unpack_config` entry: which snapshotter and differ unpack images of a platform.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnpackConfig {
    /// The platform (`linux/amd64`); with `check_platform_supported` off only its OS counts.
    pub platform: String,
    /// The snapshotter's name.
    pub snapshotter: String,
    /// The differ's name; empty picks `walking`, else any loaded differ.
    pub differ: String,
    /// Accepted for compatibility; not read (every OCI and Docker config type is unpacked).
    pub config_type: String,
    /// Accepted for compatibility; not read (every layer media type is unpacked).
    pub layer_types: Vec<String>,
    /// Skip this entry, instead of failing an unpack, when its snapshotter or differ is not
    /// loaded.
    pub optional: bool,
}

/// `[plugins."io.containerd.transfer.v1.local"]`, with containerd's keys and defaults.
///
/// Read: `unpack_config`, `check_platform_supported`, for pulls `max_concurrent_downloads`,
/// `concurrent_layer_fetch_buffer` and `config_path`, for pushes
/// `max_concurrent_uploaded_layers` and `config_path`. `max_concurrent_unpacks` is not read:
/// layers are unpacked one after the other (each needs its parent committed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransferConfig {
    /// Concurrent blob downloads of a pull (containerd: 3).
    pub max_concurrent_downloads: u32,
    /// Bytes per part of parallel Range fetches of one blob; below 512 (0 included) turns
    /// them off. With them on, `max_concurrent_downloads` bounds a pull's HTTP requests.
    pub concurrent_layer_fetch_buffer: u64,
    /// Concurrent layer uploads of a push (containerd: 3).
    pub max_concurrent_uploaded_layers: u32,
    /// Concurrent layer unpacks (containerd: 1).
    pub max_concurrent_unpacks: u32,
    /// Match unpack platforms fully (architecture too), not only by OS.
    pub check_platform_supported: bool,
    /// Registry hosts directory.
    pub config_path: String,
    /// Which snapshotter and differ unpack which platform. Absent: the host platform with
    /// `overlayfs` and `walking`, as containerd; an empty list unpacks only to snapshotters
    /// requests name explicitly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unpack_config: Option<Vec<UnpackConfig>>,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            max_concurrent_downloads: 3,
            concurrent_layer_fetch_buffer: 0,
            max_concurrent_uploaded_layers: 3,
            max_concurrent_unpacks: 1,
            check_platform_supported: false,
            config_path: String::new(),
            unpack_config: None,
        }
    }
}

/// A client's unpack request (the transfer API's `UnpackConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackRequest {
    /// The platform whose images to unpack.
    pub platform: Platform,
    /// The snapshotter; empty for the configured default.
    pub snapshotter: String,
}

#[derive(Debug, Clone)]
struct ConfiguredUnpack {
    platform: Platform,
    snapshotter: String,
    differ: String,
    optional: bool,
}

/// The local transfer plugin object.
pub struct LocalTransfer {
    stores: Stores,
    differs: BTreeMap<String, Arc<dyn Differ>>,
    config: TransferConfig,
    unpacks: Vec<ConfiguredUnpack>,
}

impl std::fmt::Debug for LocalTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTransfer")
            .field("differs", &self.differs.keys().collect::<Vec<_>>())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl LocalTransfer {
    /// The plugin over `metadata` (which must have a content store) with the loaded
    /// `differs` by name. An `unpack_config` platform that does not parse is InvalidArgument.
    pub fn new(
        metadata: Arc<Metadata>,
        differs: BTreeMap<String, Arc<dyn Differ>>,
        config: TransferConfig,
    ) -> Result<LocalTransfer> {
        let stores = Stores::new(metadata)?;
        let entries = config.unpack_config.clone().unwrap_or_else(|| {
            vec![UnpackConfig {
                platform: Platform::host().to_string(),
                snapshotter: DEFAULT_SNAPSHOTTER.to_owned(),
                differ: DEFAULT_DIFFER.to_owned(),
                ..UnpackConfig::default()
            }]
        });
        let mut unpacks = Vec::with_capacity(entries.len());
        for entry in entries {
            let platform = Platform::parse(&entry.platform).map_err(|e| {
                Error::Core(berth_core::Error::invalid_argument(format!(
                    "unpack_config: {}",
                    berth_core::Error::from(e).message()
                )))
            })?;
            unpacks.push(ConfiguredUnpack {
                platform,
                snapshotter: entry.snapshotter,
                differ: entry.differ,
                optional: entry.optional,
            });
        }
        Ok(LocalTransfer {
            stores,
            differs,
            config,
            unpacks,
        })
    }

    /// The stores this plugin works on.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// The configuration in force.
    pub fn config(&self) -> &TransferConfig {
        &self.config
    }

    /// Picks snapshotter and differ for each request, as containerd's
    /// `getSupportedPlatform`: a configured entry whose platform matches (by OS only unless
    /// `check_platform_supported`) and whose snapshotter is the one asked for, or, when none
    /// is asked for, preferably `overlayfs`. Beyond containerd, a request naming a loaded
    /// snapshotter that no entry lists is served with the default differ rather than
    /// silently not unpacked. A request nothing serves is skipped (logged).
    pub fn resolve_unpacks(&self, requests: &[UnpackRequest]) -> Result<Vec<UnpackTarget>> {
        let mut targets = Vec::new();
        for request in requests {
            let mut chosen: Option<&ConfiguredUnpack> = None;
            for entry in &self.unpacks {
                let platform_ok = if self.config.check_platform_supported {
                    entry.platform.matches(&request.platform)
                } else {
                    entry.platform.matches_os(&request.platform)
                };
                if !platform_ok {
                    continue;
                }
                if request.snapshotter == entry.snapshotter {
                    chosen = Some(entry);
                    break;
                }
                if request.snapshotter.is_empty() {
                    if entry.snapshotter == DEFAULT_SNAPSHOTTER {
                        chosen = Some(entry);
                        break;
                    }
                    chosen = chosen.or(Some(entry));
                }
            }
            let fallback;
            let entry = match chosen {
                Some(entry) => entry,
                None if !request.snapshotter.is_empty()
                    && self
                        .stores
                        .metadata
                        .snapshotter(&request.snapshotter)
                        .is_some() =>
                {
                    fallback = ConfiguredUnpack {
                        platform: request.platform.clone(),
                        snapshotter: request.snapshotter.clone(),
                        differ: String::new(),
                        optional: false,
                    };
                    &fallback
                }
                None => {
                    tracing::info!(
                        platform = %request.platform,
                        snapshotter = %request.snapshotter,
                        "no unpack configuration matches the request; not unpacking"
                    );
                    continue;
                }
            };
            let Some(snapshotter) = self.stores.metadata.snapshotter(&entry.snapshotter) else {
                if entry.optional {
                    continue;
                }
                return Err(Error::Core(berth_core::Error::failed_precondition(
                    format!(
                        "snapshotter {:?} is not loaded: cannot unpack (import without unpacking, \
                     or pick a loaded snapshotter: {})",
                        entry.snapshotter,
                        self.stores.metadata.snapshotter_names().join(", ")
                    ),
                )));
            };
            let Some(differ) = self.differ(&entry.differ) else {
                if entry.optional {
                    continue;
                }
                return Err(Error::Core(berth_core::Error::failed_precondition(
                    format!(
                        "no differ {} is loaded: cannot unpack (import without unpacking)",
                        if entry.differ.is_empty() {
                            "plugin".to_owned()
                        } else {
                            format!("{:?}", entry.differ)
                        }
                    ),
                )));
            };
            targets.push(UnpackTarget {
                snapshotter_name: entry.snapshotter.clone(),
                snapshotter,
                differ,
                platform: request.platform.normalized(),
                apply_options: ApplyOptions::default(),
            });
        }
        Ok(targets)
    }

    fn differ(&self, name: &str) -> Option<Arc<dyn Differ>> {
        if !name.is_empty() {
            return self.differs.get(name).cloned();
        }
        self.differs
            .get(DEFAULT_DIFFER)
            .or_else(|| self.differs.values().next())
            .cloned()
    }

    /// Imports an archive into the call's namespace, unpacking as `unpacks` ask.
    pub async fn import(
        &self,
        cx: &CallContext,
        source: ByteStream,
        options: &ImportOptions,
        unpacks: &[UnpackRequest],
        progress: &dyn ProgressSink,
    ) -> Result<ImportReport> {
        let targets = self.resolve_unpacks(unpacks)?;
        import::import(&self.stores, cx, source, options, &targets, progress).await
    }

    /// Pulls `reference` through `client` into the call's namespace, unpacking as `unpacks`
    /// ask; `max_concurrent_downloads` comes from the configuration.
    pub async fn pull(
        &self,
        cx: &CallContext,
        client: Arc<berth_registry::Client>,
        reference: &str,
        options: &PullOptions,
        unpacks: &[UnpackRequest],
        progress: &dyn ProgressSink,
    ) -> Result<PullReport> {
        let targets = self.resolve_unpacks(unpacks)?;
        let mut options = options.clone();
        options.max_concurrent_downloads = self.config.max_concurrent_downloads;
        options.concurrent_layer_fetch_buffer = self.config.concurrent_layer_fetch_buffer;
        pull::pull(
            &self.stores,
            cx,
            client,
            reference,
            &options,
            &targets,
            progress,
        )
        .await
    }

    /// Pushes the image `name` of the call's namespace to `reference` through `client`;
    /// `max_concurrent_uploaded_layers` comes from the configuration.
    pub async fn push(
        &self,
        cx: &CallContext,
        client: Arc<berth_registry::Client>,
        name: &str,
        reference: &str,
        options: &PushOptions,
        progress: &dyn ProgressSink,
    ) -> Result<PushReport> {
        let mut options = options.clone();
        options.max_concurrent_uploads = self.config.max_concurrent_uploaded_layers;
        push::push(
            &self.stores,
            cx,
            client,
            name,
            reference,
            &options,
            progress,
        )
        .await
    }

    /// Exports the images named `names` of the call's namespace to `sink`.
    pub async fn export<W: AsyncWrite + Unpin + Send + ?Sized>(
        &self,
        cx: &CallContext,
        names: &[String],
        options: &ExportOptions,
        sink: &mut W,
        progress: &dyn ProgressSink,
    ) -> Result<()> {
        let ns = cx.require_namespace()?;
        if names.is_empty() {
            return Err(Error::Core(berth_core::Error::invalid_argument(
                "name at least one image to export",
            )));
        }
        let mut images = Vec::with_capacity(names.len());
        for name in names {
            images.push(self.stores.metadata.get_image(ns, name)?);
        }
        export::export(&self.stores, cx, &images, options, sink, progress).await
    }
}

/// Typed lookup of the local transfer plugin in the registry.
pub struct LocalTransferKind;
impl PluginKind for LocalTransferKind {
    const TYPE: PluginType = PluginType::TRANSFER;
    type Object = LocalTransfer;
}

/// `io.containerd.transfer.v1.local`: needs the metadata layer with a content store; uses
/// every differ loaded before it and the metadata layer's snapshotters.
pub fn registration() -> Registration {
    Registration::new(PluginType::TRANSFER, "local", |ctx| async move {
        let config: TransferConfig = ctx.config()?;
        let metadata = ctx.single::<MetadataKind>()?;
        if metadata.content().is_none() {
            return Err(InitError::Skip(
                "no content store plugin is loaded".to_owned(),
            ));
        }
        let differs = ctx.all::<DifferKind>().into_iter().collect();
        let transfer =
            LocalTransfer::new(metadata, differs, config).map_err(berth_core::Error::from)?;
        Ok(Instance::new::<LocalTransferKind>(Arc::new(transfer)))
    })
    .requires(&[
        PluginType::METADATA,
        PluginType::DIFFER,
        PluginType::SNAPSHOTTER,
    ])
    .with_config::<TransferConfig>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_config_sections_decode() {
        let config: TransferConfig = toml::from_str(
            r#"
            max_concurrent_downloads = 5
            check_platform_supported = true
            [[unpack_config]]
            platform = "linux/amd64"
            snapshotter = "native"
            differ = "walking"
            [[unpack_config]]
            platform = "linux/amd64"
            snapshotter = "erofs"
            differ = "erofs"
            optional = true
            "#,
        )
        .expect("toml");
        assert_eq!(config.max_concurrent_downloads, 5);
        assert!(config.check_platform_supported);
        let entries = config.unpack_config.expect("unpack_config");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].snapshotter, "native");
        assert!(entries[1].optional);
        let defaults = toml::to_string(&TransferConfig::default()).expect("serialise");
        assert!(
            defaults.contains("max_concurrent_downloads = 3"),
            "{defaults}"
        );
        assert!(!defaults.contains("unpack_config"), "{defaults}");
    }
}
