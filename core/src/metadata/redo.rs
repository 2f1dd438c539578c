//! The shared database's redo log: what makes a write durable.
//!
//! sled 0.34 makes its log durable only through `Db::flush`, which hands the buffered log to
//! one of its io threads (waking the idle ones in turn), waits there for a `sync_file_range`,
//! and leaves the file's growth and the disk's cache to the `fdatasync` berth adds after it
//! ([`super::SledLog`]): two trips to the disk and a thread hop each way, about 0.26 ms per
//! flush on the bench machine, three times per snapshot cycle. Every write to the shared
//! database now also appends a record of its keys to this file, and a reply waits for one
//! `fdatasync` of it, on the writer's own thread. The file has a fixed size and was written
//! in full when it was made, so that `fdatasync` writes data pages and no inode: the trip
//! bbolt makes per commit, and nothing more.
//!
//! sled still holds the records (reads never look here) and writes its own log in the
//! background. A **checkpoint**, a durable sled flush, makes everything the log holds
//! redundant; the log then starts a new generation from its beginning. It runs when the log
//! is full, under the append lock, so no record can be appended between the flush and the
//! restart. Opening the database replays the records of the current generation, oldest
//! first, through [`super::journal`] (each record atomic), then checkpoints.
//!
//! Replaying is safe over any state sled recovered: writes are applied before they are
//! appended, each key's writes are serialised by its tree's writer lock, and the log holds
//! every write since the last checkpoint, so the last record naming a key carries its last
//! acknowledged value, and a key no record names was durable at the checkpoint.
//!
//! # Format
//!
//! ```text
//! 0     header: "berthRL1", u64 generation, u32 CRC-32 of those 16 bytes (big-endian)
//! 4096  records, back to back: u32 payload length, u32 CRC-32 of what follows it,
//!       u64 generation, u64 sequence (1, 2, ... within the generation), payload
//! ```
//!
//! A payload is the tree's name (u16 length, bytes) and the write's keys in the journal's
//! encoding. Reading stops at the first record that does not check out: a torn tail (a
//! write that was never acknowledged, as its sync never returned), or an older generation's
//! record where the current one ends. A header that does not check out means the file was
//! never finished (or tore while a checkpoint rewrote it, after which nothing is pending):
//! it is written in full again.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::{Error, Result};
use crate::metadata::journal::{self, Op};

/// The log's name in the database's directory (sled leaves other names alone).
pub const FILE_NAME: &str = "berth.redo";

/// The log's size: about 4,000 snapshot calls between checkpoints.
const SIZE: u64 = 2 << 20;
/// Where records start: the header has a page of its own, so rewriting it never touches one.
const HEADER: u64 = 4096;
const MAGIC: &[u8; 8] = b"berthRL1";
/// Length, checksum, generation, sequence.
const RECORD_HEAD: usize = 24;

/// The redo log of one database (see the module's documentation).
#[derive(Debug)]
pub struct RedoLog {
    file: File,
    path: PathBuf,
    state: Mutex<State>,
    syncs: AtomicU64,
    checkpoints: AtomicU64,
}

#[derive(Debug)]
struct State {
    generation: u64,
    next_seq: u64,
    offset: u64,
}

impl RedoLog {
    /// Opens the log at `path`, making it when it is missing or unfinished, and returns it
    /// with the payloads of its current generation, oldest first; appends continue that
    /// generation until [`RedoLog::restart`] (once the caller made those payloads durable).
    /// Blocking.
    pub fn open(path: &Path) -> Result<(RedoLog, Vec<Vec<u8>>)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| io_error("open", path, &e))?;
        let mut log = RedoLog {
            file,
            path: path.to_owned(),
            state: Mutex::new(State {
                generation: 0,
                next_seq: 1,
                offset: HEADER,
            }),
            syncs: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
        };
        let len = log
            .file
            .metadata()
            .map_err(|e| io_error("stat", path, &e))?
            .len();
        let mut content = Vec::new();
        if len == SIZE {
            content.resize(SIZE as usize, 0);
            log.file
                .read_exact_at(&mut content, 0)
                .map_err(|e| io_error("read", path, &e))?;
        }
        let Some(generation) = read_header(&content) else {
            log.make()?;
            return Ok((log, Vec::new()));
        };
        let (payloads, offset) = read_records(&content, generation);
        *log.state_mut() = State {
            generation,
            next_seq: payloads.len() as u64 + 1,
            offset,
        };
        Ok((log, payloads))
    }

    /// Writes the whole file (zeros and a header of generation 1) and syncs it and its
    /// directory, so later syncs change no file metadata.
    fn make(&mut self) -> Result<()> {
        let zeros = vec![0u8; SIZE as usize];
        self.file
            .set_len(0)
            .and_then(|()| self.file.write_all_at(&zeros, 0))
            .and_then(|()| self.file.write_all_at(&header(1), 0))
            .and_then(|()| self.file.sync_all())
            .map_err(|e| io_error("write", &self.path, &e))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error("sync the directory of", &self.path, &e))?;
        }
        *self.state_mut() = State {
            generation: 1,
            next_seq: 1,
            offset: HEADER,
        };
        Ok(())
    }

    fn state_mut(&mut self) -> &mut State {
        self.state.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a new generation: the records so far are never replayed again. Call it only
    /// when all of them are durable in sled. Blocking.
    pub fn restart(&self) -> Result<()> {
        let mut state = self.lock();
        self.restart_locked(&mut state)
    }

    fn restart_locked(&self, state: &mut State) -> Result<()> {
        let generation = state.generation + 1;
        self.file
            .write_all_at(&header(generation), 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_error("write the header of", &self.path, &e))?;
        *state = State {
            generation,
            next_seq: 1,
            offset: HEADER,
        };
        Ok(())
    }

    /// Appends `payload` (already applied to sled). When the log is full, `checkpoint` makes
    /// sled durable first and the log restarts; a payload larger than the whole log is made
    /// durable by that checkpoint alone. The record reaches the disk with the next
    /// [`RedoLog::sync`]. Blocking.
    pub fn append(&self, payload: &[u8], checkpoint: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut state = self.lock();
        let len = (RECORD_HEAD + payload.len()) as u64;
        if state.offset + len > SIZE {
            checkpoint()?;
            self.checkpoints.fetch_add(1, Ordering::Relaxed);
            self.restart_locked(&mut state)?;
            if HEADER + len > SIZE {
                return Ok(());
            }
        }
        let record = record(state.generation, state.next_seq, payload);
        self.file
            .write_all_at(&record, state.offset)
            .map_err(|e| io_error("append to", &self.path, &e))?;
        state.offset += len;
        state.next_seq += 1;
        Ok(())
    }

    /// `fdatasync`: every record appended before the call is durable when it returns.
    /// Blocking.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| io_error("sync", &self.path, &e))?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How many syncs succeeded.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// How many checkpoints a full log caused.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Ordering::Relaxed)
    }
}

/// The payload of a write of `ops` to the tree `tree`.
pub fn encode(tree: &[u8], ops: &[Op]) -> Vec<u8> {
    let name_len = u16::try_from(tree.len()).expect("sled tree names are short");
    let mut out = name_len.to_be_bytes().to_vec();
    out.extend_from_slice(tree);
    out.extend_from_slice(&journal::encode(ops));
    out
}

/// The tree's name and the ops of a payload from [`encode`].
pub fn decode(payload: &[u8]) -> Result<(Vec<u8>, Vec<Op>)> {
    let corrupt = || {
        Error::internal(
            "a record of the metadata redo log passed its checksum but does not decode: \
             restore the metadata database from a backup",
        )
    };
    let (len, rest) = payload.split_first_chunk::<2>().ok_or_else(corrupt)?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() < len {
        return Err(corrupt());
    }
    let (tree, ops) = rest.split_at(len);
    Ok((tree.to_vec(), journal::decode(ops).map_err(|_| corrupt())?))
}

fn header(generation: u64) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&generation.to_be_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn read_header(content: &[u8]) -> Option<u64> {
    let head = content.get(..20)?;
    let (body, crc) = head.split_at(16);
    if &body[..8] != MAGIC || crc32fast::hash(body).to_be_bytes() != crc {
        return None;
    }
    let generation = u64::from_be_bytes(body[8..16].try_into().ok()?);
    (generation > 0).then_some(generation)
}

fn record(generation: u64, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEAD + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_be_bytes());
    out
}

/// The payloads of `generation`'s records in `content`, up to the first that does not check
/// out, and where that one starts.
fn read_records(content: &[u8], generation: u64) -> (Vec<Vec<u8>>, u64) {
    let mut out = Vec::new();
    let mut at = HEADER as usize;
    let mut seq = 1u64;
    while let Some(head) = content.get(at..at + RECORD_HEAD) {
        let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes"));
        let end = at + RECORD_HEAD + len;
        let Some(checked) = content.get(at + 8..end) else {
            break;
        };
        let record_generation = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
        let record_seq = u64::from_be_bytes(head[16..24].try_into().expect("8 bytes"));
        if record_generation != generation || record_seq != seq || crc32fast::hash(checked) != crc {
            break;
        }
        out.push(content[at + RECORD_HEAD..end].to_vec());
        at = end;
        seq += 1;
    }
    (out, at as u64)
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::internal(format!(
        "cannot {what} the metadata redo log {}: {e}",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: usize) -> Vec<u8> {
        encode(
            b"tree",
            &[(format!("k{n}").into_bytes(), Some(vec![n as u8; n]))],
        )
    }

    fn no_checkpoint() -> Result<()> {
        panic!("no checkpoint expected")
    }

    #[test]
    fn a_new_log_is_written_in_full_and_replays_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let (_log, records) = RedoLog::open(&path).expect("open");
        assert!(records.is_empty());
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), SIZE);
    }

    #[test]
    fn appended_records_come_back_in_order_until_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        {
            let (log, _) = RedoLog::open(&path).expect("open");
            for n in 0..5 {
                log.append(&payload(n), no_checkpoint).expect("append");
            }
            log.sync().expect("sync");
        }
        let (log, records) = RedoLog::open(&path).expect("reopen");
        assert_eq!(records, (0..5).map(payload).collect::<Vec<_>>());
        let (tree, ops) = decode(&records[3]).expect("decode");
        assert_eq!(tree, b"tree");
        assert_eq!(ops, [(b"k3".to_vec(), Some(vec![3; 3]))]);

        // After a restart the old records are gone, even where new ones do not reach.
        log.restart().expect("restart");
        log.append(&payload(9), no_checkpoint).expect("append");
        drop(log);
        let (_log, records) = RedoLog::open(&path).expect("reopen");
        assert_eq!(records, [payload(9)]);
    }

    #[test]
    fn reading_stops_at_a_torn_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let (log, _) = RedoLog::open(&path).expect("open");
        for n in 0..3 {
            log.append(&payload(n), no_checkpoint).expect("append");
        }
        drop(log);
        // One byte of the second record's payload never reached the disk.
        let second = HEADER as usize + RECORD_HEAD + payload(0).len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.write_all_at(&[0xff], (second + RECORD_HEAD + 3) as u64)
            .expect("damage");
        let (_log, records) = RedoLog::open(&path).expect("reopen");
        assert_eq!(records, [payload(0)], "the third must not follow a gap");
    }

    #[test]
    fn a_damaged_header_remakes_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let (log, _) = RedoLog::open(&path).expect("open");
        log.append(&payload(1), no_checkpoint).expect("append");
        drop(log);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.write_all_at(b"X", 0).expect("damage");
        let (log, records) = RedoLog::open(&path).expect("reopen");
        assert!(records.is_empty());
        // The old generation's record is zeroed, not left to be read after a new header.
        log.restart().expect("restart");
        drop(log);
        let (_log, records) = RedoLog::open(&path).expect("reopen");
        assert!(records.is_empty());
    }

    #[test]
    fn a_full_log_checkpoints_then_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let (log, _) = RedoLog::open(&path).expect("open");
        let big = vec![7u8; 100_000];
        let mut checkpoints = 0;
        let mut after_checkpoint = 0;
        for _ in 0..30 {
            let mut checkpointed = false;
            log.append(&big, || {
                checkpointed = true;
                Ok(())
            })
            .expect("append");
            if checkpointed {
                checkpoints += 1;
                after_checkpoint = 0;
            }
            after_checkpoint += 1;
        }
        assert_eq!(checkpoints, 1, "2 MiB hold 20 records of 100 kB");
        assert_eq!(log.checkpoints(), 1);
        drop(log);
        let (_log, records) = RedoLog::open(&path).expect("reopen");
        assert_eq!(records.len(), after_checkpoint);

        // Appends continue a reopened generation; a failed checkpoint fails the append and
        // keeps the records.
        let (log, _) = RedoLog::open(&path).expect("reopen");
        let failed =
            (0..30).find_map(|_| log.append(&big, || Err(Error::internal("disk gone"))).err());
        assert!(failed.is_some());
        drop(log);
        let (_log, records) = RedoLog::open(&path).expect("reopen");
        assert_eq!(records.len(), 20, "a full generation");
    }

    #[test]
    fn a_payload_larger_than_the_log_is_left_to_the_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let (log, _) = RedoLog::open(&path).expect("open");
        log.append(&payload(1), no_checkpoint).expect("append");
        let mut checkpointed = false;
        log.append(&vec![0u8; SIZE as usize], || {
            checkpointed = true;
            Ok(())
        })
        .expect("append");
        assert!(checkpointed);
        drop(log);
        let (_log, records) = RedoLog::open(&path).expect("reopen");
        assert!(
            records.is_empty(),
            "the checkpoint covered the earlier record"
        );
    }
}
