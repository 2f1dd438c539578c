//! `berthd`: the berth daemon. Thin: parse arguments, load the configuration, build the
//! registry from the built-in plugin list, initialise it and serve the gRPC plugins.

mod builtins;
mod config_cmd;
mod daemon;
mod dynamic;
mod proxy;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// berth: a container daemon that speaks containerd's API.
#[derive(Debug, Parser)]
#[command(name = "berthd", version = berth_services::VERSION, about)]
struct Cli {
    /// Configuration file (containerd's keys, version 1 to 3); without one, the embedded
    /// default is used (`berthd config default` prints it).
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log level (trace, debug, info, warn, error); overrides `[debug] level`.
    #[arg(short, long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Socket to serve on; overrides `[grpc] address`.
    #[arg(short, long, value_name = "SOCKET")]
    address: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print, migrate or check configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the complete default configuration, every plugin section included.
    Default,
    /// Print a version 3 file made from an older one (FILE or --config).
    Migrate {
        /// The file to migrate.
        file: Option<PathBuf>,
    },
    /// Check a file (FILE or --config) without starting: exit 1 on errors, warnings on stderr.
    Check {
        /// The file to check.
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Config(ConfigCommand::Default)) => config_cmd::print_default(),
        Some(Command::Config(ConfigCommand::Migrate { file })) => {
            config_cmd::migrate(file.or(cli.config).as_deref())
        }
        Some(Command::Config(ConfigCommand::Check { file })) => {
            config_cmd::check(file.or(cli.config).as_deref())
        }
        None => daemon::run(daemon::Options {
            config: cli.config,
            log_level: cli.log_level,
            address: cli.address,
        }),
    }
}
