//! `ctr images pull` from a real registry (issue 5, acceptance 1). ctr 1.6 pulls client-side:
//! it resolves and fetches from the registry itself and drives the daemon's content, images,
//! leases, snapshots and diff services, so these tests check that berthd serves a real pull
//! and unpack the way containerd does. Calibrated: every body runs against both daemons.

use berth_integration::images::{self, LayerCompression, TestImage};
use berth_integration::registry::{Registry, RegistryOptions};
use berth_integration::token_server::TokenServerOptions;
use berth_integration::{Daemon, Kind, calibrated};

const REPO_TAG: &str = "library/busybox:test";

fn busybox() -> TestImage {
    images::busybox(
        "docker.io/library/berth-busybox:test",
        LayerCompression::Gzip,
    )
    .expect("building the busybox test image")
}

/// A registry holding the busybox image as `library/busybox:test`.
fn registry_with_busybox(opts: RegistryOptions) -> (Registry, TestImage) {
    let image = busybox();
    let reg = Registry::start(opts).expect("starting docker-registry");
    reg.push(&image.layout, REPO_TAG)
        .expect("pushing busybox to the registry");
    (reg, image)
}

/// Mounts a read-only view of `top` in `snapshotter` and checks the unpacked tree.
fn check_unpacked(d: &Daemon, snapshotter: &str, top: &str) {
    let key = format!("pull-view-{snapshotter}");
    d.ctr_ok(["snapshots", "--snapshotter", snapshotter, "view", &key, top]);
    let target = d.dir().join(format!("mnt-{snapshotter}"));
    std::fs::create_dir_all(&target).expect("mount point");
    let mounts = d.ctr_ok([
        "snapshots",
        "--snapshotter",
        snapshotter,
        "mounts",
        &target.to_string_lossy(),
        &key,
    ]);
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(mounts.stdout.trim())
        .status()
        .expect("running the mount command");
    assert!(status.success(), "mount failed: {}", mounts.stdout);
    let busybox = std::fs::metadata(target.join("bin/busybox"));
    let sh = std::fs::read_link(target.join("bin/sh"));
    let passwd = std::fs::read_to_string(target.join("etc/passwd"));
    let _ = std::process::Command::new("umount").arg(&target).status();
    let busybox = busybox.expect("bin/busybox in the unpacked image");
    assert!(
        busybox.is_file() && busybox.len() > 100_000,
        "bin/busybox is the static binary: {busybox:?}"
    );
    assert!(sh.is_ok(), "bin/sh is a symlink: {sh:?}");
    assert!(
        passwd.expect("etc/passwd from layer 2").contains("root:"),
        "etc/passwd has root"
    );
    d.ctr_ok(["snapshots", "--snapshotter", snapshotter, "rm", &key]);
}

/// Waits for a collection, so a view made next is not raced by one pending from the pull's
/// own lease going away (ctr 1.6 gives views no gc.root label).
fn settle(d: &Daemon) {
    d.ctr_ok(["leases", "create", "--id", "settle"]);
    d.ctr_ok(["leases", "rm", "--sync", "settle"]);
}

/// The `ctr images ls` row of `name` (space-padded; no cell holds a space but LABELS).
fn image_row(d: &Daemon, name: &str) -> Vec<String> {
    let ls = d.ctr_ok(["images", "ls"]);
    ls.stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|r| r.first().map(String::as_str) == Some(name))
        .unwrap_or_else(|| panic!("{name} not listed: {ls}"))
}

fn pull_plain_http_and_unpack(kind: Kind) {
    let (reg, image) = registry_with_busybox(RegistryOptions::open());
    let d = Daemon::start(kind);
    let name = reg.reference(REPO_TAG);
    let top = image.chain_ids.last().expect("a top layer").clone();

    let out = d.ctr_ok(["images", "pull", "--plain-http", &name]);
    assert!(out.stdout.contains("done"), "{out}");
    let row = image_row(&d, &name);
    assert!(
        row.contains(&image.manifest_digest),
        "the pulled image points at the pushed manifest {}: {row:?}",
        image.manifest_digest
    );
    let check = d.ctr_ok(["images", "check"]);
    let line = check
        .stdout
        .lines()
        .find(|l| l.starts_with(&name))
        .unwrap_or_else(|| panic!("{name} not checked: {check}"));
    assert!(line.contains("complete"), "{line}");
    for blob in image.layer_digests.iter().chain([&image.config_digest]) {
        d.ctr_ok(["content", "get", blob]);
    }
    settle(&d);
    check_unpacked(&d, "overlayfs", &top);

    // The same image into a second snapshotter: the content is there, only the unpack runs.
    d.ctr_ok([
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "native",
        &name,
    ]);
    let snaps = d.ctr_ok(["snapshots", "--snapshotter", "native", "ls"]);
    assert!(
        snaps.stdout.contains(&top),
        "{top} unpacked into native: {snaps}"
    );
    settle(&d);
    check_unpacked(&d, "native", &top);

    // A tag the registry does not have.
    let missing = reg.reference("library/busybox:missing");
    d.ctr(["images", "pull", "--plain-http", &missing])
        .assert_failure_contains("not found");
    let ls = d.ctr_ok(["images", "ls", "-q"]);
    assert!(!ls.stdout.contains(":missing"), "{ls}");
}
calibrated!(pull_plain_http_and_unpack);

fn pull_with_basic_auth(kind: Kind) {
    let (reg, image) = registry_with_busybox(RegistryOptions::basic("berth", "s3cret"));
    let d = Daemon::start(kind);
    let name = reg.reference(REPO_TAG);

    d.ctr(["images", "pull", "--plain-http", &name])
        .assert_failure_contains("401 Unauthorized");
    d.ctr([
        "images",
        "pull",
        "--plain-http",
        "--user",
        "berth:wrong",
        &name,
    ])
    .assert_failure_contains("401 Unauthorized");
    d.ctr_ok([
        "images",
        "pull",
        "--plain-http",
        "--user",
        "berth:s3cret",
        &name,
    ]);
    let row = image_row(&d, &name);
    assert!(row.contains(&image.manifest_digest), "{row:?}");
    let top = image.chain_ids.last().expect("a top layer");
    let snaps = d.ctr_ok(["snapshots", "ls"]);
    assert!(
        snaps.stdout.contains(top.as_str()),
        "{top} unpacked: {snaps}"
    );
}
calibrated!(pull_with_basic_auth);

fn pull_with_token_auth(kind: Kind) {
    let (reg, image) = registry_with_busybox(RegistryOptions::token(TokenServerOptions {
        credentials: Some(("berth".into(), "t0ken".into())),
        ..TokenServerOptions::default()
    }));
    let tokens = reg.token_server().expect("token mode");
    let d = Daemon::start(kind);
    let name = reg.reference(REPO_TAG);

    let before = tokens.requests();
    d.ctr(["images", "pull", "--plain-http", &name])
        .assert_failure_contains("401 Unauthorized");
    assert!(
        tokens.log()[before..].iter().all(|t| !t.granted),
        "no token for an anonymous client: {:?}",
        &tokens.log()[before..]
    );
    let before = tokens.requests();
    d.ctr_ok([
        "images",
        "pull",
        "--plain-http",
        "--user",
        "berth:t0ken",
        &name,
    ]);
    let granted: Vec<_> = tokens.log()[before..]
        .iter()
        .filter(|t| t.granted)
        .cloned()
        .collect();
    assert!(
        granted.iter().any(|t| t
            .scopes
            .contains(&"repository:library/busybox:pull".to_string())),
        "ctr got a pull token: {granted:?}"
    );
    let row = image_row(&d, &name);
    assert!(row.contains(&image.manifest_digest), "{row:?}");
}
calibrated!(pull_with_token_auth);

/// Writes `<hosts>/<host>/hosts.toml` naming the registry's https URL, with `extra` settings.
/// The settings go in a `[host."https://..."]` table too: containerd 1.6 refuses a hosts.toml
/// without one ("invalid `host` tree") and then falls back to plain HTTP for loopback hosts.
fn hosts_toml(hosts: &std::path::Path, reg: &Registry, extra: &str) {
    let dir = hosts.join(reg.host());
    std::fs::create_dir_all(&dir).expect("hosts dir");
    let url = format!("https://{}", reg.host());
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"{url}\"\n{extra}\n[host.\"{url}\"]\n\
             capabilities = [\"pull\", \"resolve\"]\n{extra}"
        ),
    )
    .expect("hosts.toml");
}

fn pull_over_tls(kind: Kind) {
    let (reg, image) = registry_with_busybox(RegistryOptions::open().with_tls());
    let ca = reg
        .ca_cert()
        .expect("a test CA")
        .to_string_lossy()
        .into_owned();
    let d = Daemon::start(kind);
    let name = reg.reference(REPO_TAG);
    // ctr 1.6 talks plain HTTP to a loopback host unless a hosts.toml says https.
    let hosts = d.dir().join("certs.d");
    let hosts_dir = hosts.to_string_lossy().into_owned();
    let pull = ["images", "pull", "--hosts-dir", &hosts_dir, &name];

    // The test CA is in no system store.
    hosts_toml(&hosts, &reg, "");
    d.ctr(pull).assert_failure_contains("certificate");

    hosts_toml(&hosts, &reg, &format!("ca = \"{ca}\"\n"));
    d.ctr_ok(pull);
    let row = image_row(&d, &name);
    assert!(row.contains(&image.manifest_digest), "{row:?}");

    d.ctr_ok(["images", "rm", "--sync", &name]);
    hosts_toml(&hosts, &reg, "skip_verify = true\n");
    d.ctr_ok(pull);
    let row = image_row(&d, &name);
    assert!(row.contains(&image.manifest_digest), "{row:?}");
}
calibrated!(pull_over_tls);
