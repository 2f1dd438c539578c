//! Exporting images to an OCI archive (containerd's `core/images/archive/exporter.go`).
//!
//! The archive is a tar of an OCI image layout: `oci-layout`, `index.json` listing each
//! image's target annotated with its name (`io.containerd.image.name` and
//! `org.opencontainers.image.ref.name`), `blobs/<alg>/<hex>` for every blob the images need,
//! and, unless skipped, a Docker-compatible `manifest.json` (`Config`, `RepoTags`, `Layers`)
//! so `docker load` reads it too. Entries are sorted by name and written with mtime 0,
//! owner 0:0, so the same images always give the same bytes.
//!
//! For an image whose target is an index, only the manifests of the wanted platforms (the
//! host's by default) are written, or all with `all_platforms`; the index itself is written
//! whole. `manifest.json` names, per index, its best manifest for the wanted platforms.
//! Every blob is verified against its digest while it is copied; a missing blob fails the
//! export.

use std::collections::{BTreeMap, BTreeSet};

use berth_core::content::{CallContext, ContentStore, Digester};
use berth_core::metadata::images::Image;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_stream::StreamExt;

use crate::error::{Error, Result};
use crate::import::Stores;
use crate::media;
use crate::oci::{self, Descriptor, DockerArchiveEntry, ImageLayout, Index};
use crate::platform::{Platform, PlatformSelection};
use crate::progress::{self, Progress, ProgressSink};
use crate::reference;
use crate::store;

/// Label prefix of content whose distribution source annotations are carried into the index.
const LABEL_DISTRIBUTION_SOURCE: &str = "containerd.io/distribution.source";

/// How to export (containerd's `ImageExportStream` options).
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// The wanted platforms, in order of preference; empty means the host's.
    pub platforms: Vec<Platform>,
    /// Write the manifests of every platform (the wanted ones still choose `manifest.json`).
    pub all_platforms: bool,
    /// Do not write the Docker-compatible `manifest.json`.
    pub skip_docker_manifest: bool,
    /// Leave out non-distributable layers (Windows base layers).
    pub skip_non_distributable: bool,
}

/// What goes into one tar entry.
enum Source {
    Bytes(Vec<u8>),
    Blob(Box<Descriptor>),
    Dir,
}

struct Record {
    name: String,
    mode: u32,
    source: Source,
}

fn blob_path(desc: &Descriptor) -> String {
    format!(
        "blobs/{}/{}",
        desc.digest.algorithm().name(),
        desc.digest.hex()
    )
}

struct Collector<'a> {
    content: &'a dyn ContentStore,
    cx: &'a CallContext,
    options: &'a ExportOptions,
    records: Vec<Record>,
    algorithms: BTreeSet<&'static str>,
}

impl Collector<'_> {
    fn blob(&mut self, desc: &Descriptor) {
        if self.options.skip_non_distributable && media::is_non_distributable(&desc.media_type) {
            return;
        }
        self.algorithms.insert(desc.digest.algorithm().name());
        self.records.push(Record {
            name: blob_path(desc),
            mode: 0o444,
            source: Source::Blob(Box::new(desc.clone())),
        });
    }

    /// Records `desc` and everything below it (containerd's `getRecords`).
    async fn walk(&mut self, desc: &Descriptor) -> Result<()> {
        let mut stack = vec![desc.clone()];
        while let Some(d) = stack.pop() {
            self.blob(&d);
            let children = if media::is_manifest(&d.media_type) {
                let bytes = store::read_document(self.content, self.cx, &d.digest).await?;
                let m = oci::parse_manifest(&bytes, &d.digest)?;
                let mut c = vec![m.config];
                c.extend(m.layers);
                c
            } else if media::is_index(&d.media_type) {
                let bytes = store::read_document(self.content, self.cx, &d.digest).await?;
                oci::parse_index(&bytes, &d.digest)?.manifests
            } else {
                Vec::new()
            };
            stack.extend(children.into_iter().rev());
        }
        Ok(())
    }
}

/// The image's target annotated with its name, plus distribution source labels of its blob.
async fn export_target(
    content: &dyn ContentStore,
    cx: &CallContext,
    image: &Image,
) -> Result<Descriptor> {
    let mut desc = Descriptor::from_core(&image.target);
    desc.annotations
        .insert(media::ANNOTATION_IMAGE_NAME.to_owned(), image.name.clone());
    desc.annotations.insert(
        media::ANNOTATION_REF_NAME.to_owned(),
        reference::oci_ref_name(&image.name),
    );
    let info = content.info(cx, &desc.digest).await?;
    for (k, v) in info.labels {
        if k.starts_with(LABEL_DISTRIBUTION_SOURCE) {
            desc.annotations.insert(k, v);
        }
    }
    Ok(desc)
}

/// Writes `images` as an OCI archive to `sink` (see the module documentation).
pub async fn export<W: AsyncWrite + Unpin + Send + ?Sized>(
    stores: &Stores,
    cx: &CallContext,
    images: &[Image],
    options: &ExportOptions,
    sink: &mut W,
    progress: &dyn ProgressSink,
) -> Result<()> {
    progress.report(Progress::status(progress::EXPORTING));
    let content = stores.content.as_ref();
    let wanted = if options.platforms.is_empty() {
        PlatformSelection::host()
    } else {
        PlatformSelection::Only(options.platforms.clone())
    };
    let layout = oci::to_go_json(&ImageLayout {
        version: oci::IMAGE_LAYOUT_VERSION.to_owned(),
    });
    let mut c = Collector {
        content,
        cx,
        options,
        records: vec![Record {
            name: "oci-layout".into(),
            mode: 0o444,
            source: Source::Bytes(layout),
        }],
        algorithms: BTreeSet::new(),
    };
    let mut targets = Vec::with_capacity(images.len());
    for image in images {
        targets.push(export_target(content, cx, image).await?);
    }
    // Manifests named in manifest.json, in the order first seen: digest -> (desc, names).
    let mut docker: Vec<(Descriptor, Vec<String>)> = Vec::new();
    let mut resolved: BTreeMap<String, Option<Descriptor>> = BTreeMap::new();
    for desc in &targets {
        let name = desc.annotations.get(media::ANNOTATION_IMAGE_NAME).cloned();
        let manifest = if media::is_manifest(&desc.media_type) {
            if !docker.iter().any(|(d, _)| d.digest == desc.digest) {
                c.walk(desc).await?;
            }
            Some(desc.clone())
        } else if media::is_index(&desc.media_type) {
            let key = desc.digest.to_string();
            if !resolved.contains_key(&key) {
                c.blob(desc);
                let bytes = store::read_document(content, cx, &desc.digest).await?;
                let index = oci::parse_index(&bytes, &desc.digest)?;
                let mut candidates = Vec::new();
                for m in &index.manifests {
                    if wanted.keeps(m.platform.as_ref()) {
                        candidates.push(m.clone());
                    } else if !options.all_platforms {
                        continue;
                    }
                    c.walk(m).await?;
                }
                candidates.sort_by_key(|m| wanted.rank(m.platform.as_ref()));
                let best = candidates.into_iter().next();
                if best.is_none() {
                    return Err(Error::NoMatchingPlatform(wanted.to_string()));
                }
                resolved.insert(key.clone(), best);
            }
            resolved.get(&key).cloned().flatten()
        } else {
            return Err(Error::Core(berth_core::Error::invalid_argument(format!(
                "image {:?} points at {} ({}): only manifests and indexes can be exported",
                name.unwrap_or_default(),
                desc.digest,
                desc.media_type
            ))));
        };
        if let Some(m) = manifest {
            let at = match docker.iter().position(|(d, _)| d.digest == m.digest) {
                Some(at) => at,
                None => {
                    docker.push((m, Vec::new()));
                    docker.len() - 1
                }
            };
            if let Some(name) = name {
                docker[at].1.push(name);
            }
        }
    }
    let index = Index {
        schema_version: 2,
        media_type: media::OCI_INDEX.to_owned(),
        manifests: targets,
        annotations: Default::default(),
    };
    c.records.push(Record {
        name: "index.json".into(),
        mode: 0o644,
        source: Source::Bytes(oci::to_go_json(&index)),
    });
    if !options.skip_docker_manifest && !docker.is_empty() {
        let mut entries = Vec::with_capacity(docker.len());
        for (m, names) in &docker {
            let bytes = store::read_document(content, cx, &m.digest).await?;
            let parsed = oci::parse_manifest(&bytes, &m.digest)?;
            entries.push(DockerArchiveEntry {
                config: blob_path(&parsed.config),
                repo_tags: names
                    .iter()
                    .map(|n| reference::familiarize(n))
                    .collect::<Result<_>>()?,
                layers: parsed.layers.iter().map(blob_path).collect(),
            });
        }
        c.records.push(Record {
            name: "manifest.json".into(),
            mode: 0o644,
            source: Source::Bytes(oci::to_go_json(&entries)),
        });
    }
    if !c.algorithms.is_empty() {
        c.records.push(Record {
            name: "blobs/".into(),
            mode: 0o755,
            source: Source::Dir,
        });
        for alg in &c.algorithms {
            c.records.push(Record {
                name: format!("blobs/{alg}/"),
                mode: 0o755,
                source: Source::Dir,
            });
        }
    }
    let mut records = c.records;
    records.sort_by(|a, b| a.name.cmp(&b.name));
    records.dedup_by(|a, b| a.name == b.name);
    for record in &records {
        write_record(content, cx, sink, record).await?;
    }
    // Two zero blocks end a tar.
    write(sink, &[0u8; 1024]).await?;
    sink.flush().await.map_err(sink_error)?;
    progress.report(Progress::status(progress::COMPLETED_EXPORT));
    Ok(())
}

fn sink_error(e: std::io::Error) -> Error {
    Error::Core(berth_core::Error::new(
        berth_core::ErrorKind::Unavailable,
        format!("writing the export stream: {e}"),
    ))
}

async fn write<W: AsyncWrite + Unpin + ?Sized>(sink: &mut W, data: &[u8]) -> Result<()> {
    sink.write_all(data).await.map_err(sink_error)
}

fn header(name: &str, mode: u32, size: u64, kind: tar::EntryType) -> Result<[u8; 512]> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).map_err(|e| {
        Error::Core(berth_core::Error::internal(format!(
            "tar header for {name:?}: {e}"
        )))
    })?;
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(kind);
    h.set_cksum();
    let mut out = [0u8; 512];
    out.copy_from_slice(h.as_bytes());
    Ok(out)
}

async fn write_record<W: AsyncWrite + Unpin + ?Sized>(
    content: &dyn ContentStore,
    cx: &CallContext,
    sink: &mut W,
    record: &Record,
) -> Result<()> {
    let size = match &record.source {
        Source::Bytes(b) => b.len() as u64,
        Source::Blob(d) => d.size,
        Source::Dir => 0,
    };
    let kind = match record.source {
        Source::Dir => tar::EntryType::Directory,
        _ => tar::EntryType::Regular,
    };
    write(sink, &header(&record.name, record.mode, size, kind)?).await?;
    match &record.source {
        Source::Dir => return Ok(()),
        Source::Bytes(b) => write(sink, b).await?,
        Source::Blob(desc) => {
            let mut stream = content.read(cx, &desc.digest, 0, None).await?;
            let mut digester = Digester::new(desc.digest.algorithm());
            let mut copied = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                copied += chunk.len() as u64;
                if copied > size {
                    break;
                }
                digester.update(&chunk);
                write(sink, &chunk).await?;
            }
            let actual = digester.finish();
            if copied != size || actual != desc.digest {
                return Err(Error::Core(berth_core::Error::new(
                    berth_core::ErrorKind::DataLoss,
                    format!(
                        "blob {} in the content store has {copied} bytes with digest {actual}, \
                         not the {size} the image names",
                        desc.digest
                    ),
                )));
            }
        }
    }
    let pad = (512 - (size % 512) as usize) % 512;
    if pad > 0 {
        write(sink, &vec![0u8; pad]).await?;
    }
    Ok(())
}
