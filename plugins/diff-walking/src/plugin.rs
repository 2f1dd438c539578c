//! The `walking` differ as a plugin (`io.containerd.differ.v1.walking`).
//!
//! Apply reads the layer from the content store of the call's namespace and unpacks it with
//! [`crate::apply`] without mounting anything, as containerd's Linux applier does:
//! - one `overlay` mount with an `upperdir`: the layer goes straight into the upper dir with
//!   whiteouts in overlay form, missing parent directories copied from the lower dirs;
//! - one `bind` mount: the layer goes into its source directory with whiteouts applied.
//!
//! Other mounts are NotImplemented, so the diff service tries the next differ. Compare (diff
//! of two mounts into a layer) is not built yet and answers NotImplemented as well.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;

use berth_core::content::{CallContext, ContentStore};
use berth_core::diff::{ApplyOptions, DiffOptions, Differ, DifferKind};
use berth_core::error::{Classify, Error, ErrorKind, Result};
use berth_core::metadata::{Metadata, MetadataKind};
use berth_core::registry::{InitError, Instance, PluginType, Registration};
use berth_core::snapshot::{Descriptor, Mount};
use tokio_stream::StreamExt;

/// Media types of uncompressed layers this differ reports.
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

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
}

impl WalkingDiffer {
    /// A differ reading layers from `content` (the namespaced store).
    pub fn new(content: Arc<dyn ContentStore>) -> Self {
        WalkingDiffer { content }
    }
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
            media_type: LAYER_TAR.to_owned(),
            digest: report.diff_id,
            size: report.uncompressed_size,
            annotations: Default::default(),
        })
    }

    async fn compare(
        &self,
        _cx: &CallContext,
        _lower: &[Mount],
        _upper: &[Mount],
        _options: &DiffOptions,
    ) -> Result<Descriptor> {
        Err(Error::new(
            ErrorKind::NotImplemented,
            "the walking differ cannot diff mounts into a layer yet",
        ))
    }
}

/// `io.containerd.differ.v1.walking`.
pub fn registration() -> Registration {
    Registration::new(PluginType::DIFFER, "walking", |ctx| async move {
        let metadata: Arc<Metadata> = ctx.single::<MetadataKind>()?;
        let content = metadata
            .content()
            .ok_or_else(|| InitError::Skip("no content store plugin is loaded".to_owned()))?;
        ctx.set_meta(|m| m.platforms.push(crate::plugin::host_platform()));
        Ok(Instance::new::<DifferKind>(Arc::new(WalkingDiffer::new(
            content,
        ))))
    })
    .requires(&[PluginType::METADATA])
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
    fn layer_media_types() {
        assert!(is_layer("application/vnd.oci.image.layer.v1.tar+gzip"));
        assert!(is_layer(
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        ));
        assert!(!is_layer("application/vnd.oci.image.manifest.v1+json"));
    }
}
