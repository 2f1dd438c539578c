//! `berth-test-proxy`: a content store and/or a differ served as proxy plugins, for the
//! integration tests (`tests/proxy_content_diff.rs`).
//!
//! ```text
//! berth-test-proxy --socket PATH [--content-root DIR]
//!                  [--differ-content SOCKET --differ-state DIR] [--record FILE]
//! ```
//!
//! - `--content-root DIR` serves berth's local content store rooted at `DIR` (the
//!   `containerd.services.content.v1.Content` service).
//! - `--differ-content SOCKET` serves the walking differ (`containerd.services.diff.v1.Diff`),
//!   reading layers from and writing diffs to the content service at `SOCKET` (berthd's own
//!   socket in a deployment) in each caller's namespace and lease; compare mounts under
//!   `--differ-state DIR` (default: a directory next to the socket).
//! - `--record FILE` appends one line per successful differ call (`apply <layer> <diff id>`,
//!   `compare <digest>`), so a test can tell the proxy did the work.
//!
//! It serves until SIGTERM or SIGINT and removes its socket then.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use berth_content_local::LocalStore;
use berth_diff_walking::plugin::WalkingDiffer;
use berth_proxy_sdk::content::ContentClient;
use berth_proxy_sdk::core::diff::{ApplyOptions, DiffOptions};
use berth_proxy_sdk::core::snapshot::{Descriptor, Mount};
use berth_proxy_sdk::{CallContext, Differ, Server};

const USAGE: &str = "usage: berth-test-proxy --socket PATH [--content-root DIR] \
                     [--differ-content SOCKET --differ-state DIR] [--record FILE]";

#[derive(Debug, Default)]
struct Args {
    socket: Option<PathBuf>,
    content_root: Option<PathBuf>,
    differ_content: Option<PathBuf>,
    differ_state: Option<PathBuf>,
    record: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args_os().skip(1);
    while let Some(flag) = it.next() {
        let flag = flag.to_string_lossy().into_owned();
        let mut value = || {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--socket" => args.socket = Some(value()?),
            "--content-root" => args.content_root = Some(value()?),
            "--differ-content" => args.differ_content = Some(value()?),
            "--differ-state" => args.differ_state = Some(value()?),
            "--record" => args.record = Some(value()?),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if args.socket.is_none() {
        return Err(format!("--socket is required\n{USAGE}"));
    }
    if args.content_root.is_none() && args.differ_content.is_none() {
        return Err(format!(
            "nothing to serve: give --content-root, --differ-content or both\n{USAGE}"
        ));
    }
    Ok(args)
}

/// The walking differ, writing a line to the record file after each call that succeeded.
struct Recording {
    inner: WalkingDiffer,
    record: Option<Mutex<std::fs::File>>,
}

impl Recording {
    fn note(&self, line: String) {
        if let Some(file) = &self.record {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            // A test reads this file; a lost line shows up there as a missing apply.
            if let Err(e) = writeln!(file, "{line}") {
                eprintln!("berth-test-proxy: cannot write the record file: {e}");
            }
        }
    }
}

#[async_trait::async_trait]
impl Differ for Recording {
    async fn apply(
        &self,
        cx: &CallContext,
        desc: &Descriptor,
        mounts: &[Mount],
        options: &ApplyOptions,
    ) -> berth_proxy_sdk::Result<Descriptor> {
        let applied = self.inner.apply(cx, desc, mounts, options).await?;
        self.note(format!("apply {} {}", desc.digest, applied.digest));
        Ok(applied)
    }

    async fn compare(
        &self,
        cx: &CallContext,
        lower: &[Mount],
        upper: &[Mount],
        options: &DiffOptions,
    ) -> berth_proxy_sdk::Result<Descriptor> {
        let written = self.inner.compare(cx, lower, upper, options).await?;
        self.note(format!("compare {}", written.digest));
        Ok(written)
    }
}

fn open_record(path: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("open the record file {}: {e}", path.display()))
}

async fn run(args: Args) -> Result<(), String> {
    let socket = args
        .socket
        .ok_or_else(|| format!("--socket is required\n{USAGE}"))?;
    let mut server = Server::new();
    if let Some(root) = &args.content_root {
        let store = LocalStore::new(root);
        store
            .prepare()
            .await
            .map_err(|e| format!("prepare the content store at {}: {e}", root.display()))?;
        server = server.content(store);
    }
    if let Some(content_socket) = &args.differ_content {
        let content = ContentClient::new(berth_proxy_sdk::connect(content_socket))
            .described_as(format!("content service at {}", content_socket.display()));
        let state = args.differ_state.clone().unwrap_or_else(|| {
            let mut name = socket.file_name().unwrap_or_default().to_owned();
            name.push(".state");
            socket.with_file_name(name)
        });
        let record = args
            .record
            .as_deref()
            .map(open_record)
            .transpose()?
            .map(Mutex::new);
        let differ = Recording {
            inner: WalkingDiffer::new(Arc::new(content)).with_mount_dir(state.join("mounts")),
            record,
        };
        server = server.differ(differ);
    }
    server
        .serve_unix(&socket)
        .await
        .map_err(|e| format!("serve on {}: {e}", socket.display()))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let result = match parse_args() {
        Ok(args) => run(args).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-test-proxy: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
