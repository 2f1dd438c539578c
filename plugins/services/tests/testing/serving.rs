//! gRPC services served on a unix socket in a temporary directory, as berthd serves them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_core::content::ContentStore;
use berth_core::serve::{GrpcService, MessageLimits, ServeOptions, Shutdown, serve};
use berth_services::content::ContentService;
use tonic::transport::{Channel, Endpoint};

/// containerd's limits, as berthd configures them.
pub const LIMITS: MessageLimits = MessageLimits {
    max_recv: 16 << 20,
    max_send: 16 << 20,
};

/// The running server; it shuts down (and its socket directory goes) when dropped.
pub struct Served {
    dir: tempfile::TempDir,
    shutdown: Shutdown,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

impl Served {
    /// Serves `store` with `ContentService`.
    pub fn start(store: Arc<dyn ContentStore>) -> Served {
        Served::services(&[&ContentService::new(store)])
    }

    /// Serves `services`, each through its own `GrpcService::add_to`, as berthd does.
    pub fn services(services: &[&dyn GrpcService]) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut routes = tonic::service::RoutesBuilder::default();
        for service in services {
            service.add_to(&mut routes, LIMITS);
        }
        let listener = tokio::net::UnixListener::bind(dir.path().join("berth.sock")).expect("bind");
        let shutdown = Shutdown::new();
        tokio::spawn(serve(
            routes.routes(),
            listener,
            shutdown.clone(),
            ServeOptions {
                drain: Duration::from_secs(1),
            },
        ));
        Served { dir, shutdown }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("berth.sock")
    }

    /// A new connection to the server.
    pub async fn channel(&self) -> Channel {
        let socket = self.socket();
        Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .expect("connect")
    }
}
