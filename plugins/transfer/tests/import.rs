//! Archive import against the core's in-memory stores: formats, compressions, failures,
//! platform selection, names.

mod common;

use berth_core::content::Digest;
use berth_core::error::{Classify, ErrorKind};
use berth_transfer::import::{self, ImageReference, ImportOptions};
use berth_transfer::{Error, NoProgress, PlatformSelection, media};
use common::*;

fn options(platforms: PlatformSelection) -> ImportOptions {
    ImportOptions {
        platforms,
        references: vec![ImageReference::named_prefix("import-test", true)],
        ..ImportOptions::default()
    }
}

fn only(p: berth_transfer::Platform) -> PlatformSelection {
    PlatformSelection::Only(vec![p])
}

fn image() -> TestImage {
    TestImage::new(
        &amd64(),
        &[
            &[("etc/hostname", b"berth\n"), ("bin/sh", b"#!sh")],
            &[("etc/motd", b"hello\n")],
        ],
    )
}

/// Imports `archive` into `ns`; returns the digest the image `name` points at.
async fn import_digest(f: &Fixture, ns: &str, archive: Vec<u8>, name: &str) -> Digest {
    let report = import::import(
        &f.stores,
        &f.cx(ns),
        source(archive),
        &options(only(amd64())),
        &[],
        &NoProgress,
    )
    .await
    .expect("import");
    report
        .images
        .iter()
        .find(|i| i.name == name)
        .unwrap_or_else(|| panic!("no image {name} in {:?}", report.images))
        .target
        .digest
        .clone()
}

const NAME: &str = "example.com/test/img:1";

#[tokio::test]
async fn oci_layout_and_docker_archive_give_the_same_image() {
    let f = Fixture::new();
    let img = image();
    let from_docker = import_digest(&f, "docker", docker_archive(&img, &[NAME]), NAME).await;
    let from_oci = import_digest(&f, "oci", oci_archive_of(&img, NAME, "1"), NAME).await;
    assert_eq!(
        from_docker,
        img.manifest_digest(),
        "the Docker conversion writes Go's bytes"
    );
    assert_eq!(from_oci, from_docker);
    // The Docker tag is normalised as Docker does.
    let short = import_digest(
        &f,
        "short",
        docker_archive(&img, &["busybox"]),
        "docker.io/library/busybox:latest",
    )
    .await;
    assert_eq!(short, img.manifest_digest());
}

#[tokio::test]
async fn every_compression_gives_the_same_digest() {
    let f = Fixture::new();
    let img = image();
    let tar = oci_archive_of(&img, NAME, "1");
    let mut digests = Vec::new();
    for (ns, archive) in [
        ("plain", tar.clone()),
        ("gzip", gzip(&tar)),
        ("zstd", zstd(&tar)),
        ("xz", xz(&tar)),
    ] {
        let report = import::import(
            &f.stores,
            &f.cx(ns),
            source(archive),
            &options(only(amd64())),
            &[],
            &NoProgress,
        )
        .await
        .unwrap_or_else(|e| panic!("{ns}: {e}"));
        assert_eq!(
            report.compression.name(),
            if ns == "plain" { "uncompressed" } else { ns }
        );
        digests.push(report.images[0].target.digest.clone());
    }
    assert!(
        digests.iter().all(|d| *d == img.manifest_digest()),
        "{digests:?}"
    );
}

#[tokio::test]
async fn images_keep_their_content_and_gc_removes_the_rest() {
    let f = Fixture::new();
    let img = image();
    // An extra blob nothing references: the lease held it during the import only.
    let stray = b"not part of any image".to_vec();
    let index = format!(
        "{{\"schemaVersion\":2,\"manifests\":[{}]}}",
        img.descriptor_json(&[("io.containerd.image.name", NAME)])
    );
    let mut blobs = img.blobs();
    blobs.push(stray.clone());
    let archive = oci_archive(&index, &blobs);
    import_digest(&f, "default", archive, NAME).await;
    f.gc().await;
    let kept = f.backend.digests();
    for blob in img.blobs() {
        assert!(
            kept.contains(&Digest::sha256_of(&blob)),
            "image blob collected"
        );
    }
    assert!(
        !kept.contains(&Digest::sha256_of(&stray)),
        "stray blob kept"
    );
    assert!(f.backend.ingest_refs().is_empty());
    assert!(
        f.metadata
            .list_leases(&f.ns("default"), &Default::default())
            .expect("leases")
            .is_empty(),
        "the import's lease is gone"
    );
    // The manifest carries containerd's gc.ref labels for its children.
    let info = f
        .stores
        .content
        .info(&f.cx("default"), &img.manifest_digest())
        .await
        .expect("info");
    assert_eq!(
        info.labels.get("containerd.io/gc.ref.content.config"),
        Some(&img.config_digest().to_string())
    );
    assert_eq!(
        info.labels.get("containerd.io/gc.ref.content.l.1"),
        Some(&Digest::sha256_of(&img.layers[1]).to_string())
    );
}

/// Asserts the import failed with InvalidArgument mentioning `needle`, left no image, and
/// that GC then removes everything it wrote.
async fn assert_clean_failure(f: &Fixture, ns: &str, archive: Vec<u8>, needle: &str) {
    let err = import::import(
        &f.stores,
        &f.cx(ns),
        source(archive),
        &options(only(amd64())),
        &[],
        &NoProgress,
    )
    .await
    .expect_err(&format!("import of a bad archive ({needle}) succeeded"));
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains(needle), "{needle:?} not in {err}");
    assert!(f.image_names(ns).is_empty(), "an image was left");
    f.gc().await;
    assert!(
        f.backend.digests().is_empty(),
        "GC left {:?}",
        f.backend.digests()
    );
    assert!(f.backend.ingest_refs().is_empty(), "GC left ingests");
}

#[tokio::test]
async fn truncated_archives_fail_cleanly() {
    let img = TestImage::new(&amd64(), &[&[("big", &vec![7u8; 200_000])]]);
    let tar = oci_archive_of(&img, NAME, "1");
    // Cut inside the layer's data (it is the largest entry).
    let cut = tar.len() / 2;
    let f = Fixture::new();
    assert_clean_failure(&f, "plain", tar[..cut].to_vec(), "truncated").await;
    let gz = gzip(&tar);
    let f = Fixture::new();
    assert_clean_failure(
        &f,
        "gzip",
        gz[..gz.len() - 100].to_vec(),
        "gzip data is corrupt or truncated",
    )
    .await;
    // Only the gzip trailer is missing: the tar is complete, the stream is not.
    let f = Fixture::new();
    assert_clean_failure(
        &f,
        "gzip",
        gz[..gz.len() - 4].to_vec(),
        "gzip data is corrupt or truncated",
    )
    .await;
    let zs = zstd(&tar);
    let f = Fixture::new();
    assert_clean_failure(
        &f,
        "zstd",
        zs[..zs.len() / 2].to_vec(),
        "zstd data is corrupt or truncated",
    )
    .await;
}

#[tokio::test]
async fn corrupt_compressed_data_fails_cleanly() {
    let img = image();
    let tar = oci_archive_of(&img, NAME, "1");
    let mut gz = gzip(&tar);
    let len = gz.len();
    for b in &mut gz[len / 2..len / 2 + 16] {
        *b ^= 0x5a;
    }
    let f = Fixture::new();
    assert_clean_failure(&f, "default", gz, "gzip data is corrupt").await;
}

#[tokio::test]
async fn unknown_compressions_are_refused_by_name() {
    let f = Fixture::new();
    let mut bz = b"BZh91AY&SY".to_vec();
    bz.extend_from_slice(&[0u8; 600]);
    assert_clean_failure(&f, "default", bz, "bzip2").await;
    assert_clean_failure(&f, "default", vec![0x42; 4096], "neither a tar").await;
    assert_clean_failure(&f, "default", Vec::new(), "empty").await;
}

#[tokio::test]
async fn a_blob_that_does_not_match_its_name_fails_naming_it() {
    let img = image();
    let index = format!(
        "{{\"schemaVersion\":2,\"manifests\":[{}]}}",
        img.descriptor_json(&[("io.containerd.image.name", NAME)])
    );
    let mut tar = oci_archive(&index, &img.blobs());
    // Corrupt the first layer's bytes inside the tar (the file name stays).
    let layer = &img.layers[0];
    let at = tar
        .windows(layer.len())
        .position(|w| w == &layer[..])
        .expect("layer in tar");
    tar[at + 600] ^= 0xff;
    let f = Fixture::new();
    let path = format!("blobs/sha256/{}", Digest::sha256_of(layer).hex());
    assert_clean_failure(&f, "default", tar.clone(), &path).await;
    let err = import::import(
        &f.stores,
        &f.cx("x"),
        source(tar),
        &options(only(amd64())),
        &[],
        &NoProgress,
    )
    .await
    .expect_err("bad digest");
    assert!(matches!(err, Error::BlobDigest { .. }), "{err:?}");
}

#[tokio::test]
async fn a_missing_layer_fails_naming_it() {
    let img = image();
    let index = format!(
        "{{\"schemaVersion\":2,\"manifests\":[{}]}}",
        img.descriptor_json(&[("io.containerd.image.name", NAME)])
    );
    let blobs: Vec<Vec<u8>> = img
        .blobs()
        .into_iter()
        .filter(|b| *b != img.layers[1])
        .collect();
    let f = Fixture::new();
    let missing = Digest::sha256_of(&img.layers[1]).to_string();
    assert_clean_failure(&f, "default", oci_archive(&index, &blobs), &missing).await;
}

#[tokio::test]
async fn neither_layout_nor_docker_archive_is_refused() {
    let f = Fixture::new();
    let tar = layer_tar(&[("hello.txt", b"hi")]);
    assert_clean_failure(&f, "default", tar, "unrecognized image format").await;
}

/// A multi-platform image: a nested index with an amd64 and an arm64 manifest.
fn multi_platform() -> (TestImage, TestImage, Vec<u8>, Vec<u8>) {
    let a = image();
    let b = TestImage::new(&arm64(), &[&[("etc/arch", b"arm64\n")]]);
    let nested = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{},{}]}}",
        a.descriptor_json(&[]),
        b.descriptor_json(&[])
    )
    .into_bytes();
    let top = format!(
        "{{\"schemaVersion\":2,\"manifests\":[{{\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"digest\":\"{}\",\"size\":{},\"annotations\":{{\"io.containerd.image.name\":\"{NAME}\",\"org.opencontainers.image.ref.name\":\"1\"}}}}]}}",
        Digest::sha256_of(&nested),
        nested.len()
    );
    let mut blobs = a.blobs();
    blobs.extend(b.blobs());
    blobs.push(nested.clone());
    (a, b, nested, oci_archive(&top, &blobs))
}

#[tokio::test]
async fn platform_selection_keeps_only_the_wanted_manifests() {
    let (a, b, nested, archive) = multi_platform();
    let f = Fixture::new();
    let report = import::import(
        &f.stores,
        &f.cx("default"),
        source(archive.clone()),
        &options(only(arm64())),
        &[],
        &NoProgress,
    )
    .await
    .expect("import arm64");
    assert_eq!(report.images.len(), 1);
    assert_eq!(report.images[0].target.digest, Digest::sha256_of(&nested));
    assert_eq!(report.images[0].target.media_type, media::OCI_INDEX);
    f.gc().await;
    let kept = f.backend.digests();
    assert!(
        b.blobs()
            .iter()
            .all(|x| kept.contains(&Digest::sha256_of(x)))
    );
    // The amd64 manifest is referenced by the index, but its config and layers are not.
    assert!(kept.contains(&a.manifest_digest()));
    assert!(!kept.contains(&a.config_digest()));
    assert!(!kept.contains(&Digest::sha256_of(&a.layers[0])));

    let f = Fixture::new();
    import::import(
        &f.stores,
        &f.cx("default"),
        source(archive.clone()),
        &options(PlatformSelection::All),
        &[],
        &NoProgress,
    )
    .await
    .expect("import all");
    f.gc().await;
    let kept = f.backend.digests();
    assert!(
        a.blobs()
            .iter()
            .chain(b.blobs().iter())
            .all(|x| kept.contains(&Digest::sha256_of(x)))
    );

    let f = Fixture::new();
    let err = import::import(
        &f.stores,
        &f.cx("default"),
        source(archive),
        &options(only(berth_transfer::Platform::new("linux", "s390x", ""))),
        &[],
        &NoProgress,
    )
    .await
    .expect_err("no s390x");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(f.image_names("default").is_empty());
}

#[tokio::test]
async fn names_follow_containerds_reference_rules() {
    let img = image();
    let f = Fixture::new();
    // Tag-only ref name: prefixed; index name stored too; digest references added.
    let index = format!(
        "{{\"schemaVersion\":2,\"manifests\":[{}]}}",
        img.descriptor_json(&[("org.opencontainers.image.ref.name", "v2")])
    );
    let archive = oci_archive(&index, &img.blobs());
    let opts = ImportOptions {
        index_name: Some("example.com/all:index".into()),
        platforms: only(amd64()),
        references: vec![ImageReference::digest_ref("example.com/base", false, false)],
        ..ImportOptions::default()
    };
    let report = import::import(
        &f.stores,
        &f.cx("default"),
        source(archive),
        &opts,
        &[],
        &NoProgress,
    )
    .await
    .expect("import");
    let mut names: Vec<String> = report.images.iter().map(|i| i.name.clone()).collect();
    names.sort();
    let index_digest = report.index.digest.clone();
    let mut want = vec![
        "example.com/all:index".to_owned(),
        format!("example.com/base@{index_digest}"),
        "example.com/base:v2".to_owned(),
        format!("example.com/base@{}", img.manifest_digest()),
    ];
    want.sort();
    assert_eq!(names, want);

    // A full name outside the prefix is dropped unless overwriting is allowed.
    let f = Fixture::new();
    let archive = oci_archive_of(&img, NAME, "1");
    let opts = ImportOptions {
        platforms: only(amd64()),
        references: vec![ImageReference::named_prefix("example.com/other", false)],
        ..ImportOptions::default()
    };
    let report = import::import(
        &f.stores,
        &f.cx("default"),
        source(archive),
        &opts,
        &[],
        &NoProgress,
    )
    .await
    .expect("import");
    assert!(report.images.is_empty(), "{:?}", report.images);

    // Importing again updates the record in place.
    let f = Fixture::new();
    let first = import_digest(&f, "default", oci_archive_of(&img, NAME, "1"), NAME).await;
    let second = import_digest(&f, "default", oci_archive_of(&img, NAME, "1"), NAME).await;
    assert_eq!(first, second);
    assert_eq!(f.image_names("default"), [NAME]);
}

/// Imports `archive` into namespace `default`; returns the first image's manifest digest
/// and the manifest.
async fn imported_manifest(
    f: &Fixture,
    archive: Vec<u8>,
    options: &ImportOptions,
) -> (Digest, berth_transfer::oci::ParsedManifest) {
    let report = import::import(
        &f.stores,
        &f.cx("default"),
        source(archive),
        options,
        &[],
        &NoProgress,
    )
    .await
    .expect("import");
    let manifest = report.images[0].target.digest.clone();
    let bytes = berth_transfer::store::read_document(
        f.stores.content.as_ref(),
        &f.cx("default"),
        &manifest,
    )
    .await
    .expect("manifest");
    let parsed = berth_transfer::oci::parse_manifest(&bytes, &manifest).expect("parse");
    (manifest, parsed)
}

#[tokio::test]
async fn docker_layers_get_media_types_by_content_and_links_resolve() {
    // A gzip layer keeps its bytes and gets the gzip media type.
    let plain = layer_tar(&[("a", b"a")]);
    let mut img = image();
    img.layers[1] = gzip(&plain);
    let f = Fixture::new();
    let (_, parsed) =
        imported_manifest(&f, docker_archive(&img, &[NAME]), &options(only(amd64()))).await;
    assert_eq!(parsed.layers[0].media_type, media::DOCKER_LAYER);
    assert_eq!(parsed.layers[1].media_type, media::DOCKER_LAYER_GZIP);

    // force_compress gzips uncompressed layers and labels them with their diff id.
    let f = Fixture::new();
    let img = image();
    let opts = ImportOptions {
        force_compress: true,
        ..options(only(amd64()))
    };
    let (manifest, parsed) = imported_manifest(&f, docker_archive(&img, &[NAME]), &opts).await;
    assert!(
        parsed
            .layers
            .iter()
            .all(|l| l.media_type == media::DOCKER_LAYER_GZIP)
    );
    let info = f
        .stores
        .content
        .info(&f.cx("default"), &parsed.layers[0].digest)
        .await
        .expect("info");
    assert_eq!(
        info.labels.get(media::LABEL_UNCOMPRESSED),
        Some(&img.diff_ids[0].to_string())
    );
    // Imported again without compression, the layers found compressed are reused, as
    // containerd's resolveLayers does.
    let again = import::import(
        &f.stores,
        &f.cx("default"),
        source(docker_archive(&img, &[NAME])),
        &options(only(amd64())),
        &[],
        &NoProgress,
    )
    .await
    .expect("import again");
    assert_eq!(again.images[0].target.digest, manifest);
}

#[tokio::test]
async fn docker_layer_symlinks_resolve() {
    let img = TestImage::new(&amd64(), &[&[("x", b"same")], &[("x", b"same")]]);
    assert_eq!(img.layers[0], img.layers[1]);
    let mut b = tar::Builder::new(Vec::new());
    let config_name = format!("{}.json", img.config_digest().hex());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o444);
        h.set_cksum();
        b.append_data(&mut h, name, data).expect("append");
    };
    add("aaa/layer.tar", &img.layers[0]);
    add(&config_name, &img.config);
    add(
        "manifest.json",
        format!("[{{\"Config\":\"{config_name}\",\"RepoTags\":[\"{NAME}\"],\"Layers\":[\"aaa/layer.tar\",\"bbb/layer.tar\"]}}]").as_bytes(),
    );
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_link_name("../aaa/layer.tar").expect("link");
    h.set_cksum();
    b.append_data(&mut h, "bbb/layer.tar", &[][..])
        .expect("symlink");
    let archive = b.into_inner().expect("tar");
    let f = Fixture::new();
    let digest = import_digest(&f, "default", archive, NAME).await;
    assert_eq!(digest, img.manifest_digest());
}

#[tokio::test]
async fn progress_reports_blobs_and_images() {
    let f = Fixture::new();
    let events = Events::default();
    import::import(
        &f.stores,
        &f.cx("default"),
        source(oci_archive_of(&image(), NAME, "1")),
        &options(only(amd64())),
        &[],
        &events,
    )
    .await
    .expect("import");
    let names = events.names();
    assert_eq!(names.first().map(String::as_str), Some("Importing"));
    assert_eq!(names.last().map(String::as_str), Some("Completed import"));
    assert!(
        names.iter().filter(|n| *n == "complete").count() >= 5,
        "{names:?}"
    );
    let saved: Vec<_> = events
        .all()
        .into_iter()
        .filter(|p| p.event == "saved")
        .collect();
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].name, NAME);
    // A second import finds every blob already stored.
    let again = Events::default();
    import::import(
        &f.stores,
        &f.cx("default"),
        source(oci_archive_of(&image(), NAME, "1")),
        &options(only(amd64())),
        &[],
        &again,
    )
    .await
    .expect("import again");
    assert!(
        again
            .names()
            .iter()
            .filter(|n| *n == "already exists")
            .count()
            >= 4,
        "{:?}",
        again.names()
    );
}

/// A client that goes away mid-import drops the import's future: the transfer's own lease
/// must go with it, or what it wrote stays protected from GC for a day.
#[tokio::test]
async fn a_cancelled_import_drops_its_lease() {
    use tokio_stream::StreamExt as _;
    let f = Fixture::new();
    let archive = oci_archive_of(&image(), NAME, "1");
    let half = archive[..archive.len() / 2].to_vec();
    // Half the archive, then a client that never sends more and never closes.
    let stalled: berth_core::content::ByteStream =
        Box::pin(source(half).chain(tokio_stream::pending()));
    let cx = f.cx("ns");
    let options = options(only(amd64()));
    let import = import::import(&f.stores, &cx, stalled, &options, &[], &NoProgress);
    tokio::time::timeout(std::time::Duration::from_millis(300), import)
        .await
        .expect_err("the import waits for the rest of the archive");
    // The lease is deleted by a task the dropped import spawned.
    let mut leases = Vec::new();
    for _ in 0..100 {
        leases = f
            .metadata
            .list_leases(&f.ns("ns"), &Default::default())
            .expect("list leases");
        if leases.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(leases.is_empty(), "leases left: {leases:?}");
    f.gc().await;
    assert!(
        f.backend.digests().is_empty(),
        "GC left {:?}",
        f.backend.digests()
    );
    assert!(f.image_names("ns").is_empty());
}
