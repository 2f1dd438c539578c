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
//!
//! HTTP is reqwest over rustls with the `ring` provider; TLS settings are per host.

pub mod auth;
pub mod client;
pub mod digest;
pub mod error;
pub mod hosts;
pub mod platform;
pub mod reference;
pub mod tls;

#[cfg(test)]
mod fake;

pub use auth::Credentials;
pub use client::{BlobStream, Client, ClientOptions, Resume};
pub use digest::{Descriptor, Digest, Platform, media_types};
pub use error::{Error, Result};
pub use hosts::{Capabilities, RegistryHost, Scheme};
pub use platform::select_manifest;
pub use reference::Reference;
pub use sha2::Sha256;
