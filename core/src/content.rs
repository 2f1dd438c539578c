//! The content store plugin kind: digests, blob info, ingests, and the [`ContentStore`] trait.
//!
//! # Contract
//!
//! A content store keeps immutable blobs addressed by digest, and ingests (writes in progress)
//! addressed by a client-chosen reference:
//!
//! - A blob becomes visible under its digest only once all of its bytes are written, its size
//!   and digest verified, and the data flushed to disk. Nothing is ever visible under a digest
//!   it does not have.
//! - [`ContentStore::writer`] opens (or resumes) the ingest `ref`. Only one writer may hold a
//!   ref at a time; a second gets [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) and may retry. Closing a writer
//!   without committing keeps the ingest, so a later writer resumes at its offset. If the
//!   requested `expected` digest is already stored, `writer` fails with AlreadyExists.
//! - [`ContentWriter::commit`] checks the size (when non-zero) and the expected digest (when
//!   given): a mismatch is FailedPrecondition and nothing is stored. If the blob already
//!   exists, commit is AlreadyExists and the ingest is dropped (callers treat it as success).
//! - Read, Info, Update, Delete of a digest that is not stored are NotFound; Status and Abort
//!   of an unknown ref are NotFound.
//!
//! Every call carries a [`CallContext`]: backends that are not namespaced ignore it; the
//! core's metadata wrapper uses its namespace (required) and lease.

use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::time::SystemTime;

use sha2::Digest as _;

use crate::error::{Error, Result};
use crate::filters::Filter;
use crate::labels::Labels;
use crate::namespace::Namespace;
use crate::registry::{PluginKind, PluginType};

/// A digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, the one registries and images use.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    /// The name used in digests, e.g. `sha256`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha384 => 96,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A parsed content digest, `<algorithm>:<lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 hex>` (also sha384 and sha512); anything else is InvalidArgument.
    pub fn parse(text: &str) -> Result<Digest> {
        let invalid = |why: &str| Error::invalid_argument(format!("digest {text:?} {why}"));
        let (algorithm, hex) = text
            .split_once(':')
            .ok_or_else(|| invalid("must look like sha256:<hex>"))?;
        let algorithm = match algorithm {
            "sha256" => Algorithm::Sha256,
            "sha384" => Algorithm::Sha384,
            "sha512" => Algorithm::Sha512,
            _ => return Err(invalid("has an unsupported algorithm")),
        };
        if hex.len() != algorithm.hex_len() {
            return Err(invalid(&format!(
                "must have {} hex characters",
                algorithm.hex_len()
            )));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid("must be lowercase hex"));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }

    /// The SHA-256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        let mut d = Digester::new(Algorithm::Sha256);
        d.update(data);
        d.finish()
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Digest::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Incremental hashing for an [`Algorithm`].
#[derive(Clone)]
pub enum Digester {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// SHA-384 state.
    Sha384(sha2::Sha384),
    /// SHA-512 state.
    Sha512(sha2::Sha512),
}

impl Digester {
    /// A fresh hasher.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Digester::Sha256(sha2::Sha256::new()),
            Algorithm::Sha384 => Digester::Sha384(sha2::Sha384::new()),
            Algorithm::Sha512 => Digester::Sha512(sha2::Sha512::new()),
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Digester::Sha256(h) => h.update(data),
            Digester::Sha384(h) => h.update(data),
            Digester::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything added so far (the hasher stays usable).
    pub fn digest(&self) -> Digest {
        self.clone().finish()
    }

    /// The digest of everything added.
    pub fn finish(self) -> Digest {
        let (algorithm, bytes) = match self {
            Digester::Sha256(h) => (Algorithm::Sha256, h.finalize().to_vec()),
            Digester::Sha384(h) => (Algorithm::Sha384, h.finalize().to_vec()),
            Digester::Sha512(h) => (Algorithm::Sha512, h.finalize().to_vec()),
        };
        let mut hex = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            use fmt::Write;
            let _ = write!(hex, "{b:02x}");
        }
        Digest { algorithm, hex }
    }
}

/// A stored blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// When it was first stored.
    pub created_at: SystemTime,
    /// When its labels last changed.
    pub updated_at: SystemTime,
    /// Its labels (GC references, uncompressed digests, ...).
    pub labels: Labels,
}

/// An ingest in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The client's reference.
    pub reference: String,
    /// Bytes written so far.
    pub offset: u64,
    /// Expected total size, 0 when unknown.
    pub total: u64,
    /// Expected digest, if the client named one.
    pub expected: Option<Digest>,
    /// When the ingest started.
    pub started_at: SystemTime,
    /// When it was last written.
    pub updated_at: SystemTime,
}

/// Who is calling: the namespace and lease from the request headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    /// The call's namespace (`containerd-namespace`).
    pub namespace: Option<Namespace>,
    /// The lease new objects join (`containerd-lease`).
    pub lease: Option<String>,
}

impl CallContext {
    /// The namespace, or FailedPrecondition as containerd answers a call without one.
    pub fn require_namespace(&self) -> Result<&Namespace> {
        self.namespace.as_ref().ok_or_else(|| {
            Error::failed_precondition(
                "namespace is required: set the containerd-namespace header (ctr: -n NAME)",
            )
        })
    }
}

/// What to open a writer for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterRequest {
    /// The ingest reference (required, non-empty).
    pub reference: String,
    /// Expected total size, 0 when unknown.
    pub total: u64,
    /// Expected digest, if known.
    pub expected: Option<Digest>,
}

/// A stream of blob bytes.
pub type ByteStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<Vec<u8>>> + Send>>;

/// A content store (see the module documentation for the contract).
#[async_trait::async_trait]
pub trait ContentStore: Send + Sync {
    /// The blob's info.
    async fn info(&self, cx: &CallContext, digest: &Digest) -> Result<Info>;
    /// Changes labels: `fieldpaths` like `labels` (all) or `labels.<key>`; none means all
    /// labels. Returns the new info.
    async fn update(&self, cx: &CallContext, info: Info, fieldpaths: &[String]) -> Result<Info>;
    /// Every blob matching `filter` (fields `digest`, `size`, `labels.<key>`).
    async fn list(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<Info>>;
    /// Removes a blob.
    async fn delete(&self, cx: &CallContext, digest: &Digest) -> Result<()>;
    /// Reads `size` bytes (all when `None`) from `offset`; an offset past the end is
    /// OutOfRange.
    async fn read(
        &self,
        cx: &CallContext,
        digest: &Digest,
        offset: u64,
        size: Option<u64>,
    ) -> Result<ByteStream>;
    /// The status of the ingest `reference`.
    async fn status(&self, cx: &CallContext, reference: &str) -> Result<Status>;
    /// Every ingest matching `filter` (fields `ref`, `expected`).
    async fn list_statuses(&self, cx: &CallContext, filter: &Filter) -> Result<Vec<Status>>;
    /// Drops the ingest `reference` and its data.
    async fn abort(&self, cx: &CallContext, reference: &str) -> Result<()>;
    /// Opens or resumes the ingest `request.reference` for writing.
    async fn writer(
        &self,
        cx: &CallContext,
        request: WriterRequest,
    ) -> Result<Box<dyn ContentWriter>>;
}

/// A writer holding an ingest.
#[async_trait::async_trait]
pub trait ContentWriter: Send {
    /// Where the ingest stands.
    fn status(&self) -> Status;
    /// The digest of the bytes written so far.
    fn digest(&self) -> Digest;
    /// Appends bytes.
    async fn write(&mut self, data: &[u8]) -> Result<()>;
    /// Truncates the ingest; only 0 (start over) is supported.
    async fn truncate(&mut self, size: u64) -> Result<()>;
    /// Verifies and stores the blob under its digest (see the module contract).
    async fn commit(
        self: Box<Self>,
        size: u64,
        expected: Option<Digest>,
        labels: Labels,
    ) -> Result<()>;
    /// Releases the ingest without committing; it can be resumed later.
    async fn close(self: Box<Self>) -> Result<()>;
}

/// Typed lookup of content stores in the registry.
pub struct ContentKind;
impl PluginKind for ContentKind {
    const TYPE: PluginType = PluginType::CONTENT;
    type Object = dyn ContentStore;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_and_print() {
        let d = Digest::sha256_of(b"hello");
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Digest::parse(&d.to_string()).expect("parse"), d);
        for bad in [
            "",
            "sha256",
            "md5:abc",
            "sha256:abc",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "sha256:zzf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digester_is_incremental() {
        let mut d = Digester::new(Algorithm::Sha256);
        d.update(b"hel");
        let partial = d.digest();
        d.update(b"lo");
        assert_ne!(partial, d.digest());
        assert_eq!(d.finish(), Digest::sha256_of(b"hello"));
    }
}
