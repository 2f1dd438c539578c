//! The snapshotter conformance suite (`berth_proxy_sdk::conformance::snapshotter`) against
//! the overlayfs snapshotter itself, in a temporary directory, with directories removed at
//! Cleanup (the default) and during Remove (`sync_remove`).

use std::sync::Arc;

use berth_core::content::CallContext;
use berth_proxy_sdk::conformance::snapshotter::{
    self, Capabilities, Fixture, MOUNTING_CASES, SnapshotterFactory,
};

struct Overlay {
    sync_remove: bool,
    /// Whether overlay works here; when it does not, the mounting cases report skips.
    supported: bool,
}

impl Overlay {
    fn new(sync_remove: bool) -> Self {
        let probe = tempfile::tempdir().expect("tempdir");
        let supported = match berth_snapshot_overlay::check_support(probe.path()) {
            Ok(()) => true,
            Err(why) => {
                eprintln!("overlay is not usable here, mounting cases will be SKIPPED: {why}");
                false
            }
        };
        Overlay {
            sync_remove,
            supported,
        }
    }

    async fn open(&self, dir: tempfile::TempDir) -> berth_core::Result<Fixture<tempfile::TempDir>> {
        let root = dir.path().join("overlay");
        let options = berth_snapshot_overlay::host_mount_options(&root, &[]);
        let sn = berth_snapshot_overlay::overlay(root, false, self.sync_remove, options);
        sn.open().await?;
        Ok(Fixture::new(Arc::new(sn), CallContext::default(), dir))
    }
}

#[async_trait::async_trait]
impl SnapshotterFactory for Overlay {
    type Guard = tempfile::TempDir;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            mountable: self.supported,
            overlay_upper: true,
            usage_counts_only_changes: true,
            requires_namespace: false,
            reopen: true,
        }
    }

    async fn create(&self) -> berth_core::Result<Fixture<tempfile::TempDir>> {
        let dir = tempfile::tempdir()
            .map_err(|e| berth_core::Error::internal(format!("temp dir: {e}")))?;
        self.open(dir).await
    }

    async fn reopen(
        &self,
        guard: tempfile::TempDir,
    ) -> berth_core::Result<Fixture<tempfile::TempDir>> {
        self.open(guard).await
    }
}

async fn passes(factory: Overlay) {
    let supported = factory.supported;
    let report = match snapshotter::run(factory).await {
        Ok(report) => report,
        Err(failure) => panic!("{failure}"),
    };
    if supported {
        let skipped: Vec<_> = report
            .skipped
            .iter()
            .filter(|(case, _)| MOUNTING_CASES.contains(case))
            .collect();
        assert!(skipped.is_empty(), "mounting cases skipped: {skipped:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn overlay_passes_the_snapshotter_suite() {
    passes(Overlay::new(false)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn overlay_with_sync_remove_passes_the_snapshotter_suite() {
    passes(Overlay::new(true)).await;
}

/// A removed snapshot's directory stays until Cleanup by default, and goes during Remove with
/// `sync_remove`.
#[tokio::test(flavor = "multi_thread")]
async fn removal_is_deferred_unless_sync_remove() {
    use berth_core::labels::Labels;
    use berth_core::snapshot::Snapshotter;
    for sync_remove in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("overlay");
        let sn = berth_snapshot_overlay::overlay(&root, false, sync_remove, Vec::new());
        let cx = CallContext::default();
        sn.prepare(&cx, "a", None, Labels::new())
            .await
            .expect("prepare");
        let snapshots = || {
            std::fs::read_dir(root.join("snapshots"))
                .expect("read")
                .count()
        };
        assert_eq!(snapshots(), 1);
        sn.remove(&cx, "a").await.expect("remove");
        assert_eq!(
            snapshots(),
            if sync_remove { 0 } else { 1 },
            "sync_remove={sync_remove}"
        );
        sn.cleanup(&cx).await.expect("cleanup");
        assert_eq!(snapshots(), 0);
    }
}

/// `upperdir_label` reports each snapshot's own layer directory.
#[tokio::test(flavor = "multi_thread")]
async fn upperdir_label_is_reported() {
    use berth_core::labels::Labels;
    use berth_core::snapshot::Snapshotter;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("overlay");
    let sn = berth_snapshot_overlay::overlay(&root, true, false, Vec::new());
    let cx = CallContext::default();
    sn.prepare(&cx, "a", None, Labels::new())
        .await
        .expect("prepare");
    let info = sn.stat(&cx, "a").await.expect("stat");
    assert_eq!(
        info.labels[berth_snapshot_overlay::UPPERDIR_LABEL],
        root.join("snapshots/1/fs").display().to_string()
    );
    let listed = sn
        .list(&cx, &berth_core::filters::Filter::default())
        .await
        .expect("list");
    assert_eq!(listed[0].labels, info.labels);
}

/// A root on a file system that cannot hold upper dirs (here: an overlay itself) is refused
/// with the reason, which the plugin turns into a skip.
#[test]
fn support_check_refuses_a_root_on_overlay() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: not root, cannot mount the overlay to test on");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for d in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir(dir.path().join(d)).expect("mkdir");
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        dir.path().join("lower").display(),
        dir.path().join("upper").display(),
        dir.path().join("work").display()
    );
    let merged = dir.path().join("merged");
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .expect("mount the outer overlay");
    let result = berth_snapshot_overlay::check_support(&merged.join("root"));
    nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).expect("unmount");
    let why = result.expect_err("an overlay cannot hold upper dirs");
    assert!(why.contains("cannot hold overlay upper dirs"), "{why}");
}
