//! Spare directories: Prepare takes a directory made ahead of time, and the snapshot it
//! makes from one looks exactly like one made on the spot (modes, and the owner of the upper
//! dir's root copied from the parent's).

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_core::content::CallContext;
use berth_core::labels::Labels;
use berth_core::snapshot::Snapshotter;

fn spares(root: &Path) -> BTreeSet<String> {
    std::fs::read_dir(root.join("staging"))
        .expect("read staging")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("spare-"))
        .collect()
}

async fn wait_for_spares(root: &Path) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = spares(root);
        if found.len() >= 2 {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no spare directories appeared in {}/staging (found {found:?})",
            root.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn option<'a>(options: &'a [String], key: &str) -> &'a str {
    options
        .iter()
        .find_map(|o| o.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {options:?}"))
}

#[tokio::test]
async fn prepare_takes_a_spare_that_matches_a_fresh_directory() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: changing a directory's owner needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("overlay");
    let sn = berth_snapshot_overlay::overlay(root.clone(), false, false, Vec::new());
    sn.open().await.expect("open");
    let cx = CallContext::default();

    let mounts = sn
        .prepare(&cx, "base-active", None, Labels::new())
        .await
        .expect("prepare base");
    let base_fs = PathBuf::from(&mounts[0].source);
    std::os::unix::fs::lchown(&base_fs, Some(1234), Some(5678)).expect("chown base root");
    sn.commit(&cx, "base", "base-active", Labels::new())
        .await
        .expect("commit base");

    let before = wait_for_spares(&root).await;
    let mounts = sn
        .prepare(&cx, "child", Some("base"), Labels::new())
        .await
        .expect("prepare child");
    let after = spares(&root);
    assert!(
        before.iter().any(|s| !after.contains(s)),
        "Prepare took none of the spares {before:?} (now {after:?})"
    );

    let upper = PathBuf::from(option(&mounts[0].options, "upperdir="));
    let work = PathBuf::from(option(&mounts[0].options, "workdir="));
    let upper_meta = std::fs::metadata(&upper).expect("stat upper");
    assert_eq!(
        (upper_meta.uid(), upper_meta.gid()),
        (1234, 5678),
        "the upper dir's root has the parent root's owner"
    );
    assert_eq!(upper_meta.permissions().mode() & 0o7777, 0o755);
    let work_meta = std::fs::metadata(&work).expect("stat work");
    assert_eq!(work_meta.permissions().mode() & 0o7777, 0o711);
    assert!(
        upper.starts_with(root.join("snapshots")),
        "{} is under snapshots/",
        upper.display()
    );
}
