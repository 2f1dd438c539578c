//! The in-process table of refs held by writers.
//!
//! One writer per ref: the table is the only thing that stops two writers from appending to
//! the same `data` file. A [`RefLock`] releases its entry when dropped, so a writer that is
//! dropped without `close` (a cancelled gRPC stream, a panicking caller) frees the ref too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use berth_core::{Error, ErrorKind, Result};

#[derive(Default)]
pub(crate) struct RefLocks {
    held: Mutex<HashMap<String, (Instant, SystemTime)>>,
}

impl RefLocks {
    fn table(&self) -> MutexGuard<'_, HashMap<String, (Instant, SystemTime)>> {
        // The table stays consistent whatever a panicking holder was doing: every update is
        // a single insert or remove.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `reference`, or fails with Unavailable saying how long it has been held, which
    /// tells a stuck writer (long) from contention (short).
    pub(crate) fn try_lock(self: &Arc<Self>, reference: &str) -> Result<RefLock> {
        let mut table = self.table();
        if let Some((since, at)) = table.get(reference) {
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
        table.insert(reference.to_owned(), (Instant::now(), SystemTime::now()));
        Ok(RefLock {
            locks: Arc::clone(self),
            reference: reference.to_owned(),
        })
    }
}

/// A held ref; dropping it releases the ref.
pub(crate) struct RefLock {
    locks: Arc<RefLocks>,
    reference: String,
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
        drop(held);
        assert!(locks.try_lock("r").is_ok());
    }
}
