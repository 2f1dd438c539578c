//! The server adapter: snapshotters served as `containerd.services.snapshots.v1.Snapshots`.
//!
//! Every RPC builds a [`CallContext`](berth_core::content::CallContext) from the request
//! headers (`containerd-namespace`, validated when present, and `containerd-lease`); the
//! snapshotter decides whether it needs a namespace (the metadata layer's do). Errors become statuses through
//! [`berth_core::error::to_status`] only.
//!
//! As containerd's `plugins/services/snapshots/service.go` (the same in v1.6.20):
//!
//! - the `snapshotter` field picks the snapshotter; empty is InvalidArgument ("snapshotter
//!   argument missing"), an unknown name is InvalidArgument too ("snapshotter not loaded");
//! - List streams its infos in batches of [`LIST_BATCH`];
//! - Commit's `parent` (containerd 2.x, for rebasing an active snapshot on commit) is
//!   accepted when it names the parent the snapshot already has; any other parent is
//!   NotImplemented, because berth's snapshotters do not rebase (they do not declare
//!   containerd's `rebase` capability, so containerd's own clients never ask).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use berth_core::error::{Error, Result};
use berth_core::filters::Filter;
use berth_core::serve::{GrpcService, MessageLimits};
use berth_core::snapshot::Snapshotter;
use berth_proto::containerd::services::snapshots::v1::snapshots_server::{
    Snapshots, SnapshotsServer,
};
use berth_proto::containerd::services::snapshots::v1::{
    CleanupRequest, CommitSnapshotRequest, ListSnapshotsRequest, ListSnapshotsResponse,
    MountsRequest, MountsResponse, PrepareSnapshotRequest, PrepareSnapshotResponse,
    RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse, UpdateSnapshotRequest,
    UpdateSnapshotResponse, UsageRequest, UsageResponse, ViewSnapshotRequest, ViewSnapshotResponse,
};
use tokio_stream::Stream;

use super::{LIST_BATCH, call_context, info_from_wire, info_to_wire, mount_to_wire, usage_to_wire};

/// A boxed response stream of the snapshots service.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

enum Served {
    /// By name, from the request's `snapshotter` field (berthd).
    Named(BTreeMap<String, Arc<dyn Snapshotter>>),
    /// One snapshotter, whatever the field says (a proxy plugin's server).
    Only(Arc<dyn Snapshotter>),
}

/// The snapshots service.
#[derive(Clone)]
pub struct SnapshotsService {
    served: Arc<Served>,
}

impl SnapshotsService {
    /// Serves `snapshotters` by name.
    pub fn new(snapshotters: BTreeMap<String, Arc<dyn Snapshotter>>) -> Self {
        SnapshotsService {
            served: Arc::new(Served::Named(snapshotters)),
        }
    }

    /// Serves one snapshotter for every request, ignoring the `snapshotter` field, as
    /// containerd's `contrib/snapshotservice` does for proxy plugins.
    pub fn only(snapshotter: Arc<dyn Snapshotter>) -> Self {
        SnapshotsService {
            served: Arc::new(Served::Only(snapshotter)),
        }
    }

    fn get(&self, name: &str) -> Result<Arc<dyn Snapshotter>> {
        match &*self.served {
            Served::Only(sn) => Ok(Arc::clone(sn)),
            Served::Named(_) if name.is_empty() => {
                Err(Error::invalid_argument("snapshotter argument missing"))
            }
            Served::Named(all) => all.get(name).cloned().ok_or_else(|| {
                Error::invalid_argument(format!(
                    "snapshotter not loaded: {name} (loaded: {})",
                    all.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            }),
        }
    }
}

/// containerd's empty parent is "none".
fn parent(p: &str) -> Option<&str> {
    Some(p).filter(|p| !p.is_empty())
}

#[tonic::async_trait]
impl Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        request: tonic::Request<PrepareSnapshotRequest>,
    ) -> Result<tonic::Response<PrepareSnapshotResponse>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let r = request.into_inner();
        let sn = self.get(&r.snapshotter)?;
        let mounts = sn
            .prepare(
                &cx,
                &r.key,
                parent(&r.parent),
                r.labels.into_iter().collect(),
            )
            .await?;
        Ok(tonic::Response::new(PrepareSnapshotResponse {
            mounts: mounts.into_iter().map(mount_to_wire).collect(),
        }))
    }

    async fn view(
        &self,
        request: tonic::Request<ViewSnapshotRequest>,
    ) -> Result<tonic::Response<ViewSnapshotResponse>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let r = request.into_inner();
        let sn = self.get(&r.snapshotter)?;
        let mounts = sn
            .view(
                &cx,
                &r.key,
                parent(&r.parent),
                r.labels.into_iter().collect(),
            )
            .await?;
        Ok(tonic::Response::new(ViewSnapshotResponse {
            mounts: mounts.into_iter().map(mount_to_wire).collect(),
        }))
    }

    async fn mounts(
        &self,
        request: tonic::Request<MountsRequest>,
    ) -> Result<tonic::Response<MountsResponse>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let r = request.into_inner();
        let mounts = self.get(&r.snapshotter)?.mounts(&cx, &r.key).await?;
        Ok(tonic::Response::new(MountsResponse {
            mounts: mounts.into_iter().map(mount_to_wire).collect(),
        }))
    }

    async fn commit(
        &self,
        request: tonic::Request<CommitSnapshotRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let r = request.into_inner();
        let sn = self.get(&r.snapshotter)?;
        if let Some(wanted) = parent(&r.parent) {
            let info = sn.stat(&cx, &r.key).await?;
            if info.parent.as_deref() != Some(wanted) {
                return Err(Error::not_implemented(format!(
                    "cannot commit snapshot {:?} onto parent {wanted:?}: rebasing on commit is \
                     not supported",
                    r.key
                ))
                .into());
            }
        }
        sn.commit(&cx, &r.name, &r.key, r.labels.into_iter().collect())
            .await?;
        Ok(tonic::Response::new(()))
    }

    async fn remove(
        &self,
        request: tonic::Request<RemoveSnapshotRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let r = request.into_inner();
        self.get(&r.snapshotter)?.remove(&cx, &r.key).await?;
        Ok(tonic::Response::new(()))
    }

    async fn stat(
        &self,
        request: tonic::Request<StatSnapshotRequest>,
    ) -> Result<tonic::Response<StatSnapshotResponse>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let r = request.into_inner();
        let info = self.get(&r.snapshotter)?.stat(&cx, &r.key).await?;
        Ok(tonic::Response::new(StatSnapshotResponse {
            info: Some(info_to_wire(info)),
        }))
    }

    async fn update(
        &self,
        request: tonic::Request<UpdateSnapshotRequest>,
    ) -> Result<tonic::Response<UpdateSnapshotResponse>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let r = request.into_inner();
        let sn = self.get(&r.snapshotter)?;
        let info = r
            .info
            .ok_or_else(|| Error::invalid_argument("update request carries no snapshot info"))?;
        let info = info_from_wire(info)?;
        let fieldpaths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = sn.update(&cx, info, &fieldpaths).await?;
        Ok(tonic::Response::new(UpdateSnapshotResponse {
            info: Some(info_to_wire(info)),
        }))
    }

    type ListStream = ResponseStream<ListSnapshotsResponse>;

    async fn list(
        &self,
        request: tonic::Request<ListSnapshotsRequest>,
    ) -> Result<tonic::Response<Self::ListStream>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let r = request.into_inner();
        let sn = self.get(&r.snapshotter)?;
        let filter = Filter::parse_all(&r.filters)?;
        let infos = sn.list(&cx, &filter).await?;
        let mut batches = Vec::with_capacity(infos.len().div_ceil(LIST_BATCH));
        let mut infos = infos.into_iter().map(info_to_wire).peekable();
        while infos.peek().is_some() {
            let info = infos.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(ListSnapshotsResponse { info }));
        }
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: tonic::Request<UsageRequest>,
    ) -> Result<tonic::Response<UsageResponse>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let r = request.into_inner();
        let usage = self.get(&r.snapshotter)?.usage(&cx, &r.key).await?;
        Ok(tonic::Response::new(usage_to_wire(usage)))
    }

    async fn cleanup(
        &self,
        request: tonic::Request<CleanupRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        let cx = call_context(request.metadata())?;
        let r = request.into_inner();
        self.get(&r.snapshotter)?.cleanup(&cx).await?;
        Ok(tonic::Response::new(()))
    }
}

impl GrpcService for SnapshotsService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(
            SnapshotsServer::new(self.clone()),
            limits
        ));
    }
}
