//! The registry client: resolve, fetch (verified, resumable), push, with authentication.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode, Url};
use sha2::{Digest as _, Sha256};
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::{Challenge, Credentials, HostAuth, TokenCache, base64, parse_challenges};
use crate::debug::{self, DumpSink};
use crate::digest::{Descriptor, Digest, media_types};
use crate::error::{Error, Result};
use crate::hosts::{self, RegistryHost};
use crate::ranged::{self, Multipart};
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
    /// Dump every request and response head here, secrets redacted (`--http-dump`; see
    /// [`crate::debug`]).
    pub http_dump: Option<DumpSink>,
    /// Log connection timing at debug level (`--http-trace`; see [`crate::debug`]).
    pub http_trace: bool,
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
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls::client_config(host)?)
            .user_agent(ua)
            .connect_timeout(Duration::from_secs(30));
        if self.opts.http_trace {
            builder = builder
                .dns_resolver(Arc::new(debug::TraceResolver {
                    registry: host.host.clone(),
                }))
                .connector_layer(debug::TraceConnectLayer {
                    registry: host.host.clone(),
                    tls: matches!(host.scheme, hosts::Scheme::Https),
                });
        }
        let client = builder.build().map_err(|e| Error::Http {
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
                let (token, lifetime) = fetch_token(
                    http,
                    TokenRequest {
                        realm: &realm,
                        service: &service,
                        scope,
                        registry: domain,
                    },
                    creds,
                    &self.opts,
                )
                .await?;
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
            let http_error = |e| Error::Http {
                context: req.describe(),
                source: e,
            };
            let request = rb.build().map_err(http_error)?;
            let resp = debug::execute(
                &http,
                request,
                &host.host,
                self.opts.http_dump.as_ref(),
                self.opts.http_trace,
            )
            .await
            .map_err(http_error)?;
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
        let prefix = resume.map_or(Prefix::None, Prefix::Hashed);
        self.fetch_stream(reference, desc, prefix, None).await
    }

    /// [`Client::fetch`] with [`FetchOptions`]: a resumed prefix the caller verifies itself
    /// ([`Prefix::Held`]), and blobs bigger than the multipart buffer fetched as parallel
    /// ranged parts ([`crate::ranged`]). Manifests and indexes are always fetched whole.
    pub async fn fetch_with(
        self: &Arc<Self>,
        reference: &Reference,
        desc: &Descriptor,
        options: FetchOptions,
    ) -> Result<BlobStream> {
        let FetchOptions { prefix, multipart } = options;
        check_offset(desc, prefix.offset())?;
        match multipart {
            Some(m) if !is_manifest(&desc.media_type) && m.splits(desc.size - prefix.offset()) => {
                ranged::fetch(Arc::clone(self), reference, desc, prefix, m).await
            }
            Some(m) => self.fetch_stream(reference, desc, prefix, Some(m)).await,
            None => self.fetch_stream(reference, desc, prefix, None).await,
        }
    }

    /// One GET of the content from `prefix`'s offset on, trying every host with the pull
    /// capability in order; with `limiter`, the request holds one of its slots until the
    /// stream ends.
    async fn fetch_stream(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        prefix: Prefix,
        limiter: Option<Multipart>,
    ) -> Result<BlobStream> {
        let offset = prefix.offset();
        check_offset(desc, offset)?;
        let mut first_err = None;
        for host in self.pull_hosts(reference)? {
            let permit = match &limiter {
                Some(m) => Some(m.permit().await?),
                None => None,
            };
            let range = (offset > 0).then_some((offset, None));
            let (resp, context) = match self.get_content(&host, reference, desc, range).await {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
            if partial {
                let start = content_range(resp.headers()).map(|(start, _, _)| start);
                if start != Some(offset) {
                    return Err(Error::Protocol {
                        context,
                        reason: format!(
                            "asked for bytes from {offset}, got Content-Range starting at {start:?}"
                        ),
                    });
                }
            }
            let source = Source::Single { resp, permit };
            return Ok(BlobStream::new(source, desc, prefix, partial, context));
        }
        Err(first_err.unwrap_or_else(|| not_found(reference, desc)))
    }

    /// The hosts of `reference`'s registry with the pull capability, mirrors first.
    pub(crate) fn pull_hosts(&self, reference: &Reference) -> Result<Vec<RegistryHost>> {
        Ok(self
            .hosts(&reference.domain)?
            .into_iter()
            .filter(|h| h.capabilities.pull)
            .collect())
    }

    /// GET of `desc` at `host` (under `manifests/` or `blobs/` by media type), with
    /// `Range: bytes=<start>-[<end>]` when `range` is given. `None` for a 404; a status other
    /// than 200 or 206 is an error. Returns the response and the request, described for errors.
    pub(crate) async fn get_content(
        &self,
        host: &RegistryHost,
        reference: &Reference,
        desc: &Descriptor,
        range: Option<(u64, Option<u64>)>,
    ) -> Result<Option<(reqwest::Response, String)>> {
        let kind = if is_manifest(&desc.media_type) {
            "manifests"
        } else {
            "blobs"
        };
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
        if let Some((start, end)) = range {
            let end = end.map(|e| e.to_string()).unwrap_or_default();
            req.headers.push((RANGE, format!("bytes={start}-{end}")));
        }
        let scope = reference.scope("pull");
        let resp = self.send(host, &reference.domain, &scope, &req).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp =
            expect_status(resp, &req, &[StatusCode::OK, StatusCode::PARTIAL_CONTENT]).await?;
        let mut context = req.describe();
        if let Some((start, end)) = range {
            context.push_str(&format!(
                " (bytes {start}-{})",
                end.map(|e| e.to_string()).unwrap_or_default()
            ));
        }
        Ok(Some((resp, context)))
    }

    /// Fetches a manifest or index whole, verified. One whose descriptor is bigger than
    /// [`MAX_MANIFEST_BYTES`] is refused before anything is asked of the registry; a registry
    /// sending more than the descriptor's size is cut off there.
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
        desc: &Descriptor,
    ) -> Result<Vec<u8>> {
        if desc.size > MAX_MANIFEST_BYTES {
            return Err(Error::Protocol {
                context: format!(
                    "fetching {} {} of {reference}",
                    desc.media_type, desc.digest
                ),
                reason: format!(
                    "its descriptor says {} bytes, over the bound of {MAX_MANIFEST_BYTES} bytes \
                     on manifests and indexes; not fetched (no usable image has such a manifest: \
                     check what the registry serves under this reference)",
                    desc.size
                ),
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

    /// Whether the push host of `reference` has the blob `desc` in that repository (HEAD
    /// `blobs/<digest>` with the push scope, so the token fetched serves the upload too).
    pub async fn blob_exists(&self, reference: &Reference, desc: &Descriptor) -> Result<bool> {
        let host = self.push_host(reference)?;
        let scope = reference.scope("pull,push");
        let head = Req::new(
            Method::HEAD,
            format!(
                "{}/{}/blobs/{}",
                host.base_url(),
                reference.repository,
                desc.digest
            ),
        );
        let resp = self.send(&host, &reference.domain, &scope, &head).await?;
        exists_answer(resp, &head).await
    }

    /// Whether the push host has the manifest or index `desc` where a push of it would put it:
    /// under `reference`'s tag (the tag must point at `desc.digest`, checked with the
    /// `Docker-Content-Digest` header), or by digest for an untagged reference.
    pub async fn manifest_exists(&self, reference: &Reference, desc: &Descriptor) -> Result<bool> {
        let host = self.push_host(reference)?;
        let scope = reference.scope("pull,push");
        let object = manifest_object(reference, desc);
        let mut head = Req::new(
            Method::HEAD,
            format!(
                "{}/{}/manifests/{object}",
                host.base_url(),
                reference.repository
            ),
        );
        head.headers
            .push((ACCEPT, format!("{}, */*", desc.media_type)));
        let resp = self.send(&host, &reference.domain, &scope, &head).await?;
        let tagged = header(resp.headers(), "docker-content-digest");
        if !exists_answer(resp, &head).await? {
            return Ok(false);
        }
        if object == desc.digest.as_str() {
            return Ok(true);
        }
        Ok(tagged.as_deref() == Some(desc.digest.as_str()))
    }

    /// Starts the upload of `digest` to `reference`'s repository (POST `blobs/uploads/`).
    /// With `mount_from` (another repository of the same registry said to hold the blob), asks
    /// for a cross-repository mount first: the registry answers 201 when it linked the blob
    /// ([`UploadStart::Mounted`]: nothing to send), else it opens an upload session as
    /// without it.
    pub async fn start_upload(
        &self,
        reference: &Reference,
        digest: &Digest,
        mount_from: Option<&str>,
    ) -> Result<UploadStart> {
        let host = self.push_host(reference)?;
        let scope = reference.scope("pull,push");
        let base = format!(
            "{}/{}/blobs/uploads/",
            host.base_url(),
            reference.repository
        );
        let mut resp = None;
        if let Some(from) = mount_from.filter(|f| *f != reference.repository) {
            let mut url = Url::parse(&base).map_err(|e| Error::Protocol {
                context: format!("POST {base}"),
                reason: format!("not a URL: {e}"),
            })?;
            url.query_pairs_mut()
                .append_pair("mount", digest.as_str())
                .append_pair("from", from);
            let post = Req::new(Method::POST, url.to_string());
            match self.send(&host, &reference.domain, &scope, &post).await {
                Ok(r) if r.status() == StatusCode::CREATED => return Ok(UploadStart::Mounted),
                Ok(r) if r.status() == StatusCode::ACCEPTED => resp = Some((r, post)),
                // A repository we may not read: upload instead, as containerd does.
                Ok(r) => {
                    tracing::debug!(from, status = %r.status(), "cross-repository mount refused; uploading");
                }
                Err(e @ Error::Unauthorized { .. }) => {
                    tracing::debug!(from, error = %e, "cross-repository mount refused; uploading");
                }
                Err(e) => return Err(e),
            }
        }
        let (resp, post) = match resp {
            Some(r) => r,
            None => {
                let post = Req::new(Method::POST, base);
                let resp = self.send(&host, &reference.domain, &scope, &post).await?;
                (resp, post)
            }
        };
        if resp.status() == StatusCode::CREATED {
            return Ok(UploadStart::Mounted);
        }
        let resp = expect_status(resp, &post, &[StatusCode::ACCEPTED]).await?;
        let location = upload_location(&resp, &post)?;
        Ok(UploadStart::Session(Box::new(BlobUpload {
            host,
            domain: reference.domain.clone(),
            scope,
            location,
            offset: 0,
        })))
    }

    /// Sends the next `data` of an upload session (PATCH with `Content-Range`), so a big blob
    /// goes up in bounded pieces, each re-sendable after an authentication round.
    pub async fn upload_chunk(&self, upload: &mut BlobUpload, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = upload.offset + data.len() as u64 - 1;
        let mut patch = Req::new(Method::PATCH, upload.location.to_string());
        patch
            .headers
            .push((CONTENT_TYPE, "application/octet-stream".to_string()));
        patch
            .headers
            .push((CONTENT_RANGE, format!("{}-{end}", upload.offset)));
        let len = data.len() as u64;
        patch.body = Some(data);
        let resp = self
            .send(&upload.host, &upload.domain, &upload.scope, &patch)
            .await?;
        let resp = expect_status(
            resp,
            &patch,
            &[StatusCode::ACCEPTED, StatusCode::NO_CONTENT],
        )
        .await?;
        if header(resp.headers(), LOCATION).is_some() {
            upload.location = upload_location(&resp, &patch)?;
        }
        upload.offset += len;
        Ok(())
    }

    /// Ends an upload session with the rest of the blob (`last`, possibly empty): PUT
    /// `?digest=`, after which the registry has verified the whole blob against `desc`.
    pub async fn finish_upload(
        &self,
        upload: BlobUpload,
        desc: &Descriptor,
        last: Bytes,
    ) -> Result<()> {
        let sent = upload.offset + last.len() as u64;
        if sent != desc.size {
            return Err(Error::SizeMismatch {
                digest: desc.digest.to_string(),
                expected: desc.size,
                actual: sent,
            });
        }
        let mut url = upload.location.clone();
        url.query_pairs_mut()
            .append_pair("digest", desc.digest.as_str());
        let mut put = Req::new(Method::PUT, url.to_string());
        put.headers
            .push((CONTENT_TYPE, "application/octet-stream".to_string()));
        put.body = Some(last);
        let resp = self
            .send(&upload.host, &upload.domain, &upload.scope, &put)
            .await?;
        // 201 is the specified answer; some registries send 200, 202 or 204.
        let resp = expect_status(
            resp,
            &put,
            &[
                StatusCode::CREATED,
                StatusCode::OK,
                StatusCode::ACCEPTED,
                StatusCode::NO_CONTENT,
            ],
        )
        .await?;
        if let Some(got) = header(resp.headers(), "docker-content-digest")
            && got != desc.digest.as_str()
        {
            return Err(Error::DigestMismatch {
                expected: desc.digest.to_string(),
                actual: got,
            });
        }
        Ok(())
    }

    /// Pushes a blob unless the repository has it already (HEAD first), in one PUT. Returns
    /// whether it was uploaded. `data` must match `desc`.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        data: Bytes,
    ) -> Result<bool> {
        check_content(desc, &data)?;
        if self.blob_exists(reference, desc).await? {
            return Ok(false);
        }
        match self.start_upload(reference, &desc.digest, None).await? {
            UploadStart::Mounted => Ok(false),
            UploadStart::Session(upload) => {
                self.finish_upload(*upload, desc, data).await?;
                Ok(true)
            }
        }
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
        let object = manifest_object(reference, desc);
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
        expect_status(
            resp,
            &put,
            &[
                StatusCode::CREATED,
                StatusCode::OK,
                StatusCode::ACCEPTED,
                StatusCode::NO_CONTENT,
            ],
        )
        .await?;
        Ok(())
    }
}

/// How [`Client::start_upload`] went.
#[derive(Debug)]
pub enum UploadStart {
    /// The registry mounted the blob from the other repository: nothing to send.
    Mounted,
    /// An upload session to feed.
    Session(Box<BlobUpload>),
}

/// An open blob upload session (the distribution API's upload `Location`): feed it in order
/// with [`Client::upload_chunk`] and end it with [`Client::finish_upload`]. Dropping it leaves
/// the session to the registry's upload purging.
#[derive(Debug)]
pub struct BlobUpload {
    host: RegistryHost,
    domain: String,
    scope: String,
    location: Url,
    offset: u64,
}

impl BlobUpload {
    /// Bytes sent so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// Where a manifest push puts `desc`: the reference's tag, else its digest.
fn manifest_object(reference: &Reference, desc: &Descriptor) -> String {
    reference
        .tag
        .clone()
        .unwrap_or_else(|| desc.digest.to_string())
}

/// 200 is "there", 404 "not there"; anything else is an error naming the request.
async fn exists_answer(resp: reqwest::Response, req: &Req) -> Result<bool> {
    match resp.status() {
        StatusCode::OK => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        _ => expect_status(resp, req, &[StatusCode::OK])
            .await
            .map(|_| true),
    }
}

/// The absolute upload URL of a 202 (a relative `Location` is relative to the request).
fn upload_location(resp: &reqwest::Response, req: &Req) -> Result<Url> {
    let location = header(resp.headers(), LOCATION).ok_or_else(|| Error::Protocol {
        context: req.describe(),
        reason: "the registry answered without a Location for the upload".into(),
    })?;
    Url::parse(&req.url)
        .and_then(|u| u.join(&location))
        .map_err(|e| Error::Protocol {
            context: req.describe(),
            reason: format!("upload Location {location:?} is not a URL: {e}"),
        })
}

/// Where a fetch starts.
#[derive(Debug, Clone, Default)]
pub enum Prefix {
    /// At the first byte.
    #[default]
    None,
    /// After bytes the caller holds, with the hash of exactly those bytes: the stream verifies
    /// the whole blob's digest.
    Hashed(Resume),
    /// After this many bytes the caller holds and verifies itself (a content store writer
    /// re-hashes its ingest when reopened): the stream checks the size, and the digest only
    /// when the registry ignores `Range` and sends every byte
    /// ([`BlobStream::verifies_digest`]).
    Held(u64),
}

impl Prefix {
    /// Bytes of the content before the fetch's start.
    pub fn offset(&self) -> u64 {
        match self {
            Prefix::None => 0,
            Prefix::Hashed(r) => r.offset,
            Prefix::Held(n) => *n,
        }
    }
}

/// How [`Client::fetch_with`] fetches.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Where to start.
    pub prefix: Prefix,
    /// Parallel ranged parts for blobs bigger than the buffer; with it, even a blob fetched
    /// in one stream takes a request slot of its limiter.
    pub multipart: Option<Multipart>,
}

/// Where a fetched stream's bytes come from.
#[derive(Debug)]
pub(crate) enum Source {
    /// One response, holding a request slot of a [`Multipart`] limiter when there is one.
    Single {
        resp: reqwest::Response,
        permit: Option<OwnedSemaphorePermit>,
    },
    /// Ranged parts stitched in order.
    Ranged(ranged::Chunks),
}

/// A fetched blob or manifest, verified while it streams. Read it with [`BlobStream::chunk`]
/// until `Ok(None)`: that last call is the verification (size and digest), so commit what
/// was read only after it.
#[derive(Debug)]
pub struct BlobStream {
    source: Source,
    /// `None` when the prefix was not hashed here ([`Prefix::Held`]).
    hasher: Option<Sha256>,
    /// Whether bytes skipped (a `Range` the registry ignored) go into the hasher.
    hash_skipped: bool,
    desc: Descriptor,
    received: u64,
    skip: u64,
    done: bool,
    context: String,
}

/// A read failure, before it is described with the stream's position.
enum Broken {
    Transport(reqwest::Error),
    Other(Error),
}

impl BlobStream {
    /// A stream over `source`, which started at `prefix`'s offset when `partial` (the
    /// registry answered the `Range`), else at the blob's first byte.
    pub(crate) fn new(
        source: Source,
        desc: &Descriptor,
        prefix: Prefix,
        partial: bool,
        context: String,
    ) -> BlobStream {
        let (hasher, received, skip, hash_skipped) = match prefix {
            Prefix::None => (Some(Sha256::new()), 0, 0, false),
            Prefix::Hashed(r) if partial => (Some(r.hasher), r.offset, 0, false),
            Prefix::Hashed(r) => (Some(r.hasher), r.offset, r.offset, false),
            Prefix::Held(n) if partial => (None, n, 0, false),
            // Every byte comes again: hash them all, so the digest is checked after all.
            Prefix::Held(n) => (Some(Sha256::new()), n, n, true),
        };
        BlobStream {
            source,
            hasher,
            hash_skipped,
            desc: desc.clone(),
            received,
            skip,
            done: false,
            context,
        }
    }

    /// Bytes of the blob accounted for so far (the resumed prefix included).
    pub fn offset(&self) -> u64 {
        self.received
    }

    /// The descriptor being fetched.
    pub fn descriptor(&self) -> &Descriptor {
        &self.desc
    }

    /// Whether the end of the stream checks the digest (not when it resumed after a
    /// [`Prefix::Held`] prefix: the holder of those bytes checks it).
    pub fn verifies_digest(&self) -> bool {
        self.hasher.is_some()
    }

    /// The next chunk; `Ok(None)` once everything arrived and matched the size and, when
    /// [`BlobStream::verifies_digest`], the digest. A transport failure is [`Error::Http`]
    /// saying how far the stream got.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.done {
                return Ok(None);
            }
            let next = match &mut self.source {
                Source::Single { resp, .. } => resp.chunk().await.map_err(Broken::Transport),
                Source::Ranged(parts) => parts.next().await.map_err(Broken::Other),
            };
            let next = match next {
                Ok(next) => next,
                Err(broken) => {
                    self.done = true;
                    return Err(match broken {
                        Broken::Transport(source) => Error::Http {
                            context: format!(
                                "{} broke off after {} of the {} bytes of {}",
                                self.context, self.received, self.desc.size, self.desc.digest
                            ),
                            source,
                        },
                        Broken::Other(e) => e,
                    });
                }
            };
            let Some(mut b) = next else {
                self.done = true;
                // The request slot is free as soon as the body is read.
                if let Source::Single { permit, .. } = &mut self.source {
                    permit.take();
                }
                if self.received != self.desc.size || self.skip > 0 {
                    return Err(Error::SizeMismatch {
                        digest: self.desc.digest.to_string(),
                        expected: self.desc.size,
                        actual: self.received,
                    });
                }
                if let Some(hasher) = &self.hasher {
                    let actual = Digest::from_hasher(hasher.clone());
                    if actual != self.desc.digest {
                        return Err(Error::DigestMismatch {
                            expected: self.desc.digest.to_string(),
                            actual: actual.to_string(),
                        });
                    }
                }
                return Ok(None);
            };
            if self.skip > 0 {
                let n = (self.skip as usize).min(b.len());
                if self.hash_skipped
                    && let Some(hasher) = &mut self.hasher
                {
                    hasher.update(&b[..n]);
                }
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
            if let Some(hasher) = &mut self.hasher {
                hasher.update(&b);
            }
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

/// An offset past the end cannot be resumed from.
fn check_offset(desc: &Descriptor, offset: u64) -> Result<()> {
    if offset > desc.size {
        return Err(Error::SizeMismatch {
            digest: desc.digest.to_string(),
            expected: desc.size,
            actual: offset,
        });
    }
    Ok(())
}

/// No host of `reference`'s registry has `desc`.
pub(crate) fn not_found(reference: &Reference, desc: &Descriptor) -> Error {
    Error::NotFound {
        registry: reference.domain.clone(),
        what: format!("{}@{}", reference.repository, desc.digest),
    }
}

/// `Content-Range: bytes <start>-<end>/<total or *>` as (start, end, total).
pub(crate) fn content_range(h: &reqwest::header::HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let v = header(h, CONTENT_RANGE)?;
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    Some((
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok(),
    ))
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

/// Reads a manifest body, giving up as soon as it passes `limit` bytes (a `Content-Length`
/// over it is refused before reading).
async fn read_limited(mut resp: reqwest::Response, req: &Req, limit: u64) -> Result<Vec<u8>> {
    let too_big = |what: String| Error::Protocol {
        context: req.describe(),
        reason: format!(
            "the manifest is {what}, over the bound of {limit} bytes on manifests and indexes; \
             not read further (no usable image has such a manifest: check what the registry \
             serves under this reference)"
        ),
    };
    if let Some(len) = resp.content_length().filter(|len| *len > limit) {
        return Err(too_big(format!("{len} bytes")));
    }
    let mut out = Vec::new();
    while let Some(b) = resp.chunk().await.map_err(|e| Error::Http {
        context: req.describe(),
        source: e,
    })? {
        out.extend_from_slice(&b);
        if out.len() as u64 > limit {
            return Err(too_big(format!("more than {limit} bytes")));
        }
    }
    Ok(out)
}

/// What a token is asked for.
struct TokenRequest<'a> {
    /// The token endpoint (the challenge's `realm`).
    realm: &'a str,
    /// The challenge's `service`.
    service: &'a str,
    /// The scope wanted.
    scope: &'a str,
    /// The registry domain, for errors.
    registry: &'a str,
}

/// Fetches a bearer token for `scope` from `realm` (GET, Docker's token protocol; basic
/// credentials when configured). Dumped and traced as `opts` say, the tokens in the answer
/// redacted.
async fn fetch_token(
    http: &reqwest::Client,
    TokenRequest {
        realm,
        service,
        scope,
        registry,
    }: TokenRequest<'_>,
    creds: Option<&Credentials>,
    opts: &ClientOptions,
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
    let token_error = |e| Error::Http {
        context: format!("fetching a token from {realm}"),
        source: e,
    };
    let request = rb.build().map_err(token_error)?;
    let resp = debug::execute(
        http,
        request,
        registry,
        opts.http_dump.as_ref(),
        opts.http_trace,
    )
    .await
    .map_err(token_error)?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| Error::Http {
        context: format!("reading the token from {realm}"),
        source: e,
    })?;
    if let Some(dump) = &opts.http_dump {
        dump.write(format!(
            "(token response body from {realm})\r\n{}\r\n\r\n",
            debug::redact_json(&body)
        ));
    }
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
