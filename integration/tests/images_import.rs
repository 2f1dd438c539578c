//! `ctr images import` end to end (issue 4): an OCI archive built here, imported and unpacked
//! into overlayfs, the unpacked tree checked through a mounted view, then `images rm --sync`.
//! Calibrated: the same body runs against Debian's containerd.

use std::path::{Path, PathBuf};

use berth_integration::archive::{Compression, Entry, OciArchive};
use berth_integration::{Daemon, Kind, calibrated};

/// Writes an OCI layout archive with two layers (the second deletes a file of the first) and
/// returns the path and the chain id of the top layer.
fn archive(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("tiny.tar");
    let built = OciArchive::new()
        .layer(
            vec![
                Entry::dir("etc"),
                Entry::file("etc/hello", "hello\n"),
                Entry::file("etc/gone", "bye\n"),
                Entry::dir("bin"),
                Entry::symlink("bin/sh", "busybox"),
            ],
            Compression::Gzip,
        )
        .layer(
            vec![
                Entry::dir("etc"),
                Entry::whiteout("etc", "gone"),
                Entry::file("etc/new", "new\n"),
            ],
            Compression::Gzip,
        )
        .build(&path, "docker.io/library/tiny:1")
        .expect("building the archive");
    let top = built.top_chain_id().to_owned();
    (path, top)
}

fn import_unpacks_and_rm_sync_frees_everything(kind: Kind) {
    let d = Daemon::start(kind);
    let (path, top) = archive(d.dir());
    let path = path.to_string_lossy().into_owned();
    let out = d.ctr_ok(["images", "import", "--snapshotter", "overlayfs", &path]);
    assert!(out.stdout.contains("docker.io/library/tiny:1"), "{out}");
    let ls = d.ctr_ok(["images", "ls", "-q"]);
    assert_eq!(ls.stdout.trim(), "docker.io/library/tiny:1");
    let snaps = d.ctr_ok(["snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert!(
        snaps.stdout.contains(&top),
        "top chain id {top} unpacked: {snaps}"
    );

    // The import's own lease went away at its end, which schedules a collection; a view made
    // while that is pending is not protected (ctr 1.6 labels no view gc.root) and may be
    // collected, on either daemon. Wait for a collection first.
    d.ctr_ok(["leases", "create", "--id", "settle"]);
    d.ctr_ok(["leases", "rm", "--sync", "settle"]);
    // Look at the unpacked tree through a read-only view of the top layer.
    d.ctr_ok([
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "view",
        "check-view",
        &top,
    ]);
    let target = d.dir().join("mnt");
    std::fs::create_dir_all(&target).expect("mount point");
    let mounts = d.ctr_ok([
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "mounts",
        &target.to_string_lossy(),
        "check-view",
    ]);
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(mounts.stdout.trim())
        .status()
        .expect("mount");
    assert!(status.success(), "mount failed: {}", mounts.stdout);
    let hello = std::fs::read_to_string(target.join("etc/hello"));
    let new = std::fs::read_to_string(target.join("etc/new"));
    let gone = target.join("etc/gone").exists();
    let link = std::fs::read_link(target.join("bin/sh"));
    let _ = std::process::Command::new("umount").arg(&target).status();
    assert_eq!(hello.expect("etc/hello"), "hello\n");
    assert_eq!(new.expect("etc/new"), "new\n");
    assert!(!gone, "the whiteout in layer 2 removed etc/gone");
    assert_eq!(link.expect("bin/sh").to_string_lossy(), "busybox");
    d.ctr_ok([
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "rm",
        "check-view",
    ]);

    d.ctr_ok(["images", "rm", "--sync", "docker.io/library/tiny:1"]);
    let content = d.ctr_ok(["content", "ls", "-q"]);
    assert!(content.stdout.trim().is_empty(), "blobs left: {content}");
    let snaps = d.ctr_ok(["snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert!(!snaps.stdout.contains("sha256:"), "snapshots left: {snaps}");
}
calibrated!(import_unpacks_and_rm_sync_frees_everything);
