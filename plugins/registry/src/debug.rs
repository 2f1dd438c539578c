//! HTTP dump and trace of registry traffic (containerd PR 10762, `ctr pull --http-dump` and
//! `--http-trace`).
//!
//! - **Dump**: every request the client sends and every response head it gets, as text in the
//!   shape of Go's `httputil.DumpRequestOut`/`DumpResponse` without bodies (`GET /v2/... HTTP/1.1`,
//!   `Host:`, headers, a blank line; `HTTP/1.1 200 OK`, headers, a blank line), handed to a
//!   [`DumpSink`]. Secrets never reach it: `Authorization`-like headers keep only their scheme
//!   (`Bearer <redacted>`), query parameters and JSON fields named like secrets
//!   (`password`, `token`, `access_token`, ...) lose their values. The token endpoint's JSON
//!   answer is dumped too (it is small and says the lifetime), with its tokens redacted.
//! - **Trace**: connection timing in the log at debug level (target `berth_registry::trace`,
//!   field `registry` naming the host): name resolution (`dns`, only for host names: an IP
//!   literal is never resolved), connection set-up (`connect`: TCP and, for `https`, the TLS
//!   handshake; reqwest does both in one connector, so they are timed together), and per request
//!   its start, the response head (time to first byte, whether a new connection was opened for it
//!   or a pooled one reused) and the end of its body (bytes, total time).

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode, Url, Version};

/// What replaces a secret in dumps.
pub const REDACTED: &str = "<redacted>";

/// The log target of trace events.
pub const TRACE_TARGET: &str = "berth_registry::trace";

/// Where HTTP dumps go: called once per request or response head with the whole text block
/// (ending in a blank line). Must not block: it runs on the request path.
#[derive(Clone)]
pub struct DumpSink(Arc<dyn Fn(String) + Send + Sync>);

impl DumpSink {
    /// A sink calling `f` with each dump block.
    pub fn new(f: impl Fn(String) + Send + Sync + 'static) -> DumpSink {
        DumpSink(Arc::new(f))
    }

    pub(crate) fn write(&self, text: String) {
        (self.0)(text)
    }
}

impl fmt::Debug for DumpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DumpSink")
    }
}

/// Header names whose values are secrets (lowercase).
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-registry-auth",
    "x-registry-token",
];

/// Parameter and JSON field names whose values are secrets (lowercase).
const SECRET_FIELDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "identitytoken",
    "registrytoken",
];

fn is_secret_field(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_FIELDS.contains(&name.as_str())
}

/// A header value as it may be shown: secrets keep only their scheme word (`Basic`, `Bearer`)
/// so the dump still says which kind of credentials went out.
pub fn redact_header<'a>(name: &str, value: &'a str) -> Cow<'a, str> {
    let lower = name.to_ascii_lowercase();
    let secret = SECRET_HEADERS.contains(&lower.as_str())
        || (lower != "www-authenticate"
            && (lower.contains("token") || lower.contains("secret") || lower.contains("password")));
    if !secret {
        return Cow::Borrowed(value);
    }
    match value.split_once(' ') {
        Some((scheme, _))
            if matches!(
                scheme.to_ascii_lowercase().as_str(),
                "basic" | "bearer" | "token" | "digest"
            ) =>
        {
            Cow::Owned(format!("{scheme} {REDACTED}"))
        }
        _ => Cow::Borrowed(REDACTED),
    }
}

/// `k=v&k=v` with the values of secret names replaced (form bodies, URL queries). Keeps
/// everything else byte for byte.
pub fn redact_query(query: &str) -> Cow<'_, str> {
    let secret = |kv: &str| {
        let name = kv.split_once('=').map_or(kv, |(k, _)| k);
        is_secret_field(name)
    };
    if !query.split('&').any(secret) {
        return Cow::Borrowed(query);
    }
    Cow::Owned(
        query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if is_secret_field(k) => format!("{k}={REDACTED}"),
                _ => kv.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&"),
    )
}

/// A URL as it may be shown: no password in its user info, no secret query values.
pub fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some(REDACTED));
    }
    if let Some(q) = url.query()
        && let Cow::Owned(q) = redact_query(q)
    {
        u.set_query(Some(&q));
    }
    u.to_string()
}

/// A JSON body as it may be shown: string values of secret fields (at any depth) replaced.
/// A body that is not JSON is summarised by its size.
pub fn redact_json(body: &[u8]) -> String {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if is_secret_field(k) && !v.is_null() {
                        *v = serde_json::Value::String(REDACTED.into());
                    } else {
                        walk(v);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut v) => {
            walk(&mut v);
            v.to_string()
        }
        Err(_) => format!("({} bytes, not JSON: not shown)", body.len()),
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

fn push_headers(out: &mut String, headers: &HeaderMap) {
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        out.push_str(name.as_str());
        out.push_str(": ");
        out.push_str(&redact_header(name.as_str(), &value));
        out.push_str("\r\n");
    }
}

/// The dump of a request head (the body is not shown, only its length).
pub fn dump_request(
    method: &Method,
    url: &Url,
    headers: &HeaderMap,
    body_len: Option<usize>,
) -> String {
    let shown = Url::parse(&redact_url(url)).unwrap_or_else(|_| url.clone());
    let mut target = shown.path().to_string();
    if let Some(q) = shown.query() {
        target.push('?');
        target.push_str(q);
    }
    let host = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n");
    push_headers(&mut out, headers);
    if let Some(n) = body_len.filter(|n| *n > 0) {
        out.push_str(&format!("Content-Length: {n}\r\n"));
    }
    out.push_str("\r\n");
    out
}

/// The dump of a response head, with `body` (already redacted) after it when given.
pub fn dump_response(
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    body: Option<&str>,
) -> String {
    let mut out = format!("{} {status}\r\n", version_str(version));
    push_headers(&mut out, headers);
    out.push_str("\r\n");
    if let Some(b) = body {
        out.push_str(b);
        out.push_str("\r\n\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Trace.

/// What one request's trace knows while it is being sent.
#[derive(Debug, Default)]
pub(crate) struct RequestTrace {
    /// Connections the pool opened while this request waited for one.
    pub(crate) connects: AtomicU32,
}

tokio::task_local! {
    /// The trace of the request being sent on this task (set around `execute`).
    pub(crate) static REQUEST: Arc<RequestTrace>;
}

/// Resolves host names with the system resolver, timing each lookup.
#[derive(Debug, Clone)]
pub(crate) struct TraceResolver {
    pub(crate) registry: String,
}

impl reqwest::dns::Resolve for TraceResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let registry = self.registry.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let start = Instant::now();
            let result = tokio::net::lookup_host((host.as_str(), 0)).await;
            let elapsed_ms = ms(start);
            match result {
                Ok(addrs) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    tracing::debug!(target: TRACE_TARGET, registry = %registry, name = %host,
                        addresses = addrs.len(), elapsed_ms, "http trace: dns done");
                    Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
                }
                Err(e) => {
                    tracing::debug!(target: TRACE_TARGET, registry = %registry, name = %host,
                        elapsed_ms, error = %e, "http trace: dns failed");
                    Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                }
            }
        })
    }
}

/// A connector layer timing connection set-up (TCP, and TLS for `https`).
#[derive(Debug, Clone)]
pub(crate) struct TraceConnectLayer {
    pub(crate) registry: String,
    pub(crate) tls: bool,
}

impl<S> tower::Layer<S> for TraceConnectLayer {
    type Service = TraceConnect<S>;

    fn layer(&self, inner: S) -> TraceConnect<S> {
        TraceConnect {
            inner,
            registry: self.registry.clone(),
            tls: self.tls,
        }
    }
}

/// The service of [`TraceConnectLayer`].
#[derive(Debug, Clone)]
pub(crate) struct TraceConnect<S> {
    inner: S,
    registry: String,
    tls: bool,
}

/// The destination of a connector call. reqwest's request type is sealed and shows its URI
/// only through `Debug` (`Unnameable(http://host:port/)`).
fn destination(req: &impl fmt::Debug) -> String {
    let shown = format!("{req:?}");
    shown
        .strip_prefix("Unnameable(")
        .and_then(|s| s.strip_suffix(')'))
        .map_or(shown.clone(), str::to_string)
}

impl<S, R> tower::Service<R> for TraceConnect<S>
where
    R: fmt::Debug,
    S: tower::Service<R>,
    S::Future: Send + 'static,
    S::Error: fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        // The pool calls the connector from the request's own task when it has no idle
        // connection, so the request being sent here is the one that waits for this one.
        let _ = REQUEST.try_with(|t| t.connects.fetch_add(1, Ordering::Relaxed));
        let registry = self.registry.clone();
        let to = destination(&req);
        // The same client also reaches the token realm, which may use another scheme.
        let tls = if to.contains("://") {
            to.starts_with("https://")
        } else {
            self.tls
        };
        let start = Instant::now();
        tracing::debug!(target: TRACE_TARGET, registry = %registry, to = %to, tls,
            "http trace: connect start");
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let elapsed_ms = ms(start);
            match &result {
                Ok(_) => tracing::debug!(target: TRACE_TARGET, registry = %registry, to = %to,
                    tls, elapsed_ms, "http trace: connect done (tcp{})",
                    if tls { " + tls handshake" } else { "" }),
                Err(e) => tracing::debug!(target: TRACE_TARGET, registry = %registry, to = %to,
                    tls, elapsed_ms, error = %e, "http trace: connect failed"),
            }
            result
        })
    }
}

/// A response body that logs when it ends (or is dropped before its end).
pub(crate) struct TracedBody {
    inner: reqwest::Body,
    registry: String,
    request: String,
    start: Instant,
    bytes: u64,
    done: bool,
}

impl TracedBody {
    pub(crate) fn new(
        inner: reqwest::Body,
        registry: String,
        request: String,
        start: Instant,
    ) -> Self {
        TracedBody {
            inner,
            registry,
            request,
            start,
            bytes: 0,
            done: false,
        }
    }
}

impl http_body::Body for TracedBody {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, reqwest::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) if !this.done => {
                this.done = true;
                tracing::debug!(target: TRACE_TARGET, registry = %this.registry,
                    request = %this.request, bytes = this.bytes, elapsed_ms = ms(this.start),
                    "http trace: body done");
            }
            Poll::Ready(Some(Err(e))) if !this.done => {
                this.done = true;
                tracing::debug!(target: TRACE_TARGET, registry = %this.registry,
                    request = %this.request, bytes = this.bytes, elapsed_ms = ms(this.start),
                    error = %e, "http trace: body failed");
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TracedBody {
    fn drop(&mut self) {
        // A HEAD answer, or one without content, ends without ever being read.
        if !self.done && http_body::Body::is_end_stream(&self.inner) {
            tracing::debug!(target: TRACE_TARGET, registry = %self.registry,
                request = %self.request, bytes = self.bytes, elapsed_ms = ms(self.start),
                "http trace: body done");
        } else if !self.done {
            tracing::debug!(target: TRACE_TARGET, registry = %self.registry,
                request = %self.request, bytes = self.bytes, elapsed_ms = ms(self.start),
                "http trace: body dropped before its end");
        }
    }
}

/// Wraps `resp`'s body in a [`TracedBody`] (status, headers, extensions and URL kept).
pub(crate) fn trace_body(
    resp: reqwest::Response,
    registry: &str,
    request: String,
    start: Instant,
) -> reqwest::Response {
    use reqwest::ResponseBuilderExt as _;
    let url = resp.url().clone();
    let (mut parts, body) = http::Response::<reqwest::Body>::from(resp).into_parts();
    // The conversion drops the URL; carry it over in the extension reqwest reads it from.
    if let Ok(carrier) = http::Response::builder().url(url).body(()) {
        parts.extensions.extend(carrier.into_parts().0.extensions);
    }
    let body = reqwest::Body::wrap(TracedBody::new(body, registry.to_string(), request, start));
    reqwest::Response::from(http::Response::from_parts(parts, body))
}

/// Sends `request` on `http`, dumping its head and the response's head to `dump` and tracing
/// it (see the module documentation) when asked. `registry` names the host in trace events.
pub(crate) async fn execute(
    http: &reqwest::Client,
    request: reqwest::Request,
    registry: &str,
    dump: Option<&DumpSink>,
    trace: bool,
) -> reqwest::Result<reqwest::Response> {
    if let Some(d) = dump {
        d.write(dump_request(
            request.method(),
            request.url(),
            request.headers(),
            request.body().and_then(|b| b.as_bytes()).map(<[u8]>::len),
        ));
    }
    let resp = if trace {
        let name = format!("{} {}", request.method(), redact_url(request.url()));
        let state = Arc::new(RequestTrace::default());
        let start = Instant::now();
        tracing::debug!(target: TRACE_TARGET, registry = %registry, request = %name,
            "http trace: request start");
        let resp = REQUEST
            .scope(Arc::clone(&state), http.execute(request))
            .await;
        match resp {
            Ok(resp) => {
                let new_connection = state.connects.load(Ordering::Relaxed) > 0;
                tracing::debug!(target: TRACE_TARGET, registry = %registry, request = %name,
                    status = resp.status().as_u16(), first_byte_ms = ms(start),
                    reused_connection = !new_connection,
                    remote = %resp.remote_addr().map(|a| a.to_string()).unwrap_or_default(),
                    "http trace: response headers");
                trace_body(resp, registry, name, start)
            }
            Err(e) => {
                tracing::debug!(target: TRACE_TARGET, registry = %registry, request = %name,
                    elapsed_ms = ms(start), error = %e, "http trace: request failed");
                return Err(e);
            }
        }
    } else {
        http.execute(request).await?
    };
    if let Some(d) = dump {
        d.write(dump_response(
            resp.version(),
            resp.status(),
            resp.headers(),
            None,
        ));
    }
    Ok(resp)
}

/// Milliseconds since `start`, to three decimals.
pub(crate) fn ms(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};

    #[test]
    fn headers_keep_only_the_scheme_of_secrets() {
        assert_eq!(
            redact_header("Authorization", "Bearer eyJhbGciOi.abc.def"),
            "Bearer <redacted>"
        );
        assert_eq!(
            redact_header("authorization", "Basic dTpwYXNz"),
            "Basic <redacted>"
        );
        assert_eq!(redact_header("Cookie", "session=1"), REDACTED);
        assert_eq!(redact_header("X-Custom-Token", "abc"), REDACTED);
        let challenge = r#"Bearer realm="http://t/token",service="s",error="invalid_token""#;
        assert_eq!(redact_header("WWW-Authenticate", challenge), challenge);
        assert_eq!(
            redact_header("Accept", "application/json"),
            "application/json"
        );
    }

    #[test]
    fn queries_urls_and_json_lose_secret_values() {
        assert_eq!(
            redact_query("grant_type=password&username=u&password=hunter2&scope=a"),
            "grant_type=password&username=u&password=<redacted>&scope=a"
        );
        assert_eq!(redact_query("service=s&scope=x"), "service=s&scope=x");
        let u = Url::parse("https://u:hunter2@h:5000/token?access_token=abc&scope=x").expect("url");
        let shown = redact_url(&u);
        assert!(
            !shown.contains("hunter2") && !shown.contains("abc"),
            "{shown}"
        );
        assert!(shown.contains("scope=x"), "{shown}");
        let body =
            br#"{"token":"T1","access_token":"T1","expires_in":60,"nested":{"refresh_token":"R"}}"#;
        let shown = redact_json(body);
        assert!(!shown.contains("T1") && !shown.contains("\"R\""), "{shown}");
        assert!(shown.contains("\"expires_in\":60"), "{shown}");
        assert!(redact_json(b"\x00\x01").contains("not JSON"));
    }

    #[test]
    fn connector_destinations_come_from_debug_output() {
        #[derive(Debug)]
        #[expect(
            dead_code,
            reason = "only Debug reads it, as with reqwest's sealed type"
        )]
        struct Unnameable(&'static str);
        assert_eq!(destination(&Unnameable("x")), "\"x\"");
        assert_eq!(destination(&"plain"), "\"plain\"");
    }

    #[test]
    fn dumps_look_like_http_heads() {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Bearer secret-token"),
        );
        let url =
            Url::parse("http://127.0.0.1:5000/v2/library/busybox/manifests/test").expect("url");
        let req = dump_request(&Method::GET, &url, &h, None);
        assert!(
            req.starts_with(
                "GET /v2/library/busybox/manifests/test HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n"
            ),
            "{req}"
        );
        assert!(
            req.contains("authorization: Bearer <redacted>\r\n"),
            "{req}"
        );
        assert!(!req.contains("secret-token"), "{req}");
        assert!(req.ends_with("\r\n\r\n"), "{req}");
        let mut h = HeaderMap::new();
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=x"));
        let resp = dump_response(Version::HTTP_11, StatusCode::UNAUTHORIZED, &h, None);
        assert!(resp.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{resp}");
        assert!(resp.contains("www-authenticate: Basic realm=x"), "{resp}");
    }
}
