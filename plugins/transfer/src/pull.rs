//! Pulling an image from a registry into the stores (containerd's
//! `core/transfer/local/pull.go` with the `OCIRegistry` source).
//!
//! 1. The reference is resolved to the descriptor of its manifest or index.
//! 2. Everything after that happens under the transfer lease (the caller's, or one made for the
//!    pull and deleted at the end, see [`crate::import`]): whatever a failed pull wrote is held
//!    by nothing afterwards and garbage collection takes it.
//! 3. The index (if any) and manifests are fetched whole, stored, and labelled with
//!    `containerd.io/gc.ref.content.*` for their children, as import labels them. Of an index,
//!    [`PlatformSelection::All`] keeps every manifest; a platform list keeps the best match
//!    of each wanted platform (containerd limits a pull to one manifest per platform).
//! 4. Configs and layers are fetched into the content store, verified against their digest
//!    while streaming (and again by the store at commit), at most
//!    `max_concurrent_downloads` at a time. Blobs already stored are skipped (`already
//!    exists`). With `concurrent_layer_fetch_buffer` (>= 512 bytes), a blob bigger than it
//!    is fetched as parallel `Range` parts ([`registry::ranged`]), and then
//!    `max_concurrent_downloads` bounds the HTTP requests of the whole pull, as containerd
//!    does since PR 10177.
//! 5. Resume: an ingest an interrupted pull left under the blob's ref (`layer-<digest>`,
//!    ...) is continued from its offset with a `Range` request. The content store re-hashes
//!    an ingest when it is reopened, so the writer's digest covers the bytes already there and
//!    is checked against the blob's before commit (the stream checks the size, and the whole
//!    digest itself when the registry ignores `Range` and sends everything). A registry that
//!    refuses the range (416) gets the blob asked for from its start, the ingest truncated.
//!    An ingest whose fetch broke off (transport error, 5xx) is handed from the pull's lease
//!    to the store's 24-hour expiry for unleased ingests, so the lease's end does not let the
//!    garbage collector take what the next pull can resume from; a blob that failed
//!    verification has its ingest aborted instead, so nothing is committed under its digest
//!    and nothing wrong is resumed from.
//! 6. Manifests a target accepts are unpacked ([`crate::unpack`]), then the image record is
//!    written under the reference's full name, created or updated.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use berth_core::content::{CallContext, ContentStore, ContentWriter, Digest, WriterRequest};
use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::metadata::images::Image;
use berth_registry as registry;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::import::{Stores, with_lease};
use crate::media;
use crate::oci::{self, Descriptor};
use crate::platform::{Platform, PlatformSelection};
use crate::progress::{self, Progress, ProgressSink};
use crate::store;
use crate::unpack::{self, UnpackReport, UnpackTarget};

/// Progress event: the reference is being resolved.
pub const RESOLVING: &str = "resolving";
/// Progress event: the reference resolved to a descriptor.
pub const RESOLVED: &str = "resolved";
/// Status line ending a pull (containerd: `Completed pull from <source>`).
pub const COMPLETED_PULL: &str = "Completed pull";

/// How to pull (containerd's `OCIRegistry` source with an `ImageStore` destination).
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Which platforms' manifests of an index to fetch.
    pub platforms: PlatformSelection,
    /// Labels of the image record.
    pub labels: Labels,
    /// Blobs fetched at the same time (0 counts as 1); with multipart on, HTTP requests in
    /// flight at the same time.
    pub max_concurrent_downloads: u32,
    /// Bytes per ranged part of a multipart blob fetch; below 512 (0 included) multipart is
    /// off (containerd's `concurrent_layer_fetch_buffer`).
    pub concurrent_layer_fetch_buffer: u64,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platforms: PlatformSelection::host(),
            labels: Labels::new(),
            max_concurrent_downloads: 3,
            concurrent_layer_fetch_buffer: 0,
        }
    }
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The descriptor the reference resolved to (the image record's target).
    pub root: Descriptor,
    /// The image record written.
    pub image: Image,
    /// The manifests fetched.
    pub manifests: Vec<Descriptor>,
    /// The unpacks done.
    pub unpacked: Vec<UnpackReport>,
    /// Blobs fetched now (configs and layers; not those already stored).
    pub fetched: usize,
}

/// Pulls `reference` through `client` into the call's namespace (see the module
/// documentation).
pub async fn pull(
    stores: &Stores,
    cx: &CallContext,
    client: Arc<registry::Client>,
    reference: &str,
    options: &PullOptions,
    unpacks: &[UnpackTarget],
    progress: &dyn ProgressSink,
) -> Result<PullReport> {
    let ns = cx.require_namespace()?.clone();
    let parsed = registry::Reference::parse(reference).map_err(convert::registry_error)?;
    let name = parsed.to_string();
    progress.report(Progress::about(RESOLVING, name.clone(), 0, 0));
    let root = client
        .resolve(&parsed)
        .await
        .map_err(convert::registry_error)?;
    let root = convert::descriptor(&root)?;
    progress.report(Progress::about(RESOLVED, name.clone(), 0, 0).with_desc(root.clone()));
    let parsed = Arc::new(parsed);
    with_lease(stores, cx, |cx| async move {
        let content = stores.content.as_ref();
        let manifests =
            fetch_documents(content, &cx, &client, &parsed, &root, options, progress).await?;

        let mut blobs = Vec::new();
        let mut seen = HashSet::new();
        for manifest in &manifests {
            let bytes = store::read_document(content, &cx, &manifest.digest).await?;
            let m = oci::parse_manifest(&bytes, &manifest.digest)?;
            for blob in std::iter::once(m.config).chain(m.layers) {
                if seen.insert(blob.digest.clone()) {
                    blobs.push(blob);
                }
            }
        }
        // The unpack runs alongside the fetch: each layer is applied once its blob is stored
        // (and its parent committed), while later layers still download.
        let arrivals = unpack::Arrivals::new();
        let fetch = async {
            let fetched = fetch_blobs(
                stores, &cx, &client, &parsed, blobs, options, progress, &arrivals,
            )
            .await;
            if fetched.is_err() {
                // Nothing waits for a blob that will never come.
                arrivals.failed();
            }
            fetched
        };
        let unpack_all = async {
            let mut unpacked = Vec::new();
            if unpacks.is_empty() {
                return Ok(unpacked);
            }
            for manifest in &manifests {
                let (_, config) =
                    unpack::read_config_once_stored(content, &cx, manifest, Some(&arrivals))
                        .await?;
                if let Some(target) = unpacks.iter().find(|t| t.accepts(&config.platform)) {
                    unpacked.push(
                        unpack::unpack_as_fetched(
                            content, &cx, target, manifest, progress, &arrivals,
                        )
                        .await?,
                    );
                }
            }
            Ok::<_, Error>(unpacked)
        };
        // The fetch first: when a download fails, its error is the one reported (the unpack
        // waiting for that blob only stops).
        let (fetched, unpacked) = tokio::try_join!(fetch, unpack_all)?;

        let image = Image {
            name: name.clone(),
            labels: options.labels.clone(),
            target: root.to_core(),
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
        };
        let image = save_image(stores, &ns, &cx, image).await?;
        progress.report(
            Progress::about(progress::SAVED, image.name.clone(), 0, 0).with_desc(root.clone()),
        );
        progress.report(Progress::status(&format!(
            "{COMPLETED_PULL} from OCI Registry ({name})"
        )));
        Ok(PullReport {
            root,
            image,
            manifests,
            unpacked,
            fetched,
        })
    })
    .await
}

/// Creates the image record, or updates it when the name exists.
async fn save_image(
    stores: &Stores,
    ns: &berth_core::namespace::Namespace,
    cx: &CallContext,
    image: Image,
) -> Result<Image> {
    use berth_core::error::Classify as _;
    loop {
        match stores
            .metadata
            .create_image(ns, image.clone(), None, cx.lease.as_deref())
            .await
        {
            Ok(created) => return Ok(created),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
        match stores
            .metadata
            .update_image(ns, image.clone(), &[], None)
            .await
        {
            Ok(updated) => return Ok(updated),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Fetches the root document and, for an index, the manifests platform selection keeps;
/// stores and gc-labels each. Returns the manifests to fetch blobs of.
async fn fetch_documents(
    content: &dyn ContentStore,
    cx: &CallContext,
    client: &registry::Client,
    reference: &registry::Reference,
    root: &Descriptor,
    options: &PullOptions,
    progress: &dyn ProgressSink,
) -> Result<Vec<Descriptor>> {
    let mut manifests = Vec::new();
    let mut queue = vec![(root.clone(), true)];
    while let Some((desc, top)) = queue.pop() {
        let bytes = fetch_document(content, cx, client, reference, &desc, progress).await?;
        if media::is_index(&desc.media_type) {
            let index = oci::parse_index(&bytes, &desc.digest)?;
            store::set_labels(
                content,
                cx,
                &desc.digest,
                media::children_gc_labels(&index.manifests),
            )
            .await?;
            let kept = options.platforms.select_manifests(&index.manifests);
            if top && kept.is_empty() {
                return Err(Error::NoMatchingPlatform(options.platforms.to_string()));
            }
            queue.extend(kept.into_iter().rev().map(|m| (m, false)));
        } else if media::is_manifest(&desc.media_type) {
            let m = oci::parse_manifest(&bytes, &desc.digest)?;
            let mut children = vec![m.config.clone()];
            children.extend(m.layers.iter().cloned());
            store::set_labels(
                content,
                cx,
                &desc.digest,
                media::children_gc_labels(&children),
            )
            .await?;
            manifests.push(desc);
        } else {
            return Err(Error::InvalidBlob {
                what: "manifest",
                digest: desc.digest.clone(),
                reason: format!(
                    "media type {:?} is neither an index nor a manifest",
                    desc.media_type
                ),
            });
        }
    }
    if manifests.is_empty() {
        return Err(Error::NoMatchingPlatform(options.platforms.to_string()));
    }
    Ok(manifests)
}

/// Fetches an index or manifest whole and stores it (or reads the stored copy).
async fn fetch_document(
    content: &dyn ContentStore,
    cx: &CallContext,
    client: &registry::Client,
    reference: &registry::Reference,
    desc: &Descriptor,
    progress: &dyn ProgressSink,
) -> Result<Vec<u8>> {
    let key = progress::ref_key(desc);
    if store::exists(content, cx, &desc.digest).await? {
        progress.report(
            Progress::about(progress::ALREADY_EXISTS, key, desc.size, desc.size)
                .with_desc(desc.clone()),
        );
        return store::read_document(content, cx, &desc.digest).await;
    }
    let bytes = client
        .fetch_manifest(reference, &convert::registry_descriptor(desc)?)
        .await
        .map_err(convert::registry_error)?;
    store::write_blob(content, cx, key.clone(), &bytes).await?;
    progress.report(
        Progress::about(progress::COMPLETE, key, desc.size, desc.size).with_desc(desc.clone()),
    );
    Ok(bytes)
}

/// Fetches `blobs` not yet stored, `options.max_concurrent_downloads` at a time (and as
/// many requests at a time with multipart on), telling `arrivals` of each blob stored;
/// returns how many were fetched.
#[allow(clippy::too_many_arguments)]
async fn fetch_blobs(
    stores: &Stores,
    cx: &CallContext,
    client: &Arc<registry::Client>,
    reference: &Arc<registry::Reference>,
    blobs: Vec<Descriptor>,
    options: &PullOptions,
    progress: &dyn ProgressSink,
    arrivals: &unpack::Arrivals,
) -> Result<usize> {
    let limit = options.max_concurrent_downloads.max(1) as usize;
    let permits = Arc::new(Semaphore::new(limit));
    // One limiter for every request of the pull: clones of one value share it.
    let multipart = registry::Multipart::new(options.concurrent_layer_fetch_buffer, limit);
    let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
    // Dropping the set (an error, or the caller cancelling) aborts the other downloads.
    let mut tasks = JoinSet::new();
    // Download slots are handed out here, in the order of `blobs` (a config, then its layers
    // bottom up), not raced for by the tasks: tasks reach a semaphore in whatever order the
    // scheduler polls them, and the unpack, which applies layers in order, waited for a
    // first layer that had been queued behind the big ones.
    let mut queue = blobs.into_iter().peekable();
    let mut fetched = 0;
    loop {
        if queue.peek().is_none() && tasks.is_empty() {
            break;
        }
        tokio::select! {
            Some(event) = rx.recv() => progress.report(event),
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => match joined {
                Ok(Ok((digest, was_fetched))) => {
                    arrivals.stored(&digest);
                    fetched += usize::from(was_fetched);
                }
                Ok(Err(e)) => return Err(e),
                Err(e) => {
                    return Err(Error::Core(berth_core::Error::internal(format!(
                        "a blob download task failed: {e}"
                    ))));
                }
            },
            permit = Arc::clone(&permits).acquire_owned(), if queue.peek().is_some() => {
                let permit = permit.map_err(|_| {
                    Error::Core(berth_core::Error::internal("download slots closed"))
                })?;
                let Some(blob) = queue.next() else { continue };
                let (content, cx, client, reference) = (
                    Arc::clone(&stores.content),
                    cx.clone(),
                    Arc::clone(client),
                    Arc::clone(reference),
                );
                let (tx, multipart) = (tx.clone(), multipart.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    let fetch = BlobFetch {
                        client: &client,
                        reference: &reference,
                        multipart: multipart.as_ref(),
                        progress: &tx,
                    };
                    let fetched = fetch.run(content.as_ref(), &cx, &blob).await?;
                    Ok::<_, Error>((blob.digest, fetched))
                });
            }
        }
    }
    drop(tx);
    while let Ok(event) = rx.try_recv() {
        progress.report(event);
    }
    Ok(fetched)
}

/// What fetching one blob needs besides the store.
struct BlobFetch<'a> {
    client: &'a Arc<registry::Client>,
    reference: &'a registry::Reference,
    multipart: Option<&'a registry::Multipart>,
    progress: &'a mpsc::UnboundedSender<Progress>,
}

impl BlobFetch<'_> {
    /// Fetches one blob into the store, resuming its ingest when one is there; `false` when
    /// the blob was stored already.
    async fn run(
        &self,
        content: &dyn ContentStore,
        cx: &CallContext,
        desc: &Descriptor,
    ) -> Result<bool> {
        let key = progress::ref_key(desc);
        let exists = |key: String| {
            Progress::about(progress::ALREADY_EXISTS, key, desc.size, desc.size)
                .with_desc(desc.clone())
        };
        if store::exists(content, cx, &desc.digest).await? {
            let _ = self.progress.send(exists(key));
            return Ok(false);
        }
        let request = WriterRequest {
            reference: key.clone(),
            total: desc.size,
            expected: Some(desc.digest.clone()),
        };
        let Some(mut writer) = open_ingest(content, cx, request.clone()).await? else {
            let _ = self.progress.send(exists(key));
            return Ok(false);
        };
        let mut transient = false;
        if let Err(e) = self.copy(writer.as_mut(), desc, &key, &mut transient).await {
            let held = writer.status().offset;
            let _ = writer.close().await;
            if transient && held > 0 {
                keep_ingest(content, cx, request).await;
                return Err(Error::Core(berth_core::Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "{e}; the {held} bytes of {} fetched are kept: pulling again resumes \
                         from there",
                        desc.digest
                    ),
                )));
            }
            // A blob that failed verification must not be resumed from, and nothing may stay
            // under its ref for a later pull to trip on.
            if let Err(abort) = content.abort(cx, &key).await {
                tracing::debug!(reference = %key, error = %abort, "cannot abort the failed ingest");
            }
            return Err(e);
        }
        store::commit(writer, desc.size, Some(desc.digest.clone()), Labels::new()).await?;
        let _ = self.progress.send(
            Progress::about(progress::COMPLETE, key, desc.size, desc.size).with_desc(desc.clone()),
        );
        Ok(true)
    }

    /// Streams the blob into `writer` from the writer's offset on; ends with the writer
    /// holding exactly the blob. Sets `transient` when the registry connection failed (worth
    /// resuming) rather than the content.
    async fn copy(
        &self,
        writer: &mut dyn ContentWriter,
        desc: &Descriptor,
        key: &str,
        transient: &mut bool,
    ) -> Result<()> {
        let rdesc = convert::registry_descriptor(desc)?;
        let mut held = writer.status().offset;
        if held >= desc.size && held > 0 {
            // Everything arrived before the commit was cut short, or the ingest is not this
            // blob at all.
            if held == desc.size && writer.digest() == desc.digest {
                return Ok(());
            }
            writer.truncate(0).await?;
            held = 0;
        }
        if held > 0 {
            tracing::info!(reference = %key, offset = held, size = desc.size, "resuming the ingest of an interrupted pull");
        }
        let options = |held: u64| registry::FetchOptions {
            prefix: registry::Prefix::Held(held),
            multipart: self.multipart.cloned(),
        };
        let note = |e: registry::Error, transient: &mut bool| {
            *transient = matches!(
                e,
                registry::Error::Http { .. }
                    | registry::Error::Status {
                        status: 500..=599,
                        ..
                    }
            );
            convert::registry_error(e)
        };
        let mut stream = match self
            .client
            .fetch_with(self.reference, &rdesc, options(held))
            .await
        {
            Ok(stream) => stream,
            Err(registry::Error::Status { status: 416, .. }) if held > 0 => {
                tracing::info!(reference = %key, offset = held, "the registry refuses the range; fetching the blob from its start");
                writer.truncate(0).await?;
                self.client
                    .fetch_with(self.reference, &rdesc, options(0))
                    .await
                    .map_err(|e| note(e, transient))?
            }
            Err(e) => return Err(note(e, transient)),
        };
        let _ = self.progress.send(
            Progress::about(
                progress::DOWNLOADING,
                key.to_owned(),
                stream.offset(),
                desc.size,
            )
            .with_desc(desc.clone()),
        );
        let mut last_report = stream.offset();
        while let Some(chunk) = stream.chunk().await.map_err(|e| note(e, transient))? {
            writer.write(&chunk).await?;
            let done = stream.offset();
            // About one event per MiB keeps the stream to the client small.
            if done - last_report >= 1 << 20 {
                last_report = done;
                let _ = self.progress.send(
                    Progress::about(progress::DOWNLOADING, key.to_owned(), done, desc.size)
                        .with_desc(desc.clone()),
                );
            }
        }
        if !stream.verifies_digest() {
            let actual = writer.digest();
            if actual != desc.digest {
                return Err(convert::registry_error(registry::Error::DigestMismatch {
                    expected: desc.digest.to_string(),
                    actual: actual.to_string(),
                }));
            }
        }
        Ok(())
    }
}

/// How long to wait for an ingest another writer holds (a concurrent pull of the same blob).
const LOCKED_INGEST_WAIT: Duration = Duration::from_secs(300);

/// Opens the blob's ingest, keeping what an earlier pull left in it (unlike
/// [`store::open_writer`], which starts over), and waiting while another writer holds it.
/// `None` when the blob is stored already.
async fn open_ingest(
    content: &dyn ContentStore,
    cx: &CallContext,
    request: WriterRequest,
) -> Result<Option<Box<dyn ContentWriter>>> {
    use berth_core::error::Classify as _;
    let started = Instant::now();
    let mut delay = Duration::from_millis(10);
    loop {
        match content.writer(cx, request.clone()).await {
            Ok(writer) => return Ok(Some(writer)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(None),
            Err(e)
                if e.kind() == ErrorKind::Unavailable && started.elapsed() < LOCKED_INGEST_WAIT =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Hands an interrupted ingest from the pull's lease over to the store's expiry for unleased
/// ingests (24 hours, containerd's too): reopening it without a lease sets the expiry, which
/// keeps it from the garbage collector once the pull's lease is gone.
async fn keep_ingest(content: &dyn ContentStore, cx: &CallContext, request: WriterRequest) {
    let unleased = CallContext {
        namespace: cx.namespace.clone(),
        lease: None,
    };
    let reference = request.reference.clone();
    match content.writer(&unleased, request).await {
        Ok(writer) => {
            if let Err(e) = writer.close().await {
                tracing::debug!(%reference, error = %e, "cannot release the kept ingest");
            }
        }
        Err(e) => {
            tracing::warn!(%reference, error = %e, "cannot keep the interrupted ingest; the next pull starts it over");
        }
    }
}

/// The one place where the registry client's types meet berth's.
pub mod convert {
    use super::*;

    /// The registry client's descriptor as a transfer descriptor.
    pub fn descriptor(d: &registry::Descriptor) -> Result<Descriptor> {
        let mut out = Descriptor::new(&d.media_type, digest(&d.digest)?, d.size);
        out.annotations = d.annotations.clone();
        out.platform = d
            .platform
            .as_ref()
            .map(|p| Platform::new(&p.os, &p.architecture, p.variant.as_deref().unwrap_or("")));
        Ok(out)
    }

    /// A transfer descriptor as the registry client's (for fetching). The registry client
    /// knows only sha256: another algorithm is InvalidArgument naming the digest.
    pub fn registry_descriptor(d: &Descriptor) -> Result<registry::Descriptor> {
        let digest = registry::Digest::try_from(d.digest.to_string()).map_err(|e| {
            Error::Core(berth_core::Error::invalid_argument(format!(
                "cannot pull {}: {e}",
                d.digest
            )))
        })?;
        let mut out = registry::Descriptor::new(d.media_type.clone(), digest, d.size);
        out.annotations = d.annotations.clone();
        Ok(out)
    }

    /// The registry client's digest as berth's.
    pub fn digest(d: &registry::Digest) -> Result<Digest> {
        Ok(Digest::parse(d.as_str())?)
    }

    /// A registry error with the kind a gRPC client should see.
    pub fn registry_error(e: registry::Error) -> Error {
        use registry::Error as R;
        let kind = match &e {
            R::InvalidReference { .. } | R::InvalidDigest(_) | R::HostsConfig { .. } => {
                ErrorKind::InvalidArgument
            }
            R::Tls { .. } => ErrorKind::FailedPrecondition,
            R::NotFound { .. } => ErrorKind::NotFound,
            R::Unauthorized { .. } => ErrorKind::Unauthenticated,
            R::DigestMismatch { .. } | R::SizeMismatch { .. } => ErrorKind::DataLoss,
            R::Http { .. } => ErrorKind::Unavailable,
            R::Status { .. } | R::Protocol { .. } => ErrorKind::Unknown,
        };
        Error::Core(berth_core::Error::new(kind, e.to_string()))
    }
}
