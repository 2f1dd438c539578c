//! [`LocalStore`]: the [`ContentStore`] implementation.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_core::content::{
    Algorithm, ByteStream, CallContext, ContentStore, ContentWriter, Digest, Info, Status,
    WriterRequest,
};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::{Error, ErrorKind, Result};
use tokio_stream::wrappers::ReceiverStream;

use crate::files::{blocking, io_error, sync_dir};
use crate::layout::{self, Layout};
use crate::locks::RefLocks;
use crate::writer::{CHUNK, LocalWriter};

/// Blobs and ingests in a directory on the local file system (see the crate documentation
/// for the layout and the behaviour).
pub struct LocalStore {
    layout: Layout,
    locks: Arc<RefLocks>,
}

impl LocalStore {
    /// A store rooted at `root`. Touches nothing; see [`LocalStore::prepare`].
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore {
            layout: Layout::new(root.into()),
            locks: Arc::default(),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// Creates the root and its `blobs/` and `ingest/` directories, and removes ingests whose
    /// creation a crash interrupted (no `ref` file: no client can name them, so nothing else
    /// would ever remove them). Plugin init runs it before any writer exists; a store that
    /// skips it still works, creating directories on demand.
    pub async fn prepare(&self) -> Result<()> {
        let layout = self.layout.clone();
        blocking(move || {
            for dir in [layout.blobs(), layout.ingests()] {
                fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
            }
            // Commits fsync only the directories below these, so make these durable once.
            sync_dir(layout.root())?;
            let ingests = layout.ingests();
            let entries = fs::read_dir(&ingests).map_err(|e| io_error("list", &ingests, e))?;
            for entry in entries {
                let dir = entry.map_err(|e| io_error("list", &ingests, e))?.path();
                if dir.is_dir() && !dir.join(layout::REF).exists() {
                    tracing::info!(dir = %dir.display(), "removing an ingest whose creation was interrupted");
                    fs::remove_dir_all(&dir).map_err(|e| io_error("remove", &dir, e))?;
                }
            }
            Ok(())
        })
        .await
    }
}

fn blob_not_found(digest: &Digest) -> Error {
    Error::not_found(format!("content {digest}"))
}

fn ingest_not_found(reference: &str) -> Error {
    Error::not_found(format!("ingest ref {reference:?}"))
}

fn blob_info(layout: &Layout, digest: &Digest) -> Result<Info> {
    let path = layout.blob(digest);
    match fs::metadata(&path) {
        Ok(meta) if meta.is_file() => info_from(digest.clone(), &meta, &path),
        Ok(_) => Err(blob_not_found(digest)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(blob_not_found(digest)),
        Err(e) => Err(io_error("stat", &path, e)),
    }
}

fn info_from(digest: Digest, meta: &fs::Metadata, path: &Path) -> Result<Info> {
    // Commit sets the modification time and nothing changes a blob afterwards, so it is both
    // times. (containerd reads the access time as `updated_at` because its label store bumps
    // it; without labels that would only move when the blob is read.)
    let modified = meta.modified().map_err(|e| io_error("stat", path, e))?;
    Ok(Info {
        digest,
        size: meta.len(),
        created_at: modified,
        updated_at: modified,
        labels: Labels::new(),
    })
}

fn info_fields(info: &Info) -> impl Fn(&[String]) -> Option<String> + '_ {
    move |path: &[String]| match path {
        [f] if f == "digest" => Some(info.digest.to_string()),
        [f] if f == "size" => Some(info.size.to_string()),
        [f, key @ ..] if f == "labels" && !key.is_empty() => {
            info.labels.get(&key.join(".")).cloned()
        }
        _ => None,
    }
}

fn status_fields(status: &Status) -> impl Fn(&[String]) -> Option<String> + '_ {
    move |path: &[String]| match path {
        [f] if f == "ref" => Some(status.reference.clone()),
        [f] if f == "expected" => status.expected.as_ref().map(Digest::to_string),
        _ => None,
    }
}

/// Every blob under `blobs/`, skipping anything that is not `<algorithm>/<hex>`.
fn walk_blobs(layout: &Layout, filter: &Filter) -> Result<Vec<Info>> {
    let mut out = Vec::new();
    for algorithm in [Algorithm::Sha256, Algorithm::Sha384, Algorithm::Sha512] {
        let dir = layout.blob_dir(algorithm);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("list", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", &dir, e))?;
            let name = entry.file_name();
            let Some(digest) = name
                .to_str()
                .and_then(|hex| Digest::parse(&format!("{}:{hex}", algorithm.name())).ok())
            else {
                tracing::warn!(path = %entry.path().display(), "not a blob; ignored");
                continue;
            };
            let path = entry.path();
            let meta = match fs::metadata(&path) {
                Ok(meta) if meta.is_file() => meta,
                Ok(_) => continue,
                // Deleted while listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("stat", &path, e)),
            };
            let info = info_from(digest, &meta, &path)?;
            if filter.matches(&info_fields(&info)) {
                out.push(info);
            }
        }
    }
    out.sort_by(|a, b| a.digest.cmp(&b.digest));
    Ok(out)
}

fn open_for_read(layout: &Layout, digest: &Digest, offset: u64) -> Result<(File, u64)> {
    let path = layout.blob(digest);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(blob_not_found(digest)),
        Err(e) => return Err(io_error("open", &path, e)),
    };
    let len = file
        .metadata()
        .map_err(|e| io_error("stat", &path, e))?
        .len();
    if offset > len {
        return Err(Error::new(
            ErrorKind::OutOfRange,
            format!("read of {digest} at offset {offset}: past object length {len} bytes"),
        ));
    }
    Ok((file, len))
}

/// Sends `file[offset..end]` in chunks until done or until the reader goes away. The file is
/// already open, so a delete meanwhile does not cut the read short.
fn send_chunks(
    file: File,
    path: PathBuf,
    mut offset: u64,
    end: u64,
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>>>,
) {
    while offset < end {
        let len = usize::try_from(end - offset).map_or(CHUNK, |left| left.min(CHUNK));
        let mut buf = vec![0; len];
        let chunk = file
            .read_exact_at(&mut buf, offset)
            .map(|()| buf)
            .map_err(|e| io_error("read", &path, e));
        let failed = chunk.is_err();
        if tx.blocking_send(chunk).is_err() || failed {
            return;
        }
        offset += len as u64;
    }
}

#[async_trait::async_trait]
impl ContentStore for LocalStore {
    async fn info(&self, _cx: &CallContext, digest: &Digest) -> Result<Info> {
        let (layout, digest) = (self.layout.clone(), digest.clone());
        blocking(move || blob_info(&layout, &digest)).await
    }

    /// Labels are the metadata layer's: as containerd's local store without a label store,
    /// an update of a stored blob is FailedPrecondition (and NotFound for a missing one).
    async fn update(&self, cx: &CallContext, info: Info, _fieldpaths: &[String]) -> Result<Info> {
        self.info(cx, &info.digest).await?;
        Err(Error::failed_precondition(format!(
            "update of content {} not supported on immutable content store: labels are kept by the metadata store",
            info.digest
        )))
    }

    async fn list(&self, _cx: &CallContext, filter: &Filter) -> Result<Vec<Info>> {
        let (layout, filter) = (self.layout.clone(), filter.clone());
        blocking(move || walk_blobs(&layout, &filter)).await
    }

    async fn delete(&self, _cx: &CallContext, digest: &Digest) -> Result<()> {
        let (layout, digest) = (self.layout.clone(), digest.clone());
        blocking(move || {
            let path = layout.blob(&digest);
            match fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(blob_not_found(&digest)),
                Err(e) => Err(io_error("remove", &path, e)),
            }
        })
        .await
    }

    async fn read(
        &self,
        _cx: &CallContext,
        digest: &Digest,
        offset: u64,
        size: Option<u64>,
    ) -> Result<ByteStream> {
        let (layout, digest) = (self.layout.clone(), digest.clone());
        let path = layout.blob(&digest);
        let (file, len) = blocking(move || open_for_read(&layout, &digest, offset)).await?;
        let end = size.map_or(len, |size| offset.saturating_add(size).min(len));
        // Two chunks of read-ahead overlap the disk with the consumer (usually the network).
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::task::spawn_blocking(move || send_chunks(file, path, offset, end, tx));
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn status(&self, _cx: &CallContext, reference: &str) -> Result<Status> {
        let (layout, reference) = (self.layout.clone(), reference.to_owned());
        blocking(
            move || match layout::read_status(&layout.ingest(&reference))? {
                Some(status) if status.reference == reference => Ok(status),
                _ => Err(ingest_not_found(&reference)),
            },
        )
        .await
    }

    async fn list_statuses(&self, _cx: &CallContext, filter: &Filter) -> Result<Vec<Status>> {
        let (layout, filter) = (self.layout.clone(), filter.clone());
        blocking(move || {
            let ingests = layout.ingests();
            let entries = match fs::read_dir(&ingests) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io_error("list", &ingests, e)),
            };
            let mut out = Vec::new();
            for entry in entries {
                let dir = entry.map_err(|e| io_error("list", &ingests, e))?.path();
                match layout::read_status(&dir) {
                    Ok(Some(status)) if filter.matches(&status_fields(&status)) => {
                        out.push(status)
                    }
                    Ok(_) => {}
                    // One damaged ingest must not hide the others (`ctr content active`).
                    Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "unreadable ingest skipped"),
                }
            }
            out.sort_by(|a, b| a.reference.cmp(&b.reference));
            Ok(out)
        })
        .await
    }

    /// Removes the ingest even while a writer holds it, as containerd does; that writer's
    /// commit then fails with NotFound.
    async fn abort(&self, _cx: &CallContext, reference: &str) -> Result<()> {
        let (layout, reference) = (self.layout.clone(), reference.to_owned());
        blocking(move || {
            let dir = layout.ingest(&reference);
            match fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ingest_not_found(&reference)),
                Err(e) => Err(io_error("remove", &dir, e)),
            }
        })
        .await
    }

    async fn writer(
        &self,
        _cx: &CallContext,
        request: WriterRequest,
    ) -> Result<Box<dyn ContentWriter>> {
        if request.reference.is_empty() {
            return Err(Error::invalid_argument("ref must not be empty"));
        }
        let lock = self.locks.try_lock(&request.reference)?;
        let writer = LocalWriter::open(self.layout.clone(), request, lock).await?;
        Ok(Box::new(writer))
    }
}
