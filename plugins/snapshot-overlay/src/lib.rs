//! berth's `overlayfs` snapshotter, plugin `io.containerd.snapshotter.v1.overlayfs`, in
//! containerd's layout (`plugins/snapshots/overlay/overlay.go`):
//!
//! ```text
//! <root>/snapshots/<id>/fs     the snapshot's layer: its upper dir while active, a lower
//!                              dir of its children once committed
//! <root>/snapshots/<id>/work   overlay's work dir (active snapshots only)
//! ```
//!
//! Mounts, exactly as containerd's:
//!
//! - no parent: one `bind` of `fs` with `rw` (a view: `ro`) and `rbind`;
//! - an active snapshot with parents: `overlay` with `workdir=`, `upperdir=`,
//!   `lowerdir=<parent fs>:<grandparent fs>:...` (nearest first), then the extra options;
//! - a view of one committed layer: a read-only `bind` of that layer's `fs`;
//! - a view of several: `overlay` with only `lowerdir=` (overlay is read-only without an
//!   upper dir).
//!
//! Extra overlay options (never added to binds) are the configured `mount_options`, plus
//! `index=off` when the kernel has the `index` feature and no `index` option is configured
//! (containerd: one lower dir shared by many overlays must not be claimed by an index),
//! plus `userxattr` when running in a user namespace on a kernel that needs it.
//!
//! **Lower dir limits.** The kernel takes mount data of at most one page and stacks at most
//! 500 lower dirs. containerd's mount code shortens long `lowerdir=` strings by changing into
//! the directory the layers share and naming them relatively (`12/fs:11/fs`); a snapshot
//! whose mount data would not fit a page even so, or that has more than 500 layers, is
//! refused by Prepare and View with ResourceExhausted naming the limit, instead of failing
//! later at mount time.
//!
//! **Support.** The plugin skips (with the reason, shown by introspection) when `overlay` is
//! not in `/proc/filesystems` or a test mount of an overlay with two lower dirs and an upper
//! dir on the snapshotter's root fails (as containerd's `SupportsMultipleLowerDir`): the
//! root's file system cannot hold upper dirs (an overlay itself, no `d_type`), or berth lacks
//! the privilege to mount.
//!
//! Configuration, `[plugins."io.containerd.snapshotter.v1.overlayfs"]`: `root_path`,
//! `upperdir_label` (Stat, Update and List add `containerd.io/snapshot/overlay.upperdir`
//! with the snapshot's own `fs` path, as containerd), `sync_remove` (delete directories during
//! Remove; default: at the next Cleanup, which garbage collection runs), `mount_options`,
//! and `slow_chown`, accepted for compatibility and unused: berth does not remap ids for user
//! namespaces, so it never needs the recursive chown that option allows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_core::error::{Error, ErrorKind, Result};
use berth_core::labels::Labels;
use berth_core::registry::{InitError, Instance, PluginType, Registration};
use berth_core::snapshot::{Mount, SnapshotKind, SnapshotterKind};
use berth_snapshot_native::engine::{DirSnapshotter, EngineOptions, Layout, Paths};
use berth_snapshot_native::fsutil::FsError;
use berth_snapshot_native::storage::Snapshot;
use serde::{Deserialize, Serialize};

/// The label `upperdir_label` adds: the snapshot's own layer directory.
pub const UPPERDIR_LABEL: &str = "containerd.io/snapshot/overlay.upperdir";

/// The most lower dirs the kernel stacks (`OVL_MAX_STACK`).
pub const MAX_LOWER_DIRS: usize = 500;

/// `[plugins."io.containerd.snapshotter.v1.overlayfs"]`, containerd's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OverlayConfig {
    /// Where snapshots live; empty means the plugin's root directory.
    pub root_path: String,
    /// Report each snapshot's upper dir as the label [`UPPERDIR_LABEL`].
    pub upperdir_label: bool,
    /// Remove directories during Remove instead of at the next Cleanup.
    pub sync_remove: bool,
    /// Accepted for compatibility with containerd's configuration; unused (berth does not
    /// remap ids, so there is nothing to chown).
    pub slow_chown: bool,
    /// Extra options for overlay mounts (not binds).
    pub mount_options: Vec<String>,
}

/// The overlay layout: `fs/` and `work/` per snapshot.
#[derive(Debug, Clone)]
pub struct OverlayLayout {
    upperdir_label: bool,
    options: Vec<String>,
    page_size: usize,
}

impl OverlayLayout {
    /// A layout adding `options` to overlay mounts.
    pub fn new(upperdir_label: bool, options: Vec<String>) -> Self {
        let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(4096);
        OverlayLayout {
            upperdir_label,
            options,
            page_size,
        }
    }

    fn fs(paths: &Paths, id: u64) -> PathBuf {
        paths.snapshot(id).join("fs")
    }

    fn work(paths: &Paths, id: u64) -> PathBuf {
        paths.snapshot(id).join("work")
    }

    /// The overlay options of a snapshot, or None when it is a bind.
    fn overlay_options(
        &self,
        paths: &Paths,
        id: u64,
        kind: SnapshotKind,
        parent_ids: &[u64],
        lowerdir: impl Fn(u64) -> String,
    ) -> Option<Vec<String>> {
        if parent_ids.is_empty() || (kind != SnapshotKind::Active && parent_ids.len() == 1) {
            return None;
        }
        let mut options = Vec::new();
        if kind == SnapshotKind::Active {
            options.push(format!("workdir={}", Self::work(paths, id).display()));
            options.push(format!("upperdir={}", Self::fs(paths, id).display()));
        }
        let lowers: Vec<String> = parent_ids.iter().map(|&p| lowerdir(p)).collect();
        options.push(format!("lowerdir={}", lowers.join(":")));
        options.extend(self.options.iter().cloned());
        Some(options)
    }
}

fn bind(source: PathBuf, flag: &str) -> Vec<Mount> {
    vec![Mount {
        kind: "bind".to_owned(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![flag.to_owned(), "rbind".to_owned()],
    }]
}

impl Layout for OverlayLayout {
    fn needs_dir(&self, _kind: SnapshotKind, _parent_ids: &[u64]) -> bool {
        true
    }

    fn check(&self, paths: &Paths, kind: SnapshotKind, parent_ids: &[u64]) -> Result<()> {
        if parent_ids.len() > MAX_LOWER_DIRS {
            return Err(Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "a snapshot on {} layers cannot be mounted: overlay stacks at most \
                     {MAX_LOWER_DIRS} lower dirs",
                    parent_ids.len()
                ),
            ));
        }
        // The shortest mount data a mounter can pass: lower dirs relative to snapshots/, as
        // containerd's compactLowerdirOption does; the new snapshot's id is not known yet,
        // so the longest id stands in for it.
        let Some(options) =
            self.overlay_options(paths, u64::MAX, kind, parent_ids, |p| format!("{p}/fs"))
        else {
            return Ok(());
        };
        let data = options.join(",");
        // The kernel copies one page, which must hold the terminating NUL too.
        if data.len() >= self.page_size {
            return Err(Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "a snapshot on {} layers cannot be mounted: its overlay mount data would be \
                     {} bytes even with relative lower dirs, and the kernel accepts at most {} \
                     (one page)",
                    parent_ids.len(),
                    data.len(),
                    self.page_size - 1
                ),
            ));
        }
        Ok(())
    }

    fn populate(
        &self,
        paths: &Paths,
        kind: SnapshotKind,
        parent_ids: &[u64],
        dir: &Path,
    ) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let mkdir = |path: &Path, mode: u32| {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(path)
                .map_err(|e| FsError::new("create directory", path, e))
        };
        mkdir(dir, 0o700)?;
        let fs = dir.join("fs");
        mkdir(&fs, 0o755)?;
        if kind == SnapshotKind::Active {
            mkdir(&dir.join("work"), 0o711)?;
        }
        self.adopt_spare(paths, parent_ids, dir)
    }

    fn spare_fits(&self, kind: SnapshotKind, _parent_ids: &[u64]) -> bool {
        // An active snapshot's directories do not depend on its parents (only the owner of
        // its upper dir does, set by `adopt_spare`).
        kind == SnapshotKind::Active
    }

    fn adopt_spare(&self, paths: &Paths, parent_ids: &[u64], dir: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        if let Some(&parent) = parent_ids.first() {
            // As containerd: the upper dir's root gets the owner of the parent's root, so the
            // merged root keeps it (overlay shows the upper dir's root attributes).
            let fs = dir.join("fs");
            let parent_fs = Self::fs(paths, parent);
            let meta = std::fs::metadata(&parent_fs)
                .map_err(|e| FsError::new("stat parent", &parent_fs, e))?;
            std::os::unix::fs::lchown(&fs, Some(meta.uid()), Some(meta.gid()))
                .map_err(|e| FsError::new("change owner", &fs, e))?;
        }
        Ok(())
    }

    fn mounts(&self, paths: &Paths, snapshot: &Snapshot) -> Vec<Mount> {
        let flag = if snapshot.kind == SnapshotKind::View {
            "ro"
        } else {
            "rw"
        };
        match self.overlay_options(
            paths,
            snapshot.id,
            snapshot.kind,
            &snapshot.parent_ids,
            |p| Self::fs(paths, p).display().to_string(),
        ) {
            Some(options) => vec![Mount {
                kind: "overlay".to_owned(),
                source: "overlay".to_owned(),
                target: String::new(),
                options,
            }],
            None => match snapshot.parent_ids.first() {
                // A view of one layer: that layer, read-only.
                Some(&parent) => bind(Self::fs(paths, parent), "ro"),
                None => bind(Self::fs(paths, snapshot.id), flag),
            },
        }
    }

    fn usage_dir(&self, paths: &Paths, id: u64) -> PathBuf {
        Self::fs(paths, id)
    }

    fn report_labels(&self, paths: &Paths, id: u64, labels: &mut Labels) {
        if self.upperdir_label {
            labels.insert(
                UPPERDIR_LABEL.to_owned(),
                Self::fs(paths, id).display().to_string(),
            );
        }
    }
}

/// The overlay snapshotter.
pub type OverlaySnapshotter = DirSnapshotter<OverlayLayout>;

/// An overlay snapshotter rooted at `root` whose overlay mounts get `options` (nothing is
/// touched until it is opened or used; see [`host_mount_options`] for what containerd adds).
pub fn overlay(
    root: impl Into<PathBuf>,
    upperdir_label: bool,
    sync_remove: bool,
    options: Vec<String>,
) -> OverlaySnapshotter {
    DirSnapshotter::new(
        root,
        OverlayLayout::new(upperdir_label, options),
        EngineOptions { sync_remove },
    )
}

/// Whether `key` is among `options`, bare or as `key=value`.
fn has_option(options: &[String], key: &str) -> bool {
    options
        .iter()
        .any(|o| o == key || o.split_once('=').is_some_and(|(k, _)| k == key))
}

/// `configured` plus what containerd adds for this host: `index=off` when the kernel has
/// overlay's index feature (unless an `index` option is configured; the kernel takes the
/// last one), `userxattr` inside a user namespace on Linux 5.11 or later (not on tmpfs).
/// Blocking (reads `/sys` and `/proc`).
pub fn host_mount_options(root: &Path, configured: &[String]) -> Vec<String> {
    let mut options = configured.to_vec();
    if !has_option(&options, "userxattr") && needs_userxattr(root) {
        options.push("userxattr".to_owned());
    }
    if !has_option(&options, "index") && Path::new("/sys/module/overlay/parameters/index").exists()
    {
        options.push("index=off".to_owned());
    }
    options
}

fn in_user_namespace() -> bool {
    // The initial namespace maps every id: "0 0 4294967295".
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let fields: Vec<&str> = map.split_whitespace().collect();
            fields != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

fn needs_userxattr(root: &Path) -> bool {
    if !in_user_namespace() {
        return false;
    }
    let on_tmpfs = nix::sys::statfs::statfs(root)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false);
    if on_tmpfs {
        return false;
    }
    // containerd's fast path; older kernels with a backported user-namespace overlay are
    // not probed (berth runs as real root).
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    version >= (5, 11)
}

/// Whether overlay works for snapshots under `root` (creating `root`): `Err` says why not.
/// Blocking; mounts and unmounts a test overlay under `root`.
pub fn check_support(root: &Path) -> std::result::Result<(), String> {
    let filesystems = std::fs::read_to_string("/proc/filesystems")
        .map_err(|e| format!("cannot read /proc/filesystems: {e}"))?;
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        return Err("overlay is not in /proc/filesystems (is the overlay module loaded?)".into());
    }
    std::fs::create_dir_all(root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let td = root.join(format!("overlay-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&td);
    let result = (|| {
        for d in ["lower1", "lower2", "upper", "work", "merged"] {
            std::fs::create_dir_all(td.join(d))
                .map_err(|e| format!("cannot create {}: {e}", td.join(d).display()))?;
        }
        let data = format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            td.join("lower2").display(),
            td.join("lower1").display(),
            td.join("upper").display(),
            td.join("work").display()
        );
        let merged = td.join("merged");
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| {
            format!(
                "a test overlay with two lower dirs and an upper dir on {} does not mount ({e}): \
                 the file system cannot hold overlay upper dirs, or berth may not mount",
                root.display()
            )
        })?;
        if let Err(e) = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %merged.display(), error = %e, "cannot unmount the overlay check");
        }
        Ok(())
    })();
    if let Err(e) = std::fs::remove_dir_all(&td) {
        tracing::warn!(path = %td.display(), error = %e, "cannot remove the overlay check directory");
    }
    result
}

/// `io.containerd.snapshotter.v1.overlayfs`: skips when overlay does not work on the root;
/// exports `root` and the host platform, as containerd.
pub fn registration() -> Registration {
    Registration::new(PluginType::SNAPSHOTTER, "overlayfs", |ctx| async move {
        let config: OverlayConfig = ctx.config()?;
        let root = berth_snapshot_native::configured_root(&config.root_path, ctx.root());
        if config.slow_chown {
            tracing::info!(
                "overlayfs slow_chown is set: accepted and unused (berth does not remap ids)"
            );
        }
        let probe_root = root.clone();
        let configured = config.mount_options.clone();
        let options = tokio::task::spawn_blocking(move || {
            check_support(&probe_root)?;
            Ok::<_, String>(host_mount_options(&probe_root, &configured))
        })
        .await
        .map_err(|e| InitError::Failed(Error::internal(format!("overlay check task: {e}"))))?
        .map_err(InitError::Skip)?;
        let shared = ctx.shared_metadata();
        let snapshotter = overlay(
            root.clone(),
            config.upperdir_label,
            config.sync_remove,
            options,
        )
        .with_shared_metadata(shared.clone());
        snapshotter.open().await.map_err(|e| {
            Error::new(
                berth_core::error::Classify::kind(&e),
                format!(
                    "overlayfs snapshotter at {}: {}",
                    root.display(),
                    e.message()
                ),
            )
        })?;
        // Opened by the snapshotter just now: a lookup, no IO.
        shared.db()?.declare_co_flushed_snapshotter("overlayfs");
        ctx.set_meta(|meta| {
            meta.platforms.push(berth_snapshot_native::host_platform());
            meta.exports
                .insert("root".to_owned(), root.display().to_string());
        });
        Ok(Instance::new::<SnapshotterKind>(Arc::new(snapshotter)))
    })
    .with_config::<OverlayConfig>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::error::Classify;

    fn layout() -> OverlayLayout {
        OverlayLayout {
            upperdir_label: false,
            options: vec!["index=off".into()],
            page_size: 4096,
        }
    }

    fn snap(id: u64, kind: SnapshotKind, parent_ids: &[u64]) -> Snapshot {
        Snapshot {
            id,
            kind,
            parent_ids: parent_ids.to_vec(),
        }
    }

    #[test]
    fn mounts_as_containerd_overlay() {
        let p = Paths::new("/r");
        let l = layout();
        let m = l.mounts(&p, &snap(1, SnapshotKind::Active, &[]));
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("bind", "/r/snapshots/1/fs")
        );
        assert_eq!(m[0].options, ["rw", "rbind"]);
        let m = l.mounts(&p, &snap(3, SnapshotKind::Active, &[2, 1]));
        assert_eq!(m[0].kind, "overlay");
        assert_eq!(
            m[0].options,
            [
                "workdir=/r/snapshots/3/work",
                "upperdir=/r/snapshots/3/fs",
                "lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs",
                "index=off"
            ]
        );
        let m = l.mounts(&p, &snap(4, SnapshotKind::View, &[2]));
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("bind", "/r/snapshots/2/fs")
        );
        assert_eq!(m[0].options, ["ro", "rbind"]);
        let m = l.mounts(&p, &snap(5, SnapshotKind::View, &[2, 1]));
        assert_eq!(
            m[0].options,
            ["lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs", "index=off"]
        );
        let m = l.mounts(&p, &snap(6, SnapshotKind::View, &[]));
        assert_eq!(m[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn too_many_or_too_long_lower_dirs_are_refused() {
        let p = Paths::new("/r");
        let l = layout();
        let ids: Vec<u64> = (1..=MAX_LOWER_DIRS as u64 + 1).collect();
        let err = l
            .check(&p, SnapshotKind::Active, &ids)
            .expect_err("too deep");
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
        assert!(err.message().contains("500"), "{err}");
        // 400 layers with 7-digit ids: "1234567/fs:" is 11 bytes each, over a page.
        let ids: Vec<u64> = (0..400).map(|i| 1_000_000 + i).collect();
        let err = l.check(&p, SnapshotKind::View, &ids).expect_err("too long");
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
        assert!(err.message().contains("one page"), "{err}");
        // 128 layers fit once relative, however long the root.
        let long = Paths::new(format!("/{}", "r".repeat(200)));
        let ids: Vec<u64> = (1..=128).collect();
        l.check(&long, SnapshotKind::Active, &ids)
            .expect("128 layers fit");
    }

    #[test]
    fn options_are_recognised_bare_or_with_values() {
        let o = vec!["index=on".to_owned(), "userxattr".to_owned()];
        assert!(has_option(&o, "index"));
        assert!(has_option(&o, "userxattr"));
        assert!(!has_option(&o, "metacopy"));
        assert_eq!(host_mount_options(Path::new("/"), &o), o);
    }

    #[test]
    fn upperdir_label_names_the_layer() {
        let l = OverlayLayout {
            upperdir_label: true,
            ..layout()
        };
        let mut labels = Labels::new();
        l.report_labels(&Paths::new("/r"), 9, &mut labels);
        assert_eq!(labels[UPPERDIR_LABEL], "/r/snapshots/9/fs");
    }
}
