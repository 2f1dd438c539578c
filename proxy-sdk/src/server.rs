//! [`Server`]: serves plugin implementations on a unix socket, as a proxy plugin.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_core::content::ContentStore;
use berth_core::diff::Differ;
use berth_core::serve::{self, GrpcService, MessageLimits, ServeError, Shutdown};
use berth_core::snapshot::Snapshotter;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use crate::content::ContentService;
use crate::diff::DiffService;
use crate::peer::PeerLayer;
use crate::snapshots::SnapshotsService;

/// containerd's message limits (16 MiB each way), which its proxy clients use too.
const LIMITS: MessageLimits = MessageLimits {
    max_recv: 16 << 20,
    max_send: 16 << 20,
};

enum Snapshotters {
    None,
    /// One snapshotter for every request, whatever name it carries.
    Only(Arc<dyn Snapshotter>),
    /// Several, picked by the request's `snapshotter` field.
    Named(BTreeMap<String, Arc<dyn Snapshotter>>),
}

/// Serves plugin implementations on a unix socket: the builder a proxy plugin's `main` uses.
///
/// [`serve_unix`](Server::serve_unix) binds the socket (refusing one another process answers
/// on, replacing a stale one, creating the parent directory), serves the configured services
/// plus the standard gRPC health service (`grpc.health.v1.Health`, SERVING), and returns
/// `Ok(())` after SIGTERM, SIGINT or [`shutdown_on`](Server::shutdown_on), once in-flight
/// calls finished (or the drain time ran out); the socket file is removed then.
///
/// Every call runs with its caller's [`PeerCredentials`](crate::PeerCredentials) available
/// through [`peer_credentials`](crate::peer_credentials).
pub struct Server {
    snapshotters: Snapshotters,
    content: Option<Arc<dyn ContentStore>>,
    services: Vec<Arc<dyn GrpcService>>,
    mode: u32,
    drain: Duration,
    signals: bool,
    shutdown: Shutdown,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            snapshotters: Snapshotters::None,
            content: None,
            services: Vec::new(),
            mode: 0o660,
            drain: Duration::from_secs(10),
            signals: true,
            shutdown: Shutdown::new(),
        }
    }
}

impl Server {
    /// A server with nothing to serve yet but health.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `snapshotter` as `containerd.services.snapshots.v1.Snapshots`, for whatever
    /// snapshotter name a request carries (the name is the daemon's configuration, not the
    /// proxy's, as in containerd's `contrib/snapshotservice`). Replaces snapshotters given
    /// before.
    pub fn snapshotter(self, snapshotter: impl Snapshotter + 'static) -> Self {
        self.shared_snapshotter(Arc::new(snapshotter))
    }

    /// [`snapshotter`](Server::snapshotter) for an implementation already shared.
    pub fn shared_snapshotter(mut self, snapshotter: Arc<dyn Snapshotter>) -> Self {
        self.snapshotters = Snapshotters::Only(snapshotter);
        self
    }

    /// Serves `snapshotter` under `name` only: with several named snapshotters, one socket can
    /// back several `[proxy_plugins]` entries. Replaces a snapshotter given with
    /// [`snapshotter`](Server::snapshotter).
    pub fn named_snapshotter(
        mut self,
        name: impl Into<String>,
        snapshotter: impl Snapshotter + 'static,
    ) -> Self {
        let mut named = match self.snapshotters {
            Snapshotters::Named(named) => named,
            _ => BTreeMap::new(),
        };
        named.insert(name.into(), Arc::new(snapshotter));
        self.snapshotters = Snapshotters::Named(named);
        self
    }

    /// Serves `store` as `containerd.services.content.v1.Content`.
    pub fn content(self, store: impl ContentStore + 'static) -> Self {
        self.shared_content(Arc::new(store))
    }

    /// [`content`](Server::content) for a store already shared.
    pub fn shared_content(mut self, store: Arc<dyn ContentStore>) -> Self {
        self.content = Some(store);
        self
    }

    /// Serves `differ` as `containerd.services.diff.v1.Diff`.
    pub fn differ(self, differ: impl Differ + 'static) -> Self {
        self.service(DiffService::new(Arc::new(differ)))
    }

    /// Serves any other gRPC service (e.g. a differ's `containerd.services.diff.v1.Diff`).
    pub fn service(mut self, service: impl GrpcService + 'static) -> Self {
        self.services.push(Arc::new(service));
        self
    }

    /// The socket file's mode (default 0660; the owner is the process's user and group).
    pub fn socket_mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    /// How long in-flight calls may run after shutdown was requested (default 10 s).
    pub fn drain(mut self, drain: Duration) -> Self {
        self.drain = drain;
        self
    }

    /// Stops serving when `shutdown` is triggered too (tests, or a vendor's own reasons).
    pub fn shutdown_on(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Whether SIGTERM and SIGINT stop the server (default yes; turn off when the process
    /// handles signals itself, or serves from a test).
    pub fn handle_signals(mut self, handle: bool) -> Self {
        self.signals = handle;
        self
    }

    /// Serves on the unix socket `path` until shutdown; see [`Server`].
    pub async fn serve_unix(self, path: impl AsRef<Path>) -> Result<(), ServeError> {
        let path = path.as_ref();
        let listener = serve::bind(
            path,
            self.mode,
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
        .await?;
        if self.signals {
            watch_signals(self.shutdown.clone(), path)?;
        }
        let mut routes = tonic::service::RoutesBuilder::default();
        match self.snapshotters {
            Snapshotters::None => {}
            Snapshotters::Only(sn) => SnapshotsService::only(sn).add_to(&mut routes, LIMITS),
            Snapshotters::Named(named) => SnapshotsService::new(named).add_to(&mut routes, LIMITS),
        }
        if let Some(store) = self.content {
            ContentService::new(store).add_to(&mut routes, LIMITS);
        }
        for service in &self.services {
            service.add_to(&mut routes, LIMITS);
        }
        let (reporter, health) = tonic_health::server::health_reporter();
        routes.add_service(health);
        tracing::info!(socket = %path.display(), "serving");
        let result = run(routes.routes(), listener, self.shutdown, self.drain).await;
        drop(reporter);
        if let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(socket = %path.display(), "cannot remove socket: {e}");
        }
        match result {
            Ok(()) | Err(ServeError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn watch_signals(shutdown: Shutdown, path: &Path) -> Result<(), ServeError> {
    let io = |source| ServeError::Io {
        what: "install a signal handler to serve",
        path: path.to_owned(),
        source,
    };
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            () = shutdown.triggered() => return,
        };
        // Trigger before logging: a log write can fail (stderr a closed pipe) and must not
        // keep the process from stopping.
        shutdown.trigger();
        tracing::info!("{name} received; shutting down");
    });
    Ok(())
}

/// `berth_core::serve::serve` with the peer-credentials layer: serves until `shutdown`, then
/// drains for at most `drain`.
async fn run(
    routes: tonic::service::Routes,
    listener: tokio::net::UnixListener,
    shutdown: Shutdown,
    drain: Duration,
) -> Result<(), ServeError> {
    if shutdown.is_triggered() {
        return Err(ServeError::Closed);
    }
    let server = tonic::transport::Server::builder()
        .layer(PeerLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), {
            let shutdown = shutdown.clone();
            async move { shutdown.triggered().await }
        });
    let deadline = async {
        shutdown.triggered().await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        result = server => result.map_err(|e| ServeError::Transport(e.to_string())),
        () = deadline => {
            tracing::warn!(?drain, "in-flight calls did not finish in time; closing");
            Ok(())
        }
    }
}
