//! The `walking` differ as a plugin (`io.containerd.differ.v1.walking`).
//!
//! Apply reads the layer from the content store of the call's namespace and unpacks it with
//! [`crate::apply`] without mounting anything, as containerd's Linux applier does:
//! - one `overlay` mount with an `upperdir`: the layer goes straight into the upper dir with
//!   whiteouts in overlay form, missing parent directories copied from the lower dirs;
//! - one `bind` mount: the layer goes into its source directory with whiteouts applied.
//!
//! Other mounts are NotImplemented, so the diff service tries the next differ. Beyond
//! containerd, absolute entry names are refused, and on an overlay a path through a symlink
//! of a lower layer is refused as it is on a merged tree. A layer whose
//! uncompressed stream exceeds `max_uncompressed_bytes` (the plugin's config, 0 for no bound)
//! is refused as InvalidArgument.
//!
//! Compare mounts both sides read-only in a private mount namespace on a thread of its own
//! ([`crate::compare`]), writes the diff ([`crate::write_diff`]) compressed as the requested
//! media type (gzip by default; plain tar and zstd too; anything else is InvalidArgument)
//! into the content store of the call's namespace under the ingest `reference` (a fresh
//! `diff-...` one by default), and commits it with the caller's labels plus
//! `containerd.io/uncompressed=<diff id>`. Compare needs CAP_SYS_ADMIN.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use berth_core::content::{CallContext, ContentStore, ContentWriter, WriterRequest};
use berth_core::diff::{ApplyOptions, DiffOptions, Differ, DifferKind};
use berth_core::error::{Classify, Error, ErrorKind, Result};
use berth_core::metadata::{Metadata, MetadataKind};
use berth_core::registry::{InitError, Instance, PluginType, Registration};
use berth_core::snapshot::{Descriptor, Mount};
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;

use crate::compare::{
    CompareJob, CompareOutcome, LayerCompression, MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_GZIP,
};

/// The label containerd puts on a compressed layer blob: the digest of its uncompressed tar.
pub const UNCOMPRESSED_LABEL: &str = "containerd.io/uncompressed";

/// `[plugins."io.containerd.differ.v1.walking"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WalkingConfig {
    /// Refuse to apply a layer whose uncompressed stream (or the file data it describes) is
    /// larger than this many bytes: a bound against decompression bombs. 0: no bound, as
    /// containerd.
    pub max_uncompressed_bytes: u64,
}

/// Layer media types this differ can apply (compression is detected from the bytes).
fn is_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.oci.image.layer.nondistributable.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.diff.tar")
        || media_type.starts_with("application/vnd.docker.image.rootfs.foreign.diff.tar")
}

/// Where a layer goes, read from the mounts.
fn target(mounts: &[Mount]) -> Result<(PathBuf, crate::Whiteouts, Vec<PathBuf>)> {
    let [mount] = mounts else {
        return Err(Error::not_implemented(format!(
            "walking differ applies to exactly one mount, not {}",
            mounts.len()
        )));
    };
    let option = |name: &str| {
        mount
            .options
            .iter()
            .find_map(|o| o.strip_prefix(name).map(str::to_owned))
    };
    match mount.kind.as_str() {
        "overlay" => {
            let upper = option("upperdir=").ok_or_else(|| {
                Error::not_implemented("walking differ needs an overlay mount with an upperdir")
            })?;
            let lowers = option("lowerdir=")
                .map(|l| l.split(':').map(PathBuf::from).collect())
                .unwrap_or_default();
            Ok((PathBuf::from(upper), crate::Whiteouts::Overlay, lowers))
        }
        "bind" | "rbind" => {
            if mount.options.iter().any(|o| o == "ro") {
                return Err(Error::invalid_argument(format!(
                    "cannot apply a layer to the read-only mount of {}",
                    mount.source
                )));
            }
            Ok((
                PathBuf::from(&mount.source),
                crate::Whiteouts::Remove,
                Vec::new(),
            ))
        }
        other => Err(Error::not_implemented(format!(
            "walking differ cannot apply to {other:?} mounts"
        ))),
    }
}

/// Feeds an async byte stream to blocking code.
struct ChannelReader {
    chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            match self.chunks.recv() {
                Ok(chunk) => {
                    self.current = chunk?;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The walking differ.
pub struct WalkingDiffer {
    content: Arc<dyn ContentStore>,
    mount_dir: PathBuf,
    max_uncompressed_bytes: Option<u64>,
}

impl WalkingDiffer {
    /// A differ reading and writing layers in `content` (the namespaced store), with no bound
    /// on layer size, mounting for Compare over `<temp dir>/berth-walking-diff`.
    pub fn new(content: Arc<dyn ContentStore>) -> Self {
        WalkingDiffer {
            content,
            mount_dir: std::env::temp_dir().join("berth-walking-diff"),
            max_uncompressed_bytes: None,
        }
    }

    /// Compare's mount points go in a tmpfs mounted over `dir` in a private mount namespace
    /// (created if missing; nothing else should keep files there, they would be hidden).
    pub fn with_mount_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.mount_dir = dir.into();
        self
    }

    /// Refuse to apply layers larger than `bytes` uncompressed (None: no bound).
    pub fn with_max_uncompressed_bytes(mut self, bytes: Option<u64>) -> Self {
        self.max_uncompressed_bytes = bytes;
        self
    }

    /// Runs the compare job on its own thread, streaming the layer into `writer`.
    async fn write_layer(
        &self,
        job: CompareJob,
        writer: &mut Box<dyn ContentWriter>,
    ) -> Result<CompareOutcome> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        // A thread of its own, not a pooled blocking one: it moves into a private mount
        // namespace for good, and the deep recursion of a deep tree wants a large stack.
        std::thread::Builder::new()
            .name("berth-diff".to_owned())
            .stack_size(16 << 20)
            .spawn(move || {
                let sink = ChunkSink {
                    tx,
                    buf: Vec::with_capacity(CHUNK),
                };
                let result = crate::compare::run(&job, sink).map(|(_, outcome)| outcome);
                let _ = done_tx.send(result);
            })
            .map_err(|e| Error::internal(format!("start the diff thread: {e}")))?;
        let mut write_error = None;
        while let Some(chunk) = rx.recv().await {
            if let Err(e) = writer.write(&chunk).await {
                write_error = Some(e);
                break;
            }
        }
        // The thread sees a closed channel and stops (unmounting) if it is still writing.
        drop(rx);
        let outcome = done_rx
            .await
            .map_err(|_| Error::internal("the diff thread ended without a result"))?;
        if let Some(e) = write_error {
            return Err(e);
        }
        outcome.map_err(|e| Error::new(e.kind(), e.to_string()))
    }
}

/// Aborts a compare's own ingest when the compare is dropped midway (the caller cancelled),
/// so a cancelled diff leaves nothing in the store, as a failed one does.
struct AbortOnDrop {
    content: Arc<dyn ContentStore>,
    cx: CallContext,
    reference: String,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(reference = %self.reference, "diff cancelled outside a runtime: its ingest stays");
            return;
        };
        let content = Arc::clone(&self.content);
        let cx = self.cx.clone();
        let reference = std::mem::take(&mut self.reference);
        runtime.spawn(async move {
            // A remote store notices the dropped writer a moment later: until then the ref
            // is locked (Unavailable).
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                match content.abort(&cx, &reference).await {
                    Ok(()) => return,
                    Err(e) if e.kind() == ErrorKind::NotFound => return,
                    Err(e)
                        if e.kind() == ErrorKind::Unavailable
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        tracing::warn!(%reference, "abort the cancelled diff ingest: {e}");
                        return;
                    }
                }
            }
        });
    }
}

/// Bytes sent to the content writer at a time.
const CHUNK: usize = 1 << 20;

/// Hands the layer bytes from the diff thread to the async content writer.
struct ChunkSink {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChunkSink {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(chunk).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the content store stopped taking the layer",
            )
        })
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// A fresh ingest reference, `diff-<time>-<pid>-<sequence>`.
fn unique_reference() -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "diff-{nanos}-{}-{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

#[async_trait::async_trait]
impl Differ for WalkingDiffer {
    async fn apply(
        &self,
        cx: &CallContext,
        desc: &Descriptor,
        mounts: &[Mount],
        options: &ApplyOptions,
    ) -> Result<Descriptor> {
        if !is_layer(&desc.media_type) {
            return Err(Error::not_implemented(format!(
                "walking differ does not apply media type {:?}",
                desc.media_type
            )));
        }
        let (root, whiteouts, parents) = target(mounts)?;
        let mut stream = self.content.read(cx, &desc.digest, 0, None).await?;
        // A few chunks in flight keep reading from the store and unpacking overlapped.
        let (tx, rx) = mpsc::sync_channel(4);
        let feeder = tokio::spawn(async move {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(std::io::Error::other);
                let failed = chunk.is_err();
                let tx = tx.clone();
                let sent = tokio::task::spawn_blocking(move || tx.send(chunk).is_ok())
                    .await
                    .unwrap_or(false);
                if !sent || failed {
                    break;
                }
            }
        });
        let apply_options = crate::ApplyOptions {
            whiteouts,
            parents,
            sync_fs: options.sync_fs,
            max_uncompressed_bytes: self.max_uncompressed_bytes,
            // containerd joins an absolute name to the root; image builders never write
            // one, so in a layer it is a sign of a hostile or broken archive (SPEC P5).
            refuse_absolute_names: true,
            ..crate::ApplyOptions::default()
        };
        let layer = desc.digest.clone();
        let report = tokio::task::spawn_blocking(move || {
            let reader = ChannelReader {
                chunks: rx,
                current: Vec::new(),
                at: 0,
            };
            crate::apply(reader, &root, &apply_options)
        })
        .await
        .map_err(|e| Error::internal(format!("apply task: {e}")))?;
        feeder.abort();
        let report =
            report.map_err(|e| Error::new(e.kind(), format!("apply layer {layer}: {e}")))?;
        Ok(Descriptor {
            media_type: MEDIA_TYPE_LAYER.to_owned(),
            digest: report.diff_id,
            size: report.uncompressed_size,
            annotations: Default::default(),
        })
    }

    async fn compare(
        &self,
        cx: &CallContext,
        lower: &[Mount],
        upper: &[Mount],
        options: &DiffOptions,
    ) -> Result<Descriptor> {
        let media_type = options
            .media_type
            .clone()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| MEDIA_TYPE_LAYER_GZIP.to_owned());
        let compression = LayerCompression::for_media_type(&media_type).ok_or_else(|| {
            Error::invalid_argument(format!(
                "walking differ cannot write layers of media type {media_type:?}: use \
                 application/vnd.oci.image.layer.v1.tar, ...tar+gzip or ...tar+zstd"
            ))
        })?;
        berth_core::labels::validate_all(&options.labels)?;
        let (reference, fresh) = match options.reference.clone().filter(|r| !r.is_empty()) {
            Some(r) => (r, false),
            None => (unique_reference(), true),
        };
        // Declared before the writer so that, when a cancelled call drops this future, the
        // writer goes first and releases the ref the abort then removes. Armed before the
        // writer is opened: a call cancelled while a remote store is opening the ingest must
        // remove it too (a fresh reference is this call's alone; an abort of one that was
        // never created finds nothing).
        let mut abandoned = AbortOnDrop {
            content: Arc::clone(&self.content),
            cx: cx.clone(),
            reference: reference.clone(),
            armed: fresh,
        };
        let mut writer = self
            .content
            .writer(
                cx,
                WriterRequest {
                    reference: reference.clone(),
                    total: 0,
                    expected: None,
                },
            )
            .await?;
        let job = CompareJob {
            lower: lower.to_vec(),
            upper: upper.to_vec(),
            mount_dir: self.mount_dir.clone(),
            compression,
            source_date_epoch: options.source_date_epoch,
        };
        // A named ingest may hold an earlier attempt's bytes: start it over, as containerd.
        let written = if fresh {
            self.write_layer(job, &mut writer).await
        } else {
            match writer.truncate(0).await {
                Ok(()) => self.write_layer(job, &mut writer).await,
                Err(e) => Err(e),
            }
        };
        let outcome = match written {
            Ok(outcome) => outcome,
            Err(e) => {
                if let Err(close) = writer.close().await {
                    tracing::warn!(%reference, "close the failed diff ingest: {close}");
                }
                abandoned.armed = false;
                if fresh && let Err(abort) = self.content.abort(cx, &reference).await {
                    tracing::warn!(%reference, "abort the failed diff ingest: {abort}");
                }
                return Err(e);
            }
        };
        let digest = writer.digest();
        let mut labels = options.labels.clone();
        labels.insert(UNCOMPRESSED_LABEL.to_owned(), outcome.diff_id.to_string());
        let committed = writer.commit(0, Some(digest.clone()), labels).await;
        // Committed or not, the ingest is the store's business from here (containerd leaves
        // a failed commit's ingest for the caller to retry or abort).
        abandoned.armed = false;
        match committed {
            Ok(()) => {}
            // The same layer was written before: it is the answer, as in containerd.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let mut info = self.content.info(cx, &digest).await?;
        if !info.labels.contains_key(UNCOMPRESSED_LABEL) {
            info.labels
                .insert(UNCOMPRESSED_LABEL.to_owned(), outcome.diff_id.to_string());
            info = self
                .content
                .update(cx, info, &[format!("labels.{UNCOMPRESSED_LABEL}")])
                .await?;
        }
        tracing::debug!(
            %digest,
            diff_id = %outcome.diff_id,
            entries = outcome.report.entries,
            whiteouts = outcome.report.whiteouts,
            "wrote diff layer"
        );
        Ok(Descriptor {
            media_type,
            digest: info.digest,
            size: info.size,
            annotations: Default::default(),
        })
    }
}

/// `io.containerd.differ.v1.walking`.
pub fn registration() -> Registration {
    Registration::new(PluginType::DIFFER, "walking", |ctx| async move {
        let config: WalkingConfig = ctx.config()?;
        let metadata: Arc<Metadata> = ctx.single::<MetadataKind>()?;
        let content = metadata
            .content()
            .ok_or_else(|| InitError::Skip("no content store plugin is loaded".to_owned()))?;
        ctx.set_meta(|m| m.platforms.push(crate::plugin::host_platform()));
        let differ = WalkingDiffer::new(content)
            .with_mount_dir(ctx.state().join("mounts"))
            .with_max_uncompressed_bytes(
                Some(config.max_uncompressed_bytes).filter(|bytes| *bytes != 0),
            );
        Ok(Instance::new::<DifferKind>(Arc::new(differ)))
    })
    .requires(&[PluginType::METADATA])
    .with_config::<WalkingConfig>()
}

/// `linux/<arch>` of this machine, as OCI names architectures.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("linux/{arch}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(kind: &str, options: &[&str]) -> Mount {
        Mount {
            kind: kind.into(),
            source: "/src".into(),
            target: String::new(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn targets_from_mounts() {
        let (root, w, parents) = target(&[mount(
            "overlay",
            &["workdir=/w", "upperdir=/u", "lowerdir=/a:/b"],
        )])
        .expect("overlay");
        assert_eq!(root, PathBuf::from("/u"));
        assert_eq!(w, crate::Whiteouts::Overlay);
        assert_eq!(parents, [PathBuf::from("/a"), PathBuf::from("/b")]);
        let (root, w, _) = target(&[mount("bind", &["rbind", "rw"])]).expect("bind");
        assert_eq!(root, PathBuf::from("/src"));
        assert_eq!(w, crate::Whiteouts::Remove);
        let kind = |m: &[Mount]| target(m).map(|_| ()).map_err(|e| e.kind()).err();
        assert_eq!(
            kind(&[mount("erofs", &[])]),
            Some(ErrorKind::NotImplemented)
        );
        assert_eq!(
            kind(&[mount("overlay", &["lowerdir=/a:/b"])]),
            Some(ErrorKind::NotImplemented)
        );
        assert_eq!(
            kind(&[mount("bind", &["rbind", "ro"])]),
            Some(ErrorKind::InvalidArgument)
        );
        assert_eq!(kind(&[]), Some(ErrorKind::NotImplemented));
    }

    #[test]
    fn config_defaults_to_no_bound_and_reads_the_key() {
        let printed = toml::to_string(&WalkingConfig::default()).expect("toml");
        assert_eq!(printed.trim(), "max_uncompressed_bytes = 0");
        let read: WalkingConfig =
            toml::from_str("max_uncompressed_bytes = 1048576").expect("parse");
        assert_eq!(read.max_uncompressed_bytes, 1 << 20);
    }

    #[test]
    fn references_are_unique() {
        let a = unique_reference();
        assert!(a.starts_with("diff-"), "{a}");
        assert_ne!(a, unique_reference());
    }

    #[test]
    fn layer_media_types() {
        assert!(is_layer("application/vnd.oci.image.layer.v1.tar+gzip"));
        assert!(is_layer(
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        ));
        assert!(!is_layer("application/vnd.oci.image.manifest.v1+json"));
    }
}
