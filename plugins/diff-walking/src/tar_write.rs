//! Writing tar entries byte for byte as Go's `archive/tar` does for containerd's diffs.
//!
//! containerd's change writer asks for the PAX format with whole-second times. Go then writes a
//! plain USTAR header whenever every field fits one (a long name split into prefix and name
//! when it can be), and otherwise a PAX extended header (`x`, named
//! `<dir>/PaxHeaders.0/<base>`) carrying the records that do not fit (`path`, `linkpath`,
//! `uid`, `gid`, `size`, `mtime`) and every `SCHILY.xattr.*` record, sorted by key, followed
//! by the main header with what fits (ASCII only, truncated names, zero for numbers too
//! large). Numbers are zero-padded octal with a NUL; device numbers are written for every
//! entry; user and group names stay empty; the archive ends with two zero blocks and no
//! record padding. Matching this keeps berth's diff ids equal to containerd's for the same
//! tree, which the integration tests check.

use std::io::{self, Write};

/// A tar block.
pub(crate) const BLOCK: usize = 512;

const NAME_SIZE: usize = 100;
const PREFIX_SIZE: usize = 155;

/// Entry types written.
pub(crate) mod kind {
    /// A regular file (also whiteouts).
    pub(crate) const REGULAR: u8 = b'0';
    /// A hard link to an earlier entry.
    pub(crate) const LINK: u8 = b'1';
    /// A symbolic link.
    pub(crate) const SYMLINK: u8 = b'2';
    /// A character device.
    pub(crate) const CHAR: u8 = b'3';
    /// A block device.
    pub(crate) const BLOCK: u8 = b'4';
    /// A directory.
    pub(crate) const DIR: u8 = b'5';
    /// A fifo.
    pub(crate) const FIFO: u8 = b'6';
    /// A PAX extended header.
    pub(crate) const PAX: u8 = b'x';
}

/// One entry's header, in Go's `tar.Header` terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Header {
    /// The entry name (directories end with `/`).
    pub(crate) name: Vec<u8>,
    /// Symlink target or hard link source.
    pub(crate) linkname: Vec<u8>,
    /// One of [`kind`].
    pub(crate) typeflag: u8,
    /// Permission bits with setuid, setgid and sticky.
    pub(crate) mode: u32,
    /// Owner.
    pub(crate) uid: u64,
    /// Group.
    pub(crate) gid: u64,
    /// Data length (regular files only).
    pub(crate) size: u64,
    /// Modification time in whole seconds.
    pub(crate) mtime: i64,
    /// Device major number.
    pub(crate) devmajor: u64,
    /// Device minor number.
    pub(crate) devminor: u64,
    /// Extended attributes, written as `SCHILY.xattr.<name>` records.
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Why a header cannot be written.
#[derive(Debug)]
pub(crate) enum HeaderError {
    /// A value PAX cannot carry (a NUL in a name, `=` in an xattr name, a huge device number).
    Unencodable(String),
    /// The output failed.
    Io(io::Error),
}

impl From<io::Error> for HeaderError {
    fn from(e: io::Error) -> Self {
        HeaderError::Io(e)
    }
}

/// A tar stream being written: headers, then exactly `size` bytes of data per regular entry.
pub(crate) struct TarWriter<W: Write> {
    out: W,
    /// Data bytes the current entry still expects.
    remaining: u64,
    /// Padding owed after the current entry's data.
    pad: usize,
}

impl<W: Write> TarWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        TarWriter {
            out,
            remaining: 0,
            pad: 0,
        }
    }

    /// Writes a header; its data (if `size > 0`) must follow through [`TarWriter::write_data`].
    pub(crate) fn write_header(&mut self, h: &Header) -> Result<(), HeaderError> {
        self.end_entry()?;
        let (records, ustar) = plan(h)?;
        // A USTAR header (a long name split into prefix and name) needs no records.
        if !ustar {
            let mut data = Vec::new();
            for (k, v) in &records {
                data.extend(pax_record(k, v));
            }
            let mut block = [0u8; BLOCK];
            {
                let name = pax_header_name(&h.name);
                put_str(&mut block[0..100], &name);
                put_octal(&mut block[100..108], 0);
                put_octal(&mut block[108..116], 0);
                put_octal(&mut block[116..124], 0);
                put_octal(&mut block[124..136], data.len() as u64);
                put_octal(&mut block[136..148], 0);
                block[156] = kind::PAX;
                set_magic(&mut block);
            }
            self.write_block(&mut block)?;
            self.out.write_all(&data)?;
            self.out
                .write_all(&[0u8; BLOCK][..padding(data.len() as u64)])?;
        }
        let mut block = [0u8; BLOCK];
        let (prefix, name) = match ustar.then(|| split_ustar_path(&h.name)).flatten() {
            Some((prefix, name)) => (prefix, name),
            None => (&[][..], &h.name[..]),
        };
        if ustar {
            put_str(&mut block[0..100], name);
            put_str(&mut block[157..257], &h.linkname);
            put_str(&mut block[345..500], prefix);
        } else {
            put_str(&mut block[0..100], &to_ascii(name));
            put_str(&mut block[157..257], &to_ascii(&h.linkname));
        }
        put_octal(&mut block[100..108], u64::from(h.mode));
        put_octal(&mut block[108..116], h.uid);
        put_octal(&mut block[116..124], h.gid);
        put_octal(&mut block[124..136], h.size);
        put_octal(
            &mut block[136..148],
            u64::try_from(h.mtime).unwrap_or(u64::MAX),
        );
        block[156] = h.typeflag;
        put_octal(&mut block[329..337], h.devmajor);
        put_octal(&mut block[337..345], h.devminor);
        set_magic(&mut block);
        self.write_block(&mut block)?;
        self.remaining = if h.typeflag == kind::REGULAR {
            h.size
        } else {
            0
        };
        self.pad = padding(self.remaining);
        Ok(())
    }

    /// Writes data of the current entry; more than its header announced is an error.
    pub(crate) fn write_data(&mut self, data: &[u8]) -> io::Result<()> {
        if data.len() as u64 > self.remaining {
            return Err(io::Error::other(format!(
                "{} bytes of data where the header announced {} more",
                data.len(),
                self.remaining
            )));
        }
        self.out.write_all(data)?;
        self.remaining -= data.len() as u64;
        Ok(())
    }

    /// Bytes of data the current entry still expects.
    pub(crate) fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Ends the archive (two zero blocks) and returns the output.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.end_entry()?;
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn end_entry(&mut self) -> io::Result<()> {
        if self.remaining != 0 {
            return Err(io::Error::other(format!(
                "the previous entry is {} bytes short of its announced size",
                self.remaining
            )));
        }
        self.out.write_all(&[0u8; BLOCK][..self.pad])?;
        self.pad = 0;
        Ok(())
    }

    fn write_block(&mut self, block: &mut [u8; BLOCK]) -> io::Result<()> {
        // The checksum is computed with its own field as spaces; Go writes six octal digits,
        // a NUL and a space.
        block[148..156].fill(b' ');
        let sum: u64 = block.iter().map(|b| u64::from(*b)).sum();
        put_octal(&mut block[148..155], sum);
        block[155] = b' ';
        self.out.write_all(block)
    }
}

/// A PAX record: key and value.
type Record = (Vec<u8>, Vec<u8>);

/// The PAX records a header needs (sorted by key) and whether its main header is USTAR
/// (everything fits) or PAX.
fn plan(h: &Header) -> Result<(Vec<Record>, bool), HeaderError> {
    let mut records: Vec<Record> = Vec::new();
    let mut ustar = true;
    for (value, key, may_split) in [(&h.name, "path", true), (&h.linkname, "linkpath", false)] {
        if value.contains(&0) {
            return Err(HeaderError::Unencodable(format!(
                "{key} {:?} contains a NUL byte",
                String::from_utf8_lossy(value)
            )));
        }
        if !is_ascii(value) || value.len() > NAME_SIZE {
            if !(may_split && split_ustar_path(value).is_some()) {
                ustar = false;
            }
            records.push((key.as_bytes().to_vec(), value.clone()));
        }
    }
    for (value, key, size) in [(h.uid, "uid", 8), (h.gid, "gid", 8), (h.size, "size", 12)] {
        if !fits_octal(size, value) {
            ustar = false;
            records.push((key.as_bytes().to_vec(), value.to_string().into_bytes()));
        }
    }
    if h.mtime < 0 || !fits_octal(12, h.mtime.unsigned_abs()) {
        ustar = false;
        records.push((b"mtime".to_vec(), h.mtime.to_string().into_bytes()));
    }
    for (value, what) in [(h.devmajor, "device major"), (h.devminor, "device minor")] {
        if !fits_octal(8, value) {
            return Err(HeaderError::Unencodable(format!(
                "{what} number {value} does not fit a tar header"
            )));
        }
    }
    for (name, value) in &h.xattrs {
        if name.is_empty() || name.contains(&b'=') || name.contains(&0) {
            return Err(HeaderError::Unencodable(format!(
                "xattr name {:?} cannot be a PAX record key",
                String::from_utf8_lossy(name)
            )));
        }
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name);
        ustar = false;
        records.push((key, value.clone()));
    }
    records.sort();
    records.dedup_by(|a, b| a.0 == b.0);
    Ok((records, ustar))
}

/// `<len> <key>=<value>\n`, the length counting itself.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut size = body + body.to_string().len();
    if size.to_string().len() + body != size {
        size = body + size.to_string().len();
    }
    let mut out = format!("{size} ").into_bytes();
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// Go's name for the extended header of `name`: `<dir>/PaxHeaders.0/<base>`, ASCII only, at
/// most 100 bytes, no trailing slash.
fn pax_header_name(name: &[u8]) -> Vec<u8> {
    let split = name.iter().rposition(|b| *b == b'/').map_or(0, |i| i + 1);
    let (dir, base) = name.split_at(split);
    let dir = dir.strip_suffix(b"/").unwrap_or(dir);
    let mut out = Vec::with_capacity(name.len() + 14);
    if !dir.is_empty() {
        out.extend_from_slice(dir);
        out.push(b'/');
    }
    out.extend_from_slice(b"PaxHeaders.0");
    if !base.is_empty() {
        out.push(b'/');
        out.extend_from_slice(base);
    }
    let mut out = to_ascii(&out);
    out.truncate(NAME_SIZE);
    while out.last() == Some(&b'/') {
        out.pop();
    }
    out
}

/// Go's `splitUSTARPath`: a name longer than 100 bytes split at a `/` into a prefix of at
/// most 155 bytes and a name of at most 100.
fn split_ustar_path(name: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut length = name.len();
    if length <= NAME_SIZE || !is_ascii(name) {
        return None;
    } else if length > PREFIX_SIZE + 1 {
        length = PREFIX_SIZE + 1;
    } else if name[length - 1] == b'/' {
        length -= 1;
    }
    let i = name[..length].iter().rposition(|b| *b == b'/')?;
    let suffix = name.len() - i - 1;
    if i == 0 || suffix > NAME_SIZE || suffix == 0 || i > PREFIX_SIZE {
        return None;
    }
    Some((&name[..i], &name[i + 1..]))
}

/// Go's `isASCII`: no byte at or above 0x80 and no NUL.
fn is_ascii(s: &[u8]) -> bool {
    s.iter().all(|b| *b != 0 && *b < 0x80)
}

/// Go's `toASCII`: characters outside ASCII (and NULs) dropped; invalid UTF-8 counts as
/// outside.
fn to_ascii(s: &[u8]) -> Vec<u8> {
    s.iter().copied().filter(|b| *b != 0 && *b < 0x80).collect()
}

fn fits_octal(field: usize, value: u64) -> bool {
    // One byte of the field is the NUL.
    let digits = (field - 1) as u32;
    value < 8u64.pow(digits)
}

/// A string into a field: copied (truncated to the field) and NUL-terminated when shorter.
fn put_str(field: &mut [u8], s: &[u8]) {
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s[..n]);
    if n < field.len() {
        field[n] = 0;
    }
}

/// Zero-padded octal leaving room for a NUL; a value that does not fit is written as zero
/// (its PAX record carries it).
fn put_octal(field: &mut [u8], value: u64) {
    let value = if fits_octal(field.len(), value) {
        value
    } else {
        0
    };
    let text = format!("{value:0width$o}", width = field.len() - 1);
    put_str(field, text.as_bytes());
}

fn set_magic(block: &mut [u8; BLOCK]) {
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
}

/// Zero bytes that pad `len` bytes of data to a whole block.
fn padding(len: u64) -> usize {
    ((BLOCK as u64 - len % BLOCK as u64) % BLOCK as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn file(name: &str, size: u64) -> Header {
        Header {
            name: name.as_bytes().to_vec(),
            typeflag: kind::REGULAR,
            mode: 0o644,
            size,
            mtime: 1_600_000_000,
            ..Header::default()
        }
    }

    fn archive(entries: &[(Header, &[u8])]) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        for (h, data) in entries {
            w.write_header(h).expect("header");
            w.write_data(data).expect("data");
        }
        w.finish().expect("finish")
    }

    #[test]
    fn a_small_entry_is_one_ustar_block_as_go_writes_it() {
        let tar = archive(&[(file("etc/hosts", 3), b"abc")]);
        assert_eq!(tar.len(), 512 + 512 + 1024);
        let h = &tar[..512];
        assert_eq!(&h[..10], b"etc/hosts\0");
        assert_eq!(&h[100..108], b"0000644\0");
        assert_eq!(&h[108..116], b"0000000\0");
        assert_eq!(&h[124..136], b"00000000003\0");
        assert_eq!(&h[136..148], b"13727410000\0");
        assert_eq!(h[156], b'0');
        assert_eq!(&h[257..265], b"ustar\x0000");
        assert_eq!(&h[329..345], b"0000000\x000000000\x00");
        assert_eq!(h[154], 0);
        assert_eq!(h[155], b' ');
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(*b)
                }
            })
            .sum();
        assert_eq!(&h[148..154], format!("{sum:06o}").as_bytes());
        assert_eq!(&tar[512..515], b"abc");
        assert!(tar[515..].iter().all(|b| *b == 0));
    }

    #[test]
    fn long_names_split_or_go_to_pax() {
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        let tar = archive(&[(file(&long, 0), b"")]);
        assert_eq!(
            tar.len(),
            512 + 1024,
            "a splittable name needs no PAX header"
        );
        assert_eq!(&tar[345..465], "d".repeat(120).as_bytes());
        let longer = "n".repeat(130);
        let tar = archive(&[(file(&longer, 0), b"")]);
        assert_eq!(tar[156], kind::PAX);
        assert_eq!(&tar[..24], b"PaxHeaders.0/nnnnnnnnnnn");
        let record = format!("140 path={longer}\n");
        assert_eq!(&tar[512..512 + record.len()], record.as_bytes());
        assert_eq!(tar[1024 + 156], kind::REGULAR);
        assert_eq!(&tar[1024..1124], &longer.as_bytes()[..100]);
    }

    #[test]
    fn pax_records_count_their_own_length() {
        assert_eq!(pax_record(b"path", b"abc"), b"12 path=abc\n");
        // 91 bytes of value: 98 without the length field, 100 with two digits, but "100" has
        // three, so the record is 101 long.
        let r = pax_record(b"path", &[b'x'; 91]);
        assert_eq!(r.len(), 101);
        assert!(r.starts_with(b"101 path="));
        assert_eq!(pax_record(b"path", &[b'x'; 90]).len(), 99);
    }

    #[test]
    fn xattrs_big_ids_and_non_ascii_names_round_trip_through_the_tar_crate() {
        let mut h = file("dir/caf\u{e9}", 2);
        h.uid = 5_000_000;
        h.xattrs = vec![
            (b"user.b".to_vec(), b"2".to_vec()),
            (b"user.a".to_vec(), vec![0, 1, 2]),
        ];
        let link = Header {
            name: b"dir/l".to_vec(),
            linkname: "t\u{e9}".repeat(60).into_bytes(),
            typeflag: kind::SYMLINK,
            mode: 0o777,
            ..Header::default()
        };
        let dir = Header {
            name: b"dir/".to_vec(),
            typeflag: kind::DIR,
            mode: 0o755,
            xattrs: vec![(b"user.d".to_vec(), b"v".to_vec())],
            ..Header::default()
        };
        let tar = archive(&[(dir, b""), (h, b"hi"), (link, b"")]);
        assert_eq!(&tar[..21], b"dir/PaxHeaders.0\0\0\0\0\0");
        let mut ar = tar::Archive::new(&tar[..]);
        let mut seen = Vec::new();
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let path = e.path_bytes().into_owned();
            let uid = e.header().uid().expect("uid");
            let mut xattrs = Vec::new();
            if let Some(ext) = e.pax_extensions().expect("pax") {
                for x in ext {
                    let x = x.expect("record");
                    xattrs.push((x.key_bytes().to_vec(), x.value_bytes().to_vec()));
                }
            }
            let target = e.link_name_bytes().map(|l| l.into_owned());
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("data");
            seen.push((path, uid, xattrs, target, data));
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[1].0, "dir/caf\u{e9}".as_bytes());
        assert_eq!(seen[1].1, 5_000_000);
        let keys: Vec<&[u8]> = seen[1].2.iter().map(|(k, _)| &k[..]).collect();
        assert_eq!(
            keys,
            [
                &b"SCHILY.xattr.user.a"[..],
                b"SCHILY.xattr.user.b",
                b"path",
                b"uid"
            ]
        );
        assert_eq!(seen[1].2[0].1, [0, 1, 2]);
        assert_eq!(seen[1].4, b"hi");
        assert_eq!(seen[2].3.as_deref(), Some("t\u{e9}".repeat(60).as_bytes()));
    }

    #[test]
    fn pax_header_names_follow_go() {
        assert_eq!(pax_header_name(b"a/b/"), b"a/b/PaxHeaders.0");
        assert_eq!(pax_header_name(b"file"), b"PaxHeaders.0/file");
        assert_eq!(pax_header_name(b"a/file"), b"a/PaxHeaders.0/file");
        assert_eq!(pax_header_name(&[b'x'; 200]).len(), 100);
    }

    #[test]
    fn unencodable_headers_are_refused() {
        let mut h = file("x", 0);
        h.xattrs = vec![(b"user.a=b".to_vec(), b"v".to_vec())];
        assert!(matches!(
            TarWriter::new(Vec::new()).write_header(&h),
            Err(HeaderError::Unencodable(_))
        ));
    }

    #[test]
    fn data_must_match_the_announced_size() {
        let mut w = TarWriter::new(Vec::new());
        w.write_header(&file("a", 2)).expect("header");
        assert!(w.write_data(b"abc").is_err());
        w.write_data(b"a").expect("data");
        assert!(w.write_header(&file("b", 0)).is_err(), "a short entry");
    }
}
