//! `ctr snapshots diff` end to end, once per snapshotter (`native`, `overlayfs`): a committed
//! parent, an active child changed through its mount (a file added, one modified, one
//! deleted), then the diff. ctr 1.6 writes the layer to its standard output and, with
//! `--keep`, leaves the blob in the content store (labelled `containerd.io/gc.root`), so the
//! test reads it back with `ctr content get` under the digest of what ctr printed and checks
//! its entries and its `containerd.io/uncompressed` label. Calibrated: the same body runs
//! against Debian's containerd 1.6, so the entry lists are containerd's.
//!
//! Also, against both daemons at once, that the uncompressed layer of the same tree is
//! byte-identical to containerd's, and (berth only) the zstd media type and an unknown one.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use berth_integration::{CmdOutput, Daemon, Kind, Options, calibrated, label_cell, tab_rows};

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

#[track_caller]
fn snap_ok(d: &Daemon, sn: &str, args: &[&str]) -> CmdOutput {
    let mut argv = vec!["snapshots", "--snapshotter", sn];
    argv.extend_from_slice(args);
    d.ctr_ok(argv)
}

fn sha256(data: &[u8]) -> String {
    berth_integration::api::sha256_digest(data)
}

/// A snapshot mounted by running the commands `ctr snapshots mounts` prints; unmounted on drop.
struct Mounted {
    target: PathBuf,
}

impl Mounted {
    fn new(d: &Daemon, sn: &str, key: &str) -> Mounted {
        let target = d.dir().join(format!("mnt-{key}"));
        fs::create_dir_all(&target).expect("mount point");
        let out = snap_ok(d, sn, &["mounts", &target.to_string_lossy(), key]);
        assert!(out.stdout.starts_with("mount -t "), "{out}");
        let status = Command::new("sh")
            .arg("-c")
            .arg(out.stdout.trim())
            .status()
            .expect("running sh");
        assert!(status.success(), "mounting {key} failed: {out}");
        Mounted { target }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.target.join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(&self.target).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("umount {} failed", self.target.display());
        }
    }
}

fn write(path: &Path, data: &str) {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).expect("mkdir");
    }
    fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// `touch -h -d @<time>`: a fixed mtime (and atime) without following symlinks.
fn touch(path: &Path, time: &str) {
    let status = Command::new("touch")
        .arg("-h")
        .arg("-d")
        .arg(format!("@{time}"))
        .arg(path)
        .status()
        .expect("touch");
    assert!(status.success(), "touch {}", path.display());
}

/// The names of a tar's entries, in order.
fn entry_names(tar_bytes: &[u8]) -> Vec<String> {
    let mut archive = tar::Archive::new(tar_bytes);
    archive
        .entries()
        .expect("a tar")
        .map(|e| String::from_utf8_lossy(&e.expect("an entry").path_bytes()).into_owned())
        .collect()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    assert!(data.starts_with(&[0x1f, 0x8b]), "not gzip");
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

fn unzstd(data: &[u8]) -> Vec<u8> {
    assert!(data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]), "not zstd");
    let mut child = Command::new("zstd")
        .args(["-d", "-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("zstd (Debian package zstd)");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = data.to_vec();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&input).expect("feed zstd");
    });
    let out = child.wait_with_output().expect("zstd");
    feeder.join().expect("feeder");
    assert!(out.status.success(), "zstd -d failed");
    out.stdout
}

/// The labels of `digest` in `ctr content ls`.
fn content_labels(d: &Daemon, digest: &str) -> Vec<String> {
    let out = d.ctr_ok(["content", "ls"]);
    tab_rows(&out.stdout)
        .into_iter()
        .find(|row| row[0] == digest)
        .map(|row| label_cell(row.get(3).map_or("", String::as_str)))
        .unwrap_or_else(|| panic!("{digest} is not in the content store: {out}"))
}

/// A committed parent `base` and an active child `work` with a file added, one modified and
/// one deleted.
fn parent_and_changed_child(d: &Daemon, sn: &str) {
    snap_ok(d, sn, &["prepare", "base-active"]);
    {
        let m = Mounted::new(d, sn, "base-active");
        write(&m.path("etc/hostname"), "berth\n");
        write(&m.path("bin/tool"), "#!/bin/sh\necho v1\n");
        write(&m.path("data/old.txt"), "old\n");
        write(&m.path("data/stays.txt"), "stays\n");
    }
    snap_ok(d, sn, &["commit", "base", "base-active"]);
    snap_ok(d, sn, &["prepare", "work", "base"]);
    let m = Mounted::new(d, sn, "work");
    write(&m.path("etc/new.conf"), "new\n");
    write(&m.path("bin/tool"), "#!/bin/sh\necho v2\n");
    fs::remove_file(m.path("data/old.txt")).expect("deleting through the mount");
}

fn snapshots_diff(kind: Kind, sn: &str) {
    // No collection at start-up: ctr snapshots diff's parent view has no gc.root label.
    let d = Daemon::start_with(kind, Options::no_startup_gc());
    parent_and_changed_child(&d, sn);

    let out = snap_ok(&d, sn, &["diff", "--keep", "work"]);
    let blob = out.stdout_bytes;
    let layer = gunzip(&blob);
    assert_eq!(
        entry_names(&layer),
        [
            "bin/",
            "bin/tool",
            "data/",
            "data/.wh.old.txt",
            "etc/",
            "etc/new.conf"
        ],
        "{kind}: the layer's entries"
    );
    let digest = sha256(&blob);
    let stored = d.ctr_ok(["content", "get", &digest]).stdout_bytes;
    assert!(stored == blob, "content get returns the layer ctr printed");
    let labels = content_labels(&d, &digest);
    assert!(
        labels.contains(&format!("containerd.io/uncompressed={}", sha256(&layer))),
        "{labels:?}"
    );
    assert!(
        labels
            .iter()
            .any(|l| l.starts_with("containerd.io/gc.root=")),
        "--keep roots the blob: {labels:?}"
    );

    // A plain tar: the same entries, nothing compressed.
    let out = snap_ok(&d, sn, &["diff", "--media-type", TAR, "work"]);
    assert_eq!(entry_names(&out.stdout_bytes), entry_names(&layer));

    // Against an explicit second snapshot (the parent): the same change.
    let out = snap_ok(&d, sn, &["diff", "--media-type", GZIP, "base", "work"]);
    assert_eq!(entry_names(&gunzip(&out.stdout_bytes)), entry_names(&layer));
}

fn snapshots_diff_native(kind: Kind) {
    snapshots_diff(kind, "native");
}
calibrated!(snapshots_diff_native);

fn snapshots_diff_overlayfs(kind: Kind) {
    snapshots_diff(kind, "overlayfs");
}
calibrated!(snapshots_diff_overlayfs);

/// The same tree (fixed times, no deletions: containerd 1.6 dates whiteouts with the clock)
/// diffed by both daemons gives the same uncompressed layer, byte for byte: berth writes tar
/// headers as Go's archive/tar does. Both daemons are needed at once, so this is not a
/// calibrated body.
#[test]
fn uncompressed_layers_are_byte_identical_to_containerds() {
    let mut layers = Vec::new();
    for kind in [Kind::Containerd, Kind::Berthd] {
        let d = Daemon::start_with(kind, Options::no_startup_gc());
        let sn = "native";
        snap_ok(&d, sn, &["prepare", "base-active"]);
        {
            let m = Mounted::new(&d, sn, "base-active");
            write(&m.path("etc/hostname"), "berth\n");
            write(&m.path("bin/tool"), "#!/bin/sh\necho v1\n");
            for p in ["etc/hostname", "bin/tool", "etc", "bin"] {
                touch(&m.path(p), "1600000000.25");
            }
        }
        snap_ok(&d, sn, &["commit", "base", "base-active"]);
        snap_ok(&d, sn, &["prepare", "work", "base"]);
        {
            let m = Mounted::new(&d, sn, "work");
            write(&m.path("etc/new.conf"), "new\n");
            write(&m.path("bin/tool"), "#!/bin/sh\necho v2\n");
            let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
            write(&m.path(&long), "a name only PAX can hold\n");
            std::os::unix::fs::symlink("../bin/tool", m.path("etc/tool-link")).expect("symlink");
            for p in [
                "etc/new.conf",
                "bin/tool",
                "etc/tool-link",
                &long,
                &"d".repeat(120),
                "etc",
                "bin",
            ] {
                touch(&m.path(p), "1700000000.5");
            }
        }
        let out = snap_ok(&d, sn, &["diff", "--media-type", TAR, "work"]);
        layers.push(out.stdout_bytes);
    }
    let names = entry_names(&layers[0]);
    assert!(names.contains(&"etc/tool-link".to_owned()), "{names:?}");
    assert_eq!(entry_names(&layers[1]), names, "the same entries");
    assert!(
        layers[0] == layers[1],
        "berth's layer ({}) differs from containerd's ({}) at byte {:?}",
        sha256(&layers[1]),
        sha256(&layers[0]),
        layers[0].iter().zip(&layers[1]).position(|(a, b)| a != b)
    );
}

/// berth only: containerd 1.6's walking differ writes no zstd layers and answers an unknown
/// media type with NotImplemented, where berth says InvalidArgument.
#[test]
fn zstd_layers_and_unknown_media_types() {
    let d = Daemon::start_with(Kind::Berthd, Options::no_startup_gc());
    let sn = "overlayfs";
    parent_and_changed_child(&d, sn);
    let out = snap_ok(&d, sn, &["diff", "--keep", "--media-type", ZSTD, "work"]);
    let layer = unzstd(&out.stdout_bytes);
    assert_eq!(
        entry_names(&layer),
        [
            "bin/",
            "bin/tool",
            "data/",
            "data/.wh.old.txt",
            "etc/",
            "etc/new.conf"
        ]
    );
    let labels = content_labels(&d, &sha256(&out.stdout_bytes));
    assert!(
        labels.contains(&format!("containerd.io/uncompressed={}", sha256(&layer))),
        "{labels:?}"
    );

    let out = d.ctr([
        "snapshots",
        "--snapshotter",
        sn,
        "diff",
        "--media-type",
        "application/x-cpio",
        "work",
    ]);
    out.assert_failure_contains("application/x-cpio");
    out.assert_failure_contains("invalid argument");
}
