//! Temporary read-only mounts for Compare, made in a private mount namespace.
//!
//! containerd mounts the two snapshots on temporary directories of the host's mount table
//! and unmounts them afterwards; a daemon that dies in between leaves them mounted. Here the
//! thread that diffs first moves into a mount namespace of its own ([`PrivateNamespace`]):
//! nothing it mounts is visible to, or propagates into, the host, and everything it mounted
//! goes away with the thread even if the daemon is killed. Inside it, a small tmpfs over the
//! differ's mount directory holds the mount points, so no directory is ever left behind
//! either. Mounts are still undone explicitly ([`Mounted`] unmounts when dropped), on every
//! path out, errors included.
//!
//! Mounts are made read-only as containerd's `WithReadonlyTempMount` (PR 8259,
//! [`Mount::read_only`]): an overlay loses its upper and work directories (the upper one
//! joins the lower ones), anything else gets `ro`. The mounting itself is
//! [`berth_core::mount`].

use std::io;
use std::path::{Path, PathBuf};

use berth_core::snapshot::Mount;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, Result};

/// The calling thread's own mount namespace, with a tmpfs over `dir` for mount points.
///
/// Only for a thread that does nothing else afterwards: its mount namespace and working
/// directory are no longer the process's.
pub(crate) struct PrivateNamespace {
    dir: PathBuf,
}

impl PrivateNamespace {
    /// Moves the calling thread into a new mount namespace where every mount is private, and
    /// mounts a tmpfs on `dir` (which must exist).
    pub(crate) fn enter(dir: &Path) -> Result<PrivateNamespace> {
        let fail = |what: &str, errno: Errno| Error::Mount {
            what: what.to_owned(),
            source: io::Error::from(errno),
        };
        // Unsharing the namespace also gives this thread its own root and working directory
        // (CLONE_FS), so chdir below affects no other thread.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(|e| fail("enter a private mount namespace (needs CAP_SYS_ADMIN)", e))?;
        nix::mount::mount::<str, str, str, str>(
            None,
            "/",
            None,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None,
        )
        .map_err(|e| fail("make the private mount namespace's mounts private", e))?;
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0700,size=64k"),
        )
        .map_err(|e| fail(&format!("mount a tmpfs on {}", dir.display()), e))?;
        Ok(PrivateNamespace {
            dir: dir.to_owned(),
        })
    }

    /// A new, empty directory for mount points.
    pub(crate) fn mount_point(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::create_dir(&path).map_err(|source| Error::Mount {
            what: format!("create the mount point {}", path.display()),
            source,
        })?;
        Ok(path)
    }
}

impl Drop for PrivateNamespace {
    fn drop(&mut self) {
        // The namespace dies with the thread anyway; unmounting now frees the tmpfs early.
        if let Err(e) = nix::mount::umount2(&self.dir, MntFlags::MNT_DETACH) {
            tracing::debug!(dir = %self.dir.display(), "unmount the diff tmpfs: {e}");
        }
    }
}

pub(crate) use berth_core::mount::Mounted;

/// Mounts `mounts` read-only on `target` (each joined with its own `target`, for stacks), in
/// order. On failure what was mounted is unmounted.
pub(crate) fn mount_read_only(mounts: &[Mount], target: &Path) -> Result<Mounted> {
    berth_core::mount::mount_all(mounts, target, |m, at| mount_one(&read_only(m), at))
}

/// [`Mount::read_only`], without the overlay options that need an upper directory.
fn read_only(m: &Mount) -> Mount {
    let mut ro = m.read_only();
    if ro.kind == "overlay" {
        ro.options.retain(|o| o != "volatile");
    }
    ro
}

fn mount_one(m: &Mount, target: &Path) -> Result<()> {
    if m.options.iter().any(|o| o == "loop") {
        return Err(Error::Mount {
            what: format!("mount -t {} {} {}", m.kind, m.source, target.display()),
            source: io::Error::new(
                io::ErrorKind::Unsupported,
                "loop mounts are not supported by the walking differ",
            ),
        });
    }
    berth_core::mount::mount(m, target).map_err(|e| Error::Mount {
        what: e.what,
        source: io::Error::from(e.errno),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn mounts_become_read_only() {
        let overlay = Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: strings(&["volatile", "workdir=/w", "upperdir=/u", "lowerdir=/l"]),
        };
        assert_eq!(read_only(&overlay).options, ["lowerdir=/u:/l"]);
        let bind = Mount {
            kind: "bind".into(),
            source: "/s".into(),
            target: String::new(),
            options: strings(&["rbind", "rw"]),
        };
        let (flags, _) = berth_core::mount::parse_options(&read_only(&bind).options);
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_BIND));
    }
}
