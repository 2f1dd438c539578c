//! Acceptance 1 of issue 2: `ctr version` and `ctr plugins ls` against berthd, calibrated on
//! Debian's containerd.

use berth_integration::{Daemon, Kind, calibrated};

/// The gRPC services every daemon must list as `io.containerd.grpc.v1` plugins with status ok.
const GRPC_SERVICES: [&str; 4] = ["version", "introspection", "namespaces", "healthcheck"];

/// Parses `ctr version` output into (section, key, value) triples.
fn parse_version(out: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut v = Vec::new();
    for line in out.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            section = line.trim().trim_end_matches(':').to_string();
            continue;
        }
        if let Some((k, val)) = line.trim().split_once(':') {
            v.push((
                section.clone(),
                k.trim().to_string(),
                val.trim().to_string(),
            ));
        }
    }
    v
}

fn field<'a>(parsed: &'a [(String, String, String)], section: &str, key: &str) -> Option<&'a str> {
    parsed
        .iter()
        .find(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
}

fn ctr_version(kind: Kind) {
    let d = Daemon::start(kind);
    let out = d.ctr_ok(["version"]);
    let parsed = parse_version(&out.stdout);
    let client_version = field(&parsed, "Client", "Version").expect("Client Version");
    let server_version = field(&parsed, "Server", "Version")
        .unwrap_or_else(|| panic!("no Server Version in:\n{}", out.stdout));
    let server_revision = field(&parsed, "Server", "Revision")
        .unwrap_or_else(|| panic!("no Server Revision in:\n{}", out.stdout));
    let uuid = field(&parsed, "Server", "UUID")
        .unwrap_or_else(|| panic!("no Server UUID in:\n{}", out.stdout));
    assert!(!server_version.is_empty(), "{}", out.stdout);
    assert!(!server_revision.is_empty(), "{}", out.stdout);
    assert_eq!(uuid.len(), 36, "UUID {uuid:?} is not a UUID");
    // The Server section has exactly the keys containerd's has.
    let keys: Vec<&str> = parsed
        .iter()
        .filter(|(s, _, _)| s == "Server")
        .map(|(_, k, _)| k.as_str())
        .collect();
    assert_eq!(keys, ["Version", "Revision", "UUID"], "{}", out.stdout);
    match kind {
        // ctr and containerd come from the same Debian package.
        Kind::Containerd => assert_eq!(server_version, client_version),
        Kind::Berthd => {
            assert_ne!(
                server_version, client_version,
                "berthd claims containerd's version"
            );
            assert!(
                !server_version.contains("1.6.") && !server_revision.contains("1.6."),
                "berthd reports a containerd version/revision: {server_version} {server_revision}"
            );
        }
    }
}
calibrated!(ctr_version);

/// Parses `ctr plugins ls` into rows of (type, id, platforms, status).
fn plugin_rows(out: &str) -> Vec<[String; 4]> {
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["TYPE", "ID", "PLATFORMS", "STATUS"],
        "header of:\n{out}"
    );
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cols.len(), 4, "row {l:?} of:\n{out}");
            [cols[0], cols[1], cols[2], cols[3]].map(str::to_string)
        })
        .collect()
}

fn ctr_plugins_ls(kind: Kind) {
    let d = Daemon::start(kind);
    let out = d.ctr_ok(["plugins", "ls"]);
    let rows = plugin_rows(&out.stdout);
    for row in &rows {
        assert!(
            ["ok", "skip", "error"].contains(&row[3].as_str()),
            "bad status in {row:?}"
        );
        assert!(row[0].starts_with("io.containerd."), "bad type in {row:?}");
    }
    for id in GRPC_SERVICES {
        let row = rows
            .iter()
            .find(|r| r[0] == "io.containerd.grpc.v1" && r[1] == id)
            .unwrap_or_else(|| panic!("no io.containerd.grpc.v1 {id} in:\n{}", out.stdout));
        assert_eq!(row[3], "ok", "{row:?}");
    }
    // No URI twice.
    let mut uris: Vec<String> = rows.iter().map(|r| format!("{}.{}", r[0], r[1])).collect();
    uris.sort();
    let n = uris.len();
    uris.dedup();
    assert_eq!(n, uris.len(), "duplicate plugin rows:\n{}", out.stdout);

    // ctr filters go to the Plugins RPC.
    let out = d.ctr_ok(["plugins", "ls", "type==io.containerd.grpc.v1"]);
    let filtered = plugin_rows(&out.stdout);
    assert!(filtered.len() >= GRPC_SERVICES.len(), "{}", out.stdout);
    assert!(
        filtered.iter().all(|r| r[0] == "io.containerd.grpc.v1"),
        "filter not applied:\n{}",
        out.stdout
    );
    assert!(filtered.len() < rows.len() || rows.iter().all(|r| r[0] == "io.containerd.grpc.v1"));
}
calibrated!(ctr_plugins_ls);

fn ctr_plugins_ls_detailed(kind: Kind) {
    let d = Daemon::start(kind);
    let out = d.ctr_ok(["plugins", "ls", "-d"]);
    // Blocks of "Type:" followed by "ID:".
    let mut pairs = Vec::new();
    let mut ty = None;
    for line in out.stdout.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Type:") {
            ty = Some(v.trim().to_string());
        } else if let Some(v) = t.strip_prefix("ID:") {
            pairs.push((ty.clone().expect("Type: before ID:"), v.trim().to_string()));
        }
    }
    for id in GRPC_SERVICES {
        assert!(
            pairs
                .iter()
                .any(|(t, i)| t == "io.containerd.grpc.v1" && i == id),
            "no io.containerd.grpc.v1 {id} in detailed output:\n{}",
            out.stdout
        );
    }
    // The detailed listing has as many plugins as the table.
    let table = d.ctr_ok(["plugins", "ls"]);
    assert_eq!(
        pairs.len(),
        table.stdout.lines().count() - 1,
        "{}",
        out.stdout
    );
}
calibrated!(ctr_plugins_ls_detailed);
