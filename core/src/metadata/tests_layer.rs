//! Tests of the metadata layer over a content backend: namespacing, leases, events and GC.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message;
use tokio_stream::StreamExt;

use crate::content::{CallContext, ContentStore, Digest, WriterRequest};
use crate::error::{Classify, ErrorKind};
use crate::events::{Exchange, Received};
use crate::filters::Filter;
use crate::labels::Labels;
use crate::metadata::content::IngestRecord;
use crate::metadata::leases::{LABEL_EXPIRE, LABEL_FLAT, Resource};
use crate::metadata::{MetaStore, Metadata, MetadataConfig, ObjectKind};
use crate::namespace::Namespace;
use crate::testing::MemoryContentStore;

struct Fixture {
    _dir: tempfile::TempDir,
    metadata: Arc<Metadata>,
    backend: MemoryContentStore,
    content: Arc<dyn ContentStore>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store =
        MetaStore::open(&dir.path().join("meta"), &MetadataConfig::default()).expect("open");
    let backend = MemoryContentStore::new();
    let metadata = Metadata::new(
        Arc::new(store),
        Arc::new(Exchange::default()),
        Some(Arc::new(backend.clone())),
        MetadataConfig::default(),
    );
    let content = metadata.content().expect("content");
    Fixture {
        _dir: dir,
        metadata,
        backend,
        content,
    }
}

fn cx(ns: &str, lease: Option<&str>) -> CallContext {
    CallContext {
        namespace: Some(Namespace::parse(ns).expect("ns")),
        lease: lease.map(str::to_owned),
    }
}

fn ns(name: &str) -> Namespace {
    Namespace::parse(name).expect("ns")
}

async fn ingest(
    content: &Arc<dyn ContentStore>,
    cx: &CallContext,
    data: &[u8],
    labels: Labels,
) -> Digest {
    let digest = Digest::sha256_of(data);
    let mut w = content
        .writer(
            cx,
            WriterRequest {
                reference: format!("ref-{digest}"),
                total: data.len() as u64,
                expected: Some(digest.clone()),
            },
        )
        .await
        .expect("writer");
    w.write(data).await.expect("write");
    w.commit(data.len() as u64, Some(digest.clone()), labels)
        .await
        .expect("commit");
    digest
}

async fn read_all(content: &Arc<dyn ContentStore>, cx: &CallContext, d: &Digest) -> Vec<u8> {
    let mut stream = content.read(cx, d, 0, None).await.expect("read");
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend(chunk.expect("chunk"));
    }
    out
}

#[tokio::test]
async fn content_is_namespaced_and_needs_a_namespace() {
    let f = fixture();
    let d = ingest(&f.content, &cx("a", None), b"hello", Labels::new()).await;
    assert_eq!(read_all(&f.content, &cx("a", None), &d).await, b"hello");
    let err = f
        .content
        .info(&cx("b", None), &d)
        .await
        .expect_err("other namespace");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = f
        .content
        .info(&CallContext::default(), &d)
        .await
        .expect_err("no namespace");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    let listed = f
        .content
        .list(&cx("a", None), &Filter::default())
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn content_create_is_published_once_per_new_blob() {
    let f = fixture();
    let mut events = f.metadata.events().subscribe();
    let d = ingest(&f.content, &cx("a", None), b"blob", Labels::new()).await;
    let Received::Event(e) = events.next().await else {
        panic!("no event")
    };
    assert_eq!(e.topic, "/content/create");
    assert_eq!(e.type_url, "containerd.events.ContentCreate");
    let decoded =
        berth_proto::containerd::events::ContentCreate::decode(e.value.as_slice()).expect("decode");
    assert_eq!(decoded.digest, d.to_string());
    assert_eq!(decoded.size, 4);
    // The same blob again: AlreadyExists at writer(), no event.
    let err = f
        .content
        .writer(
            &cx("a", None),
            WriterRequest {
                reference: "again".into(),
                total: 4,
                expected: Some(d.clone()),
            },
        )
        .await
        .err()
        .expect("exists");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    f.metadata
        .events()
        .publish(crate::events::Envelope {
            timestamp: SystemTime::now(),
            namespace: "a".into(),
            topic: "/marker".into(),
            type_url: String::new(),
            value: Vec::new(),
        })
        .expect("marker");
    let Received::Event(next) = events.next().await else {
        panic!("no marker")
    };
    assert_eq!(next.topic, "/marker", "no second /content/create");
}

#[tokio::test]
async fn a_wrong_digest_leaves_no_blob() {
    let f = fixture();
    let c = cx("a", None);
    let mut w = f
        .content
        .writer(
            &c,
            WriterRequest {
                reference: "bad".into(),
                total: 0,
                expected: None,
            },
        )
        .await
        .expect("writer");
    w.write(b"actual").await.expect("write");
    let err = w
        .commit(0, Some(Digest::sha256_of(b"other")), Labels::new())
        .await
        .expect_err("mismatch");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(
        f.content
            .list(&c, &Filter::default())
            .await
            .expect("list")
            .is_empty()
    );
    assert!(f.backend.digests().is_empty());
}

#[tokio::test]
async fn a_leased_blob_survives_gc_until_the_lease_goes() {
    let f = fixture();
    let lease = f
        .metadata
        .create_lease(&ns("a"), "", Labels::new())
        .await
        .expect("lease");
    let d = ingest(
        &f.content,
        &cx("a", Some(&lease.id)),
        b"leased",
        Labels::new(),
    )
    .await;
    let unleased = ingest(&f.content, &cx("a", None), b"loose", Labels::new()).await;
    let resources = f
        .metadata
        .list_lease_resources(&ns("a"), &lease.id)
        .expect("resources");
    assert_eq!(
        resources,
        [Resource {
            kind: "content".into(),
            id: d.to_string()
        }]
    );

    f.metadata.collect_garbage().await.expect("gc");
    assert!(
        f.content.info(&cx("a", None), &d).await.is_ok(),
        "the lease holds it"
    );
    assert!(
        f.content.info(&cx("a", None), &unleased).await.is_err(),
        "nothing holds it"
    );
    assert_eq!(f.backend.digests(), std::slice::from_ref(&d));

    f.metadata
        .delete_lease(&ns("a"), &lease.id, true)
        .await
        .expect("delete sync");
    assert!(f.content.info(&cx("a", None), &d).await.is_err());
    assert!(f.backend.digests().is_empty());
}

#[tokio::test]
async fn gc_ref_labels_keep_children_of_roots() {
    let f = fixture();
    let c = cx("a", None);
    let child = ingest(&f.content, &c, b"child", Labels::new()).await;
    let grandchild = ingest(&f.content, &c, b"grandchild", Labels::new()).await;
    f.content
        .update(
            &c,
            crate::content::Info {
                digest: child.clone(),
                size: 0,
                created_at: SystemTime::now(),
                updated_at: SystemTime::now(),
                labels: Labels::from([(
                    "containerd.io/gc.ref.content.l.0".into(),
                    grandchild.to_string(),
                )]),
            },
            &["labels.containerd.io/gc.ref.content.l.0".to_owned()],
        )
        .await
        .expect("label");
    let root = ingest(
        &f.content,
        &c,
        b"root",
        Labels::from([
            ("containerd.io/gc.root".into(), "1".into()),
            ("containerd.io/gc.ref.content.m.0".into(), child.to_string()),
        ]),
    )
    .await;
    let orphan = ingest(&f.content, &c, b"orphan", Labels::new()).await;
    f.metadata.collect_garbage().await.expect("gc");
    for kept in [&root, &child, &grandchild] {
        assert!(f.content.info(&c, kept).await.is_ok(), "{kept} kept");
    }
    assert!(f.content.info(&c, &orphan).await.is_err());
}

#[tokio::test]
async fn expired_and_flat_leases() {
    let f = fixture();
    let expired = f
        .metadata
        .create_lease(
            &ns("a"),
            "old",
            Labels::from([(LABEL_EXPIRE.into(), "2001-01-01T00:00:00Z".into())]),
        )
        .await
        .expect("lease");
    let d = ingest(
        &f.content,
        &cx("a", Some(&expired.id)),
        b"expiring",
        Labels::new(),
    )
    .await;

    let flat = f
        .metadata
        .create_lease(
            &ns("a"),
            "flat",
            Labels::from([(LABEL_FLAT.into(), "1".into())]),
        )
        .await
        .expect("flat");
    let child = ingest(&f.content, &cx("a", None), b"child", Labels::new()).await;
    let parent = ingest(
        &f.content,
        &cx("a", Some(&flat.id)),
        b"parent",
        Labels::from([("containerd.io/gc.ref.content".into(), child.to_string())]),
    )
    .await;

    f.metadata.collect_garbage().await.expect("gc");
    let c = cx("a", None);
    assert!(
        f.content.info(&c, &d).await.is_err(),
        "an expired lease protects nothing"
    );
    assert!(
        f.content.info(&c, &parent).await.is_ok(),
        "a flat lease holds what it lists"
    );
    assert!(
        f.content.info(&c, &child).await.is_err(),
        "but not what that references"
    );
    let leases = f
        .metadata
        .list_leases(&ns("a"), &Filter::default())
        .expect("list");
    assert_eq!(
        leases.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
        ["flat"]
    );
    // The collected lease took its resource records along.
    f.metadata
        .create_lease(&ns("a"), "old", Labels::new())
        .await
        .expect("same id again");
    assert!(
        f.metadata
            .list_lease_resources(&ns("a"), "old")
            .expect("list")
            .is_empty(),
        "an expired lease's resources outlived its collection"
    );
}

#[tokio::test]
async fn an_unleased_interrupted_ingest_expires() {
    let f = fixture();
    let c = cx("a", None);
    let mut w = f
        .content
        .writer(
            &c,
            WriterRequest {
                reference: "half".into(),
                total: 10,
                expected: None,
            },
        )
        .await
        .expect("writer");
    w.write(b"12345").await.expect("write");
    w.close().await.expect("close");
    f.metadata.collect_garbage().await.expect("gc");
    assert_eq!(
        f.content
            .status(&c, "half")
            .await
            .expect("kept while fresh")
            .offset,
        5
    );

    // Move the expiry into the past, as 24 hours passing would.
    f.metadata
        .store
        .write(|txn| {
            let mut record: IngestRecord = txn
                .get_object(&ns("a"), &ObjectKind::Ingests, "half")?
                .expect("record");
            record.expires_at = Some(SystemTime::now() - Duration::from_secs(1));
            txn.put_object(&ns("a"), &ObjectKind::Ingests, "half", &record)
        })
        .await
        .expect("age");
    let report = f.metadata.collect_garbage().await.expect("gc");
    assert_eq!(report.ingests_aborted, 1);
    assert_eq!(
        f.content
            .status(&c, "half")
            .await
            .map_err(|e| e.kind())
            .err(),
        Some(ErrorKind::NotFound)
    );
    assert!(f.backend.ingest_refs().is_empty());
}

#[tokio::test]
async fn shared_blobs_stay_until_every_namespace_lets_go() {
    let f = fixture();
    let a = cx("a", None);
    let b = cx("b", None);
    let lease_a = f
        .metadata
        .create_lease(&ns("a"), "la", Labels::new())
        .await
        .expect("lease");
    let lease_b = f
        .metadata
        .create_lease(&ns("b"), "lb", Labels::new())
        .await
        .expect("lease");
    let d = ingest(&f.content, &cx("a", Some("la")), b"shared", Labels::new()).await;

    // b proves nothing but names the digest: shared content needs no bytes.
    let w = f
        .content
        .writer(
            &cx("b", Some("lb")),
            WriterRequest {
                reference: "s".into(),
                total: 6,
                expected: Some(d.clone()),
            },
        )
        .await
        .expect("writer");
    assert_eq!(w.status().offset, 6);
    w.commit(6, Some(d.clone()), Labels::new())
        .await
        .expect("commit shared");
    assert_eq!(read_all(&f.content, &b, &d).await, b"shared");

    f.metadata
        .delete_lease(&ns("a"), &lease_a.id, true)
        .await
        .expect("drop a");
    assert!(f.content.info(&a, &d).await.is_err());
    assert_eq!(
        f.backend.digests(),
        std::slice::from_ref(&d),
        "b still holds it"
    );
    f.metadata
        .delete_lease(&ns("b"), &lease_b.id, true)
        .await
        .expect("drop b");
    assert!(f.backend.digests().is_empty());
}

#[tokio::test]
async fn lease_resources() {
    let f = fixture();
    let n = ns("a");
    let err = f
        .metadata
        .add_lease_resource(&n, "missing", Resource::parse("ingests", "r").expect("r"))
        .await
        .expect_err("no lease");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    f.metadata
        .create_lease(&n, "l", Labels::new())
        .await
        .expect("lease");
    let snap = Resource::parse("snapshots/overlayfs", "k").expect("r");
    f.metadata
        .add_lease_resource(&n, "l", snap.clone())
        .await
        .expect("add");
    f.metadata
        .add_lease_resource(&n, "l", snap.clone())
        .await
        .expect("add twice");
    assert_eq!(
        f.metadata.list_lease_resources(&n, "l").expect("list"),
        std::slice::from_ref(&snap)
    );
    f.metadata
        .delete_lease_resource(&n, "l", &snap)
        .await
        .expect("delete");
    f.metadata
        .delete_lease_resource(&n, "l", &snap)
        .await
        .expect("absent is fine");
    assert!(
        f.metadata
            .list_lease_resources(&n, "l")
            .expect("list")
            .is_empty()
    );
    let err = f
        .metadata
        .create_lease(&n, "l", Labels::new())
        .await
        .expect_err("exists");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
}

/// Lease resources are records of their own: a lease holding thousands stays one small
/// record, a lease whose id starts another's holds only its own, and a deleted lease leaves
/// none of its resources to a new lease of the same id.
#[tokio::test]
async fn a_lease_holding_thousands_stays_small_and_goes_whole() {
    let f = fixture();
    let n = ns("a");
    for id in ["big", "bi"] {
        f.metadata
            .create_lease(&n, id, Labels::new())
            .await
            .expect("lease");
    }
    let held = |i: usize| Resource::parse("ingests", &format!("ref-{i}")).expect("r");
    for i in 0..1500 {
        f.metadata
            .add_lease_resource(&n, "big", held(i))
            .await
            .expect("add");
    }
    f.metadata
        .add_lease_resource(&n, "bi", held(0))
        .await
        .expect("add");
    let record = f
        .metadata
        .store
        .get_raw(&crate::metadata::object_key(&n, &ObjectKind::Leases, "big").expect("key"))
        .expect("get")
        .expect("record");
    assert!(
        record.len() < 256,
        "a lease's record grows with what it holds: {} bytes",
        record.len()
    );
    let mut listed = f.metadata.list_lease_resources(&n, "big").expect("list");
    listed.sort();
    let mut expected: Vec<Resource> = (0..1500).map(held).collect();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(
        f.metadata.list_lease_resources(&n, "bi").expect("list"),
        [held(0)]
    );

    f.metadata
        .delete_lease(&n, "big", false)
        .await
        .expect("delete");
    f.metadata
        .create_lease(&n, "big", Labels::new())
        .await
        .expect("again");
    assert!(
        f.metadata
            .list_lease_resources(&n, "big")
            .expect("list")
            .is_empty(),
        "a deleted lease's resources outlived it"
    );
    assert_eq!(
        f.metadata.list_lease_resources(&n, "bi").expect("list"),
        [held(0)]
    );
}

/// A call in namespace `a` under a new lease `hold`, which keeps what it creates.
async fn held_by_lease(metadata: &Metadata) -> CallContext {
    let lease = metadata
        .create_lease(&ns("a"), "hold", Labels::new())
        .await
        .expect("lease");
    cx("a", Some(&lease.id))
}

/// A lease created and deleted, then a collection: a change that leaves no backend object
/// without a record.
async fn collect_after_lease_churn(metadata: &Metadata) -> crate::metadata::gc::GcReport {
    metadata
        .create_lease(&ns("a"), "brief", Labels::new())
        .await
        .expect("lease");
    metadata
        .delete_lease(&ns("a"), "brief", false)
        .await
        .expect("delete");
    metadata.collect_garbage().await.expect("gc")
}

/// As containerd's `dirtyCS`: a collection walks the content store only when something may
/// have left a blob without a record since the last walk (and once after a start), not after
/// lease changes alone.
#[tokio::test]
async fn collections_walk_the_content_store_only_when_it_may_hold_garbage() {
    let f = fixture();
    let raw: Arc<dyn ContentStore> = Arc::new(f.backend.clone());
    let c = cx("a", None);
    // Left by a crash, say: in the backend with no record.
    let first = ingest(&raw, &c, b"first orphan", Labels::new()).await;
    let report = f.metadata.collect_garbage().await.expect("gc");
    assert_eq!(report.blobs_removed, 1, "the first collection walks");
    assert!(raw.info(&c, &first).await.is_err());

    let second = ingest(&raw, &c, b"second orphan", Labels::new()).await;
    let report = collect_after_lease_churn(&f.metadata).await;
    assert_eq!(report.blobs_removed, 0, "nothing marked the content store");
    assert!(raw.info(&c, &second).await.is_ok());

    // A write through the layer may leave a blob behind; the next collection walks. A lease
    // keeps the written blob's record, so no record the collection removes forces the walk.
    let held = held_by_lease(&f.metadata).await;
    let written = ingest(&f.content, &held, b"leased", Labels::new()).await;
    let report = f.metadata.collect_garbage().await.expect("gc");
    assert_eq!(report.blobs_removed, 1, "the orphan, after a write");
    assert!(raw.info(&c, &second).await.is_err());
    assert!(raw.info(&c, &written).await.is_ok());

    // A delete through the layer, likewise: the orphan and the deleted blob go.
    let third = ingest(&raw, &c, b"third orphan", Labels::new()).await;
    let report = collect_after_lease_churn(&f.metadata).await;
    assert_eq!(report.blobs_removed, 0, "nothing marked it since");
    f.content.delete(&held, &written).await.expect("delete");
    let report = f.metadata.collect_garbage().await.expect("gc");
    assert_eq!(report.blobs_removed, 2, "the orphan and the deleted blob");
    assert!(raw.info(&c, &third).await.is_err());
    assert!(raw.info(&c, &written).await.is_err());
}

mod snapshots {
    use super::*;
    use crate::snapshot::{SnapshotKind, Snapshotter};
    use crate::testing::MemorySnapshotter;

    struct SnapFixture {
        _dir: tempfile::TempDir,
        metadata: Arc<Metadata>,
        backend: MemorySnapshotter,
        sn: Arc<dyn Snapshotter>,
    }

    fn snap_fixture() -> SnapFixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            MetaStore::open(&dir.path().join("meta"), &MetadataConfig::default()).expect("open");
        let backend = MemorySnapshotter::new();
        let metadata = Metadata::with_snapshotters(
            Arc::new(store),
            Arc::new(Exchange::default()),
            None,
            [(
                "mem".to_owned(),
                Arc::new(backend.clone()) as Arc<dyn Snapshotter>,
            )]
            .into(),
            MetadataConfig::default(),
        );
        let sn = metadata.snapshotter("mem").expect("snapshotter");
        SnapFixture {
            _dir: dir,
            metadata,
            backend,
            sn,
        }
    }

    #[tokio::test]
    async fn prepare_commit_view_and_namespaced_keys() {
        let f = snap_fixture();
        let a = cx("a", None);
        f.sn.prepare(&a, "k1", None, Labels::new())
            .await
            .expect("prepare");
        f.sn.commit(&a, "base", "k1", Labels::new())
            .await
            .expect("commit");
        f.sn.prepare(&a, "k2", Some("base"), Labels::new())
            .await
            .expect("child");
        f.sn.view(&a, "v", Some("base"), Labels::new())
            .await
            .expect("view");
        assert_eq!(
            f.sn.stat(&a, "base").await.expect("stat").kind,
            SnapshotKind::Committed
        );
        assert_eq!(
            f.sn.stat(&a, "v").await.expect("stat").kind,
            SnapshotKind::View
        );
        let err =
            f.sn.commit(&a, "x", "v", Labels::new())
                .await
                .expect_err("views do not commit");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        let err =
            f.sn.prepare(&a, "k2", None, Labels::new())
                .await
                .expect_err("exists");
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        let err =
            f.sn.prepare(&a, "k3", Some("k2"), Labels::new())
                .await
                .expect_err("active parent");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        // Another namespace has its own keys.
        let b = cx("b", None);
        assert_eq!(
            f.sn.stat(&b, "base").await.map_err(|e| e.kind()).err(),
            Some(ErrorKind::NotFound)
        );
        f.sn.prepare(&b, "k1", None, Labels::new())
            .await
            .expect("same key elsewhere");
        assert!(
            f.backend
                .keys()
                .iter()
                .all(|k| k.starts_with("a/") || k.starts_with("b/"))
        );
        let err = f.sn.remove(&a, "base").await.expect_err("has children");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    }

    /// Puts `key` straight into the backend (a crash between backend and record, say), then
    /// checks that a collection after lease changes alone leaves it there.
    async fn stray_left_alone(f: &SnapFixture, key: &str) {
        f.backend
            .prepare(&cx("a", None), key, None, Labels::new())
            .await
            .expect("backend prepare");
        let report = collect_after_lease_churn(&f.metadata).await;
        assert_eq!(
            report.snapshots_removed, 0,
            "nothing marked the snapshotter since the last walk"
        );
        assert!(f.backend.keys().iter().any(|k| k == key));
    }

    #[tokio::test]
    async fn collections_walk_a_snapshotter_only_when_it_may_hold_garbage() {
        let f = snap_fixture();
        let a = cx("a", None);
        // In the backend with no record (a crash between the two, say).
        f.backend
            .prepare(&a, "stray-1", None, Labels::new())
            .await
            .expect("backend prepare");
        let report = f.metadata.collect_garbage().await.expect("gc");
        assert_eq!(report.snapshots_removed, 1, "the first collection walks");

        stray_left_alone(&f, "stray-2").await;
        assert_eq!(f.backend.keys().len(), 1);

        // A creation through the layer (one that fails undoes its record and leaves the
        // backend snapshot behind): the next collection walks the snapshotter. A lease keeps
        // the snapshot itself.
        let held = held_by_lease(&f.metadata).await;
        f.sn.prepare(&held, "k", None, Labels::new())
            .await
            .expect("prepare");
        let report = f.metadata.collect_garbage().await.expect("gc");
        assert_eq!(
            report.snapshots_removed, 1,
            "the stray goes after a prepare"
        );
        assert_eq!(f.backend.keys().len(), 1, "{:?}", f.backend.keys());

        // A commit through the layer, likewise.
        stray_left_alone(&f, "stray-3").await;
        f.sn.commit(&held, "k-done", "k", Labels::new())
            .await
            .expect("commit");
        let report = f.metadata.collect_garbage().await.expect("gc");
        assert_eq!(report.snapshots_removed, 1, "the stray goes after a commit");

        // A removal through the layer: the next collection walks the snapshotter.
        stray_left_alone(&f, "stray-4").await;
        f.sn.remove(&a, "k-done").await.expect("remove");
        let report = f.metadata.collect_garbage().await.expect("gc");
        assert_eq!(
            report.snapshots_removed, 2,
            "the stray and the removed snapshot"
        );
        assert!(f.backend.keys().is_empty(), "{:?}", f.backend.keys());
    }

    #[tokio::test]
    async fn gc_removes_unreferenced_snapshots_children_first() {
        let f = snap_fixture();
        let a = cx("a", None);
        let held = held_by_lease(&f.metadata).await;
        f.sn.prepare(&held, "x1", None, Labels::new())
            .await
            .expect("prepare");
        f.sn.commit(&held, "layer1", "x1", Labels::new())
            .await
            .expect("commit");
        f.sn.prepare(&held, "x2", Some("layer1"), Labels::new())
            .await
            .expect("prepare");
        f.sn.commit(&held, "layer2", "x2", Labels::new())
            .await
            .expect("commit");
        f.sn.prepare(&a, "loose", None, Labels::new())
            .await
            .expect("unleased");
        f.metadata.collect_garbage().await.expect("gc");
        assert_eq!(
            f.backend.keys().len(),
            2,
            "the leased chain stays: {:?}",
            f.backend.keys()
        );
        assert!(f.sn.stat(&a, "loose").await.is_err());
        f.metadata
            .delete_lease(&ns("a"), "hold", true)
            .await
            .expect("drop lease");
        assert!(
            f.backend.keys().is_empty(),
            "parent and child removed: {:?}",
            f.backend.keys()
        );
    }

    #[tokio::test]
    async fn commit_and_remove_update_the_calls_lease() {
        let f = snap_fixture();
        let n = ns("a");
        f.metadata
            .create_lease(&n, "hold", Labels::new())
            .await
            .expect("lease");
        let held = cx("a", Some("hold"));
        let ids = || -> Vec<String> {
            f.metadata
                .list_lease_resources(&n, "hold")
                .expect("resources")
                .into_iter()
                .map(|r| format!("{}:{}", r.kind, r.id))
                .collect()
        };
        f.sn.prepare(&held, "active", None, Labels::new())
            .await
            .expect("prepare");
        assert_eq!(ids(), ["snapshots/mem:active"]);
        f.sn.commit(&held, "layer", "active", Labels::new())
            .await
            .expect("commit");
        assert_eq!(ids(), ["snapshots/mem:layer"], "the active key is gone");
        f.sn.remove(&held, "layer").await.expect("remove");
        assert!(ids().is_empty(), "removed under the lease: {:?}", ids());

        // A removal without the lease header leaves the lease alone, as containerd.
        f.sn.prepare(&held, "other", None, Labels::new())
            .await
            .expect("prepare");
        f.sn.remove(&cx("a", None), "other").await.expect("remove");
        assert_eq!(ids(), ["snapshots/mem:other"]);
    }
}

mod images {
    use super::*;
    use crate::metadata::images::Image;
    use crate::snapshot::Descriptor;

    fn image(name: &str, target: &Digest, size: u64) -> Image {
        Image {
            name: name.into(),
            labels: Labels::new(),
            target: Descriptor {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                digest: target.clone(),
                size,
                annotations: Default::default(),
            },
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
        }
    }

    /// A delete whose caller stops waiting for the flush (a cancelled call) is applied: its
    /// event is published all the same, as containerd publishes once its transaction commits.
    #[tokio::test]
    async fn a_delete_cancelled_during_its_flush_still_publishes_its_event() {
        let f = fixture();
        let n = ns("a");
        let d = Digest::sha256_of(b"m");
        let mut cancelled_mid_flush = 0;
        for round in 0..50 {
            let name = format!("img{round}");
            f.metadata
                .create_image(&n, image(&name, &d, 1), None, None)
                .await
                .expect("create");
            let mut events = f.metadata.events().subscribe();
            let mut delete = Box::pin(f.metadata.delete_image(&n, &name, None, false));
            let polled =
                std::future::poll_fn(|cx| std::task::Poll::Ready(delete.as_mut().poll(cx))).await;
            drop(delete);
            if polled.is_pending() {
                cancelled_mid_flush += 1;
            }
            let received = tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
                .await
                .expect("the delete's event");
            let Received::Event(e) = received else {
                panic!("no event: {received:?}")
            };
            assert_eq!(e.topic, "/images/delete");
            assert!(
                f.metadata.get_image(&n, &name).is_err(),
                "the image is deleted"
            );
            if cancelled_mid_flush >= 3 {
                break;
            }
        }
        assert!(
            cancelled_mid_flush > 0,
            "no delete could be cancelled while flushing: the test proves nothing"
        );
    }

    #[tokio::test]
    async fn create_update_and_compare_and_delete() {
        let f = fixture();
        let n = ns("a");
        let d1 = Digest::sha256_of(b"m1");
        let d2 = Digest::sha256_of(b"m2");
        let err = f
            .metadata
            .update_image(&n, image("img", &d1, 2), &[], None)
            .await
            .expect_err("missing");
        assert_eq!(err.kind(), ErrorKind::NotFound, "import relies on NotFound");
        f.metadata
            .create_image(&n, image("img", &d1, 2), None, None)
            .await
            .expect("create");
        let err = f
            .metadata
            .create_image(&n, image("img", &d1, 2), None, None)
            .await
            .expect_err("exists");
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        f.metadata
            .update_image(&n, image("img", &d2, 2), &["target".to_owned()], None)
            .await
            .expect("retarget");
        let err = f
            .metadata
            .delete_image(&n, "img", Some(&d1), false)
            .await
            .expect_err("stale target");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(f.metadata.get_image(&n, "img").is_ok(), "kept");
        f.metadata
            .delete_image(&n, "img", Some(&d2), false)
            .await
            .expect("right target");
        assert!(f.metadata.get_image(&n, "img").is_err());
        let mut bad = image("bad", &d1, 0);
        let err = f
            .metadata
            .create_image(&n, bad.clone(), None, None)
            .await
            .expect_err("size 0");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        bad.target.size = 1;
        bad.target.media_type.clear();
        let err = f
            .metadata
            .create_image(&n, bad, None, None)
            .await
            .expect_err("no media type");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[tokio::test]
    async fn sync_delete_frees_only_what_the_image_alone_used() {
        let f = fixture();
        let c = cx("a", None);
        let n = ns("a");
        let shared = ingest(&f.content, &c, b"shared layer", Labels::new()).await;
        let own = ingest(&f.content, &c, b"own layer", Labels::new()).await;
        let other = ingest(&f.content, &c, b"other layer", Labels::new()).await;
        let manifest = |layers: &[&Digest], tag: &[u8]| {
            let mut labels = Labels::new();
            for (i, l) in layers.iter().enumerate() {
                labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.to_string());
            }
            (labels, tag.to_vec())
        };
        let (l1, m1data) = manifest(&[&shared, &own], b"manifest one");
        let (l2, m2data) = manifest(&[&shared, &other], b"manifest two");
        let m1 = ingest(&f.content, &c, &m1data, l1).await;
        let m2 = ingest(&f.content, &c, &m2data, l2).await;
        f.metadata
            .create_image(&n, image("one", &m1, 12), None, None)
            .await
            .expect("one");
        f.metadata
            .create_image(&n, image("two", &m2, 12), None, None)
            .await
            .expect("two");
        f.metadata.collect_garbage().await.expect("gc");
        assert_eq!(f.backend.digests().len(), 5, "everything is referenced");

        f.metadata
            .delete_image(&n, "one", None, true)
            .await
            .expect("delete sync");
        let left: std::collections::BTreeSet<Digest> = f.backend.digests().into_iter().collect();
        assert_eq!(left, [shared, other, m2].into_iter().collect());
    }
}

#[tokio::test]
async fn lease_ids_are_any_text_as_ctr_makes_them() {
    let f = fixture();
    for id in ["852753814-_4GM", "a--b", "x/y"] {
        f.metadata
            .create_lease(&ns("a"), id, Labels::new())
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
}
