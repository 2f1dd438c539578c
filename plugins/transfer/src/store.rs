//! Content store helpers shared by import, unpack and export (containerd's
//! `content.OpenWriter`, `WriteBlob`, `ReadBlob` and label updates).

use std::time::{Duration, Instant, SystemTime};

use berth_core::content::{CallContext, ContentStore, ContentWriter, Digest, Info, WriterRequest};
use berth_core::error::{Classify, ErrorKind};
use berth_core::labels::Labels;
use tokio_stream::StreamExt;

use crate::error::{Error, Result};

/// How long to wait for an ingest another writer holds (a concurrent import of the same
/// blob) before giving up.
const LOCKED_INGEST_WAIT: Duration = Duration::from_secs(300);

/// The largest index, manifest or config read into memory. containerd reads these whole
/// without a bound; a hostile archive should not make berthd allocate without limit.
pub const MAX_DOCUMENT_BYTES: u64 = 32 << 20;

/// Opens a writer for `request`, waiting while another writer holds the ref (Unavailable),
/// as containerd's `OpenWriter` does. `None` when the expected blob is already stored.
/// A resumed ingest is truncated: the caller always writes from the start.
pub async fn open_writer(
    content: &dyn ContentStore,
    cx: &CallContext,
    request: WriterRequest,
) -> Result<Option<Box<dyn ContentWriter>>> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(10);
    loop {
        match content.writer(cx, request.clone()).await {
            Ok(mut writer) => {
                if writer.status().offset > 0 {
                    writer.truncate(0).await?;
                }
                return Ok(Some(writer));
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(None),
            Err(e)
                if e.kind() == ErrorKind::Unavailable && started.elapsed() < LOCKED_INGEST_WAIT =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Commits a writer; a blob that appeared meanwhile counts as success (`true`: it existed).
pub async fn commit(
    writer: Box<dyn ContentWriter>,
    size: u64,
    expected: Option<Digest>,
    labels: Labels,
) -> Result<bool> {
    match writer.commit(size, expected, labels).await {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Writes `data` as a blob under `reference`; returns its digest and whether it existed.
pub async fn write_blob(
    content: &dyn ContentStore,
    cx: &CallContext,
    reference: String,
    data: &[u8],
) -> Result<(Digest, bool)> {
    let digest = Digest::sha256_of(data);
    let request = WriterRequest {
        reference,
        total: data.len() as u64,
        expected: Some(digest.clone()),
    };
    let Some(mut writer) = open_writer(content, cx, request).await? else {
        return Ok((digest, true));
    };
    writer.write(data).await?;
    let existed = commit(
        writer,
        data.len() as u64,
        Some(digest.clone()),
        Labels::new(),
    )
    .await?;
    Ok((digest, existed))
}

/// Reads a whole blob of at most [`MAX_DOCUMENT_BYTES`].
pub async fn read_document(
    content: &dyn ContentStore,
    cx: &CallContext,
    digest: &Digest,
) -> Result<Vec<u8>> {
    let info = content.info(cx, digest).await?;
    if info.size > MAX_DOCUMENT_BYTES {
        return Err(Error::InvalidBlob {
            what: "document",
            digest: digest.clone(),
            reason: format!(
                "it is {} bytes; indexes, manifests and configs may have at most {MAX_DOCUMENT_BYTES}",
                info.size
            ),
        });
    }
    let mut stream = content.read(cx, digest, 0, None).await?;
    let mut data = Vec::with_capacity(info.size as usize);
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(&chunk?);
    }
    Ok(data)
}

/// Sets labels on a blob, leaving its other labels alone.
pub async fn set_labels(
    content: &dyn ContentStore,
    cx: &CallContext,
    digest: &Digest,
    labels: Vec<(String, String)>,
) -> Result<()> {
    if labels.is_empty() {
        return Ok(());
    }
    let fieldpaths = labels
        .iter()
        .map(|(k, _)| format!("labels.{k}"))
        .collect::<Vec<_>>();
    let info = Info {
        digest: digest.clone(),
        size: 0,
        created_at: SystemTime::UNIX_EPOCH,
        updated_at: SystemTime::UNIX_EPOCH,
        labels: labels.into_iter().collect(),
    };
    content.update(cx, info, &fieldpaths).await?;
    Ok(())
}

/// Whether a blob is stored (NotFound is `false`, other errors are errors).
pub async fn exists(content: &dyn ContentStore, cx: &CallContext, digest: &Digest) -> Result<bool> {
    match content.info(cx, digest).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}
