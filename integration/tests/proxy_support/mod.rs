//! The example proxy snapshotter (`examples/snapshotter`) as a process of a test, and the
//! daemon configuration that names it.

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_integration::{Daemon, Kind, NO_STARTUP_GC, Options, example_snapshotter_binary};

/// The name both daemons know the proxy by.
pub const NAME: &str = "example";

/// A running `berth-example-snapshotter`; killed on drop.
pub struct Proxy {
    pub socket: PathBuf,
    pub root: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Proxy {
    /// Starts the proxy with its socket and root under `dir`, and waits until it accepts.
    pub fn start(dir: &Path) -> Proxy {
        let mut proxy = Proxy {
            socket: dir.join("example.sock"),
            root: dir.join("example-root"),
            log: dir.join("example.log"),
            child: None,
        };
        proxy.start_again();
        proxy
    }

    /// Starts the process (again, on the same socket and root) and waits until it accepts.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the proxy is already running");
        let binary = example_snapshotter_binary().expect("the example snapshotter binary");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("proxy log");
        let child = Command::new(binary)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--root")
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning berth-example-snapshotter");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the proxy never accepted on {}: {}",
                self.socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process (SIGKILL: no graceful shutdown, the socket file stays).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM (its graceful shutdown) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
            let status = child.wait().expect("wait for the proxy");
            assert!(status.success(), "the proxy's exit after SIGTERM: {status}");
        }
    }

    /// What the proxy logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `[proxy_plugins]` section naming this proxy (the same for both daemons).
    pub fn config(&self) -> String {
        format!(
            "\n[proxy_plugins.{NAME}]\ntype = \"snapshot\"\naddress = \"{}\"\n",
            self.socket.display()
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A daemon of `kind` with the proxy configured (and no collection right after start).
pub fn daemon_with(kind: Kind, proxy: &Proxy) -> Daemon {
    Daemon::start_with(
        kind,
        Options {
            // ctr 1.6 labels no view gc.root: a collection at start-up could take a view.
            extra_config: format!("{}{}", NO_STARTUP_GC, proxy.config()),
            ..Options::default()
        },
    )
}

/// A private directory for the proxy's socket and root (short: socket paths are limited).
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("berth-px")
        .tempdir_in("/tmp")
        .expect("temp dir")
}
