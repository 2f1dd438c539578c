//! Writers: opening, resuming, appending to and committing one ingest.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use berth_core::content::{Algorithm, ContentWriter, Digest, Digester, Status, WriterRequest};
use berth_core::error::Classify;
use berth_core::labels::Labels;
use berth_core::{Error, ErrorKind, Result};
use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::files::{
    BLOB_MODE, FILE_MODE, blocking, io_error, read_optional, read_time, remove_if_present,
    rename_noreplace, replace_file, sync_dir, write_time,
};
use crate::layout::{self, Layout};
use crate::locks::{Progress, RefLock};

/// Read size for re-hashing and for reads.
pub(crate) const CHUNK: usize = 1 << 20;

/// Chunks a writer may have acknowledged but not yet appended. Bounds the memory a fast
/// client can make a writer hold and how far the file may lag behind the acknowledgements.
const QUEUE: usize = 4;
/// Buffers a writer keeps for reuse: a client that waits for each reply (as containerd's
/// does) cycles through two.
const SPARE: usize = 2;
/// Writeback of appended data is started whenever this much more was appended...
const WRITEBACK_STEP: u64 = 4 << 20;
/// ...and only this much of the newest data stays in the page cache (see
/// [`Ingest::write_back`]).
const CACHE_WINDOW: u64 = 16 << 20;

/// The file side of one open ingest. It sits behind a mutex that only blocking tasks hold for
/// long: the writer's appending task, and the blocking steps of open, truncate, commit and
/// close, which first wait until nothing is queued for appending.
struct Ingest {
    layout: Layout,
    dir: PathBuf,
    reference: String,
    /// `None` once committed or closed: nothing may append to what is now a blob.
    file: Option<File>,
    /// The data file's length as this writer left it.
    written: u64,
    /// Writeback was started for everything before this offset.
    flushed: u64,
    /// Pages before this offset were dropped from the page cache.
    dropped: u64,
    /// Released explicitly after commit or close finished with the files, not whenever the
    /// last reference to this state goes away.
    lock: Option<RefLock>,
    /// A write failure to simulate, for tests of the deferred-error path.
    #[cfg(test)]
    fault: Option<Fault>,
}

/// A simulated write failure: the append that would cross offset `at` writes the bytes before
/// it, then fails; with `stuck`, cutting the partial bytes off fails too.
#[cfg(test)]
#[derive(Clone, Copy)]
struct Fault {
    at: u64,
    stuck: bool,
}

/// A writer holding one ingest of a [`crate::LocalStore`].
///
/// Writes are pipelined: [`ContentWriter::write`] hashes the bytes, copies them into a
/// buffer and queues it for a blocking task that appends to the data file, then returns, so
/// the client's next message arrives (and is hashed) while the previous one is being
/// written. The writer's offset and digest therefore cover the acknowledged bytes, which may
/// be ahead of the data file by up to [`QUEUE`] chunks; truncate, commit and close wait for
/// the queue to drain first, and commit verifies that the file holds exactly the
/// acknowledged bytes. A crash can lose acknowledged bytes, as it always could lose bytes
/// not yet committed: resuming re-hashes the file and reports the offset it really has.
///
/// A failed append stops the queue (later chunks would land at the wrong offset) and fails
/// the writer's next operation. A write or truncate that notices the failure re-hashes the
/// data file, so offset and digest again describe exactly the bytes on disk and the client
/// can continue from there (its next write at a stale offset is refused); commit and close
/// fail with it, leaving the ingest to be resumed (and re-hashed) by the next writer.
///
/// Dropping the writer without [`ContentWriter::close`] keeps the ingest: queued chunks are
/// still appended, then the ref is released (the [`RefLock`] inside is dropped), like close
/// does; only the `updatedat` file is not rewritten, and the data file's modification time
/// stands in for it.
pub(crate) struct LocalWriter {
    state: Arc<Mutex<Ingest>>,
    algorithm: Algorithm,
    /// The digest of the acknowledged bytes.
    digester: Digester,
    /// `offset` counts the acknowledged bytes.
    status: Status,
    /// Where `status.offset` is published for the store's status calls.
    progress: Arc<Progress>,
    /// Why offset and digest cannot be trusted to match the data file (re-reading it after
    /// a failed append failed, or a truncate was interrupted); only `truncate(0)` or
    /// reopening the ingest recovers.
    broken: Option<String>,
    /// The queue of chunks to append, made by the first write.
    pipe: Option<Arc<Pipe>>,
}

/// The chunks a writer acknowledged and has not appended yet.
///
/// A blocking task runs only while chunks are queued (an idle writer holds no thread, so
/// idle Write streams cannot starve the blocking pool), and each chunk holds one of
/// [`QUEUE`] permits until it is appended: a write waits for a permit, and getting all of
/// them back means every queued chunk is on file.
struct Pipe {
    state: Arc<Mutex<Ingest>>,
    room: Arc<Semaphore>,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<(Vec<u8>, OwnedSemaphorePermit)>,
    /// Whether an appending task is running.
    running: bool,
    /// Written buffers, for reuse.
    spare: Vec<Vec<u8>>,
    /// Why appending stopped; queued chunks were dropped.
    failure: Option<Error>,
}

fn lock(state: &Mutex<Ingest>) -> MutexGuard<'_, Ingest> {
    // A panic inside an append leaves at worst a data file longer than the digest covers;
    // the writer treats it as a failed append and re-hashes the file.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pipe {
    fn new(state: &Arc<Mutex<Ingest>>) -> Arc<Pipe> {
        Arc::new(Pipe {
            state: Arc::clone(state),
            room: Arc::new(Semaphore::new(QUEUE)),
            queue: Mutex::default(),
        })
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Every update leaves the queue consistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn failed(&self) -> bool {
        self.queue().failure.is_some()
    }

    fn buffer(&self) -> Vec<u8> {
        let mut buf = self.queue().spare.pop().unwrap_or_default();
        buf.clear();
        buf
    }

    /// Queues `chunk` and makes sure a task appends it. After a failure it is dropped: the
    /// writer's next operation reports the failure and re-reads the file.
    fn push(self: &Arc<Self>, chunk: Vec<u8>, permit: OwnedSemaphorePermit) {
        let mut queue = self.queue();
        if queue.failure.is_some() {
            return;
        }
        queue.chunks.push_back((chunk, permit));
        if !queue.running {
            queue.running = true;
            let pipe = Arc::clone(self);
            drop(tokio::task::spawn_blocking(move || pipe.append_queued()));
        }
    }

    /// The appending task: one chunk per lock of the ingest, so the blocking steps of the
    /// writer's other operations never see a half-appended chunk.
    fn append_queued(&self) {
        loop {
            let (chunk, permit) = {
                let mut queue = self.queue();
                let Some(next) = queue.chunks.pop_front() else {
                    // Under the same lock as `push` looks at it: a chunk queued from now on
                    // starts a new task.
                    queue.running = false;
                    return;
                };
                next
            };
            // A panic counts as a failed append, reported like one; the queue must not wait
            // for a task that is gone.
            let result = panic::catch_unwind(AssertUnwindSafe(|| lock(&self.state).append(&chunk)))
                .unwrap_or_else(|_| Err(Error::internal("content writer task panicked")));
            let mut queue = self.queue();
            if queue.spare.len() < SPARE {
                queue.spare.push(chunk);
            }
            if let Err(e) = result {
                // Later chunks would land at the wrong offset: they are dropped unwritten.
                queue.failure = Some(e);
                queue.chunks.clear();
            }
            // Released only now, so a writer that has every permit back also sees the
            // failure.
            drop(permit);
        }
    }
}

impl LocalWriter {
    /// Opens or resumes `request.reference`; the caller already holds its ref lock.
    pub(crate) async fn open(
        layout: Layout,
        request: WriterRequest,
        ref_lock: RefLock,
    ) -> Result<LocalWriter> {
        let progress = ref_lock.progress();
        // The lock moves into the task, so a caller that gives up waiting still holds the
        // ref until the task has stopped touching the ingest.
        let (ingest, digester, status) = blocking(move || open(layout, request, ref_lock)).await?;
        progress.set(status.offset);
        Ok(LocalWriter {
            state: Arc::new(Mutex::new(ingest)),
            algorithm: digester_algorithm(&status),
            digester,
            status,
            progress,
            broken: None,
            pipe: None,
        })
    }
}

type Opened = (Ingest, Digester, Status);

fn open(layout: Layout, request: WriterRequest, ref_lock: RefLock) -> Result<Opened> {
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
    let resumed = if fresh {
        None
    } else {
        match resume(&dir, &request)? {
            Ok(resumed) => Some(resumed),
            Err(why) => {
                tracing::warn!(
                    reference = %request.reference,
                    dir = %dir.display(),
                    "ingest is not resumable ({why}); starting it over"
                );
                None
            }
        }
    };
    let (file, digester, status) = match resumed {
        Some(resumed) => resumed,
        None => {
            let (file, status) = create(&dir, &request)?;
            let digester = Digester::new(digester_algorithm(&status));
            (file, digester, status)
        }
    };
    let written = status.offset;
    let ingest = Ingest {
        layout,
        dir,
        reference: request.reference,
        file: Some(file),
        written,
        flushed: written,
        dropped: written,
        lock: Some(ref_lock),
        #[cfg(test)]
        fault: None,
    };
    Ok((ingest, digester, status))
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
        let reference = &self.reference;
        self.file.as_mut().ok_or_else(|| {
            Error::failed_precondition(format!(
                "writer for ref {reference:?} is already committed or closed"
            ))
        })
    }

    fn append(&mut self, data: &[u8]) -> Result<()> {
        let offset = self.written;
        let path = self.data_path();
        // A simulated failure fires once, on the append that crosses its offset.
        #[cfg(test)]
        let fault = self
            .fault
            .take_if(|f| offset <= f.at && f.at < offset + data.len() as u64);
        let file = self.open_file()?;
        #[cfg(test)]
        let result = write_with_fault(file, data, offset, fault);
        #[cfg(not(test))]
        let result = file.write_all(data);
        if let Err(err) = result {
            // Cut off a partial write, so the file ends where the last good chunk did. If
            // that fails too, the writer's re-read of the file takes the stray bytes into its
            // digest: they are a prefix of what the client sent.
            #[cfg(test)]
            let undo = if fault.is_some_and(|f| f.stuck) {
                Err(io::Error::other("simulated"))
            } else {
                file.set_len(offset)
            };
            #[cfg(not(test))]
            let undo = file.set_len(offset);
            if let Err(undo) = undo {
                tracing::warn!(path = %path.display(), error = %undo, "cannot cut off a failed write");
            }
            return Err(io_error("write", &path, err));
        }
        self.written += data.len() as u64;
        self.write_back();
        Ok(())
    }

    /// Keeps a long ingest from filling the page cache with data nobody is about to read.
    ///
    /// Every [`WRITEBACK_STEP`] bytes, writeback of the new bytes is started, and pages more
    /// than [`CACHE_WINDOW`] behind the end (written back by then) are dropped. The page
    /// cache of an ingest then stays a few MiB whatever the blob's size: the kernel reuses
    /// the same warm pages instead of claiming fresh memory for every byte (which costs a
    /// host fault per page on VMs whose free memory is handed back to the host, as
    /// `virtio-balloon` free page reporting does), the running containers' cache is not
    /// evicted by a big pull, and the fsync at commit only waits for the last few MiB.
    ///
    /// `POSIX_FADV_DONTNEED` does both: it starts asynchronous writeback of dirty pages in
    /// the range, then drops the pages that are clean. Pages still being written back are
    /// skipped, so the drop goes one window further back each time to catch those. Only
    /// hints: failures are ignored, and blobs smaller than the window stay cached.
    fn write_back(&mut self) {
        if self.written - self.flushed < WRITEBACK_STEP {
            return;
        }
        let Some(file) = &self.file else {
            return;
        };
        advise_dontneed(file, self.flushed, self.written);
        self.flushed = self.written;
        if self.flushed > CACHE_WINDOW {
            let end = self.flushed - CACHE_WINDOW;
            advise_dontneed(file, self.dropped.saturating_sub(CACHE_WINDOW), end);
            self.dropped = end;
        }
    }

    /// Hashes the whole data file again (after a failed append), so offset and digest are
    /// those of the bytes on disk.
    fn rehash(&mut self, algorithm: Algorithm) -> Result<(Digester, u64)> {
        let path = self.data_path();
        let file = self.open_file()?;
        let mut digester = Digester::new(algorithm);
        let len = hash_from_start(file, &mut digester).map_err(|e| io_error("read", &path, e))?;
        self.written = len;
        self.flushed = len;
        self.dropped = len;
        Ok((digester, len))
    }

    fn restart(&mut self) -> Result<()> {
        let path = self.data_path();
        let file = self.open_file()?;
        // The file is opened for appending, so the next write lands at the new end.
        file.set_len(0)
            .map_err(|e| io_error("truncate", &path, e))?;
        self.written = 0;
        self.flushed = 0;
        self.dropped = 0;
        Ok(())
    }

    /// Records the last write time for a later resume; the ingest may already be aborted.
    fn save_updated_at(&self, updated_at: SystemTime) {
        if self.dir.exists()
            && let Err(e) = write_time(&self.dir.join(layout::UPDATED_AT), updated_at)
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

    /// Commits the bytes the writer acknowledged (`written`), then releases the ref whatever
    /// happened: the trait consumes the writer.
    fn commit(&mut self, size: u64, expected: Option<Digest>, written: Written) -> Result<()> {
        let result = self.open_file().map(|_| ()).and_then(|()| {
            let file = self
                .file
                .take()
                .ok_or_else(|| Error::internal("no data file"))?;
            self.commit_file(file, size, expected, &written)
        });
        if result
            .as_ref()
            .is_err_and(|e| e.kind() != ErrorKind::AlreadyExists)
        {
            // The ingest stays, ready for another attempt.
            self.save_updated_at(written.updated_at);
        }
        self.lock.take();
        result
    }

    fn commit_file(
        &mut self,
        file: File,
        size: u64,
        expected: Option<Digest>,
        written: &Written,
    ) -> Result<()> {
        let data = self.data_path();
        if !data.exists() {
            return Err(Error::not_found(format!(
                "ingest ref {:?} was aborted while being written",
                self.reference
            )));
        }
        file.sync_all().map_err(|e| io_error("sync", &data, e))?;
        let actual = file
            .metadata()
            .map_err(|e| io_error("stat", &data, e))?
            .len();
        if actual != written.offset || actual != self.written {
            return Err(Error::new(
                ErrorKind::DataLoss,
                format!(
                    "{} holds {actual} bytes but {} were written through this writer",
                    data.display(),
                    written.offset
                ),
            ));
        }
        if size != 0 && size != actual {
            return Err(Error::failed_precondition(format!(
                "unexpected commit size {actual}, expected {size}"
            )));
        }
        let mut digest = written.digest.clone();
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

    fn close(&mut self, updated_at: SystemTime) {
        if self.file.take().is_some() {
            self.save_updated_at(updated_at);
        }
        self.lock.take();
    }
}

/// What the writer acknowledged, for commit to verify against the file.
struct Written {
    offset: u64,
    digest: Digest,
    updated_at: SystemTime,
}

/// Hints that `file[start..end)` will not be read soon (see [`Ingest::write_back`]).
fn advise_dontneed(file: &File, start: u64, end: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(start), i64::try_from(end - start)) else {
        return;
    };
    if len > 0 {
        // Only a hint: an error costs page cache, never data.
        let _ = posix_fadvise(file, offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

/// `write_all`; with the fault that fires on this append, the bytes before its offset, then a
/// failure.
#[cfg(test)]
fn write_with_fault(
    file: &mut File,
    data: &[u8],
    offset: u64,
    fault: Option<Fault>,
) -> io::Result<()> {
    match fault {
        Some(Fault { at, .. }) => {
            let keep = usize::try_from(at - offset).map_err(io::Error::other)?;
            file.write_all(&data[..keep])?;
            Err(io::Error::other("simulated write failure"))
        }
        None => file.write_all(data),
    }
}

impl LocalWriter {
    /// Fails while offset and digest may disagree with the data file.
    fn usable(&self) -> Result<()> {
        match &self.broken {
            None => Ok(()),
            Some(why) => Err(Error::failed_precondition(format!(
                "ingest ref {:?} is unusable ({why}): truncate it or open it again",
                self.status.reference
            ))),
        }
    }

    /// Waits until every queued chunk is appended; the failure that stopped appending, if
    /// any (reported once). Safe to cancel: nothing changes until it returns.
    async fn drain(&mut self) -> Result<()> {
        let Some(pipe) = &self.pipe else {
            return Ok(());
        };
        let all = pipe
            .room
            .acquire_many(QUEUE as u32)
            .await
            .map_err(|e| Error::internal(format!("content writer queue: {e}")))?;
        drop(all);
        pipe.queue().failure.take().map_or(Ok(()), Err)
    }

    /// [`Self::drain`], and after a failed append, re-reads the data file so offset and
    /// digest are those of the bytes on disk; the failure is returned either way.
    async fn settle(&mut self) -> Result<()> {
        let Err(failure) = self.drain().await else {
            return Ok(());
        };
        // Until the file is re-read nothing may trust offset and digest, also if this call
        // is cancelled half-way.
        self.broken = Some("a write failed and the data file was not re-read".to_owned());
        let (state, algorithm) = (Arc::clone(&self.state), self.algorithm);
        match blocking(move || lock(&state).rehash(algorithm)).await {
            Ok((digester, offset)) => {
                self.digester = digester;
                self.status.offset = offset;
                self.progress.set(offset);
                self.broken = None;
            }
            Err(e) => {
                self.broken = Some(format!(
                    "a write failed, then re-reading the data file failed: {}",
                    e.message()
                ));
            }
        }
        Err(failure)
    }

    /// Makes the next append that crosses `at` fail (after writing the bytes before `at`);
    /// with `stuck`, cutting those bytes off fails too.
    #[cfg(test)]
    fn inject_fault(&self, at: u64, stuck: bool) {
        lock(&self.state).fault = Some(Fault { at, stuck });
    }
}

#[async_trait::async_trait]
impl ContentWriter for LocalWriter {
    fn status(&self) -> Status {
        self.status.clone()
    }

    fn digest(&self) -> Digest {
        self.digester.digest()
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.usable()?;
        if self.pipe.as_ref().is_some_and(|pipe| pipe.failed()) {
            // An earlier append failed: this write fails, and the writer re-synchronises.
            self.settle().await?;
        }
        let pipe = Arc::clone(self.pipe.get_or_insert_with(|| Pipe::new(&self.state)));
        // Nothing changes before the queue has room: a write whose future is dropped while
        // waiting here leaves no trace.
        let permit = Arc::clone(&pipe.room)
            .acquire_owned()
            .await
            .map_err(|e| Error::internal(format!("content writer queue: {e}")))?;
        let mut buf = pipe.buffer();
        buf.extend_from_slice(data);
        self.digester.update(data);
        self.status.offset += data.len() as u64;
        self.status.updated_at = SystemTime::now();
        self.progress.set(self.status.offset);
        pipe.push(buf, permit);
        Ok(())
    }

    async fn truncate(&mut self, size: u64) -> Result<()> {
        if size != 0 {
            return Err(Error::not_implemented(format!(
                "truncate to {size} bytes is not supported: only 0 (start over)"
            )));
        }
        self.settle().await?;
        // Offset and digest are stale from the moment the file is cut, also if this call is
        // cancelled before it learns the outcome.
        self.broken = Some("a truncate failed or was interrupted".to_owned());
        let state = Arc::clone(&self.state);
        blocking(move || lock(&state).restart()).await?;
        self.digester = Digester::new(self.algorithm);
        self.status.offset = 0;
        self.status.updated_at = SystemTime::now();
        self.progress.set(0);
        self.broken = None;
        Ok(())
    }

    async fn commit(
        mut self: Box<Self>,
        size: u64,
        expected: Option<Digest>,
        _labels: Labels,
    ) -> Result<()> {
        // Labels belong to the metadata layer; this store keeps none (as containerd's local
        // store without a label store).
        let drained = self.drain().await.and_then(|()| self.usable());
        let state = Arc::clone(&self.state);
        let written = Written {
            offset: self.status.offset,
            digest: self.digester.digest(),
            updated_at: self.status.updated_at,
        };
        if let Err(e) = drained {
            // The ingest stays for a writer that resumes it (and re-reads the file).
            blocking(move || {
                lock(&state).close(written.updated_at);
                Ok(())
            })
            .await?;
            return Err(e);
        }
        blocking(move || lock(&state).commit(size, expected, written)).await
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        let drained = self.drain().await;
        let (state, updated_at) = (Arc::clone(&self.state), self.status.updated_at);
        blocking(move || {
            lock(&state).close(updated_at);
            Ok(())
        })
        .await?;
        drained
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use berth_core::content::ContentWriter as _;

    use super::*;
    use crate::locks::RefLocks;

    fn bytes(seed: u8, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect()
    }

    async fn open_writer(locks: &Arc<RefLocks>, root: &Path, reference: &str) -> LocalWriter {
        let request = WriterRequest {
            reference: reference.to_owned(),
            total: 0,
            expected: None,
        };
        let lock = locks.try_lock(reference).expect("ref is free");
        LocalWriter::open(Layout::new(root.to_owned()), request, lock)
            .await
            .expect("open writer")
    }

    fn data_file(root: &Path, reference: &str) -> PathBuf {
        Layout::new(root.to_owned())
            .ingest(reference)
            .join(layout::DATA)
    }

    /// Waits until the appending task has recorded a failure, so the next operation is
    /// the one that must report it.
    async fn until_failed(w: &LocalWriter) {
        let pipe = w.pipe.as_ref().expect("a write started the queue");
        for _ in 0..500 {
            if pipe.failed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the simulated append failure was never recorded");
    }

    fn is_simulated(err: &Error) -> bool {
        err.message().contains("simulated write failure")
    }

    #[tokio::test]
    async fn a_deferred_write_error_fails_the_commit_and_the_ingest_resumes_from_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let locks = Arc::new(RefLocks::default());
        let (a, b) = (bytes(1, 1000), bytes(2, 1000));
        let whole = [a.as_slice(), b.as_slice()].concat();

        let mut w = open_writer(&locks, dir.path(), "r").await;
        w.write(&a).await.expect("write a");
        w.inject_fault(1500, false);
        // Acknowledged: the append fails later, on the appending task.
        w.write(&b).await.expect("write b is accepted");
        assert_eq!(w.status().offset, 2000);
        let err = Box::new(w)
            .commit(2000, Some(Digest::sha256_of(&whole)), Labels::new())
            .await
            .expect_err("commit must report the failed append");
        assert!(is_simulated(&err), "{err}");
        assert!(
            !Layout::new(dir.path().to_owned())
                .blob(&Digest::sha256_of(&whole))
                .exists(),
            "no blob after a failed append"
        );
        // The partial append was cut off: the ingest holds exactly the good bytes.
        assert_eq!(fs::read(data_file(dir.path(), "r")).expect("data"), a);
        assert_eq!(
            locks.offset("r"),
            None,
            "the failed commit released the ref"
        );

        let mut w = open_writer(&locks, dir.path(), "r").await;
        assert_eq!(w.status().offset, 1000);
        assert_eq!(w.digest(), Digest::sha256_of(&a));
        w.write(&b).await.expect("write b again");
        Box::new(w)
            .commit(2000, Some(Digest::sha256_of(&whole)), Labels::new())
            .await
            .expect("commit");
        let blob = Layout::new(dir.path().to_owned()).blob(&Digest::sha256_of(&whole));
        assert_eq!(fs::read(blob).expect("blob"), whole);
    }

    #[tokio::test]
    async fn a_deferred_write_error_fails_the_next_write_which_resyncs_with_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let locks = Arc::new(RefLocks::default());
        let (a, b, c) = (bytes(1, 1000), bytes(2, 1000), bytes(3, 1000));
        let whole = [a.as_slice(), b.as_slice(), c.as_slice()].concat();

        let mut w = open_writer(&locks, dir.path(), "r").await;
        w.write(&a).await.expect("write a");
        // The failed append leaves 500 bytes of b that cannot be cut off.
        w.inject_fault(1500, true);
        w.write(&b).await.expect("write b is accepted");
        until_failed(&w).await;
        assert_eq!(
            locks.offset("r"),
            Some(2000),
            "status shows what was acknowledged"
        );
        let err = w
            .write(&c)
            .await
            .expect_err("the next write reports the failure");
        assert!(is_simulated(&err), "{err}");
        // Offset and digest now describe the file, stray bytes included, and the status
        // calls see the same offset.
        assert_eq!(w.status().offset, 1500);
        assert_eq!(w.digest(), Digest::sha256_of(&whole[..1500]));
        assert_eq!(locks.offset("r"), Some(1500));
        assert_eq!(
            fs::read(data_file(dir.path(), "r")).expect("data"),
            &whole[..1500]
        );
        // c was refused, so the client continues from the offset it is told.
        w.write(&whole[1500..]).await.expect("write the rest");
        Box::new(w)
            .commit(3000, Some(Digest::sha256_of(&whole)), Labels::new())
            .await
            .expect("commit");
    }

    #[tokio::test]
    async fn a_deferred_write_error_fails_truncate_and_close_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let locks = Arc::new(RefLocks::default());
        let (a, b) = (bytes(1, 1000), bytes(2, 1000));

        let mut w = open_writer(&locks, dir.path(), "r").await;
        w.write(&a).await.expect("write a");
        w.inject_fault(1000, false);
        w.write(&b).await.expect("write b is accepted");
        let err = w
            .truncate(0)
            .await
            .expect_err("truncate reports the failure");
        assert!(is_simulated(&err), "{err}");
        assert_eq!(w.status().offset, 1000, "re-read from the file");
        w.truncate(0).await.expect("truncate again");
        assert_eq!(w.status().offset, 0);
        assert_eq!(w.digest(), Digest::sha256_of(b""));

        w.write(&a).await.expect("write a after the truncate");
        w.inject_fault(1500, false);
        w.write(&b).await.expect("write b is accepted");
        let err = Box::new(w)
            .close()
            .await
            .expect_err("close reports the failure");
        assert!(is_simulated(&err), "{err}");
        let w = open_writer(&locks, dir.path(), "r").await;
        assert_eq!(w.status().offset, 1000, "resumed from the file");
        assert_eq!(w.digest(), Digest::sha256_of(&a));
    }

    #[tokio::test]
    async fn long_ingests_pass_through_the_writeback_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let locks = Arc::new(RefLocks::default());
        let size = (CACHE_WINDOW + 3 * WRITEBACK_STEP) as usize + 12_345;
        let data = bytes(7, size);
        let digest = Digest::sha256_of(&data);
        let mut w = open_writer(&locks, dir.path(), "big").await;
        for chunk in data.chunks(CHUNK - 3) {
            w.write(chunk).await.expect("write");
        }
        Box::new(w)
            .commit(size as u64, Some(digest.clone()), Labels::new())
            .await
            .expect("commit");
        let blob = Layout::new(dir.path().to_owned()).blob(&digest);
        assert!(
            fs::read(blob).expect("blob") == data,
            "blob content differs"
        );
    }
}
