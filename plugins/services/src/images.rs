//! `containerd.services.images.v1.Images` over the core's metadata layer.
//!
//! Update of a missing image is NotFound (`ctr images import` then Creates); Delete takes
//! `sync` (wait for the collection) and an optional `target` (compare-and-delete, PR 8989).
//! Events `/images/create|update|delete` are published by the metadata layer.

use std::sync::Arc;
use std::time::SystemTime;

use berth_core::content::Digest;
use berth_core::error::Error;
use berth_core::filters::Filter;
use berth_core::metadata::images::Image;
use berth_core::metadata::{Metadata, MetadataKind};
use berth_core::namespace;
use berth_core::registry::{Instance, PluginType, Registration};
use berth_core::serve::{GrpcService, GrpcServiceKind, MessageLimits};
use berth_core::snapshot::Descriptor;
use berth_proto::containerd::services::images::v1::images_server::{Images, ImagesServer};
use berth_proto::containerd::services::images::v1::{
    CreateImageRequest, CreateImageResponse, DeleteImageRequest, GetImageRequest, GetImageResponse,
    Image as WireImage, ListImagesRequest, ListImagesResponse, UpdateImageRequest,
    UpdateImageResponse,
};
use berth_proto::containerd::types::Descriptor as WireDescriptor;

/// The images service.
#[derive(Clone)]
pub struct ImagesService {
    metadata: Arc<Metadata>,
}

impl ImagesService {
    /// A service over the metadata layer.
    pub fn new(metadata: Arc<Metadata>) -> Self {
        ImagesService { metadata }
    }
}

/// A wire descriptor as a domain one; a bad digest or a negative size is InvalidArgument.
pub fn descriptor_from_wire(d: WireDescriptor) -> Result<Descriptor, Error> {
    let digest = Digest::parse(&d.digest)
        .map_err(|e| Error::invalid_argument(format!("target digest: {}", e.message())))?;
    let size = u64::try_from(d.size).map_err(|_| {
        Error::invalid_argument(format!("target size {} must not be negative", d.size))
    })?;
    Ok(Descriptor {
        media_type: d.media_type,
        digest,
        size,
        annotations: d.annotations.into_iter().collect(),
    })
}

/// A domain descriptor on the wire.
pub fn descriptor_to_wire(d: &Descriptor) -> WireDescriptor {
    WireDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: i64::try_from(d.size).unwrap_or(i64::MAX),
        annotations: d.annotations.clone().into_iter().collect(),
    }
}

fn to_wire(image: Image) -> WireImage {
    WireImage {
        name: image.name,
        labels: image.labels.into_iter().collect(),
        target: Some(descriptor_to_wire(&image.target)),
        created_at: Some(image.created_at.into()),
        updated_at: Some(image.updated_at.into()),
    }
}

fn from_wire(image: Option<WireImage>) -> Result<Image, Error> {
    let image =
        image.ok_or_else(|| Error::invalid_argument("image is missing from the request"))?;
    let target = image
        .target
        .ok_or_else(|| Error::invalid_argument(format!("image {:?} has no target", image.name)))?;
    Ok(Image {
        name: image.name,
        labels: image.labels.into_iter().collect(),
        target: descriptor_from_wire(target)?,
        created_at: SystemTime::UNIX_EPOCH,
        updated_at: SystemTime::UNIX_EPOCH,
    })
}

fn epoch(t: Option<prost_types::Timestamp>) -> Result<Option<SystemTime>, Error> {
    t.map(|t| {
        SystemTime::try_from(t)
            .map_err(|e| Error::invalid_argument(format!("source_date_epoch: {e}")))
    })
    .transpose()
}

type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl Images for ImagesService {
    async fn get(&self, request: tonic::Request<GetImageRequest>) -> Reply<GetImageResponse> {
        let ns = namespace::require(request.metadata())?;
        let image = self.metadata.get_image(&ns, &request.get_ref().name)?;
        Ok(tonic::Response::new(GetImageResponse {
            image: Some(to_wire(image)),
        }))
    }

    async fn list(&self, request: tonic::Request<ListImagesRequest>) -> Reply<ListImagesResponse> {
        let ns = namespace::require(request.metadata())?;
        let filter = Filter::parse_all(&request.get_ref().filters)?;
        let images = self.metadata.list_images(&ns, &filter)?;
        Ok(tonic::Response::new(ListImagesResponse {
            images: images.into_iter().map(to_wire).collect(),
        }))
    }

    async fn create(
        &self,
        request: tonic::Request<CreateImageRequest>,
    ) -> Reply<CreateImageResponse> {
        let ns = namespace::require(request.metadata())?;
        let lease = namespace::lease_from_metadata(request.metadata());
        let req = request.into_inner();
        let image = from_wire(req.image)?;
        let created = self
            .metadata
            .create_image(&ns, image, epoch(req.source_date_epoch)?, lease.as_deref())
            .await?;
        Ok(tonic::Response::new(CreateImageResponse {
            image: Some(to_wire(created)),
        }))
    }

    async fn update(
        &self,
        request: tonic::Request<UpdateImageRequest>,
    ) -> Reply<UpdateImageResponse> {
        let ns = namespace::require(request.metadata())?;
        let req = request.into_inner();
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let wire = req
            .image
            .ok_or_else(|| Error::invalid_argument("image is missing from the request"))?;
        // Only a mask that touches the target needs a valid one.
        let needs_target = paths.is_empty() || paths.iter().any(|p| p == "target");
        let image = if needs_target || wire.target.is_some() {
            from_wire(Some(wire))?
        } else {
            Image {
                name: wire.name,
                labels: wire.labels.into_iter().collect(),
                target: Descriptor {
                    media_type: String::new(),
                    digest: Digest::sha256_of(b""),
                    size: 0,
                    annotations: Default::default(),
                },
                created_at: SystemTime::UNIX_EPOCH,
                updated_at: SystemTime::UNIX_EPOCH,
            }
        };
        let updated = self
            .metadata
            .update_image(&ns, image, &paths, epoch(req.source_date_epoch)?)
            .await?;
        Ok(tonic::Response::new(UpdateImageResponse {
            image: Some(to_wire(updated)),
        }))
    }

    async fn delete(&self, request: tonic::Request<DeleteImageRequest>) -> Reply<()> {
        let ns = namespace::require(request.metadata())?;
        let req = request.into_inner();
        let target = req
            .target
            .filter(|t| !t.digest.is_empty())
            .map(|t| {
                Digest::parse(&t.digest)
                    .map_err(|e| Error::invalid_argument(format!("target digest: {}", e.message())))
            })
            .transpose()?;
        self.metadata
            .delete_image(&ns, &req.name, target.as_ref(), req.sync)
            .await?;
        Ok(tonic::Response::new(()))
    }
}

impl GrpcService for ImagesService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(ImagesServer::new(self.clone()), limits));
    }
}

/// `io.containerd.grpc.v1.images`.
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "images", |ctx| async move {
        let metadata = ctx.single::<MetadataKind>()?;
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(
            ImagesService::new(metadata),
        )))
    })
    .requires(&[PluginType::METADATA])
}
