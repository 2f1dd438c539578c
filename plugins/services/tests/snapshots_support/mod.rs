//! Shared by the snapshots tests: a `SnapshotsService` on a unix socket, and the snapshotter
//! fixtures (native and overlay, bare or behind the core's metadata wrapper).

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_core::content::CallContext;
use berth_core::events::Exchange;
use berth_core::metadata::{MetaStore, Metadata, MetadataConfig};
use berth_core::namespace::Namespace;
use berth_core::serve::{GrpcService, MessageLimits, ServeOptions, Shutdown, serve};
use berth_core::snapshot::Snapshotter;
use berth_services::snapshots::SnapshotsService;
use tonic::transport::{Channel, Endpoint};

/// containerd's limits, as berthd configures them.
pub const LIMITS: MessageLimits = MessageLimits {
    max_recv: 16 << 20,
    max_send: 16 << 20,
};

/// A running server; it shuts down (and its socket directory goes) when dropped.
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
    /// Serves `service` through its own `GrpcService::add_to`, as berthd does.
    pub fn start(service: SnapshotsService) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut routes = tonic::service::RoutesBuilder::default();
        service.add_to(&mut routes, LIMITS);
        let listener =
            tokio::net::UnixListener::bind(dir.path().join("snapshots.sock")).expect("bind");
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
        self.dir.path().join("snapshots.sock")
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

/// Which backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `native`.
    Native,
    /// `overlayfs`.
    Overlay,
}

impl Backend {
    /// Its plugin id.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Native => "native",
            Backend::Overlay => "overlayfs",
        }
    }

    /// A snapshotter of this kind rooted at `root`, opened.
    pub async fn open(self, root: &Path) -> berth_core::Result<Arc<dyn Snapshotter>> {
        Ok(match self {
            Backend::Native => {
                let sn = berth_snapshot_native::native(root);
                sn.open().await?;
                Arc::new(sn)
            }
            Backend::Overlay => {
                let options = berth_snapshot_overlay::host_mount_options(root, &[]);
                let sn = berth_snapshot_overlay::overlay(root, false, false, options);
                sn.open().await?;
                Arc::new(sn)
            }
        })
    }

    /// Whether mounts of this backend work here; prints why not (the suite then reports
    /// its mounting cases as skipped).
    pub fn mountable(self) -> bool {
        if let Some(why) = berth_proxy_sdk::conformance::snapshotter::mount::cannot_mount() {
            eprintln!("{}: mounting cases will be SKIPPED: {why}", self.name());
            return false;
        }
        if self == Backend::Overlay {
            let probe = tempfile::tempdir().expect("tempdir");
            if let Err(why) = berth_snapshot_overlay::check_support(probe.path()) {
                eprintln!("overlayfs: mounting cases will be SKIPPED: {why}");
                return false;
            }
        }
        true
    }
}

/// A call context in namespace `name`.
pub fn namespaced(name: &str) -> CallContext {
    CallContext {
        namespace: Some(Namespace::parse(name).expect("namespace")),
        lease: None,
    }
}

/// The metadata layer over `backend` (named by its plugin id), with its records in `dir`.
pub fn metadata_over(
    dir: &Path,
    backend: Backend,
    sn: Arc<dyn Snapshotter>,
) -> berth_core::Result<Arc<Metadata>> {
    let config = MetadataConfig::default();
    let records = MetaStore::open(&dir.join("meta"), &config)?;
    let snapshotters: BTreeMap<String, Arc<dyn Snapshotter>> =
        [(backend.name().to_owned(), sn)].into();
    Ok(Metadata::with_snapshotters(
        Arc::new(records),
        Arc::new(Exchange::default()),
        None,
        snapshotters,
        config,
    ))
}
