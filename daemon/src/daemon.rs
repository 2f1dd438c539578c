//! Running the daemon: configuration, logging, plugin init, serving, shutdown.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use berth_core::config::{self, Config, Loaded};
use berth_core::registry::Registry;
use berth_core::serve::{self, GrpcServiceKind, MessageLimits, ServeError, ServeOptions, Shutdown};
use tokio::signal::unix::{SignalKind, signal};

use crate::{config_cmd, dynamic};

/// Command-line settings of a daemon run.
pub struct Options {
    pub config: Option<PathBuf>,
    pub log_level: Option<String>,
    pub address: Option<PathBuf>,
}

/// Checks a log level name.
pub fn parse_level(level: &str) -> anyhow::Result<tracing::Level> {
    level.parse::<tracing::Level>().map_err(|_| {
        anyhow::anyhow!("unknown log level {level:?}: use trace, debug, info, warn or error")
    })
}

pub fn run(options: Options) -> ExitCode {
    let started = Instant::now();
    // Everything that can be wrong with the configuration is found before anything is
    // created on disk.
    let loaded = match &options.config {
        Some(path) => match config::load(path) {
            Ok(loaded) => loaded,
            Err(e) => {
                eprintln!("berthd: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => match config_cmd::default_config() {
            Ok(config) => Loaded {
                config,
                notices: Vec::new(),
            },
            Err(e) => {
                eprintln!("berthd: {e:#}");
                return ExitCode::FAILURE;
            }
        },
    };
    let level = options
        .log_level
        .as_deref()
        .unwrap_or(&loaded.config.debug.level);
    let level = match parse_level(level) {
        Ok(level) => level,
        Err(e) => {
            eprintln!("berthd: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let mut config = loaded.config.clone();
    if let Some(address) = options.address {
        config.grpc.address = address;
    }
    // Libraries load before the runtime starts (dlopen blocks), so the review below knows
    // their plugins' sections.
    let (registry, refusals) = match config_cmd::full_registry(&config) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    let (warnings, infos) = config_cmd::review(&loaded, &registry);
    infos.iter().for_each(|i| tracing::info!("{i}"));
    warnings.iter().for_each(|w| tracing::warn!("{w}"));
    if let Err(e) = dynamic::check_required(&config, &registry, &refusals) {
        tracing::error!("{e:#}");
        return ExitCode::FAILURE;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("berthd")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve_daemon(config, registry, started)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn create_private_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(path)
        .with_context(|| format!("create directory {}", path.display()))
}

async fn serve_daemon(config: Config, registry: Registry, started: Instant) -> anyhow::Result<()> {
    let address = config.grpc.address.clone();
    // Refuse early, before opening the metadata store another daemon may hold.
    if serve::probe(&address).await? == serve::SocketState::Live {
        return Err(ServeError::InUse { path: address }.into());
    }
    create_private_dir(&config.root)?;
    create_private_dir(&config.state)?;

    let shutdown = Shutdown::new();
    spawn_signal_handler(shutdown.clone())?;

    let plugins = registry.init(&config).await.context("plugin init")?;

    let limits = MessageLimits {
        max_recv: config.grpc.max_recv_message_size,
        max_send: config.grpc.max_send_message_size,
    };
    let mut routes = tonic::service::RoutesBuilder::default();
    for (id, service) in plugins.all::<GrpcServiceKind>() {
        tracing::debug!(service = %id, "registering gRPC service");
        service.add_to(&mut routes, limits);
    }
    let listener = serve::bind(&address, 0o660, config.grpc.uid, config.grpc.gid).await?;
    tracing::info!(address = %address.display(), "serving");
    tracing::info!(
        "berthd successfully booted in {:.3}s",
        started.elapsed().as_secs_f64()
    );
    let result = serve::serve(routes.routes(), listener, shutdown, ServeOptions::default()).await;
    if let Err(e) = std::fs::remove_file(&address)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %address.display(), "cannot remove socket: {e}");
    }
    match result {
        Ok(()) | Err(ServeError::Closed) => {
            tracing::info!("berthd stopped");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn spawn_signal_handler(shutdown: Shutdown) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        // Trigger before logging: a failed log write (stderr a closed pipe) panics in
        // tracing-subscriber and must not keep berthd from stopping.
        shutdown.trigger();
        tracing::info!("{name} received; shutting down");
    });
    Ok(())
}
