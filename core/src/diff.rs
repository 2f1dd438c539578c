//! The differ plugin kind: applying layers to mounts, and diffing mounts into layers.
//!
//! # Contract (as containerd's `diff.Applier` and `diff.Comparer`)
//!
//! - [`Differ::apply`] reads the layer `desc` from the content store of the call's namespace,
//!   decompresses it (by magic number), unpacks it into `mounts` (OCI whiteouts honoured,
//!   nothing written outside the mount root), and returns the descriptor of the uncompressed
//!   layer (its digest is the diff id the caller verifies against the image config). A differ
//!   that cannot handle these mounts or this media type answers NotImplemented, and the
//!   diff service tries the next one.
//! - [`Differ::compare`] writes the difference between `lower` and `upper` as a layer into
//!   the content store and returns its descriptor.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::content::CallContext;
use crate::error::Result;
use crate::labels::Labels;
use crate::registry::{PluginKind, PluginType};
use crate::snapshot::{Descriptor, Mount};

/// Options of an apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Flush the target file system (syncfs) before returning (PR 9401).
    pub sync_fs: bool,
    /// Differ-specific payloads by name: (type URL, bytes).
    pub payloads: BTreeMap<String, (String, Vec<u8>)>,
}

/// Options of a compare.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffOptions {
    /// Media type of the layer to write (default: gzip-compressed OCI layer).
    pub media_type: Option<String>,
    /// Ingest reference to write under.
    pub reference: Option<String>,
    /// Labels of the written blob.
    pub labels: Labels,
    /// Clamp timestamps to this time (reproducible layers).
    pub source_date_epoch: Option<SystemTime>,
}

/// A differ (see the module documentation for the contract).
#[async_trait::async_trait]
pub trait Differ: Send + Sync {
    /// Applies the layer `desc` to `mounts`; returns the uncompressed layer's descriptor.
    async fn apply(
        &self,
        cx: &CallContext,
        desc: &Descriptor,
        mounts: &[Mount],
        options: &ApplyOptions,
    ) -> Result<Descriptor>;
    /// Writes the difference of `upper` over `lower` as a layer; returns its descriptor.
    async fn compare(
        &self,
        cx: &CallContext,
        lower: &[Mount],
        upper: &[Mount],
        options: &DiffOptions,
    ) -> Result<Descriptor>;
}

/// Typed lookup of differs in the registry.
pub struct DifferKind;
impl PluginKind for DifferKind {
    const TYPE: PluginType = PluginType::DIFFER;
    type Object = dyn Differ;
}
