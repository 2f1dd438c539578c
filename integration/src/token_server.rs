//! A tiny bearer-token server for `docker-registry`'s `auth: token:` mode.
//!
//! It answers the two ways clients ask for tokens: `GET <realm>?service=..&scope=..` (Docker's
//! token protocol, optionally with HTTP basic credentials) and `POST <realm>` with an OAuth2
//! form (`grant_type=password`, as containerd sends when it has credentials). Every granted
//! token is a JWT signed RS256 with a key generated at start; its certificate travels in the
//! token's `x5c` header and is the registry's `rootcertbundle`, so the registry trusts it.
//!
//! Signing shells out to `openssl dgst` (one short process per token): tests ask for a handful
//! of tokens, and it keeps the harness free of a JOSE/crypto crate.
//!
//! Knobs for client tests: the token lifetime (`expires_in`), required credentials, and
//! [`TokenServerOptions::invalid_first`] to hand out tokens the registry rejects (wrong issuer,
//! so the registry answers 401 with `error="invalid_token"`), for the refresh-once rule.
//! [`TokenServer::requests`] counts token requests. While running, [`TokenServer::set_lifetime`]
//! shortens the lifetime of the next tokens (so one expires in the middle of a pull) and
//! [`TokenServer::reject_after`] turns the server bad after some good tokens (for the "second
//! 401 is an error" rule in the middle of a pull); [`TokenServer::tokens`] lists every token
//! handed out, so a test can check that none leaked.
//!
//! [`AuthProxy`] sits between a client and the registry as the enforcing side of a token
//! service that revokes: it rejects a revoked token with the registry's own 401 and
//! `error="invalid_token"` challenge, and can slow manifest GETs so that a short-lived token
//! expires between a pull's manifest and its blobs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::{Input, run_command, run_command_with_input};

/// The `service` (JWT audience) the registry is configured with.
pub const SERVICE: &str = "berth-test-registry";
/// The `issuer` the registry is configured with.
pub const ISSUER: &str = "berth-test-token-server";

/// How a [`TokenServer`] behaves.
#[derive(Debug, Clone)]
pub struct TokenServerOptions {
    /// Token lifetime: the JWT's `exp` and the response's `expires_in`.
    pub lifetime: Duration,
    /// Credentials a token request must carry (basic auth on GET, the form on POST); `None`
    /// grants tokens to anonymous requests too.
    pub credentials: Option<(String, String)>,
    /// The first this many tokens are signed for another issuer, so the registry rejects them
    /// with `error="invalid_token"`.
    pub invalid_first: usize,
}

impl Default for TokenServerOptions {
    fn default() -> Self {
        TokenServerOptions {
            lifetime: Duration::from_secs(300),
            credentials: None,
            invalid_first: 0,
        }
    }
}

/// One token request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// The requested scopes, as sent (`repository:library/busybox:pull`).
    pub scopes: Vec<String>,
    /// Whether a token was granted.
    pub granted: bool,
}

struct Shared {
    opts: TokenServerOptions,
    key: PathBuf,
    cert_der_b64: String,
    issued: AtomicUsize,
    /// How many of the next tokens are signed for the wrong issuer.
    reject: AtomicUsize,
    /// How many more good tokens before every later one is signed for the wrong issuer
    /// (`usize::MAX`: no limit).
    good_left: AtomicUsize,
    /// Lifetime of the next tokens, in seconds.
    lifetime_secs: AtomicU64,
    log: Mutex<Vec<TokenRequest>>,
    tokens: Mutex<Vec<String>>,
}

/// A running token server on `127.0.0.1`; stops on drop.
pub struct TokenServer {
    port: u16,
    cert: PathBuf,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TokenServer {
    /// Generates a signing key and certificate in `dir` and starts serving on a free port.
    pub fn start(dir: &Path, opts: TokenServerOptions) -> Result<TokenServer> {
        let key = dir.join("token-signing.key");
        let cert = dir.join("token-signing.crt");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=berth test token signer",
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&cert)?,
        ])?;
        let der = run_command(
            Command::new("openssl").args(["x509", "-outform", "DER", "-in", path_str(&cert)?]),
            Duration::from_secs(30),
        )?;
        if !der.success() {
            bail!("converting {} to DER: {der}", cert.display());
        }
        let shared = Arc::new(Shared {
            opts: opts.clone(),
            key,
            cert_der_b64: base64(&der.stdout_bytes, STD),
            issued: AtomicUsize::new(0),
            reject: AtomicUsize::new(opts.invalid_first),
            good_left: AtomicUsize::new(usize::MAX),
            lifetime_secs: AtomicU64::new(opts.lifetime.as_secs().max(1)),
            log: Mutex::new(Vec::new()),
            tokens: Mutex::new(Vec::new()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("binding the token server on 127.0.0.1")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (stop_tx, stop_rx) = oneshot::channel();
        let serve_shared = shared.clone();
        let thread = thread::Builder::new()
            .name("token-server".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("token server: building its runtime: {e}");
                        return;
                    }
                };
                rt.block_on(serve(listener, serve_shared, stop_rx));
            })
            .context("spawning the token server thread")?;
        Ok(TokenServer {
            port,
            cert,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The realm URL (`http://127.0.0.1:<port>/token`).
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The signing certificate (PEM), which the registry trusts as `rootcertbundle`.
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// How many token requests arrived (granted or not).
    pub fn requests(&self) -> usize {
        self.log().len()
    }

    /// Signs the next `n` tokens for the wrong issuer, so the registry rejects them with
    /// `error="invalid_token"` (set after pushing test images, which take tokens too).
    pub fn reject_next(&self, n: usize) {
        self.shared.reject.store(n, Ordering::SeqCst);
    }

    /// Gives the next tokens this lifetime (whole seconds, at least one): `expires_in` and the
    /// JWT's `exp`. The registry allows a minute of clock skew past `exp`, so a short token
    /// still passes there; it is the client that must notice the expiry and fetch a new one.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.shared
            .lifetime_secs
            .store(lifetime.as_secs().max(1), Ordering::SeqCst);
    }

    /// Signs `n` more tokens properly, then every later one for the wrong issuer (the registry
    /// rejects those with `error="invalid_token"`).
    pub fn reject_after(&self, n: usize) {
        self.shared.good_left.store(n, Ordering::SeqCst);
    }

    /// Every token handed out so far, oldest first.
    pub fn tokens(&self) -> Vec<String> {
        self.shared
            .tokens
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    /// Every token request so far, oldest first.
    pub fn log(&self) -> Vec<TokenRequest> {
        self.shared
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("token server: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, shared).await {
                        eprintln!("token server: {e:#}");
                    }
                });
            }
        }
    }
}

/// A parsed HTTP/1.1 request (the server closes the connection after each answer).
struct HttpRequest {
    method: String,
    target: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

async fn read_request(stream: &mut TcpStream) -> Result<HttpRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            bail!("request head over 64 KiB");
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the request head ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let target = first.next().unwrap_or_default().to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok(HttpRequest {
        method,
        target,
        headers,
        body,
    })
}

async fn respond(stream: &mut TcpStream, status: &str, extra: &str, body: &str) -> Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    stream.write_all(msg.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn handle(mut stream: TcpStream, shared: Arc<Shared>) -> Result<()> {
    let req = read_request(&mut stream).await?;
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    if path != "/token" {
        return respond(&mut stream, "404 Not Found", "", "{}").await;
    }
    let (scopes, user) = match req.method.as_str() {
        "GET" => {
            let scopes = form_values(query, "scope");
            let user = req
                .headers
                .get("authorization")
                .and_then(|v| v.strip_prefix("Basic "))
                .and_then(|b| base64_decode(b.trim()))
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| {
                    s.split_once(':')
                        .map(|(u, p)| (u.to_string(), p.to_string()))
                });
            (scopes, user)
        }
        "POST" => {
            let form = String::from_utf8_lossy(&req.body).into_owned();
            let scopes = form_values(&form, "scope")
                .iter()
                .flat_map(|s| s.split(' ').map(str::to_string).collect::<Vec<_>>())
                .filter(|s| !s.is_empty())
                .collect();
            let user = match (
                form_values(&form, "username").pop(),
                form_values(&form, "password").pop(),
            ) {
                (Some(u), Some(p)) => Some((u, p)),
                _ => None,
            };
            (scopes, user)
        }
        _ => return respond(&mut stream, "405 Method Not Allowed", "", "{}").await,
    };
    let authorized = match &shared.opts.credentials {
        None => true,
        Some(want) => user.as_ref() == Some(want),
    };
    let entry = TokenRequest {
        method: req.method.clone(),
        scopes: scopes.clone(),
        granted: authorized,
    };
    if let Ok(mut log) = shared.log.lock() {
        log.push(entry);
    }
    if !authorized {
        return respond(
            &mut stream,
            "401 Unauthorized",
            "WWW-Authenticate: Basic realm=\"berth-test-token-server\"\r\n",
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
        )
        .await;
    }
    let subject = user.map(|(u, _)| u).unwrap_or_default();
    let shared2 = shared.clone();
    let token = tokio::task::spawn_blocking(move || issue(&shared2, &subject, &scopes))
        .await
        .map_err(|e| anyhow!("signing task: {e}"))??;
    if let Ok(mut tokens) = shared.tokens.lock() {
        tokens.push(token.clone());
    }
    let lifetime = shared.lifetime_secs.load(Ordering::SeqCst);
    let body = json!({
        "token": token,
        "access_token": token,
        "expires_in": lifetime,
        "issued_at": crate::api::rfc3339(unix_now()),
    })
    .to_string();
    respond(&mut stream, "200 OK", "", &body).await
}

/// Signs a token granting exactly the requested scopes.
fn issue(shared: &Shared, subject: &str, scopes: &[String]) -> Result<String> {
    let n = shared.issued.fetch_add(1, Ordering::SeqCst);
    let rejected = shared
        .reject
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(1))
        .is_ok()
        || shared
            .good_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |g| match g {
                usize::MAX => Some(g),
                _ => g.checked_sub(1),
            })
            .is_err();
    let issuer = if rejected { "someone-else" } else { ISSUER };
    let access: Vec<_> = scopes
        .iter()
        .filter_map(|s| {
            let (kind, rest) = s.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(json!({
                "type": kind,
                "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let now = unix_now();
    let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [shared.cert_der_b64]});
    let claims = json!({
        "iss": issuer,
        "sub": subject,
        "aud": SERVICE,
        "iat": now,
        "nbf": now - 10,
        "exp": now + shared.lifetime_secs.load(Ordering::SeqCst) as i64,
        "jti": format!("berth-{n}-{now}"),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        base64(header.to_string().as_bytes(), URL),
        base64(claims.to_string().as_bytes(), URL)
    );
    let out = run_command_with_input(
        Command::new("openssl").args(["dgst", "-sha256", "-sign", path_str(&shared.key)?]),
        Input::Bytes(signing_input.clone().into_bytes()),
        Duration::from_secs(30),
    )?;
    if !out.success() {
        bail!("signing a token with {}: {out}", shared.key.display());
    }
    Ok(format!(
        "{signing_input}.{}",
        base64(&out.stdout_bytes, URL)
    ))
}

/// How an [`AuthProxy`] treats the requests it forwards.
#[derive(Debug, Clone, Default)]
pub struct AuthProxyOptions {
    /// The first bearer token seen is revoked once it has been used on this many requests:
    /// later requests carrying it are answered 401 with `error="invalid_token"`.
    pub revoke_first_after: Option<usize>,
    /// Every manifest GET waits this long before it is forwarded.
    pub manifest_delay: Duration,
}

/// What an [`AuthProxy`] saw.
#[derive(Debug, Default)]
struct ProxyState {
    /// The first bearer token seen and how many requests carried it.
    first: Option<(String, usize)>,
    /// 401s the proxy answered itself.
    rejected: usize,
    /// Requests forwarded.
    forwarded: usize,
}

/// A reverse proxy on `127.0.0.1` in front of a registry (see the module documentation). One
/// request per connection (it answers `Connection: close`), which every registry client
/// handles. Stops on drop.
pub struct AuthProxy {
    port: u16,
    state: Arc<Mutex<ProxyState>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

struct ProxyConfig {
    upstream: u16,
    realm: String,
    opts: AuthProxyOptions,
    state: Arc<Mutex<ProxyState>>,
}

impl AuthProxy {
    /// Starts a proxy forwarding to the registry on `127.0.0.1:<upstream>`, whose token
    /// endpoint is `realm` (named in the challenges it sends for revoked tokens).
    pub fn start(upstream: u16, realm: &str, opts: AuthProxyOptions) -> Result<AuthProxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("binding the auth proxy on 127.0.0.1")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let config = Arc::new(ProxyConfig {
            upstream,
            realm: realm.to_string(),
            opts,
            state: state.clone(),
        });
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("auth-proxy".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("auth proxy: building its runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("auth proxy: {e}");
                            return;
                        }
                    };
                    loop {
                        tokio::select! {
                            _ = &mut stop_rx => return,
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                let config = config.clone();
                                tokio::spawn(async move {
                                    if let Err(e) = proxy_one(stream, &config).await {
                                        eprintln!("auth proxy: {e:#}");
                                    }
                                });
                            }
                        }
                    }
                });
            })
            .context("spawning the auth proxy thread")?;
        Ok(AuthProxy {
            port,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:<port>`, the registry host clients should use.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// How many requests the proxy answered 401 itself (revoked token).
    pub fn rejected(&self) -> usize {
        self.state.lock().map(|s| s.rejected).unwrap_or_default()
    }

    /// How many requests it forwarded to the registry.
    pub fn forwarded(&self) -> usize {
        self.state.lock().map(|s| s.forwarded).unwrap_or_default()
    }
}

impl Drop for AuthProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn proxy_one(mut client: TcpStream, config: &ProxyConfig) -> Result<()> {
    let req = read_request(&mut client).await?;
    let (path, _) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let bearer = req
        .headers
        .get("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let revoked = {
        let mut st = config
            .state
            .lock()
            .map_err(|_| anyhow!("auth proxy state poisoned"))?;
        let mut revoked = false;
        if let (Some(limit), Some(token)) = (config.opts.revoke_first_after, &bearer) {
            let first = st.first.get_or_insert_with(|| (token.clone(), 0));
            if first.0 == *token {
                if first.1 >= limit {
                    revoked = true;
                } else {
                    first.1 += 1;
                }
            }
        }
        if revoked {
            st.rejected += 1;
        } else {
            st.forwarded += 1;
        }
        revoked
    };
    if revoked {
        let challenge = format!(
            "WWW-Authenticate: Bearer realm=\"{}\",service=\"{SERVICE}\",error=\"invalid_token\"\r\n",
            config.realm
        );
        return respond(
            &mut client,
            "401 Unauthorized",
            &challenge,
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"token revoked"}]}"#,
        )
        .await;
    }
    if req.method == "GET" && path.contains("/manifests/") {
        tokio::time::sleep(config.opts.manifest_delay).await;
    }
    let mut upstream = TcpStream::connect(("127.0.0.1", config.upstream))
        .await
        .with_context(|| format!("connecting to the registry on port {}", config.upstream))?;
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.target);
    for (k, v) in &req.headers {
        if k != "connection" && k != "keep-alive" {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    upstream.write_all(head.as_bytes()).await?;
    upstream.write_all(&req.body).await?;
    // Asked to close, the registry answers `Connection: close` and ends the connection after
    // the response, so copying to the end copies exactly one response.
    tokio::io::copy(&mut upstream, &mut client).await?;
    client.shutdown().await?;
    Ok(())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

/// Runs `openssl ARGS`, failing with its output.
pub(crate) fn openssl(args: &[&str]) -> Result<()> {
    let out = run_command(Command::new("openssl").args(args), Duration::from_secs(60))?;
    if !out.success() {
        bail!("openssl failed (is Debian's openssl installed?): {out}");
    }
    Ok(())
}

/// Percent-decoded values of `key` in an `application/x-www-form-urlencoded` string.
fn form_values(s: &str, key: &str) -> Vec<String> {
    s.split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let v = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(v) = v {
                    out.push(v);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 with `alphabet`; the standard alphabet is padded, the URL one (JWT) is not.
fn base64(data: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if alphabet == STD {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = STD.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        assert_eq!(base64(b"u:p", STD), "dTpw");
        assert_eq!(base64(b"ab", STD), "YWI=");
        assert_eq!(base64(b"ab", URL), "YWI");
        assert_eq!(base64(&[0xfb, 0xff], URL), "-_8");
        assert_eq!(base64_decode("YWI=").as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64_decode("dTpw").as_deref(), Some(&b"u:p"[..]));
    }

    #[test]
    fn form_decoding() {
        assert_eq!(
            form_values(
                "scope=repository%3Alib%2Fbb%3Apull%2Cpush&x=1&scope=a+b",
                "scope"
            ),
            vec!["repository:lib/bb:pull,push".to_string(), "a b".to_string()]
        );
        assert_eq!(percent_decode("100%"), "100%");
    }
}
