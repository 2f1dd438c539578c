//! Compare (diff of two mounts into a layer) through the plugin: round trips (the layer
//! applied onto a copy of the lower tree gives the upper tree), media types, labels,
//! source_date_epoch, an overlay upper, errors and cleanup; and the applier's size bound.
//!
//! Compare mounts, so these tests need root (CAP_SYS_ADMIN); they print a skip line
//! otherwise. CI runs them as root.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use berth_core::content::{CallContext, ContentStore, Digest, WriterRequest};
use berth_core::diff::{ApplyOptions, DiffOptions, Differ};
use berth_core::error::{Classify, ErrorKind};
use berth_core::namespace::Namespace;
use berth_core::snapshot::{Descriptor, Mount};
use berth_core::testing::MemoryContentStore;
use berth_diff_walking::plugin::WalkingDiffer;
use berth_diff_walking::{Compression, apply, decompress};

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// A store, a differ whose mount directory is private to the test, and a temporary base.
struct Setup {
    store: MemoryContentStore,
    differ: WalkingDiffer,
    cx: CallContext,
    tmp: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let store = MemoryContentStore::new();
        let tmp = tempfile::tempdir().expect("tempdir");
        let differ = WalkingDiffer::new(Arc::new(store.clone()) as Arc<dyn ContentStore>)
            .with_mount_dir(tmp.path().join("mounts"));
        Setup {
            store,
            differ,
            cx: CallContext {
                namespace: Some(Namespace::parse("test").expect("namespace")),
                lease: None,
            },
            tmp,
        }
    }

    /// No ingest is left behind (a failed or finished compare cleans up after itself).
    fn assert_no_ingest(&self) {
        let refs = self.store.ingest_refs();
        assert!(refs.is_empty(), "ingests left: {refs:?}");
    }

    fn dir(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        fs::create_dir_all(&p).expect("mkdir");
        p
    }

    async fn compare(
        &self,
        lower: &[Mount],
        upper: &[Mount],
        options: &DiffOptions,
    ) -> berth_core::Result<(Descriptor, Vec<u8>)> {
        let desc = self.differ.compare(&self.cx, lower, upper, options).await?;
        let blob = self.store.blob(&desc.digest).expect("the layer is stored");
        assert_eq!(blob.len() as u64, desc.size);
        assert_eq!(Digest::sha256_of(&blob), desc.digest);
        Ok((desc, blob))
    }

    /// The mount directory holds nothing: every mount point went with the private tmpfs.
    fn assert_mount_dir_clean(&self) {
        let dir = self.tmp.path().join("mounts");
        if dir.exists() {
            assert!(
                fs::read_dir(&dir).expect("read mounts").next().is_none(),
                "mount points left in {dir:?}"
            );
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let base = self.tmp.path().to_string_lossy().into_owned();
        assert!(
            !mountinfo.contains(&base),
            "a mount below {base} is visible outside the diff"
        );
    }
}

fn bind(path: &Path) -> Mount {
    Mount {
        kind: "bind".into(),
        source: path.display().to_string(),
        target: String::new(),
        options: vec!["rbind".into(), "rw".into()],
    }
}

fn options(media_type: Option<&str>) -> DiffOptions {
    DiffOptions {
        media_type: media_type.map(str::to_owned),
        ..DiffOptions::default()
    }
}

fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("SKIP: Compare mounts and needs root (CAP_SYS_ADMIN)");
    true
}

fn uncompressed(blob: &[u8]) -> (Compression, Vec<u8>) {
    let (compression, mut reader) = decompress(blob).expect("detect");
    let mut out = Vec::new();
    reader.read_to_end(&mut out).expect("decompress");
    (compression, out)
}

/// Entry names of a layer, in order.
fn entries(tar_bytes: &[u8]) -> Vec<String> {
    let mut archive = tar::Archive::new(tar_bytes);
    archive
        .entries()
        .expect("entries")
        .map(|e| String::from_utf8_lossy(&e.expect("entry").path_bytes()).into_owned())
        .collect()
}

/// (name, mtime) of every entry.
fn mtimes(tar_bytes: &[u8]) -> Vec<(String, u64)> {
    let mut archive = tar::Archive::new(tar_bytes);
    archive
        .entries()
        .expect("entries")
        .map(|e| {
            let e = e.expect("entry");
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.header().mtime().expect("mtime"),
            )
        })
        .collect()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cp -a`: a copy with owners, modes, times, xattrs and hard links.
fn copy_tree(from: &Path, to: &Path) {
    run(Command::new("cp").arg("-a").arg(from).arg(to));
}

fn set_mtime(path: &Path, secs: i64, nanos: i64) {
    let t = nix::sys::time::TimeSpec::new(secs, nanos);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .expect("utimensat");
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).expect("setxattr");
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("chown");
}

fn write(path: &Path, data: &[u8], mode: u32) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    fs::write(path, data).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mknod(path: &Path, kind: nix::sys::stat::SFlag, mode: u32, dev: u64) {
    nix::sys::stat::mknod(
        path,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(mode),
        dev,
    )
    .expect("mknod");
}

/// Everything a layer can carry about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    rdev: u64,
    data: Option<Vec<u8>>,
    target: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A tree: every object below `root` (the root itself and sockets left out, as a layer
/// never records them) and its hard-link groups.
#[derive(Debug, PartialEq, Eq)]
struct TreeState {
    nodes: BTreeMap<String, Node>,
    links: BTreeSet<BTreeSet<String>>,
}

fn user_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut names[..]).expect("listxattr");
    let mut out = BTreeMap::new();
    for name in names[..n]
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(b"user."))
    {
        let mut value = vec![0u8; 4096];
        let len = rustix::fs::lgetxattr(path, name, &mut value[..]).expect("getxattr");
        out.insert(name.to_vec(), value[..len].to_vec());
    }
    out
}

fn tree(root: &Path) -> TreeState {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("below root")
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let ft = meta.file_type();
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_dir() {
                stack.push(path.clone());
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
                continue;
            };
            if !ft.is_dir() && meta.nlink() > 1 {
                inodes.entry(meta.ino()).or_default().insert(rel.clone());
            }
            nodes.insert(
                rel,
                Node {
                    kind,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    mtime: meta.mtime(),
                    rdev: meta.rdev(),
                    data: ft.is_file().then(|| fs::read(&path).expect("read")),
                    target: ft.is_symlink().then(|| {
                        fs::read_link(&path)
                            .expect("readlink")
                            .as_os_str()
                            .as_bytes()
                            .to_vec()
                    }),
                    xattrs: user_xattrs(&path),
                },
            );
        }
    }
    TreeState {
        nodes,
        links: inodes.into_values().filter(|g| g.len() > 1).collect(),
    }
}

/// Asserts two trees are equal, showing the first differing path.
fn assert_same_tree(got: &TreeState, want: &TreeState) {
    for (path, node) in &want.nodes {
        assert_eq!(got.nodes.get(path), Some(node), "{path} differs");
    }
    let extra: Vec<&String> = got
        .nodes
        .keys()
        .filter(|p| !want.nodes.contains_key(*p))
        .collect();
    assert!(extra.is_empty(), "unexpected paths: {extra:?}");
    assert_eq!(got.links, want.links, "hard-link groups");
}

/// Applies `blob` onto a copy of `lower` and returns the result.
fn apply_onto_copy(lower: &Path, blob: &[u8], at: &Path) -> TreeState {
    copy_tree(lower, at);
    apply(blob, at, &berth_diff_walking::ApplyOptions::default()).expect("apply the diff");
    tree(at)
}

/// The lower tree of the round trips.
fn build_lower(root: &Path) {
    use nix::sys::stat::SFlag;
    fs::create_dir_all(root).expect("root");
    write(&root.join("etc/hosts"), b"127.0.0.1 localhost\n", 0o644);
    write(
        &root.join("etc/passwd"),
        b"root:x:0:0::/root:/bin/sh\n",
        0o644,
    );
    write(&root.join("etc/shadow"), b"root:*:1::::::\n", 0o640);
    chown(&root.join("etc/shadow"), 0, 42);
    write(&root.join("bin/sh"), b"#!shell", 0o755);
    symlink("sh", root.join("bin/sh-link")).expect("symlink");
    symlink("a", root.join("bin/retarget")).expect("symlink");
    write(&root.join("bin/hard1"), b"linked data", 0o755);
    fs::hard_link(root.join("bin/hard1"), root.join("bin/hard2")).expect("link");
    write(&root.join("usr/share/doc/pkg/README"), b"readme", 0o644);
    write(&root.join("old-dir/a/b/c"), b"deep", 0o644);
    write(&root.join("old-dir/d"), b"d", 0o644);
    write(&root.join("dir-to-file/child"), b"child", 0o644);
    write(&root.join("file-to-dir"), b"file", 0o644);
    write(&root.join("same-second"), b"aaaa", 0o644);
    set_mtime(&root.join("same-second"), 1_600_000_000, 0);
    write(&root.join("tagged"), b"x", 0o644);
    set_xattr(&root.join("tagged"), "user.tag", b"old");
    write(&root.join("owned"), b"o", 0o644);
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");
    mknod(
        &root.join("null"),
        SFlag::S_IFCHR,
        0o666,
        nix::sys::stat::makedev(1, 3),
    );
    // Whole-second directory times, as a layer records them: the copy then matches exactly.
    for d in [
        "etc",
        "bin",
        "usr",
        "usr/share",
        "usr/share/doc",
        "usr/share/doc/pkg",
    ] {
        set_mtime(&root.join(d), 1_500_000_000, 0);
    }
}

/// The upper tree: a copy of the lower one, changed in every way a layer can say.
fn build_upper(lower: &Path, root: &Path) {
    use nix::sys::stat::SFlag;
    copy_tree(lower, root);
    write(&root.join("etc/new.conf"), b"new", 0o600);
    fs::write(root.join("etc/hosts"), b"127.0.0.1 localhost berth\n").expect("modify");
    fs::set_permissions(root.join("etc/passwd"), fs::Permissions::from_mode(0o600)).expect("chmod");
    chown(&root.join("etc/shadow"), 0, 0);
    fs::remove_file(root.join("bin/sh-link")).expect("rm");
    fs::remove_file(root.join("bin/retarget")).expect("rm");
    symlink("b", root.join("bin/retarget")).expect("symlink");
    symlink("/bin/sh", root.join("bin/abs-link")).expect("symlink");
    fs::hard_link(root.join("bin/hard1"), root.join("bin/hard3")).expect("link");
    fs::remove_dir_all(root.join("old-dir")).expect("rm -r");
    fs::remove_dir_all(root.join("dir-to-file")).expect("rm -r");
    write(&root.join("dir-to-file"), b"now a file", 0o644);
    fs::remove_file(root.join("file-to-dir")).expect("rm");
    write(&root.join("file-to-dir/inside"), b"inside", 0o644);
    // Same size, same whole-second mtime: only the contents tell the change.
    fs::write(root.join("same-second"), b"bbbb").expect("modify");
    set_mtime(&root.join("same-second"), 1_600_000_000, 0);
    set_xattr(&root.join("tagged"), "user.tag", b"new");
    set_xattr(&root.join("etc/hosts"), "user.added", b"1");
    chown(&root.join("owned"), 1000, 1000);
    write(&root.join("suid"), b"s", 0o4755);
    write(&root.join("big-ids"), b"ids", 0o644);
    chown(&root.join("big-ids"), 3_000_000, 3_000_001);
    write(&root.join("new/a"), b"group", 0o644);
    fs::hard_link(root.join("new/a"), root.join("new/b")).expect("link");
    nix::unistd::mkfifo(
        &root.join("new/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .expect("mkfifo");
    mknod(
        &root.join("new/zero"),
        SFlag::S_IFCHR,
        0o666,
        nix::sys::stat::makedev(1, 5),
    );
    let long_dir = root.join("d".repeat(150));
    write(&long_dir.join("f".repeat(200)), b"long name", 0o644);
    write(&root.join("caf\u{e9}"), b"non-ascii", 0o644);
    // Sockets are never recorded.
    let _socket = std::os::unix::net::UnixListener::bind(root.join("new/sock")).expect("sock");
}

#[tokio::test]
async fn round_trip_of_every_kind_of_change() {
    if skip_unless_root() {
        return;
    }
    let s = Setup::new();
    let lower = s.tmp.path().join("lower");
    let upper = s.tmp.path().join("upper");
    build_lower(&lower);
    build_upper(&lower, &upper);

    let (desc, blob) = s
        .compare(&[bind(&lower)], &[bind(&upper)], &options(None))
        .await
        .expect("compare");
    assert_eq!(desc.media_type, GZIP, "gzip is the default");
    let (compression, layer) = uncompressed(&blob);
    assert_eq!(compression, Compression::Gzip);

    let names = entries(&layer);
    let sorted = {
        let mut v = names.clone();
        // A whiteout sits where the name it deletes would.
        let key = |n: &str| -> Vec<String> {
            n.trim_end_matches('/')
                .split('/')
                .map(|c| c.strip_prefix(".wh.").unwrap_or(c).to_owned())
                .collect()
        };
        v.sort_by_key(|n| key(n));
        v
    };
    // Hard links met earlier are written after the entry that carries their data.
    let without_links: Vec<&String> = names
        .iter()
        .filter(|n| !n.starts_with("bin/hard"))
        .collect();
    let sorted_without_links: Vec<&String> = sorted
        .iter()
        .filter(|n| !n.starts_with("bin/hard"))
        .collect();
    assert_eq!(
        without_links, sorted_without_links,
        "entries sorted by path"
    );
    for expected in [
        "etc/",
        "etc/new.conf",
        "etc/hosts",
        "etc/passwd",
        "etc/shadow",
        "bin/.wh.sh-link",
        "bin/retarget",
        ".wh.old-dir",
        "dir-to-file",
        "file-to-dir/",
        "file-to-dir/inside",
        "same-second",
        "tagged",
        "owned",
        "new/b",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    for absent in [
        "old-dir/d",
        "old-dir/.wh.d",
        "dir-to-file/.wh.child",
        "new/sock",
        "bin/sh",
        "usr/",
    ] {
        assert!(
            !names.iter().any(|n| n == absent),
            "{absent} written: {names:?}"
        );
    }
    assert_eq!(
        names.iter().filter(|n| n.starts_with("bin/hard")).count(),
        3,
        "the whole link group, one entry each: {names:?}"
    );

    let result = apply_onto_copy(&lower, &blob, &s.tmp.path().join("applied"));
    assert_same_tree(&result, &tree(&upper));
    assert!(
        result
            .links
            .iter()
            .any(|g| g.len() == 3 && g.contains("bin/hard3")),
        "{:?}",
        result.links
    );
    s.assert_mount_dir_clean();
}

#[tokio::test]
async fn media_types_give_the_same_uncompressed_layer_and_labels() {
    if skip_unless_root() {
        return;
    }
    let s = Setup::new();
    let lower = s.tmp.path().join("lower");
    let upper = s.tmp.path().join("upper");
    build_lower(&lower);
    build_upper(&lower, &upper);
    let want = tree(&upper);

    let mut diff_ids = BTreeSet::new();
    for (media_type, compression) in [
        (GZIP, Compression::Gzip),
        (TAR, Compression::Uncompressed),
        (ZSTD, Compression::Zstd),
    ] {
        let mut opts = options(Some(media_type));
        opts.labels.insert("test.label".into(), "yes".into());
        let (desc, blob) = s
            .compare(&[bind(&lower)], &[bind(&upper)], &opts)
            .await
            .expect("compare");
        assert_eq!(desc.media_type, media_type);
        let (detected, layer) = uncompressed(&blob);
        assert_eq!(detected, compression, "{media_type}");
        let diff_id = Digest::sha256_of(&layer);
        let info = s.store.info(&s.cx, &desc.digest).await.expect("info");
        assert_eq!(
            info.labels.get("containerd.io/uncompressed"),
            Some(&diff_id.to_string()),
            "{media_type}"
        );
        assert_eq!(
            info.labels.get("test.label").map(String::as_str),
            Some("yes")
        );
        diff_ids.insert(diff_id);
        let applied = s.tmp.path().join(format!("applied-{}", compression.name()));
        assert_same_tree(&apply_onto_copy(&lower, &blob, &applied), &want);
    }
    assert_eq!(
        diff_ids.len(),
        1,
        "one tar, three compressions: {diff_ids:?}"
    );
    s.assert_no_ingest();
}

#[tokio::test]
async fn source_date_epoch_clamps_times_and_makes_layers_reproducible() {
    if skip_unless_root() {
        return;
    }
    let s = Setup::new();
    let epoch = 1_000_000_000i64;
    let lower = s.dir("lower");
    write(&lower.join("gone"), b"x", 0o644);
    // Two upper trees with the same contents but other times, all after the epoch but one.
    let mut digests = Vec::new();
    let mut plain = Vec::new();
    for (i, offset) in [(0, 0i64), (1, 86_400)] {
        let upper = s.dir(&format!("upper{i}"));
        write(&upper.join("dir/new"), b"new", 0o644);
        write(&upper.join("old"), b"old", 0o644);
        set_mtime(&upper.join("old"), 500_000_000, 0);
        set_mtime(&upper.join("dir/new"), 1_700_000_000 + offset, 5);
        set_mtime(&upper.join("dir"), 1_700_000_000 + offset, 0);
        let mut opts = options(Some(TAR));
        opts.source_date_epoch = Some(UNIX_EPOCH + Duration::from_secs(epoch as u64));
        let (desc, blob) = s
            .compare(&[bind(&lower)], &[bind(&upper)], &opts)
            .await
            .expect("compare");
        let times: BTreeMap<String, u64> = mtimes(&blob).into_iter().collect();
        assert_eq!(times.get("dir/"), Some(&(epoch as u64)));
        assert_eq!(times.get("dir/new"), Some(&(epoch as u64)));
        assert_eq!(times.get("old"), Some(&500_000_000), "older times stay");
        assert_eq!(times.get(".wh.gone"), Some(&0), "whiteouts carry 1970");
        digests.push(desc.digest);
        let (desc, _) = s
            .compare(&[bind(&lower)], &[bind(&upper)], &options(Some(TAR)))
            .await
            .expect("compare");
        plain.push(desc.digest);
    }
    assert_eq!(digests[0], digests[1], "clamped layers are the same bytes");
    assert_ne!(plain[0], plain[1], "without the epoch the times differ");
}

#[tokio::test]
async fn an_empty_lower_adds_everything() {
    if skip_unless_root() {
        return;
    }
    let s = Setup::new();
    let lower = s.tmp.path().join("lower");
    let upper = s.tmp.path().join("upper");
    build_lower(&lower);
    build_upper(&lower, &upper);
    let (_, blob) = s
        .compare(&[], &[bind(&upper)], &options(None))
        .await
        .expect("compare");
    let (_, layer) = uncompressed(&blob);
    assert!(
        !entries(&layer).iter().any(|n| n.contains(".wh.")),
        "nothing to delete from an empty tree"
    );
    let empty = s.dir("empty");
    let result = apply_onto_copy(&empty, &blob, &s.tmp.path().join("applied"));
    assert_same_tree(&result, &tree(&upper));
}

fn overlay(lower: &[&Path], upper: &Path, work: &Path) -> Mount {
    Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options: vec![
            format!("workdir={}", work.display()),
            format!("upperdir={}", upper.display()),
            format!(
                "lowerdir={}",
                lower
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            ),
        ],
    }
}

/// Mounts `m` on `at` until the guard drops, so a failing test leaves nothing mounted.
fn mount_overlay(m: &Mount, at: &Path) -> berth_core::mount::Mounted {
    berth_core::mount::mount_all(std::slice::from_ref(m), at, berth_core::mount::mount)
        .expect("mount overlay")
}

#[tokio::test]
async fn an_overlay_upper_diffs_with_per_entry_whiteouts() {
    if skip_unless_root() {
        return;
    }
    if !fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("overlay")) {
        eprintln!("SKIP: overlay is not in /proc/filesystems");
        return;
    }
    let s = Setup::new();
    let base = s.tmp.path().join("base");
    build_lower(&base);
    let (upper, work, merged) = (s.dir("upper"), s.dir("work"), s.dir("merged"));
    let m = overlay(&[&base], &upper, &work);
    {
        let _guard = mount_overlay(&m, &merged);
        write(&merged.join("etc/added"), b"added", 0o644);
        fs::write(merged.join("etc/hosts"), b"changed through overlay\n").expect("modify");
        fs::remove_file(merged.join("etc/passwd")).expect("rm");
        // Deleted and made again: overlay marks it opaque; the layer says it per entry.
        fs::remove_dir_all(merged.join("old-dir")).expect("rm -r");
        write(&merged.join("old-dir/fresh"), b"fresh", 0o644);
        set_xattr(&merged.join("tagged"), "user.tag", b"overlay");
    }
    let mut expected_view = overlay(&[&upper, &base], &upper, &work);
    expected_view.options.retain(|o| o.starts_with("lowerdir="));
    let want = {
        let view = s.dir("view");
        let _guard = mount_overlay(&expected_view, &view);
        tree(&view)
    };

    let (_, blob) = s
        .compare(&[bind(&base)], &[m], &options(None))
        .await
        .expect("compare");
    let (_, layer) = uncompressed(&blob);
    let names = entries(&layer);
    for expected in [
        "etc/added",
        "etc/hosts",
        "etc/.wh.passwd",
        "old-dir/fresh",
        "old-dir/.wh.a",
        "old-dir/.wh.d",
        "tagged",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains(".wh..wh..opq")),
        "{names:?}"
    );
    let result = apply_onto_copy(&base, &blob, &s.tmp.path().join("applied"));
    assert_same_tree(&result, &want);
    s.assert_mount_dir_clean();
}

#[tokio::test]
async fn an_unknown_media_type_is_invalid_argument_and_writes_nothing() {
    // No mount is made before the media type is checked: this runs unprivileged too.
    let s = Setup::new();
    let dir = s.dir("tree");
    let err = s
        .compare(&[], &[bind(&dir)], &options(Some("application/x-cpio")))
        .await
        .expect_err("unknown media type");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("application/x-cpio"), "{err}");
    assert_eq!(s.store.blob_count(), 0);
    s.assert_no_ingest();
}

#[tokio::test]
async fn failures_unmount_and_drop_the_ingest() {
    if skip_unless_root() {
        return;
    }
    let s = Setup::new();
    let lower = s.dir("lower");
    let upper = s.dir("upper");
    write(&upper.join("ok"), b"ok", 0o644);

    // A mount that cannot be made.
    let err = s
        .compare(
            &[bind(&lower)],
            &[bind(&s.tmp.path().join("missing"))],
            &options(None),
        )
        .await
        .expect_err("missing source");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
    s.assert_mount_dir_clean();

    // A failure after both mounts are made: an xattr name no PAX record can carry.
    write(&upper.join("bad"), b"bad", 0o644);
    set_xattr(&upper.join("bad"), "user.a=b", b"v");
    let err = s
        .compare(&[bind(&lower)], &[bind(&upper)], &options(None))
        .await
        .expect_err("unencodable xattr");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("\"bad\""), "names the file: {err}");
    s.assert_mount_dir_clean();
    assert_eq!(s.store.blob_count(), 0);
    s.assert_no_ingest();
}

#[tokio::test]
async fn a_named_reference_is_started_over() {
    if skip_unless_root() {
        return;
    }
    let s = Setup::new();
    let lower = s.dir("lower");
    let upper = s.dir("upper");
    write(&upper.join("file"), b"content", 0o644);
    // An earlier attempt left bytes in the ingest.
    let mut w = s
        .store
        .writer(
            &s.cx,
            WriterRequest {
                reference: "my-diff".into(),
                total: 0,
                expected: None,
            },
        )
        .await
        .expect("writer");
    w.write(b"garbage from before").await.expect("write");
    w.close().await.expect("close");
    let mut opts = options(Some(TAR));
    opts.reference = Some("my-diff".into());
    let (_, blob) = s
        .compare(&[bind(&lower)], &[bind(&upper)], &opts)
        .await
        .expect("compare");
    assert_eq!(entries(&blob), ["file"]);
    s.assert_no_ingest();
}

#[tokio::test]
async fn the_configured_bound_refuses_larger_layers() {
    // Apply does not mount: this runs unprivileged too.
    let store = MemoryContentStore::new();
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(4096);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    layer
        .append_data(&mut h, "big", &[7u8; 4096][..])
        .expect("append");
    let layer = layer.into_inner().expect("tar");
    let digest = store.insert(&layer, Default::default());
    let desc = Descriptor {
        media_type: TAR.into(),
        digest,
        size: layer.len() as u64,
        annotations: Default::default(),
    };
    let cx = CallContext {
        namespace: Some(Namespace::parse("test").expect("namespace")),
        lease: None,
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let bounded = WalkingDiffer::new(Arc::new(store.clone()) as Arc<dyn ContentStore>)
        .with_max_uncompressed_bytes(Some(1024));
    let err = bounded
        .apply(&cx, &desc, &[bind(tmp.path())], &ApplyOptions::default())
        .await
        .expect_err("over the bound");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("1024"), "{err}");
    let unbounded = WalkingDiffer::new(Arc::new(store) as Arc<dyn ContentStore>);
    let applied = unbounded
        .apply(&cx, &desc, &[bind(tmp.path())], &ApplyOptions::default())
        .await
        .expect("no bound");
    assert_eq!(applied.digest, Digest::sha256_of(&layer));
    assert_eq!(fs::read(tmp.path().join("big")).expect("big").len(), 4096);
}
