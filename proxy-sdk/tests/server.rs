//! `proxy_sdk::Server` on a real unix socket: it refuses a live socket and replaces a stale
//! one, answers the gRPC health check, gives the implementation its caller's credentials,
//! names an unreachable proxy in the client's Unavailable errors, and removes its socket when
//! it stops.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_core::testing::MemorySnapshotter;
use berth_proxy_sdk::error::Classify;
use berth_proxy_sdk::serve::{ServeError, Shutdown, SocketState, probe};
use berth_proxy_sdk::snapshots::SnapshotsClient;
use berth_proxy_sdk::{
    CallContext, ErrorKind, Filter, Labels, Mount, PeerCredentials, Result, Server, SnapshotInfo,
    Snapshotter, Usage, connect, peer_credentials,
};
use tokio::task::JoinHandle;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A snapshotter that records who called `stat`, and otherwise is a memory snapshotter.
#[derive(Clone, Default)]
struct Recording {
    inner: MemorySnapshotter,
    seen: Arc<Mutex<Vec<Option<PeerCredentials>>>>,
}

#[berth_proxy_sdk::async_trait]
impl Snapshotter for Recording {
    async fn stat(&self, cx: &CallContext, key: &str) -> Result<SnapshotInfo> {
        self.seen.lock().expect("lock").push(peer_credentials());
        self.inner.stat(cx, key).await
    }
    async fn update(
        &self,
        cx: &CallContext,
        info: SnapshotInfo,
        paths: &[String],
    ) -> Result<SnapshotInfo> {
        self.inner.update(cx, info, paths).await
    }
    async fn usage(&self, cx: &CallContext, key: &str) -> Result<Usage> {
        self.inner.usage(cx, key).await
    }
    async fn mounts(&self, cx: &CallContext, key: &str) -> Result<Vec<Mount>> {
        self.inner.mounts(cx, key).await
    }
    async fn prepare(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        self.inner.prepare(cx, key, parent, labels).await
    }
    async fn view(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        self.inner.view(cx, key, parent, labels).await
    }
    async fn commit(&self, cx: &CallContext, name: &str, key: &str, labels: Labels) -> Result<()> {
        self.inner.commit(cx, name, key, labels).await
    }
    async fn remove(&self, cx: &CallContext, key: &str) -> Result<()> {
        self.inner.remove(cx, key).await
    }
    async fn list(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<SnapshotInfo>> {
        self.inner.list(cx, filter).await
    }
}

/// Serves `sn` on `socket` until `shutdown`; waits until the socket answers.
async fn serve(
    sn: Recording,
    socket: &Path,
    shutdown: &Shutdown,
) -> JoinHandle<std::result::Result<(), ServeError>> {
    let server = Server::new()
        .snapshotter(sn)
        .handle_signals(false)
        .drain(Duration::from_secs(1))
        .shutdown_on(shutdown.clone());
    let path: PathBuf = socket.to_owned();
    let task = tokio::spawn(async move { server.serve_unix(&path).await });
    for _ in 0..250 {
        if probe(socket).await.ok() == Some(SocketState::Live) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_health_peer_credentials_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sn.sock");
    // A stale socket file (nobody listens) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    assert_eq!(probe(&socket).await.expect("probe"), SocketState::Stale);

    let sn = Recording::default();
    let shutdown = Shutdown::new();
    let task = serve(sn.clone(), &socket, &shutdown).await;

    // A second server on the same live socket is refused, and the first keeps serving.
    let second = Server::new()
        .snapshotter(Recording::default())
        .handle_signals(false)
        .serve_unix(&socket)
        .await;
    assert!(
        matches!(second, Err(ServeError::InUse { .. })),
        "{second:?}"
    );

    let channel = connect(&socket);
    let health = HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    let client = SnapshotsClient::new(channel, "whatever-the-daemon-calls-it");
    let cx = CallContext::default();
    client
        .prepare(&cx, "k", None, Labels::new())
        .await
        .expect("prepare");
    client.stat(&cx, "k").await.expect("stat");
    let seen = sn.seen.lock().expect("lock").clone();
    let me = PeerCredentials {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        pid: Some(i32::try_from(std::process::id()).expect("pid")),
    };
    assert_eq!(seen, [Some(me)], "the implementation saw its caller");
    // Outside a served call there is no caller.
    assert_eq!(peer_credentials(), None);

    shutdown.trigger();
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops within the drain time")
        .expect("join");
    assert!(result.is_ok(), "{result:?}");
    assert!(!socket.exists(), "the socket file is removed at the end");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_server_is_unavailable_at_once_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("gone.sock");
    let client = SnapshotsClient::new(connect(&socket), "sn")
        .described_as(format!("proxy plugin sn at {}", socket.display()));
    let cx = CallContext::default();
    let started = std::time::Instant::now();
    let err = client.stat(&cx, "k").await.expect_err("nobody serves");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.message()
            .contains(&format!("proxy plugin sn at {}", socket.display())),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // The same client reaches a server started later on that socket.
    let shutdown = Shutdown::new();
    let task = serve(Recording::default(), &socket, &shutdown).await;
    client
        .prepare(&cx, "k", None, Labels::new())
        .await
        .expect("prepare once the server runs");
    shutdown.trigger();
    let _ = task.await;
}
