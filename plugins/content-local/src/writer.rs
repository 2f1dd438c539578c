//! Writers: opening, resuming, appending to and committing one ingest.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use berth_core::content::{Algorithm, ContentWriter, Digest, Digester, Status, WriterRequest};
use berth_core::error::Classify;
use berth_core::labels::Labels;
use berth_core::{Error, ErrorKind, Result};

use crate::files::{
    BLOB_MODE, FILE_MODE, blocking, io_error, read_optional, read_time, remove_if_present,
    rename_noreplace, replace_file, sync_dir, write_time,
};
use crate::layout::{self, Layout};
use crate::locks::RefLock;

/// Read size for re-hashing and for reads.
pub(crate) const CHUNK: usize = 1 << 20;

/// Bytes appended after which an ingest has what it wrote so far written back in the
/// background, so the fsync at commit waits only for the tail: a client or registry feeds an
/// ingest far slower than the disk writes, yet a 1 GiB blob's fsync at once took 0.6 s here.
const WRITEBACK_STEP: u64 = 32 << 20;

/// The state of one open ingest. It sits behind a mutex that only blocking tasks hold for
/// long, so a write whose future was dropped finishes (or fails) before anything else runs.
struct Ingest {
    layout: Layout,
    dir: PathBuf,
    algorithm: Algorithm,
    /// `None` once committed or closed: a write that was queued by a cancelled future and
    /// runs after the commit must not append to what is now a blob.
    file: Option<File>,
    digester: Digester,
    status: Status,
    /// Why the data file and the digest may disagree (a failed write that could not be
    /// undone); only `truncate(0)` or reopening the ingest recovers.
    broken: Option<String>,
    /// Released explicitly after commit or close finished with the files, not whenever the
    /// last reference to this state goes away.
    lock: Option<RefLock>,
    /// Offset up to which a background writeback was started.
    written_back: u64,
    /// Whether one runs now (one at a time per ingest).
    writing_back: Arc<std::sync::atomic::AtomicBool>,
}

/// A writer holding one ingest of a [`crate::LocalStore`].
///
/// Dropping it without [`ContentWriter::close`] keeps the ingest and releases the ref (the
/// [`RefLock`] inside is dropped), like close does; only the `updatedat` file is not
/// rewritten, and the data file's modification time stands in for it.
pub(crate) struct LocalWriter {
    state: Arc<Mutex<Ingest>>,
}

fn lock(state: &Mutex<Ingest>) -> MutexGuard<'_, Ingest> {
    // A panic inside an append leaves at worst a data file longer than the digest covers,
    // which `broken` cannot know about; reopening the ingest re-hashes it anyway.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalWriter {
    /// Opens or resumes `request.reference`; the caller already holds its ref lock.
    pub(crate) async fn open(
        layout: Layout,
        request: WriterRequest,
        ref_lock: RefLock,
    ) -> Result<LocalWriter> {
        // The lock moves into the task, so a caller that gives up waiting still holds the
        // ref until the task has stopped touching the ingest.
        let ingest = blocking(move || open(layout, request, ref_lock)).await?;
        Ok(LocalWriter {
            state: Arc::new(Mutex::new(ingest)),
        })
    }
}

fn open(layout: Layout, request: WriterRequest, ref_lock: RefLock) -> Result<Ingest> {
    if let Some(expected) = &request.expected
        && fs::symlink_metadata(layout.blob(expected)).is_ok()
    {
        return Err(Error::already_exists(format!("content {expected}")));
    }
    let ingests = layout.ingests();
    fs::create_dir_all(&ingests).map_err(|e| io_error("create", &ingests, e))?;
    let dir = layout.ingest(&request.reference);
    let fresh = match fs::create_dir(&dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(io_error("create ingest directory", &dir, e)),
    };
    if !fresh {
        match resume(&dir, &request)? {
            Ok((file, digester, status)) => {
                return Ok(Ingest {
                    layout,
                    algorithm: digester_algorithm(&status),
                    dir,
                    file: Some(file),
                    digester,
                    status,
                    broken: None,
                    lock: Some(ref_lock),
                    written_back: 0,
                    writing_back: Arc::default(),
                });
            }
            Err(why) => tracing::warn!(
                reference = %request.reference,
                dir = %dir.display(),
                "ingest is not resumable ({why}); starting it over"
            ),
        }
    }
    let (file, status) = create(&dir, &request)?;
    let algorithm = digester_algorithm(&status);
    Ok(Ingest {
        layout,
        dir,
        algorithm,
        file: Some(file),
        digester: Digester::new(algorithm),
        status,
        broken: None,
        lock: Some(ref_lock),
        written_back: 0,
        writing_back: Arc::default(),
    })
}

/// Hash with the expected digest's algorithm, so commit needs no second pass.
fn digester_algorithm(status: &Status) -> Algorithm {
    status
        .expected
        .as_ref()
        .map_or(Algorithm::Sha256, Digest::algorithm)
}

fn open_data(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(create)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)
}

/// Starts the ingest in `dir` from nothing. The `ref` file goes first out and last in, so a
/// crash part-way leaves a directory without it, which every reader ignores.
fn create(dir: &Path, request: &WriterRequest) -> Result<(File, Status)> {
    remove_if_present(&dir.join(layout::REF))?;
    let data = dir.join(layout::DATA);
    let file = open_data(&data, true).map_err(|e| io_error("create", &data, e))?;
    file.set_len(0)
        .map_err(|e| io_error("truncate", &data, e))?;
    let total = dir.join(layout::TOTAL);
    if request.total > 0 {
        replace_file(&total, request.total.to_string().as_bytes())?;
    } else {
        remove_if_present(&total)?;
    }
    let expected = dir.join(layout::EXPECTED);
    match &request.expected {
        Some(d) => replace_file(&expected, d.to_string().as_bytes())?,
        None => remove_if_present(&expected)?,
    }
    let now = SystemTime::now();
    write_time(&dir.join(layout::STARTED_AT), now)?;
    write_time(&dir.join(layout::UPDATED_AT), now)?;
    replace_file(&dir.join(layout::REF), request.reference.as_bytes())?;
    Ok((
        file,
        Status {
            reference: request.reference.clone(),
            offset: 0,
            total: request.total,
            expected: request.expected.clone(),
            started_at: now,
            updated_at: now,
        },
    ))
}

type Resumed = (File, Digester, Status);

/// Reopens an existing ingest and re-hashes its data, so the digest covers every byte.
/// The inner `Err` says why the directory cannot be resumed (it is then started over);
/// the outer one is an I/O failure, which must not cost the client its data.
fn resume(dir: &Path, request: &WriterRequest) -> Result<Result<Resumed, String>> {
    let Some(stored_ref) = read_optional(&dir.join(layout::REF))? else {
        return Ok(Err("its creation was interrupted".into()));
    };
    if stored_ref != request.reference {
        return Ok(Err(format!("it belongs to ref {stored_ref:?}")));
    }
    let Ok(stored_total) = layout::read_total(dir) else {
        return Ok(Err("its total is unreadable".into()));
    };
    if request.total > 0 && stored_total > 0 && request.total != stored_total {
        // containerd starts over too: the client now describes a different blob.
        return Ok(Err(format!(
            "its total {stored_total} differs from the requested {}",
            request.total
        )));
    }
    let data = dir.join(layout::DATA);
    let file = match open_data(&data, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Err("its data file is missing".into()));
        }
        Err(e) => return Err(io_error("open", &data, e)),
    };

    let total = if request.total > 0 {
        if stored_total == 0 {
            replace_file(
                &dir.join(layout::TOTAL),
                request.total.to_string().as_bytes(),
            )?;
        }
        request.total
    } else {
        stored_total
    };
    let stored_expected = layout::read_expected(dir).unwrap_or(None);
    let expected = match &request.expected {
        Some(d) => {
            if stored_expected.as_ref() != Some(d) {
                replace_file(&dir.join(layout::EXPECTED), d.to_string().as_bytes())?;
            }
            Some(d.clone())
        }
        None => stored_expected,
    };

    let algorithm = expected
        .as_ref()
        .map_or(Algorithm::Sha256, Digest::algorithm);
    let mut digester = Digester::new(algorithm);
    let offset = hash_from_start(&file, &mut digester).map_err(|e| io_error("read", &data, e))?;
    let modified = file
        .metadata()
        .and_then(|m| m.modified())
        .map_err(|e| io_error("stat", &data, e))?;
    // Timestamp files are advisory: a damaged one falls back to the data file's time.
    let started_at = read_time(&dir.join(layout::STARTED_AT))
        .ok()
        .flatten()
        .unwrap_or(modified);
    let updated_at = read_time(&dir.join(layout::UPDATED_AT))
        .ok()
        .flatten()
        .unwrap_or(UNIX_EPOCH)
        .max(modified);
    Ok(Ok((
        file,
        digester,
        Status {
            reference: request.reference.clone(),
            offset,
            total,
            expected,
            started_at,
            updated_at,
        },
    )))
}

/// Feeds the whole file to `digester`; returns its length.
fn hash_from_start(file: &File, digester: &mut Digester) -> io::Result<u64> {
    let mut buf = vec![0; CHUNK];
    let mut offset = 0u64;
    loop {
        let n = match file.read_at(&mut buf, offset) {
            Ok(0) => return Ok(offset),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        digester.update(&buf[..n]);
        offset += n as u64;
    }
}

impl Ingest {
    fn data_path(&self) -> PathBuf {
        self.dir.join(layout::DATA)
    }

    /// The data file, unless the writer is finished.
    fn open_file(&mut self) -> Result<&mut File> {
        let reference = &self.status.reference;
        self.file.as_mut().ok_or_else(|| {
            Error::failed_precondition(format!(
                "writer for ref {reference:?} is already committed or closed"
            ))
        })
    }

    /// The data file, when it also agrees with the digest.
    fn usable_file(&mut self) -> Result<&mut File> {
        if let Some(why) = &self.broken {
            return Err(Error::failed_precondition(format!(
                "ingest ref {:?} is unusable ({why}): truncate it or open it again",
                self.status.reference
            )));
        }
        self.open_file()
    }

    fn append(&mut self, data: &[u8]) -> Result<()> {
        let offset = self.status.offset;
        let path = self.data_path();
        let file = self.usable_file()?;
        if let Err(err) = file.write_all(data) {
            // Undo a partial write, so file and digest agree and the client can retry.
            if let Err(undo) = file.set_len(offset) {
                self.broken = Some(format!(
                    "a failed write left bytes that could not be cut off: {undo}"
                ));
            }
            return Err(io_error("write", &path, err));
        }
        self.digester.update(data);
        self.status.offset += data.len() as u64;
        self.status.updated_at = SystemTime::now();
        self.start_writeback();
        Ok(())
    }

    /// Every [`WRITEBACK_STEP`] bytes, an `fdatasync` of the data file on the blocking pool.
    /// It gets a file of its own, not a duplicate of the writer's: a write-back error is
    /// reported once per open file, and the commit's own fsync must still see it.
    fn start_writeback(&mut self) {
        use std::sync::atomic::Ordering;
        if self.status.offset.saturating_sub(self.written_back) < WRITEBACK_STEP
            || self.writing_back.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let busy = Arc::clone(&self.writing_back);
        let (Ok(runtime), Ok(file)) = (
            tokio::runtime::Handle::try_current(),
            File::open(self.data_path()),
        ) else {
            busy.store(false, Ordering::Release);
            return;
        };
        self.written_back = self.status.offset;
        drop(runtime.spawn_blocking(move || {
            // Only an early start: the commit's fsync is what makes the blob durable and
            // reports a failure.
            let _ = file.sync_data();
            busy.store(false, Ordering::Release);
        }));
    }

    fn restart(&mut self) -> Result<()> {
        let path = self.data_path();
        let file = self.open_file()?;
        // The file is opened for appending, so the next write lands at the new end.
        file.set_len(0)
            .map_err(|e| io_error("truncate", &path, e))?;
        self.digester = Digester::new(self.algorithm);
        self.broken = None;
        self.status.offset = 0;
        self.written_back = 0;
        self.status.updated_at = SystemTime::now();
        Ok(())
    }

    /// Records the last write time for a later resume; the ingest may already be aborted.
    fn save_updated_at(&self) {
        if self.dir.exists()
            && let Err(e) = write_time(&self.dir.join(layout::UPDATED_AT), self.status.updated_at)
        {
            tracing::warn!(error = %e, "could not record the ingest's update time");
        }
    }

    fn remove_dir(&self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            // Without its data file the directory is no longer an ingest; the next writer on
            // the ref starts over in it.
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove ingest");
        }
    }

    /// Commits, then releases the ref whatever happened: the trait consumes the writer.
    fn commit(&mut self, size: u64, expected: Option<Digest>) -> Result<()> {
        let result = self.usable_file().map(|_| ()).and_then(|()| {
            let file = self
                .file
                .take()
                .ok_or_else(|| Error::internal("no data file"))?;
            self.commit_file(file, size, expected)
        });
        if result
            .as_ref()
            .is_err_and(|e| e.kind() != ErrorKind::AlreadyExists)
        {
            // The ingest stays, ready for another attempt.
            self.save_updated_at();
        }
        self.lock.take();
        result
    }

    fn commit_file(&mut self, file: File, size: u64, expected: Option<Digest>) -> Result<()> {
        let data = self.data_path();
        if !data.exists() {
            return Err(Error::not_found(format!(
                "ingest ref {:?} was aborted while being written",
                self.status.reference
            )));
        }
        file.sync_all().map_err(|e| io_error("sync", &data, e))?;
        let actual = file
            .metadata()
            .map_err(|e| io_error("stat", &data, e))?
            .len();
        if actual != self.status.offset {
            return Err(Error::new(
                ErrorKind::DataLoss,
                format!(
                    "{} holds {actual} bytes but {} were written through this writer",
                    data.display(),
                    self.status.offset
                ),
            ));
        }
        if size != 0 && size != actual {
            return Err(Error::failed_precondition(format!(
                "unexpected commit size {actual}, expected {size}"
            )));
        }
        let mut digest = self.digester.digest();
        if let Some(expected) = &expected {
            if expected.algorithm() != digest.algorithm() {
                let mut digester = Digester::new(expected.algorithm());
                hash_from_start(&file, &mut digester).map_err(|e| io_error("read", &data, e))?;
                digest = digester.finish();
            }
            if *expected != digest {
                return Err(Error::failed_precondition(format!(
                    "unexpected commit digest {digest}, expected {expected}"
                )));
            }
        }

        let target = self.layout.blob(&digest);
        let already = || Error::already_exists(format!("content {digest}"));
        if fs::symlink_metadata(&target).is_ok() {
            self.remove_dir();
            return Err(already());
        }
        let parent = self.layout.blob_dir(digest.algorithm());
        if !parent.is_dir() {
            fs::create_dir_all(&parent).map_err(|e| io_error("create", &parent, e))?;
            sync_dir(&self.layout.blobs())?;
        }
        // Times and mode are set before the rename, so the blob never appears writable or
        // with the time of its first byte instead of its commit.
        file.set_modified(SystemTime::now())
            .map_err(|e| io_error("set the time of", &data, e))?;
        file.set_permissions(Permissions::from_mode(BLOB_MODE))
            .map_err(|e| io_error("make read-only", &data, e))?;
        drop(file);
        match rename_noreplace(&data, &target) {
            Ok(true) => {}
            Ok(false) => {
                self.remove_dir();
                return Err(already());
            }
            Err(e) => {
                // Leave a resumable ingest behind, writable again.
                let _ = fs::set_permissions(&data, Permissions::from_mode(FILE_MODE));
                return Err(e);
            }
        }
        sync_dir(&parent)?;
        self.remove_dir();
        Ok(())
    }

    fn close(&mut self) {
        if self.file.take().is_some() {
            self.save_updated_at();
        }
        self.lock.take();
    }
}

#[async_trait::async_trait]
impl ContentWriter for LocalWriter {
    fn status(&self) -> Status {
        lock(&self.state).status.clone()
    }

    fn digest(&self) -> Digest {
        lock(&self.state).digester.digest()
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let state = Arc::clone(&self.state);
        let data = data.to_vec();
        blocking(move || lock(&state).append(&data)).await
    }

    async fn truncate(&mut self, size: u64) -> Result<()> {
        if size != 0 {
            return Err(Error::not_implemented(format!(
                "truncate to {size} bytes is not supported: only 0 (start over)"
            )));
        }
        let state = Arc::clone(&self.state);
        blocking(move || lock(&state).restart()).await
    }

    async fn commit(
        self: Box<Self>,
        size: u64,
        expected: Option<Digest>,
        _labels: Labels,
    ) -> Result<()> {
        // Labels belong to the metadata layer; this store keeps none (as containerd's local
        // store without a label store).
        let state = self.state;
        blocking(move || lock(&state).commit(size, expected)).await
    }

    async fn close(self: Box<Self>) -> Result<()> {
        let state = self.state;
        blocking(move || {
            lock(&state).close();
            Ok(())
        })
        .await
    }
}
