//! What the snapshots adapters do beyond the snapshotter contract: dispatch on the
//! `snapshotter` field with containerd's codes, List in batches, Commit's `parent`, the
//! single-snapshotter server of proxy plugins, and the plugin wiring in a registry.

#[path = "snapshots_support/mod.rs"]
mod support;

use std::sync::Arc;

use berth_core::config::Config;
use berth_core::labels::Labels;
use berth_core::registry::{PluginStatus, PluginType, Registry};
use berth_core::serve::{GrpcService, GrpcServiceKind};
use berth_core::snapshot::Snapshotter;
use berth_proto::containerd::services::snapshots::v1 as wire;
use berth_proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient as Raw;
use berth_services::snapshots::{LIST_BATCH, SnapshotsClient, SnapshotsService};
use support::{Backend, Served, metadata_over, namespaced};

fn with_ns<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("containerd-namespace", "test".parse().expect("header"));
    r
}

/// berthd's service over the metadata layer with a native backend, and a raw client.
async fn served() -> (tempfile::TempDir, Served, Raw<tonic::transport::Channel>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Backend::Native
        .open(&dir.path().join("sn"))
        .await
        .expect("open");
    let metadata = metadata_over(dir.path(), Backend::Native, backend).expect("metadata");
    let sn = metadata.snapshotter("native").expect("snapshotter");
    let served = Served::services(&[&SnapshotsService::new([("native".to_owned(), sn)].into())]);
    let raw = Raw::new(served.channel().await);
    (dir, served, raw)
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_unknown_snapshotter_is_invalid_argument() {
    let (_dir, _served, mut raw) = served().await;
    for name in ["", "overlayfs"] {
        let err = raw
            .stat(with_ns(wire::StatSnapshotRequest {
                snapshotter: name.to_owned(),
                key: "k".to_owned(),
            }))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name:?}: {err}");
        let message = if name.is_empty() {
            "snapshotter argument missing"
        } else {
            "snapshotter not loaded: overlayfs"
        };
        assert!(err.message().contains(message), "{err}");
    }
    let err = raw
        .update(with_ns(wire::UpdateSnapshotRequest {
            snapshotter: "native".to_owned(),
            info: None,
            update_mask: None,
        }))
        .await
        .expect_err("no info");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = raw
        .list(with_ns(wire::ListSnapshotsRequest {
            snapshotter: "native".to_owned(),
            filters: vec!["name==".to_owned()],
        }))
        .await
        .expect_err("bad filter");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_streams_batches_of_one_hundred() {
    let (_dir, _served, mut raw) = served().await;
    for i in 0..(2 * LIST_BATCH + 50) {
        raw.view(with_ns(wire::ViewSnapshotRequest {
            snapshotter: "native".to_owned(),
            key: format!("v-{i:03}"),
            parent: String::new(),
            labels: Default::default(),
        }))
        .await
        .expect("view");
    }
    let mut stream = raw
        .list(with_ns(wire::ListSnapshotsRequest {
            snapshotter: "native".to_owned(),
            filters: vec![],
        }))
        .await
        .expect("list")
        .into_inner();
    let mut sizes = Vec::new();
    while let Some(batch) = stream.message().await.expect("batch") {
        assert!(batch.info.iter().all(|i| i.kind == wire::Kind::View as i32));
        sizes.push(batch.info.len());
    }
    assert_eq!(sizes, [LIST_BATCH, LIST_BATCH, 50]);
}

#[tokio::test(flavor = "multi_thread")]
async fn commit_accepts_only_the_parent_a_snapshot_has() {
    let (_dir, _served, mut raw) = served().await;
    let prepare = |key: &str, parent: &str| wire::PrepareSnapshotRequest {
        snapshotter: "native".to_owned(),
        key: key.to_owned(),
        parent: parent.to_owned(),
        labels: Default::default(),
    };
    let commit = |name: &str, key: &str, parent: &str| wire::CommitSnapshotRequest {
        snapshotter: "native".to_owned(),
        name: name.to_owned(),
        key: key.to_owned(),
        labels: Default::default(),
        parent: parent.to_owned(),
    };
    raw.prepare(with_ns(prepare("a", ""))).await.expect("a");
    raw.commit(with_ns(commit("base", "a", "")))
        .await
        .expect("base");
    raw.prepare(with_ns(prepare("b", "base"))).await.expect("b");
    raw.prepare(with_ns(prepare("c", ""))).await.expect("c");
    let err = raw
        .commit(with_ns(commit("c2", "c", "base")))
        .await
        .expect_err("rebase");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
    raw.commit(with_ns(commit("b2", "b", "base")))
        .await
        .expect("same parent");
    let info = raw
        .stat(with_ns(wire::StatSnapshotRequest {
            snapshotter: "native".to_owned(),
            key: "b2".to_owned(),
        }))
        .await
        .expect("stat")
        .into_inner()
        .info
        .expect("info");
    assert_eq!(
        (info.parent.as_str(), info.kind),
        ("base", wire::Kind::Committed as i32)
    );
}

/// A proxy plugin's server answers for its one snapshotter whatever name the daemon uses.
#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_server_ignores_the_snapshotter_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Backend::Native
        .open(&dir.path().join("sn"))
        .await
        .expect("open");
    let served = Served::services(&[&SnapshotsService::only(backend)]);
    let client = SnapshotsClient::new(served.channel().await, "my-proxy");
    assert_eq!(client.name(), "my-proxy");
    let cx = namespaced("any");
    let mounts = client
        .prepare(&cx, "k", None, Labels::new())
        .await
        .expect("prepare");
    assert_eq!(mounts[0].kind, "bind");
    assert_eq!(
        client.mounts(&cx, "k").await.expect("mounts"),
        mounts,
        "mounts survive the wire"
    );
}

/// The plugins wired as berthd wires them: both snapshotters register with their platform and
/// root, the metadata layer wraps them, and the snapshots service serves them by name.
#[tokio::test(flavor = "multi_thread")]
async fn registrations_wire_snapshotters_to_the_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut registry = Registry::new();
    registry
        .register(berth_core::events::registration())
        .expect("events");
    registry
        .register(berth_snapshot_native::registration())
        .expect("native");
    registry
        .register(berth_snapshot_overlay::registration())
        .expect("overlay");
    registry
        .register(berth_core::metadata::registration())
        .expect("metadata");
    registry
        .register(berth_services::snapshots::registration())
        .expect("service");
    let config = Config {
        root: dir.path().join("root"),
        state: dir.path().join("state"),
        ..Config::default()
    };
    let plugins = registry.init(&config).await.expect("init");
    let infos = plugins.infos();
    let native = infos
        .iter()
        .find(|i| i.plugin_type == PluginType::SNAPSHOTTER && i.id == "native")
        .expect("native loaded");
    assert_eq!(native.status, PluginStatus::Ready);
    assert_eq!(
        native.meta.platforms,
        [berth_snapshot_native::host_platform()]
    );
    assert_eq!(
        native.meta.exports["root"],
        dir.path()
            .join("root/io.containerd.snapshotter.v1.native")
            .display()
            .to_string()
    );
    let overlay = infos
        .iter()
        .find(|i| i.plugin_type == PluginType::SNAPSHOTTER && i.id == "overlayfs")
        .expect("overlay registered");
    let overlay_ready = overlay.status == PluginStatus::Ready;
    if !overlay_ready {
        eprintln!("overlayfs did not load here: {:?}", overlay.status);
        assert!(
            matches!(overlay.status, PluginStatus::Skipped(_)),
            "overlayfs must skip, not fail: {:?}",
            overlay.status
        );
    }

    let service: Arc<dyn GrpcService> = plugins
        .get::<GrpcServiceKind>("snapshots")
        .expect("snapshots service");
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket = socket_dir.path().join("s.sock");
    let mut routes = tonic::service::RoutesBuilder::default();
    service.add_to(&mut routes, support::LIMITS);
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    let shutdown = berth_core::serve::Shutdown::new();
    tokio::spawn(berth_core::serve::serve(
        routes.routes(),
        listener,
        shutdown.clone(),
        berth_core::serve::ServeOptions {
            drain: std::time::Duration::from_secs(1),
        },
    ));
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connect");
    let cx = namespaced("default");
    let mut names = vec!["native"];
    if overlay_ready {
        names.push("overlayfs");
    }
    for name in names {
        let client = SnapshotsClient::new(channel.clone(), name);
        client
            .prepare(&cx, "k", None, Labels::new())
            .await
            .unwrap_or_else(|e| panic!("{name}: prepare: {e}"));
        client
            .commit(&cx, "c", "k", Labels::new())
            .await
            .unwrap_or_else(|e| panic!("{name}: commit: {e}"));
        let info = client
            .stat(&cx, "c")
            .await
            .unwrap_or_else(|e| panic!("{name}: stat: {e}"));
        assert_eq!(info.name, "c");
    }
    shutdown.trigger();
}
