//! `berth push`: an image of the daemon's image store to a registry through the transfer
//! service (source `ImageStore`, destination `OCIRegistry`), with a progress bar per blob.
//!
//! Options, credentials and progress work as for `berth pull`: `--user` opens a credentials
//! stream the daemon asks on, and the password is never printed. Standard output gets one
//! `REFERENCE<TAB>DIGEST` line naming what the reference now points at.

use berth_proto::containerd::services::transfer::v1::{TransferOptions, TransferRequest};
use berth_proto::containerd::types::Platform;
use berth_proto::containerd::types::transfer::{
    ImageStore, OciRegistry, Progress, RegistryResolver,
};
use berth_proto::type_url;
use tokio::task::JoinHandle;

use crate::client::{Client, Failure};
use crate::images;
use crate::platform;
use crate::progress::{Display, Mode};
use crate::pull::{serve_auth, split_user};
use crate::stream::{self, ClientStream};

/// The daemon's last event of a successful push (containerd's words); its descriptor is what
/// the reference points at.
const COMPLETED_PUSH: &str = "Completed push to";

/// `berth push`.
#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// Credentials for the registry, USER:PASSWORD.
    #[arg(short, long, value_name = "USER:PASSWORD")]
    pub user: Option<String>,
    /// Talk plain HTTP to registries without a hosts.toml.
    #[arg(long)]
    pub plain_http: bool,
    /// Directory of `<host>/hosts.toml` files, instead of the daemon's `config_path`.
    #[arg(long, value_name = "DIR")]
    pub hosts_dir: Option<String>,
    /// Push only this platform's manifest of an index (repeatable); default: every platform.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_parser = platform::parse)]
    pub platform: Vec<Platform>,
    /// How to show progress on standard error.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = Mode::Auto)]
    pub progress: Mode,
    /// The image to push, as `berth images ls` names it.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Where to push it (`registry.example:5000/repo:tag`); default: NAME.
    #[arg(value_name = "REFERENCE")]
    pub reference: Option<String>,
}

impl PushArgs {
    fn reference(&self) -> &str {
        self.reference.as_deref().unwrap_or(&self.name)
    }
}

/// The transfer source of a push: the image and the platforms to push.
pub fn push_store(args: &PushArgs) -> ImageStore {
    ImageStore {
        name: args.name.clone(),
        platforms: args.platform.clone(),
        ..ImageStore::default()
    }
}

/// Shows the progress stream's events and remembers the digest the push ended with.
fn watch_progress(
    progress: ClientStream,
    mut display: Display,
) -> JoinHandle<(Display, Option<String>)> {
    tokio::spawn(async move {
        let mut pushed = None;
        let ended = stream::receive_messages(progress, |any| {
            let Ok(p) = type_url::from_any::<Progress>(&any) else {
                return;
            };
            if p.name.is_empty()
                && p.event.starts_with(COMPLETED_PUSH)
                && let Some(desc) = &p.desc
            {
                pushed = Some(desc.digest.clone());
            }
            display.event(&p);
        })
        .await;
        if let Err(e) = ended
            && display.is_plain()
        {
            // Progress is informative; the transfer's own result decides the outcome.
            eprintln!("progress stream: {e}");
        }
        (display, pushed)
    })
}

/// `berth push`: prints `REFERENCE<TAB>DIGEST` once the registry has the image.
pub async fn push(client: &Client, args: PushArgs) -> Result<(), Failure> {
    let reference = args.reference().to_owned();
    let what = format!("pushing {} to {reference}", args.name);
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
    let destination = OciRegistry {
        reference: reference.clone(),
        resolver: Some(RegistryResolver {
            auth_stream,
            host_dir: args.hosts_dir.clone().unwrap_or_default(),
            default_scheme: if args.plain_http { "http" } else { "" }.to_owned(),
            ..RegistryResolver::default()
        }),
    };
    let request = TransferRequest {
        source: Some(type_url::to_any(&push_store(&args))),
        destination: Some(type_url::to_any(&destination)),
        options: Some(TransferOptions {
            progress_stream: progress.id().to_owned(),
        }),
    };
    let watcher = watch_progress(progress, Display::new(args.progress));
    let answer = client.transfer().transfer(request).await;
    if let Some(task) = auth_task {
        task.abort();
    }
    let limit = if answer.is_ok() {
        images::SETTLE
    } else {
        images::SETTLE_FAILED
    };
    let pushed = match images::settle(watcher, limit).await {
        Some((display, pushed)) => {
            display.finish();
            pushed
        }
        None => None,
    };
    answer.map_err(|s| Failure::status(&what, &s))?;
    let Some(digest) = pushed else {
        return Err(Failure::new(format!(
            "{what}: the push finished, but the daemon did not name the digest pushed"
        )));
    };
    let line = format!("{reference}\t{digest}\n");
    let mut out = std::io::stdout().lock();
    match std::io::Write::write_all(&mut out, line.as_bytes())
        .and_then(|()| std::io::Write::flush(&mut out))
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::io("writing to standard output", &e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_defaults_to_the_name_and_platforms_pass_through() {
        let args = PushArgs {
            user: None,
            plain_http: true,
            hosts_dir: None,
            platform: vec![platform::parse("linux/arm64").expect("platform")],
            progress: Mode::None,
            name: "example.com/a:1".into(),
            reference: None,
        };
        assert_eq!(args.reference(), "example.com/a:1");
        let store = push_store(&args);
        assert_eq!(store.name, "example.com/a:1");
        assert_eq!(store.platforms.len(), 1);
        let args = PushArgs {
            reference: Some("127.0.0.1:5000/a:2".into()),
            ..args
        };
        assert_eq!(args.reference(), "127.0.0.1:5000/a:2");
    }
}
