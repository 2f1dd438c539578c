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
//! joins the lower ones), anything else gets `ro`. Options are split into flags and data as
//! containerd's `parseMountOptions`; a read-only bind is remounted read-only, since the kernel
//! ignores `MS_RDONLY` when it binds.

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

/// Mounts made on one target; unmounted, last first, when dropped.
#[derive(Debug)]
pub(crate) struct Mounted {
    targets: Vec<PathBuf>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        while let Some(target) = self.targets.pop() {
            if let Err(e) = unmount(&target) {
                tracing::warn!(target = %target.display(), "unmount after diff: {e}");
            }
        }
    }
}

fn unmount(target: &Path) -> nix::Result<()> {
    match nix::mount::umount2(target, MntFlags::empty()) {
        // Busy: nothing else runs in this namespace, but a lazy unmount is always safe here.
        Err(Errno::EBUSY) => nix::mount::umount2(target, MntFlags::MNT_DETACH),
        other => other,
    }
}

/// Mounts `mounts` read-only on `target` (each joined with its own `target`, for stacks), in
/// order. On failure what was mounted is unmounted.
pub(crate) fn mount_read_only(mounts: &[Mount], target: &Path) -> Result<Mounted> {
    let mut mounted = Mounted {
        targets: Vec::new(),
    };
    for m in mounts {
        let at = if m.target.is_empty() {
            target.to_owned()
        } else {
            target.join(m.target.trim_start_matches('/'))
        };
        mount_one(&read_only(m), &at)?;
        mounted.targets.push(at);
    }
    Ok(mounted)
}

/// [`Mount::read_only`], without the overlay options that need an upper directory.
fn read_only(m: &Mount) -> Mount {
    let mut ro = m.read_only();
    if ro.kind == "overlay" {
        ro.options.retain(|o| o != "volatile");
    }
    ro
}

const PROPAGATION: MsFlags = MsFlags::MS_SHARED
    .union(MsFlags::MS_PRIVATE)
    .union(MsFlags::MS_SLAVE)
    .union(MsFlags::MS_UNBINDABLE);

/// Splits options into flags and file system data, as containerd's `parseMountOptions`.
fn parse_options(options: &[String]) -> (MsFlags, Vec<String>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (clear, flag) = match o.as_str() {
            "async" => (true, MsFlags::MS_SYNCHRONOUS),
            "atime" => (true, MsFlags::MS_NOATIME),
            "bind" => (false, MsFlags::MS_BIND),
            "defaults" => (false, MsFlags::empty()),
            "dev" => (true, MsFlags::MS_NODEV),
            "diratime" => (true, MsFlags::MS_NODIRATIME),
            "dirsync" => (false, MsFlags::MS_DIRSYNC),
            "exec" => (true, MsFlags::MS_NOEXEC),
            "mand" => (false, MsFlags::MS_MANDLOCK),
            "noatime" => (false, MsFlags::MS_NOATIME),
            "nodev" => (false, MsFlags::MS_NODEV),
            "nodiratime" => (false, MsFlags::MS_NODIRATIME),
            "noexec" => (false, MsFlags::MS_NOEXEC),
            "nomand" => (true, MsFlags::MS_MANDLOCK),
            "norelatime" => (true, MsFlags::MS_RELATIME),
            "nostrictatime" => (true, MsFlags::MS_STRICTATIME),
            "nosuid" => (false, MsFlags::MS_NOSUID),
            "rbind" => (false, MsFlags::MS_BIND | MsFlags::MS_REC),
            "relatime" => (false, MsFlags::MS_RELATIME),
            "remount" => (false, MsFlags::MS_REMOUNT),
            "ro" => (false, MsFlags::MS_RDONLY),
            "rw" => (true, MsFlags::MS_RDONLY),
            "strictatime" => (false, MsFlags::MS_STRICTATIME),
            "suid" => (true, MsFlags::MS_NOSUID),
            "sync" => (false, MsFlags::MS_SYNCHRONOUS),
            "private" => (false, MsFlags::MS_PRIVATE),
            "rprivate" => (false, MsFlags::MS_PRIVATE | MsFlags::MS_REC),
            "shared" => (false, MsFlags::MS_SHARED),
            "rshared" => (false, MsFlags::MS_SHARED | MsFlags::MS_REC),
            "slave" => (false, MsFlags::MS_SLAVE),
            "rslave" => (false, MsFlags::MS_SLAVE | MsFlags::MS_REC),
            "unbindable" => (false, MsFlags::MS_UNBINDABLE),
            "runbindable" => (false, MsFlags::MS_UNBINDABLE | MsFlags::MS_REC),
            _ => {
                data.push(o.clone());
                continue;
            }
        };
        if clear {
            flags.remove(flag);
        } else {
            flags.insert(flag);
        }
    }
    (flags, data)
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(4096)
}

/// containerd's `compactLowerdirOption`: when overlay data would not fit a page, name the
/// lower directories relative to the directory they share. Returns that directory and the
/// new data, or None when they share none.
fn compact_lowerdirs(data: &[String]) -> Option<(PathBuf, Vec<String>)> {
    let idx = data.iter().position(|o| o.starts_with("lowerdir="))?;
    let dirs: Vec<&str> = data[idx]["lowerdir=".len()..].split(':').collect();
    if dirs.len() < 2 {
        return None;
    }
    let (min, max) = (dirs.iter().min()?, dirs.iter().max()?);
    let common_len = min
        .bytes()
        .zip(max.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    // Back to a whole directory: "snapshots/1" is a string prefix of "snapshots/12".
    let common = Path::new(&min[..common_len]).parent()?;
    let common_str = common.to_str()?;
    if common_str.is_empty() || common_str == "/" {
        return None;
    }
    let prefix = format!("{common_str}/");
    let relative: Vec<&str> = dirs
        .iter()
        .map(|d| d.strip_prefix(&prefix).filter(|r| !r.is_empty()))
        .collect::<Option<_>>()?;
    let mut out: Vec<String> = data
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != idx)
        .map(|(_, o)| o.clone())
        .collect();
    out.push(format!("lowerdir={}", relative.join(":")));
    Some((common.to_owned(), out))
}

fn mount_one(m: &Mount, target: &Path) -> Result<()> {
    let describe = |data: &str| {
        format!(
            "mount -t {} {} {} -o {data:?}",
            m.kind,
            m.source,
            target.display()
        )
    };
    let (flags, mut data) = parse_options(&m.options);
    if data.iter().any(|o| o == "loop") {
        return Err(Error::Mount {
            what: describe(&data.join(",")),
            source: io::Error::new(
                io::ErrorKind::Unsupported,
                "loop mounts are not supported by the walking differ",
            ),
        });
    }
    let mut chdir = None;
    if m.kind == "overlay" {
        let size: usize = data.iter().map(String::len).sum();
        if size >= page_size().saturating_sub(512)
            && let Some((dir, compacted)) = compact_lowerdirs(&data)
        {
            chdir = Some(dir);
            data = compacted;
        }
    }
    let data = data.join(",");
    let is_bind = flags.contains(MsFlags::MS_BIND);
    let fstype = (!is_bind && m.kind != "bind").then_some(m.kind.as_str());
    let first = flags.difference(PROPAGATION);
    let fail = |what: String, errno: Errno| Error::Mount {
        what,
        source: io::Error::from(errno),
    };
    if let Some(dir) = &chdir {
        // This thread has its own working directory (see PrivateNamespace::enter).
        nix::unistd::chdir(dir.as_path())
            .map_err(|e| fail(format!("change into {}", dir.display()), e))?;
    }
    let result = nix::mount::mount(
        Some(m.source.as_str()),
        target,
        fstype,
        first,
        (!data.is_empty()).then_some(data.as_str()),
    );
    if chdir.is_some() {
        let _ = nix::unistd::chdir("/");
    }
    result.map_err(|e| fail(describe(&data), e))?;
    let undo = |what: String, errno: Errno| {
        let _ = unmount(target);
        fail(what, errno)
    };
    if flags.intersects(PROPAGATION) {
        let pflags = flags & (PROPAGATION | MsFlags::MS_REC | MsFlags::MS_SILENT);
        nix::mount::mount::<str, Path, str, str>(None, target, None, pflags, None)
            .map_err(|e| undo(format!("set propagation of {}", target.display()), e))?;
    }
    if is_bind && flags.contains(MsFlags::MS_RDONLY) {
        nix::mount::mount::<str, Path, str, str>(
            None,
            target,
            None,
            first | MsFlags::MS_REMOUNT,
            None,
        )
        .map_err(|e| undo(format!("remount {} read-only", target.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) = parse_options(&strings(&["rbind", "ro", "index=off", "rw"]));
        assert_eq!(flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(data, ["index=off"]);
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
        let (flags, _) = parse_options(&read_only(&bind).options);
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_BIND));
    }

    #[test]
    fn lowerdirs_are_made_relative_to_their_common_directory() {
        let (dir, data) = compact_lowerdirs(&strings(&[
            "lowerdir=/r/snapshots/12/fs:/r/snapshots/11/fs:/r/snapshots/1/fs",
            "index=off",
        ]))
        .expect("compacted");
        assert_eq!(dir, Path::new("/r/snapshots"));
        assert_eq!(data, ["index=off", "lowerdir=12/fs:11/fs:1/fs"]);
        assert!(compact_lowerdirs(&strings(&["lowerdir=/a"])).is_none());
        assert!(compact_lowerdirs(&strings(&["lowerdir=/a/x:/b/y"])).is_none());
    }
}
