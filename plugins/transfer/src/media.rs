//! Media types and the content labels that tie an image together, as containerd's
//! `core/images/mediatypes.go` and `pkg/labels`.

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI layer, uncompressed.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI layer, gzip.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI layer, zstd.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker layer, uncompressed.
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Docker layer, gzip.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker layer, zstd.
pub const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";
/// Docker foreign (non-distributable) layer.
pub const DOCKER_LAYER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar";
/// Docker foreign layer, gzip.
pub const DOCKER_LAYER_FOREIGN_GZIP: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
/// EROFS native layer.
pub const EROFS_LAYER: &str = "application/vnd.erofs.layer.v1";
/// containerd checkpoint (counts as a config for GC labels).
pub const CONTAINERD_CHECKPOINT: &str =
    "application/vnd.containerd.container.criu.checkpoint.criu.tar";
/// containerd checkpoint config.
pub const CONTAINERD_CHECKPOINT_CONFIG: &str =
    "application/vnd.containerd.container.checkpoint.config.v1+proto";

/// The image name annotation containerd puts on index entries (a full reference).
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// The OCI reference name annotation (usually just a tag).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Marks a referrer (an artifact about a manifest) in an export.
pub const ANNOTATION_MANIFEST_SUBJECT: &str = "io.containerd.manifest.subject";

/// Content label recording a compressed layer's uncompressed digest (its diff id).
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Snapshot label naming the chain id an extraction snapshot will be committed as.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Snapshot label with the layer's diff id.
pub const LABEL_SNAPSHOT_DIFF_ID: &str = "containerd.io/snapshot/diff-id";
/// Snapshot label with the parent's chain id.
pub const LABEL_SNAPSHOT_PARENT: &str = "containerd.io/snapshot/parent-chain-id";
/// Prefix of annotations a layer passes on to its snapshot.
pub const SNAPSHOT_LABEL_PREFIX: &str = "containerd.io/snapshot/";

/// Whether `mt` is an image index (OCI or Docker manifest list).
pub fn is_index(mt: &str) -> bool {
    matches!(mt, OCI_INDEX | DOCKER_MANIFEST_LIST)
}

/// Whether `mt` is an image manifest (OCI or Docker schema 2; schema 1 is not supported).
pub fn is_manifest(mt: &str) -> bool {
    matches!(mt, OCI_MANIFEST | DOCKER_MANIFEST)
}

/// Whether `mt` is an image config the unpacker reads.
pub fn is_config(mt: &str) -> bool {
    matches!(mt, OCI_CONFIG | DOCKER_CONFIG)
}

/// Whether `mt` is a config for GC labelling (checkpoints included).
pub fn is_known_config(mt: &str) -> bool {
    matches!(
        mt,
        OCI_CONFIG | DOCKER_CONFIG | CONTAINERD_CHECKPOINT | CONTAINERD_CHECKPOINT_CONFIG
    )
}

/// Whether `mt` is a layer: any OCI layer type, the Docker layer types (with `+` suffixes
/// such as `+encrypted`), or an EROFS layer.
pub fn is_layer(mt: &str) -> bool {
    if mt.starts_with("application/vnd.oci.image.layer.") {
        return true;
    }
    let base = mt.split_once('+').map_or(mt, |(base, _)| base);
    matches!(
        base,
        DOCKER_LAYER
            | DOCKER_LAYER_GZIP
            | DOCKER_LAYER_FOREIGN
            | DOCKER_LAYER_FOREIGN_GZIP
            | DOCKER_LAYER_ZSTD
            | EROFS_LAYER
    )
}

/// Whether a layer of this type must not be redistributed (Windows base layers).
pub fn is_non_distributable(mt: &str) -> bool {
    mt.starts_with("application/vnd.oci.image.layer.nondistributable.")
        || mt.starts_with("application/vnd.docker.image.rootfs.foreign.")
}

/// The GC label key prefix a parent uses for a child of this media type, as containerd's
/// `ChildGCLabels`: configs `.config`, manifests `.m.`, layers `.l.`, referrers
/// `.referrer.sha256.`, anything else the bare `containerd.io/gc.ref.content.`.
pub fn child_gc_label(
    mt: &str,
    annotations: &std::collections::BTreeMap<String, String>,
) -> &'static str {
    if annotations.contains_key(ANNOTATION_MANIFEST_SUBJECT) {
        "containerd.io/gc.ref.content.referrer.sha256."
    } else if is_known_config(mt) {
        "containerd.io/gc.ref.content.config"
    } else if is_manifest(mt) {
        "containerd.io/gc.ref.content.m."
    } else if is_layer(mt) {
        "containerd.io/gc.ref.content.l."
    } else {
        "containerd.io/gc.ref.content."
    }
}

/// The GC labels a parent blob carries for `children`, numbered per prefix as containerd's
/// `SetChildrenMappedLabels` does (`m.0`, `m.1`; a second config is `config1`; referrer
/// labels end in the first 12 hex digits of the digest).
pub fn children_gc_labels(children: &[crate::oci::Descriptor]) -> Vec<(String, String)> {
    let mut counts: std::collections::HashMap<&'static str, usize> = Default::default();
    let mut labels = Vec::with_capacity(children.len());
    for child in children {
        let key = child_gc_label(&child.media_type, &child.annotations);
        let index = counts.entry(key).or_default();
        let n = *index;
        *index += 1;
        let digest = child.digest.to_string();
        let label = if key.ends_with(".sha256.") {
            let hex = child.digest.hex();
            format!("{key}{}", &hex[..hex.len().min(12)])
        } else if n > 0 || key.ends_with('.') {
            format!("{key}{n}")
        } else {
            key.to_owned()
        };
        labels.push((label, digest));
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Descriptor;
    use berth_core::content::Digest;

    fn desc(mt: &str, data: &[u8]) -> Descriptor {
        Descriptor::new(mt, Digest::sha256_of(data), data.len() as u64)
    }

    #[test]
    fn classification() {
        assert!(is_index(OCI_INDEX) && is_index(DOCKER_MANIFEST_LIST));
        assert!(is_manifest(DOCKER_MANIFEST) && !is_manifest(OCI_INDEX));
        assert!(
            is_layer(OCI_LAYER_GZIP) && is_layer("application/vnd.oci.image.layer.v1.tar+zstd")
        );
        assert!(is_layer(
            "application/vnd.docker.image.rootfs.diff.tar.gzip+encrypted"
        ));
        assert!(!is_layer(DOCKER_CONFIG));
        assert!(is_non_distributable(DOCKER_LAYER_FOREIGN));
    }

    #[test]
    fn gc_labels_are_numbered_as_containerd() {
        let children = [
            desc(OCI_CONFIG, b"c"),
            desc(OCI_LAYER, b"a"),
            desc(OCI_LAYER, b"b"),
            desc(OCI_MANIFEST, b"m"),
            desc("text/plain", b"t"),
        ];
        let keys: Vec<String> = children_gc_labels(&children)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            [
                "containerd.io/gc.ref.content.config",
                "containerd.io/gc.ref.content.l.0",
                "containerd.io/gc.ref.content.l.1",
                "containerd.io/gc.ref.content.m.0",
                "containerd.io/gc.ref.content.0",
            ]
        );
    }
}
