//! A recording, throttling HTTP/1.1 forwarder on loopback, put between a client and a registry
//! to see what the client asks for and to make the network misbehave.
//!
//! Every request is forwarded on a connection of its own to the upstream, and both sides are
//! told `Connection: close`, so a response ends when the upstream closes and the proxy never
//! parses bodies: what the upstream sends (or fails to send) reaches the client byte for byte.
//! Each exchange is logged as it happens ([`Exchange`]: method, path, the `Range` the client
//! sent, status, response body bytes forwarded so far, start and end), and the proxy counts
//! the requests in flight at once (from the request's arrival to the end of its response), the
//! measure [`RecordingProxy::max_in_flight`] reports. As the proxy sees a request only after
//! the client sent it and finishes before the client finished reading, its count never exceeds
//! the client's own concurrency.
//!
//! Misbehaviour, changeable while it runs ([`ProxySettings`]): a rate limit on response bodies
//! per connection (to make a transfer last long enough to interrupt), `Range` headers stripped
//! (an upstream that ignores ranges), a cut of the connection after N body bytes of a
//! matching path, and requests of a matching path held back until released. The upstream socket gets a small receive buffer so that a throttled response
//! stays mostly in the upstream process, not in kernel buffers: killing the upstream then
//! really breaks the transfer.
//!
//! Request bodies are forwarded when they have a `Content-Length`; a chunked request body is
//! answered 501 (registry pulls send none).
//!
//! ```no_run
//! use berth_integration::recording_proxy::{ProxySettings, RecordingProxy};
//! let proxy = RecordingProxy::start("127.0.0.1:5000", ProxySettings::default())?;
//! println!("pull through {}", proxy.host());
//! for e in proxy.log() {
//!     println!("{} {} {:?} -> {}", e.method, e.path, e.range, e.status);
//! }
//! # anyhow::Ok(())
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The upstream socket's receive buffer: small, so a slow forward holds the upstream back.
const UPSTREAM_RCVBUF: usize = 64 * 1024;
/// Bytes forwarded per read/write step (and per throttling step).
const STEP: usize = 16 * 1024;
/// The largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// How the proxy misbehaves; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct ProxySettings {
    /// Forward each response body at most this many bytes per second (per connection).
    pub rate: Option<u64>,
    /// Remove `Range` from requests, as if the upstream ignored it (the log keeps what the
    /// client sent).
    pub strip_range: bool,
    /// Close both connections once this many response body bytes of a request whose path
    /// contains the string were forwarded.
    pub cut: Option<(String, u64)>,
    /// Hold requests whose path contains the string (before forwarding them) until the
    /// settings no longer name it.
    pub hold: Option<String>,
}

/// One request and its response, as far as it got.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Request method.
    pub method: String,
    /// Request target (path and query).
    pub path: String,
    /// The `Range` header the client sent.
    pub range: Option<String>,
    /// Response status; 0 until the upstream answered, 502 when it could not be reached.
    pub status: u16,
    /// Response body bytes forwarded to the client so far.
    pub body_bytes: u64,
    /// When the request arrived.
    pub started: Instant,
    /// When the exchange ended (response forwarded, cut, or failed).
    pub ended: Option<Instant>,
    /// When the proxy began its last write of body bytes to the client. A request the client
    /// makes only after reading this response whole starts after it, so spans ending here
    /// measure the client's concurrency without the race of `ended` (taken after the write).
    pub last_write: Option<Instant>,
    /// Whether the proxy cut it ([`ProxySettings::cut`]).
    pub cut: bool,
}

impl Exchange {
    /// The start offset of a `Range: bytes=<start>-[<end>]` request.
    pub fn range_start(&self) -> Option<u64> {
        self.range_bounds().map(|(s, _)| s)
    }

    /// `(start, end)` of a `Range: bytes=<start>-[<end>]` request (`end` inclusive).
    pub fn range_bounds(&self) -> Option<(u64, Option<u64>)> {
        let r = self.range.as_deref()?.trim().strip_prefix("bytes=")?;
        let (start, end) = r.split_once('-')?;
        let end = if end.is_empty() {
            None
        } else {
            Some(end.parse().ok()?)
        };
        Some((start.parse().ok()?, end))
    }
}

struct Shared {
    upstream: String,
    settings: Mutex<ProxySettings>,
    log: Mutex<Vec<Exchange>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    stop: AtomicBool,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Vec<Exchange>> {
        // A panicking connection thread leaves the log as it was; keep using it.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settings(&self) -> ProxySettings {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A running proxy; dropping it stops accepting (exchanges in progress finish on their own).
pub struct RecordingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl RecordingProxy {
    /// Starts a proxy on `127.0.0.1:<free port>` forwarding to `upstream` (`host:port`).
    pub fn start(upstream: &str, settings: ProxySettings) -> Result<RecordingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            settings: Mutex::new(settings),
            log: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("recording-proxy".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if accept_shared.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let shared = Arc::clone(&accept_shared);
                    let _ = thread::Builder::new()
                        .name("recording-proxy-conn".into())
                        .spawn(move || serve(&shared, conn));
                }
            })
            .context("starting the proxy thread")?;
        Ok(RecordingProxy {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// `127.0.0.1:<port>`, the registry host for references pulled through the proxy.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Replaces the settings; exchanges in progress pick up the rate at their next step.
    pub fn set(&self, settings: ProxySettings) {
        *self
            .shared
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = settings;
    }

    /// Every exchange so far, in arrival order.
    pub fn log(&self) -> Vec<Exchange> {
        self.shared.log().clone()
    }

    /// Forgets the exchanges so far and the in-flight maximum.
    pub fn clear(&self) {
        self.shared.log().clear();
        self.shared.max_in_flight.store(
            self.shared.in_flight.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
    }

    /// The most requests that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Waits until `pred` holds for the log (polling every 10 ms); false after `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Exchange]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.shared.log()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exchanges whose path contains `needle` (a digest, say).
    pub fn exchanges(&self, needle: &str) -> Vec<Exchange> {
        self.log()
            .into_iter()
            .filter(|e| e.path.contains(needle))
            .collect()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> InFlight<'a> {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A parsed request head.
struct Head {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
    /// Bytes read past the head (the start of the body).
    rest: Vec<u8>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads up to the end of a head (`\r\n\r\n`); `None` at a clean end of stream.
fn read_head(conn: &mut TcpStream) -> Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            return Ok(Some((head, buf[i + 4..].to_vec())));
        }
        if buf.len() > MAX_HEAD {
            bail!("a head of more than {MAX_HEAD} bytes");
        }
        match conn.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => bail!("the peer closed in the middle of a head"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn parse_request(head: &str, rest: Vec<u8>) -> Result<Head> {
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        bail!("request line {first:?}");
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers,
        rest,
    })
}

fn respond(conn: &mut TcpStream, status: u16, reason: &str, body: &str) {
    let _ = write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Serves one client connection: one request, forwarded, logged.
fn serve(shared: &Shared, mut client: TcpStream) {
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    let Ok(Some((head, rest))) = read_head(&mut client) else {
        return;
    };
    let Ok(req) = parse_request(&head, rest) else {
        respond(&mut client, 400, "Bad Request", "malformed request\n");
        return;
    };
    let _in_flight = InFlight::enter(shared);
    let settings = shared.settings();
    let index = {
        let mut log = shared.log();
        log.push(Exchange {
            method: req.method.clone(),
            path: req.target.clone(),
            range: req.header("range").map(str::to_string),
            status: 0,
            body_bytes: 0,
            started: Instant::now(),
            ended: None,
            last_write: None,
            cut: false,
        });
        log.len() - 1
    };
    if let Err(e) = forward(shared, &settings, &req, &mut client, index) {
        eprintln!("recording-proxy: {} {}: {e:#}", req.method, req.target);
    }
    if let Some(e) = shared.log().get_mut(index) {
        e.ended = Some(Instant::now());
    }
    let _ = client.shutdown(Shutdown::Both);
}

fn forward(
    shared: &Shared,
    settings: &ProxySettings,
    req: &Head,
    client: &mut TcpStream,
    index: usize,
) -> Result<()> {
    let set = |f: &mut dyn FnMut(&mut Exchange)| {
        if let Some(e) = shared.log().get_mut(index) {
            f(e);
        }
    };
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        set(&mut |e| e.status = 501);
        respond(
            client,
            501,
            "Not Implemented",
            "chunked request bodies are not forwarded\n",
        );
        return Ok(());
    }
    while shared
        .settings()
        .hold
        .is_some_and(|held| req.target.contains(&held))
        && !shared.stop.load(Ordering::SeqCst)
    {
        thread::sleep(Duration::from_millis(10));
    }
    let mut upstream = match TcpStream::connect(&shared.upstream) {
        Ok(s) => s,
        Err(e) => {
            set(&mut |x| x.status = 502);
            respond(
                client,
                502,
                "Bad Gateway",
                &format!("upstream {}: {e}\n", shared.upstream),
            );
            return Ok(());
        }
    };
    set_rcvbuf(&upstream);

    // The request, with `Connection: close` (and without `Range` when stripping).
    let mut out = format!("{} {} {}\r\n", req.method, req.target, req.version);
    for (k, v) in &req.headers {
        let lower = k.to_ascii_lowercase();
        if lower == "connection"
            || lower == "keep-alive"
            || (settings.strip_range && lower == "range")
        {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    upstream.write_all(out.as_bytes())?;
    let body_len: usize = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut sent = req.rest.len().min(body_len);
    upstream.write_all(&req.rest[..sent])?;
    let mut buf = vec![0u8; STEP];
    while sent < body_len {
        let n = client.read(&mut buf[..STEP.min(body_len - sent)])?;
        if n == 0 {
            bail!("the client closed in the middle of the request body");
        }
        upstream.write_all(&buf[..n])?;
        sent += n;
    }

    // The response head, with `Connection: close`.
    let Some((head, rest)) = read_head(&mut upstream)? else {
        bail!("the upstream closed without answering");
    };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_string();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    set(&mut |e| e.status = status);
    let mut out = format!("{status_line}\r\n");
    for line in lines {
        let name = line.split(':').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    client.write_all(out.as_bytes())?;

    // The body, as it comes, throttled and possibly cut.
    let cut_after = settings
        .cut
        .as_ref()
        .filter(|(needle, _)| req.target.contains(needle.as_str()))
        .map(|(_, n)| *n);
    let started = Instant::now();
    let mut forwarded: u64 = 0;
    let mut pending = rest;
    loop {
        if pending.is_empty() {
            let n = match upstream.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // The upstream died: the client sees the connection end early, as it would.
                Err(_) => return Ok(()),
            };
            pending = buf[..n].to_vec();
        }
        let mut take = pending.len();
        if let Some(limit) = cut_after {
            take = take.min(limit.saturating_sub(forwarded) as usize);
            if take == 0 {
                set(&mut |e| e.cut = true);
                let _ = upstream.shutdown(Shutdown::Both);
                return Ok(());
            }
        }
        set(&mut |e| e.last_write = Some(Instant::now()));
        client.write_all(&pending[..take])?;
        pending.drain(..take);
        forwarded += take as u64;
        set(&mut |e| e.body_bytes = forwarded);
        // The rate is read again at every step, so a test can lift it in the middle.
        if let Some(rate) = shared.settings().rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(forwarded as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                thread::sleep(wait);
            }
        }
    }
}

/// Caps the upstream socket's receive buffer (see [`UPSTREAM_RCVBUF`]).
fn set_rcvbuf(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    if let Err(e) = setsockopt(s, sockopt::RcvBuf, &UPSTREAM_RCVBUF) {
        eprintln!("recording-proxy: cannot set SO_RCVBUF: {e}");
    }
}
