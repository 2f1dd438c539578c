//! `containerd.services.diff.v1.Diff`: applies layers and diffs mounts through the loaded
//! differs, in the order `[plugins."io.containerd.service.v1.diff-service"] default` gives
//! (containerd's key; default `["walking"]`). A differ answering NotImplemented passes the
//! call to the next one, so e.g. an erofs differ can sit in front of the walking one.
//!
//! Both adapters of the differ kind live in proxy-sdk (a vendor's proxy needs them without
//! berthd's services) and are re-exported here: berthd serves its ordered differs with
//! [`DiffService`], a proxy differ serves its one [`Differ`] the same way, and [`DiffClient`]
//! reaches either.

use std::sync::Arc;

use berth_core::content::CallContext;
use berth_core::diff::{ApplyOptions, DiffOptions, Differ, DifferKind};
use berth_core::error::{Classify, Error, ErrorKind, Result};
use berth_core::registry::{InitError, Instance, PluginKind, PluginType, Registration};
use berth_core::serve::GrpcServiceKind;
use berth_core::snapshot::Descriptor;

pub use berth_proxy_sdk::diff::*;

/// `[plugins."io.containerd.service.v1.diff-service"]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DiffServiceConfig {
    /// Differ ids in the order they are tried.
    pub default: Vec<String>,
    /// syncfs after every apply, whatever the request says (PR 10284).
    pub sync_fs: bool,
}

impl Default for DiffServiceConfig {
    fn default() -> Self {
        DiffServiceConfig {
            default: vec!["walking".to_owned()],
            sync_fs: false,
        }
    }
}

/// The ordered differs, itself a differ.
pub struct OrderedDiffers {
    differs: Vec<(String, Arc<dyn Differ>)>,
    sync_fs: bool,
}

/// Typed lookup of the diff service.
pub struct DiffServiceKind;
impl PluginKind for DiffServiceKind {
    const TYPE: PluginType = PluginType::SERVICE;
    type Object = OrderedDiffers;
}

impl OrderedDiffers {
    /// Whether to go on with the next differ after `result` from differ `id`.
    fn next<T>(id: &str, what: &str, result: &Result<T>) -> bool {
        match result {
            Err(e) if e.kind() == ErrorKind::NotImplemented => {
                tracing::debug!(differ = %id, "{what}: {e}; trying the next differ");
                true
            }
            _ => false,
        }
    }

    fn none_can(&self, what: &str) -> Error {
        Error::not_implemented(format!(
            "no differ can {what} (tried: {})",
            self.differs
                .iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

#[async_trait::async_trait]
impl Differ for OrderedDiffers {
    async fn apply(
        &self,
        cx: &CallContext,
        desc: &Descriptor,
        mounts: &[berth_core::snapshot::Mount],
        options: &ApplyOptions,
    ) -> Result<Descriptor> {
        let mut options = options.clone();
        options.sync_fs |= self.sync_fs;
        for (id, differ) in &self.differs {
            let result = differ.apply(cx, desc, mounts, &options).await;
            if !Self::next(id, "apply this layer", &result) {
                return result;
            }
        }
        Err(self.none_can(&format!(
            "apply layer {} ({})",
            desc.digest, desc.media_type
        )))
    }

    async fn compare(
        &self,
        cx: &CallContext,
        lower: &[berth_core::snapshot::Mount],
        upper: &[berth_core::snapshot::Mount],
        options: &DiffOptions,
    ) -> Result<Descriptor> {
        for (id, differ) in &self.differs {
            let result = differ.compare(cx, lower, upper, options).await;
            if !Self::next(id, "diff these mounts", &result) {
                return result;
            }
        }
        Err(self.none_can("diff these mounts"))
    }
}

/// `io.containerd.service.v1.diff-service`: the differs in configured order.
pub fn service_registration() -> Registration {
    Registration::new(PluginType::SERVICE, "diff-service", |ctx| async move {
        let config: DiffServiceConfig = ctx.config()?;
        let mut differs = Vec::new();
        for id in &config.default {
            match ctx.get::<DifferKind>(id) {
                Ok(d) => differs.push((id.clone(), d)),
                Err(e) => tracing::warn!(differ = %id, "configured differ not loaded: {e}"),
            }
        }
        if differs.is_empty() {
            return Err(InitError::Skip(format!(
                "none of the configured differs is loaded: {}",
                config.default.join(", ")
            )));
        }
        Ok(Instance::new::<DiffServiceKind>(Arc::new(OrderedDiffers {
            differs,
            sync_fs: config.sync_fs,
        })))
    })
    .requires(&[PluginType::DIFFER])
    .with_config::<DiffServiceConfig>()
}

/// `io.containerd.grpc.v1.diff`.
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "diff", |ctx| async move {
        let differs: Arc<dyn Differ> = ctx.get::<DiffServiceKind>("diff-service")?;
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(
            DiffService::new(differs),
        )))
    })
    .requires(&[PluginType::SERVICE])
}
