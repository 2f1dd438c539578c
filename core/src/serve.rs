//! Serving gRPC on a unix socket: owning the socket file and shutting down cleanly.
//!
//! Shared by berthd and by proxy plugins built with proxy-sdk. A socket file is only replaced
//! when nothing answers on it (a live daemon is never cut off), and a server shut down before
//! or while it starts returns [`ServeError::Closed`] at once instead of hanging (the race fixed
//! in containerd's ttrpc PR 175).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;

use crate::error::{Classify, ErrorKind};
use crate::registry::{PluginKind, PluginType};

/// Message size limits applied to every service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimits {
    /// Largest request accepted.
    pub max_recv: usize,
    /// Largest response sent.
    pub max_send: usize,
}

/// A gRPC service plugin (`io.containerd.grpc.v1.<id>`): adds itself to the server's routes.
pub trait GrpcService: Send + Sync {
    /// Adds the service (with the given message limits) to `routes`.
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits);
}

/// Typed lookup of gRPC service plugins.
pub struct GrpcServiceKind;
impl PluginKind for GrpcServiceKind {
    const TYPE: PluginType = PluginType::GRPC;
    type Object = dyn GrpcService;
}

/// Why serving failed or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The server was shut down (before it started, or while it ran).
    #[error("server closed")]
    Closed,
    /// Another process answers on the socket.
    #[error(
        "another server is already listening on {path}: stop it first, or set a different \
         [grpc] address"
    )]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// The path exists and is not a socket; it is left alone.
    #[error("{path} exists and is not a socket: remove it or set a different [grpc] address")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A file system or socket operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP/2 transport failed.
    #[error("grpc transport: {0}")]
    Transport(String),
}

impl Classify for ServeError {
    fn kind(&self) -> ErrorKind {
        match self {
            ServeError::Closed => ErrorKind::Canceled,
            ServeError::InUse { .. } | ServeError::NotASocket { .. } => ErrorKind::AlreadyExists,
            ServeError::Io { .. } | ServeError::Transport(_) => ErrorKind::Internal,
        }
    }
}

/// What is at a socket path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketState {
    /// Nothing.
    Absent,
    /// A socket file nobody listens on.
    Stale,
    /// A socket somebody answers on.
    Live,
}

/// Finds out whether `path` is free, a stale socket, or a live one.
pub async fn probe(path: &Path) -> Result<SocketState, ServeError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SocketState::Absent),
        Err(source) => {
            return Err(ServeError::Io {
                what: "inspect",
                path: path.to_owned(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket {
            path: path.to_owned(),
        });
    }
    match tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(path)).await {
        Ok(Ok(_)) => Ok(SocketState::Live),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(SocketState::Stale),
        // A listener whose backlog is full, or one that takes this long, is still alive.
        Err(_) => Ok(SocketState::Live),
        Ok(Err(source)) => Err(ServeError::Io {
            what: "connect to",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Binds a listener at `path`: refuses a live socket, replaces a stale one, creates the parent
/// directory (0711), and sets the socket's mode and owner.
pub async fn bind(path: &Path, mode: u32, uid: u32, gid: u32) -> Result<UnixListener, ServeError> {
    let io = |what: &'static str, source: std::io::Error| ServeError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    match probe(path).await? {
        SocketState::Live => {
            return Err(ServeError::InUse {
                path: path.to_owned(),
            });
        }
        SocketState::Stale => {
            tracing::info!(socket = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(|e| io("remove stale socket", e))?;
        }
        SocketState::Absent => {}
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io("create directory for", e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| io("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io("set mode of", e))?;
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| io("set owner of", std::io::Error::from(e)))?;
    Ok(listener)
}

/// A shutdown request that can be made before, during or after serving.
#[derive(Debug, Clone)]
pub struct Shutdown {
    requested: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            requested: Arc::new(watch::Sender::new(false)),
        }
    }
}

impl Shutdown {
    /// A shutdown not yet requested.
    pub fn new() -> Self {
        Self::default()
    }
    /// Requests shutdown; idempotent.
    pub fn trigger(&self) {
        self.requested.send_replace(true);
    }
    /// Whether shutdown was requested.
    pub fn is_triggered(&self) -> bool {
        *self.requested.borrow()
    }
    /// Waits until shutdown is requested (at once if it already was).
    pub async fn triggered(&self) {
        let mut rx = self.requested.subscribe();
        // The sender lives in self, so wait_for cannot fail with a closed channel.
        let _ = rx.wait_for(|&v| v).await;
    }
}

/// How a server is run.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// After shutdown is requested, how long in-flight calls may run before being cut off.
    pub drain: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            drain: Duration::from_secs(10),
        }
    }
}

/// Serves `routes` on `listener` until `shutdown` is requested, then drains in-flight calls
/// for at most `options.drain`.
///
/// Always ends with an error: [`ServeError::Closed`] after a requested shutdown (also when
/// the request came before serving started, without accepting anything), or the failure.
pub async fn serve(
    routes: tonic::service::Routes,
    listener: UnixListener,
    shutdown: Shutdown,
    options: ServeOptions,
) -> Result<(), ServeError> {
    if shutdown.is_triggered() {
        return Err(ServeError::Closed);
    }
    let incoming = UnixListenerStream::new(listener);
    let server = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, {
            let shutdown = shutdown.clone();
            async move { shutdown.triggered().await }
        });
    let deadline = async {
        shutdown.triggered().await;
        tokio::time::sleep(options.drain).await;
    };
    tokio::select! {
        result = server => match result {
            Ok(()) => Err(ServeError::Closed),
            Err(e) => Err(ServeError::Transport(e.to_string())),
        },
        () = deadline => {
            tracing::warn!(drain = ?options.drain, "in-flight calls did not finish in time; closing");
            Err(ServeError::Closed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_before_serving_returns_closed_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = bind(
            &dir.path().join("s.sock"),
            0o660,
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
        .await
        .expect("bind");
        let shutdown = Shutdown::new();
        shutdown.trigger();
        let result = tokio::time::timeout(
            Duration::from_secs(2),
            serve(
                tonic::service::Routes::default(),
                listener,
                shutdown,
                ServeOptions::default(),
            ),
        )
        .await
        .expect("returns promptly");
        assert!(matches!(result, Err(ServeError::Closed)), "{result:?}");
    }

    #[tokio::test]
    async fn shutdown_racing_serve_start_never_hangs() {
        for delay_us in [0u64, 10, 100, 1000, 5000] {
            let dir = tempfile::tempdir().expect("tempdir");
            let listener = bind(
                &dir.path().join("s.sock"),
                0o660,
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            )
            .await
            .expect("bind");
            let shutdown = Shutdown::new();
            let server = tokio::spawn(serve(
                tonic::service::Routes::default(),
                listener,
                shutdown.clone(),
                ServeOptions::default(),
            ));
            tokio::time::sleep(Duration::from_micros(delay_us)).await;
            shutdown.trigger();
            let result = tokio::time::timeout(Duration::from_secs(2), server)
                .await
                .expect("returns within 2s")
                .expect("join");
            assert!(matches!(result, Err(ServeError::Closed)), "{result:?}");
        }
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let live = bind(&path, 0o660, uid, gid).await.expect("bind");
        assert_eq!(probe(&path).await.expect("probe"), SocketState::Live);
        let err = bind(&path, 0o660, uid, gid).await.expect_err("in use");
        assert!(matches!(err, ServeError::InUse { .. }), "{err}");
        drop(live);
        assert_eq!(probe(&path).await.expect("probe"), SocketState::Stale);
        let _again = bind(&path, 0o660, uid, gid).await.expect("stale replaced");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
    }

    #[tokio::test]
    async fn a_regular_file_is_never_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"keep me").expect("write");
        let err = bind(&path, 0o660, 0, 0).await.expect_err("not a socket");
        assert!(matches!(err, ServeError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).expect("still there"), b"keep me");
    }
}
