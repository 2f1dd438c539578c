//! Workload of issue 5: pulling the multi-layer test image from a local registry (Debian's
//! docker-registry on loopback, plain HTTP), with its layers as gzip and as zstd, with unpack
//! into overlayfs and fetch only, on berthd and containerd in one run.
//!
//! containerd 1.6 has no transfer service, so `ctr` pulls on the client side against both
//! daemons (`ctr images pull --plain-http` with unpack, `ctr content fetch --plain-http`
//! without); `berth pull` is berth's server-side pull and runs against berthd only, compared
//! with containerd's `ctr` figure of the same run. Multipart fetch (containerd 2.1's
//! `concurrent_layer_fetch_buffer`, which 1.6 lacks) is measured on berthd only, on and off,
//! when `berthd config default` knows the key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use berth_integration::containerd_client::services::v1::snapshots::ListSnapshotsRequest;
use berth_integration::containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use berth_integration::images::{self, LayerCompression};
use berth_integration::registry::{Registry, RegistryOptions};
use berth_integration::{CmdOutput, Daemon, Kind, Profile, api, block_on_global, run_command};

use crate::images::release_daemon;
use crate::{Better, Ctx, Metric, Workload};

const NS: &str = "bench";
/// The image of the import workload (its cached gzip build is shared).
const IMAGE_MB: u64 = 256;
const IMAGE_NAME: &str = "docker.io/library/berth-multilayer:1";
/// Its tag in the OCI layout.
const LAYOUT_TAG: &str = "1";
/// The multipart chunk when multipart is on (containerd's example value: 1 MiB).
const MULTIPART_BUFFER: u64 = 1 << 20;
/// Parallel requests (containerd's default `max_concurrent_downloads`).
const MAX_DOWNLOADS: u32 = 3;
/// The config key that says berthd can fetch in parts.
const MULTIPART_KEY: &str = "concurrent_layer_fetch_buffer";

/// `ctr pull, gzip` and `berth pull, gzip` against containerd on a root flagged as berthd's
/// (see [`crate::placement`]).
const SAME_PLACEMENT: [&str; 2] = [
    "ctr pull, gzip, same placement (containerd: snapshots/ +T)",
    "berth pull, gzip (containerd: ctr pull, snapshots/ +T)",
];

/// One pushed variant of the image.
struct Variant {
    /// `gzip` or `zstd`, for metric names.
    label: &'static str,
    /// `127.0.0.1:<port>/bench/multi:<label>`.
    reference: String,
    /// The manifest digest in the registry.
    manifest: String,
    /// Layer digests in the registry (recompressed for zstd).
    layers: Vec<String>,
}

/// The registry with both variants, made on first use and kept for every run.
struct Setup {
    /// Kept alive for the runs; stopped when the bench ends.
    _registry: Registry,
    variants: Vec<Variant>,
    /// Whether berthd has the multipart keys (`berthd config default`).
    multipart: bool,
    /// The `berth` CLI used.
    berth: PathBuf,
    notes: Vec<String>,
}

/// `ctr images pull`, `ctr content fetch` and `berth pull` from a local registry.
pub struct Pull {
    setup: OnceLock<Setup>,
}

impl Pull {
    pub fn new() -> Self {
        Pull {
            setup: OnceLock::new(),
        }
    }

    fn setup(&self) -> Result<&Setup> {
        if let Some(s) = self.setup.get() {
            return Ok(s);
        }
        let t = Instant::now();
        let image = images::multilayer(IMAGE_NAME, IMAGE_MB, LayerCompression::Gzip)
            .context("building the multi-layer test image with gzip layers")?;
        let registry = Registry::start(RegistryOptions::open()).context("starting the registry")?;
        let layout = image
            .layout
            .to_str()
            .ok_or_else(|| anyhow!("{} is not UTF-8", image.layout.display()))?
            .to_string();
        // The zstd variant is made locally first: pushed straight to a registry that holds the
        // gzip layers, skopeo would reuse those instead of recompressing.
        let zstd_dir = tempfile::Builder::new()
            .prefix("berth-bench-zstd-")
            .tempdir()
            .context("a directory for the zstd layout")?;
        let zstd_layout = zstd_dir.path().join("layout");
        let zstd_layout = zstd_layout
            .to_str()
            .ok_or_else(|| anyhow!("{} is not UTF-8", zstd_layout.display()))?
            .to_string();
        let out = run_command(
            Command::new("skopeo").args([
                "copy",
                "--dest-compress",
                "--dest-compress-format",
                "zstd",
                &format!("oci:{layout}:{LAYOUT_TAG}"),
                &format!("oci:{zstd_layout}:{LAYOUT_TAG}"),
            ]),
            Duration::from_secs(900),
        )?;
        if !out.success() {
            bail!("recompressing {layout} as zstd into {zstd_layout}: {out}");
        }
        let mut variants = Vec::new();
        let mut notes = Vec::new();
        for (label, source) in [("gzip", &layout), ("zstd", &zstd_layout)] {
            let recompress = label == "zstd";
            let reference = registry.reference(&format!("bench/multi:{label}"));
            let mut cmd = Command::new("skopeo");
            cmd.args(["copy", "--retry-times", "2", "--dest-tls-verify=false"]);
            cmd.arg(format!("oci:{source}:{LAYOUT_TAG}"))
                .arg(format!("docker://{reference}"));
            let out = run_command(&mut cmd, Duration::from_secs(600))?;
            if !out.success() {
                bail!("pushing the {label} variant to {reference}: {out}");
            }
            let manifest = inspect(&reference, "{{.Digest}}")?;
            let layers: Vec<String> = inspect(&reference, "{{range .Layers}}{{.}} {{end}}")?
                .split_whitespace()
                .map(str::to_string)
                .collect();
            let (types, bytes) = layer_types(&raw_manifest(&reference)?);
            if recompress && !types.iter().all(|t| t.ends_with("+zstd")) {
                bail!("skopeo did not recompress the layers of {reference} as zstd: {types:?}");
            }
            let note = format!(
                "pull: `{reference}` ({label}): {} layers, {:.1} MiB of layer blobs in the \
                 registry, manifest {manifest}.",
                layers.len(),
                bytes as f64 / MIB
            );
            eprintln!("{note}");
            notes.push(note);
            variants.push(Variant {
                label,
                reference,
                manifest,
                layers,
            });
        }
        // The registry holds its own copy now.
        drop(zstd_dir);
        let multipart = berthd_knows(MULTIPART_KEY)?;
        let note = if multipart {
            format!(
                "pull: multipart on = `{MULTIPART_KEY} = {MULTIPART_BUFFER}`, \
                 `max_concurrent_downloads = {MAX_DOWNLOADS}`; off = `{MULTIPART_KEY} = 0`."
            )
        } else {
            format!(
                "pull: this berthd's `config default` has no `{MULTIPART_KEY}`: the multipart \
                 metrics were not measured."
            )
        };
        eprintln!("{note}");
        notes.push(note);
        let berth = berth_cli()?;
        notes.push(format!("pull: berth CLI `{}`.", berth.display()));
        eprintln!("pull: set up in {:.1} s", t.elapsed().as_secs_f64());
        let _ = self.setup.set(Setup {
            _registry: registry,
            variants,
            multipart,
            berth,
            notes,
        });
        self.setup
            .get()
            .ok_or_else(|| anyhow!("the pull set-up vanished"))
    }
}

const MIB: f64 = (1u64 << 20) as f64;

/// `skopeo inspect --format FORMAT docker://REF` (plain HTTP).
fn inspect(reference: &str, format: &str) -> Result<String> {
    let out = run_command(
        Command::new("skopeo").args([
            "inspect",
            "--tls-verify=false",
            "--format",
            format,
            &format!("docker://{reference}"),
        ]),
        Duration::from_secs(60),
    )?;
    if !out.success() {
        bail!("inspecting {reference}: {out}");
    }
    Ok(out.stdout.trim().to_string())
}

/// The manifest of `reference` as the registry serves it.
fn raw_manifest(reference: &str) -> Result<String> {
    let out = run_command(
        Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ]),
        Duration::from_secs(60),
    )?;
    if !out.success() {
        bail!("reading the manifest of {reference}: {out}");
    }
    Ok(out.stdout)
}

/// The layer media types of an image manifest and the sum of the layer sizes. A scan of the
/// JSON text is enough for the manifests skopeo writes (compact, `mediaType` before `size`).
fn layer_types(manifest: &str) -> (Vec<String>, u64) {
    let mut types = Vec::new();
    let mut bytes = 0;
    for part in manifest.split("\"mediaType\":\"").skip(1) {
        let Some((media_type, rest)) = part.split_once('"') else {
            continue;
        };
        if !media_type.contains(".layer.") {
            continue;
        }
        types.push(media_type.to_string());
        if let Some(size) = rest.split("\"size\":").nth(1) {
            let digits: String = size.chars().take_while(char::is_ascii_digit).collect();
            bytes += digits.parse::<u64>().unwrap_or(0);
        }
    }
    (types, bytes)
}

/// Whether the release berthd's default config names `key`.
fn berthd_knows(key: &str) -> Result<bool> {
    let bin = berth_integration::berthd_binary(Profile::Release)?;
    let out = run_command(
        Command::new(&bin).args(["config", "default"]),
        Duration::from_secs(60),
    )?;
    if !out.success() {
        bail!("{} config default: {out}", bin.display());
    }
    Ok(out.stdout.contains(key))
}

/// The `berth` CLI: `$BERTH`, else the release build next to the release berthd, else the
/// debug build (the client only relays progress; the pull runs in the daemon).
pub(crate) fn berth_cli() -> Result<PathBuf> {
    if std::env::var_os("BERTH").is_none()
        && let Some(dir) = berth_integration::berthd_binary(Profile::Release)?.parent()
    {
        let release = dir.join("berth");
        if release.is_file() {
            return Ok(release);
        }
    }
    berth_integration::berth_binary()
}

fn transfer_config(buffer: u64) -> String {
    format!(
        "[plugins.\"io.containerd.transfer.v1.local\"]\n{MULTIPART_KEY} = {buffer}\n\
         max_concurrent_downloads = {MAX_DOWNLOADS}\n"
    )
}

/// Stops the daemon and flushes the file system (as the import workload does), so the next
/// run does not pay for this one's write-back.
fn retire(d: Daemon) {
    drop(d);
    if let Err(e) = Command::new("sync").status() {
        eprintln!("berth-bench: sync: {e}");
    }
}

fn timed(d: &Daemon, mut cmd: Command) -> Result<(f64, CmdOutput)> {
    let t = Instant::now();
    let out = run_command(&mut cmd, Duration::from_secs(900))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.success() {
        bail!("{out}\n{}", d.log_tail());
    }
    Ok((secs, out))
}

fn ctr(d: &Daemon, args: &[&str]) -> Result<f64> {
    let cmd = berth_integration::ctr_command_at(d.socket(), args)?;
    Ok(timed(d, cmd)?.0)
}

fn berth_pull(setup: &Setup, d: &Daemon, v: &Variant, unpack: bool) -> Result<f64> {
    let mut cmd = Command::new(&setup.berth);
    cmd.arg("--address")
        .arg(d.socket())
        .args([
            "--namespace",
            NS,
            "pull",
            "--progress",
            "plain",
            "--plain-http",
        ])
        .env_remove("BERTH_ADDRESS")
        .env_remove("BERTH_NAMESPACE")
        .env_remove("BERTH_SNAPSHOTTER");
    if !unpack {
        cmd.arg("--no-unpack");
    }
    cmd.arg(&v.reference);
    let (secs, out) = timed(d, cmd)?;
    let want = format!("{}\t{}", v.reference, v.manifest);
    if out.stdout.trim() != want {
        bail!(
            "berth pull printed {:?}, expected {want:?}",
            out.stdout.trim()
        );
    }
    Ok(secs)
}

/// Checks that every layer of `v` is stored, and that overlayfs holds one snapshot per layer
/// after an unpacking pull (none after a fetch).
fn check(d: &Daemon, v: &Variant, unpacked: bool) -> Result<()> {
    let socket = d.socket().to_path_buf();
    let ch = block_on_global(async move { berth_integration::grpc_channel(&socket).await })?;
    let (blobs, snaps) = block_on_global(async move {
        let blobs = api::list_digests(&ch, NS).await?;
        let req = api::request(
            ListSnapshotsRequest {
                snapshotter: "overlayfs".into(),
                filters: Vec::new(),
            },
            NS,
            None,
        );
        let mut stream = SnapshotsClient::new(ch).list(req).await?.into_inner();
        let mut snaps = 0;
        while let Some(r) = stream.message().await? {
            snaps += r.info.len();
        }
        Ok::<_, berth_integration::tonic::Status>((blobs, snaps))
    })
    .map_err(|s| anyhow!("{}: {}", s.code(), s.message()))?;
    let missing: Vec<&String> = v.layers.iter().filter(|l| !blobs.contains(l)).collect();
    if !missing.is_empty() {
        bail!(
            "after pulling {} {} lacks the layers {missing:?}",
            v.reference,
            d.kind()
        );
    }
    let want = if unpacked { v.layers.len() } else { 0 };
    if snaps != want {
        bail!(
            "after pulling {} {} lists {snaps} overlayfs snapshots, expected {want}",
            v.reference,
            d.kind()
        );
    }
    Ok(())
}

/// Metric names, by variant: (ctr pull, ctr fetch, berth pull, berth fetch, berth pull
/// multipart, berth fetch multipart).
fn names(label: &str) -> [&'static str; 6] {
    match label {
        "gzip" => [
            "ctr pull, gzip",
            "ctr content fetch, gzip",
            "berth pull, gzip (containerd: ctr pull)",
            "berth pull --no-unpack, gzip (containerd: ctr content fetch)",
            "berth pull multipart, gzip (containerd: ctr pull)",
            "berth pull --no-unpack multipart, gzip (containerd: ctr content fetch)",
        ],
        _ => [
            "ctr pull, zstd",
            "ctr content fetch, zstd",
            "berth pull, zstd (containerd: ctr pull)",
            "berth pull --no-unpack, zstd (containerd: ctr content fetch)",
            "berth pull multipart, zstd (containerd: ctr pull)",
            "berth pull --no-unpack multipart, zstd (containerd: ctr content fetch)",
        ],
    }
}

impl Workload for Pull {
    fn name(&self) -> &'static str {
        "pull"
    }

    fn heavy(&self) -> bool {
        true
    }

    fn notes(&self) -> Vec<String> {
        self.setup
            .get()
            .map(|s| s.notes.clone())
            .unwrap_or_default()
    }

    fn metrics(&self) -> Vec<Metric> {
        let mut out = Vec::new();
        for label in ["gzip", "zstd"] {
            let [pull, fetch, bpull, bfetch, mpull, mfetch] = names(label);
            out.extend([
                Metric {
                    name: pull,
                    unit: "s",
                    target_ratio: Some(0.5),
                    better: Better::Lower,
                    method: "wall time of `ctr -n bench images pull --plain-http REF` (unpacked \
                             into overlayfs) of `berth_integration::images::multilayer(_, 256, \
                             gzip)` pushed with skopeo to Debian's docker-registry on loopback \
                             (for zstd recompressed by `skopeo copy --dest-compress-format \
                             zstd`). ctr 1.6 pulls on the client side through the content, \
                             snapshots and diff services of either daemon. Fresh daemon per \
                             pull; every layer blob and one snapshot per layer are checked \
                             afterwards.",
                },
                Metric {
                    name: fetch,
                    unit: "s",
                    target_ratio: None,
                    better: Better::Lower,
                    method: "`ctr -n bench content fetch --plain-http REF`: the blobs only, \
                             no unpack (no snapshot, checked).",
                },
                Metric {
                    name: bpull,
                    unit: "s",
                    target_ratio: Some(0.5),
                    better: Better::Lower,
                    method: "berthd: `berth pull --plain-http REF`, the server-side pull \
                             through the transfer service with unpack into overlayfs (multipart \
                             off); containerd 1.6 has no transfer service, so its column is its \
                             `ctr images pull` time of the same run. Output digest and unpack \
                             checked.",
                },
                Metric {
                    name: bfetch,
                    unit: "s",
                    target_ratio: None,
                    better: Better::Lower,
                    method: "berthd: `berth pull --plain-http --no-unpack REF` (multipart off); \
                             containerd: its `ctr content fetch` time of the same run.",
                },
                Metric {
                    name: mpull,
                    unit: "s",
                    target_ratio: Some(0.5),
                    better: Better::Lower,
                    method: "berthd with `concurrent_layer_fetch_buffer = 1 MiB` and \
                             `max_concurrent_downloads = 3` in \
                             `[plugins.\"io.containerd.transfer.v1.local\"]`: `berth pull`; \
                             containerd 1.6 has no multipart fetch, its column is its `ctr \
                             images pull` time. Only when `berthd config default` has the key.",
                },
                Metric {
                    name: mfetch,
                    unit: "s",
                    target_ratio: None,
                    better: Better::Lower,
                    method: "the same with `--no-unpack`; containerd: its `ctr content fetch` \
                             time.",
                },
            ]);
        }
        out.extend(crate::placement::metrics(
            SAME_PLACEMENT,
            [
                concat!(
                    "`ctr pull, gzip` again, with containerd on a flagged root: ",
                    crate::placement::flagged_root_method!()
                ),
                concat!(
                    "`berth pull, gzip (containerd: ctr pull)` with the containerd column of \
                     the row above: ",
                    crate::placement::flagged_root_method!()
                ),
            ],
        ));
        out
    }

    fn run(&self, kind: Kind, _ctx: &Ctx) -> Result<BTreeMap<&'static str, f64>> {
        let setup = self.setup()?;
        let mut out = BTreeMap::new();
        for v in &setup.variants {
            let [pull, fetch, bpull, bfetch, mpull, mfetch] = names(v.label);
            let off = if setup.multipart {
                transfer_config(0)
            } else {
                String::new()
            };

            let d = release_daemon(kind, &off, None)?;
            let secs = ctr(
                &d,
                &["-n", NS, "images", "pull", "--plain-http", &v.reference],
            )?;
            check(&d, v, true)?;
            retire(d);
            out.insert(pull, secs);
            if kind == Kind::Containerd && v.label == "gzip" {
                // The same-placement rows, right after the run they repeat.
                crate::placement::measure_containerd(&mut out, SAME_PLACEMENT, &off, |d| {
                    let secs = ctr(
                        d,
                        &["-n", NS, "images", "pull", "--plain-http", &v.reference],
                    )?;
                    check(d, v, true)?;
                    Ok(secs)
                })?;
            }

            let d = release_daemon(kind, &off, None)?;
            let fetch_secs = ctr(
                &d,
                &["-n", NS, "content", "fetch", "--plain-http", &v.reference],
            )?;
            check(&d, v, false)?;
            retire(d);
            out.insert(fetch, fetch_secs);

            if kind == Kind::Containerd {
                // The reference figures of the berth-only metrics (see their methods).
                out.insert(bpull, secs);
                out.insert(bfetch, fetch_secs);
                if setup.multipart {
                    out.insert(mpull, secs);
                    out.insert(mfetch, fetch_secs);
                }
                continue;
            }

            let mut berth_cases = vec![(bpull, true, off.clone()), (bfetch, false, off.clone())];
            if setup.multipart {
                let on = transfer_config(MULTIPART_BUFFER);
                berth_cases.push((mpull, true, on.clone()));
                berth_cases.push((mfetch, false, on));
            }
            for (metric, unpack, config) in berth_cases {
                let d = release_daemon(kind, &config, None)?;
                let secs = berth_pull(setup, &d, v, unpack)?;
                check(&d, v, unpack)?;
                retire(d);
                out.insert(metric, secs);
            }
        }
        if kind == Kind::Berthd {
            let [pull, _, bpull, ..] = names("gzip");
            crate::placement::copy_berthd_figures(&mut out, [pull, bpull], SAME_PLACEMENT)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_types_from_a_manifest() {
        let m = r#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:b2","size":582},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"sha256:30","size":1092896},{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"sha256:b2","size":615}]}"#;
        let (types, bytes) = layer_types(m);
        assert_eq!(types.len(), 2);
        assert!(types.iter().all(|t| t.ends_with("+zstd")));
        assert_eq!(bytes, 1092896 + 615);
    }
}
