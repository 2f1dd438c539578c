//! The snapshotter conformance suite (`berth_proxy_sdk::conformance::snapshotter`) against
//! the native snapshotter itself, in a temporary directory.

use std::sync::Arc;

use berth_core::content::CallContext;
use berth_proxy_sdk::conformance::snapshotter::{
    self, Capabilities, Fixture, MOUNTING_CASES, SnapshotterFactory,
};

struct Native;

impl Native {
    async fn open(dir: tempfile::TempDir) -> berth_core::Result<Fixture<tempfile::TempDir>> {
        let sn = berth_snapshot_native::native(dir.path().join("native"));
        sn.open().await?;
        Ok(Fixture::new(Arc::new(sn), CallContext::default(), dir))
    }
}

#[async_trait::async_trait]
impl SnapshotterFactory for Native {
    type Guard = tempfile::TempDir;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            mountable: true,
            overlay_upper: false,
            usage_counts_only_changes: false,
            requires_namespace: false,
            reopen: true,
        }
    }

    async fn create(&self) -> berth_core::Result<Fixture<tempfile::TempDir>> {
        let dir = tempfile::tempdir()
            .map_err(|e| berth_core::Error::internal(format!("temp dir: {e}")))?;
        Native::open(dir).await
    }

    async fn reopen(
        &self,
        guard: tempfile::TempDir,
    ) -> berth_core::Result<Fixture<tempfile::TempDir>> {
        Native::open(guard).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn native_passes_the_snapshotter_suite() {
    let report = match snapshotter::run(Native).await {
        Ok(report) => report,
        Err(failure) => panic!("{failure}"),
    };
    if nix::unistd::geteuid().is_root() {
        // As root nothing that mounts may be skipped: a skip here would hide a failure.
        let skipped: Vec<_> = report
            .skipped
            .iter()
            .filter(|(case, _)| {
                MOUNTING_CASES.contains(case) && *case != "overlay_whiteouts_on_disk"
            })
            .collect();
        assert!(
            skipped.is_empty(),
            "mounting cases skipped as root: {skipped:?}"
        );
    }
}
