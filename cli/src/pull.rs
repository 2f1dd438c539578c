//! `berth pull`: an image from a registry through the transfer service (source
//! `OCIRegistry`, destination `ImageStore`), with the progress display of import.
//!
//! With `--user`, a third stream carries credentials: the daemon sends an `AuthRequest`
//! naming the registry host and this command answers with the user and password (as ctr
//! does with its credential helper). The password is never printed.
//!
//! `--http-dump` and `--http-trace` set the registry resolver's `http_debug` (containerd 2.1's
//! field, PR 10762). For a dump this command opens one more stream and names it in
//! `logs_stream`, as containerd's client does: the daemon writes the request and response heads
//! (secrets redacted) there as bytes, and they are copied to standard error as they come. Trace
//! events stay in the daemon's log (at debug level), as in containerd.

use berth_proto::containerd::services::transfer::v1::{TransferOptions, TransferRequest};
use berth_proto::containerd::types::Platform;
use berth_proto::containerd::types::transfer::{
    AuthRequest, AuthResponse, AuthType, HttpDebug, ImageStore, OciRegistry, RegistryResolver,
};
use berth_proto::type_url;
use tokio::task::JoinHandle;

use crate::client::{Client, Failure};
use crate::images;
use crate::platform;
use crate::progress::{Display, Mode};
use crate::stream::{self, ClientStream};

/// `berth pull`.
#[derive(Debug, Clone, clap::Args)]
pub struct PullArgs {
    /// Credentials for the registry, USER:PASSWORD.
    #[arg(short, long, value_name = "USER:PASSWORD")]
    pub user: Option<String>,
    /// Talk plain HTTP to registries without a hosts.toml.
    #[arg(long)]
    pub plain_http: bool,
    /// Directory of `<host>/hosts.toml` files, instead of the daemon's `config_path`.
    #[arg(long, value_name = "DIR")]
    pub hosts_dir: Option<String>,
    /// Pull (and unpack) this platform's image of an index (repeatable); default: the
    /// host's.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_parser = platform::parse)]
    pub platform: Vec<Platform>,
    /// Snapshotter to unpack into; without it, the daemon's default (overlayfs).
    #[arg(long, env = "BERTH_SNAPSHOTTER", value_name = "NAME")]
    pub snapshotter: Option<String>,
    /// Store the content only; do not unpack layers into snapshots.
    #[arg(long)]
    pub no_unpack: bool,
    /// How to show progress on standard error.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = Mode::Auto)]
    pub progress: Mode,
    /// Print every HTTP request and response head the daemon exchanges with the registry on
    /// standard error (credentials and tokens redacted).
    #[arg(long)]
    pub http_dump: bool,
    /// Log HTTP connection timing (DNS, connect, TLS, first byte, body) in the daemon's log at
    /// debug level.
    #[arg(long)]
    pub http_trace: bool,
    /// The image reference (`registry.example:5000/repo:tag`, `busybox`).
    #[arg(value_name = "REF")]
    pub reference: String,
}

/// The transfer destination of a pull: the platforms to fetch and the unpacks to do.
pub fn pull_store(args: &PullArgs) -> ImageStore {
    let (wanted, unpacks) =
        images::platforms_and_unpacks(&args.platform, args.no_unpack, args.snapshotter.as_deref());
    ImageStore {
        name: args.reference.clone(),
        platforms: wanted,
        unpacks,
        ..ImageStore::default()
    }
}

/// Splits `USER:PASSWORD` (a password may contain colons; a missing one is empty).
pub(crate) fn split_user(user: &str) -> (String, String) {
    match user.split_once(':') {
        Some((u, p)) => (u.to_owned(), p.to_owned()),
        None => (user.to_owned(), String::new()),
    }
}

/// Answers every `AuthRequest` on `stream` with the given credentials.
pub(crate) fn serve_auth(stream: ClientStream, user: String, secret: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        let reply = stream.sender();
        let _ = stream::receive_messages(stream, |any| {
            if type_url::from_any::<AuthRequest>(&any).is_err() {
                return;
            }
            let answer = AuthResponse {
                auth_type: AuthType::Credentials as i32,
                secret: secret.clone(),
                username: user.clone(),
                expire_at: None,
            };
            // The daemon gave up waiting if this fails; the transfer's result says so.
            let _ = reply.try_send(type_url::to_any(&answer));
        })
        .await;
    })
}

/// The resolver's `http_debug` for the dump and trace flags.
fn http_debug(args: &PullArgs) -> HttpDebug {
    match (args.http_dump, args.http_trace) {
        (true, true) => HttpDebug::Both,
        (true, false) => HttpDebug::Debug,
        (false, true) => HttpDebug::Trace,
        (false, false) => HttpDebug::Disabled,
    }
}

/// Copies the daemon's HTTP dump on `stream` to standard error until the daemon ends it.
fn print_dump(stream: ClientStream) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut stderr = tokio::io::stderr();
        if let Err(e) = stream::receive_bytes(stream, &mut stderr, |_| {}).await {
            eprintln!("berth: the HTTP dump stream broke: {e}");
        }
    })
}

/// `berth pull`: prints `NAME<TAB>DIGEST` for the image saved.
pub async fn pull(client: &Client, args: PullArgs) -> Result<(), Failure> {
    let what = format!("pulling {}", args.reference);
    let mut streaming = client.streaming();
    let progress = ClientStream::open(&mut streaming, "progress")
        .await
        .map_err(|s| Failure::status(format!("{what}: opening the progress stream"), &s))?;
    let mut auth_stream = String::new();
    let mut auth_task = None;
    if let Some(user) = &args.user {
        let auth = ClientStream::open(&mut streaming, "auth")
            .await
            .map_err(|s| Failure::status(format!("{what}: opening the credentials stream"), &s))?;
        auth_stream = auth.id().to_owned();
        let (user, secret) = split_user(user);
        auth_task = Some(serve_auth(auth, user, secret));
    }
    let mut logs_stream = String::new();
    let mut dump_task = None;
    if args.http_dump {
        let logs = ClientStream::open(&mut streaming, "http-debug-logs")
            .await
            .map_err(|s| Failure::status(format!("{what}: opening the HTTP dump stream"), &s))?;
        logs_stream = logs.id().to_owned();
        dump_task = Some(print_dump(logs));
    }
    let source = OciRegistry {
        reference: args.reference.clone(),
        resolver: Some(RegistryResolver {
            auth_stream,
            host_dir: args.hosts_dir.clone().unwrap_or_default(),
            default_scheme: if args.plain_http { "http" } else { "" }.to_owned(),
            http_debug: http_debug(&args) as i32,
            logs_stream,
            ..RegistryResolver::default()
        }),
    };
    let request = TransferRequest {
        source: Some(type_url::to_any(&source)),
        destination: Some(type_url::to_any(&pull_store(&args))),
        options: Some(TransferOptions {
            progress_stream: progress.id().to_owned(),
        }),
    };
    let watcher = images::watch_progress(progress, Display::new(args.progress));
    let answer = client.transfer().transfer(request).await;
    if let Some(task) = auth_task {
        task.abort();
    }
    let limit = if answer.is_ok() {
        images::SETTLE
    } else {
        images::SETTLE_FAILED
    };
    if let Some(task) = dump_task {
        // The daemon ends the dump stream before it answers; the wait only bounds a daemon
        // that never took the stream (a pull that failed before it got that far).
        if tokio::time::timeout(limit, task).await.is_err() {
            eprintln!("berth: the HTTP dump did not end with the pull");
        }
    }
    let saved = match images::settle(watcher, limit).await {
        Some((display, saved)) => {
            display.finish();
            saved
        }
        None => Vec::new(),
    };
    answer.map_err(|s| Failure::status(&what, &s))?;
    if saved.is_empty() {
        return Err(Failure::new(format!(
            "{what}: the pull finished, but the daemon did not name the image saved: list \
             images with `berth images ls`"
        )));
    }
    images::print_saved(client, &what, saved).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_and_trace_flags_map_to_http_debug() {
        let args = |dump, trace| PullArgs {
            user: None,
            plain_http: false,
            hosts_dir: None,
            platform: Vec::new(),
            snapshotter: None,
            no_unpack: false,
            progress: Mode::Plain,
            http_dump: dump,
            http_trace: trace,
            reference: "r".into(),
        };
        assert_eq!(http_debug(&args(false, false)), HttpDebug::Disabled);
        assert_eq!(http_debug(&args(true, false)), HttpDebug::Debug);
        assert_eq!(http_debug(&args(false, true)), HttpDebug::Trace);
        assert_eq!(http_debug(&args(true, true)), HttpDebug::Both);
    }

    #[test]
    fn passwords_may_hold_colons() {
        assert_eq!(split_user("u:p:q"), ("u".into(), "p:q".into()));
        assert_eq!(split_user("u"), ("u".into(), String::new()));
    }
}
