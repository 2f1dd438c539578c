//! The proxy SDK: what a vendor depends on to serve a berth plugin from its own process.
//!
//! Today it re-exports the core's domain types, errors and the unix-socket serving lifecycle
//! ([`serve`]: refuses a live socket, replaces a stale one, shuts down without hanging), and
//! the wire types ([`proto`]). The plugin traits, their client and server adapters and the
//! conformance suites join it as each plugin kind lands (content, snapshotters, differs).

pub mod conformance;

pub use berth_core::{Error, ErrorKind, Result, error, namespace, serve};
pub use berth_proto as proto;
