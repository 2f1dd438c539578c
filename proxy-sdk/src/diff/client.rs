//! The client adapter: a remote `containerd.services.diff.v1.Diff` as a [`Differ`], as
//! containerd's `core/diff/proxy/differ.go`.
//!
//! What a `[proxy_plugins]` entry of type `diff` is inside berthd, and what the tests use to
//! reach a differ served by [`DiffService`](super::DiffService). Each call carries the
//! [`CallContext`] as the `containerd-namespace` and `containerd-lease` headers, so the remote
//! differ reads and writes blobs in the caller's namespace and lease (it reaches the content
//! store itself, usually berthd's content service); statuses come back through
//! [`Error::from_status`], so codes (NotImplemented for a layer the remote cannot apply,
//! NotFound for a missing blob...) survive the trip and the diff service can go on with the
//! next differ.

use berth_core::content::CallContext;
use berth_core::diff::{ApplyOptions, DiffOptions, Differ};
use berth_core::error::{Error, Result};
use berth_core::snapshot::{Descriptor, Mount};
use berth_proto::containerd::services::diff::v1::diff_client;
use berth_proto::containerd::services::diff::v1::{ApplyRequest, DiffRequest};
use tonic::transport::Channel;

use super::{descriptor_from_wire, descriptor_to_wire};
use crate::call::{Remote, with_headers};
use crate::snapshots::mount_to_wire;

/// containerd's message limit (16 MiB each way).
const MAX_MESSAGE: usize = 16 << 20;

/// A [`Differ`] reached over gRPC.
#[derive(Debug, Clone)]
pub struct DiffClient {
    inner: diff_client::DiffClient<Channel>,
    remote: Remote,
}

impl DiffClient {
    /// The differ behind `channel` (one channel can be shared by many clients).
    pub fn new(channel: Channel) -> Self {
        DiffClient {
            inner: diff_client::DiffClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            remote: Remote::default(),
        }
    }

    /// Names the service in Unavailable errors (e.g. "proxy plugin mydiff at /run/d.sock").
    pub fn described_as(mut self, description: impl Into<String>) -> Self {
        self.remote = Remote::described(description);
        self
    }

    /// The generated client (cheap to clone: the channel is shared).
    fn client(&self) -> diff_client::DiffClient<Channel> {
        self.inner.clone()
    }
}

/// The service answered something that does not fit the protocol: its fault, not the caller's.
fn bad_reply(what: impl std::fmt::Display) -> Error {
    Error::internal(format!("diff service sent an invalid reply: {what}"))
}

fn reply_descriptor(
    desc: Option<berth_proto::containerd::types::Descriptor>,
    what: &str,
) -> Result<Descriptor> {
    let desc = desc.ok_or_else(|| bad_reply(format!("no {what} descriptor")))?;
    descriptor_from_wire(desc, what).map_err(|e| bad_reply(e.message()))
}

fn wire_mounts(mounts: &[Mount]) -> Vec<berth_proto::containerd::types::Mount> {
    mounts.iter().cloned().map(mount_to_wire).collect()
}

#[async_trait::async_trait]
impl Differ for DiffClient {
    async fn apply(
        &self,
        cx: &CallContext,
        desc: &Descriptor,
        mounts: &[Mount],
        options: &ApplyOptions,
    ) -> Result<Descriptor> {
        let call = with_headers(
            cx,
            ApplyRequest {
                diff: Some(descriptor_to_wire(desc)),
                mounts: wire_mounts(mounts),
                payloads: options
                    .payloads
                    .iter()
                    .map(|(name, (type_url, value))| {
                        (
                            name.clone(),
                            prost_types::Any {
                                type_url: type_url.clone(),
                                value: value.clone(),
                            },
                        )
                    })
                    .collect(),
                sync_fs: options.sync_fs,
            },
        )?;
        let reply = self
            .client()
            .apply(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        reply_descriptor(reply.applied, "applied")
    }

    async fn compare(
        &self,
        cx: &CallContext,
        lower: &[Mount],
        upper: &[Mount],
        options: &DiffOptions,
    ) -> Result<Descriptor> {
        let call = with_headers(
            cx,
            DiffRequest {
                left: wire_mounts(lower),
                right: wire_mounts(upper),
                media_type: options.media_type.clone().unwrap_or_default(),
                r#ref: options.reference.clone().unwrap_or_default(),
                labels: options
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                source_date_epoch: options.source_date_epoch.map(prost_types::Timestamp::from),
            },
        )?;
        let reply = self
            .client()
            .diff(call)
            .await
            .map_err(|s| self.remote.error(s))?
            .into_inner();
        reply_descriptor(reply.diff, "diff")
    }
}
