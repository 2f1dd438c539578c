//! `containerd.services.snapshots.v1.Snapshots`: both adapters of the snapshotter kind live in
//! proxy-sdk (a vendor's proxy needs them without berthd's services), re-exported here, and
//! the `io.containerd.grpc.v1.snapshots` plugin that serves the metadata layer's snapshotters.

use std::sync::Arc;

use berth_core::metadata::MetadataKind;
use berth_core::registry::{Instance, PluginType, Registration};
use berth_core::serve::GrpcServiceKind;

pub use berth_proxy_sdk::snapshots::*;

/// `io.containerd.grpc.v1.snapshots`: serves the metadata layer's namespaced snapshotters
/// (one per loaded snapshotter plugin, proxies included), by name.
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "snapshots", |ctx| async move {
        let metadata = ctx.single::<MetadataKind>()?;
        let snapshotters = metadata
            .snapshotter_names()
            .into_iter()
            .filter_map(|name| {
                let sn = metadata.snapshotter(&name)?;
                Some((name, sn))
            })
            .collect();
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(
            SnapshotsService::new(snapshotters),
        )))
    })
    .requires(&[PluginType::METADATA])
}
