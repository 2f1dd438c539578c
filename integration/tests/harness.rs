//! Tests of the harness itself, on Debian's containerd (always installed where tests run).

use berth_integration::nix::mount::{MsFlags, mount};
use berth_integration::{Daemon, Kind, skip};

fn mounted_below(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| std::path::Path::new(p).starts_with(dir))
        .map(str::to_string)
        .collect()
}

#[test]
fn drop_unmounts_and_removes_the_directory() {
    let d = Daemon::start(Kind::Containerd);
    let dir = d.dir().to_path_buf();
    let outer = d.root().join("m");
    let inner = outer.join("inner");
    std::fs::create_dir_all(&outer).expect("mkdir");
    if let Err(e) = mount(
        Some("tmpfs"),
        &outer,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        skip(
            "drop_unmounts_and_removes_the_directory",
            &format!("cannot mount tmpfs: {e}"),
        );
        return;
    }
    std::fs::create_dir_all(&inner).expect("mkdir inner");
    mount(
        Some("tmpfs"),
        &inner,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount inner tmpfs");
    assert_eq!(mounted_below(&dir).len(), 2);
    drop(d);
    assert!(mounted_below(&dir).is_empty(), "{:?}", mounted_below(&dir));
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn logs_are_captured_and_restart_appends() {
    let mut d = Daemon::start(Kind::Containerd);
    assert!(
        d.log().contains("containerd successfully booted"),
        "{}",
        d.log()
    );
    let pid = d.pid().expect("pid");
    assert!(d.rss_kib().expect("rss") > 0);
    d.restart().expect("restart");
    assert_ne!(d.pid(), Some(pid));
    assert_eq!(d.log().matches("containerd successfully booted").count(), 2);
    assert!(d.startup_time().is_some());
    let st = d.stop().expect("stop");
    assert!(st.success());
    assert!(!d.is_running());
}

#[test]
fn ctr_reports_failures() {
    let d = Daemon::start(Kind::Containerd);
    let out = d.ctr(["namespaces", "create", "--", "-bad"]);
    assert!(!out.success());
    out.assert_failure_contains("INVALID ARGUMENT");
    let r = std::panic::catch_unwind(|| d.ctr_ok(["no-such-command"]));
    assert!(r.is_err());
}
