//! `containerd.services.version.v1.Version`: berth's version and build revision.

use std::sync::Arc;

use berth_core::registry::{Instance, PluginType, Registration};
use berth_core::serve::{GrpcService, GrpcServiceKind, MessageLimits};
use berth_proto::containerd::services::version::v1::VersionResponse;
use berth_proto::containerd::services::version::v1::version_server::{Version, VersionServer};

/// The version service.
#[derive(Debug, Clone, Copy, Default)]
pub struct VersionService;

#[tonic::async_trait]
impl Version for VersionService {
    async fn version(
        &self,
        _request: tonic::Request<()>,
    ) -> Result<tonic::Response<VersionResponse>, tonic::Status> {
        Ok(tonic::Response::new(VersionResponse {
            version: crate::VERSION.to_owned(),
            revision: crate::REVISION.to_owned(),
        }))
    }
}

impl GrpcService for VersionService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(VersionServer::new(*self), limits));
    }
}

/// `io.containerd.grpc.v1.version`.
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "version", |_ctx| async {
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(VersionService)))
    })
}
