//! The snapshotter conformance suite against the example proxy snapshotter as a
//! `[proxy_plugins]` entry of a running berthd: the suite calls berthd's snapshots service
//! (snapshotter `example`), berthd's metadata layer calls the proxy (issue 6, acceptance 1,
//! the third way; `ctr` drives the same path in proxy_snapshotter.rs).
//!
//! berth only, not calibrated: the suite speaks to the daemon through proxy-sdk's client with
//! berth's expectations of every error code and message; containerd's own snapshotter tests
//! are the reference the suite was written from, not something it runs against.

#[path = "proxy_support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use berth_integration::{Kind, ctr_at};
use berth_proxy_sdk::conformance::snapshotter::{
    self, Capabilities, Fixture, MOUNTING_CASES, SnapshotterFactory, mount::cannot_mount,
};
use berth_proxy_sdk::namespace::Namespace;
use berth_proxy_sdk::snapshots::SnapshotsClient;
use berth_proxy_sdk::{CallContext, Error, Result};
use support::{NAME, Proxy, daemon_with, temp_dir};

/// The lease every fixture's calls run under: berthd collects garbage after removals, and a
/// snapshot made over the API with neither a lease nor a `gc.root` label is garbage.
const LEASE: &str = "conformance";

/// Fixtures on the proxy behind berthd, one fresh pair of namespaces each (a namespace is an
/// empty snapshotter as far as the metadata layer's clients can tell).
struct ThroughBerthd {
    socket: PathBuf,
    client: SnapshotsClient,
    next: AtomicUsize,
    mountable: bool,
}

impl ThroughBerthd {
    /// A namespace with the lease in it, as a call context.
    async fn namespace(&self, name: String) -> Result<CallContext> {
        let socket = self.socket.clone();
        let ns = name.clone();
        let out = tokio::task::spawn_blocking(move || {
            ctr_at(&socket, ["-n", &ns, "leases", "create", "--id", LEASE])
        })
        .await
        .map_err(|e| Error::internal(format!("ctr task: {e}")))?
        .map_err(|e| Error::internal(format!("ctr: {e:#}")))?;
        if !out.success() {
            return Err(Error::internal(format!("creating the lease: {out}")));
        }
        Ok(CallContext {
            namespace: Some(Namespace::parse(&name)?),
            lease: Some(LEASE.to_owned()),
        })
    }
}

#[async_trait::async_trait]
impl SnapshotterFactory for ThroughBerthd {
    type Guard = ();

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            mountable: self.mountable,
            // The example copies parents: a child's usage counts them too.
            usage_counts_only_changes: false,
            overlay_upper: false,
            requires_namespace: true,
            reopen: false,
        }
    }

    async fn create(&self) -> Result<Fixture<()>> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let cx = self.namespace(format!("conformance-{n}")).await?;
        let other = self.namespace(format!("conformance-{n}-other")).await?;
        Ok(Fixture::new(Arc::new(self.client.clone()), cx, ()).with_other_namespace(other))
    }
}

#[test]
fn the_proxy_behind_berthd_passes_the_suite() {
    let mountable = match cannot_mount() {
        Some(why) => {
            eprintln!("SKIP: mounting cases will be skipped: {why}");
            false
        }
        None => true,
    };
    let dir = temp_dir();
    let proxy = Proxy::start(dir.path());
    let d = daemon_with(Kind::Berthd, &proxy);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (report, caps) = runtime.block_on(async {
        let factory = ThroughBerthd {
            socket: d.socket().to_owned(),
            client: SnapshotsClient::new(berth_proxy_sdk::connect(d.socket()), NAME),
            next: AtomicUsize::new(0),
            mountable,
        };
        let caps = factory.capabilities();
        (snapshotter::run(factory).await, caps)
    });
    let failed: BTreeSet<&str> = match report {
        Ok(report) => {
            assert_eq!(
                report.passed.len() + report.skipped.len(),
                snapshotter::CASES.len()
            );
            report
                .skipped
                .iter()
                .inspect(|(case, why)| eprintln!("skipped {case}: {why}"))
                .filter(|(case, _)| {
                    // Skipped by capability: overlay's on-disk format, reopening in-process.
                    let by_capability = matches!(
                        *case,
                        "overlay_whiteouts_on_disk" | "reopen_keeps_snapshots"
                    );
                    caps.mountable && MOUNTING_CASES.contains(case) && !by_capability
                })
                .map(|(case, _)| *case)
                .collect()
        }
        Err(failure) => {
            eprintln!("{failure}");
            failure.failures.iter().map(|f| f.case).collect()
        }
    };
    assert!(
        failed.is_empty(),
        "failed cases: {failed:?}\nproxy log:\n{}",
        proxy.log()
    );
}
