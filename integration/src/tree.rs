//! Snapshots of a mounted file tree, and readable differences between two: what the
//! differential tests compare between berthd's and containerd's unpacked images.
//!
//! [`snapshot_tree`] walks a tree without following symlinks and records per path (`/` is the
//! root, `/a/b` below it): the type, the permission bits with setuid, setgid and sticky, owner,
//! group, the size and SHA-256 of regular files, symlink targets, device numbers, every
//! extended attribute the mount lists (overlayfs hides its own `trusted.overlay.*`), the
//! modification time in nanoseconds, and hard-link groups: the paths of the tree sharing an
//! inode, as sorted groups of paths (never inode numbers, which differ between file systems).
//! Not recorded: access times (reading changes them), change times (never settable), link
//! counts (the groups say the same within the tree; overlayfs reports lower inodes' counts,
//! whited-out links included) and directory sizes (file-system specific, never shrinking).
//!
//! # Modification times
//!
//! containerd's applier (`archive.Apply`) gives every entry its tar header's mtime: files,
//! symlinks (`lutimes`), devices and fifos as they are created, directories after the whole
//! layer so their own entries do not move them. A directory still ends up with the time of
//! the apply when a layer creates, removes or replaces a name in it without listing the
//! directory itself: umoci and Docker re-add a changed file without its unchanged parent
//! directory, and on overlayfs the applier first makes the parent in the upper directory
//! (copying the lower one's owner, mode, xattrs and times) and then writes into it, which
//! moves its mtime. The root is never set from a layer (an entry naming it is ignored) and a
//! snapshotter creates it. So such mtimes depend on when the layer was applied, not on the
//! image.
//!
//! [`Tree::diff_with`] therefore compares mtimes exactly, for directories too, with one rule:
//! two mtimes both inside [`Compare::apply_window`] (from the start of the test to the
//! comparison; no time a test image sets falls in it, its future times included) are both
//! "the time of an apply" and count as equal. A directory one side set from the layer and the
//! other left at its apply time is a difference. Without a window, the root's mtime is not
//! compared and every other mtime is.
//!
//! # containerd's `native` copies
//!
//! containerd's `native` snapshotter copies the parent snapshot with continuity's `CopyDir`,
//! which sets a directory's times before copying its entries into it, so every non-empty
//! directory of a native snapshot has the time of the copy unless the layer applied on top
//! lists it; and which keeps hard links between regular files only, making one symlink,
//! device or fifo per name. berth's copy sets directory times after the entries and keeps
//! every hard link. With [`Compare::left_native_copy`], a directory whose left (containerd's)
//! mtime is in the apply window matches any right mtime, and the right may link non-regular
//! files the left has unlinked.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest as _, Sha256};

use crate::api::hex;
use crate::run_command;

/// Files at least this large are hashed by `sha256sum` (the test crate is built without
/// optimisation, where Rust hashes at a few tens of MiB per second).
const EXTERNAL_HASH_BYTES: u64 = 1 << 20;

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::File => "file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::CharDevice => "character device",
            Kind::BlockDevice => "block device",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        })
    }
}

/// What [`snapshot_tree`] records of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The type.
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size of a regular file.
    pub size: Option<u64>,
    /// `sha256:<hex>` of a regular file's content.
    pub sha256: Option<String>,
    /// A symlink's target, bytes shown as [`show`] does.
    pub target: Option<String>,
    /// Major and minor number of a device.
    pub rdev: Option<(u32, u32)>,
    /// Every extended attribute listed, by name.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: (i64, i64),
}

/// A recorded tree. See the module documentation.
#[derive(Debug, Clone)]
pub struct Tree {
    /// What differences call this tree (its root path unless [`Tree::labelled`]).
    pub label: String,
    /// Every path, `/` for the root.
    pub nodes: BTreeMap<String, Node>,
    /// Paths sharing an inode: each group sorted, groups sorted, only groups of two or more.
    pub hard_links: Vec<Vec<String>>,
}

/// How [`Tree::diff_with`] compares.
#[derive(Debug, Clone)]
pub struct Compare {
    /// mtimes inside this window (both ends included) on both sides are equal (see the module
    /// documentation); `None`: the root's mtime is skipped, all others compared exactly.
    pub apply_window: Option<(SystemTime, SystemTime)>,
    /// The left tree is a snapshot containerd's `native` snapshotter copied (see the module
    /// documentation): a left directory mtime inside the apply window matches any right
    /// mtime, and right hard-link groups of non-regular files may be unlinked on the left.
    pub left_native_copy: bool,
    /// Stop after this many differences.
    pub max: usize,
}

impl Default for Compare {
    fn default() -> Self {
        Compare {
            apply_window: None,
            left_native_copy: false,
            max: 50,
        }
    }
}

/// Records the tree below `root` (see the module documentation). Symlinks are never followed;
/// mount points below `root` are walked like directories.
pub fn snapshot_tree(root: &Path) -> Result<Tree> {
    let meta = fs::symlink_metadata(root).with_context(|| format!("stat {}", root.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let mut nodes = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut to_hash: Vec<(String, PathBuf)> = Vec::new();
    let mut stack: Vec<(String, PathBuf)> = vec![("/".to_owned(), root.to_path_buf())];
    while let Some((key, path)) = stack.pop() {
        let m = fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        let ft = m.file_type();
        let kind = if ft.is_file() {
            Kind::File
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_char_device() {
            Kind::CharDevice
        } else if ft.is_block_device() {
            Kind::BlockDevice
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            Kind::Socket
        };
        let mut node = Node {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: None,
            sha256: None,
            target: None,
            rdev: None,
            xattrs: xattrs(&path)?,
            mtime: (m.mtime(), m.mtime_nsec()),
        };
        match kind {
            Kind::File => {
                node.size = Some(m.len());
                if m.len() >= EXTERNAL_HASH_BYTES {
                    to_hash.push((key.clone(), path.clone()));
                } else {
                    node.sha256 = Some(hash_small(&path)?);
                }
            }
            Kind::Symlink => {
                let t =
                    fs::read_link(&path).with_context(|| format!("readlink {}", path.display()))?;
                node.target = Some(show(t.as_os_str().as_bytes()));
            }
            Kind::CharDevice | Kind::BlockDevice => {
                let dev = m.rdev();
                node.rdev = Some((rustix::fs::major(dev), rustix::fs::minor(dev)));
            }
            Kind::Dir => {
                let mut children = Vec::new();
                for e in
                    fs::read_dir(&path).with_context(|| format!("listing {}", path.display()))?
                {
                    let e = e.with_context(|| format!("listing {}", path.display()))?;
                    let name = show(e.file_name().as_bytes());
                    let child = if key == "/" {
                        format!("/{name}")
                    } else {
                        format!("{key}/{name}")
                    };
                    children.push((child, e.path()));
                }
                stack.extend(children);
            }
            Kind::Fifo | Kind::Socket => {}
        }
        if kind != Kind::Dir && m.nlink() > 1 {
            inodes
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(key.clone());
        }
        nodes.insert(key, node);
    }
    for chunk in to_hash.chunks(64) {
        let paths: Vec<&Path> = chunk.iter().map(|(_, p)| p.as_path()).collect();
        for ((key, _), digest) in chunk.iter().zip(hash_external(&paths)?) {
            if let Some(n) = nodes.get_mut(key) {
                n.sha256 = Some(digest);
            }
        }
    }
    let mut hard_links: Vec<Vec<String>> = inodes
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    hard_links.sort();
    Ok(Tree {
        label: root.display().to_string(),
        nodes,
        hard_links,
    })
}

/// Bytes as text: UTF-8 as is, other bytes as `\xNN`.
pub fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => {
            let mut out = String::new();
            for chunk in bytes.utf8_chunks() {
                out.push_str(chunk.valid());
                for b in chunk.invalid() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            }
            out
        }
    }
}

fn xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let unsupported = |e: &rustix::io::Errno| *e == rustix::io::Errno::NOTSUP;
    let size = match rustix::fs::llistxattr_query(path) {
        Ok(n) => n,
        Err(e) if unsupported(&e) => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listxattr {}", path.display())),
    };
    if size == 0 {
        return Ok(out);
    }
    let mut list = vec![0u8; size];
    let n = rustix::fs::llistxattr(path, &mut list[..])
        .with_context(|| format!("listxattr {}", path.display()))?;
    for name in list[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let len = rustix::fs::lgetxattr_query(path, name)
            .with_context(|| format!("getxattr {} on {}", show(name), path.display()))?;
        let mut value = vec![0u8; len];
        let got = rustix::fs::lgetxattr(path, name, &mut value[..])
            .with_context(|| format!("getxattr {} on {}", show(name), path.display()))?;
        value.truncate(got);
        out.insert(show(name), value);
    }
    Ok(out)
}

fn hash_small(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex(&h.finalize())))
}

/// Digests of `paths`, in order, from one `sha256sum -z` run.
fn hash_external(paths: &[&Path]) -> Result<Vec<String>> {
    let mut cmd = Command::new("sha256sum");
    cmd.arg("-z").arg("--").args(paths);
    let out = run_command(&mut cmd, Duration::from_secs(600)).context("running sha256sum")?;
    if !out.success() {
        bail!("{out}");
    }
    // Each record is `<hex>  <name>\0`; with -z names are printed unescaped.
    let digests: Vec<String> = out
        .stdout_bytes
        .split(|b| *b == 0)
        .filter(|r| !r.is_empty())
        .map(|r| {
            r.get(..64)
                .and_then(|h| std::str::from_utf8(h).ok())
                .map(|h| format!("sha256:{h}"))
                .ok_or_else(|| anyhow!("unexpected sha256sum output {:?}", show(r)))
        })
        .collect::<Result<_>>()?;
    if digests.len() != paths.len() {
        bail!(
            "sha256sum printed {} digests for {} files",
            digests.len(),
            paths.len()
        );
    }
    Ok(digests)
}

fn nanos(t: (i64, i64)) -> i128 {
    i128::from(t.0) * 1_000_000_000 + i128::from(t.1)
}

fn show_time(t: (i64, i64)) -> String {
    format!(
        "{}.{:09}",
        crate::api::rfc3339(t.0).trim_end_matches('Z'),
        t.1
    )
}

fn show_value(v: &[u8]) -> String {
    let s = show(v);
    if s.len() > 80 {
        format!(
            "{:?}... ({} bytes)",
            &s[..s.floor_char_boundary(80)],
            v.len()
        )
    } else {
        format!("{s:?}")
    }
}

impl Tree {
    /// The same tree, called `label` in differences.
    pub fn labelled(mut self, label: impl Into<String>) -> Tree {
        self.label = label.into();
        self
    }

    /// The node at `path` (`/` for the root).
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// How many paths, the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree holds nothing but its root.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// The bytes of all regular files (hard-linked ones once per path).
    pub fn file_bytes(&self) -> u64 {
        self.nodes.values().filter_map(|n| n.size).sum()
    }

    /// The first differences from `other` with [`Compare::default`]; empty when equal.
    pub fn diff(&self, other: &Tree) -> Vec<String> {
        self.diff_with(other, &Compare::default())
    }

    /// The first `how.max` differences from `other`, one readable line each, in path order
    /// (hard-link groups last); empty when the trees are equal.
    pub fn diff_with(&self, other: &Tree, how: &Compare) -> Vec<String> {
        let (a, b) = (&self.label, &other.label);
        let stamp = |t: SystemTime| {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            (d.as_secs() as i64, i64::from(d.subsec_nanos()))
        };
        let window = how.apply_window.map(|(from, to)| (stamp(from), stamp(to)));
        let mut out = Vec::new();
        let mut push = |line: String| {
            if out.len() < how.max {
                out.push(line);
            }
        };
        let mut left = self.nodes.iter().peekable();
        let mut right = other.nodes.iter().peekable();
        loop {
            match (left.peek(), right.peek()) {
                (None, None) => break,
                (Some((p, n)), None) => {
                    push(format!("{p}: {} only in {a}", n.kind));
                    left.next();
                }
                (None, Some((p, n))) => {
                    push(format!("{p}: {} only in {b}", n.kind));
                    right.next();
                }
                (Some((pa, na)), Some((pb, nb))) => {
                    if pa < pb {
                        push(format!("{pa}: {} only in {a}", na.kind));
                        left.next();
                    } else if pb < pa {
                        push(format!("{pb}: {} only in {b}", nb.kind));
                        right.next();
                    } else {
                        for line in node_diff(pa, na, nb, (a, b), window, how.left_native_copy) {
                            push(line);
                        }
                        left.next();
                        right.next();
                    }
                }
            }
        }
        let group_of = |groups: &[Vec<String>]| -> HashMap<String, Vec<String>> {
            groups
                .iter()
                .flat_map(|g| g.iter().map(move |p| (p.clone(), g.clone())))
                .collect()
        };
        let (ga, gb) = (group_of(&self.hard_links), group_of(&other.hard_links));
        for g in &self.hard_links {
            match gb.get(&g[0]) {
                Some(other_group) if other_group == g => {}
                Some(other_group) => push(format!(
                    "hard links: {a} links {g:?}, {b} links {other_group:?}"
                )),
                None => push(format!(
                    "hard links: {a} links {g:?}, {b} has {} unlinked",
                    g[0]
                )),
            }
        }
        for g in &other.hard_links {
            let not_regular = other.nodes.get(&g[0]).is_some_and(|n| n.kind != Kind::File);
            if how.left_native_copy && not_regular {
                continue;
            }
            if !ga.contains_key(&g[0]) {
                push(format!(
                    "hard links: {b} links {g:?}, {a} has {} unlinked",
                    g[0]
                ));
            }
        }
        out
    }
}

fn node_diff(
    path: &str,
    x: &Node,
    y: &Node,
    (a, b): (&str, &str),
    window: Option<((i64, i64), (i64, i64))>,
    left_native_copy: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if x.kind != y.kind {
        out.push(format!("{path}: {a} has a {}, {b} a {}", x.kind, y.kind));
        return out;
    }
    if x.mode != y.mode {
        out.push(format!(
            "{path}: mode {:04o} in {a}, {:04o} in {b}",
            x.mode, y.mode
        ));
    }
    if (x.uid, x.gid) != (y.uid, y.gid) {
        out.push(format!(
            "{path}: owner {}:{} in {a}, {}:{} in {b}",
            x.uid, x.gid, y.uid, y.gid
        ));
    }
    if x.size != y.size {
        out.push(format!(
            "{path}: size {} in {a}, {} in {b}",
            x.size.unwrap_or_default(),
            y.size.unwrap_or_default()
        ));
    } else if x.sha256 != y.sha256 {
        out.push(format!(
            "{path}: content {} in {a}, {} in {b}",
            x.sha256.as_deref().unwrap_or("-"),
            y.sha256.as_deref().unwrap_or("-")
        ));
    }
    if x.target != y.target {
        out.push(format!(
            "{path}: target {:?} in {a}, {:?} in {b}",
            x.target.as_deref().unwrap_or(""),
            y.target.as_deref().unwrap_or("")
        ));
    }
    if x.rdev != y.rdev {
        out.push(format!(
            "{path}: device {:?} in {a}, {:?} in {b}",
            x.rdev, y.rdev
        ));
    }
    for (k, v) in &x.xattrs {
        match y.xattrs.get(k) {
            None => out.push(format!("{path}: xattr {k} only in {a}")),
            Some(w) if w != v => out.push(format!(
                "{path}: xattr {k} is {} in {a}, {} in {b}",
                show_value(v),
                show_value(w)
            )),
            Some(_) => {}
        }
    }
    for k in y.xattrs.keys() {
        if !x.xattrs.contains_key(k) {
            out.push(format!("{path}: xattr {k} only in {b}"));
        }
    }
    let applied = |t: (i64, i64)| {
        window.is_some_and(|(from, to)| nanos(t) >= nanos(from) && nanos(t) <= nanos(to))
    };
    let skip = match window {
        Some(_) if left_native_copy && x.kind == Kind::Dir => applied(x.mtime),
        Some(_) => applied(x.mtime) && applied(y.mtime),
        None => path == "/",
    };
    if !skip && x.mtime != y.mtime {
        let note = |t| if applied(t) { " (apply time)" } else { "" };
        out.push(format!(
            "{path}: mtime {}{} in {a}, {}{} in {b}",
            show_time(x.mtime),
            note(x.mtime),
            show_time(y.mtime),
            note(y.mtime)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(kind: Kind) -> Node {
        Node {
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: None,
            sha256: None,
            target: None,
            rdev: None,
            xattrs: BTreeMap::new(),
            mtime: (1_700_000_000, 0),
        }
    }

    fn tree(label: &str, nodes: &[(&str, Node)], links: &[&[&str]]) -> Tree {
        Tree {
            label: label.to_owned(),
            nodes: nodes
                .iter()
                .map(|(p, n)| (p.to_string(), n.clone()))
                .collect(),
            hard_links: links
                .iter()
                .map(|g| g.iter().map(|s| s.to_string()).collect())
                .collect(),
        }
    }

    #[test]
    fn equal_trees_have_no_differences() {
        let t = tree(
            "a",
            &[("/", node(Kind::Dir)), ("/f", node(Kind::File))],
            &[],
        );
        assert!(t.diff(&t.clone().labelled("b")).is_empty());
    }

    #[test]
    fn differences_name_path_field_and_sides() {
        let mut f = node(Kind::File);
        f.size = Some(1);
        f.sha256 = Some("sha256:aa".into());
        let mut g = f.clone();
        g.sha256 = Some("sha256:bb".into());
        g.mode = 0o600;
        g.xattrs.insert("user.x".into(), b"1".to_vec());
        let a = tree(
            "left",
            &[
                ("/", node(Kind::Dir)),
                ("/f", f),
                ("/only", node(Kind::Fifo)),
            ],
            &[&["/f", "/g"]],
        );
        let b = tree("right", &[("/", node(Kind::Dir)), ("/f", g)], &[]);
        let d = a.diff(&b);
        assert!(
            d.contains(&"/f: mode 0644 in left, 0600 in right".to_owned()),
            "{d:?}"
        );
        assert!(
            d.iter()
                .any(|l| l.starts_with("/f: content sha256:aa in left")),
            "{d:?}"
        );
        assert!(
            d.contains(&"/f: xattr user.x only in right".to_owned()),
            "{d:?}"
        );
        assert!(d.contains(&"/only: fifo only in left".to_owned()), "{d:?}");
        assert!(
            d.iter().any(|l| l.starts_with("hard links: left links")),
            "{d:?}"
        );
        assert_eq!(
            a.diff_with(
                &b,
                &Compare {
                    max: 2,
                    ..Compare::default()
                }
            )
            .len(),
            2
        );
    }

    #[test]
    fn apply_times_match_each_other_only() {
        let from = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let to = UNIX_EPOCH + Duration::from_secs(2_000_000_010);
        let mut fresh1 = node(Kind::Dir);
        fresh1.mtime = (2_000_000_005, 1);
        let mut fresh2 = node(Kind::Dir);
        fresh2.mtime = (2_000_000_009, 7);
        let old = node(Kind::Dir);
        let how = Compare {
            apply_window: Some((from, to)),
            ..Compare::default()
        };
        let a = tree("a", &[("/", fresh1.clone()), ("/d", fresh1)], &[]);
        let b = tree("b", &[("/", fresh2.clone()), ("/d", fresh2)], &[]);
        assert!(a.diff_with(&b, &how).is_empty());
        let c = tree("c", &[("/", old.clone()), ("/d", old)], &[]);
        let d = a.diff_with(&c, &how);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[1].contains("(apply time) in a"), "{d:?}");
        // Without a window only the root's mtime is exempt.
        assert_eq!(a.diff(&c).len(), 1);
        // After the window is not an apply time: a future time set by a layer.
        let mut future = node(Kind::File);
        future.mtime = (2_000_000_011, 0);
        let mut fresh = node(Kind::File);
        fresh.mtime = (2_000_000_005, 0);
        let e = tree("e", &[("/f", future)], &[]);
        let f = tree("f", &[("/f", fresh)], &[]);
        assert_eq!(e.diff_with(&f, &how).len(), 1);
        // A copied directory on the left may be anything on the right, not the other way.
        let copied = Compare {
            left_native_copy: true,
            ..how.clone()
        };
        assert!(a.diff_with(&c, &copied).is_empty());
        assert_eq!(c.diff_with(&a, &copied).len(), 2);
    }

    #[test]
    fn native_copies_may_unlink_only_non_regular_files() {
        let nodes = [
            ("/", node(Kind::Dir)),
            ("/f", node(Kind::File)),
            ("/g", node(Kind::File)),
            ("/s", node(Kind::Symlink)),
            ("/t", node(Kind::Symlink)),
        ];
        let how = Compare {
            left_native_copy: true,
            ..Compare::default()
        };
        let containerd = tree("containerd", &nodes, &[&["/f", "/g"]]);
        let berthd = tree("berthd", &nodes, &[&["/f", "/g"], &["/s", "/t"]]);
        assert!(containerd.diff_with(&berthd, &how).is_empty());
        assert_eq!(containerd.diff(&berthd).len(), 1);
        let unlinked_files = tree("berthd", &nodes, &[&["/s", "/t"]]);
        assert_eq!(containerd.diff_with(&unlinked_files, &how).len(), 1);
    }

    #[test]
    fn snapshot_records_links_modes_and_targets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::write(root.join("a"), b"hello").expect("a");
        fs::hard_link(root.join("a"), root.join("b")).expect("b");
        std::os::unix::fs::symlink("a", root.join("s")).expect("s");
        fs::create_dir(root.join("d")).expect("d");
        fs::set_permissions(
            root.join("d"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1750),
        )
        .expect("chmod");
        let t = snapshot_tree(root).expect("snapshot");
        assert_eq!(t.len(), 5);
        assert_eq!(t.hard_links, vec![vec!["/a".to_owned(), "/b".to_owned()]]);
        assert_eq!(t.get("/s").and_then(|n| n.target.as_deref()), Some("a"));
        assert_eq!(t.get("/d").map(|n| n.mode), Some(0o1750));
        assert_eq!(
            t.get("/a").and_then(|n| n.sha256.as_deref()),
            Some("sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
        );
        let again = snapshot_tree(root).expect("snapshot");
        assert!(t.diff(&again).is_empty());
        fs::write(
            root.join("c"),
            vec![7u8; (EXTERNAL_HASH_BYTES + 3) as usize],
        )
        .expect("c");
        let with_big = snapshot_tree(root).expect("snapshot");
        let d = t.diff(&with_big);
        assert!(
            d.iter()
                .any(|l| l == &format!("/c: file only in {}", root.display())),
            "{d:?}"
        );
        let big = with_big
            .get("/c")
            .and_then(|n| n.sha256.clone())
            .expect("hashed");
        assert_eq!(big, hash_small(&root.join("c")).expect("hash"));
    }
}
