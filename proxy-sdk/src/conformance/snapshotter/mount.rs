//! Performing [`Mount`]s for tests and undoing them: the snapshotter suite mounts what
//! snapshotters return to check file contents through them. The mounting itself is
//! [`berth_core::mount`]; this adds what a test needs: telling "cannot mount here" (not root,
//! no overlay support) from a failure, and a guard that unmounts on every path out of a
//! test, errors and panics included.
//!
//! Mounts happen in the caller's mount namespace.

use std::path::Path;

use berth_core::snapshot::Mount;
use nix::errno::Errno;

/// Why a mount could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountError {
    /// This process cannot mount this kind of file system here (not root, no overlay
    /// support): a test should report a skip, loudly.
    Unsupported(String),
    /// The mount failed.
    Failed(String),
}

impl std::fmt::Display for MountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountError::Unsupported(why) | MountError::Failed(why) => f.write_str(why),
        }
    }
}

/// Why this process cannot mount at all (not root), or None.
pub fn cannot_mount() -> Option<String> {
    if nix::unistd::geteuid().is_root() {
        None
    } else {
        Some("not running as root: mounts cannot be made".to_owned())
    }
}

/// Whether the kernel lists `fstype` in `/proc/filesystems`.
pub fn kernel_supports(fstype: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split_whitespace().last() == Some(fstype))
    })
}

pub use berth_core::mount::Mounted;

/// Mounts each of `mounts` on `target` (joined with a mount's own `target`, for stacks), in
/// order; on failure, undoes what it mounted.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<Mounted, MountError> {
    if let Some(why) = cannot_mount() {
        return Err(MountError::Unsupported(why));
    }
    berth_core::mount::mount_all(mounts, target, mount_one)
}

fn mount_one(m: &Mount, target: &Path) -> Result<(), MountError> {
    if m.kind == "overlay" && !kernel_supports("overlay") {
        return Err(MountError::Unsupported(
            "overlay is not in /proc/filesystems".to_owned(),
        ));
    }
    berth_core::mount::mount(m, target).map_err(|e| {
        if e.errno == Errno::EPERM || e.errno == Errno::ENODEV {
            MountError::Unsupported(e.to_string())
        } else {
            MountError::Failed(e.to_string())
        }
    })
}
