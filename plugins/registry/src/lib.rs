//! berth's OCI distribution registry client.
//!
//! - [`Reference`]: image references with Docker Hub normalisation.
//! - [`hosts`]: `config_path/<host>/hosts.toml` (mirrors, capabilities, CA and client
//!   certificates, `skip_verify`, plain HTTP, headers), as containerd reads it.
//! - [`select_manifest`]: the manifest of a platform in an index.
//! - [`Client`]: resolve a tag to a descriptor, fetch manifests and blobs as streams verified
//!   against their digest (resumable from an offset with `Range`), push blobs and manifests.
//! - [`auth`]: anonymous, basic and bearer authentication; tokens are cached per scope until
//!   they expire, and a 401 carrying `error=` on a request that used a token drops it and
//!   fetches a new one once (containerd PR 10065), a second one is
//!   [`Error::Unauthorized`] naming the registry and scope.
//! - [`ranged`]: multipart fetch (containerd PR 10177), a blob as parallel `Range` GETs
//!   stitched in order, one stream when the registry ignores `Range`.
//!
//! - [`debug`]: `--http-dump` (request and response heads, secrets redacted, to a
//!   [`DumpSink`]) and `--http-trace` (connection timing in the debug log), containerd PR 10762.
//!
//! HTTP is reqwest over rustls with the `ring` provider; TLS settings are per host.

pub mod auth;
pub mod client;
pub mod debug;
pub mod digest;
pub mod error;
pub mod hosts;
pub mod platform;
pub mod ranged;
pub mod reference;
pub mod tls;

#[cfg(test)]
mod fake;

pub use auth::Credentials;
pub use client::{BlobStream, Client, ClientOptions, FetchOptions, Prefix, Resume};
pub use debug::DumpSink;
pub use digest::{Descriptor, Digest, Platform, media_types};
pub use error::{Error, Result};
pub use hosts::{Capabilities, RegistryHost, Scheme};
pub use platform::select_manifest;
pub use ranged::Multipart;
pub use reference::Reference;
pub use sha2::Sha256;
