//! `grpc.health.v1.Health`: SERVING while the daemon serves.

use std::sync::Arc;

use berth_core::registry::{Instance, PluginType, Registration};
use berth_core::serve::{GrpcService, GrpcServiceKind, MessageLimits};

/// The standard gRPC health service; the overall status (service "") is SERVING.
pub struct HealthService {
    server: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    // Kept so the status stays set for the daemon's lifetime.
    _reporter: tonic_health::server::HealthReporter,
}

impl GrpcService for HealthService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(self.server.clone(), limits));
    }
}

/// `io.containerd.grpc.v1.healthcheck`.
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "healthcheck", |_ctx| async {
        let reporter = tonic_health::server::HealthReporter::new();
        let server = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(HealthService {
            server,
            _reporter: reporter,
        })))
    })
}
