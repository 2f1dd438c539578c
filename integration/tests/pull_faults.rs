//! Pull faults (issue 5, acceptance 6; SPEC T5 resume): the registry killed in the middle of a
//! layer, then restarted on the same storage, and the next `berth pull` resuming from the
//! ingest's offset; a manifest over the 4 MiB bound refused before it is read whole. (The
//! wrong-digest fault is in `berth_pull.rs`.)
//!
//! Not calibrated: `berth pull` drives the transfer service, which Debian's containerd 1.6
//! lacks; `ctr` checks the results on berthd.

use berth_integration::{berth_cli as berth, berth_cli_command as berth_command};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use berth_integration::api;
use berth_integration::archive::{self, Compression, Entry, OciArchive};
use berth_integration::recording_proxy::{ProxySettings, RecordingProxy};
use berth_integration::registry::{Registry, RegistryOptions};
use berth_integration::{Daemon, Kind, block_on, finish_within};

const MIB: u64 = 1 << 20;
/// containerd's bound on manifests and indexes, berth's too.
const MANIFEST_BOUND: u64 = 4 << 20;

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

fn active_offsets(d: &Daemon, ns: &str) -> std::collections::HashMap<String, i64> {
    block_on(async {
        let ch = d.channel().await.expect("channel");
        api::active_offsets(&ch, ns).await.expect("list ingests")
    })
}

fn collect_garbage(d: &Daemon, ns: &str) {
    block_on(async {
        let ch = d.channel().await.expect("channel");
        api::collect_garbage(&ch, ns)
            .await
            .expect("garbage collection");
    });
}

/// A one-layer image whose plain tar layer holds `layer_bytes` incompressible bytes, pushed as
/// `repo_tag`: (manifest digest, layer digest, layer size).
fn push_big_image(
    reg: &Registry,
    dir: &Path,
    repo_tag: &str,
    layer_bytes: usize,
) -> (String, String, u64) {
    let tar = archive::layer_tar(&[Entry::file("big.bin", noise(layer_bytes, 0xfa17))])
        .expect("the layer tar");
    let size = tar.len() as u64;
    let path = dir.join("big.tar");
    let built = OciArchive::new()
        .layer_tar(tar, Compression::None)
        .build(&path, "docker.io/library/big:faults")
        .expect("building the image archive");
    reg.push_archive(&path, repo_tag)
        .expect("pushing the image");
    (
        built.manifest_digest.clone(),
        built.layer_digests[0].clone(),
        size,
    )
}

#[test]
fn a_pull_broken_by_a_registry_crash_resumes_from_the_ingest_after_restart() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut reg = Registry::start(RegistryOptions::open()).expect("starting docker-registry");
    let repo_tag = "library/big:faults";
    // Far more than the kernel buffers between registry and proxy hold (the proxy keeps its
    // upstream receive buffer small), so the crash really cuts the layer short.
    let (manifest, layer, layer_size) = push_big_image(&reg, dir.path(), repo_tag, 24 << 20);
    // Slow enough that the crash lands in the middle of the layer.
    let proxy = RecordingProxy::start(
        &reg.host(),
        ProxySettings {
            rate: Some(2 * MIB),
            ..ProxySettings::default()
        },
    )
    .expect("starting the proxy");
    let d = Daemon::start(Kind::Berthd);
    let ns = "resume";
    let reference = format!("{}/{repo_tag}", proxy.host());
    let layer_path = format!("/blobs/{layer}");

    let first = berth_command(
        &d,
        ns,
        &["pull", "--plain-http", "--progress", "plain", &reference],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("starting berth pull");
    let mid_layer = proxy.wait_for(Duration::from_secs(60), |log| {
        log.iter()
            .any(|e| e.path.contains(&layer_path) && e.method == "GET" && e.body_bytes >= MIB)
    });
    assert!(mid_layer, "the layer download started: {:?}", proxy.log());
    reg.kill().expect("killing the registry");
    // What sat in socket buffers drains at once; the rest died with the registry.
    proxy.set(ProxySettings::default());
    let out = finish_within(first, "berth pull", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log_tail()));
    let stderr = &out.stderr;
    assert!(
        !out.status.success(),
        "the pull must fail when the registry dies: {stderr}"
    );
    eprintln!(
        "pull cut by the crash: {}",
        stderr.trim().lines().last().unwrap_or_default()
    );
    assert!(
        stderr.contains(&layer) && stderr.contains("resume"),
        "the error names the layer and says a new pull resumes: {stderr}"
    );
    let forwarded = proxy
        .exchanges(&layer_path)
        .iter()
        .map(|e| e.body_bytes)
        .max()
        .unwrap_or(0);
    assert!(
        forwarded < layer_size,
        "the layer was cut short ({forwarded} of {layer_size} bytes)"
    );

    // The partial ingest outlives the pull's lease, across a garbage collection.
    collect_garbage(&d, ns);
    let ingest_ref = format!("layer-{layer}");
    let held = active_offsets(&d, ns)
        .get(&ingest_ref)
        .copied()
        .unwrap_or_else(|| panic!("ingest {ingest_ref} kept: {:?}", active_offsets(&d, ns)));
    assert!(
        held > 0 && (held as u64) <= forwarded,
        "the ingest holds part of the layer: {held} (forwarded {forwarded})"
    );

    reg.restart()
        .expect("restarting the registry on the same storage");
    proxy.clear();
    let out = berth(
        &d,
        ns,
        &["pull", "--plain-http", "--progress", "plain", &reference],
    );
    if !out.success() {
        panic!("the pull after restart failed: {out}\n{}", d.log_tail());
    }
    assert_eq!(out.stdout.trim(), format!("{reference}\t{manifest}"));
    let gets: Vec<_> = proxy
        .exchanges(&layer_path)
        .into_iter()
        .filter(|e| e.method == "GET")
        .collect();
    assert_eq!(
        gets.len(),
        1,
        "one request for the rest of the layer: {gets:?}"
    );
    assert_eq!(
        gets[0].range_bounds(),
        Some((held as u64, None)),
        "resumed at the ingest's offset: {gets:?}"
    );
    assert_eq!(gets[0].status, 206, "{gets:?}");
    assert_eq!(
        gets[0].body_bytes,
        layer_size - held as u64,
        "only the rest was fetched: {gets:?}"
    );
    let content = d.ctr_ok(["-n", ns, "content", "ls", "-q"]);
    assert!(
        content.stdout.contains(&layer),
        "layer committed: {content}"
    );
    assert!(
        active_offsets(&d, ns).is_empty(),
        "no ingest left after the pull"
    );
}

/// A registry serving one huge manifest under the tag `t`, counting the manifest bytes it
/// managed to send. With `head_size`, HEAD answers with its size and digest (a resolved
/// descriptor over the bound); without, HEAD is refused so the client resolves by GET, and
/// the GET's body has no `Content-Length` (it ends when the connection closes).
struct BigManifestRegistry {
    addr: String,
    manifest_gets: Arc<AtomicUsize>,
    sent: Arc<AtomicU64>,
}

impl BigManifestRegistry {
    fn start(body: Vec<u8>, head_size: bool) -> BigManifestRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let digest = api::sha256_digest(&body);
        let body = Arc::new(body);
        let manifest_gets = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let (gets, total) = (Arc::clone(&manifest_gets), Arc::clone(&sent));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let (body, digest, gets, total) = (
                    Arc::clone(&body),
                    digest.clone(),
                    Arc::clone(&gets),
                    Arc::clone(&total),
                );
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                            break;
                        }
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or_default();
                    let path = parts.next().unwrap_or_default();
                    let head = |status: &str, extra: &str, len: usize| {
                        format!(
                            "HTTP/1.1 {status}\r\n{extra}Content-Length: {len}\r\n\
                             Connection: close\r\n\r\n"
                        )
                    };
                    if !path.contains("/manifests/") {
                        let _ = conn.write_all(head("404 Not Found", "", 0).as_bytes());
                        return;
                    }
                    let typed = format!(
                        "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                         Docker-Content-Digest: {digest}\r\n"
                    );
                    if method == "HEAD" {
                        let reply = if head_size {
                            head("200 OK", &typed, body.len())
                        } else {
                            head("405 Method Not Allowed", "", 0)
                        };
                        let _ = conn.write_all(reply.as_bytes());
                        return;
                    }
                    gets.fetch_add(1, Ordering::SeqCst);
                    // Without a HEAD answer the body has no length either: the client must
                    // count as it reads.
                    let reply = if head_size {
                        head("200 OK", &typed, body.len())
                    } else {
                        format!("HTTP/1.1 200 OK\r\n{typed}Connection: close\r\n\r\n")
                    };
                    if conn.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                    for piece in body.chunks(64 * 1024) {
                        if conn.write_all(piece).is_err() {
                            return;
                        }
                        total.fetch_add(piece.len() as u64, Ordering::SeqCst);
                    }
                });
            }
        });
        BigManifestRegistry {
            addr,
            manifest_gets,
            sent,
        }
    }
}

/// A syntactically valid manifest of `size` bytes (padded with an annotation).
fn big_manifest(size: usize) -> Vec<u8> {
    let head = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[],"annotations":{"pad":""#;
    let tail = r#""}}"#;
    let mut out = head.as_bytes().to_vec();
    out.resize(size - tail.len(), b'x');
    out.extend_from_slice(tail.as_bytes());
    out
}

#[test]
fn a_manifest_over_the_bound_is_refused_before_it_is_read() {
    let d = Daemon::start(Kind::Berthd);

    // Resolved by HEAD to a descriptor over the bound: refused without a GET.
    let body = big_manifest((MANIFEST_BOUND + 1024) as usize);
    let digest = api::sha256_digest(&body);
    let fake = BigManifestRegistry::start(body, true);
    let reference = format!("{}/library/huge:t", fake.addr);
    let out = berth(&d, "huge-head", &["pull", "--plain-http", &reference]);
    assert!(
        !out.success(),
        "an oversized manifest must be refused: {out}"
    );
    eprintln!(
        "oversized manifest: {}",
        out.stderr.trim().lines().last().unwrap_or_default()
    );
    assert!(
        out.stderr.contains(&digest) && out.stderr.contains(&MANIFEST_BOUND.to_string()),
        "the error names the digest and the bound: {out}"
    );
    assert_eq!(
        fake.manifest_gets.load(Ordering::SeqCst),
        0,
        "the manifest was never asked for"
    );

    // Resolved by GET (HEAD refused): reading stops just past the bound, far from the end.
    let huge = 96 * MIB as usize;
    let fake = BigManifestRegistry::start(big_manifest(huge), false);
    let reference = format!("{}/library/huge:t", fake.addr);
    let out = berth(&d, "huge-get", &["pull", "--plain-http", &reference]);
    assert!(
        !out.success(),
        "an oversized manifest must be refused: {out}"
    );
    eprintln!(
        "oversized manifest by GET: {}",
        out.stderr.trim().lines().last().unwrap_or_default()
    );
    assert!(
        out.stderr.contains("library/huge/manifests/t")
            && out.stderr.contains(&MANIFEST_BOUND.to_string()),
        "the error names the reference and the bound: {out}"
    );
    // Give the writer a moment to notice the closed connection.
    std::thread::sleep(Duration::from_millis(200));
    let sent = fake.sent.load(Ordering::SeqCst);
    assert!(
        sent < (huge as u64) / 2,
        "the client stopped reading near the bound ({sent} of {huge} bytes sent)"
    );
    for ns in ["huge-head", "huge-get"] {
        let images = d.ctr_ok(["-n", ns, "images", "ls", "-q"]);
        assert!(images.stdout.trim().is_empty(), "no image: {images}");
    }
}
