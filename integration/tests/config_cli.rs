//! Acceptance 5 of issue 2: `berthd config default|check|migrate`, older config versions,
//! unknown keys and syntax errors. berthd only (containerd's config CLI differs).

use std::path::Path;
use std::time::Duration;

use berth_integration::{CmdOutput, Daemon, Kind, Options, berthd_cmd};

fn berthd(args: &[&str]) -> CmdOutput {
    berthd_cmd(args).unwrap_or_else(|e| panic!("berthd {args:?}: {e:#}"))
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bk")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p.to_string_lossy().into_owned()
}

/// Lines at warning level: tracing's ` WARN `, `berthd config check`'s `warning: ...`, or
/// logfmt's `level=warn`.
fn warn_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("WARN")
                || l.trim_start().to_lowercase().starts_with("warning")
                || l.contains("level=warn")
        })
        .collect()
}

/// Lines announcing an in-memory config migration.
fn migration_notices(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("migrat") && l.contains("config")
        })
        .collect()
}

#[test]
fn default_config_passes_check() {
    let out = berthd(&["config", "default"]);
    out.assert_success();
    let parsed: toml::Table = toml::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`berthd config default` is not TOML: {e}\n{}", out.stdout));
    assert_eq!(parsed["version"].as_integer(), Some(3), "{}", out.stdout);
    assert_eq!(parsed["root"].as_str(), Some("/var/lib/berth"));
    assert_eq!(parsed["state"].as_str(), Some("/run/berth"));
    assert_eq!(
        parsed["grpc"]["address"].as_str(),
        Some("/run/berth/berthd.sock")
    );

    let dir = tmp();
    let file = write(dir.path(), "default.toml", &out.stdout);
    let check = berthd(&["config", "check", &file]);
    check.assert_success();
    assert!(
        warn_lines(&check.stderr).is_empty() && !check.stderr.contains("unknown"),
        "the default config warns: {check}"
    );
}

#[test]
fn default_config_checks_from_stdin() {
    let bin =
        berth_integration::berthd_binary(berth_integration::Profile::Debug).expect("berthd binary");
    let script = format!(
        "{b} config default | {b} config check /dev/stdin",
        b = bin.display()
    );
    let out = berth_integration::run_command(
        std::process::Command::new("sh").args(["-c", &script]),
        Duration::from_secs(60),
    )
    .expect("sh");
    out.assert_success();
}

const V2: &str = r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = []
required_plugins = []

[grpc]
  address = "{socket}"
  max_recv_message_size = 16777216
  max_send_message_size = 16777216

[debug]
  level = "info"

# Keys the v2 -> v3 migration moves itself must not warn (containerd PR 10980).
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.6"
  max_concurrent_downloads = 3
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.metadata.v1.bolt"]
  no_sync = false
"#;

const V1: &str = r#"version = 1
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[debug]
  level = "info"

# containerd 1.x short plugin names.
[plugins.cri]
  sandbox_image = "registry.k8s.io/pause:3.6"
  [plugins.cri.containerd]
    snapshotter = "overlayfs"

[plugins.bolt]
  no_sync = false
"#;

/// `config check` accepts an older file, and a daemon started on it logs exactly one migration
/// notice and no warning.
fn older_version_loads(template: &str, version: i64) {
    let d = Daemon::start_with(Kind::Berthd, Options::with_config(template));
    d.ctr_ok(["version"]);
    let check = berthd(&["config", "check", &d.config_path().to_string_lossy()]);
    check.assert_success();
    assert!(
        warn_lines(&check.stderr).is_empty(),
        "config check of a version {version} file warns: {check}"
    );

    let log = d.log();
    let notices = migration_notices(&log);
    assert_eq!(
        notices.len(),
        1,
        "expected one migration notice for version {version}, log:\n{log}"
    );
    assert!(
        notices[0].contains(&version.to_string()),
        "the notice does not name version {version}: {}",
        notices[0]
    );
    let warns = warn_lines(&log);
    assert!(warns.is_empty(), "version {version} file warns:\n{log}");
}

#[test]
fn version_2_file_loads() {
    older_version_loads(V2, 2);
}

#[test]
fn version_1_file_loads() {
    older_version_loads(V1, 1);
}

#[test]
fn migrate_prints_a_version_3_file() {
    for (template, version) in [(V1, 1), (V2, 2)] {
        let dir = tmp();
        let text = template
            .replace("{root}", "/tmp/berth-migrate-root")
            .replace("{state}", "/tmp/berth-migrate-state")
            .replace("{socket}", "/tmp/berth-migrate.sock");
        let file = write(dir.path(), "old.toml", &text);
        let out = berthd(&["config", "migrate", &file]);
        out.assert_success();
        let t: toml::Table = toml::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("migrated v{version} is not TOML: {e}\n{}", out.stdout));
        assert_eq!(t["version"].as_integer(), Some(3), "{}", out.stdout);
        assert_eq!(t["root"].as_str(), Some("/tmp/berth-migrate-root"));
        assert_eq!(t["state"].as_str(), Some("/tmp/berth-migrate-state"));
        assert_eq!(
            t["grpc"]["address"].as_str(),
            Some("/tmp/berth-migrate.sock")
        );
        let plugins = t
            .get("plugins")
            .and_then(|p| p.as_table())
            .unwrap_or_else(|| panic!("no plugins in the migrated v{version}:\n{}", out.stdout));
        assert!(
            plugins.keys().all(|k| k.starts_with("io.containerd.")),
            "short plugin names left in the migrated v{version}: {:?}",
            plugins.keys().collect::<Vec<_>>()
        );
        assert!(
            !plugins.contains_key("io.containerd.grpc.v1.cri")
                || !plugins["io.containerd.grpc.v1.cri"]
                    .as_table()
                    .is_some_and(|c| c.contains_key("containerd")),
            "the CRI table was not split: {}",
            out.stdout
        );

        // The migrated file checks cleanly, without a migration notice.
        let migrated = write(dir.path(), "new.toml", &out.stdout);
        let check = berthd(&["config", "check", &migrated]);
        check.assert_success();
        assert!(
            migration_notices(&check.stderr).is_empty() && warn_lines(&check.stderr).is_empty(),
            "{check}"
        );
    }
}

const UNKNOWN: &str = r#"version = 3
root = "{root}"
state = "{state}"
bogus_top_key = 1

[grpc]
address = "{socket}"
bogus_grpc_key = 2

[plugins."io.containerd.metadata.v1.sled"]
bogus_sled_key = true
"#;

/// The line of `text` that names `key`, which must also name `section`.
fn assert_warned(text: &str, key: &str, section: &str) {
    let line = text
        .lines()
        .find(|l| l.contains(key))
        .unwrap_or_else(|| panic!("no warning names {key:?}:\n{text}"));
    assert!(
        line.contains(section),
        "the warning for {key:?} does not name its section {section:?}: {line}"
    );
}

#[test]
fn unknown_keys_warn_with_their_section() {
    let dir = tmp();
    let file = write(
        dir.path(),
        "unknown.toml",
        &UNKNOWN
            .replace("{root}", "/tmp/berth-unknown-root")
            .replace("{state}", "/tmp/berth-unknown-state")
            .replace("{socket}", "/tmp/berth-unknown.sock"),
    );
    let out = berthd(&["config", "check", &file]);
    assert!(
        out.success(),
        "unknown keys are warnings, not errors: {out}"
    );
    assert_warned(&out.stderr, "bogus_top_key", "");
    assert_warned(&out.stderr, "bogus_grpc_key", "grpc");
    assert_warned(
        &out.stderr,
        "bogus_sled_key",
        "io.containerd.metadata.v1.sled",
    );
    assert!(
        !Path::new("/tmp/berth-unknown-root").exists(),
        "check created the root"
    );

    // A daemon started on it serves and logs the same warnings.
    let d = Daemon::start_with(Kind::Berthd, Options::with_config(UNKNOWN));
    d.ctr_ok(["version"]);
    let warns = warn_lines(&d.log()).join("\n");
    assert_warned(&warns, "bogus_top_key", "");
    assert_warned(&warns, "bogus_grpc_key", "grpc");
    assert_warned(&warns, "bogus_sled_key", "io.containerd.metadata.v1.sled");
}

const BROKEN: &str = r#"version = 3
root = "{dir}/fresh-root"
state = "{dir}/fresh-state"
[grpc
address = "{socket}"
"#;

#[test]
fn syntax_error_names_line_and_column_and_creates_nothing() {
    let mut d = Daemon::spawn(Kind::Berthd, Options::with_config(BROKEN)).expect("spawn");
    let status = d
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("berthd kept running on a broken config: {e:#}"));
    assert!(
        !status.success(),
        "berthd exited {status} on a broken config"
    );
    let log = d.log().to_lowercase();
    assert!(
        log.contains("line") && log.contains("column"),
        "no line and column in:\n{log}"
    );
    assert!(log.contains("line 4"), "the error is on line 4:\n{log}");
    let root = d.dir().join("fresh-root");
    assert!(!root.exists(), "berthd created {}", root.display());
    assert!(
        !d.dir().join("fresh-state").exists(),
        "berthd created its state"
    );
    assert!(!d.socket().exists(), "berthd created its socket");

    let check = berthd(&["config", "check", &d.config_path().to_string_lossy()]);
    assert!(
        !check.success(),
        "config check passed a broken file: {check}"
    );
    let err = check.stderr.to_lowercase();
    assert!(
        err.contains("line 4") && err.contains("column"),
        "no line and column: {check}"
    );
}

#[test]
fn check_of_a_missing_file_fails() {
    let out = berthd(&["config", "check", "/nonexistent/berth.toml"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("/nonexistent/berth.toml"), "{out}");
}
