//! The local store's on-disk behaviour: layout, crash recovery, atomic visibility of blobs.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use berth_content_local::LocalStore;
use berth_core::ErrorKind;
use berth_core::content::{CallContext, ContentKind, ContentStore, Digest, WriterRequest};
use berth_core::error::Classify;
use berth_core::filters::Filter;
use berth_core::labels::Labels;

fn cx() -> CallContext {
    CallContext::default()
}

fn request(reference: &str, total: u64, expected: Option<&Digest>) -> WriterRequest {
    WriterRequest {
        reference: reference.to_owned(),
        total,
        expected: expected.cloned(),
    }
}

async fn store_in(root: &Path) -> LocalStore {
    let store = LocalStore::new(root);
    store.prepare().await.expect("prepare");
    store
}

fn ingest_dir(root: &Path, reference: &str) -> PathBuf {
    root.join("ingest")
        .join(Digest::sha256_of(reference.as_bytes()).hex())
}

fn bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn ingest_and_blob_layout_follow_containerd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("content");
    let store = store_in(&root).await;
    let data = bytes(1, 10);
    let digest = Digest::sha256_of(&data);
    let mut w = store
        .writer(&cx(), request("my ref", 10, Some(&digest)))
        .await
        .expect("writer");
    w.write(&data[..4]).await.expect("write");
    w.close().await.expect("close");

    let ingest = ingest_dir(&root, "my ref");
    assert_eq!(
        fs::read_to_string(ingest.join("ref")).expect("ref"),
        "my ref"
    );
    assert_eq!(fs::read(ingest.join("data")).expect("data"), &data[..4]);
    assert_eq!(
        fs::read_to_string(ingest.join("total")).expect("total"),
        "10"
    );
    assert_eq!(
        fs::read_to_string(ingest.join("expected")).expect("expected"),
        digest.to_string()
    );
    for time in ["startedat", "updatedat"] {
        let text = fs::read_to_string(ingest.join(time)).expect(time);
        assert!(text.parse::<u128>().is_ok(), "{time}: {text:?}");
    }

    let mut w = store
        .writer(&cx(), request("my ref", 10, Some(&digest)))
        .await
        .expect("writer");
    w.write(&data[4..]).await.expect("write");
    w.commit(10, Some(digest.clone()), Labels::new())
        .await
        .expect("commit");
    let blob = root.join("blobs/sha256").join(digest.hex());
    assert_eq!(fs::read(&blob).expect("blob"), data);
    let mode = fs::metadata(&blob).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o444, "blob mode {mode:o}");
    assert!(!ingest.exists(), "the ingest directory outlived its commit");
}

#[tokio::test]
async fn ingests_resume_in_a_new_store_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = bytes(2, 3000);
    let digest = Digest::sha256_of(&data);
    {
        let store = store_in(dir.path()).await;
        let mut w = store
            .writer(&cx(), request("resumed", 3000, None))
            .await
            .expect("writer");
        w.write(&data[..1000]).await.expect("write");
        w.close().await.expect("close");
    }
    let store = store_in(dir.path()).await;
    let status = store.status(&cx(), "resumed").await.expect("status");
    assert_eq!((status.offset, status.total), (1000, 3000));
    let mut w = store
        .writer(&cx(), request("resumed", 0, None))
        .await
        .expect("writer");
    assert_eq!(w.status().offset, 1000);
    assert_eq!(
        w.status().total,
        3000,
        "the stored total survives a writer without one"
    );
    assert_eq!(w.digest(), Digest::sha256_of(&data[..1000]));
    w.write(&data[1000..]).await.expect("write");
    w.commit(3000, Some(digest.clone()), Labels::new())
        .await
        .expect("commit");
    assert_eq!(store.info(&cx(), &digest).await.expect("info").size, 3000);
}

#[tokio::test]
async fn a_crashed_ingest_resumes_over_every_byte_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = bytes(3, 2000);
    {
        let store = store_in(dir.path()).await;
        let mut w = store
            .writer(&cx(), request("crashed", 0, None))
            .await
            .expect("writer");
        w.write(&data[..1500]).await.expect("write");
        // No close: the process dies with the writer open.
        std::mem::forget(w);
    }
    // Bytes that reached the disk although their write was never acknowledged.
    let data_file = ingest_dir(dir.path(), "crashed").join("data");
    let mut on_disk = fs::read(&data_file).expect("data");
    on_disk.extend_from_slice(&data[1500..1600]);
    fs::write(&data_file, &on_disk).expect("append");

    let store = store_in(dir.path()).await;
    let status = store.status(&cx(), "crashed").await.expect("status");
    assert_eq!(status.offset, 1600);
    let mut w = store
        .writer(&cx(), request("crashed", 0, None))
        .await
        .expect("a new instance has no stale lock");
    assert_eq!(w.status().offset, 1600);
    assert_eq!(w.digest(), Digest::sha256_of(&data[..1600]));
    w.write(&data[1600..]).await.expect("write");
    w.commit(2000, Some(Digest::sha256_of(&data)), Labels::new())
        .await
        .expect("commit");
}

#[tokio::test]
async fn an_interrupted_ingest_creation_is_ignored_then_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_in(dir.path()).await;
    // A crash between mkdir and writing `ref`.
    let half = ingest_dir(dir.path(), "half");
    fs::create_dir_all(&half).expect("mkdir");
    fs::write(half.join("data"), b"orphan").expect("data");
    assert!(
        store
            .list_statuses(&cx(), &Filter::default())
            .await
            .expect("list")
            .is_empty()
    );
    let err = store.status(&cx(), "half").await.expect_err("no status");
    assert_eq!(err.kind(), ErrorKind::NotFound);

    let w = store
        .writer(&cx(), request("half", 0, None))
        .await
        .expect("writer");
    assert_eq!(w.status().offset, 0, "an incomplete ingest starts over");
    w.close().await.expect("close");

    fs::remove_file(half.join("ref")).expect("unref");
    store_in(dir.path()).await;
    assert!(!half.exists(), "prepare keeps an incomplete ingest");
}

#[tokio::test]
async fn a_different_total_starts_the_ingest_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_in(dir.path()).await;
    let mut w = store
        .writer(&cx(), request("sized", 10, None))
        .await
        .expect("writer");
    w.write(b"12345").await.expect("write");
    w.close().await.expect("close");
    let w = store
        .writer(&cx(), request("sized", 20, None))
        .await
        .expect("writer");
    assert_eq!((w.status().offset, w.status().total), (0, 20));
}

/// Watches `blobs/` while blobs are written and committed (and one commit fails): every
/// file that is ever visible is complete, read-only and named by its digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_partial_blob_is_ever_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(store_in(dir.path()).await);
    let blobs = dir.path().join("blobs/sha256");
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (blobs, done) = (blobs.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut seen = 0;
            while !done.load(Ordering::Relaxed) {
                let Ok(entries) = fs::read_dir(&blobs) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.expect("entry").path();
                    let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
                    assert_eq!(mode, 0o444, "{} visible with mode {mode:o}", path.display());
                    let content = fs::read(&path).expect("read");
                    let name = path.file_name().and_then(|n| n.to_str()).expect("name");
                    assert_eq!(
                        Digest::sha256_of(&content).hex(),
                        name,
                        "a blob is visible before it is complete"
                    );
                    seen += 1;
                }
            }
            seen
        })
    };

    let mut expected = Vec::new();
    for i in 0..6u8 {
        let data = bytes(10 + i, (1 << 20) + usize::from(i) * 4099);
        let digest = Digest::sha256_of(&data);
        let mut w = store
            .writer(&cx(), request(&format!("blob-{i}"), 0, None))
            .await
            .expect("writer");
        for chunk in data.chunks(65_536) {
            w.write(chunk).await.expect("write");
        }
        if i == 3 {
            let wrong = Digest::sha256_of(b"something else");
            let err = w
                .commit(0, Some(wrong.clone()), Labels::new())
                .await
                .expect_err("wrong digest");
            assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
            assert!(
                err.message().contains(&format!(
                    "unexpected commit digest {digest}, expected {wrong}"
                )),
                "{err}"
            );
            assert!(!blobs.join(wrong.hex()).exists());
            assert!(!blobs.join(digest.hex()).exists());
            continue;
        }
        w.commit(data.len() as u64, None, Labels::new())
            .await
            .expect("commit");
        expected.push(digest);
    }
    done.store(true, Ordering::Relaxed);
    let seen = watcher.join().expect("the watcher saw a partial blob");
    assert!(seen > 0, "the watcher never saw a blob");
    let listed: Vec<Digest> = store
        .list(&cx(), &Filter::default())
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.digest)
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
}

#[tokio::test]
async fn errors_name_what_they_are_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_in(dir.path()).await;

    let held = store
        .writer(&cx(), request("busy ref", 0, None))
        .await
        .expect("writer");
    let err = store
        .writer(&cx(), request("busy ref", 0, None))
        .await
        .err()
        .expect("locked");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(
        err.message().starts_with("ref \"busy ref\" locked for"),
        "{err}"
    );
    drop(held);

    let mut w = store
        .writer(&cx(), request("sized", 0, None))
        .await
        .expect("writer");
    w.write(b"abc").await.expect("write");
    let err = w.truncate(1).await.expect_err("truncate to 1");
    assert_eq!(err.kind(), ErrorKind::NotImplemented);
    let err = w
        .commit(5, None, Labels::new())
        .await
        .expect_err("wrong size");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(
        err.message()
            .contains("unexpected commit size 3, expected 5"),
        "{err}"
    );
}

#[tokio::test]
async fn update_is_refused_because_labels_live_in_the_metadata_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_in(dir.path()).await;
    let data = b"labelled?";
    let digest = Digest::sha256_of(data);
    let mut w = store
        .writer(&cx(), request("l", 0, None))
        .await
        .expect("writer");
    w.write(data).await.expect("write");
    let labels: Labels = [("k".to_owned(), "v".to_owned())].into();
    w.commit(0, None, labels.clone()).await.expect("commit");
    let mut info = store.info(&cx(), &digest).await.expect("info");
    assert!(info.labels.is_empty(), "the local store keeps no labels");
    assert_eq!(info.created_at, info.updated_at);
    info.labels = labels;
    let err = store
        .update(&cx(), info.clone(), &[])
        .await
        .expect_err("update");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    info.digest = Digest::sha256_of(b"missing");
    let err = store.update(&cx(), info, &[]).await.expect_err("update");
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn abort_of_a_held_ingest_makes_its_commit_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_in(dir.path()).await;
    let mut w = store
        .writer(&cx(), request("doomed", 0, None))
        .await
        .expect("writer");
    w.write(b"bytes").await.expect("write");
    store.abort(&cx(), "doomed").await.expect("abort");
    let err = w
        .commit(0, None, Labels::new())
        .await
        .expect_err("commit after abort");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(
        !dir.path()
            .join("blobs/sha256")
            .join(Digest::sha256_of(b"bytes").hex())
            .exists()
    );
    let w = store
        .writer(&cx(), request("doomed", 0, None))
        .await
        .expect("the ref is free again");
    assert_eq!(w.status().offset, 0);
}

#[tokio::test]
async fn hostile_refs_never_become_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("content");
    let store = store_in(&root).await;
    for reference in [
        "../../escape",
        "/tmp/absolute",
        "a/../../../b",
        "..",
        "x\0y",
    ] {
        let mut w = store
            .writer(&cx(), request(reference, 0, None))
            .await
            .expect("writer");
        w.write(reference.as_bytes()).await.expect("write");
        w.close().await.expect("close");
    }
    let outside: Vec<_> = fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        outside,
        ["content"],
        "something was created outside the root"
    );
    for entry in fs::read_dir(root.join("ingest")).expect("list") {
        let name = entry.expect("entry").file_name();
        let name = name.to_str().expect("utf-8");
        assert!(
            name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()),
            "ingest directory {name:?} is not a hashed ref"
        );
    }
}

#[tokio::test]
async fn registration_creates_the_root_and_exports_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = berth_core::config::Config {
        root: dir.path().join("root"),
        state: dir.path().join("state"),
        ..Default::default()
    };
    let mut registry = berth_core::registry::Registry::new();
    registry
        .register(berth_content_local::registration())
        .expect("register");
    let plugins = registry.init(&config).await.expect("init");
    let root = dir.path().join("root/io.containerd.content.v1.content");
    assert!(root.join("blobs").is_dir() && root.join("ingest").is_dir());
    let info = plugins
        .infos()
        .into_iter()
        .find(|p| p.uri() == "io.containerd.content.v1.content")
        .expect("registered");
    assert_eq!(
        info.meta.exports.get("root").map(String::as_str),
        root.to_str()
    );
    let store = plugins.get::<ContentKind>("content").expect("typed lookup");
    assert!(
        store
            .list(&cx(), &Filter::default())
            .await
            .expect("list")
            .is_empty()
    );
}

/// A blob bigger than the background write-back step (32 MiB): write-backs start while it
/// is written, and after one (the data file truncated and rewritten) the blob still commits
/// whole, byte for byte.
#[tokio::test]
async fn a_blob_written_back_while_it_grows_commits_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("content");
    let store = store_in(&root).await;
    let chunk = bytes(7, 1 << 20);
    let total = 70 * chunk.len();
    let data: Vec<u8> = chunk.iter().copied().cycle().take(total).collect();
    let digest = Digest::sha256_of(&data);
    let mut w = store
        .writer(&cx(), request("big", total as u64, Some(&digest)))
        .await
        .expect("writer");
    for part in data.chunks(1 << 20).take(40) {
        w.write(part).await.expect("write");
    }
    w.truncate(0).await.expect("truncate");
    for part in data.chunks(1 << 20) {
        w.write(part).await.expect("write");
    }
    w.commit(total as u64, Some(digest.clone()), Labels::new())
        .await
        .expect("commit");
    let stored = fs::read(root.join("blobs/sha256").join(digest.hex())).expect("blob");
    assert!(
        stored == data,
        "the committed blob differs from what was written"
    );
}
