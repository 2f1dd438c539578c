//! Workloads of issue 4: snapshot operations per second over the Snapshots gRPC API,
//! `ctr images import` of the multi-layer test image with and without unpacking (plain tar and
//! gzip layers), and `ctr images rm --sync` of the unpacked image.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read as _;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use berth_integration::api;
use berth_integration::containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use berth_integration::containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, ListSnapshotsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use berth_integration::images::{self, LayerCompression, TestImage};
use berth_integration::tonic::transport::Channel;
use berth_integration::{Daemon, Kind, NO_STARTUP_GC, Options, Profile, block_on_global};

use crate::{Better, Ctx, Metric, Workload};

pub(crate) const NS: &str = "bench";
/// The lease the snapshot cycles run under.
pub(crate) const LEASE: &str = "bench-snapshots";

/// A release-build daemon on a private root (or on `root`), with `extra` config and without
/// the collection 100 ms after start-up (it would land inside a measurement).
pub(crate) fn release_daemon(
    kind: Kind,
    extra: &str,
    root: Option<std::path::PathBuf>,
) -> Result<Daemon> {
    Daemon::launch(
        kind,
        Options {
            profile: Profile::Release,
            extra_config: format!("{NO_STARTUP_GC}\n{extra}"),
            root,
            ready_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(120),
            ..Options::default()
        },
    )
}

fn bench_daemon(kind: Kind) -> Result<Daemon> {
    release_daemon(kind, "", None)
}

/// Stops a daemon, removes its directory and flushes the file system, so the next run does not
/// pay for this one's write-back.
pub(crate) fn retire(d: Daemon) {
    drop(d);
    if let Err(e) = std::process::Command::new("sync").status() {
        eprintln!("berth-bench: sync: {e}");
    }
}

pub(crate) fn channel(d: &Daemon) -> Result<Channel> {
    let socket = d.socket().to_path_buf();
    block_on_global(async move { berth_integration::grpc_channel(&socket).await })
}

pub(crate) fn status(e: berth_integration::tonic::Status) -> anyhow::Error {
    anyhow!("{}: {}", e.code(), e.message())
}

// ---------------------------------------------------------------------------------------------
// Snapshot operations.

/// One prepare + commit + remove cycle on `snapshotter`, keys made unique by `tag`.
/// Time spent in each call of the cycles (prepare, commit, remove), for the log.
type CallTimes = [Duration; 3];

async fn cycle(
    client: &mut SnapshotsClient<Channel>,
    snapshotter: &str,
    tag: &str,
    times: &mut CallTimes,
) -> Result<(), berth_integration::tonic::Status> {
    // Under a lease, as clients create snapshots: an unreferenced active snapshot is fair game
    // for a collection that runs between its Prepare and its Commit.
    let lease = Some(LEASE);
    let key = format!("active-{tag}");
    let name = format!("committed-{tag}");
    let t = Instant::now();
    client
        .prepare(api::request(
            PrepareSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.clone(),
                parent: String::new(),
                labels: Default::default(),
            },
            NS,
            lease,
        ))
        .await?;
    times[0] += t.elapsed();
    let t = Instant::now();
    client
        .commit(api::request(
            CommitSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                name: name.clone(),
                key,
                labels: Default::default(),
            },
            NS,
            lease,
        ))
        .await?;
    times[1] += t.elapsed();
    let t = Instant::now();
    client
        .remove(api::request(
            RemoveSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: name,
            },
            NS,
            lease,
        ))
        .await?;
    times[2] += t.elapsed();
    Ok(())
}

pub(crate) async fn snapshot_count(
    client: &mut SnapshotsClient<Channel>,
    snapshotter: &str,
) -> Result<usize, berth_integration::tonic::Status> {
    let mut stream = client
        .list(api::request(
            ListSnapshotsRequest {
                snapshotter: snapshotter.to_string(),
                filters: Vec::new(),
            },
            NS,
            None,
        ))
        .await?
        .into_inner();
    let mut n = 0;
    while let Some(msg) = stream.message().await? {
        n += msg.info.len();
    }
    Ok(n)
}

/// `cycles` prepare + commit + remove cycles on `snapshotter` by `workers` concurrent clients
/// (sharing one connection); cycles per second.
pub(crate) async fn cycles_per_sec(
    ch: &Channel,
    snapshotter: &'static str,
    label: &str,
    cycles: usize,
    workers: usize,
) -> Result<f64> {
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let mut client = SnapshotsClient::new(ch.clone());
        let label = label.to_string();
        set.spawn(async move {
            let mut times = CallTimes::default();
            for i in (w..cycles).step_by(workers) {
                cycle(
                    &mut client,
                    snapshotter,
                    &format!("{label}-{i}"),
                    &mut times,
                )
                .await?;
            }
            Ok::<_, berth_integration::tonic::Status>(times)
        });
    }
    let mut total = CallTimes::default();
    while let Some(r) = set.join_next().await {
        let times = r.context("a snapshot worker panicked")?.map_err(status)?;
        for (sum, t) in total.iter_mut().zip(times) {
            *sum += t;
        }
    }
    let rate = cycles as f64 / t.elapsed().as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 / cycles as f64;
    eprintln!(
        "  {snapshotter} {label}: {rate:.0} cycles/s; mean call latency: prepare {:.2} ms, commit {:.2} ms, remove {:.2} ms",
        ms(total[0]),
        ms(total[1]),
        ms(total[2])
    );
    Ok(rate)
}

/// Prepare + commit + remove cycles per second on `overlayfs` and `native`, one client and
/// eight concurrent ones.
pub struct SnapshotOps;

impl SnapshotOps {
    const CYCLES: usize = 300;
    const CONCURRENT_CYCLES: usize = 400;
    const WORKERS: usize = 8;
    const WARM: usize = 10;
    const SNAPSHOTTERS: [(&'static str, &'static str, &'static str); 2] = [
        (
            "overlayfs",
            "snapshot cycles, overlayfs",
            "snapshot cycles ×8, overlayfs",
        ),
        (
            "native",
            "snapshot cycles, native",
            "snapshot cycles ×8, native",
        ),
    ];
}

impl Workload for SnapshotOps {
    fn name(&self) -> &'static str {
        "snapshot-ops"
    }

    fn heavy(&self) -> bool {
        true
    }

    fn metrics(&self) -> Vec<Metric> {
        let mut v = Vec::new();
        for (sn, one, eight) in Self::SNAPSHOTTERS {
            let _ = sn;
            v.push(Metric {
                name: one,
                unit: "cycles/s",
                target_ratio: Some(2.0),
                better: Better::Higher,
                method: "300 sequential cycles of Snapshots.Prepare (new key, no parent) + \
                         Commit (new name) + Remove (the committed name) through \
                         containerd-client on one connection (a current-thread tokio runtime in \
                         the bench process, connection included), namespace `bench`, after 10 \
                         unmeasured cycles; cycles divided by the wall time. Fresh daemon per \
                         run; the snapshotter lists no snapshot afterwards (checked). On both \
                         daemons Remove drops the namespace's record and the backend snapshot \
                         goes at a later garbage collection, which the scheduler starts in the \
                         background after enough mutations (default thresholds on both), so \
                         collections run inside the measurement on both.",
            });
            v.push(Metric {
                name: eight,
                unit: "cycles/s",
                target_ratio: None,
                better: Better::Higher,
                method: "the same cycles, 400 of them spread over 8 concurrent clients on one \
                         connection (each waits for its reply before its next call).",
            });
        }
        v
    }

    fn run(&self, kind: Kind, _ctx: &Ctx) -> Result<BTreeMap<&'static str, f64>> {
        // The default garbage collector settings: Remove leaves the backend snapshot to a
        // collection, and how each daemon schedules those is part of what is measured.
        let d = Daemon::launch(
            kind,
            Options {
                profile: Profile::Release,
                ready_timeout: Duration::from_secs(60),
                ..Options::default()
            },
        )?;
        // Past the collection both run 100 ms after start-up.
        std::thread::sleep(Duration::from_millis(300));
        // The client runs on a current-thread runtime of its own, with its connection: on
        // the harness's two-worker runtime each call also paid for hand-offs between the
        // client's threads (about 0.1-0.2 ms a call on this 2-CPU machine, the same for both
        // daemons), which measured the client rather than the daemon.
        let socket = d.socket().to_path_buf();
        let values = berth_integration::block_on(async move {
            let ch = berth_integration::grpc_channel(&socket).await?;
            api::create_lease(&ch, NS, LEASE, &[])
                .await
                .map_err(status)?;
            let mut out = BTreeMap::new();
            let mut client = SnapshotsClient::new(ch.clone());
            for (sn, one, eight) in Self::SNAPSHOTTERS {
                cycles_per_sec(&ch, sn, "warm", Self::WARM, 1).await?;
                out.insert(one, cycles_per_sec(&ch, sn, "one", Self::CYCLES, 1).await?);
                out.insert(
                    eight,
                    cycles_per_sec(&ch, sn, "eight", Self::CONCURRENT_CYCLES, Self::WORKERS)
                        .await?,
                );
                let left = snapshot_count(&mut client, sn).await.map_err(status)?;
                if left != 0 {
                    bail!("{left} {sn} snapshots left after the cycles");
                }
            }
            Ok::<_, anyhow::Error>(out)
        })?;
        retire(d);
        Ok(values)
    }
}

// ---------------------------------------------------------------------------------------------
// Image import and removal.

/// Size of the multi-layer test image's layer tars (the same image as the integration tests'
/// `images_ctr.rs` and `differential.rs`, so its cached build is shared).
const IMAGE_MB: u64 = 256;
const IMAGE_NAME: &str = "docker.io/library/berth-multilayer:1";

/// The two builds of the test image, made (or found in the cache) on first use.
struct TestImages {
    tar: TestImage,
    gzip: TestImage,
    /// What the report says about them.
    notes: Vec<String>,
}

/// `ctr images import` with and without unpacking, and `ctr images rm --sync`.
pub struct ImageImport {
    images: OnceLock<TestImages>,
}

impl ImageImport {
    pub fn new() -> Self {
        ImageImport {
            images: OnceLock::new(),
        }
    }

    fn images(&self) -> Result<&TestImages> {
        if let Some(i) = self.images.get() {
            return Ok(i);
        }
        let t = Instant::now();
        let tar = images::multilayer(IMAGE_NAME, IMAGE_MB, LayerCompression::None)
            .context("building the multi-layer test image with tar layers")?;
        let gzip = images::multilayer(IMAGE_NAME, IMAGE_MB, LayerCompression::Gzip)
            .context("building the multi-layer test image with gzip layers")?;
        let mut notes = Vec::new();
        for (image, build) in [(&tar, "tar"), (&gzip, "gzip")] {
            // Read once so every run finds the archive in the page cache.
            let size = read_through(&image.oci_archive)?;
            let note = format!(
                "image-import: the {build} build of `{}`: {} layers, {:.1} MiB of layer tars, OCI archive {:.1} MiB (manifest {}).",
                image.name,
                image.diff_ids.len(),
                image.uncompressed_bytes as f64 / MIB,
                size as f64 / MIB,
                image.manifest_digest,
            );
            eprintln!("{note}");
            notes.push(note);
        }
        eprintln!(
            "image-import: test images ready in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let _ = self.images.set(TestImages { tar, gzip, notes });
        self.images
            .get()
            .ok_or_else(|| anyhow!("the test images vanished"))
    }
}

const MIB: f64 = (1u64 << 20) as f64;

fn read_through(path: &Path) -> Result<u64> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Entries in `dir` (0 when it does not exist).
fn entries(dir: &Path) -> Result<usize> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(rd.count()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("listing {}", dir.display())),
    }
}

/// Runs `ctr` against `d`, timed from spawn to exit.
fn timed_ctr(d: &Daemon, args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    let out = berth_integration::ctr_at(d.socket(), args)?;
    let secs = t.elapsed().as_secs_f64();
    if !out.success() {
        bail!("{out}\n{}", d.log_tail());
    }
    Ok(secs)
}

/// Checks that `image` is in `d` (listed, and unpacked when `unpacked`).
fn check_imported(d: &Daemon, image: &TestImage, unpacked: bool) -> Result<()> {
    let ch = channel(d)?;
    let blobs = block_on_global(async move { api::list_digests(&ch, NS).await }).map_err(status)?;
    // ctr also stores the archive's index; the image's own blobs must all be there.
    let missing: Vec<&String> = image
        .layer_digests
        .iter()
        .chain([&image.manifest_digest, &image.config_digest])
        .filter(|dg| !blobs.contains(dg))
        .collect();
    if !missing.is_empty() {
        bail!(
            "after the import {} lacks the blobs {missing:?} of {}",
            d.kind(),
            image.name
        );
    }
    let ch = channel(d)?;
    let snaps =
        block_on_global(
            async move { snapshot_count(&mut SnapshotsClient::new(ch), "overlayfs").await },
        )
        .map_err(status)?;
    let want = if unpacked { image.chain_ids.len() } else { 0 };
    if snaps != want {
        bail!(
            "after the import {} lists {snaps} overlayfs snapshots, expected {want}",
            d.kind()
        );
    }
    Ok(())
}

/// After `images rm --sync`: no blob, no snapshot, in the API and on disk.
fn check_removed(d: &Daemon) -> Result<()> {
    let ch = channel(d)?;
    let (blobs, snaps) = block_on_global(async move {
        let blobs = api::list_digests(&ch, NS).await?;
        let snaps = snapshot_count(&mut SnapshotsClient::new(ch), "overlayfs").await?;
        Ok::<_, berth_integration::tonic::Status>((blobs.len(), snaps))
    })
    .map_err(status)?;
    if blobs != 0 || snaps != 0 {
        bail!(
            "after images rm --sync {} still lists {blobs} blobs and {snaps} snapshots",
            d.kind()
        );
    }
    let root = d.root();
    let blob_dir = root.join("io.containerd.content.v1.content/blobs/sha256");
    let snap_dir = root.join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    let (b, s) = (entries(&blob_dir)?, entries(&snap_dir)?);
    if b != 0 || s != 0 {
        bail!(
            "after images rm --sync {} still has {b} files in {} and {s} directories in {}",
            d.kind(),
            blob_dir.display(),
            snap_dir.display()
        );
    }
    Ok(())
}

impl Workload for ImageImport {
    fn name(&self) -> &'static str {
        "image-import"
    }

    fn notes(&self) -> Vec<String> {
        self.images
            .get()
            .map(|i| i.notes.clone())
            .unwrap_or_default()
    }

    fn heavy(&self) -> bool {
        true
    }

    fn metrics(&self) -> Vec<Metric> {
        let mut out = vec![
            Metric {
                name: "import+unpack, tar layers",
                unit: "s",
                target_ratio: Some(0.5),
                better: Better::Lower,
                method: "wall time of `ctr -n bench images import --snapshotter overlayfs \
                         ARCHIVE` (ctr 1.6 writes the blobs through the Content API, then \
                         unpacks layer by layer with Snapshots.Prepare, Diff.Apply, \
                         Snapshots.Commit) of the OCI archive of \
                         `berth_integration::images::multilayer(_, 256, None)` (sizes in the \
                         notes; many small files, big files, hard links, symlinks, xattrs, \
                         whiteouts, opaque directories), its layers stored as plain tars. \
                         The archive is read once before the runs, so it is in the page cache. \
                         Fresh daemon per import; the blobs and the 6 snapshots are checked \
                         afterwards.",
            },
            Metric {
                name: "import+unpack, gzip layers",
                unit: "s",
                target_ratio: Some(0.5),
                better: Better::Lower,
                method: "the same with the gzip build of the image (umoci's tar+gzip layers; \
                         the differ decompresses them).",
            },
            Metric {
                name: "berth images import+unpack, tar layers (containerd: ctr)",
                unit: "s",
                target_ratio: Some(0.5),
                better: Better::Lower,
                method: "berthd: wall time of `berth -n bench images import --progress plain \
                         ARCHIVE` (the release CLI) with the tar build: the archive streams to \
                         the transfer service, which stores the blobs and unpacks into \
                         overlayfs in the daemon; fresh daemon, blobs and 6 snapshots checked \
                         afterwards. containerd 1.6 has no transfer service, so its column is \
                         the `ctr images import` time of the same run (the row above): each \
                         daemon's own way of importing an archive, as a user runs it.",
            },
            Metric {
                name: "berth images import+unpack, gzip layers (containerd: ctr)",
                unit: "s",
                target_ratio: Some(0.5),
                better: Better::Lower,
                method: "the same with the gzip build.",
            },
            Metric {
                name: "import --no-unpack, tar layers",
                unit: "s",
                target_ratio: None,
                better: Better::Lower,
                method: "`ctr -n bench images import --no-unpack ARCHIVE` of the tar build: \
                         blobs and image record only (no snapshot, checked).",
            },
            Metric {
                name: "import --no-unpack, gzip layers",
                unit: "s",
                target_ratio: None,
                better: Better::Lower,
                method: "the same with the gzip build.",
            },
            Metric {
                name: "images rm --sync, tar layers",
                unit: "s",
                target_ratio: None,
                better: Better::Lower,
                method: "right after the unpacked import of the tar build: wall time of `ctr -n \
                         bench images rm --sync NAME` (returns after a garbage collection). \
                         Checked afterwards: Content.List and Snapshots.List are empty and \
                         neither blobs/sha256/ nor the overlayfs snapshots/ directory holds an \
                         entry.",
            },
            Metric {
                name: "images rm --sync, gzip layers",
                unit: "s",
                target_ratio: None,
                better: Better::Lower,
                method: "the same after the unpacked import of the gzip build.",
            },
        ];
        out.extend(crate::placement::metrics(
            SAME_PLACEMENT,
            [
                concat!(
                    "`import+unpack, tar layers` again, with containerd on a flagged root: ",
                    crate::placement::flagged_root_method!()
                ),
                concat!(
                    "`berth images import+unpack, tar layers (containerd: ctr)` with the \
                     containerd column of the row above: ",
                    crate::placement::flagged_root_method!()
                ),
            ],
        ));
        out
    }

    fn run(&self, kind: Kind, _ctx: &Ctx) -> Result<BTreeMap<&'static str, f64>> {
        let imgs = self.images()?;
        let mut out = BTreeMap::new();
        let cases: [(&TestImage, &'static str, &'static str); 2] = [
            (
                &imgs.tar,
                "import+unpack, tar layers",
                "images rm --sync, tar layers",
            ),
            (
                &imgs.gzip,
                "import+unpack, gzip layers",
                "images rm --sync, gzip layers",
            ),
        ];
        for (image, import_metric, rm_metric) in cases {
            let d = bench_daemon(kind)?;
            let archive = image.oci_archive.to_string_lossy().into_owned();
            let secs = ctr_import_unpacked(&d, &archive)?;
            out.insert(import_metric, secs);
            check_imported(&d, image, true)?;
            let secs = timed_ctr(&d, &["-n", NS, "images", "rm", "--sync", &image.name])?;
            out.insert(rm_metric, secs);
            check_removed(&d)?;
            retire(d);
            if kind == Kind::Containerd && import_metric == "import+unpack, tar layers" {
                // The same-placement rows, right after the run they repeat.
                crate::placement::measure_containerd(&mut out, SAME_PLACEMENT, "", |d| {
                    let secs = ctr_import_unpacked(d, &archive)?;
                    check_imported(d, image, true)?;
                    Ok(secs)
                })?;
            }
        }
        let cases: [(&TestImage, &'static str, &'static str); 2] = [
            (
                &imgs.tar,
                "import+unpack, tar layers",
                "berth images import+unpack, tar layers (containerd: ctr)",
            ),
            (
                &imgs.gzip,
                "import+unpack, gzip layers",
                "berth images import+unpack, gzip layers (containerd: ctr)",
            ),
        ];
        for (image, ctr_metric, metric) in cases {
            if kind == Kind::Containerd {
                // No transfer service in containerd 1.6: its own way is the ctr import above.
                let secs = out
                    .get(ctr_metric)
                    .copied()
                    .ok_or_else(|| anyhow!("no {ctr_metric} measurement to reuse"))?;
                out.insert(metric, secs);
                continue;
            }
            let d = bench_daemon(kind)?;
            let archive = image.oci_archive.to_string_lossy().into_owned();
            let berth = crate::pull::berth_cli()?;
            let t = Instant::now();
            let run = berth_integration::run_command(
                std::process::Command::new(&berth)
                    .arg("--address")
                    .arg(d.socket())
                    .args([
                        "-n",
                        NS,
                        "images",
                        "import",
                        "--progress",
                        "plain",
                        &archive,
                    ]),
                std::time::Duration::from_secs(300),
            )?;
            let secs = t.elapsed().as_secs_f64();
            if !run.success() {
                bail!("berth images import: {run}\n{}", d.log_tail());
            }
            out.insert(metric, secs);
            check_imported(&d, image, true)?;
            retire(d);
        }
        let cases: [(&TestImage, &'static str); 2] = [
            (&imgs.tar, "import --no-unpack, tar layers"),
            (&imgs.gzip, "import --no-unpack, gzip layers"),
        ];
        for (image, metric) in cases {
            let d = bench_daemon(kind)?;
            let archive = image.oci_archive.to_string_lossy().into_owned();
            let secs = timed_ctr(&d, &["-n", NS, "images", "import", "--no-unpack", &archive])?;
            out.insert(metric, secs);
            check_imported(&d, image, false)?;
            retire(d);
        }
        if kind == Kind::Berthd {
            crate::placement::copy_berthd_figures(
                &mut out,
                [
                    "import+unpack, tar layers",
                    "berth images import+unpack, tar layers (containerd: ctr)",
                ],
                SAME_PLACEMENT,
            )?;
        }
        Ok(out)
    }
}

/// `import+unpack, tar layers` and `berth images import` of the tar build against
/// containerd on a root flagged as berthd's (see [`crate::placement`]).
const SAME_PLACEMENT: [&str; 2] = [
    "import+unpack, tar layers, same placement (containerd: snapshots/ +T)",
    "berth images import+unpack, tar layers (containerd: ctr, snapshots/ +T)",
];

/// `ctr images import --snapshotter overlayfs ARCHIVE` into the bench namespace; its seconds.
fn ctr_import_unpacked(d: &Daemon, archive: &str) -> Result<f64> {
    timed_ctr(
        d,
        &[
            "-n",
            NS,
            "images",
            "import",
            "--snapshotter",
            "overlayfs",
            archive,
        ],
    )
}
