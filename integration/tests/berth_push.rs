//! `berth push` against berthd and a real registry (Debian's docker-registry), issue 5
//! acceptance 7: images imported with `berth images import`, pushed (open registry, htpasswd
//! basic auth, bearer tokens with the push scope), pulled back with `berth pull` into a fresh namespace with the same
//! digest; a second push sends nothing; a missing image and wrong credentials fail naming
//! what is wrong. `ctr images push` (ctr 1.6 pushes client-side, reading the daemon's content
//! store) is calibrated against both daemons.
//!
//! The `berth push` tests are not calibrated: `berth push` drives containerd's transfer
//! service, which Debian's containerd 1.6 does not have (it came with 1.7).

use berth_integration::berth_cli as berth;
use std::time::Duration;

use berth_integration::archive::host_arch;
use berth_integration::images::{self, LayerCompression, TestImage};
use berth_integration::registry::{Registry, RegistryOptions};
use berth_integration::token_server::TokenServerOptions;
use berth_integration::{Daemon, Kind, calibrated, run_command};

const BUSYBOX: &str = "docker.io/library/berth-busybox:test";
const MULTILAYER: &str = "docker.io/library/berth-multilayer:push";
/// Big enough for a gzip layer over the 4 MiB upload piece (its random third does not
/// compress), small enough to build and push in seconds.
const MULTILAYER_MB: u64 = 16;

fn busybox() -> TestImage {
    images::busybox(BUSYBOX, LayerCompression::Gzip).expect("building the busybox test image")
}

fn multilayer() -> TestImage {
    images::multilayer(MULTILAYER, MULTILAYER_MB, LayerCompression::Gzip)
        .expect("building the multi-layer test image")
}

/// Imports the image's OCI archive into `ns` without unpacking.
#[track_caller]
fn import(d: &Daemon, ns: &str, image: &TestImage) {
    let archive = image.oci_archive.to_string_lossy().into_owned();
    let out = berth(
        d,
        ns,
        &[
            "images",
            "import",
            "--no-unpack",
            "--progress",
            "none",
            &archive,
        ],
    );
    assert!(out.success(), "import of {}: {out}", image.name);
    assert_eq!(
        out.stdout.trim(),
        format!("{}\t{}", image.name, image.manifest_digest),
        "import output"
    );
}

/// Pushes `name` from `ns` to `reference`, checks the `REFERENCE<TAB>DIGEST` line, and
/// returns the plain progress lines.
#[track_caller]
fn push_ok(
    d: &Daemon,
    ns: &str,
    reg: &Registry,
    name: &str,
    reference: &str,
    digest: &str,
    extra: &[&str],
) -> String {
    let mut args = vec!["push", "--plain-http", "--progress", "plain"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[name, reference]);
    let out = berth(d, ns, &args);
    if !out.success() {
        panic!(
            "berth push failed: {out}\n{}\nregistry:\n{}",
            d.log_tail(),
            reg.log()
        );
    }
    assert_eq!(
        out.stdout.trim(),
        format!("{reference}\t{digest}"),
        "berth push output"
    );
    assert!(
        out.stderr
            .contains(&format!("Completed push to OCI Registry ({reference})")),
        "the closing status line: {out}"
    );
    out.stderr
}

/// The plain progress line's event for `what-<digest>` (the last one it got).
fn last_event(progress: &str, key: &str) -> Option<String> {
    progress
        .lines()
        .rev()
        .filter(|l| l.split_whitespace().any(|w| w == key))
        .filter_map(|l| l.split(key).next())
        .map(|event| event.trim().to_owned())
        .next()
}

/// Pulls `reference` into a namespace of its own and checks the image digest.
#[track_caller]
fn pull_back(d: &Daemon, ns: &str, reference: &str, digest: &str, extra: &[&str]) {
    let mut args = vec!["pull", "--plain-http", "--progress", "none"];
    args.extend_from_slice(extra);
    args.push(reference);
    let out = berth(d, ns, &args);
    assert!(
        out.success(),
        "pull back of {reference}: {out}\n{}",
        d.log_tail()
    );
    assert_eq!(
        out.stdout.trim(),
        format!("{reference}\t{digest}"),
        "the pulled image has the pushed digest"
    );
}

/// Requests of the registry's access log that write (`POST`, `PATCH`, `PUT`).
fn writes(reg: &Registry) -> Vec<String> {
    reg.log()
        .lines()
        .filter(|l| {
            ["\"POST /v2/", "\"PATCH /v2/", "\"PUT /v2/"]
                .iter()
                .any(|m| l.contains(m))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn push_to_an_open_registry_and_pull_back() {
    let busybox = busybox();
    let multi = multilayer();
    let reg = Registry::start(RegistryOptions::open()).expect("starting docker-registry");
    let d = Daemon::start(Kind::Berthd);
    import(&d, "push-src", &busybox);
    import(&d, "push-src", &multi);

    let busybox_ref = reg.reference("library/pushed:busybox");
    let progress = push_ok(
        &d,
        "push-src",
        &reg,
        BUSYBOX,
        &busybox_ref,
        &busybox.manifest_digest,
        &[],
    );
    for layer in &busybox.layer_digests {
        assert_eq!(
            last_event(&progress, &format!("layer-{layer}")).as_deref(),
            Some("complete"),
            "layer {layer} uploaded: {progress}"
        );
    }
    assert_eq!(
        last_event(&progress, &format!("manifest-{}", busybox.manifest_digest)).as_deref(),
        Some("complete"),
        "manifest pushed: {progress}"
    );

    // Same repository: the busybox layers the multi-layer image shares are there already.
    let multi_ref = reg.reference("library/pushed:multi");
    let progress = push_ok(
        &d,
        "push-src",
        &reg,
        MULTILAYER,
        &multi_ref,
        &multi.manifest_digest,
        &[],
    );
    let (shared, own) = multi.layer_digests.split_at(2);
    for layer in own {
        assert_eq!(
            last_event(&progress, &format!("layer-{layer}")).as_deref(),
            Some("complete"),
            "layer {layer} uploaded: {progress}"
        );
    }
    let log = reg.log();
    assert!(
        log.contains("\"PATCH /v2/library/pushed/blobs/uploads/"),
        "a layer over 4 MiB went up in pieces:\n{log}"
    );
    for layer in shared {
        assert!(
            busybox.layer_digests.contains(layer),
            "the images share {layer}"
        );
        assert_eq!(
            last_event(&progress, &format!("layer-{layer}")).as_deref(),
            Some("already exists"),
            "shared layer {layer} not sent again: {progress}"
        );
    }

    // Again: the registry has everything; nothing is written.
    let before = writes(&reg);
    let progress = push_ok(
        &d,
        "push-src",
        &reg,
        MULTILAYER,
        &multi_ref,
        &multi.manifest_digest,
        &[],
    );
    let keys = multi
        .layer_digests
        .iter()
        .map(|l| format!("layer-{l}"))
        .chain([
            format!("config-{}", multi.config_digest),
            format!("manifest-{}", multi.manifest_digest),
        ]);
    for key in keys {
        assert_eq!(
            last_event(&progress, &key).as_deref(),
            Some("already exists"),
            "{key} on the second push: {progress}"
        );
    }
    assert!(
        !progress.contains("uploading"),
        "nothing uploaded: {progress}"
    );
    assert_eq!(
        writes(&reg),
        before,
        "the second push wrote nothing to the registry"
    );

    pull_back(&d, "push-back", &busybox_ref, &busybox.manifest_digest, &[]);
    pull_back(
        &d,
        "push-back",
        &multi_ref,
        &multi.manifest_digest,
        &["--no-unpack"],
    );

    // A name the namespace does not have: NotFound naming it, nothing sent.
    let before = writes(&reg);
    let missing = "docker.io/library/never-imported:1";
    let out = berth(
        &d,
        "push-src",
        &[
            "push",
            "--plain-http",
            missing,
            &reg.reference("library/never:1"),
        ],
    );
    assert!(!out.success(), "push of a missing image: {out}");
    eprintln!(
        "missing image: {}",
        out.stderr.trim().lines().last().unwrap_or_default()
    );
    assert!(
        out.stderr.contains("not found") && out.stderr.contains(missing),
        "the error says not found and names the image: {out}"
    );
    assert_eq!(writes(&reg), before, "nothing sent for a missing image");
}

#[test]
fn push_with_basic_auth_and_wrong_credentials() {
    let image = busybox();
    let reg = Registry::start(RegistryOptions::basic("pusher", "s3cret"))
        .expect("starting docker-registry");
    let d = Daemon::start(Kind::Berthd);
    import(&d, "push-auth", &image);
    let reference = reg.reference("library/private:1");

    let out = berth(
        &d,
        "push-auth",
        &[
            "push",
            "--plain-http",
            "--user",
            "pusher:wrong",
            BUSYBOX,
            &reference,
        ],
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

    let out = berth(
        &d,
        "push-auth",
        &["push", "--plain-http", BUSYBOX, &reference],
    );
    assert!(
        !out.success(),
        "anonymous push to a protected registry must fail: {out}"
    );
    assert!(
        out.stderr.contains(&reg.host()),
        "names the registry: {out}"
    );
    assert!(
        writes(&reg).iter().all(|l| !l.contains("\" 20")),
        "no write succeeded without credentials:\n{}",
        reg.log()
    );

    push_ok(
        &d,
        "push-auth",
        &reg,
        BUSYBOX,
        &reference,
        &image.manifest_digest,
        &["--user", "pusher:s3cret"],
    );
    pull_back(
        &d,
        "push-auth-back",
        &reference,
        &image.manifest_digest,
        &["--no-unpack", "--user", "pusher:s3cret"],
    );
}

#[test]
fn push_with_bearer_tokens_asks_for_the_push_scope() {
    let image = busybox();
    let reg = Registry::start(RegistryOptions::token(TokenServerOptions {
        credentials: Some(("tokuser".into(), "tokpass".into())),
        ..TokenServerOptions::default()
    }))
    .expect("starting docker-registry");
    let tokens = reg.token_server().expect("token mode");
    let d = Daemon::start(Kind::Berthd);
    import(&d, "push-token", &image);
    let reference = reg.reference("library/tokpush:1");
    push_ok(
        &d,
        "push-token",
        &reg,
        BUSYBOX,
        &reference,
        &image.manifest_digest,
        &["--user", "tokuser:tokpass"],
    );
    assert!(
        tokens.log().iter().any(|t| t.granted
            && t.scopes
                .iter()
                .any(|s| s == "repository:library/tokpush:pull,push")),
        "a push token was granted: {:?}",
        tokens.log()
    );
    pull_back(
        &d,
        "push-token-back",
        &reference,
        &image.manifest_digest,
        &["--no-unpack", "--user", "tokuser:tokpass"],
    );
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const TWO_PLATFORMS: &str = "docker.io/library/berth-busybox:two";

/// An OCI archive of a two-platform index: the busybox manifest for the host and a copy told
/// apart by an annotation for linux/s390x (same blobs). Returns the archive, the index digest
/// and the s390x manifest's digest.
fn two_platform_archive(image: &TestImage, dir: &std::path::Path) -> (String, String, String) {
    let layout = dir.join("layout");
    let cp = run_command(
        std::process::Command::new("cp")
            .arg("-r")
            .arg(&image.layout)
            .arg(&layout),
        Duration::from_secs(60),
    )
    .expect("copying the layout");
    assert!(cp.success(), "{cp}");
    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let host = std::fs::read(blob(&image.manifest_digest)).expect("the busybox manifest");
    let mut other: serde_json::Value = serde_json::from_slice(&host).expect("manifest JSON");
    other["annotations"] = serde_json::json!({"test.platform": "linux/s390x"});
    let other = serde_json::to_vec(&other).expect("manifest");
    let other_digest = berth_integration::api::sha256_digest(&other);
    std::fs::write(blob(&other_digest), &other).expect("writing a blob");
    let entry = |digest: &str, size: usize, arch: &str| {
        serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
            "platform": {"os": "linux", "architecture": arch}})
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [entry(&image.manifest_digest, host.len(), host_arch()),
                      entry(&other_digest, other.len(), "s390x")],
    }))
    .expect("index");
    let index_digest = berth_integration::api::sha256_digest(&index);
    std::fs::write(blob(&index_digest), &index).expect("writing a blob");
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_INDEX, "digest": index_digest, "size": index.len(),
        "annotations": {"io.containerd.image.name": TWO_PLATFORMS,
                        "org.opencontainers.image.ref.name": "two"}}]});
    std::fs::write(layout.join("index.json"), top.to_string()).expect("index.json");
    let archive = dir.join("two.tar");
    let tar = run_command(
        std::process::Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
        Duration::from_secs(60),
    )
    .expect("tar");
    assert!(tar.success(), "{tar}");
    (
        archive.to_string_lossy().into_owned(),
        index_digest,
        other_digest,
    )
}

#[test]
fn push_of_an_index_all_platforms_or_one() {
    let image = busybox();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (archive, index_digest, s390x) = two_platform_archive(&image, dir.path());
    let reg = Registry::start(RegistryOptions::open()).expect("starting docker-registry");
    let d = Daemon::start(Kind::Berthd);

    // The index names a manifest neither the store (removed here) nor the registry has.
    let out = berth(
        &d,
        "push-host-only",
        &[
            "images",
            "import",
            "--no-unpack",
            "--progress",
            "none",
            &archive,
        ],
    );
    assert!(out.success(), "import: {out}");
    d.ctr_ok(["-n", "push-host-only", "content", "rm", &s390x]);
    let out = berth(
        &d,
        "push-host-only",
        &[
            "push",
            "--plain-http",
            TWO_PLATFORMS,
            &reg.reference("library/index:partial"),
        ],
    );
    assert!(
        !out.success(),
        "an index with a manifest missing everywhere: {out}"
    );
    eprintln!(
        "missing manifest: {}",
        out.stderr.trim().lines().last().unwrap_or_default()
    );
    assert!(
        out.stderr.contains(&s390x),
        "the error names the missing manifest {s390x}: {out}"
    );
    assert!(
        !reg.log()
            .contains("PUT /v2/library/index/manifests/partial"),
        "the index was not sent:\n{}",
        reg.log()
    );
    // One platform: its manifest alone is tagged.
    let one = reg.reference("library/index:host");
    push_ok(
        &d,
        "push-host-only",
        &reg,
        TWO_PLATFORMS,
        &one,
        &image.manifest_digest,
        &["--platform", &format!("linux/{}", host_arch())],
    );

    // Everything imported: the whole index goes, children by digest first, then the tag.
    let out = berth(
        &d,
        "push-all",
        &[
            "images",
            "import",
            "--all-platforms",
            "--no-unpack",
            "--progress",
            "none",
            &archive,
        ],
    );
    assert!(out.success(), "import: {out}");
    let all = reg.reference("library/index:all");
    let progress = push_ok(
        &d,
        "push-all",
        &reg,
        TWO_PLATFORMS,
        &all,
        &index_digest,
        &[],
    );
    assert_eq!(
        last_event(&progress, &format!("manifest-{s390x}")).as_deref(),
        Some("complete"),
        "the s390x manifest was sent: {progress}"
    );
    assert_eq!(
        last_event(&progress, &format!("index-{index_digest}")).as_deref(),
        Some("complete"),
        "{progress}"
    );
    assert!(
        reg.log_shows(&format!("PUT /v2/library/index/manifests/{s390x}")),
        "a child manifest goes by digest:\n{}",
        reg.log()
    );
    pull_back(
        &d,
        "push-index-back",
        &all,
        &index_digest,
        &["--no-unpack", "--platform", "linux/s390x"],
    );
    pull_back(
        &d,
        "push-index-back",
        &one,
        &image.manifest_digest,
        &["--no-unpack"],
    );
}

/// ctr 1.6 pushes client-side: it reads the image and its blobs through the daemon's images
/// and content services and talks to the registry itself. Pulled back (also client-side) into
/// a fresh namespace, the image has the digest imported.
fn ctr_push_and_pull_back(kind: Kind) {
    let image = busybox();
    let reg = Registry::start(RegistryOptions::open()).expect("starting docker-registry");
    let d = Daemon::start(kind);
    let archive = image.oci_archive.to_string_lossy().into_owned();
    d.ctr_ok([
        "-n",
        "ctr-push",
        "images",
        "import",
        "--no-unpack",
        &archive,
    ]);
    let reference = reg.reference("library/ctr-pushed:1");
    let out = d.ctr([
        "-n",
        "ctr-push",
        "images",
        "push",
        "--plain-http",
        &reference,
        BUSYBOX,
    ]);
    assert!(
        out.success(),
        "ctr images push on {kind:?}: {out}\n{}\nregistry:\n{}",
        d.log_tail(),
        reg.log()
    );
    assert!(
        reg.log_shows("\"PUT /v2/library/ctr-pushed/manifests/1"),
        "the manifest reached the registry:\n{}",
        reg.log()
    );
    d.ctr_ok([
        "-n",
        "ctr-back",
        "images",
        "pull",
        "--plain-http",
        &reference,
    ]);
    let ls = d.ctr_ok(["-n", "ctr-back", "images", "ls"]);
    assert!(
        ls.stdout
            .lines()
            .any(|l| l.contains(&reference) && l.contains(&image.manifest_digest)),
        "pulled back with the same digest: {ls}"
    );
}
calibrated!(ctr_push_and_pull_back);
