//! Who is calling: the peer credentials of the unix socket connection a call came on.
//!
//! The plugin traits take a [`CallContext`](berth_core::content::CallContext) of namespace and
//! lease only, the same for compiled-in and proxy plugins; the caller's credentials are a
//! proxy's own concern, so [`Server`](crate::Server) keeps them in a task-local for the
//! duration of each call instead, read with [`peer_credentials`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::UdsConnectInfo;

/// The caller's process credentials (`SO_PEERCRED`), as the kernel recorded them when it
/// connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// The caller's effective user id.
    pub uid: u32,
    /// The caller's effective group id.
    pub gid: u32,
    /// The caller's process id, when the kernel reports it.
    pub pid: Option<i32>,
}

tokio::task_local! {
    static PEER: Option<PeerCredentials>;
}

/// The credentials of the process whose call is being served, inside an implementation's
/// trait method served by [`Server`](crate::Server).
///
/// `None` outside a served call (e.g. in-process use, or in a task the implementation
/// spawned: task-locals do not follow `tokio::spawn`), or when the kernel did not report them.
pub fn peer_credentials() -> Option<PeerCredentials> {
    PEER.try_with(|peer| *peer).ok().flatten()
}

/// Runs `future` with `peer` as the current call's credentials (the server does this for
/// every call; tests of an implementation can too).
pub async fn with_peer_credentials<F: Future>(
    peer: Option<PeerCredentials>,
    future: F,
) -> F::Output {
    PEER.scope(peer, future).await
}

/// The layer that scopes every request's handling with its connection's credentials.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PeerLayer;

impl<S> tower::Layer<S> for PeerLayer {
    type Service = PeerScoped<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerScoped { inner }
    }
}

/// A service whose calls run with their connection's peer credentials in scope.
#[derive(Debug, Clone)]
pub(crate) struct PeerScoped<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for PeerScoped<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let peer = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| PeerCredentials {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            });
        Box::pin(PEER.scope(peer, self.inner.call(request)))
    }
}
