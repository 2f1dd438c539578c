//! Multipart fetch (containerd PR 10177, `concurrent_layer_fetch_buffer`): one blob fetched as
//! parallel `Range` GETs of a fixed size, stitched back in order.
//!
//! - The first part is asked for alone. A `206` with the `Content-Range` asked for means the
//!   registry serves ranges: the first part streams straight to the reader while the next
//!   parts are fetched in the background, and each later part is held in memory until the
//!   reader reaches it. A `200` means the registry ignored `Range`: its body is the whole blob
//!   and is read as one stream (the bytes before the wanted offset skipped), as containerd
//!   falls back to a parallelism of one.
//! - At most [`Multipart::max_requests`] requests run at once over every blob sharing one
//!   [`Multipart`] (clones share the limiter): each part holds a permit from the GET until its
//!   body is read, so a pull as a whole never has more requests in flight. containerd's
//!   `max_concurrent_downloads` limits requests the same way once multipart is on.
//! - A blob holds at most `max_requests` parts fetched ahead of the reader, so memory stays
//!   under `max_requests * buffer` per blob.
//! - Verification is the [`BlobStream`]'s, the same as for one stream: size and digest over
//!   the stitched bytes.
//!
//! Parts are closed ranges (`bytes=N-M`), not containerd's open `bytes=N-` read up to the
//! buffer size: the registry then sends only what is used and connections stay reusable.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::client::{BlobStream, Client, Prefix, Source, content_range, not_found};
use crate::digest::Descriptor;
use crate::error::{Error, Result};
use crate::hosts::RegistryHost;
use crate::reference::Reference;

/// The smallest `concurrent_layer_fetch_buffer` that turns multipart fetching on (smaller
/// values, 0 included, leave it off, as in containerd).
pub const MIN_BUFFER: u64 = 512;

/// How to fetch blobs in parts; clones share one request limiter (give every blob of a pull
/// a clone of the same value).
#[derive(Debug, Clone)]
pub struct Multipart {
    buffer: u64,
    max_requests: usize,
    limiter: Arc<Semaphore>,
}

impl Multipart {
    /// Parts of `buffer` bytes with at most `max_requests` requests in flight (0 counts as
    /// 1); `None` when `buffer` is below [`MIN_BUFFER`] (multipart off).
    pub fn new(buffer: u64, max_requests: usize) -> Option<Multipart> {
        if buffer < MIN_BUFFER {
            return None;
        }
        let max_requests = max_requests.max(1);
        Some(Multipart {
            buffer,
            max_requests,
            limiter: Arc::new(Semaphore::new(max_requests)),
        })
    }

    /// Bytes per part.
    pub fn buffer(&self) -> u64 {
        self.buffer
    }

    /// Requests in flight at most, over every clone of this value.
    pub fn max_requests(&self) -> usize {
        self.max_requests
    }

    /// Whether `remaining` bytes are worth splitting (more than one part).
    pub(crate) fn splits(&self, remaining: u64) -> bool {
        remaining > self.buffer
    }

    /// A request slot, held until the request's body is read.
    pub(crate) async fn permit(&self) -> Result<OwnedSemaphorePermit> {
        Arc::clone(&self.limiter)
            .acquire_owned()
            .await
            .map_err(|_| Error::Protocol {
                context: "waiting for a download slot".into(),
                reason: "the request limiter was closed".into(),
            })
    }
}

/// Fetches `desc` from `prefix`'s offset in parts of `multipart`'s size (the caller checked
/// that there is more than one part), or as one stream when the registry ignores `Range`.
pub(crate) async fn fetch(
    client: Arc<Client>,
    reference: &Reference,
    desc: &Descriptor,
    prefix: Prefix,
    multipart: Multipart,
) -> Result<BlobStream> {
    let start = prefix.offset();
    let first_end = start + multipart.buffer - 1;
    let mut first_err = None;
    for host in client.pull_hosts(reference)? {
        let permit = multipart.permit().await?;
        let (resp, context) = match client
            .get_content(&host, reference, desc, Some((start, Some(first_end))))
            .await
        {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(host = %host.host, error = %e, "ranged fetch failed; trying the next host");
                first_err.get_or_insert(e);
                continue;
            }
        };
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            tracing::debug!(digest = %desc.digest, host = %host.host, "the registry ignores Range: fetching the blob as one stream");
            let source = Source::Single {
                resp,
                permit: Some(permit),
            };
            return Ok(BlobStream::new(source, desc, prefix, false, context));
        }
        match content_range(resp.headers()) {
            Some((s, e, _)) if s == start && e == first_end => {}
            // Everything from the start asked for is as good, read as one stream.
            Some((s, e, _)) if s == start && e + 1 == desc.size => {
                let source = Source::Single {
                    resp,
                    permit: Some(permit),
                };
                return Ok(BlobStream::new(source, desc, prefix, true, context));
            }
            got => {
                return Err(Error::Protocol {
                    context,
                    reason: format!(
                        "asked for bytes {start}-{first_end} of {}, got Content-Range {got:?}",
                        desc.digest
                    ),
                });
            }
        }
        let shared = Arc::new(Shared {
            client: Arc::clone(&client),
            host,
            reference: reference.clone(),
            desc: desc.clone(),
            multipart,
        });
        let first = FirstPart {
            resp,
            _permit: permit,
            left: first_end + 1 - start,
            context: context.clone(),
        };
        let chunks = Chunks::new(shared, first, first_end + 1);
        return Ok(BlobStream::new(
            Source::Ranged(chunks),
            desc,
            prefix,
            true,
            context,
        ));
    }
    Err(first_err.unwrap_or_else(|| not_found(reference, desc)))
}

/// What every part of one blob's fetch needs.
#[derive(Debug)]
struct Shared {
    client: Arc<Client>,
    host: RegistryHost,
    reference: Reference,
    desc: Descriptor,
    multipart: Multipart,
}

impl Shared {
    /// Bytes `start..=end`, whole, holding a request slot while the request runs.
    async fn part(&self, start: u64, end: u64) -> Result<Bytes> {
        let _permit = self.multipart.permit().await?;
        let (mut resp, context) = self
            .client
            .get_content(
                &self.host,
                &self.reference,
                &self.desc,
                Some((start, Some(end))),
            )
            .await?
            .ok_or_else(|| Error::NotFound {
                registry: self.host.host.clone(),
                what: format!(
                    "bytes {start}-{end} of {}@{} (the registry served the first part)",
                    self.reference.repository, self.desc.digest
                ),
            })?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(Error::Protocol {
                context,
                reason: format!(
                    "answered {} to a Range request after serving the first part of {} as a range",
                    resp.status(),
                    self.desc.digest
                ),
            });
        }
        let got = content_range(resp.headers());
        if got.map(|(s, e, _)| (s, e)) != Some((start, end)) {
            return Err(Error::Protocol {
                context,
                reason: format!(
                    "asked for bytes {start}-{end} of {}, got Content-Range {got:?}",
                    self.desc.digest
                ),
            });
        }
        let want = (end + 1 - start) as usize;
        let mut data = BytesMut::with_capacity(want);
        loop {
            let next = resp.chunk().await.map_err(|e| Error::Http {
                context: format!(
                    "{context} broke off after {} of the part's {want} bytes",
                    data.len()
                ),
                source: e,
            })?;
            let Some(b) = next else { break };
            if data.len() + b.len() > want {
                return Err(Error::Protocol {
                    context,
                    reason: format!(
                        "sent more than the {want} bytes asked for of {}",
                        self.desc.digest
                    ),
                });
            }
            data.extend_from_slice(&b);
        }
        if data.len() != want {
            return Err(Error::Protocol {
                context,
                reason: format!(
                    "sent {} of the {want} bytes asked for of {}",
                    data.len(),
                    self.desc.digest
                ),
            });
        }
        Ok(data.freeze())
    }
}

/// The first part, streamed as it arrives.
#[derive(Debug)]
struct FirstPart {
    resp: reqwest::Response,
    _permit: OwnedSemaphorePermit,
    left: u64,
    context: String,
}

/// The parts of one blob in order: the first streamed, the later ones fetched ahead in the
/// background. Dropping it cancels the parts still in flight.
#[derive(Debug)]
pub(crate) struct Chunks {
    shared: Arc<Shared>,
    first: Option<FirstPart>,
    pending: VecDeque<JoinHandle<Result<Bytes>>>,
    next_start: u64,
}

impl Chunks {
    fn new(shared: Arc<Shared>, first: FirstPart, next_start: u64) -> Chunks {
        let mut chunks = Chunks {
            shared,
            first: Some(first),
            pending: VecDeque::new(),
            next_start,
        };
        chunks.refill();
        chunks
    }

    /// Starts parts until `max_requests` are fetched ahead or none is left.
    fn refill(&mut self) {
        let size = self.shared.desc.size;
        let buffer = self.shared.multipart.buffer;
        while self.pending.len() + usize::from(self.first.is_some())
            < self.shared.multipart.max_requests
            && self.next_start < size
        {
            let start = self.next_start;
            let end = start.saturating_add(buffer).min(size) - 1;
            self.next_start = end + 1;
            let shared = Arc::clone(&self.shared);
            self.pending
                .push_back(tokio::spawn(async move { shared.part(start, end).await }));
        }
    }

    /// The next bytes in blob order; `None` after the last part.
    pub(crate) async fn next(&mut self) -> Result<Option<Bytes>> {
        if let Some(first) = &mut self.first {
            match first.resp.chunk().await {
                Ok(Some(b)) => {
                    if b.len() as u64 > first.left {
                        return Err(Error::Protocol {
                            context: first.context.clone(),
                            reason: format!(
                                "sent more than the range asked for of {}",
                                self.shared.desc.digest
                            ),
                        });
                    }
                    first.left -= b.len() as u64;
                    return Ok(Some(b));
                }
                Ok(None) if first.left > 0 => {
                    return Err(Error::Protocol {
                        context: first.context.clone(),
                        reason: format!(
                            "the first part of {} ended {} bytes short",
                            self.shared.desc.digest, first.left
                        ),
                    });
                }
                Ok(None) => {
                    self.first = None;
                    self.refill();
                }
                Err(e) => {
                    return Err(Error::Http {
                        context: format!(
                            "{} broke off with {} bytes of the part left",
                            first.context, first.left
                        ),
                        source: e,
                    });
                }
            }
        }
        let Some(part) = self.pending.pop_front() else {
            return Ok(None);
        };
        self.refill();
        match part.await {
            Ok(data) => data.map(Some),
            Err(e) => Err(Error::Protocol {
                context: format!("fetching a part of {}", self.shared.desc.digest),
                reason: format!("the part's task failed: {e}"),
            }),
        }
    }
}

impl Drop for Chunks {
    fn drop(&mut self) {
        for part in &self.pending {
            part.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientOptions, FetchOptions, Resume};
    use crate::digest::Digest;
    use crate::fake::{FakeServer, Reply, Seen};
    use sha2::{Digest as _, Sha256};

    /// Bytes that differ at every offset, so a part stitched in the wrong place shows.
    fn blob(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x9e37_79b9;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn desc(data: &[u8]) -> Descriptor {
        Descriptor::new(
            "application/vnd.oci.image.layer.v1.tar",
            Digest::of(data),
            data.len() as u64,
        )
    }

    fn client() -> Arc<Client> {
        Arc::new(Client::new(ClientOptions {
            plain_http: true,
            ..ClientOptions::default()
        }))
    }

    /// Serves `data` honouring `Range: bytes=N-[M]` when `ranges`, else always whole.
    fn serve(seen: &Seen, data: &[u8], ranges: bool) -> Reply {
        let Some(r) = seen.header("range").filter(|_| ranges) else {
            return Reply::new(200).body(data.to_vec());
        };
        let (start, end) = r
            .trim_start_matches("bytes=")
            .split_once('-')
            .expect("a byte range");
        let start: usize = start.parse().expect("range start");
        let end: usize = if end.is_empty() {
            data.len() - 1
        } else {
            end.parse::<usize>().expect("range end").min(data.len() - 1)
        };
        Reply::new(206)
            .header(
                "Content-Range",
                &format!("bytes {start}-{end}/{}", data.len()),
            )
            .body(data[start..=end].to_vec())
    }

    async fn read_all(mut stream: BlobStream) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = stream.chunk().await? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    fn ranges(server: &FakeServer) -> Vec<String> {
        server
            .log()
            .iter()
            .filter(|s| s.method == "GET")
            .map(|s| s.header("range").unwrap_or("").to_string())
            .collect()
    }

    #[test]
    fn buffers_below_512_leave_multipart_off() {
        assert!(Multipart::new(0, 3).is_none());
        assert!(Multipart::new(511, 3).is_none());
        let m = Multipart::new(512, 0).expect("512 turns it on");
        assert_eq!((m.buffer(), m.max_requests()), (512, 1));
    }

    #[tokio::test]
    async fn parts_are_ranged_and_stitched_in_order() {
        let data = blob(10_000);
        let served = data.clone();
        let server = FakeServer::start(move |s| serve(s, &served, true)).await;
        let r = Reference::parse(&format!("{}/a/b:1", server.host)).expect("reference");
        let options = FetchOptions {
            multipart: Multipart::new(1024, 3),
            ..FetchOptions::default()
        };
        let stream = client()
            .fetch_with(&r, &desc(&data), options)
            .await
            .expect("fetch");
        assert!(stream.verifies_digest());
        assert_eq!(read_all(stream).await.expect("verified"), data);
        let mut got = ranges(&server);
        got.sort_by_key(|r| {
            r.trim_start_matches("bytes=")
                .split('-')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
        });
        let want: Vec<String> = (0..10)
            .map(|i| format!("bytes={}-{}", i * 1024, ((i + 1) * 1024).min(10_000) - 1))
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_server_ignoring_range_is_read_as_one_stream() {
        let data = blob(5000);
        let served = data.clone();
        let server = FakeServer::start(move |s| serve(s, &served, false)).await;
        let r = Reference::parse(&format!("{}/a/b:1", server.host)).expect("reference");
        let options = FetchOptions {
            multipart: Multipart::new(1024, 3),
            ..FetchOptions::default()
        };
        let stream = client()
            .fetch_with(&r, &desc(&data), options)
            .await
            .expect("fetch");
        assert_eq!(read_all(stream).await.expect("verified"), data);
        assert_eq!(ranges(&server), vec!["bytes=0-1023".to_string()]);
    }

    #[tokio::test]
    async fn a_held_prefix_resumes_at_its_offset() {
        let data = blob(6000);
        let held = 2500usize;
        for (honour, multipart) in [(true, true), (false, true), (true, false), (false, false)] {
            let served = data.clone();
            let server = FakeServer::start(move |s| serve(s, &served, honour)).await;
            let r = Reference::parse(&format!("{}/a/b:1", server.host)).expect("reference");
            let options = FetchOptions {
                prefix: Prefix::Held(held as u64),
                multipart: if multipart {
                    Multipart::new(1024, 2)
                } else {
                    None
                },
            };
            let stream = client()
                .fetch_with(&r, &desc(&data), options)
                .await
                .expect("fetch");
            // Only a registry sending every byte lets the stream check the digest itself.
            assert_eq!(stream.verifies_digest(), !honour, "honour {honour}");
            assert_eq!(stream.offset(), held as u64);
            let rest = read_all(stream).await.expect("size checked");
            assert_eq!(
                rest,
                &data[held..],
                "honour {honour}, multipart {multipart}"
            );
            let first = ranges(&server).first().cloned().expect("a GET");
            assert!(first.starts_with("bytes=2500-"), "{first}");
        }
        // Held and hashed prefixes agree with a whole fetch over a range-ignoring server.
        let served = data.clone();
        let server = FakeServer::start(move |s| serve(s, &served, false)).await;
        let r = Reference::parse(&format!("{}/a/b:1", server.host)).expect("reference");
        let options = FetchOptions {
            prefix: Prefix::Hashed(Resume {
                offset: held as u64,
                hasher: Sha256::new_with_prefix(&data[..held]),
            }),
            multipart: Multipart::new(1024, 2),
        };
        let stream = client()
            .fetch_with(&r, &desc(&data), options)
            .await
            .expect("fetch");
        assert_eq!(read_all(stream).await.expect("verified"), &data[held..]);
    }

    #[tokio::test]
    async fn a_corrupt_part_fails_the_digest() {
        let data = blob(4096);
        let mut corrupt = data.clone();
        corrupt[3000] ^= 1;
        let server = FakeServer::start(move |s| serve(s, &corrupt, true)).await;
        let r = Reference::parse(&format!("{}/a/b:1", server.host)).expect("reference");
        let options = FetchOptions {
            multipart: Multipart::new(1024, 2),
            ..FetchOptions::default()
        };
        let e = read_all(
            client()
                .fetch_with(&r, &desc(&data), options)
                .await
                .expect("fetch"),
        )
        .await
        .expect_err("a flipped bit");
        assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_part_with_the_wrong_content_range_is_refused() {
        let data = blob(4096);
        let served = data.clone();
        let server = FakeServer::start(move |s| {
            let reply = serve(s, &served, true);
            if s.header("range") == Some("bytes=2048-3071") {
                // The right bytes, labelled as another range.
                return Reply {
                    headers: vec![("Content-Range".into(), "bytes 0-1023/4096".into())],
                    ..reply
                };
            }
            reply
        })
        .await;
        let r = Reference::parse(&format!("{}/a/b:1", server.host)).expect("reference");
        let options = FetchOptions {
            multipart: Multipart::new(1024, 2),
            ..FetchOptions::default()
        };
        let e = read_all(
            client()
                .fetch_with(&r, &desc(&data), options)
                .await
                .expect("fetch"),
        )
        .await
        .expect_err("a mislabelled part");
        assert!(
            e.to_string().contains("bytes 2048-3071") && e.to_string().contains("Content-Range"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn manifests_over_the_bound_are_refused_before_any_request() {
        let server = FakeServer::start(|_| Reply::new(500)).await;
        let r = Reference::parse(&format!("{}/a/b:1", server.host)).expect("reference");
        let big = Descriptor::new(
            crate::digest::media_types::OCI_MANIFEST,
            Digest::of(b"whatever"),
            crate::client::MAX_MANIFEST_BYTES + 1,
        );
        let e = client()
            .fetch_manifest(&r, &big)
            .await
            .expect_err("over the bound");
        let text = e.to_string();
        assert!(
            text.contains(big.digest.as_str())
                && text.contains(&crate::client::MAX_MANIFEST_BYTES.to_string()),
            "{text}"
        );
        assert!(server.log().is_empty(), "nothing asked: {:?}", server.log());
    }
}
