//! The snapshotter conformance suite against the example snapshotter, in-process and through
//! the socket adapters (served by `proxy_sdk::Server`, reached through `SnapshotsClient`):
//! the first two of the three ways issue 6 asks for (the third, as a `[proxy_plugins]` entry
//! of berthd, is in `integration/tests/proxy_snapshotter.rs`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_example_snapshotter::CopySnapshotter;
use berth_proxy_sdk::conformance::snapshotter::{
    self, Capabilities, Fixture, MOUNTING_CASES, SnapshotterFactory, mount::cannot_mount,
};
use berth_proxy_sdk::serve::{Shutdown, SocketState};
use berth_proxy_sdk::snapshots::SnapshotsClient;
use berth_proxy_sdk::{CallContext, Error, Result, Server, Snapshotter};

fn mountable() -> bool {
    match cannot_mount() {
        Some(why) => {
            eprintln!("SKIP: mounting cases will be skipped: {why}");
            false
        }
        None => true,
    }
}

fn capabilities(mountable: bool, reopen: bool) -> Capabilities {
    Capabilities {
        mountable,
        // A copying snapshotter: a child's usage counts its parent's files too.
        usage_counts_only_changes: false,
        overlay_upper: false,
        requires_namespace: false,
        reopen,
    }
}

fn temp_dir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| Error::internal(format!("temp dir: {e}")))
}

/// The snapshotter called directly.
struct InProcess {
    mountable: bool,
}

#[async_trait::async_trait]
impl SnapshotterFactory for InProcess {
    type Guard = tempfile::TempDir;

    fn capabilities(&self) -> Capabilities {
        capabilities(self.mountable, true)
    }

    async fn create(&self) -> Result<Fixture<Self::Guard>> {
        let dir = temp_dir()?;
        let sn = CopySnapshotter::open(&dir.path().join("root")).await?;
        Ok(Fixture::new(Arc::new(sn), CallContext::default(), dir))
    }

    async fn reopen(&self, dir: Self::Guard) -> Result<Fixture<Self::Guard>> {
        let sn = CopySnapshotter::open(&dir.path().join("root")).await?;
        Ok(Fixture::new(Arc::new(sn), CallContext::default(), dir))
    }
}

/// A served snapshotter and its data: stops serving when dropped.
struct Serving {
    stop: StopOnDrop,
    dir: tempfile::TempDir,
}

struct StopOnDrop(Shutdown);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

/// Serves the snapshotter under `dir` on `dir/sn.sock`, as the binary does.
async fn serve(dir: tempfile::TempDir) -> Result<(Arc<dyn Snapshotter>, Serving)> {
    let sn = CopySnapshotter::open(&dir.path().join("root")).await?;
    let socket: PathBuf = dir.path().join("sn.sock");
    let shutdown = Shutdown::new();
    let server = Server::new()
        .snapshotter(sn)
        .handle_signals(false)
        .drain(Duration::from_secs(1))
        .shutdown_on(shutdown.clone());
    let served_socket = socket.clone();
    tokio::spawn(async move {
        if let Err(e) = server.serve_unix(&served_socket).await {
            eprintln!("example snapshotter server failed: {e}");
        }
    });
    // Calls made before the server binds would fail with Unavailable: wait for it.
    for _ in 0..250 {
        if berth_proxy_sdk::serve::probe(&socket).await.ok() == Some(SocketState::Live) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The name is the daemon's choice; the example serves whatever name a request carries.
    let client = SnapshotsClient::new(berth_proxy_sdk::connect(&socket), "example");
    Ok((
        Arc::new(client),
        Serving {
            stop: StopOnDrop(shutdown),
            dir,
        },
    ))
}

/// The snapshotter behind the socket adapters.
struct OverSocket {
    mountable: bool,
}

#[async_trait::async_trait]
impl SnapshotterFactory for OverSocket {
    type Guard = Serving;

    fn capabilities(&self) -> Capabilities {
        capabilities(self.mountable, true)
    }

    async fn create(&self) -> Result<Fixture<Self::Guard>> {
        let (sn, serving) = serve(temp_dir()?).await?;
        Ok(Fixture::new(sn, CallContext::default(), serving))
    }

    async fn reopen(&self, serving: Self::Guard) -> Result<Fixture<Self::Guard>> {
        // A restarted proxy: the old server stops (its socket goes), a new one opens the
        // same root on the same socket path.
        let Serving { stop, dir } = serving;
        drop(stop);
        let socket = dir.path().join("sn.sock");
        for _ in 0..100 {
            if !socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (sn, serving) = serve(dir).await?;
        Ok(Fixture::new(sn, CallContext::default(), serving))
    }
}

/// Names of failed cases; as root, a skipped mounting case counts as failed (it would hide
/// a failure).
async fn failed_cases<F: SnapshotterFactory>(label: &str, factory: F) -> BTreeSet<&'static str> {
    let caps = factory.capabilities();
    match snapshotter::run(factory).await {
        Ok(report) => {
            let mut failed = BTreeSet::new();
            for (case, why) in &report.skipped {
                eprintln!("{label}: skipped {case}: {why}");
                // overlay_whiteouts_on_disk is for overlay snapshotters only.
                let by_capability = *case == "overlay_whiteouts_on_disk";
                if caps.mountable && MOUNTING_CASES.contains(case) && !by_capability {
                    failed.insert(*case);
                }
            }
            assert_eq!(
                report.passed.len() + report.skipped.len(),
                snapshotter::CASES.len()
            );
            failed
        }
        Err(failure) => {
            eprintln!("{label}: {failure}");
            failure.failures.iter().map(|f| f.case).collect()
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn in_process_passes_the_suite() {
    let failed = failed_cases(
        "example in-process",
        InProcess {
            mountable: mountable(),
        },
    )
    .await;
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn through_the_socket_adapters_passes_the_suite() {
    let failed = failed_cases(
        "example over a socket",
        OverSocket {
            mountable: mountable(),
        },
    )
    .await;
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}
