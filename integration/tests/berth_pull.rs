//! `berth pull` against berthd and a real registry (Debian's docker-registry): open, basic
//! auth with `--user` (and wrong credentials refused naming the registry, leaving nothing
//! once collected), bearer tokens, and TLS through `--hosts-dir` with the test CA.
//!
//! Not calibrated: `berth pull` drives containerd's transfer service, which Debian's
//! containerd 1.6 does not have (it came with 1.7). `ctr` 1.6 checks the results (images,
//! snapshots, content) on berthd.

use berth_integration::berth_cli as berth;

use berth_integration::images::{self, LayerCompression, TestImage};
use berth_integration::registry::{Registry, RegistryOptions};
use berth_integration::token_server::TokenServerOptions;
use berth_integration::{Daemon, Kind};

const REPO_TAG: &str = "library/busybox:pull";

fn busybox() -> TestImage {
    images::busybox(
        "docker.io/library/berth-busybox:test",
        LayerCompression::Gzip,
    )
    .expect("building the busybox test image")
}

fn registry(opts: RegistryOptions, image: &TestImage) -> Registry {
    let reg = Registry::start(opts).expect("starting docker-registry");
    reg.push_tagged(&image.layout, "test", REPO_TAG)
        .expect("pushing busybox");
    reg
}

/// Pulls and checks the `NAME<TAB>DIGEST` line, the image record and the top snapshot.
#[track_caller]
fn pull_and_check(d: &Daemon, ns: &str, reg: &Registry, image: &TestImage, extra: &[&str]) {
    let reference = reg.reference(REPO_TAG);
    let mut args = vec!["pull", "--progress", "plain"];
    args.extend_from_slice(extra);
    args.push(&reference);
    let out = berth(d, ns, &args);
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
    let images = d.ctr_ok(["-n", ns, "images", "ls"]);
    assert!(
        images.stdout.contains(&reference) && images.stdout.contains(&image.manifest_digest),
        "image record: {images}"
    );
    let top = image.chain_ids.last().expect("a layer");
    let snaps = d.ctr_ok(["-n", ns, "snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert!(
        snaps.stdout.contains(top.as_str()),
        "top chain id {top}: {snaps}"
    );
    let blob = d.ctr_ok(["-n", ns, "content", "get", &image.config_digest]);
    assert!(!blob.stdout.is_empty(), "config stored");
}

fn collect_garbage(d: &Daemon, ns: &str) {
    d.ctr_ok(["-n", ns, "leases", "create", "--id", "gc-now"]);
    d.ctr_ok(["-n", ns, "leases", "rm", "--sync", "gc-now"]);
}

#[test]
fn pull_open_registry_unpacks_and_repeats_as_already_there() {
    let image = busybox();
    let reg = registry(RegistryOptions::open(), &image);
    let d = Daemon::start(Kind::Berthd);
    pull_and_check(&d, "pull-open", &reg, &image, &["--plain-http"]);
    // Again: everything is there, the record is updated, the output is the same.
    pull_and_check(&d, "pull-open", &reg, &image, &["--plain-http"]);
    // --no-unpack stores the content without snapshots.
    let reference = reg.reference(REPO_TAG);
    let out = berth(
        &d,
        "pull-nounpack",
        &["pull", "--plain-http", "--no-unpack", &reference],
    );
    assert!(out.success(), "pull --no-unpack: {out}");
    let snaps = d.ctr_ok([
        "-n",
        "pull-nounpack",
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "ls",
    ]);
    assert_eq!(snaps.stdout.lines().count(), 1, "only the header: {snaps}");
}

#[test]
fn pull_with_basic_auth_and_wrong_credentials() {
    let image = busybox();
    let reg = registry(RegistryOptions::basic("puller", "s3cret"), &image);
    let d = Daemon::start(Kind::Berthd);
    let reference = reg.reference(REPO_TAG);

    let out = berth(
        &d,
        "pull-bad",
        &["pull", "--plain-http", "--user", "puller:wrong", &reference],
    );
    assert!(!out.success(), "wrong password must fail: {out}");
    eprintln!(
        "wrong credentials: {}",
        out.stderr.trim().lines().last().unwrap_or_default()
    );
    assert!(
        out.stderr.contains("authoriz") && out.stderr.contains(&reg.host()),
        "the error names authorization and the registry: {out}"
    );
    assert!(
        !out.stderr.contains("wrong"),
        "no secret in the error: {out}"
    );
    collect_garbage(&d, "pull-bad");
    for what in ["images", "content"] {
        let ls = d.ctr_ok(["-n", "pull-bad", what, "ls", "-q"]);
        assert!(
            ls.stdout.trim().is_empty(),
            "{what} left after a failed pull: {ls}"
        );
    }

    let out = berth(&d, "pull-anon", &["pull", "--plain-http", &reference]);
    assert!(
        !out.success(),
        "anonymous pull of a protected repo must fail: {out}"
    );

    pull_and_check(
        &d,
        "pull-basic",
        &reg,
        &image,
        &["--plain-http", "--user", "puller:s3cret"],
    );
}

#[test]
fn pull_with_bearer_tokens() {
    let image = busybox();
    let reg = registry(
        RegistryOptions::token(TokenServerOptions {
            credentials: Some(("tokuser".into(), "tokpass".into())),
            ..TokenServerOptions::default()
        }),
        &image,
    );
    let tokens = reg.token_server().expect("token mode");
    let (user, password) = reg.credentials().expect("token server credentials");
    let user_arg = format!("{user}:{password}");
    let d = Daemon::start(Kind::Berthd);
    pull_and_check(
        &d,
        "pull-token",
        &reg,
        &image,
        &["--plain-http", "--user", &user_arg],
    );
    assert!(
        tokens.log().iter().any(|t| t.granted
            && t.scopes
                .iter()
                .any(|s| s == "repository:library/busybox:pull")),
        "a pull token was granted: {:?}",
        tokens.log()
    );
}

#[test]
fn pull_over_tls_with_the_test_ca_from_hosts_dir() {
    let image = busybox();
    let reg = registry(RegistryOptions::open().with_tls(), &image);
    let ca = reg.ca_cert().expect("a CA").to_path_buf();
    let dir = tempfile::tempdir().expect("hosts dir");
    let host_dir = dir.path().join(reg.host());
    std::fs::create_dir_all(&host_dir).expect("hosts dir");
    let d = Daemon::start(Kind::Berthd);
    let hosts = dir.path().to_str().expect("utf-8 path");

    // Without the CA the certificate is not trusted.
    let reference = reg.reference(REPO_TAG);
    let out = berth(&d, "pull-tls", &["pull", "--hosts-dir", hosts, &reference]);
    assert!(!out.success(), "an untrusted certificate must fail: {out}");

    std::fs::write(
        host_dir.join("hosts.toml"),
        format!("server = \"{}\"\nca = \"{}\"\n", reg.url(), ca.display()),
    )
    .expect("hosts.toml");
    pull_and_check(&d, "pull-tls", &reg, &image, &["--hosts-dir", hosts]);
}

/// A minimal registry on a thread, serving fixed manifests and blobs by digest (and the tag
/// `t` as `tag_target`), for what a real registry will not serve: corrupt blobs and an index
/// assembled by hand.
struct FakeRegistry {
    addr: String,
}

impl FakeRegistry {
    fn start(
        docs: Vec<(String, String, Vec<u8>)>,
        blobs: Vec<(String, Vec<u8>)>,
        tag_target: String,
    ) -> FakeRegistry {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                        break;
                    }
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or("").to_owned();
                let path = parts.next().unwrap_or("").to_owned();
                let last = path.rsplit('/').next().unwrap_or("").to_owned();
                let wanted = if last == "t" {
                    tag_target.clone()
                } else {
                    last
                };
                let found: Option<(String, String, Vec<u8>)> = if path == "/v2/" {
                    Some((String::new(), "application/json".into(), b"{}".to_vec()))
                } else if path.contains("/manifests/") {
                    docs.iter().find(|(d, _, _)| *d == wanted).cloned()
                } else {
                    blobs
                        .iter()
                        .find(|(d, _)| *d == wanted)
                        .map(|(d, b)| (d.clone(), "application/octet-stream".into(), b.clone()))
                };
                let response = match found {
                    Some((digest, media_type, body)) => {
                        let mut head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: {media_type}\r\nContent-Length: {}\r\nDocker-Content-Digest: {digest}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        if method != "HEAD" {
                            head.extend_from_slice(&body);
                        }
                        head
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = conn.write_all(&response);
            }
        });
        FakeRegistry { addr }
    }
}

fn layout_blob(image: &TestImage, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    std::fs::read(image.layout.join("blobs/sha256").join(hex)).expect("layout blob")
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

/// Every blob of the test image (config and layers), by digest.
fn image_blobs(image: &TestImage) -> Vec<(String, Vec<u8>)> {
    std::iter::once(image.config_digest.clone())
        .chain(image.layer_digests.iter().cloned())
        .map(|d| {
            let b = layout_blob(image, &d);
            (d, b)
        })
        .collect()
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

#[test]
fn a_corrupt_layer_fails_naming_its_digest_and_leaves_nothing() {
    let image = busybox();
    let manifest = layout_blob(&image, &image.manifest_digest);
    let mut blobs = image_blobs(&image);
    let bad = image.layer_digests[0].clone();
    for (d, b) in &mut blobs {
        if *d == bad {
            let last = b.len() - 1;
            b[last] ^= 0xff;
        }
    }
    let fake = FakeRegistry::start(
        vec![(image.manifest_digest.clone(), OCI_MANIFEST.into(), manifest)],
        blobs,
        image.manifest_digest.clone(),
    );
    let d = Daemon::start(Kind::Berthd);
    let ns = "pull-corrupt";
    let reference = format!("{}/library/busybox:t", fake.addr);
    let out = berth(&d, ns, &["pull", "--plain-http", &reference]);
    assert!(!out.success(), "a corrupt layer must fail the pull: {out}");
    eprintln!(
        "corrupt layer: {}",
        out.stderr.trim().lines().last().unwrap_or_default()
    );
    assert!(out.stderr.contains(&bad), "the error names {bad}: {out}");
    let content = d.ctr_ok(["-n", ns, "content", "ls", "-q"]);
    assert!(
        !content.stdout.contains(&bad),
        "nothing under {bad}: {content}"
    );
    let active = d.ctr_ok(["-n", ns, "content", "active"]);
    assert!(
        !active.stdout.contains(&bad[7..]),
        "no ingest of {bad} left: {active}"
    );
    collect_garbage(&d, ns);
    for what in ["images", "content"] {
        let ls = d.ctr_ok(["-n", ns, what, "ls", "-q"]);
        assert!(
            ls.stdout.trim().is_empty(),
            "{what} left after a failed pull: {ls}"
        );
    }
}

#[test]
fn platform_picks_its_manifest_of_an_index() {
    let image = busybox();
    let host_manifest = layout_blob(&image, &image.manifest_digest);
    // Another platform's manifest: the same blobs, told apart by an annotation.
    let mut other: serde_json::Value =
        serde_json::from_slice(&host_manifest).expect("manifest JSON");
    other["annotations"] = serde_json::json!({"test.platform": "linux/s390x"});
    let other = serde_json::to_vec(&other).expect("manifest");
    let other_digest = berth_integration::api::sha256_digest(&other);
    let entry = |digest: &str, size: usize, arch: &str| {
        serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
            "platform": {"os": "linux", "architecture": arch}})
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [entry(&image.manifest_digest, host_manifest.len(), host_arch()),
                      entry(&other_digest, other.len(), "s390x")],
    }))
    .expect("index");
    let index_digest = berth_integration::api::sha256_digest(&index);
    let fake = FakeRegistry::start(
        vec![
            (index_digest.clone(), OCI_INDEX.into(), index),
            (
                image.manifest_digest.clone(),
                OCI_MANIFEST.into(),
                host_manifest,
            ),
            (other_digest.clone(), OCI_MANIFEST.into(), other),
        ],
        image_blobs(&image),
        index_digest.clone(),
    );
    let d = Daemon::start(Kind::Berthd);
    let reference = format!("{}/library/busybox:t", fake.addr);
    for (ns, platform, want, not) in [
        (
            "pull-s390x",
            "linux/s390x",
            &other_digest,
            &image.manifest_digest,
        ),
        ("pull-host", "", &image.manifest_digest, &other_digest),
    ] {
        let mut args = vec!["pull", "--plain-http"];
        if !platform.is_empty() {
            args.extend(["--platform", platform]);
        }
        args.push(&reference);
        let out = berth(&d, ns, &args);
        assert!(out.success(), "pull {platform}: {out}\n{}", d.log_tail());
        assert_eq!(out.stdout.trim(), format!("{reference}\t{index_digest}"));
        let content = d.ctr_ok(["-n", ns, "content", "ls", "-q"]);
        assert!(
            content.stdout.contains(want.as_str()),
            "{want} fetched: {content}"
        );
        assert!(
            !content.stdout.contains(not.as_str()),
            "{not} not fetched: {content}"
        );
    }
    // The host's image was unpacked; the foreign one was not.
    let top = image.chain_ids.last().expect("a layer");
    let snaps = d.ctr_ok([
        "-n",
        "pull-host",
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "ls",
    ]);
    assert!(snaps.stdout.contains(top.as_str()), "{snaps}");
    let snaps = d.ctr_ok([
        "-n",
        "pull-s390x",
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "ls",
    ]);
    assert!(!snaps.stdout.contains(top.as_str()), "{snaps}");
}
