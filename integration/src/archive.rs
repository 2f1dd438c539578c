//! Small OCI image archives built by hand for tests, byte for byte.
//!
//! [`Entry`] names and link targets go into the tar headers exactly as given, without the
//! `tar` crate's checks (which refuse `..` and absolute names), so a test can write the
//! hostile layers an applier must refuse: names climbing out with `..`, absolute names,
//! whiteouts of `..`, links out of the root. Every entry belongs to root:root and carries the
//! fixed time [`MTIME`].
//!
//! [`OciArchive`] wraps layers in an OCI image layout archive that ctr 1.6 imports: one
//! linux image of this machine's architecture, its index entry annotated with
//! `io.containerd.image.name` (ctr 1.6 names the image from it).
//!
//! ```no_run
//! use berth_integration::archive::{Compression, Entry, OciArchive};
//! let built = OciArchive::new()
//!     .layer(vec![Entry::dir("etc"), Entry::file("etc/hello", "hello\n")], Compression::Gzip)
//!     .build(std::path::Path::new("/tmp/tiny.tar"), "docker.io/library/tiny:1")
//!     .expect("archive");
//! assert_eq!(built.chain_ids.len(), 1);
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::api::sha256_digest;
use crate::images::chain_ids;

/// The modification time of every entry and of the image config.
pub const MTIME: u64 = 1_700_000_000;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// The plain tar (`application/vnd.oci.image.layer.v1.tar`).
    None,
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`).
    Gzip,
}

impl Compression {
    /// The OCI media type of a layer so compressed.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        }
    }

    /// Compresses a layer tar.
    pub fn apply(self, tar: &[u8]) -> Result<Vec<u8>> {
        match self {
            Compression::None => Ok(tar.to_vec()),
            Compression::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(tar).context("gzip")?;
                e.finish().context("gzip")
            }
        }
    }
}

/// What a tar entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// A hard link to this entry name.
    HardLink(String),
}

/// One tar entry, its name written verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name as it goes into the header (at most 100 bytes: no GNU long names).
    pub name: String,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
}

impl Entry {
    /// A directory, mode 0755.
    pub fn dir(name: &str) -> Entry {
        Entry {
            name: name.to_owned(),
            kind: EntryKind::Dir,
            mode: 0o755,
        }
    }

    /// A regular file, mode 0644.
    pub fn file(name: &str, data: impl Into<Vec<u8>>) -> Entry {
        Entry {
            name: name.to_owned(),
            kind: EntryKind::File(data.into()),
            mode: 0o644,
        }
    }

    /// A symbolic link, mode 0777.
    pub fn symlink(name: &str, target: &str) -> Entry {
        Entry {
            name: name.to_owned(),
            kind: EntryKind::Symlink(target.to_owned()),
            mode: 0o777,
        }
    }

    /// A hard link to the entry (or path) `target`, mode 0644.
    pub fn hard_link(name: &str, target: &str) -> Entry {
        Entry {
            name: name.to_owned(),
            kind: EntryKind::HardLink(target.to_owned()),
            mode: 0o644,
        }
    }

    /// An OCI whiteout of `name` (`dir/.wh.name`) in `dir` (empty for the root).
    pub fn whiteout(dir: &str, name: &str) -> Entry {
        let marker = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        Entry::file(&marker, Vec::new())
    }
}

/// Copies `value` into a fixed header field; an error if it does not fit.
fn put_field(field: &mut [u8], value: &str, what: &str) -> Result<()> {
    let bytes = value.as_bytes();
    if bytes.len() > field.len() {
        bail!(
            "{what} {value:?} is longer than {} bytes; this builder writes no GNU long names",
            field.len()
        );
    }
    field.fill(0);
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// A layer tar of `entries`, in order, with names and link targets exactly as given.
pub fn layer_tar(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(e.mode);
        let (kind, data, link): (_, &[u8], Option<&str>) = match &e.kind {
            EntryKind::Dir => (tar::EntryType::Directory, &[], None),
            EntryKind::File(d) => (tar::EntryType::Regular, d, None),
            EntryKind::Symlink(t) => (tar::EntryType::Symlink, &[], Some(t)),
            EntryKind::HardLink(t) => (tar::EntryType::Link, &[], Some(t)),
        };
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        let old = h.as_old_mut();
        put_field(&mut old.name, &e.name, "entry name")?;
        if let Some(link) = link {
            put_field(&mut old.linkname, link, "link target")?;
        }
        h.set_cksum();
        builder
            .append(&h, data)
            .with_context(|| format!("adding {:?} to a layer", e.name))?;
    }
    builder.into_inner().context("finishing a layer tar")
}

/// The OCI name of this machine's architecture.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// An OCI image archive in the making: layers bottom first.
#[derive(Debug, Clone, Default)]
pub struct OciArchive {
    layers: Vec<(LayerSource, Compression)>,
}

#[derive(Debug, Clone)]
enum LayerSource {
    Entries(Vec<Entry>),
    Tar(Vec<u8>),
}

/// What [`OciArchive::build`] wrote.
#[derive(Debug, Clone)]
pub struct BuiltArchive {
    /// The archive file.
    pub path: PathBuf,
    /// The image name in the index annotation.
    pub name: String,
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// Digest of the image config.
    pub config_digest: String,
    /// Digest of each layer blob, bottom first.
    pub layer_digests: Vec<String>,
    /// Diff id of each layer (digest of its tar), bottom first.
    pub diff_ids: Vec<String>,
    /// Chain id of each layer, top last: the snapshot names an unpack commits.
    pub chain_ids: Vec<String>,
}

impl BuiltArchive {
    /// The chain id of the top layer.
    pub fn top_chain_id(&self) -> &str {
        self.chain_ids.last().map(String::as_str).unwrap_or("")
    }

    /// Every blob digest of the image (manifest, config, layers).
    pub fn blobs(&self) -> Vec<String> {
        let mut v = vec![self.manifest_digest.clone(), self.config_digest.clone()];
        v.extend(self.layer_digests.iter().cloned());
        v
    }
}

impl OciArchive {
    /// An image with no layers yet.
    pub fn new() -> Self {
        OciArchive::default()
    }

    /// Adds a layer made of `entries`.
    pub fn layer(mut self, entries: Vec<Entry>, compression: Compression) -> Self {
        self.layers
            .push((LayerSource::Entries(entries), compression));
        self
    }

    /// Adds a layer from a tar made elsewhere (its diff id is computed from these bytes).
    pub fn layer_tar(mut self, tar: Vec<u8>, compression: Compression) -> Self {
        self.layers.push((LayerSource::Tar(tar), compression));
        self
    }

    /// Writes the archive to `path`, naming the image `name`.
    pub fn build(&self, path: &Path, name: &str) -> Result<BuiltArchive> {
        let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
        let mut put = |data: Vec<u8>| {
            let digest = sha256_digest(&data);
            let size = data.len();
            if !blobs.iter().any(|(d, _)| *d == digest) {
                blobs.push((digest.clone(), data));
            }
            (digest, size)
        };
        let mut diff_ids = Vec::new();
        let mut layers = Vec::new();
        for (source, compression) in &self.layers {
            let tar = match source {
                LayerSource::Entries(e) => layer_tar(e)?,
                LayerSource::Tar(t) => t.clone(),
            };
            diff_ids.push(sha256_digest(&tar));
            let (digest, size) = put(compression.apply(&tar)?);
            layers.push(json!({
                "mediaType": compression.media_type(),
                "digest": digest,
                "size": size,
            }));
        }
        let config = json!({
            "architecture": host_arch(),
            "os": "linux",
            "created": "2023-11-14T22:13:20Z",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let (config_digest, config_size) = put(serde_json::to_vec(&config)?);
        let layer_digests = layers
            .iter()
            .map(|l| l["digest"].as_str().unwrap_or_default().to_owned())
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": layers,
        });
        let (manifest_digest, manifest_size) = put(serde_json::to_vec(&manifest)?);
        let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": tag,
                },
                "platform": {"architecture": host_arch(), "os": "linux"},
            }],
        });

        let file = std::fs::File::create(path)
            .with_context(|| format!("creating the archive {}", path.display()))?;
        let mut out = tar::Builder::new(std::io::BufWriter::new(file));
        let mut add = |entry: &str, data: &[u8]| -> Result<()> {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_mtime(MTIME);
            h.set_size(data.len() as u64);
            out.append_data(&mut h, entry, data)
                .with_context(|| format!("adding {entry} to {}", path.display()))
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        add("index.json", &serde_json::to_vec(&index)?)?;
        for (digest, data) in &blobs {
            let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
            add(&format!("blobs/sha256/{hex}"), data)?;
        }
        out.into_inner()
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .with_context(|| format!("finishing {}", path.display()))?;
        Ok(BuiltArchive {
            path: path.to_path_buf(),
            name: name.to_owned(),
            manifest_digest,
            config_digest,
            layer_digests,
            chain_ids: chain_ids(&diff_ids),
            diff_ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_written_verbatim() {
        let tar = layer_tar(&[
            Entry::file("../../etc/evil", "x"),
            Entry::file("/abs", "y"),
            Entry::hard_link("h", "../../etc/passwd"),
            Entry::whiteout("", ".."),
        ])
        .expect("tar");
        let mut archive = tar::Archive::new(&tar[..]);
        let names: Vec<(Vec<u8>, Option<Vec<u8>>)> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.path_bytes().into_owned(),
                    e.link_name_bytes().map(|l| l.into_owned()),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                (b"../../etc/evil".to_vec(), None),
                (b"/abs".to_vec(), None),
                (b"h".to_vec(), Some(b"../../etc/passwd".to_vec())),
                (b".wh...".to_vec(), None),
            ]
        );
    }

    #[test]
    fn a_name_too_long_is_an_error() {
        let long = "a".repeat(101);
        let err = layer_tar(&[Entry::file(&long, "")]).expect_err("too long");
        assert!(err.to_string().contains("longer than 100 bytes"), "{err}");
    }

    #[test]
    fn chain_ids_and_blobs_are_reported() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("a.tar");
        let built = OciArchive::new()
            .layer(vec![Entry::file("a", "1")], Compression::Gzip)
            .layer(vec![Entry::file("b", "2")], Compression::None)
            .build(&path, "docker.io/library/x:2")
            .expect("build");
        assert_eq!(built.diff_ids.len(), 2);
        assert_eq!(built.chain_ids[0], built.diff_ids[0]);
        assert_eq!(
            built.chain_ids[1],
            sha256_digest(format!("{} {}", built.diff_ids[0], built.diff_ids[1]).as_bytes())
        );
        // The uncompressed layer's blob is its tar.
        assert_eq!(built.layer_digests[1], built.diff_ids[1]);
        assert_ne!(built.layer_digests[0], built.diff_ids[0]);
        let mut names: Vec<String> = tar::Archive::new(std::fs::File::open(&path).expect("open"))
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        assert_eq!(names.len(), 2 + built.blobs().len());
        assert!(names.contains(&"index.json".to_owned()));
    }
}
