//! Pushing an image of the stores to a registry (containerd's `core/transfer/local/push.go`
//! with the `ImageStore` source and an `OCIRegistry` destination, and the pusher of
//! `core/remotes/docker`).
//!
//! 1. The image record names the root: an index or a manifest. The walk reads the documents
//!    from the content store, children before parents. Of an index, [`PlatformSelection::All`]
//!    pushes every manifest the store holds (one it lacks is fine only when the registry has
//!    it already, else the registry would refuse the index); a platform list pushes the index
//!    when the list keeps all its manifests, and otherwise the one manifest it keeps, tagged
//!    in the index's place (several but not all manifests cannot be pushed under one tag).
//! 2. Configs and layers go first, at most `max_concurrent_uploads` at a time: a HEAD skips a
//!    blob the repository has (`already exists`); a blob whose `containerd.io/distribution.
//!    source.<registry>` label names another repository of the same registry is mounted from
//!    there when the registry agrees; anything else is uploaded, a small blob in one PUT, a
//!    big one in [`UPLOAD_CHUNK`] pieces (PATCH), so memory stays bounded and progress moves.
//! 3. Manifests follow their blobs, child manifests by digest, the root last under the
//!    reference's tag (or its digest when the reference has none). A HEAD skips a manifest
//!    the registry has (for the root: the tag already points at its digest).
//!
//! Progress events are containerd's: status `Pushing to OCI Registry (<ref>)`, `pushing
//! content` naming the image, per blob and manifest `waiting` then `uploading` (bytes sent
//! of its size) then `complete`, or `already exists` (a mounted blob too, as containerd's
//! pusher reports a 201 mount), then `pushed content` and `Completed push to OCI Registry
//! (<ref>)`. Blob names are containerd's ref keys (`layer-sha256:...`), with the manifest that
//! lists them as parent.
//!
//! Nothing is written to the stores: a push only reads.

use std::collections::HashSet;
use std::sync::Arc;

use berth_core::content::{CallContext, ContentStore, Digest};
use berth_core::error::{Classify as _, ErrorKind};
use berth_registry as registry;
use berth_registry::client::UploadStart;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;

use crate::error::{Error, Result};
use crate::import::Stores;
use crate::media;
use crate::oci::{self, Descriptor};
use crate::platform::PlatformSelection;
use crate::progress::{self, Progress, ProgressSink};
use crate::pull::convert;
use crate::store;

/// Status line starting a push (containerd: `Pushing to <destination>`).
pub const PUSHING_TO: &str = "Pushing to";
/// Status line ending a push (containerd: `Completed push to <destination>`).
pub const COMPLETED_PUSH: &str = "Completed push to";
/// Event naming the image whose content is being pushed.
pub const PUSHING_CONTENT: &str = "pushing content";
/// Event naming the image whose content is pushed.
pub const PUSHED_CONTENT: &str = "pushed content";
/// A blob or manifest is queued.
pub const WAITING: &str = "waiting";
/// A blob is being sent (progress of total bytes).
pub const UPLOADING: &str = "uploading";
/// The label prefix (`.<registry host>` follows) naming the repositories a blob came from.
pub const LABEL_DISTRIBUTION_SOURCE: &str = "containerd.io/distribution.source.";

/// Blobs up to this size go in one PUT; bigger ones in PATCH pieces of this size.
pub const UPLOAD_CHUNK: usize = 4 << 20;

/// How to push (containerd's `ImageStore` source with an `OCIRegistry` destination).
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Which platforms' manifests of an index to push.
    pub platforms: PlatformSelection,
    /// Blobs uploaded at the same time (0 counts as 1).
    pub max_concurrent_uploads: u32,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            platforms: PlatformSelection::All,
            max_concurrent_uploads: 3,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The descriptor tagged with the reference (the image's target, or the one manifest a
    /// platform selection kept of its index).
    pub root: Descriptor,
    /// Blobs and manifests sent now.
    pub uploaded: usize,
    /// Blobs and manifests the registry had already (mounted ones included).
    pub existing: usize,
}

/// One document to push, with the name of the document listing it (for progress parents).
#[derive(Debug, Clone)]
struct Document {
    desc: Descriptor,
    bytes: Vec<u8>,
    parent: String,
}

/// A blob to push and the manifest listing it.
#[derive(Debug, Clone)]
struct Blob {
    desc: Descriptor,
    parent: String,
}

/// Pushes the image `name` of the call's namespace to `reference` through `client` (see the
/// module documentation).
pub async fn push(
    stores: &Stores,
    cx: &CallContext,
    client: Arc<registry::Client>,
    name: &str,
    reference: &str,
    options: &PushOptions,
    progress: &dyn ProgressSink,
) -> Result<PushReport> {
    let ns = cx.require_namespace()?.clone();
    let image = stores.metadata.get_image(&ns, name).map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            Error::Core(berth_core::Error::not_found(format!(
                "image {name:?} not found in namespace {ns}: nothing to push (import or pull it \
                 first, or check the name with `berth images ls`)"
            )))
        } else {
            Error::Core(e)
        }
    })?;
    let parsed = Arc::new(registry::Reference::parse(reference).map_err(convert::registry_error)?);
    let destination = format!("OCI Registry ({parsed})");
    let target = Descriptor::from_core(&image.target);
    progress.report(Progress::status(&format!("{PUSHING_TO} {destination}")));
    progress.report(
        Progress::about(PUSHING_CONTENT, image.name.clone(), 0, 0).with_desc(target.clone()),
    );

    let content = stores.content.as_ref();
    let plan = plan(content, cx, &client, &parsed, &image.name, target, options).await?;
    for blob in &plan.blobs {
        progress.report(waiting(&blob.desc, &blob.parent));
    }
    for doc in &plan.documents {
        progress.report(waiting(&doc.desc, &doc.parent));
    }

    let (uploaded, existing) = push_blobs(
        stores,
        cx,
        &client,
        &parsed,
        plan.blobs,
        options.max_concurrent_uploads,
        progress,
    )
    .await?;
    let mut report = PushReport {
        root: plan.root.clone(),
        uploaded,
        existing,
    };
    let child_ref = |digest: &Digest| -> Result<registry::Reference> {
        Ok(parsed.with_digest(registry_digest(digest)?))
    };
    let last = plan.documents.len().saturating_sub(1);
    for (i, doc) in plan.documents.into_iter().enumerate() {
        // Only the root goes under the tag; its children are addressed by digest.
        let at = if i == last {
            (*parsed).clone()
        } else {
            child_ref(&doc.desc.digest)?
        };
        if push_document(&client, &at, &doc, progress).await? {
            report.uploaded += 1;
        } else {
            report.existing += 1;
        }
    }

    progress.report(
        Progress::about(PUSHED_CONTENT, image.name.clone(), 0, 0).with_desc(plan.root.clone()),
    );
    progress
        .report(Progress::status(&format!("{COMPLETED_PUSH} {destination}")).with_desc(plan.root));
    Ok(report)
}

fn waiting(desc: &Descriptor, parent: &str) -> Progress {
    Progress::about(WAITING, progress::ref_key(desc), 0, desc.size)
        .with_parents(vec![parent.to_owned()])
        .with_desc(desc.clone())
}

/// What a push sends: the blobs, then the documents in order (children first, root last).
struct Plan {
    root: Descriptor,
    blobs: Vec<Blob>,
    documents: Vec<Document>,
}

/// Walks the image from `target` and decides what to push (see the module documentation).
async fn plan(
    content: &dyn ContentStore,
    cx: &CallContext,
    client: &registry::Client,
    reference: &registry::Reference,
    image: &str,
    target: Descriptor,
    options: &PushOptions,
) -> Result<Plan> {
    // `None`: not in the content store.
    let read = |desc: Descriptor, parent: String| async move {
        if !store::exists(content, cx, &desc.digest).await? {
            return Ok(None);
        }
        let bytes = store::read_document(content, cx, &desc.digest).await?;
        Ok::<_, Error>(Some(Document {
            desc,
            bytes,
            parent,
        }))
    };
    let not_stored = |desc: &Descriptor, parent: &str| {
        Error::Core(berth_core::Error::not_found(format!(
            "{} {} listed by {parent} is not in the content store: pull or import the image again",
            document_kind(&desc.media_type),
            desc.digest
        )))
    };
    let image_parent = format!("image {image:?}");
    let mut root = read(target.clone(), image_parent.clone())
        .await?
        .ok_or_else(|| not_stored(&target, &image_parent))?;
    if media::is_index(&root.desc.media_type)
        && let PlatformSelection::Only(_) = &options.platforms
    {
        let index = oci::parse_index(&root.bytes, &root.desc.digest)?;
        let kept = options.platforms.select_manifests(&index.manifests);
        if kept.is_empty() {
            return Err(Error::NoMatchingPlatform(options.platforms.to_string()));
        }
        if kept.len() < index.manifests.len() {
            if kept.len() > 1 {
                return Err(Error::Core(berth_core::Error::invalid_argument(format!(
                    "platforms {} keep {} of the {} manifests of index {} of image {image:?}: \
                     push all platforms, or one platform (its manifest is tagged alone)",
                    options.platforms,
                    kept.len(),
                    index.manifests.len(),
                    root.desc.digest
                ))));
            }
            let only = kept
                .into_iter()
                .next()
                .ok_or_else(|| Error::NoMatchingPlatform(options.platforms.to_string()))?;
            root = read(only.clone(), image_parent.clone())
                .await?
                .ok_or_else(|| not_stored(&only, &image_parent))?;
        }
    }

    // Breadth first from the root; pushed in reverse, every child precedes its parents.
    let mut documents: Vec<Document> = Vec::new();
    let mut blobs: Vec<Blob> = Vec::new();
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut queue = std::collections::VecDeque::from([root]);
    let root_desc = queue.front().map(|d| d.desc.clone());
    while let Some(doc) = queue.pop_front() {
        if !seen.insert(doc.desc.digest.clone()) {
            continue;
        }
        let name = progress::ref_key(&doc.desc);
        if media::is_index(&doc.desc.media_type) {
            let index = oci::parse_index(&doc.bytes, &doc.desc.digest)?;
            for child in index.manifests {
                if !media::is_index(&child.media_type) && !media::is_manifest(&child.media_type) {
                    return Err(Error::InvalidBlob {
                        what: "index",
                        digest: doc.desc.digest.clone(),
                        reason: format!(
                            "it lists {} of media type {:?}, neither a manifest nor an index",
                            child.digest, child.media_type
                        ),
                    });
                }
                if let Some(c) = read(child.clone(), name.clone()).await? {
                    queue.push_back(c);
                    continue;
                }
                let in_registry = client
                    .manifest_exists(
                        &reference.with_digest(registry_digest(&child.digest)?),
                        &convert::registry_descriptor(&child)?,
                    )
                    .await
                    .map_err(convert::registry_error)?;
                if in_registry {
                    tracing::debug!(digest = %child.digest, "manifest not stored here but in the registry already");
                    continue;
                }
                let platform = child
                    .platform
                    .as_ref()
                    .map(|p| format!(" for {p}"))
                    .unwrap_or_default();
                return Err(Error::Core(berth_core::Error::not_found(format!(
                    "manifest {}{platform}, listed by index {} of image {image:?}, is neither \
                     in the content store nor in {reference}, so the registry would refuse the \
                     index: push a platform that is stored (--platform), or pull or import all \
                     platforms first",
                    child.digest, doc.desc.digest
                ))));
            }
        } else if media::is_manifest(&doc.desc.media_type) {
            let m = oci::parse_manifest(&doc.bytes, &doc.desc.digest)?;
            for blob in std::iter::once(m.config).chain(m.layers) {
                blobs.push(Blob {
                    desc: blob,
                    parent: name.clone(),
                });
            }
        } else {
            return Err(Error::InvalidBlob {
                what: "manifest",
                digest: doc.desc.digest.clone(),
                reason: format!(
                    "media type {:?} is neither an index nor a manifest",
                    doc.desc.media_type
                ),
            });
        }
        documents.push(doc);
    }
    documents.reverse();
    let mut unique = HashSet::new();
    blobs.retain(|b| unique.insert(b.desc.digest.clone()));
    let root = root_desc
        .ok_or_else(|| Error::Core(berth_core::Error::internal("push plan without a root")))?;
    Ok(Plan {
        root,
        blobs,
        documents,
    })
}

/// berth's digest as the registry client's (which knows only sha256).
fn registry_digest(d: &Digest) -> Result<registry::Digest> {
    registry::Digest::parse(&d.to_string()).map_err(|e| {
        Error::Core(berth_core::Error::invalid_argument(format!(
            "cannot push {d}: {e}"
        )))
    })
}

fn document_kind(media_type: &str) -> &'static str {
    if media::is_index(media_type) {
        "index"
    } else {
        "manifest"
    }
}

/// Pushes a manifest or index unless the registry has it where it would go; `true` when
/// sent.
async fn push_document(
    client: &registry::Client,
    at: &registry::Reference,
    doc: &Document,
    progress: &dyn ProgressSink,
) -> Result<bool> {
    let key = progress::ref_key(&doc.desc);
    let wire = convert::registry_descriptor(&doc.desc)?;
    let context = |e: registry::Error| {
        let what = document_kind(&doc.desc.media_type);
        with_context(
            convert::registry_error(e),
            &format!("pushing {what} {} to {at}", doc.desc.digest),
        )
    };
    let parents = vec![doc.parent.clone()];
    if client.manifest_exists(at, &wire).await.map_err(context)? {
        progress.report(
            Progress::about(progress::ALREADY_EXISTS, key, doc.desc.size, doc.desc.size)
                .with_parents(parents)
                .with_desc(doc.desc.clone()),
        );
        return Ok(false);
    }
    client
        .push_manifest(at, &wire, bytes::Bytes::from(doc.bytes.clone()))
        .await
        .map_err(context)?;
    progress.report(
        Progress::about(progress::COMPLETE, key, doc.desc.size, doc.desc.size)
            .with_parents(parents)
            .with_desc(doc.desc.clone()),
    );
    Ok(true)
}

/// An error with what was being done in front of its message, keeping its kind.
fn with_context(e: Error, context: &str) -> Error {
    let core = berth_core::Error::from(e);
    Error::Core(berth_core::Error::new(
        core.kind(),
        format!("{context}: {}", core.message()),
    ))
}

/// Pushes `blobs`, `limit` at a time; returns how many were sent and how many the registry
/// had.
async fn push_blobs(
    stores: &Stores,
    cx: &CallContext,
    client: &Arc<registry::Client>,
    reference: &Arc<registry::Reference>,
    blobs: Vec<Blob>,
    limit: u32,
    progress: &dyn ProgressSink,
) -> Result<(usize, usize)> {
    let permits = Arc::new(Semaphore::new(limit.max(1) as usize));
    let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
    // Dropping the set (an error, or the caller cancelling) aborts the other uploads.
    let mut tasks = JoinSet::new();
    for blob in blobs {
        let (content, cx, client, reference) = (
            Arc::clone(&stores.content),
            cx.clone(),
            Arc::clone(client),
            Arc::clone(reference),
        );
        let (permits, tx) = (Arc::clone(&permits), tx.clone());
        tasks.spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .map_err(|_| Error::Core(berth_core::Error::internal("upload slots closed")))?;
            push_blob(content.as_ref(), &cx, &client, &reference, &blob, &tx).await
        });
    }
    drop(tx);
    let (mut uploaded, mut existing) = (0, 0);
    loop {
        tokio::select! {
            Some(event) = rx.recv() => progress.report(event),
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(true))) => uploaded += 1,
                Some(Ok(Ok(false))) => existing += 1,
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => {
                    return Err(Error::Core(berth_core::Error::internal(format!(
                        "a blob upload task failed: {e}"
                    ))));
                }
            },
        }
    }
    while let Ok(event) = rx.try_recv() {
        progress.report(event);
    }
    Ok((uploaded, existing))
}

/// A repository of the same registry the blob came from, per its distribution source label.
async fn mount_candidate(
    content: &dyn ContentStore,
    cx: &CallContext,
    reference: &registry::Reference,
    digest: &Digest,
) -> Option<String> {
    let info = content.info(cx, digest).await.ok()?;
    let repos = info
        .labels
        .get(&format!("{LABEL_DISTRIBUTION_SOURCE}{}", reference.domain))?;
    repos
        .split(',')
        .map(str::trim)
        .find(|r| !r.is_empty() && *r != reference.repository)
        .map(str::to_owned)
}

/// Pushes one blob; `true` when sent, `false` when the registry had it (or mounted it).
async fn push_blob(
    content: &dyn ContentStore,
    cx: &CallContext,
    client: &registry::Client,
    reference: &registry::Reference,
    blob: &Blob,
    progress: &mpsc::UnboundedSender<Progress>,
) -> Result<bool> {
    let desc = &blob.desc;
    let key = progress::ref_key(desc);
    let parents = vec![blob.parent.clone()];
    let event = |name: &str, done: u64| {
        Progress::about(name, key.clone(), done, desc.size)
            .with_parents(parents.clone())
            .with_desc(desc.clone())
    };
    let context = |e: registry::Error| {
        with_context(
            convert::registry_error(e),
            &format!("pushing blob {} to {reference}", desc.digest),
        )
    };
    let wire = convert::registry_descriptor(desc)?;
    if client
        .blob_exists(reference, &wire)
        .await
        .map_err(context)?
    {
        let _ = progress.send(event(progress::ALREADY_EXISTS, desc.size));
        return Ok(false);
    }
    let stored = store::exists(content, cx, &desc.digest).await?;
    if !stored {
        if media::is_non_distributable(&desc.media_type) {
            // Such layers are fetched from their URLs, never from the registry.
            tracing::debug!(digest = %desc.digest, "non-distributable layer not stored; not pushed");
            let _ = progress.send(event(progress::ALREADY_EXISTS, desc.size));
            return Ok(false);
        }
        return Err(Error::Core(berth_core::Error::not_found(format!(
            "blob {} listed by {} is not in the content store and not in {reference}: pull or \
             import the image again",
            desc.digest, blob.parent
        ))));
    }
    let from = mount_candidate(content, cx, reference, &desc.digest).await;
    let mut upload = match client
        .start_upload(reference, &wire.digest, from.as_deref())
        .await
        .map_err(context)?
    {
        UploadStart::Mounted => {
            tracing::debug!(digest = %desc.digest, from = ?from, "blob mounted from another repository");
            let _ = progress.send(event(progress::ALREADY_EXISTS, desc.size));
            return Ok(false);
        }
        UploadStart::Session(upload) => *upload,
    };
    let _ = progress.send(event(UPLOADING, 0));
    let mut stream = content.read(cx, &desc.digest, 0, None).await?;
    let mut pending: Vec<u8> = Vec::with_capacity(UPLOAD_CHUNK.min(desc.size as usize));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let mut data = chunk.as_slice();
        while !data.is_empty() {
            if pending.len() == UPLOAD_CHUNK {
                // More bytes follow, so this piece is not the last (which goes in the PUT).
                let piece = std::mem::replace(&mut pending, Vec::with_capacity(UPLOAD_CHUNK));
                client
                    .upload_chunk(&mut upload, bytes::Bytes::from(piece))
                    .await
                    .map_err(context)?;
                let _ = progress.send(event(UPLOADING, upload.offset()));
            }
            let take = (UPLOAD_CHUNK - pending.len()).min(data.len());
            pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }
    client
        .finish_upload(upload, &wire, bytes::Bytes::from(pending))
        .await
        .map_err(context)?;
    let _ = progress.send(event(progress::COMPLETE, desc.size));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::Platform;

    fn manifest(platform: &str, n: u8) -> Descriptor {
        let mut d = Descriptor::new(
            media::OCI_MANIFEST,
            Digest::sha256_of(&[n]),
            u64::from(n) + 100,
        );
        let p = Platform::parse(platform).expect("platform");
        d.platform = Some(p);
        d
    }

    #[test]
    fn platform_lists_keep_the_best_manifest_per_platform() {
        let all = vec![
            manifest("linux/amd64", 1),
            manifest("linux/arm64", 2),
            manifest("linux/arm/v7", 3),
        ];
        assert_eq!(PlatformSelection::All.select_manifests(&all).len(), 3);
        let arm64 = PlatformSelection::Only(vec![Platform::parse("linux/arm64").expect("p")]);
        let kept = arm64.select_manifests(&all);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].digest, all[1].digest);
        let none = PlatformSelection::Only(vec![Platform::parse("windows/amd64").expect("p")]);
        assert!(none.select_manifests(&all).is_empty());
    }

    #[test]
    fn errors_keep_their_kind_behind_context() {
        let e = with_context(
            Error::Core(berth_core::Error::not_found("blob x")),
            "pushing blob x to r",
        );
        let core = berth_core::Error::from(e);
        assert_eq!(core.kind(), ErrorKind::NotFound);
        assert!(
            core.message().starts_with("pushing blob x to r: "),
            "{core:?}"
        );
    }
}
