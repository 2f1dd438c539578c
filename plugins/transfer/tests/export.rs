//! Export to OCI archives: layout, Docker manifest.json, platforms, and round trips through
//! import.

mod common;

use std::io::Read;

use berth_core::content::Digest;
use berth_core::error::{Classify, ErrorKind};
use berth_core::metadata::images::Image;
use berth_transfer::export::{self, ExportOptions};
use berth_transfer::import::{self, ImageReference, ImportOptions};
use berth_transfer::{NoProgress, PlatformSelection};
use common::*;

const NAME: &str = "example.com/test/export:1";

fn import_options(platforms: PlatformSelection) -> ImportOptions {
    ImportOptions {
        platforms,
        references: vec![ImageReference::named_prefix("import", true)],
        ..ImportOptions::default()
    }
}

async fn import_into(f: &Fixture, archive: Vec<u8>, platforms: PlatformSelection) -> Vec<Image> {
    import::import(
        &f.stores,
        &f.cx("default"),
        source(archive),
        &import_options(platforms),
        &[],
        &NoProgress,
    )
    .await
    .expect("import")
    .images
}

async fn export_bytes(f: &Fixture, images: &[Image], options: &ExportOptions) -> Vec<u8> {
    let mut out = Vec::new();
    export::export(
        &f.stores,
        &f.cx("default"),
        images,
        options,
        &mut out,
        &NoProgress,
    )
    .await
    .expect("export");
    out
}

/// The archive's entries: name -> contents.
fn entries(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut a = tar::Archive::new(archive);
    a.entries()
        .expect("entries")
        .map(|e| {
            let mut e = e.expect("entry");
            let name = e.path().expect("path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("data");
            (name, data)
        })
        .collect()
}

fn amd64_only() -> ExportOptions {
    ExportOptions {
        platforms: vec![amd64()],
        ..ExportOptions::default()
    }
}

#[tokio::test]
async fn export_writes_a_sorted_oci_layout_with_a_docker_manifest() {
    let img = TestImage::new(&amd64(), &[&[("a", b"1")], &[("b", b"2")]]);
    let f = Fixture::new();
    let images = import_into(&f, docker_archive(&img, &[NAME]), PlatformSelection::All).await;
    let archive = export_bytes(&f, &images, &amd64_only()).await;
    let listed = entries(&archive);
    let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(names[0], "blobs/");
    assert_eq!(names[1], "blobs/sha256/");
    assert!(names.ends_with(&["index.json", "manifest.json", "oci-layout"]));
    let blobs = names
        .iter()
        .filter(|n| n.starts_with("blobs/sha256/") && n.len() > 13)
        .count();
    assert_eq!(blobs, 4, "manifest, config and two layers");
    let get = |name: &str| {
        listed
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .expect(name)
    };
    assert_eq!(get("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#);
    let docker: serde_json::Value = serde_json::from_slice(&get("manifest.json")).expect("json");
    assert_eq!(docker[0]["RepoTags"][0], "example.com/test/export:1");
    assert_eq!(
        docker[0]["Config"],
        format!("blobs/sha256/{}", img.config_digest().hex())
    );
    let index: serde_json::Value = serde_json::from_slice(&get("index.json")).expect("json");
    assert_eq!(
        index["manifests"][0]["digest"],
        img.manifest_digest().to_string()
    );
    assert_eq!(
        index["manifests"][0]["annotations"]["io.containerd.image.name"],
        NAME
    );
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "1"
    );
    // The same images give the same bytes.
    assert_eq!(export_bytes(&f, &images, &amd64_only()).await, archive);
    // Without the Docker manifest.
    let plain = export_bytes(
        &f,
        &images,
        &ExportOptions {
            skip_docker_manifest: true,
            ..amd64_only()
        },
    )
    .await;
    assert!(!entries(&plain).iter().any(|(n, _)| n == "manifest.json"));
}

#[tokio::test]
async fn export_then_import_round_trips_the_digest() {
    let img = TestImage::new(&amd64(), &[&[("etc/os-release", b"ID=berth\n")]]);
    let f = Fixture::new();
    let images = import_into(&f, oci_archive_of(&img, NAME, "1"), PlatformSelection::All).await;
    let archive = export_bytes(&f, &images, &amd64_only()).await;
    for compressed in [archive.clone(), gzip(&archive), xz(&archive)] {
        let g = Fixture::new();
        let again = import_into(&g, compressed, PlatformSelection::All).await;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].name, NAME);
        assert_eq!(again[0].target.digest, images[0].target.digest);
        assert_eq!(again[0].target.digest, img.manifest_digest());
    }
}

#[tokio::test]
async fn index_images_export_the_wanted_platforms() {
    let a = TestImage::new(&amd64(), &[&[("arch", b"amd64")]]);
    let b = TestImage::new(&arm64(), &[&[("arch", b"arm64")]]);
    let nested = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{},{}]}}",
        a.descriptor_json(&[]),
        b.descriptor_json(&[])
    )
    .into_bytes();
    let top = format!(
        "{{\"schemaVersion\":2,\"manifests\":[{{\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"digest\":\"{}\",\"size\":{},\"annotations\":{{\"io.containerd.image.name\":\"{NAME}\"}}}}]}}",
        Digest::sha256_of(&nested),
        nested.len()
    );
    let mut blobs = a.blobs();
    blobs.extend(b.blobs());
    blobs.push(nested.clone());
    let f = Fixture::new();
    let images = import_into(&f, oci_archive(&top, &blobs), PlatformSelection::All).await;

    let arm = export_bytes(
        &f,
        &images,
        &ExportOptions {
            platforms: vec![arm64()],
            ..ExportOptions::default()
        },
    )
    .await;
    let names: Vec<String> = entries(&arm).into_iter().map(|(n, _)| n).collect();
    let has =
        |data: &[u8]| names.contains(&format!("blobs/sha256/{}", Digest::sha256_of(data).hex()));
    assert!(has(&nested) && has(&b.manifest) && has(&b.config) && has(&b.layers[0]));
    assert!(!has(&a.manifest) && !has(&a.config));
    let docker: serde_json::Value = serde_json::from_slice(
        &entries(&arm)
            .into_iter()
            .find(|(n, _)| n == "manifest.json")
            .expect("manifest.json")
            .1,
    )
    .expect("json");
    assert_eq!(
        docker[0]["Config"],
        format!("blobs/sha256/{}", b.config_digest().hex())
    );
    // The arm64-only archive imports for arm64 and keeps the index digest.
    let g = Fixture::new();
    let again = import_into(&g, arm, PlatformSelection::Only(vec![arm64()])).await;
    assert_eq!(again[0].target.digest, Digest::sha256_of(&nested));

    let all = export_bytes(
        &f,
        &images,
        &ExportOptions {
            platforms: vec![arm64()],
            all_platforms: true,
            ..ExportOptions::default()
        },
    )
    .await;
    let names: Vec<String> = entries(&all).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&format!("blobs/sha256/{}", a.config_digest().hex())));

    let err = export::export(
        &f.stores,
        &f.cx("default"),
        &images,
        &ExportOptions {
            platforms: vec![berth_transfer::Platform::new("linux", "s390x", "")],
            ..ExportOptions::default()
        },
        &mut Vec::new(),
        &NoProgress,
    )
    .await
    .expect_err("no s390x");
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn missing_content_fails_the_export() {
    let img = TestImage::new(&amd64(), &[&[("a", b"1")]]);
    let f = Fixture::new();
    let images = import_into(&f, oci_archive_of(&img, NAME, "1"), PlatformSelection::All).await;
    f.stores
        .content
        .delete(&f.cx("default"), &Digest::sha256_of(&img.layers[0]))
        .await
        .expect("delete layer");
    let err = export::export(
        &f.stores,
        &f.cx("default"),
        &images,
        &amd64_only(),
        &mut Vec::new(),
        &NoProgress,
    )
    .await
    .expect_err("missing layer");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}
