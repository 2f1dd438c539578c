//! OCI documents: parsed with `oci-spec`, written as Go's `encoding/json` writes them.
//!
//! Reading uses oci-spec's image types, so indexes and manifests are validated against the
//! OCI schema. Writing cannot: oci-spec keeps annotations in a `HashMap` (random key order)
//! and orders descriptor fields differently from Go, and the bytes written decide the digests.
//! The types here serialise field for field as containerd's `ocispec` structs, maps sorted,
//! with Go's HTML escaping ([`to_go_json`]), so a Docker archive converted by berth gets the
//! manifest and index digests containerd gives it.

use std::collections::BTreeMap;

use berth_core::content::Digest;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::platform::Platform;

/// An OCI content descriptor with every field OCI defines (the core's descriptor has no
/// platform).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Descriptor {
    /// Media type of the target.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Digest of the target.
    pub digest: Digest,
    /// Size of the target in bytes.
    pub size: u64,
    /// Where else it can be fetched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Annotations, sorted by key as Go writes maps.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Embedded content (base64).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The platform the target is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// The artifact type of an artifact manifest.
    #[serde(rename = "artifactType", skip_serializing_if = "String::is_empty")]
    pub artifact_type: String,
}

impl Descriptor {
    /// A descriptor with only the required fields.
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size,
            urls: Vec::new(),
            annotations: BTreeMap::new(),
            data: None,
            platform: None,
            artifact_type: String::new(),
        }
    }

    /// The core's view of this descriptor (what an image record stores).
    pub fn to_core(&self) -> berth_core::snapshot::Descriptor {
        berth_core::snapshot::Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: self.annotations.clone(),
        }
    }

    /// A descriptor from the core's view (no platform).
    pub fn from_core(d: &berth_core::snapshot::Descriptor) -> Descriptor {
        let mut out = Descriptor::new(&d.media_type, d.digest.clone(), d.size);
        out.annotations = d.annotations.clone();
        out
    }

    fn from_spec(d: &oci_spec::image::Descriptor) -> std::result::Result<Descriptor, String> {
        let digest = Digest::parse(d.digest().as_ref()).map_err(|e| e.message().to_owned())?;
        Ok(Descriptor {
            media_type: d.media_type().to_string(),
            digest,
            size: d.size(),
            urls: d.urls().clone().unwrap_or_default(),
            annotations: d
                .annotations()
                .as_ref()
                .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            data: d.data().clone(),
            platform: d.platform().as_ref().map(|p| Platform {
                architecture: p.architecture().to_string(),
                os: p.os().to_string(),
                os_version: p.os_version().clone().unwrap_or_default(),
                os_features: p.os_features().clone().unwrap_or_default(),
                variant: p.variant().clone().unwrap_or_default(),
            }),
            artifact_type: d
                .artifact_type()
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        })
    }
}

/// An image index as Go's `ocispec.Index` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Index {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The index's own media type (left out when empty, as containerd's Docker conversion
    /// does).
    #[serde(rename = "mediaType", skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    /// The manifests (or nested indexes) it lists.
    pub manifests: Vec<Descriptor>,
    /// Annotations of the index.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A Docker schema 2 manifest as containerd's importer writes it (exactly these fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DockerManifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Always [`crate::media::DOCKER_MANIFEST`].
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// The image config.
    pub config: Descriptor,
    /// The layers, base first.
    pub layers: Vec<Descriptor>,
}

/// `oci-layout`: `{"imageLayoutVersion":"1.0.0"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLayout {
    /// The layout version; berth reads and writes 1.0.0.
    #[serde(rename = "imageLayoutVersion", default)]
    pub version: String,
}

/// The OCI layout version berth reads and writes.
pub const IMAGE_LAYOUT_VERSION: &str = "1.0.0";

/// One entry of a Docker archive's `manifest.json`. Go's field names (no json tags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerArchiveEntry {
    /// Path of the config file in the archive.
    #[serde(rename = "Config", default)]
    pub config: String,
    /// Tags, in Docker's familiar form (`busybox:latest`).
    #[serde(rename = "RepoTags", default, deserialize_with = "null_as_default")]
    pub repo_tags: Vec<String>,
    /// Paths of the layer tars, base first.
    #[serde(rename = "Layers", default, deserialize_with = "null_as_default")]
    pub layers: Vec<String>,
}

/// What an index lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedIndex {
    /// Its manifests (and nested indexes).
    pub manifests: Vec<Descriptor>,
}

/// What a manifest lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedManifest {
    /// The image config.
    pub config: Descriptor,
    /// The layers, base first.
    pub layers: Vec<Descriptor>,
}

/// The part of an image config unpacking needs (containerd's `unpackConfig`): the platform
/// and the rootfs. Read leniently (Docker configs carry many nulls), not through oci-spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfigSubset {
    /// The image's platform, normalised.
    pub platform: Platform,
    /// `rootfs.type`; only `layers` (or empty) can be unpacked.
    pub rootfs_type: String,
    /// The uncompressed digest of each layer, base first.
    pub diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
struct ConfigJson {
    #[serde(flatten)]
    platform: Platform,
    #[serde(default, deserialize_with = "null_as_default")]
    rootfs: RootFsJson,
}

#[derive(Deserialize, Default)]
struct RootFsJson {
    #[serde(rename = "type", default, deserialize_with = "null_as_default")]
    kind: String,
    #[serde(default, deserialize_with = "null_as_default")]
    diff_ids: Vec<Digest>,
}

fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn invalid(what: &'static str, digest: &Digest, reason: impl ToString) -> Error {
    Error::InvalidBlob {
        what,
        digest: digest.clone(),
        reason: reason.to_string(),
    }
}

/// Parses an index (OCI or Docker manifest list) stored as `digest`.
pub fn parse_index(bytes: &[u8], digest: &Digest) -> Result<ParsedIndex> {
    let index =
        oci_spec::image::ImageIndex::from_reader(bytes).map_err(|e| invalid("index", digest, e))?;
    let manifests = index
        .manifests()
        .iter()
        .map(Descriptor::from_spec)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| invalid("index", digest, e))?;
    Ok(ParsedIndex { manifests })
}

/// Parses a manifest (OCI or Docker schema 2) stored as `digest`.
pub fn parse_manifest(bytes: &[u8], digest: &Digest) -> Result<ParsedManifest> {
    let manifest = oci_spec::image::ImageManifest::from_reader(bytes)
        .map_err(|e| invalid("manifest", digest, e))?;
    let config =
        Descriptor::from_spec(manifest.config()).map_err(|e| invalid("manifest", digest, e))?;
    let layers = manifest
        .layers()
        .iter()
        .map(Descriptor::from_spec)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| invalid("manifest", digest, e))?;
    Ok(ParsedManifest { config, layers })
}

/// Parses the platform and rootfs of an image config stored as `digest`.
pub fn parse_config(bytes: &[u8], digest: &Digest) -> Result<ImageConfigSubset> {
    let config: ConfigJson =
        serde_json::from_slice(bytes).map_err(|e| invalid("image config", digest, e))?;
    Ok(ImageConfigSubset {
        platform: config.platform.normalized(),
        rootfs_type: config.rootfs.kind,
        diff_ids: config.rootfs.diff_ids,
    })
}

/// Serialises `value` exactly as Go's `json.Marshal`: compact, fields in declaration order,
/// maps sorted (BTreeMap), and `<`, `>`, `&`, U+2028 and U+2029 escaped as `\u003c` and so
/// on. Those characters can only occur inside JSON strings, so replacing them in the output
/// is exact.
pub fn to_go_json<T: Serialize>(value: &T) -> Vec<u8> {
    let text = match serde_json::to_string(value) {
        Ok(text) => text,
        // Only maps with non-string keys fail to serialise; none of the types here have one.
        Err(e) => unreachable!("OCI documents always serialise: {e}"),
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_serialise_in_go_field_order() {
        let mut d = Descriptor::new(crate::media::DOCKER_MANIFEST, Digest::sha256_of(b"m"), 7);
        d.annotations.insert("z".into(), "<&>".into());
        d.annotations.insert("a".into(), "1".into());
        d.platform = Some(Platform::new("linux", "amd64", ""));
        let json = String::from_utf8(to_go_json(&d)).expect("utf8");
        assert_eq!(
            json,
            format!(
                "{{\"mediaType\":\"{}\",\"digest\":\"{}\",\"size\":7,\"annotations\":{{\"a\":\"1\",\
                 \"z\":\"\\u003c\\u0026\\u003e\"}},\"platform\":{{\"architecture\":\"amd64\",\
                 \"os\":\"linux\"}}}}",
                crate::media::DOCKER_MANIFEST,
                Digest::sha256_of(b"m")
            )
        );
    }

    #[test]
    fn config_subset_tolerates_nulls() {
        let digest = Digest::sha256_of(b"c");
        let c = parse_config(
            br#"{"architecture":"amd64","os":"linux","config":{"Cmd":null},"rootfs":{"type":"layers","diff_ids":null}}"#,
            &digest,
        )
        .expect("config");
        assert_eq!(c.platform, Platform::new("linux", "amd64", ""));
        assert!(c.diff_ids.is_empty());
        assert!(parse_config(b"[]", &digest).is_err());
    }
}
