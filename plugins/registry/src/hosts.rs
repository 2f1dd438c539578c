//! Registry hosts configuration: `config_path/<host>/hosts.toml`, as containerd reads it
//! (`core/remotes/docker/config/hosts.go`).
//!
//! ```toml
//! server = "https://registry.example"      # the upstream; default https://<host>
//! capabilities = ["pull", "resolve", "push"]
//! ca = "/etc/certs/ca.pem"                 # or a list
//! client = [["/etc/certs/c.pem", "/etc/certs/c.key"]]   # or "c.pem", or ["c.pem", ...]
//! skip_verify = false
//! [header]
//! x-custom = "v"
//!
//! [host."http://mirror.local:5000"]        # mirrors, tried first, in file order
//! capabilities = ["pull", "resolve"]
//! override_path = false                    # true: the URL path replaces `/v2`
//! ```
//!
//! The directory for `host:port` is `host_port_` if it exists, else `host:port`, else
//! `_default`; no file means one host, `https://<host>` (`registry-1.docker.io` for
//! `docker.io`), with every capability. Plain HTTP is used only where a URL says `http://`
//! (or the caller asks for it, as ctr's `--plain-http`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What a host may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch content by digest.
    pub pull: bool,
    /// Resolve tags to digests.
    pub resolve: bool,
    /// Push content.
    pub push: bool,
}

impl Capabilities {
    /// Every capability (the upstream server's default).
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

/// One host to talk to for a registry: a mirror or the upstream server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHost {
    /// The scheme.
    pub scheme: Scheme,
    /// `host[:port]`.
    pub host: String,
    /// The API path prefix, normally `/v2`.
    pub path: String,
    /// What this host is used for.
    pub capabilities: Capabilities,
    /// Extra CA certificates (PEM files) trusted for this host.
    pub ca: Vec<PathBuf>,
    /// Client certificates: (certificate PEM, key PEM; `None` when the key is in the first).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Accept any server certificate.
    pub skip_verify: bool,
    /// Headers added to every request.
    pub headers: Vec<(String, String)>,
}

impl RegistryHost {
    /// The upstream default for `domain`: `https://<domain>/v2`, with every capability.
    pub fn default_for(domain: &str, plain_http: bool) -> RegistryHost {
        let host = if domain == crate::reference::DOCKER_HUB {
            "registry-1.docker.io".to_string()
        } else {
            domain.to_string()
        };
        RegistryHost {
            scheme: if plain_http {
                Scheme::Http
            } else {
                Scheme::Https
            },
            host,
            path: "/v2".to_string(),
            capabilities: Capabilities::ALL,
            ca: Vec::new(),
            client: Vec::new(),
            skip_verify: false,
            headers: Vec::new(),
        }
    }

    /// `scheme://host/path`.
    pub fn base_url(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        format!("{scheme}://{}{}", self.host, self.path)
    }
}

/// The hosts for `domain`: from `config_path` if given and a file applies, else the default.
/// `plain_http` makes the default (not configured hosts) use `http`.
pub fn load_hosts(
    config_path: Option<&Path>,
    domain: &str,
    plain_http: bool,
) -> Result<Vec<RegistryHost>> {
    if let Some(root) = config_path {
        for dir in host_dirs(root, domain) {
            let file = dir.join("hosts.toml");
            match std::fs::read_to_string(&file) {
                Ok(text) => return parse_hosts_toml(&text, &file, domain, plain_http),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(Error::HostsConfig {
                        path: file,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    Ok(vec![RegistryHost::default_for(domain, plain_http)])
}

/// The directories tried for `domain`, in order.
fn host_dirs(root: &Path, domain: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some((h, p)) = domain.rsplit_once(':') {
        dirs.push(root.join(format!("{h}_{p}_")));
    }
    dirs.push(root.join(domain));
    dirs.push(root.join("_default"));
    dirs
}

/// Parses one `hosts.toml` (`file` names it in errors and anchors relative paths).
pub fn parse_hosts_toml(
    text: &str,
    file: &Path,
    domain: &str,
    plain_http: bool,
) -> Result<Vec<RegistryHost>> {
    let bad = |reason: String| Error::HostsConfig {
        path: file.to_path_buf(),
        reason,
    };
    let doc: toml::Table = text.parse().map_err(|e| bad(format!("not TOML: {e}")))?;
    let base = file.parent().unwrap_or(Path::new("/"));

    let mut hosts = Vec::new();
    if let Some(mirrors) = doc.get("host") {
        let table = mirrors
            .as_table()
            .ok_or_else(|| bad("`host` must be a table of URL -> settings".into()))?;
        // toml's tables are sorted; containerd tries mirrors in file order.
        let mut entries: Vec<(&String, &toml::Value)> = table.iter().collect();
        entries.sort_by_key(|(url, _)| text.find(&format!("\"{url}\"")).unwrap_or(usize::MAX));
        for (url, v) in entries {
            let t = v
                .as_table()
                .ok_or_else(|| bad(format!("host.\"{url}\" must be a table")))?;
            let mut h = host_from_url(url, t, plain_http).map_err(&bad)?;
            h.capabilities = capabilities(
                t,
                Capabilities {
                    pull: true,
                    resolve: true,
                    push: false,
                },
            )
            .map_err(&bad)?;
            apply_common(&mut h, t, base).map_err(&bad)?;
            hosts.push(h);
        }
    }
    let mut server = match doc.get("server") {
        Some(v) => {
            let url = v
                .as_str()
                .ok_or_else(|| bad("`server` must be a URL string".into()))?;
            host_from_url(url, &doc, plain_http).map_err(&bad)?
        }
        None => RegistryHost::default_for(domain, plain_http),
    };
    server.capabilities = capabilities(&doc, Capabilities::ALL).map_err(&bad)?;
    apply_common(&mut server, &doc, base).map_err(&bad)?;
    hosts.push(server);
    Ok(hosts)
}

fn host_from_url(url: &str, t: &toml::Table, plain_http: bool) -> Result<RegistryHost, String> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", r)) => (Scheme::Http, r),
        Some(("https", r)) => (Scheme::Https, r),
        Some((s, _)) => return Err(format!("{url}: scheme {s:?} is not http or https")),
        None if plain_http => (Scheme::Http, url),
        None => (Scheme::Https, url),
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let override_path = t
        .get("override_path")
        .map(|v| v.as_bool().ok_or("`override_path` must be a boolean"))
        .transpose()?
        .unwrap_or(false);
    // containerd appends `/v2` unless the path already ends with it or overrides it.
    let path = if override_path || path.ends_with("/v2") {
        path.to_string()
    } else {
        format!("{path}/v2")
    };
    Ok(RegistryHost {
        scheme,
        host: host.to_string(),
        path,
        capabilities: Capabilities::ALL,
        ca: Vec::new(),
        client: Vec::new(),
        skip_verify: false,
        headers: Vec::new(),
    })
}

fn capabilities(t: &toml::Table, default: Capabilities) -> Result<Capabilities, String> {
    let Some(v) = t.get("capabilities") else {
        return Ok(default);
    };
    let list = v
        .as_array()
        .ok_or("`capabilities` must be a list of \"pull\", \"resolve\", \"push\"")?;
    let mut c = Capabilities {
        pull: false,
        resolve: false,
        push: false,
    };
    for item in list {
        match item.as_str() {
            Some("pull") => c.pull = true,
            Some("resolve") => c.resolve = true,
            Some("push") => c.push = true,
            _ => {
                return Err(format!(
                    "unknown capability {item}: use pull, resolve or push"
                ));
            }
        }
    }
    Ok(c)
}

fn path_list(v: &toml::Value, key: &str) -> Result<Vec<String>, String> {
    match v {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or(format!("`{key}` entries must be strings"))
            })
            .collect(),
        _ => Err(format!("`{key}` must be a path or a list of paths")),
    }
}

fn apply_common(h: &mut RegistryHost, t: &toml::Table, base: &Path) -> Result<(), String> {
    let abs = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    if let Some(v) = t.get("ca") {
        h.ca = path_list(v, "ca")?.iter().map(|p| abs(p)).collect();
    }
    if let Some(v) = t.get("client") {
        h.client = match v {
            toml::Value::String(s) => vec![(abs(s), None)],
            toml::Value::Array(a) => a
                .iter()
                .map(|x| match x {
                    toml::Value::String(s) => Ok((abs(s), None)),
                    toml::Value::Array(pair) if pair.len() == 2 => {
                        match (pair[0].as_str(), pair[1].as_str()) {
                            (Some(c), Some(k)) => Ok((abs(c), Some(abs(k)))),
                            _ => Err("`client` pairs must be [cert, key] strings".to_string()),
                        }
                    }
                    _ => Err("`client` entries must be a path or a [cert, key] pair".to_string()),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err("`client` must be a path or a list".into()),
        };
    }
    if let Some(v) = t.get("skip_verify") {
        h.skip_verify = v.as_bool().ok_or("`skip_verify` must be a boolean")?;
    }
    if let Some(v) = t.get("header") {
        let table = v.as_table().ok_or("`header` must be a table")?;
        for (k, v) in table {
            for value in path_list(v, "header")? {
                h.headers.push((k.clone(), value));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_https_upstream() {
        let h = load_hosts(None, "docker.io", false).expect("default");
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].base_url(), "https://registry-1.docker.io/v2");
        assert_eq!(h[0].capabilities, Capabilities::ALL);
        let h = load_hosts(None, "127.0.0.1:5000", true).expect("plain");
        assert_eq!(h[0].base_url(), "http://127.0.0.1:5000/v2");
    }

    #[test]
    fn mirrors_in_file_order_then_server() {
        let text = r#"
server = "https://registry.example"
ca = "ca.pem"
[header]
x-a = ["1", "2"]

[host."https://z-mirror.local"]
capabilities = ["pull", "resolve"]
skip_verify = true
client = [["c.pem", "c.key"], "both.pem"]

[host."http://a-mirror.local:5000/custom/path"]
capabilities = ["pull"]
override_path = true
[host."http://a-mirror.local:5000/custom/path".header]
x-b = "3"
"#;
        let file = Path::new("/etc/berth/certs.d/registry.example/hosts.toml");
        let h = parse_hosts_toml(text, file, "registry.example", false).expect("parse");
        assert_eq!(h.len(), 3);
        assert_eq!(h[0].base_url(), "https://z-mirror.local/v2");
        assert!(h[0].skip_verify);
        assert!(!h[0].capabilities.push);
        assert_eq!(
            h[0].client,
            vec![
                (
                    PathBuf::from("/etc/berth/certs.d/registry.example/c.pem"),
                    Some(PathBuf::from("/etc/berth/certs.d/registry.example/c.key"))
                ),
                (
                    PathBuf::from("/etc/berth/certs.d/registry.example/both.pem"),
                    None
                ),
            ]
        );
        assert_eq!(h[1].base_url(), "http://a-mirror.local:5000/custom/path");
        assert_eq!(h[1].headers, vec![("x-b".to_string(), "3".to_string())]);
        assert!(!h[1].capabilities.resolve);
        assert_eq!(h[2].base_url(), "https://registry.example/v2");
        assert_eq!(h[2].capabilities, Capabilities::ALL);
        assert_eq!(
            h[2].ca,
            vec![PathBuf::from("/etc/berth/certs.d/registry.example/ca.pem")]
        );
        assert_eq!(h[2].headers.len(), 2);
    }

    #[test]
    fn errors_name_the_file() {
        let file = Path::new("/x/hosts.toml");
        for bad in [
            "server = 1",
            "capabilities = [\"fly\"]",
            "server = \"ftp://x\"",
            "[host.\"https://m\"]\nskip_verify = \"yes\"",
            "not toml",
        ] {
            let e = parse_hosts_toml(bad, file, "r", false).expect_err(bad);
            assert!(e.to_string().contains("/x/hosts.toml"), "{e}");
        }
    }

    #[test]
    fn directory_lookup() {
        let root = tempfile_dir();
        std::fs::create_dir_all(root.join("127.0.0.1:5000")).expect("dir");
        std::fs::write(
            root.join("127.0.0.1:5000/hosts.toml"),
            "server = \"http://127.0.0.1:5000\"\n",
        )
        .expect("write");
        let h = load_hosts(Some(&root), "127.0.0.1:5000", false).expect("load");
        assert_eq!(h[0].base_url(), "http://127.0.0.1:5000/v2");
        let h = load_hosts(Some(&root), "other:1", false).expect("load");
        assert_eq!(h[0].base_url(), "https://other:1/v2");
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    fn tempfile_dir() -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "berth-registry-hosts-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        p
    }
}
