//! Reading an image archive into the content store.
//!
//! The tar is parsed on a blocking thread (the tar and decompression crates are synchronous)
//! fed by the async byte stream through a small channel; each entry's bytes come back over a
//! bounded channel to the async side, which writes them to the content store. Both channels
//! are bounded, so memory stays flat whatever the archive's size, and a slow store slows
//! the reader (and through the stream's flow control, the client).
//!
//! As containerd's `ImportIndex`, every regular file except `oci-layout` and `manifest.json`
//! becomes a blob; symlinks are remembered (Docker archives link shared layers); other entry
//! types are ignored. Beyond containerd, a file under `blobs/<alg>/<hex>` is written with
//! that expected digest, so a blob whose bytes do not match its name fails the import
//! naming it, instead of surfacing later as a missing blob.

use std::collections::HashMap;
use std::io::Read;

use berth_core::content::{ByteStream, CallContext, ContentStore, Digest, WriterRequest};
use berth_core::labels::Labels;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::compression::{self, Compression, SourceError};
use crate::error::{Error, Result};
use crate::oci::{DockerArchiveEntry, ImageLayout};
use crate::progress::{self, Progress, ProgressSink};
use crate::store;

/// containerd's limit on the JSON files of an archive it decodes (`oci-layout`,
/// `manifest.json`).
const JSON_LIMIT: u64 = 20 << 20;
/// Bytes per chunk handed from the tar reader to the store writer.
const CHUNK: usize = 256 << 10;
/// A `downloading` event is reported at most once per this many bytes of a blob.
const PROGRESS_EVERY: u64 = 8 << 20;

/// What the archive held, once its blobs are in the store.
#[derive(Debug, Default)]
pub(crate) struct ArchiveContents {
    /// How the archive was compressed.
    pub compression: Option<Compression>,
    /// `oci-layout`, when present.
    pub layout: Option<ImageLayout>,
    /// `manifest.json` (Docker archive), when present.
    pub docker: Option<Vec<DockerArchiveEntry>>,
    /// Every stored file: cleaned path -> (digest, size).
    pub blobs: HashMap<String, (Digest, u64)>,
    /// Symlinks: cleaned path -> cleaned target path.
    pub symlinks: HashMap<String, String>,
}

enum Event {
    Opened(Compression),
    Json {
        path: String,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    Blob {
        path: String,
        size: u64,
        expected: Option<Digest>,
    },
    Chunk(Vec<u8>),
    BlobEnd,
}

/// A blocking reader over an async byte stream (for the tar thread).
struct StreamRead {
    rx: mpsc::Receiver<berth_core::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for StreamRead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(Ok(data)) => {
                    self.buf = data;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(std::io::Error::other(SourceError(e))),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `path.Clean` for archive names: no `.` or empty components, `..` resolved lexically.
pub(crate) fn clean_path(name: &str) -> String {
    let absolute = name.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    if absolute {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".to_owned()
    } else {
        joined
    }
}

/// The digest a `blobs/<alg>/<hex>` path names, if it is one.
fn blob_digest(path: &str) -> Option<Digest> {
    let rest = path.strip_prefix("blobs/")?;
    let (alg, hex) = rest.split_once('/')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

/// The tar thread: parses the archive and sends its entries.
fn read_entries(source: StreamRead, tx: mpsc::Sender<Event>) -> Result<()> {
    // A send fails only when the async side gave up (it has its own error): stop quietly.
    macro_rules! send {
        ($event:expr) => {
            if tx.blocking_send($event).is_err() {
                return Ok(());
            }
        };
    }
    let (compression, reader) = compression::open_archive(source)?;
    send!(Event::Opened(compression));
    // Errors below the tar parser are the decompressor's (or the source's, which io_error
    // recognises); say which data was bad and where.
    let failed = |e: std::io::Error, at: &str| {
        if compression == Compression::Uncompressed {
            compression::io_error(e, &format!("reading {at}"))
        } else {
            compression::io_error(
                e,
                &format!("the {compression} data is corrupt or truncated (at {at})"),
            )
        }
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| failed(e, "the start of the tar"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| failed(e, "a tar header"))?;
        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let path = clean_path(&raw_name);
        let kind = entry.header().entry_type();
        if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .unwrap_or_default();
            // Relative to the link's directory, as Go's path.Join(path.Dir(name), link).
            let joined = match path.rsplit_once('/') {
                Some((dir, _)) => format!("{dir}/{target}"),
                None => target,
            };
            send!(Event::Symlink {
                target: clean_path(&joined),
                path,
            });
            continue;
        }
        if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            tracing::debug!(entry = %raw_name, "archive entry type ignored");
            continue;
        }
        let size = entry.size();
        let truncated = |path: &str| {
            Error::archive(format!(
                "the archive ends in the middle of {path:?}: it is truncated"
            ))
        };
        if path == "oci-layout" || path == "manifest.json" {
            if size > JSON_LIMIT {
                return Err(Error::archive(format!(
                    "{path:?} is {size} bytes, more than the {JSON_LIMIT} allowed"
                )));
            }
            let mut data = Vec::with_capacity(size as usize);
            (&mut entry)
                .take(size)
                .read_to_end(&mut data)
                .map_err(|e| failed(e, &format!("{path:?}")))?;
            if (data.len() as u64) < size {
                return Err(truncated(&path));
            }
            send!(Event::Json { path, data });
            continue;
        }
        send!(Event::Blob {
            expected: blob_digest(&path),
            path: path.clone(),
            size,
        });
        let mut left = size;
        while left > 0 {
            let mut chunk = vec![0u8; (left.min(CHUNK as u64)) as usize];
            let mut filled = 0;
            while filled < chunk.len() {
                match entry.read(&mut chunk[filled..]) {
                    Ok(0) => return Err(truncated(&path)),
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(failed(e, &format!("{path:?}"))),
                }
            }
            left -= filled as u64;
            send!(Event::Chunk(chunk));
        }
        send!(Event::BlobEnd);
    }
    // Read what follows the tar's end marker (padding, a compression trailer): a compressed
    // stream cut or damaged there must fail too, not pass because the tar looked complete.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
        .map_err(|e| failed(e, "the end of the archive"))?;
    Ok(())
}

/// Called with each file's cleaned path and digest once it is in the content store.
pub(crate) type OnStored<'a> = &'a (dyn Fn(&str, &Digest) + Sync);

/// A task aborted when this handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the archive from `source` and writes its files into `content`, telling `on_stored`
/// of each as it lands (an unpack can start before the archive ends).
pub(crate) async fn ingest(
    content: &dyn ContentStore,
    cx: &CallContext,
    mut source: ByteStream,
    progress: &dyn ProgressSink,
    on_stored: OnStored<'_>,
) -> Result<ArchiveContents> {
    let (bytes_tx, bytes_rx) = mpsc::channel(8);
    // Aborted when dropped: if this call is cancelled, the pump must not stay behind waiting
    // on the client's stream, holding the reader thread in its wait for bytes.
    let pump = AbortOnDrop(tokio::spawn(async move {
        while let Some(item) = source.next().await {
            let failed = item.is_err();
            if bytes_tx.send(item).await.is_err() || failed {
                break;
            }
        }
    }));
    let (tx, mut rx) = mpsc::channel(16);
    let reader = tokio::task::spawn_blocking(move || {
        read_entries(
            StreamRead {
                rx: bytes_rx,
                buf: Vec::new(),
                pos: 0,
            },
            tx,
        )
    });
    let result = consume(content, cx, &mut rx, progress, on_stored).await;
    // Unblock the reader if the consumer stopped early: it may wait to send an entry (closing
    // `rx` fails the send) or for more bytes (stopping the pump ends its input).
    drop(rx);
    drop(pump);
    let read = reader
        .await
        .map_err(|e| Error::Core(berth_core::Error::internal(format!("archive reader: {e}"))))?;
    match (result, read) {
        (Ok(contents), Ok(())) => Ok(contents),
        // The reader's error is why the entries stopped.
        (Ok(_), Err(e)) | (Err(Stop::ReaderEnded), Err(e)) => Err(e),
        (Err(Stop::ReaderEnded), Ok(())) => Err(Error::archive(
            "the archive ends in the middle of an entry: it is truncated",
        )),
        // The consumer's own failure; the reader only stopped because of it.
        (Err(Stop::Failed(e)), _) => Err(e),
    }
}

/// Why the consumer stopped early.
enum Stop {
    /// The reader stopped sending in the middle of an entry (its result says why).
    ReaderEnded,
    /// Writing to the store failed, or the archive's content is wrong.
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

async fn consume(
    content: &dyn ContentStore,
    cx: &CallContext,
    rx: &mut mpsc::Receiver<Event>,
    progress: &dyn ProgressSink,
    on_stored: OnStored<'_>,
) -> Result<ArchiveContents, Stop> {
    let mut out = ArchiveContents::default();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Opened(c) => out.compression = Some(c),
            Event::Symlink { path, target } => {
                out.symlinks.insert(path, target);
            }
            Event::Json { path, data } => {
                if path == "oci-layout" {
                    let layout: ImageLayout = serde_json::from_slice(&data)
                        .map_err(|e| Error::archive(format!("oci-layout is not valid: {e}")))?;
                    out.layout = Some(layout);
                } else {
                    let entries: Vec<DockerArchiveEntry> = serde_json::from_slice(&data)
                        .map_err(|e| Error::archive(format!("manifest.json is not valid: {e}")))?;
                    out.docker = Some(entries);
                }
            }
            Event::Blob {
                path,
                size,
                expected,
            } => {
                let digest = write_entry(content, cx, rx, &path, size, expected, progress).await?;
                on_stored(&path, &digest);
                out.blobs.insert(path, (digest, size));
            }
            Event::Chunk(_) | Event::BlobEnd => {
                return Err(Stop::Failed(Error::Core(berth_core::Error::internal(
                    "archive reader sent data outside an entry",
                ))));
            }
        }
    }
    Ok(out)
}

/// Writes one archive entry whose chunks follow on `rx`; returns its digest.
async fn write_entry(
    content: &dyn ContentStore,
    cx: &CallContext,
    rx: &mut mpsc::Receiver<Event>,
    path: &str,
    size: u64,
    expected: Option<Digest>,
    progress: &dyn ProgressSink,
) -> Result<Digest, Stop> {
    let reference = format!("tar-{path}");
    let request = WriterRequest {
        reference: reference.clone(),
        total: size,
        expected: expected.clone(),
    };
    let mut writer = store::open_writer(content, cx, request).await?;
    if writer.is_none() {
        progress.report(Progress::about(progress::ALREADY_EXISTS, path, size, size));
    }
    let mut written = 0u64;
    let mut reported = 0u64;
    loop {
        match rx.recv().await {
            Some(Event::Chunk(data)) => {
                written += data.len() as u64;
                if let Some(w) = writer.as_mut() {
                    if let Err(e) = w.write(&data).await {
                        abort(content, cx, &reference).await;
                        return Err(Stop::Failed(e.into()));
                    }
                    if written - reported >= PROGRESS_EVERY {
                        reported = written;
                        progress.report(Progress::about(
                            progress::DOWNLOADING,
                            path,
                            written,
                            size,
                        ));
                    }
                }
            }
            Some(Event::BlobEnd) => break,
            // The reader stopped mid-entry; its error is returned by the caller.
            None | Some(_) => {
                if writer.is_some() {
                    abort(content, cx, &reference).await;
                }
                return Err(Stop::ReaderEnded);
            }
        }
    }
    let Some(writer) = writer else {
        // Already stored: the name is the digest (only named blobs get here).
        return expected.ok_or_else(|| {
            Stop::Failed(Error::Core(berth_core::Error::internal(
                "stored blob without a digest",
            )))
        });
    };
    let actual = writer.digest();
    if let Some(expected) = &expected
        && *expected != actual
    {
        drop(writer);
        abort(content, cx, &reference).await;
        return Err(Stop::Failed(Error::BlobDigest {
            path: path.to_owned(),
            expected: expected.clone(),
            actual,
        }));
    }
    let existed = store::commit(writer, size, Some(actual.clone()), Labels::new()).await?;
    let event = if existed {
        progress::ALREADY_EXISTS
    } else {
        progress::COMPLETE
    };
    progress.report(Progress::about(event, path, size, size));
    Ok(actual)
}

/// Drops a failed ingest now rather than leaving it to the lease's collection.
async fn abort(content: &dyn ContentStore, cx: &CallContext, reference: &str) {
    if let Err(e) = content.abort(cx, reference).await {
        tracing::debug!(%reference, error = %e, "cannot abort ingest");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn cleans_like_go() {
        assert_eq!(clean_path("./blobs//sha256/x"), "blobs/sha256/x");
        assert_eq!(clean_path("a/../b"), "b");
        assert_eq!(clean_path("abc/layer.tar"), "abc/layer.tar");
        assert_eq!(clean_path("/x/./y"), "/x/y");
        assert_eq!(clean_path("../x"), "../x");
    }

    /// A source that never ends and says when it is dropped.
    struct Endless(Arc<std::sync::atomic::AtomicBool>);

    impl tokio_stream::Stream for Endless {
        type Item = berth_core::Result<Vec<u8>>;
        fn poll_next(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Pending
        }
    }

    impl Drop for Endless {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_cancelled_ingest_lets_go_of_the_clients_stream() {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let content = berth_core::testing::MemoryContentStore::new();
        let cx = CallContext::default();
        let on_stored = |_: &str, _: &Digest| {};
        let ingesting = ingest(
            &content,
            &cx,
            Box::pin(Endless(Arc::clone(&dropped))),
            &crate::progress::NoProgress,
            &on_stored,
        );
        let cancelled =
            tokio::time::timeout(std::time::Duration::from_millis(100), ingesting).await;
        assert!(cancelled.is_err(), "the archive never ends");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !dropped.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the stream from the client is still held after the import was cancelled"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn blob_names() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(
            blob_digest(&format!("blobs/sha256/{}", d.hex())),
            Some(d.clone())
        );
        assert_eq!(blob_digest("blobs/sha256/zz"), None);
        assert_eq!(blob_digest("index.json"), None);
    }
}
