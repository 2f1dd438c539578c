//! `berth pull --http-dump` and `--http-trace` (issue 5, acceptance 5; SPEC T6, containerd PR
//! 10762), against Debian's docker-registry in token mode with credentials, so that a password,
//! basic credentials and bearer tokens all cross the wire:
//!
//! - the dump reaches the client (on its standard error, through the stream it opened) with
//!   requests and responses, and none of the secrets: the password, its basic encoding and every
//!   token the token server handed out are absent, the redaction marker is present;
//! - trace events land in berthd's log at debug level, naming the registry, and only when asked.
//!
//! Not calibrated: `berth pull` drives the transfer service, which Debian's containerd 1.6 does
//! not have; its `ctr pull --http-dump` dumps on the client side, with no daemon involved.

use std::time::Duration;

use berth_integration::images::{self, LayerCompression, TestImage};
use berth_integration::registry::{Registry, RegistryOptions};
use berth_integration::token_server::TokenServerOptions;
use berth_integration::{CmdOutput, Daemon, Kind, Options, berth_binary, run_command};

const REPO_TAG: &str = "library/busybox:debug";
const USER: &str = "dumpuser";
const PASSWORD: &str = "dump-pass-4417";
const REDACTED: &str = "<redacted>";

fn busybox() -> TestImage {
    images::busybox(
        "docker.io/library/berth-busybox:test",
        LayerCompression::Gzip,
    )
    .expect("building the busybox test image")
}

fn token_registry(image: &TestImage) -> Registry {
    let reg = Registry::start(RegistryOptions::token(TokenServerOptions {
        credentials: Some((USER.into(), PASSWORD.into())),
        ..TokenServerOptions::default()
    }))
    .expect("starting docker-registry with token auth");
    reg.push_tagged(&image.layout, "test", REPO_TAG)
        .expect("pushing busybox");
    reg
}

fn pull(d: &Daemon, ns: &str, reg: &Registry, extra: &[&str]) -> CmdOutput {
    let user = format!("{USER}:{PASSWORD}");
    let mut cmd = std::process::Command::new(berth_binary().expect("the berth binary"));
    cmd.arg("--address")
        .arg(d.socket())
        .args(["--namespace", ns, "pull", "--progress", "plain"])
        .args(["--plain-http", "--no-unpack", "--user", &user])
        .args(extra)
        .arg(reg.reference(REPO_TAG))
        .env_remove("BERTH_ADDRESS")
        .env_remove("BERTH_NAMESPACE")
        .env_remove("BERTH_SNAPSHOTTER");
    let out = run_command(&mut cmd, Duration::from_secs(120)).expect("running berth pull");
    assert!(
        out.success(),
        "berth pull {extra:?}: {out}\n{}",
        d.log_tail()
    );
    out
}

/// Standard base64 of `user:password`, as a basic `Authorization` header carries it.
fn basic(user: &str, password: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let data = format!("{user}:{password}").into_bytes();
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Asserts that none of the secrets of this registry appear in `text`.
#[track_caller]
fn assert_no_secret(text: &str, reg: &Registry, what: &str) {
    let tokens = reg.token_server().expect("token mode").tokens();
    assert!(!tokens.is_empty(), "the token server handed out tokens");
    assert!(!text.contains(PASSWORD), "{what}: the password leaked");
    assert!(
        !text.contains(&basic(USER, PASSWORD)),
        "{what}: the basic credentials leaked"
    );
    for t in &tokens {
        // A JWT's header (the part before the first dot) is the same for every token of this
        // server; its signature is what makes it a secret.
        let signature = t.rsplit('.').next().unwrap_or(t);
        assert!(
            !text.contains(t.as_str()) && !text.contains(signature),
            "{what}: a bearer token leaked"
        );
    }
}

#[test]
fn http_dump_reaches_the_client_without_secrets() {
    let image = busybox();
    let reg = token_registry(&image);
    let d = Daemon::start(Kind::Berthd);

    let out = pull(&d, "dump", &reg, &["--http-dump"]);
    let dump = &out.stderr;
    eprintln!(
        "--- first lines of the dump ---\n{}",
        dump.lines().take(12).collect::<Vec<_>>().join("\n")
    );
    let manifest_get = format!(
        "GET /v2/{}/manifests/",
        REPO_TAG.split(':').next().unwrap_or("")
    );
    for want in [
        "HEAD /v2/library/busybox/manifests/debug HTTP/1.1",
        manifest_get.as_str(),
        "GET /v2/library/busybox/blobs/sha256:",
        &format!("Host: {}", reg.host()),
        "HTTP/1.1 401 Unauthorized",
        "www-authenticate: Bearer realm=",
        "HTTP/1.1 200 OK",
        "GET /token?",
        "authorization: Bearer <redacted>",
        "authorization: Basic <redacted>",
        "\"token\":\"<redacted>\"",
        "\"access_token\":\"<redacted>\"",
    ] {
        assert!(dump.contains(want), "the dump has {want:?}:\n{dump}");
    }
    assert!(dump.contains(REDACTED));
    assert_no_secret(dump, &reg, "the client's output");
    assert_no_secret(&out.stdout, &reg, "the client's standard output");
    assert_no_secret(&d.log(), &reg, "berthd's log");

    // Without the flag, nothing is dumped.
    let plain = pull(&d, "no-dump", &reg, &[]);
    assert!(
        !plain.stderr.contains("HTTP/1.1") && !plain.stderr.contains("GET /v2/"),
        "no dump unless asked: {plain}"
    );
}

#[test]
fn http_trace_lines_go_to_the_debug_log_naming_the_registry() {
    let image = busybox();
    let reg = token_registry(&image);
    let d = Daemon::start_with(
        Kind::Berthd,
        Options {
            args: vec!["--log-level".into(), "debug".into()],
            ..Options::default()
        },
    );
    let registry_field = format!("registry={}", reg.host());
    let trace_lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains("http trace:") && l.contains(&registry_field))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };

    let out = pull(&d, "no-trace", &reg, &[]);
    assert!(
        trace_lines(&d.log()).is_empty(),
        "no trace unless asked:\n{}",
        d.log_tail()
    );

    let out_traced = pull(&d, "trace", &reg, &["--http-trace"]);
    let lines = trace_lines(&d.log());
    eprintln!("--- trace ---\n{}", lines.join("\n"));
    for want in [
        "http trace: request start",
        "http trace: connect start",
        "http trace: connect done",
        "http trace: response headers",
        "http trace: body done",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(want)),
            "a {want:?} line naming {}:\n{}",
            reg.host(),
            lines.join("\n")
        );
    }
    for field in [
        "first_byte_ms=",
        "reused_connection=",
        "elapsed_ms=",
        "bytes=",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(field)),
            "trace lines carry {field}:\n{}",
            lines.join("\n")
        );
    }
    assert!(
        lines.iter().all(|l| l.contains("DEBUG")),
        "trace lines are at debug level:\n{}",
        lines.join("\n")
    );
    // The trace stays in the daemon: the client prints no trace, and no secret is logged.
    assert!(!out_traced.stderr.contains("http trace"), "{out_traced}");
    assert!(!out.stderr.contains("http trace"), "{out}");
    assert_no_secret(&d.log(), &reg, "berthd's debug log");
}
