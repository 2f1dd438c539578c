//! `berth`: the command-line client of berthd, for what containerd's `ctr` lacks: image
//! archives through the transfer service with progress bars, and a few debugging aids.
//!
//! ```text
//! berth [--address SOCKET] [--namespace NS] [--timeout DURATION] <command>
//!
//! berth images import [--snapshotter NAME] [--no-unpack] [--index-name NAME]
//!                     [--base-name NAME] [--platform P]... [--all-platforms]
//!                     [--progress auto|plain|none] FILE|-
//! berth images export [--platform P]... [--all-platforms] [--skip-manifest-json]
//!                     [--progress auto|plain|none] FILE|- NAME...
//! berth images ls [-q]
//! berth pull [--user U:P] [--plain-http] [--hosts-dir DIR] [--platform P]...
//!            [--snapshotter NAME] [--no-unpack] REF
//! berth push [--user U:P] [--plain-http] [--hosts-dir DIR] [--platform P]... NAME [REF]
//! ```
//!
//! - `--address`/`-a` (or `BERTH_ADDRESS`): berthd's socket, `/run/berth/berthd.sock` by
//!   default. Any daemon with containerd's transfer and streaming services answers too
//!   (containerd 1.7 and later).
//! - `--namespace`/`-n` (or `BERTH_NAMESPACE`): `default` by default.
//! - `--timeout`: give up on the whole command after this long (`90s`, `5m`, `1h`); none by
//!   default.
//!
//! `images import` streams the archive (OCI layout or Docker archive, plain or compressed
//! with gzip, zstd or xz: the daemon tells by magic number) and unpacks the host platform's
//! image into the daemon's default snapshotter unless told otherwise. Progress goes to
//! standard error, one bar per blob or layer on a terminal, text lines otherwise; standard
//! output gets one `NAME<TAB>DIGEST` line per image stored. `images export` writes an OCI
//! archive (with a Docker `manifest.json`) to FILE, replacing it only once complete, or to
//! standard output. `images ls` lists name, target digest and media type.
//!
//! Errors are one line on standard error, `berth: <what failed>: <why>`, and exit status 1;
//! usage errors exit 2.

mod client;
mod images;
mod platform;
mod progress;
mod pull;
mod push;
mod stream;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::client::{Client, Failure};

/// berthd's socket when neither `--address` nor `BERTH_ADDRESS` says otherwise.
const DEFAULT_ADDRESS: &str = "/run/berth/berthd.sock";
/// The help section of the options every command takes.
const GLOBAL: &str = "Global options";

/// berth: the command-line client of berthd (image import and export through the transfer
/// service, with progress).
#[derive(Debug, Parser)]
#[command(name = "berth", version, about)]
struct Cli {
    /// berthd's socket.
    #[arg(
        short,
        long,
        global = true,
        help_heading = GLOBAL,
        env = "BERTH_ADDRESS",
        default_value = DEFAULT_ADDRESS,
        value_name = "SOCKET"
    )]
    address: PathBuf,
    /// Namespace of the objects.
    #[arg(
        short,
        long,
        global = true,
        help_heading = GLOBAL,
        env = "BERTH_NAMESPACE",
        default_value = "default",
        value_name = "NS"
    )]
    namespace: String,
    /// Give up on the command after this long (90s, 5m, 1h, 500ms).
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    timeout: Option<Duration>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import, export and list images.
    #[command(subcommand)]
    Images(ImagesCommand),
    /// Pull an image from a registry, unpacking it (prints NAME<TAB>DIGEST).
    Pull(pull::PullArgs),
    /// Push an image to a registry (prints REFERENCE<TAB>DIGEST).
    Push(push::PushArgs),
}

#[derive(Debug, Subcommand)]
enum ImagesCommand {
    /// Import images from an archive, unpacking them (prints NAME<TAB>DIGEST per image).
    Import(images::ImportArgs),
    /// Export images to an OCI archive.
    Export(images::ExportArgs),
    /// List images: name, target digest, media type.
    #[command(visible_alias = "list")]
    Ls(images::LsArgs),
}

/// A duration: a number with a unit `ms`, `s`, `m` or `h` (bare numbers are seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write e.g. 90s, 5m, 1h or 500ms"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {unit:?}: use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let client = Client::connect(&cli.address, &cli.namespace).await?;
    match cli.command {
        Command::Images(ImagesCommand::Import(args)) => images::import(&client, args).await,
        Command::Images(ImagesCommand::Export(args)) => images::export(&client, args).await,
        Command::Images(ImagesCommand::Ls(args)) => images::ls(&client, args).await,
        Command::Pull(args) => pull::pull(&client, args).await,
        Command::Push(args) => push::push(&client, args).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread is enough for a client, and it orders a failed local read before the
    // daemon's answer to it (see `images::import`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let timeout = cli.timeout;
    let result = runtime.block_on(async move {
        match timeout {
            Some(limit) => tokio::time::timeout(limit, run(cli))
                .await
                .unwrap_or_else(|_| {
                    Err(Failure::new(format!(
                        "timed out after {limit:?} (--timeout)"
                    )))
                }),
            None => run(cli).await,
        }
    });
    // A read of standard input may still wait on a blocking thread (the daemon refused the
    // archive early): do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("berth: {failure}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").expect_err("unit").contains("unit"));
    }

    #[test]
    fn globals_come_after_the_subcommand_too() {
        let cli = Cli::try_parse_from([
            "berth",
            "images",
            "ls",
            "-q",
            "-n",
            "team-a",
            "-a",
            "/tmp/x.sock",
        ])
        .expect("parse");
        assert_eq!(cli.namespace, "team-a");
        assert_eq!(cli.address, PathBuf::from("/tmp/x.sock"));
        let Command::Images(ImagesCommand::Ls(ls)) = cli.command else {
            panic!("ls expected");
        };
        assert!(ls.quiet);
    }

    #[test]
    fn export_needs_a_name() {
        assert!(Cli::try_parse_from(["berth", "images", "export", "out.tar"]).is_err());
        assert!(Cli::try_parse_from(["berth", "images", "export", "out.tar", "a:1"]).is_ok());
    }
}
