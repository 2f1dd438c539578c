//! berth's core: the parts every plugin stands on and nothing else.
//!
//! - [`registry`]: plugin registrations, dependency order, init outcomes and typed lookups;
//! - [`config`]: the TOML configuration (containerd's keys), its migrations and warnings;
//! - [`content`]: the content store plugin kind (digests, ingests, the trait);
//! - [`diff`]: the differ plugin kind (apply layers, compare mounts);
//! - [`error`]: the one error vocabulary and its one mapping to and from gRPC status codes;
//! - [`metadata`]: namespaced records in sled, with a schema version and group-committed flushes;
//! - [`events`]: the in-process event exchange;
//! - [`filters`]: containerd's filter language for List calls and subscriptions;
//! - [`snapshot`]: the snapshotter plugin kind (mounts, snapshot info, the trait);
//! - [`serve`]: the unix-socket gRPC server lifecycle shared by berthd and proxy plugins.
//!
//! Storage, snapshots, images, tasks and the gRPC services are plugins outside this crate.

pub mod config;
pub mod content;
pub mod diff;
pub mod dynamic;
pub mod error;
pub mod events;
pub mod filters;
pub mod labels;
pub mod metadata;
pub mod mount;
pub mod namespace;
pub mod registry;
pub mod serve;
pub mod snapshot;
pub mod testing;

pub use error::{Error, ErrorKind, Result};
