//! A proxy snapshotter that goes away and comes back, and berthd restarted under a running
//! proxy (issue 6, acceptance 4), and a proxy that is down when berthd starts.
//!
//! berth only, not calibrated: what is checked is berthd's connection handling and its own
//! messages (Unavailable naming the proxy and its socket, the init error shown by
//! introspection, `required_plugins`); containerd 1.6 loads a proxy whatever its state and
//! answers a down proxy with a bare transport error.

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

#[test]
fn a_proxy_down_at_start_is_reported_and_stops_berthd_only_when_required() {
    let dir = temp_dir();
    let proxy = Proxy::start(dir.path());
    let config = format!(
        "{}capabilities = [\"rebase\"]\n[proxy_plugins.{NAME}.exports]\nvendor = \"acme\"\n",
        proxy.config()
    );
    drop(proxy);

    // Not required: berthd serves, introspection says what is wrong.
    let d = Daemon::start_with(
        Kind::Berthd,
        Options {
            extra_config: config.clone(),
            ..Options::default()
        },
    );
    let plugins = d.ctr_ok(["plugins", "ls"]);
    let row = plugins
        .stdout
        .lines()
        .find(|l| l.contains("io.containerd.snapshotter.v1") && l.contains(NAME))
        .unwrap_or_else(|| panic!("the proxy is listed: {plugins}"));
    assert!(row.trim_end().ends_with("error"), "status error: {row}");
    let detail = d.ctr_ok(["plugins", "ls", "-d", &format!("id=={NAME}")]);
    assert!(
        detail.stdout.contains("not reachable") && detail.stdout.contains("example.sock"),
        "the init error names the socket: {detail}"
    );
    for shown in ["rebase", "vendor", "acme", "address"] {
        assert!(detail.stdout.contains(shown), "{shown} shown: {detail}");
    }
    let out = d.ctr(sn(&["prepare", "k", ""]));
    assert!(!out.success(), "{out}");
    d.ctr_ok(["snapshots", "--snapshotter", "native", "prepare", "k", ""]);
    drop(d);

    // Required: berthd refuses to start and says why.
    let required =
        format!("required_plugins = [\"io.containerd.snapshotter.v1.{NAME}\"]\n{config}");
    let mut d = Daemon::spawn(
        Kind::Berthd,
        Options {
            config: Some(required_config(&required)),
            ..Options::default()
        },
    )
    .expect("spawn berthd");
    let status = d.wait_exit(Duration::from_secs(30)).expect("berthd exits");
    assert!(!status.success(), "berthd started without a required proxy");
    let log = d.log();
    assert!(
        log.contains(&format!("io.containerd.snapshotter.v1.{NAME}"))
            && log.contains("not reachable"),
        "the error names the plugin and why: {log}"
    );
}

/// A complete berthd config with `top` (top-level keys and tables) in it: `required_plugins`
/// is a top-level key, so it must come before the generated tables.
fn required_config(top: &str) -> String {
    format!(
        "version = 3\nroot = \"{{root}}\"\nstate = \"{{state}}\"\n{top}\n[grpc]\naddress = \
         \"{{socket}}\"\n"
    )
}
