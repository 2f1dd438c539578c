//! `containerd.services.introspection.v1.Introspection`: what plugins are loaded and which
//! server this is.
//!
//! The plugin list is read from the live plugin set at call time, so plugins initialised after
//! this service are listed too. The server uuid is kept in `<root>/<uri>/uuid`, so it stays
//! the same across restarts on the same root, as containerd's does.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_core::error::{Error, ErrorKind, Result};
use berth_core::filters::Filter;
use berth_core::registry::{
    Instance, PluginInfo, PluginSet, PluginStatus, PluginType, Registration,
};
use berth_core::serve::{GrpcService, GrpcServiceKind, MessageLimits};
use berth_proto::containerd::services::introspection::v1::introspection_server::{
    Introspection, IntrospectionServer,
};
use berth_proto::containerd::services::introspection::v1::{
    Plugin, PluginInfoRequest, PluginInfoResponse, PluginsRequest, PluginsResponse, ServerResponse,
};
use berth_proto::containerd::types::Platform;
use berth_proto::google::rpc::Status as RpcStatus;

/// The phrase `ctr plugins ls` looks for in an init error to print `skip` rather than `error`.
const SKIP_PLUGIN: &str = "skip plugin";

/// The introspection service.
#[derive(Clone)]
pub struct IntrospectionService {
    plugins: Arc<PluginSet>,
    uuid: String,
}

impl IntrospectionService {
    /// A service over `plugins` reporting the server `uuid`.
    pub fn new(plugins: Arc<PluginSet>, uuid: String) -> Self {
        IntrospectionService { plugins, uuid }
    }

    fn listed(&self) -> Vec<Plugin> {
        self.plugins.infos().iter().map(to_wire).collect()
    }
}

fn platform(text: &str) -> Platform {
    let mut parts = text.splitn(3, '/');
    Platform {
        os: parts.next().unwrap_or_default().to_owned(),
        architecture: parts.next().unwrap_or_default().to_owned(),
        variant: parts.next().unwrap_or_default().to_owned(),
        ..Platform::default()
    }
}

fn to_wire(info: &PluginInfo) -> Plugin {
    let init_err = match &info.status {
        PluginStatus::Ready => None,
        PluginStatus::Skipped(reason) => Some(RpcStatus {
            code: tonic::Code::Unknown as i32,
            message: format!("{reason}: {SKIP_PLUGIN}"),
            details: Vec::new(),
        }),
        PluginStatus::Failed(err) => Some(RpcStatus {
            code: berth_core::error::Classify::kind(err).code() as i32,
            message: err.to_string(),
            details: Vec::new(),
        }),
    };
    Plugin {
        r#type: info.plugin_type.to_string(),
        id: info.id.clone(),
        requires: info.requires.iter().map(PluginType::to_string).collect(),
        platforms: info.meta.platforms.iter().map(|p| platform(p)).collect(),
        exports: info.meta.exports.clone().into_iter().collect(),
        capabilities: info.meta.capabilities.clone(),
        init_err,
    }
}

/// The fields a plugin filter can name: `type`, `id`, `capabilities`, `requires`, `platforms`
/// (the last three match when any element equals the value, joined by ',' for regexes).
fn plugin_field(plugin: &Plugin, path: &[String]) -> Option<String> {
    let joined = |v: &[String]| (!v.is_empty()).then(|| v.join(","));
    match path.first().map(String::as_str)? {
        "type" => Some(plugin.r#type.clone()),
        "id" => Some(plugin.id.clone()),
        "capabilities" => joined(&plugin.capabilities),
        "requires" => joined(&plugin.requires),
        "platforms" => {
            let p: Vec<String> = plugin
                .platforms
                .iter()
                .map(|p| {
                    [p.os.as_str(), p.architecture.as_str(), p.variant.as_str()]
                        .iter()
                        .filter(|s| !s.is_empty())
                        .copied()
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .collect();
            joined(&p)
        }
        "exports" => {
            let key = path[1..].join(".");
            plugin.exports.get(&key).cloned()
        }
        _ => None,
    }
}

fn pid_namespace_inode() -> u64 {
    std::fs::metadata("/proc/self/ns/pid")
        .map(|m| m.ino())
        .unwrap_or(0)
}

#[tonic::async_trait]
impl Introspection for IntrospectionService {
    async fn plugins(
        &self,
        request: tonic::Request<PluginsRequest>,
    ) -> Result<tonic::Response<PluginsResponse>, tonic::Status> {
        let filter = Filter::parse_all(&request.get_ref().filters)?;
        let plugins = self
            .listed()
            .into_iter()
            .filter(|p| filter.matches(&|path: &[String]| plugin_field(p, path)))
            .collect();
        Ok(tonic::Response::new(PluginsResponse { plugins }))
    }

    async fn server(
        &self,
        _request: tonic::Request<()>,
    ) -> Result<tonic::Response<ServerResponse>, tonic::Status> {
        Ok(tonic::Response::new(ServerResponse {
            uuid: self.uuid.clone(),
            pid: u64::from(std::process::id()),
            pidns: pid_namespace_inode(),
            deprecations: Vec::new(),
        }))
    }

    async fn plugin_info(
        &self,
        request: tonic::Request<PluginInfoRequest>,
    ) -> Result<tonic::Response<PluginInfoResponse>, tonic::Status> {
        let req = request.get_ref();
        let plugin = self
            .listed()
            .into_iter()
            .find(|p| p.r#type == req.r#type && p.id == req.id)
            .ok_or_else(|| Error::not_found(format!("plugin {}.{}", req.r#type, req.id)))?;
        if req.options.is_some() {
            // No berth plugin answers info requests with options yet.
            return Err(Error::not_implemented(format!(
                "plugin {}.{} takes no info options",
                req.r#type, req.id
            ))
            .into());
        }
        Ok(tonic::Response::new(PluginInfoResponse {
            plugin: Some(plugin),
            extra: None,
        }))
    }
}

impl GrpcService for IntrospectionService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(
            IntrospectionServer::new(self.clone()),
            limits
        ));
    }
}

/// Reads the server uuid from `dir/uuid`, creating it (atomically) on first start.
pub fn load_or_create_uuid(dir: &Path) -> Result<String> {
    let path: PathBuf = dir.join("uuid");
    match std::fs::read_to_string(&path) {
        Ok(text) if uuid::Uuid::parse_str(text.trim()).is_ok() => {
            return Ok(text.trim().to_owned());
        }
        Ok(_) => {
            tracing::warn!(path = %path.display(), "server uuid file is corrupt; writing a new one")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::internal(format!("read {}: {e}", path.display())));
        }
    }
    let io =
        |what: &str, e: std::io::Error| Error::internal(format!("{what} {}: {e}", path.display()));
    std::fs::create_dir_all(dir).map_err(|e| io("create directory for", e))?;
    let id = uuid::Uuid::new_v4().to_string();
    let tmp = dir.join("uuid.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
        f.write_all(id.as_bytes()).map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("sync", e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| io("rename into", e))?;
    Ok(id)
}

/// `io.containerd.grpc.v1.introspection`.
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "introspection", |ctx| async move {
        let root = ctx.root().to_owned();
        let uuid = tokio::task::spawn_blocking(move || load_or_create_uuid(&root))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("uuid task: {e}")))??;
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(
            IntrospectionService::new(ctx.plugin_set(), uuid),
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::registry::PluginMeta;

    fn info(status: PluginStatus) -> PluginInfo {
        PluginInfo {
            plugin_type: PluginType::SNAPSHOTTER,
            id: "native".into(),
            requires: vec![PluginType::METADATA],
            meta: PluginMeta {
                platforms: vec!["linux/arm64/v8".into()],
                exports: [("root".to_owned(), "/r".to_owned())].into(),
                capabilities: vec!["rebase".into()],
            },
            status,
        }
    }

    #[test]
    fn skipped_plugins_carry_the_phrase_ctr_looks_for() {
        let p = to_wire(&info(PluginStatus::Skipped("no erofs".into())));
        let err = p.init_err.expect("init_err");
        assert!(err.message.contains("skip plugin"), "{}", err.message);
        let p = to_wire(&info(PluginStatus::Failed(Error::internal("boom"))));
        let err = p.init_err.expect("init_err");
        assert!(!err.message.contains("skip plugin"));
        assert_eq!(err.code, tonic::Code::Internal as i32);
        assert!(to_wire(&info(PluginStatus::Ready)).init_err.is_none());
    }

    #[test]
    fn plugin_fields_for_filters() {
        let p = to_wire(&info(PluginStatus::Ready));
        assert_eq!(p.platforms[0].variant, "v8");
        let filter = |f: &str| {
            Filter::parse_all(&[f])
                .expect("filter")
                .matches(&|path: &[String]| plugin_field(&p, path))
        };
        assert!(filter("type==io.containerd.snapshotter.v1"));
        assert!(filter("id==native,capabilities==rebase"));
        assert!(filter("platforms==linux/arm64/v8"));
        assert!(filter("exports.root==\"/r\""));
        assert!(!filter("type==io.containerd.grpc.v1"));
    }

    #[test]
    fn the_uuid_is_created_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create_uuid(&dir.path().join("p")).expect("create");
        let b = load_or_create_uuid(&dir.path().join("p")).expect("read");
        assert_eq!(a, b);
        let c = load_or_create_uuid(&dir.path().join("q")).expect("other root");
        assert_ne!(a, c);
    }
}
