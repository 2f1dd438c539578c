//! Layer builders and fixtures shared by the applier tests.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use berth_core::error::{Classify, ErrorKind};
use berth_diff_walking::{ApplyOptions, ApplyReport, Error, apply};
use tar::{EntryType, Header};

/// The mtime entries get unless a test sets another.
pub const MTIME: u64 = 1_600_000_000;

/// A layer tar under construction. Regular entries go through `tar::Builder`; hostile
/// ones (`..` names, which the builder refuses) are written as raw headers.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Layer::new()
    }
}

pub fn header(kind: EntryType, size: u64, mode: u32) -> Header {
    let mut h = Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h
}

/// One PAX record, `<len> <key>=<value>\n`, the length counting itself.
pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    loop {
        let total = body + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

impl Layer {
    pub fn new() -> Layer {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.dir_at(path, mode, MTIME)
    }

    pub fn dir_at(&mut self, path: &str, mode: u32, mtime: u64) -> &mut Self {
        let mut h = header(EntryType::Directory, 0, mode);
        h.set_mtime(mtime);
        self.builder
            .append_data(&mut h, path, &[][..])
            .expect("append dir");
        self
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.file_with(path, data, 0o644, 0, 0, MTIME)
    }

    pub fn file_with(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> &mut Self {
        let mut h = header(EntryType::Regular, data.len() as u64, mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(mtime);
        self.builder
            .append_data(&mut h, path, data)
            .expect("append file");
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Symlink, path, target, 0, 0)
    }

    pub fn symlink_owned(&mut self, path: &str, target: &str, uid: u64, gid: u64) -> &mut Self {
        self.link(EntryType::Symlink, path, target, uid, gid)
    }

    pub fn hard_link(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Link, path, target, 0, 0)
    }

    fn link(&mut self, kind: EntryType, path: &str, target: &str, uid: u64, gid: u64) -> &mut Self {
        let mut h = header(kind, 0, 0o777);
        h.set_uid(uid);
        h.set_gid(gid);
        self.builder
            .append_link(&mut h, path, target)
            .expect("append link");
        self
    }

    pub fn device(
        &mut self,
        path: &str,
        kind: EntryType,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> &mut Self {
        let mut h = header(kind, 0, mode);
        h.set_device_major(major).expect("major");
        h.set_device_minor(minor).expect("minor");
        self.builder
            .append_data(&mut h, path, &[][..])
            .expect("append device");
        self
    }

    /// A PAX extended header describing the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (key, value) in records {
            data.extend(pax_record(key, value));
        }
        self.raw(b"PaxHeaders/next", EntryType::XHeader, b"", &data)
    }

    /// A header written byte for byte: the name and link name are not checked or cleaned.
    pub fn raw(&mut self, name: &[u8], kind: EntryType, link: &[u8], data: &[u8]) -> &mut Self {
        let mode = if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        };
        let mut h = header(kind, data.len() as u64, mode);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.builder.append(&h, data).expect("append raw");
        self
    }

    /// The tar bytes, with the end-of-archive blocks.
    pub fn bytes(&mut self) -> Vec<u8> {
        self.builder.finish().expect("finish");
        self.builder.get_ref().clone()
    }
}

/// Writes `value` as a NUL-terminated octal field.
fn octal(field: &mut [u8], value: u64) {
    let text = format!("{value:0width$o}", width = field.len() - 1);
    field[..text.len()].copy_from_slice(text.as_bytes());
    field[text.len()] = 0;
}

/// A layer with one GNU sparse file `sparse`: a hole of `offset` bytes, then `data`.
pub fn sparse_layer(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::GNUSparse);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h.as_old_mut().name[..6].copy_from_slice(b"sparse");
    let gnu = h.as_gnu_mut().expect("gnu header");
    octal(&mut gnu.sparse[0].offset, offset);
    octal(&mut gnu.sparse[0].numbytes, data.len() as u64);
    octal(&mut gnu.realsize, offset + data.len() as u64);
    h.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&h, data).expect("append sparse");
    builder.into_inner().expect("finish")
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("zstd")
}

/// zstd with the content checksum the zstd CLI writes by default.
pub fn zstd_checked(data: &[u8]) -> Vec<u8> {
    let mut e = zstd::Encoder::new(Vec::new(), 3).expect("zstd");
    e.include_checksum(true).expect("checksum");
    e.write_all(data).expect("zstd");
    e.finish().expect("zstd")
}

pub fn xz(data: &[u8]) -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
    e.write_all(data).expect("xz");
    e.finish().expect("xz")
}

/// A layer root beside a sentinel directory that no apply may touch.
pub struct Fixture {
    _tmp: tempfile::TempDir,
    pub base: PathBuf,
    pub root: PathBuf,
    pub sentinel: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().to_owned();
        let root = base.join("root");
        let sentinel = base.join("sentinel");
        fs::create_dir(&root).expect("root");
        fs::create_dir(&sentinel).expect("sentinel");
        fs::create_dir(sentinel.join("dir")).expect("sentinel dir");
        fs::write(sentinel.join("secret"), b"secret").expect("secret");
        fs::set_permissions(sentinel.join("secret"), fs::Permissions::from_mode(0o600))
            .expect("chmod");
        Fixture {
            _tmp: tmp,
            base,
            root,
            sentinel,
        }
    }

    pub fn apply(&self, layer: &[u8]) -> Result<ApplyReport, Error> {
        self.apply_with(layer, &ApplyOptions::default())
    }

    pub fn apply_with(&self, layer: &[u8], options: &ApplyOptions) -> Result<ApplyReport, Error> {
        apply(layer, &self.root, &unprivileged(options.clone()))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// The sentinel and the root's parent are exactly as created.
    pub fn assert_untouched(&self) {
        assert_eq!(
            names(&self.base),
            set(&["root", "sentinel"]),
            "beside the root"
        );
        assert_eq!(names(&self.sentinel), set(&["dir", "secret"]), "sentinel");
        assert!(names(&self.sentinel.join("dir")).is_empty(), "sentinel/dir");
        let secret = self.sentinel.join("secret");
        assert_eq!(fs::read(&secret).expect("secret"), b"secret");
        let meta = fs::symlink_metadata(&secret).expect("secret");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert!(meta.file_type().is_file());
    }
}

pub fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The error is a refusal of `entry`, classified InvalidArgument, naming it.
pub fn assert_refused(result: Result<ApplyReport, Error>, entry: &str) -> String {
    let err = result.expect_err("the layer must be refused");
    let text = err.to_string();
    assert!(
        matches!(err, Error::Refused { .. }),
        "not a refusal: {err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{text}");
    assert!(
        text.contains(&format!("{entry:?}")),
        "{text} does not name {entry:?}"
    );
    text
}

/// Without root, entries cannot be given the layer's owners: tests that do not check owners
/// then apply with `no_same_owner`, so they run unprivileged too.
pub fn unprivileged(mut options: ApplyOptions) -> ApplyOptions {
    if !is_root() {
        options.no_same_owner = true;
    }
    options
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Tests that chown, mknod or set trusted.* xattrs need root; CI runs them as root.
#[macro_export]
macro_rules! needs_root {
    () => {
        if !common::is_root() {
            eprintln!("skipped: this test needs root (CAP_CHOWN, CAP_MKNOD, CAP_SYS_ADMIN)");
            return;
        }
    };
}
