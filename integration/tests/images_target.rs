//! `containerd.services.images.v1.Images/Delete` with `target` (containerd PR 8989,
//! compare-and-delete): a delete naming the digest the image points at removes it; a delete
//! naming any other digest (the image was re-tagged since the caller looked) is NotFound and
//! keeps the image.
//!
//! The matching-target half is calibrated. The stale-target half is berth-only: Debian's
//! containerd 1.6 predates the field (it came with 2.0) and ignores it, deleting the image.

use berth_integration::archive::{Compression, Entry, OciArchive};
use berth_integration::containerd_client::services::v1::images_client::ImagesClient;
use berth_integration::containerd_client::services::v1::{
    CreateImageRequest, DeleteImageRequest, GetImageRequest, Image, UpdateImageRequest,
};
use berth_integration::containerd_client::types::Descriptor;
use berth_integration::tonic::Code;
use berth_integration::tonic::transport::Channel;
use berth_integration::{Daemon, Kind, block_on_global, calibrated, with_namespace};

const NS: &str = "default";

/// The images service of one daemon, called synchronously on the harness's runtime (where
/// the channel's connection lives).
struct Images {
    ch: Channel,
}

type Status = berth_integration::tonic::Status;

impl Images {
    fn connect(d: &Daemon) -> Images {
        let socket = d.socket().to_path_buf();
        let ch = block_on_global(async move { berth_integration::grpc_channel(socket).await })
            .expect("channel");
        Images { ch }
    }

    fn client(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.ch.clone())
    }

    fn get(&self, name: &str) -> Result<Image, Status> {
        let mut c = self.client();
        let req = with_namespace(
            GetImageRequest {
                name: name.to_owned(),
            },
            NS,
        );
        block_on_global(async move { c.get(req).await })
            .map(|r| r.into_inner().image.expect("Get returns the image"))
    }

    fn create(&self, image: Image) -> Result<(), Status> {
        let mut c = self.client();
        let req = with_namespace(
            CreateImageRequest {
                image: Some(image),
                source_date_epoch: None,
            },
            NS,
        );
        block_on_global(async move { c.create(req).await }).map(|_| ())
    }

    fn update_target(&self, mut image: Image, target: Descriptor) -> Result<(), Status> {
        let mut c = self.client();
        image.target = Some(target);
        let req = with_namespace(
            UpdateImageRequest {
                image: Some(image),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["target".to_owned()],
                }),
                source_date_epoch: None,
            },
            NS,
        );
        block_on_global(async move { c.update(req).await }).map(|_| ())
    }

    fn delete(&self, name: &str, target: Option<Descriptor>, sync: bool) -> Result<(), Status> {
        let mut c = self.client();
        let req = with_namespace(
            DeleteImageRequest {
                name: name.to_owned(),
                sync,
                target,
            },
            NS,
        );
        block_on_global(async move { c.delete(req).await }).map(|_| ())
    }
}

/// Builds a one-layer image whose file `file` holds `data` and imports it (unpacked into
/// overlayfs) under `image`; returns the image's target as the daemon stores it and the
/// image's blobs (manifest, config, layer).
fn import(
    d: &Daemon,
    api: &Images,
    image: &str,
    file: &str,
    data: &str,
) -> (Descriptor, Vec<String>) {
    let path = d.dir().join(format!("{file}.tar"));
    let built = OciArchive::new()
        .layer(vec![Entry::file(file, data)], Compression::Gzip)
        .build(&path, image)
        .expect("building the archive");
    d.ctr_ok([
        "images",
        "import",
        "--snapshotter",
        "overlayfs",
        &path.to_string_lossy(),
    ]);
    let target = api
        .get(image)
        .expect("the imported image")
        .target
        .expect("a target");
    assert_eq!(target.digest, built.manifest_digest);
    (target, built.blobs())
}

/// Whether every one of `blobs` is in the daemon's content store.
fn has_all(d: &Daemon, blobs: &[String]) -> bool {
    let content = lines(&d.ctr_ok(["content", "ls", "-q"]).stdout);
    blobs.iter().all(|b| content.contains(b))
}

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

fn delete_with_matching_target(kind: Kind) {
    let d = Daemon::start(kind);
    let name = "docker.io/library/target:1";
    let api = Images::connect(&d);
    let (target, blobs) = import(&d, &api, name, "a", "image a\n");
    assert!(has_all(&d, &blobs), "the import stored {blobs:?}");

    // A second name for the same manifest keeps the blobs once the first name goes.
    let twin = "docker.io/library/target:twin";
    let mut image = api.get(name).expect("image");
    image.name = twin.to_owned();
    api.create(image).expect("Create of a second name");

    api.delete(name, Some(target.clone()), true)
        .expect("Delete with the image's own target");
    let err = api.get(name).expect_err("the image is gone");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(
        lines(&d.ctr_ok(["images", "ls", "-q"]).stdout),
        [twin],
        "only the second name is left"
    );
    assert!(has_all(&d, &blobs), "the second name keeps every blob");

    // A name that does not exist is NotFound, target or not.
    let err = api
        .delete(name, Some(target.clone()), false)
        .expect_err("Delete of a deleted image");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // The last name goes with its target and a synchronous collection: nothing is left.
    api.delete(twin, Some(target), true)
        .expect("Delete of the second name");
    assert!(lines(&d.ctr_ok(["images", "ls", "-q"]).stdout).is_empty());
    let left = d.ctr_ok(["content", "ls", "-q"]);
    assert!(left.stdout.trim().is_empty(), "blobs left: {left}");
    let snaps = d.ctr_ok(["snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert!(!snaps.stdout.contains("sha256:"), "snapshots left: {snaps}");
}
calibrated!(delete_with_matching_target);

/// Berth-only: containerd 1.6 ignores `target` (the field is from containerd 2.0), so there
/// the stale delete below would remove the image.
#[test]
fn delete_with_stale_target_is_not_found_and_keeps_the_image() {
    let d = Daemon::start(Kind::Berthd);
    let name = "docker.io/library/moving:1";
    let api = Images::connect(&d);
    let (old, _) = import(&d, &api, name, "a", "old\n");
    let other = "docker.io/library/moving:2";
    let (new, new_blobs) = import(&d, &api, other, "b", "new\n");
    assert_ne!(old.digest, new.digest);

    // Re-tag: `name` now points at the second manifest.
    let image = api.get(name).expect("image");
    api.update_target(image, new.clone())
        .expect("Update of the target");

    // A caller that still has the old target loses the race: NotFound, naming both digests.
    let err = api
        .delete(name, Some(old.clone()), true)
        .expect_err("Delete with a stale target");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    for digest in [&old.digest, &new.digest] {
        assert!(
            err.message().contains(digest.as_str()),
            "the message names {digest}: {err:?}"
        );
    }
    assert!(err.message().contains(name), "and the image: {err:?}");
    let kept = api.get(name).expect("the image is kept");
    assert_eq!(
        kept.target.map(|t| t.digest),
        Some(new.digest.clone()),
        "still pointing at the new target"
    );

    // The old manifest lost its last reference with the re-tag; a collection removes it and
    // keeps what the image points at now.
    d.ctr_ok(["leases", "create", "--id", "settle"]);
    d.ctr_ok(["leases", "rm", "--sync", "settle"]);
    let content = lines(&d.ctr_ok(["content", "ls", "-q"]).stdout);
    assert!(!content.contains(&old.digest), "{content:?}");
    assert!(content.contains(&new.digest), "{content:?}");

    // The current target deletes it; the other name still holds the manifest.
    api.delete(name, Some(new.clone()), true)
        .expect("Delete with the current target");
    assert_eq!(api.get(name).expect_err("deleted").code(), Code::NotFound);
    assert_eq!(lines(&d.ctr_ok(["images", "ls", "-q"]).stdout), [other]);
    d.ctr_ok(["leases", "create", "--id", "settle"]);
    d.ctr_ok(["leases", "rm", "--sync", "settle"]);
    assert!(has_all(&d, &new_blobs), "the second name keeps its blobs");
}
