//! The "same placement" rows: containerd on a root whose overlayfs `snapshots/` carries
//! ext4's top-directory flag (`chattr +T`), the hint berthd's snapshotters set on their
//! `staging/` (where each snapshot directory is made before it is renamed into place).
//!
//! With the flag, ext4's Orlov allocator chooses a block group afresh for each new snapshot
//! directory (the files below follow it), favouring groups with the fewest directories, instead
//! of the parent's group. On this VM's journal-less ext4 that keeps an unpack out of the group a
//! previous run's removal just emptied, whose recently deleted inodes every allocation there
//! scans (see the report's note on the file system). containerd makes its snapshot directories
//! as `snapshots/new-*` and renames them, so the flag on `snapshots/` reaches them the same
//! way. The flag is set by the same function berthd uses. These rows say how much of a margin
//! is that placement alone; each is measured right after the containerd run it repeats, with
//! the same config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, anyhow};
use berth_integration::{Daemon, Kind};

use crate::{Better, Metric};

/// containerd's overlayfs snapshotter directory under a daemon root.
const OVERLAY_SNAPSHOTS: &str = "io.containerd.snapshotter.v1.overlayfs/snapshots";

/// A daemon root whose overlayfs `snapshots/` is made ahead with `chattr +T`; removed on drop.
struct FlaggedRoot {
    dir: tempfile::TempDir,
}

impl FlaggedRoot {
    /// Makes the root under /tmp (beside the daemons' own directories); `None`, said loudly,
    /// where the file system does not take the flag (the rows then stay unmeasured).
    fn new() -> Result<Option<FlaggedRoot>> {
        let dir = tempfile::Builder::new()
            .prefix("berth-bench-root-")
            .tempdir_in("/tmp")?;
        let snapshots = dir.path().join("root").join(OVERLAY_SNAPSHOTS);
        std::fs::create_dir_all(&snapshots)?;
        if !berth_snapshot_native::fsutil::mark_top_of_hierarchies(&snapshots)? {
            eprintln!(
                "berth-bench: SKIPPED the same-placement rows: the file system of /tmp does not \
                 take FS_TOPDIR_FL"
            );
            return Ok(None);
        }
        Ok(Some(FlaggedRoot { dir }))
    }

    /// The root to give the daemon.
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs `measure` on a release containerd on a flagged root with `extra` config (as
/// [`crate::images::release_daemon`] for every bench daemon) and records its seconds under
/// both `names`; records nothing where /tmp does not take the flag.
pub(crate) fn measure_containerd(
    out: &mut BTreeMap<&'static str, f64>,
    names: [&'static str; 2],
    extra: &str,
    measure: impl FnOnce(&Daemon) -> Result<f64>,
) -> Result<()> {
    let Some(root) = FlaggedRoot::new()? else {
        return Ok(());
    };
    let d = crate::images::release_daemon(Kind::Containerd, extra, Some(root.root()))?;
    let secs = measure(&d)?;
    retire_with_root(d, root);
    for name in names {
        out.insert(name, secs);
    }
    Ok(())
}

/// Stops the daemon, removes its directory and the root, and flushes the file system, as
/// every other run ends.
fn retire_with_root(d: Daemon, root: FlaggedRoot) {
    drop(d);
    let path = root.path().to_path_buf();
    if let Err(e) = root.dir.close() {
        eprintln!("berth-bench: removing {}: {e}", path.display());
    }
    if let Err(e) = Command::new("sync").status() {
        eprintln!("berth-bench: sync: {e}");
    }
}

/// The two rows of a workload, `[ctr, berth]`: times in seconds, lower is better, no target
/// (the targets compare with containerd as shipped; these are context).
pub(crate) fn metrics(names: [&'static str; 2], methods: [&'static str; 2]) -> [Metric; 2] {
    let row = |name, method| Metric {
        name,
        unit: "s",
        target_ratio: None,
        better: Better::Lower,
        method,
    };
    [row(names[0], methods[0]), row(names[1], methods[1])]
}

/// berthd's figures of this run (`from`, same order) stand for the rows `names`: berthd always
/// sets the flag.
pub(crate) fn copy_berthd_figures(
    out: &mut BTreeMap<&'static str, f64>,
    from: [&str; 2],
    names: [&'static str; 2],
) -> Result<()> {
    for (from, name) in from.into_iter().zip(names) {
        let secs = out
            .get(from)
            .copied()
            .ok_or_else(|| anyhow!("no {from} measurement to reuse"))?;
        out.insert(name, secs);
    }
    Ok(())
}

/// What the methods of the rows say about the flagged root (a macro, so `concat!` takes it).
macro_rules! flagged_root_method {
    () => {
        "containerd runs on a root whose `io.containerd.snapshotter.v1.overlayfs/snapshots` \
         was made beforehand with `chattr +T` (ext4's FS_TOPDIR_FL), the hint berthd's \
         snapshotters set on their `staging/`: ext4 then places each new snapshot directory \
         in a block group chosen afresh (favouring those with the fewest directories) instead \
         of the group a previous run's removal just emptied (see the note on this machine's \
         file system). It runs right after the containerd run it repeats, with the same \
         config. berthd's column is its figure of the same run from the row named, since \
         berthd always sets the flag. The row says how much of that row's margin is the \
         placement alone."
    };
}
pub(crate) use flagged_root_method;
