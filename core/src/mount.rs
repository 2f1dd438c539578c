//! Performing a [`Mount`] on Linux as containerd's `mount.Mount.Mount` does, and undoing it:
//! the one implementation behind every crate that mounts what a snapshotter returns (the
//! walking differ's Compare, the snapshotter conformance suite).
//!
//! - Options are split into mount flags (`ro`, `rbind`, `nosuid`, ...) and file-system data
//!   (`lowerdir=...`, `index=off`, ...) as containerd's `parseMountOptions`; propagation
//!   options are applied in a second call, and a read-only bind is remounted read-only (the
//!   kernel ignores `MS_RDONLY` on the first bind call).
//! - Overlay data longer than a page minus 512 bytes is shortened as containerd's
//!   `compactLowerdirOption`: the lower dirs are named relative to the directory they share,
//!   and the mount runs on a helper thread that changed into it (after `unshare(CLONE_FS)`,
//!   so no other thread's working directory moves). The helper inherits the calling thread's
//!   mount namespace.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::snapshot::Mount;

/// A mount or unmount the kernel refused: what was asked, and the error number (callers
/// tell "cannot mount here" (EPERM, ENODEV) from real failures by it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {errno}")]
pub struct MountError {
    /// The operation, as a command line would say it.
    pub what: String,
    /// Why the kernel refused.
    pub errno: Errno,
}

const PROPAGATION: MsFlags = MsFlags::MS_SHARED
    .union(MsFlags::MS_PRIVATE)
    .union(MsFlags::MS_SLAVE)
    .union(MsFlags::MS_UNBINDABLE);

/// Splits options into flags and file-system data, as containerd's `parseMountOptions`.
pub fn parse_options(options: &[String]) -> (MsFlags, Vec<String>) {
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

/// containerd's `compactLowerdirOption`: the directory the lower dirs share and the data
/// with lower dirs relative to it, or None when they share nothing usable.
pub fn compact_lowerdirs(data: &[String]) -> Option<(PathBuf, Vec<String>)> {
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
    // Back to a whole directory: ids are digits, so "snapshots/1" may be a string prefix of
    // "snapshots/12" and "snapshots/13".
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

/// Mounts `m` on `target` (see the module documentation). On a failure after the first
/// mount call, `target` is unmounted again.
pub fn mount(m: &Mount, target: &Path) -> Result<(), MountError> {
    let (flags, mut data) = parse_options(&m.options);
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
    let what = format!(
        "mount -t {} {} {} -o {data:?}",
        m.kind,
        m.source,
        target.display()
    );
    if data.len() > page_size() {
        return Err(MountError {
            what: format!("{what}: the data is more than a page"),
            errno: Errno::E2BIG,
        });
    }
    let is_bind = flags.contains(MsFlags::MS_BIND);
    let fstype = (!is_bind && m.kind != "bind").then(|| m.kind.clone());
    let first = flags.difference(PROPAGATION);
    let (source, at) = (m.source.clone(), target.to_owned());
    let call = move || {
        nix::mount::mount(
            Some(source.as_str()),
            &at,
            fstype.as_deref(),
            first,
            (!data.is_empty()).then_some(data.as_str()),
        )
    };
    let result = match chdir {
        None => call(),
        // Relative lower dirs resolve against the working directory, which must not move for
        // any other thread: a thread of its own with its own fs context.
        Some(dir) => std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)?;
            nix::unistd::chdir(&dir)?;
            call()
        })
        .join()
        .unwrap_or(Err(Errno::EINTR)),
    };
    result.map_err(|errno| MountError { what, errno })?;
    let undo = |what: String, errno: Errno| {
        let _ = unmount(target);
        MountError { what, errno }
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

/// Mounts made on one target, unmounted last first when dropped, so every path out of the
/// caller (errors and panics included) unmounts.
#[derive(Debug)]
pub struct Mounted {
    targets: Vec<PathBuf>,
}

impl Mounted {
    /// Unmounts now, reporting the first failure (dropping unmounts too, logging failures).
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.unmount_all()
    }

    fn unmount_all(&mut self) -> Result<(), MountError> {
        let mut first_error = None;
        while let Some(target) = self.targets.pop() {
            if let Err(e) = unmount(&target) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_all() {
            tracing::warn!("{e}");
        }
    }
}

/// Mounts each of `mounts` on `target` joined with the mount's own `target` (for stacks), in
/// order, with `mount_one` (usually [`mount`] after checks of the caller's own); on failure,
/// unmounts what it mounted.
pub fn mount_all<E>(
    mounts: &[Mount],
    target: &Path,
    mut mount_one: impl FnMut(&Mount, &Path) -> Result<(), E>,
) -> Result<Mounted, E> {
    let mut mounted = Mounted {
        targets: Vec::new(),
    };
    for m in mounts {
        let at = if m.target.is_empty() {
            target.to_owned()
        } else {
            target.join(m.target.trim_start_matches('/'))
        };
        mount_one(m, &at)?;
        mounted.targets.push(at);
    }
    Ok(mounted)
}

/// Unmounts `target`, retrying a busy one for up to a second, then detaching it.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    for _ in 0..50 {
        match nix::mount::umount2(target, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(Errno::EBUSY) => std::thread::sleep(Duration::from_millis(20)),
            Err(errno) => {
                return Err(MountError {
                    what: format!("unmount {}", target.display()),
                    errno,
                });
            }
        }
    }
    nix::mount::umount2(target, MntFlags::MNT_DETACH).map_err(|errno| MountError {
        what: format!("unmount (detach) {}", target.display()),
        errno,
    })
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
    fn lowerdirs_are_made_relative_to_their_common_directory() {
        let (dir, data) = compact_lowerdirs(&strings(&[
            "workdir=/r/snapshots/13/work",
            "lowerdir=/r/snapshots/12/fs:/r/snapshots/11/fs:/r/snapshots/1/fs",
            "index=off",
        ]))
        .expect("compacted");
        assert_eq!(dir, Path::new("/r/snapshots"));
        assert_eq!(
            data,
            [
                "workdir=/r/snapshots/13/work",
                "index=off",
                "lowerdir=12/fs:11/fs:1/fs"
            ]
        );
        assert!(compact_lowerdirs(&strings(&["lowerdir=/a"])).is_none());
        assert!(compact_lowerdirs(&strings(&["lowerdir=/a/x:/b/y"])).is_none());
        assert!(compact_lowerdirs(&strings(&["lowerdir=/a/x:/a/"])).is_none());
    }
}
