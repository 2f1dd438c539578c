//! Acceptance 5 of issue 3: berthd killed with SIGKILL in the middle of many concurrent ingests
//! (some under leases, some labelled as GC roots, some unprotected, some deliberately stalled
//! half-way) and lease creates/deletes, then restarted, at least 20 times in a row on the same
//! root. After each restart:
//!
//! - every blob whose commit was acknowledged reads back with its digest (unless nothing
//!   protected it: an unprotected blob may have been collected, never corrupted);
//! - every listed blob in every namespace hashes to its digest and has its size, so no
//!   half-written blob is visible under any digest;
//! - `content active` (ListStatuses) lists every ingest that was started and whose commit was
//!   never sent, at an offset between what the server acknowledged and what was sent; a stalled
//!   ingest can be resumed from there to a correct blob;
//! - leases whose creation was acknowledged exist, leases whose deletion was acknowledged do
//!   not;
//! - after the temporary leases are deleted with `sync`, the collection leaves exactly what is
//!   protected: blobs under the kept lease or labelled `containerd.io/gc.root`, ingests under the
//!   kept lease or without a lease (those expire after 24h, see tests/gc.rs).
//!
//! berthd only: containerd is not the subject of a crash test. `BERTH_CRASH_ITERATIONS` and
//! `BERTH_CRASH_SEED` override the loop count (default 20) and the random seed (printed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_integration::api::{self, LABEL_GC_ROOT, Rng};
use berth_integration::containerd_client::services::v1::ListNamespacesRequest;
use berth_integration::containerd_client::services::v1::namespaces_client::NamespacesClient;
use berth_integration::tonic::Code;
use berth_integration::tonic::transport::Channel;
use berth_integration::{Daemon, Kind};

/// How a blob is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protection {
    /// Written under the lease `keep`, never deleted.
    Keep,
    /// Written under a temporary lease `tmp-<n>`, deleted with sync at the end of the iteration.
    Temp(usize),
    /// Written without a lease, committed with `containerd.io/gc.root`.
    Root,
    /// Written without a lease or labels: garbage as soon as it is committed.
    Bare,
}

impl Protection {
    fn lease(self) -> Option<String> {
        match self {
            Protection::Keep => Some("keep".to_string()),
            Protection::Temp(n) => Some(format!("tmp-{n}")),
            Protection::Root | Protection::Bare => None,
        }
    }

    /// Whether a committed blob survives the end-of-iteration collection.
    fn blob_survives(self) -> bool {
        matches!(self, Protection::Keep | Protection::Root)
    }

    /// Whether an unfinished ingest survives the end-of-iteration collection (ingests without
    /// a lease live 24h; labels only apply at commit).
    fn ingest_survives(self) -> bool {
        !matches!(self, Protection::Temp(_))
    }
}

/// When a writer runs relative to the kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// Commits quickly; the kill waits for its acknowledgement.
    Early,
    /// Writes slowly in small chunks; the kill comes whenever it comes.
    Racing,
    /// Writes part of its blob, then waits for the kill with the stream open.
    Stalled,
}

#[derive(Debug)]
struct Writer {
    reference: String,
    protection: Protection,
    pace: Pace,
    data: Vec<u8>,
    digest: String,
    chunk: usize,
}

/// What a writer knows happened, updated as it goes (tasks are aborted at the kill).
#[derive(Debug, Default, Clone)]
struct Progress {
    /// The STAT was answered: the ingest exists.
    started: bool,
    /// Bytes the server acknowledged.
    acked: i64,
    /// Bytes sent (acknowledged or not).
    sent: i64,
    /// The COMMIT was sent.
    commit_sent: bool,
    /// The COMMIT was acknowledged.
    committed: bool,
    /// The stalled writer reached its pause.
    stalled: bool,
    /// The error that ended it (after the kill).
    error: Option<String>,
}

/// What the lease task knows happened.
#[derive(Debug, Default, Clone)]
struct LeaseOps {
    /// Leases whose Create was acknowledged.
    created: BTreeSet<String>,
    /// Leases whose Delete was sent.
    delete_sent: BTreeSet<String>,
    /// Leases whose Delete was acknowledged.
    deleted: BTreeSet<String>,
}

const NS_PREFIX: &str = "crash";
const TEMP_LEASES: usize = 3;

fn plan(rng: &mut Rng, iteration: usize) -> Vec<Writer> {
    let protections = [
        Protection::Keep,
        Protection::Temp(0),
        Protection::Temp(1),
        Protection::Temp(2),
        Protection::Root,
        Protection::Bare,
    ];
    let mut writers = Vec::new();
    let mut add = |rng: &mut Rng, protection: Protection, pace: Pace| {
        let size = match pace {
            Pace::Early => rng.range(1, 48 * 1024),
            Pace::Racing => rng.range(16 * 1024, 256 * 1024),
            Pace::Stalled => rng.range(8 * 1024, 96 * 1024),
        } as usize;
        let chunk = match pace {
            Pace::Early => 64 * 1024,
            _ => rng.range(2 * 1024, 16 * 1024) as usize,
        };
        let data = rng.bytes(size);
        let n = writers.len();
        writers.push(Writer {
            reference: format!("it{iteration}-w{n}-{pace:?}-{protection:?}"),
            protection,
            pace,
            digest: api::sha256_digest(&data),
            data,
            chunk,
        });
    };
    for p in protections {
        add(rng, p, Pace::Early);
        add(rng, p, Pace::Racing);
        add(rng, p, Pace::Racing);
    }
    for p in [
        Protection::Keep,
        Protection::Temp(0),
        Protection::Root,
        Protection::Bare,
    ] {
        add(rng, p, Pace::Stalled);
    }
    writers
}

async fn run_writer(
    ch: Channel,
    ns: String,
    w: Arc<Writer>,
    progress: Arc<Mutex<Progress>>,
    pause_ms: u64,
) {
    let set = |f: &dyn Fn(&mut Progress)| {
        if let Ok(mut p) = progress.lock() {
            f(&mut p);
        }
    };
    let result: Result<(), berth_integration::tonic::Status> = async {
        let total = w.data.len() as i64;
        let lease = w.protection.lease();
        let mut cw =
            api::ContentWriter::open(ch, &ns, lease.as_deref(), &w.reference, total, &w.digest)
                .await?;
        set(&|p| p.started = true);
        let stop_at = match w.pace {
            Pace::Stalled => w.data.len() / 2,
            _ => w.data.len(),
        };
        let mut at = 0usize;
        while at < stop_at {
            let end = (at + w.chunk).min(stop_at);
            set(&|p| p.sent = end as i64);
            let resp = cw.write_at(at as i64, &w.data[at..end]).await?;
            set(&|p| p.acked = resp.offset);
            at = end;
            if w.pace == Pace::Racing && pause_ms > 0 {
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            }
        }
        if w.pace == Pace::Stalled {
            set(&|p| p.stalled = true);
            // Hold the stream open until the daemon dies (the task is aborted then).
            std::future::pending::<()>().await;
        }
        let labels: Vec<(&str, &str)> = if w.protection == Protection::Root {
            vec![(LABEL_GC_ROOT, "crash-test")]
        } else {
            vec![]
        };
        set(&|p| p.commit_sent = true);
        cw.commit(total, &w.digest, &labels).await?;
        set(&|p| p.committed = true);
        Ok(())
    }
    .await;
    if let Err(e) = result {
        set(&|p| p.error = Some(format!("{e:?}")));
    }
}

async fn run_lease_ops(ch: Channel, ns: String, ops: Arc<Mutex<LeaseOps>>, seed: u64) {
    let mut rng = Rng::new(seed);
    for k in 0.. {
        let id = format!("op-{k}");
        if api::create_lease(&ch, &ns, &id, &[]).await.is_err() {
            return;
        }
        if let Ok(mut o) = ops.lock() {
            o.created.insert(id.clone());
        }
        let dgst = api::sha256_digest(&rng.bytes(8));
        if api::add_resource(&ch, &ns, &id, api::resource("content", &dgst))
            .await
            .is_err()
        {
            return;
        }
        if rng.below(3) == 0 {
            // Leave it in place.
            continue;
        }
        if let Ok(mut o) = ops.lock() {
            o.delete_sent.insert(id.clone());
        }
        if api::delete_lease(&ch, &ns, &id, rng.below(4) == 0)
            .await
            .is_err()
        {
            return;
        }
        if let Ok(mut o) = ops.lock() {
            o.deleted.insert(id);
        }
    }
}

struct Outcome {
    progress: Vec<Progress>,
    ops: LeaseOps,
}

/// Sets up the iteration's leases, starts every writer and the lease task, kills berthd once
/// the early writers committed and the stalled ones paused (plus a random delay), and collects
/// what each knew.
async fn run_until_kill(
    d: &mut Daemon,
    ns: &str,
    writers: &[Arc<Writer>],
    rng: &mut Rng,
) -> Outcome {
    let ch = d.channel().await.expect("channel");
    api::create_lease(&ch, ns, "keep", &[])
        .await
        .expect("Create keep");
    for n in 0..TEMP_LEASES {
        api::create_lease(&ch, ns, &format!("tmp-{n}"), &[])
            .await
            .expect("Create tmp");
    }
    let progress: Vec<Arc<Mutex<Progress>>> = writers
        .iter()
        .map(|_| Arc::new(Mutex::new(Progress::default())))
        .collect();
    let mut tasks = Vec::new();
    for (w, p) in writers.iter().zip(&progress) {
        // Each writer on its own connection, as separate clients would be.
        let wch = d.channel().await.expect("channel");
        tasks.push(tokio::spawn(run_writer(
            wch,
            ns.to_string(),
            Arc::clone(w),
            Arc::clone(p),
            rng.below(3),
        )));
    }
    let ops = Arc::new(Mutex::new(LeaseOps::default()));
    tasks.push(tokio::spawn(run_lease_ops(
        d.channel().await.expect("channel"),
        ns.to_string(),
        Arc::clone(&ops),
        rng.next_u64(),
    )));

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = writers.iter().zip(&progress).all(|(w, p)| {
            let p = p.lock().map(|p| p.clone()).unwrap_or_default();
            match w.pace {
                Pace::Early => p.committed,
                Pace::Stalled => p.stalled,
                Pace::Racing => true,
            }
        });
        if ready {
            break;
        }
        if Instant::now() > deadline {
            let states: Vec<(&str, Progress)> = writers
                .iter()
                .zip(&progress)
                .map(|(w, p)| {
                    (
                        w.reference.as_str(),
                        p.lock().map(|p| p.clone()).unwrap_or_default(),
                    )
                })
                .collect();
            panic!(
                "writers not ready after 30 s: {states:#?}\n{}",
                d.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(rng.below(25))).await;
    d.kill().expect("kill -9 berthd");

    // Stalled writers wait forever (aborted here); the others end with transport errors.
    for (t, w) in tasks.iter().zip(writers) {
        if w.pace == Pace::Stalled {
            t.abort();
        }
    }
    let join_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(join_deadline, t).await.is_err() {
            abort.abort();
        }
    }
    let progress = progress
        .iter()
        .map(|p| p.lock().map(|p| p.clone()).unwrap_or_default())
        .collect();
    let ops = ops.lock().map(|o| o.clone()).unwrap_or_default();
    Outcome { progress, ops }
}

/// Reads and hashes every blob listed in every namespace. A blob that disappears between List
/// and Read (an automatic collection) is fine; a wrong digest or size is not.
async fn check_every_listed_blob(ch: &Channel) -> usize {
    let namespaces = NamespacesClient::new(ch.clone())
        .list(ListNamespacesRequest::default())
        .await
        .expect("Namespaces.List")
        .into_inner()
        .namespaces;
    let mut checked = 0;
    for n in namespaces {
        let infos = api::list_blobs(ch, &n.name, &[])
            .await
            .unwrap_or_else(|e| panic!("Content.List in {}: {e:?}", n.name));
        for i in infos {
            match api::read_blob(ch, &n.name, &i.digest).await {
                Ok(data) => {
                    assert_eq!(
                        data.len() as i64,
                        i.size,
                        "{} in {} has {} bytes, Info says {}",
                        i.digest,
                        n.name,
                        data.len(),
                        i.size
                    );
                    assert_eq!(
                        api::sha256_digest(&data),
                        i.digest,
                        "a blob in {} is visible under a wrong digest",
                        n.name
                    );
                    checked += 1;
                }
                Err(e) if e.code() == Code::NotFound => {}
                Err(e) => panic!("Read {} in {}: {e:?}", i.digest, n.name),
            }
        }
    }
    checked
}

async fn verify(
    d: &Daemon,
    ns: &str,
    iteration: usize,
    writers: &[Arc<Writer>],
    outcome: &Outcome,
) {
    let ch = d.channel().await.expect("channel after restart");
    let ctx = |w: &Writer, p: &Progress| {
        format!(
            "iteration {iteration}, {} ({:?} {:?}, {} bytes): {p:?}",
            w.reference,
            w.pace,
            w.protection,
            w.data.len()
        )
    };

    // No blob anywhere under a wrong digest.
    check_every_listed_blob(&ch).await;

    // Acknowledged commits read back (protected ones must be there).
    let active = api::active_offsets(&ch, ns).await.expect("ListStatuses");
    for (w, p) in writers.iter().zip(&outcome.progress) {
        let present = api::blob_exists(&ch, ns, &w.digest).await.expect("Info");
        if p.committed && w.protection != Protection::Bare {
            assert!(present, "an acknowledged commit is lost: {}", ctx(w, p));
            let data = api::read_blob(&ch, ns, &w.digest).await.expect("Read");
            assert_eq!(api::sha256_digest(&data), w.digest, "{}", ctx(w, p));
        }
        if p.committed {
            assert!(
                !active.contains_key(&w.reference),
                "a committed ingest is still active: {}",
                ctx(w, p)
            );
            continue;
        }
        if let Some(&offset) = active.get(&w.reference) {
            assert!(
                offset <= p.sent,
                "ingest at {offset}, more than was sent: {}",
                ctx(w, p)
            );
        }
        if p.started && !p.commit_sent {
            // The ingest existed and was never committed: it must be listed, with at least the
            // acknowledged bytes.
            let offset = active.get(&w.reference).copied().unwrap_or_else(|| {
                panic!(
                    "content active lost an interrupted ingest: {}; active: {active:?}",
                    ctx(w, p)
                )
            });
            assert!(
                offset >= p.acked,
                "ingest at {offset}, less than acknowledged: {}",
                ctx(w, p)
            );
            assert!(!present, "an uncommitted blob is visible: {}", ctx(w, p));
        }
    }

    // Leases.
    let leases: BTreeSet<String> = api::list_leases(&ch, ns, &[])
        .await
        .expect("Leases.List")
        .into_iter()
        .map(|l| l.id)
        .collect();
    for id in
        std::iter::once("keep".to_string()).chain((0..TEMP_LEASES).map(|n| format!("tmp-{n}")))
    {
        assert!(
            leases.contains(&id),
            "iteration {iteration}: lease {id} lost: {leases:?}"
        );
    }
    for id in &outcome.ops.created {
        if !outcome.ops.delete_sent.contains(id) {
            assert!(
                leases.contains(id),
                "iteration {iteration}: acknowledged lease {id} lost: {leases:?}"
            );
        }
    }
    for id in &outcome.ops.deleted {
        assert!(
            !leases.contains(id),
            "iteration {iteration}: deleted lease {id} came back"
        );
    }

    // Resume the stalled writer under `keep` from where the store says it is.
    let resumed = writers
        .iter()
        .find(|w| w.pace == Pace::Stalled && w.protection == Protection::Keep)
        .expect("a stalled keep writer");
    let total = resumed.data.len() as i64;
    let mut cw = api::ContentWriter::open(
        ch.clone(),
        ns,
        Some("keep"),
        &resumed.reference,
        total,
        &resumed.digest,
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "iteration {iteration}: reopening {}: {e:?}",
            resumed.reference
        )
    });
    let at = cw.offset as usize;
    assert!(at <= resumed.data.len());
    cw.write(&resumed.data[at..]).await.expect("resume write");
    cw.commit(total, &resumed.digest, &[])
        .await
        .unwrap_or_else(|e| {
            panic!(
                "iteration {iteration}: committing the resumed {} from {at}: {e:?}",
                resumed.reference
            )
        });
    let active_before: BTreeMap<String, i64> = api::active_offsets(&ch, ns)
        .await
        .expect("ListStatuses")
        .into_iter()
        .collect();

    // Let go of everything temporary and collect.
    let mut to_delete: Vec<String> = leases.iter().filter(|id| *id != "keep").cloned().collect();
    to_delete.sort();
    let last = to_delete.pop();
    for id in &to_delete {
        api::delete_lease(&ch, ns, id, false)
            .await
            .unwrap_or_else(|e| panic!("deleting {id}: {e:?}"));
    }
    if let Some(id) = last {
        api::delete_lease(&ch, ns, &id, true)
            .await
            .unwrap_or_else(|e| panic!("deleting {id} with sync: {e:?}"));
    }

    // Exactly what is protected remains.
    let present: BTreeSet<String> = api::list_digests(&ch, ns)
        .await
        .expect("List")
        .into_iter()
        .collect();
    let mut must: BTreeSet<String> = BTreeSet::new();
    let mut may: BTreeSet<String> = BTreeSet::new();
    for (w, p) in writers.iter().zip(&outcome.progress) {
        if !w.protection.blob_survives() {
            continue;
        }
        if p.committed {
            must.insert(w.digest.clone());
        } else if p.commit_sent {
            may.insert(w.digest.clone());
        }
    }
    must.insert(resumed.digest.clone());
    let missing: Vec<&String> = must.difference(&present).collect();
    assert!(
        missing.is_empty(),
        "iteration {iteration}: protected blobs collected: {missing:?}"
    );
    let extra: Vec<&String> = present
        .iter()
        .filter(|d| !must.contains(*d) && !may.contains(*d))
        .collect();
    let extra_refs: Vec<&str> = writers
        .iter()
        .filter(|w| extra.contains(&&w.digest))
        .map(|w| w.reference.as_str())
        .collect();
    assert!(
        extra.is_empty(),
        "iteration {iteration}: unprotected blobs survived the collection: {extra_refs:?} {extra:?}"
    );

    let by_ref: HashMap<&str, &Writer> = writers
        .iter()
        .map(|w| (w.reference.as_str(), w.as_ref()))
        .collect();
    let want_active: BTreeMap<String, i64> = active_before
        .iter()
        .filter(|(r, _)| {
            by_ref
                .get(r.as_str())
                .is_none_or(|w| w.protection.ingest_survives())
        })
        .map(|(r, o)| (r.clone(), *o))
        .collect();
    let active_after: BTreeMap<String, i64> = api::active_offsets(&ch, ns)
        .await
        .expect("ListStatuses")
        .into_iter()
        .collect();
    assert_eq!(
        active_after, want_active,
        "iteration {iteration}: ingests after the collection (before: {active_before:?})"
    );
}

#[test]
fn crash_kill_9_during_ingests_and_lease_operations() {
    let iterations: usize = std::env::var("BERTH_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("BERTH_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(Rng::seed_from_time);
    eprintln!("crash test: {iterations} iterations, BERTH_CRASH_SEED={seed}");
    let mut rng = Rng::new(seed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut d = Daemon::start(Kind::Berthd);
    for iteration in 0..iterations {
        let ns = format!("{NS_PREFIX}{iteration}");
        let writers: Vec<Arc<Writer>> = plan(&mut rng, iteration)
            .into_iter()
            .map(Arc::new)
            .collect();
        let outcome = rt.block_on(run_until_kill(&mut d, &ns, &writers, &mut rng));
        let committed = outcome.progress.iter().filter(|p| p.committed).count();
        let in_flight = outcome
            .progress
            .iter()
            .filter(|p| p.started && !p.committed)
            .count();
        d.start_again()
            .unwrap_or_else(|e| panic!("iteration {iteration}: restart after kill -9: {e:#}"));
        rt.block_on(verify(&d, &ns, iteration, &writers, &outcome));
        eprintln!(
            "crash iteration {iteration}: {committed} commits acknowledged, {in_flight} ingests interrupted, {} leases created, {} deleted",
            outcome.ops.created.len(),
            outcome.ops.deleted.len()
        );
    }
    // A last restart on the accumulated state, then the global check once more.
    d.restart().expect("final restart");
    let checked = rt.block_on(async {
        let ch = d.channel().await.expect("channel");
        check_every_listed_blob(&ch).await
    });
    assert!(checked > 0, "no blob left to check");
}
