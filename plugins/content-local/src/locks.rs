//! The in-process table of refs held by writers.
//!
//! One writer per ref: the table is the only thing that stops two writers from appending to
//! the same `data` file. A [`RefLock`] releases its entry when dropped, so a writer that is
//! dropped without `close` (a cancelled gRPC stream, a panicking caller) frees the ref too.
//!
//! Each entry also carries the writer's offset: a writer acknowledges bytes before its
//! appending task has written them, so the data file's length can lag behind what the client
//! was told, and status must report the latter while the writer holds the ref.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use berth_core::{Error, ErrorKind, Result};

/// One held ref: since when (for the Unavailable message) and the holder's offset.
struct Held {
    since: Instant,
    at: SystemTime,
    progress: Arc<Progress>,
}

/// A writer's offset as it told its client; [`Progress::UNKNOWN`] until the writer has opened
/// (resuming re-hashes the file first, and meanwhile the file's length is the truth).
pub(crate) struct Progress(AtomicU64);

impl Progress {
    const UNKNOWN: u64 = u64::MAX;

    pub(crate) fn set(&self, offset: u64) {
        self.0.store(offset, Ordering::Release);
    }

    fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Acquire)).filter(|&o| o != Self::UNKNOWN)
    }
}

#[derive(Default)]
pub(crate) struct RefLocks {
    held: Mutex<HashMap<String, Held>>,
}

impl RefLocks {
    fn table(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        // The table stays consistent whatever a panicking holder was doing: every update is
        // a single insert or remove.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `reference`, or fails with Unavailable saying how long it has been held, which
    /// tells a stuck writer (long) from contention (short).
    pub(crate) fn try_lock(self: &Arc<Self>, reference: &str) -> Result<RefLock> {
        let mut table = self.table();
        if let Some(Held { since, at, .. }) = table.get(reference) {
            let at = at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "ref {reference:?} locked for {:.1?} (since unix time {at})",
                    since.elapsed()
                ),
            ));
        }
        let progress = Arc::new(Progress(AtomicU64::new(Progress::UNKNOWN)));
        table.insert(
            reference.to_owned(),
            Held {
                since: Instant::now(),
                at: SystemTime::now(),
                progress: Arc::clone(&progress),
            },
        );
        Ok(RefLock {
            locks: Arc::clone(self),
            reference: reference.to_owned(),
            progress,
        })
    }

    /// The offset the writer holding `reference` has acknowledged, if one holds it and has
    /// finished opening.
    pub(crate) fn offset(&self, reference: &str) -> Option<u64> {
        self.table()
            .get(reference)
            .and_then(|held| held.progress.get())
    }
}

/// A held ref; dropping it releases the ref.
pub(crate) struct RefLock {
    locks: Arc<RefLocks>,
    reference: String,
    progress: Arc<Progress>,
}

impl RefLock {
    /// Where the holder publishes its offset.
    pub(crate) fn progress(&self) -> Arc<Progress> {
        Arc::clone(&self.progress)
    }
}

impl Drop for RefLock {
    fn drop(&mut self) {
        self.locks.table().remove(&self.reference);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::error::Classify;

    #[test]
    fn a_held_ref_is_unavailable_until_dropped() {
        let locks = Arc::new(RefLocks::default());
        let held = locks.try_lock("r").expect("first");
        let err = locks.try_lock("r").err().expect("second must fail");
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.message().contains("ref \"r\" locked"), "{err}");
        assert!(locks.try_lock("other").is_ok());
        assert_eq!(
            locks.offset("r"),
            None,
            "no offset before the writer opened"
        );
        held.progress().set(7);
        assert_eq!(locks.offset("r"), Some(7));
        drop(held);
        assert_eq!(locks.offset("r"), None);
        assert!(locks.try_lock("r").is_ok());
    }
}
