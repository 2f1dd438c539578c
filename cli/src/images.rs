//! `berth images import|export|ls`: archives in and out through the transfer service, and
//! the image list through the images service.
//!
//! Import and export open two streams with the Streaming service (the archive's bytes, and
//! the progress events), then make one Transfer call naming them; the bytes flow while the
//! call runs. What the daemon says when the call fails is the error, except when reading or
//! writing the local file failed first: that is the cause, and is reported instead.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_proto::containerd::services::images::v1::{GetImageRequest, ListImagesRequest};
use berth_proto::containerd::services::transfer::v1::{TransferOptions, TransferRequest};
use berth_proto::containerd::types::Platform;
use berth_proto::containerd::types::transfer::{
    ImageExportStream, ImageImportStream, ImageReference, ImageStore, Progress, UnpackConfiguration,
};
use berth_proto::type_url;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::client::{Client, Failure};
use crate::platform;
use crate::progress::{Display, Mode};
use crate::stream::{self, ClientStream, StreamError};

/// How long to wait, once the daemon has answered, for the streams of the call to end.
pub(crate) const SETTLE: Duration = Duration::from_secs(30);
/// The same after a failed call: the daemon may not have taken a stream, which then never
/// ends.
pub(crate) const SETTLE_FAILED: Duration = Duration::from_secs(2);
/// The progress event of an image record written (berthd's and containerd's word).
const SAVED: &str = "saved";

/// `berth images import`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// Snapshotter to unpack into; without it, the daemon's default (overlayfs).
    #[arg(long, env = "BERTH_SNAPSHOTTER", value_name = "NAME")]
    pub snapshotter: Option<String>,
    /// Store the content only; do not unpack layers into snapshots.
    #[arg(long)]
    pub no_unpack: bool,
    /// Also keep the archive's whole index as an image of this name.
    #[arg(long, value_name = "NAME")]
    pub index_name: Option<String>,
    /// Name images under this repository (tags in the archive become NAME:TAG, and names
    /// outside it are not imported); without it, names in the archive are kept and bare tags
    /// become import-<date>:TAG.
    #[arg(long, value_name = "NAME")]
    pub base_name: Option<String>,
    /// Import (and unpack) only this platform's images (repeatable); default: the host's.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_parser = platform::parse)]
    pub platform: Vec<Platform>,
    /// Import the images of every platform (the host's is still the one unpacked).
    #[arg(long, conflicts_with = "platform")]
    pub all_platforms: bool,
    /// How to show progress on standard error.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = Mode::Auto)]
    pub progress: Mode,
    /// The archive (OCI layout or Docker archive; tar, gzip, zstd or xz), or - for standard
    /// input.
    #[arg(value_name = "FILE|-")]
    pub file: String,
}

/// `berth images export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// Export this platform's manifests (repeatable, in order of preference); default: the
    /// host's.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_parser = platform::parse)]
    pub platform: Vec<Platform>,
    /// Export the manifests of every platform.
    #[arg(long)]
    pub all_platforms: bool,
    /// Leave out the Docker-compatible manifest.json.
    #[arg(long)]
    pub skip_manifest_json: bool,
    /// How to show progress on standard error.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = Mode::Auto)]
    pub progress: Mode,
    /// Where to write the OCI archive (replaced only once it is complete), or - for standard
    /// output.
    #[arg(value_name = "FILE|-")]
    pub file: String,
    /// The images to export.
    #[arg(value_name = "NAME", required = true)]
    pub names: Vec<String>,
}

/// `berth images ls`.
#[derive(Debug, Clone, clap::Args)]
pub struct LsArgs {
    /// Print image names only.
    #[arg(short, long)]
    pub quiet: bool,
}

/// The transfer destination of an import: names as `ctr images import` gives them, the
/// platforms to keep, and the unpacks to do. `today` makes the default name prefix.
pub fn import_store(args: &ImportArgs, today: &str) -> ImageStore {
    let reference = match &args.base_name {
        Some(base) => ImageReference {
            name: base.clone(),
            is_prefix: true,
            ..ImageReference::default()
        },
        // As ctr: a generated prefix, which full names in the archive may replace.
        None => ImageReference {
            name: format!("import-{today}"),
            is_prefix: true,
            allow_overwrite: true,
            ..ImageReference::default()
        },
    };
    let (wanted, unpacks) =
        platforms_and_unpacks(&args.platform, args.no_unpack, args.snapshotter.as_deref());
    ImageStore {
        name: args.index_name.clone().unwrap_or_default(),
        // No platforms means all of them to the transfer service.
        platforms: if args.all_platforms {
            Vec::new()
        } else {
            wanted
        },
        extra_references: vec![reference],
        unpacks,
        ..ImageStore::default()
    }
}

/// The platforms a transfer wants (`platforms`, or the host's when none are given) and an
/// unpack into `snapshotter` for each of them, unless `no_unpack`; an empty snapshotter name
/// is the daemon's default.
pub(crate) fn platforms_and_unpacks(
    platforms: &[Platform],
    no_unpack: bool,
    snapshotter: Option<&str>,
) -> (Vec<Platform>, Vec<UnpackConfiguration>) {
    let wanted = if platforms.is_empty() {
        vec![platform::host()]
    } else {
        platforms.to_vec()
    };
    let unpacks = if no_unpack {
        Vec::new()
    } else {
        wanted
            .iter()
            .map(|p| UnpackConfiguration {
                platform: Some(p.clone()),
                snapshotter: snapshotter.unwrap_or_default().to_owned(),
            })
            .collect()
    };
    (wanted, unpacks)
}

/// The transfer source of an export: the images by exact name, as ctr sends them.
pub fn export_source(names: &[String]) -> ImageStore {
    ImageStore {
        extra_references: names
            .iter()
            .map(|n| ImageReference {
                name: n.clone(),
                ..ImageReference::default()
            })
            .collect(),
        ..ImageStore::default()
    }
}

/// The UTC date, for the default name prefix.
fn today() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%d").to_string()
}

/// Writes `text` to standard output; a closed pipe (`| head`) is not an error.
fn print(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::io("writing to standard output", &e))
        }
        _ => Ok(()),
    }
}

/// Shows the progress stream's events and remembers the images saved, until the daemon ends
/// the stream.
pub(crate) fn watch_progress(
    progress: ClientStream,
    mut display: Display,
) -> JoinHandle<(Display, Vec<String>)> {
    tokio::spawn(async move {
        let mut saved: Vec<String> = Vec::new();
        let ended = stream::receive_messages(progress, |any| {
            let Ok(p) = type_url::from_any::<Progress>(&any) else {
                return;
            };
            if p.event == SAVED && !p.name.is_empty() && !saved.contains(&p.name) {
                saved.push(p.name.clone());
            }
            display.event(&p);
        })
        .await;
        if let Err(e) = ended {
            // Progress is informative; the transfer's own result decides the outcome.
            if display.is_plain() {
                eprintln!("progress stream: {e}");
            }
        }
        (display, saved)
    })
}

/// Waits up to `limit` for a stream task; `None` when it did not end.
pub(crate) async fn settle<T>(task: JoinHandle<T>, limit: Duration) -> Option<T> {
    let abort = task.abort_handle();
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(_)) => None,
        Err(_) => {
            abort.abort();
            None
        }
    }
}

/// Opens the data stream (ids starting with `prefix`) and the progress stream of a transfer;
/// `what` says which command failed.
async fn open_streams(
    client: &Client,
    prefix: &str,
    what: &str,
) -> Result<(ClientStream, ClientStream), Failure> {
    let mut streaming = client.streaming();
    let data = ClientStream::open(&mut streaming, prefix)
        .await
        .map_err(|s| Failure::status(format!("{what}: opening a stream"), &s))?;
    let progress = ClientStream::open(&mut streaming, "progress")
        .await
        .map_err(|s| Failure::status(format!("{what}: opening the progress stream"), &s))?;
    Ok((data, progress))
}

/// `berth images import`: prints `NAME<TAB>DIGEST` for each image saved.
pub async fn import(client: &Client, args: ImportArgs) -> Result<(), Failure> {
    let what = format!("importing {}", shown(&args.file, "standard input"));
    let source: Box<dyn AsyncRead + Unpin + Send> = if args.file == "-" {
        if std::io::stdin().is_terminal() {
            return Err(Failure::new(
                "importing from standard input, which is a terminal: pipe an archive in, or name the file",
            ));
        }
        Box::new(tokio::io::stdin())
    } else {
        let file = tokio::fs::File::open(&args.file)
            .await
            .map_err(|e| Failure::io(format!("opening {}", args.file), &e))?;
        Box::new(file)
    };
    let (data, progress) = open_streams(client, "import", &what).await?;
    let request = TransferRequest {
        source: Some(type_url::to_any(&ImageImportStream {
            stream: data.id().to_owned(),
            // Empty: the daemon detects the compression by magic number.
            media_type: String::new(),
            force_compress: false,
        })),
        destination: Some(type_url::to_any(&import_store(&args, &today()))),
        options: Some(TransferOptions {
            progress_stream: progress.id().to_owned(),
        }),
    };
    let watcher = watch_progress(progress, Display::new(args.progress));
    let sender = tokio::spawn(stream::send_bytes(data, source));
    let answer = client.transfer().transfer(request).await;
    // The runtime is single-threaded: a sender that failed reading has finished before the
    // daemon could see the end of the stream and answer.
    let sent = if answer.is_ok() || sender.is_finished() {
        settle(sender, SETTLE).await
    } else {
        sender.abort();
        None
    };
    let limit = if answer.is_ok() {
        SETTLE
    } else {
        SETTLE_FAILED
    };
    let shown_progress = settle(watcher, limit).await;
    let saved = match shown_progress {
        Some((display, saved)) => {
            display.finish();
            Some(saved)
        }
        None => None,
    };
    if let Some(Err(StreamError::Source(e))) = &sent {
        return Err(Failure::io(format!("{what}: reading it"), e));
    }
    answer.map_err(|s| Failure::status(&what, &s))?;
    if let Some(Err(e)) = sent {
        return Err(Failure::new(format!("{what}: {e}")));
    }
    let Some(saved) = saved else {
        return Err(Failure::new(format!(
            "{what}: the import finished, but the daemon did not end its progress stream, \
             which names the images: list them with `berth images ls`"
        )));
    };
    print_saved(client, &what, saved).await
}

/// Prints `NAME<TAB>DIGEST` for each image a transfer saved, looking the digests up in the
/// images service; `what` says which command failed.
pub(crate) async fn print_saved(
    client: &Client,
    what: &str,
    saved: Vec<String>,
) -> Result<(), Failure> {
    let mut images = client.images();
    let mut lines = String::new();
    for name in saved {
        let image = images
            .get(GetImageRequest { name: name.clone() })
            .await
            .map_err(|s| Failure::status(format!("{what}: looking up image {name}"), &s))?
            .into_inner()
            .image;
        let digest = image
            .and_then(|i| i.target)
            .map(|t| t.digest)
            .unwrap_or_default();
        lines.push_str(&format!("{name}\t{digest}\n"));
    }
    print(&lines)
}

/// `berth images export`: the archive goes to a temporary file beside FILE, renamed over it
/// once complete, so a failed export leaves no partial archive.
pub async fn export(client: &Client, args: ExportArgs) -> Result<(), Failure> {
    let what = format!("exporting {}", args.names.join(", "));
    if args.file == "-" {
        if std::io::stdout().is_terminal() {
            return Err(Failure::new(format!(
                "{what}: standard output is a terminal: redirect it, or name a file"
            )));
        }
        let mut out = export_into(client, &args, &what, tokio::io::stdout()).await?;
        return out
            .flush()
            .await
            .map_err(|e| Failure::io(format!("{what}: writing to standard output"), &e));
    }
    let dest = PathBuf::from(&args.file);
    let temp = temp_path(&dest);
    let file = tokio::fs::File::create(&temp)
        .await
        .map_err(|e| Failure::io(format!("{what}: creating {}", temp.display()), &e))?;
    let finished = async {
        let file = export_into(client, &args, &what, file).await?;
        file.sync_all()
            .await
            .map_err(|e| Failure::io(format!("{what}: writing {}", temp.display()), &e))?;
        drop(file);
        tokio::fs::rename(&temp, &dest).await.map_err(|e| {
            Failure::io(
                format!("{what}: renaming {} to {}", temp.display(), dest.display()),
                &e,
            )
        })
    }
    .await;
    if finished.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    finished
}

/// `.<name>.berth-<pid>.partial` beside `dest`.
fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".to_owned());
    dest.with_file_name(format!(".{name}.berth-{}.partial", std::process::id()))
}

/// Runs the export transfer, writing the archive into `sink`, which it gives back.
async fn export_into<W: AsyncWrite + Unpin + Send + 'static>(
    client: &Client,
    args: &ExportArgs,
    what: &str,
    mut sink: W,
) -> Result<W, Failure> {
    let (data, progress) = open_streams(client, "export", what).await?;
    let request = TransferRequest {
        source: Some(type_url::to_any(&export_source(&args.names))),
        destination: Some(type_url::to_any(&ImageExportStream {
            stream: data.id().to_owned(),
            media_type: String::new(),
            platforms: args.platform.clone(),
            all_platforms: args.all_platforms,
            skip_compatibility_manifest: args.skip_manifest_json,
            skip_non_distributable: false,
        })),
        options: Some(TransferOptions {
            progress_stream: progress.id().to_owned(),
        }),
    };
    let display = Display::new(args.progress);
    let plain = display.is_plain();
    let counter = display.counter("archive");
    let watcher = watch_progress(progress, display);
    let bar = counter.clone();
    let receiver = tokio::spawn(async move {
        let received = stream::receive_bytes(data, &mut sink, |n| bar.inc(n as u64)).await;
        (sink, received)
    });
    let answer = client.transfer().transfer(request).await;
    let received = if answer.is_ok() || receiver.is_finished() {
        settle(receiver, SETTLE).await
    } else {
        receiver.abort();
        None
    };
    counter.finish();
    let limit = if answer.is_ok() {
        SETTLE
    } else {
        SETTLE_FAILED
    };
    if let Some((display, _)) = settle(watcher, limit).await {
        display.finish();
    }
    if let Some((_, Err(StreamError::Sink(e)))) = &received {
        return Err(Failure::io(
            format!("{what}: writing {}", shown(&args.file, "standard output")),
            e,
        ));
    }
    answer.map_err(|s| Failure::status(what, &s))?;
    match received {
        Some((sink, Ok(bytes))) => {
            if plain {
                eprintln!(
                    "wrote {bytes} bytes to {}",
                    shown(&args.file, "standard output")
                );
            }
            Ok(sink)
        }
        Some((_, Err(e))) => Err(Failure::new(format!("{what}: {e}"))),
        None => Err(Failure::new(format!(
            "{what}: the daemon did not end the archive stream"
        ))),
    }
}

/// `berth images ls`: name, target digest and media type, by name.
pub async fn ls(client: &Client, args: LsArgs) -> Result<(), Failure> {
    let mut images = client
        .images()
        .list(ListImagesRequest::default())
        .await
        .map_err(|s| Failure::status("listing images", &s))?
        .into_inner()
        .images;
    images.sort_by(|a, b| a.name.cmp(&b.name));
    let rows: Vec<[String; 3]> = images
        .into_iter()
        .map(|i| {
            let target = i.target.unwrap_or_default();
            [i.name, target.digest, target.media_type]
        })
        .collect();
    if args.quiet {
        let names: String = rows.iter().map(|r| format!("{}\n", r[0])).collect();
        return print(&names);
    }
    print(&table(&["NAME", "DIGEST", "MEDIA TYPE"], &rows))
}

/// Columns padded to their widest cell, two spaces apart.
fn table(header: &[&str; 3], rows: &[[String; 3]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 3]| {
        format!(
            "{:<w0$}  {:<w1$}  {}\n",
            cells[0],
            cells[1],
            cells[2],
            w0 = widths[0],
            w1 = widths[1]
        )
    };
    let mut out = line(*header);
    for row in rows {
        out.push_str(&line([&row[0], &row[1], &row[2]]));
    }
    out
}

/// A file argument as messages show it (`-` is `stdio`).
fn shown(file: &str, stdio: &str) -> String {
    if file == "-" {
        stdio.to_owned()
    } else {
        file.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Import {
        #[command(flatten)]
        args: ImportArgs,
    }

    fn import_args(argv: &[&str]) -> ImportArgs {
        Import::try_parse_from(std::iter::once("import").chain(argv.iter().copied()))
            .expect("arguments")
            .args
    }

    #[test]
    fn import_defaults_keep_and_unpack_the_host_platform_with_the_default_snapshotter() {
        let store = import_store(&import_args(&["a.tar"]), "2026-01-02");
        assert_eq!(store.name, "");
        assert_eq!(store.platforms, vec![platform::host()]);
        assert_eq!(store.unpacks.len(), 1);
        assert_eq!(store.unpacks[0].platform, Some(platform::host()));
        assert_eq!(store.unpacks[0].snapshotter, "", "the daemon picks");
        assert_eq!(
            store.extra_references,
            vec![ImageReference {
                name: "import-2026-01-02".into(),
                is_prefix: true,
                allow_overwrite: true,
                ..Default::default()
            }]
        );
    }

    #[test]
    fn import_options_reach_the_store() {
        let args = import_args(&[
            "--snapshotter",
            "native",
            "--index-name",
            "example.com/all:1",
            "--base-name",
            "example.com/base",
            "--platform",
            "linux/arm64",
            "-",
        ]);
        assert_eq!(args.file, "-");
        let store = import_store(&args, "2026-01-02");
        assert_eq!(store.name, "example.com/all:1");
        assert_eq!(store.platforms.len(), 1);
        assert_eq!(store.platforms[0].architecture, "arm64");
        assert_eq!(store.unpacks[0].snapshotter, "native");
        assert_eq!(store.extra_references[0].name, "example.com/base");
        assert!(!store.extra_references[0].allow_overwrite);

        let store = import_store(&import_args(&["--all-platforms", "--no-unpack", "x"]), "d");
        assert!(store.platforms.is_empty(), "all platforms");
        assert!(store.unpacks.is_empty());
        assert!(
            Import::try_parse_from(["i", "--all-platforms", "--platform", "linux/amd64", "x"])
                .is_err(),
            "--all-platforms and --platform conflict"
        );
        assert!(
            Import::try_parse_from(["i", "--platform", "linux/", "x"]).is_err(),
            "bad platforms are refused"
        );
    }

    #[test]
    fn export_names_images_exactly() {
        let store = export_source(&["a:1".to_owned(), "b:2".to_owned()]);
        let names: Vec<_> = store
            .extra_references
            .iter()
            .map(|r| (r.name.as_str(), r.is_prefix))
            .collect();
        assert_eq!(names, [("a:1", false), ("b:2", false)]);
        assert_eq!(store.name, "");
    }

    #[test]
    fn tables_align() {
        let rows = [
            ["a".to_owned(), "sha256:1".to_owned(), "m".to_owned()],
            ["longer".to_owned(), "d".to_owned(), "n".to_owned()],
        ];
        assert_eq!(
            table(&["NAME", "DIGEST", "MEDIA TYPE"], &rows),
            "NAME    DIGEST    MEDIA TYPE\na       sha256:1  m\nlonger  d         n\n"
        );
    }

    #[test]
    fn temporary_exports_sit_beside_the_destination() {
        let t = temp_path(Path::new("/tmp/out/img.tar"));
        assert_eq!(t.parent(), Some(Path::new("/tmp/out")));
        let name = t.file_name().expect("name").to_string_lossy().into_owned();
        assert!(
            name.starts_with(".img.tar.berth-") && name.ends_with(".partial"),
            "{name}"
        );
    }
}
