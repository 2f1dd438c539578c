//! The shared database's redo log: what makes a write durable.
//!
//! sled 0.34 makes its log durable only through `Db::flush`, which hands the buffered log to
//! one of its io threads (waking the idle ones in turn), waits there for a `sync_file_range`,
//! and leaves the file's growth and the disk's cache to the `fdatasync` berth adds after it
//! ([`super::SledLog`]): two trips to the disk and a thread hop each way, three times per
//! snapshot cycle. Every write to the shared database now also appends a record of its keys
//! to this file, and a reply waits for one `fdatasync` of it, on the writer's own thread. The
//! file has a fixed size and was written in full when it was made, so that `fdatasync`
//! writes data pages and no inode: the trip bbolt makes per commit, and nothing more.
//!
//! sled still holds the records (reads never look here) and writes its own log in the
//! background. A **checkpoint**, a durable sled flush, makes everything the log holds
//! redundant; the log then starts a new generation from its beginning. It runs when the log
//! is full, and when a write or sync of the log failed (what the file holds is then unknown,
//! and a later `fdatasync` may succeed without the lost pages).
//!
//! # Replay
//!
//! Each write is applied and appended under the log's lock, and carries a **marker** into its
//! tree, atomically with its keys ([`super::journal`]): `w\0redo`, the generation and
//! sequence number of its record. sled recovers a prefix of its log, so after a crash a tree
//! holds its writes up to its marker's record and none after it, even a write sled kept
//! whose record did not survive (a power loss between sled's background flush and the log's
//! sync). Opening the database finishes torn tree journals, then replays each record newer
//! than its tree's marker, oldest first, then checkpoints: acknowledged writes come back
//! whole, and no write is rolled back or torn by an older record.
//!
//! # Format
//!
//! ```text
//! 0     header: "berthRL1", u64 generation, u32 CRC-32 of those 16 bytes (big-endian)
//! 4096  records, back to back: u32 payload length, u32 CRC-32 of what follows it,
//!       u64 generation, u64 sequence (1, 2, ... within the generation), payload
//! ```
//!
//! A payload is the tree's name (u16 length, bytes) and the write's keys, its marker
//! included, in the journal's encoding. Reading stops at the first record that does not
//! check out: a torn tail (a write that was never acknowledged, as its sync never returned),
//! or an older generation's record where the current one ends. A header that does not check
//! out means the file was never finished (or tore while a checkpoint rewrote it, after which
//! nothing is pending): it is written in full again, with a generation above every marker.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::{Error, Result};
use crate::metadata::journal::{self, Op};

/// The log's name in the database's directory (sled leaves other names alone).
pub const FILE_NAME: &str = "berth.redo";

/// The key of a tree's marker: the (generation, sequence) of its last logged write. No other
/// record of berth's trees starts with `w\0` (see [`journal::JOURNAL_KEY`]).
pub const MARKER_KEY: &[u8] = b"w\0redo";

/// The log's size: about 4,000 snapshot calls between checkpoints.
const SIZE: u64 = 2 << 20;
/// Where records start: the header has a page of its own, so rewriting it never touches one.
const HEADER: u64 = 4096;
const MAGIC: &[u8; 8] = b"berthRL1";
/// Length, checksum, generation, sequence.
const RECORD_HEAD: usize = 24;

/// What makes sled durable: the checkpoint's flush.
pub type Checkpoint = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// A record read back by [`RedoLog::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its generation.
    pub generation: u64,
    /// Its sequence number within the generation.
    pub seq: u64,
    /// What [`encode`] made.
    pub payload: Vec<u8>,
}

impl Record {
    /// Whether a tree whose marker is `marker` lacks this record's write.
    pub fn newer_than(&self, marker: (u64, u64)) -> bool {
        (self.generation, self.seq) > marker
    }
}

/// The redo log of one database (see the module's documentation).
pub struct RedoLog {
    file: File,
    path: PathBuf,
    state: Mutex<State>,
    checkpoint: Checkpoint,
    syncs: AtomicU64,
    checkpoints: AtomicU64,
}

impl std::fmt::Debug for RedoLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedoLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    generation: u64,
    next_seq: u64,
    offset: u64,
    /// A checkpoint must come before the next append or sync: set at open (appending after
    /// the records read could make a later, never-acknowledged one of the same generation
    /// readable again) and after a failed write or sync.
    stale: bool,
}

impl RedoLog {
    /// Opens the log at `path`, making it when it is missing or unfinished (with a generation
    /// of at least `min_generation`), and returns it with the records of its current
    /// generation, oldest first. `checkpoint` makes sled durable. Call [`RedoLog::start`]
    /// once the records are replayed; until then the log checkpoints before it takes a write.
    /// Blocking.
    pub fn open(
        path: &Path,
        min_generation: u64,
        checkpoint: Checkpoint,
    ) -> Result<(RedoLog, Vec<Record>)> {
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
                stale: true,
            }),
            checkpoint,
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
            log.make(min_generation.max(1))?;
            return Ok((log, Vec::new()));
        };
        let records = read_records(&content, generation);
        log.state_mut().generation = generation;
        Ok((log, records))
    }

    /// Writes the whole file (zeros and a header of `generation`) and syncs it and its
    /// directory, so later syncs change no file metadata.
    fn make(&mut self, generation: u64) -> Result<()> {
        let zeros = vec![0u8; SIZE as usize];
        self.file
            .set_len(0)
            .and_then(|()| self.file.write_all_at(&zeros, 0))
            .and_then(|()| self.file.write_all_at(&header(generation), 0))
            .and_then(|()| self.file.sync_all())
            .map_err(|e| io_error("write", &self.path, &e))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error("sync the directory of", &self.path, &e))?;
        }
        let state = self.state_mut();
        state.generation = generation;
        state.stale = false;
        Ok(())
    }

    fn state_mut(&mut self) -> &mut State {
        self.state.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes sled durable and starts a new generation: the records so far are never
    /// replayed again. Blocking.
    pub fn checkpoint(&self) -> Result<()> {
        let mut state = self.lock();
        self.checkpoint_locked(&mut state)
    }

    /// Readies the log for writes after [`RedoLog::open`]: a checkpoint when `sled_changed`
    /// (the caller replayed records or finished torn writes) or when records were read (sled
    /// may hold them only in the page cache), else a new generation alone (nothing written
    /// since the last checkpoint was acknowledged); nothing for a log just made. Blocking.
    pub fn start(&self, sled_changed: bool) -> Result<()> {
        let mut state = self.lock();
        if sled_changed {
            self.checkpoint_locked(&mut state)
        } else if state.stale {
            self.restart_locked(&mut state)
        } else {
            Ok(())
        }
    }

    fn checkpoint_locked(&self, state: &mut State) -> Result<()> {
        state.stale = true;
        (self.checkpoint)()?;
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.restart_locked(state)
    }

    /// Starts a new generation (the records so far are never read again).
    fn restart_locked(&self, state: &mut State) -> Result<()> {
        state.stale = true;
        // Taken before the write: a retry after a failed one goes higher still.
        state.generation += 1;
        self.file
            .write_all_at(&header(state.generation), 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_error("write the header of", &self.path, &e))?;
        state.next_seq = 1;
        state.offset = HEADER;
        state.stale = false;
        Ok(())
    }

    /// Applies `ops` to `tree` atomically with the tree's marker and appends them; they are
    /// durable after the next [`RedoLog::sync`]. A full log checkpoints first; a write larger
    /// than the whole log is made durable by a checkpoint of its own. Blocking.
    pub fn write(&self, tree: &sled::Tree, mut ops: Vec<Op>) -> Result<()> {
        let mut state = self.lock();
        if state.stale {
            self.checkpoint_locked(&mut state)?;
        }
        let name = tree.name();
        // The marker's value has a fixed size: the record's length is known before it is set.
        ops.push((MARKER_KEY.to_vec(), Some(marker(0, 0))));
        let len = (RECORD_HEAD + 2 + name.len() + journal::encoded_len(&ops)) as u64;
        if state.offset + len > SIZE {
            self.checkpoint_locked(&mut state)?;
        }
        // A write larger than the whole log is marked before every record of this
        // generation, after every earlier one.
        let logged = HEADER + len <= SIZE;
        let seq = if logged { state.next_seq } else { 0 };
        if let Some(last) = ops.last_mut() {
            last.1 = Some(marker(state.generation, seq));
        }
        let payload = encode(&name, &ops);
        // The payload ends with the journal's encoding of the ops: made once for both.
        let journal = &payload[2 + name.len()..];
        if let Err(e) = journal::apply_journaled(tree, ops, journal) {
            state.stale = true;
            return Err(e);
        }
        if !logged {
            return self.checkpoint_locked(&mut state);
        }
        let record = record(state.generation, seq, &payload);
        if let Err(e) = self.file.write_all_at(&record, state.offset) {
            // Applied but not logged: only a checkpoint makes it durable now.
            state.stale = true;
            return Err(io_error("append to", &self.path, &e));
        }
        state.offset += len;
        state.next_seq += 1;
        Ok(())
    }

    /// `fdatasync`: every write appended before the call is durable when it returns (after a
    /// failure, a checkpoint stands in for it). Blocking.
    pub fn sync(&self) -> Result<()> {
        {
            let mut state = self.lock();
            if state.stale {
                return self.checkpoint_locked(&mut state);
            }
        }
        if let Err(e) = self.file.sync_data() {
            self.lock().stale = true;
            return Err(io_error("sync", &self.path, &e));
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How many syncs succeeded.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// How many checkpoints succeeded.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Ordering::Relaxed)
    }
}

fn marker(generation: u64, seq: u64) -> Vec<u8> {
    [generation.to_be_bytes(), seq.to_be_bytes()].concat()
}

/// The (generation, sequence) a tree's marker holds; (0, 0) for none, so every record is
/// newer.
pub fn read_marker(tree: &sled::Tree) -> Result<(u64, u64)> {
    let Some(raw) = tree.get(MARKER_KEY)? else {
        return Ok((0, 0));
    };
    match <[u8; 16]>::try_from(raw.as_ref()) {
        Ok(b) => Ok((
            u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(b[8..].try_into().expect("8 bytes")),
        )),
        Err(_) => Err(Error::internal(format!(
            "the redo marker of metadata tree {:?} is corrupt: restore the metadata database \
             from a backup",
            String::from_utf8_lossy(&tree.name())
        ))),
    }
}

/// The payload of a write of `ops` to the tree `tree`: the name's length and the name, then
/// the journal's encoding of `ops`.
pub fn encode(tree: &[u8], ops: &[Op]) -> Vec<u8> {
    let name_len = u16::try_from(tree.len()).expect("sled tree names are short");
    let mut out = Vec::with_capacity(2 + tree.len() + journal::encoded_len(ops));
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(tree);
    journal::encode_into(&mut out, ops);
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

/// `generation`'s records in `content`, up to the first that does not check out.
fn read_records(content: &[u8], generation: u64) -> Vec<Record> {
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
        out.push(Record {
            generation,
            seq,
            payload: content[at + RECORD_HEAD..end].to_vec(),
        });
        at = end;
        seq += 1;
    }
    out
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::internal(format!(
        "cannot {what} the metadata redo log {}: {e}",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        db: sled::Db,
        tree: sled::Tree,
        checkpoints_fail: Arc<AtomicBool>,
    }

    fn fixture() -> Fixture {
        let (dir, db, tree) = crate::metadata::journal::tests::tree();
        Fixture {
            dir,
            db,
            tree,
            checkpoints_fail: Arc::new(AtomicBool::new(false)),
        }
    }

    impl Fixture {
        fn path(&self) -> PathBuf {
            self.dir.path().join(FILE_NAME)
        }

        fn open(&self, min_generation: u64) -> (RedoLog, Vec<Record>) {
            let (db, fail) = (self.db.clone(), Arc::clone(&self.checkpoints_fail));
            RedoLog::open(
                &self.path(),
                min_generation,
                Box::new(move || {
                    if fail.load(Ordering::Relaxed) {
                        return Err(Error::internal("disk gone"));
                    }
                    db.flush()?;
                    Ok(())
                }),
            )
            .expect("open")
        }

        /// A log ready for writes.
        fn ready(&self) -> RedoLog {
            let (log, _) = self.open(1);
            log.checkpoint().expect("checkpoint");
            log
        }
    }

    fn put(n: usize) -> Vec<Op> {
        vec![(format!("k{n}").into_bytes(), Some(vec![n as u8; n]))]
    }

    fn keys(records: &[Record]) -> Vec<Vec<u8>> {
        records
            .iter()
            .map(|r| decode(&r.payload).expect("decode").1[0].0.clone())
            .collect()
    }

    #[test]
    fn a_new_log_is_written_in_full_above_the_given_generation() {
        let f = fixture();
        let (log, records) = f.open(7);
        assert!(records.is_empty());
        assert_eq!(std::fs::metadata(f.path()).expect("stat").len(), SIZE);
        log.checkpoint().expect("checkpoint");
        log.write(&f.tree, put(1)).expect("write");
        assert_eq!(read_marker(&f.tree).expect("marker"), (8, 1));
    }

    /// Starting takes a checkpoint only when something may be pending: a log just made needs
    /// nothing, an empty one a new generation, one with records a checkpoint.
    #[test]
    fn start_checkpoints_only_what_may_be_pending() {
        let f = fixture();
        let (log, _) = f.open(3);
        log.start(false).expect("start");
        log.write(&f.tree, put(1)).expect("write");
        assert_eq!(log.checkpoints(), 0);
        assert_eq!(read_marker(&f.tree).expect("marker"), (3, 1));
        log.checkpoint().expect("checkpoint");
        drop(log);

        let (log, records) = f.open(1);
        assert!(records.is_empty());
        log.start(false).expect("start");
        assert_eq!(log.checkpoints(), 0);
        log.write(&f.tree, put(2)).expect("write");
        assert_eq!(read_marker(&f.tree).expect("marker"), (5, 1));
        drop(log);

        let (log, records) = f.open(1);
        assert_eq!(records.len(), 1);
        log.start(true).expect("start");
        assert_eq!(log.checkpoints(), 1);
        log.write(&f.tree, put(3)).expect("write");
        assert_eq!(read_marker(&f.tree).expect("marker"), (6, 1));
    }

    #[test]
    fn writes_come_back_in_order_with_their_markers_until_a_checkpoint() {
        let f = fixture();
        {
            let log = f.ready();
            for n in 0..5 {
                log.write(&f.tree, put(n)).expect("write");
            }
            log.sync().expect("sync");
            assert_eq!(
                f.tree.get(b"k3").expect("get").as_deref(),
                Some(&[3u8; 3][..])
            );
        }
        let (log, records) = f.open(1);
        assert_eq!(
            keys(&records),
            (0..5)
                .map(|n| format!("k{n}").into_bytes())
                .collect::<Vec<_>>()
        );
        let generation = records[0].generation;
        assert_eq!(read_marker(&f.tree).expect("marker"), (generation, 5));
        assert!(!records[4].newer_than((generation, 5)));
        assert!(records[4].newer_than((generation, 4)));
        assert!(records[0].newer_than((generation - 1, 9)));
        let (tree, ops) = decode(&records[3].payload).expect("decode");
        assert_eq!(tree, b"t");
        assert_eq!(
            ops,
            [
                (b"k3".to_vec(), Some(vec![3; 3])),
                (MARKER_KEY.to_vec(), Some(marker(generation, 4)))
            ]
        );

        // After a checkpoint the old records are gone, even where new ones do not reach.
        log.checkpoint().expect("checkpoint");
        log.write(&f.tree, put(9)).expect("write");
        drop(log);
        let (_log, records) = f.open(1);
        assert_eq!(keys(&records), [b"k9".to_vec()]);
        assert_eq!(records[0].generation, generation + 1);
    }

    #[test]
    fn reading_stops_at_a_torn_record() {
        let f = fixture();
        let log = f.ready();
        for n in 0..3 {
            log.write(&f.tree, put(n)).expect("write");
        }
        drop(log);
        let (_, records) = f.open(1);
        let second = HEADER as usize + RECORD_HEAD + records[0].payload.len();
        // One byte of the second record's payload never reached the disk.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .expect("open");
        file.write_all_at(&[0xff], (second + RECORD_HEAD + 3) as u64)
            .expect("damage");
        let (_log, records) = f.open(1);
        assert_eq!(
            keys(&records),
            [b"k0".to_vec()],
            "the third must not follow a gap"
        );
    }

    #[test]
    fn a_damaged_header_remakes_the_log_above_the_markers() {
        let f = fixture();
        let log = f.ready();
        log.write(&f.tree, put(1)).expect("write");
        drop(log);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .expect("open");
        file.write_all_at(b"X", 0).expect("damage");
        let (log, records) = f.open(5);
        assert!(records.is_empty());
        // The old generation's record is zeroed, not left to be read after a new header.
        log.checkpoint().expect("checkpoint");
        drop(log);
        let (_log, records) = f.open(1);
        assert!(records.is_empty());
    }

    #[test]
    fn a_full_log_checkpoints_and_a_failed_checkpoint_is_retried() {
        let f = fixture();
        let log = f.ready();
        let big = |n: usize| vec![(format!("big{n}").into_bytes(), Some(vec![7u8; 100_000]))];
        let before = log.checkpoints();
        for n in 0..25 {
            log.write(&f.tree, big(n)).expect("write");
        }
        assert_eq!(
            log.checkpoints() - before,
            1,
            "2 MiB hold 20 records of 100 kB"
        );
        // A checkpoint that fails fails the write, which changes nothing, and the next write
        // checkpoints again.
        f.checkpoints_fail.store(true, Ordering::Relaxed);
        let failed = (25..60).find(|&n| log.write(&f.tree, big(n)).is_err());
        let failed = failed.expect("a full log needs a checkpoint");
        assert_eq!(f.tree.get(format!("big{failed}")).expect("get"), None);
        assert!(log.write(&f.tree, big(99)).is_err(), "still stale");
        f.checkpoints_fail.store(false, Ordering::Relaxed);
        log.write(&f.tree, big(100))
            .expect("write after the disk came back");
        log.sync().expect("sync");
        drop(log);
        let (_log, records) = f.open(1);
        assert_eq!(keys(&records), [b"big100".to_vec()]);
    }

    #[test]
    fn a_write_larger_than_the_log_is_left_to_a_checkpoint() {
        let f = fixture();
        let log = f.ready();
        log.write(&f.tree, put(1)).expect("write");
        let before = log.checkpoints();
        log.write(
            &f.tree,
            vec![(b"huge".to_vec(), Some(vec![0u8; SIZE as usize]))],
        )
        .expect("write");
        assert_eq!(log.checkpoints() - before, 2);
        assert!(f.tree.get(b"huge").expect("get").is_some());
        let (generation, seq) = read_marker(&f.tree).expect("marker");
        assert_eq!(seq, 0);
        log.write(&f.tree, put(2)).expect("write");
        drop(log);
        let (_log, records) = f.open(1);
        assert_eq!(keys(&records), [b"k2".to_vec()]);
        assert!(records[0].newer_than((generation, seq)));
    }
}
