//! berth's `native` snapshotter, plugin `io.containerd.snapshotter.v1.native`, and the
//! directory snapshotter engine it shares with `overlayfs`.
//!
//! `native` works on any file system and needs no privilege beyond mounting binds: each
//! snapshot is a plain directory, `snapshots/<id>/`, and preparing a snapshot on a parent
//! copies the parent's whole tree ([`fsutil::copy_tree`]: modes, owners, xattrs, times,
//! symlinks, hard links, devices). As containerd's `plugins/snapshots/native`:
//!
//! - mounts are one `bind` mount with `rbind` and `rw` (a view: `ro`) of the snapshot's
//!   directory; a view of a parent binds the parent's directory read-only instead of copying
//!   it (a committed snapshot never changes);
//! - Usage of an active snapshot walks its directory (which holds the full copy); a committed
//!   one reports what was measured at commit; a view reports zero;
//! - Remove deletes the directory at once.
//!
//! The engine ([`engine`]), its metadata ([`storage`]) and the copy and usage helpers
//! ([`fsutil`]) are public so the overlay snapshotter reuses them, as containerd's
//! snapshotters share `core/snapshots/storage`.
//!
//! Configuration, `[plugins."io.containerd.snapshotter.v1.native"]`: `root_path` (default:
//! the plugin's root, `<root>/io.containerd.snapshotter.v1.native`).

pub mod engine;
pub mod fsutil;
pub mod storage;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_core::error::{Error, Result};
use berth_core::registry::{Instance, PluginType, Registration};
use berth_core::snapshot::{Mount, SnapshotKind, SnapshotterKind};
use serde::{Deserialize, Serialize};

use engine::{DirSnapshotter, EngineOptions, Layout, Paths};
use storage::Snapshot;

/// The native layout: a snapshot's directory is its tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct NativeLayout;

impl Layout for NativeLayout {
    fn needs_dir(&self, kind: SnapshotKind, parent_ids: &[u64]) -> bool {
        kind == SnapshotKind::Active || parent_ids.is_empty()
    }

    fn spare_fits(&self, _kind: SnapshotKind, parent_ids: &[u64]) -> bool {
        // Without a parent there is nothing to copy: an empty directory either way.
        parent_ids.is_empty()
    }

    fn populate(
        &self,
        paths: &Paths,
        _kind: SnapshotKind,
        parent_ids: &[u64],
        dir: &Path,
    ) -> Result<()> {
        match parent_ids.first() {
            Some(&parent) => Ok(fsutil::copy_tree(&paths.snapshot(parent), dir)?),
            None => {
                use std::os::unix::fs::DirBuilderExt;
                // 0755 as containerd (and as a fresh root file system expects).
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(dir)
                    .map_err(|e| fsutil::FsError::new("create directory", dir, e))?;
                Ok(())
            }
        }
    }

    fn mounts(&self, paths: &Paths, snapshot: &Snapshot) -> Vec<Mount> {
        let (source, flag) = match (snapshot.kind, snapshot.parent_ids.first()) {
            (SnapshotKind::View, Some(&parent)) => (paths.snapshot(parent), "ro"),
            (SnapshotKind::View, None) => (paths.snapshot(snapshot.id), "ro"),
            _ => (paths.snapshot(snapshot.id), "rw"),
        };
        vec![Mount {
            kind: "bind".to_owned(),
            source: source.display().to_string(),
            target: String::new(),
            options: vec!["rbind".to_owned(), flag.to_owned()],
        }]
    }

    fn usage_dir(&self, paths: &Paths, id: u64) -> PathBuf {
        paths.snapshot(id)
    }
}

/// The native snapshotter.
pub type NativeSnapshotter = DirSnapshotter<NativeLayout>;

/// A native snapshotter rooted at `root` (nothing is touched until it is opened or used).
pub fn native(root: impl Into<PathBuf>) -> NativeSnapshotter {
    DirSnapshotter::new(
        root,
        NativeLayout,
        EngineOptions {
            // containerd's native removes the tree during Remove.
            sync_remove: true,
        },
    )
}

/// `[plugins."io.containerd.snapshotter.v1.native"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NativeConfig {
    /// Where snapshots live; empty means the plugin's root directory.
    pub root_path: String,
}

/// The platform this host runs, `linux/<arch>` in OCI's architecture names, as containerd's
/// `platforms.DefaultSpec()` reports for snapshotters.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

/// The snapshotter's root: `root_path` when configured, else the plugin's root.
pub fn configured_root(root_path: &str, plugin_root: &Path) -> PathBuf {
    if root_path.is_empty() {
        plugin_root.to_owned()
    } else {
        PathBuf::from(root_path)
    }
}

/// `io.containerd.snapshotter.v1.native`: opens (creating) the root at init; exports `root`
/// and the host platform, as containerd.
pub fn registration() -> Registration {
    Registration::new(PluginType::SNAPSHOTTER, "native", |ctx| async move {
        let config: NativeConfig = ctx.config()?;
        let root = configured_root(&config.root_path, ctx.root());
        let shared = ctx.shared_metadata();
        let snapshotter = native(root.clone()).with_shared_metadata(shared.clone());
        snapshotter.open().await.map_err(|e| {
            Error::new(
                berth_core::error::Classify::kind(&e),
                format!("native snapshotter at {}: {}", root.display(), e.message()),
            )
        })?;
        // Opened by the snapshotter just now: a lookup, no IO.
        shared.db()?.declare_co_flushed_snapshotter("native");
        ctx.set_meta(|meta| {
            meta.platforms.push(host_platform());
            meta.exports
                .insert("root".to_owned(), root.display().to_string());
        });
        Ok(Instance::new::<SnapshotterKind>(Arc::new(snapshotter)))
    })
    .with_config::<NativeConfig>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_names_the_os_and_an_oci_arch() {
        let p = host_platform();
        assert!(p.starts_with("linux/"), "{p}");
        assert!(!p.ends_with("x86_64"), "{p}");
    }

    #[test]
    fn mounts_as_containerd_native() {
        let paths = Paths::new("/r");
        let m = NativeLayout.mounts(
            &paths,
            &Snapshot {
                id: 7,
                kind: SnapshotKind::View,
                parent_ids: vec![3, 1],
            },
        );
        assert_eq!(m[0].source, "/r/snapshots/3");
        assert_eq!(m[0].options, ["rbind", "ro"]);
        let m = NativeLayout.mounts(
            &paths,
            &Snapshot {
                id: 7,
                kind: SnapshotKind::Active,
                parent_ids: vec![3],
            },
        );
        assert_eq!(m[0].source, "/r/snapshots/7");
        assert_eq!(m[0].options, ["rbind", "rw"]);
    }

    #[tokio::test]
    async fn staging_is_the_top_of_unrelated_hierarchies() {
        use berth_core::error::{Classify, ErrorKind};
        use rustix::fs::{IFlags, ioctl_getflags};
        let dir = tempfile::tempdir().expect("tempdir");
        if !fsutil::file_system_takes_topdir(dir.path()) {
            eprintln!(
                "SKIPPED: the file system of {} does not take FS_TOPDIR_FL; the snapshotter \
                 leaves placement to it there",
                dir.path().display()
            );
            return;
        }
        let staging_flags = || {
            let staging = std::fs::File::open(dir.path().join("native/staging")).expect("staging");
            ioctl_getflags(&staging).expect("flags of staging/")
        };
        let sn = native(dir.path().join("native"));
        sn.open().await.expect("open");
        let flags = staging_flags();
        assert!(
            flags.contains(IFlags::TOPDIR),
            "staging/ should carry FS_TOPDIR_FL, has {flags:?}"
        );
        // Reopening (a restart empties and remakes staging/) marks the new one again. sled's
        // background flusher can hold the file lock a moment after the first one is dropped.
        drop(sn);
        let mut reopened = false;
        for _ in 0..40 {
            let sn = native(dir.path().join("native"));
            match sn.open().await {
                Ok(()) => {
                    reopened = true;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Unavailable => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
        assert!(reopened, "the store stayed locked");
        assert!(staging_flags().contains(IFlags::TOPDIR));
    }

    #[tokio::test]
    async fn a_directory_left_by_a_crash_does_not_block_its_id() {
        use berth_core::content::CallContext;
        use berth_core::snapshot::Snapshotter;
        let dir = tempfile::tempdir().expect("tempdir");
        let sn = native(dir.path().join("native"));
        sn.open().await.expect("open");
        // What a kill -9 between a creation's rename and its record's flush leaves: the
        // directory of the next id, which the store hands out again.
        let leftover = dir.path().join("native/snapshots/1");
        std::fs::create_dir_all(leftover.join("old")).expect("leftover");
        std::fs::write(leftover.join("old/file"), b"x").expect("leftover file");
        let mounts = sn
            .prepare(&CallContext::default(), "k", None, Default::default())
            .await
            .expect("prepare over the leftover");
        assert_eq!(mounts[0].source, leftover.to_string_lossy());
        assert!(
            !leftover.join("old").exists(),
            "the new snapshot starts empty"
        );
    }
}
