//! The differ conformance suite (`berth_proxy_sdk::conformance::differ`) through both
//! adapters, laid out as a proxy differ is deployed: the suite's store is served by
//! `ContentService` on a unix socket (berthd's content service, in a deployment), the walking
//! differ reads and writes it through `ContentClient`, and is itself served by `DiffService`
//! on another socket and driven through `DiffClient`. Every case crosses both wire protocols,
//! with the caller's namespace and lease carried across each.

mod testing;

use std::sync::Arc;

use berth_core::content::ContentStore;
use berth_diff_walking::plugin::WalkingDiffer;
use berth_proxy_sdk::conformance::differ::{self, Capabilities, DifferFactory, Fixture};
use berth_services::content::{ContentClient, ContentService};
use berth_services::diff::{DiffClient, DiffService};
use testing::serving::Served;

/// What a fixture keeps alive: both servers and the differ's mount directory.
struct Guard {
    _content: Served,
    _differ: Served,
    _dir: tempfile::TempDir,
}

/// The walking differ as a proxy.
struct Proxied;

#[async_trait::async_trait]
impl DifferFactory for Proxied {
    type Guard = Guard;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            compare: true,
            overlay: true,
        }
    }

    async fn create(&self, content: Arc<dyn ContentStore>) -> berth_core::Result<Fixture<Guard>> {
        let dir = tempfile::tempdir()
            .map_err(|e| berth_core::Error::internal(format!("temp dir: {e}")))?;
        let content_served = Served::services(&[&ContentService::new(content)]);
        let remote_content = ContentClient::new(content_served.channel().await);
        let walking =
            WalkingDiffer::new(Arc::new(remote_content)).with_mount_dir(dir.path().join("mounts"));
        let differ_served = Served::services(&[&DiffService::new(Arc::new(walking))]);
        let client = DiffClient::new(differ_served.channel().await);
        Ok(Fixture::new(
            Arc::new(client),
            Guard {
                _content: content_served,
                _differ: differ_served,
                _dir: dir,
            },
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walking_differ_through_the_adapters_passes_the_differ_suite() {
    match differ::run(Proxied).await {
        Ok(report) => assert!(!report.passed.is_empty(), "no case ran: {report:?}"),
        Err(failure) => panic!("{failure}"),
    }
}
