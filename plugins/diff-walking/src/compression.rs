//! Compression detected by magic number, never by media type or file name.
//!
//! containerd (PR 9989) detects gzip and zstd from the first bytes of a blob and treats
//! anything else as a plain tar; berth also recognises xz. Import reuses [`decompress`] for
//! archives, so it knows nothing about tar.

use std::fmt;
use std::io::{self, BufReader, Chain, Cursor, Read};

/// How many leading bytes [`Compression::detect`] looks at (the xz magic is the longest).
pub const MAGIC_LEN: usize = 6;

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const XZ_MAGIC: &[u8] = &[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];

/// How a stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Not compressed (or compressed in a way berth does not know: the tar parser will say).
    Uncompressed,
    /// gzip (RFC 1952), possibly several concatenated members.
    Gzip,
    /// Zstandard, possibly several frames, skippable frames included.
    Zstd,
    /// xz, possibly several concatenated streams.
    Xz,
}

impl Compression {
    /// The compression of a stream starting with `prefix` (at most [`MAGIC_LEN`] bytes are
    /// looked at; a shorter prefix is a short stream).
    pub fn detect(prefix: &[u8]) -> Compression {
        if prefix.starts_with(GZIP_MAGIC) {
            Compression::Gzip
        } else if prefix.starts_with(ZSTD_MAGIC) || is_zstd_skippable(prefix) {
            Compression::Zstd
        } else if prefix.starts_with(XZ_MAGIC) {
            Compression::Xz
        } else {
            Compression::Uncompressed
        }
    }

    /// A short lowercase name: `uncompressed`, `gzip`, `zstd`, `xz`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Uncompressed => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A zstd stream may start with a skippable frame, magic 0x184D2A50..=0x184D2A5F (little
/// endian), as containerd also accepts.
fn is_zstd_skippable(prefix: &[u8]) -> bool {
    prefix.len() >= 4 && prefix[0] & 0xf0 == 0x50 && prefix[1..4] == [0x2a, 0x4d, 0x18]
}

/// The source with the bytes read for detection put back in front.
type Prefixed<R> = Chain<Cursor<Vec<u8>>, R>;

/// A decompressing reader returned by [`decompress`]: yields the uncompressed bytes.
///
/// Errors of the underlying reader are passed through; corrupt or truncated compressed data
/// is an error (never a silent early end), including garbage after the last member or frame.
pub struct Decompressor<R: Read> {
    inner: Inner<R>,
}

enum Inner<R: Read> {
    Plain(Prefixed<R>),
    Gzip(flate2::read::MultiGzDecoder<Prefixed<R>>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<Prefixed<R>>>),
    Xz(liblzma::read::XzDecoder<Prefixed<R>>),
}

impl<R: Read> Read for Decompressor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(r) => r.read(buf),
            Inner::Gzip(r) => r.read(buf),
            Inner::Zstd(r) => r.read(buf),
            Inner::Xz(r) => r.read(buf),
        }
    }
}

impl<R: Read> fmt::Debug for Decompressor<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            Inner::Plain(_) => Compression::Uncompressed,
            Inner::Gzip(_) => Compression::Gzip,
            Inner::Zstd(_) => Compression::Zstd,
            Inner::Xz(_) => Compression::Xz,
        };
        f.debug_struct("Decompressor")
            .field("compression", &kind)
            .finish_non_exhaustive()
    }
}

/// Reads the first bytes of `reader`, detects its compression and returns a reader of the
/// uncompressed bytes (the detected bytes are not lost). Fails only if `reader` fails.
///
/// The result reads small requests inefficiently for plain streams; wrap it in a
/// [`BufReader`] when the consumer reads in small pieces (a tar parser does).
pub fn decompress<R: Read>(mut reader: R) -> io::Result<(Compression, Decompressor<R>)> {
    let mut prefix = [0u8; MAGIC_LEN];
    let mut filled = 0;
    // A reader may return fewer bytes than asked (a pipe, a network stream): keep reading
    // until the magic is complete or the stream ends.
    while filled < MAGIC_LEN {
        match reader.read(&mut prefix[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let compression = Compression::detect(&prefix[..filled]);
    let source = Cursor::new(prefix[..filled].to_vec()).chain(reader);
    let inner = match compression {
        Compression::Uncompressed => Inner::Plain(source),
        Compression::Gzip => Inner::Gzip(flate2::read::MultiGzDecoder::new(source)),
        Compression::Zstd => Inner::Zstd(zstd::stream::read::Decoder::new(source)?),
        Compression::Xz => Inner::Xz(liblzma::read::XzDecoder::new_multi_decoder(source)),
    };
    Ok((compression, Decompressor { inner }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(
            Compression::detect(&[0x5e, 0x2a, 0x4d, 0x18]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(XZ_MAGIC), Compression::Xz);
        assert_eq!(
            Compression::detect(&XZ_MAGIC[..5]),
            Compression::Uncompressed,
            "a truncated xz magic is not xz"
        );
        assert_eq!(Compression::detect(b"usr/"), Compression::Uncompressed);
        assert_eq!(Compression::detect(b""), Compression::Uncompressed);
        assert_eq!(Compression::Xz.to_string(), "xz");
    }

    /// A reader handing out one byte per call, as a slow pipe might.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some((first, rest)) = self.0.split_first() else {
                return Ok(0);
            };
            if buf.is_empty() {
                return Ok(0);
            }
            buf[0] = *first;
            self.0 = rest;
            Ok(1)
        }
    }

    #[test]
    fn detection_survives_short_reads_and_keeps_every_byte() {
        let data = b"hello, plain world".to_vec();
        let (kind, mut r) = decompress(Trickle(&data)).expect("detect");
        assert_eq!(kind, Compression::Uncompressed);
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("read");
        assert_eq!(out, data);

        let compressed = zstd::encode_all(&data[..], 3).expect("zstd");
        let (kind, mut r) = decompress(Trickle(&compressed)).expect("detect");
        assert_eq!(kind, Compression::Zstd);
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("read");
        assert_eq!(out, data);
    }

    #[test]
    fn decompressors_can_move_to_another_thread() {
        // Import and the differ run them on blocking threads.
        fn assert_send<T: Send>() {}
        assert_send::<Decompressor<std::fs::File>>();
    }

    #[test]
    fn short_streams_are_plain() {
        let (kind, mut r) = decompress(&b"ab"[..]).expect("detect");
        assert_eq!(kind, Compression::Uncompressed);
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("read");
        assert_eq!(out, b"ab");
    }
}
