//! Acceptance 5 of issue 6: dynamic plugins loaded from `plugin_dir`.
//!
//! berth-only: containerd's `plugin_dir` loads Go plugins (`plugin.Open`), a mechanism with
//! nothing in common with berth's Rust libraries, so none of this can run against containerd.
//!
//! The libraries: the example `examples/dynamic-snapshotter` built twice with cargo (as is, and
//! with its `foreign-abi` feature, which exports an ABI string no berth-core has), each copy
//! kept in a directory of this test run; and two C libraries compiled with `cc -shared`, one
//! exporting only an ABI string (no entry point) and one exporting nothing of berth's. Each test
//! gives berthd a `plugin_dir` of symbolic links to the ones it needs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use berth_integration::{Daemon, Kind, Options, run_command, skip, workspace_root};

const PACKAGE: &str = "berth-example-dynamic-snapshotter";
const SNAPSHOTTER: &str = "dynamic-native";
const FOREIGN_ABI: &str =
    "berth-core 0.0.0+src.0000000000000000 / rustc 0.0.0 (foreign-abi test build)";
const LIBRARY_TYPE: &str = "io.berth.plugin-library.v1";

struct Libraries {
    /// The example as is.
    good: PathBuf,
    /// The example with the `foreign-abi` feature.
    foreign: PathBuf,
    /// C libraries: (no entry point, no berth symbol at all), if a C compiler is installed.
    c: Option<(PathBuf, PathBuf)>,
}

/// Builds the example with cargo (`features` may be empty) and returns the `.so` it produced.
fn cargo_build(features: &[&str]) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "--message-format=json",
        "-p",
        PACKAGE,
    ]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = run_command(&mut cmd, Duration::from_secs(900)).expect("run cargo build");
    assert!(out.success(), "cargo build of {PACKAGE} failed:\n{out}");
    out.stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter(|msg| msg["target"]["name"] == "berth_dynamic_snapshotter")
        .flat_map(|msg| {
            msg["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
        })
        .find(|f| f.extension().is_some_and(|e| e == "so"))
        .unwrap_or_else(|| panic!("cargo build of {PACKAGE} reported no .so:\n{out}"))
}

/// Compiles `source` into `<dir>/<name>` with `cc -shared`; None when no C compiler runs.
fn cc_shared(dir: &Path, name: &str, source: &str) -> Option<PathBuf> {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, source).expect("write C source");
    let lib = dir.join(name);
    let out = run_command(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&c),
        Duration::from_secs(60),
    )
    .ok()?;
    assert!(out.success(), "cc -shared {} failed:\n{out}", c.display());
    Some(lib)
}

fn libraries() -> &'static Libraries {
    static LIBS: OnceLock<Libraries> = OnceLock::new();
    LIBS.get_or_init(|| {
        // A fixed directory in cargo's scratch space, replaced on each run: the statics of a
        // test binary are never dropped, so a temporary directory would outlive every run.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("berth-dynlibs");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the library directory");
        let keep = |built: PathBuf, sub: &str| {
            let dest = dir.join(sub);
            std::fs::create_dir_all(&dest).expect("mkdir");
            let dest = dest.join(built.file_name().expect("file name"));
            // A copy: the next build replaces the file cargo wrote.
            std::fs::copy(&built, &dest).expect("copy the built library");
            dest
        };
        // The foreign build first, so that the target directory ends with the real one.
        let foreign = keep(cargo_build(&["foreign-abi"]), "foreign");
        let good = keep(cargo_build(&[]), "good");
        let c = cc_shared(
            &dir,
            "libnoentry.so",
            "const char berth_plugin_abi[] = \"an ABI string, and no entry point\";\n",
        )
        .and_then(|no_entry| {
            cc_shared(&dir, "libplain.so", "int berth_unrelated = 1;\n")
                .map(|plain| (no_entry, plain))
        });
        Libraries { good, foreign, c }
    })
}

/// A berthd whose `plugin_dir` holds links named `name` to `target`.
fn berthd_with(libs: &[(&str, &Path)], extra: &str) -> (Daemon, tempfile::TempDir) {
    let plugin_dir = tempfile::Builder::new()
        .prefix("berth-it-plugins")
        .tempdir_in("/tmp")
        .expect("tempdir");
    for (name, target) in libs {
        std::os::unix::fs::symlink(target, plugin_dir.path().join(name)).expect("symlink");
    }
    let config = format!(
        r#"version = 3
root = "{{root}}"
state = "{{state}}"
plugin_dir = "{}"
{extra}

[grpc]
address = "{{socket}}"

[debug]
level = "info"
"#,
        plugin_dir.path().display()
    );
    let d = Daemon::start_with(Kind::Berthd, Options::with_config(config));
    (d, plugin_dir)
}

/// `ctr plugins ls` rows as (type, id, status): a space-padded table whose cells hold no
/// spaces (`TYPE ID PLATFORMS STATUS`).
fn plugins(d: &Daemon) -> Vec<(String, String, String)> {
    let out = d.ctr_ok(["plugins", "ls"]);
    out.stdout
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|row| row.len() == 4)
        .map(|row| (row[0].to_owned(), row[1].to_owned(), row[3].to_owned()))
        .collect()
}

/// `ctr snapshots ls` rows as (key, parent, kind); the parent cell is blank for none.
fn ls(d: &Daemon) -> Vec<(String, String, String)> {
    snap(d, ["ls"])
        .lines()
        .skip(1)
        .map(|line| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|row| !row.is_empty())
        .map(|row| match row.as_slice() {
            [key, kind] => (key.clone(), String::new(), kind.clone()),
            [key, parent, kind] => (key.clone(), parent.clone(), kind.clone()),
            other => panic!("unexpected ctr snapshots ls row {other:?}"),
        })
        .collect()
}

fn row(key: &str, parent: &str, kind: &str) -> (String, String, String) {
    (key.to_owned(), parent.to_owned(), kind.to_owned())
}

fn status_of(d: &Daemon, plugin_type: &str, id: &str) -> Option<String> {
    plugins(d)
        .into_iter()
        .find(|(t, i, _)| t == plugin_type && i == id)
        .map(|(_, _, s)| s)
}

/// The error message `ctr plugins ls -d` shows for the library entry `id`.
fn library_error(d: &Daemon, id: &str) -> String {
    let out = d.ctr_ok(["plugins", "ls", "-d", &format!("id=={id}")]);
    assert!(out.stdout.contains("Error:"), "{id} has no error:\n{out}");
    out.stdout
}

fn snap<const N: usize>(d: &Daemon, args: [&str; N]) -> String {
    let mut all = vec!["snapshots", "--snapshotter", SNAPSHOTTER];
    all.extend(args);
    d.ctr_ok(all).stdout
}

/// The source directory of the single bind mount `ctr snapshots mounts` prints for `key`.
fn mount_source(d: &Daemon, key: &str) -> PathBuf {
    let out = snap(d, ["mounts", "/mnt", key]);
    // `mount -t bind <source> /mnt -o rbind,rw`
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words.get(2), Some(&"bind"), "{out}");
    PathBuf::from(words.get(3).copied().expect("mount source"))
}

#[test]
fn library_snapshotter_loads_appears_in_plugins_and_serves_ctr() {
    let libs = libraries();
    let (mut d, _dir) = berthd_with(&[("libberth_dynamic_snapshotter.so", &libs.good)], "");
    assert_eq!(
        status_of(&d, "io.containerd.snapshotter.v1", SNAPSHOTTER).as_deref(),
        Some("ok"),
        "{:?}",
        plugins(&d)
    );
    assert_eq!(
        status_of(&d, LIBRARY_TYPE, "libberth_dynamic_snapshotter.so").as_deref(),
        Some("ok")
    );

    snap(&d, ["prepare", "k1"]);
    let k1 = mount_source(&d, "k1");
    assert!(
        k1.starts_with(d.root()),
        "the snapshot lives under berthd's root: {}",
        k1.display()
    );
    std::fs::write(k1.join("hello"), b"from k1").expect("write into the snapshot");
    snap(&d, ["commit", "c1", "k1"]);
    snap(&d, ["prepare", "k2", "c1"]);
    let k2 = mount_source(&d, "k2");
    assert_ne!(k1, k2);
    assert_eq!(
        std::fs::read(k2.join("hello")).expect("the parent's file is in the child"),
        b"from k1"
    );
    assert_eq!(
        ls(&d),
        [row("c1", "", "Committed"), row("k2", "c1", "Active")]
    );
    let out = d.ctr(["snapshots", "--snapshotter", SNAPSHOTTER, "rm", "c1"]);
    assert!(!out.success(), "a parent cannot be removed: {out}");

    // The library's own metadata survives a restart (it is loaded again).
    d.restart().expect("restart berthd");
    assert_eq!(
        ls(&d),
        [row("c1", "", "Committed"), row("k2", "c1", "Active")]
    );
    snap(&d, ["rm", "k2"]);
    snap(&d, ["rm", "c1"]);
    assert_eq!(ls(&d), []);
    // The library removes the directories (through berthd's metadata layer, which may leave
    // that to its collector: wait a little).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (k1.exists() || k2.exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for dir in [&k1, &k2] {
        assert!(!dir.exists(), "{} is left after rm", dir.display());
    }
}

#[test]
fn library_with_another_abi_is_refused_naming_both_and_others_still_load() {
    let libs = libraries();
    let (d, dir) = berthd_with(
        &[
            ("libforeign.so", &libs.foreign),
            ("libberth_dynamic_snapshotter.so", &libs.good),
        ],
        "",
    );
    // The good library is loaded beside the refused one, and its entry shows berthd's ABI.
    assert_eq!(
        status_of(&d, "io.containerd.snapshotter.v1", SNAPSHOTTER).as_deref(),
        Some("ok")
    );
    let good = d.ctr_ok(["plugins", "ls", "-d", "id==libberth_dynamic_snapshotter.so"]);
    let ours = good
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("abi"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no abi export:\n{good}"))
        .to_owned();
    assert!(ours.starts_with("berth-core "), "{ours}");

    assert_eq!(
        status_of(&d, LIBRARY_TYPE, "libforeign.so").as_deref(),
        Some("error")
    );
    let shown = library_error(&d, "libforeign.so");
    let path = dir.path().join("libforeign.so");
    // `ctr plugins ls -d` wraps nothing: the whole message is on one line.
    for needle in [FOREIGN_ABI, ours.as_str(), &path.display().to_string()] {
        assert!(shown.contains(needle), "{needle:?} missing from:\n{shown}");
    }
    let log = d.stderr_log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("libforeign.so") && l.contains(FOREIGN_ABI)),
        "no error line for the refusal:\n{log}"
    );
}

#[test]
fn libraries_missing_berth_symbols_are_refused_by_name() {
    let libs = libraries();
    let Some((no_entry, plain)) = &libs.c else {
        skip(
            "libraries_missing_berth_symbols_are_refused_by_name",
            "no C compiler (cc) to build libraries without berth's symbols",
        );
        return;
    };
    let (d, dir) = berthd_with(&[("libnoentry.so", no_entry), ("libplain.so", plain)], "");
    let shown = library_error(&d, "libnoentry.so");
    assert!(
        shown.contains("has no symbol berth_plugin_register"),
        "{shown}"
    );
    assert!(
        shown.contains(&dir.path().join("libnoentry.so").display().to_string()),
        "{shown}"
    );
    let shown = library_error(&d, "libplain.so");
    assert!(shown.contains("has no symbol berth_plugin_abi"), "{shown}");
    assert!(
        shown.contains(&dir.path().join("libplain.so").display().to_string()),
        "{shown}"
    );
    // Refusals do not stop berthd: it serves.
    d.ctr_ok(["version"]);
}

#[test]
fn a_required_plugin_of_a_refused_library_stops_start() {
    let libs = libraries();
    let plugin_dir = tempfile::Builder::new()
        .prefix("berth-it-plugins")
        .tempdir_in("/tmp")
        .expect("tempdir");
    std::os::unix::fs::symlink(&libs.foreign, plugin_dir.path().join("libforeign.so"))
        .expect("symlink");
    let config = format!(
        r#"version = 3
root = "{{root}}"
state = "{{state}}"
plugin_dir = "{}"
required_plugins = ["io.containerd.snapshotter.v1.{SNAPSHOTTER}"]

[grpc]
address = "{{socket}}"
"#,
        plugin_dir.path().display()
    );
    let mut d = Daemon::spawn(Kind::Berthd, Options::with_config(config)).expect("spawn berthd");
    let status = d
        .wait_exit(Duration::from_secs(30))
        .expect("berthd exits when a required plugin's library is refused");
    assert!(!status.success(), "{status}");
    let log = d.stderr_log();
    assert!(
        log.contains(&format!("io.containerd.snapshotter.v1.{SNAPSHOTTER}"))
            && log.contains("libforeign.so")
            && log.contains(FOREIGN_ABI),
        "the error names the plugin, the library and its ABI:\n{log}"
    );
}

/// A `[plugins."<uri>"]` section for a library's plugin is that plugin's configuration, not an
/// unknown section: `berthd config check` loads `plugin_dir` as the daemon does and warns of
/// nothing, the daemon logs no warning about it and the plugin gets the setting.
#[test]
fn a_library_plugins_section_is_known_to_config_check_and_the_daemon() {
    let libs = libraries();
    let custom_root = tempfile::tempdir().expect("tempdir");
    let section = format!(
        "[plugins.\"io.containerd.snapshotter.v1.{SNAPSHOTTER}\"]\nroot_path = \"{}\"\n",
        custom_root.path().display()
    );
    let (d, plugin_dir) = berthd_with(&[("libberth_dynamic_snapshotter.so", &libs.good)], &section);
    let log = d.stderr_log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(SNAPSHOTTER))
        .collect();
    assert!(
        warned.is_empty(),
        "the daemon warned about the section: {warned:?}"
    );
    snap(&d, ["prepare", "k1"]);
    let source = mount_source(&d, "k1");
    assert!(
        source.starts_with(custom_root.path()),
        "root_path from the section is used: {}",
        source.display()
    );

    let file = plugin_dir.path().join("config.toml");
    let config = format!(
        "version = 3\nroot = \"/tmp/unused-root\"\nplugin_dir = \"{}\"\n\n{section}",
        plugin_dir.path().display()
    );
    std::fs::write(&file, config).expect("write config");
    let out =
        berth_integration::berthd_cmd(["config".as_ref(), "check".as_ref(), file.as_os_str()])
            .expect("berthd config check");
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("(0 warnings)"), "{out}");
    assert!(!out.stderr.contains("warning:"), "{out}");

    // Without the library the same section configures nothing, and check says so (a
    // snapshotter type containerd has: a notice, as for other plugins berth does not build).
    let bare = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "version = 3\nroot = \"/tmp/unused-root\"\nplugin_dir = \"{}\"\n\n{section}",
        bare.path().display()
    );
    std::fs::write(&file, config).expect("write config");
    let out =
        berth_integration::berthd_cmd(["config".as_ref(), "check".as_ref(), file.as_os_str()])
            .expect("berthd config check");
    assert!(
        out.stderr
            .lines()
            .any(|l| l.starts_with("notice:") && l.contains(SNAPSHOTTER)),
        "{out}"
    );
}
