//! The stream: compression detection, diff ids, corrupt and truncated input, bounds.

mod common;

use std::io::{self, Read};

use berth_core::content::{Digest, Digester};
use berth_core::error::{Classify, ErrorKind};
use berth_diff_walking::{ApplyOptions, Compression, Error, MAX_ENTRY_HEADER_BYTES, apply};
use common::{Fixture, Layer, gzip, names, set, xz, zstd};
use tar::EntryType;

/// Size of the big file in the sample layer.
const BIG: usize = 1_000_000;

/// A layer with enough data to span many buffers, padded like GNU tar's 10 KiB records.
fn sample_layer() -> Vec<u8> {
    let big: Vec<u8> = (0..BIG as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut tar = Layer::new()
        .dir("data", 0o755)
        .file("data/big", &big)
        .file("data/small", b"small")
        .symlink("data/link", "big")
        .bytes();
    tar.resize(tar.len().div_ceil(10240) * 10240, 0);
    tar
}

#[test]
fn every_compression_gives_the_same_diff_id_and_tree() {
    let tar = sample_layer();
    let expected = Digest::sha256_of(&tar);
    for (data, compression) in [
        (tar.clone(), Compression::Uncompressed),
        (gzip(&tar), Compression::Gzip),
        (zstd(&tar), Compression::Zstd),
        (xz(&tar), Compression::Xz),
    ] {
        let fx = Fixture::new();
        let report = fx.apply(&data).expect("apply");
        assert_eq!(report.compression, compression);
        assert_eq!(report.diff_id, expected, "{compression}");
        assert_eq!(report.uncompressed_size, tar.len() as u64, "{compression}");
        assert_eq!(report.entries, 4);
        assert_eq!(names(&fx.path("data")), set(&["big", "link", "small"]));
        assert_eq!(
            Digest::sha256_of(&std::fs::read(fx.path("data/big")).expect("big")),
            Digest::sha256_of(&big_of(&tar)),
            "{compression}"
        );
    }
}

/// The contents of data/big, read back out of the tar.
fn big_of(tar: &[u8]) -> Vec<u8> {
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        if entry.path_bytes().as_ref() == b"data/big" {
            let mut out = Vec::new();
            entry.read_to_end(&mut out).expect("read");
            return out;
        }
    }
    panic!("no data/big")
}

#[test]
fn concatenated_members_and_frames_are_one_stream() {
    let tar = sample_layer();
    let (a, b) = tar.split_at(300_001);
    for data in [
        [gzip(a), gzip(b)].concat(),
        [zstd(a), zstd(b)].concat(),
        [xz(a), xz(b)].concat(),
    ] {
        let fx = Fixture::new();
        let report = fx.apply(&data).expect("apply");
        assert_eq!(report.diff_id, Digest::sha256_of(&tar));
    }
}

#[test]
fn empty_layers_apply() {
    for data in [
        Vec::new(),
        Layer::new().bytes(),
        gzip(&Layer::new().bytes()),
    ] {
        let fx = Fixture::new();
        let report = fx.apply(&data).expect("apply");
        assert_eq!(report.entries, 0);
        let tar = if data.is_empty() {
            Vec::new()
        } else {
            Layer::new().bytes()
        };
        assert_eq!(report.diff_id, Digest::sha256_of(&tar));
    }
}

#[test]
fn expected_diff_id_is_checked() {
    let tar = sample_layer();
    let fx = Fixture::new();
    let right = ApplyOptions {
        expected_diff_id: Some(Digest::sha256_of(&tar)),
        ..Default::default()
    };
    fx.apply_with(&gzip(&tar), &right).expect("right diff id");

    let wrong = ApplyOptions {
        expected_diff_id: Some(Digest::sha256_of(b"something else")),
        ..Default::default()
    };
    let err = Fixture::new()
        .apply_with(&gzip(&tar), &wrong)
        .expect_err("wrong diff id");
    assert!(matches!(err, Error::DiffIdMismatch { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

    // The expected digest's algorithm is the one hashed.
    let mut sha512 = Digester::new(berth_core::content::Algorithm::Sha512);
    sha512.update(&tar);
    let report = Fixture::new()
        .apply_with(
            &tar,
            &ApplyOptions {
                expected_diff_id: Some(sha512.digest()),
                ..Default::default()
            },
        )
        .expect("sha512 diff id");
    assert_eq!(report.diff_id, sha512.finish());
}

fn assert_corrupt(result: Result<berth_diff_walking::ApplyReport, Error>, what: &str) -> String {
    let err = result.expect_err(what);
    assert!(matches!(err, Error::Corrupt { .. }), "{what}: {err:?}");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{what}");
    err.to_string()
}

#[test]
fn truncated_streams_fail_cleanly() {
    let tar = sample_layer();
    // Inside data/big's data, and inside the header after it.
    let in_data = 512 * 2 + BIG / 2;
    let in_header = 512 * 2 + BIG.div_ceil(512) * 512 + 100;
    let text = assert_corrupt(Fixture::new().apply(&tar[..in_data]), "plain, in data");
    assert!(text.contains("\"data/big\""), "{text}");
    let text = assert_corrupt(Fixture::new().apply(&tar[..in_header]), "plain, in header");
    assert!(text.contains("after entry \"data/big\""), "{text}");
    for (name, data) in [("gzip", gzip(&tar)), ("zstd", zstd(&tar)), ("xz", xz(&tar))] {
        for cut in [data.len() / 2, data.len() - 1] {
            assert_corrupt(Fixture::new().apply(&data[..cut]), name);
        }
    }
}

#[test]
fn corrupt_streams_fail_cleanly() {
    let tar = sample_layer();
    let flip = |mut data: Vec<u8>| {
        let middle = data.len() / 2;
        data[middle] ^= 0x55;
        data[middle + 1] ^= 0xaa;
        data
    };
    for (name, data) in [
        ("gzip", gzip(&tar)),
        ("zstd", common::zstd_checked(&tar)),
        ("xz", xz(&tar)),
    ] {
        assert_corrupt(Fixture::new().apply(&flip(data)), name);
    }
    // zstd without a content checksum may decode damaged data without noticing: the diff id
    // is then what catches it.
    let unchecked = ApplyOptions {
        expected_diff_id: Some(Digest::sha256_of(&tar)),
        ..Default::default()
    };
    let err = Fixture::new()
        .apply_with(&flip(zstd(&tar)), &unchecked)
        .expect_err("damaged zstd");
    assert!(
        matches!(err, Error::Corrupt { .. } | Error::DiffIdMismatch { .. }),
        "{err:?}"
    );
    // Garbage after a gzip member is not a valid next member.
    let mut trailing = gzip(&tar);
    trailing.extend_from_slice(b"garbage after the member");
    let text = assert_corrupt(Fixture::new().apply(&trailing), "trailing garbage");
    assert!(text.contains("after the end of the tar archive"), "{text}");
    // Neither tar nor a known compression.
    let noise: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 7) as u8)
        .collect();
    let text = assert_corrupt(Fixture::new().apply(&noise), "noise");
    assert!(text.contains("not a tar archive"), "{text}");
    // A header with a broken checksum after a good entry.
    let mut tar = Layer::new().file("a", b"a").file("b", b"b").bytes();
    tar[1024 + 148] ^= 1;
    let fx = Fixture::new();
    let text = assert_corrupt(fx.apply(&tar), "checksum");
    assert!(text.contains("after entry \"a\""), "{text}");
}

#[test]
fn a_decompression_bomb_over_the_bound_fails() {
    let tar = Layer::new().file("zeros", &vec![0u8; 8 << 20]).bytes();
    let bomb = zstd(&tar);
    assert!(bomb.len() < 4096, "a real bomb: {} bytes", bomb.len());
    let bounded = |limit| ApplyOptions {
        max_uncompressed_bytes: Some(limit),
        ..Default::default()
    };
    let fx = Fixture::new();
    let err = fx.apply_with(&bomb, &bounded(1 << 20)).expect_err("bomb");
    assert!(
        matches!(
            err,
            Error::TooLarge {
                limit: 1_048_576,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("\"zeros\""), "{err}");
    // Exactly at the bound is fine.
    let report = Fixture::new()
        .apply_with(&bomb, &bounded(tar.len() as u64))
        .expect("at the bound");
    assert_eq!(report.uncompressed_size, tar.len() as u64);
}

#[test]
fn a_sparse_file_cannot_expand_beyond_the_bound() {
    let fx = Fixture::new();
    let err = fx
        .apply_with(
            &common::sparse_layer(1 << 32, b"x"),
            &ApplyOptions {
                max_uncompressed_bytes: Some(1 << 30),
                ..Default::default()
            },
        )
        .expect_err("4 GiB of holes");
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert!(
        names(&fx.root).is_empty(),
        "refused before creating the file"
    );
}

#[test]
fn oversized_extension_headers_are_refused_before_buffering() {
    let record = common::pax_record("comment", &vec![b'a'; MAX_ENTRY_HEADER_BYTES as usize + 1]);
    let layer = Layer::new()
        .file("before", b"ok")
        .raw(b"PaxHeaders/huge", EntryType::XHeader, b"", &record)
        .file("after", b"x")
        .bytes();
    // No uncompressed bound set: the header bound alone stops it.
    let fx = Fixture::new();
    let err = fx.apply(&zstd(&layer)).expect_err("huge PAX header");
    assert!(matches!(err, Error::HeadersTooLarge { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("after entry \"before\""), "{err}");
    assert_eq!(names(&fx.root), set(&["before"]));

    // A large but reasonable long name is fine.
    let name = "n/".repeat(1000) + "leaf";
    let fx = Fixture::new();
    fx.apply(&Layer::new().file(&name, b"deep").bytes())
        .expect("2 KiB name through a GNU long name");
    assert_eq!(std::fs::read(fx.path(&name)).expect("read"), b"deep");
}

/// A reader that fails after `ok` bytes with `error`.
struct Failing {
    data: Vec<u8>,
    pos: usize,
    ok: usize,
    error: fn() -> io::Error,
}

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.ok {
            return Err((self.error)());
        }
        let n = buf
            .len()
            .min(self.ok - self.pos)
            .min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn a_failing_source_is_not_a_corrupt_layer() {
    let data = gzip(&sample_layer());
    for (ok, error, kind) in [
        (
            data.len() / 2,
            (|| io::Error::other(berth_core::Error::not_found("content sha256:abc")))
                as fn() -> io::Error,
            ErrorKind::NotFound,
        ),
        (2, || io::Error::other("pipe closed"), ErrorKind::Internal),
    ] {
        let fx = Fixture::new();
        let err = berth_diff_walking::apply(
            Failing {
                data: data.clone(),
                pos: 0,
                ok,
                error,
            },
            &fx.root,
            &common::unprivileged(ApplyOptions::default()),
        )
        .expect_err("source fails");
        assert!(matches!(err, Error::Source { .. }), "{err:?}");
        assert_eq!(err.kind(), kind);
    }
}

#[test]
fn a_missing_root_is_not_found() {
    let fx = Fixture::new();
    let err = apply(
        &Layer::new().bytes()[..],
        &fx.base.join("nope"),
        &ApplyOptions::default(),
    )
    .expect_err("no root");
    assert!(matches!(err, Error::Root { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::NotFound);
}
