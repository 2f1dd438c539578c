//! Hostile layers through the daemon: archives whose layers try to write outside the snapshot
//! (`..` names, absolute names, paths through symlinks within a layer and across layers, hard
//! links out of the root, escaping whiteouts) and a decompression bomb, each imported into
//! berthd with `ctr images import` and with `berth images import` (the transfer service),
//! unpacking into overlayfs and into native.
//!
//! For every variant berthd must refuse the layer with an error naming the entry (or the
//! bound), and must not write anything outside the snapshot: the escapes are aimed at a
//! `sentinel/` directory of the test's own (next to the daemon's root, the `..` count
//! computed from where each snapshotter applies a layer), at `/`, `/etc` and `/tmp`; no file
//! named `evil` may exist anywhere under the daemon's directory once the garbage is
//! collected, the sentinel files keep their contents and link counts, and a snapshot made
//! before the imports keeps its file. After a synchronous collection no snapshot and no blob
//! of the import remain.
//!
//! ctr 1.6 imports on the client side: it creates the image record, then unpacks, so a failed
//! unpack leaves the record on either daemon (containerd the same); the test removes it with
//! `ctr images rm` before collecting. The transfer service imports and unpacks in the daemon
//! and must leave no image at all.
//!
//! Refusing is berth's policy; containerd 1.6 sanitizes most of these layers instead (it
//! resolves every name and symlink inside the root), so the "import fails" half is
//! berth-only. Where it is informative the same archives also go into containerd, to record
//! the property both must hold: nothing outside the root.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_integration::archive::{Compression, Entry, OciArchive};
use berth_integration::{CmdOutput, Daemon, Kind, Options, berth_binary, run_command, tab_rows};

const SNAPSHOTTERS: [&str; 2] = ["native", "overlayfs"];

/// The file name every escaping entry writes.
const EVIL: &str = "evil";

/// Host paths an unsanitized escape would write (a name climbing past `/` stays at `/`).
const HOST_PATHS: [&str; 3] = ["/evil", "/etc/evil", "/tmp/evil"];

/// Where a daemon applies a layer, for aiming escapes at the sentinel directory.
#[derive(Debug, Clone)]
struct Spot {
    /// `../` repeated from the directory a layer is applied into up to the daemon's own
    /// directory (which holds `root/` and `sentinel/`).
    up: String,
    /// The sentinel directory's absolute path.
    sentinel: PathBuf,
}

impl Spot {
    fn new(d: &Daemon, sn: &str) -> Spot {
        // berthd applies straight into the snapshot's directory:
        // `root/io.containerd.snapshotter.v1.overlayfs/snapshots/<id>/fs` or
        // `root/io.containerd.snapshotter.v1.native/snapshots/<id>`. containerd 1.6 applies
        // through a temporary mount, `root/tmpmounts/containerd-mount<n>`.
        let depth = match (d.kind(), sn) {
            (Kind::Berthd, "overlayfs") => 5,
            (Kind::Berthd, _) => 4,
            (Kind::Containerd, _) => 3,
        };
        Spot {
            up: "../".repeat(depth),
            sentinel: d.dir().join("sentinel"),
        }
    }

    /// `rel` inside the sentinel directory, as a name climbing to it from the apply root.
    fn climb(&self, rel: &str) -> String {
        format!("{}sentinel/{rel}", self.up)
    }

    /// `rel` inside the sentinel directory, as an absolute path.
    fn abs(&self, rel: &str) -> String {
        self.sentinel.join(rel).to_string_lossy().into_owned()
    }
}

/// One hostile archive: its layers (bottom first) and the entry berthd's error must name.
struct Variant {
    layers: Vec<Vec<Entry>>,
    entry: String,
}

fn variant(layers: Vec<Vec<Entry>>, entry: &str) -> Variant {
    Variant {
        layers,
        entry: entry.to_owned(),
    }
}

/// A harmless file, so a refused layer is not refused for being empty.
fn ok() -> Entry {
    Entry::file("ok", "ok\n")
}

/// What the escapes could damage, planted before the imports and checked after.
struct Sentinels {
    dir: PathBuf,
    /// Host paths of [`HOST_PATHS`] that already existed (left out of the check).
    host_before: BTreeSet<String>,
    passwd_links: u64,
}

const KEEP: &str = "keep me\n";
const TARGET: &str = "hard link target\n";

impl Sentinels {
    fn plant(d: &Daemon) -> Sentinels {
        let dir = d.dir().join("sentinel");
        fs::create_dir_all(&dir).expect("sentinel dir");
        fs::write(dir.join("keep"), KEEP).expect("sentinel keep");
        fs::write(dir.join("target"), TARGET).expect("sentinel target");
        Sentinels {
            dir,
            host_before: HOST_PATHS
                .iter()
                .filter(|p| Path::new(p).symlink_metadata().is_ok())
                .map(|p| p.to_string())
                .collect(),
            passwd_links: nlink(Path::new("/etc/passwd")),
        }
    }

    #[track_caller]
    fn check(&self, d: &Daemon, what: &str) {
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .expect("sentinel dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["keep", "target"], "{what}: sentinel/ changed");
        let keep = self.dir.join("keep");
        assert!(
            keep.symlink_metadata().expect("keep").file_type().is_file(),
            "{what}: sentinel/keep is no longer a file"
        );
        assert_eq!(fs::read_to_string(&keep).expect("keep"), KEEP, "{what}");
        assert_eq!(
            fs::read_to_string(self.dir.join("target")).expect("target"),
            TARGET,
            "{what}"
        );
        assert_eq!(
            nlink(&self.dir.join("target")),
            1,
            "{what}: a hard link to sentinel/target was made"
        );
        assert_eq!(
            nlink(Path::new("/etc/passwd")),
            self.passwd_links,
            "{what}: a hard link to /etc/passwd was made"
        );
        for p in HOST_PATHS {
            if !self.host_before.contains(p) {
                assert!(
                    Path::new(p).symlink_metadata().is_err(),
                    "{what}: {p} was written"
                );
            }
        }
        let found = find_named(d.dir(), EVIL);
        assert!(
            found.is_empty(),
            "{what}: files named {EVIL:?} outside any snapshot: {found:?}"
        );
    }
}

fn nlink(p: &Path) -> u64 {
    p.symlink_metadata()
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .nlink()
}

/// Every path below `dir` whose file name is `name` (symlinks not followed).
fn find_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_name() == name {
                found.push(p.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p);
            }
        }
    }
    found
}

/// A snapshot with a file, made before the imports in its own namespace: an escaping
/// whiteout or a removal of the snapshots directory would take it.
fn make_keeper(d: &Daemon, sn: &str) {
    ctr_snap(d, sn, &["prepare", "keeper"]);
    with_mount(d, sn, "keeper", |root| {
        fs::write(root.join("kept"), KEEP).expect("write into the keeper")
    });
}

#[track_caller]
fn check_keeper(d: &Daemon, sn: &str, what: &str) {
    let kept = with_mount(d, sn, "keeper", |root| {
        fs::read_to_string(root.join("kept"))
    });
    assert_eq!(
        kept.unwrap_or_else(|e| panic!("{what}: the keeper snapshot of {sn} lost its file: {e}")),
        KEEP
    );
}

fn ctr_snap(d: &Daemon, sn: &str, args: &[&str]) -> CmdOutput {
    let mut argv = vec!["-n", "keep", "snapshots", "--snapshotter", sn];
    argv.extend_from_slice(args);
    d.ctr_ok(argv)
}

/// Mounts the active snapshot `key` of the `keep` namespace with the commands
/// `ctr snapshots mounts` prints, runs `f` on it and unmounts.
fn with_mount<T>(d: &Daemon, sn: &str, key: &str, f: impl FnOnce(&Path) -> T) -> T {
    let target = d.dir().join(format!("mnt-{sn}"));
    fs::create_dir_all(&target).expect("mount point");
    let out = ctr_snap(d, sn, &["mounts", &target.to_string_lossy(), key]);
    let status = Command::new("sh")
        .arg("-c")
        .arg(out.stdout.trim())
        .status()
        .expect("sh");
    assert!(status.success(), "mounting {key}: {out}");
    let result = f(&target);
    let status = Command::new("umount")
        .arg(&target)
        .status()
        .expect("umount");
    assert!(status.success(), "umount {}", target.display());
    result
}

fn lines(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn images(d: &Daemon, ns: &str) -> Vec<String> {
    lines(&d.ctr_ok(["-n", ns, "images", "ls", "-q"]).stdout)
}

/// One synchronous collection (a lease deleted with `--sync` returns after it).
fn collect_garbage(d: &Daemon) {
    d.ctr_ok(["leases", "create", "--id", "hostile-gc"]);
    d.ctr_ok(["leases", "rm", "--sync", "hostile-gc"]);
}

/// Nothing of an import is left in `ns`: no image, no blob, no ingest, no snapshot.
#[track_caller]
fn assert_nothing_left(d: &Daemon, ns: &str, sn: &str) {
    assert!(images(d, ns).is_empty(), "{ns}: images left");
    let content = d.ctr_ok(["-n", ns, "content", "ls", "-q"]);
    assert!(
        content.stdout.trim().is_empty(),
        "{ns}: blobs left: {content}"
    );
    let active = d.ctr_ok(["-n", ns, "content", "active"]);
    assert!(
        tab_rows(&active.stdout).is_empty(),
        "{ns}: ingests left: {active}"
    );
    let snaps = d.ctr_ok(["-n", ns, "snapshots", "--snapshotter", sn, "ls"]);
    assert_eq!(
        lines(&snaps.stdout).len(),
        1,
        "{ns}: snapshots left in {sn}: {snaps}"
    );
}

/// Writes the archive of variant `n` of `case` for snapshotter `sn` into the daemon's
/// directory; returns the image name and the path.
fn build_variant(
    d: &Daemon,
    case: &str,
    sn: &str,
    n: usize,
    layers: Vec<Vec<Entry>>,
) -> (String, PathBuf) {
    let name = format!("docker.io/library/hostile-{case}:{n}");
    let path = d.dir().join(format!("{case}-{sn}-{n}.tar"));
    let mut archive = OciArchive::new();
    for layer in layers {
        archive = archive.layer(layer, Compression::Gzip);
    }
    archive.build(&path, &name).expect("building the archive");
    (name, path)
}

/// `ctr -n NS images import --snapshotter SN FILE` (which unpacks).
fn ctr_import(d: &Daemon, ns: &str, sn: &str, archive: &Path) -> CmdOutput {
    d.ctr([
        "-n",
        ns,
        "images",
        "import",
        "--snapshotter",
        sn,
        &archive.to_string_lossy(),
    ])
}

/// `berth --namespace NS images import --snapshotter SN FILE`.
fn berth_import(d: &Daemon, ns: &str, sn: &str, archive: &Path) -> CmdOutput {
    let mut cmd = Command::new(berth_binary().expect("the berth binary"));
    cmd.arg("--address")
        .arg(d.socket())
        .args(["--namespace", ns, "images", "import", "--progress", "none"])
        .args(["--snapshotter", sn])
        .arg(archive)
        .env_remove("BERTH_ADDRESS")
        .env_remove("BERTH_NAMESPACE")
        .env_remove("BERTH_SNAPSHOTTER");
    run_command(&mut cmd, Duration::from_secs(120)).expect("running berth")
}

/// berthd refuses every variant through both import paths and both snapshotters, names the
/// entry, writes nothing outside the snapshot and leaves nothing once collected.
fn refused_by_berthd(case: &str, make: fn(&Spot) -> Vec<Variant>) {
    let d = Daemon::start(Kind::Berthd);
    let sentinels = Sentinels::plant(&d);
    for sn in SNAPSHOTTERS {
        make_keeper(&d, sn);
    }
    for sn in SNAPSHOTTERS {
        let spot = Spot::new(&d, sn);
        for (n, v) in make(&spot).into_iter().enumerate() {
            let what = format!("{case} #{n} ({}) into {sn}", v.entry);
            let (name, path) = build_variant(&d, case, sn, n, v.layers);
            let named = format!("layer entry {:?}", v.entry);

            let ns_ctr = format!("ctr-{sn}-{n}");
            let out = ctr_import(&d, &ns_ctr, sn, &path);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{what}: ctr import fails: {out}"
            );
            assert!(out.stderr.contains(&named), "{what}: names {named}: {out}");
            // ctr 1.6 created the record before it unpacked (see the module comment).
            assert_eq!(images(&d, &ns_ctr), std::slice::from_ref(&name), "{what}");
            d.ctr_ok(["-n", &ns_ctr, "images", "rm", &name]);

            let ns_transfer = format!("transfer-{sn}-{n}");
            let out = berth_import(&d, &ns_transfer, sn, &path);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{what}: berth import fails: {out}"
            );
            assert!(out.stderr.contains(&named), "{what}: names {named}: {out}");
            assert!(
                images(&d, &ns_transfer).is_empty(),
                "{what}: the transfer service left an image"
            );

            collect_garbage(&d);
            assert_nothing_left(&d, &ns_ctr, sn);
            assert_nothing_left(&d, &ns_transfer, sn);
            sentinels.check(&d, &what);
        }
        check_keeper(&d, sn, case);
    }
}

/// The same archives into containerd 1.6, which sanitizes or refuses them: whatever it does,
/// nothing may land outside its root, and its collector leaves nothing once the images go.
fn contained_by_containerd(case: &str, make: fn(&Spot) -> Vec<Variant>) {
    let d = Daemon::start(Kind::Containerd);
    let sentinels = Sentinels::plant(&d);
    for sn in SNAPSHOTTERS {
        make_keeper(&d, sn);
    }
    for sn in SNAPSHOTTERS {
        let spot = Spot::new(&d, sn);
        for (n, v) in make(&spot).into_iter().enumerate() {
            let what = format!("containerd: {case} #{n} ({}) into {sn}", v.entry);
            let (_, path) = build_variant(&d, case, sn, n, v.layers);
            let ns = format!("ctr-{sn}-{n}");
            let out = ctr_import(&d, &ns, sn, &path);
            let outcome = if out.success() {
                "imported (sanitized)".to_owned()
            } else {
                format!(
                    "refused: {}",
                    out.stderr.trim().lines().last().unwrap_or_default()
                )
            };
            eprintln!("{what}: {outcome}");
            for image in images(&d, &ns) {
                d.ctr_ok(["-n", &ns, "images", "rm", &image]);
            }
            collect_garbage(&d);
            assert_nothing_left(&d, &ns, sn);
            sentinels.check(&d, &what);
        }
        check_keeper(&d, sn, case);
    }
}

// (a) Names climbing out of the root with `..`.
fn dotdot(spot: &Spot) -> Vec<Variant> {
    let to_sentinel = spot.climb(EVIL);
    vec![
        variant(vec![vec![ok(), Entry::file("../evil", "x")]], "../evil"),
        variant(
            vec![vec![ok(), Entry::file("../../etc/evil", "x")]],
            "../../etc/evil",
        ),
        variant(
            vec![vec![ok(), Entry::file(&to_sentinel, "x")]],
            &to_sentinel,
        ),
        // Climbing from a directory of the layer.
        variant(
            vec![vec![Entry::dir("a"), Entry::file("a/../../evil", "x")]],
            "a/../../evil",
        ),
    ]
}

#[test]
fn dotdot_names_are_refused() {
    refused_by_berthd("dotdot", dotdot);
}

#[test]
fn dotdot_names_stay_inside_containerd() {
    contained_by_containerd("dotdot", dotdot);
}

// (b) Absolute names. containerd reads them relative to the root; berth refuses them.
fn absolute(spot: &Spot) -> Vec<Variant> {
    let into_sentinel = spot.abs(EVIL);
    vec![
        variant(vec![vec![ok(), Entry::file("/evil", "x")]], "/evil"),
        variant(vec![vec![ok(), Entry::file("/etc/evil", "x")]], "/etc/evil"),
        variant(
            vec![vec![ok(), Entry::file(&into_sentinel, "x")]],
            &into_sentinel,
        ),
    ]
}

#[test]
fn absolute_names_are_refused() {
    refused_by_berthd("absolute", absolute);
}

#[test]
fn absolute_names_stay_inside_containerd() {
    contained_by_containerd("absolute", absolute);
}

// (c) A symlink out of the root, then a file through it, in the same layer.
fn symlink_same_layer(spot: &Spot) -> Vec<Variant> {
    let through = |target: &str| {
        variant(
            vec![vec![
                Entry::symlink("link", target),
                Entry::file("link/evil", "x"),
            ]],
            "link/evil",
        )
    };
    vec![
        through("/"),
        through(&spot.abs("")),
        through(&spot.climb("")),
    ]
}

#[test]
fn paths_through_a_symlink_of_the_same_layer_are_refused() {
    refused_by_berthd("symlink1", symlink_same_layer);
}

#[test]
fn paths_through_a_symlink_of_the_same_layer_stay_inside_containerd() {
    contained_by_containerd("symlink1", symlink_same_layer);
}

// (d) A symlink out of the root in layer 1, a file through it in layer 2.
fn symlink_lower_layer(spot: &Spot) -> Vec<Variant> {
    let through = |target: &str| {
        variant(
            vec![
                vec![ok(), Entry::symlink("link", target)],
                vec![Entry::file("link/evil", "x")],
            ],
            "link/evil",
        )
    };
    vec![through("/"), through(&spot.abs(""))]
}

#[test]
fn paths_through_a_symlink_of_a_lower_layer_are_refused() {
    refused_by_berthd("symlink2", symlink_lower_layer);
}

#[test]
fn paths_through_a_symlink_of_a_lower_layer_stay_inside_containerd() {
    contained_by_containerd("symlink2", symlink_lower_layer);
}

// (e) Hard links to files outside the root: by `..`, through a symlinked directory, by an
// absolute target. An escape would raise the target's link count.
fn hard_links(spot: &Spot) -> Vec<Variant> {
    let to_sentinel = spot.climb("target");
    vec![
        variant(
            vec![vec![ok(), Entry::hard_link("h", "../../etc/passwd")]],
            "h",
        ),
        variant(vec![vec![ok(), Entry::hard_link("h", &to_sentinel)]], "h"),
        variant(
            vec![vec![
                Entry::symlink("etcl", "/etc"),
                Entry::hard_link("h", "etcl/passwd"),
            ]],
            "h",
        ),
        variant(
            vec![vec![
                Entry::symlink("sl", &spot.abs("")),
                Entry::hard_link("h", "sl/target"),
            ]],
            "h",
        ),
        variant(vec![vec![ok(), Entry::hard_link("h", "/etc/passwd")]], "h"),
    ]
}

#[test]
fn hard_links_out_of_the_root_are_refused() {
    refused_by_berthd("hardlink", hard_links);
}

#[test]
fn hard_links_out_of_the_root_stay_inside_containerd() {
    contained_by_containerd("hardlink", hard_links);
}

// (f) Whiteouts that climb out (`../.wh.x`, one aimed at sentinel/keep) or name `..`
// (`.wh...`, which would remove the directory above the one it is in).
fn whiteouts(spot: &Spot) -> Vec<Variant> {
    let keep = spot.climb(".wh.keep");
    vec![
        variant(vec![vec![ok(), Entry::file("../.wh.x", "")]], "../.wh.x"),
        variant(vec![vec![ok(), Entry::file(&keep, "")]], &keep),
        variant(vec![vec![ok(), Entry::whiteout("", "..")]], ".wh..."),
        variant(
            vec![vec![Entry::dir("a"), ok(), Entry::whiteout("a", "..")]],
            "a/.wh...",
        ),
    ]
}

#[test]
fn escaping_whiteouts_are_refused() {
    refused_by_berthd("whiteout", whiteouts);
}

#[test]
fn escaping_whiteouts_stay_inside_containerd() {
    contained_by_containerd("whiteout", whiteouts);
}

// (g) A layer that decompresses beyond the walking differ's configured bound.
const BOUND: u64 = 1 << 20;

/// Berth-only: containerd has no such bound and would unpack the layer.
#[test]
fn a_layer_beyond_the_uncompressed_bound_is_refused() {
    // The section is added to the generated config (which has no walking differ table).
    let opts = Options {
        extra_config: format!(
            "[plugins.\"io.containerd.differ.v1.walking\"]\nmax_uncompressed_bytes = {BOUND}\n"
        ),
        ..Options::default()
    };
    let d = Daemon::start_with(Kind::Berthd, opts);
    // 4 MiB of zeros: about 4 KiB of gzip, four times the bound once inflated.
    let bomb = OciArchive::new().layer(
        vec![ok(), Entry::file("zeros", vec![0u8; 4 * BOUND as usize])],
        Compression::Gzip,
    );
    let small = OciArchive::new().layer(vec![ok()], Compression::Gzip);
    let bound = BOUND.to_string();
    for sn in SNAPSHOTTERS {
        let what = format!("bomb into {sn}");
        let name = "docker.io/library/bomb:1";
        let path = d.dir().join(format!("bomb-{sn}.tar"));
        let built = bomb.build(&path, name).expect("bomb archive");
        let blob = fs::metadata(&path).expect("archive").len();
        assert!(
            blob < BOUND,
            "the archive itself ({blob} bytes) is under the bound"
        );

        let ns_ctr = format!("ctr-{sn}");
        let out = ctr_import(&d, &ns_ctr, sn, &path);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: ctr import fails: {out}"
        );
        assert!(
            out.stderr.contains(&bound),
            "{what}: names the bound: {out}"
        );
        assert!(
            out.stderr.contains(&built.layer_digests[0]),
            "{what}: names the layer: {out}"
        );
        assert_eq!(images(&d, &ns_ctr), [name]);
        d.ctr_ok(["-n", &ns_ctr, "images", "rm", name]);

        let ns_transfer = format!("transfer-{sn}");
        let out = berth_import(&d, &ns_transfer, sn, &path);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: berth import fails: {out}"
        );
        assert!(
            out.stderr.contains(&bound),
            "{what}: names the bound: {out}"
        );
        assert!(images(&d, &ns_transfer).is_empty(), "{what}: no image");

        collect_garbage(&d);
        assert_nothing_left(&d, &ns_ctr, sn);
        assert_nothing_left(&d, &ns_transfer, sn);

        // The bound is what refused it: a small layer goes through the same daemon.
        let ns_small = format!("small-{sn}");
        let path = d.dir().join(format!("small-{sn}.tar"));
        let small = small
            .build(&path, "docker.io/library/small:1")
            .expect("small archive");
        let out = ctr_import(&d, &ns_small, sn, &path);
        assert!(
            out.success(),
            "{sn}: a layer under the bound imports: {out}"
        );
        let snaps = d.ctr_ok(["-n", &ns_small, "snapshots", "--snapshotter", sn, "ls"]);
        assert!(snaps.stdout.contains(small.top_chain_id()), "{snaps}");
    }
}
