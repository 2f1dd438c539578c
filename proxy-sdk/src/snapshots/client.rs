//! The client adapter: one snapshotter of a remote `containerd.services.snapshots.v1.Snapshots`
//! as a [`Snapshotter`], as containerd's `core/snapshots/proxy/proxy.go`.
//!
//! Every request names the snapshotter this client was made for; the [`CallContext`] travels
//! as the `containerd-namespace` and `containerd-lease` headers; statuses come back as errors
//! through [`Error::from_status`], so codes survive the trip. Works against berth's
//! [`SnapshotsService`](super::SnapshotsService) and against containerd itself.
//!
//! `list` sends the filter's source strings and applies the parsed filter again to what comes
//! back, so a remote that ignores filters still gives the right answer.

use crate::call::{Remote, with_headers};
use berth_core::content::CallContext;
use berth_core::error::{Error, Result};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::snapshot::{Mount, SnapshotInfo, Snapshotter, Usage};
use berth_proto::containerd::services::snapshots::v1::snapshots_client;
use berth_proto::containerd::services::snapshots::v1::{
    CleanupRequest, CommitSnapshotRequest, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest,
    UsageRequest, ViewSnapshotRequest,
};
use tonic::transport::Channel;

use super::{info_field, info_from_wire, info_to_wire, mount_from_wire};

/// containerd's message limit (16 MiB each way).
const MAX_MESSAGE: usize = 16 << 20;

/// The snapshotter `name` of a snapshots service reached over gRPC.
#[derive(Debug, Clone)]
pub struct SnapshotsClient {
    inner: snapshots_client::SnapshotsClient<Channel>,
    name: String,
    remote: Remote,
}

impl SnapshotsClient {
    /// The snapshotter `name` behind `channel` (one channel can serve many clients).
    pub fn new(channel: Channel, name: impl Into<String>) -> Self {
        SnapshotsClient {
            inner: snapshots_client::SnapshotsClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            name: name.into(),
            remote: Remote::default(),
        }
    }

    /// Names the service in Unavailable errors (e.g. "proxy plugin stargz at /run/s.sock").
    pub fn described_as(mut self, description: impl Into<String>) -> Self {
        self.remote = Remote::described(description);
        self
    }

    /// The snapshotter name every request carries.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn client(&self) -> snapshots_client::SnapshotsClient<Channel> {
        self.inner.clone()
    }
}

/// The service answered something that does not fit the protocol: its fault.
fn bad_reply(what: impl std::fmt::Display) -> Error {
    Error::internal(format!("snapshots service sent an invalid reply: {what}"))
}

fn reply_info(
    info: Option<berth_proto::containerd::services::snapshots::v1::Info>,
) -> Result<SnapshotInfo> {
    info_from_wire(info.ok_or_else(|| bad_reply("no snapshot info"))?)
        .map_err(|e| bad_reply(e.message()))
}

fn mounts(m: Vec<berth_proto::containerd::types::Mount>) -> Vec<Mount> {
    m.into_iter().map(mount_from_wire).collect()
}

#[async_trait::async_trait]
impl Snapshotter for SnapshotsClient {
    async fn stat(&self, cx: &CallContext, key: &str) -> Result<SnapshotInfo> {
        let call = with_headers(
            cx,
            StatSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.to_owned(),
            },
        )?;
        let reply = self
            .client()
            .stat(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        reply_info(reply.info)
    }

    async fn update(
        &self,
        cx: &CallContext,
        info: SnapshotInfo,
        fieldpaths: &[String],
    ) -> Result<SnapshotInfo> {
        let call = with_headers(
            cx,
            UpdateSnapshotRequest {
                snapshotter: self.name.clone(),
                info: Some(info_to_wire(info)),
                update_mask: Some(prost_types::FieldMask {
                    paths: fieldpaths.to_vec(),
                }),
            },
        )?;
        let reply = self
            .client()
            .update(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        reply_info(reply.info)
    }

    async fn usage(&self, cx: &CallContext, key: &str) -> Result<Usage> {
        let call = with_headers(
            cx,
            UsageRequest {
                snapshotter: self.name.clone(),
                key: key.to_owned(),
            },
        )?;
        let reply = self
            .client()
            .usage(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        Ok(Usage {
            size: reply.size,
            inodes: reply.inodes,
        })
    }

    async fn mounts(&self, cx: &CallContext, key: &str) -> Result<Vec<Mount>> {
        let call = with_headers(
            cx,
            MountsRequest {
                snapshotter: self.name.clone(),
                key: key.to_owned(),
            },
        )?;
        let reply = self
            .client()
            .mounts(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        Ok(mounts(reply.mounts))
    }

    async fn prepare(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        let call = with_headers(
            cx,
            PrepareSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.to_owned(),
                parent: parent.unwrap_or_default().to_owned(),
                labels: labels.into_iter().collect(),
            },
        )?;
        let reply = self
            .client()
            .prepare(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        Ok(mounts(reply.mounts))
    }

    async fn view(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        let call = with_headers(
            cx,
            ViewSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.to_owned(),
                parent: parent.unwrap_or_default().to_owned(),
                labels: labels.into_iter().collect(),
            },
        )?;
        let reply = self
            .client()
            .view(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        Ok(mounts(reply.mounts))
    }

    async fn commit(&self, cx: &CallContext, name: &str, key: &str, labels: Labels) -> Result<()> {
        let call = with_headers(
            cx,
            CommitSnapshotRequest {
                snapshotter: self.name.clone(),
                name: name.to_owned(),
                key: key.to_owned(),
                labels: labels.into_iter().collect(),
                parent: String::new(),
            },
        )?;
        self.client()
            .commit(call)
            .await
            .map_err(|s| self.remote.error(s))?;
        Ok(())
    }

    async fn remove(&self, cx: &CallContext, key: &str) -> Result<()> {
        let call = with_headers(
            cx,
            RemoveSnapshotRequest {
                snapshotter: self.name.clone(),
                key: key.to_owned(),
            },
        )?;
        self.client()
            .remove(call)
            .await
            .map_err(|s| self.remote.error(s))?;
        Ok(())
    }

    async fn list(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<SnapshotInfo>> {
        let call = with_headers(
            cx,
            ListSnapshotsRequest {
                snapshotter: self.name.clone(),
                filters: filter.sources().to_vec(),
            },
        )?;
        let mut batches = self
            .client()
            .list(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        let mut infos = Vec::new();
        while let Some(batch) = batches.message().await.map_err(|s| self.remote.error(s))? {
            for info in batch.info {
                let info = info_from_wire(info).map_err(|e| bad_reply(e.message()))?;
                if filter.matches(&|path: &[String]| info_field(&info, path)) {
                    infos.push(info);
                }
            }
        }
        Ok(infos)
    }

    async fn cleanup(&self, cx: &CallContext) -> Result<()> {
        let call = with_headers(
            cx,
            CleanupRequest {
                snapshotter: self.name.clone(),
            },
        )?;
        self.client()
            .cleanup(call)
            .await
            .map_err(|s| self.remote.error(s))?;
        Ok(())
    }
}
