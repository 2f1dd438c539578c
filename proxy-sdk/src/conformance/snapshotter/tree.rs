//! File trees for the snapshotter suite: changes applied to a directory ([`Op`]), and what a
//! directory holds ([`read`]) in a form two trees can be compared by ([`compare`]).
//!
//! A layer's changes are applied both to a mounted snapshot and to a plain directory (the
//! "flat" tree); whatever the snapshotter does underneath, a view must then show exactly the
//! flat tree (as containerd's testsuite does with `fstest`).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{Mode, SFlag};

/// One change to a tree; paths are relative to its root.
#[derive(Debug, Clone)]
pub enum Op {
    /// A regular file with contents and mode; an existing file is replaced (a new inode, as
    /// overlay's copy-up gives, so hard links to the old one keep the old contents).
    File(String, Vec<u8>, u32),
    /// A directory with a mode (the mode is set if it exists).
    Dir(String, u32),
    /// Removes a file or a whole directory.
    Remove(String),
    /// Changes owner and group (not following symlinks).
    Chown(String, u32, u32),
    /// Changes the mode.
    Chmod(String, u32),
    /// A symlink `path` -> `target`: (target, path).
    Symlink(String, String),
    /// A hard link `new` to `existing`: (existing, new).
    Link(String, String),
    /// Renames (from, to).
    Rename(String, String),
    /// Sets an extended attribute (path, name, value).
    Xattr(String, String, Vec<u8>),
    /// A FIFO with a mode.
    Fifo(String, u32),
    /// A character device (path, mode, major, minor).
    CharDev(String, u32, u64, u64),
}

/// A regular file.
pub fn file(path: &str, contents: &[u8], mode: u32) -> Op {
    Op::File(path.to_owned(), contents.to_vec(), mode)
}
/// A directory.
pub fn dir(path: &str, mode: u32) -> Op {
    Op::Dir(path.to_owned(), mode)
}
/// A removal.
pub fn remove(path: &str) -> Op {
    Op::Remove(path.to_owned())
}
/// A change of owner.
pub fn chown(path: &str, uid: u32, gid: u32) -> Op {
    Op::Chown(path.to_owned(), uid, gid)
}

fn fail(op: &Op, what: &str, e: impl std::fmt::Display) -> String {
    format!("applying {op:?}: {what}: {e}")
}

/// Applies `ops` in order under `root`. Blocking.
pub fn apply(root: &Path, ops: &[Op]) -> Result<(), String> {
    for op in ops {
        match op {
            Op::File(p, contents, mode) => {
                let path = root.join(p);
                if fs::symlink_metadata(&path).is_ok() {
                    fs::remove_file(&path).map_err(|e| fail(op, "remove old", e))?;
                }
                fs::write(&path, contents).map_err(|e| fail(op, "write", e))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                    .map_err(|e| fail(op, "chmod", e))?;
            }
            Op::Dir(p, mode) => {
                let path = root.join(p);
                if !path.is_dir() {
                    fs::create_dir(&path).map_err(|e| fail(op, "mkdir", e))?;
                }
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                    .map_err(|e| fail(op, "chmod", e))?;
            }
            Op::Remove(p) => {
                let path = root.join(p);
                let meta = fs::symlink_metadata(&path).map_err(|e| fail(op, "stat", e))?;
                if meta.is_dir() {
                    fs::remove_dir_all(&path).map_err(|e| fail(op, "remove dir", e))?;
                } else {
                    fs::remove_file(&path).map_err(|e| fail(op, "remove", e))?;
                }
            }
            Op::Chown(p, uid, gid) => {
                std::os::unix::fs::lchown(root.join(p), Some(*uid), Some(*gid))
                    .map_err(|e| fail(op, "chown", e))?;
            }
            Op::Chmod(p, mode) => {
                fs::set_permissions(root.join(p), fs::Permissions::from_mode(*mode))
                    .map_err(|e| fail(op, "chmod", e))?;
            }
            Op::Symlink(target, p) => {
                std::os::unix::fs::symlink(target, root.join(p))
                    .map_err(|e| fail(op, "symlink", e))?;
            }
            Op::Link(existing, new) => {
                fs::hard_link(root.join(existing), root.join(new))
                    .map_err(|e| fail(op, "link", e))?;
            }
            Op::Rename(from, to) => {
                fs::rename(root.join(from), root.join(to)).map_err(|e| fail(op, "rename", e))?;
            }
            Op::Xattr(p, name, value) => {
                rustix::fs::lsetxattr(
                    root.join(p),
                    name.as_str(),
                    value,
                    rustix::fs::XattrFlags::empty(),
                )
                .map_err(|e| fail(op, "setxattr", e))?;
            }
            Op::Fifo(p, mode) => {
                let path = root.join(p);
                nix::unistd::mkfifo(&path, Mode::from_bits_truncate(*mode))
                    .map_err(|e| fail(op, "mkfifo", e))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                    .map_err(|e| fail(op, "chmod", e))?;
            }
            Op::CharDev(p, mode, major, minor) => {
                let path = root.join(p);
                nix::sys::stat::mknod(
                    &path,
                    SFlag::S_IFCHR,
                    Mode::from_bits_truncate(*mode),
                    nix::sys::stat::makedev(*major, *minor),
                )
                .map_err(|e| fail(op, "mknod", e))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                    .map_err(|e| fail(op, "chmod", e))?;
            }
        }
    }
    Ok(())
}

/// What the suite compares of one entry (not times, not sizes of directories).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `file`, `dir`, `symlink`, `fifo`, `char`, `block`, `socket`.
    pub kind: &'static str,
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// A regular file's contents.
    pub contents: Option<Vec<u8>>,
    /// A symlink's target.
    pub target: Option<String>,
    /// A device's number.
    pub rdev: Option<u64>,
    /// `user.*` extended attributes (others belong to the file system: overlay's, SELinux).
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// For a file with several names in this tree: the first of them (a hard-link group).
    pub link_group: Option<String>,
}

/// A tree: entries by path relative to its root (the root itself excluded).
pub type Tree = BTreeMap<String, Node>;

fn user_xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    let size = match rustix::fs::llistxattr_query(path) {
        Ok(n) => n,
        Err(e) if e == rustix::io::Errno::NOTSUP => return Ok(out),
        Err(e) => return Err(format!("list xattrs of {}: {e}", path.display())),
    };
    let mut names = vec![0u8; size];
    if size > 0 {
        let n = rustix::fs::llistxattr(path, &mut names[..])
            .map_err(|e| format!("list xattrs of {}: {e}", path.display()))?;
        names.truncate(n);
    }
    for name in names.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
        let name = String::from_utf8_lossy(name).into_owned();
        let len = rustix::fs::lgetxattr_query(path, name.as_str())
            .map_err(|e| format!("read xattr {name} of {}: {e}", path.display()))?;
        let mut value = vec![0u8; len];
        if len > 0 {
            let n = rustix::fs::lgetxattr(path, name.as_str(), &mut value[..])
                .map_err(|e| format!("read xattr {name} of {}: {e}", path.display()))?;
            value.truncate(n);
        }
        out.insert(name, value);
    }
    Ok(out)
}

/// Reads the tree under `root`. Blocking.
pub fn read(root: &Path) -> Result<Tree, String> {
    let mut tree = Tree::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut pending = vec![(root.to_owned(), String::new())];
    while let Some((dir, rel)) = pending.pop() {
        let entries =
            fs::read_dir(&dir).map_err(|e| format!("read directory {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("read directory {}: {e}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let rel_path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let m =
                fs::symlink_metadata(&path).map_err(|e| format!("stat {}: {e}", path.display()))?;
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_file() {
                "file"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else {
                "socket"
            };
            let contents = if ft.is_file() {
                Some(fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?)
            } else {
                None
            };
            let target = if ft.is_symlink() {
                Some(
                    fs::read_link(&path)
                        .map_err(|e| format!("readlink {}: {e}", path.display()))?
                        .to_string_lossy()
                        .into_owned(),
                )
            } else {
                None
            };
            let rdev = (ft.is_char_device() || ft.is_block_device()).then_some(m.rdev());
            if !ft.is_dir() && m.nlink() > 1 {
                inodes
                    .entry((m.dev(), m.ino()))
                    .or_default()
                    .push(rel_path.clone());
            }
            tree.insert(
                rel_path.clone(),
                Node {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    contents,
                    target,
                    rdev,
                    xattrs: user_xattrs(&path)?,
                    link_group: None,
                },
            );
            if ft.is_dir() {
                pending.push((path, rel_path));
            }
        }
    }
    for names in inodes.into_values().filter(|n| n.len() > 1) {
        let first = names.iter().min().cloned();
        for name in names {
            if let Some(node) = tree.get_mut(&name) {
                node.link_group = first.clone();
            }
        }
    }
    Ok(tree)
}

/// `Ok` when `got` is `want`; otherwise the first difference, by path.
pub fn compare(want: &Tree, got: &Tree) -> Result<(), String> {
    for (path, w) in want {
        match got.get(path) {
            None => return Err(format!("{path:?} is missing")),
            Some(g) if g != w => {
                let field = if g.kind != w.kind {
                    format!("is a {}, expected a {}", g.kind, w.kind)
                } else if g.mode != w.mode {
                    format!("has mode {:o}, expected {:o}", g.mode, w.mode)
                } else if (g.uid, g.gid) != (w.uid, w.gid) {
                    format!(
                        "is owned by {}:{}, expected {}:{}",
                        g.uid, g.gid, w.uid, w.gid
                    )
                } else if g.contents != w.contents {
                    format!(
                        "holds {:?}, expected {:?}",
                        g.contents
                            .as_deref()
                            .map(String::from_utf8_lossy)
                            .unwrap_or_default(),
                        w.contents
                            .as_deref()
                            .map(String::from_utf8_lossy)
                            .unwrap_or_default()
                    )
                } else if g.target != w.target {
                    format!("points to {:?}, expected {:?}", g.target, w.target)
                } else if g.rdev != w.rdev {
                    format!("is device {:?}, expected {:?}", g.rdev, w.rdev)
                } else if g.xattrs != w.xattrs {
                    format!("has xattrs {:?}, expected {:?}", g.xattrs, w.xattrs)
                } else {
                    format!(
                        "is linked with {:?}, expected {:?}",
                        g.link_group, w.link_group
                    )
                };
                return Err(format!("{path:?} {field}"));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = got.keys().find(|p| !want.contains_key(*p)) {
        return Err(format!("{extra:?} should not be there"));
    }
    Ok(())
}
