//! Where things live under the store's root (drawn in the crate documentation).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use berth_core::content::{Algorithm, Digest, Status};
use berth_core::{Error, Result};

use crate::files::{io_error, read_optional, read_time};

/// The reference text of an ingest; written last when an ingest is created.
pub(crate) const REF: &str = "ref";
/// The bytes written so far.
pub(crate) const DATA: &str = "data";
/// The expected size in decimal, absent when unknown.
pub(crate) const TOTAL: &str = "total";
/// The expected digest, absent when unknown.
pub(crate) const EXPECTED: &str = "expected";
/// When the ingest started, in decimal unix nanoseconds.
pub(crate) const STARTED_AT: &str = "startedat";
/// When a writer last closed it, in decimal unix nanoseconds.
pub(crate) const UPDATED_AT: &str = "updatedat";

/// Paths of one store.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: PathBuf) -> Self {
        Layout { root }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub(crate) fn blob_dir(&self, algorithm: Algorithm) -> PathBuf {
        self.blobs().join(algorithm.name())
    }

    pub(crate) fn blob(&self, digest: &Digest) -> PathBuf {
        self.blob_dir(digest.algorithm()).join(digest.hex())
    }

    pub(crate) fn ingests(&self) -> PathBuf {
        self.root.join("ingest")
    }

    /// The directory of ingest `reference`: named by the SHA-256 of the reference, so any
    /// text is a valid reference and none is ever used as a path.
    pub(crate) fn ingest(&self, reference: &str) -> PathBuf {
        self.ingests()
            .join(Digest::sha256_of(reference.as_bytes()).hex())
    }
}

/// The ingest's expected size; 0 when unknown.
pub(crate) fn read_total(dir: &Path) -> Result<u64> {
    let path = dir.join(TOTAL);
    match read_optional(&path)? {
        None => Ok(0),
        Some(text) => text
            .trim()
            .parse()
            .map_err(|_| Error::internal(format!("{} holds no size", path.display()))),
    }
}

/// The ingest's expected digest, if it has one.
pub(crate) fn read_expected(dir: &Path) -> Result<Option<Digest>> {
    let path = dir.join(EXPECTED);
    read_optional(&path)?
        .map(|text| {
            Digest::parse(text.trim())
                .map_err(|e| Error::internal(format!("{}: {}", path.display(), e.message())))
        })
        .transpose()
}

/// The status of the ingest in `dir`, or `None` when it is not a (complete) ingest: its
/// creation was interrupted, or it is being committed or aborted right now.
pub(crate) fn read_status(dir: &Path) -> Result<Option<Status>> {
    let Some(reference) = read_optional(&dir.join(REF))? else {
        return Ok(None);
    };
    let data = dir.join(DATA);
    let meta = match fs::metadata(&data) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("stat", &data, e)),
    };
    let modified = meta.modified().map_err(|e| io_error("stat", &data, e))?;
    // Timestamp files are advisory: a damaged one falls back to the data file's time.
    let started_at = read_time(&dir.join(STARTED_AT))
        .ok()
        .flatten()
        .unwrap_or(modified);
    // `updatedat` is written when a writer closes; while one writes, the data file is newer.
    let updated_at = read_time(&dir.join(UPDATED_AT))
        .ok()
        .flatten()
        .unwrap_or(UNIX_EPOCH)
        .max(modified);
    Ok(Some(Status {
        reference,
        offset: meta.len(),
        total: read_total(dir)?,
        expected: read_expected(dir)?,
        started_at,
        updated_at,
    }))
}
