//! The snapshotter plugin kind: mounts, snapshot info, and the [`Snapshotter`] trait.
//!
//! # Contract (as containerd's `snapshots.Snapshotter`)
//!
//! A snapshotter manages file system snapshots addressed by key:
//!
//! - [`Snapshotter::prepare`] creates an *active* snapshot `key` on top of the committed
//!   snapshot `parent` (or empty without one) and returns the mounts that present it writable.
//!   [`Snapshotter::view`] does the same read-only (a *view*). An existing key is AlreadyExists;
//!   a parent that does not exist or is not committed is NotFound / InvalidArgument.
//! - [`Snapshotter::commit`] turns the active snapshot `key` into the committed snapshot `name`
//!   (AlreadyExists if `name` exists); `key` is gone afterwards. Views cannot be committed.
//! - [`Snapshotter::remove`] deletes a snapshot; one that is the parent of another is
//!   FailedPrecondition.
//! - [`Snapshotter::mounts`] returns the mounts of an active snapshot or a view again.
//! - Stat, Update (labels only: `labels` or `labels.<key>`), Usage, List (with filters on
//!   `name`, `parent`, `kind`, `labels.<key>`) and Cleanup (drop what Remove left behind).
//!
//! Mounts are data, not mounted file systems: whoever uses them mounts them. Backends see
//! whatever keys the caller chose; the core's metadata wrapper gives each namespace its own
//! keys, records labels, leases and events, and removes snapshots through garbage collection.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use crate::content::CallContext;
use crate::error::Result;
use crate::filters::Filter;
use crate::labels::Labels;
use crate::registry::{PluginKind, PluginType};

/// A mount to perform: `mount -t <kind> -o <options> <source> <target>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mount {
    /// File system type (`bind`, `overlay`, `erofs`, ...).
    pub kind: String,
    /// Source (a directory, a device, or `overlay`).
    pub source: String,
    /// Target inside the mount point, for multi-mount stacks; usually empty.
    pub target: String,
    /// Mount options (`ro`, `rbind`, `lowerdir=...`).
    pub options: Vec<String>,
}

impl Mount {
    /// The same mount made read-only, as containerd's `WithReadonlyTempMount` (PR 8259): an
    /// overlay drops its upper and work dirs, the upper dir joining the lower dirs at the
    /// top; any other mount gets `ro` instead of `rw`.
    pub fn read_only(&self) -> Mount {
        let mut m = self.clone();
        if m.kind == "overlay" {
            let mut upper = None;
            let mut lower = None;
            let mut options = Vec::new();
            for o in &self.options {
                if let Some(u) = o.strip_prefix("upperdir=") {
                    upper = Some(u.to_owned());
                } else if o.starts_with("workdir=") {
                } else if let Some(l) = o.strip_prefix("lowerdir=") {
                    lower = Some(l.to_owned());
                } else if o != "rw" {
                    options.push(o.clone());
                }
            }
            let lowers = match (upper, lower) {
                (Some(u), Some(l)) => Some(format!("{u}:{l}")),
                (Some(u), None) => Some(u),
                (None, l) => l,
            };
            if let Some(l) = lowers {
                options.push(format!("lowerdir={l}"));
            }
            m.options = options;
        } else {
            m.options.retain(|o| o != "rw" && o != "ro");
            m.options.push("ro".to_owned());
        }
        m
    }
}

/// What state a snapshot is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotKind {
    /// Unknown (never stored).
    Unknown,
    /// A read-only view.
    View,
    /// Writable, not yet committed.
    Active,
    /// Committed, immutable, usable as a parent.
    Committed,
}

impl SnapshotKind {
    /// containerd's name for the kind, used in filters (`kind==committed`).
    pub fn name(self) -> &'static str {
        match self {
            SnapshotKind::Unknown => "unknown",
            SnapshotKind::View => "view",
            SnapshotKind::Active => "active",
            SnapshotKind::Committed => "committed",
        }
    }
}

impl fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A snapshot as Stat and List report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its key (active, view) or name (committed).
    pub name: String,
    /// The committed snapshot it is based on, if any.
    pub parent: Option<String>,
    /// Its state.
    pub kind: SnapshotKind,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it last changed.
    pub updated_at: SystemTime,
    /// Its labels.
    pub labels: Labels,
}

/// Disk usage of a snapshot's own layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Bytes.
    pub size: i64,
    /// Inodes.
    pub inodes: i64,
}

/// A snapshotter (see the module documentation for the contract).
#[async_trait::async_trait]
pub trait Snapshotter: Send + Sync {
    /// Info of the snapshot `key`.
    async fn stat(&self, cx: &CallContext, key: &str) -> Result<SnapshotInfo>;
    /// Changes labels; returns the new info.
    async fn update(
        &self,
        cx: &CallContext,
        info: SnapshotInfo,
        fieldpaths: &[String],
    ) -> Result<SnapshotInfo>;
    /// Disk usage of the snapshot's own layer.
    async fn usage(&self, cx: &CallContext, key: &str) -> Result<Usage>;
    /// The mounts of an active snapshot or a view.
    async fn mounts(&self, cx: &CallContext, key: &str) -> Result<Vec<Mount>>;
    /// Creates the active snapshot `key` on `parent`.
    async fn prepare(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>>;
    /// Creates the read-only view `key` of `parent`.
    async fn view(
        &self,
        cx: &CallContext,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>>;
    /// Commits the active snapshot `key` as `name`.
    async fn commit(&self, cx: &CallContext, name: &str, key: &str, labels: Labels) -> Result<()>;
    /// Removes a snapshot without children.
    async fn remove(&self, cx: &CallContext, key: &str) -> Result<()>;
    /// Every snapshot matching `filter`.
    async fn list(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<SnapshotInfo>>;
    /// Releases what removals left behind (directories, mounts).
    async fn cleanup(&self, _cx: &CallContext) -> Result<()> {
        Ok(())
    }
}

/// Typed lookup of snapshotters in the registry.
pub struct SnapshotterKind;
impl PluginKind for SnapshotterKind {
    const TYPE: PluginType = PluginType::SNAPSHOTTER;
    type Object = dyn Snapshotter;
}

/// A content descriptor (OCI): what a layer, config or manifest is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Its media type.
    pub media_type: String,
    /// Its digest.
    pub digest: crate::content::Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(kind: &str, options: &[&str]) -> Mount {
        Mount {
            kind: kind.into(),
            source: "src".into(),
            target: String::new(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn read_only_overlay_drops_upper_and_work() {
        let m = mount(
            "overlay",
            &["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"],
        )
        .read_only();
        assert_eq!(m.options, ["index=off", "lowerdir=/u:/l1:/l2"]);
        let only_upper = mount("overlay", &["workdir=/w", "upperdir=/u"]).read_only();
        assert_eq!(only_upper.options, ["lowerdir=/u"]);
    }

    #[test]
    fn read_only_bind_gets_ro_once() {
        assert_eq!(
            mount("bind", &["rbind", "rw"]).read_only().options,
            ["rbind", "ro"]
        );
        assert_eq!(
            mount("bind", &["rbind", "ro"]).read_only().options,
            ["rbind", "ro"]
        );
    }
}
