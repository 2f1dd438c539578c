//! Acceptance 6 of issue 2 (the process parts): the socket (mode, stale file, a live one held by
//! another berthd) and graceful stop on signals. Where containerd behaves the same the test is
//! calibrated on it.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use berth_integration::nix::sys::signal::Signal;
use berth_integration::{Daemon, Kind, Options, calibrated};

fn socket_mode_0660(kind: Kind) {
    let d = Daemon::start(kind);
    let meta = std::fs::metadata(d.socket()).expect("stat socket");
    assert!(meta.file_type().is_socket(), "{:?}", meta.file_type());
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o660,
        "socket mode {:o}",
        meta.permissions().mode()
    );
}
calibrated!(socket_mode_0660);

fn stop_on(kind: Kind, sig: Signal) {
    let mut d = Daemon::start(kind);
    d.ctr_ok(["version"]);
    let t = Instant::now();
    d.signal(sig).expect("signal");
    let status = d
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{kind} after {sig}: {e:#}\n{}", d.log()));
    assert_eq!(
        status.code(),
        Some(0),
        "{kind} after {sig}: {status}\n{}",
        d.log()
    );
    assert!(
        !d.socket().exists(),
        "{kind} left its socket {} after {sig}",
        d.socket().display()
    );
    eprintln!("{kind} stopped {:?} after {sig}", t.elapsed());
}

fn sigterm_stops_gracefully(kind: Kind) {
    stop_on(kind, Signal::SIGTERM);
}
calibrated!(sigterm_stops_gracefully);

fn sigint_stops_gracefully(kind: Kind) {
    stop_on(kind, Signal::SIGINT);
}
calibrated!(sigint_stops_gracefully);

fn stale_socket_is_replaced(kind: Kind) {
    let dir = tempfile::Builder::new()
        .prefix("bs")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let socket = dir.path().join("s.sock");
    // A socket file nobody listens on.
    drop(UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let d = Daemon::start_with(
        kind,
        Options {
            socket: Some(socket.clone()),
            ..Options::default()
        },
    );
    d.ctr_ok(["version"]);
    let log = d.log();
    assert!(!log.contains("panic"), "{log}");
}
calibrated!(stale_socket_is_replaced);

/// berthd goes beyond containerd here: containerd unlinks a live socket and takes it over,
/// berthd refuses to start and leaves the first daemon serving.
#[test]
fn second_berthd_on_a_live_socket_refuses() {
    let first = Daemon::start(Kind::Berthd);
    let before = first.ctr_ok(["version"]);
    let mut second = Daemon::spawn(
        Kind::Berthd,
        Options {
            socket: Some(first.socket().to_path_buf()),
            ..Options::default()
        },
    )
    .expect("spawn the second berthd");
    let status = second
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the second berthd kept running: {e:#}\n{}", second.log()));
    assert!(!status.success(), "second berthd exited {status}");
    let log = second.log();
    assert!(
        log.contains(&first.socket().display().to_string()),
        "the second berthd's message does not name the socket {}:\n{log}",
        first.socket().display()
    );

    // The first one still answers, on the same socket file, as the same server.
    let after = first.ctr_ok(["version"]);
    assert_eq!(before.stdout, after.stdout);
    assert!(first.socket().exists());
}

/// The first daemon keeps serving while a second is refused, and stops cleanly afterwards.
#[test]
fn refused_second_berthd_leaves_first_stoppable() {
    let mut first = Daemon::start(Kind::Berthd);
    let mut second = Daemon::spawn(
        Kind::Berthd,
        Options {
            socket: Some(first.socket().to_path_buf()),
            ..Options::default()
        },
    )
    .expect("spawn");
    let _ = second.wait_exit(Duration::from_secs(10));
    let status = first.stop().expect("stop the first berthd");
    assert_eq!(status.code(), Some(0), "{}", first.log());
    assert!(!first.socket().exists());
}

/// A daemon restarted on the same root and socket serves again with its namespaces (the socket
/// it removed on stop is recreated with the same mode).
fn restart_on_the_same_root(kind: Kind) {
    let mut d = Daemon::start(kind);
    d.ctr_ok(["namespaces", "create", "kept"]);
    d.restart().expect("restart");
    let ls = d.ctr_ok(["namespaces", "ls", "-q"]);
    assert_eq!(ls.stdout.trim(), "kept", "namespaces lost across a restart");
    let mode = std::fs::metadata(d.socket())
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o660);
}
calibrated!(restart_on_the_same_root);

/// A reply means the change is durable: it survives kill -9 (SPEC C3). The socket file left
/// behind by the killed daemon is stale and gets replaced.
fn namespace_survives_kill_9(kind: Kind) {
    let mut d = Daemon::start(kind);
    d.ctr_ok(["namespaces", "create", "durable"]);
    d.ctr_ok(["namespaces", "label", "durable", "k=v"]);
    d.kill().expect("kill -9");
    d.start_again().expect("start after kill -9");
    let ls = d.ctr_ok(["namespaces", "ls"]);
    assert!(
        ls.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["durable", "k=v"]),
        "{ls}"
    );
}
calibrated!(namespace_survives_kill_9);
