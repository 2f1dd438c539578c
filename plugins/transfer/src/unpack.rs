//! Unpacking an image's layers into a snapshotter, as containerd's `core/unpack` and the
//! `ctr images import` flow do.
//!
//! For a manifest whose config lists diff ids `d1..dn`, the chain ids are
//! `c1 = d1`, `ck = sha256(c(k-1) + " " + dk)` (OCI image spec, "ChainID"). Per layer, in
//! order:
//!
//! 1. `Stat(ck)`: a committed snapshot means the layer is already unpacked: skip it.
//! 2. `Prepare("extract-<unique> ck", parent c(k-1))` with labels
//!    `containerd.io/snapshot.ref=ck`, `containerd.io/snapshot/diff-id=dk`,
//!    `containerd.io/snapshot/parent-chain-id=c(k-1)` and the layer's own
//!    `containerd.io/snapshot/*` annotations. AlreadyExists with `ck` now present (a remote
//!    snapshotter, or a concurrent unpack) also skips the layer.
//! 3. The differ applies the layer blob to the mounts; the uncompressed digest it returns
//!    must be `dk`, else the snapshot is removed and the unpack fails naming the layer.
//! 4. `Commit(ck, key)` (AlreadyExists: someone else committed it first, which is fine), and
//!    the layer blob gets `containerd.io/uncompressed=dk`.
//!
//! Finally the config blob gets `containerd.io/gc.ref.snapshot.<snapshotter>=cn`, so the
//! image keeps its snapshots alive. A failure removes the extraction snapshot it prepared;
//! layers committed before it stay (they are correct, and the caller's lease decides their
//! fate).
//!
//! Layers are applied one after the other: each needs its parent committed first. In an
//! import every layer is already in the content store. A pull unpacks while it fetches
//! ([`unpack_as_fetched`]): layer k is applied as soon as its blob is stored and layer k-1 is
//! committed, while later layers are still downloading, as containerd 1.7+ does.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use berth_core::content::{Algorithm, CallContext, ContentStore, Digest, Digester};
use berth_core::diff::{ApplyOptions, Differ};
use berth_core::error::{Classify, ErrorKind};
use berth_core::labels::Labels;
use berth_core::snapshot::Snapshotter;

use crate::error::{Error, Result};
use crate::media;
use crate::oci::{self, Descriptor};
use crate::platform::Platform;
use crate::progress::{self, Progress, ProgressSink};
use crate::store;

/// Where and how to unpack images of one platform.
#[derive(Clone)]
pub struct UnpackTarget {
    /// The snapshotter's name (for the `gc.ref.snapshot.<name>` label).
    pub snapshotter_name: String,
    /// The snapshotter, as the metadata layer wraps it (namespaced, leased).
    pub snapshotter: Arc<dyn Snapshotter>,
    /// The differ applying layers.
    pub differ: Arc<dyn Differ>,
    /// Images of this platform (or an older variant it runs) are unpacked.
    pub platform: Platform,
    /// Options passed to every apply (e.g. `sync_fs`).
    pub apply_options: ApplyOptions,
}

impl std::fmt::Debug for UnpackTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnpackTarget")
            .field("snapshotter", &self.snapshotter_name)
            .field("platform", &self.platform)
            .finish_non_exhaustive()
    }
}

impl UnpackTarget {
    /// Whether images of `platform` are unpacked by this target.
    pub fn accepts(&self, platform: &Platform) -> bool {
        self.platform.matches(platform)
    }
}

/// What one unpack did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackReport {
    /// The manifest unpacked.
    pub manifest: Digest,
    /// The snapshotter it went to.
    pub snapshotter: String,
    /// The chain id of the top layer: the snapshot to prepare containers from.
    pub chain_id: Option<Digest>,
    /// Layers applied now.
    pub applied: usize,
    /// Layers whose snapshot already existed.
    pub skipped: usize,
}

/// The chain ids of a stack of layers (OCI image spec): the first is the first diff id;
/// each next is `sha256("<previous chain id> <diff id>")`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.clone(),
            Some(parent) => {
                let mut d = Digester::new(Algorithm::Sha256);
                d.update(format!("{parent} {diff_id}").as_bytes());
                d.finish()
            }
        };
        out.push(next);
    }
    out
}

/// A unique extraction key: containerd's `extract-<nanos>-<random> <chainID>`.
fn extraction_key(chain_id: &Digest) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("extract-{nanos}-{} {chain_id}", &random[..6])
}

/// The manifest's config, parsed, for callers choosing a target by platform.
pub async fn read_config(
    content: &dyn ContentStore,
    cx: &CallContext,
    manifest: &Descriptor,
) -> Result<(oci::ParsedManifest, oci::ImageConfigSubset)> {
    read_config_once_stored(content, cx, manifest, None).await
}

/// [`read_config`] while a fetch stores the blobs: waits until `arrivals` has the config
/// (the manifest must be stored already).
pub async fn read_config_once_stored(
    content: &dyn ContentStore,
    cx: &CallContext,
    manifest: &Descriptor,
    arrivals: Option<&Arrivals>,
) -> Result<(oci::ParsedManifest, oci::ImageConfigSubset)> {
    let bytes = store::read_document(content, cx, &manifest.digest).await?;
    let parsed = oci::parse_manifest(&bytes, &manifest.digest)?;
    if let Some(arrivals) = arrivals {
        arrivals.wait(&parsed.config.digest).await?;
    }
    let config_bytes = store::read_document(content, cx, &parsed.config.digest)
        .await
        .map_err(|e| missing(e, "config", &parsed.config.digest, &manifest.digest))?;
    let config = oci::parse_config(&config_bytes, &parsed.config.digest)?;
    Ok((parsed, config))
}

fn missing(e: Error, what: &str, digest: &Digest, manifest: &Digest) -> Error {
    match &e {
        Error::Core(core) if core.kind() == ErrorKind::NotFound => Error::Missing {
            what: what.to_owned(),
            digest: digest.clone(),
            parent: format!("manifest {manifest}"),
        },
        _ => e,
    }
}

/// Which blobs of a pull (or an archive import) are in the content store so far, for an
/// unpack running alongside the fetch: the fetch marks each blob as it lands (or was there
/// already), and marks the whole set failed when a download fails or the archive ends, so
/// nothing waits for a blob that will never come.
#[derive(Clone, Default)]
pub struct Arrivals {
    state: Arc<tokio::sync::watch::Sender<ArrivalState>>,
}

#[derive(Default)]
struct ArrivalState {
    stored: HashSet<Digest>,
    failed: bool,
}

impl std::fmt::Debug for Arrivals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arrivals").finish_non_exhaustive()
    }
}

impl Arrivals {
    /// Nothing stored yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `digest` is in the content store.
    pub fn stored(&self, digest: &Digest) {
        self.state.send_modify(|s| {
            s.stored.insert(digest.clone());
        });
    }

    /// A download failed, or nothing more will arrive: waiters for blobs not stored stop
    /// waiting (the fetch reports the error).
    pub fn failed(&self) {
        self.state.send_modify(|s| s.failed = true);
    }

    /// Waits until `digest` is stored; an error when the fetch failed first.
    pub async fn wait(&self, digest: &Digest) -> Result<()> {
        let mut rx = self.state.subscribe();
        let result = rx
            .wait_for(|s| s.failed || s.stored.contains(digest))
            .await
            .map(|s| !s.stored.contains(digest));
        match result {
            Ok(false) => Ok(()),
            _ => Err(Error::NotArrived {
                digest: digest.clone(),
            }),
        }
    }
}

/// Unpacks the image `manifest` into `target` (see the module documentation).
pub async fn unpack(
    content: &dyn ContentStore,
    cx: &CallContext,
    target: &UnpackTarget,
    manifest: &Descriptor,
    progress: &dyn ProgressSink,
) -> Result<UnpackReport> {
    unpack_gated(content, cx, target, manifest, progress, None).await
}

/// [`unpack`] while a fetch is storing the manifest's blobs: each layer is applied once
/// `arrivals` says its blob is stored (the manifest and its config must be stored already).
pub async fn unpack_as_fetched(
    content: &dyn ContentStore,
    cx: &CallContext,
    target: &UnpackTarget,
    manifest: &Descriptor,
    progress: &dyn ProgressSink,
    arrivals: &Arrivals,
) -> Result<UnpackReport> {
    unpack_gated(content, cx, target, manifest, progress, Some(arrivals)).await
}

async fn unpack_gated(
    content: &dyn ContentStore,
    cx: &CallContext,
    target: &UnpackTarget,
    manifest: &Descriptor,
    progress: &dyn ProgressSink,
    arrivals: Option<&Arrivals>,
) -> Result<UnpackReport> {
    let (parsed, config) = read_config(content, cx, manifest).await?;
    let layers: Vec<&Descriptor> = parsed
        .layers
        .iter()
        .filter(|l| media::is_layer(&l.media_type))
        .collect();
    if !config.rootfs_type.is_empty() && config.rootfs_type != "layers" {
        return Err(Error::InvalidBlob {
            what: "image config",
            digest: parsed.config.digest.clone(),
            reason: format!("rootfs type {:?} cannot be unpacked", config.rootfs_type),
        });
    }
    if layers.len() != config.diff_ids.len() {
        return Err(Error::InvalidBlob {
            what: "image config",
            digest: parsed.config.digest.clone(),
            reason: format!(
                "it lists {} diff ids for the {} layers of manifest {}",
                config.diff_ids.len(),
                layers.len(),
                manifest.digest
            ),
        });
    }
    let chains = chain_ids(&config.diff_ids);
    let parent_name = progress::ref_key(manifest);
    let mut report = UnpackReport {
        manifest: manifest.digest.clone(),
        snapshotter: target.snapshotter_name.clone(),
        chain_id: chains.last().cloned(),
        applied: 0,
        skipped: 0,
    };
    for (i, layer) in layers.iter().enumerate() {
        let applied = unpack_layer(
            content,
            cx,
            target,
            i,
            layer,
            &config.diff_ids[i],
            &chains,
            &parent_name,
            progress,
            arrivals,
        )
        .await?;
        if applied {
            report.applied += 1;
        } else {
            report.skipped += 1;
        }
    }
    if let Some(top) = &report.chain_id {
        store::set_labels(
            content,
            cx,
            &parsed.config.digest,
            vec![(
                format!(
                    "{}{}",
                    berth_core::metadata::gc::LABEL_REF_SNAPSHOT,
                    target.snapshotter_name
                ),
                top.to_string(),
            )],
        )
        .await?;
    }
    Ok(report)
}

/// Unpacks layer `i`; `false` when its snapshot already existed.
#[allow(clippy::too_many_arguments)]
async fn unpack_layer(
    content: &dyn ContentStore,
    cx: &CallContext,
    target: &UnpackTarget,
    i: usize,
    layer: &Descriptor,
    diff_id: &Digest,
    chains: &[Digest],
    parent_name: &str,
    progress: &dyn ProgressSink,
    arrivals: Option<&Arrivals>,
) -> Result<bool> {
    let sn = target.snapshotter.as_ref();
    let chain_id = &chains[i];
    let chain = chain_id.to_string();
    let parent = (i > 0).then(|| chains[i - 1].to_string());
    let name = progress::ref_key(layer);
    let event = |event: &str, done: u64| {
        progress.report(
            Progress::about(event, name.clone(), done, layer.size)
                .with_desc(layer.clone())
                .with_parents(vec![parent_name.to_owned()]),
        )
    };
    if exists(sn, cx, &chain).await? {
        event(progress::ALREADY_EXISTS, layer.size);
        return Ok(false);
    }
    if let Some(arrivals) = arrivals {
        arrivals.wait(&layer.digest).await?;
    }
    let mut labels: Labels = layer
        .annotations
        .iter()
        .filter(|(k, _)| {
            k.starts_with(media::SNAPSHOT_LABEL_PREFIX) || *k == media::LABEL_SNAPSHOT_REF
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(media::LABEL_SNAPSHOT_REF.to_owned(), chain.clone());
    labels.insert(
        media::LABEL_SNAPSHOT_DIFF_ID.to_owned(),
        diff_id.to_string(),
    );
    if let Some(p) = &parent {
        labels.insert(media::LABEL_SNAPSHOT_PARENT.to_owned(), p.clone());
    }

    let mut prepared = None;
    for _attempt in 0..3 {
        let key = extraction_key(chain_id);
        match sn
            .prepare(cx, &key, parent.as_deref(), labels.clone())
            .await
        {
            Ok(mounts) => {
                prepared = Some((key, mounts));
                break;
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                // Someone made the layer meanwhile (or the snapshotter found it remotely).
                if exists(sn, cx, &chain).await? {
                    event(progress::ALREADY_EXISTS, layer.size);
                    return Ok(false);
                }
            }
            Err(e) => {
                return Err(context(
                    e,
                    &format!(
                        "preparing the extraction snapshot of layer {i} ({})",
                        layer.digest
                    ),
                ));
            }
        }
    }
    let Some((key, mounts)) = prepared else {
        return Err(Error::Core(berth_core::Error::new(
            ErrorKind::AlreadyExists,
            format!("extraction snapshot for {chain} keeps existing without its chain id"),
        )));
    };

    event(progress::EXTRACTING, 0);
    let applied = target
        .differ
        .apply(cx, &layer.to_core(), &mounts, &target.apply_options)
        .await;
    let diff = match applied {
        Ok(diff) => diff,
        Err(e) => {
            remove(sn, cx, &key).await;
            return Err(context(
                e,
                &format!(
                    "extracting layer {i} ({} {}) into {} as {key:?}",
                    layer.media_type, layer.digest, target.snapshotter_name
                ),
            ));
        }
    };
    if diff.digest != *diff_id {
        remove(sn, cx, &key).await;
        return Err(Error::DiffId {
            index: i,
            layer: layer.digest.clone(),
            expected: diff_id.clone(),
            actual: diff.digest,
        });
    }
    match sn.commit(cx, &chain, &key, labels).await {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            // A concurrent unpack committed the same layer first: ours is redundant.
            remove(sn, cx, &key).await;
        }
        Err(e) => {
            remove(sn, cx, &key).await;
            return Err(context(e, &format!("committing layer {i} as {chain}")));
        }
    }
    store::set_labels(
        content,
        cx,
        &layer.digest,
        vec![(media::LABEL_UNCOMPRESSED.to_owned(), diff_id.to_string())],
    )
    .await?;
    event(progress::EXTRACTED, layer.size);
    Ok(true)
}

async fn exists(sn: &dyn Snapshotter, cx: &CallContext, key: &str) -> Result<bool> {
    match sn.stat(cx, key).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn remove(sn: &dyn Snapshotter, cx: &CallContext, key: &str) {
    if let Err(e) = sn.remove(cx, key).await {
        tracing::warn!(%key, error = %e, "cannot remove extraction snapshot");
    }
}

/// The error with what was being done in front, keeping its kind.
fn context(e: berth_core::Error, doing: &str) -> Error {
    Error::Core(berth_core::Error::new(
        e.kind(),
        format!("{doing}: {}", e.message()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .expect("digest")
    }

    #[tokio::test]
    async fn arrivals_release_a_waiter_when_its_blob_is_stored_and_fail_it_when_the_fetch_fails() {
        let arrivals = Arrivals::new();
        let (a, b) = (digest('a'), digest('b'));
        let waiter = {
            let arrivals = arrivals.clone();
            let a = a.clone();
            tokio::spawn(async move { arrivals.wait(&a).await })
        };
        arrivals.stored(&b);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "released by another blob");
        arrivals.stored(&a);
        waiter.await.expect("join").expect("released once stored");
        // Stored before the wait: no waiting at all.
        arrivals.wait(&b).await.expect("already stored");
        let c = digest('c');
        let digest_c = c.clone();
        let waiter = {
            let arrivals = arrivals.clone();
            tokio::spawn(async move { arrivals.wait(&c).await })
        };
        arrivals.failed();
        let err = waiter.await.expect("join").expect_err("the fetch failed");
        assert!(
            matches!(&err, Error::NotArrived { digest } if *digest == digest_c),
            "{err}"
        );
        assert_eq!(err.kind(), ErrorKind::Aborted);
        // What was stored before the failure still counts.
        arrivals.wait(&a).await.expect("stored before the failure");
    }

    #[test]
    fn chain_ids_follow_the_oci_spec() {
        let d1 = Digest::sha256_of(b"1");
        let d2 = Digest::sha256_of(b"2");
        let d3 = Digest::sha256_of(b"3");
        let chains = chain_ids(&[d1.clone(), d2.clone(), d3.clone()]);
        assert_eq!(chains[0], d1);
        let c2 = Digest::sha256_of(format!("{d1} {d2}").as_bytes());
        assert_eq!(chains[1], c2);
        assert_eq!(
            chains[2],
            Digest::sha256_of(format!("{c2} {d3}").as_bytes())
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn extraction_keys_are_unique_and_name_the_chain() {
        let c = Digest::sha256_of(b"c");
        let a = extraction_key(&c);
        let b = extraction_key(&c);
        assert_ne!(a, b);
        assert!(a.starts_with("extract-") && a.ends_with(&format!(" {c}")));
    }
}
