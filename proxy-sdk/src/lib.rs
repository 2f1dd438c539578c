//! The proxy SDK: what a vendor depends on to serve a berth plugin from its own process.
//!
//! A proxy plugin is a process serving one of containerd's gRPC services (snapshots, content)
//! on a unix socket; berthd, or containerd itself, reaches it through `[proxy_plugins.<name>]`
//! in its configuration. This crate holds everything such a process needs, and nothing of the
//! daemon:
//!
//! - the plugin traits and their domain types: [`Snapshotter`], [`ContentStore`],
//!   [`Differ`] with [`CallContext`], [`Error`] and the rest ([`core`] has all of berth-core);
//! - the server adapters ([`snapshots::SnapshotsService`], [`content::ContentService`],
//!   [`diff::DiffService`]) that put an implementation on the wire, and the client adapters
//!   ([`snapshots::SnapshotsClient`], [`content::ContentClient`], [`diff::DiffClient`]) that
//!   make a remote service an implementation again (berthd's proxy plugins are these), with
//!   [`connect`] for a lazily connected, reconnecting channel;
//! - [`Server`], a builder that serves implementations on a unix socket: it refuses to
//!   replace a socket somebody answers on and replaces a stale one, adds the standard gRPC
//!   health service, makes the caller's [`PeerCredentials`] available to the implementation,
//!   and shuts down gracefully on SIGTERM or SIGINT;
//! - the [`conformance`] suites, to check an implementation against the contract.
//!
//! # Example
//!
//! A snapshotter served on a socket (it serves until SIGTERM, hence `no_run`; a vendor puts
//! its own [`Snapshotter`] where the in-memory one of the core's test kit is):
//!
//! ```no_run
//! use berth_proxy_sdk::core::testing::MemorySnapshotter;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     berth_proxy_sdk::Server::new()
//!         .snapshotter(MemorySnapshotter::new())
//!         .serve_unix("/run/my-snapshotter.sock")
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! Inside a call, [`peer_credentials`] tells who is calling (berthd or containerd, usually
//! root). Configure berthd with:
//!
//! ```toml
//! [proxy_plugins.mysn]
//! type = "snapshot"
//! address = "/run/my-snapshotter.sock"
//! ```
//!
//! and use it with `ctr snapshots --snapshotter mysn ...` or
//! `ctr images import --snapshotter mysn ...`. The same binary works as a proxy plugin of
//! containerd (configuration version 2, same section).

pub mod call;
mod channel;
pub mod conformance;
pub mod content;
pub mod diff;
mod peer;
mod server;
pub mod snapshots;

pub use berth_core as core;
pub use berth_core::content::{CallContext, ContentKind, ContentStore, Digest, Info, Status};
pub use berth_core::diff::{Differ, DifferKind};
pub use berth_core::filters::Filter;
pub use berth_core::labels::Labels;
pub use berth_core::snapshot::{Mount, SnapshotInfo, SnapshotKind, Snapshotter, Usage};
pub use berth_core::{Error, ErrorKind, Result, error, namespace, serve};
pub use berth_proto as proto;

pub use async_trait::async_trait;
pub use channel::connect;
pub use peer::{PeerCredentials, peer_credentials, with_peer_credentials};
pub use server::Server;

/// Adds the configured message limits to a generated tonic server.
macro_rules! with_limits {
    ($server:expr, $limits:expr) => {
        $server
            .max_decoding_message_size($limits.max_recv)
            .max_encoding_message_size($limits.max_send)
    };
}
pub(crate) use with_limits;
