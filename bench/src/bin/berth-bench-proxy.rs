//! `berth-bench-proxy`: berth's own overlayfs snapshotter and local content store served as
//! proxy plugins, for the proxy-overhead workload: the same crates berthd compiles in, so the
//! bench compares one plugin's code behind two transports.
//!
//! ```text
//! berth-bench-proxy --socket PATH [--overlay-root DIR] [--content-root DIR]
//! ```
//!
//! Serves until SIGTERM or SIGINT and removes its socket then.

use std::path::PathBuf;
use std::process::ExitCode;

use berth_content_local::LocalStore;
use berth_proxy_sdk::Server;

const USAGE: &str =
    "usage: berth-bench-proxy --socket PATH [--overlay-root DIR] [--content-root DIR]";

#[derive(Default)]
struct Args {
    socket: Option<PathBuf>,
    overlay_root: Option<PathBuf>,
    content_root: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args_os().skip(1);
    while let Some(flag) = it.next() {
        let flag = flag.to_string_lossy().into_owned();
        let value = it
            .next()
            .map(PathBuf::from)
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--socket" => args.socket = Some(value),
            "--overlay-root" => args.overlay_root = Some(value),
            "--content-root" => args.content_root = Some(value),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

async fn run(args: Args) -> Result<(), String> {
    let socket = args
        .socket
        .ok_or_else(|| format!("--socket is required\n{USAGE}"))?;
    let mut server = Server::new();
    if let Some(root) = args.overlay_root {
        let options = berth_snapshot_overlay::host_mount_options(&root, &[]);
        let snapshotter = berth_snapshot_overlay::overlay(root.clone(), false, false, options);
        snapshotter
            .open()
            .await
            .map_err(|e| format!("open the overlay snapshotter at {}: {e}", root.display()))?;
        server = server.snapshotter(snapshotter);
    }
    if let Some(root) = args.content_root {
        let store = LocalStore::new(&root);
        store
            .prepare()
            .await
            .map_err(|e| format!("prepare the content store at {}: {e}", root.display()))?;
        server = server.content(store);
    }
    server
        .serve_unix(&socket)
        .await
        .map_err(|e| format!("serve on {}: {e}", socket.display()))
}

#[tokio::main]
async fn main() -> ExitCode {
    match parse_args() {
        Ok(args) => match run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("berth-bench-proxy: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("berth-bench-proxy: {e}");
            ExitCode::from(2)
        }
    }
}
