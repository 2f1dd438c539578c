//! `containerd.services.transfer.v1.Transfer` over the local transfer plugin
//! (`berth_transfer::LocalTransfer`), as containerd's `plugins/services/transfer`.
//!
//! Source and destination are `Any`s resolved by type URL; the pairs served are
//! `ImageImportStream` -> `ImageStore` (import, with unpack per `ImageStore.unpacks`) and
//! `ImageStore` -> `ImageExportStream` (export). Any other pair is Unimplemented, as in
//! containerd when no transferrer takes it. The streams named by `ImageImportStream.stream`,
//! `ImageExportStream.stream` and `TransferOptions.progress_stream` must have been opened
//! with the Streaming service in the same namespace; progress events go to the progress
//! stream as `containerd.types.transfer.Progress`.
//!
//! `ImageStore` fields read: `name` (the index's image name on import, the image on export),
//! `labels`, `platforms` (empty: all, as containerd), `extra_references`, `unpacks`.
//! `all_metadata` and `manifest_limit` are accepted and ignored (import keeps every manifest
//! the platforms select). `ImageImportStream.media_type` is ignored: the compression is
//! always detected by magic number.
//!
//! `OCIRegistry` -> `ImageStore` is a pull: `ImageStore.name` (else the reference) names the
//! image, `platforms` select (empty: the host's), `unpacks` unpack. Of the
//! `RegistryResolver`, `host_dir` overrides the configured `config_path`, `default_scheme`
//! `http` means plain HTTP, and with `auth_stream` the daemon sends one `AuthRequest` for the
//! registry host before resolving and uses the `AuthResponse` credentials (containerd asks on
//! the first 401 instead; asking first costs a round trip to clients without credentials).
//! `http_debug` (containerd 2.1, PR 10762) turns on the registry client's HTTP dump (`DEBUG`),
//! trace (`TRACE`) or both (`BOTH`), see `berth_registry::debug`. As containerd does, the dump
//! goes to the stream the client opened and named in `logs_stream`, as bytes
//! (`containerd.types.transfer.Data` under the stream's flow control, like an export), and
//! without a `logs_stream` into the daemon's log at debug level; trace events always go to the
//! daemon's log. `headers` is accepted and ignored.
//!
//! `ImageStore` -> `OCIRegistry` is a push of the image `ImageStore.name` to the reference:
//! `platforms` empty pushes every platform of an index (containerd's push pushes all),
//! otherwise only the manifests they select. The resolver is read as for a pull (`host_dir`,
//! `default_scheme`, `auth_stream`); the HTTP dump and trace options are not applied to
//! pushes.

use std::sync::Arc;
use std::time::Duration;

use berth_core::content::CallContext;
use berth_core::error::{Error, Result};
use berth_core::namespace;
use berth_core::registry::{InitError, Instance, PluginType, Registration};
use berth_core::serve::{GrpcService, GrpcServiceKind, MessageLimits};
use berth_proto::containerd::services::transfer::v1::TransferRequest;
use berth_proto::containerd::services::transfer::v1::transfer_server::{Transfer, TransferServer};
use berth_proto::containerd::types::Platform as WirePlatform;
use berth_proto::containerd::types::transfer::{
    AuthRequest, AuthResponse, AuthType, HttpDebug, ImageExportStream, ImageImportStream,
    ImageStore, OciRegistry, Progress as WireProgress, RegistryResolver,
};
use berth_proto::type_url;
use berth_transfer::{
    ExportOptions, ImageReference, ImportOptions, LocalTransfer, LocalTransferKind, Platform,
    PlatformSelection, Progress, ProgressSink, PullOptions, PushOptions, UnpackRequest, registry,
};
use prost_types::Any;
use tokio::sync::mpsc;

use crate::images::descriptor_to_wire;
use crate::streaming::{Stream, StreamManager, StreamManagerKind, receive_bytes, send_bytes};

/// How long the end of a transfer waits for queued progress events to reach the client.
const PROGRESS_FLUSH: Duration = Duration::from_secs(5);
/// Bytes buffered between the export writer and the stream sender.
const EXPORT_PIPE: usize = 256 << 10;

/// The transfer service.
#[derive(Clone, Debug)]
pub struct TransferService {
    transfer: Arc<LocalTransfer>,
    streams: Arc<StreamManager>,
}

impl TransferService {
    /// A service running transfers with `transfer`, finding streams in `streams`.
    pub fn new(transfer: Arc<LocalTransfer>, streams: Arc<StreamManager>) -> Self {
        TransferService { transfer, streams }
    }
}

/// A wire platform as the transfer plugin's (an empty one is the host's).
pub fn platform_from_wire(p: &WirePlatform) -> Platform {
    if p.os.is_empty() && p.architecture.is_empty() {
        return Platform::host();
    }
    Platform {
        architecture: p.architecture.clone(),
        os: p.os.clone(),
        os_version: p.os_version.clone(),
        os_features: p.os_features.clone(),
        variant: p.variant.clone(),
    }
    .normalized()
}

fn progress_to_wire(p: Progress) -> Any {
    type_url::to_any(&WireProgress {
        event: p.event,
        name: p.name,
        parents: p.parents,
        progress: i64::try_from(p.progress).unwrap_or(i64::MAX),
        total: i64::try_from(p.total).unwrap_or(i64::MAX),
        desc: p.desc.map(|d| descriptor_to_wire(&d.to_core())),
    })
}

/// Queues progress events for a task that sends them on the progress stream, so reporting
/// never waits on the network.
struct StreamProgress {
    tx: mpsc::UnboundedSender<Progress>,
}

impl ProgressSink for StreamProgress {
    fn report(&self, progress: Progress) {
        // The client stopped listening: progress is best effort.
        let _ = self.tx.send(progress);
    }
}

fn progress_pump(stream: Stream) -> (StreamProgress, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            if let Err(e) = stream.send(progress_to_wire(p)).await {
                tracing::debug!(error = %e, "progress stream closed");
                break;
            }
        }
    });
    (StreamProgress { tx }, task)
}

/// A dump sink writing into the daemon's log at debug level (no `logs_stream`).
fn log_dump(registry: &str) -> registry::DumpSink {
    let registry = registry.to_string();
    registry::DumpSink::new(move |text| {
        tracing::debug!(target: "berth_registry::dump", registry = %registry, "http dump\n{text}");
    })
}

/// A dump sink whose text goes to the client over `stream` as bytes. Dumping never waits on
/// the client: text queues until the stream's flow control lets it through. The pump ends when
/// the sink (every clone of it) is dropped and what was queued is sent.
fn dump_to_stream(stream: Stream) -> (registry::DumpSink, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let sink = registry::DumpSink::new(move |text| {
        // The client stopped reading: the dump is best effort, the pull goes on.
        let _ = tx.send(text);
    });
    let pump = tokio::spawn(async move {
        let (mut writer, reader) = tokio::io::duplex(EXPORT_PIPE);
        let sender = tokio::spawn(send_bytes(stream, reader));
        while let Some(text) = rx.recv().await {
            if tokio::io::AsyncWriteExt::write_all(&mut writer, text.as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        drop(writer);
        match sender.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "HTTP dump stream closed"),
            Err(e) => tracing::debug!(error = %e, "HTTP dump stream task failed"),
        }
    });
    (sink, pump)
}

fn decode<M: prost::Name + Default>(any: &Any, what: &str) -> Result<M> {
    type_url::from_any::<M>(any)
        .map_err(|e| Error::invalid_argument(format!("transfer {what}: {e}")))
}

fn import_options(store: &ImageStore) -> (ImportOptions, Vec<UnpackRequest>) {
    let options = ImportOptions {
        index_name: Some(store.name.clone()).filter(|n| !n.is_empty()),
        labels: store
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        platforms: if store.platforms.is_empty() {
            PlatformSelection::All
        } else {
            PlatformSelection::Only(store.platforms.iter().map(platform_from_wire).collect())
        },
        references: store
            .extra_references
            .iter()
            .map(|r| ImageReference {
                name: r.name.clone(),
                is_prefix: r.is_prefix,
                allow_overwrite: r.allow_overwrite,
                add_digest: r.add_digest,
                skip_named_digest: r.skip_named_digest,
            })
            .collect(),
        force_compress: false,
    };
    let unpacks = store
        .unpacks
        .iter()
        .map(|u| UnpackRequest {
            platform: u
                .platform
                .as_ref()
                .map_or_else(Platform::host, platform_from_wire),
            snapshotter: u.snapshotter.clone(),
        })
        .collect();
    (options, unpacks)
}

/// The images an `ImageStore` source names (containerd's `Store.Lookup`).
fn export_names(store: &ImageStore) -> Result<Vec<String>> {
    let mut names = Vec::new();
    if !store.name.is_empty() {
        names.push(store.name.clone());
    }
    for r in &store.extra_references {
        if r.is_prefix {
            return Err(Error::not_implemented(
                "prefix lookup on export not implemented: name the images",
            ));
        }
        names.push(r.name.clone());
    }
    if names.is_empty() {
        return Err(Error::invalid_argument(
            "the image store names no image to export",
        ));
    }
    Ok(names)
}

impl TransferService {
    async fn import(
        &self,
        cx: &CallContext,
        ns: &str,
        source: &Any,
        destination: &Any,
        progress: &dyn ProgressSink,
    ) -> Result<()> {
        let stream: ImageImportStream = decode(source, "source")?;
        let store: ImageStore = decode(destination, "destination")?;
        let (mut options, unpacks) = import_options(&store);
        options.force_compress = stream.force_compress;
        let input = receive_bytes(self.streams.take(ns, &stream.stream)?);
        self.transfer
            .import(cx, input, &options, &unpacks, progress)
            .await?;
        Ok(())
    }

    async fn pull(
        &self,
        cx: &CallContext,
        ns: &str,
        source: &Any,
        destination: &Any,
        progress: &dyn ProgressSink,
    ) -> Result<()> {
        let source: OciRegistry = decode(source, "source")?;
        let store: ImageStore = decode(destination, "destination")?;
        let reference = registry::Reference::parse(&source.reference)
            .map_err(|e| Error::invalid_argument(e.to_string()))?;
        let (client, dump_pump) = self
            .registry_client(ns, &reference, source.resolver.unwrap_or_default())
            .await?;
        let (import, unpacks) = import_options(&store);
        let options = PullOptions {
            platforms: if store.platforms.is_empty() {
                PlatformSelection::host()
            } else {
                import.platforms
            },
            labels: import.labels,
            ..PullOptions::default()
        };
        let pulled = self
            .transfer
            .pull(cx, client, &source.reference, &options, &unpacks, progress)
            .await;
        drain_dump(dump_pump).await;
        pulled?;
        Ok(())
    }

    /// `ImageStore` -> `OCIRegistry`: the image `ImageStore.name` to the registry reference,
    /// credentials through the auth stream as for a pull.
    async fn push(
        &self,
        cx: &CallContext,
        ns: &str,
        source: &Any,
        destination: &Any,
        progress: &dyn ProgressSink,
    ) -> Result<()> {
        let store: ImageStore = decode(source, "source")?;
        let target: OciRegistry = decode(destination, "destination")?;
        if store.name.is_empty() {
            return Err(Error::invalid_argument(format!(
                "push to {}: the image store names no image to push",
                target.reference
            )));
        }
        let reference = registry::Reference::parse(&target.reference)
            .map_err(|e| Error::invalid_argument(e.to_string()))?;
        let (client, dump_pump) = self
            .registry_client(ns, &reference, target.resolver.unwrap_or_default())
            .await?;
        let options = PushOptions {
            platforms: if store.platforms.is_empty() {
                PlatformSelection::All
            } else {
                PlatformSelection::Only(store.platforms.iter().map(platform_from_wire).collect())
            },
            ..PushOptions::default()
        };
        let pushed = self
            .transfer
            .push(
                cx,
                client,
                &store.name,
                &target.reference,
                &options,
                progress,
            )
            .await;
        drain_dump(dump_pump).await;
        pushed?;
        Ok(())
    }

    /// The registry client of a pull or push: hosts directory, plain HTTP, credentials (asked
    /// over the auth stream) and HTTP dump/trace from the resolver. The dump goes over the
    /// client's logs stream when it named one (the returned pump), else to the daemon log.
    async fn registry_client(
        &self,
        ns: &str,
        reference: &registry::Reference,
        resolver: RegistryResolver,
    ) -> Result<(Arc<registry::Client>, Option<tokio::task::JoinHandle<()>>)> {
        let config_path = if resolver.host_dir.is_empty() {
            self.transfer.config().config_path.clone()
        } else {
            resolver.host_dir.clone()
        };
        let mut credentials = std::collections::BTreeMap::new();
        if !resolver.auth_stream.is_empty() {
            let stream = self.streams.take(ns, &resolver.auth_stream)?;
            if let Some(creds) = ask_credentials(stream, reference).await? {
                credentials.insert(reference.domain.clone(), creds);
            }
        }
        let debug = HttpDebug::try_from(resolver.http_debug).unwrap_or(HttpDebug::Disabled);
        let (http_dump, dump_pump) = match debug {
            HttpDebug::Debug | HttpDebug::Both => {
                if resolver.logs_stream.is_empty() {
                    (Some(log_dump(&reference.domain)), None)
                } else {
                    let (sink, pump) =
                        dump_to_stream(self.streams.take(ns, &resolver.logs_stream)?);
                    (Some(sink), Some(pump))
                }
            }
            HttpDebug::Disabled | HttpDebug::Trace => (None, None),
        };
        let client = Arc::new(registry::Client::new(registry::ClientOptions {
            config_path: Some(config_path)
                .filter(|p| !p.is_empty())
                .map(std::path::PathBuf::from),
            plain_http: resolver.default_scheme == "http",
            credentials,
            user_agent: String::new(),
            http_dump,
            http_trace: matches!(debug, HttpDebug::Trace | HttpDebug::Both),
        }));
        Ok((client, dump_pump))
    }

    async fn export(
        &self,
        cx: &CallContext,
        ns: &str,
        source: &Any,
        destination: &Any,
        progress: &dyn ProgressSink,
    ) -> Result<()> {
        let store: ImageStore = decode(source, "source")?;
        let stream: ImageExportStream = decode(destination, "destination")?;
        let names = export_names(&store)?;
        let options = ExportOptions {
            platforms: stream.platforms.iter().map(platform_from_wire).collect(),
            all_platforms: stream.all_platforms,
            skip_docker_manifest: stream.skip_compatibility_manifest,
            skip_non_distributable: stream.skip_non_distributable,
        };
        let output = self.streams.take(ns, &stream.stream)?;
        let (mut writer, reader) = tokio::io::duplex(EXPORT_PIPE);
        let sender = tokio::spawn(send_bytes(output, reader));
        let exported = self
            .transfer
            .export(cx, &names, &options, &mut writer, progress)
            .await;
        // End of data for the sender (and so for the client), success or not.
        drop(writer);
        let sent = sender
            .await
            .map_err(|e| Error::internal(format!("export stream task: {e}")))?;
        exported?;
        sent
    }
}

#[tonic::async_trait]
impl Transfer for TransferService {
    async fn transfer(
        &self,
        request: tonic::Request<TransferRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        let ns = namespace::require(request.metadata())?;
        let cx = CallContext {
            namespace: Some(ns.clone()),
            lease: namespace::lease_from_metadata(request.metadata()),
        };
        let ns = ns.to_string();
        let req = request.into_inner();
        let source = req
            .source
            .ok_or_else(|| Error::invalid_argument("transfer needs a source"))?;
        let destination = req
            .destination
            .ok_or_else(|| Error::invalid_argument("transfer needs a destination"))?;
        let progress_id = req
            .options
            .map(|o| o.progress_stream)
            .filter(|id| !id.is_empty());
        let (sink, pump) = match progress_id {
            Some(id) => {
                let (sink, pump) = progress_pump(self.streams.take(&ns, &id)?);
                (Some(sink), Some(pump))
            }
            None => (None, None),
        };
        let progress: &dyn ProgressSink = match &sink {
            Some(s) => s,
            None => &berth_transfer::NoProgress,
        };
        let result = if type_url::is::<ImageImportStream>(&source)
            && type_url::is::<ImageStore>(&destination)
        {
            self.import(&cx, &ns, &source, &destination, progress).await
        } else if type_url::is::<OciRegistry>(&source) && type_url::is::<ImageStore>(&destination) {
            self.pull(&cx, &ns, &source, &destination, progress).await
        } else if type_url::is::<ImageStore>(&source)
            && type_url::is::<ImageExportStream>(&destination)
        {
            self.export(&cx, &ns, &source, &destination, progress).await
        } else if type_url::is::<ImageStore>(&source) && type_url::is::<OciRegistry>(&destination) {
            self.push(&cx, &ns, &source, &destination, progress).await
        } else {
            Err(Error::not_implemented(format!(
                "method Transfer not implemented for {} to {}",
                source.type_url, destination.type_url
            )))
        };
        // Let queued progress reach the client before the call returns (ctr stops drawing
        // then); closing the sink ends the pump, which ends the progress stream.
        drop(sink);
        if let Some(pump) = pump
            && tokio::time::timeout(PROGRESS_FLUSH, pump).await.is_err()
        {
            tracing::debug!("progress stream did not drain in time");
        }
        result?;
        Ok(tonic::Response::new(()))
    }
}

/// How long the daemon waits for a client to answer an `AuthRequest`.
const AUTH_TIMEOUT: Duration = Duration::from_secs(60);

/// Asks the client for credentials for `reference`'s registry over its auth stream. The
/// secret is never logged.
/// Waits (briefly) for an HTTP dump pump to send what is queued: once the registry client and
/// its dump sink are gone the pump ends the stream, which is how the client knows the dump is
/// complete.
async fn drain_dump(pump: Option<tokio::task::JoinHandle<()>>) {
    if let Some(pump) = pump
        && tokio::time::timeout(PROGRESS_FLUSH, pump).await.is_err()
    {
        tracing::debug!("HTTP dump stream did not drain in time");
    }
}

async fn ask_credentials(
    mut stream: Stream,
    reference: &registry::Reference,
) -> Result<Option<registry::Credentials>> {
    let request = AuthRequest {
        host: reference.domain.clone(),
        reference: reference.to_string(),
        wwwauthenticate: Vec::new(),
    };
    stream.send(type_url::to_any(&request)).await?;
    let answer = tokio::time::timeout(AUTH_TIMEOUT, stream.recv())
        .await
        .map_err(|_| {
            Error::new(
                berth_core::error::ErrorKind::DeadlineExceeded,
                format!(
                    "the client did not answer the credentials request for {} within {}s",
                    reference.domain,
                    AUTH_TIMEOUT.as_secs()
                ),
            )
        })?;
    let Some(answer) = answer else {
        return Ok(None);
    };
    let response: AuthResponse = decode(&answer?, "auth response")?;
    match AuthType::try_from(response.auth_type).unwrap_or(AuthType::None) {
        AuthType::Credentials => Ok(Some(registry::Credentials {
            user: response.username,
            secret: response.secret,
        })),
        AuthType::None => Ok(None),
        other => Err(Error::not_implemented(format!(
            "auth type {} for {} is not supported: send username and password",
            other.as_str_name(),
            reference.domain
        ))),
    }
}

impl GrpcService for TransferService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(
            TransferServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.grpc.v1.transfer`: needs `io.containerd.transfer.v1.local` and the stream
/// manager; skipped (with the reason) without them.
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "transfer", |ctx| async move {
        let transfer = ctx
            .get::<LocalTransferKind>("local")
            .map_err(|e| InitError::Skip(format!("no local transfer plugin: {}", e.message())))?;
        let streams = ctx
            .get::<StreamManagerKind>("manager")
            .map_err(|e| InitError::Skip(format!("no stream manager: {}", e.message())))?;
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(
            TransferService::new(transfer, streams),
        )))
    })
    .requires(&[PluginType::TRANSFER, PluginType::STREAMING])
}
