//! `containerd.services.content.v1.Content`: both adapters of the content store kind live in
//! proxy-sdk (a vendor's proxy needs them without berthd's services), re-exported here, and
//! the `io.containerd.grpc.v1.content` plugin that serves the metadata layer's content store.

use std::sync::Arc;

use berth_core::metadata::MetadataKind;
use berth_core::registry::{InitError, Instance, PluginType, Registration};
use berth_core::serve::GrpcServiceKind;

pub use berth_proxy_sdk::content::*;

/// `io.containerd.grpc.v1.content`: serves the namespaced content store of the metadata layer
/// (blobs from the loaded content plugin, recorded per namespace, leased and collected).
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "content", |ctx| async move {
        let metadata = ctx.single::<MetadataKind>()?;
        let store = metadata
            .content()
            .ok_or_else(|| InitError::Skip("no content store plugin is loaded".to_owned()))?;
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(
            ContentService::new(store),
        )))
    })
    .requires(&[PluginType::METADATA])
}
