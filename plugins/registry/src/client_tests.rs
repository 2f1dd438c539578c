use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::fake::{FakeServer, Reply, Seen};

const BLOB: &[u8] = b"the quick brown fox jumps over the lazy dog, many times over";

fn client(plain_http: bool) -> Client {
    Client::new(ClientOptions {
        plain_http,
        ..ClientOptions::default()
    })
}

fn client_with_creds(domain: &str, user: &str, secret: &str) -> Client {
    let mut opts = ClientOptions {
        plain_http: true,
        ..ClientOptions::default()
    };
    opts.credentials.insert(
        domain.to_string(),
        Credentials {
            user: user.into(),
            secret: secret.into(),
        },
    );
    Client::new(opts)
}

fn reference(host: &str, rest: &str) -> Reference {
    Reference::parse(&format!("{host}/{rest}")).expect("reference")
}

fn blob_desc(data: &[u8]) -> Descriptor {
    Descriptor::new(
        "application/vnd.oci.image.layer.v1.tar",
        Digest::of(data),
        data.len() as u64,
    )
}

/// Serves BLOB at any blob path, honouring `Range: bytes=N-` when `ranges` is set.
fn blob_reply(seen: &Seen, data: &[u8], ranges: bool) -> Reply {
    if let (true, Some(r)) = (ranges, seen.header("range")) {
        let start: usize = r
            .trim_start_matches("bytes=")
            .trim_end_matches('-')
            .parse()
            .expect("range start");
        return Reply::new(206)
            .header(
                "Content-Range",
                &format!("bytes {start}-{}/{}", data.len() - 1, data.len()),
            )
            .body(data[start..].to_vec());
    }
    Reply::new(200).body(data.to_vec())
}

#[tokio::test]
async fn resolve_with_head_sends_accept_and_reads_the_digest() {
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let digest = Digest::of(manifest);
    let d2 = digest.clone();
    let server = FakeServer::start(move |s| match (s.method.as_str(), s.path()) {
        ("HEAD", "/v2/library/app/manifests/v1") => Reply::new(200)
            .header("Content-Type", media_types::OCI_MANIFEST)
            .header("Docker-Content-Digest", d2.as_str())
            .header("Content-Length", &manifest.len().to_string()),
        _ => Reply::new(404),
    })
    .await;
    let r = reference(&server.host, "library/app:v1");
    let desc = client(true).resolve(&r).await.expect("resolve");
    assert_eq!(desc.digest, digest);
    assert_eq!(desc.size, manifest.len() as u64);
    assert_eq!(desc.media_type, media_types::OCI_MANIFEST);
    let log = server.log();
    assert_eq!(log.len(), 1, "{log:?}");
    let accept = log[0].header("accept").expect("an Accept header");
    for mt in [
        media_types::OCI_INDEX,
        media_types::OCI_MANIFEST,
        media_types::DOCKER_LIST,
        media_types::DOCKER_MANIFEST,
    ] {
        assert!(accept.contains(mt), "{accept} lacks {mt}");
    }
}

#[tokio::test]
async fn resolve_falls_back_to_get_and_hashes_the_body() {
    let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
    let server = FakeServer::start(move |s| match (s.method.as_str(), s.path()) {
        // A HEAD without Docker-Content-Digest, as some registries answer.
        ("HEAD", _) => Reply::new(200)
            .header("Content-Type", "application/json")
            .header("Content-Length", "0"),
        ("GET", "/v2/a/b/manifests/latest") => Reply::new(200).body(index.to_vec()),
        _ => Reply::new(404),
    })
    .await;
    let desc = client(true)
        .resolve(&reference(&server.host, "a/b"))
        .await
        .expect("resolve");
    assert_eq!(desc.digest, Digest::of(index));
    assert_eq!(desc.media_type, media_types::OCI_INDEX);
    assert_eq!(server.count("GET", "/v2/a/b/manifests/latest"), 1);
}

#[tokio::test]
async fn missing_tag_is_not_found_naming_the_reference() {
    let server = FakeServer::start(|_| Reply::new(404)).await;
    let r = reference(&server.host, "a/b:nope");
    let e = client(true).resolve(&r).await.expect_err("missing");
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains(&r.to_string()), "{e}");
}

#[tokio::test]
async fn fetch_verifies_digest_and_size_while_streaming() {
    let mut corrupt = BLOB.to_vec();
    corrupt[3] ^= 1;
    let server = FakeServer::start(move |s| match s.path() {
        p if p.starts_with("/v2/good/") => Reply::new(200).body(BLOB.to_vec()),
        p if p.starts_with("/v2/corrupt/") => Reply::new(200).body(corrupt.clone()),
        p if p.starts_with("/v2/short/") => Reply::new(200).body(BLOB[..10].to_vec()),
        p if p.starts_with("/v2/long/") => Reply::new(200).body([BLOB, b"x"].concat()),
        _ => Reply::new(404),
    })
    .await;
    let c = client(true);
    let desc = blob_desc(BLOB);
    let good = c
        .fetch(&reference(&server.host, "good/x:1"), &desc, None)
        .await
        .expect("fetch")
        .bytes()
        .await
        .expect("verified");
    assert_eq!(good, BLOB);

    let e = c
        .fetch(&reference(&server.host, "corrupt/x:1"), &desc, None)
        .await
        .expect("response")
        .bytes()
        .await
        .expect_err("corrupt content");
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    assert!(e.to_string().contains(desc.digest.as_str()), "{e}");

    for repo in ["short", "long"] {
        let e = c
            .fetch(
                &reference(&server.host, &format!("{repo}/x:1")),
                &desc,
                None,
            )
            .await
            .expect("response")
            .bytes()
            .await
            .expect_err(repo);
        assert!(matches!(e, Error::SizeMismatch { .. }), "{repo}: {e}");
        assert!(e.to_string().contains(desc.digest.as_str()), "{e}");
    }
    let e = c
        .fetch(&reference(&server.host, "absent/x:1"), &desc, None)
        .await
        .expect_err("absent");
    assert!(
        e.is_not_found() && e.to_string().contains(desc.digest.as_str()),
        "{e}"
    );
}

#[tokio::test]
async fn fetch_resumes_from_an_offset() {
    let desc = blob_desc(BLOB);
    let offset = 17;
    let resume = || Resume {
        offset: offset as u64,
        hasher: Sha256::new_with_prefix(&BLOB[..offset]),
    };
    for ranges in [true, false] {
        let server = FakeServer::start(move |s| blob_reply(s, BLOB, ranges)).await;
        let rest = client(true)
            .fetch(&reference(&server.host, "a/b:1"), &desc, Some(resume()))
            .await
            .expect("fetch")
            .bytes()
            .await
            .expect("verified");
        assert_eq!(rest, &BLOB[offset..], "ranges honoured: {ranges}");
        let log = server.log();
        assert_eq!(log[0].header("range"), Some("bytes=17-"));
    }
    // A resumed prefix that is not the blob's fails verification.
    let server = FakeServer::start(move |s| blob_reply(s, BLOB, true)).await;
    let wrong = Resume {
        offset: offset as u64,
        hasher: Sha256::new_with_prefix(vec![0u8; offset]),
    };
    let e = client(true)
        .fetch(&reference(&server.host, "a/b:1"), &desc, Some(wrong))
        .await
        .expect("fetch")
        .bytes()
        .await
        .expect_err("wrong prefix");
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
}

/// A registry behind bearer tokens: tokens are `tok-<n>`; tokens numbered below `bad_below`
/// are rejected with `error="invalid_token"`.
async fn token_registry(bad_below: usize) -> (FakeServer, Arc<AtomicUsize>) {
    let issued = Arc::new(AtomicUsize::new(0));
    let counter = issued.clone();
    let host = Arc::new(std::sync::OnceLock::<String>::new());
    let host2 = host.clone();
    let server = FakeServer::start(move |s| {
        let realm = format!("http://{}/token", host2.get().expect("host set"));
        if s.path() == "/token" {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            assert!(
                s.target.contains("scope=repository%3Aa%2Fb%3Apull"),
                "{}",
                s.target
            );
            assert!(s.target.contains("service=reg"), "{}", s.target);
            return Reply::new(200).body(format!(r#"{{"token":"tok-{n}","expires_in":300}}"#));
        }
        let challenge = |err: &str| {
            format!(r#"Bearer realm="{realm}",service="reg",scope="repository:a/b:pull"{err}"#)
        };
        match s.header("authorization") {
            None => Reply::new(401).header("WWW-Authenticate", &challenge("")),
            Some(a) => {
                let n: usize = a
                    .trim_start_matches("Bearer tok-")
                    .parse()
                    .expect("a token of ours");
                if n < bad_below {
                    Reply::new(401)
                        .header("WWW-Authenticate", &challenge(r#",error="invalid_token""#))
                } else {
                    blob_reply(s, BLOB, false)
                }
            }
        }
    })
    .await;
    host.set(server.host.clone()).expect("set once");
    (server, issued)
}

#[tokio::test]
async fn bearer_tokens_are_fetched_once_and_cached_per_scope() {
    let (server, issued) = token_registry(0).await;
    let c = client(true);
    let r = reference(&server.host, "a/b:1");
    let desc = blob_desc(BLOB);
    for _ in 0..3 {
        let got = c.fetch(&r, &desc, None).await.expect("fetch").bytes().await;
        assert_eq!(got.expect("verified"), BLOB);
    }
    assert_eq!(issued.load(Ordering::SeqCst), 1, "one token for one scope");
    // One anonymous request to learn the challenge, then three with the token.
    assert_eq!(server.count("GET", "/v2/"), 4);
}

#[tokio::test]
async fn an_invalid_token_is_replaced_once() {
    let (server, issued) = token_registry(1).await;
    let c = client(true);
    let r = reference(&server.host, "a/b:1");
    let got = c
        .fetch(&r, &blob_desc(BLOB), None)
        .await
        .expect("fetch after one refresh")
        .bytes()
        .await
        .expect("verified");
    assert_eq!(got, BLOB);
    assert_eq!(
        issued.load(Ordering::SeqCst),
        2,
        "the token endpoint is hit twice"
    );
}

#[tokio::test]
async fn a_second_invalid_token_is_an_authorization_error() {
    let (server, issued) = token_registry(usize::MAX).await;
    let c = client(true);
    let r = reference(&server.host, "a/b:1");
    let e = c
        .fetch(&r, &blob_desc(BLOB), None)
        .await
        .expect_err("refused twice");
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&server.host), "names the registry: {msg}");
    assert!(
        msg.contains("repository:a/b:pull"),
        "names the scope: {msg}"
    );
    assert!(msg.contains("invalid_token"), "{msg}");
    assert_eq!(issued.load(Ordering::SeqCst), 2, "refreshed once, not more");
}

#[tokio::test]
async fn basic_auth_after_the_challenge() {
    let server = FakeServer::start(|s| match s.header("authorization") {
        // base64("u:p")
        Some("Basic dTpw") => blob_reply(s, BLOB, false),
        _ => Reply::new(401).header("WWW-Authenticate", r#"Basic realm="r""#),
    })
    .await;
    let r = reference(&server.host, "a/b:1");
    let desc = blob_desc(BLOB);
    let e = client(true)
        .fetch(&r, &desc, None)
        .await
        .expect_err("no creds");
    assert!(
        e.to_string().contains("no") && e.to_string().contains(&server.host),
        "{e}"
    );

    let e = client_with_creds(&server.host, "u", "wrong")
        .fetch(&r, &desc, None)
        .await
        .expect_err("wrong creds");
    assert!(matches!(e, Error::Unauthorized { .. }), "{e}");

    let c = client_with_creds(&server.host, "u", "p");
    for _ in 0..2 {
        let got = c.fetch(&r, &desc, None).await.expect("fetch").bytes().await;
        assert_eq!(got.expect("verified"), BLOB);
    }
    // Each client learns the challenge once: no creds 1 anonymous; wrong creds 1 anonymous
    // + 1 refused; right creds 1 anonymous + 2 authorized.
    assert_eq!(server.log().len(), 6);
}

#[tokio::test]
async fn push_blob_skips_existing_and_uploads_missing() {
    let server = FakeServer::start(|s| match (s.method.as_str(), s.path()) {
        ("HEAD", p) if p.starts_with("/v2/a/have/blobs/") => {
            Reply::new(200).header("Content-Length", "1")
        }
        ("HEAD", _) => Reply::new(404).header("Content-Length", "0"),
        ("POST", "/v2/a/new/blobs/uploads/") => {
            Reply::new(202).header("Location", "/v2/a/new/blobs/uploads/u1?state=s")
        }
        ("PUT", "/v2/a/new/blobs/uploads/u1") => {
            assert!(s.target.contains("state=s"), "{}", s.target);
            assert!(s.target.contains("digest=sha256%3A"), "{}", s.target);
            assert_eq!(s.body, BLOB);
            Reply::new(201)
        }
        ("PUT", "/v2/a/new/manifests/v1") => {
            assert_eq!(s.header("content-type"), Some(media_types::OCI_MANIFEST));
            Reply::new(201)
        }
        _ => Reply::new(400).body("unexpected"),
    })
    .await;
    let c = client(true);
    let desc = blob_desc(BLOB);
    let have = reference(&server.host, "a/have:v1");
    assert!(
        !c.push_blob(&have, &desc, Bytes::from_static(BLOB))
            .await
            .expect("skip")
    );
    let new = reference(&server.host, "a/new:v1");
    assert!(
        c.push_blob(&new, &desc, Bytes::from_static(BLOB))
            .await
            .expect("upload")
    );
    assert_eq!(server.count("POST", "/"), 1);

    let manifest = br#"{"schemaVersion":2}"#;
    let mdesc = Descriptor::new(
        media_types::OCI_MANIFEST,
        Digest::of(manifest),
        manifest.len() as u64,
    );
    c.push_manifest(&new, &mdesc, Bytes::from_static(manifest))
        .await
        .expect("manifest");
    let e = c
        .push_blob(&new, &desc, Bytes::from_static(b"other bytes"))
        .await
        .expect_err("content not matching its descriptor");
    assert!(e.to_string().contains(desc.digest.as_str()), "{e}");
}

#[tokio::test]
async fn mirrors_are_tried_before_the_server() {
    let upstream = FakeServer::start(|s| blob_reply(s, BLOB, false)).await;
    let mirror = FakeServer::start(|_| Reply::new(404)).await;
    let dir = std::env::temp_dir().join(format!("berth-registry-mirror-{}", std::process::id()));
    let hostdir = dir.join(&upstream.host);
    std::fs::create_dir_all(&hostdir).expect("hosts dir");
    std::fs::write(
        hostdir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\ncapabilities = [\"pull\"]\n\
             [host.\"http://{}\".header]\nx-mirror = \"yes\"\n",
            upstream.host, mirror.host, mirror.host
        ),
    )
    .expect("hosts.toml");
    let c = Client::new(ClientOptions {
        config_path: Some(dir.clone()),
        ..ClientOptions::default()
    });
    let got = c
        .fetch(&reference(&upstream.host, "a/b:1"), &blob_desc(BLOB), None)
        .await
        .expect("fetch")
        .bytes()
        .await
        .expect("verified");
    assert_eq!(got, BLOB);
    let m = mirror.log();
    assert_eq!(m.len(), 1, "the mirror was asked first");
    assert_eq!(m[0].header("x-mirror"), Some("yes"));
    assert_eq!(upstream.log().len(), 1);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn uploads_mount_or_go_in_pieces_and_tags_are_checked_by_digest() {
    let manifest = br#"{"schemaVersion":2}"#;
    let mdigest = Digest::of(manifest);
    let tagged = mdigest.to_string();
    let server = FakeServer::start(move |s| match (s.method.as_str(), s.path()) {
        ("POST", "/v2/a/new/blobs/uploads/") if s.target.contains("from=a%2Fold") => {
            Reply::new(201)
        }
        ("POST", "/v2/a/new/blobs/uploads/") => {
            Reply::new(202).header("Location", "/v2/a/new/blobs/uploads/u1?state=0")
        }
        ("PATCH", "/v2/a/new/blobs/uploads/u1") => {
            let range = s.header("content-range").unwrap_or_default().to_owned();
            let next = if range == "0-9" { "u2?state=1" } else { "bad" };
            Reply::new(202).header("Location", &format!("/v2/a/new/blobs/uploads/{next}"))
        }
        ("PUT", "/v2/a/new/blobs/uploads/u2") => {
            assert!(s.target.contains("state=1"), "{}", s.target);
            assert!(s.target.contains("digest=sha256%3A"), "{}", s.target);
            Reply::new(201)
        }
        ("HEAD", "/v2/a/new/manifests/v1") => Reply::new(200)
            .header("Docker-Content-Digest", &tagged)
            .header("Content-Length", "1"),
        ("HEAD", _) => Reply::new(404).header("Content-Length", "0"),
        _ => Reply::new(400).body("unexpected"),
    })
    .await;
    let c = client(true);
    let new = reference(&server.host, "a/new:v1");
    let desc = blob_desc(BLOB);
    let start = c
        .start_upload(&new, &desc.digest, Some("a/old"))
        .await
        .expect("mount");
    assert!(matches!(start, UploadStart::Mounted), "{start:?}");

    // Mounting from the same repository is pointless: a plain upload starts.
    let UploadStart::Session(mut upload) = c
        .start_upload(&new, &desc.digest, Some("a/new"))
        .await
        .expect("upload")
    else {
        panic!("a session expected");
    };
    c.upload_chunk(&mut upload, Bytes::from_static(&BLOB[..10]))
        .await
        .expect("first piece");
    assert_eq!(upload.offset(), 10);
    let short = c
        .finish_upload(
            *upload,
            &desc,
            Bytes::from_static(&BLOB[10..BLOB.len() - 1]),
        )
        .await
        .expect_err("one byte short");
    assert!(short.to_string().contains(desc.digest.as_str()), "{short}");
    let UploadStart::Session(mut upload) = c
        .start_upload(&new, &desc.digest, None)
        .await
        .expect("upload")
    else {
        panic!("a session expected");
    };
    c.upload_chunk(&mut upload, Bytes::from_static(&BLOB[..10]))
        .await
        .expect("first piece");
    c.finish_upload(*upload, &desc, Bytes::from_static(&BLOB[10..]))
        .await
        .expect("the rest with the digest");
    assert_eq!(server.count("PATCH", "/"), 2);

    assert!(!c.blob_exists(&new, &desc).await.expect("HEAD"));
    let mdesc = Descriptor::new(media_types::OCI_MANIFEST, mdigest, manifest.len() as u64);
    assert!(c.manifest_exists(&new, &mdesc).await.expect("tag"));
    let other = Descriptor::new(media_types::OCI_MANIFEST, Digest::of(b"{}"), 2);
    assert!(
        !c.manifest_exists(&new, &other).await.expect("tag"),
        "the tag points at another digest"
    );
}
