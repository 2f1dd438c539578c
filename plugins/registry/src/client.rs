//! The registry client: resolve, fetch (verified, resumable), push, with authentication.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode, Url};
use sha2::{Digest as _, Sha256};

use crate::auth::{Challenge, Credentials, HostAuth, TokenCache, base64, parse_challenges};
use crate::digest::{Descriptor, Digest, media_types};
use crate::error::{Error, Result};
use crate::hosts::{self, RegistryHost};
use crate::reference::Reference;
use crate::tls;

/// Manifests and indexes larger than this are refused (containerd's limit too).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// A token response without `expires_in` is valid this long (the distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// How a [`Client`] finds and talks to registries.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// The directory holding `<host>/hosts.toml` files (containerd's `config_path`).
    pub config_path: Option<PathBuf>,
    /// Use `http` for registries without a hosts file (ctr's `--plain-http`).
    pub plain_http: bool,
    /// Credentials per registry domain (`docker.io`, `127.0.0.1:5000`).
    pub credentials: BTreeMap<String, Credentials>,
    /// `User-Agent`; empty gives `berth/<version>`.
    pub user_agent: String,
}

/// Resuming a fetch: the bytes already held and the hash of exactly those bytes.
#[derive(Debug, Clone)]
pub struct Resume {
    /// How many bytes of the blob the caller holds.
    pub offset: u64,
    /// SHA-256 state over those bytes.
    pub hasher: Sha256,
}

/// An OCI distribution registry client. Cheap to share behind an `Arc`; it caches HTTP
/// clients per host, what each host asked for in its first 401, and bearer tokens per scope.
#[derive(Debug)]
pub struct Client {
    opts: ClientOptions,
    http: Mutex<HashMap<String, reqwest::Client>>,
    auth: Mutex<HashMap<String, HostAuth>>,
    tokens: TokenCache,
}

/// One request, re-sendable after an authentication round.
struct Req {
    method: Method,
    url: String,
    headers: Vec<(reqwest::header::HeaderName, String)>,
    body: Option<Bytes>,
}

impl Req {
    fn new(method: Method, url: String) -> Req {
        Req {
            method,
            url,
            headers: Vec::new(),
            body: None,
        }
    }

    fn describe(&self) -> String {
        format!("{} {}", self.method, self.url)
    }
}

impl Client {
    /// A client with `opts`.
    pub fn new(opts: ClientOptions) -> Client {
        Client {
            opts,
            http: Mutex::new(HashMap::new()),
            auth: Mutex::new(HashMap::new()),
            tokens: TokenCache::default(),
        }
    }

    /// The hosts to try for `domain`, mirrors first (see [`hosts`]).
    pub fn hosts(&self, domain: &str) -> Result<Vec<RegistryHost>> {
        hosts::load_hosts(
            self.opts.config_path.as_deref(),
            domain,
            self.opts.plain_http,
        )
    }

    fn http_for(&self, host: &RegistryHost) -> Result<reqwest::Client> {
        let key = format!(
            "{:?}|{}|{:?}|{:?}|{}",
            host.scheme, host.host, host.ca, host.client, host.skip_verify
        );
        let mut map = self.http.lock().map_err(|_| Error::Protocol {
            context: format!("HTTP client for {}", host.host),
            reason: "a previous request panicked holding the client cache".into(),
        })?;
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let ua = if self.opts.user_agent.is_empty() {
            concat!("berth/", env!("CARGO_PKG_VERSION")).to_string()
        } else {
            self.opts.user_agent.clone()
        };
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls::client_config(host)?)
            .user_agent(ua)
            .connect_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Http {
                context: format!("building the HTTP client for {}", host.host),
                source: e,
            })?;
        map.insert(key, client.clone());
        Ok(client)
    }

    fn host_auth(&self, host: &str) -> Option<HostAuth> {
        self.auth.lock().ok()?.get(host).cloned()
    }

    fn set_host_auth(&self, host: &str, auth: HostAuth) {
        if let Ok(mut m) = self.auth.lock() {
            m.insert(host.to_string(), auth);
        }
    }

    /// The `Authorization` value for a request to `host` in `scope`, fetching a token if the
    /// host wants bearer tokens and none is cached.
    async fn authorization(
        &self,
        http: &reqwest::Client,
        host: &RegistryHost,
        domain: &str,
        scope: &str,
    ) -> Result<Option<String>> {
        let creds = self.opts.credentials.get(domain);
        match self.host_auth(&host.host) {
            None => Ok(None),
            Some(HostAuth::Basic) => Ok(creds.map(|c| {
                format!(
                    "Basic {}",
                    base64(format!("{}:{}", c.user, c.secret).as_bytes())
                )
            })),
            Some(HostAuth::Bearer { realm, service }) => {
                if let Some(t) = self.tokens.get(&host.host, scope) {
                    return Ok(Some(format!("Bearer {t}")));
                }
                let (token, lifetime) =
                    fetch_token(http, &realm, &service, scope, creds, domain).await?;
                self.tokens.put(&host.host, scope, token.clone(), lifetime);
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// Sends `req` to `host`, authenticating as the host asks: anonymous first; on a 401 the
    /// challenge says basic or bearer and the request is sent again with it; a 401 with an
    /// `error=` parameter on a request that carried a token drops that token and fetches a new
    /// one, once.
    async fn send(
        &self,
        host: &RegistryHost,
        domain: &str,
        scope: &str,
        req: &Req,
    ) -> Result<reqwest::Response> {
        let http = self.http_for(host)?;
        let mut learned = false;
        let mut refreshed = false;
        loop {
            let auth = self.authorization(&http, host, domain, scope).await?;
            let mut rb = http.request(req.method.clone(), &req.url);
            for (k, v) in &host.headers {
                rb = rb.header(k.as_str(), v.as_str());
            }
            for (k, v) in &req.headers {
                rb = rb.header(k, v.as_str());
            }
            if let Some(a) = &auth {
                rb = rb.header(AUTHORIZATION, a.as_str());
            }
            if let Some(b) = &req.body {
                rb = rb.body(b.clone());
            }
            tracing::debug!(request = %req.describe(), authorized = auth.is_some(), "registry request");
            let resp = rb.send().await.map_err(|e| Error::Http {
                context: req.describe(),
                source: e,
            })?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let challenges: Vec<Challenge> = resp
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(parse_challenges)
                .collect();
            let bearer = challenges.iter().find(|c| c.scheme == "bearer");
            let basic = challenges.iter().any(|c| c.scheme == "basic");
            let unauthorized = |message: String| Error::Unauthorized {
                registry: host.host.clone(),
                scope: scope.to_string(),
                message,
            };
            if auth.is_none() && !learned {
                learned = true;
                if let Some(b) = bearer {
                    let realm = b.param("realm").ok_or_else(|| {
                        unauthorized("the bearer challenge names no realm".into())
                    })?;
                    self.set_host_auth(
                        &host.host,
                        HostAuth::Bearer {
                            realm: realm.to_string(),
                            service: b.param("service").unwrap_or_default().to_string(),
                        },
                    );
                } else if basic {
                    if !self.opts.credentials.contains_key(domain) {
                        return Err(unauthorized(format!(
                            "the registry wants basic credentials and none are configured for {domain}"
                        )));
                    }
                    self.set_host_auth(&host.host, HostAuth::Basic);
                } else {
                    return Err(unauthorized(
                        "401 without a basic or bearer challenge".into(),
                    ));
                }
                continue;
            }
            let used_token = auth.as_deref().is_some_and(|a| a.starts_with("Bearer "));
            match bearer.and_then(|b| b.param("error")) {
                Some(_) if used_token && !refreshed => {
                    refreshed = true;
                    self.tokens.remove(&host.host, scope);
                    if let Some(realm) = bearer.and_then(|b| b.param("realm")) {
                        self.set_host_auth(
                            &host.host,
                            HostAuth::Bearer {
                                realm: realm.to_string(),
                                service: bearer
                                    .and_then(|b| b.param("service"))
                                    .unwrap_or_default()
                                    .to_string(),
                            },
                        );
                    }
                    tracing::debug!(request = %req.describe(), scope, "token rejected; fetching a new one");
                    continue;
                }
                Some(err) => {
                    return Err(unauthorized(format!(
                        "the registry rejected the token again ({err})"
                    )));
                }
                None if used_token => {
                    return Err(unauthorized("the registry rejected the token".into()));
                }
                None => {
                    return Err(unauthorized(
                        "the registry rejected the credentials (401 Unauthorized)".into(),
                    ));
                }
            }
        }
    }

    /// Resolves `reference` to the descriptor of its manifest or index, trying every host with
    /// the `resolve` capability in order.
    pub async fn resolve(&self, reference: &Reference) -> Result<Descriptor> {
        let scope = reference.scope("pull");
        let mut first_err = None;
        for host in self.hosts(&reference.domain)? {
            if !host.capabilities.resolve {
                continue;
            }
            match self.resolve_at(&host, reference, &scope).await {
                Ok(d) => return Ok(d),
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::debug!(host = %host.host, error = %e, "resolve failed; trying the next host");
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| Error::NotFound {
            registry: reference.domain.clone(),
            what: reference.to_string(),
        }))
    }

    async fn resolve_at(
        &self,
        host: &RegistryHost,
        r: &Reference,
        scope: &str,
    ) -> Result<Descriptor> {
        let url = format!(
            "{}/{}/manifests/{}",
            host.base_url(),
            r.repository,
            r.object()
        );
        let mut head = Req::new(Method::HEAD, url.clone());
        head.headers
            .push((ACCEPT, media_types::MANIFEST_ACCEPT.to_string()));
        let resp = self.send(host, &r.domain, scope, &head).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound {
                registry: host.host.clone(),
                what: r.to_string(),
            });
        }
        if resp.status().is_success() {
            let h = resp.headers();
            let media_type = header(h, CONTENT_TYPE);
            let size = header(h, CONTENT_LENGTH).and_then(|s| s.parse::<u64>().ok());
            let digest = match (&r.digest, header(h, "docker-content-digest")) {
                (Some(d), _) => Some(d.clone()),
                (None, Some(d)) => Some(Digest::parse(&d)?),
                (None, None) => None,
            };
            if let (Some(media_type), Some(size), Some(digest)) = (media_type, size, digest)
                && size > 0
            {
                return Ok(Descriptor::new(media_type, digest, size));
            }
        }
        // HEAD without what we need (or refused): GET the manifest and hash it.
        let mut get = Req::new(Method::GET, url);
        get.headers
            .push((ACCEPT, media_types::MANIFEST_ACCEPT.to_string()));
        let resp = self.send(host, &r.domain, scope, &get).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound {
                registry: host.host.clone(),
                what: r.to_string(),
            });
        }
        let resp = expect_status(resp, &get, &[StatusCode::OK]).await?;
        let header_type = header(resp.headers(), CONTENT_TYPE);
        let body = read_limited(resp, &get, MAX_MANIFEST_BYTES).await?;
        let digest = Digest::of(&body);
        if let Some(want) = &r.digest
            && *want != digest
        {
            return Err(Error::DigestMismatch {
                expected: want.to_string(),
                actual: digest.to_string(),
            });
        }
        let media_type = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .or(header_type)
            .ok_or_else(|| Error::Protocol {
                context: get.describe(),
                reason: "the manifest has no media type (neither Content-Type nor mediaType)"
                    .into(),
            })?;
        Ok(Descriptor::new(media_type, digest, body.len() as u64))
    }

    /// Fetches the content `desc` describes from `reference`'s repository as a stream verified
    /// against `desc.digest` and `desc.size`. With `resume`, asks for the bytes after
    /// `resume.offset` (`Range`), and skips them itself if the registry sends everything.
    pub async fn fetch(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        resume: Option<Resume>,
    ) -> Result<BlobStream> {
        let scope = reference.scope("pull");
        let kind = if is_manifest(&desc.media_type) {
            "manifests"
        } else {
            "blobs"
        };
        let offset = resume.as_ref().map_or(0, |r| r.offset);
        if offset > desc.size {
            return Err(Error::SizeMismatch {
                digest: desc.digest.to_string(),
                expected: desc.size,
                actual: offset,
            });
        }
        let mut first_err = None;
        for host in self.hosts(&reference.domain)? {
            if !host.capabilities.pull {
                continue;
            }
            let url = format!(
                "{}/{}/{kind}/{}",
                host.base_url(),
                reference.repository,
                desc.digest
            );
            let mut req = Req::new(Method::GET, url);
            if kind == "manifests" {
                req.headers.push((ACCEPT, desc.media_type.clone()));
            }
            if offset > 0 {
                req.headers.push((RANGE, format!("bytes={offset}-")));
            }
            let resp = match self.send(&host, &reference.domain, &scope, &req).await {
                Ok(r) => r,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            if resp.status() == StatusCode::NOT_FOUND {
                continue;
            }
            let resp =
                match expect_status(resp, &req, &[StatusCode::OK, StatusCode::PARTIAL_CONTENT])
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        first_err.get_or_insert(e);
                        continue;
                    }
                };
            let skip = if resp.status() == StatusCode::PARTIAL_CONTENT {
                let start = header(resp.headers(), CONTENT_RANGE).and_then(|v| {
                    v.strip_prefix("bytes ")
                        .and_then(|r| r.split('-').next())
                        .and_then(|s| s.parse::<u64>().ok())
                });
                if start != Some(offset) {
                    return Err(Error::Protocol {
                        context: req.describe(),
                        reason: format!(
                            "asked for bytes from {offset}, got Content-Range {start:?}"
                        ),
                    });
                }
                0
            } else {
                offset
            };
            let (hasher, received) = match resume {
                Some(r) => (r.hasher, r.offset),
                None => (Sha256::new(), 0),
            };
            return Ok(BlobStream {
                resp,
                hasher,
                desc: desc.clone(),
                received,
                skip,
                done: false,
                context: req.describe(),
            });
        }
        Err(first_err.unwrap_or_else(|| Error::NotFound {
            registry: reference.domain.clone(),
            what: format!("{}@{}", reference.repository, desc.digest),
        }))
    }

    /// Fetches a manifest or index whole (at most [`MAX_MANIFEST_BYTES`]), verified.
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
        desc: &Descriptor,
    ) -> Result<Vec<u8>> {
        if desc.size > MAX_MANIFEST_BYTES {
            return Err(Error::SizeMismatch {
                digest: desc.digest.to_string(),
                expected: MAX_MANIFEST_BYTES,
                actual: desc.size,
            });
        }
        self.fetch(reference, desc, None).await?.bytes().await
    }

    fn push_host(&self, reference: &Reference) -> Result<RegistryHost> {
        self.hosts(&reference.domain)?
            .into_iter()
            .find(|h| h.capabilities.push)
            .ok_or_else(|| Error::Protocol {
                context: format!("pushing to {reference}"),
                reason: format!(
                    "no host of {} has the push capability in its hosts.toml",
                    reference.domain
                ),
            })
    }

    /// Pushes a blob unless the repository has it already (HEAD first). Returns whether it
    /// was uploaded. `data` must match `desc`.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        data: Bytes,
    ) -> Result<bool> {
        check_content(desc, &data)?;
        let host = self.push_host(reference)?;
        let scope = reference.scope("pull,push");
        let base = format!("{}/{}", host.base_url(), reference.repository);
        let head = Req::new(Method::HEAD, format!("{base}/blobs/{}", desc.digest));
        let resp = self.send(&host, &reference.domain, &scope, &head).await?;
        if resp.status().is_success() {
            return Ok(false);
        }
        let post = Req::new(Method::POST, format!("{base}/blobs/uploads/"));
        let resp = self.send(&host, &reference.domain, &scope, &post).await?;
        let resp = expect_status(resp, &post, &[StatusCode::ACCEPTED]).await?;
        let location = header(resp.headers(), LOCATION).ok_or_else(|| Error::Protocol {
            context: post.describe(),
            reason: "202 without a Location for the upload".into(),
        })?;
        let mut url = Url::parse(&post.url)
            .and_then(|u| u.join(&location))
            .map_err(|e| Error::Protocol {
                context: post.describe(),
                reason: format!("upload Location {location:?} is not a URL: {e}"),
            })?;
        url.query_pairs_mut()
            .append_pair("digest", desc.digest.as_str());
        let mut put = Req::new(Method::PUT, url.to_string());
        put.headers
            .push((CONTENT_TYPE, "application/octet-stream".to_string()));
        put.body = Some(data);
        let resp = self.send(&host, &reference.domain, &scope, &put).await?;
        expect_status(resp, &put, &[StatusCode::CREATED]).await?;
        Ok(true)
    }

    /// Pushes a manifest or index under `reference`'s tag (or its digest when untagged).
    /// Push its blobs first: registries refuse a manifest whose blobs they lack.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        data: Bytes,
    ) -> Result<()> {
        check_content(desc, &data)?;
        let host = self.push_host(reference)?;
        let scope = reference.scope("pull,push");
        let object = reference
            .tag
            .clone()
            .unwrap_or_else(|| desc.digest.to_string());
        let mut put = Req::new(
            Method::PUT,
            format!(
                "{}/{}/manifests/{object}",
                host.base_url(),
                reference.repository
            ),
        );
        put.headers.push((CONTENT_TYPE, desc.media_type.clone()));
        put.body = Some(data);
        let resp = self.send(&host, &reference.domain, &scope, &put).await?;
        expect_status(resp, &put, &[StatusCode::CREATED]).await?;
        Ok(())
    }
}

/// A fetched blob or manifest, verified while it streams. Read it with [`BlobStream::chunk`]
/// until `Ok(None)`: that last call is the verification (size and digest), so commit what
/// was read only after it.
#[derive(Debug)]
pub struct BlobStream {
    resp: reqwest::Response,
    hasher: Sha256,
    desc: Descriptor,
    received: u64,
    skip: u64,
    done: bool,
    context: String,
}

impl BlobStream {
    /// Bytes of the blob accounted for so far (the resumed prefix included).
    pub fn offset(&self) -> u64 {
        self.received
    }

    /// The descriptor being fetched.
    pub fn descriptor(&self) -> &Descriptor {
        &self.desc
    }

    /// The next chunk; `Ok(None)` once everything arrived and matched the digest.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.done {
                return Ok(None);
            }
            let next = self.resp.chunk().await.map_err(|e| Error::Http {
                context: format!("{} after {} bytes", self.context, self.received),
                source: e,
            })?;
            let Some(mut b) = next else {
                self.done = true;
                if self.received != self.desc.size || self.skip > 0 {
                    return Err(Error::SizeMismatch {
                        digest: self.desc.digest.to_string(),
                        expected: self.desc.size,
                        actual: self.received,
                    });
                }
                let actual = Digest::from_hasher(self.hasher.clone());
                if actual != self.desc.digest {
                    return Err(Error::DigestMismatch {
                        expected: self.desc.digest.to_string(),
                        actual: actual.to_string(),
                    });
                }
                return Ok(None);
            };
            if self.skip > 0 {
                let n = (self.skip as usize).min(b.len());
                b = b.slice(n..);
                self.skip -= n as u64;
                if b.is_empty() {
                    continue;
                }
            }
            self.received += b.len() as u64;
            if self.received > self.desc.size {
                self.done = true;
                return Err(Error::SizeMismatch {
                    digest: self.desc.digest.to_string(),
                    expected: self.desc.size,
                    actual: self.received,
                });
            }
            self.hasher.update(&b);
            return Ok(Some(b));
        }
    }

    /// Reads the rest and verifies it.
    pub async fn bytes(mut self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.desc.size.min(MAX_MANIFEST_BYTES) as usize);
        while let Some(b) = self.chunk().await? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }
}

fn is_manifest(media_type: &str) -> bool {
    matches!(
        media_type,
        media_types::OCI_INDEX
            | media_types::OCI_MANIFEST
            | media_types::DOCKER_LIST
            | media_types::DOCKER_MANIFEST
    )
}

fn check_content(desc: &Descriptor, data: &[u8]) -> Result<()> {
    if data.len() as u64 != desc.size {
        return Err(Error::SizeMismatch {
            digest: desc.digest.to_string(),
            expected: desc.size,
            actual: data.len() as u64,
        });
    }
    let actual = Digest::of(data);
    if actual != desc.digest {
        return Err(Error::DigestMismatch {
            expected: desc.digest.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

fn header(
    h: &reqwest::header::HeaderMap,
    name: impl reqwest::header::AsHeaderName,
) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

async fn expect_status(
    resp: reqwest::Response,
    req: &Req,
    ok: &[StatusCode],
) -> Result<reqwest::Response> {
    if ok.contains(&resp.status()) {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    let body: String = body.chars().take(512).collect();
    Err(Error::Status {
        method: req.method.to_string(),
        url: req.url.clone(),
        status,
        body,
    })
}

async fn read_limited(mut resp: reqwest::Response, req: &Req, limit: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(b) = resp.chunk().await.map_err(|e| Error::Http {
        context: req.describe(),
        source: e,
    })? {
        out.extend_from_slice(&b);
        if out.len() as u64 > limit {
            return Err(Error::Protocol {
                context: req.describe(),
                reason: format!("manifest larger than {limit} bytes"),
            });
        }
    }
    Ok(out)
}

/// Fetches a bearer token for `scope` from `realm` (GET, Docker's token protocol; basic
/// credentials when configured).
async fn fetch_token(
    http: &reqwest::Client,
    realm: &str,
    service: &str,
    scope: &str,
    creds: Option<&Credentials>,
    registry: &str,
) -> Result<(String, Duration)> {
    let unauthorized = |message: String| Error::Unauthorized {
        registry: registry.to_string(),
        scope: scope.to_string(),
        message,
    };
    let mut url = Url::parse(realm)
        .map_err(|e| unauthorized(format!("the token realm {realm:?} is not a URL: {e}")))?;
    {
        let mut q = url.query_pairs_mut();
        if !service.is_empty() {
            q.append_pair("service", service);
        }
        q.append_pair("scope", scope);
    }
    let mut rb = http.get(url.clone());
    if let Some(c) = creds {
        rb = rb.basic_auth(&c.user, Some(&c.secret));
    }
    let resp = rb.send().await.map_err(|e| Error::Http {
        context: format!("fetching a token from {realm}"),
        source: e,
    })?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| Error::Http {
        context: format!("reading the token from {realm}"),
        source: e,
    })?;
    if !status.is_success() {
        return Err(unauthorized(format!(
            "the token server {realm} answered {status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(256)
                .collect::<String>()
        )));
    }
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        #[serde(default)]
        token: String,
        #[serde(default)]
        access_token: String,
        #[serde(default)]
        expires_in: u64,
    }
    let t: TokenResponse = serde_json::from_slice(&body)
        .map_err(|e| unauthorized(format!("the token server {realm} sent bad JSON: {e}")))?;
    let token = if t.token.is_empty() {
        t.access_token
    } else {
        t.token
    };
    if token.is_empty() {
        return Err(unauthorized(format!(
            "the token server {realm} sent no token"
        )));
    }
    let lifetime = if t.expires_in == 0 {
        DEFAULT_TOKEN_LIFETIME
    } else {
        Duration::from_secs(t.expires_in)
    };
    Ok((token, lifetime))
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
