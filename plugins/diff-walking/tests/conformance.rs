//! The differ conformance suite (`berth_proxy_sdk::conformance::differ`) against the walking
//! differ called in process, on the store the suite supplies.

use std::sync::Arc;

use berth_core::content::ContentStore;
use berth_diff_walking::plugin::WalkingDiffer;
use berth_proxy_sdk::conformance::differ::{self, Capabilities, DifferFactory, Fixture};

/// The walking differ, mounting for compare under a temp dir of its own.
struct Walking;

#[async_trait::async_trait]
impl DifferFactory for Walking {
    type Guard = tempfile::TempDir;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            compare: true,
            overlay: true,
        }
    }

    async fn create(
        &self,
        content: Arc<dyn ContentStore>,
    ) -> berth_core::Result<Fixture<tempfile::TempDir>> {
        let dir = tempfile::tempdir()
            .map_err(|e| berth_core::Error::internal(format!("temp dir: {e}")))?;
        let differ = WalkingDiffer::new(content).with_mount_dir(dir.path().join("mounts"));
        Ok(Fixture::new(Arc::new(differ), dir))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walking_differ_passes_the_differ_suite() {
    match differ::run(Walking).await {
        Ok(report) => assert!(!report.passed.is_empty(), "no case ran: {report:?}"),
        Err(failure) => panic!("{failure}"),
    }
}
