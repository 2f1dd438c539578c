//! Proxy plugins: each `[proxy_plugins.<name>]` becomes a plugin of its type with id `<name>`,
//! backed by the proxy-sdk client adapter over the proxy's unix socket, as containerd's
//! `cmd/containerd/server` does. The rest of berthd cannot tell it from a built-in: the
//! metadata layer wraps a proxy snapshotter like `native` (so the proxy sees the metadata
//! layer's backend keys, `<namespace>/<n>/<key>`, not the client's), a proxy content store is
//! the content store when it is the only content plugin loaded, and a proxy differ is tried
//! when the diff service's `default` list names it.
//!
//! - `type`: `snapshot`, `content` or `diff` (or the full plugin type,
//!   `io.containerd.snapshotter.v1` etc.); anything else stops berthd with an error naming the
//!   section, as containerd does.
//! - One gRPC channel per address, shared by every entry naming it. It connects on first use
//!   and again after the proxy went away, so a restarted proxy is reached again without
//!   restarting berthd; while it is down, calls fail at once with Unavailable naming the
//!   proxy and its address.
//! - At start the socket is tried once: a proxy that does not answer yet is logged as a
//!   warning and loaded all the same, as containerd loads it (its dial does not block), so a
//!   proxy started after berthd is used as soon as it is up; until then its calls fail with
//!   Unavailable naming it.
//! - Calls carry the caller's namespace and lease as the `containerd-namespace` and
//!   `containerd-lease` headers (containerd sends the namespace; berth sends the lease too,
//!   which proxies built for containerd ignore).
//! - `platform`, `exports` (plus `address`, as containerd adds) and `capabilities` are shown
//!   by introspection (`ctr plugins ls -d`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use berth_core::config::{Config, ProxyPlugin};
use berth_core::content::ContentKind;
use berth_core::diff::DifferKind;
use berth_core::registry::{Instance, PluginType, Registration, Registry};
use berth_core::snapshot::SnapshotterKind;
use berth_proxy_sdk::content::ContentClient;
use berth_proxy_sdk::diff::DiffClient;
use berth_proxy_sdk::snapshots::SnapshotsClient;
use tonic::transport::Channel;

/// How long the start-up reachability check waits for the proxy's socket to accept.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The plugin kinds a proxy can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyKind {
    Snapshot,
    Content,
    Diff,
}

impl ProxyKind {
    /// The kind a `type` value names: containerd's short names or the full plugin types.
    fn parse(value: &str) -> Option<Self> {
        match value {
            "snapshot" => Some(ProxyKind::Snapshot),
            "content" => Some(ProxyKind::Content),
            "diff" => Some(ProxyKind::Diff),
            other if other == PluginType::SNAPSHOTTER.as_str() => Some(ProxyKind::Snapshot),
            other if other == PluginType::CONTENT.as_str() => Some(ProxyKind::Content),
            other if other == PluginType::DIFFER.as_str() => Some(ProxyKind::Diff),
            _ => None,
        }
    }

    fn plugin_type(self) -> PluginType {
        match self {
            ProxyKind::Snapshot => PluginType::SNAPSHOTTER,
            ProxyKind::Content => PluginType::CONTENT,
            ProxyKind::Diff => PluginType::DIFFER,
        }
    }
}

/// Problems with the `[proxy_plugins]` sections, each naming its section; empty when fine.
pub fn check(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, proxy) in &config.proxy_plugins {
        if ProxyKind::parse(&proxy.plugin_type).is_none() {
            problems.push(format!(
                "[proxy_plugins.{name}] type {:?} is not supported: use \"snapshot\", \
                 \"content\" or \"diff\"",
                proxy.plugin_type
            ));
        }
        if proxy.address.as_os_str().is_empty() {
            problems.push(format!(
                "[proxy_plugins.{name}] has no address: set it to the proxy's unix socket"
            ));
        }
    }
    problems
}

/// The gRPC channels to proxies, one per socket address, made on first use.
#[derive(Clone, Default)]
struct Channels {
    by_address: Arc<Mutex<HashMap<PathBuf, Channel>>>,
}

impl Channels {
    /// The channel to `address` (made inside the runtime: a channel owns a background task).
    fn get(&self, address: &Path) -> Channel {
        self.by_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(address.to_owned())
            .or_insert_with(|| berth_proxy_sdk::connect(address))
            .clone()
    }
}

/// Registers every `[proxy_plugins]` entry of `config` in `registry`.
pub fn register(registry: &mut Registry, config: &Config) -> anyhow::Result<()> {
    let problems = check(config);
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
    let channels = Channels::default();
    for (name, proxy) in &config.proxy_plugins {
        registry.register(registration(name, proxy, channels.clone())?)?;
    }
    Ok(())
}

fn registration(
    name: &str,
    proxy: &ProxyPlugin,
    channels: Channels,
) -> anyhow::Result<Registration> {
    let kind = ProxyKind::parse(&proxy.plugin_type).ok_or_else(|| {
        anyhow::anyhow!(
            "[proxy_plugins.{name}] type {:?} is not supported",
            proxy.plugin_type
        )
    })?;
    let name = name.to_owned();
    let proxy = proxy.clone();
    Ok(Registration::new(
        kind.plugin_type(),
        name.clone(),
        move |ctx| async move {
            let address = proxy.address.clone();
            ctx.set_meta(|meta| {
                meta.platforms = vec![if proxy.platform.is_empty() {
                    host_platform()
                } else {
                    proxy.platform.clone()
                }];
                meta.exports = proxy.exports.clone();
                meta.exports
                    .insert("address".to_owned(), address.display().to_string());
                meta.capabilities = proxy.capabilities.clone();
            });
            match probe(&address).await {
                Ok(()) => {
                    tracing::info!(plugin = %name, address = %address.display(), "proxy plugin connected");
                }
                Err(why) => tracing::warn!(
                    plugin = %name,
                    address = %address.display(),
                    "proxy plugin {name} is not reachable yet ({why}): its calls fail with \
                     Unavailable until the proxy is up, then it is used without a restart"
                ),
            }
            let channel = channels.get(&address);
            let described = format!("proxy plugin {name} at {}", address.display());
            Ok(match kind {
                ProxyKind::Snapshot => Instance::new::<SnapshotterKind>(Arc::new(
                    SnapshotsClient::new(channel, name).described_as(described),
                )),
                ProxyKind::Content => Instance::new::<ContentKind>(Arc::new(
                    ContentClient::new(channel).described_as(described),
                )),
                ProxyKind::Diff => Instance::new::<DifferKind>(Arc::new(
                    DiffClient::new(channel).described_as(described),
                )),
            })
        },
    ))
}

/// Whether something accepts on `address` now (for the start-up log line only: the channel
/// connects on first use whatever this says).
async fn probe(address: &Path) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::UnixStream::connect(address)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no connection accepted within {}s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

/// `linux/<arch>` in OCI's architecture names, the platform of a proxy that names none.
fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_parse_short_and_full() {
        assert_eq!(ProxyKind::parse("snapshot"), Some(ProxyKind::Snapshot));
        assert_eq!(
            ProxyKind::parse("io.containerd.content.v1"),
            Some(ProxyKind::Content)
        );
        assert_eq!(ProxyKind::parse("diff"), Some(ProxyKind::Diff));
        assert_eq!(ProxyKind::parse("sandbox"), None);
    }

    #[test]
    fn check_names_the_section() {
        let mut config = Config::default();
        config.proxy_plugins.insert(
            "odd".to_owned(),
            ProxyPlugin {
                plugin_type: "tasks".to_owned(),
                address: PathBuf::from("/run/x.sock"),
                ..ProxyPlugin::default()
            },
        );
        let problems = check(&config);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("[proxy_plugins.odd]"), "{problems:?}");
    }
}
