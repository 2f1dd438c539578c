//! `containerd.services.snapshots.v1.Snapshots`: both adapters of the snapshotter kind.
//!
//! - [`SnapshotsService`] (trait -> tonic) serves snapshotters on the wire: berthd serves the
//!   metadata layer's namespaced snapshotters, dispatching on each request's `snapshotter`
//!   field as containerd's `plugins/services/snapshots/service.go`; a proxy plugin serves one
//!   snapshotter whatever the field says, as containerd's `contrib/snapshotservice`.
//! - [`SnapshotsClient`] (tonic -> trait) is a [`Snapshotter`] backed by a remote snapshots
//!   service for one snapshotter name, as containerd's `core/snapshots/proxy`: what a proxy
//!   snapshotter plugin is inside berthd, and what the tests use.
//!
//! A snapshotter served by [`SnapshotsService`] and reached through [`SnapshotsClient`]
//! behaves like the snapshotter itself; the conformance suite checks that.
//!
//! [`Snapshotter`]: berth_core::snapshot::Snapshotter

pub mod client;
pub mod server;

pub use client::SnapshotsClient;
pub use server::SnapshotsService;

use std::time::SystemTime;

use berth_core::content::CallContext;
use berth_core::error::{Error, Result};
use berth_core::namespace;
use berth_core::snapshot::{Mount, SnapshotInfo, SnapshotKind, Usage};
use berth_proto::containerd::services::snapshots::v1 as wire;
use berth_proto::containerd::types;

/// containerd sends List results in batches of this many infos.
pub const LIST_BATCH: usize = 100;

/// The caller's namespace and lease, from the request headers (`containerd-namespace`,
/// validated, and `containerd-lease`).
pub fn call_context(metadata: &tonic::metadata::MetadataMap) -> Result<CallContext> {
    Ok(CallContext {
        namespace: namespace::from_metadata(metadata)?,
        lease: namespace::lease_from_metadata(metadata),
    })
}

pub(crate) fn kind_to_wire(kind: SnapshotKind) -> wire::Kind {
    match kind {
        SnapshotKind::Unknown => wire::Kind::Unknown,
        SnapshotKind::View => wire::Kind::View,
        SnapshotKind::Active => wire::Kind::Active,
        SnapshotKind::Committed => wire::Kind::Committed,
    }
}

pub(crate) fn kind_from_wire(kind: i32) -> SnapshotKind {
    match wire::Kind::try_from(kind) {
        Ok(wire::Kind::View) => SnapshotKind::View,
        Ok(wire::Kind::Active) => SnapshotKind::Active,
        Ok(wire::Kind::Committed) => SnapshotKind::Committed,
        _ => SnapshotKind::Unknown,
    }
}

/// An absent timestamp is the epoch (the domain types have no "unset" time).
fn time_from_wire(ts: Option<prost_types::Timestamp>, what: &str) -> Result<SystemTime> {
    match ts {
        None => Ok(SystemTime::UNIX_EPOCH),
        Some(ts) => SystemTime::try_from(ts)
            .map_err(|e| Error::invalid_argument(format!("snapshot {what}: {e}"))),
    }
}

pub(crate) fn info_to_wire(info: SnapshotInfo) -> wire::Info {
    wire::Info {
        name: info.name,
        parent: info.parent.unwrap_or_default(),
        kind: kind_to_wire(info.kind).into(),
        created_at: Some(info.created_at.into()),
        updated_at: Some(info.updated_at.into()),
        labels: info.labels.into_iter().collect(),
    }
}

/// An info from the wire; a bad timestamp is InvalidArgument (the caller decides whose fault
/// that is).
pub(crate) fn info_from_wire(info: wire::Info) -> Result<SnapshotInfo> {
    Ok(SnapshotInfo {
        name: info.name,
        // containerd's empty string is "no parent".
        parent: Some(info.parent).filter(|p| !p.is_empty()),
        kind: kind_from_wire(info.kind),
        created_at: time_from_wire(info.created_at, "created_at")?,
        updated_at: time_from_wire(info.updated_at, "updated_at")?,
        labels: info.labels.into_iter().collect(),
    })
}

/// A mount as the wire carries it (`containerd.types.Mount`).
pub fn mount_to_wire(m: Mount) -> types::Mount {
    types::Mount {
        r#type: m.kind,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

/// A mount from the wire.
pub fn mount_from_wire(m: types::Mount) -> Mount {
    Mount {
        kind: m.r#type,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

pub(crate) fn usage_to_wire(u: Usage) -> wire::UsageResponse {
    wire::UsageResponse {
        size: u.size,
        inodes: u.inodes,
    }
}

/// Fields of a snapshot for filters, as containerd's `adaptSnapshot`: what a snapshotter's
/// `list` passes to [`Filter::matches`](berth_core::filters::Filter::matches).
pub fn info_field(info: &SnapshotInfo, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str)? {
        "name" => Some(info.name.clone()),
        "parent" => info.parent.clone(),
        "kind" => Some(info.kind.name().to_owned()),
        "labels" => info.labels.get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_and_mounts_round_trip() {
        let info = SnapshotInfo {
            name: "a/b".into(),
            parent: None,
            kind: SnapshotKind::View,
            created_at: SystemTime::UNIX_EPOCH + std::time::Duration::new(5, 7),
            updated_at: SystemTime::UNIX_EPOCH + std::time::Duration::new(6, 8),
            labels: [("k".to_owned(), "v".to_owned())].into(),
        };
        let w = info_to_wire(info.clone());
        assert_eq!(w.parent, "");
        assert_eq!(w.kind, wire::Kind::View as i32);
        assert_eq!(info_from_wire(w).expect("back"), info);
        let m = Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec!["lowerdir=/a:/b".into()],
        };
        assert_eq!(mount_from_wire(mount_to_wire(m.clone())), m);
        assert_eq!(kind_from_wire(42), SnapshotKind::Unknown);
    }
}
