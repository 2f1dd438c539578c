//! Performing [`Mount`]s for tests, as containerd's `mount.Mount.Mount` does on Linux, and
//! undoing them: the snapshotter suite mounts what snapshotters return to check file
//! contents through them.
//!
//! - Options are split into mount flags (`ro`, `rbind`, `nosuid`, ...) and file-system data
//!   (`lowerdir=...`, `index=off`, ...); propagation options are applied in a second call, and
//!   a read-only bind is remounted read-only (the kernel ignores `MS_RDONLY` on the first bind
//!   call).
//! - Overlay data longer than a page minus 512 bytes is shortened as containerd's
//!   `compactLowerdirOption`: the lower dirs are named relative to the directory they share,
//!   and the mount runs on a helper thread that changed into it (after `unshare(CLONE_FS)`,
//!   so the process's working directory is untouched).
//!
//! Mounts happen in the caller's mount namespace; [`Mounted`] unmounts when dropped, so every
//! path out of a test (errors and panics included) unmounts.

use std::path::{Path, PathBuf};

use berth_core::snapshot::Mount;
use nix::mount::{MntFlags, MsFlags};

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

/// Mounts made on one target; unmounted (last first) when dropped.
#[derive(Debug)]
pub struct Mounted {
    targets: Vec<PathBuf>,
}

impl Mounted {
    /// Unmounts now, reporting a failure (dropping unmounts too, logging failures).
    pub fn unmount(mut self) -> Result<(), String> {
        self.unmount_all()
    }

    fn unmount_all(&mut self) -> Result<(), String> {
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
            eprintln!("conformance: {e}");
        }
    }
}

/// Unmounts `target`, retrying a busy one briefly, then detaching it.
pub fn unmount(target: &Path) -> Result<(), String> {
    for _ in 0..50 {
        match nix::mount::umount2(target, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(format!("unmount {}: {e}", target.display())),
        }
    }
    nix::mount::umount2(target, MntFlags::MNT_DETACH)
        .map_err(|e| format!("unmount (detach) {}: {e}", target.display()))
}

/// Mounts each of `mounts` on `target` (joined with a mount's own `target`, for stacks), in
/// order; on failure, undoes what it mounted.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<Mounted, MountError> {
    if let Some(why) = cannot_mount() {
        return Err(MountError::Unsupported(why));
    }
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

const PROPAGATION: MsFlags = MsFlags::MS_SHARED
    .union(MsFlags::MS_PRIVATE)
    .union(MsFlags::MS_SLAVE)
    .union(MsFlags::MS_UNBINDABLE);

/// Splits options into flags and data, as containerd's `parseMountOptions`.
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
    // Back to a whole directory: ids are digits, so "snapshots/1" may be a shared prefix of
    // "snapshots/12" and "snapshots/13".
    let common = Path::new(&min[..common_len]).parent()?;
    let common_str = common.to_str()?;
    if common_str.is_empty() || common_str == "/" {
        return None;
    }
    let prefix = format!("{common_str}/");
    let relative: Option<Vec<&str>> = dirs.iter().map(|d| d.strip_prefix(&prefix)).collect();
    let relative = relative?;
    if relative.iter().any(|d| d.is_empty()) {
        return None;
    }
    let mut out: Vec<String> = data
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != idx)
        .map(|(_, o)| o.clone())
        .collect();
    out.push(format!("lowerdir={}", relative.join(":")));
    Some((common.to_owned(), out))
}

fn mount_one(m: &Mount, target: &Path) -> Result<(), MountError> {
    let (flags, mut data) = parse_options(&m.options);
    let mut chdir = None;
    if m.kind == "overlay" {
        if !kernel_supports("overlay") {
            return Err(MountError::Unsupported(
                "overlay is not in /proc/filesystems".to_owned(),
            ));
        }
        let size: usize = data.iter().map(String::len).sum();
        if size >= page_size().saturating_sub(512)
            && let Some((dir, compacted)) = compact_lowerdirs(&data)
        {
            chdir = Some(dir);
            data = compacted;
        }
    }
    let data = data.join(",");
    if data.len() > page_size() {
        return Err(MountError::Failed(format!(
            "mount data for {} is {} bytes, more than a page",
            target.display(),
            data.len()
        )));
    }
    let is_bind = flags.contains(MsFlags::MS_BIND);
    let fstype = if is_bind || m.kind == "bind" {
        None
    } else {
        Some(m.kind.clone())
    };
    let first = flags.difference(PROPAGATION);
    let source = m.source.clone();
    let target_owned = target.to_owned();
    let data_opt = (!data.is_empty()).then_some(data.clone());
    let call = move || {
        nix::mount::mount(
            Some(source.as_str()),
            &target_owned,
            fstype.as_deref(),
            first,
            data_opt.as_deref(),
        )
    };
    let result = match chdir {
        None => call(),
        Some(dir) => {
            // Relative lower dirs resolve against the working directory, which must not move
            // for the rest of the process: a thread of its own with its own fs context.
            std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)?;
                nix::unistd::chdir(&dir)?;
                call()
            })
            .join()
            .unwrap_or(Err(nix::errno::Errno::EINTR))
        }
    };
    result.map_err(|e| {
        let what = format!(
            "mount -t {} {} {} -o {data:?}: {e}",
            m.kind,
            m.source,
            target.display()
        );
        if e == nix::errno::Errno::EPERM || e == nix::errno::Errno::ENODEV {
            MountError::Unsupported(what)
        } else {
            MountError::Failed(what)
        }
    })?;
    let undo = |why: String| {
        let _ = unmount(target);
        MountError::Failed(why)
    };
    if flags.intersects(PROPAGATION) {
        let pflags = flags & (PROPAGATION | MsFlags::MS_REC | MsFlags::MS_SILENT);
        nix::mount::mount::<str, Path, str, str>(None, target, None, pflags, None)
            .map_err(|e| undo(format!("set propagation of {}: {e}", target.display())))?;
    }
    if is_bind && flags.contains(MsFlags::MS_RDONLY) {
        nix::mount::mount::<str, Path, str, str>(
            None,
            target,
            None,
            first | MsFlags::MS_REMOUNT,
            None,
        )
        .map_err(|e| undo(format!("remount {} read-only: {e}", target.display())))?;
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
    }
}
