//! `containerd.services.diff.v1.Diff`: both adapters of the differ kind.
//!
//! - [`DiffService`] (trait -> tonic) serves one [`Differ`] on the wire: berthd serves its
//!   ordered differs with it, a proxy differ serves itself.
//! - [`DiffClient`] (tonic -> trait) is a [`Differ`] backed by a remote diff service, as
//!   containerd's `core/diff/proxy`: what a `[proxy_plugins]` entry of type `diff` is inside
//!   berthd, and what the tests use.
//!
//! A differ needs a content store: the remote one reads the layers it applies and writes the
//! diffs it computes in a store of its own reach, in the namespace and lease of the call (in a
//! deployment, berthd's content service through [`ContentClient`](crate::content::ContentClient)).
//! Both adapters carry the namespace and lease of every call, so that store sees the caller's.
//!
//! [`Differ`]: berth_core::diff::Differ

pub mod client;
pub mod server;

pub use client::DiffClient;
pub use server::DiffService;

use berth_core::content::Digest;
use berth_core::error::{Error, Result};
use berth_core::snapshot::Descriptor;
use berth_proto::containerd::types::Descriptor as WireDescriptor;

/// A descriptor from the wire; a bad digest or a negative size is InvalidArgument naming
/// `what` (the caller decides whose fault that is).
pub fn descriptor_from_wire(d: WireDescriptor, what: &str) -> Result<Descriptor> {
    let digest = Digest::parse(&d.digest)
        .map_err(|e| Error::invalid_argument(format!("{what} digest: {}", e.message())))?;
    let size = u64::try_from(d.size).map_err(|_| {
        Error::invalid_argument(format!("{what} size {} must not be negative", d.size))
    })?;
    Ok(Descriptor {
        media_type: d.media_type,
        digest,
        size,
        annotations: d.annotations.into_iter().collect(),
    })
}

/// A descriptor on the wire.
pub fn descriptor_to_wire(d: &Descriptor) -> WireDescriptor {
    WireDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: i64::try_from(d.size).unwrap_or(i64::MAX),
        annotations: d.annotations.clone().into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip_and_bad_ones_are_refused() {
        let d = Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: Digest::sha256_of(b"layer"),
            size: 5,
            annotations: [("k".to_owned(), "v".to_owned())].into(),
        };
        assert_eq!(
            descriptor_from_wire(descriptor_to_wire(&d), "layer").expect("back"),
            d
        );
        let mut negative = descriptor_to_wire(&d);
        negative.size = -1;
        let err = descriptor_from_wire(negative, "layer").expect_err("negative size");
        assert!(err.message().contains("layer size -1"), "{err}");
        let mut bad = descriptor_to_wire(&d);
        bad.digest = "sha256:nope".into();
        let err = descriptor_from_wire(bad, "layer").expect_err("bad digest");
        assert!(err.message().contains("layer digest"), "{err}");
    }
}
