//! Workload of issue 6: what a proxy plugin costs. The same plugin code (berth's overlayfs
//! snapshotter, berth's local content store) compiled into berthd and served by a separate
//! process (`berth-bench-proxy`, built on the proxy-sdk) that berthd reaches over a unix socket
//! as a `[proxy_plugins]` entry. containerd 1.6 runs the snapshot half too, against the same
//! proxy process, which calibrates what a proxy hop costs there.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use berth_integration::api::{self, Hasher, Rng};
use berth_integration::containerd_client::services::v1::ReadContentRequest;
use berth_integration::containerd_client::services::v1::content_client::ContentClient;
use berth_integration::containerd_client::services::v1::snapshots::PrepareSnapshotRequest;
use berth_integration::containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use berth_integration::tonic::transport::Channel;
use berth_integration::{Daemon, Input, Kind, NO_STARTUP_GC, Options, Profile, block_on_global};

use crate::images::{LEASE, NS, channel, cycles_per_sec, retire, snapshot_count, status};
use crate::{Better, Ctx, Metric, Overhead, Workload};

/// The `[proxy_plugins]` name of the proxy snapshotter and content store.
const PROXY: &str = "benchproxy";
const CYCLES: usize = 300;
const WARM: usize = 10;
const BLOB_BYTES: usize = 1 << 30;

const SNAP_DIRECT: &str = "snapshot cycles, overlayfs compiled in";
const SNAP_PROXY: &str = "snapshot cycles, overlayfs through a proxy";
const READ_DIRECT: &str = "content read 1 GiB, compiled in";
const READ_PROXY: &str = "content read 1 GiB, through a proxy";

/// The 1 GiB blob, written once per bench process.
struct Blob {
    path: tempfile::TempPath,
    digest: String,
}

/// Snapshot cycles and a 1 GiB content read, compiled in and through a proxy.
pub struct ProxyOverhead {
    blob: OnceLock<Blob>,
}

impl ProxyOverhead {
    pub fn new() -> Self {
        ProxyOverhead {
            blob: OnceLock::new(),
        }
    }

    fn blob(&self) -> Result<&Blob> {
        if let Some(b) = self.blob.get() {
            return Ok(b);
        }
        let mut file = tempfile::Builder::new()
            .prefix("berth-bench-proxy-1g-")
            .tempfile()
            .context("creating the 1 GiB blob file")?;
        let mut rng = Rng::new(6);
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..BLOB_BYTES / buf.len() {
            rng.fill(&mut buf);
            hasher.update(&buf);
            file.write_all(&buf)
                .context("writing the 1 GiB blob file")?;
        }
        let digest = hasher.digest();
        let _ = self.blob.set(Blob {
            path: file.into_temp_path(),
            digest,
        });
        self.blob.get().ok_or_else(|| anyhow!("the blob vanished"))
    }
}

/// The proxy process, stopped (SIGTERM) and its directory removed on drop.
struct ProxyProcess {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl ProxyProcess {
    fn start(overlay: bool, content: bool) -> Result<ProxyProcess> {
        let binary = proxy_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("berth-bp")
            .tempdir_in("/tmp")
            .context("proxy temp dir")?;
        let socket = dir.path().join("p.sock");
        let mut cmd = Command::new(&binary);
        cmd.arg("--socket").arg(&socket);
        if overlay {
            cmd.arg("--overlay-root").arg(dir.path().join("overlay"));
        }
        if content {
            cmd.arg("--content-root").arg(dir.path().join("content"));
        }
        let log = std::fs::File::create(dir.path().join("proxy.log")).context("proxy log")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("proxy log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let proxy = ProxyProcess { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&proxy.socket).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "berth-bench-proxy never accepted on {}: {}",
                    proxy.socket.display(),
                    proxy.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(proxy)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    fn overlay_snapshots(&self) -> PathBuf {
        self.dir.path().join("overlay").join("snapshots")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SIGTERM: the proxy drains and removes its socket.
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = self.child.wait();
    }
}

/// `berth-bench-proxy` next to this bench binary (`cargo build --release -p berth-bench`
/// builds both).
fn proxy_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating berth-bench")?;
    let proxy = exe.with_file_name("berth-bench-proxy");
    if !proxy.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p berth-bench`",
            proxy.display()
        );
    }
    Ok(proxy)
}

fn daemon(kind: Kind, config: Option<String>, extra: String) -> Result<Daemon> {
    Daemon::launch(
        kind,
        Options {
            profile: Profile::Release,
            config,
            extra_config: extra,
            ready_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(120),
            ..Options::default()
        },
    )
}

/// Sequential cycles/s on the compiled-in overlayfs and on the proxy, same daemon.
fn snapshot_cycles(kind: Kind) -> Result<(f64, f64)> {
    let proxy = ProxyProcess::start(true, false)?;
    // The default collector settings, as snapshot-ops: collections run in both measurements.
    let extra = format!(
        "\n[proxy_plugins.{PROXY}]\ntype = \"snapshot\"\naddress = \"{}\"\n",
        proxy.socket.display()
    );
    let d = daemon(kind, None, extra)?;
    std::thread::sleep(Duration::from_millis(300));
    let ch = channel(&d)?;
    let (direct, through) = block_on_global(async move {
        api::create_lease(&ch, NS, LEASE, &[])
            .await
            .map_err(status)?;
        let mut rates = Vec::new();
        for sn in ["overlayfs", PROXY] {
            cycles_per_sec(&ch, sn, "warm", WARM, 1).await?;
            rates.push(cycles_per_sec(&ch, sn, "one", CYCLES, 1).await?);
            let left = snapshot_count(&mut SnapshotsClient::new(ch.clone()), sn)
                .await
                .map_err(status)?;
            if left != 0 {
                bail!("{left} {sn} snapshots left after the cycles");
            }
        }
        Ok::<_, anyhow::Error>((rates[0], rates[1]))
    })?;
    // The proxy does the work: a snapshot prepared through it is a directory in its root.
    let ch = channel(&d)?;
    block_on_global(async move {
        SnapshotsClient::new(ch)
            .prepare(api::request(
                PrepareSnapshotRequest {
                    snapshotter: PROXY.to_string(),
                    key: "proxy-check".to_string(),
                    parent: String::new(),
                    labels: Default::default(),
                },
                NS,
                Some(LEASE),
            ))
            .await
    })
    .map_err(status)?;
    let dirs = std::fs::read_dir(proxy.overlay_snapshots())
        .map(|rd| rd.count())
        .unwrap_or(0);
    if dirs == 0 {
        bail!(
            "a snapshot prepared through the proxy left nothing in {}",
            proxy.overlay_snapshots().display()
        );
    }
    retire(d);
    drop(proxy);
    Ok((direct, through))
}

/// Ingests `blob` (unmeasured) and times a Content.Read of all of it, seconds.
fn read_1g(d: &Daemon, blob: &Blob) -> Result<f64> {
    let out = berth_integration::ctr_at_with_input(
        d.socket(),
        [
            "-n",
            NS,
            "content",
            "ingest",
            "--expected-digest",
            &blob.digest,
            "bench-proxy-1g",
        ],
        Input::File(blob.path.to_path_buf()),
    )?;
    if !out.success() {
        bail!("ctr content ingest: {out}\n{}", d.log_tail());
    }
    let ch = channel(d)?;
    let digest = blob.digest.clone();
    let (secs, bytes) =
        block_on_global(async move { timed_read(&ch, &digest).await }).map_err(status)?;
    if bytes != BLOB_BYTES as u64 {
        bail!("the read returned {bytes} bytes, not {BLOB_BYTES}");
    }
    Ok(secs)
}

/// Streams the whole blob, counting bytes (no hashing: the bench measures the transport).
async fn timed_read(
    ch: &Channel,
    digest: &str,
) -> Result<(f64, u64), berth_integration::tonic::Status> {
    let t = Instant::now();
    let mut stream = ContentClient::new(ch.clone())
        .read(api::request(
            ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            },
            NS,
            None,
        ))
        .await?
        .into_inner();
    let mut bytes = 0u64;
    while let Some(m) = stream.message().await? {
        bytes += m.data.len() as u64;
    }
    Ok((t.elapsed().as_secs_f64(), bytes))
}

/// berthd with the built-in content store disabled and the proxy's as its content store.
fn proxied_content_config(socket: &Path) -> String {
    format!(
        "version = 3\nroot = \"{{root}}\"\nstate = \"{{state}}\"\ndisabled_plugins = \
         [\"io.containerd.content.v1.content\"]\n\n[grpc]\naddress = \"{{socket}}\"\n{NO_STARTUP_GC}\n\
         [proxy_plugins.{PROXY}]\ntype = \"content\"\naddress = \"{}\"\n",
        socket.display()
    )
}

impl Workload for ProxyOverhead {
    fn name(&self) -> &'static str {
        "proxy-overhead"
    }

    fn heavy(&self) -> bool {
        true
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric {
                name: SNAP_DIRECT,
                unit: "cycles/s",
                target_ratio: None,
                better: Better::Higher,
                method: "300 sequential Snapshots.Prepare + Commit + Remove cycles (as \
                         snapshot-ops, after 10 unmeasured) on the daemon's compiled-in \
                         overlayfs snapshotter (berth's for berthd, containerd's own for \
                         containerd), in the same daemon as the proxy row below.",
            },
            Metric {
                name: SNAP_PROXY,
                unit: "cycles/s",
                target_ratio: None,
                better: Better::Higher,
                method: "the same cycles on `[proxy_plugins.benchproxy] type = \"snapshot\"`: \
                         `berth-bench-proxy` (release build, started per run) serving berth's \
                         overlayfs snapshotter crate through the proxy-sdk over a unix socket; \
                         the same proxy process for both daemons. Checked: nothing listed \
                         afterwards and the proxy's snapshotter made the snapshots.",
            },
            Metric {
                name: READ_DIRECT,
                unit: "s",
                target_ratio: None,
                better: Better::Lower,
                method: "wall time of one Content.Read stream (containerd-client, offset 0, \
                         size 0) of a 1 GiB blob of pseudo-random bytes until its last message, \
                         bytes counted, not hashed; the blob is ingested first with `ctr content \
                         ingest` (not timed), so it is in the page cache. berthd's compiled-in \
                         local content store.",
            },
            Metric {
                name: READ_PROXY,
                unit: "s",
                target_ratio: None,
                better: Better::Lower,
                method: "the same read on a berthd whose built-in content store is disabled and \
                         whose content store is `[proxy_plugins.benchproxy] type = \"content\"`: \
                         berth's local content store served by `berth-bench-proxy`, so every \
                         byte crosses the proxy's socket and then berthd's. berthd only: \
                         containerd 1.6 takes the first content plugin it registered, its own, \
                         so a proxy content store cannot stand in for it (n/a).",
            },
        ]
    }

    fn overheads(&self) -> Vec<Overhead> {
        vec![
            Overhead {
                name: "snapshot cycles, proxy vs compiled in",
                direct: SNAP_DIRECT,
                through: SNAP_PROXY,
                better: Better::Higher,
                target: Some(1.5),
            },
            Overhead {
                name: "content read 1 GiB, proxy vs compiled in",
                direct: READ_DIRECT,
                through: READ_PROXY,
                better: Better::Lower,
                target: None,
            },
        ]
    }

    fn run(&self, kind: Kind, _ctx: &Ctx) -> Result<BTreeMap<&'static str, f64>> {
        let mut out = BTreeMap::new();
        let (direct, through) = snapshot_cycles(kind)?;
        out.insert(SNAP_DIRECT, direct);
        out.insert(SNAP_PROXY, through);
        if kind == Kind::Berthd {
            let blob = self.blob()?;
            let d = daemon(kind, None, NO_STARTUP_GC.to_string())?;
            out.insert(READ_DIRECT, read_1g(&d, blob)?);
            retire(d);
            let proxy = ProxyProcess::start(false, true)?;
            let d = daemon(
                kind,
                Some(proxied_content_config(&proxy.socket)),
                String::new(),
            )?;
            out.insert(READ_PROXY, read_1g(&d, blob)?);
            retire(d);
            drop(proxy);
        }
        Ok(out)
    }
}
