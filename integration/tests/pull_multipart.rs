//! Multipart layer fetch (SPEC T5, containerd PR 10177; issue 5, acceptance 4): with
//! `concurrent_layer_fetch_buffer` = 1 MiB, `berth pull` of an image whose layer is several
//! MiB fetches the layer as parallel `Range` requests of 1 MiB, never more than
//! `max_concurrent_downloads` in flight, and the stitched layer verifies (digest at commit,
//! diff id at unpack). Against a registry that ignores `Range` the same pull reads the layer
//! as one stream and stores the same digest.
//!
//! A recording proxy in front of Debian's docker-registry sees every request (its `Range`
//! and status) and counts the requests in flight; it throttles bodies so the parts overlap
//! measurably, and it strips `Range` to play the registry that ignores it.
//!
//! Not calibrated: `berth pull` drives the transfer service, which Debian's containerd 1.6
//! lacks (and 1.6 has no `concurrent_layer_fetch_buffer`: it came with 2.1).

use berth_integration::berth_cli as berth;
use std::path::Path;

use berth_integration::archive::{self, Compression, Entry, OciArchive};
use berth_integration::recording_proxy::{Exchange, ProxySettings, RecordingProxy};
use berth_integration::registry::{Registry, RegistryOptions};
use berth_integration::{Daemon, Kind, Options};

const REPO_TAG: &str = "library/big:multipart";
const MIB: u64 = 1 << 20;
/// Requests in flight at most (below containerd's default of 3, so a limiter that counted
/// blobs instead of requests would show).
const MAX_REQUESTS: usize = 2;

/// A layer of `6 MiB + 12345` incompressible bytes: six full parts and a short seventh.
const LAYER_FILE_BYTES: usize = 6 * (1 << 20) + 12_345;

fn daemon_config() -> String {
    format!(
        "[plugins.\"io.containerd.transfer.v1.local\"]\n\
         concurrent_layer_fetch_buffer = {MIB}\n\
         max_concurrent_downloads = {MAX_REQUESTS}\n"
    )
}

/// Deterministic incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

struct Built {
    manifest_digest: String,
    layer_digest: String,
    layer_size: u64,
    top_chain_id: String,
}

/// Builds the one-layer image (a plain tar layer holding one big file) and pushes it.
fn push_image(reg: &Registry, dir: &Path) -> Built {
    let archive = dir.join("big.tar");
    let tar = archive::layer_tar(&[Entry::file("big.bin", noise(LAYER_FILE_BYTES, 0x5eed))])
        .expect("the layer tar");
    let layer_size = tar.len() as u64;
    let built = OciArchive::new()
        .layer_tar(tar, Compression::None)
        .build(&archive, "docker.io/library/big:multipart")
        .expect("building the image archive");
    reg.push_archive(&archive, REPO_TAG)
        .expect("pushing the image");
    Built {
        manifest_digest: built.manifest_digest.clone(),
        layer_digest: built.layer_digests[0].clone(),
        layer_size,
        top_chain_id: built.top_chain_id().to_string(),
    }
}

/// Pulls through `proxy` and checks the image and the layer's blob and snapshot.
fn pull_and_check(d: &Daemon, ns: &str, proxy: &RecordingProxy, image: &Built, reg: &Registry) {
    let reference = format!("{}/{REPO_TAG}", proxy.host());
    let out = berth(
        d,
        ns,
        &["pull", "--plain-http", "--progress", "plain", &reference],
    );
    if !out.success() {
        panic!(
            "berth pull failed: {out}\n{}\nregistry:\n{}",
            d.log_tail(),
            reg.log()
        );
    }
    assert_eq!(
        out.stdout.trim(),
        format!("{reference}\t{}", image.manifest_digest),
        "berth pull output"
    );
    let content = d.ctr_ok(["-n", ns, "content", "ls"]);
    assert!(
        content.stdout.contains(&image.layer_digest),
        "layer {} stored: {content}",
        image.layer_digest
    );
    let snaps = d.ctr_ok(["-n", ns, "snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert!(
        snaps.stdout.contains(&image.top_chain_id),
        "the stitched layer unpacked to its diff id ({}): {snaps}",
        image.top_chain_id
    );
    let active = d.ctr_ok(["-n", ns, "content", "active"]);
    assert_eq!(
        active.stdout.lines().count(),
        1,
        "no ingest left, only the header: {active}"
    );
}

/// The GETs of the layer blob.
fn layer_gets(proxy: &RecordingProxy, image: &Built) -> Vec<Exchange> {
    proxy
        .exchanges(&format!("/blobs/{}", image.layer_digest))
        .into_iter()
        .filter(|e| e.method == "GET")
        .collect()
}

fn setup() -> (tempfile::TempDir, Registry, Built) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let reg = Registry::start(RegistryOptions::open()).expect("starting docker-registry");
    let image = push_image(&reg, dir.path());
    (dir, reg, image)
}

#[test]
fn a_big_layer_is_fetched_as_parallel_ranges_within_the_request_limit() {
    let (_dir, reg, image) = setup();
    // 4 MiB/s per connection: a 1 MiB part takes a quarter of a second, so parts overlap for
    // long enough to be seen.
    let proxy = RecordingProxy::start(
        &reg.host(),
        ProxySettings {
            rate: Some(4 * MIB),
            ..ProxySettings::default()
        },
    )
    .expect("starting the proxy");
    let d = Daemon::start_with(
        Kind::Berthd,
        Options {
            extra_config: daemon_config(),
            ..Options::default()
        },
    );
    pull_and_check(&d, "multipart", &proxy, &image, &reg);

    let gets = layer_gets(&proxy, &image);
    let mut parts: Vec<(u64, u64)> = gets
        .iter()
        .map(|e| {
            assert_eq!(e.status, 206, "every part answered as a range: {e:?}");
            match e.range_bounds() {
                Some((start, Some(end))) => (start, end),
                other => panic!("a bounded Range on every part, got {other:?}: {e:?}"),
            }
        })
        .collect();
    parts.sort_unstable();
    eprintln!(
        "layer parts: {parts:?}; max in flight {}",
        proxy.max_in_flight()
    );
    // The parts tile the blob exactly, in 1 MiB pieces with a short last one.
    assert!(
        image.layer_size > 6 * MIB,
        "a layer of several MiB: {}",
        image.layer_size
    );
    let mut next = 0;
    for (i, (start, end)) in parts.iter().enumerate() {
        assert_eq!(
            *start, next,
            "part {i} starts where the previous ended: {parts:?}"
        );
        let len = end + 1 - start;
        if i + 1 < parts.len() {
            assert_eq!(len, MIB, "part {i} is one buffer long: {parts:?}");
        } else {
            assert!(len <= MIB, "the last part is at most a buffer: {parts:?}");
        }
        next = end + 1;
    }
    assert_eq!(
        next, image.layer_size,
        "the parts cover the whole layer: {parts:?}"
    );
    assert!(
        parts.len() >= 7,
        "a 6 MiB + 12 KiB layer takes 7 parts: {parts:?}"
    );
    // The client's concurrency over the layer's parts: each span runs from the proxy reading
    // the request to the proxy starting its last write, so a part the client asks for only
    // after finishing another never overlaps it (the proxy's own in-flight count, which ends
    // after the connection closes, can briefly see one more).
    let spans: Vec<(std::time::Instant, std::time::Instant)> = gets
        .iter()
        .map(|e| (e.started, e.last_write.unwrap_or(e.started)))
        .collect();
    let max = spans
        .iter()
        .map(|(at, _)| {
            spans
                .iter()
                .filter(|(start, end)| start <= at && at < end)
                .count()
                .max(1)
        })
        .max()
        .unwrap_or(0);
    assert!(
        max <= MAX_REQUESTS,
        "at most {MAX_REQUESTS} requests in flight at once, saw {max}: {gets:?}"
    );
    assert!(
        max >= 2,
        "parts were fetched in parallel (max in flight {max}): {gets:?}"
    );
}

#[test]
fn a_registry_ignoring_range_gets_one_stream_and_the_same_digest() {
    let (_dir, reg, image) = setup();
    let proxy = RecordingProxy::start(
        &reg.host(),
        ProxySettings {
            strip_range: true,
            ..ProxySettings::default()
        },
    )
    .expect("starting the proxy");
    let d = Daemon::start_with(
        Kind::Berthd,
        Options {
            extra_config: daemon_config(),
            ..Options::default()
        },
    );
    pull_and_check(&d, "no-ranges", &proxy, &image, &reg);

    let gets = layer_gets(&proxy, &image);
    assert_eq!(gets.len(), 1, "one stream for the layer: {gets:?}");
    let only = &gets[0];
    assert_eq!(
        only.range_bounds(),
        Some((0, Some(MIB - 1))),
        "berth asked for the first part: {only:?}"
    );
    assert_eq!(only.status, 200, "the registry sent everything: {only:?}");
    assert!(
        only.body_bytes > 6 * MIB,
        "the whole layer came in that stream: {only:?}"
    );
}
