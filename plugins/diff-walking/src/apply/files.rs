//! Small regular files created on a helper thread while the applying thread goes on with the
//! next entries. Creating a file (allocating its inode) is most of the cost of a layer of
//! many small files, and two threads create them faster than one.
//!
//! Order: the helper runs its jobs in the order they were sent. Before an entry that could
//! see or change a file still in flight, the applying thread waits: for the entry's own path
//! and its ancestors ([`Files::wait_for_path`]) before directories and small files, and until
//! the helper is idle ([`Files::settle`]) before everything it cannot judge path by path
//! (whiteouts, opaque markers, hard links, symlinks, devices, larger files, and the
//! directory times set at the end). A failed job stops the helper; its error is the apply's.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;

use super::{Ignored, Kind, Meta, set_meta};
use crate::ApplyOptions;
use crate::error::{Error, Result};
use crate::tree::{Node, remove_all_at};

/// Regular files up to this size go to the helper (their data is held in memory meanwhile).
const MAX_SIZE: u64 = 64 * 1024;
/// Jobs queued ahead of the helper: at most `QUEUE * MAX_SIZE` bytes of file data.
const QUEUE: usize = 64;

/// A file for the helper to create in `dir`.
struct Job {
    seq: u64,
    /// The entry's number in the archive.
    entry: u64,
    dir: OwnedFd,
    base: Vec<u8>,
    data: Vec<u8>,
    meta: Meta,
    name: String,
}

/// What the helper hands back when it stops.
type Outcome = (Option<Error>, Ignored);

/// The applying thread's end of the helper.
pub(super) struct Files<'scope> {
    jobs: Option<SyncSender<Job>>,
    /// Each job's number once done, and whether it succeeded.
    done: Receiver<(u64, bool)>,
    helper: Option<ScopedJoinHandle<'scope, Outcome>>,
    stop: Arc<AtomicBool>,
    sent: u64,
    completed: u64,
    /// Paths of files sent, with the number of the last job for each.
    in_flight: HashMap<Vec<u8>, u64>,
}

/// Whether a regular file of `size` bytes goes to the helper.
pub(super) fn takes(size: u64) -> bool {
    size <= MAX_SIZE
}

impl<'scope> Files<'scope> {
    /// Starts the helper thread in `scope`.
    pub(super) fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        options: &'env ApplyOptions,
    ) -> std::io::Result<Files<'scope>> {
        let (jobs_tx, jobs_rx) = sync_channel(QUEUE);
        let (done_tx, done_rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let helper_stop = stop.clone();
        let helper = std::thread::Builder::new()
            .name("layer-files".to_owned())
            .spawn_scoped(scope, move || run(options, jobs_rx, done_tx, &helper_stop))?;
        Ok(Files {
            jobs: Some(jobs_tx),
            done: done_rx,
            helper: Some(helper),
            stop,
            sent: 0,
            completed: 0,
            in_flight: HashMap::new(),
        })
    }

    /// Hands the file `rel` (`base` in `dir`) to the helper.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send(
        &mut self,
        entry: u64,
        rel: &[u8],
        dir: OwnedFd,
        base: &[u8],
        data: Vec<u8>,
        meta: Meta,
        name: &str,
    ) -> Result<()> {
        self.sent += 1;
        let job = Job {
            seq: self.sent,
            entry,
            dir,
            base: base.to_vec(),
            data,
            meta,
            name: name.to_owned(),
        };
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            // The helper stopped: it failed.
            return Err(self.failure());
        }
        self.in_flight.insert(rel.to_vec(), self.sent);
        // Forget what is done, so the map stays as small as the queue.
        if self.in_flight.len() > 4 * QUEUE {
            let completed = self.collect_done()?;
            self.in_flight.retain(|_, seq| *seq > completed);
        }
        Ok(())
    }

    /// Waits until no file at `rel` or at any of its ancestors is in flight.
    pub(super) fn wait_for_path(&mut self, rel: &[u8]) -> Result<()> {
        if self.completed == self.sent {
            return Ok(());
        }
        let mut last = 0;
        let mut end = rel.len();
        loop {
            if let Some(seq) = self.in_flight.get(&rel[..end]) {
                last = last.max(*seq);
            }
            match rel[..end].iter().rposition(|b| *b == b'/') {
                Some(slash) => end = slash,
                None => break,
            }
        }
        self.wait_until(last)
    }

    /// Waits until the helper has done every job sent.
    pub(super) fn settle(&mut self) -> Result<()> {
        self.wait_until(self.sent)?;
        self.in_flight.clear();
        Ok(())
    }

    /// Settles, stops the helper and returns the xattrs it skipped.
    pub(super) fn finish(mut self) -> Result<Ignored> {
        self.settle()?;
        self.jobs = None;
        let (error, ignored) = self.join();
        match error {
            Some(e) => Err(e),
            None => Ok(ignored),
        }
    }

    fn wait_until(&mut self, seq: u64) -> Result<()> {
        while self.completed < seq {
            match self.done.recv() {
                Ok((n, true)) => self.completed = n,
                Ok((_, false)) | Err(_) => return Err(self.failure()),
            }
        }
        Ok(())
    }

    /// Takes the reports of finished jobs without waiting; returns the last one done.
    fn collect_done(&mut self) -> Result<u64> {
        while let Ok(report) = self.done.try_recv() {
            match report {
                (n, true) => self.completed = n,
                (_, false) => return Err(self.failure()),
            }
        }
        Ok(self.completed)
    }

    /// The helper's error, once it has stopped.
    fn failure(&mut self) -> Error {
        self.jobs = None;
        match self.join() {
            (Some(e), _) => e,
            (None, _) => Error::Corrupt {
                at: "a file of the layer".to_owned(),
                source: std::io::Error::other("the layer's file thread stopped"),
            },
        }
    }

    fn join(&mut self) -> Outcome {
        match self.helper.take().map(ScopedJoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            Some(Err(_)) => (
                Some(Error::Corrupt {
                    at: "a file of the layer".to_owned(),
                    source: std::io::Error::other("the layer's file thread panicked"),
                }),
                Ignored::default(),
            ),
            None => (None, Ignored::default()),
        }
    }
}

impl Drop for Files<'_> {
    fn drop(&mut self) {
        // The apply stopped early: what is still queued is not created.
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run(
    options: &ApplyOptions,
    jobs: Receiver<Job>,
    done: Sender<(u64, bool)>,
    stop: &AtomicBool,
) -> Outcome {
    let mut ignored = Ignored::default();
    for job in jobs {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if let Err(e) = create(options, &mut ignored, &job) {
            let _ = done.send((job.seq, false));
            return (Some(e), ignored);
        }
        if done.send((job.seq, true)).is_err() {
            break;
        }
    }
    (None, ignored)
}

/// What the applying thread does for a larger file, with the data at hand.
fn create(options: &ApplyOptions, ignored: &mut Ignored, job: &Job) -> Result<()> {
    let name = job.name.as_str();
    ignored.entry = job.entry;
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = job.dir.as_fd();
    // Mode 0600 until the final chmod, which happens after chown (chown clears setuid).
    let create = || openat(dir, &job.base[..], flags, Mode::from_bits_truncate(0o600));
    let fd = match create() {
        Ok(fd) => fd,
        Err(Errno::EEXIST) => {
            remove_all_at(dir, &job.base).map_err(|e| Error::fs(name, "replace", e))?;
            create().map_err(|e| Error::fs(name, "create file", e))?
        }
        Err(e) => return Err(Error::fs(name, "create file", e)),
    };
    let mut file = File::from(fd);
    file.write_all(&job.data)
        .map_err(|e| Error::fs(name, "write file", e))?;
    set_meta(
        options,
        ignored,
        Node::Fd(file.as_fd()),
        Kind::File,
        &job.meta,
        name,
        true,
    )
}
