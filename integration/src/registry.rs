//! A real OCI distribution registry for tests: Debian's `docker-registry` (distribution 2.8)
//! on `127.0.0.1:<free port>` with its storage in a temporary directory.
//!
//! Four shapes, chosen by [`RegistryOptions`]: open (anonymous), htpasswd basic auth, bearer
//! tokens from a [`TokenServer`] the registry trusts, and any of these over TLS with a test CA
//! generated per registry (`openssl`). Images get in with [`Registry::push`] (`skopeo copy`
//! from an OCI layout, such as [`crate::images::TestImage::layout`]).
//!
//! Dropping a [`Registry`] kills the process (it keeps no state worth flushing) and removes its
//! directory (kept with `BERTH_KEEP_TMP=1`, like a daemon's).
//!
//! ```no_run
//! use berth_integration::registry::{Registry, RegistryOptions};
//! use berth_integration::images::{self, LayerCompression};
//! let image = images::busybox("docker.io/library/berth-busybox:test", LayerCompression::Gzip)?;
//! let reg = Registry::start(RegistryOptions::open())?;
//! reg.push(&image.layout, "library/busybox:test")?;
//! println!("pull {}", reg.reference("library/busybox:test"));
//! # anyhow::Ok(())
//! ```

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::run_command;
use crate::token_server::{self, TokenServer, TokenServerOptions};

/// The registry binary (Debian's `docker-registry`).
pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

/// How clients authenticate to a [`Registry`].
#[derive(Debug, Clone, Default)]
pub enum RegistryAuth {
    /// Anonymous pull and push.
    #[default]
    Open,
    /// HTTP basic auth against an htpasswd file (bcrypt) holding this one user.
    Basic {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// Bearer tokens from a [`TokenServer`] started with these options.
    Token(TokenServerOptions),
}

/// How to start a [`Registry`].
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Authentication.
    pub auth: RegistryAuth,
    /// Serve HTTPS with a certificate for `127.0.0.1` signed by a CA made for this registry
    /// (see [`Registry::ca_cert`]).
    pub tls: bool,
}

impl RegistryOptions {
    /// Plain HTTP, anonymous.
    pub fn open() -> Self {
        RegistryOptions::default()
    }

    /// Plain HTTP with basic auth for `user`/`password`.
    pub fn basic(user: &str, password: &str) -> Self {
        RegistryOptions {
            auth: RegistryAuth::Basic {
                user: user.to_string(),
                password: password.to_string(),
            },
            tls: false,
        }
    }

    /// Plain HTTP with bearer tokens from a token server started with `opts`.
    pub fn token(opts: TokenServerOptions) -> Self {
        RegistryOptions {
            auth: RegistryAuth::Token(opts),
            tls: false,
        }
    }

    /// The same, over TLS.
    pub fn with_tls(mut self) -> Self {
        self.tls = true;
        self
    }
}

/// A running registry; see the module documentation.
pub struct Registry {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    port: u16,
    ca_cert: Option<PathBuf>,
    credentials: Option<(String, String)>,
    token_server: Option<TokenServer>,
}

impl Registry {
    /// Starts a registry and waits until `/v2/` answers (at most 30 s). Fails, naming what is
    /// missing, without `docker-registry`, `htpasswd` (basic auth) or `openssl` (TLS, tokens).
    pub fn start(opts: RegistryOptions) -> Result<Registry> {
        if !Path::new(REGISTRY_BINARY).is_file() {
            bail!(
                "{REGISTRY_BINARY} not found: install Debian's registry with \
                 `apt-get install docker-registry`"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("berth-reg-")
            .tempdir_in("/tmp")
            .context("creating the registry's temporary directory")?;
        let dir_path = dir.path().to_path_buf();
        fs::create_dir(dir_path.join("storage"))?;

        let mut credentials = None;
        let mut token = None;
        let auth_yaml = match &opts.auth {
            RegistryAuth::Open => String::new(),
            RegistryAuth::Basic { user, password } => {
                let htpasswd = dir_path.join("htpasswd");
                let out = run_command(
                    Command::new("htpasswd")
                        .args(["-Bbn", user, password])
                        .stdin(Stdio::null()),
                    Duration::from_secs(30),
                )
                .context("running htpasswd (install Debian's apache2-utils)")?;
                if !out.success() {
                    bail!("htpasswd failed: {out}");
                }
                fs::write(&htpasswd, out.stdout.trim_end().to_string() + "\n")?;
                credentials = Some((user.clone(), password.clone()));
                format!(
                    "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            RegistryAuth::Token(topts) => {
                let server = TokenServer::start(&dir_path, topts.clone())?;
                credentials = topts.credentials.clone();
                let yaml = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    \
                     rootcertbundle: {}\n",
                    server.realm(),
                    token_server::SERVICE,
                    token_server::ISSUER,
                    server.cert().display()
                );
                token = Some(server);
                yaml
            }
        };
        let (tls_yaml, ca_cert) = if opts.tls {
            let (ca, cert, key) = make_tls_files(&dir_path)?;
            (
                format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert.display(),
                    key.display()
                ),
                Some(ca),
            )
        } else {
            (String::new(), None)
        };

        let mut reg = Registry {
            child: None,
            dir: Some(dir),
            dir_path,
            port: 0,
            ca_cert,
            credentials,
            token_server: token,
        };
        // The port is picked by binding and releasing it, so another process may take it in
        // between: a registry that exits at once is retried on a new port.
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            let config = format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    \
                 enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: berth-test-secret\n\
                 {tls_yaml}{auth_yaml}",
                storage = reg.dir_path.join("storage").display(),
            );
            let config_path = reg.dir_path.join("config.yml");
            fs::write(&config_path, config)?;
            match reg.spawn(port, &config_path) {
                Ok(()) => return Ok(reg),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("the registry did not start")))
    }

    fn spawn(&mut self, port: u16, config: &Path) -> Result<()> {
        let log = fs::File::create(self.dir_path.join("registry.log"))?;
        let mut child = Command::new(REGISTRY_BINARY)
            .arg("serve")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {REGISTRY_BINARY}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{REGISTRY_BINARY} exited at start ({status}); its log:\n{}",
                    fs::read_to_string(self.dir_path.join("registry.log")).unwrap_or_default()
                );
            }
            if answers(port) {
                self.port = port;
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{REGISTRY_BINARY} on 127.0.0.1:{port} did not answer /v2/ within 30 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:<port>`, the registry host as image references name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>` or `https://...` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.ca_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.host())
    }

    /// `127.0.0.1:<port>/<repo_tag>`, a reference for ctr or a client.
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.host())
    }

    /// The test CA's certificate (PEM) when serving TLS.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.ca_cert.as_deref()
    }

    /// The user and password clients need (basic auth, or the token server's credentials).
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The token server in token mode.
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token_server.as_ref()
    }

    /// The registry's log (its access log included).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir_path.join("registry.log")).unwrap_or_default()
    }

    /// Whether a line of the log contains `needle` within 10 s. The registry writes a
    /// request's access line after the response's last byte is sent, so a client that has
    /// its answer can look before the line is there.
    pub fn log_shows(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if self.log().lines().any(|l| l.contains(needle)) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Kills the registry (SIGKILL, as a crash); its storage stays for [`Registry::restart`].
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing the registry")?;
            child.wait().context("reaping the registry")?;
        }
        Ok(())
    }

    /// Starts the registry again (killing it first if it runs) on the same port, config and
    /// storage, and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        let config = self.dir_path.join("config.yml");
        self.spawn(self.port, &config)
    }

    /// Pushes the single image of the OCI archive `archive` (such as
    /// [`crate::archive::OciArchive::build`] writes) to `<repo>:<tag>` (`dest`).
    pub fn push_archive(&self, archive: &Path, dest: &str) -> Result<()> {
        let archive = archive
            .to_str()
            .ok_or_else(|| anyhow!("{} is not UTF-8", archive.display()))?;
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--retry-times", "2", "--dest-tls-verify=false"]);
        if let Some((u, p)) = self.credentials() {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        // Without it skopeo gzips plain tar layers on the way, and the test's digests no
        // longer name what the registry serves.
        cmd.arg("--preserve-digests")
            .arg(format!("oci-archive:{archive}"))
            .arg(format!("docker://{}", self.reference(dest)));
        let out = run_command(&mut cmd, Duration::from_secs(120))?;
        if !out.success() {
            bail!(
                "pushing {archive} to {}: {out}\nregistry log tail:\n{}",
                self.reference(dest),
                tail(&self.log(), 20)
            );
        }
        Ok(())
    }

    /// Pushes the image tagged like `dest`'s tag in the OCI layout `layout` to
    /// `<repo>:<tag>` (`dest`), with `skopeo copy`.
    pub fn push(&self, layout: &Path, dest: &str) -> Result<()> {
        let tag = dest
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .map(|(_, t)| t)
            .ok_or_else(|| anyhow!("{dest:?} has no tag: name it as <repo>:<tag>"))?;
        self.push_tagged(layout, tag, dest)
    }

    /// Pushes the image tagged `layout_tag` in the OCI layout `layout` to `<repo>:<tag>`.
    pub fn push_tagged(&self, layout: &Path, layout_tag: &str, dest: &str) -> Result<()> {
        let layout = layout
            .to_str()
            .ok_or_else(|| anyhow!("{} is not UTF-8", layout.display()))?;
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--retry-times", "2", "--dest-tls-verify=false"]);
        if let Some((u, p)) = self.credentials() {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        cmd.arg(format!("oci:{layout}:{layout_tag}"))
            .arg(format!("docker://{}", self.reference(dest)));
        let out = run_command(&mut cmd, Duration::from_secs(120))?;
        if !out.success() {
            bail!(
                "pushing {layout}:{layout_tag} to {}: {out}\nregistry log tail:\n{}",
                self.reference(dest),
                tail(&self.log(), 20)
            );
        }
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.dir.take() {
            if std::env::var_os("BERTH_KEEP_TMP").is_some() {
                let kept = dir.keep();
                eprintln!("berth-integration: kept {}", kept.display());
            } else if let Err(e) = dir.close() {
                eprintln!(
                    "berth-integration: removing {}: {e}",
                    self.dir_path.display()
                );
            }
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Whether something on `port` answers an HTTP request for `/v2/` (over TLS, Go's server
/// answers a plain request with a 400, which is as good a sign of life).
fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < 5 {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf[..got].starts_with(b"HTTP/")
}

/// A CA and a server certificate for `127.0.0.1` / `localhost` (EC P-256): (ca, cert, key).
fn make_tls_files(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let ca_key = dir.join("ca.key");
    let ca = dir.join("ca.crt");
    let key = dir.join("server.key");
    let csr = dir.join("server.csr");
    let cert = dir.join("server.crt");
    let ext = dir.join("server.ext");
    let s = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
    };
    token_server::openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=berth test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        &s(&ca_key)?,
        "-out",
        &s(&ca)?,
    ])?;
    token_server::openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &s(&key)?,
        "-out",
        &s(&csr)?,
    ])?;
    fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    token_server::openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &s(&csr)?,
        "-CA",
        &s(&ca)?,
        "-CAkey",
        &s(&ca_key)?,
        "-CAcreateserial",
        "-extfile",
        &s(&ext)?,
        "-out",
        &s(&cert)?,
    ])?;
    Ok((ca, cert, key))
}
