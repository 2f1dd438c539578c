//! The server adapter: a [`Differ`] served as `containerd.services.diff.v1.Diff`.
//!
//! Every RPC builds a [`CallContext`] from the request headers (`containerd-namespace`,
//! validated when present, and `containerd-lease`) and hands it to the differ, which passes
//! it on to its content store; the store decides whether it needs a namespace (berthd's
//! does). Errors become statuses through [`berth_core::error::to_status`] only, so a
//! NotImplemented from the differ reaches the caller as Unimplemented and containerd's (or
//! berthd's) diff service tries its next differ.

use std::sync::Arc;

use berth_core::diff::{ApplyOptions, DiffOptions, Differ};
use berth_core::error::Error;
use berth_core::serve::{GrpcService, MessageLimits};
use berth_proto::containerd::services::diff::v1::diff_server::{Diff, DiffServer};
use berth_proto::containerd::services::diff::v1::{
    ApplyRequest, ApplyResponse, DiffRequest, DiffResponse,
};

use super::{descriptor_from_wire, descriptor_to_wire};
use crate::snapshots::{call_context, mount_from_wire};

/// The diff service over one differ.
#[derive(Clone)]
pub struct DiffService {
    differ: Arc<dyn Differ>,
}

impl DiffService {
    /// Serves `differ` (berthd: its ordered differs; a proxy plugin: its own differ).
    pub fn new(differ: Arc<dyn Differ>) -> Self {
        DiffService { differ }
    }
}

type Reply<T> = std::result::Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl Diff for DiffService {
    async fn apply(&self, request: tonic::Request<ApplyRequest>) -> Reply<ApplyResponse> {
        let cx = call_context(request.metadata())?;
        let req = request.into_inner();
        let desc = descriptor_from_wire(
            req.diff
                .ok_or_else(|| Error::invalid_argument("apply request names no layer"))?,
            "layer",
        )?;
        let mounts: Vec<_> = req.mounts.into_iter().map(mount_from_wire).collect();
        let options = ApplyOptions {
            sync_fs: req.sync_fs,
            payloads: req
                .payloads
                .into_iter()
                .map(|(k, v)| (k, (v.type_url, v.value)))
                .collect(),
        };
        let applied = self.differ.apply(&cx, &desc, &mounts, &options).await?;
        Ok(tonic::Response::new(ApplyResponse {
            applied: Some(descriptor_to_wire(&applied)),
        }))
    }

    async fn diff(&self, request: tonic::Request<DiffRequest>) -> Reply<DiffResponse> {
        let cx = call_context(request.metadata())?;
        let req = request.into_inner();
        let lower: Vec<_> = req.left.into_iter().map(mount_from_wire).collect();
        let upper: Vec<_> = req.right.into_iter().map(mount_from_wire).collect();
        let options = DiffOptions {
            media_type: Some(req.media_type).filter(|m| !m.is_empty()),
            reference: Some(req.r#ref).filter(|r| !r.is_empty()),
            labels: req.labels.into_iter().collect(),
            source_date_epoch: req
                .source_date_epoch
                .map(std::time::SystemTime::try_from)
                .transpose()
                .map_err(|e| Error::invalid_argument(format!("source_date_epoch: {e}")))?,
        };
        let diff = self.differ.compare(&cx, &lower, &upper, &options).await?;
        Ok(tonic::Response::new(DiffResponse {
            diff: Some(descriptor_to_wire(&diff)),
        }))
    }
}

impl GrpcService for DiffService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(DiffServer::new(self.clone()), limits));
    }
}
