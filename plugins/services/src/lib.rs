//! berth's basic gRPC service plugins (`io.containerd.grpc.v1.<id>`): version, introspection,
//! namespaces, health, events, leases, content and snapshots. Each is a thin adapter from containerd's wire API to the core.

pub mod content;
pub mod diff;
pub mod diff_client;
pub mod events;
pub mod health;
pub mod images;
pub mod introspection;
pub mod leases;
pub mod namespaces;
pub mod snapshots;
pub mod streaming;
pub mod transfer;
pub mod version;

use berth_core::registry::Registration;

/// berth's release version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git revision berth was built from ("unknown" outside a checkout).
pub const REVISION: &str = env!("BERTH_REVISION");

/// The registrations of every service in this crate.
pub fn registrations() -> Vec<Registration> {
    vec![
        version::registration(),
        introspection::registration(),
        namespaces::registration(),
        events::registration(),
        leases::registration(),
        content::registration(),
        snapshots::registration(),
        diff::service_registration(),
        diff::registration(),
        images::registration(),
        streaming::manager_registration(),
        streaming::registration(),
        transfer::registration(),
        health::registration(),
    ]
}

/// Adds the configured message limits to a generated tonic server.
macro_rules! with_limits {
    ($server:expr, $limits:expr) => {
        $server
            .max_decoding_message_size($limits.max_recv)
            .max_encoding_message_size($limits.max_send)
    };
}
pub(crate) use with_limits;
