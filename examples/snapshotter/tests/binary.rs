//! The `berth-example-snapshotter` binary's lifecycle: it refuses a socket another instance
//! serves, keeps its snapshots across a restart, and stops cleanly on SIGTERM (exit 0, socket
//! removed).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_proxy_sdk::snapshots::SnapshotsClient;
use berth_proxy_sdk::{CallContext, Labels, Snapshotter};

fn spawn(socket: &Path, root: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_berth-example-snapshotter"))
        .arg("--socket")
        .arg(socket)
        .arg("--root")
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the example snapshotter")
}

fn wait_accepting(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "never accepted on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

#[test]
fn refuses_a_live_socket_keeps_snapshots_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("sn.sock");
    let root = dir.path().join("root");
    let mut first = spawn(&socket, &root);
    wait_accepting(&socket);

    let second = spawn(&socket, &dir.path().join("other-root"))
        .wait_with_output()
        .expect("second instance");
    assert!(!second.status.success(), "a second server took the socket");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already listening"), "{stderr}");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cx = CallContext::default();
    let client = runtime.block_on(async {
        let client = SnapshotsClient::new(berth_proxy_sdk::connect(&socket), "example");
        client
            .prepare(&cx, "kept", None, Labels::new())
            .await
            .expect("prepare");
        client
    });

    sigterm(&first);
    let status = first.wait().expect("wait");
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(!socket.exists(), "the socket is removed on a clean stop");

    // Restarted on the same root: the snapshot is still there, and the old client reaches it.
    let mut again = spawn(&socket, &root);
    wait_accepting(&socket);
    let info = runtime
        .block_on(client.stat(&cx, "kept"))
        .expect("stat after restart");
    assert_eq!(info.name, "kept");
    sigterm(&again);
    assert!(again.wait().expect("wait").success());
}
