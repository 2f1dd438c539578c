//! What an applied layer looks like: entries, metadata, whiteouts, links across layers.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use berth_diff_walking::{ApplyOptions, IgnoredReason, OVERLAY_OPAQUE_XATTR, Whiteouts};
use common::{Fixture, Layer, MTIME, names, set};
use tar::EntryType;

fn mode(path: &std::path::Path) -> u32 {
    fs::symlink_metadata(path)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777
}

fn xattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("getxattr {name} on {path:?}: {e}"),
    }
}

#[test]
fn files_dirs_symlinks_modes_and_times() {
    let fx = Fixture::new();
    let report = fx
        .apply(
            &Layer::new()
                .dir_at("etc", 0o750, 1_500_000_000)
                .file_with(
                    "etc/hosts",
                    b"127.0.0.1 localhost\n",
                    0o640,
                    0,
                    0,
                    1_400_000_000,
                )
                .file_with("usr/bin/tool", b"#!/bin/sh\n", 0o4755, 0, 0, MTIME)
                .file("empty", b"")
                .symlink("passwd", "/etc/passwd")
                .symlink("rel", "usr/bin/tool")
                .dir("./a//b/./c/", 0o700)
                .raw(b"a/../top", EntryType::Regular, b"", b"cleaned")
                .bytes(),
        )
        .expect("apply");
    assert_eq!(report.entries, 8);

    assert_eq!(
        fs::read(fx.path("etc/hosts")).expect("read"),
        b"127.0.0.1 localhost\n"
    );
    assert_eq!(mode(&fx.path("etc/hosts")), 0o640);
    assert_eq!(mode(&fx.path("etc")), 0o750);
    assert_eq!(
        fs::metadata(fx.path("etc/hosts")).expect("stat").mtime(),
        1_400_000_000
    );
    // Set after its contents were created.
    assert_eq!(
        fs::metadata(fx.path("etc")).expect("stat").mtime(),
        1_500_000_000
    );

    // Setuid survives (mode is set after the owner); implicit parents are 0755.
    assert_eq!(mode(&fx.path("usr/bin/tool")), 0o4755);
    assert_eq!(mode(&fx.path("usr")), 0o755);
    assert_eq!(mode(&fx.path("usr/bin")), 0o755);

    assert_eq!(fs::read(fx.path("empty")).expect("read"), b"");
    // Symlink targets are stored verbatim, never resolved.
    assert_eq!(
        fs::read_link(fx.path("passwd")).expect("readlink"),
        std::path::Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::symlink_metadata(fx.path("passwd"))
            .expect("lstat")
            .mtime(),
        MTIME as i64
    );
    assert_eq!(
        fs::read(fx.path("rel")).expect("through rel"),
        b"#!/bin/sh\n"
    );
    assert_eq!(mode(&fx.path("a/b/c")), 0o700);
    assert_eq!(fs::read(fx.path("top")).expect("top"), b"cleaned");
    fx.assert_untouched();
}

#[test]
fn owners_are_set_without_following_symlinks() {
    needs_root!();
    let fx = Fixture::new();
    fx.apply(
        &Layer::new()
            .dir("home", 0o755)
            .file_with("home/f", b"x", 0o2750, 1000, 1001, MTIME)
            .symlink_owned("home/link", "/etc/shadow", 1002, 1003)
            .bytes(),
    )
    .expect("apply");
    let f = fs::metadata(fx.path("home/f")).expect("stat");
    assert_eq!((f.uid(), f.gid()), (1000, 1001));
    assert_eq!(
        f.permissions().mode() & 0o7777,
        0o2750,
        "setgid kept after chown"
    );
    let link = fs::symlink_metadata(fx.path("home/link")).expect("lstat");
    assert_eq!((link.uid(), link.gid()), (1002, 1003));
    let shadow = fs::metadata("/etc/shadow").expect("shadow");
    assert_ne!(shadow.uid(), 1002, "the symlink's target was not chowned");
}

#[test]
fn no_same_owner_keeps_the_applying_user() {
    let fx = Fixture::new();
    fx.apply_with(
        &Layer::new()
            .file_with("f", b"x", 0o644, 4242, 4343, MTIME)
            .bytes(),
        &ApplyOptions {
            no_same_owner: true,
            ..Default::default()
        },
    )
    .expect("apply");
    let f = fs::metadata(fx.path("f")).expect("stat");
    assert_eq!(f.uid(), nix::unistd::geteuid().as_raw());
}

#[test]
fn devices_and_fifos() {
    needs_root!();
    let fx = Fixture::new();
    fx.apply(
        &Layer::new()
            .dir("dev", 0o755)
            .device("dev/null", EntryType::Char, 1, 3, 0o666)
            .device("dev/loop0", EntryType::Block, 7, 0, 0o660)
            .device("dev/big", EntryType::Char, 4095, 1_048_575, 0o600)
            .device("run-fifo", EntryType::Fifo, 0, 0, 0o620)
            .bytes(),
    )
    .expect("apply");
    let null = fs::symlink_metadata(fx.path("dev/null")).expect("stat");
    assert!(null.file_type().is_char_device());
    let rdev = null.rdev();
    assert_eq!(
        (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)),
        (1, 3)
    );
    assert_eq!(null.permissions().mode() & 0o7777, 0o666);
    let lp = fs::symlink_metadata(fx.path("dev/loop0")).expect("stat");
    assert!(lp.file_type().is_block_device());
    assert_eq!(nix::sys::stat::major(lp.rdev()), 7);
    let big = fs::symlink_metadata(fx.path("dev/big")).expect("stat");
    assert_eq!(
        (
            nix::sys::stat::major(big.rdev()),
            nix::sys::stat::minor(big.rdev())
        ),
        (4095, 1_048_575)
    );
    let fifo = fs::symlink_metadata(fx.path("run-fifo")).expect("stat");
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.permissions().mode() & 0o7777, 0o620);
}

#[test]
fn xattrs_from_pax_records() {
    needs_root!();
    let fx = Fixture::new();
    let cap = b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
    let report = fx
        .apply(
            &Layer::new()
                .pax(&[
                    ("SCHILY.xattr.user.note", b"hello"),
                    ("SCHILY.xattr.user.bin", b"\x00\xff"),
                ])
                .dir("d", 0o755)
                .pax(&[
                    ("SCHILY.xattr.user.comment", b"file"),
                    ("SCHILY.xattr.security.capability", cap),
                    ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                ])
                .file("d/ping", b"elf")
                .pax(&[("SCHILY.xattr.user.onlink", b"no")])
                .symlink("d/link", "ping")
                .bytes(),
        )
        .expect("apply");
    assert_eq!(
        xattr(&fx.path("d"), "user.note").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        xattr(&fx.path("d"), "user.bin").as_deref(),
        Some(&b"\x00\xff"[..])
    );
    assert_eq!(
        xattr(&fx.path("d/ping"), "user.comment").as_deref(),
        Some(&b"file"[..])
    );
    assert_eq!(
        xattr(&fx.path("d/ping"), "security.capability").as_deref(),
        Some(&cap[..]),
        "set after chown, which would clear it"
    );
    // A layer never sets trusted.* (it could forge overlay whiteouts), and Linux refuses
    // user.* on symlinks: both skipped and reported, as containerd.
    assert_eq!(xattr(&fx.path("d/ping"), "trusted.overlay.opaque"), None);
    assert_eq!(report.ignored_xattr_count, 2);
    let reasons: Vec<_> = report
        .ignored_xattrs
        .iter()
        .map(|i| (i.entry.as_str(), i.name.as_str(), i.reason))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("d/ping", "trusted.overlay.opaque", IgnoredReason::Trusted),
            ("d/link", "user.onlink", IgnoredReason::NotPermitted),
        ]
    );
}

#[test]
fn pax_times_and_ids_override_the_header() {
    needs_root!();
    let fx = Fixture::new();
    fx.apply(
        &Layer::new()
            .pax(&[
                ("mtime", b"1700000000.123456789"),
                ("uid", b"3000000"),
                ("gid", b"3000001"),
            ])
            .file("f", b"x")
            .pax(&[("mtime", b"-100")])
            .file("old", b"x")
            .bytes(),
    )
    .expect("apply");
    let f = fs::metadata(fx.path("f")).expect("stat");
    assert_eq!((f.mtime(), f.mtime_nsec()), (1_700_000_000, 123_456_789));
    assert_eq!((f.uid(), f.gid()), (3_000_000, 3_000_001));
    assert_eq!(
        fs::metadata(fx.path("old")).expect("stat").mtime(),
        0,
        "times before 1970 become the epoch, as containerd's boundTime"
    );
}

#[test]
fn whiteouts_remove_lower_paths() {
    let fx = Fixture::new();
    fx.apply(
        &Layer::new()
            .dir("a", 0o755)
            .file("a/x", b"x")
            .file("a/y", b"y")
            .dir("b", 0o755)
            .file("b/z", b"z")
            .file("gone", b"g")
            .bytes(),
    )
    .expect("lower");
    fx.apply(
        &Layer::new()
            .file("a/.wh.x", b"")
            .file(".wh.b", b"")
            .file(".wh.gone", b"")
            .file(".wh.never-existed", b"")
            .bytes(),
    )
    .expect("upper");
    assert_eq!(names(&fx.root), set(&["a"]));
    assert_eq!(names(&fx.path("a")), set(&["y"]));
    fx.assert_untouched();
}

fn lower_for_opaque(fx: &Fixture) {
    fx.apply(
        &Layer::new()
            .dir("d", 0o755)
            .file("d/old", b"old")
            .dir("d/sub", 0o755)
            .file("d/sub/old2", b"old")
            .symlink("d/oldlink", "/")
            .file("other", b"stays")
            .bytes(),
    )
    .expect("lower");
}

#[test]
fn opaque_dir_removes_what_this_layer_did_not_add() {
    // The marker before the layer's own entries, and after them.
    for marker_first in [true, false] {
        let fx = Fixture::new();
        lower_for_opaque(&fx);
        let mut layer = Layer::new();
        layer.dir("d", 0o711);
        if marker_first {
            layer.file("d/.wh..wh..opq", b"");
        }
        layer
            .file("d/new", b"new")
            .dir("d/sub", 0o755)
            .file("d/sub/new2", b"new")
            .file("d/deep/implicit", b"new");
        if !marker_first {
            layer.file("d/.wh..wh..opq", b"");
        }
        fx.apply(&layer.bytes()).expect("upper");
        assert_eq!(
            names(&fx.path("d")),
            set(&["deep", "new", "sub"]),
            "marker first: {marker_first}"
        );
        assert_eq!(
            names(&fx.path("d/sub")),
            set(&["new2"]),
            "older contents of a kept dir go"
        );
        assert_eq!(names(&fx.path("d/deep")), set(&["implicit"]));
        assert_eq!(mode(&fx.path("d")), 0o711);
        assert_eq!(fs::read(fx.path("other")).expect("other"), b"stays");
        fx.assert_untouched();
    }
}

#[test]
fn opaque_root_and_empty_opaque_dir() {
    let fx = Fixture::new();
    lower_for_opaque(&fx);
    fx.apply(&Layer::new().file("d/sub/.wh..wh..opq", b"").bytes())
        .expect("opaque sub");
    assert!(names(&fx.path("d/sub")).is_empty());
    assert_eq!(names(&fx.path("d")), set(&["old", "oldlink", "sub"]));
    fx.apply(
        &Layer::new()
            .file("kept", b"k")
            .file(".wh..wh..opq", b"")
            .bytes(),
    )
    .expect("opaque root");
    assert_eq!(names(&fx.root), set(&["kept"]));
    fx.assert_untouched();
}

#[test]
fn overlay_whiteouts_are_devices_and_opaque_xattrs() {
    needs_root!();
    let fx = Fixture::new();
    lower_for_opaque(&fx);
    let report = fx
        .apply_with(
            &Layer::new()
                .file("d/.wh..wh..opq", b"")
                .file("d/new", b"new")
                .file_with("d/.wh.old", b"", 0o644, 1000, 1000, MTIME)
                .file(".wh.absent", b"")
                .bytes(),
            &ApplyOptions {
                whiteouts: Whiteouts::Overlay,
                ..Default::default()
            },
        )
        .expect("apply");
    assert_eq!(report.entries, 4);
    assert_eq!(
        xattr(&fx.path("d"), OVERLAY_OPAQUE_XATTR).as_deref(),
        Some(&b"y"[..])
    );
    // Nothing removed: overlayfs hides the lower files itself.
    assert_eq!(names(&fx.path("d")), set(&["new", "old", "oldlink", "sub"]));
    for (path, uid) in [("d/old", 1000), ("absent", 0)] {
        let wh = fs::symlink_metadata(fx.path(path)).expect("whiteout");
        assert!(wh.file_type().is_char_device(), "{path}");
        assert_eq!(wh.rdev(), 0, "{path}");
        assert_eq!(wh.uid(), uid, "{path}");
    }
    assert!(!fx.path("d/.wh.old").exists());
}

#[test]
fn parents_give_implicit_directories_their_lower_attributes() {
    needs_root!();
    let lower = Fixture::new();
    lower
        .apply(
            &Layer::new()
                .dir("p", 0o755)
                .dir_at("p/q", 0o700, 1_234_567_890)
                .bytes(),
        )
        .expect("lower");
    nix::unistd::chown(&lower.path("p/q"), Some(5.into()), Some(6.into())).expect("chown");
    let upper = Fixture::new();
    upper
        .apply_with(
            &Layer::new()
                .file("p/q/new", b"n")
                .file("fresh/x", b"x")
                .bytes(),
            &ApplyOptions {
                whiteouts: Whiteouts::Overlay,
                parents: vec![lower.root.clone()],
                ..Default::default()
            },
        )
        .expect("upper");
    let q = fs::metadata(upper.path("p/q")).expect("q");
    assert_eq!(q.permissions().mode() & 0o7777, 0o700);
    assert_eq!((q.uid(), q.gid()), (5, 6));
    assert_eq!(mode(&upper.path("fresh")), 0o755, "not in any parent: 0755");
}

/// On an overlay upper dir a path missing there may be a symlink or a file below: creating
/// the parent directory would hide it, where applying onto the merged tree refuses the path.
#[test]
fn overlay_paths_through_lower_symlinks_and_files_are_refused() {
    needs_root!();
    let lower = Fixture::new();
    lower
        .apply(
            &Layer::new()
                .symlink("link", "/")
                .file("file", b"f")
                .dir("gone", 0o755)
                .bytes(),
        )
        .expect("lower");
    let overlay = |layer: Vec<u8>| {
        let upper = Fixture::new();
        let result = upper.apply_with(
            &layer,
            &ApplyOptions {
                whiteouts: Whiteouts::Overlay,
                parents: vec![lower.root.clone()],
                ..Default::default()
            },
        );
        (upper, result)
    };
    let (upper, result) = overlay(Layer::new().file("link/evil", b"x").bytes());
    let err = result.expect_err("a path through a lower symlink");
    assert!(err.to_string().contains("link"), "{err}");
    assert!(
        !upper.path("link").exists(),
        "no directory hides the symlink"
    );
    let (_, result) = overlay(Layer::new().file("file/x", b"x").bytes());
    let err = result.expect_err("a path through a lower file");
    assert!(err.to_string().contains("file"), "{err}");
    // A lower directory is inherited as before.
    let (upper, result) = overlay(Layer::new().file("gone/new", b"n").bytes());
    result.expect("a path through a lower directory");
    assert!(upper.path("gone/new").exists());
}

#[test]
fn hard_links_within_and_across_layers() {
    let fx = Fixture::new();
    fx.apply(
        &Layer::new()
            .dir("bin", 0o755)
            .file_with("bin/busybox", b"ELF", 0o755, 0, 0, MTIME)
            .hard_link("bin/sh", "bin/busybox")
            .symlink("bin/ln", "busybox")
            .bytes(),
    )
    .expect("lower");
    fx.apply(
        &Layer::new()
            .hard_link("bin/ls", "bin/busybox")
            .hard_link("abs", "/bin/busybox")
            .hard_link("lnk", "bin/ln")
            .bytes(),
    )
    .expect("upper");
    let ino = fs::metadata(fx.path("bin/busybox")).expect("stat").ino();
    for path in ["bin/sh", "bin/ls", "abs"] {
        assert_eq!(
            fs::metadata(fx.path(path)).expect(path).ino(),
            ino,
            "{path}"
        );
    }
    assert_eq!(
        fs::metadata(fx.path("bin/busybox")).expect("stat").nlink(),
        4
    );
    // A hard link to a symlink links the symlink, it does not follow it.
    let lnk = fs::symlink_metadata(fx.path("lnk")).expect("lnk");
    assert!(lnk.file_type().is_symlink());
    assert_eq!(
        lnk.ino(),
        fs::symlink_metadata(fx.path("bin/ln")).expect("ln").ino()
    );
}

#[test]
fn existing_paths_are_replaced_or_merged() {
    let fx = Fixture::new();
    fx.apply(
        &Layer::new()
            .dir("was-dir", 0o755)
            .file("was-dir/child", b"c")
            .file("was-file", b"f")
            .symlink("was-link", &fx.sentinel.join("secret").to_string_lossy())
            .symlink("was-dirlink", &fx.sentinel.to_string_lossy())
            .dir("merge", 0o755)
            .file("merge/lower", b"l")
            .file("target", b"t")
            .hard_link("shared", "target")
            .bytes(),
    )
    .expect("lower");
    fx.apply(
        &Layer::new()
            .file("was-dir", b"now a file")
            .dir("was-file", 0o700)
            .file("was-link", b"replaced, not written through")
            .dir("was-dirlink", 0o755)
            .file("was-dirlink/inside", b"in the root")
            .dir("merge", 0o711)
            .file("merge/upper", b"u")
            .file("shared", b"new inode")
            .bytes(),
    )
    .expect("upper");
    assert_eq!(fs::read(fx.path("was-dir")).expect("read"), b"now a file");
    assert!(fs::metadata(fx.path("was-file")).expect("stat").is_dir());
    assert!(
        fs::symlink_metadata(fx.path("was-link"))
            .expect("stat")
            .is_file()
    );
    assert!(
        fs::symlink_metadata(fx.path("was-dirlink"))
            .expect("stat")
            .is_dir()
    );
    assert_eq!(names(&fx.path("merge")), set(&["lower", "upper"]));
    assert_eq!(mode(&fx.path("merge")), 0o711);
    // Replacing one name of a hard link leaves the other alone.
    assert_eq!(fs::read(fx.path("target")).expect("target"), b"t");
    assert_eq!(fs::read(fx.path("shared")).expect("shared"), b"new inode");
    fx.assert_untouched();
}

#[test]
fn directories_replaced_or_removed_within_one_layer() {
    // The applier keeps the last parent chain open; entries that replace or remove a
    // directory of that chain must not leave later entries writing into a deleted directory.
    let fx = Fixture::new();
    fx.apply(
        &Layer::new()
            .dir("d", 0o755)
            .dir("d/sub", 0o755)
            .file("d/sub/f", b"1")
            .file("d", b"now a file")
            .file("d2/g", b"2")
            .dir("x", 0o755)
            .dir("x/y", 0o755)
            .file("x/y/z", b"3")
            .file(".wh.x", b"")
            .file("x/y/again", b"4")
            .dir_at("t", 0o755, 1_000)
            .file("t/inner", b"5")
            .file(".wh.t", b"")
            .bytes(),
    )
    .expect("apply");
    assert_eq!(names(&fx.root), set(&["d", "d2", "x"]));
    assert_eq!(fs::read(fx.path("d")).expect("d"), b"now a file");
    assert_eq!(fs::read(fx.path("d2/g")).expect("g"), b"2");
    assert_eq!(names(&fx.path("x")), set(&["y"]));
    assert_eq!(names(&fx.path("x/y")), set(&["again"]));
    fx.assert_untouched();
}

#[test]
fn root_entries_and_global_headers_are_ignored() {
    let fx = Fixture::new();
    fs::set_permissions(&fx.root, fs::Permissions::from_mode(0o711)).expect("chmod");
    let report = fx
        .apply(
            &Layer::new()
                .dir("./", 0o777)
                .raw(
                    b"pax_global_header",
                    EntryType::XGlobalHeader,
                    b"",
                    &common::pax_record("comment", b"x"),
                )
                .file("f", b"x")
                .bytes(),
        )
        .expect("apply");
    assert_eq!(report.entries, 3);
    assert_eq!(
        mode(&fx.root),
        0o711,
        "the root's own mode is not the layer's"
    );
    assert_eq!(names(&fx.root), set(&["f"]));
}

#[test]
fn absolute_names_are_relative_to_the_root_unless_refused() {
    let fx = Fixture::new();
    let layer = Layer::new()
        .raw(b"/abs/file", EntryType::Regular, b"", b"inside")
        .bytes();
    fx.apply(&layer)
        .expect("containerd reads /abs/file as abs/file");
    assert_eq!(fs::read(fx.path("abs/file")).expect("read"), b"inside");
    fx.assert_untouched();

    let fx = Fixture::new();
    common::assert_refused(
        fx.apply_with(
            &layer,
            &ApplyOptions {
                refuse_absolute_names: true,
                ..Default::default()
            },
        ),
        "/abs/file",
    );
    assert!(names(&fx.root).is_empty());
}

#[test]
fn gnu_sparse_files_are_written_out() {
    let fx = Fixture::new();
    fx.apply(&common::sparse_layer(4096, b"tail"))
        .expect("apply");
    let data = fs::read(fx.path("sparse")).expect("read");
    assert_eq!(data.len(), 4100);
    assert!(data[..4096].iter().all(|b| *b == 0));
    assert_eq!(&data[4096..], b"tail");
}

#[test]
fn sync_fs_after_apply() {
    let fx = Fixture::new();
    let report = fx
        .apply_with(
            &Layer::new().file("f", b"durable").bytes(),
            &ApplyOptions {
                sync_fs: true,
                ..Default::default()
            },
        )
        .expect("apply");
    assert_eq!(report.entries, 1);
    assert_eq!(fs::read(fx.path("f")).expect("read"), b"durable");
}

#[test]
fn entries_after_small_files_see_them_created() {
    // Small files are created by a helper thread while the applier reads on; every later
    // entry that touches their paths must see the order of the archive.
    let fx = Fixture::new();
    let mut layer = Layer::new();
    layer.dir("m", 0o755);
    for i in 0..300 {
        layer.file(&format!("m/f{i:03}"), format!("file {i}").as_bytes());
    }
    layer
        .file(".wh.m", b"")
        .file("m/again", b"after the whiteout")
        .file("h/target", b"linked")
        .hard_link("h/link", "h/target")
        .file("twice", b"first")
        .file("twice", b"second")
        .file("r/f", b"a file first")
        .dir("r/f", 0o755)
        .file("r/f/inner", b"then a directory")
        .file("s/x", b"a file first")
        .symlink("s/x", "elsewhere");
    fx.apply(&layer.bytes()).expect("apply");
    assert_eq!(names(&fx.path("m")), set(&["again"]));
    assert_eq!(
        fs::read(fx.path("m/again")).expect("again"),
        b"after the whiteout"
    );
    let target = fs::metadata(fx.path("h/target")).expect("target");
    let link = fs::metadata(fx.path("h/link")).expect("link");
    assert_eq!(target.ino(), link.ino(), "one inode");
    assert_eq!(fs::read(fx.path("h/link")).expect("link"), b"linked");
    assert_eq!(fs::read(fx.path("twice")).expect("twice"), b"second");
    assert_eq!(
        fs::read(fx.path("r/f/inner")).expect("inner"),
        b"then a directory"
    );
    assert_eq!(
        fs::read_link(fx.path("s/x")).expect("symlink"),
        std::path::PathBuf::from("elsewhere")
    );
    fx.assert_untouched();
}

#[test]
fn an_entry_below_a_small_file_is_refused_naming_it() {
    let fx = Fixture::new();
    let mut layer = Layer::new();
    for i in 0..50 {
        layer.file(&format!("p/f{i:02}"), b"x");
    }
    layer.file("p/q", b"a file").file("p/q/r", b"below a file");
    let err = fx.apply(&layer.bytes()).expect_err("p/q is a file");
    assert!(err.to_string().contains("p/q/r"), "{err}");
    fx.assert_untouched();
}
