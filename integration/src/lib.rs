//! Test harness for berth: runs `berthd` and Debian's `containerd` on private roots and drives
//! them with containerd's own `ctr` and with the `containerd-client` crate.
//!
//! Every [`Daemon`] lives in its own short temporary directory under `/tmp` (unix socket paths
//! are limited to 108 bytes) holding its config, `root/`, `state/`, its socket and the files
//! `stdout.log` / `stderr.log` that capture its output. Dropping a [`Daemon`] stops the process
//! (SIGTERM, then SIGKILL), unmounts whatever is still mounted below its directory and removes
//! the directory.
//!
//! "Calibration": a test of containerd behaviour is written once over a [`Kind`] and run against
//! both daemons (see [`calibrated!`]); containerd passing it proves the test right.
//!
//! Binaries:
//! - `berthd`: `$BERTHD` if set, else `<workspace>/target/debug/berthd` ([`Profile::Debug`]) or
//!   `<workspace>/target/release/berthd` ([`Profile::Release`], used by `bench/`).
//! - `containerd`: `$CONTAINERD` if set, else `/usr/bin/containerd`.
//! - `ctr`: `$CTR` if set, else `/usr/bin/ctr`.
//!
//! A missing binary is an error that says how to get it; tests never skip silently.
//!
//! Set `BERTH_KEEP_TMP=1` to keep each daemon's directory (config, logs, root) after the test.
//!
//! [`api`] holds `containerd-client` helpers for the content, leases and events services (the
//! content write protocol, lease resources, a deterministic GC trigger, an event watcher with
//! barriers). Tests that keep blobs without a lease start their daemon with
//! [`Options::no_startup_gc`].
//!
//! ```no_run
//! use berth_integration::{Daemon, Kind};
//! let d = Daemon::start(Kind::Containerd);
//! let out = d.ctr_ok(["version"]);
//! assert!(out.stdout.contains("Server:"));
//! ```

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use containerd_client::services::v1::VersionResponse;
use containerd_client::services::v1::version_client::VersionClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::{Channel, Endpoint};

pub use containerd_client;
pub use nix;
pub use tonic;

pub mod api;
pub mod archive;
pub mod images;
pub mod recording_proxy;
pub mod registry;
pub mod token_server;
pub mod tree;

/// The gRPC metadata key carrying the namespace of a namespaced call.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";

/// Which daemon a [`Daemon`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// berth's daemon, built from this workspace.
    Berthd,
    /// Debian's containerd (the reference implementation).
    Containerd,
}

impl Kind {
    /// Both kinds, containerd first (it is the reference).
    pub const ALL: [Kind; 2] = [Kind::Containerd, Kind::Berthd];

    /// `"berthd"` or `"containerd"`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Berthd => "berthd",
            Kind::Containerd => "containerd",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which cargo profile's `berthd` to use when `$BERTHD` is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `target/debug/berthd` (tests).
    Debug,
    /// `target/release/berthd` (benchmarks).
    Release,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Locates the `berthd` binary: `$BERTHD`, else `<target>/<profile>/berthd` where `<target>` is
/// `$CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn berthd_binary(profile: Profile) -> Result<PathBuf> {
    workspace_binary("berthd", "BERTHD", "berthd", profile)
}

/// Locates the `berth` CLI: `$BERTH`, else `<target>/debug/berth` (as [`berthd_binary`]).
pub fn berth_binary() -> Result<PathBuf> {
    workspace_binary("berth", "BERTH", "berth-cli", Profile::Debug)
}

/// `berth --address <d's socket> --namespace <ns> <args>`, with the CLI's environment defaults
/// removed so the test alone decides.
pub fn berth_cli_command(d: &Daemon, ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(berth_binary().expect("the berth binary"));
    cmd.arg("--address")
        .arg(d.socket())
        .arg("--namespace")
        .arg(ns)
        .args(args)
        .env_remove("BERTH_ADDRESS")
        .env_remove("BERTH_NAMESPACE")
        .env_remove("BERTH_SNAPSHOTTER");
    cmd
}

/// Runs [`berth_cli_command`] to completion (three minutes at most: pushes and pulls of the
/// multi-layer image).
pub fn berth_cli(d: &Daemon, ns: &str, args: &[&str]) -> CmdOutput {
    run_command(
        &mut berth_cli_command(d, ns, args),
        Duration::from_secs(180),
    )
    .expect("running berth")
}

/// Locates the example proxy snapshotter (`examples/snapshotter`):
/// `$BERTH_EXAMPLE_SNAPSHOTTER`, else `<target>/debug/berth-example-snapshotter`.
pub fn example_snapshotter_binary() -> Result<PathBuf> {
    workspace_binary(
        "berth-example-snapshotter",
        "BERTH_EXAMPLE_SNAPSHOTTER",
        "berth-example-snapshotter",
        Profile::Debug,
    )
}

/// A binary of this workspace: `$<env>` if set, else `<target>/<profile>/<name>`; a missing
/// one is an error that says how to build it (package `package`).
fn workspace_binary(name: &str, env: &str, package: &str, profile: Profile) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{env}={} does not exist", p.display());
        }
        return Ok(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_relative() {
        workspace_root().join(target)
    } else {
        target
    };
    let p = target.join(profile.dir()).join(name);
    if !p.is_file() {
        let release = match profile {
            Profile::Debug => "",
            Profile::Release => "--release ",
        };
        bail!(
            "{name} binary not found at {} (and ${env} is not set): build it with \
             `cargo build {release}-p {package}`",
            p.display()
        );
    }
    Ok(p)
}

fn system_binary(env: &str, default: &str) -> Result<PathBuf> {
    let p = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    if !p.is_file() {
        bail!(
            "{} not found at {} (set ${env} or install Debian's package: `apt-get install containerd`)",
            Path::new(default)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy(),
            p.display()
        );
    }
    Ok(p)
}

/// Locates Debian's `containerd` (`$CONTAINERD` or `/usr/bin/containerd`).
pub fn containerd_binary() -> Result<PathBuf> {
    system_binary("CONTAINERD", "/usr/bin/containerd")
}

/// Locates Debian's `ctr` (`$CTR` or `/usr/bin/ctr`).
pub fn ctr_binary() -> Result<PathBuf> {
    system_binary("CTR", "/usr/bin/ctr")
}

/// Prints a loud SKIP line on stderr. Use only when a capability is truly absent (never for a
/// missing binary: that must fail).
pub fn skip(test: &str, reason: &str) {
    eprintln!("\n*** SKIP {test}: {reason} ***\n");
}

/// Options for starting a [`Daemon`]. `Default` gives a private config with private root, state
/// and socket, waiting up to 30 s for readiness and polling every 5 ms.
#[derive(Debug, Clone)]
pub struct Options {
    /// A complete config file replacing the generated one. The placeholders `{dir}`, `{root}`,
    /// `{state}` and `{socket}` are replaced by the daemon's private paths.
    pub config: Option<String>,
    /// TOML appended to the generated config (ignored when `config` is set; placeholders are
    /// replaced too). Must not repeat a table the generated config already has (`[grpc]`,
    /// `[debug]`, and for containerd `[ttrpc]`).
    pub extra_config: String,
    /// Use this socket instead of `<dir>/d.sock`.
    pub socket: Option<PathBuf>,
    /// Use this root instead of `<dir>/root` (it is not removed on drop).
    pub root: Option<PathBuf>,
    /// Extra command-line arguments (after `--config FILE`).
    pub args: Vec<String>,
    /// Extra environment variables for the daemon.
    pub env: Vec<(String, String)>,
    /// `berthd` binary profile used when `$BERTHD` is not set.
    pub profile: Profile,
    /// How long [`Daemon::wait_ready`] waits.
    pub ready_timeout: Duration,
    /// Readiness poll period.
    pub poll_interval: Duration,
    /// How long [`Daemon::stop`] waits after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config: None,
            extra_config: String::new(),
            socket: None,
            root: None,
            args: Vec::new(),
            env: Vec::new(),
            profile: Profile::Debug,
            ready_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(5),
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// Config (the same TOML for both daemons) that moves the garbage collector's first automatic
/// collection an hour after start-up. By default both collect 100 ms after start
/// (`startup_delay`), which removes any blob `ctr content ingest` wrote without a lease in that
/// window. Collections after deletions and `sync` lease deletes still run.
pub const NO_STARTUP_GC: &str = r#"
[plugins."io.containerd.gc.v1.scheduler"]
startup_delay = "1h"
"#;

impl Options {
    /// Default options plus [`NO_STARTUP_GC`], for tests that keep blobs without leases.
    pub fn no_startup_gc() -> Self {
        Options {
            extra_config: NO_STARTUP_GC.to_string(),
            ..Options::default()
        }
    }

    /// Options with a complete config template (see [`Options::config`]).
    pub fn with_config(config: impl Into<String>) -> Self {
        Options {
            config: Some(config.into()),
            ..Options::default()
        }
    }
}

/// The captured result of a command (`ctr`, `berthd config ...`).
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard output as bytes (`ctr content get` writes binary data).
    pub stdout_bytes: Vec<u8>,
    /// Standard error.
    pub stderr: String,
}

impl CmdOutput {
    /// Whether the command exited 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics with both streams unless the command exited 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        if !self.success() {
            panic!("command failed: {self}");
        }
        self
    }

    /// Panics with both streams unless the command failed and its stderr contains `needle`
    /// (case-insensitive).
    #[track_caller]
    pub fn assert_failure_contains(&self, needle: &str) -> &Self {
        if self.success() || !self.stderr.to_lowercase().contains(&needle.to_lowercase()) {
            panic!("expected failure mentioning {needle:?}, got: {self}");
        }
        self
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` -> {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// What a command started by [`run_command_with_input`] reads on its standard input.
#[derive(Debug, Clone)]
pub enum Input {
    /// `/dev/null`.
    Null,
    /// These bytes through a pipe (written by a thread, then closed), like `printf ... | cmd`.
    Bytes(Vec<u8>),
    /// This file, opened read-only (seekable, like `cmd < FILE`).
    File(PathBuf),
}

/// Runs a command with a timeout (the child is killed when it expires), capturing both streams.
pub fn run_command(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput> {
    run_command_with_input(cmd, Input::Null, timeout)
}

/// [`run_command`] with `input` on the command's standard input.
pub fn run_command_with_input(
    cmd: &mut Command,
    input: Input,
    timeout: Duration,
) -> Result<CmdOutput> {
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let (stdin, bytes) = match input {
        Input::Null => (Stdio::null(), None),
        Input::Bytes(b) => (Stdio::piped(), Some(b)),
        Input::File(p) => (
            Stdio::from(File::open(&p).with_context(|| format!("opening {}", p.display()))?),
            None,
        ),
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{command}`"))?;
    let feeder = match (child.stdin.take(), bytes) {
        (Some(mut w), Some(b)) => Some(thread::spawn(move || {
            use std::io::Write as _;
            // A write error means the command stopped reading; its exit status tells why.
            let _ = w.write_all(&b);
        })),
        _ => None,
    };
    let out = finish_within(child, command, timeout);
    if let Some(f) = feeder {
        let _ = f.join();
    }
    out
}

/// Waits up to `timeout` for a spawned `child` (named `command` in messages), collecting
/// what it writes to piped streams; kills it when the time is up, so a hung client fails
/// its test with its standard error instead of stalling the suite.
pub fn finish_within(
    mut child: std::process::Child,
    command: impl Into<String>,
    timeout: Duration,
) -> Result<CmdOutput> {
    let command = command.into();
    let out = child.stdout.take().map(read_in_thread);
    let err = child.stderr.take().map(read_in_thread);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
            let stderr = String::from_utf8_lossy(&stderr);
            bail!("`{command}` did not finish within {timeout:?}; stderr: {stderr}");
        }
        thread::sleep(Duration::from_millis(2));
    };
    let stdout_bytes = out.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(CmdOutput {
        command,
        status,
        stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
        stdout_bytes,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

fn read_in_thread<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The rows of a table ctr prints with a tab-padded tabwriter (`content ls`, `content active`):
/// the header line is dropped, each row is split on tabs and empty cells are removed, so cells
/// holding spaces (`Less than a second`) stay whole.
pub fn tab_rows(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split('\t')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// Sorted `k=v` labels from a ctr labels cell (`a=1,b=2`; `-` or empty for none). ctr prints
/// them in Go map order.
pub fn label_cell(cell: &str) -> Vec<String> {
    let mut v: Vec<String> = cell
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "-")
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Runs `berthd ARGS` (for the `config` subcommands) with a 60 s timeout.
pub fn berthd_cmd<I, S>(args: I) -> Result<CmdOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let bin = berthd_binary(Profile::Debug)?;
    let mut cmd = Command::new(bin);
    cmd.args(args).env_remove("RUST_LOG").env("NO_COLOR", "1");
    run_command(&mut cmd, Duration::from_secs(60))
}

/// Runs `ctr --address SOCKET ARGS` with a 60 s timeout (the namespace is `default` unless the
/// arguments pass `-n`).
pub fn ctr_at<I, S>(socket: &Path, args: I) -> Result<CmdOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    ctr_at_with_input(socket, args, Input::Null)
}

/// [`ctr_at`] with `input` on ctr's standard input (`ctr content ingest` reads it).
pub fn ctr_at_with_input<I, S>(socket: &Path, args: I, input: Input) -> Result<CmdOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = ctr_command_at(socket, args)?;
    run_command_with_input(&mut cmd, input, Duration::from_secs(60))
}

/// The command `ctr --address SOCKET ARGS`, not started, with the environment variables that
/// would override the address, namespace or snapshotter removed and `TZ=UTC` (ctr prints and
/// computes times, such as lease expiries, in local time). For tests that drive ctr's standard
/// input themselves or kill it.
pub fn ctr_command_at<I, S>(socket: &Path, args: I) -> Result<Command>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(ctr_binary()?);
    cmd.arg("--address")
        .arg(socket)
        .args(args)
        .env_remove("CONTAINERD_NAMESPACE")
        .env_remove("CONTAINERD_ADDRESS")
        .env_remove("CONTAINERD_SNAPSHOTTER")
        .env("TZ", "UTC");
    Ok(cmd)
}

/// A running (or stopped) daemon on private paths. See the crate documentation.
pub struct Daemon {
    kind: Kind,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    root: PathBuf,
    state: PathBuf,
    socket: PathBuf,
    config_path: PathBuf,
    binary: PathBuf,
    opts: Options,
    child: Option<Child>,
    started_at: Instant,
    ready_after: Option<Duration>,
    last_exit: Option<ExitStatus>,
}

impl fmt::Debug for Daemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Daemon")
            .field("kind", &self.kind)
            .field("dir", &self.dir_path)
            .field("socket", &self.socket)
            .field("pid", &self.pid())
            .finish()
    }
}

fn berthd_config_template() -> &'static str {
    r#"version = 3
root = "{root}"
state = "{state}"

[grpc]
address = "{socket}"

[debug]
level = "info"
"#
}

fn containerd_config_template() -> &'static str {
    r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
address = "{socket}"

[ttrpc]
address = "{socket}.ttrpc"

[debug]
level = "info"

[plugins."io.containerd.internal.v1.opt"]
path = "{dir}/opt"
"#
}

impl Daemon {
    /// Starts a daemon of `kind` with default options and waits until it answers; panics (with
    /// its log) on failure. The usual entry point of a test.
    #[track_caller]
    pub fn start(kind: Kind) -> Daemon {
        Self::start_with(kind, Options::default())
    }

    /// Like [`Daemon::start`] with options; panics on failure.
    #[track_caller]
    pub fn start_with(kind: Kind, opts: Options) -> Daemon {
        match Self::launch(kind, opts) {
            Ok(d) => d,
            Err(e) => panic!("starting {kind}: {e:#}"),
        }
    }

    /// Starts `berthd` and waits until it answers a Version RPC.
    pub fn berthd(opts: Options) -> Result<Daemon> {
        Self::launch(Kind::Berthd, opts)
    }

    /// Starts Debian's `containerd` (config version 2, CRI disabled) and waits until it answers.
    pub fn containerd(opts: Options) -> Result<Daemon> {
        Self::launch(Kind::Containerd, opts)
    }

    /// Starts a daemon of `kind` and waits until it answers a Version RPC.
    pub fn launch(kind: Kind, opts: Options) -> Result<Daemon> {
        let mut d = Self::spawn(kind, opts)?;
        d.wait_ready()?;
        Ok(d)
    }

    /// Writes the config and spawns the process without waiting for it to be ready (for tests
    /// that expect it to fail: see [`Daemon::wait_exit`]).
    pub fn spawn(kind: Kind, opts: Options) -> Result<Daemon> {
        let binary = match kind {
            Kind::Berthd => berthd_binary(opts.profile)?,
            Kind::Containerd => containerd_binary()?,
        };
        let prefix = match kind {
            Kind::Berthd => "berth-it-b",
            Kind::Containerd => "berth-it-c",
        };
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/tmp")
            .context("creating the daemon's temporary directory")?;
        let dir_path = dir.path().to_path_buf();
        let root = opts.root.clone().unwrap_or_else(|| dir_path.join("root"));
        let state = dir_path.join("state");
        let socket = opts
            .socket
            .clone()
            .unwrap_or_else(|| dir_path.join("d.sock"));
        if socket.as_os_str().len() >= 108 {
            bail!("socket path {} is too long", socket.display());
        }
        let config = match &opts.config {
            Some(c) => c.clone(),
            None => {
                let base = match kind {
                    Kind::Berthd => berthd_config_template(),
                    Kind::Containerd => containerd_config_template(),
                };
                format!("{base}\n{}", opts.extra_config)
            }
        };
        let config = config
            .replace("{dir}", &dir_path.to_string_lossy())
            .replace("{root}", &root.to_string_lossy())
            .replace("{state}", &state.to_string_lossy())
            .replace("{socket}", &socket.to_string_lossy());
        let config_path = dir_path.join("config.toml");
        fs::write(&config_path, config).context("writing the config")?;
        let mut d = Daemon {
            kind,
            dir: Some(dir),
            dir_path,
            root,
            state,
            socket,
            config_path,
            binary,
            opts,
            child: None,
            started_at: Instant::now(),
            ready_after: None,
            last_exit: None,
        };
        d.spawn_process()?;
        Ok(d)
    }

    fn spawn_process(&mut self) -> Result<()> {
        let stdout = self.open_log("stdout.log")?;
        let stderr = self.open_log("stderr.log")?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--config")
            .arg(&self.config_path)
            .args(&self.opts.args)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .current_dir(&self.dir_path);
        self.ready_after = None;
        self.last_exit = None;
        self.started_at = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn open_log(&self, name: &str) -> Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir_path.join(name))
            .with_context(|| format!("opening {name}"))
    }

    /// Polls (every [`Options::poll_interval`]) until a connect + Version RPC succeeds, the
    /// process exits, or [`Options::ready_timeout`] passes. Returns the time from spawn to the
    /// first successful Version reply.
    pub fn wait_ready(&mut self) -> Result<Duration> {
        let deadline = self.started_at + self.opts.ready_timeout;
        let mut last_err = anyhow!("the socket {} never accepted", self.socket.display());
        loop {
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited with {status} before it was ready\n{}",
                    self.kind,
                    self.log_excerpt()
                );
            }
            if UnixStream::connect(&self.socket).is_ok() {
                let socket = self.socket.clone();
                match block_on_global(async move {
                    version_with_timeout(&socket, Duration::from_secs(2)).await
                }) {
                    Ok(_) => {
                        let d = self.started_at.elapsed();
                        self.ready_after = Some(d);
                        return Ok(d);
                    }
                    Err(e) => last_err = e,
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {:?}: {last_err:#}\n{}",
                    self.kind,
                    self.opts.ready_timeout,
                    self.log_excerpt()
                );
            }
            thread::sleep(self.opts.poll_interval);
        }
    }

    /// The time from spawn to the first successful Version reply of the last start.
    pub fn startup_time(&self) -> Option<Duration> {
        self.ready_after
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(self.last_exit);
        };
        let st = child.try_wait()?;
        if let Some(st) = st {
            self.last_exit = Some(st);
            self.child = None;
        }
        Ok(st)
    }

    /// Waits up to `timeout` for the process to exit by itself; an error if it is still running
    /// (it is left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("{} still running after {timeout:?}", self.kind);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Sends `sig` to the process (no-op if it has exited).
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if let Some(pid) = self.pid() {
            kill(Pid::from_raw(pid as i32), sig).with_context(|| format!("kill -{sig} {pid}"))?;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to [`Options::stop_timeout`]. If the process is still running then,
    /// it is killed with SIGKILL and an error is returned. Returns the exit status (also for a
    /// process that had already exited).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.try_wait()? {
            return Ok(st);
        }
        self.signal(Signal::SIGTERM)?;
        match self.wait_exit(self.opts.stop_timeout) {
            Ok(st) => Ok(st),
            Err(_) => {
                let _ = self.kill();
                bail!(
                    "{} did not exit within {:?} of SIGTERM; killed it\n{}",
                    self.kind,
                    self.opts.stop_timeout,
                    self.log_excerpt()
                )
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.try_wait()? {
            return Ok(st);
        }
        self.signal(Signal::SIGKILL)?;
        let child = self.child.as_mut().ok_or_else(|| anyhow!("no child"))?;
        let st = child.wait()?;
        self.child = None;
        self.last_exit = Some(st);
        Ok(st)
    }

    /// [`Daemon::stop`] (which must succeed), then starts the same binary with the same config,
    /// root and socket again and waits until it answers. Logs are appended to the same files.
    pub fn restart(&mut self) -> Result<Duration> {
        self.stop()?;
        self.spawn_process()?;
        self.wait_ready()
    }

    /// Starts the process again after [`Daemon::stop`] or [`Daemon::kill`] and waits until it
    /// answers.
    pub fn start_again(&mut self) -> Result<Duration> {
        if self.is_running() {
            bail!("{} is still running", self.kind);
        }
        self.spawn_process()?;
        self.wait_ready()
    }

    /// Which daemon this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The exit status once the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.last_exit
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The state directory.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// The private temporary directory.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The config file the daemon was started with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The captured standard error (ANSI escapes removed).
    pub fn stderr_log(&self) -> String {
        strip_ansi(&fs::read_to_string(self.dir_path.join("stderr.log")).unwrap_or_default())
    }

    /// The captured standard output (ANSI escapes removed).
    pub fn stdout_log(&self) -> String {
        strip_ansi(&fs::read_to_string(self.dir_path.join("stdout.log")).unwrap_or_default())
    }

    /// Standard output followed by standard error (ANSI escapes removed): the daemon's log.
    pub fn log(&self) -> String {
        let mut s = self.stdout_log();
        s.push_str(&self.stderr_log());
        s
    }

    fn log_excerpt(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(60);
        format!(
            "--- {} log ({}; last {} lines) ---\n{}",
            self.kind,
            self.dir_path.display(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }

    /// Runs `ctr --address <socket> ARGS`.
    pub fn ctr<I, S>(&self, args: I) -> CmdOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        match ctr_at(&self.socket, args) {
            Ok(o) => o,
            Err(e) => panic!("running ctr against {}: {e:#}", self.kind),
        }
    }

    /// Runs `ctr --address <socket> ARGS` and panics with both streams (and the daemon's log
    /// tail) unless it exits 0.
    #[track_caller]
    pub fn ctr_ok<I, S>(&self, args: I) -> CmdOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.ctr(args);
        if !out.success() {
            panic!(
                "ctr against {} failed: {out}\n{}",
                self.kind,
                self.log_excerpt()
            );
        }
        out
    }

    /// Runs `ctr --address <socket> ARGS` with `input` on its standard input.
    pub fn ctr_input<I, S>(&self, args: I, input: Input) -> CmdOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        match ctr_at_with_input(&self.socket, args, input) {
            Ok(o) => o,
            Err(e) => panic!("running ctr against {}: {e:#}", self.kind),
        }
    }

    /// [`Daemon::ctr_input`] that panics with both streams (and the daemon's log tail) unless
    /// ctr exits 0.
    #[track_caller]
    pub fn ctr_input_ok<I, S>(&self, args: I, input: Input) -> CmdOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.ctr_input(args, input);
        if !out.success() {
            panic!(
                "ctr against {} failed: {out}\n{}",
                self.kind,
                self.log_excerpt()
            );
        }
        out
    }

    /// The command `ctr --address <socket> ARGS`, not started (see [`ctr_command_at`]).
    pub fn ctr_command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        match ctr_command_at(&self.socket, args) {
            Ok(c) => c,
            Err(e) => panic!("ctr for {}: {e:#}", self.kind),
        }
    }

    /// The last lines of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.log_excerpt()
    }

    /// A tonic channel over the daemon's socket.
    pub async fn channel(&self) -> Result<Channel> {
        grpc_channel(&self.socket).await
    }

    /// VmRSS of the daemon process in KiB (from `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.kind))?;
        rss_kib(pid)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.stop()
        {
            eprintln!("berth-integration: stopping {}: {e:#}", self.kind);
        }
        unmount_below(&self.dir_path);
        if let Some(root) = &self.opts.root
            && !root.starts_with(&self.dir_path)
        {
            unmount_below(root);
        }
        if let Some(dir) = self.dir.take() {
            if std::env::var_os("BERTH_KEEP_TMP").is_some() {
                let kept = dir.keep();
                eprintln!("berth-integration: kept {}", kept.display());
            } else if let Err(e) = dir.close() {
                eprintln!(
                    "berth-integration: removing {}: {e}",
                    self.dir_path.display()
                );
            }
        }
    }
}

/// Unmounts (lazily, deepest first) every mount point at or below `dir`.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    for p in points {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("berth-integration: umount {}: {e}", p.display());
        }
    }
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes ANSI escape sequences (colours) from a log.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// VmRSS of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Connects a tonic [`Channel`] over a unix socket (the URI is a placeholder, never dialed).
/// Use it with the `containerd_client::services::v1::*_client` clients.
pub async fn grpc_channel(socket: impl AsRef<Path>) -> Result<Channel> {
    let socket = socket.as_ref().to_path_buf();
    let ch = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .context("connecting the gRPC channel")?;
    Ok(ch)
}

/// Wraps `msg` in a request carrying the namespace header `containerd-namespace: ns`.
pub fn with_namespace<T>(msg: T, ns: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let value = ns
        .parse()
        .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("invalid"));
    req.metadata_mut().insert(NAMESPACE_HEADER, value);
    req
}

/// Connects and calls Version.Version, giving up after `timeout`.
pub async fn version_with_timeout(socket: &Path, timeout: Duration) -> Result<VersionResponse> {
    let fut = async {
        let ch = grpc_channel(socket).await?;
        let resp = VersionClient::new(ch)
            .version(())
            .await
            .context("Version RPC")?;
        Ok::<_, anyhow::Error>(resp.into_inner())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("Version RPC timed out after {timeout:?}"))?
}

fn global_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("berth-harness")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("building the harness runtime: {e}"))
    })
}

/// Runs `fut` to completion on the harness's own runtime and waits for it. Works from plain
/// threads and from inside another tokio runtime (the calling thread just blocks).
pub fn block_on_global<F>(fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    global_runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    match rx.recv() {
        Ok(v) => v,
        Err(_) => panic!("the harness runtime dropped a task"),
    }
}

/// Runs an async test body on a fresh current-thread runtime (for sync `#[test]`s generated by
/// [`calibrated!`]).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("building a test runtime: {e}"))
        .block_on(fut)
}

/// Generates one `#[test]` per daemon kind for a test body `fn NAME(kind: Kind)`:
/// `NAME::containerd` and `NAME::berthd`.
///
/// ```ignore
/// fn namespaces_cli(kind: Kind) { /* ... */ }
/// berth_integration::calibrated!(namespaces_cli);
/// ```
#[macro_export]
macro_rules! calibrated {
    ($name:ident) => {
        mod $name {
            #[test]
            fn containerd() {
                super::$name($crate::Kind::Containerd)
            }
            #[test]
            fn berthd() {
                super::$name($crate::Kind::Berthd)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/tmp/x\\"), r"/tmp/x\\");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(strip_ansi("\u{1b}[33m WARN\u{1b}[0m x"), " WARN x");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("k=v"), "k=v");
    }
}
