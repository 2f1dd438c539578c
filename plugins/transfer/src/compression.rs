//! The compression of a whole archive, detected by magic number (never by file name or media
//! type, containerd PR 9989), and the check that what comes out is a tar.
//!
//! Detection and decompression are the walking differ's ([`berth_diff_walking::decompress`]:
//! gzip, zstd with skippable frames, and xz beyond containerd), the same as for layers; a
//! stream that is none of these must start with a valid tar header, else it is refused
//! naming what it looks like (bzip2, lz4, zip) so the user knows what to do.

use std::fmt;
use std::io::{self, Cursor, Read};

pub use berth_diff_walking::Compression;

use crate::error::{Error, Result};

const TAR_BLOCK: usize = 512;

/// What an unknown stream looks like, for the error message.
fn guess_format(prefix: &[u8]) -> Option<&'static str> {
    if prefix.starts_with(b"BZh") {
        Some("bzip2-compressed (not supported: recompress with gzip, zstd or xz)")
    } else if prefix.starts_with(&[0x04, 0x22, 0x4d, 0x18]) {
        Some("lz4-compressed (not supported: recompress with gzip, zstd or xz)")
    } else if prefix.starts_with(b"PK\x03\x04") {
        Some("a zip file (an image archive is a tar)")
    } else if prefix.starts_with(&[0x1f, 0x9d]) || prefix.starts_with(&[0x1f, 0xa0]) {
        Some("compress(1)-compressed (not supported: recompress with gzip, zstd or xz)")
    } else {
        None
    }
}

/// Whether `block` (the first 512 bytes) is a tar header: the ustar magic, or (for old v7
/// tars) a valid header checksum.
fn is_tar_header(block: &[u8]) -> bool {
    if block.len() < TAR_BLOCK {
        return false;
    }
    if &block[257..262] == b"ustar" {
        return true;
    }
    let field = &block[148..156];
    let text: String = field
        .iter()
        .take_while(|b| **b != 0 && **b != b' ')
        .map(|b| *b as char)
        .collect();
    let Ok(stored) = u32::from_str_radix(text.trim(), 8) else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                u32::from(b' ')
            } else {
                u32::from(*b)
            }
        })
        .sum();
    stored == sum && block.iter().any(|b| *b != 0)
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Maps an I/O error of the source or decoder to an archive error; a source error that
/// carries a core error (the client went away, the stream broke) keeps it.
pub(crate) fn io_error(err: io::Error, what: &str) -> Error {
    if let Some(source) = err.get_ref().and_then(|e| e.downcast_ref::<SourceError>()) {
        return Error::Core(source.0.clone());
    }
    Error::archive(format!("{what}: {err}"))
}

/// An error of the byte source (not of the archive's content), carried through `io::Error`.
#[derive(Debug)]
pub(crate) struct SourceError(pub(crate) berth_core::Error);

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SourceError {}

/// Detects the archive's compression, checks that the (decompressed) stream starts with a
/// tar header, and returns a reader of the tar. Unknown formats, corrupt compressed data at
/// the start and empty streams are [`Error::Archive`].
pub fn open_archive<R: Read + 'static>(reader: R) -> Result<(Compression, Box<dyn Read>)> {
    let (compression, mut tar) =
        berth_diff_walking::decompress(reader).map_err(|e| io_error(e, "reading the archive"))?;
    // Look at the first tar block before handing the stream on: an unknown format must fail
    // here with a message that says so, not deep in the tar parser.
    let mut block = vec![0u8; TAR_BLOCK];
    let got = read_up_to(&mut tar, &mut block)
        .map_err(|e| io_error(e, &format!("the archive is not valid {compression} data")))?;
    block.truncate(got);
    if got == 0 && compression == Compression::Uncompressed {
        return Err(Error::archive("the stream is empty"));
    }
    if !is_tar_header(&block) {
        // Uncompressed, the first block is the stream's own first bytes.
        let what = if compression == Compression::Uncompressed {
            guess_format(&block).map_or_else(
                || {
                    let head: Vec<String> =
                        block.iter().take(8).map(|b| format!("{b:02x}")).collect();
                    format!(
                        "neither a tar nor a gzip, zstd or xz compressed tar (it starts with \
                         bytes {})",
                        head.join(" ")
                    )
                },
                str::to_owned,
            )
        } else {
            format!("{compression}-compressed, but what it holds is not a tar")
        };
        return Err(Error::archive(format!("the stream is {what}")));
    }
    Ok((compression, Box::new(Cursor::new(block).chain(tar))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).expect("append");
        b.into_inner().expect("tar")
    }

    #[test]
    fn detects_and_refuses() {
        let tar = tar_with("a", b"hello");
        let (c, mut r) = open_archive(Cursor::new(tar.clone())).expect("plain");
        assert_eq!(c, Compression::Uncompressed);
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("read");
        assert_eq!(out, tar);

        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &tar).expect("gz");
            e.finish().expect("gz")
        };
        assert_eq!(
            open_archive(Cursor::new(gz)).expect("gz").0,
            Compression::Gzip
        );

        let err = open_archive(Cursor::new(b"BZh91AY&SY....".to_vec()))
            .err()
            .expect("bzip2");
        assert!(err.to_string().contains("bzip2"), "{err}");
        let err = open_archive(Cursor::new(Vec::new())).err().expect("empty");
        assert!(err.to_string().contains("empty"), "{err}");
        let err = open_archive(Cursor::new(vec![7u8; 2000]))
            .err()
            .expect("junk");
        assert!(err.to_string().contains("neither a tar"), "{err}");
        let zjunk = zstd::encode_all(&b"not a tar at all"[..], 1).expect("zstd");
        let err = open_archive(Cursor::new(zjunk)).err().expect("zstd junk");
        assert!(err.to_string().contains("not a tar"), "{err}");
    }
}
