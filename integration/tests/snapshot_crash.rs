//! berthd killed with SIGKILL while clients prepare, commit and remove snapshots (`overlayfs`
//! and `native`, under a lease, several clients at once), then restarted, several times on the
//! same root. After each restart:
//!
//! - a snapshot whose Prepare was acknowledged (and whose Commit was never sent) is active, and
//!   every directory its mounts name exists;
//! - a snapshot whose Commit was acknowledged (and whose Remove was never sent) is committed,
//!   and a child prepared on it mounts directories that exist (its backend snapshot is there);
//! - a Commit that was sent but not acknowledged left exactly one of the two names;
//! - an acknowledged Remove stays removed;
//! - once the lease is deleted with `sync`, the namespace lists no snapshot; after the last
//!   iteration no directory is left under either snapshotter's `snapshots/`, so nothing a
//!   killed Prepare created without its record outlives a collection.
//!
//! berthd only: containerd is not the subject of a crash test (and keeps its snapshot
//! directories until its own collection runs, on its schedule). `BERTH_CRASH_ITERATIONS` and
//! `BERTH_CRASH_SEED` override the loop count (default 8) and the random seed (printed).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_integration::api::{self, Rng};
use berth_integration::containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use berth_integration::containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest,
};
use berth_integration::containerd_client::types::Mount;
use berth_integration::tonic::transport::Channel;
use berth_integration::tonic::{Code, Status};
use berth_integration::{Daemon, Kind};

const LEASE: &str = "hold";
const SNAPSHOTTERS: [&str; 2] = ["overlayfs", "native"];
const WORKERS_PER_SNAPSHOTTER: usize = 3;

/// How far the operations on one key got, as its client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    PrepareSent,
    Prepared,
    CommitSent,
    Committed,
    RemoveSent,
    Removed,
}

/// Every key a worker touched, with the last step it knows of.
type Journal = Arc<Mutex<BTreeMap<String, Step>>>;

fn committed_name(key: &str) -> String {
    format!("{key}-layer")
}

struct Client {
    inner: SnapshotsClient<Channel>,
    ns: String,
    snapshotter: String,
}

impl Client {
    fn new(ch: Channel, ns: &str, snapshotter: &str) -> Client {
        Client {
            inner: SnapshotsClient::new(ch),
            ns: ns.to_owned(),
            snapshotter: snapshotter.to_owned(),
        }
    }

    async fn prepare(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        let req = PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels: Default::default(),
        };
        let reply = self
            .inner
            .prepare(api::request(req, &self.ns, Some(LEASE)))
            .await?;
        Ok(reply.into_inner().mounts)
    }

    async fn commit(&mut self, name: &str, key: &str) -> Result<(), Status> {
        let req = CommitSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            name: name.to_owned(),
            key: key.to_owned(),
            labels: Default::default(),
        };
        self.inner
            .commit(api::request(req, &self.ns, Some(LEASE)))
            .await
            .map(|_| ())
    }

    async fn remove(&mut self, key: &str) -> Result<(), Status> {
        let req = RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
        };
        self.inner
            .remove(api::request(req, &self.ns, Some(LEASE)))
            .await
            .map(|_| ())
    }

    /// The snapshot's kind (1 view, 2 active, 3 committed), or None when it does not exist.
    async fn kind(&mut self, key: &str) -> Option<i32> {
        let req = StatSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
        };
        match self.inner.stat(api::request(req, &self.ns, None)).await {
            Ok(reply) => reply.into_inner().info.map(|i| i.kind),
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => panic!("Stat {key}: {s:?}"),
        }
    }

    async fn mounts(&mut self, key: &str) -> Vec<Mount> {
        let req = MountsRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
        };
        self.inner
            .mounts(api::request(req, &self.ns, None))
            .await
            .unwrap_or_else(|s| panic!("Mounts {key}: {s:?}"))
            .into_inner()
            .mounts
    }

    async fn count(&mut self) -> usize {
        let req = ListSnapshotsRequest {
            snapshotter: self.snapshotter.clone(),
            filters: Vec::new(),
        };
        let mut stream = self
            .inner
            .list(api::request(req, &self.ns, None))
            .await
            .expect("List")
            .into_inner();
        let mut n = 0;
        while let Some(msg) = stream.message().await.expect("List message") {
            n += msg.info.len();
        }
        n
    }
}

const KIND_ACTIVE: i32 = 2;
const KIND_COMMITTED: i32 = 3;

/// Every directory a mount names (bind sources, overlay upper, work and lower dirs) exists.
fn assert_mount_dirs_exist(what: &str, mounts: &[Mount]) {
    assert!(!mounts.is_empty(), "{what}: no mounts");
    for m in mounts {
        let mut dirs: Vec<&str> = Vec::new();
        if m.r#type == "bind" {
            dirs.push(&m.source);
        }
        for o in &m.options {
            if let Some(v) = o
                .strip_prefix("upperdir=")
                .or_else(|| o.strip_prefix("workdir="))
            {
                dirs.push(v);
            }
            if let Some(v) = o.strip_prefix("lowerdir=") {
                dirs.extend(v.split(':'));
            }
        }
        assert!(!dirs.is_empty(), "{what}: mount names no directory: {m:?}");
        for d in dirs {
            assert!(
                Path::new(d).is_dir(),
                "{what}: the mount names {d}, which does not exist: {m:?}"
            );
        }
    }
}

async fn run_worker(mut c: Client, prefix: String, journal: Journal, seed: u64) {
    let mut rng = Rng::new(seed);
    let note = |key: &str, step: Step| {
        if let Ok(mut j) = journal.lock() {
            j.insert(key.to_owned(), step);
        }
    };
    for k in 0.. {
        let key = format!("{prefix}-{k}");
        note(&key, Step::PrepareSent);
        if c.prepare(&key, "").await.is_err() {
            return;
        }
        note(&key, Step::Prepared);
        if rng.below(4) == 0 {
            // Left active.
            continue;
        }
        note(&key, Step::CommitSent);
        if c.commit(&committed_name(&key), &key).await.is_err() {
            return;
        }
        note(&key, Step::Committed);
        if rng.below(2) == 0 {
            continue;
        }
        note(&key, Step::RemoveSent);
        if c.remove(&committed_name(&key)).await.is_err() {
            return;
        }
        note(&key, Step::Removed);
    }
}

/// Runs the workers of every snapshotter, kills berthd after `delay`, returns the journals.
async fn run_until_kill(
    d: &mut Daemon,
    ns: &str,
    delay: Duration,
    rng: &mut Rng,
) -> Vec<(&'static str, Journal)> {
    let ch = d.channel().await.expect("channel");
    api::create_lease(&ch, ns, LEASE, &[])
        .await
        .expect("Create lease");
    let mut journals = Vec::new();
    let mut tasks = Vec::new();
    for sn in SNAPSHOTTERS {
        for w in 0..WORKERS_PER_SNAPSHOTTER {
            let journal = Journal::default();
            journals.push((sn, Arc::clone(&journal)));
            // Each worker on its own connection, as separate clients would be.
            let c = Client::new(d.channel().await.expect("channel"), ns, sn);
            tasks.push(tokio::spawn(run_worker(
                c,
                format!("{sn}-w{w}"),
                journal,
                rng.next_u64(),
            )));
        }
    }
    tokio::time::sleep(delay).await;
    d.kill().expect("kill -9");
    for t in tasks {
        // Every worker fails on its next call once the daemon is gone.
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    journals
}

async fn verify(d: &Daemon, ns: &str, iteration: usize, journals: &[(&str, Journal)]) -> usize {
    let mut checked = 0;
    for (sn, journal) in journals {
        let entries: Vec<(String, Step)> = journal
            .lock()
            .map(|j| j.iter().map(|(k, s)| (k.clone(), *s)).collect())
            .unwrap_or_default();
        let mut c = Client::new(d.channel().await.expect("channel"), ns, sn);
        for (key, step) in entries {
            let name = committed_name(&key);
            let what = format!("iteration {iteration}, {sn} {key} ({step:?})");
            match step {
                Step::PrepareSent | Step::RemoveSent => {}
                Step::Prepared => {
                    assert_eq!(c.kind(&key).await, Some(KIND_ACTIVE), "{what}");
                    assert_mount_dirs_exist(&what, &c.mounts(&key).await);
                    checked += 1;
                }
                Step::CommitSent => {
                    let active = c.kind(&key).await;
                    let committed = c.kind(&name).await;
                    assert!(
                        matches!(
                            (active, committed),
                            (Some(KIND_ACTIVE), None) | (None, Some(KIND_COMMITTED))
                        ),
                        "{what}: an interrupted commit left active {active:?}, committed \
                         {committed:?}"
                    );
                }
                Step::Committed => {
                    assert_eq!(c.kind(&key).await, None, "{what}: the active key stayed");
                    assert_eq!(c.kind(&name).await, Some(KIND_COMMITTED), "{what}");
                    let child = format!("{key}-child");
                    let mounts = c
                        .prepare(&child, &name)
                        .await
                        .unwrap_or_else(|s| panic!("{what}: a child on it: {s:?}"));
                    assert_mount_dirs_exist(&format!("{what}, its child"), &mounts);
                    c.remove(&child).await.expect("remove the child");
                    checked += 1;
                }
                Step::Removed => {
                    assert_eq!(c.kind(&name).await, None, "{what}: came back");
                    assert_eq!(c.kind(&key).await, None, "{what}: came back");
                    checked += 1;
                }
            }
        }
    }
    // Dropping the lease frees everything the iteration made.
    let ch = d.channel().await.expect("channel");
    api::delete_lease(&ch, ns, LEASE, true)
        .await
        .expect("Delete lease (sync)");
    for sn in SNAPSHOTTERS {
        let left = Client::new(ch.clone(), ns, sn).count().await;
        assert_eq!(
            left, 0,
            "iteration {iteration}: {left} {sn} snapshots outlived their lease"
        );
    }
    checked
}

#[test]
fn crash_kill_9_during_snapshot_operations() {
    let iterations: usize = std::env::var("BERTH_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("BERTH_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(Rng::seed_from_time);
    eprintln!("snapshot crash test: {iterations} iterations, BERTH_CRASH_SEED={seed}");
    let mut rng = Rng::new(seed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut d = Daemon::start(Kind::Berthd);
    let mut total = 0;
    for iteration in 0..iterations {
        let ns = format!("snapcrash{iteration}");
        let delay = Duration::from_millis(150 + rng.below(600));
        let journals = rt.block_on(run_until_kill(&mut d, &ns, delay, &mut rng));
        let steps: usize = journals
            .iter()
            .map(|(_, j)| j.lock().map(|j| j.len()).unwrap_or(0))
            .sum();
        d.start_again()
            .unwrap_or_else(|e| panic!("iteration {iteration}: restart after kill -9: {e:#}"));
        let checked = rt.block_on(verify(&d, &ns, iteration, &journals));
        eprintln!(
            "snapshot crash iteration {iteration}: {steps} keys touched, {checked} acknowledged \
             outcomes checked"
        );
        total += checked;
    }
    assert!(total > 0, "no acknowledged operation to check");
    for sn in SNAPSHOTTERS {
        let dir = d
            .root()
            .join(format!("io.containerd.snapshotter.v1.{sn}"))
            .join("snapshots");
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            left.is_empty(),
            "{} still holds {left:?} after every lease went",
            dir.display()
        );
    }
}
