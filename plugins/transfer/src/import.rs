//! Importing an image archive: blobs into the content store, then unpack, then image records.
//!
//! Follows containerd's transfer import (`core/transfer/local/import.go`,
//! `core/images/archive/importer.go`, `core/transfer/image/imagestore.go`):
//!
//! 1. Everything happens under a lease: the caller's (`containerd-lease`), or one made for the
//!    import (expiring after 24 hours) and deleted at the end, success or not. What a failed
//!    import wrote is then only held by nothing, and garbage collection removes it.
//! 2. The archive (plain tar, or gzip, zstd or xz, detected by magic number) is read into the
//!    store ([`crate::archive`]). An OCI layout (`oci-layout` + `index.json`) gives its index;
//!    a Docker archive (`manifest.json`) is converted: a Docker schema 2 manifest per entry
//!    (config `application/vnd.docker.container.image.v1+json`, layers typed by their
//!    compression, the platform from the config), listed in a new index with the normalised
//!    `RepoTags` as `io.containerd.image.name` and `org.opencontainers.image.ref.name`.
//! 3. The index is walked: each index or manifest blob gets `containerd.io/gc.ref.content.*`
//!    labels for all its children (so an image keeps its content alive); index children are
//!    kept by platform ([`ImportOptions::platforms`]); every kept manifest must have its config
//!    and layers, else the import fails naming the missing blob. A selection that keeps no
//!    manifest fails (NotFound).
//! 4. Kept manifests whose config platform an [`UnpackTarget`] accepts are unpacked
//!    ([`crate::unpack`]). An OCI layout's are unpacked while the archive is still being
//!    stored: the same selection is walked as index.json and the manifests land, and each
//!    layer is applied as soon as it is in (containerd unpacks after the whole archive).
//! 5. Image records are written last, as containerd's image store does: the whole index under
//!    [`ImportOptions::index_name`] if given; each of the archive's top-level manifests under
//!    the names its annotations and the [`ImageReference`]s give. Create, and Update when the
//!    name exists.
//!
//! Differences from containerd: blobs named `blobs/<alg>/<hex>` are verified against their
//! name while written; top-level manifests that platform selection dropped get no image
//! record (containerd writes one whose content it then lets the collector take); xz works.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use berth_core::content::{ByteStream, CallContext, ContentStore, Digest, WriterRequest};
use berth_core::error::{Classify, ErrorKind};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::metadata::Metadata;
use berth_core::metadata::images::Image;
use berth_core::namespace::Namespace;
use tokio_stream::StreamExt;

use crate::archive::{self, ArchiveContents};
use crate::compression::Compression;
use crate::error::{Error, Result};
use crate::media;
use crate::oci::{self, Descriptor, DockerManifest, Index};
use crate::platform::PlatformSelection;
use crate::progress::{self, Progress, ProgressSink};
use crate::reference;
use crate::store;
use crate::unpack::{self, Arrivals, UnpackReport, UnpackTarget};

/// Annotation marking an index entry whose names come from its annotations.
const REF_SOURCE: &str = "io.containerd.import.ref-source";

/// An extra name to store imported images under (containerd's `ImageReference`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageReference {
    /// A full name, or with `is_prefix` a repository (`docker.io/library/busybox`).
    pub name: String,
    /// `name` is a prefix: tag-only annotations (`latest`) become `name:latest`; full
    /// names in annotations must lie under it.
    pub is_prefix: bool,
    /// With `is_prefix`: full names in annotations are used even when not under the prefix.
    pub allow_overwrite: bool,
    /// With `is_prefix`: also store `name@<digest>`.
    pub add_digest: bool,
    /// With `add_digest`: only when no name came from the annotations.
    pub skip_named_digest: bool,
}

impl ImageReference {
    /// containerd's `WithNamedPrefix`.
    pub fn named_prefix(name: impl Into<String>, allow_overwrite: bool) -> Self {
        ImageReference {
            name: name.into(),
            is_prefix: true,
            allow_overwrite,
            ..Default::default()
        }
    }

    /// containerd's `WithDigestRef`.
    pub fn digest_ref(name: impl Into<String>, allow_overwrite: bool, skip_named: bool) -> Self {
        ImageReference {
            name: name.into(),
            is_prefix: true,
            allow_overwrite,
            add_digest: true,
            skip_named_digest: skip_named,
        }
    }

    /// containerd's `WithExtraReference`: one more exact name.
    pub fn exact(name: impl Into<String>) -> Self {
        ImageReference {
            name: name.into(),
            ..Default::default()
        }
    }
}

/// How to import (containerd's `ImageStore` destination and `ImageImportStream` options).
/// The default keeps the host's platform only, as `ctr images import` without
/// `--all-platforms`, and names no image.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Store the archive's whole index as an image under this name.
    pub index_name: Option<String>,
    /// Labels of the image records written.
    pub labels: Labels,
    /// Which platforms' manifests to keep (`All` is `--all-platforms`).
    pub platforms: PlatformSelection,
    /// Names for the archive's images (see [`ImageReference`]).
    pub references: Vec<ImageReference>,
    /// Gzip uncompressed layers of a Docker archive (`ctr images import --compress-blobs`).
    pub force_compress: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            index_name: None,
            labels: Labels::new(),
            platforms: PlatformSelection::host(),
            references: Vec::new(),
            force_compress: false,
        }
    }
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The archive's compression.
    pub compression: Compression,
    /// The archive's index (`index.json`, or the one made for a Docker archive).
    pub index: Descriptor,
    /// The image records written, in order.
    pub images: Vec<Image>,
    /// The unpacks done.
    pub unpacked: Vec<UnpackReport>,
}

/// The stores an import or export works on.
#[derive(Clone)]
pub struct Stores {
    /// The metadata layer: image records and leases.
    pub metadata: Arc<Metadata>,
    /// The namespaced content store (the metadata layer's).
    pub content: Arc<dyn ContentStore>,
}

impl Stores {
    /// The stores of `metadata`; FailedPrecondition when no content store plugin is loaded.
    pub fn new(metadata: Arc<Metadata>) -> Result<Stores> {
        let content = metadata.content().ok_or_else(|| {
            Error::Core(berth_core::Error::failed_precondition(
                "no content store plugin is loaded: import and export need one",
            ))
        })?;
        Ok(Stores { metadata, content })
    }
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

/// Runs `work` under the call's lease, or under a new 24-hour lease deleted afterwards
/// (containerd's `withLease`).
pub(crate) async fn with_lease<T, F, Fut>(stores: &Stores, cx: &CallContext, work: F) -> Result<T>
where
    F: FnOnce(CallContext) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    if cx.lease.is_some() {
        return work(cx.clone()).await;
    }
    let ns = cx.require_namespace()?.clone();
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24);
    let labels = Labels::from([(
        berth_core::metadata::leases::LABEL_EXPIRE.to_owned(),
        expires.to_string(),
    )]);
    let lease = stores.metadata.create_lease(&ns, "", labels).await?;
    let leased = CallContext {
        namespace: Some(ns.clone()),
        lease: Some(lease.id.clone()),
    };
    let mut guard = LeaseGuard {
        metadata: Some(Arc::clone(&stores.metadata)),
        ns,
        id: lease.id,
    };
    let result = work(leased).await;
    guard.release().await;
    result
}

/// Deletes a transfer's own lease when the transfer ends, also when its future is dropped
/// half-way (a client that cancels an import): otherwise what it wrote would be protected
/// until the lease expired, a day later.
struct LeaseGuard {
    metadata: Option<Arc<Metadata>>,
    ns: berth_core::namespace::Namespace,
    id: String,
}

impl LeaseGuard {
    async fn release(&mut self) {
        if let Some(metadata) = self.metadata.take() {
            delete_lease(&metadata, &self.ns, &self.id).await;
        }
    }
}

async fn delete_lease(metadata: &Metadata, ns: &berth_core::namespace::Namespace, id: &str) {
    if let Err(e) = metadata.delete_lease(ns, id, false).await {
        tracing::warn!(lease = %id, error = %e, "cannot delete the transfer's lease");
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(metadata) = self.metadata.take() else {
            return;
        };
        let (ns, id) = (self.ns.clone(), std::mem::take(&mut self.id));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { delete_lease(&metadata, &ns, &id).await });
            }
            Err(_) => {
                tracing::warn!(lease = %id, "transfer cancelled outside a runtime: its lease stays until it expires")
            }
        }
    }
}

/// Imports an archive read from `source` (see the module documentation).
pub async fn import(
    stores: &Stores,
    cx: &CallContext,
    source: ByteStream,
    options: &ImportOptions,
    unpacks: &[UnpackTarget],
    progress: &dyn ProgressSink,
) -> Result<ImportReport> {
    let ns = cx.require_namespace()?.clone();
    with_lease(stores, cx, |cx| async move {
        progress.report(Progress::status(progress::IMPORTING));
        let content = stores.content.as_ref();
        // An OCI layout's layers are applied while the rest of the archive is still being
        // stored: once index.json, the manifest and its config are in, each layer goes as
        // soon as it lands (archives list blobs by digest, not in layer order).
        let arrivals = Arrivals::new();
        let (index_tx, index_rx) = tokio::sync::watch::channel(None);
        let ingest = async {
            let on_stored = |path: &str, digest: &Digest| {
                arrivals.stored(digest);
                if path == "index.json" {
                    index_tx.send_replace(Some(digest.clone()));
                }
            };
            let result = archive::ingest(content, &cx, source, progress, &on_stored).await;
            // Nothing more arrives: an unpack waiting for a blob the archive lacked stops.
            arrivals.failed();
            drop(index_tx);
            result
        };
        let early = unpack_as_stored(
            content,
            &cx,
            index_rx,
            &arrivals,
            &options.platforms,
            unpacks,
            progress,
        );
        let (contents, early) = tokio::join!(ingest, early);
        // The archive's own errors first (an unpack may have stopped because of them), then
        // the unpack's.
        let contents = contents?;
        let compression = contents.compression.unwrap_or(Compression::Uncompressed);
        let index = resolve_index(content, &cx, contents, options.force_compress).await?;
        let walked = walk(content, &cx, &index, &options.platforms, None).await?;
        let mut early = match early {
            Ok(done) => done,
            // The archive lacked a blob its index.json led to, yet the walk above found all
            // it needs (the archive is read as a Docker archive): unpack below as usual.
            Err(Error::NotArrived { .. }) => HashMap::new(),
            Err(e) => return Err(e),
        };

        let mut unpacked = Vec::new();
        if !unpacks.is_empty() {
            for manifest in &walked.manifests {
                if let Some(report) = early.remove(&manifest.digest) {
                    unpacked.push(report);
                    continue;
                }
                let (_, config) = unpack::read_config(content, &cx, manifest).await?;
                if let Some(target) = unpacks.iter().find(|t| t.accepts(&config.platform)) {
                    unpacked.push(unpack::unpack(content, &cx, target, manifest, progress).await?);
                }
            }
        }

        let mut images = Vec::new();
        for (desc, from_annotations) in std::iter::once((index.clone(), false))
            .chain(walked.top_level.iter().map(|d| (d.clone(), true)))
        {
            for image in images_for(&desc, from_annotations, options)? {
                let saved = save_image(&stores.metadata, &ns, &cx, image).await?;
                progress.report(
                    Progress::about(progress::SAVED, saved.name.clone(), 0, 0)
                        .with_desc(desc.clone()),
                );
                images.push(saved);
            }
        }
        progress.report(Progress::status(progress::COMPLETED_IMPORT));
        Ok(ImportReport {
            compression,
            index,
            images,
            unpacked,
        })
    })
    .await
}

/// The archive's top-level index: `index.json` of an OCI layout, or one made for a Docker
/// archive.
async fn resolve_index(
    content: &dyn ContentStore,
    cx: &CallContext,
    mut contents: ArchiveContents,
    force_compress: bool,
) -> Result<Descriptor> {
    if let Some(layout) = &contents.layout
        && !layout.version.is_empty()
    {
        if layout.version != oci::IMAGE_LAYOUT_VERSION {
            return Err(Error::archive(format!(
                "unsupported OCI layout version {:?} (berth reads {})",
                layout.version,
                oci::IMAGE_LAYOUT_VERSION
            )));
        }
        let (digest, size) = contents.blobs.get("index.json").cloned().ok_or_else(|| {
            Error::archive(format!(
                "the OCI layout (version {}) has no index.json",
                oci::IMAGE_LAYOUT_VERSION
            ))
        })?;
        return Ok(Descriptor::new(media::OCI_INDEX, digest, size));
    }
    let Some(entries) = contents.docker.take() else {
        return Err(Error::archive(
            "unrecognized image format: neither an OCI layout (oci-layout, index.json) nor a \
             Docker archive (manifest.json)",
        ));
    };
    let links: Vec<(String, String)> = contents.symlinks.drain().collect();
    for (name, target) in links {
        let blob = contents.blobs.get(&target).cloned().ok_or_else(|| {
            Error::archive(format!(
                "no target for symlink layer from {name:?} to {target:?}"
            ))
        })?;
        contents.blobs.insert(name, blob);
    }
    let mut manifests = Vec::new();
    for entry in &entries {
        let (digest, size) = contents.blobs.get(&entry.config).cloned().ok_or_else(|| {
            Error::archive(format!(
                "image config {:?} not found in the archive",
                entry.config
            ))
        })?;
        let config = Descriptor::new(media::DOCKER_CONFIG, digest, size);
        let mut layers = Vec::with_capacity(entry.layers.len());
        for path in &entry.layers {
            let (digest, size) = contents.blobs.get(path).cloned().ok_or_else(|| {
                Error::archive(format!("layer {path:?} not found in the archive"))
            })?;
            layers.push(resolve_layer(content, cx, digest, size, force_compress).await?);
        }
        let manifest = DockerManifest {
            schema_version: 2,
            media_type: media::DOCKER_MANIFEST.to_owned(),
            config: config.clone(),
            layers,
        };
        let bytes = oci::to_go_json(&manifest);
        let (digest, _) = store::write_blob(
            content,
            cx,
            format!("manifest-{}", Digest::sha256_of(&bytes)),
            &bytes,
        )
        .await?;
        let mut desc = Descriptor::new(media::DOCKER_MANIFEST, digest, bytes.len() as u64);
        let config_bytes = store::read_document(content, cx, &config.digest).await?;
        let platform = oci::parse_config(&config_bytes, &config.digest)?.platform;
        if platform.os != "unknown" && platform.architecture != "unknown" {
            desc.platform = Some(platform);
        }
        if entry.repo_tags.is_empty() {
            manifests.push(desc);
        } else {
            for tag in &entry.repo_tags {
                let name = reference::normalize(tag)?;
                let mut tagged = desc.clone();
                tagged.annotations.insert(
                    media::ANNOTATION_REF_NAME.to_owned(),
                    reference::oci_ref_name(&name),
                );
                tagged
                    .annotations
                    .insert(media::ANNOTATION_IMAGE_NAME.to_owned(), name);
                manifests.push(tagged);
            }
        }
    }
    let index = Index {
        schema_version: 2,
        media_type: String::new(),
        manifests,
        annotations: Default::default(),
    };
    let bytes = oci::to_go_json(&index);
    let (digest, _) = store::write_blob(
        content,
        cx,
        format!("manifest-{}", Digest::sha256_of(&bytes)),
        &bytes,
    )
    .await?;
    Ok(Descriptor::new(
        media::OCI_INDEX,
        digest,
        bytes.len() as u64,
    ))
}

/// A Docker archive layer's descriptor (containerd's `resolveLayers`): a compressed version
/// already in the store (labelled `containerd.io/uncompressed` with this digest) is used
/// instead; otherwise the media type follows the blob's first bytes (any compression is
/// called gzip, as containerd does); with `force_compress` an uncompressed layer is gzipped.
async fn resolve_layer(
    content: &dyn ContentStore,
    cx: &CallContext,
    digest: Digest,
    size: u64,
    force_compress: bool,
) -> Result<Descriptor> {
    let filter = Filter::parse_all(&[format!(
        "labels.\"{}\"=={digest}",
        media::LABEL_UNCOMPRESSED
    )])?;
    if let Some(info) = content.list(cx, &filter).await?.into_iter().next() {
        let media_type = detect_layer_type(content, cx, &info.digest).await?;
        return Ok(Descriptor::new(media_type, info.digest, info.size));
    }
    let media_type = detect_layer_type(content, cx, &digest).await?;
    if media_type == media::DOCKER_LAYER && force_compress && size > 0 {
        return compress_layer(content, cx, &digest).await;
    }
    Ok(Descriptor::new(media_type, digest, size))
}

async fn detect_layer_type(
    content: &dyn ContentStore,
    cx: &CallContext,
    digest: &Digest,
) -> Result<&'static str> {
    let mut stream = content.read(cx, digest, 0, Some(10)).await?;
    let mut head = Vec::new();
    while let Some(chunk) = stream.next().await {
        head.extend_from_slice(&chunk?);
    }
    Ok(match Compression::detect(&head) {
        Compression::Uncompressed => media::DOCKER_LAYER,
        _ => media::DOCKER_LAYER_GZIP,
    })
}

/// Gzips an uncompressed layer into a new blob labelled with its uncompressed digest.
async fn compress_layer(
    content: &dyn ContentStore,
    cx: &CallContext,
    digest: &Digest,
) -> Result<Descriptor> {
    use std::io::Write as _;
    let reference = format!(
        "compress-blob-{}-{}",
        digest.algorithm().name(),
        digest.hex()
    );
    let request = WriterRequest {
        reference,
        total: 0,
        expected: None,
    };
    let Some(mut writer) = store::open_writer(content, cx, request).await? else {
        return Err(Error::Core(berth_core::Error::internal(
            "a writer without an expected digest cannot find the blob stored",
        )));
    };
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut stream = content.read(cx, digest, 0, None).await?;
    let mut written = 0u64;
    while let Some(chunk) = stream.next().await {
        encoder
            .write_all(&chunk?)
            .map_err(|e| Error::Core(berth_core::Error::internal(format!("gzip: {e}"))))?;
        let out = std::mem::take(encoder.get_mut());
        written += out.len() as u64;
        writer.write(&out).await?;
    }
    let out = encoder
        .finish()
        .map_err(|e| Error::Core(berth_core::Error::internal(format!("gzip: {e}"))))?;
    written += out.len() as u64;
    writer.write(&out).await?;
    let compressed = writer.digest();
    let labels = Labels::from([(media::LABEL_UNCOMPRESSED.to_owned(), digest.to_string())]);
    if store::commit(writer, written, Some(compressed.clone()), labels).await? {
        // It was already there: make sure it carries the label.
        store::set_labels(
            content,
            cx,
            &compressed,
            vec![(media::LABEL_UNCOMPRESSED.to_owned(), digest.to_string())],
        )
        .await?;
    }
    Ok(Descriptor::new(
        media::DOCKER_LAYER_GZIP,
        compressed,
        written,
    ))
}

/// Unpacks the images of an OCI layout while its archive is being stored (see [`import`]):
/// waits for index.json (`index` is closed when the archive ends without one), walks it as
/// the blobs arrive and unpacks each selected manifest into the first target accepting its
/// platform, layer by layer as `arrivals` reports them stored. Returns the reports by
/// manifest digest; [`Error::NotArrived`] when the archive ended before a blob it needed.
async fn unpack_as_stored(
    content: &dyn ContentStore,
    cx: &CallContext,
    mut index: tokio::sync::watch::Receiver<Option<Digest>>,
    arrivals: &Arrivals,
    platforms: &PlatformSelection,
    unpacks: &[UnpackTarget],
    progress: &dyn ProgressSink,
) -> Result<HashMap<Digest, UnpackReport>> {
    let mut done = HashMap::new();
    if unpacks.is_empty() {
        return Ok(done);
    }
    let Some(digest) = index
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|d| d.clone())
    else {
        return Ok(done);
    };
    let root = Descriptor::new(media::OCI_INDEX, digest, 0);
    let walked = walk(content, cx, &root, platforms, Some(arrivals)).await?;
    for manifest in &walked.manifests {
        let (_, config) =
            unpack::read_config_once_stored(content, cx, manifest, Some(arrivals)).await?;
        if let Some(target) = unpacks.iter().find(|t| t.accepts(&config.platform)) {
            let report =
                unpack::unpack_as_fetched(content, cx, target, manifest, progress, arrivals)
                    .await?;
            done.insert(manifest.digest.clone(), report);
        }
    }
    Ok(done)
}

/// What walking the index found.
#[derive(Debug, Default)]
struct Walked {
    /// The top-level index's entries that platform selection kept.
    top_level: Vec<Descriptor>,
    /// Every manifest kept, in walk order.
    manifests: Vec<Descriptor>,
}

/// Walks the index from `index` and keeps what `platforms` selects. With `gate` (while the
/// archive is still being stored) each index and manifest is read once it has arrived, and
/// nothing is labelled or checked: the walk after the archive is complete does that.
async fn walk(
    content: &dyn ContentStore,
    cx: &CallContext,
    index: &Descriptor,
    platforms: &PlatformSelection,
    gate: Option<&Arrivals>,
) -> Result<Walked> {
    let mut out = Walked::default();
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([(index.clone(), "index.json".to_owned(), true)]);
    while let Some((desc, parent, top)) = queue.pop_front() {
        if !seen.insert(desc.digest.clone()) {
            continue;
        }
        let what = if media::is_index(&desc.media_type) {
            "index"
        } else if media::is_manifest(&desc.media_type) {
            "manifest"
        } else {
            // Configs, layers and unknown types have no children.
            continue;
        };
        if let Some(gate) = gate {
            gate.wait(&desc.digest).await?;
        }
        let bytes = store::read_document(content, cx, &desc.digest)
            .await
            .map_err(|e| missing(e, what, &desc.digest, &parent))?;
        let name = format!("{what} {}", desc.digest);
        if what == "index" {
            let parsed = oci::parse_index(&bytes, &desc.digest)?;
            if gate.is_none() {
                store::set_labels(
                    content,
                    cx,
                    &desc.digest,
                    media::children_gc_labels(&parsed.manifests),
                )
                .await?;
            }
            let kept: Vec<Descriptor> = parsed
                .manifests
                .into_iter()
                .filter(|m| platforms.keeps(m.platform.as_ref()))
                .collect();
            if top {
                if kept.is_empty() {
                    return Err(Error::NoMatchingPlatform(platforms.to_string()));
                }
                out.top_level = kept.clone();
            }
            queue.extend(kept.into_iter().map(|m| (m, name.clone(), false)));
        } else {
            let parsed = oci::parse_manifest(&bytes, &desc.digest)?;
            if gate.is_some() {
                out.manifests.push(desc);
                continue;
            }
            let mut children = vec![parsed.config.clone()];
            children.extend(parsed.layers.iter().cloned());
            store::set_labels(
                content,
                cx,
                &desc.digest,
                media::children_gc_labels(&children),
            )
            .await?;
            if !store::exists(content, cx, &parsed.config.digest).await? {
                return Err(Error::Missing {
                    what: "config".into(),
                    digest: parsed.config.digest.clone(),
                    parent: name,
                });
            }
            for (i, layer) in parsed.layers.iter().enumerate() {
                if !store::exists(content, cx, &layer.digest).await? {
                    return Err(Error::Missing {
                        what: format!("layer {i}"),
                        digest: layer.digest.clone(),
                        parent: name,
                    });
                }
            }
            out.manifests.push(desc);
        }
    }
    if out.manifests.is_empty() {
        return Err(Error::NoMatchingPlatform(platforms.to_string()));
    }
    Ok(out)
}

fn missing(e: Error, what: &str, digest: &Digest, parent: &str) -> Error {
    match &e {
        Error::Core(core) if core.kind() == ErrorKind::NotFound => Error::Missing {
            what: what.to_owned(),
            digest: digest.clone(),
            parent: parent.to_owned(),
        },
        _ => e,
    }
}

/// containerd's `imageName`: the `io.containerd.image.name` annotation if `cleanup` keeps it
/// unchanged, else the ref-name annotation through `cleanup`.
fn image_name(desc: &Descriptor, cleanup: impl Fn(&str) -> String) -> String {
    if let Some(name) = desc
        .annotations
        .get(media::ANNOTATION_IMAGE_NAME)
        .filter(|n| !n.is_empty())
    {
        return if cleanup(name) == *name {
            name.clone()
        } else {
            String::new()
        };
    }
    desc.annotations
        .get(media::ANNOTATION_REF_NAME)
        .filter(|n| !n.is_empty())
        .map(|n| cleanup(n))
        .unwrap_or_default()
}

/// The image records `desc` gets (containerd's `Store.Store`).
fn images_for(
    desc: &Descriptor,
    from_annotations: bool,
    options: &ImportOptions,
) -> Result<Vec<Image>> {
    let index_name = options.index_name.clone().unwrap_or_default();
    let extra_labels = || {
        if index_name.is_empty() {
            return options.labels.clone();
        }
        let mut labels = options.labels.clone();
        // As containerd: the extra names go when the primary name goes.
        labels.insert("containerd.io/gc.bref.image".to_owned(), index_name.clone());
        labels.insert(
            berth_core::metadata::leases::LABEL_EXPIRE.to_owned(),
            jiff::Timestamp::now().to_string(),
        );
        labels
    };
    let mut target = desc.clone();
    target.annotations.remove(REF_SOURCE);
    let image = |name: String, labels: Labels| Image {
        name,
        labels,
        target: target.to_core(),
        created_at: SystemTime::UNIX_EPOCH,
        updated_at: SystemTime::UNIX_EPOCH,
    };
    let mut images = Vec::new();
    if from_annotations {
        for r in options.references.iter().filter(|r| r.is_prefix) {
            let name = image_name(desc, |n| {
                reference::translate(&r.name, n, !r.allow_overwrite)
            });
            let digest_name = format!("{}@{}", r.name, desc.digest);
            if name.is_empty() {
                if r.add_digest {
                    images.push(image(digest_name, extra_labels()));
                }
                continue;
            }
            images.push(image(name, extra_labels()));
            if r.add_digest && !r.skip_named_digest {
                images.push(image(digest_name, extra_labels()));
            }
        }
    } else {
        if !index_name.is_empty() {
            images.push(image(index_name.clone(), options.labels.clone()));
        }
        for r in &options.references {
            if r.is_prefix && !r.add_digest {
                continue;
            }
            let name = if r.add_digest {
                format!("{}@{}", r.name, desc.digest)
            } else {
                r.name.clone()
            };
            images.push(image(name, extra_labels()));
        }
    }
    Ok(images)
}

/// Creates the image, or updates it when the name exists (retrying a create when it vanished
/// in between), as containerd's image store destination does.
async fn save_image(
    metadata: &Metadata,
    ns: &Namespace,
    cx: &CallContext,
    image: Image,
) -> Result<Image> {
    loop {
        match metadata
            .create_image(ns, image.clone(), None, cx.lease.as_deref())
            .await
        {
            Ok(created) => return Ok(created),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
        match metadata.update_image(ns, image.clone(), &[], None).await {
            Ok(updated) => return Ok(updated),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
