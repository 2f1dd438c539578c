//! The Streaming and Transfer services over a unix socket, driven the way containerd's
//! client drives them (`core/streaming/proxy`, `core/transfer/streaming`): import with unpack
//! and progress, export, and the error cases.

mod testing;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use berth_core::content::Digest;
use berth_core::events::Exchange;
use berth_core::metadata::{MetaStore, Metadata, MetadataConfig};
use berth_core::namespace::{GRPC_HEADER, Namespace};
use berth_core::snapshot::Snapshotter;
use berth_core::testing::{MemoryContentStore, MemorySnapshotter};
use berth_proto::containerd::services::streaming::v1::StreamInit;
use berth_proto::containerd::services::streaming::v1::streaming_client::StreamingClient;
use berth_proto::containerd::services::transfer::v1::transfer_client::TransferClient;
use berth_proto::containerd::services::transfer::v1::{TransferOptions, TransferRequest};
use berth_proto::containerd::types::Platform as WirePlatform;
use berth_proto::containerd::types::transfer::{
    Data, ImageExportStream, ImageImportStream, ImageReference, ImageStore, OciRegistry, Progress,
    UnpackConfiguration, WindowUpdate,
};
use berth_proto::type_url;
use berth_services::streaming::{StreamManager, StreamingService};
use berth_services::transfer::TransferService;
use berth_transfer::testing::RecordingDiffer;
use berth_transfer::{LocalTransfer, TransferConfig, UnpackConfig};
use prost_types::Any;
use testing::serving::Served;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const NS: &str = "default";
const NAME: &str = "example.com/served/image:1";

struct Server {
    _dir: tempfile::TempDir,
    served: Served,
    metadata: Arc<Metadata>,
    differ: Arc<RecordingDiffer>,
    streams: Arc<StreamManager>,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            MetaStore::open(&dir.path().join("meta"), &MetadataConfig::default()).expect("meta");
        let mut snapshotters: BTreeMap<String, Arc<dyn Snapshotter>> = BTreeMap::new();
        snapshotters.insert("memory".into(), Arc::new(MemorySnapshotter::new()));
        let metadata = Metadata::with_snapshotters(
            Arc::new(store),
            Arc::new(Exchange::default()),
            Some(Arc::new(MemoryContentStore::new())),
            snapshotters,
            MetadataConfig::default(),
        );
        let differ = Arc::new(RecordingDiffer::new(metadata.content().expect("content")));
        let differs = [(
            "walking".to_owned(),
            differ.clone() as Arc<dyn berth_core::diff::Differ>,
        )]
        .into_iter()
        .collect();
        let config = TransferConfig {
            unpack_config: Some(vec![UnpackConfig {
                platform: "linux/amd64".into(),
                snapshotter: "memory".into(),
                ..UnpackConfig::default()
            }]),
            ..TransferConfig::default()
        };
        let transfer =
            Arc::new(LocalTransfer::new(metadata.clone(), differs, config).expect("transfer"));
        let streams = Arc::new(StreamManager::new());
        let served = Served::services(&[
            &StreamingService::new(streams.clone()),
            &TransferService::new(transfer, streams.clone()),
        ]);
        Server {
            _dir: dir,
            served,
            metadata,
            differ,
            streams,
        }
    }

    async fn channel(&self) -> Channel {
        self.served.channel().await
    }

    fn image_names(&self) -> Vec<String> {
        self.metadata
            .list_images(&Namespace::parse(NS).expect("ns"), &Default::default())
            .expect("images")
            .into_iter()
            .map(|i| i.name)
            .collect()
    }
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert(GRPC_HEADER, NS.parse().expect("ascii"));
    r
}

/// A client stream: `StreamInit{id}` sent and acknowledged (containerd's `streamCreator`).
struct ClientStream {
    tx: mpsc::Sender<Any>,
    rx: tonic::Streaming<Any>,
}

async fn open_stream(channel: Channel, id: &str) -> ClientStream {
    let (tx, rx) = mpsc::channel(16);
    tx.send(type_url::to_any(&StreamInit { id: id.into() }))
        .await
        .expect("init");
    let mut rx = StreamingClient::new(channel)
        .stream(request(ReceiverStream::new(rx)))
        .await
        .expect("stream")
        .into_inner();
    let ack = rx.message().await.expect("ack").expect("ack message");
    assert!(ack.value.is_empty(), "the ack is an empty Any");
    ClientStream { tx, rx }
}

/// containerd's `SendStream`: waits for credit, sends `Data` of at most 32 KiB within it,
/// then closes its side.
async fn send_data(mut s: ClientStream, data: Vec<u8>) {
    let mut remaining: i64 = 0;
    let mut sent = 0;
    while sent < data.len() {
        while remaining <= 0 {
            let Some(Ok(msg)) = s.rx.next().await else {
                return;
            };
            let update: WindowUpdate = type_url::from_any(&msg).expect("window update");
            remaining += i64::from(update.update);
        }
        let n = (data.len() - sent).min(32 << 10).min(remaining as usize);
        let msg = type_url::to_any(&Data {
            data: data[sent..sent + n].to_vec(),
        });
        if s.tx.send(msg).await.is_err() {
            return;
        }
        sent += n;
        remaining -= n as i64;
    }
    drop(s.tx);
    // Keep receiving (window updates) until the server ends the stream.
    while let Some(Ok(_)) = s.rx.next().await {}
}

/// containerd's `ReceiveStream`: grants 64 KiB whenever the window falls below it, collects
/// `Data` until the server ends the stream.
async fn receive_data(mut s: ClientStream) -> Vec<u8> {
    let mut window: i64 = 0;
    let mut out = Vec::new();
    loop {
        if window < 64 << 10 {
            let _ =
                s.tx.send(type_url::to_any(&WindowUpdate { update: 64 << 10 }))
                    .await;
            window += 64 << 10;
        }
        match s.rx.next().await {
            Some(Ok(msg)) => {
                let data: Data = type_url::from_any(&msg).expect("data");
                assert!(data.data.len() <= 32 << 10, "messages of at most 32 KiB");
                assert!(
                    data.data.len() as i64 <= window,
                    "the sender kept to the window"
                );
                window -= data.data.len() as i64;
                out.extend_from_slice(&data.data);
            }
            _ => return out,
        }
    }
}

async fn collect_progress(mut s: ClientStream) -> Vec<Progress> {
    let mut out = Vec::new();
    while let Some(Ok(msg)) = s.rx.next().await {
        out.push(type_url::from_any(&msg).expect("progress"));
    }
    out
}

fn tar_file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o444);
    h.set_cksum();
    b.append_data(&mut h, name, data).expect("append");
}

/// A one-layer linux/amd64 image as an OCI layout archive; returns it and its manifest digest.
fn archive() -> (Vec<u8>, Digest) {
    let mut layer = tar::Builder::new(Vec::new());
    tar_file(&mut layer, "etc/hostname", &vec![b'x'; 100_000]);
    let layer = layer.into_inner().expect("layer");
    let diff_id = Digest::sha256_of(&layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{diff_id}","size":{}}}]}}"#,
        Digest::sha256_of(config.as_bytes()),
        config.len(),
        layer.len()
    );
    let manifest_digest = Digest::sha256_of(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{},"annotations":{{"io.containerd.image.name":"{NAME}"}},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        manifest.len()
    );
    let mut b = tar::Builder::new(Vec::new());
    let mut blobs = vec![config.into_bytes(), manifest.into_bytes(), layer];
    blobs.sort_by_key(|b| Digest::sha256_of(b).to_string());
    for blob in &blobs {
        tar_file(
            &mut b,
            &format!("blobs/sha256/{}", Digest::sha256_of(blob).hex()),
            blob,
        );
    }
    tar_file(&mut b, "index.json", index.as_bytes());
    tar_file(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    (b.into_inner().expect("tar"), manifest_digest)
}

fn import_store(unpack: bool) -> ImageStore {
    ImageStore {
        platforms: vec![WirePlatform {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        }],
        extra_references: vec![ImageReference {
            name: "import-2026-01-01".into(),
            is_prefix: true,
            allow_overwrite: true,
            ..Default::default()
        }],
        unpacks: if unpack {
            vec![UnpackConfiguration {
                platform: Some(WirePlatform {
                    os: "linux".into(),
                    architecture: "amd64".into(),
                    ..Default::default()
                }),
                snapshotter: "memory".into(),
            }]
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

/// Imports `data` over the services, as `ctr images import` (transfer path) does.
async fn import(
    server: &Server,
    data: Vec<u8>,
    unpack: bool,
) -> (Result<(), tonic::Status>, Vec<Progress>) {
    let channel = server.channel().await;
    let input = open_stream(channel.clone(), "import-1").await;
    let progress = open_stream(channel.clone(), "progress-1").await;
    let sender = tokio::spawn(send_data(input, data));
    let events = tokio::spawn(collect_progress(progress));
    let result = TransferClient::new(channel)
        .transfer(request(TransferRequest {
            source: Some(type_url::to_any(&ImageImportStream {
                stream: "import-1".into(),
                ..Default::default()
            })),
            destination: Some(type_url::to_any(&import_store(unpack))),
            options: Some(TransferOptions {
                progress_stream: "progress-1".into(),
            }),
        }))
        .await
        .map(|_| ());
    let _ = tokio::time::timeout(Duration::from_secs(5), sender).await;
    let events = tokio::time::timeout(Duration::from_secs(5), events)
        .await
        .expect("progress ends")
        .expect("progress task");
    (result, events)
}

#[tokio::test]
async fn import_over_streams_unpacks_and_reports_progress() {
    let server = Server::start();
    let (archive, manifest) = archive();
    let (result, events) = import(&server, archive, true).await;
    result.expect("transfer");
    assert_eq!(server.image_names(), [NAME]);
    let image = server
        .metadata
        .get_image(&Namespace::parse(NS).expect("ns"), NAME)
        .expect("image");
    assert_eq!(image.target.digest, manifest);
    assert_eq!(server.differ.calls().len(), 1, "the layer was applied");
    let names: Vec<&str> = events.iter().map(|p| p.event.as_str()).collect();
    for want in [
        "Importing",
        "complete",
        "extracting",
        "extracted",
        "saved",
        "Completed import",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let saved = events.iter().find(|p| p.event == "saved").expect("saved");
    assert_eq!(saved.name, NAME);
    assert_eq!(
        saved.desc.as_ref().map(|d| d.digest.clone()),
        Some(manifest.to_string())
    );
    assert!(
        server.streams.take(NS, "import-1").is_err(),
        "streams are used up"
    );
}

#[tokio::test]
async fn export_over_streams_round_trips() {
    let server = Server::start();
    let (archive, manifest) = archive();
    import(&server, archive, false).await.0.expect("import");

    let channel = server.channel().await;
    let output = open_stream(channel.clone(), "export-1").await;
    let receiver = tokio::spawn(receive_data(output));
    TransferClient::new(channel)
        .transfer(request(TransferRequest {
            source: Some(type_url::to_any(&ImageStore {
                name: NAME.into(),
                ..Default::default()
            })),
            destination: Some(type_url::to_any(&ImageExportStream {
                stream: "export-1".into(),
                platforms: vec![WirePlatform {
                    os: "linux".into(),
                    architecture: "amd64".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            options: None,
        }))
        .await
        .expect("export");
    let exported = tokio::time::timeout(Duration::from_secs(5), receiver)
        .await
        .expect("export stream ends")
        .expect("receiver");
    let mut names = Vec::new();
    for entry in tar::Archive::new(&exported[..]).entries().expect("tar") {
        names.push(
            entry
                .expect("entry")
                .path()
                .expect("path")
                .to_string_lossy()
                .into_owned(),
        );
    }
    assert!(names.contains(&"index.json".to_owned()), "{names:?}");
    assert!(names.contains(&"manifest.json".to_owned()), "{names:?}");

    let again = Server::start();
    import(&again, exported, false).await.0.expect("re-import");
    let image = again
        .metadata
        .get_image(&Namespace::parse(NS).expect("ns"), NAME)
        .expect("image");
    assert_eq!(image.target.digest, manifest);
}

#[tokio::test]
async fn a_bad_archive_is_invalid_argument_and_leaves_no_image() {
    let server = Server::start();
    let (archive, _) = archive();
    let (result, _) = import(&server, archive[..archive.len() / 2].to_vec(), false).await;
    let status = result.expect_err("truncated");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("truncated"), "{status:?}");
    assert!(server.image_names().is_empty());
    let (result, _) = import(&server, b"BZh91AY&SY".repeat(100), false).await;
    let status = result.expect_err("bzip2");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("bzip2"), "{status:?}");
}

#[tokio::test]
async fn unsupported_pairs_and_missing_streams() {
    let server = Server::start();
    let channel = server.channel().await;
    let mut client = TransferClient::new(channel.clone());
    let status = client
        .transfer(request(TransferRequest {
            source: Some(type_url::to_any(&OciRegistry {
                reference: "docker.io/library/busybox:latest".into(),
                resolver: None,
            })),
            destination: Some(type_url::to_any(&ImageExportStream::default())),
            options: None,
        }))
        .await
        .expect_err("registry to export stream is no transfer containerd serves");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert!(
        status
            .message()
            .contains("containerd.types.transfer.OCIRegistry")
    );

    let status = client
        .transfer(request(TransferRequest {
            source: Some(type_url::to_any(&ImageImportStream {
                stream: "never-opened".into(),
                ..Default::default()
            })),
            destination: Some(type_url::to_any(&ImageStore::default())),
            options: None,
        }))
        .await
        .expect_err("no such stream");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    // The first stream message must be StreamInit; a taken id is AlreadyExists.
    let (tx, rx) = mpsc::channel(1);
    tx.send(type_url::to_any(&WindowUpdate { update: 1 }))
        .await
        .expect("send");
    let status = StreamingClient::new(channel.clone())
        .stream(request(ReceiverStream::new(rx)))
        .await
        .expect_err("not an init");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let _first = open_stream(channel.clone(), "dup").await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(type_url::to_any(&StreamInit { id: "dup".into() }))
        .await
        .expect("send");
    let status = StreamingClient::new(channel)
        .stream(request(ReceiverStream::new(rx)))
        .await
        .expect_err("duplicate");
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
}

#[tokio::test]
async fn an_abandoned_stream_is_forgotten() {
    let server = Server::start();
    let s = open_stream(server.channel().await, "gone").await;
    assert!(server.streams.is_registered(NS, "gone"));
    drop(s);
    // The server notices the client left and drops the registration.
    for _ in 0..100 {
        if !server.streams.is_registered(NS, "gone") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the abandoned stream stayed registered");
}
