//! `containerd.services.content.v1.Content`: both adapters of the content store kind.
//!
//! - [`ContentService`] (trait -> tonic) serves any [`ContentStore`] on the wire, following
//!   containerd's `plugins/services/content/contentserver/contentserver.go` (see
//!   [`server`] for the write protocol).
//! - [`ContentClient`] (tonic -> trait) is a [`ContentStore`] backed by a remote content
//!   service, as containerd's `core/content/proxy`: what a proxy content plugin and the tests
//!   use.
//!
//! Because both sides speak the same wire protocol, a store served by [`ContentService`] and
//! reached through [`ContentClient`] behaves like the store itself.
//!
//! [`ContentStore`]: berth_core::content::ContentStore

pub mod client;
pub mod server;

pub use client::ContentClient;
pub use server::ContentService;

use std::time::SystemTime;

use berth_core::content::{Digest, Info, Status};
use berth_proto::containerd::services::content::v1 as wire;

/// containerd sends List results in batches of this many infos.
pub const LIST_BATCH: usize = 100;
/// containerd's Read copies through a 1 MiB buffer, so no Read message carries more.
pub const READ_CHUNK: usize = 1 << 20;

/// A size or offset as the wire carries it (int64); nothing real comes close to the limit.
pub(crate) fn wire_size(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A wire size or offset that must not be negative; the error names `what`.
pub(crate) fn size_from_wire(value: i64, what: &str) -> Result<u64, String> {
    u64::try_from(value).map_err(|_| format!("{what} {value} must not be negative"))
}

pub(crate) fn timestamp(time: SystemTime) -> Option<prost_types::Timestamp> {
    Some(time.into())
}

/// An absent timestamp is the epoch (the domain types have no "unset" time).
pub(crate) fn time_from_wire(
    ts: Option<prost_types::Timestamp>,
    what: &str,
) -> Result<SystemTime, String> {
    match ts {
        None => Ok(SystemTime::UNIX_EPOCH),
        Some(ts) => SystemTime::try_from(ts).map_err(|e| format!("{what}: {e}")),
    }
}

/// An empty digest string means "none", as containerd's `digest.Digest("")`.
pub(crate) fn optional_digest(text: &str) -> berth_core::Result<Option<Digest>> {
    if text.is_empty() {
        Ok(None)
    } else {
        Digest::parse(text).map(Some)
    }
}

pub(crate) fn info_to_wire(info: Info) -> wire::Info {
    wire::Info {
        digest: info.digest.to_string(),
        size: wire_size(info.size),
        created_at: timestamp(info.created_at),
        updated_at: timestamp(info.updated_at),
        labels: info.labels.into_iter().collect(),
    }
}

pub(crate) fn info_from_wire(info: wire::Info) -> Result<Info, String> {
    Ok(Info {
        digest: Digest::parse(&info.digest).map_err(|e| e.message().to_owned())?,
        size: size_from_wire(info.size, "size")?,
        created_at: time_from_wire(info.created_at, "created_at")?,
        updated_at: time_from_wire(info.updated_at, "updated_at")?,
        labels: info.labels.into_iter().collect(),
    })
}

pub(crate) fn status_to_wire(status: Status) -> wire::Status {
    wire::Status {
        started_at: timestamp(status.started_at),
        updated_at: timestamp(status.updated_at),
        r#ref: status.reference,
        offset: wire_size(status.offset),
        total: wire_size(status.total),
        expected: status.expected.map(|d| d.to_string()).unwrap_or_default(),
    }
}

pub(crate) fn status_from_wire(status: wire::Status) -> Result<Status, String> {
    Ok(Status {
        reference: status.r#ref,
        offset: size_from_wire(status.offset, "offset")?,
        total: size_from_wire(status.total, "total")?,
        expected: optional_digest(&status.expected).map_err(|e| e.message().to_owned())?,
        started_at: time_from_wire(status.started_at, "started_at")?,
        updated_at: time_from_wire(status.updated_at, "updated_at")?,
    })
}
