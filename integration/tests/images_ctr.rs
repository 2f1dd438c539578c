//! `ctr images import` acceptance on the offline test images of `berth_integration::images`:
//! the busybox image as OCI and Docker archive into `native` and `overlayfs`, `images ls` and
//! `images check`; the multilayer image next to the busybox image it shares two layers with,
//! removed without and with `--sync`; and an image whose layer hard-links a file only an
//! earlier layer has. Calibrated: every body runs against Debian's containerd too.

use std::collections::BTreeSet;

use berth_integration::images::{self, LayerCompression, TestImage};
use berth_integration::{Daemon, Kind, calibrated};

/// The multilayer image's size: a few hundred MiB keeps the calibrated pair near a minute.
const MULTILAYER_MB: u64 = 256;

const BUSYBOX: &str = "docker.io/library/berth-busybox:1";
const MULTILAYER: &str = "docker.io/library/berth-multilayer:1";
const HARDLINK: &str = "docker.io/library/berth-hardlink-lower:1";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// One row of `ctr images ls` (space-padded columns; SIZE holds a space).
#[derive(Debug)]
struct ImageRow {
    name: String,
    media_type: String,
    digest: String,
}

fn image_rows(stdout: &str) -> Vec<ImageRow> {
    stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            (t.len() >= 3).then(|| ImageRow {
                name: t[0].to_owned(),
                media_type: t[1].to_owned(),
                digest: t[2].to_owned(),
            })
        })
        .collect()
}

/// One row of `ctr images check`: the status (`complete (4/4)`) and the UNPACKED column.
#[derive(Debug)]
struct CheckRow {
    name: String,
    digest: String,
    status: String,
    unpacked: bool,
}

fn check_rows(stdout: &str) -> Vec<CheckRow> {
    stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            if t.len() < 6 {
                return None;
            }
            Some(CheckRow {
                name: t[0].to_owned(),
                digest: t[2].to_owned(),
                status: format!("{} {}", t[3], t[4]),
                unpacked: t[t.len() - 1] == "true",
            })
        })
        .collect()
}

/// `ctr snapshots ls` as (key, parent) pairs.
fn snapshot_rows(d: &Daemon, ns: &str, snapshotter: &str) -> Vec<(String, String)> {
    let out = d.ctr_ok(["-n", ns, "snapshots", "--snapshotter", snapshotter, "ls"]);
    out.stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            match t.as_slice() {
                [key, parent, _kind] => Some((key.to_string(), parent.to_string())),
                [key, _kind] => Some((key.to_string(), String::new())),
                _ => None,
            }
        })
        .collect()
}

fn content_digests(d: &Daemon, ns: &str) -> BTreeSet<String> {
    d.ctr_ok(["-n", ns, "content", "ls", "-q"])
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn blobs_of(image: &TestImage) -> BTreeSet<String> {
    let mut set: BTreeSet<String> = image.layer_digests.iter().cloned().collect();
    set.insert(image.manifest_digest.clone());
    set.insert(image.config_digest.clone());
    set
}

/// Waits for one garbage collection: the import's leases are gone, but a non-sync removal
/// only schedules a collection (ctr 1.6 views carry no gc.root label either).
fn settle(d: &Daemon, ns: &str) {
    d.ctr_ok(["-n", ns, "leases", "create", "--id", "settle"]);
    d.ctr_ok(["-n", ns, "leases", "rm", "--sync", "settle"]);
}

/// Checks the imported image in `ns`: listed with the expected type (and digest, for OCI
/// archives), complete and unpacked into `snapshotter`, its chain in the snapshotter.
fn assert_imported(
    d: &Daemon,
    ns: &str,
    image: &TestImage,
    snapshotter: &str,
    docker: bool,
) -> String {
    let ls = d.ctr_ok(["-n", ns, "images", "ls"]);
    let rows = image_rows(&ls.stdout);
    let row = rows
        .iter()
        .find(|r| r.name == image.name)
        .unwrap_or_else(|| panic!("{} not listed by {}: {ls}", image.name, d.kind()));
    if docker {
        // containerd makes a Docker schema 2 manifest for a Docker archive: its digest is
        // its own (the differential test compares it between the daemons); the config and
        // the layers' diff ids are the image's.
        assert_eq!(row.media_type, DOCKER_MANIFEST, "{ls}");
        let manifest = d.ctr_ok(["-n", ns, "content", "get", &row.digest]);
        assert!(
            manifest.stdout.contains(&image.config_digest),
            "the Docker manifest {} names config {}: {manifest}",
            row.digest,
            image.config_digest
        );
    } else {
        assert_eq!(row.media_type, OCI_MANIFEST, "{ls}");
        assert_eq!(row.digest, image.manifest_digest, "{ls}");
    }
    let check = d.ctr_ok(["-n", ns, "images", "check", "--snapshotter", snapshotter]);
    let rows = check_rows(&check.stdout);
    let row_check = rows
        .iter()
        .find(|r| r.name == image.name)
        .unwrap_or_else(|| panic!("{} not checked: {check}", image.name));
    // ctr counts what the manifest names: the config and every layer.
    let blobs = image.diff_ids.len() + 1;
    assert_eq!(
        row_check.status,
        format!("complete ({blobs}/{blobs})"),
        "{check}"
    );
    assert_eq!(row_check.digest, row.digest, "{check}");
    assert!(
        row_check.unpacked,
        "not unpacked into {snapshotter}: {check}"
    );
    let snaps = snapshot_rows(d, ns, snapshotter);
    for (i, chain) in image.chain_ids.iter().enumerate() {
        let parent = if i == 0 {
            String::new()
        } else {
            image.chain_ids[i - 1].clone()
        };
        assert!(
            snaps.contains(&(chain.clone(), parent.clone())),
            "layer {i}: snapshot {chain} (parent {parent:?}) missing in {snaps:?}"
        );
    }
    row.digest.clone()
}

fn busybox_imports_into_native_and_overlayfs(kind: Kind) {
    let image = images::busybox(BUSYBOX, LayerCompression::Gzip).expect("busybox image");
    let d = Daemon::start(kind);
    let mut docker_digests = Vec::new();
    for (archive, docker) in [(&image.oci_archive, false), (&image.docker_archive, true)] {
        for snapshotter in ["native", "overlayfs"] {
            // A namespace per case: nothing of one import is shared with the next.
            let ns = format!("{}-{snapshotter}", if docker { "docker" } else { "oci" });
            let path = archive.to_string_lossy().into_owned();
            let out = d.ctr_ok([
                "-n",
                &ns,
                "images",
                "import",
                "--snapshotter",
                snapshotter,
                &path,
            ]);
            assert!(
                out.stdout.contains(&format!("unpacking {}", image.name))
                    && out.stdout.trim_end().ends_with("done"),
                "{out}"
            );
            let digest = assert_imported(&d, &ns, &image, snapshotter, docker);
            if docker {
                docker_digests.push(digest);
            }
            // Only this snapshotter was unpacked into.
            let other = if snapshotter == "native" {
                "overlayfs"
            } else {
                "native"
            };
            assert!(snapshot_rows(&d, &ns, other).is_empty(), "{other} used");
        }
    }
    assert_eq!(
        docker_digests[0], docker_digests[1],
        "the manifest made for the Docker archive is the same every time"
    );
}
calibrated!(busybox_imports_into_native_and_overlayfs);

fn multilayer_rm_keeps_shared_layers(kind: Kind) {
    let busybox = images::busybox(BUSYBOX, LayerCompression::Gzip).expect("busybox image");
    let multi = images::multilayer(MULTILAYER, MULTILAYER_MB, LayerCompression::Gzip)
        .expect("multilayer image");
    // The premise: both images start with the same two layers.
    assert_eq!(busybox.chain_ids[..], multi.chain_ids[..2]);
    assert_eq!(busybox.layer_digests[..], multi.layer_digests[..2]);

    let d = Daemon::start(kind);
    let ns = "default";
    for image in [&busybox, &multi] {
        let path = image.oci_archive.to_string_lossy().into_owned();
        d.ctr_ok(["images", "import", "--snapshotter", "overlayfs", &path]);
        assert_imported(&d, ns, image, "overlayfs", false);
    }
    let everything: BTreeSet<String> = blobs_of(&busybox)
        .union(&blobs_of(&multi))
        .cloned()
        .collect();
    assert_eq!(content_digests(&d, ns), everything);

    // Removing a second name (non-sync) frees nothing: the first still holds the same target.
    let alias = "docker.io/library/berth-multilayer:alias";
    d.ctr_ok(["images", "tag", MULTILAYER, alias]);
    d.ctr_ok(["images", "rm", alias]);
    let names = d.ctr_ok(["images", "ls", "-q"]);
    assert!(!names.stdout.contains(alias), "{names}");
    settle(&d, ns);
    assert_eq!(content_digests(&d, ns), everything);
    let snaps: Vec<String> = snapshot_rows(&d, ns, "overlayfs")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for chain in &multi.chain_ids {
        assert!(snaps.contains(chain), "{chain} kept: {snaps:?}");
    }

    // rm --sync collects before it returns: what only the multilayer image used is gone, the
    // shared base layers and everything of the busybox image stay.
    d.ctr_ok(["images", "rm", "--sync", MULTILAYER]);
    assert_eq!(content_digests(&d, ns), blobs_of(&busybox));
    let snaps: Vec<String> = snapshot_rows(&d, ns, "overlayfs")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(snaps.len(), busybox.chain_ids.len(), "{snaps:?}");
    for chain in &busybox.chain_ids {
        assert!(snaps.contains(chain), "shared {chain} kept: {snaps:?}");
    }
    let check = d.ctr_ok(["images", "check", "--snapshotter", "overlayfs"]);
    let rows = check_rows(&check.stdout);
    assert_eq!(rows.len(), 1, "{check}");
    assert_eq!(rows[0].status, "complete (3/3)", "{check}");
    assert!(rows[0].unpacked, "{check}");

    // A non-sync removal of the last image: everything goes at the next collection.
    d.ctr_ok(["images", "rm", BUSYBOX]);
    settle(&d, ns);
    assert!(content_digests(&d, ns).is_empty());
    assert!(snapshot_rows(&d, ns, "overlayfs").is_empty());
}
calibrated!(multilayer_rm_keeps_shared_layers);

fn hardlink_to_a_lower_layer_file(kind: Kind) {
    let image = images::hardlink_to_lower(HARDLINK, LayerCompression::Gzip).expect("image");
    let d = Daemon::start(kind);
    let path = image.oci_archive.to_string_lossy().into_owned();
    // containerd 1.6 applies a layer straight into the overlay upper directory, where the
    // link's target (only in a lower directory) is missing: the unpack fails on that layer.
    let out = d.ctr([
        "-n",
        "ovl",
        "images",
        "import",
        "--snapshotter",
        "overlayfs",
        &path,
    ]);
    assert!(!out.success(), "{out}");
    let top = image.chain_ids.last().expect("layers");
    let snaps = snapshot_rows(&d, "ovl", "overlayfs");
    assert!(
        snaps.iter().all(|(k, _)| k != top),
        "no snapshot of the failed layer: {snaps:?}"
    );
    // The layers below were committed under the unpack's lease only (the image's config
    // names a snapshot after a whole unpack): the next collection takes them.
    settle(&d, "ovl");
    assert!(snapshot_rows(&d, "ovl", "overlayfs").is_empty());
    let check = d.ctr_ok(["-n", "ovl", "images", "check", "--snapshotter", "overlayfs"]);
    let rows = check_rows(&check.stdout);
    assert!(
        rows.len() == 1 && rows[0].status == "complete (4/4)" && !rows[0].unpacked,
        "imported, not unpacked: {check}"
    );
    // On a full copy of the lower layers (native) the target is there.
    d.ctr_ok([
        "-n",
        "nat",
        "images",
        "import",
        "--snapshotter",
        "native",
        &path,
    ]);
    assert_imported(&d, "nat", &image, "native", false);
}
calibrated!(hardlink_to_a_lower_layer_file);
