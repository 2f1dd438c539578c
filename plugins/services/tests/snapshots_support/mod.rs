//! Shared by the snapshots tests: the server harness (`testing/serving.rs`), and the snapshotter
//! fixtures (native and overlay, bare or behind the core's metadata wrapper).

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use berth_core::content::CallContext;
use berth_core::events::Exchange;
use berth_core::metadata::{MetaStore, Metadata, MetadataConfig};
use berth_core::namespace::Namespace;
use berth_core::snapshot::Snapshotter;

#[path = "../testing/serving.rs"]
mod serving;

// Each test crate uses part of it.
#[allow(unused_imports)]
pub use serving::{LIMITS, Served};

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
