//! Atomic writes of several keys to a sled tree without sled batches.
//!
//! A sled batch pins the log: it writes out the current log buffer and then a buffer holding
//! only the batch's manifest, at once and each with a sync of its own, so every multi-key
//! write cost two extra log writes (and the wake-ups of sled's io threads for each) before
//! the flush its caller waits for. Here the whole write first goes into one key,
//! [`JOURNAL_KEY`], as a single insert (atomic in sled), then each key is written plainly and
//! the journal key is removed; all of it waits in the log buffer for the next flush.
//!
//! sled recovers a prefix of its log after a crash, so a recovered journal whose removal was
//! lost is replayed by [`recover`] when the tree is opened: every key it names gets the value
//! it holds, which is what the write left (nothing written after it survived the crash
//! either). Callers write one at a time per tree (each tree has one writer lock).

use crate::error::{Error, Result};

/// Where a multi-key write is recorded until all its keys are written. No other record of
/// berth's trees starts with `w\0`.
pub const JOURNAL_KEY: &[u8] = b"w\0journal";

/// One key's new value, or its removal.
pub type Op = (Vec<u8>, Option<Vec<u8>>);

/// Writes `ops` to `tree` so that a crash keeps all or none of them. One op goes as a plain
/// insert or removal. Call it under the tree's writer lock. Nothing is flushed.
pub fn apply(tree: &sled::Tree, ops: Vec<Op>) -> Result<()> {
    if ops.len() > 1 {
        let encoded = encode(&ops);
        apply_journaled(tree, ops, &encoded)
    } else {
        write_each(tree, ops)
    }
}

/// Writes `ops` to `tree` through the journal, `encoded` being [`encode`]`(&ops)` (made once
/// for the redo log's record too). Call it under the tree's writer lock.
pub(super) fn apply_journaled(tree: &sled::Tree, ops: Vec<Op>, encoded: &[u8]) -> Result<()> {
    tree.insert(JOURNAL_KEY, encoded)?;
    write_each(tree, ops)?;
    tree.remove(JOURNAL_KEY)?;
    Ok(())
}

/// Finishes a multi-key write a crash cut off: replays the journal left in `tree`, if any,
/// and removes it. Returns whether there was one (the caller flushes then). Call it on open,
/// before anything reads the tree.
pub fn recover(tree: &sled::Tree) -> Result<bool> {
    let Some(raw) = tree.get(JOURNAL_KEY)? else {
        return Ok(false);
    };
    let ops = decode(&raw)?;
    let keys = ops.len();
    write_each(tree, ops)?;
    tree.remove(JOURNAL_KEY)?;
    tracing::info!(
        keys,
        "finished a metadata write a crash had cut off between its keys"
    );
    Ok(true)
}

fn write_each(tree: &sled::Tree, ops: Vec<Op>) -> Result<()> {
    for (key, value) in ops {
        match value {
            Some(v) => tree.insert(key, v)?,
            None => tree.remove(key)?,
        };
    }
    Ok(())
}

/// `u32` count, then per op: `u32` key length, key, `u8` 1 with `u32` length and value or
/// `u8` 0 for a removal (lengths big-endian).
pub(super) fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(ops));
    encode_into(&mut out, ops);
    out
}

/// [`encode`], appended to `out`.
pub(super) fn encode_into(out: &mut Vec<u8>, ops: &[Op]) {
    out.extend_from_slice(&len32(ops.len()).to_be_bytes());
    for (key, value) in ops {
        out.extend_from_slice(&len32(key.len()).to_be_bytes());
        out.extend_from_slice(key);
        match value {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&len32(v.len()).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
}

/// The length of [`encode`]`(ops)`.
pub(super) fn encoded_len(ops: &[Op]) -> usize {
    4 + ops
        .iter()
        .map(|(k, v)| 5 + k.len() + v.as_ref().map_or(0, |v| 4 + v.len()))
        .sum::<usize>()
}

fn len32(n: usize) -> u32 {
    // Keys and records are far below 4 GiB (sled itself keeps values in memory).
    u32::try_from(n).expect("metadata record below 4 GiB")
}

pub(super) fn decode(mut raw: &[u8]) -> Result<Vec<Op>> {
    let count = take_u32(&mut raw)?;
    let mut ops = Vec::new();
    for _ in 0..count {
        let key_len = take_u32(&mut raw)?;
        let key = take(&mut raw, key_len)?.to_vec();
        let value = match take(&mut raw, 1)?[0] {
            0 => None,
            1 => {
                let len = take_u32(&mut raw)?;
                Some(take(&mut raw, len)?.to_vec())
            }
            other => return Err(corrupt(&format!("unknown op tag {other}"))),
        };
        ops.push((key, value));
    }
    if !raw.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(ops)
}

fn take<'a>(raw: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if raw.len() < n {
        return Err(corrupt("truncated"));
    }
    let (head, rest) = raw.split_at(n);
    *raw = rest;
    Ok(head)
}

fn take_u32(raw: &mut &[u8]) -> Result<usize> {
    let bytes: [u8; 4] = take(raw, 4)?.try_into().expect("4 bytes");
    Ok(u32::from_be_bytes(bytes) as usize)
}

fn corrupt(what: &str) -> Error {
    Error::internal(format!(
        "the metadata write journal ({}) is corrupt ({what}): restore the metadata \
         database from a backup or remove the key by hand",
        String::from_utf8_lossy(JOURNAL_KEY).replace('\0', "\\0")
    ))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A scratch database with one tree, `t`.
    pub(in crate::metadata) fn tree() -> (tempfile::TempDir, sled::Db, sled::Tree) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .expect("open");
        let tree = db.open_tree("t").expect("tree");
        (dir, db, tree)
    }

    fn ops() -> Vec<Op> {
        vec![
            (b"a".to_vec(), Some(b"1".to_vec())),
            (b"b".to_vec(), None),
            (b"c".to_vec(), Some(Vec::new())),
        ]
    }

    #[test]
    fn encoding_round_trips_and_refuses_damage() {
        let raw = encode(&ops());
        assert_eq!(raw.len(), encoded_len(&ops()));
        assert_eq!(decode(&raw).expect("decode"), ops());
        assert!(decode(&raw[..raw.len() - 1]).is_err());
        let mut extra = raw.clone();
        extra.push(0);
        assert!(decode(&extra).is_err());
        assert_eq!(decode(&encode(&[])).expect("empty"), Vec::<Op>::new());
    }

    #[test]
    fn apply_writes_every_key_and_leaves_no_journal() {
        let (_dir, _db, tree) = tree();
        tree.insert(b"b", b"old".as_slice()).expect("insert");
        apply(&tree, ops()).expect("apply");
        assert_eq!(tree.get(b"a").expect("get").as_deref(), Some(&b"1"[..]));
        assert_eq!(tree.get(b"b").expect("get"), None);
        assert_eq!(tree.get(b"c").expect("get").as_deref(), Some(&b""[..]));
        assert_eq!(tree.get(JOURNAL_KEY).expect("get"), None);
        assert!(!recover(&tree).expect("recover"), "nothing to recover");
    }

    #[test]
    fn recover_finishes_a_write_cut_off_between_its_keys() {
        let (dir, db, tree) = tree();
        tree.insert(b"b", b"old".as_slice()).expect("insert");
        // What a crash after the journal and the first key leaves on disk.
        tree.insert(JOURNAL_KEY, encode(&ops())).expect("journal");
        tree.insert(b"a", b"1".as_slice()).expect("first key");
        db.flush().expect("flush");
        drop((tree, db));
        let path = dir.path().join("db");
        let db = crate::testing::open_when_unlocked(|| {
            crate::metadata::open_sled(sled::Config::new().path(&path), &path, "test database")
        })
        .expect("reopen");
        let tree = db.open_tree("t").expect("tree");
        assert!(recover(&tree).expect("recover"));
        assert_eq!(tree.get(b"a").expect("get").as_deref(), Some(&b"1"[..]));
        assert_eq!(
            tree.get(b"b").expect("get"),
            None,
            "the removal is replayed"
        );
        assert_eq!(tree.get(b"c").expect("get").as_deref(), Some(&b""[..]));
        assert_eq!(tree.get(JOURNAL_KEY).expect("get"), None);
    }

    #[test]
    fn a_corrupt_journal_is_an_error_naming_it() {
        let (_dir, _db, tree) = tree();
        tree.insert(JOURNAL_KEY, b"\0\0".as_slice())
            .expect("insert");
        let err = recover(&tree).expect_err("corrupt");
        assert!(err.to_string().contains("journal"), "{err}");
    }
}
