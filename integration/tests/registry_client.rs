//! berth's registry client (`berth-registry`) against a real registry (Debian's
//! docker-registry, distribution 2.8): open, htpasswd basic auth, bearer tokens from the
//! harness's token server, and TLS with a test CA. Not calibrated: this drives berth's client
//! library directly, which containerd has no counterpart of to run the same body against; the
//! registry itself is the reference here (what skopeo pushed is what must come back).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use berth_integration::images::{self, LayerCompression, TestImage};
use berth_integration::registry::{Registry, RegistryOptions};
use berth_integration::token_server::TokenServerOptions;
use berth_registry::{
    Client, ClientOptions, Credentials, Descriptor, Digest, Error, Reference, Resume, Sha256,
};
use bytes::Bytes;
use sha2::Digest as _;

const REPO_TAG: &str = "library/busybox:test";

fn busybox() -> TestImage {
    images::busybox(
        "docker.io/library/berth-busybox:test",
        LayerCompression::Gzip,
    )
    .expect("building the busybox test image")
}

fn registry(opts: RegistryOptions, image: &TestImage) -> Registry {
    let reg = Registry::start(opts).expect("starting docker-registry");
    reg.push(&image.layout, REPO_TAG).expect("pushing busybox");
    reg
}

fn options(reg: &Registry) -> ClientOptions {
    let mut opts = ClientOptions {
        plain_http: reg.ca_cert().is_none(),
        ..ClientOptions::default()
    };
    if let Some((user, secret)) = reg.credentials() {
        opts.credentials.insert(
            reg.host(),
            Credentials {
                user: user.into(),
                secret: secret.into(),
            },
        );
    }
    opts
}

fn reference(reg: &Registry, repo_tag: &str) -> Reference {
    Reference::parse(&reg.reference(repo_tag)).expect("reference")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Resolves and fetches the whole image (manifest, config, layers), checking every digest
/// against what the image builder recorded. Returns the manifest descriptor.
async fn pull_all(c: &Client, r: &Reference, image: &TestImage) -> Result<Descriptor, Error> {
    let desc = c.resolve(r).await?;
    assert_eq!(
        desc.digest.as_str(),
        image.manifest_digest,
        "resolved digest"
    );
    let manifest = c.fetch_manifest(r, &desc).await?;
    let m: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    let config: Descriptor =
        serde_json::from_value(m["config"].clone()).expect("config descriptor");
    assert_eq!(config.digest.as_str(), image.config_digest);
    let layers: Vec<Descriptor> =
        serde_json::from_value(m["layers"].clone()).expect("layer descriptors");
    let got: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(got, image.layer_digests);
    for d in std::iter::once(&config).chain(&layers) {
        let data = c.fetch(r, d, None).await?.bytes().await?;
        assert_eq!(Digest::of(&data), d.digest);
    }
    Ok(desc)
}

fn layer_descriptor(image: &TestImage, i: usize) -> Descriptor {
    let digest = &image.layer_digests[i];
    let path = image
        .layout
        .join("blobs/sha256")
        .join(&digest["sha256:".len()..]);
    let size = std::fs::metadata(&path).expect("layer blob").len();
    Descriptor::new(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest::parse(digest).expect("digest"),
        size,
    )
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(layout.join("blobs/sha256").join(&digest["sha256:".len()..])).expect("blob")
}

#[test]
fn open_registry_resolve_fetch_resume_and_not_found() {
    let image = busybox();
    let reg = registry(RegistryOptions::open(), &image);
    let c = Client::new(options(&reg));
    let r = reference(&reg, REPO_TAG);
    rt().block_on(async {
        pull_all(&c, &r, &image).await.expect("pull");

        // Resume the first layer from its middle: the registry honours Range.
        let desc = layer_descriptor(&image, 0);
        let whole = blob(&image.layout, desc.digest.as_str());
        let half = whole.len() / 2;
        let resume = Resume {
            offset: half as u64,
            hasher: Sha256::new_with_prefix(&whole[..half]),
        };
        let rest = c
            .fetch(&r, &desc, Some(resume))
            .await
            .expect("resumed fetch")
            .bytes()
            .await
            .expect("verified");
        assert_eq!(rest, &whole[half..]);
        // The access log shows the ranged answer: 206 with only the rest of the blob.
        let ranged = format!("{} HTTP/1.1\" 206 {}", desc.digest, whole.len() - half);
        assert!(
            reg.log_shows(&ranged),
            "the registry answered a ranged GET ({ranged}):\n{}",
            reg.log()
        );

        // A wrong descriptor (another blob's digest) fails naming the digest asked for.
        let mut wrong = desc.clone();
        wrong.digest = Digest::of(b"not in the registry");
        let e = c.fetch(&r, &wrong, None).await.expect_err("unknown blob");
        assert!(e.is_not_found(), "{e}");
        assert!(e.to_string().contains(wrong.digest.as_str()), "{e}");

        let missing = reference(&reg, "library/busybox:missing");
        let e = c.resolve(&missing).await.expect_err("missing tag");
        assert!(e.is_not_found(), "{e}");
        assert!(e.to_string().contains("library/busybox:missing"), "{e}");
    });
}

#[test]
fn push_then_resolve_back_and_skip_existing_blobs() {
    let image = busybox();
    let reg = registry(RegistryOptions::open(), &image);
    let c = Client::new(options(&reg));
    let dest = reference(&reg, "copies/busybox:pushed");
    let manifest = blob(&image.layout, &image.manifest_digest);
    let m: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    rt().block_on(async {
        let mut blobs: Vec<Descriptor> =
            serde_json::from_value(m["layers"].clone()).expect("layers");
        blobs.push(serde_json::from_value(m["config"].clone()).expect("config"));
        for d in &blobs {
            let data = Bytes::from(blob(&image.layout, d.digest.as_str()));
            assert!(
                c.push_blob(&dest, d, data).await.expect("push blob"),
                "{} is new in copies/busybox",
                d.digest
            );
        }
        let mdesc = Descriptor::new(
            "application/vnd.oci.image.manifest.v1+json",
            Digest::parse(&image.manifest_digest).expect("digest"),
            manifest.len() as u64,
        );
        c.push_manifest(&dest, &mdesc, Bytes::from(manifest.clone()))
            .await
            .expect("push manifest");
        let back = c.resolve(&dest).await.expect("resolve the pushed tag");
        assert_eq!(back.digest, mdesc.digest);
        for d in &blobs {
            let data = Bytes::from(blob(&image.layout, d.digest.as_str()));
            assert!(
                !c.push_blob(&dest, d, data).await.expect("push again"),
                "{} exists now: skipped",
                d.digest
            );
        }
    });
}

#[test]
fn basic_auth_registry() {
    let image = busybox();
    let reg = registry(RegistryOptions::basic("berth", "s3cret"), &image);
    let r = reference(&reg, REPO_TAG);
    rt().block_on(async {
        let anonymous = Client::new(ClientOptions {
            plain_http: true,
            ..ClientOptions::default()
        });
        let e = anonymous.resolve(&r).await.expect_err("no credentials");
        assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
        assert!(e.to_string().contains(&reg.host()), "{e}");

        let mut wrong = options(&reg);
        wrong.credentials = BTreeMap::from([(
            reg.host(),
            Credentials {
                user: "berth".into(),
                secret: "nope".into(),
            },
        )]);
        let e = Client::new(wrong)
            .resolve(&r)
            .await
            .expect_err("wrong password");
        assert!(matches!(e, Error::Unauthorized { .. }), "{e}");

        pull_all(&Client::new(options(&reg)), &r, &image)
            .await
            .expect("pull with credentials");
    });
}

#[test]
fn token_auth_caches_refreshes_once_and_fails_clearly() {
    let image = busybox();
    let reg = registry(
        RegistryOptions::token(TokenServerOptions {
            lifetime: Duration::from_secs(3),
            ..TokenServerOptions::default()
        }),
        &image,
    );
    let tokens = reg.token_server().expect("token mode");
    let r = reference(&reg, REPO_TAG);
    let scope = "repository:library/busybox:pull";
    rt().block_on(async {
        // One scope, one token for the whole pull (manifest, config, two layers).
        let c = Client::new(options(&reg));
        let before = tokens.requests();
        pull_all(&c, &r, &image).await.expect("pull with tokens");
        let log = tokens.log();
        assert_eq!(log.len() - before, 1, "{:?}", &log[before..]);
        assert_eq!(log[before].scopes, vec![scope.to_string()]);

        // The token expires (3 s): the next request fetches a new one first.
        tokio::time::sleep(Duration::from_millis(3200)).await;
        c.resolve(&r).await.expect("resolve after expiry");
        assert_eq!(tokens.requests() - before, 2, "a fresh token after expiry");

        // A rejected token (error="invalid_token") is replaced once and the request retried.
        let c = Client::new(options(&reg));
        let before = tokens.requests();
        tokens.reject_next(1);
        pull_all(&c, &r, &image)
            .await
            .expect("pull after one refresh");
        assert_eq!(
            tokens.requests() - before,
            2,
            "the token endpoint is hit twice"
        );

        // Rejected twice: a clear authorization error naming the registry and the scope.
        let c = Client::new(options(&reg));
        let before = tokens.requests();
        tokens.reject_next(2);
        let e = c.resolve(&r).await.expect_err("rejected twice");
        assert!(matches!(e, Error::Unauthorized { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&reg.host()) && msg.contains(scope), "{msg}");
        assert!(msg.contains("invalid_token"), "{msg}");
        assert_eq!(tokens.requests() - before, 2, "refreshed once, not more");

        // Pushing asks for a pull,push token of the destination repository.
        let c = Client::new(options(&reg));
        let before = tokens.requests();
        let config = blob(&image.layout, &image.config_digest);
        let desc = Descriptor::new(
            "application/vnd.oci.image.config.v1+json",
            Digest::parse(&image.config_digest).expect("digest"),
            config.len() as u64,
        );
        let dest = reference(&reg, "copies/busybox:pushed");
        assert!(
            c.push_blob(&dest, &desc, Bytes::from(config))
                .await
                .expect("push with a token")
        );
        let log = tokens.log();
        assert_eq!(
            log[before..]
                .iter()
                .map(|t| t.scopes.clone())
                .collect::<Vec<_>>(),
            vec![vec!["repository:copies/busybox:pull,push".to_string()]]
        );
    });
}

#[test]
fn tls_registry_with_test_ca_and_skip_verify() {
    let image = busybox();
    let reg = registry(RegistryOptions::open().with_tls(), &image);
    let ca = reg.ca_cert().expect("a CA").to_path_buf();
    let r = reference(&reg, REPO_TAG);
    let certs = tempfile::tempdir().expect("certs.d");
    let hosts_toml = |extra: &str| {
        let dir = certs.path().join(reg.host());
        std::fs::create_dir_all(&dir).expect("host dir");
        std::fs::write(
            dir.join("hosts.toml"),
            format!("server = \"https://{}\"\n{extra}", reg.host()),
        )
        .expect("hosts.toml");
    };
    let with_config = || {
        Client::new(ClientOptions {
            config_path: Some(certs.path().to_path_buf()),
            ..ClientOptions::default()
        })
    };
    rt().block_on(async {
        // The test CA is not in the system's roots.
        hosts_toml("");
        let e = with_config().resolve(&r).await.expect_err("untrusted CA");
        assert!(matches!(e, Error::Http { .. }), "{e}");
        let chain = format!("{:?}", std::error::Error::source(&e));
        assert!(chain.to_lowercase().contains("certificate"), "{e}: {chain}");

        hosts_toml(&format!("ca = \"{}\"\n", ca.display()));
        pull_all(&with_config(), &r, &image)
            .await
            .expect("pull trusting the test CA");

        hosts_toml("skip_verify = true\n");
        pull_all(&with_config(), &r, &image)
            .await
            .expect("pull with skip_verify");

        // A CA path that does not exist is an error naming it.
        hosts_toml("ca = \"/nonexistent/ca.pem\"\n");
        let e = with_config()
            .resolve(&r)
            .await
            .expect_err("missing CA file");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    });
}
