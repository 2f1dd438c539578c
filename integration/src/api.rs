//! `containerd-client` helpers for the content, leases and events services: the content write
//! protocol (STAT / WRITE / COMMIT, as containerd's own proxy writer speaks it), reads, listings,
//! lease management, a deterministic garbage collection trigger, an event watcher with
//! barriers, SHA-256 digests and a small seeded random generator.
//!
//! Every call takes the namespace explicitly and, where containerd honours it, an optional
//! lease sent in the `containerd-lease` header.
//!
//! The functions return `tonic::Status` errors untouched so tests can assert the exact code.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::{
    AbortRequest, AddResourceRequest, CreateRequest, DeleteContentRequest, DeleteRequest,
    DeleteResourceRequest, Info, InfoRequest, Lease, ListContentRequest, ListRequest,
    ListResourcesRequest, ListStatusesRequest, PublishRequest, ReadContentRequest, Resource,
    Status as IngestStatus, SubscribeRequest, UpdateRequest, WriteAction, WriteContentRequest,
    WriteContentResponse,
};
use containerd_client::types::Envelope;
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

use crate::NAMESPACE_HEADER;

/// The gRPC metadata key carrying the lease that whatever a call creates joins.
pub const LEASE_HEADER: &str = "containerd-lease";

/// Lease label: the lease stops being a GC root after this RFC 3339 time.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
/// Lease label: the lease holds only what it lists (labels of leased objects are not followed).
pub const LABEL_GC_FLAT: &str = "containerd.io/gc.flat";
/// Object label: the object is a GC root.
pub const LABEL_GC_ROOT: &str = "containerd.io/gc.root";
/// Object label prefix: `containerd.io/gc.ref.content[.<anything>]` = a digest this object
/// keeps alive.
pub const LABEL_GC_REF_CONTENT: &str = "containerd.io/gc.ref.content";

/// The largest chunk one WRITE message carries (well under the 16 MiB message limit).
pub const WRITE_CHUNK: usize = 1 << 20;

/// Wraps `msg` in a request carrying the namespace and, when given, the lease header.
pub fn request<T>(msg: T, ns: &str, lease: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    let md = req.metadata_mut();
    if let Ok(v) = ns.parse() {
        md.insert(NAMESPACE_HEADER, v);
    }
    if let Some(lease) = lease
        && let Ok(v) = lease.parse()
    {
        md.insert(LEASE_HEADER, v);
    }
    req
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// `sha256:<hex>` of `data`, as containerd writes digests.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// An incremental SHA-256 producing `sha256:<hex>`.
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Hasher(Sha256::new())
    }
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// `sha256:<hex>` of everything fed.
    pub fn digest(self) -> String {
        format!("sha256:{}", hex(&self.0.finalize()))
    }
}

/// A small, fast, seeded pseudo-random generator (xorshift64*). Not for cryptography: it makes
/// test data and schedules reproducible from a printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced by a constant).
    pub fn new(seed: u64) -> Self {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// A seed from the clock and the process id, for tests that print it.
    pub fn seed_from_time() -> u64 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        nanos ^ (u64::from(std::process::id()) << 32)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// One open `Content.Write` session, spoken like containerd's proxy writer: every message gets
/// exactly one reply, WRITE and COMMIT carry the client's offset.
pub struct ContentWriter {
    tx: Option<mpsc::Sender<WriteContentRequest>>,
    rx: Streaming<WriteContentResponse>,
    /// The committed size as the server last reported it (where the next WRITE goes).
    pub offset: i64,
    /// The reply to the opening STAT.
    pub opened: WriteContentResponse,
}

impl ContentWriter {
    /// Opens a session on `reference` with a STAT carrying the expected `total` (0: unknown) and
    /// `expected` digest ("" for unknown). An ingest already holding data resumes: see
    /// [`ContentWriter::offset`]. A blob that already exists under `expected` is AlreadyExists;
    /// a reference another session holds is Unavailable.
    pub async fn open(
        ch: Channel,
        ns: &str,
        lease: Option<&str>,
        reference: &str,
        total: i64,
        expected: &str,
    ) -> Result<ContentWriter, Status> {
        let (tx, rx) = mpsc::channel(4);
        let stat = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.to_string(),
            total,
            expected: expected.to_string(),
            ..Default::default()
        };
        tx.send(stat)
            .await
            .map_err(|_| Status::internal("write channel closed"))?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut rx = ContentClient::new(ch)
            .write(request(stream, ns, lease))
            .await?
            .into_inner();
        let opened = rx
            .message()
            .await?
            .ok_or_else(|| Status::internal("Write stream ended without a reply to STAT"))?;
        Ok(ContentWriter {
            tx: Some(tx),
            rx,
            offset: opened.offset,
            opened,
        })
    }

    /// Sends one message and waits for its reply.
    pub async fn exchange(
        &mut self,
        req: WriteContentRequest,
    ) -> Result<WriteContentResponse, Status> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Status::internal("the write session is closed"))?;
        if tx.send(req).await.is_err() {
            // The server ended the stream: its status is what the caller wants.
            return Err(match self.rx.message().await {
                Err(s) => s,
                Ok(_) => Status::internal("the server closed the write stream"),
            });
        }
        let resp = self
            .rx
            .message()
            .await?
            .ok_or_else(|| Status::internal("Write stream ended without a reply"))?;
        self.offset = resp.offset;
        Ok(resp)
    }

    /// A STAT on the open session.
    pub async fn stat(&mut self) -> Result<WriteContentResponse, Status> {
        self.exchange(WriteContentRequest {
            action: WriteAction::Stat as i32,
            ..Default::default()
        })
        .await
    }

    /// WRITE `data` at the current offset, in chunks of at most [`WRITE_CHUNK`]; returns the new
    /// offset.
    pub async fn write(&mut self, data: &[u8]) -> Result<i64, Status> {
        for chunk in data.chunks(WRITE_CHUNK) {
            let offset = self.offset;
            self.exchange(WriteContentRequest {
                action: WriteAction::Write as i32,
                offset,
                data: chunk.to_vec(),
                ..Default::default()
            })
            .await?;
        }
        Ok(self.offset)
    }

    /// WRITE one message at an explicit `offset` (to test OutOfRange and truncation).
    pub async fn write_at(
        &mut self,
        offset: i64,
        data: &[u8],
    ) -> Result<WriteContentResponse, Status> {
        self.exchange(WriteContentRequest {
            action: WriteAction::Write as i32,
            offset,
            data: data.to_vec(),
            ..Default::default()
        })
        .await
    }

    /// COMMIT at the current offset with the expected `total` and `expected` digest and the
    /// blob's `labels`. Ends the session.
    pub async fn commit(
        &mut self,
        total: i64,
        expected: &str,
        labels: &[(&str, &str)],
    ) -> Result<WriteContentResponse, Status> {
        let offset = self.offset;
        let resp = self
            .exchange(WriteContentRequest {
                action: WriteAction::Commit as i32,
                offset,
                total,
                expected: expected.to_string(),
                labels: label_map(labels),
                ..Default::default()
            })
            .await;
        self.close();
        resp
    }

    /// Ends the client side of the stream (the server keeps the ingest).
    pub fn close(&mut self) {
        self.tx = None;
    }
}

/// How a [`write_blob`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The blob was committed by this call.
    Committed,
    /// The blob was already there (AlreadyExists at STAT or at COMMIT).
    Existed,
}

/// Writes `data` as one blob through a Write session on `reference` (STAT with size and digest,
/// WRITEs, COMMIT with `labels`), under `lease` if given. AlreadyExists is [`Written::Existed`].
pub async fn write_blob(
    ch: &Channel,
    ns: &str,
    lease: Option<&str>,
    reference: &str,
    data: &[u8],
    labels: &[(&str, &str)],
) -> Result<Written, Status> {
    let dgst = sha256_digest(data);
    let total = data.len() as i64;
    let mut w = match ContentWriter::open(ch.clone(), ns, lease, reference, total, &dgst).await {
        Ok(w) => w,
        Err(s) if s.code() == Code::AlreadyExists => return Ok(Written::Existed),
        Err(s) => return Err(s),
    };
    if w.offset > total {
        return Err(Status::internal(format!(
            "ingest {reference} is at {} beyond the blob's {total} bytes",
            w.offset
        )));
    }
    let start = w.offset as usize;
    w.write(&data[start..]).await?;
    match w.commit(total, &dgst, labels).await {
        Ok(resp) if resp.digest == dgst => Ok(Written::Committed),
        Ok(resp) => Err(Status::internal(format!(
            "commit of {reference} answered digest {:?}, expected {dgst}",
            resp.digest
        ))),
        Err(s) if s.code() == Code::AlreadyExists => Ok(Written::Existed),
        Err(s) => Err(s),
    }
}

/// Reads a whole blob.
pub async fn read_blob(ch: &Channel, ns: &str, digest: &str) -> Result<Vec<u8>, Status> {
    read_range(ch, ns, digest, 0, 0).await
}

/// Reads `size` bytes (0: to the end) from `offset`.
pub async fn read_range(
    ch: &Channel,
    ns: &str,
    digest: &str,
    offset: i64,
    size: i64,
) -> Result<Vec<u8>, Status> {
    let mut s = ContentClient::new(ch.clone())
        .read(request(
            ReadContentRequest {
                digest: digest.to_string(),
                offset,
                size,
            },
            ns,
            None,
        ))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

/// Content.Info.
pub async fn info(ch: &Channel, ns: &str, digest: &str) -> Result<Info, Status> {
    ContentClient::new(ch.clone())
        .info(request(
            InfoRequest {
                digest: digest.to_string(),
            },
            ns,
            None,
        ))
        .await?
        .into_inner()
        .info
        .ok_or_else(|| Status::internal("Info reply without info"))
}

/// Whether Info finds `digest` in `ns` (NotFound is `false`, other errors are errors).
pub async fn blob_exists(ch: &Channel, ns: &str, digest: &str) -> Result<bool, Status> {
    match info(ch, ns, digest).await {
        Ok(_) => Ok(true),
        Err(s) if s.code() == Code::NotFound => Ok(false),
        Err(s) => Err(s),
    }
}

/// Content.List with `filters`, all pages of the stream.
pub async fn list_blobs(ch: &Channel, ns: &str, filters: &[&str]) -> Result<Vec<Info>, Status> {
    let mut s = ContentClient::new(ch.clone())
        .list(request(
            ListContentRequest {
                filters: filters.iter().map(|f| f.to_string()).collect(),
            },
            ns,
            None,
        ))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend(m.info);
    }
    Ok(out)
}

/// The sorted digests of Content.List.
pub async fn list_digests(ch: &Channel, ns: &str) -> Result<Vec<String>, Status> {
    let mut v: Vec<String> = list_blobs(ch, ns, &[])
        .await?
        .into_iter()
        .map(|i| i.digest)
        .collect();
    v.sort();
    Ok(v)
}

/// Content.Update of the labels named in `mask` (`labels.<key>` paths are built from the keys).
pub async fn update_labels(
    ch: &Channel,
    ns: &str,
    digest: &str,
    labels: &[(&str, &str)],
    mask_keys: &[&str],
) -> Result<Info, Status> {
    ContentClient::new(ch.clone())
        .update(request(
            UpdateRequest {
                info: Some(Info {
                    digest: digest.to_string(),
                    labels: label_map(labels),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: mask_keys.iter().map(|k| format!("labels.{k}")).collect(),
                }),
            },
            ns,
            None,
        ))
        .await?
        .into_inner()
        .info
        .ok_or_else(|| Status::internal("Update reply without info"))
}

/// Content.Delete.
pub async fn delete_blob(ch: &Channel, ns: &str, digest: &str) -> Result<(), Status> {
    ContentClient::new(ch.clone())
        .delete(request(
            DeleteContentRequest {
                digest: digest.to_string(),
            },
            ns,
            None,
        ))
        .await
        .map(|_| ())
}

/// Content.ListStatuses (the active ingests) with `filters`, sorted by ref.
pub async fn list_statuses(
    ch: &Channel,
    ns: &str,
    filters: &[&str],
) -> Result<Vec<IngestStatus>, Status> {
    let mut v = ContentClient::new(ch.clone())
        .list_statuses(request(
            ListStatusesRequest {
                filters: filters.iter().map(|f| f.to_string()).collect(),
            },
            ns,
            None,
        ))
        .await?
        .into_inner()
        .statuses;
    v.sort_by(|a, b| a.r#ref.cmp(&b.r#ref));
    Ok(v)
}

/// The active ingests as `ref -> offset`.
pub async fn active_offsets(ch: &Channel, ns: &str) -> Result<HashMap<String, i64>, Status> {
    Ok(list_statuses(ch, ns, &[])
        .await?
        .into_iter()
        .map(|s| (s.r#ref, s.offset))
        .collect())
}

/// Content.Abort.
pub async fn abort_ingest(ch: &Channel, ns: &str, reference: &str) -> Result<(), Status> {
    ContentClient::new(ch.clone())
        .abort(request(
            AbortRequest {
                r#ref: reference.to_string(),
            },
            ns,
            None,
        ))
        .await
        .map(|_| ())
}

/// Leases.Create (`id` "" lets the server pick one).
pub async fn create_lease(
    ch: &Channel,
    ns: &str,
    id: &str,
    labels: &[(&str, &str)],
) -> Result<Lease, Status> {
    LeasesClient::new(ch.clone())
        .create(request(
            CreateRequest {
                id: id.to_string(),
                labels: label_map(labels),
            },
            ns,
            None,
        ))
        .await?
        .into_inner()
        .lease
        .ok_or_else(|| Status::internal("Create reply without lease"))
}

/// Leases.Delete.
pub async fn delete_lease(ch: &Channel, ns: &str, id: &str, sync: bool) -> Result<(), Status> {
    LeasesClient::new(ch.clone())
        .delete(request(
            DeleteRequest {
                id: id.to_string(),
                sync,
            },
            ns,
            None,
        ))
        .await
        .map(|_| ())
}

/// Leases.List with `filters`, sorted by id.
pub async fn list_leases(ch: &Channel, ns: &str, filters: &[&str]) -> Result<Vec<Lease>, Status> {
    let mut v = LeasesClient::new(ch.clone())
        .list(request(
            ListRequest {
                filters: filters.iter().map(|f| f.to_string()).collect(),
            },
            ns,
            None,
        ))
        .await?
        .into_inner()
        .leases;
    v.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(v)
}

/// A lease resource.
pub fn resource(kind: &str, id: &str) -> Resource {
    Resource {
        id: id.to_string(),
        r#type: kind.to_string(),
    }
}

/// Leases.AddResource.
pub async fn add_resource(ch: &Channel, ns: &str, lease: &str, r: Resource) -> Result<(), Status> {
    LeasesClient::new(ch.clone())
        .add_resource(request(
            AddResourceRequest {
                id: lease.to_string(),
                resource: Some(r),
            },
            ns,
            None,
        ))
        .await
        .map(|_| ())
}

/// Leases.DeleteResource.
pub async fn delete_resource(
    ch: &Channel,
    ns: &str,
    lease: &str,
    r: Resource,
) -> Result<(), Status> {
    LeasesClient::new(ch.clone())
        .delete_resource(request(
            DeleteResourceRequest {
                id: lease.to_string(),
                resource: Some(r),
            },
            ns,
            None,
        ))
        .await
        .map(|_| ())
}

/// Leases.ListResources as sorted `(type, id)` pairs.
pub async fn list_resources(
    ch: &Channel,
    ns: &str,
    lease: &str,
) -> Result<Vec<(String, String)>, Status> {
    let mut v: Vec<(String, String)> = LeasesClient::new(ch.clone())
        .list_resources(request(
            ListResourcesRequest {
                id: lease.to_string(),
            },
            ns,
            None,
        ))
        .await?
        .into_inner()
        .resources
        .into_iter()
        .map(|r| (r.r#type, r.id))
        .collect();
    v.sort();
    Ok(v)
}

/// Runs one garbage collection and waits for it: creates a throwaway lease in `ns` and deletes
/// it with `sync` (containerd and berthd both return from a sync delete only after a collection).
pub async fn collect_garbage(ch: &Channel, ns: &str) -> Result<(), Status> {
    let id = format!("gc-trigger-{}", Rng::new(Rng::seed_from_time()).next_u64());
    create_lease(ch, ns, &id, &[]).await?;
    delete_lease(ch, ns, &id, true).await
}

/// An RFC 3339 UTC timestamp `secs` seconds from now (negative: in the past), as lease
/// expirations are written.
pub fn rfc3339_from_now(secs: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339(now + secs)
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let rem = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Labels as the map the protos carry.
pub fn label_map(labels: &[(&str, &str)]) -> HashMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The topic of the marker events an [`EventWatch`] publishes to find where a step's events end.
pub const MARK_TOPIC: &str = "/berth-test/mark";

/// An Events.Subscribe stream with barriers: [`EventWatch::mark`] publishes a uniquely named
/// marker event and returns every other event received before it, so a test can tell exactly
/// which events a step produced (events from one publisher arrive in order).
pub struct EventWatch {
    ch: Channel,
    ns: String,
    rx: mpsc::UnboundedReceiver<Result<Envelope, Status>>,
    task: tokio::task::JoinHandle<()>,
    seq: u64,
    tag: u64,
}

impl EventWatch {
    /// Subscribes with `filters` (ORed; the marker topic is added) and waits until the
    /// subscription is live (a marker published in `ns` comes back).
    pub async fn subscribe(ch: &Channel, ns: &str, filters: &[&str]) -> Result<Self, Status> {
        let mut all: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        all.push(format!("topic==\"{MARK_TOPIC}\""));
        let (tx, rx) = mpsc::unbounded_channel();
        let client_ch = ch.clone();
        // Subscribe's response headers may only come with the first event, so the stream is
        // opened in its own task.
        let task = tokio::spawn(async move {
            let resp = EventsClient::new(client_ch)
                .subscribe(SubscribeRequest { filters: all })
                .await;
            let mut stream = match resp {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    let _ = tx.send(Err(s));
                    return;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(e)) => {
                        if tx.send(Ok(e)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(s) => {
                        let _ = tx.send(Err(s));
                        return;
                    }
                }
            }
        });
        let mut w = EventWatch {
            ch: ch.clone(),
            ns: ns.to_string(),
            rx,
            task,
            seq: 0,
            tag: Rng::new(Rng::seed_from_time()).next_u64(),
        };
        // Publish markers until one arrives; markers of earlier attempts that arrive late are
        // ignored by later marks.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let name = w.publish_mark().await?;
            match w.collect_until(&name, Duration::from_millis(200)).await {
                Ok(_) => return Ok(w),
                Err(e) if e.code() == Code::DeadlineExceeded && Instant::now() < deadline => {}
                Err(e) => return Err(e),
            }
        }
    }

    async fn publish_mark(&mut self) -> Result<String, Status> {
        self.seq += 1;
        let name = format!("mark-{:x}-{}", self.tag, self.seq);
        publish_mark(&self.ch, &self.ns, &name).await?;
        Ok(name)
    }

    async fn collect_until(
        &mut self,
        mark: &str,
        timeout: Duration,
    ) -> Result<Vec<Envelope>, Status> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!("marker {mark} not received in {timeout:?}"))
                })?;
            let e = match next {
                Some(Ok(e)) => e,
                Some(Err(s)) => return Err(s),
                None => return Err(Status::internal("the event stream ended")),
            };
            if e.topic == MARK_TOPIC {
                let name = e
                    .event
                    .as_ref()
                    .and_then(|a| {
                        containerd_client::events::NamespaceUpdate::decode(a.value.as_slice()).ok()
                    })
                    .map(|u| u.name)
                    .unwrap_or_default();
                if name == mark {
                    return Ok(out);
                }
                continue;
            }
            out.push(e);
        }
    }

    /// Publishes a marker and returns every non-marker event received before it (waits up to
    /// 20 s for the marker).
    pub async fn mark(&mut self) -> Result<Vec<Envelope>, Status> {
        let name = self.publish_mark().await?;
        self.collect_until(&name, Duration::from_secs(20)).await
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Events.Publish of `event` on `topic` in namespace `ns`.
pub async fn publish(
    ch: &Channel,
    ns: &str,
    topic: &str,
    event: prost_types::Any,
) -> Result<(), Status> {
    EventsClient::new(ch.clone())
        .publish(request(
            PublishRequest {
                topic: topic.to_string(),
                event: Some(event),
            },
            ns,
            None,
        ))
        .await
        .map(|_| ())
}

/// Publishes a marker event on [`MARK_TOPIC`]: a `containerd.events.NamespaceUpdate` whose name
/// is `name` (a type every client, ctr 1.6 included, can decode and print).
pub async fn publish_mark(ch: &Channel, ns: &str, name: &str) -> Result<(), Status> {
    let event = containerd_client::to_any(&containerd_client::events::NamespaceUpdate {
        name: name.to_string(),
        labels: HashMap::new(),
    });
    publish(ch, ns, MARK_TOPIC, event).await
}

/// Decodes an event payload of type `M` from an envelope, checking the type URL (containerd
/// writes bare full names such as `containerd.events.ContentCreate`).
pub fn decode_event<M: prost::Message + prost::Name + Default>(e: &Envelope) -> Option<M> {
    let any = e.event.as_ref()?;
    let url = any.type_url.trim_start_matches('/');
    if url != M::full_name() && !url.ends_with(&format!("/{}", M::full_name())) {
        return None;
    }
    M::decode(any.value.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut h = Hasher::new();
        h.update(b"hel");
        h.update(b"lo\n");
        assert_eq!(h.digest(), sha256_digest(b"hello\n"));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn rng_is_seeded() {
        let a = Rng::new(7).bytes(33);
        assert_eq!(a, Rng::new(7).bytes(33));
        assert_ne!(a, Rng::new(8).bytes(33));
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            let v = r.range(5, 9);
            assert!((5..=9).contains(&v));
        }
        assert_eq!(Rng::new(3).below(0), 0);
    }

    #[test]
    fn headers() {
        let req = request((), "ns1", Some("l1"));
        assert_eq!(
            req.metadata()
                .get(NAMESPACE_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("ns1")
        );
        assert_eq!(
            req.metadata()
                .get(LEASE_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("l1")
        );
        assert!(
            request((), "ns1", None)
                .metadata()
                .get(LEASE_HEADER)
                .is_none()
        );
    }
}
