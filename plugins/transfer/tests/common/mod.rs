//! Fixtures shared by this crate's tests: a metadata layer over the core's in-memory content
//! store and snapshotter, and image archives built with the tar crate.

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use berth_core::content::{ByteStream, CallContext, Digest};
use berth_core::events::Exchange;
use berth_core::metadata::{MetaStore, Metadata, MetadataConfig};
use berth_core::namespace::Namespace;
use berth_core::snapshot::Snapshotter;
use berth_core::testing::{MemoryContentStore, MemorySnapshotter};
use berth_transfer::{Platform, Progress, ProgressSink, Stores};

/// The name the in-memory snapshotter is loaded under.
pub const SNAPSHOTTER: &str = "memory";

/// A metadata layer over in-memory backends.
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub metadata: Arc<Metadata>,
    pub backend: MemoryContentStore,
    pub snapshots: MemorySnapshotter,
    pub stores: Stores,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MetaStore::open(&dir.path().join("meta"), &MetadataConfig::default())
            .expect("open metadata");
        let backend = MemoryContentStore::new();
        let snapshots = MemorySnapshotter::new();
        let mut backends: BTreeMap<String, Arc<dyn Snapshotter>> = BTreeMap::new();
        backends.insert(SNAPSHOTTER.to_owned(), Arc::new(snapshots.clone()));
        let metadata = Metadata::with_snapshotters(
            Arc::new(store),
            Arc::new(Exchange::default()),
            Some(Arc::new(backend.clone())),
            backends,
            MetadataConfig::default(),
        );
        let stores = Stores::new(metadata.clone()).expect("stores");
        Fixture {
            _dir: dir,
            metadata,
            backend,
            snapshots,
            stores,
        }
    }

    /// A call in namespace `ns` without a lease.
    pub fn cx(&self, ns: &str) -> CallContext {
        CallContext {
            namespace: Some(Namespace::parse(ns).expect("namespace")),
            lease: None,
        }
    }

    pub fn ns(&self, ns: &str) -> Namespace {
        Namespace::parse(ns).expect("namespace")
    }

    /// Image names of a namespace.
    pub fn image_names(&self, ns: &str) -> Vec<String> {
        self.metadata
            .list_images(&self.ns(ns), &Default::default())
            .expect("list")
            .into_iter()
            .map(|i| i.name)
            .collect()
    }

    /// Runs a collection.
    pub async fn gc(&self) {
        self.metadata.collect_garbage().await.expect("gc");
    }
}

/// A byte stream over `data` in uneven chunks (as a network would deliver it).
pub fn source(data: Vec<u8>) -> ByteStream {
    let mut chunks = Vec::new();
    let mut rest = &data[..];
    let mut size = 1000;
    while !rest.is_empty() {
        let n = size.min(rest.len());
        chunks.push(Ok(rest[..n].to_vec()));
        rest = &rest[n..];
        size = size * 3 % 70_001 + 17;
    }
    Box::pin(tokio_stream::iter(chunks))
}

/// Collects progress events.
#[derive(Default, Clone)]
pub struct Events(pub Arc<Mutex<Vec<Progress>>>);

impl Events {
    pub fn all(&self) -> Vec<Progress> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    pub fn names(&self) -> Vec<String> {
        self.all().into_iter().map(|p| p.event).collect()
    }
}

impl ProgressSink for Events {
    fn report(&self, progress: Progress) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(progress);
    }
}

/// A layer tar holding `files`.
pub fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("zstd")
}

pub fn xz(data: &[u8]) -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
    e.write_all(data).expect("xz");
    e.finish().expect("xz")
}

/// An image: uncompressed Docker layers, a config, and its Docker schema 2 manifest written
/// by hand in Go's field order (what containerd's Docker conversion produces).
#[derive(Debug, Clone)]
pub struct TestImage {
    pub platform: Platform,
    pub layers: Vec<Vec<u8>>,
    pub diff_ids: Vec<Digest>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl TestImage {
    /// An image for `platform` whose layers hold these files.
    pub fn new(platform: &Platform, layers: &[&[(&str, &[u8])]]) -> TestImage {
        let layers: Vec<Vec<u8>> = layers.iter().map(|files| layer_tar(files)).collect();
        let diff_ids: Vec<Digest> = layers.iter().map(|l| Digest::sha256_of(l)).collect();
        let ids: Vec<String> = diff_ids.iter().map(|d| format!("\"{d}\"")).collect();
        let variant = if platform.variant.is_empty() {
            String::new()
        } else {
            format!(",\"variant\":\"{}\"", platform.variant)
        };
        let config = format!(
            "{{\"architecture\":\"{}\",\"os\":\"{}\"{variant},\"config\":{{\"Cmd\":[\"/bin/sh\"],\"Env\":null}},\
             \"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[{}]}}}}",
            platform.architecture,
            platform.os,
            ids.join(",")
        )
        .into_bytes();
        let layer_descs: Vec<String> = layers
            .iter()
            .map(|l| {
                format!(
                    "{{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar\",\"digest\":\"{}\",\"size\":{}}}",
                    Digest::sha256_of(l),
                    l.len()
                )
            })
            .collect();
        let manifest = format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.docker.distribution.manifest.v2+json\",\
             \"config\":{{\"mediaType\":\"application/vnd.docker.container.image.v1+json\",\"digest\":\"{}\",\"size\":{}}},\
             \"layers\":[{}]}}",
            Digest::sha256_of(&config),
            config.len(),
            layer_descs.join(",")
        )
        .into_bytes();
        TestImage {
            platform: platform.clone(),
            layers,
            diff_ids,
            config,
            manifest,
        }
    }

    pub fn manifest_digest(&self) -> Digest {
        Digest::sha256_of(&self.manifest)
    }

    pub fn config_digest(&self) -> Digest {
        Digest::sha256_of(&self.config)
    }

    /// Every blob of the image.
    pub fn blobs(&self) -> Vec<Vec<u8>> {
        let mut out = vec![self.config.clone(), self.manifest.clone()];
        out.extend(self.layers.iter().cloned());
        out
    }

    /// The manifest's descriptor JSON with platform and these annotations.
    pub fn descriptor_json(&self, annotations: &[(&str, &str)]) -> String {
        let ann = if annotations.is_empty() {
            String::new()
        } else {
            let mut sorted = annotations.to_vec();
            sorted.sort();
            let parts: Vec<String> = sorted
                .iter()
                .map(|(k, v)| format!("\"{k}\":\"{v}\""))
                .collect();
            format!(",\"annotations\":{{{}}}", parts.join(","))
        };
        let variant = if self.platform.variant.is_empty() {
            String::new()
        } else {
            format!(",\"variant\":\"{}\"", self.platform.variant)
        };
        format!(
            "{{\"mediaType\":\"application/vnd.docker.distribution.manifest.v2+json\",\"digest\":\"{}\",\"size\":{}{ann},\
             \"platform\":{{\"architecture\":\"{}\",\"os\":\"{}\"{variant}}}}}",
            self.manifest_digest(),
            self.manifest.len(),
            self.platform.architecture,
            self.platform.os
        )
    }
}

pub fn append_file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o444);
    h.set_cksum();
    b.append_data(&mut h, name, data).expect("append");
}

/// An OCI layout archive: `oci-layout`, `index.json` and the blobs (sorted, as containerd
/// writes them).
pub fn oci_archive(index_json: &str, blobs: &[Vec<u8>]) -> Vec<u8> {
    let mut entries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    entries.insert(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    entries.insert("index.json".into(), index_json.as_bytes().to_vec());
    for blob in blobs {
        entries.insert(
            format!("blobs/sha256/{}", Digest::sha256_of(blob).hex()),
            blob.clone(),
        );
    }
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in &entries {
        append_file(&mut b, name, data);
    }
    b.into_inner().expect("tar")
}

/// An OCI layout archive of one image named `name`.
pub fn oci_archive_of(image: &TestImage, name: &str, tag: &str) -> Vec<u8> {
    let index = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{}]}}",
        image.descriptor_json(&[
            ("io.containerd.image.name", name),
            ("org.opencontainers.image.ref.name", tag)
        ])
    );
    oci_archive(&index, &image.blobs())
}

/// A Docker archive (`docker save` before v25): `<id>.json` config, `<n>/layer.tar` layers
/// (the last one a symlink to the first when `link_last` is set and the layers are equal),
/// `manifest.json` and `repositories`.
pub fn docker_archive(image: &TestImage, repo_tags: &[&str]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let config_name = format!("{}.json", image.config_digest().hex());
    let mut layer_names = Vec::new();
    for (i, layer) in image.layers.iter().enumerate() {
        let dir = format!("{:064x}", i + 1);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, format!("{dir}/"), &[][..])
            .expect("dir");
        append_file(&mut b, &format!("{dir}/layer.tar"), layer);
        append_file(&mut b, &format!("{dir}/VERSION"), b"1.0");
        layer_names.push(format!("{dir}/layer.tar"));
    }
    append_file(&mut b, &config_name, &image.config);
    let tags: Vec<String> = repo_tags.iter().map(|t| format!("\"{t}\"")).collect();
    let layers: Vec<String> = layer_names.iter().map(|l| format!("\"{l}\"")).collect();
    let manifest = format!(
        "[{{\"Config\":\"{config_name}\",\"RepoTags\":[{}],\"Layers\":[{}]}}]",
        tags.join(","),
        layers.join(",")
    );
    append_file(&mut b, "manifest.json", manifest.as_bytes());
    append_file(&mut b, "repositories", b"{}");
    b.into_inner().expect("tar")
}

/// The platform the tests treat as "the host's" (so they do not depend on the machine).
pub fn amd64() -> Platform {
    Platform::new("linux", "amd64", "")
}

pub fn arm64() -> Platform {
    Platform::new("linux", "arm64", "")
}
