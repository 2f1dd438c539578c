//! `ctr snapshots` end to end, once per snapshotter (`native`, `overlayfs`): prepare with and
//! without a parent, view, mounts (the printed command mounted with `sh`, a file written into
//! an active snapshot), commit, ls, info, tree, usage, label, rm, and the error cases (an
//! existing key, commit of a view, a missing parent, rm of a snapshot with children).
//! Calibrated: the same body runs against Debian's containerd 1.6.
//!
//! Output formats are ctr 1.6's (`cmd/ctr/commands/snapshots/snapshots.go`): `ls` and `usage`
//! are space-padded tables, `info` is the snapshot's Info as indented JSON, `tree` prints each
//! root and then its children, two spaces and `\_` per level, in the order the snapshotter
//! walks them (sorted by key on both daemons).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_integration::{CmdOutput, Daemon, Kind, Options, calibrated};
use serde_json::Value;

const GC_ROOT: &str = "containerd.io/gc.root";

/// Runs `ctr snapshots --snapshotter SN ARGS`.
fn snap(d: &Daemon, sn: &str, args: &[&str]) -> CmdOutput {
    let mut argv = vec!["snapshots", "--snapshotter", sn];
    argv.extend_from_slice(args);
    d.ctr(argv)
}

#[track_caller]
fn snap_ok(d: &Daemon, sn: &str, args: &[&str]) -> CmdOutput {
    let mut argv = vec!["snapshots", "--snapshotter", sn];
    argv.extend_from_slice(args);
    d.ctr_ok(argv)
}

/// A failed ctr: exit status 1 and `needle` (case-insensitive) in its one error line.
#[track_caller]
fn assert_fails_with(out: &CmdOutput, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "ctr exits 1: {out}");
    out.assert_failure_contains(needle);
}

/// The rows of a space-padded ctr table, cut at the header's column starts (a cell may be
/// empty, as PARENT of a snapshot without one, so splitting on spaces would shift columns).
fn table(stdout: &str, header: &[&str]) -> Vec<Vec<String>> {
    let mut lines = stdout.lines();
    let head = lines.next().unwrap_or_default();
    let words: Vec<&str> = head.split_whitespace().collect();
    assert_eq!(words, header, "table header: {stdout}");
    let starts: Vec<usize> = {
        let mut at = 0;
        header
            .iter()
            .map(|h| {
                let i = head[at..]
                    .find(h)
                    .map(|i| i + at)
                    .expect("column in header");
                at = i + h.len();
                i
            })
            .collect()
    };
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            starts
                .iter()
                .enumerate()
                .map(|(n, &s)| {
                    let end = starts.get(n + 1).copied().unwrap_or(l.len()).min(l.len());
                    l.get(s.min(l.len())..end)
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                })
                .collect()
        })
        .collect()
}

/// `ctr snapshots ls` as (key, parent, kind) rows, in the order printed.
fn ls(d: &Daemon, sn: &str) -> Vec<(String, String, String)> {
    let out = snap_ok(d, sn, &["ls"]);
    table(&out.stdout, &["KEY", "PARENT", "KIND"])
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone(), r[2].clone()))
        .collect()
}

fn row(key: &str, parent: &str, kind: &str) -> (String, String, String) {
    (key.to_owned(), parent.to_owned(), kind.to_owned())
}

/// `ctr snapshots info KEY` parsed.
fn info(d: &Daemon, sn: &str, key: &str) -> Value {
    let out = snap_ok(d, sn, &["info", key]);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("info {key} is JSON ({e}): {out}"))
}

fn labels_of(info: &Value) -> BTreeMap<String, String> {
    info["Labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// An RFC 3339 time as ctr prints it (`2026-11-28T15:06:39.7835Z`, trailing zeros of the
/// fraction dropped) as a sortable (seconds part, nanoseconds) pair.
fn time_key(v: &Value) -> (String, u32) {
    let s = v.as_str().unwrap_or_else(|| panic!("a time string: {v}"));
    let s = s
        .strip_suffix('Z')
        .unwrap_or_else(|| panic!("UTC time: {s}"));
    let (secs, frac) = s.split_once('.').unwrap_or((s, "0"));
    assert_eq!(secs.len(), 19, "YYYY-MM-DDTHH:MM:SS: {s}");
    let nanos = format!("{frac:0<9}").parse().expect("fraction digits");
    (secs.to_owned(), nanos)
}

/// The labels ctr prints after `snapshots label` (`k=v,k=v` in Go map order), sorted.
fn label_line(out: &CmdOutput) -> Vec<String> {
    berth_integration::label_cell(out.stdout.trim())
}

/// `ctr snapshots usage [-b] [KEYS]` as key -> (size cell, inodes).
fn usage(d: &Daemon, sn: &str, args: &[&str]) -> BTreeMap<String, (String, u64)> {
    let mut argv = vec!["usage"];
    argv.extend_from_slice(args);
    let out = snap_ok(d, sn, &argv);
    table(&out.stdout, &["KEY", "SIZE", "INODES"])
        .into_iter()
        .map(|r| {
            let inodes = r[2]
                .parse()
                .unwrap_or_else(|_| panic!("inode count in {r:?}"));
            (r[0].clone(), (r[1].clone(), inodes))
        })
        .collect()
}

/// A snapshot mounted at a directory of the daemon's own by running the commands
/// `ctr snapshots mounts` prints; unmounted on drop.
struct Mounted {
    target: PathBuf,
}

impl Mounted {
    fn new(d: &Daemon, sn: &str, key: &str) -> Mounted {
        let target = d.dir().join(format!("mnt-{key}"));
        fs::create_dir_all(&target).expect("mount point");
        let out = snap_ok(d, sn, &["mounts", &target.to_string_lossy(), key]);
        assert!(
            out.stdout.starts_with("mount -t "),
            "mounts prints mount commands: {out}"
        );
        let status = Command::new("sh")
            .arg("-c")
            .arg(out.stdout.trim())
            .status()
            .expect("running sh");
        assert!(status.success(), "mounting {key} failed: {out}");
        Mounted { target }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.target.join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(&self.target).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("umount {} failed", self.target.display());
        }
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn snapshots_cli(kind: Kind, sn: &str) {
    // No collection at start-up: ctr gives views no gc.root label, so the collector the
    // daemons run 100 ms after start would remove a view made before it.
    let d = Daemon::start_with(kind, Options::no_startup_gc());
    assert!(ls(&d, sn).is_empty(), "a new daemon has no snapshots");

    // Prepare without a parent prints nothing; its mount is writable.
    let out = snap_ok(&d, sn, &["prepare", "base"]);
    assert_eq!(out.stdout, "", "{out}");
    assert_eq!(ls(&d, sn), [row("base", "", "Active")]);
    {
        let m = Mounted::new(&d, sn, "base");
        fs::write(m.path("hello"), "hello\n").expect("write into the active snapshot");
        fs::create_dir(m.path("dir")).expect("mkdir");
        fs::write(m.path("dir/data"), vec![b'x'; 1000]).expect("write");
    }
    // Base holds its root, hello, dir and dir/data.
    let base_bytes = 6 + 1000;
    let base_inodes = 4;

    snap_ok(&d, sn, &["commit", "base-c", "base"]);
    assert_eq!(
        ls(&d, sn),
        [row("base-c", "", "Committed")],
        "commit replaces the active key"
    );

    // Prepare with a parent: the parent's files show through, new ones go into the child.
    snap_ok(&d, sn, &["prepare", "child", "base-c"]);
    {
        let m = Mounted::new(&d, sn, "child");
        assert_eq!(read(&m.path("hello")), "hello\n", "the parent's file");
        fs::write(m.path("child-file"), "from child").expect("write into the child");
    }
    snap_ok(&d, sn, &["commit", "child-c", "child"]);
    snap_ok(&d, sn, &["prepare", "grand", "child-c"]);
    snap_ok(&d, sn, &["prepare", "other"]);

    // ctr labels what it prepares and commits `containerd.io/gc.root`, but not its views, and
    // both daemons collect an unreferenced view once a deletion (a commit's, an rm's)
    // triggers a collection. So: wait for any pending collection (a synchronous lease
    // delete returns after one), make the views, check they carry no label, then label them
    // as roots before the next deletion.
    d.ctr_ok(["leases", "create", "--id", "settle"]);
    d.ctr_ok(["leases", "rm", "--sync", "settle"]);
    snap_ok(&d, sn, &["view", "v1", "base-c"]);
    snap_ok(&d, sn, &["view", "v2", "child-c"]);
    for view in ["v1", "v2"] {
        let v = info(&d, sn, view);
        assert_eq!(v["Kind"], "View", "{v}");
        assert!(labels_of(&v).is_empty(), "ctr views carry no labels: {v}");
        snap_ok(&d, sn, &["label", view, &format!("{GC_ROOT}=view")]);
    }

    // A view shows its parent's tree and refuses writes.
    {
        let m = Mounted::new(&d, sn, "v2");
        assert_eq!(read(&m.path("hello")), "hello\n");
        assert_eq!(read(&m.path("child-file")), "from child");
        assert_eq!(read(&m.path("dir/data")).len(), 1000);
        let err = fs::write(m.path("new"), "x").expect_err("a view is read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    }

    // ls: every snapshot, sorted by key, with its parent and kind.
    assert_eq!(
        ls(&d, sn),
        [
            row("base-c", "", "Committed"),
            row("child-c", "base-c", "Committed"),
            row("grand", "child-c", "Active"),
            row("other", "", "Active"),
            row("v1", "base-c", "View"),
            row("v2", "child-c", "View"),
        ]
    );

    // tree: roots in walk order, children indented below their parent.
    let tree = snap_ok(&d, sn, &["tree"]);
    assert_eq!(
        tree.stdout, " base-c\n  \\_ child-c\n    \\_ grand\n    \\_ v2\n  \\_ v1\n other\n",
        "{tree}"
    );

    // info: Kind, Name, Parent (absent for a root), Labels (ctr's prepare and commit add a
    // gc.root label, view none), Created and Updated.
    let grand = info(&d, sn, "grand");
    assert_eq!(grand["Kind"], "Active", "{grand}");
    assert_eq!(grand["Name"], "grand", "{grand}");
    assert_eq!(grand["Parent"], "child-c", "{grand}");
    assert_eq!(
        labels_of(&grand).keys().collect::<Vec<_>>(),
        [GC_ROOT],
        "{grand}"
    );
    assert_eq!(time_key(&grand["Created"]), time_key(&grand["Updated"]));
    let base = info(&d, sn, "base-c");
    assert_eq!(base["Kind"], "Committed", "{base}");
    assert_eq!(base["Name"], "base-c", "{base}");
    assert!(base.get("Parent").is_none(), "a root has no Parent: {base}");
    assert!(labels_of(&base).contains_key(GC_ROOT), "{base}");
    let v1 = info(&d, sn, "v1");
    assert_eq!(v1["Kind"], "View", "{v1}");
    assert_eq!(v1["Parent"], "base-c", "{v1}");
    assert_eq!(
        labels_of(&v1).get(GC_ROOT).map(String::as_str),
        Some("view"),
        "{v1}"
    );
    assert!(
        v1["Created"].is_string() && v1["Updated"].is_string(),
        "{v1}"
    );
    let fields: Vec<&String> = grand.as_object().expect("an object").keys().collect();
    assert_eq!(
        fields,
        ["Created", "Kind", "Labels", "Name", "Parent", "Updated"],
        "info fields (serde_json sorts them): {grand}"
    );

    // label: set two, see them in info; an empty value removes one; Updated moves on.
    let gc_root = labels_of(&grand)[GC_ROOT].clone();
    let set = snap_ok(&d, sn, &["label", "grand", "team=a", "tier=b"]);
    assert_eq!(
        label_line(&set),
        [
            format!("{GC_ROOT}={gc_root}"),
            "team=a".to_owned(),
            "tier=b".to_owned()
        ],
        "{set}"
    );
    let labelled = info(&d, sn, "grand");
    assert_eq!(
        labels_of(&labelled).get("team").map(String::as_str),
        Some("a")
    );
    assert_eq!(
        labels_of(&labelled).get("tier").map(String::as_str),
        Some("b")
    );
    assert_eq!(labelled["Created"], grand["Created"]);
    assert!(
        time_key(&labelled["Updated"]) > time_key(&labelled["Created"]),
        "Updated moves on a label change: {labelled}"
    );
    let removed = snap_ok(&d, sn, &["label", "grand", "team="]);
    assert_eq!(
        label_line(&removed),
        [format!("{GC_ROOT}={gc_root}"), "tier=b".to_owned()],
        "{removed}"
    );
    let after = info(&d, sn, "grand");
    assert!(!labels_of(&after).contains_key("team"), "{after}");
    // Without labels, label prints the current ones and changes nothing.
    let shown = snap_ok(&d, sn, &["label", "grand"]);
    assert_eq!(label_line(&shown), label_line(&removed), "{shown}");

    // usage. berth counts the bytes of file contents, containerd allocated blocks (8 KiB for
    // base-c's two files on ext4), so sizes are only compared with the bytes written: both
    // must report at least that. Inode counts are the same on both: every file, directory
    // and the snapshot's root. An overlay snapshot holds only its own changes, a native one a
    // full copy of its parent; a view has no usage of its own.
    let all = usage(&d, sn, &["-b"]);
    let keys: Vec<&String> = all.keys().collect();
    assert_eq!(
        keys,
        ["base-c", "child-c", "grand", "other", "v1", "v2"],
        "usage lists every snapshot: {all:?}"
    );
    let child_bytes = "from child".len() as u64;
    let (child_inodes, child_min, grand_inodes, grand_min) = if sn == "overlayfs" {
        (2, child_bytes, 1, 0)
    } else {
        (
            base_inodes + 1,
            base_bytes + child_bytes,
            base_inodes + 1,
            base_bytes + child_bytes,
        )
    };
    for (key, inodes, min_bytes) in [
        ("base-c", base_inodes, base_bytes),
        ("child-c", child_inodes, child_min),
        ("grand", grand_inodes, grand_min),
        ("other", 1, 0),
        ("v1", 0, 0),
        ("v2", 0, 0),
    ] {
        let (size, got_inodes) = &all[key];
        assert_eq!(*got_inodes, inodes, "{key}: inodes in {all:?}");
        let size: u64 = size
            .parse()
            .unwrap_or_else(|_| panic!("{key}: -b prints bytes: {all:?}"));
        assert!(size >= min_bytes, "{key}: {size} >= {min_bytes} bytes");
        if inodes == 0 {
            assert_eq!(size, 0, "{key}: a view has no usage");
        }
    }
    // Named keys only, and human-readable sizes without -b.
    let named = usage(&d, sn, &["base-c", "v1"]);
    assert_eq!(named.keys().collect::<Vec<_>>(), ["base-c", "v1"]);
    assert_eq!(named["v1"], ("0.0 B".to_owned(), 0));
    assert_eq!(named["base-c"].1, base_inodes);
    assert!(
        named["base-c"].0.ends_with('B') && named["base-c"].0 != "0.0 B",
        "{named:?}"
    );

    // Errors.
    for key in ["base-c", "grand"] {
        let out = snap(&d, sn, &["prepare", key, "base-c"]);
        assert_fails_with(&out, &format!("snapshot \"{key}\": already exists"));
    }
    let out = snap(&d, sn, &["view", "v1", "base-c"]);
    assert_fails_with(&out, "snapshot \"v1\": already exists");
    let out = snap(&d, sn, &["commit", "v1-c", "v1"]);
    // containerd's native snapshotter trips over the missing directory of a view (Unknown:
    // "lstat .../snapshots/N: no such file or directory"); its overlayfs and berth say
    // FailedPrecondition. Either way nothing is committed and the view stays.
    if sn == "overlayfs" || kind == Kind::Berthd {
        assert_fails_with(&out, "failed precondition");
    } else {
        assert_eq!(out.status.code(), Some(1), "commit of a view fails: {out}");
    }
    for (verb, key) in [("view", "vx"), ("prepare", "px")] {
        let out = snap(&d, sn, &[verb, key, "missing"]);
        assert_fails_with(&out, "not found");
        out.assert_failure_contains("missing");
    }
    let out = snap(&d, sn, &["rm", "base-c"]);
    assert_fails_with(&out, "failed precondition");
    out.assert_failure_contains("failed to remove \"base-c\"");
    let out = snap(&d, sn, &["rm", "nosuch"]);
    assert_fails_with(&out, "not found");
    let out = snap(&d, sn, &["info", "nosuch"]);
    assert_fails_with(&out, "not found");
    assert_eq!(
        ls(&d, sn).len(),
        6,
        "the failed calls changed nothing: {:?}",
        ls(&d, sn)
    );
    assert_eq!(info(&d, sn, "v1")["Kind"], "View");

    // rm, leaves first (several keys in one call); a parent goes once its children are gone.
    snap_ok(&d, sn, &["rm", "v2", "grand", "v1", "other"]);
    assert_eq!(
        ls(&d, sn),
        [
            row("base-c", "", "Committed"),
            row("child-c", "base-c", "Committed")
        ]
    );
    snap_ok(&d, sn, &["rm", "child-c"]);
    snap_ok(&d, sn, &["rm", "base-c"]);
    assert!(ls(&d, sn).is_empty());
    assert_eq!(snap_ok(&d, sn, &["tree"]).stdout, "");
}

fn snapshots_cli_native(kind: Kind) {
    snapshots_cli(kind, "native");
}
calibrated!(snapshots_cli_native);

fn snapshots_cli_overlayfs(kind: Kind) {
    snapshots_cli(kind, "overlayfs");
}
calibrated!(snapshots_cli_overlayfs);
