//! Progress events, with containerd's vocabulary so `ctr` draws them (bars for
//! `downloading` and `extracting`, a full bar for `complete` and `extracted`, a status line
//! for events without a name).
//!
//! Import reports, per blob read from the archive, `downloading` (bytes so far of its size)
//! then `complete`, or `already exists` when the store had it; per layer unpacked,
//! `extracting` then `extracted` (or `already exists` when its snapshot was there); per
//! image record, `saved`. Status lines: `Importing`, `Completed import`, `Exporting`,
//! `Completed export`. `downloading` is the pull word, reused because `ctr` draws bars only
//! for it; the bytes come from the archive, not a registry.

use crate::oci::Descriptor;

/// Status line: an import started.
pub const IMPORTING: &str = "Importing";
/// Status line: an import finished.
pub const COMPLETED_IMPORT: &str = "Completed import";
/// Status line: an export started.
pub const EXPORTING: &str = "Exporting";
/// Status line: an export finished.
pub const COMPLETED_EXPORT: &str = "Completed export";
/// A blob is being written (progress of total bytes).
pub const DOWNLOADING: &str = "downloading";
/// A blob is stored.
pub const COMPLETE: &str = "complete";
/// A blob or layer snapshot was there before.
pub const ALREADY_EXISTS: &str = "already exists";
/// A layer is being applied.
pub const EXTRACTING: &str = "extracting";
/// A layer is applied and committed.
pub const EXTRACTED: &str = "extracted";
/// An image record was written.
pub const SAVED: &str = "saved";

/// One progress event (containerd's `transfer.Progress`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Progress {
    /// What happened (see the constants of this module).
    pub event: String,
    /// What it happened to (a blob, `layer-sha256:...`, an image name); empty for a status
    /// line.
    pub name: String,
    /// Names of the objects this one belongs to.
    pub parents: Vec<String>,
    /// Bytes done.
    pub progress: u64,
    /// Bytes in all (0 when unknown).
    pub total: u64,
    /// The descriptor concerned, if any.
    pub desc: Option<Descriptor>,
}

impl Progress {
    /// A status line.
    pub fn status(event: &str) -> Progress {
        Progress {
            event: event.to_owned(),
            ..Progress::default()
        }
    }

    /// An event about `name`.
    pub fn about(event: &str, name: impl Into<String>, progress: u64, total: u64) -> Progress {
        Progress {
            event: event.to_owned(),
            name: name.into(),
            progress,
            total,
            ..Progress::default()
        }
    }

    /// The same event with a descriptor.
    pub fn with_desc(mut self, desc: Descriptor) -> Progress {
        self.desc = Some(desc);
        self
    }

    /// The same event with parents.
    pub fn with_parents(mut self, parents: Vec<String>) -> Progress {
        self.parents = parents;
        self
    }
}

/// Receives progress events. Reporting must not block: a sink that forwards over the network
/// queues.
pub trait ProgressSink: Send + Sync {
    /// Handles one event.
    fn report(&self, progress: Progress);
}

impl<F: Fn(Progress) + Send + Sync> ProgressSink for F {
    fn report(&self, progress: Progress) {
        self(progress)
    }
}

/// A sink that drops every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn report(&self, _progress: Progress) {}
}

/// The name containerd gives a blob in progress reports (`remotes.MakeRefKey`):
/// `manifest-`, `index-`, `config-` or `layer-` followed by the digest.
pub fn ref_key(desc: &Descriptor) -> String {
    let kind = if crate::media::is_manifest(&desc.media_type) {
        "manifest"
    } else if crate::media::is_index(&desc.media_type) {
        "index"
    } else if crate::media::is_layer(&desc.media_type) {
        "layer"
    } else if crate::media::is_known_config(&desc.media_type) {
        "config"
    } else {
        "unknown"
    };
    format!("{kind}-{}", desc.digest)
}
