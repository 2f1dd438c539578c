//! `berth-example-snapshotter --socket PATH --root DIR`: serves the example copying
//! snapshotter as a proxy plugin for berthd or containerd, until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use berth_example_snapshotter::CopySnapshotter;
use clap::Parser;

/// A copying snapshotter served on a unix socket (berth proxy-sdk example).
#[derive(Debug, Parser)]
#[command(name = "berth-example-snapshotter", version)]
struct Cli {
    /// The unix socket to serve on (`address` in the daemon's `[proxy_plugins.<name>]`).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Where snapshots and their records are kept.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Log level (trace, debug, info, warn, error).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: tracing::Level,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(cli.log_level)
        .with_writer(std::io::stderr)
        .with_target(false)
        // A closed stderr (the parent went away) must not turn logging into panics.
        .log_internal_errors(false)
        .init();
    let snapshotter = match CopySnapshotter::open(&cli.root).await {
        Ok(sn) => sn,
        Err(e) => {
            tracing::error!(
                "cannot open the snapshotter root {}: {e}",
                cli.root.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let served = berth_proxy_sdk::Server::new()
        .snapshotter(snapshotter)
        .serve_unix(&cli.socket)
        .await;
    match served {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
