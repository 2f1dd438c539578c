//! Offline test images, built with Debian's tools and cached per checkout.
//!
//! - [`busybox`]: busybox-static with its applets as symlinks (layer 1) and a small `/etc`,
//!   `/root`, `/tmp`, `/var` (layer 2).
//! - [`multilayer`]: the same two busybox layers, then about `total_mb` MiB over four more
//!   layers: many small files, deep directories, modes, owners, `user.*` xattrs, symlinks
//!   (absolute, relative, dangling, long), hard links (within a layer, and to files of earlier
//!   layers the way Docker and umoci write them: the target again plus the link), devices, a
//!   fifo, odd names and times; then big files (incompressible, text, mixed, zeros); then
//!   changes (whiteouts of files, of a directory and of a big file, rewritten contents,
//!   metadata-only changes, type changes: umoci writes a directory that became a symlink as
//!   the symlink followed by whiteouts of the old entries below it); last a layer written here
//!   with opaque directories (marker before and after the directory's entries) and
//!   hand-written whiteouts.
//! - [`hardlink_to_lower`]: the busybox layers and a layer holding only a hard link to
//!   `/bin/busybox`, a file of an earlier layer. containerd 1.6 cannot apply that layer straight
//!   into an overlay upper directory (its `link(2)` finds no target there), only onto a full
//!   copy (`native`).
//!
//! How: `umoci init/new/config/unpack` make the layout and a bundle; each layer is an edit of
//! the bundle's rootfs followed by `umoci repack --refresh-bundle` (umoci 0.4 writes every layer
//! as tar+gzip, with the entries' own mtimes in whole seconds). umoci cannot write opaque
//! markers (it writes one whiteout per removed entry) nor a hard link whose target only an
//! earlier layer has (it adds the target again), so those layers are written here with the
//! `tar` crate and appended to the layout (blob, config `diff_ids` and history, manifest,
//! index). For [`LayerCompression::None`] every layer blob is then replaced by its
//! decompressed tar. The OCI archive is a tar of the layout whose index carries the
//! `io.containerd.image.name` annotation (ctr 1.6 names an imported image from it, else it
//! makes up `import-<date>` names); the Docker archive is `skopeo copy ... docker-archive:`
//! (its layers are always uncompressed tars).
//!
//! Deterministic: contents come from a fixed seed and every entry of a layer gets that layer's
//! time (entries edited during the build, recognised by their fresh mtime, are set to
//! `BASE_TIME + n days` for layer `n` before each repack), configs and history carry fixed
//! times. The same call gives the same digests on the same Debian tools.
//!
//! Cache: `<target dir>/berth-test-images/<key>/` (target dir: `$CARGO_TARGET_DIR` or
//! `<workspace>/target`), the key naming the kind, parameters, compression, name and
//! [`FORMAT`]. A build holds `flock` on `<key>.lock` (test binaries run in parallel) and writes
//! `complete` last; a directory without it (a killed build) is removed and built again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::api::{Rng, rfc3339, sha256_digest};
use crate::{run_command, workspace_root};

/// Bumped whenever the builder changes what it makes, so stale cached images are rebuilt.
pub const FORMAT: u32 = 1;

/// The time of the image config; the entries of layer `n` (counted from 1) get `n` days later.
pub const BASE_TIME: i64 = 1_700_000_000;

const DAY: i64 = 86_400;
const MIB: u64 = 1 << 20;

/// Layer compression inside the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerCompression {
    /// Plain tar layers (`application/vnd.oci.image.layer.v1.tar`).
    None,
    /// gzip-compressed layers (`application/vnd.oci.image.layer.v1.tar+gzip`), as umoci writes.
    Gzip,
}

impl LayerCompression {
    fn key(self) -> &'static str {
        match self {
            LayerCompression::None => "tar",
            LayerCompression::Gzip => "gzip",
        }
    }
}

/// A built test image.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// The image name, e.g. `docker.io/library/berth-busybox:1`.
    pub name: String,
    /// OCI image layout directory.
    pub layout: PathBuf,
    /// OCI archive (tar of the layout, index annotated with the name as ctr expects).
    pub oci_archive: PathBuf,
    /// Docker archive (skopeo docker-archive), RepoTags = name.
    pub docker_archive: PathBuf,
    /// Digest of the image manifest (`sha256:...`) in the layout and the OCI archive.
    pub manifest_digest: String,
    /// Chain id per layer, top last.
    pub chain_ids: Vec<String>,
    /// Sum of the layer tars' sizes.
    pub uncompressed_bytes: u64,
    /// Digest of the image config (the same in both archives).
    pub config_digest: String,
    /// Diff id per layer (digest of the uncompressed tar), bottom first.
    pub diff_ids: Vec<String>,
    /// Digest of each layer blob of the OCI manifest, bottom first.
    pub layer_digests: Vec<String>,
}

/// A busybox-static based image: layer 1 is `/bin/busybox` with every applet as a symlink
/// (absolute in `/bin`, relative elsewhere), layer 2 a small `/etc` (passwd, group, hosts, ...)
/// with `/root`, `/tmp` and `/var`.
pub fn busybox(name: &str, compression: LayerCompression) -> Result<TestImage> {
    cached("busybox", "", name, compression, |dir| {
        let mut build = Build::start(dir, name)?;
        busybox_layers(&mut build)?;
        build.finish(name, compression)
    })
}

/// A multi-layer image of about `total_mb` MiB of layer tars (at least 8) on the two busybox
/// layers of [`busybox`] (so the two images share them), with whiteouts, opaque directories,
/// hard links (within a layer and to files of earlier layers), symlinks (absolute and
/// relative), modes, owners, `user.*` xattrs, empty files, deep directories, many small files
/// and a few big ones. See the module documentation for the layers.
pub fn multilayer(name: &str, total_mb: u64, compression: LayerCompression) -> Result<TestImage> {
    let total_mb = total_mb.max(8);
    cached(
        "multilayer",
        &format!("{total_mb}m"),
        name,
        compression,
        |dir| {
            let mut build = Build::start(dir, name)?;
            busybox_layers(&mut build)?;
            let budget = total_mb * MIB;
            let mut rng = Rng::new(0x6265_7274_685f_6d6c ^ total_mb);
            let text = TextPool::new(&mut rng);
            files_layer(&mut build, &mut rng, &text, budget)?;
            big_layer(&mut build, &mut rng, &text, budget)?;
            changes_layer(&mut build, &mut rng, &text, budget)?;
            opaque_layer(&mut build)?;
            build.finish(name, compression)
        },
    )
}

/// The busybox layers and a third layer holding only `bin/` and `bin/busybox-hard`, a hard
/// link to `bin/busybox` of layer 1. Applies onto a full copy of the lower layers (`native`);
/// containerd 1.6 fails it straight into an overlay upper directory.
pub fn hardlink_to_lower(name: &str, compression: LayerCompression) -> Result<TestImage> {
    cached("hardlink-to-lower", "", name, compression, |dir| {
        let mut build = Build::start(dir, name)?;
        busybox_layers(&mut build)?;
        let time = build.layer_time();
        let mut layer = TarLayer::new(time);
        layer.dir("bin", 0o755, 0, 0);
        layer.hard_link("bin/busybox-hard", "bin/busybox", 0o755);
        build.append_tar(
            layer.finish()?,
            "berth-test-images: hard link to a lower file",
        )?;
        build.finish(name, compression)
    })
}

/// Where the built images are cached: `<target dir>/berth-test-images`.
pub fn images_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_relative() {
        workspace_root().join(target)
    } else {
        target
    };
    target.join("berth-test-images")
}

/// The chain ids of a stack of diff ids (OCI image spec): the first is the first diff id, each
/// next `sha256("<previous chain id> <diff id>")`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => sha256_digest(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The cache.

/// What a build records in `image.json`; paths are rebuilt from the cache directory.
struct Record {
    manifest_digest: String,
    config_digest: String,
    diff_ids: Vec<String>,
    layer_digests: Vec<String>,
    uncompressed_bytes: u64,
}

const LAYOUT_DIR: &str = "layout";
const BUNDLE_DIR: &str = "bundle";
const OCI_ARCHIVE: &str = "image.oci.tar";
const DOCKER_ARCHIVE: &str = "image.docker.tar";
const RECORD: &str = "image.json";
const COMPLETE: &str = "complete";

fn cached(
    kind: &str,
    params: &str,
    name: &str,
    compression: LayerCompression,
    build: impl FnOnce(&Path) -> Result<Record>,
) -> Result<TestImage> {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let key = format!("{kind}{params}-{}-{safe}-v{FORMAT}", compression.key());
    let root = images_dir();
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let lock_path = root.join(format!("{key}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening the build lock {}", lock_path.display()))?;
    // Blocks while another test binary builds the same image; released when `lock` drops.
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", lock_path.display()))?;

    let dir = root.join(&key);
    if dir.join(COMPLETE).is_file() {
        match load(&dir, name) {
            Ok(image) => return Ok(image),
            Err(e) => eprintln!(
                "berth-integration: cached image {} unreadable ({e:#}); building it again",
                dir.display()
            ),
        }
    }
    if dir.exists() {
        fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the incomplete build {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let started = std::time::Instant::now();
    let record = build(&dir).with_context(|| {
        format!(
            "building test image {name} in {} (a failed build is retried on the next call)",
            dir.display()
        )
    })?;
    let bundle = dir.join(BUNDLE_DIR);
    if bundle.exists() {
        fs::remove_dir_all(&bundle).with_context(|| format!("removing {}", bundle.display()))?;
    }
    let json = json!({
        "name": name,
        "manifest_digest": record.manifest_digest,
        "config_digest": record.config_digest,
        "diff_ids": record.diff_ids,
        "layer_digests": record.layer_digests,
        "uncompressed_bytes": record.uncompressed_bytes,
    });
    write_synced(&dir.join(RECORD), &serde_json::to_vec_pretty(&json)?)?;
    write_synced(&dir.join(COMPLETE), b"")?;
    eprintln!(
        "berth-integration: built test image {name} ({key}) in {:.1?}",
        started.elapsed()
    );
    load(&dir, name)
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn load(dir: &Path, name: &str) -> Result<TestImage> {
    let path = dir.join(RECORD);
    let json: Value = serde_json::from_slice(
        &fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let text = |k: &str| {
        json[k]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{} has no {k}", path.display()))
    };
    let list = |k: &str| -> Result<Vec<String>> {
        json[k]
            .as_array()
            .ok_or_else(|| anyhow!("{} has no {k}", path.display()))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| anyhow!("{} has a bad {k}", path.display()))
            })
            .collect()
    };
    if text("name")? != name {
        bail!("{} was built for another name", path.display());
    }
    let diff_ids = list("diff_ids")?;
    let image = TestImage {
        name: name.to_owned(),
        layout: dir.join(LAYOUT_DIR),
        oci_archive: dir.join(OCI_ARCHIVE),
        docker_archive: dir.join(DOCKER_ARCHIVE),
        manifest_digest: text("manifest_digest")?,
        chain_ids: chain_ids(&diff_ids),
        uncompressed_bytes: json["uncompressed_bytes"]
            .as_u64()
            .ok_or_else(|| anyhow!("{} has no uncompressed_bytes", path.display()))?,
        config_digest: text("config_digest")?,
        diff_ids,
        layer_digests: list("layer_digests")?,
    };
    for p in [&image.oci_archive, &image.docker_archive, &image.layout] {
        if !p.exists() {
            bail!("{} is missing", p.display());
        }
    }
    Ok(image)
}

// ---------------------------------------------------------------------------------------------
// Tools.

fn tool(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found: the test images need Debian's busybox-static, umoci, skopeo and gzip \
         (`apt-get install busybox-static umoci skopeo gzip`, or run scripts/install-deps.sh)"
    )
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(tool(program)?);
    cmd.args(args);
    let out = run_command(&mut cmd, Duration::from_secs(900))?;
    if !out.success() {
        bail!("{out}");
    }
    Ok(out.stdout)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8: move the target directory", p.display()))
}

/// The OCI architecture of this machine.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// The `sha256:` digest of a file, through `sha256sum` (the test crate is built without
/// optimisation, where hashing hundreds of MiB in Rust takes many seconds).
fn file_digest(path: &Path) -> Result<String> {
    let out = run("sha256sum", &["--", path_str(path)?])?;
    let hex = out
        .split_whitespace()
        .next()
        .filter(|h| h.len() == 64)
        .ok_or_else(|| anyhow!("sha256sum printed {out:?} for {}", path.display()))?;
    Ok(format!("sha256:{hex}"))
}

/// Streams `gzip -dc <src>` into `dst` (or only counts it), returning the byte count.
fn gunzip(src: &Path, dst: Option<&Path>) -> Result<u64> {
    let mut child = Command::new(tool("gzip")?)
        .arg("-dc")
        .arg(src)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning gzip -dc")?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no gzip stdout"))?;
    let mut out = match dst {
        Some(p) => Some(BufWriter::with_capacity(
            MIB as usize,
            File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0u64;
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading gzip's output"),
        };
        total += n as u64;
        if let Some(w) = out.as_mut() {
            w.write_all(&buf[..n]).context("writing the layer tar")?;
        }
    }
    if let Some(mut w) = out {
        w.flush().context("writing the layer tar")?;
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().context("waiting for gzip")?;
    if !status.success() {
        bail!("gzip -dc {} failed ({status}): {err}", src.display());
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// The layout and the umoci bundle.

struct Build {
    layout: PathBuf,
    bundle: PathBuf,
    /// `<layout>:<tag>`, as umoci and skopeo name the image.
    image_ref: String,
    tag: String,
    /// Layers made so far.
    layers: i64,
    /// Entries whose mtime is at or after this (and not far in the future) were edited by the
    /// build, and get the current layer's time before a repack.
    fresh_since: i64,
}

impl Build {
    fn start(dir: &Path, name: &str) -> Result<Build> {
        let layout = dir.join(LAYOUT_DIR);
        let bundle = dir.join(BUNDLE_DIR);
        let tag = name
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .map_or("latest", |(_, t)| t)
            .to_owned();
        let layout_str = path_str(&layout)?;
        if layout_str.contains(':') {
            bail!("{layout_str} contains ':', which umoci and skopeo cannot name");
        }
        let image_ref = format!("{layout_str}:{tag}");
        let fresh_since = unix_now() - 5;
        run("umoci", &["init", "--layout", layout_str])?;
        run("umoci", &["new", "--image", &image_ref])?;
        // Before the unpack: repack builds on the manifest the bundle was unpacked from.
        run(
            "umoci",
            &[
                "config",
                "--image",
                &image_ref,
                "--no-history",
                "--created",
                &rfc3339(BASE_TIME),
                "--architecture",
                oci_arch(),
                "--os",
                "linux",
                "--config.cmd",
                "/bin/sh",
                "--config.env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--config.workingdir",
                "/",
            ],
        )?;
        run(
            "umoci",
            &["unpack", "--image", &image_ref, path_str(&bundle)?],
        )?;
        Ok(Build {
            layout,
            bundle,
            image_ref,
            tag,
            layers: 0,
            fresh_since,
        })
    }

    fn rootfs(&self) -> Fs {
        Fs(self.bundle.join("rootfs"))
    }

    /// The time of the layer being made.
    fn layer_time(&self) -> i64 {
        BASE_TIME + (self.layers + 1) * DAY
    }

    /// Makes a layer of what changed in the rootfs since the last one.
    fn repack(&mut self, created_by: &str) -> Result<()> {
        let time = self.layer_time();
        normalize_times(&self.rootfs().0, self.fresh_since, time)?;
        run(
            "umoci",
            &[
                "repack",
                "--refresh-bundle",
                "--history.created",
                &rfc3339(time),
                "--history.created_by",
                created_by,
                "--image",
                &self.image_ref,
                path_str(&self.bundle)?,
            ],
        )?;
        self.layers += 1;
        Ok(())
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| anyhow!("unexpected digest {digest:?} in {}", self.layout.display()))?;
        Ok(self.layout.join("blobs/sha256").join(hex))
    }

    fn read_json(&self, digest: &str) -> Result<Value> {
        let p = self.blob_path(digest)?;
        serde_json::from_slice(&fs::read(&p).with_context(|| format!("reading {}", p.display()))?)
            .with_context(|| format!("parsing {}", p.display()))
    }

    fn put_blob(&self, data: &[u8]) -> Result<(String, u64)> {
        let digest = sha256_digest(data);
        let p = self.blob_path(&digest)?;
        fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
        Ok((digest, data.len() as u64))
    }

    fn index(&self) -> Result<Value> {
        let p = self.layout.join("index.json");
        serde_json::from_slice(&fs::read(&p).with_context(|| format!("reading {}", p.display()))?)
            .with_context(|| format!("parsing {}", p.display()))
    }

    /// The index entry of our tag.
    fn tagged(&self, index: &Value) -> Result<usize> {
        index["manifests"]
            .as_array()
            .and_then(|m| {
                m.iter().position(|d| {
                    d["annotations"]["org.opencontainers.image.ref.name"].as_str()
                        == Some(&self.tag)
                })
            })
            .ok_or_else(|| {
                anyhow!(
                    "{} has no manifest tagged {:?}",
                    self.layout.display(),
                    self.tag
                )
            })
    }

    /// Points the tag at a new manifest (and config), keeping the index entry's annotations.
    fn replace_manifest(&self, manifest: &Value) -> Result<()> {
        let (digest, size) = self.put_blob(&serde_json::to_vec(manifest)?)?;
        let mut index = self.index()?;
        let i = self.tagged(&index)?;
        index["manifests"][i]["digest"] = json!(digest);
        index["manifests"][i]["size"] = json!(size);
        let p = self.layout.join("index.json");
        fs::write(&p, serde_json::to_vec(&index)?)
            .with_context(|| format!("writing {}", p.display()))
    }

    fn manifest(&self) -> Result<Value> {
        let index = self.index()?;
        let i = self.tagged(&index)?;
        let digest = index["manifests"][i]["digest"]
            .as_str()
            .ok_or_else(|| anyhow!("index entry without digest"))?
            .to_owned();
        self.read_json(&digest)
    }

    /// Appends a layer written here (an uncompressed tar, stored gzip-compressed like umoci's).
    fn append_tar(&mut self, tar: Vec<u8>, created_by: &str) -> Result<()> {
        let diff_id = sha256_digest(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).context("compressing a layer")?;
        let (layer_digest, layer_size) = self.put_blob(&gz.finish().context("compressing")?)?;
        let mut manifest = self.manifest()?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| anyhow!("manifest without config"))?
            .to_owned();
        let mut config = self.read_json(&config_digest)?;
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .ok_or_else(|| anyhow!("config without rootfs.diff_ids"))?
            .push(json!(diff_id));
        if !config["history"].is_array() {
            config["history"] = json!([]);
        }
        if let Some(h) = config["history"].as_array_mut() {
            h.push(json!({"created": rfc3339(self.layer_time()), "created_by": created_by}));
        }
        let (cd, cs) = self.put_blob(&serde_json::to_vec(&config)?)?;
        manifest["config"]["digest"] = json!(cd);
        manifest["config"]["size"] = json!(cs);
        manifest["layers"]
            .as_array_mut()
            .ok_or_else(|| anyhow!("manifest without layers"))?
            .push(json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": layer_size,
            }));
        self.replace_manifest(&manifest)?;
        self.layers += 1;
        Ok(())
    }

    /// Compression, annotations, garbage collection and the two archives.
    fn finish(self, name: &str, compression: LayerCompression) -> Result<Record> {
        let layout_str = path_str(&self.layout)?;
        run("umoci", &["gc", "--layout", layout_str])?;
        let mut manifest = self.manifest()?;
        let mut uncompressed_bytes = 0u64;
        let mut layer_digests = Vec::new();
        let layers = manifest["layers"]
            .as_array_mut()
            .ok_or_else(|| anyhow!("manifest without layers"))?;
        for layer in layers.iter_mut() {
            let digest = layer["digest"]
                .as_str()
                .ok_or_else(|| anyhow!("layer without digest"))?
                .to_owned();
            let blob = self.blob_path(&digest)?;
            match compression {
                LayerCompression::Gzip => {
                    uncompressed_bytes += gunzip(&blob, None)?;
                    layer_digests.push(digest);
                }
                LayerCompression::None => {
                    let tmp = self.layout.join("blobs/layer.tar.tmp");
                    uncompressed_bytes += gunzip(&blob, Some(&tmp))?;
                    let plain = file_digest(&tmp)?;
                    let size = fs::metadata(&tmp)?.len();
                    fs::rename(&tmp, self.blob_path(&plain)?)?;
                    layer["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar");
                    layer["digest"] = json!(plain);
                    layer["size"] = json!(size);
                    layer_digests.push(plain);
                }
            }
        }
        if compression == LayerCompression::None {
            // The gzip blobs are unreferenced now: the gc below removes them.
            self.replace_manifest(&manifest)?;
        }
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| anyhow!("manifest without config"))?
            .to_owned();
        let config = self.read_json(&config_digest)?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .ok_or_else(|| anyhow!("config without diff ids"))?
            .iter()
            .filter_map(|d| d.as_str().map(str::to_owned))
            .collect();

        // ctr 1.6 takes the image name from `io.containerd.image.name`; the platform lets
        // importers pick the manifest without reading its config.
        let mut index = self.index()?;
        let i = self.tagged(&index)?;
        let entry = &mut index["manifests"][i];
        entry["annotations"]["io.containerd.image.name"] = json!(name);
        entry["platform"] = json!({"architecture": oci_arch(), "os": "linux"});
        let manifest_digest = entry["digest"]
            .as_str()
            .ok_or_else(|| anyhow!("index entry without digest"))?
            .to_owned();
        fs::write(self.layout.join("index.json"), serde_json::to_vec(&index)?)
            .context("writing index.json")?;
        run("umoci", &["gc", "--layout", layout_str])?;

        let dir = self
            .layout
            .parent()
            .ok_or_else(|| anyhow!("layout without parent"))?;
        tar_layout(&self.layout, &dir.join(OCI_ARCHIVE))?;
        let docker = dir.join(DOCKER_ARCHIVE);
        run(
            "skopeo",
            &[
                "--insecure-policy",
                "copy",
                "--quiet",
                &format!("oci:{}", self.image_ref),
                &format!("docker-archive:{}:{name}", path_str(&docker)?),
            ],
        )?;
        Ok(Record {
            manifest_digest,
            config_digest,
            diff_ids,
            layer_digests,
            uncompressed_bytes,
        })
    }
}

/// Writes the layout as an OCI archive: `oci-layout`, `index.json`, then the blobs in name
/// order, with fixed owners, modes and times.
fn tar_layout(layout: &Path, out: &Path) -> Result<()> {
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(MIB as usize, file));
    let header = |size: u64, kind: tar::EntryType, mode: u32| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(BASE_TIME as u64);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for name in ["oci-layout", "index.json"] {
        let data = fs::read(layout.join(name)).with_context(|| format!("reading {name}"))?;
        let mut h = header(data.len() as u64, tar::EntryType::Regular, 0o644);
        tar.append_data(&mut h, name, data.as_slice())?;
    }
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = header(0, tar::EntryType::Directory, 0o755);
        tar.append_data(&mut h, dir, io::empty())?;
    }
    let blobs = layout.join("blobs/sha256");
    let mut names: Vec<_> = fs::read_dir(&blobs)
        .with_context(|| format!("listing {}", blobs.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for n in names {
        let p = blobs.join(&n);
        let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        let mut h = header(f.metadata()?.len(), tar::EntryType::Regular, 0o644);
        let entry = format!("blobs/sha256/{}", n.to_string_lossy());
        tar.append_data(&mut h, entry, f)
            .with_context(|| format!("archiving {}", p.display()))?;
    }
    let mut w = tar.into_inner().context("finishing the OCI archive")?;
    w.flush()?;
    w.get_ref().sync_all()?;
    Ok(())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Gives every entry below `root` (itself included) edited since `since` the time `time`,
/// without following symlinks. Entries given a time on purpose (long ago, or far ahead) keep it.
fn normalize_times(root: &Path, since: i64, time: i64) -> Result<()> {
    let until = unix_now() + 3600;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).with_context(|| format!("stat {}", p.display()))?;
        if m.is_dir() {
            for e in fs::read_dir(&p).with_context(|| format!("listing {}", p.display()))? {
                stack.push(e?.path());
            }
        }
        if m.mtime() >= since && m.mtime() <= until {
            set_time(&p, time)?;
        }
    }
    Ok(())
}

fn set_time(p: &Path, secs: i64) -> Result<()> {
    let t = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("setting the times of {}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// Editing the rootfs.

/// The bundle's rootfs; paths are relative to it.
struct Fs(PathBuf);

impl Fs {
    fn p(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// Creates `rel` and missing parents (0755), then gives `rel` its mode.
    fn dir(&self, rel: &str, mode: u32) -> Result<()> {
        let mut cur = self.0.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            cur.push(part);
            if !cur.is_dir() {
                fs::create_dir(&cur).with_context(|| format!("mkdir {}", cur.display()))?;
                self.chmod_path(&cur, 0o755)?;
            }
        }
        self.chmod(rel, mode)
    }

    fn file(&self, rel: &str, data: &[u8], mode: u32) -> Result<()> {
        let p = self.p(rel);
        fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
        self.chmod(rel, mode)
    }

    /// A file of `size` bytes from `fill`, written in 1 MiB steps.
    fn big_file(
        &self,
        rel: &str,
        size: u64,
        mut fill: impl FnMut(&mut [u8]),
        mode: u32,
    ) -> Result<()> {
        let p = self.p(rel);
        let mut f = File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        let mut buf = vec![0u8; MIB as usize];
        let mut left = size;
        while left > 0 {
            let n = left.min(MIB) as usize;
            fill(&mut buf[..n]);
            f.write_all(&buf[..n])
                .with_context(|| format!("writing {}", p.display()))?;
            left -= n as u64;
        }
        drop(f);
        self.chmod(rel, mode)
    }

    fn chmod(&self, rel: &str, mode: u32) -> Result<()> {
        self.chmod_path(&self.p(rel), mode)
    }

    fn chmod_path(&self, p: &Path, mode: u32) -> Result<()> {
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", p.display()))
    }

    /// Owner, then mode (chown clears setuid and setgid bits).
    fn own(&self, rel: &str, uid: u32, gid: u32, mode: Option<u32>) -> Result<()> {
        let p = self.p(rel);
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
            .with_context(|| format!("chown {uid}:{gid} {}", p.display()))?;
        match mode {
            Some(m) => self.chmod(rel, m),
            None => Ok(()),
        }
    }

    fn symlink(&self, rel: &str, target: &str) -> Result<()> {
        let p = self.p(rel);
        std::os::unix::fs::symlink(target, &p)
            .with_context(|| format!("symlink {} -> {target}", p.display()))
    }

    fn hard_link(&self, rel: &str, existing: &str) -> Result<()> {
        let p = self.p(rel);
        fs::hard_link(self.p(existing), &p)
            .with_context(|| format!("link {} to {existing}", p.display()))
    }

    fn xattr(&self, rel: &str, name: &str, value: &[u8]) -> Result<()> {
        let p = self.p(rel);
        rustix::fs::lsetxattr(&p, name, value, rustix::fs::XattrFlags::empty())
            .with_context(|| format!("setxattr {name} on {}", p.display()))
    }

    fn node(
        &self,
        rel: &str,
        kind: rustix::fs::FileType,
        mode: u32,
        dev: (u32, u32),
    ) -> Result<()> {
        let p = self.p(rel);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            kind,
            rustix::fs::Mode::from_raw_mode(mode),
            rustix::fs::makedev(dev.0, dev.1),
        )
        .with_context(|| format!("mknod {}", p.display()))?;
        self.chmod(rel, mode)
    }

    fn time(&self, rel: &str, secs: i64) -> Result<()> {
        set_time(&self.p(rel), secs)
    }

    fn remove(&self, rel: &str) -> Result<()> {
        let p = self.p(rel);
        let m = fs::symlink_metadata(&p).with_context(|| format!("stat {}", p.display()))?;
        if m.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        }
        .with_context(|| format!("removing {}", p.display()))
    }
}

/// Compressible content: a few blocks of text made of words, chosen at random per MiB.
struct TextPool(Vec<Vec<u8>>);

const WORDS: &[&str] = &[
    "container",
    "layer",
    "snapshot",
    "overlay",
    "content",
    "digest",
    "manifest",
    "index",
    "lease",
    "namespace",
    "garbage",
    "collector",
    "mount",
    "upper",
    "lower",
    "whiteout",
    "opaque",
    "chain",
    "blob",
    "ingest",
    "commit",
    "prepare",
    "view",
    "remove",
    "label",
    "platform",
    "config",
    "history",
    "rootfs",
    "tar",
    "gzip",
    "zstd",
    "unpack",
    "import",
    "export",
    "transfer",
    "differ",
    "walking",
    "native",
    "berth",
    "daemon",
    "socket",
    "plugin",
];

impl TextPool {
    const BLOCK: usize = 64 * 1024;

    fn new(rng: &mut Rng) -> TextPool {
        let blocks = (0..8)
            .map(|_| {
                let mut b = Vec::with_capacity(Self::BLOCK + 128);
                let mut line = 0u64;
                while b.len() < Self::BLOCK {
                    line += 1;
                    b.extend_from_slice(format!("{line:06} ").as_bytes());
                    for _ in 0..rng.range(4, 14) {
                        b.extend_from_slice(
                            WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes(),
                        );
                        b.push(b' ');
                    }
                    b.extend_from_slice(format!("{}\n", rng.below(1 << 20)).as_bytes());
                }
                b.truncate(Self::BLOCK);
                b
            })
            .collect();
        TextPool(blocks)
    }

    fn fill(&self, rng: &mut Rng, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(Self::BLOCK) {
            let block = &self.0[rng.below(self.0.len() as u64) as usize];
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }
}

/// What a file of the small-files layer holds.
fn small_content(rng: &mut Rng, text: &TextPool, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    if rng.below(3) == 0 {
        rng.fill(&mut v);
    } else {
        text.fill(rng, &mut v);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The layers.

/// Layers 1 and 2 of both [`busybox`] and [`multilayer`].
fn busybox_layers(build: &mut Build) -> Result<()> {
    let busybox = tool("busybox")?;
    let fs = build.rootfs();
    for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin"] {
        fs.dir(d, 0o755)?;
    }
    let bytes = fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?;
    fs.file("bin/busybox", &bytes, 0o755)?;
    let list = run("busybox", &["--list-full"])?;
    let mut applets: Vec<&str> = list.lines().map(str::trim).collect();
    applets.sort_unstable();
    applets.dedup();
    for applet in applets {
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let Some((dir, _)) = applet.rsplit_once('/') else {
            continue;
        };
        if !fs.p(dir).is_dir() {
            fs.dir(dir, 0o755)?;
        }
        let target = if dir == "bin" {
            "/bin/busybox".to_owned()
        } else {
            format!("{}bin/busybox", "../".repeat(dir.split('/').count()))
        };
        fs.symlink(applet, &target)?;
    }
    build.repack("berth-test-images: busybox and applets")?;

    let fs = build.rootfs();
    fs.dir("etc", 0o755)?;
    fs.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
          user:x:1000:1000:user:/home/user:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    fs.file(
        "etc/group",
        b"root:x:0:\ndaemon:x:1:\nshadow:x:42:\nusers:x:100:\nuser:x:1000:\nnogroup:x:65534:\n",
        0o644,
    )?;
    fs.file(
        "etc/shadow",
        b"root:*:19000:0:99999:7:::\nuser:!:19000:0:99999:7:::\n",
        0o640,
    )?;
    fs.own("etc/shadow", 0, 42, Some(0o640))?;
    fs.file("etc/hostname", b"berth-test\n", 0o644)?;
    fs.file(
        "etc/hosts",
        b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    fs.file(
        "etc/os-release",
        b"NAME=\"berth test image\"\nID=berth-test\nVERSION_ID=1\n",
        0o644,
    )?;
    fs.dir("root", 0o700)?;
    fs.dir("tmp", 0o1777)?;
    fs.dir("home/user", 0o755)?;
    fs.own("home/user", 1000, 1000, Some(0o750))?;
    fs.dir("var/log", 0o755)?;
    fs.dir("var/empty", 0o555)?;
    build.repack("berth-test-images: /etc, /root, /tmp, /home, /var")
}

/// Layer 3: many small files and every kind of entry and metadata.
fn files_layer(build: &mut Build, rng: &mut Rng, text: &TextPool, budget: u64) -> Result<()> {
    let fs = build.rootfs();
    fs.dir("data", 0o755)?;

    // Many small files, about 8% of the budget, averaging 6 KiB; every 20th empty.
    let count = ((budget * 8 / 100) / 6144).clamp(256, 4096);
    for i in 0..count {
        let dir = format!("data/small/d{:02}", i % 16);
        if i < 16 {
            fs.dir(&dir, 0o755)?;
        }
        let size = if i % 20 == 19 {
            0
        } else {
            rng.below(12_288) as usize
        };
        let rel = format!("{dir}/f{:04}", i / 16);
        fs.file(&rel, &small_content(rng, text, size), 0o644)?;
    }

    // Deep directories: 48 levels, a file half way and at the bottom.
    let mut deep = String::from("data/deep");
    for level in 0..48 {
        deep.push_str(&format!("/l{level:02}"));
        if level == 24 {
            fs.dir(&deep, 0o755)?;
            fs.file(&format!("{deep}/mid"), b"half way down\n", 0o644)?;
        }
    }
    fs.dir(&deep, 0o755)?;
    fs.file(&format!("{deep}/bottom"), b"the bottom\n", 0o644)?;

    // Modes.
    fs.dir("data/modes", 0o755)?;
    for (name, mode) in [
        ("f0600", 0o600),
        ("f0755", 0o755),
        ("f4755", 0o4755),
        ("f2755", 0o2755),
        ("f6711", 0o6711),
        ("f0444", 0o444),
        ("f0000", 0o000),
        ("f1644", 0o1644),
    ] {
        fs.file(&format!("data/modes/{name}"), name.as_bytes(), mode)?;
    }
    fs.dir("data/modes/d1777", 0o1777)?;
    fs.dir("data/modes/d0700", 0o700)?;
    fs.dir("data/modes/d2775", 0o2775)?;
    fs.dir("data/modes/d0555", 0o755)?;
    fs.file(
        "data/modes/d0555/inside",
        b"in a read-only directory\n",
        0o644,
    )?;
    fs.chmod("data/modes/d0555", 0o555)?;

    // Owners.
    fs.dir("data/owners", 0o755)?;
    for (name, uid, gid, mode) in [
        ("u1000", 1000, 1000, 0o644),
        ("nobody", 65534, 65534, 0o644),
        ("odd", 123, 456, 0o640),
        ("suid-user", 1000, 1000, 0o4755),
    ] {
        let rel = format!("data/owners/{name}");
        fs.file(&rel, name.as_bytes(), 0o644)?;
        fs.own(&rel, uid, gid, Some(mode))?;
    }
    fs.dir("data/owners/d1000", 0o755)?;
    fs.file("data/owners/d1000/f", b"owned\n", 0o644)?;
    fs.own("data/owners/d1000/f", 1000, 100, None)?;
    fs.own("data/owners/d1000", 1000, 1000, Some(0o750))?;

    // Extended attributes (user.* only: those an unprivileged applier can set too).
    fs.dir("data/xattrs/dx", 0o755)?;
    fs.file("data/xattrs/f1", b"with xattrs\n", 0o644)?;
    fs.xattr("data/xattrs/f1", "user.alpha", b"first value")?;
    fs.xattr(
        "data/xattrs/f1",
        "user.binary",
        &[0, 1, 2, 0xff, 0xfe, b'\n', 0],
    )?;
    fs.file("data/xattrs/f2", b"one long xattr\n", 0o600)?;
    fs.xattr("data/xattrs/f2", "user.long", "x".repeat(1000).as_bytes())?;
    fs.xattr("data/xattrs/dx", "user.dir", b"on a directory")?;

    // Symlinks: absolute, relative, dangling, to a directory, to itself, long.
    fs.dir("data/links", 0o755)?;
    fs.symlink("data/links/abs", "/bin/busybox")?;
    fs.symlink("data/links/rel", "../small/d00/f0000")?;
    fs.symlink("data/links/dangling", "/does/not/exist")?;
    fs.symlink("data/links/dir", "../deep")?;
    fs.symlink("data/links/dot", ".")?;
    fs.symlink("data/links/self", "self")?;
    fs.symlink("data/links/long", &format!("{}target", "long/".repeat(50)))?;
    fs.symlink("data/links/owned", "../owners/u1000")?;
    fs.own("data/links/owned", 1000, 1000, None)?;

    // Hard links within the layer: across directories, to a symlink, with odd metadata.
    fs.dir("data/hard/sub", 0o755)?;
    fs.file("data/hard/a", b"hard linked three times\n", 0o644)?;
    fs.hard_link("data/hard/b", "data/hard/a")?;
    fs.hard_link("data/hard/sub/c", "data/hard/a")?;
    fs.file("data/hard/g1", b"second group\n", 0o600)?;
    fs.own("data/hard/g1", 1000, 1000, Some(0o4750))?;
    fs.hard_link("data/hard/g2", "data/hard/g1")?;
    fs.symlink("data/hard/sym", "a")?;
    fs.hard_link("data/hard/sym2", "data/hard/sym")?;
    fs.hard_link("data/hard/busybox", "bin/busybox")?;

    // Devices and a fifo.
    fs.dir("data/special", 0o755)?;
    fs.node(
        "data/special/fifo",
        rustix::fs::FileType::Fifo,
        0o644,
        (0, 0),
    )?;
    fs.node(
        "data/special/null",
        rustix::fs::FileType::CharacterDevice,
        0o666,
        (1, 3),
    )?;
    fs.node(
        "data/special/loop9",
        rustix::fs::FileType::BlockDevice,
        0o660,
        (7, 9),
    )?;

    // Empty things, odd names, odd times.
    fs.dir("data/empty-dir", 0o755)?;
    fs.file("data/empty-file", b"", 0o644)?;
    fs.dir("data/names", 0o755)?;
    let long = "n".repeat(200);
    for name in [
        "with space",
        "ünïcödé",
        "-dash",
        "a:colon",
        "tab\tname",
        ".hidden",
        "..dots",
        long.as_str(),
    ] {
        fs.file(&format!("data/names/{name}"), name.as_bytes(), 0o644)?;
    }
    fs.dir("data/times/old-dir", 0o755)?;
    fs.file("data/times/old-dir/f", b"", 0o644)?;
    fs.file("data/times/epoch", b"1970\n", 0o644)?;
    fs.file("data/times/future", b"2100\n", 0o644)?;
    fs.symlink("data/times/old-link", "epoch")?;
    fs.time("data/times/epoch", 1)?;
    fs.time("data/times/future", 4_102_444_800)?;
    fs.time("data/times/old-link", 1_000_000_000)?;
    fs.time("data/times/old-dir", 1_000_000_000)?;

    // What later layers replace, remove or hide.
    fs.dir("data/replace/dir-to-link", 0o755)?;
    fs.file(
        "data/replace/file-to-dir",
        b"a file, then a directory\n",
        0o644,
    )?;
    fs.file("data/replace/dir-to-link/x", b"x\n", 0o644)?;
    fs.symlink("data/replace/link-to-file", "../small")?;
    fs.dir("data/opq/keep", 0o755)?;
    fs.dir("data/opq/sub", 0o755)?;
    for f in [
        "data/opq/a",
        "data/opq/b",
        "data/opq/keep/c",
        "data/opq/keep/d",
        "data/opq/sub/e",
    ] {
        fs.file(f, f.as_bytes(), 0o644)?;
    }
    fs.dir("data/opq2", 0o755)?;
    fs.file("data/opq2/x", b"x\n", 0o644)?;
    fs.file("data/opq2/y", b"y\n", 0o644)?;
    fs.dir("data/gone/inner", 0o755)?;
    fs.file("data/gone/inner/f", b"removed with its directory\n", 0o644)?;
    fs.file("data/gone/g", b"removed with its directory\n", 0o644)?;
    fs.file("data/gone-file", b"removed\n", 0o644)?;
    build.repack("berth-test-images: small files, modes, owners, xattrs, links, devices")
}

/// Layer 4: a few big files, about 75% of the budget: incompressible, text, mixed, zeros.
fn big_layer(build: &mut Build, rng: &mut Rng, text: &TextPool, budget: u64) -> Result<()> {
    let fs = build.rootfs();
    fs.dir("data/big", 0o755)?;
    let part = |pct: u64| (budget * pct / 100).max(64 * 1024);
    let mut r = rng.clone();
    fs.big_file("data/big/random.bin", part(30), |b| r.fill(b), 0o644)?;
    let mut r = rng.clone();
    fs.big_file(
        "data/big/text.log",
        part(20),
        |b| text.fill(&mut r, b),
        0o644,
    )?;
    let mut r = rng.clone();
    let mut odd = false;
    fs.big_file(
        "data/big/mixed.bin",
        part(20),
        |b| {
            for half in b.chunks_mut(256 * 1024) {
                odd = !odd;
                if odd {
                    r.fill(half);
                } else {
                    text.fill(&mut r, half);
                }
            }
        },
        0o600,
    )?;
    fs.big_file("data/big/zeros.bin", part(5), |b| b.fill(0), 0o644)?;
    // Advance the shared generator so later layers differ from these contents.
    rng.next_u64();
    build.repack("berth-test-images: big files")
}

/// Layer 5: removals (whiteouts), rewrites, metadata-only changes, type changes, a hard link
/// to a file of layer 3, and about 10% of the budget in new files.
fn changes_layer(build: &mut Build, rng: &mut Rng, text: &TextPool, budget: u64) -> Result<()> {
    let fs = build.rootfs();
    fs.remove("data/gone")?;
    fs.remove("data/gone-file")?;
    fs.remove("data/big/zeros.bin")?;
    for i in (0..16).step_by(3) {
        let rel = format!("data/small/d01/f{i:04}");
        if fs.p(&rel).exists() {
            fs.remove(&rel)?;
        }
    }
    fs.file("data/small/d00/f0001", b"rewritten in layer 5\n", 0o644)?;
    fs.own("data/modes/f0600", 1000, 1000, Some(0o640))?;
    fs.xattr("data/small/d03/f0000", "user.added", b"in layer 5")?;
    fs.remove("data/replace/file-to-dir")?;
    fs.dir("data/replace/file-to-dir", 0o755)?;
    fs.file("data/replace/file-to-dir/child", b"child\n", 0o644)?;
    fs.remove("data/replace/dir-to-link")?;
    fs.symlink("data/replace/dir-to-link", "../small")?;
    fs.remove("data/replace/link-to-file")?;
    fs.file("data/replace/link-to-file", b"now a file\n", 0o644)?;
    // umoci writes the target again (its link count changed) and then the link.
    fs.hard_link("data/hard/late", "data/small/d03/f0002")?;
    let mut deep = String::from("data/deep");
    for level in 0..48 {
        deep.push_str(&format!("/l{level:02}"));
    }
    fs.file(&format!("{deep}/added"), b"added in layer 5\n", 0o644)?;
    fs.dir("data/new", 0o755)?;
    let new_bytes = (budget / 10).max(64 * 1024);
    let files = 8u64;
    for i in 0..files {
        let mut r = rng.clone();
        let size = new_bytes / files;
        if i % 2 == 0 {
            fs.big_file(&format!("data/new/r{i}"), size, |b| r.fill(b), 0o644)?;
        } else {
            fs.big_file(
                &format!("data/new/t{i}"),
                size,
                |b| text.fill(&mut r, b),
                0o644,
            )?;
        }
        rng.next_u64();
    }
    build.repack("berth-test-images: removals, rewrites, metadata and type changes")
}

/// Layer 6, written here: opaque directories (marker before, and after, the directory's new
/// entries), a hand-written whiteout of a directory, a file replacing one name of a hard-link
/// group, and a hard link within the layer. Every directory it writes into is listed, so
/// appliers set all their times from the layer.
fn opaque_layer(build: &mut Build) -> Result<()> {
    let time = build.layer_time();
    let mut l = TarLayer::new(time);
    l.dir("data", 0o755, 0, 0);
    l.dir("data/opq", 0o755, 0, 0);
    l.file("data/opq/.wh..wh..opq", b"", 0o644);
    l.file("data/opq/new", b"new under the opaque marker\n", 0o644);
    l.dir("data/opq/keep", 0o755, 0, 0);
    l.file(
        "data/opq/keep/fresh",
        b"kept directory, fresh file\n",
        0o644,
    );
    l.dir("data/opq2", 0o755, 0, 0);
    l.file("data/opq2/z", b"z\n", 0o644);
    l.file("data/opq2/.wh..wh..opq", b"", 0o644);
    l.dir("data/small", 0o755, 0, 0);
    l.file("data/small/.wh.d04", b"", 0o644);
    l.dir("data/hard", 0o755, 0, 0);
    l.file("data/hard/a", b"a new file where a hard link was\n", 0o644);
    l.file("data/hard/t1", b"linked within layer 6\n", 0o640);
    l.hard_link("data/hard/t2", "data/hard/t1", 0o640);
    build.append_tar(
        l.finish()?,
        "berth-test-images: opaque directories and hand-written whiteouts",
    )
}

/// A layer tar written entry by entry (ustar with GNU long names, as the `tar` crate writes).
struct TarLayer {
    builder: tar::Builder<Vec<u8>>,
    time: i64,
    error: Option<io::Error>,
}

impl TarLayer {
    fn new(time: i64) -> TarLayer {
        TarLayer {
            builder: tar::Builder::new(Vec::new()),
            time,
            error: None,
        }
    }

    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(self.time as u64);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    fn keep(&mut self, r: io::Result<()>) {
        if let Err(e) = r
            && self.error.is_none()
        {
            self.error = Some(e);
        }
    }

    fn dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64) {
        let mut h = self.header(tar::EntryType::Directory, mode, 0);
        h.set_uid(uid);
        h.set_gid(gid);
        let r = self
            .builder
            .append_data(&mut h, format!("{path}/"), io::empty());
        self.keep(r);
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32) {
        let mut h = self.header(tar::EntryType::Regular, mode, data.len() as u64);
        let r = self.builder.append_data(&mut h, path, data);
        self.keep(r);
    }

    /// A hard link; appliers give the shared inode the link header's metadata, so `mode` (and
    /// the layer's owner and time) should be the target's.
    fn hard_link(&mut self, path: &str, target: &str, mode: u32) {
        let mut h = self.header(tar::EntryType::Link, mode, 0);
        let r = self.builder.append_link(&mut h, path, target);
        self.keep(r);
    }

    fn finish(self) -> Result<Vec<u8>> {
        if let Some(e) = self.error {
            return Err(e).context("writing a layer tar");
        }
        self.builder.into_inner().context("finishing a layer tar")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_spec() {
        let d: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|s| sha256_digest(s.as_bytes()))
            .collect();
        let c = chain_ids(&d);
        assert_eq!(c[0], d[0]);
        assert_eq!(c[1], sha256_digest(format!("{} {}", d[0], d[1]).as_bytes()));
        assert_eq!(c[2], sha256_digest(format!("{} {}", c[1], d[2]).as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn text_is_compressible_and_seeded() {
        let pool = TextPool::new(&mut Rng::new(7));
        let again = TextPool::new(&mut Rng::new(7));
        assert_eq!(pool.0, again.0);
        let mut buf = vec![0u8; 3 * TextPool::BLOCK + 100];
        pool.fill(&mut Rng::new(1), &mut buf);
        assert!(
            buf.iter()
                .all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\n')
        );
    }
}
