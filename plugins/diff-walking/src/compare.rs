//! Compare as a blocking job: mount both sides read-only in a private mount namespace, write
//! the diff through a compressor, hash the uncompressed stream for the diff id.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use berth_core::content::{Algorithm, Digest, Digester};
use berth_core::snapshot::Mount;

use crate::changes::{DiffReport, DiffWriteOptions, write_diff};
use crate::error::{Error, Result};
use crate::mount::{PrivateNamespace, mount_read_only};

/// OCI media type of an uncompressed layer.
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI media type of a gzip-compressed layer (Compare's default).
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI media type of a zstd-compressed layer.
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// How a written layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// A plain tar.
    None,
    /// gzip at the default level, as containerd.
    Gzip,
    /// zstd at level 3, containerd's default.
    Zstd,
}

impl LayerCompression {
    /// The compression of a layer media type Compare can write, or None.
    pub fn for_media_type(media_type: &str) -> Option<LayerCompression> {
        match media_type {
            MEDIA_TYPE_LAYER => Some(LayerCompression::None),
            MEDIA_TYPE_LAYER_GZIP => Some(LayerCompression::Gzip),
            MEDIA_TYPE_LAYER_ZSTD => Some(LayerCompression::Zstd),
            _ => None,
        }
    }
}

/// A compressor in front of a writer.
enum Encoder<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    fn new(out: W, compression: LayerCompression) -> io::Result<Self> {
        Ok(match compression {
            LayerCompression::None => Encoder::Plain(out),
            LayerCompression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                out,
                flate2::Compression::default(),
            )),
            LayerCompression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(out, 3)?),
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

/// Hashes and counts what passes through.
struct Hashing<W> {
    inner: W,
    digester: Digester,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digester.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What a compare job produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompareOutcome {
    /// Digest of the uncompressed tar: the layer's diff id.
    pub diff_id: Digest,
    /// Length of the uncompressed tar.
    pub uncompressed_size: u64,
    /// What the walk wrote.
    pub report: DiffReport,
}

/// A Compare to run on a thread of its own.
#[derive(Debug, Clone)]
pub struct CompareJob {
    /// The lower side's mounts (empty: an empty tree).
    pub lower: Vec<Mount>,
    /// The upper side's mounts.
    pub upper: Vec<Mount>,
    /// An existing directory reserved for this differ's mount points (see [`run`]).
    pub mount_dir: PathBuf,
    /// How to compress.
    pub compression: LayerCompression,
    /// Clamp mtimes to this time.
    pub source_date_epoch: Option<SystemTime>,
}

/// Runs `job`, writing the compressed layer to `out`; returns `out` and the outcome.
///
/// The calling thread moves into a private mount namespace and covers `job.mount_dir` with a
/// tmpfs there (see `mount`): call it on a thread spawned for it, never on a pooled one, and
/// give it a directory nothing else keeps files in. Needs CAP_SYS_ADMIN.
pub fn run<W: Write>(job: &CompareJob, out: W) -> Result<(W, CompareOutcome)> {
    std::fs::create_dir_all(&job.mount_dir).map_err(|source| Error::Mount {
        what: format!("create {}", job.mount_dir.display()),
        source,
    })?;
    let namespace = PrivateNamespace::enter(&job.mount_dir)?;
    let lower_dir = namespace.mount_point("lower")?;
    let upper_dir = namespace.mount_point("upper")?;
    let lower = mount_read_only(&job.lower, &lower_dir)?;
    let upper = mount_read_only(&job.upper, &upper_dir)?;
    let result = write_layer(&lower_dir, &upper_dir, out, job);
    drop(upper);
    drop(lower);
    drop(namespace);
    result
}

fn write_layer<W: Write>(
    lower: &Path,
    upper: &Path,
    out: W,
    job: &CompareJob,
) -> Result<(W, CompareOutcome)> {
    let output = |source| Error::Output { source };
    let hashing = Hashing {
        inner: Encoder::new(out, job.compression).map_err(output)?,
        digester: Digester::new(Algorithm::Sha256),
        len: 0,
    };
    let options = DiffWriteOptions {
        source_date_epoch: job.source_date_epoch,
    };
    let (hashing, report) = write_diff(lower, upper, hashing, &options)?;
    let Hashing {
        inner,
        digester,
        len,
    } = hashing;
    let mut out = inner.finish().map_err(output)?;
    out.flush().map_err(output)?;
    Ok((
        out,
        CompareOutcome {
            diff_id: digester.finish(),
            uncompressed_size: len,
            report,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert_eq!(
            LayerCompression::for_media_type(MEDIA_TYPE_LAYER_GZIP),
            Some(LayerCompression::Gzip)
        );
        assert_eq!(
            LayerCompression::for_media_type(MEDIA_TYPE_LAYER),
            Some(LayerCompression::None)
        );
        assert_eq!(
            LayerCompression::for_media_type(MEDIA_TYPE_LAYER_ZSTD),
            Some(LayerCompression::Zstd)
        );
        assert_eq!(
            LayerCompression::for_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            None
        );
    }

    #[test]
    fn encoders_compress_what_the_decompressor_reads_back() {
        for c in [
            LayerCompression::None,
            LayerCompression::Gzip,
            LayerCompression::Zstd,
        ] {
            let mut e = Encoder::new(Vec::new(), c).expect("encoder");
            e.write_all(b"layer bytes").expect("write");
            let bytes = e.finish().expect("finish");
            let (_, mut r) = crate::decompress(&bytes[..]).expect("detect");
            let mut back = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut back).expect("read");
            assert_eq!(back, b"layer bytes", "{c:?}");
        }
    }
}
