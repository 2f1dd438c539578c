//! Hostile layers: each is refused with an error naming the entry, and nothing is written
//! outside the root (the sentinel directory beside it stays as it was).

mod common;

use std::fs;

use common::{Fixture, Layer, assert_refused, names, set};
use tar::EntryType;

#[test]
fn dot_dot_names_are_refused() {
    for name in [
        "../evil",
        "a/../../evil",
        "./../evil",
        "a/b/../../../sentinel/evil",
    ] {
        let fx = Fixture::new();
        let text = assert_refused(
            fx.apply(
                &Layer::new()
                    .file("ok-before", b"fine")
                    .raw(name.as_bytes(), EntryType::Regular, b"", b"evil")
                    .bytes(),
            ),
            name,
        );
        assert!(text.contains("escapes the layer root"), "{text}");
        fx.assert_untouched();
    }
}

#[test]
fn dot_dot_directories_and_links_are_refused_too() {
    for (name, kind) in [
        ("../evil-dir", EntryType::Directory),
        ("../evil-link", EntryType::Symlink),
        ("../evil-fifo", EntryType::Fifo),
    ] {
        let fx = Fixture::new();
        assert_refused(
            fx.apply(&Layer::new().raw(name.as_bytes(), kind, b"/", b"").bytes()),
            name,
        );
        fx.assert_untouched();
    }
}

#[test]
fn a_file_through_a_symlink_to_slash_is_refused() {
    let fx = Fixture::new();
    // "root" -> "/", then "root/<path of the sentinel>/evil": followed, it would land in the
    // sentinel directory.
    let through = format!("root{}/evil", fx.sentinel.to_str().expect("utf8 tempdir"));
    assert_refused(
        fx.apply(
            &Layer::new()
                .symlink("root", "/")
                .file(&through, b"evil")
                .bytes(),
        ),
        &through,
    );
    fx.assert_untouched();
}

#[test]
fn paths_through_symlinks_are_refused_from_an_earlier_layer_too() {
    let fx = Fixture::new();
    fx.apply(
        &Layer::new()
            .symlink("out", &fx.sentinel.to_string_lossy())
            .symlink("rel-out", "../sentinel")
            .dir("inside", 0o755)
            .symlink("in", "inside")
            .bytes(),
    )
    .expect("symlinks alone are fine");
    for name in ["out/evil", "rel-out/evil", "out/dir/evil", "in/x"] {
        let text = assert_refused(fx.apply(&Layer::new().file(name, b"evil").bytes()), name);
        assert!(text.contains("is a symlink"), "{text}");
    }
    // Directories, whiteouts and opaque markers through a symlink too.
    for name in [
        "out/newdir",
        "out/.wh.secret",
        "out/.wh..wh..opq",
        "in/.wh..wh..opq",
    ] {
        let mut layer = Layer::new();
        if name.ends_with("newdir") {
            layer.dir(name, 0o755);
        } else {
            layer.file(name, b"");
        }
        assert_refused(fx.apply(&layer.bytes()), name);
    }
    assert!(names(&fx.path("inside")).is_empty());
    fx.assert_untouched();
}

#[test]
fn a_path_through_a_file_is_refused() {
    let fx = Fixture::new();
    let text = assert_refused(
        fx.apply(&Layer::new().file("f", b"x").file("f/child", b"y").bytes()),
        "f/child",
    );
    assert!(text.contains("not a directory"), "{text}");
}

#[test]
fn hard_links_outside_the_root_are_refused() {
    for target in [
        "../sentinel/secret",
        "a/../../sentinel/secret",
        "../../../../../../../../etc/passwd",
    ] {
        let fx = Fixture::new();
        let text = assert_refused(
            fx.apply(
                &Layer::new()
                    .raw(b"link", EntryType::Link, target.as_bytes(), b"")
                    .bytes(),
            ),
            "link",
        );
        assert!(text.contains("escapes"), "{text}");
        fx.assert_untouched();
        let secret = fs::metadata(fx.sentinel.join("secret")).expect("secret");
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&secret), 1);
    }
}

#[test]
fn hard_links_through_symlinks_or_to_nothing_are_refused() {
    let fx = Fixture::new();
    fx.apply(
        &Layer::new()
            .symlink("out", &fx.sentinel.to_string_lossy())
            .symlink("etc", "/etc")
            .dir("d", 0o755)
            .bytes(),
    )
    .expect("lower");
    for (name, target, why) in [
        ("l1", "out/secret", "is a symlink"),
        ("l2", "etc/passwd", "is a symlink"),
        ("l3", "missing", "does not exist"),
        ("l4", "d", "is a directory"),
        ("l5", "./", "layer root"),
    ] {
        let text = assert_refused(
            fx.apply(
                &Layer::new()
                    .raw(name.as_bytes(), EntryType::Link, target.as_bytes(), b"")
                    .bytes(),
            ),
            name,
        );
        assert!(text.contains(why), "{text}");
    }
    let passwd = fs::metadata("/etc/passwd").expect("passwd");
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&passwd), 1);
    fx.assert_untouched();
}

#[test]
fn escaping_whiteouts_are_refused() {
    for name in [".wh..", "a/.wh..", ".wh.", "a/.wh.", "a/.wh.."] {
        let fx = Fixture::new();
        fx.apply(&Layer::new().file("a/keep", b"k").file("keep", b"k").bytes())
            .expect("lower");
        let text = assert_refused(fx.apply(&Layer::new().file(name, b"").bytes()), name);
        assert!(text.contains("whiteout"), "{text}");
        assert_eq!(names(&fx.root), set(&["a", "keep"]));
        assert_eq!(names(&fx.path("a")), set(&["keep"]));
        fx.assert_untouched();
    }
    // A raw "..", which cleaning refuses before whiteout handling sees it.
    let fx = Fixture::new();
    assert_refused(
        fx.apply(
            &Layer::new()
                .raw(b"../.wh.sentinel", EntryType::Regular, b"", b"")
                .bytes(),
        ),
        "../.wh.sentinel",
    );
    fx.assert_untouched();
}

#[test]
fn unsupported_entry_types_are_refused() {
    for (kind, flag) in [
        (EntryType::Continuous, '7'),
        (EntryType::new(b'V'), 'V'),
        (EntryType::new(b'D'), 'D'),
        (EntryType::new(b'Z'), 'Z'),
    ] {
        let fx = Fixture::new();
        let text = assert_refused(
            fx.apply(&Layer::new().raw(b"odd", kind, b"", b"").bytes()),
            "odd",
        );
        assert!(text.contains(&format!("{flag:?}")), "{text}");
        assert!(names(&fx.root).is_empty());
    }
}

#[test]
fn pax_sparse_files_and_bad_fields_are_refused() {
    let fx = Fixture::new();
    assert_refused(
        fx.apply(
            &Layer::new()
                .pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")])
                .file("sp", b"map")
                .bytes(),
        ),
        "sp",
    );
    assert_refused(
        fx.apply(
            &Layer::new()
                .pax(&[("mtime", b"soon")])
                .file("t", b"x")
                .bytes(),
        ),
        "t",
    );
    assert_refused(
        fx.apply(
            &Layer::new()
                .pax(&[("uid", b"5000000000")])
                .file("u", b"x")
                .bytes(),
        ),
        "u",
    );
    assert!(names(&fx.root).is_empty());
}

#[test]
fn names_longer_than_path_max_are_refused() {
    let fx = Fixture::new();
    let long = "d/".repeat(2100) + "f";
    assert_refused(
        fx.apply(
            &Layer::new()
                .pax(&[("path", long.as_bytes())])
                .file("short", b"x")
                .bytes(),
        ),
        &long,
    );
    assert!(names(&fx.root).is_empty());
}
