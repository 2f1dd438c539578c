//! The snapshotter conformance suite (`berth_proxy_sdk::conformance::snapshotter`) run
//! against native and overlayfs through the gRPC adapters (served by `SnapshotsService`,
//! reached through `SnapshotsClient`), and behind the core's metadata wrapper, called
//! directly and through the adapters (what berthd serves to `ctr`).

#[path = "snapshots_support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use berth_core::content::CallContext;
use berth_core::snapshot::Snapshotter;
use berth_proxy_sdk::conformance::snapshotter::{
    self, Capabilities, Fixture, MOUNTING_CASES, SnapshotterFactory,
};
use berth_services::snapshots::{SnapshotsClient, SnapshotsService};
use support::{Backend, Served, metadata_over, namespaced};

/// What a fixture keeps alive: the server (absent when called directly) and the data.
struct Guard {
    served: Option<Served>,
    dir: tempfile::TempDir,
}

fn temp_dir() -> berth_core::Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| berth_core::Error::internal(format!("temp dir: {e}")))
}

/// `sn` served under `name` and reached through `SnapshotsClient`, or as is.
async fn expose(
    sn: Arc<dyn Snapshotter>,
    name: &str,
    remote: bool,
) -> (Arc<dyn Snapshotter>, Option<Served>) {
    if !remote {
        return (sn, None);
    }
    let served = Served::services(&[&SnapshotsService::new([(name.to_owned(), sn)].into())]);
    let client = SnapshotsClient::new(served.channel().await, name);
    (Arc::new(client), Some(served))
}

fn backend_capabilities(backend: Backend, mountable: bool) -> Capabilities {
    Capabilities {
        mountable,
        overlay_upper: backend == Backend::Overlay,
        usage_counts_only_changes: backend == Backend::Overlay,
        requires_namespace: false,
        reopen: false,
    }
}

/// A backend itself, served and reached through the adapters (as a proxy plugin would be).
struct Remote {
    backend: Backend,
    mountable: bool,
}

#[async_trait::async_trait]
impl SnapshotterFactory for Remote {
    type Guard = Guard;

    fn capabilities(&self) -> Capabilities {
        backend_capabilities(self.backend, self.mountable)
    }

    async fn create(&self) -> berth_core::Result<Fixture<Guard>> {
        let dir = temp_dir()?;
        let sn = self.backend.open(&dir.path().join("sn")).await?;
        let (sn, served) = expose(sn, self.backend.name(), true).await;
        Ok(Fixture::new(
            sn,
            CallContext::default(),
            Guard { served, dir },
        ))
    }
}

/// The metadata layer's namespaced snapshotter over a backend.
struct Namespaced {
    backend: Backend,
    mountable: bool,
    remote: bool,
}

impl Namespaced {
    async fn open(&self, dir: tempfile::TempDir) -> berth_core::Result<Fixture<Guard>> {
        let backend = self.backend.open(&dir.path().join("sn")).await?;
        let metadata = metadata_over(dir.path(), self.backend, backend)?;
        let sn = metadata
            .snapshotter(self.backend.name())
            .ok_or_else(|| berth_core::Error::internal("no snapshotter"))?;
        let (sn, served) = expose(sn, self.backend.name(), self.remote).await;
        Ok(
            Fixture::new(sn, namespaced("conformance"), Guard { served, dir })
                .with_other_namespace(namespaced("elsewhere")),
        )
    }
}

#[async_trait::async_trait]
impl SnapshotterFactory for Namespaced {
    type Guard = Guard;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            requires_namespace: true,
            reopen: !self.remote,
            ..backend_capabilities(self.backend, self.mountable)
        }
    }

    async fn create(&self) -> berth_core::Result<Fixture<Guard>> {
        self.open(temp_dir()?).await
    }

    async fn reopen(&self, guard: Guard) -> berth_core::Result<Fixture<Guard>> {
        let Guard { served, dir } = guard;
        drop(served);
        self.open(dir).await
    }
}

/// Names of the failed cases, printing the details; as root with working mounts, a skipped
/// mounting case counts as failed (it would hide a failure).
async fn failed_cases<F: SnapshotterFactory>(label: &str, factory: F) -> BTreeSet<&'static str> {
    let caps = factory.capabilities();
    match snapshotter::run(factory).await {
        Ok(report) => {
            assert_eq!(
                report.passed.len() + report.skipped.len(),
                snapshotter::CASES.len()
            );
            let mut failed = BTreeSet::new();
            for (case, why) in &report.skipped {
                eprintln!("{label}: skipped {case}: {why}");
                let capability_skip = *case == "overlay_whiteouts_on_disk" && !caps.overlay_upper;
                if caps.mountable && MOUNTING_CASES.contains(case) && !capability_skip {
                    failed.insert(*case);
                }
            }
            failed
        }
        Err(failure) => {
            eprintln!("{label}: {failure}");
            failure.failures.iter().map(|f| f.case).collect()
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn native_through_the_adapters_passes_the_suite() {
    let backend = Backend::Native;
    let failed = failed_cases(
        "native via gRPC",
        Remote {
            backend,
            mountable: backend.mountable(),
        },
    )
    .await;
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn overlay_through_the_adapters_passes_the_suite() {
    let backend = Backend::Overlay;
    let failed = failed_cases(
        "overlayfs via gRPC",
        Remote {
            backend,
            mountable: backend.mountable(),
        },
    )
    .await;
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_over_native_passes_the_suite_directly_and_through_the_adapters() {
    let backend = Backend::Native;
    let mountable = backend.mountable();
    for remote in [false, true] {
        let failed = failed_cases(
            &format!("metadata over native, remote={remote}"),
            Namespaced {
                backend,
                mountable,
                remote,
            },
        )
        .await;
        assert!(
            failed.is_empty(),
            "remote={remote}: failed cases: {failed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_over_overlay_passes_the_suite_directly_and_through_the_adapters() {
    let backend = Backend::Overlay;
    let mountable = backend.mountable();
    for remote in [false, true] {
        let failed = failed_cases(
            &format!("metadata over overlayfs, remote={remote}"),
            Namespaced {
                backend,
                mountable,
                remote,
            },
        )
        .await;
        assert!(
            failed.is_empty(),
            "remote={remote}: failed cases: {failed:?}"
        );
    }
}
