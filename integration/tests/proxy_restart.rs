//! A proxy snapshotter that goes away and comes back, and berthd restarted under a running
//! proxy (issue 6, acceptance 4), and a proxy that is down when berthd starts.
//!
//! The kill/restart test is berth only: what it checks is berthd's connection handling and
//! its own messages (Unavailable naming the proxy and its socket), where containerd 1.6
//! answers a down proxy with a bare transport error. The proxy down at start is calibrated:
//! both daemons load it and use it once it is up.

#[path = "proxy_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use berth_integration::{Daemon, Kind, Options};
use support::{NAME, Proxy, daemon_with, temp_dir};

fn sn<'a>(args: &[&'a str]) -> Vec<&'a str> {
    ["snapshots", "--snapshotter", NAME]
        .into_iter()
        .chain(args.iter().copied())
        .collect()
}

#[test]
fn proxy_killed_and_restarted_while_berthd_runs() {
    let dir = temp_dir();
    let mut proxy = Proxy::start(dir.path());
    let mut d = daemon_with(Kind::Berthd, &proxy);
    d.ctr_ok(sn(&["prepare", "before", ""]));

    proxy.kill();
    let socket = proxy.socket.display().to_string();
    for attempt in ["during-1", "during-2"] {
        let started = Instant::now();
        let out = d.ctr(sn(&["prepare", attempt, ""]));
        let took = started.elapsed();
        assert!(
            !out.success(),
            "prepare with the proxy down succeeded: {out}"
        );
        assert!(
            out.stderr.contains("unavailable")
                && out
                    .stderr
                    .contains(&format!("proxy plugin {NAME} at {socket}")),
            "the error names the proxy and its socket: {out}"
        );
        assert!(took < Duration::from_secs(10), "took {took:?}: {out}");
    }

    // The same proxy back on the same socket and root: berthd reaches it again.
    proxy.start_again();
    d.ctr_ok(sn(&["prepare", "after", ""]));
    let mounts = d.ctr_ok(sn(&["mounts", "/mnt", "before"]));
    assert!(mounts.stdout.contains("bind"), "{mounts}");

    // berthd restarted while the proxy runs: it connects again at start.
    d.restart().expect("restart berthd");
    d.ctr_ok(sn(&["prepare", "after-restart", ""]));
    let listed = d.ctr_ok(sn(&["ls"]));
    for key in ["before", "after", "after-restart"] {
        assert!(listed.stdout.contains(key), "{key} listed: {listed}");
    }
    for key in ["during-1", "during-2"] {
        assert!(!listed.stdout.contains(key), "{key} listed: {listed}");
    }

    // A graceful restart of the proxy (SIGTERM: it closes its connections) is survived too.
    proxy.stop();
    assert!(!proxy.socket.exists(), "the proxy removed its socket");
    proxy.start_again();
    d.ctr_ok(sn(&["prepare", "after-graceful", ""]));
}

/// A proxy that is not up when the daemon starts is loaded all the same and used once it is
/// up, without restarting the daemon: containerd's dial does not block, so a proxy started
/// after containerd (boot order) works. Calibrated; berthd also names the proxy in the error
/// while it is down and in a warning at start.
fn a_proxy_down_at_start_is_used_once_it_is_up(kind: Kind) {
    let dir = temp_dir();
    let mut proxy = Proxy::start(dir.path());
    let config = format!(
        "{}capabilities = [\"rebase\"]\n[proxy_plugins.{NAME}.exports]\nvendor = \"acme\"\n",
        proxy.config()
    );
    proxy.stop();
    assert!(!proxy.socket.exists(), "the proxy removed its socket");

    let d = Daemon::start_with(
        kind,
        Options {
            extra_config: config,
            ..Options::default()
        },
    );
    let plugins = d.ctr_ok(["plugins", "ls"]);
    let row = plugins
        .stdout
        .lines()
        .find(|l| l.contains("io.containerd.snapshotter.v1") && l.contains(NAME))
        .unwrap_or_else(|| panic!("the proxy is listed: {plugins}"));
    assert!(row.trim_end().ends_with("ok"), "status ok: {row}");
    if kind == Kind::Berthd {
        let detail = d.ctr_ok(["plugins", "ls", "-d", &format!("id=={NAME}")]);
        for shown in ["rebase", "vendor", "acme", "address"] {
            assert!(detail.stdout.contains(shown), "{shown} shown: {detail}");
        }
        let log = d.stderr_log();
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(NAME) && l.contains("not reachable")),
            "a warning names the proxy: {log}"
        );
    }

    let out = d.ctr(sn(&["prepare", "while-down", ""]));
    assert!(
        !out.success(),
        "prepare with the proxy down succeeded: {out}"
    );
    if kind == Kind::Berthd {
        let socket = proxy.socket.display().to_string();
        assert!(
            out.stderr.contains("unavailable")
                && out
                    .stderr
                    .contains(&format!("proxy plugin {NAME} at {socket}")),
            "the error names the proxy and its socket: {out}"
        );
    }
    // Other snapshotters are not affected.
    d.ctr_ok(["snapshots", "--snapshotter", "native", "prepare", "k", ""]);

    proxy.start_again();
    // containerd's client backs off between connection attempts: give it a few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = d.ctr(sn(&["prepare", "after-start", ""]));
        if out.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy is up but {kind} still fails: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let listed = d.ctr_ok(sn(&["ls"]));
    assert!(listed.stdout.contains("after-start"), "{listed}");
    assert!(!listed.stdout.contains("while-down"), "{listed}");
}

berth_integration::calibrated!(a_proxy_down_at_start_is_used_once_it_is_up);
