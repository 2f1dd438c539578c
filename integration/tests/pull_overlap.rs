//! `berth pull` unpacks while it fetches (Debian's docker-registry behind the recording
//! proxy): with the top layer's download held back, the layers below it are applied and
//! committed before it arrives; when that download breaks, the pull fails with the
//! download's error, not with the unpack that was waiting for the layer; and blobs are
//! fetched in the order the unpack needs them (config, then layers bottom up).
//!
//! Not calibrated: `berth pull` drives containerd's transfer service, which Debian's
//! containerd 1.6 does not have.

use std::process::Stdio;
use std::time::{Duration, Instant};

use berth_integration::images::{self, LayerCompression, TestImage};
use berth_integration::recording_proxy::{ProxySettings, RecordingProxy};
use berth_integration::registry::{Registry, RegistryOptions};
use berth_integration::{
    CmdOutput, Daemon, Kind, Options, berth_cli_command, finish_within, run_command,
};

/// The multi-layer image, small (shared with the other pull tests' cache).
const IMAGE: &str = "docker.io/library/berth-multilayer:pull";
const IMAGE_MB: u64 = 16;
const REPO_TAG: &str = "library/multi:overlap";
/// A pull of this 16 MB image takes about a second; a hung one fails the test after this.
const PULL_LIMIT: Duration = Duration::from_secs(120);

fn multilayer() -> TestImage {
    images::multilayer(IMAGE, IMAGE_MB, LayerCompression::Gzip)
        .expect("building the multi-layer test image")
}

/// docker-registry holding the image as `REPO_TAG`.
fn registry_with(image: &TestImage) -> Registry {
    let reg = Registry::start(RegistryOptions::open()).expect("starting docker-registry");
    reg.push_tagged(&image.layout, "pull", REPO_TAG)
        .expect("pushing the image");
    reg
}

/// `berth pull` of the image through `proxy`, waited for (bounded).
fn pull_through(d: &Daemon, ns: &str, proxy: &RecordingProxy) -> CmdOutput {
    let reference = format!("{}/{REPO_TAG}", proxy.host());
    run_command(
        &mut berth_cli_command(
            d,
            ns,
            &["pull", "--plain-http", "--progress", "plain", &reference],
        ),
        PULL_LIMIT,
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log_tail()))
}

fn committed_snapshots(d: &Daemon, ns: &str) -> String {
    d.ctr_ok(["-n", ns, "snapshots", "--snapshotter", "overlayfs", "ls"])
        .stdout
}

#[test]
fn layers_below_a_held_back_layer_are_unpacked_before_it_arrives() {
    let image = multilayer();
    let reg = registry_with(&image);
    let top_layer = image.layer_digests.last().expect("layers").clone();
    let proxy = RecordingProxy::start(
        &reg.host(),
        ProxySettings {
            hold: Some(top_layer.clone()),
            ..ProxySettings::default()
        },
    )
    .expect("starting the proxy");
    let d = Daemon::start(Kind::Berthd);
    let ns = "overlap";
    let reference = format!("{}/{REPO_TAG}", proxy.host());
    let mut pull = berth_cli_command(
        &d,
        ns,
        &["pull", "--plain-http", "--progress", "plain", &reference],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("starting berth pull");

    // Everything below the top layer gets committed while the top layer is held back.
    let below_top = &image.chain_ids[image.chain_ids.len() - 2];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if committed_snapshots(&d, ns).contains(below_top.as_str()) {
            break;
        }
        assert!(
            pull.try_wait().expect("berth pull status").is_none(),
            "berth pull ended while its top layer was held back"
        );
        assert!(
            Instant::now() < deadline,
            "the layers below the held-back top layer were not unpacked: {}\n{}",
            committed_snapshots(&d, ns),
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let top = image.chain_ids.last().expect("layers");
    assert!(
        !committed_snapshots(&d, ns).contains(top.as_str()),
        "the top layer cannot be unpacked before its blob arrived"
    );
    assert!(
        proxy
            .exchanges(&top_layer)
            .iter()
            .all(|e| e.status == 0 && e.body_bytes == 0),
        "the top layer is still held: {:?}",
        proxy.exchanges(&top_layer)
    );

    proxy.set(ProxySettings::default());
    let out = finish_within(pull, "berth pull", PULL_LIMIT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log_tail()));
    assert!(
        out.status.success(),
        "berth pull failed: {}\n{}",
        out.stderr,
        d.log_tail()
    );
    assert!(
        committed_snapshots(&d, ns).contains(top.as_str()),
        "top chain id {top} after the pull"
    );
}

#[test]
fn a_layer_download_that_breaks_fails_the_pull_with_the_download_error() {
    let image = multilayer();
    let reg = registry_with(&image);
    // The biggest layer, cut after its first bytes on every attempt.
    let (big_layer, _) = image
        .layer_digests
        .iter()
        .map(|digest| {
            let hex = digest.trim_start_matches("sha256:");
            let size = std::fs::metadata(image.layout.join("blobs/sha256").join(hex))
                .map(|m| m.len())
                .unwrap_or(0);
            (digest.clone(), size)
        })
        .max_by_key(|(_, size)| *size)
        .expect("layers");
    let proxy = RecordingProxy::start(
        &reg.host(),
        ProxySettings {
            cut: Some((big_layer.clone(), 4096)),
            ..ProxySettings::default()
        },
    )
    .expect("starting the proxy");
    let d = Daemon::start(Kind::Berthd);
    let ns = "broken";
    let out = pull_through(&d, ns, &proxy);
    let stderr = &out.stderr;
    assert!(!out.status.success(), "the pull must fail: {stderr}");
    assert!(
        stderr.contains(big_layer.trim_start_matches("sha256:")),
        "the error names the layer whose download broke: {stderr}"
    );
    assert!(
        !stderr.contains("stopped before"),
        "the download's error, not the waiting unpack's: {stderr}"
    );
    assert!(
        proxy.exchanges(&big_layer).iter().any(|e| e.cut),
        "the proxy cut the download: {:?}",
        proxy.exchanges(&big_layer)
    );
}

#[test]
fn blobs_are_fetched_config_first_then_layers_bottom_up() {
    let image = multilayer();
    let reg = registry_with(&image);
    let proxy =
        RecordingProxy::start(&reg.host(), ProxySettings::default()).expect("starting the proxy");
    // One download at a time makes the order of the requests the order of the slots.
    let d = Daemon::start_with(
        Kind::Berthd,
        Options {
            extra_config: "[plugins.\"io.containerd.transfer.v1.local\"]\n\
                           max_concurrent_downloads = 1\n"
                .to_string(),
            ..Options::default()
        },
    );
    let ns = "order";
    let out = pull_through(&d, ns, &proxy);
    assert!(
        out.status.success(),
        "berth pull failed: {}\n{}",
        out.stderr,
        d.log_tail()
    );
    let mut expected: Vec<String> = Vec::new();
    for digest in std::iter::once(&image.config_digest).chain(&image.layer_digests) {
        if !expected.contains(digest) {
            expected.push(digest.clone());
        }
    }
    let mut log = proxy.log();
    log.sort_by_key(|e| e.started);
    let fetched: Vec<String> = log
        .iter()
        .filter(|e| e.method == "GET" && e.path.contains("/blobs/"))
        .filter_map(|e| e.path.rsplit('/').next().map(str::to_string))
        .collect();
    assert_eq!(
        fetched, expected,
        "blob downloads in request order (expected: config, then layers bottom up)"
    );
}
