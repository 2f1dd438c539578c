//! A content store and a differ as proxy plugins (issue 6, acceptance 3), served by the
//! `berth-test-proxy` binary of this crate (berth's local store and walking differ on unix
//! sockets, built with proxy-sdk's server builder):
//!
//! - the content and differ conformance suites pass against the running proxy process,
//!   through the client adapters (the differ reading the suite's store through the content
//!   adapters, as it reads berthd's content service in a deployment);
//! - berthd configured with `[proxy_plugins]` entries of type `content` and `diff` serves a
//!   whole `ctr images import` through them: the blobs land under the content proxy's root
//!   and not berthd's, the differ proxy applies every layer, and the unpacked tree is the one
//!   a berthd without proxies unpacks.
//!
//! Not calibrated: the suites run in this process against a proxy process, no daemon is
//! involved; and Debian's containerd 1.6 has no proxy plugin type `diff` (its proxy plugins
//! are snapshotters and content stores only), so the import has no containerd twin.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use berth_integration::images::{self, LayerCompression};
use berth_integration::tree::{Compare, Tree, snapshot_tree};
use berth_integration::{Daemon, Kind, Options};
use berth_proxy_sdk::conformance::{content, differ};
use berth_proxy_sdk::content::ContentClient;
use berth_proxy_sdk::diff::DiffClient;
use berth_proxy_sdk::serve::Shutdown;
use berth_proxy_sdk::{CallContext, ContentStore, Server};

const BUSYBOX: &str = "docker.io/library/berth-busybox:1";

/// A running `berth-test-proxy`; stopped (SIGTERM, then SIGKILL) when dropped.
struct Proxy {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Proxy {
    /// Starts the proxy with `args` serving on `socket`, and waits until it answers.
    fn start(socket: &Path, args: &[&str]) -> Proxy {
        let log = socket.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the proxy's log");
        let child = Command::new(env!("CARGO_BIN_EXE_berth-test-proxy"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("spawn berth-test-proxy");
        let mut proxy = Proxy {
            child,
            socket: socket.to_owned(),
            log,
        };
        proxy.wait_ready();
        proxy
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "berth-test-proxy exited ({status}) before serving on {}: {}",
                    self.socket.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "berth-test-proxy did not serve on {} within 20 s",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn short_temp_dir(prefix: &str) -> tempfile::TempDir {
    // Unix socket paths must stay under 108 bytes: keep them directly under /tmp.
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// What a content fixture keeps alive: the proxy process and the directory of its store.
struct ContentGuard {
    proxy: Proxy,
    dir: tempfile::TempDir,
}

/// The local content store served by a `berth-test-proxy` process.
struct ContentProxy;

impl ContentProxy {
    async fn open(
        dir: tempfile::TempDir,
    ) -> berth_proxy_sdk::Result<content::Fixture<ContentGuard>> {
        let socket = dir.path().join("content.sock");
        let root = dir.path().join("root");
        let root_arg = root.to_string_lossy().into_owned();
        let proxy = tokio::task::spawn_blocking(move || {
            Proxy::start(&socket, &["--content-root", &root_arg])
        })
        .await
        .map_err(|e| berth_proxy_sdk::Error::internal(format!("start the proxy: {e}")))?;
        let client = ContentClient::new(berth_proxy_sdk::connect(&proxy.socket));
        Ok(content::Fixture::new(
            Arc::new(client),
            CallContext::default(),
            ContentGuard { proxy, dir },
        ))
    }
}

#[async_trait::async_trait]
impl content::ContentStoreFactory for ContentProxy {
    type Guard = ContentGuard;

    fn capabilities(&self) -> content::Capabilities {
        // The local store: labels are the metadata layer's job, no namespaces; its blobs and
        // ingests survive a restart of the proxy.
        content::Capabilities {
            labels: false,
            requires_namespace: false,
            reopen: true,
        }
    }

    async fn create(&self) -> berth_proxy_sdk::Result<content::Fixture<ContentGuard>> {
        ContentProxy::open(short_temp_dir("berth-cp")).await
    }

    async fn reopen(
        &self,
        guard: ContentGuard,
    ) -> berth_proxy_sdk::Result<content::Fixture<ContentGuard>> {
        let ContentGuard { proxy, dir } = guard;
        tokio::task::spawn_blocking(move || drop(proxy))
            .await
            .map_err(|e| berth_proxy_sdk::Error::internal(format!("stop the proxy: {e}")))?;
        ContentProxy::open(dir).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_suite_passes_against_the_proxy_process() {
    match content::run(ContentProxy).await {
        Ok(report) => assert!(!report.passed.is_empty(), "no case ran: {report:?}"),
        Err(failure) => panic!("{failure}"),
    }
}

/// What a differ fixture keeps alive: the proxy process, the server of the suite's store it
/// reads through, and their directory.
struct DifferGuard {
    _proxy: Proxy,
    store_server: Shutdown,
    _dir: tempfile::TempDir,
}

impl Drop for DifferGuard {
    fn drop(&mut self) {
        self.store_server.trigger();
    }
}

/// The walking differ served by a `berth-test-proxy` process, reading and writing the suite's
/// store served on a socket of this process (as it reads berthd's content service).
struct DifferProxy;

#[async_trait::async_trait]
impl differ::DifferFactory for DifferProxy {
    type Guard = DifferGuard;

    fn capabilities(&self) -> differ::Capabilities {
        differ::Capabilities {
            compare: true,
            overlay: true,
        }
    }

    async fn create(
        &self,
        store: Arc<dyn ContentStore>,
    ) -> berth_proxy_sdk::Result<differ::Fixture<DifferGuard>> {
        let dir = short_temp_dir("berth-dp");
        let store_socket = dir.path().join("store.sock");
        let shutdown = Shutdown::new();
        let server = Server::new()
            .shared_content(store)
            .handle_signals(false)
            .shutdown_on(shutdown.clone())
            .drain(Duration::from_secs(1));
        let serving = store_socket.clone();
        tokio::spawn(async move {
            if let Err(e) = server.serve_unix(&serving).await {
                eprintln!("serving the suite's store on {}: {e}", serving.display());
            }
        });
        let differ_socket = dir.path().join("differ.sock");
        let state = dir.path().join("state");
        let args = [
            "--differ-content".to_owned(),
            store_socket.to_string_lossy().into_owned(),
            "--differ-state".to_owned(),
            state.to_string_lossy().into_owned(),
        ];
        let proxy = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Proxy::start(&differ_socket, &args)
        })
        .await
        .map_err(|e| berth_proxy_sdk::Error::internal(format!("start the proxy: {e}")))?;
        let client = DiffClient::new(berth_proxy_sdk::connect(&proxy.socket));
        Ok(differ::Fixture::new(
            Arc::new(client),
            DifferGuard {
                _proxy: proxy,
                store_server: shutdown,
                _dir: dir,
            },
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differ_suite_passes_against_the_proxy_process() {
    match differ::run(DifferProxy).await {
        Ok(report) => assert!(!report.passed.is_empty(), "no case ran: {report:?}"),
        Err(failure) => panic!("{failure}"),
    }
}

/// berthd's configuration with the content store and the differ as proxies: the built-in
/// content store is disabled so the metadata layer keeps its blobs in the proxy, and the diff
/// service (which `ctr images import` unpacks through) and the transfer service use only the
/// proxy differ.
fn proxied_config(content_socket: &Path, differ_socket: &Path) -> String {
    format!(
        r#"version = 3
root = "{{root}}"
state = "{{state}}"
disabled_plugins = ["io.containerd.content.v1.content"]

[grpc]
address = "{{socket}}"

[debug]
level = "info"

[proxy_plugins.testcontent]
type = "content"
address = "{content}"

[proxy_plugins.testdiff]
type = "diff"
address = "{differ}"

[plugins."io.containerd.service.v1.diff-service"]
default = ["testdiff"]
"#,
        content = content_socket.display(),
        differ = differ_socket.display(),
    )
}

/// A mounted view of `chain` in `d`'s overlayfs snapshotter, unmounted and removed on drop.
struct View<'a> {
    d: &'a Daemon,
    key: String,
    target: PathBuf,
    mounted: bool,
}

impl<'a> View<'a> {
    fn mount(d: &'a Daemon, chain: &str) -> View<'a> {
        // The import's lease is gone, which schedules a collection; a view made while it is
        // pending is not protected (ctr 1.6 labels no view gc.root). Collect first.
        d.ctr_ok(["leases", "create", "--id", "settle"]);
        d.ctr_ok(["leases", "rm", "--sync", "settle"]);
        let key = "proxy-view".to_owned();
        d.ctr_ok([
            "snapshots",
            "--snapshotter",
            "overlayfs",
            "view",
            &key,
            chain,
        ]);
        let target = d.dir().join("view");
        std::fs::create_dir_all(&target).expect("mount point");
        let mut view = View {
            d,
            key,
            target,
            mounted: false,
        };
        let mounts = d.ctr_ok([
            "snapshots",
            "--snapshotter",
            "overlayfs",
            "mounts",
            &view.target.to_string_lossy(),
            &view.key,
        ]);
        let status = Command::new("sh")
            .arg("-c")
            .arg(mounts.stdout.trim())
            .status()
            .expect("run the mount command");
        assert!(status.success(), "mount failed: {mounts}");
        view.mounted = true;
        view
    }

    fn tree(&self, label: &str) -> Tree {
        snapshot_tree(&self.target)
            .unwrap_or_else(|e| panic!("walk the {label} view: {e:#}"))
            .labelled(label)
    }
}

impl Drop for View<'_> {
    fn drop(&mut self) {
        if self.mounted
            && let Err(e) = nix::mount::umount(&self.target)
        {
            eprintln!("umount {}: {e}", self.target.display());
        }
        let out = self
            .d
            .ctr(["snapshots", "--snapshotter", "overlayfs", "rm", &self.key]);
        if !out.success() {
            eprintln!("removing the view: {out}");
        }
    }
}

fn blob_path(root: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    root.join("blobs/sha256").join(hex)
}

#[test]
fn ctr_import_is_served_by_content_and_diff_proxies() {
    let image = images::busybox(BUSYBOX, LayerCompression::Gzip).expect("busybox image");
    let archive = image.oci_archive.to_string_lossy().into_owned();
    let dir = short_temp_dir("berth-px");
    let content_root = dir.path().join("content-root");
    let record = dir.path().join("applied");
    let berthd_socket = dir.path().join("berthd.sock");
    let content_socket = dir.path().join("content.sock");
    let differ_socket = dir.path().join("differ.sock");
    let _content_proxy = Proxy::start(
        &content_socket,
        &["--content-root", &content_root.to_string_lossy()],
    );
    // The differ reads layers back from berthd's content service, in the caller's namespace
    // (its channel connects lazily, so berthd may come up after it).
    let _differ_proxy = Proxy::start(
        &differ_socket,
        &[
            "--differ-content",
            &berthd_socket.to_string_lossy(),
            "--differ-state",
            &dir.path().join("differ-state").to_string_lossy(),
            "--record",
            &record.to_string_lossy(),
        ],
    );
    let started = SystemTime::now();
    let proxied = Daemon::start_with(
        Kind::Berthd,
        Options {
            config: Some(proxied_config(&content_socket, &differ_socket)),
            socket: Some(berthd_socket.clone()),
            ..Options::default()
        },
    );
    let plugins = proxied.ctr_ok(["plugins", "ls"]);
    for name in ["testcontent", "testdiff"] {
        assert!(
            plugins
                .stdout
                .lines()
                .any(|l| l.contains(name) && l.contains("ok")),
            "proxy plugin {name} is not loaded: {plugins}"
        );
    }
    let out = proxied.ctr_ok(["images", "import", "--snapshotter", "overlayfs", &archive]);
    assert!(
        out.stdout.contains(&format!("unpacking {BUSYBOX}")),
        "{out}"
    );

    // Every blob of the image is in the proxy's store, none in berthd's own.
    let mut blobs = image.layer_digests.clone();
    blobs.push(image.config_digest.clone());
    blobs.push(image.manifest_digest.clone());
    let own_root = proxied.root().join("io.containerd.content.v1.content");
    for digest in &blobs {
        assert!(
            blob_path(&content_root, digest).is_file(),
            "blob {digest} is not under the content proxy's root {}",
            content_root.display()
        );
        assert!(
            !blob_path(&own_root, digest).exists(),
            "blob {digest} was written to berthd's own content store"
        );
    }
    // The differ proxy applied every layer, and each gave the image's diff id.
    let applied = std::fs::read_to_string(&record).expect("the differ proxy's record");
    for (layer, diff_id) in image.layer_digests.iter().zip(&image.diff_ids) {
        assert!(
            applied
                .lines()
                .any(|l| l == format!("apply {layer} {diff_id}")),
            "the differ proxy did not apply layer {layer} (diff id {diff_id}): {applied:?}"
        );
    }

    // The same import without proxies unpacks the same tree.
    let plain = Daemon::start(Kind::Berthd);
    plain.ctr_ok(["images", "import", "--snapshotter", "overlayfs", &archive]);
    let top = image.chain_ids.last().expect("the image has layers");
    let with_proxies = View::mount(&proxied, top);
    let without = View::mount(&plain, top);
    let (want, got) = (without.tree("built-in"), with_proxies.tree("proxies"));
    let how = Compare {
        apply_window: Some((started, SystemTime::now())),
        ..Compare::default()
    };
    let diff = want.diff_with(&got, &how);
    assert!(
        diff.is_empty(),
        "the tree unpacked through the proxies differs:\n{}",
        diff.join("\n")
    );
    // A tree that says nothing would compare equal to anything.
    assert!(want.len() > 100, "{} paths", want.len());
}
