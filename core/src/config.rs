//! The daemon's TOML configuration, with containerd's top-level keys.
//!
//! Files of version 1 and 2 are migrated in memory to the current version 3 with one notice;
//! the keys a migration moves itself never cause warnings (containerd PR 10980). Unknown keys
//! are warned about by name and section, never fatal; syntax errors name line and column.
//! Plugin sections stay raw TOML here and are decoded by the registry into each plugin's own
//! config struct.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Classify, ErrorKind};

/// The configuration version this berth writes and reads natively.
pub const CURRENT_VERSION: i64 = 3;
/// Default persistent root.
pub const DEFAULT_ROOT: &str = "/var/lib/berth";
/// Default runtime state directory.
pub const DEFAULT_STATE: &str = "/run/berth";
/// Default gRPC socket.
pub const DEFAULT_ADDRESS: &str = "/run/berth/berthd.sock";
/// Default gRPC message size limit, each way (16 MiB, as containerd).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 << 20;

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Configuration schema version (1, 2 or 3; older ones are migrated in memory).
    pub version: i64,
    /// Persistent data; each plugin gets `<root>/<uri>`.
    pub root: PathBuf,
    /// Runtime state (sockets, mounts); each plugin gets `<state>/<uri>`.
    pub state: PathBuf,
    /// Directory of dynamic plugin libraries, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_dir: Option<PathBuf>,
    /// The gRPC endpoint.
    pub grpc: GrpcConfig,
    /// Logging.
    pub debug: DebugConfig,
    /// Plugin URIs never initialised.
    pub disabled_plugins: Vec<String>,
    /// Plugin URIs whose failure aborts start.
    pub required_plugins: Vec<String>,
    /// Per-plugin sections keyed by URI, decoded by each plugin.
    pub plugins: BTreeMap<String, toml::Value>,
    /// Out-of-process plugins reached over gRPC.
    pub proxy_plugins: BTreeMap<String, ProxyPlugin>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: CURRENT_VERSION,
            root: DEFAULT_ROOT.into(),
            state: DEFAULT_STATE.into(),
            plugin_dir: None,
            grpc: GrpcConfig::default(),
            debug: DebugConfig::default(),
            disabled_plugins: Vec::new(),
            required_plugins: Vec::new(),
            plugins: BTreeMap::new(),
            proxy_plugins: BTreeMap::new(),
        }
    }
}

/// `[grpc]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GrpcConfig {
    /// Unix socket path.
    pub address: PathBuf,
    /// Owner uid of the socket.
    pub uid: u32,
    /// Owner gid of the socket.
    pub gid: u32,
    /// Largest message accepted.
    pub max_recv_message_size: usize,
    /// Largest message sent.
    pub max_send_message_size: usize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            address: DEFAULT_ADDRESS.into(),
            uid: 0,
            gid: 0,
            max_recv_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_send_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

/// `[debug]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DebugConfig {
    /// Log level: trace, debug, info, warn or error.
    pub level: String,
    /// Log format: "text" or "json" (json is not built yet and falls back to text).
    pub format: String,
}

impl Default for DebugConfig {
    fn default() -> Self {
        DebugConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// `[proxy_plugins.<name>]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProxyPlugin {
    /// `snapshot`, `content`, `diff` or `sandbox` (or a full plugin type).
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The proxy's unix socket.
    pub address: PathBuf,
    /// Platform served, `os/arch`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub platform: String,
    /// Exports shown by introspection.
    pub exports: BTreeMap<String, String>,
    /// Capabilities shown by introspection.
    pub capabilities: Vec<String>,
}

/// A remark made while loading, logged once the log level is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The file was migrated in memory (info).
    Migrated {
        /// The file's version.
        from: i64,
    },
    /// A containerd section was read under berth's name (info).
    Renamed {
        /// containerd's URI.
        from: String,
        /// berth's URI.
        to: String,
    },
    /// A key nothing reads (warning).
    UnknownKey {
        /// Where it is.
        section: String,
        /// The key.
        key: String,
    },
}

impl Notice {
    /// Whether this deserves a warning rather than an info line.
    pub fn is_warning(&self) -> bool {
        matches!(self, Notice::UnknownKey { .. })
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::Migrated { from } => write!(
                f,
                "configuration version {from} migrated in memory to version {CURRENT_VERSION}; \
                 `berthd config migrate` prints the migrated file"
            ),
            Notice::Renamed { from, to } => {
                write!(f, "section [plugins.{from:?}] is read as [plugins.{to:?}]")
            }
            Notice::UnknownKey { section, key } => {
                write!(
                    f,
                    "unknown key {key:?} in section [{section}]; it is ignored"
                )
            }
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML; the message names line and column.
    #[error("config {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message with line and column.
        message: String,
    },
    /// Valid TOML with values of the wrong shape.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A version this berth cannot read.
    #[error(
        "config {path} has version {version}; this berth reads versions 1 to {CURRENT_VERSION}"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: i64,
    },
}

impl Classify for ConfigError {
    fn kind(&self) -> ErrorKind {
        match self {
            ConfigError::Read { .. } => ErrorKind::NotFound,
            _ => ErrorKind::InvalidArgument,
        }
    }
}

/// A loaded configuration and the remarks to log about it.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration, at the current version.
    pub config: Config,
    /// Remarks in the order they were made.
    pub notices: Vec<Notice>,
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parses configuration text; `origin` only names the source in errors.
pub fn parse(text: &str, origin: &Path) -> Result<Loaded, ConfigError> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: origin.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let version = match table.get("version") {
        // containerd reads a file without a version as version 1.
        None => 1,
        Some(toml::Value::Integer(v)) => *v,
        Some(other) => {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                message: format!("version must be an integer, not {}", other.type_str()),
            });
        }
    };
    if !(1..=CURRENT_VERSION).contains(&version) {
        return Err(ConfigError::UnsupportedVersion {
            path: origin.to_owned(),
            version,
        });
    }
    let mut notices = migrate(&mut table, version);

    let mut unknown = Vec::new();
    let config: Config = serde_ignored::deserialize(toml::Value::Table(table), |path| {
        unknown.push(path.to_string())
    })
    .map_err(|e: toml::de::Error| ConfigError::Invalid {
        path: origin.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    notices.extend(unknown.into_iter().map(|path| {
        let (section, key) = match path.rsplit_once('.') {
            Some((section, key)) => (section.to_owned(), key.to_owned()),
            None => ("top level".to_owned(), path),
        };
        Notice::UnknownKey { section, key }
    }));
    Ok(Loaded { config, notices })
}

/// Migrates a raw configuration table from `from` to the current version, in place.
/// Returns the notices to log: one for the migration itself, plus any renamed sections.
pub fn migrate(table: &mut toml::Table, from: i64) -> Vec<Notice> {
    let mut notices = Vec::new();
    let mut plugins = match table.remove("plugins") {
        Some(toml::Value::Table(t)) => t,
        Some(other) => {
            // Leave a malformed value where it was so decoding reports it.
            table.insert("plugins".into(), other);
            return notices;
        }
        None => toml::Table::new(),
    };
    if from < 2 {
        plugins = plugins
            .into_iter()
            .map(|(name, value)| (v1_plugin_uri(&name), value))
            .collect();
    }
    if from < 3 {
        migrate_cri_v2_to_v3(&mut plugins);
    }
    if from < CURRENT_VERSION {
        notices.push(Notice::Migrated { from });
    }
    // berth's metadata store is sled; a containerd file tunes it under the bolt name.
    const BOLT: &str = "io.containerd.metadata.v1.bolt";
    const SLED: &str = "io.containerd.metadata.v1.sled";
    if !plugins.contains_key(SLED)
        && let Some(section) = plugins.remove(BOLT)
    {
        plugins.insert(SLED.into(), section);
        notices.push(Notice::Renamed {
            from: BOLT.into(),
            to: SLED.into(),
        });
    }
    if !plugins.is_empty() {
        table.insert("plugins".into(), toml::Value::Table(plugins));
    }
    table.insert("version".into(), toml::Value::Integer(CURRENT_VERSION));
    notices
}

/// containerd's version 1 short plugin names and the URIs they became.
fn v1_plugin_uri(name: &str) -> String {
    let core = match name {
        "cri" => "io.containerd.grpc.v1.cri",
        "cgroups" => "io.containerd.monitor.v1.cgroups",
        "linux" => "io.containerd.runtime.v1.linux",
        "scheduler" => "io.containerd.gc.v1.scheduler",
        "bolt" => "io.containerd.metadata.v1.bolt",
        "task" => "io.containerd.runtime.v2.task",
        "opt" => "io.containerd.internal.v1.opt",
        "restart" => "io.containerd.internal.v1.restart",
        "tracing" => "io.containerd.internal.v1.tracing",
        "otlp" => "io.containerd.tracing.processor.v1.otlp",
        "aufs" => "io.containerd.snapshotter.v1.aufs",
        "btrfs" => "io.containerd.snapshotter.v1.btrfs",
        "devmapper" => "io.containerd.snapshotter.v1.devmapper",
        "native" => "io.containerd.snapshotter.v1.native",
        "overlayfs" => "io.containerd.snapshotter.v1.overlayfs",
        "zfs" => "io.containerd.snapshotter.v1.zfs",
        // Already a URI (some version 1 files used them).
        other if other.starts_with("io.containerd.") => return other.to_owned(),
        other if other.ends_with("-service") => return format!("io.containerd.service.v1.{other}"),
        other => return format!("io.containerd.grpc.v1.{other}"),
    };
    core.to_owned()
}

/// Splits containerd 1.x's `io.containerd.grpc.v1.cri` table into the 2.x
/// `io.containerd.cri.v1.images` and `io.containerd.cri.v1.runtime` tables, keeping the CRI
/// server's own keys where they were. Keys already present in a v3 table win (PR 10980), and
/// nothing is copied where it no longer belongs, so no key warns after the move.
fn migrate_cri_v2_to_v3(plugins: &mut toml::Table) {
    const CRI: &str = "io.containerd.grpc.v1.cri";
    const IMAGES: &str = "io.containerd.cri.v1.images";
    const RUNTIME: &str = "io.containerd.cri.v1.runtime";
    const IMAGE_KEYS: &[&str] = &[
        "registry",
        "image_decryption",
        "max_concurrent_downloads",
        "image_pull_progress_timeout",
        "image_pull_with_sync_fs",
        "stats_collect_period",
    ];
    const IMAGE_CONTAINERD_KEYS: &[&str] = &[
        "snapshotter",
        "disable_snapshot_annotations",
        "discard_unpacked_layers",
    ];
    const SERVER_KEYS: &[&str] = &[
        "disable_tcp_service",
        "stream_server_address",
        "stream_server_port",
        "stream_idle_timeout",
        "enable_tls_streaming",
        "x509_key_pair_streaming",
    ];
    let Some(toml::Value::Table(mut cri)) = plugins.remove(CRI) else {
        return;
    };
    let mut images = take_table(plugins, IMAGES);
    let mut runtime = take_table(plugins, RUNTIME);
    let mut server = toml::Table::new();

    let containerd = match cri.remove("containerd") {
        Some(toml::Value::Table(t)) => Some(t),
        _ => None,
    };
    for (key, value) in cri {
        if key == "sandbox_image" {
            let pinned = images
                .entry("pinned_images")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let Some(pinned) = pinned.as_table_mut() {
                pinned.entry("sandbox").or_insert(value);
            }
        } else if IMAGE_KEYS.contains(&key.as_str()) {
            images.entry(key).or_insert(value);
        } else if SERVER_KEYS.contains(&key.as_str()) {
            server.insert(key, value);
        } else {
            runtime.entry(key).or_insert(value);
        }
    }
    if let Some(containerd) = containerd {
        let mut runtime_containerd = match runtime.remove("containerd") {
            Some(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        for (key, value) in containerd {
            if IMAGE_CONTAINERD_KEYS.contains(&key.as_str()) {
                images.entry(key).or_insert(value);
            } else {
                runtime_containerd.entry(key).or_insert(value);
            }
        }
        if let Some(toml::Value::Table(runtimes)) = runtime_containerd.get_mut("runtimes") {
            for (_, runtime) in runtimes.iter_mut() {
                let Some(runtime) = runtime.as_table_mut() else {
                    continue;
                };
                if let Some(mode) = runtime.remove("sandbox_mode") {
                    runtime.entry("sandboxer").or_insert(mode);
                }
            }
        }
        runtime.insert("containerd".into(), toml::Value::Table(runtime_containerd));
    }
    for (uri, table) in [(IMAGES, images), (RUNTIME, runtime), (CRI, server)] {
        if !table.is_empty() {
            plugins.insert(uri.into(), toml::Value::Table(table));
        }
    }
}

fn take_table(plugins: &mut toml::Table, uri: &str) -> toml::Table {
    match plugins.remove(uri) {
        Some(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    }
}

/// Renders a configuration as a TOML file.
pub fn render(config: &Config) -> String {
    // Serialising plain structs, strings, numbers and tables cannot fail.
    toml::to_string_pretty(config).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Loaded {
        parse(text, Path::new("test.toml")).expect("parses")
    }

    #[test]
    fn the_default_round_trips() {
        let text = render(&Config::default());
        let loaded = parse_ok(&text);
        assert_eq!(loaded.config, Config::default());
        assert!(loaded.notices.is_empty(), "{:?}", loaded.notices);
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let err = parse("version = 3\nroot = \"/x\"\n[grpc\n", Path::new("bad.toml"))
            .expect_err("syntax error");
        let text = err.to_string();
        assert!(text.contains("bad.toml"), "{text}");
        assert!(text.contains("line 3"), "{text}");
        assert!(text.contains("column"), "{text}");
    }

    #[test]
    fn unknown_keys_are_named_with_their_section() {
        let loaded = parse_ok("version = 3\ncolour = 1\n[grpc]\naddress = '/s'\nspeed = 2\n");
        assert!(loaded.notices.contains(&Notice::UnknownKey {
            section: "top level".into(),
            key: "colour".into()
        }));
        assert!(loaded.notices.contains(&Notice::UnknownKey {
            section: "grpc".into(),
            key: "speed".into()
        }));
        assert_eq!(loaded.config.grpc.address, PathBuf::from("/s"));
    }

    #[test]
    fn unsupported_versions_are_refused() {
        let err = parse("version = 4\n", Path::new("v4.toml")).expect_err("v4");
        assert!(err.to_string().contains("version 4"));
    }

    #[test]
    fn version_1_short_names_become_uris_with_one_notice() {
        let loaded = parse_ok(
            "root = '/r'\n[plugins.scheduler]\npause_threshold = 0.02\n\
             [plugins.overlayfs]\nroot_path = '/o'\n[plugins.diff-service]\ndefault = ['walking']\n\
             [plugins.bolt]\nno_sync = true\n",
        );
        let uris: Vec<&str> = loaded.config.plugins.keys().map(String::as_str).collect();
        assert_eq!(
            uris,
            [
                "io.containerd.gc.v1.scheduler",
                "io.containerd.metadata.v1.sled",
                "io.containerd.service.v1.diff-service",
                "io.containerd.snapshotter.v1.overlayfs",
            ]
        );
        assert_eq!(
            loaded
                .notices
                .iter()
                .filter(|n| matches!(n, Notice::Migrated { .. }))
                .count(),
            1
        );
        assert!(
            loaded.notices.iter().all(|n| !n.is_warning()),
            "{:?}",
            loaded.notices
        );
    }

    #[test]
    fn version_2_cri_table_is_split_without_leftovers() {
        let loaded = parse_ok(
            r#"version = 2
[plugins."io.containerd.grpc.v1.cri"]
sandbox_image = "pause:3.9"
max_concurrent_downloads = 5
enable_selinux = true
stream_server_port = "0"
[plugins."io.containerd.grpc.v1.cri".containerd]
snapshotter = "overlayfs"
default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"
sandbox_mode = "podsandbox"
[plugins."io.containerd.cri.v1.runtime"]
enable_selinux = false
"#,
        );
        let p = &loaded.config.plugins;
        let runtime = p["io.containerd.cri.v1.runtime"]
            .as_table()
            .expect("runtime");
        let images = p["io.containerd.cri.v1.images"].as_table().expect("images");
        let server = p["io.containerd.grpc.v1.cri"].as_table().expect("server");
        assert!(!runtime.contains_key("max_concurrent_downloads"));
        assert!(!runtime.contains_key("sandbox_image"));
        assert_eq!(images["max_concurrent_downloads"].as_integer(), Some(5));
        assert_eq!(images["snapshotter"].as_str(), Some("overlayfs"));
        assert_eq!(
            images["pinned_images"]["sandbox"].as_str(),
            Some("pause:3.9")
        );
        // An existing v3 key is not overwritten by the migrated one.
        assert_eq!(runtime["enable_selinux"].as_bool(), Some(false));
        let runc = &runtime["containerd"]["runtimes"]["runc"];
        assert_eq!(runc["sandboxer"].as_str(), Some("podsandbox"));
        assert!(runc.get("sandbox_mode").is_none());
        assert_eq!(
            runtime["containerd"]["default_runtime_name"].as_str(),
            Some("runc")
        );
        assert!(runtime["containerd"].get("snapshotter").is_none());
        assert_eq!(server["stream_server_port"].as_str(), Some("0"));
        assert_eq!(server.len(), 1);
        assert_eq!(loaded.notices, [Notice::Migrated { from: 2 }]);
    }

    #[test]
    fn proxy_plugins_decode() {
        let loaded = parse_ok(
            "version = 3\n[proxy_plugins.stargz]\ntype = 'snapshot'\naddress = '/run/s.sock'\n\
             capabilities = ['rebase']\n[proxy_plugins.stargz.exports]\nenable = 'true'\n",
        );
        let proxy = &loaded.config.proxy_plugins["stargz"];
        assert_eq!(proxy.plugin_type, "snapshot");
        assert_eq!(proxy.address, PathBuf::from("/run/s.sock"));
        assert_eq!(proxy.capabilities, ["rebase"]);
        assert_eq!(proxy.exports["enable"], "true");
        assert!(loaded.notices.is_empty());
    }
}
