//! The content store conformance suite against the local store.

use std::sync::Arc;

use berth_content_local::LocalStore;
use berth_core::content::CallContext;
use berth_proxy_sdk::conformance::content::{self, Capabilities, ContentStoreFactory, Fixture};
use tempfile::TempDir;

struct Local;

impl Local {
    async fn open(dir: TempDir) -> berth_core::Result<Fixture<TempDir>> {
        let store = LocalStore::new(dir.path().join("content"));
        store.prepare().await?;
        Ok(Fixture::new(Arc::new(store), CallContext::default(), dir))
    }
}

#[async_trait::async_trait]
impl ContentStoreFactory for Local {
    type Guard = TempDir;

    fn capabilities(&self) -> Capabilities {
        // Labels are the metadata layer's: the local store keeps none.
        Capabilities {
            labels: false,
            requires_namespace: false,
            reopen: true,
        }
    }

    async fn create(&self) -> berth_core::Result<Fixture<TempDir>> {
        let dir = tempfile::tempdir()
            .map_err(|e| berth_core::Error::internal(format!("temp dir: {e}")))?;
        Local::open(dir).await
    }

    async fn reopen(&self, dir: TempDir) -> berth_core::Result<Fixture<TempDir>> {
        Local::open(dir).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_store_passes_the_content_suite() {
    match content::run(Local).await {
        Ok(report) => {
            assert!(report.passed.len() + report.skipped.len() == content::CASES.len());
            for (case, why) in &report.skipped {
                eprintln!("skipped {case}: {why}");
            }
        }
        Err(failure) => panic!("{failure}"),
    }
}
