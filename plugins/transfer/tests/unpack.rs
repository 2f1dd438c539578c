//! Unpack through the metadata layer's snapshotter with a recording differ: call sequence,
//! chain ids, labels, skips and diff id verification.

mod common;

use std::sync::Arc;

use berth_core::content::Digest;
use berth_core::error::{Classify, ErrorKind};
use berth_core::snapshot::Snapshotter;
use berth_transfer::import::{self, ImageReference, ImportOptions};
use berth_transfer::testing::{RecordingDiffer, RecordingSnapshotter, SnapshotCall};
use berth_transfer::unpack::chain_ids;
use berth_transfer::{
    Error, LocalTransfer, NoProgress, PlatformSelection, TransferConfig, UnpackConfig,
    UnpackRequest, UnpackTarget, media,
};
use common::*;

const NAME: &str = "example.com/test/unpack:1";

struct Rig {
    f: Fixture,
    differ: Arc<RecordingDiffer>,
    sn: Arc<RecordingSnapshotter>,
}

impl Rig {
    fn new() -> Rig {
        let f = Fixture::new();
        let differ = Arc::new(RecordingDiffer::new(f.stores.content.clone()));
        let sn = Arc::new(RecordingSnapshotter::new(
            f.metadata.snapshotter(SNAPSHOTTER).expect("snapshotter"),
        ));
        Rig { f, differ, sn }
    }

    fn target(&self) -> UnpackTarget {
        UnpackTarget {
            snapshotter_name: SNAPSHOTTER.to_owned(),
            snapshotter: self.sn.clone(),
            differ: self.differ.clone(),
            platform: amd64(),
            apply_options: Default::default(),
        }
    }

    async fn import(
        &self,
        image: &TestImage,
    ) -> berth_transfer::Result<berth_transfer::ImportReport> {
        let options = ImportOptions {
            platforms: PlatformSelection::All,
            references: vec![ImageReference::named_prefix("import", true)],
            ..ImportOptions::default()
        };
        import::import(
            &self.f.stores,
            &self.f.cx("default"),
            source(oci_archive_of(image, NAME, "1")),
            &options,
            &[self.target()],
            &NoProgress,
        )
        .await
    }
}

fn image() -> TestImage {
    TestImage::new(
        &amd64(),
        &[
            &[("bin/busybox", b"elf")],
            &[("etc/passwd", b"root:x:0:0\n")],
            &[("etc/passwd", b"root:x:0:0\nberth:x:1:1\n")],
        ],
    )
}

#[tokio::test]
async fn layers_are_prepared_applied_and_committed_in_order() {
    let rig = Rig::new();
    let img = image();
    let report = rig.import(&img).await.expect("import");
    let chains = chain_ids(&img.diff_ids);
    assert_eq!(
        chains[1],
        Digest::sha256_of(format!("{} {}", img.diff_ids[0], img.diff_ids[1]).as_bytes()),
        "chain ids follow the OCI spec"
    );
    assert_eq!(report.unpacked.len(), 1);
    assert_eq!(report.unpacked[0].chain_id.as_ref(), chains.last());
    assert_eq!(
        (report.unpacked[0].applied, report.unpacked[0].skipped),
        (3, 0)
    );

    let calls = rig.sn.calls();
    assert_eq!(calls.len(), 9, "{calls:#?}");
    for (i, chunk) in calls.chunks(3).enumerate() {
        let chain = chains[i].to_string();
        assert_eq!(chunk[0], SnapshotCall::Stat(chain.clone()));
        let SnapshotCall::Prepare {
            key,
            parent,
            labels,
        } = &chunk[1]
        else {
            panic!("expected a prepare, got {:?}", chunk[1]);
        };
        assert!(
            key.starts_with("extract-") && key.ends_with(&format!(" {chain}")),
            "{key}"
        );
        assert_eq!(
            parent.as_deref(),
            (i > 0).then(|| chains[i - 1].to_string()).as_deref()
        );
        assert_eq!(labels.get(media::LABEL_SNAPSHOT_REF), Some(&chain));
        assert_eq!(
            labels.get(media::LABEL_SNAPSHOT_DIFF_ID),
            Some(&img.diff_ids[i].to_string())
        );
        assert_eq!(
            labels.get(media::LABEL_SNAPSHOT_PARENT),
            (i > 0).then(|| chains[i - 1].to_string()).as_ref()
        );
        assert_eq!(
            chunk[2],
            SnapshotCall::Commit {
                name: chain,
                key: key.clone()
            }
        );
    }
    let applied: Vec<Digest> = rig.differ.calls().into_iter().map(|c| c.layer).collect();
    let layers: Vec<Digest> = img.layers.iter().map(|l| Digest::sha256_of(l)).collect();
    assert_eq!(applied, layers);
    assert!(rig.differ.calls().iter().all(|c| !c.mounts.is_empty()));

    let cx = rig.f.cx("default");
    let config = rig
        .f
        .stores
        .content
        .info(&cx, &img.config_digest())
        .await
        .expect("config");
    assert_eq!(
        config.labels.get("containerd.io/gc.ref.snapshot.memory"),
        Some(&chains[2].to_string())
    );
    for (layer, diff_id) in layers.iter().zip(&img.diff_ids) {
        let info = rig.f.stores.content.info(&cx, layer).await.expect("layer");
        assert_eq!(
            info.labels.get(media::LABEL_UNCOMPRESSED),
            Some(&diff_id.to_string())
        );
    }
    // The image keeps its snapshots once the import's lease is gone.
    rig.f.gc().await;
    assert_eq!(rig.f.snapshots.keys().len(), 3);
    let top = rig
        .sn
        .stat(&cx, &chains[2].to_string())
        .await
        .expect("top snapshot");
    assert_eq!(top.parent, Some(chains[1].to_string()));
}

#[tokio::test]
async fn known_chain_ids_are_skipped() {
    let rig = Rig::new();
    let img = image();
    rig.import(&img).await.expect("first import");
    let before = rig.differ.calls().len();
    let report = rig.import(&img).await.expect("second import");
    assert_eq!(
        (report.unpacked[0].applied, report.unpacked[0].skipped),
        (0, 3)
    );
    assert_eq!(rig.differ.calls().len(), before, "nothing applied again");
    // An image sharing the base layers only applies what is new.
    let more = TestImage::new(
        &amd64(),
        &[
            &[("bin/busybox", b"elf")],
            &[("etc/passwd", b"root:x:0:0\n")],
            &[("etc/group", b"root:x:0:\n")],
        ],
    );
    let report = rig.import(&more).await.expect("third import");
    assert_eq!(
        (report.unpacked[0].applied, report.unpacked[0].skipped),
        (1, 2)
    );
}

#[tokio::test]
async fn a_wrong_diff_id_fails_naming_the_layer_and_leaves_nothing() {
    let rig = Rig::new();
    let img = image();
    let bad_layer = Digest::sha256_of(&img.layers[1]);
    rig.differ
        .report_diff_id(bad_layer.clone(), Digest::sha256_of(b"something else"));
    let err = rig.import(&img).await.expect_err("diff id mismatch");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(matches!(err, Error::DiffId { index: 1, .. }), "{err:?}");
    assert!(err.to_string().contains(&bad_layer.to_string()), "{err}");
    let removed: Vec<_> = rig
        .sn
        .calls()
        .into_iter()
        .filter(|c| matches!(c, SnapshotCall::Remove(_)))
        .collect();
    assert_eq!(removed.len(), 1, "the extraction snapshot is removed");
    assert!(rig.f.image_names("default").is_empty());
    rig.f.gc().await;
    assert!(
        rig.f.snapshots.keys().is_empty(),
        "{:?}",
        rig.f.snapshots.keys()
    );
    assert!(rig.f.backend.digests().is_empty());
}

#[tokio::test]
async fn other_platforms_are_not_unpacked() {
    let rig = Rig::new();
    let img = TestImage::new(&arm64(), &[&[("x", b"y")]]);
    let report = rig.import(&img).await.expect("import");
    assert!(report.unpacked.is_empty());
    assert!(rig.differ.calls().is_empty());
}

#[tokio::test]
async fn unpack_requests_pick_snapshotter_and_differ_as_configured() {
    let f = Fixture::new();
    let differ = Arc::new(RecordingDiffer::new(f.stores.content.clone()));
    let differs = [(
        "walking".to_owned(),
        differ.clone() as Arc<dyn berth_core::diff::Differ>,
    )]
    .into_iter()
    .collect();
    let config = TransferConfig {
        unpack_config: Some(vec![UnpackConfig {
            platform: "linux/amd64".into(),
            snapshotter: "overlayfs".into(),
            ..UnpackConfig::default()
        }]),
        ..TransferConfig::default()
    };
    let transfer = LocalTransfer::new(f.metadata.clone(), differs, config).expect("transfer");
    let request = |sn: &str| UnpackRequest {
        platform: amd64(),
        snapshotter: sn.to_owned(),
    };
    // The configured default is not loaded: a clear error, not a silent skip.
    let err = transfer
        .resolve_unpacks(&[request("")])
        .expect_err("overlayfs missing");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("overlayfs"), "{err}");
    // A loaded snapshotter the configuration does not list is used with the default differ.
    let targets = transfer
        .resolve_unpacks(&[request(SNAPSHOTTER)])
        .expect("memory");
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].snapshotter_name, SNAPSHOTTER);
    // An unknown one is not unpacked into.
    assert!(
        transfer
            .resolve_unpacks(&[request("nope")])
            .expect("skip")
            .is_empty()
    );

    // Through the plugin object: import and unpack.
    let img = image();
    let report = transfer
        .import(
            &f.cx("default"),
            source(oci_archive_of(&img, NAME, "1")),
            &ImportOptions {
                platforms: PlatformSelection::All,
                references: vec![ImageReference::named_prefix("import", true)],
                ..ImportOptions::default()
            },
            &[request(SNAPSHOTTER)],
            &NoProgress,
        )
        .await
        .expect("import");
    assert_eq!(report.unpacked.len(), 1);
    assert_eq!(differ.calls().len(), 3);
}

#[tokio::test]
async fn unpack_reports_progress_per_layer() {
    let rig = Rig::new();
    let events = Events::default();
    let options = ImportOptions {
        platforms: PlatformSelection::All,
        references: vec![ImageReference::named_prefix("import", true)],
        ..ImportOptions::default()
    };
    import::import(
        &rig.f.stores,
        &rig.f.cx("default"),
        source(oci_archive_of(&image(), NAME, "1")),
        &options,
        &[rig.target()],
        &events,
    )
    .await
    .expect("import");
    let layer_events: Vec<String> = events
        .all()
        .into_iter()
        .filter(|p| p.name.starts_with("layer-sha256:"))
        .map(|p| p.event)
        .collect();
    assert_eq!(
        layer_events,
        [
            "extracting",
            "extracted",
            "extracting",
            "extracted",
            "extracting",
            "extracted"
        ]
    );
}

/// An OCI archive of `img` in this entry order: layout, index, manifest, config, then the
/// layers; split so that the first part ends after layer 0.
fn archive_split_after_first_layer(img: &TestImage) -> (Vec<u8>, Vec<u8>) {
    let index = format!(
        "{{\"schemaVersion\":2,\"manifests\":[{}]}}",
        img.descriptor_json(&[("io.containerd.image.name", NAME)])
    );
    let blob = |data: &[u8]| format!("blobs/sha256/{}", Digest::sha256_of(data).hex());
    let mut b = tar::Builder::new(Vec::new());
    append_file(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    append_file(&mut b, "index.json", index.as_bytes());
    append_file(&mut b, &blob(&img.manifest), &img.manifest);
    append_file(&mut b, &blob(&img.config), &img.config);
    append_file(&mut b, &blob(&img.layers[0]), &img.layers[0]);
    let split = b.get_ref().len();
    for layer in &img.layers[1..] {
        append_file(&mut b, &blob(layer), layer);
    }
    let mut all = b.into_inner().expect("tar");
    let rest = all.split_off(split);
    (all, rest)
}

#[tokio::test]
async fn an_oci_archive_is_unpacked_while_it_is_still_arriving() {
    let rig = Rig::new();
    let img = image();
    let (head, tail) = archive_split_after_first_layer(&img);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Ok(head)).await.expect("send head");
    let options = ImportOptions {
        platforms: PlatformSelection::All,
        references: vec![ImageReference::named_prefix("import", true)],
        ..ImportOptions::default()
    };
    let target = rig.target();
    let cx = rig.f.cx("default");
    let import = import::import(
        &rig.f.stores,
        &cx,
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)),
        &options,
        std::slice::from_ref(&target),
        &NoProgress,
    );
    tokio::pin!(import);
    // The rest of the archive is held back until the first layer has been applied.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        tokio::select! {
            done = &mut import => panic!("the import ended with half an archive: {done:?}"),
            () = tokio::time::sleep(std::time::Duration::from_millis(5)) => {}
        }
        if !rig.differ.calls().is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no layer was applied while the archive was still arriving"
        );
    }
    assert_eq!(
        rig.differ.calls()[0].layer,
        Digest::sha256_of(&img.layers[0])
    );
    assert_eq!(rig.differ.calls().len(), 1, "only the layer that arrived");
    tx.send(Ok(tail)).await.expect("send tail");
    drop(tx);
    let report = import.await.expect("import");
    assert_eq!(report.unpacked.len(), 1);
    assert_eq!(
        (report.unpacked[0].applied, report.unpacked[0].skipped),
        (3, 0)
    );
    let applied: Vec<Digest> = rig.differ.calls().into_iter().map(|c| c.layer).collect();
    let layers: Vec<Digest> = img.layers.iter().map(|l| Digest::sha256_of(l)).collect();
    assert_eq!(applied, layers, "each layer once, in order");
}

#[tokio::test]
async fn an_archive_ending_before_a_layer_names_the_missing_layer() {
    let rig = Rig::new();
    let img = image();
    let (head, _) = archive_split_after_first_layer(&img);
    // A complete tar stream (end-of-archive blocks) that lacks layers 1 and 2.
    let mut truncated_tar = head;
    truncated_tar.extend_from_slice(&[0u8; 1024]);
    let options = ImportOptions {
        platforms: PlatformSelection::All,
        references: vec![ImageReference::named_prefix("import", true)],
        ..ImportOptions::default()
    };
    let err = import::import(
        &rig.f.stores,
        &rig.f.cx("default"),
        source(truncated_tar),
        &options,
        &[rig.target()],
        &NoProgress,
    )
    .await
    .expect_err("layers are missing");
    let missing = Digest::sha256_of(&img.layers[1]).to_string();
    assert!(
        matches!(err, Error::Missing { .. }) && err.to_string().contains(&missing),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(rig.f.image_names("default").is_empty(), "no image is left");
}
