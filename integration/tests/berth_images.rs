//! `berth images import|export` against berthd: one multi-layer archive imported plain and
//! compressed (gzip, zstd, xz; from a file and from standard input), unpacked into overlayfs
//! and native; broken archives refused with an error naming the problem and leaving nothing
//! behind once collected; an export re-imported elsewhere gives the same manifest.
//!
//! Not calibrated: the `berth` CLI drives containerd's transfer and streaming services, which
//! Debian's containerd 1.6 does not have (they came with containerd 1.7; `ctr images import`
//! uses them from 2.0). `ctr` 1.6 still checks the results (images, content, snapshots).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_integration::api::{Rng, sha256_digest as sha256};
use berth_integration::{
    CmdOutput, Daemon, Input, Kind, berth_binary, run_command, run_command_with_input,
};

const NAME: &str = "docker.io/library/layers:1";

/// The OCI architecture of this machine, so the archive's image is the host's and unpacks.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Runs `berth --address <socket> --namespace NS ARGS` (with `input` on its standard input).
fn berth_with(d: &Daemon, ns: &str, args: &[&str], input: Input) -> CmdOutput {
    let mut cmd = Command::new(berth_binary().expect("the berth binary"));
    cmd.arg("--address")
        .arg(d.socket())
        .arg("--namespace")
        .arg(ns)
        .args(args)
        .env_remove("BERTH_ADDRESS")
        .env_remove("BERTH_NAMESPACE")
        .env_remove("BERTH_SNAPSHOTTER");
    run_command_with_input(&mut cmd, input, Duration::from_secs(120)).expect("running berth")
}

fn berth(d: &Daemon, ns: &str, args: &[&str]) -> CmdOutput {
    berth_with(d, ns, args, Input::Null)
}

#[track_caller]
fn berth_ok(d: &Daemon, ns: &str, args: &[&str]) -> CmdOutput {
    let out = berth(d, ns, args);
    if !out.success() {
        panic!("berth failed: {out}\n{}", d.log_tail());
    }
    out
}

/// A layer tar from (path, content) entries; a path ending in `/` is a directory.
fn layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        if path.ends_with('/') {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder
                .append_data(&mut header, path, std::io::empty())
                .expect("dir");
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            builder.append_data(&mut header, path, *data).expect("file");
        }
    }
    builder.into_inner().expect("tar")
}

/// What to break in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    None,
    /// Bytes of the last layer flipped after its digest was taken.
    CorruptLayer,
    /// The manifest names a layer digest that is not in the archive.
    WrongLayerDigest,
}

/// An OCI layout archive (plain tar) of one three-layer image, uncompressed layers.
struct Archive {
    bytes: Vec<u8>,
    manifest: String,
    top_chain: String,
    /// The digest the error should name (`Flaw::CorruptLayer`, `Flaw::WrongLayerDigest`).
    culprit: String,
    /// Where the last layer's bytes start in `bytes`.
    last_layer_at: usize,
    last_layer_len: usize,
}

fn archive(flaw: Flaw) -> Archive {
    let mut rng = Rng::new(0xB3A7_1A6E);
    let lib = rng.bytes(200 * 1024 + 13);
    let data = rng.bytes(300 * 1024 + 7);
    let layers = [
        layer(&[
            ("etc/", b""),
            ("etc/hello", b"hello\n"),
            ("etc/gone", b"bye\n"),
            ("usr/", b""),
            ("usr/lib/", b""),
            ("usr/lib/blob", &lib),
        ]),
        layer(&[("etc/", b""), ("etc/.wh.gone", b""), ("etc/new", b"new\n")]),
        layer(&[("opt/", b""), ("opt/data", &data)]),
    ];
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    let mut chain = diff_ids[0].clone();
    for d in &diff_ids[1..] {
        chain = sha256(format!("{chain} {d}").as_bytes());
    }
    let config = format!(
        r#"{{"architecture":"{}","os":"linux","config":{{"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        host_arch(),
        diff_ids.join(r#"",""#)
    );
    let mut listed: Vec<(String, usize)> = layers.iter().map(|l| (sha256(l), l.len())).collect();
    let mut culprit = String::new();
    if flaw == Flaw::WrongLayerDigest {
        let other = b"this layer is not in the archive".to_vec();
        listed[1] = (sha256(&other), other.len());
        culprit = listed[1].0.clone();
    }
    let layer_json: Vec<String> = listed
        .iter()
        .map(|(d, s)| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{s}}}"#
            )
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
        sha256(config.as_bytes()),
        config.len(),
        layer_json.join(",")
    );
    let manifest_digest = sha256(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{},"annotations":{{"io.containerd.image.name":"{NAME}","org.opencontainers.image.ref.name":"1"}},"platform":{{"architecture":"{}","os":"linux"}}}}]}}"#,
        manifest.len(),
        host_arch()
    );
    let mut blobs: Vec<Vec<u8>> = vec![config.into_bytes(), manifest.into_bytes()];
    blobs.extend(layers.iter().cloned());
    let last = blobs.len() - 1;
    let mut out = tar::Builder::new(Vec::new());
    let add = |out: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        out.append_data(&mut header, name, data).expect("entry");
    };
    add(&mut out, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add(&mut out, "index.json", index.as_bytes());
    for (i, blob) in blobs.iter().enumerate() {
        let digest = sha256(blob);
        let mut stored = blob.clone();
        if i == last && flaw == Flaw::CorruptLayer {
            let mid = stored.len() / 2;
            for b in &mut stored[mid..mid + 16] {
                *b ^= 0xff;
            }
            culprit = digest.clone();
        }
        add(
            &mut out,
            &format!("blobs/sha256/{}", &digest["sha256:".len()..]),
            &stored,
        );
    }
    let bytes = out.into_inner().expect("archive");
    let probe = &layers[2][..512];
    let last_layer_at = bytes
        .windows(probe.len())
        .position(|w| w == probe)
        .expect("the last layer is in the archive");
    Archive {
        bytes,
        manifest: manifest_digest,
        top_chain: chain,
        culprit,
        last_layer_at,
        last_layer_len: layers[2].len(),
    }
}

/// `tool -c SRC > DEST` (gzip, zstd, xz, bzip2 all take `-c`).
fn compress(tool: &str, src: &Path, dest: &Path) {
    let out = std::fs::File::create(dest).expect("create");
    let status = Command::new(tool)
        .arg("-c")
        .arg(src)
        .stdout(Stdio::from(out))
        .status()
        .unwrap_or_else(|e| panic!("running {tool} (scripts/install-deps.sh installs it): {e}"));
    assert!(status.success(), "{tool} -c {} failed", src.display());
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

/// The names and digests `berth images ls` prints (header checked, media type dropped).
fn berth_ls(d: &Daemon, ns: &str) -> Vec<(String, String)> {
    let out = berth_ok(d, ns, &["images", "ls"]);
    let mut rows = out.stdout.lines();
    let header = rows.next().unwrap_or_default();
    assert!(
        header.starts_with("NAME") && header.contains("DIGEST") && header.contains("MEDIA TYPE"),
        "{out}"
    );
    rows.map(|r| {
        let cells: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(cells.len(), 3, "NAME DIGEST MEDIA TYPE: {r:?}");
        (cells[0].to_owned(), cells[1].to_owned())
    })
    .collect()
}

/// Snapshot names of `ctr snapshots ls` for a snapshotter.
fn snapshots(d: &Daemon, ns: &str, snapshotter: &str) -> Vec<String> {
    let out = d.ctr_ok(["-n", ns, "snapshots", "--snapshotter", snapshotter, "ls"]);
    out.stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// A synchronous collection: a lease deleted with `--sync` waits for one.
fn collect_garbage(d: &Daemon, ns: &str) {
    d.ctr_ok(["-n", ns, "leases", "create", "--id", "gc-now"]);
    d.ctr_ok(["-n", ns, "leases", "rm", "--sync", "gc-now"]);
}

/// Imports `file` (or standard input) into `ns` and checks what it printed and stored.
fn import_and_check(d: &Daemon, ns: &str, a: &Archive, args: &[&str], input: Input) {
    let mut argv = vec!["images", "import", "--progress", "plain"];
    argv.extend_from_slice(args);
    let out = berth_with(d, ns, &argv, input);
    assert!(
        out.success(),
        "berth {argv:?} in {ns}: {out}\n{}",
        d.log_tail()
    );
    assert_eq!(
        lines(&out.stdout),
        [format!("{NAME}\t{}", a.manifest)],
        "one NAME<TAB>DIGEST line: {out}"
    );
    // Plain progress: the blobs stored, the layers unpacked (unless not asked), the image saved.
    for word in ["complete", "extracted", "saved", "Completed import"] {
        let expected = word != "extracted" || !args.contains(&"--no-unpack");
        assert_eq!(
            out.stderr.contains(word),
            expected,
            "{word:?} in the progress: {out}"
        );
    }
    assert_eq!(berth_ls(d, ns), [(NAME.to_owned(), a.manifest.clone())]);
    let ctr_ls = d.ctr_ok(["-n", ns, "images", "ls", "-q"]);
    assert_eq!(lines(&ctr_ls.stdout), [NAME], "{ctr_ls}");
}

#[test]
fn import_plain_and_compressed_archives_unpacks_and_lists() {
    let d = Daemon::start(Kind::Berthd);
    let a = archive(Flaw::None);
    let dir = d.dir().join("archives");
    std::fs::create_dir_all(&dir).expect("dir");
    let plain = write(&dir, "layers.tar", &a.bytes);
    let gz = dir.join("layers.tar.gz");
    let zst = dir.join("layers.tar.zst");
    let xz = dir.join("layers.tar.xz");
    compress("gzip", &plain, &gz);
    compress("zstd", &plain, &zst);
    compress("xz", &plain, &xz);

    for (ns, file) in [
        ("plain", &plain),
        ("gzip", &gz),
        ("zstd", &zst),
        ("xz", &xz),
    ] {
        let file = file.to_string_lossy().into_owned();
        import_and_check(&d, ns, &a, &[&file], Input::Null);
        let snaps = snapshots(&d, ns, "overlayfs");
        assert!(
            snaps.contains(&a.top_chain),
            "{ns}: top chain id {} unpacked into overlayfs: {snaps:?}",
            a.top_chain
        );
        assert_eq!(snaps.len(), 3, "{ns}: one snapshot per layer: {snaps:?}");
    }

    // From standard input, into native: nothing goes to overlayfs then.
    import_and_check(
        &d,
        "native",
        &a,
        &["--snapshotter", "native", "-"],
        Input::File(xz.clone()),
    );
    let native = snapshots(&d, "native", "native");
    assert!(native.contains(&a.top_chain), "native: {native:?}");
    assert!(snapshots(&d, "native", "overlayfs").is_empty());

    // --no-unpack stores the image and no snapshot.
    import_and_check(
        &d,
        "stored",
        &a,
        &["--no-unpack", &plain.to_string_lossy()],
        Input::Null,
    );
    assert!(snapshots(&d, "stored", "overlayfs").is_empty());
}

#[test]
fn broken_archives_fail_clearly_and_leave_nothing() {
    let d = Daemon::start(Kind::Berthd);
    let dir = d.dir().join("archives");
    std::fs::create_dir_all(&dir).expect("dir");
    let good = archive(Flaw::None);
    let plain = write(&dir, "good.tar", &good.bytes);
    let gz = dir.join("good.tar.gz");
    compress("gzip", &plain, &gz);
    let bz2 = dir.join("good.tar.bz2");
    compress("bzip2", &plain, &bz2);

    let cut_tar = write(
        &dir,
        "cut.tar",
        &good.bytes[..good.last_layer_at + good.last_layer_len / 2],
    );
    let gz_bytes = std::fs::read(&gz).expect("gz");
    let cut_gz = write(&dir, "cut.tar.gz", &gz_bytes[..gz_bytes.len() / 2]);
    let corrupt = archive(Flaw::CorruptLayer);
    let corrupt_tar = write(&dir, "corrupt.tar", &corrupt.bytes);
    let wrong = archive(Flaw::WrongLayerDigest);
    let wrong_tar = write(&dir, "wrong-digest.tar", &wrong.bytes);
    let mut made_up = b"BRTHZ\x01\x02\x03".to_vec();
    made_up.extend(Rng::new(7).bytes(4096));
    let made_up = write(&dir, "made-up.tar.brz", &made_up);

    let cases: [(&str, &Path, Vec<&str>); 6] = [
        ("truncated", &cut_tar, vec!["truncated"]),
        ("truncated-gzip", &cut_gz, vec!["gzip", "truncated"]),
        ("corrupt", &corrupt_tar, vec!["digest", &corrupt.culprit]),
        ("bzip2", &bz2, vec!["bzip2", "not supported"]),
        (
            "unknown",
            &made_up,
            vec!["neither a tar nor a gzip, zstd or xz"],
        ),
        (
            "wrong-digest",
            &wrong_tar,
            vec![&wrong.culprit, "not in the archive"],
        ),
    ];
    for (ns, file, needles) in &cases {
        let file = file.to_string_lossy().into_owned();
        let out = berth(&d, ns, &["images", "import", "--progress", "none", &file]);
        assert_eq!(out.status.code(), Some(1), "{ns}: exit status 1: {out}");
        assert!(out.stdout.is_empty(), "{ns}: nothing on stdout: {out}");
        let err = lines(&out.stderr);
        assert_eq!(err.len(), 1, "{ns}: one line of error: {out}");
        assert!(
            err[0].starts_with(&format!("berth: importing {file}: ")),
            "{ns}: says what failed: {out}"
        );
        for needle in needles {
            out.assert_failure_contains(needle);
        }

        let images = d.ctr_ok(["-n", ns, "images", "ls", "-q"]);
        assert!(images.stdout.trim().is_empty(), "{ns}: no image: {images}");
        collect_garbage(&d, ns);
        let content = d.ctr_ok(["-n", ns, "content", "ls", "-q"]);
        assert!(
            content.stdout.trim().is_empty(),
            "{ns}: blobs left: {content}"
        );
        let active = d.ctr_ok(["-n", ns, "content", "active"]);
        assert_eq!(
            lines(&active.stdout).len(),
            1,
            "{ns}: ingests left: {active}"
        );
        let snaps = snapshots(&d, ns, "overlayfs");
        assert!(snaps.is_empty(), "{ns}: snapshots left: {snaps:?}");
    }

    // A local read error is the cause reported, not what the daemon made of the short stream.
    let out = berth(
        &d,
        "local",
        &[
            "images",
            "import",
            "--progress",
            "none",
            &dir.to_string_lossy(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.stderr
            .starts_with(&format!("berth: importing {}: reading it: ", dir.display())),
        "{out}"
    );
    out.assert_failure_contains("is a directory");

    // The good archive still imports: the failures left nothing in the way.
    import_and_check(&d, "after", &good, &[&plain.to_string_lossy()], Input::Null);
}

#[test]
fn export_then_import_elsewhere_keeps_the_manifest() {
    let d = Daemon::start(Kind::Berthd);
    let a = archive(Flaw::None);
    let dir = d.dir().join("archives");
    std::fs::create_dir_all(&dir).expect("dir");
    let plain = write(&dir, "layers.tar", &a.bytes);
    import_and_check(&d, "source", &a, &[&plain.to_string_lossy()], Input::Null);

    let exported = dir.join("exported.tar");
    let exported_arg = exported.to_string_lossy().into_owned();
    let out = berth_ok(
        &d,
        "source",
        &[
            "images",
            "export",
            "--progress",
            "plain",
            &exported_arg,
            NAME,
        ],
    );
    assert!(out.stdout.is_empty(), "the archive went to the file: {out}");
    let bytes = std::fs::read(&exported).expect("the exported archive");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".partial")),
        "no temporary file left: {names:?}"
    );
    // The same export on standard output is the same archive (export is deterministic).
    let to_stdout = berth_ok(
        &d,
        "source",
        &["images", "export", "--progress", "none", "-", NAME],
    );
    assert!(
        to_stdout.stdout_bytes == bytes,
        "stdout export differs from the file ({} vs {} bytes)",
        to_stdout.stdout_bytes.len(),
        bytes.len()
    );

    // Into a fresh namespace, under one more name (the index's).
    let out = berth_ok(
        &d,
        "fresh",
        &[
            "images",
            "import",
            "--progress",
            "none",
            "--index-name",
            "example.com/renamed:1",
            &exported_arg,
        ],
    );
    let printed = lines(&out.stdout);
    assert_eq!(printed.len(), 2, "index name and archive name: {out}");
    let index_line = printed
        .iter()
        .find(|l| l.starts_with("example.com/renamed:1\t"))
        .unwrap_or_else(|| panic!("the index name is printed: {out}"));
    assert!(
        printed.contains(&format!("{NAME}\t{}", a.manifest).as_str()),
        "the image keeps its manifest digest: {out}"
    );
    let index_digest = index_line.split('\t').nth(1).expect("digest");
    let index = d.ctr_ok(["-n", "fresh", "content", "get", index_digest]);
    assert!(
        index.stdout.contains(&a.manifest),
        "the renamed index lists the same manifest: {index}"
    );
    let snaps = snapshots(&d, "fresh", "overlayfs");
    assert!(snaps.contains(&a.top_chain), "unpacked again: {snaps:?}");

    // Exporting what is not there fails naming it, and leaves no file.
    let missing = dir.join("missing.tar");
    let out = berth(
        &d,
        "fresh",
        &[
            "images",
            "export",
            "--progress",
            "none",
            &missing.to_string_lossy(),
            "example.com/absent:1",
        ],
    );
    out.assert_failure_contains("example.com/absent:1");
    assert!(
        out.stderr
            .starts_with("berth: exporting example.com/absent:1: "),
        "{out}"
    );
    assert!(!missing.exists(), "no archive for a failed export");
    assert_eq!(
        std::fs::read_dir(&dir).expect("dir").count(),
        names.len(),
        "no temporary file left after a failure"
    );
}

/// With nothing listening, the CLI names the socket and the way to choose another.
#[test]
fn a_socket_without_daemon_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("none.sock");
    let mut cmd = Command::new(berth_binary().expect("the berth binary"));
    cmd.arg("--address")
        .arg(&socket)
        .args(["images", "ls"])
        .env_remove("BERTH_NAMESPACE");
    let out = run_command(&mut cmd, Duration::from_secs(30)).expect("run berth");
    assert_eq!(out.status.code(), Some(1), "{out}");
    out.assert_failure_contains(&socket.to_string_lossy());
    out.assert_failure_contains("--address");
}
