//! The content store conformance suite (`berth_proxy_sdk::conformance::content`) run through
//! both adapters: each store is served by `ContentService` on a unix socket and driven through
//! `ContentClient`, so every case crosses the wire protocol both ways.

mod testing;

use std::collections::BTreeSet;
use std::sync::Arc;

use berth_content_local::LocalStore;
use berth_core::content::{CallContext, ContentStore};
use berth_core::events::Exchange;
use berth_core::metadata::{MetaStore, Metadata, MetadataConfig};
use berth_core::namespace::Namespace;
use berth_proxy_sdk::conformance::content::{self, Capabilities, ContentStoreFactory, Fixture};
use berth_services::content::ContentClient;
use testing::serving::Served;

/// What a fixture keeps alive: the server (absent when the store is called directly) and the
/// directory holding the store's data.
struct Guard {
    served: Option<Served>,
    dir: tempfile::TempDir,
}

fn temp_dir() -> berth_core::Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| berth_core::Error::internal(format!("temp dir: {e}")))
}

fn namespaced(name: &str) -> CallContext {
    CallContext {
        namespace: Some(Namespace::parse(name).expect("namespace")),
        lease: None,
    }
}

/// `store` served by `ContentService` and reached through `ContentClient`, or as is.
async fn expose(
    store: Arc<dyn ContentStore>,
    remote: bool,
) -> (Arc<dyn ContentStore>, Option<Served>) {
    if !remote {
        return (store, None);
    }
    let served = Served::start(store);
    let client = ContentClient::new(served.channel().await);
    (Arc::new(client), Some(served))
}

/// The local store (a temp directory): no namespaces, no labels, survives a restart.
struct Local;

impl Local {
    async fn open(dir: tempfile::TempDir) -> berth_core::Result<Fixture<Guard>> {
        let local = LocalStore::new(dir.path().join("content"));
        local.prepare().await?;
        let (store, served) = expose(Arc::new(local), true).await;
        Ok(Fixture::new(
            store,
            CallContext::default(),
            Guard { served, dir },
        ))
    }
}

#[async_trait::async_trait]
impl ContentStoreFactory for Local {
    type Guard = Guard;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            labels: false,
            requires_namespace: false,
            reopen: true,
        }
    }

    async fn create(&self) -> berth_core::Result<Fixture<Guard>> {
        Local::open(temp_dir()?).await
    }

    async fn reopen(&self, guard: Guard) -> berth_core::Result<Fixture<Guard>> {
        // A restart of both ends: the old server goes, a new store and server take over.
        let Guard { served, dir } = guard;
        drop(served);
        Local::open(dir).await
    }
}

/// The core's metadata layer over the local store, which is what berthd serves to `ctr`;
/// namespaces travel as headers, so the isolation cases check that they do.
struct Namespaced {
    remote: bool,
}

#[async_trait::async_trait]
impl ContentStoreFactory for Namespaced {
    type Guard = Guard;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            labels: true,
            requires_namespace: true,
            reopen: false,
        }
    }

    async fn create(&self) -> berth_core::Result<Fixture<Guard>> {
        let dir = temp_dir()?;
        let config = MetadataConfig::default();
        let records = MetaStore::open(&dir.path().join("meta"), &config)?;
        let local = LocalStore::new(dir.path().join("content"));
        local.prepare().await?;
        let metadata = Metadata::new(
            Arc::new(records),
            Arc::new(Exchange::default()),
            Some(Arc::new(local)),
            config,
        );
        let store = metadata
            .content()
            .ok_or_else(|| berth_core::Error::internal("no content store"))?;
        let (store, served) = expose(store, self.remote).await;
        Ok(
            Fixture::new(store, namespaced("conformance"), Guard { served, dir })
                .with_other_namespace(namespaced("elsewhere")),
        )
    }
}

/// Names of the failed cases, printing the details.
async fn failed_cases<F: ContentStoreFactory>(label: &str, factory: F) -> BTreeSet<&'static str> {
    match content::run(factory).await {
        Ok(report) => {
            assert_eq!(
                report.passed.len() + report.skipped.len(),
                content::CASES.len()
            );
            for (case, why) in &report.skipped {
                eprintln!("{label}: skipped {case}: {why}");
            }
            BTreeSet::new()
        }
        Err(failure) => {
            eprintln!("{label}: {failure}");
            failure.failures.iter().map(|f| f.case).collect()
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_store_through_the_adapters_passes_the_content_suite() {
    let failed = failed_cases("local store via gRPC", Local).await;
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

/// The namespaced store of the metadata layer over the local store passes the whole suite,
/// called directly and through the gRPC adapters.
#[tokio::test(flavor = "multi_thread")]
async fn metadata_store_passes_the_content_suite_directly_and_through_the_adapters() {
    let direct = failed_cases("metadata store, direct", Namespaced { remote: false }).await;
    assert!(direct.is_empty(), "failed cases, direct: {direct:?}");
    let remote = failed_cases("metadata store via gRPC", Namespaced { remote: true }).await;
    assert!(remote.is_empty(), "failed cases via gRPC: {remote:?}");
}
