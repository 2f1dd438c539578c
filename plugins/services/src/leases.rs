//! `containerd.services.leases.v1.Leases` over the core's metadata layer (containerd PR 3304).
//!
//! Every call is namespaced (FailedPrecondition without a namespace). Create picks a random id
//! when none is given; Delete with `sync` returns after the garbage collection that frees what
//! only the lease held; resource types are `content` (a digest), `ingests`, `images` and
//! `snapshots/<snapshotter>`, others are Unimplemented; deleting a resource the lease does not
//! hold is not an error.

use std::sync::Arc;

use berth_core::error::Error;
use berth_core::filters::Filter;
use berth_core::metadata::leases::{Lease, Resource};
use berth_core::metadata::{Metadata, MetadataKind};
use berth_core::namespace;
use berth_core::registry::{Instance, PluginType, Registration};
use berth_core::serve::{GrpcService, GrpcServiceKind, MessageLimits};
use berth_proto::containerd::services::leases::v1::leases_server::{Leases, LeasesServer};
use berth_proto::containerd::services::leases::v1::{
    AddResourceRequest, CreateRequest, CreateResponse, DeleteRequest, DeleteResourceRequest,
    Lease as WireLease, ListRequest, ListResourcesRequest, ListResourcesResponse, ListResponse,
    Resource as WireResource,
};

/// The leases service.
#[derive(Clone)]
pub struct LeasesService {
    metadata: Arc<Metadata>,
}

impl LeasesService {
    /// A service over the metadata layer.
    pub fn new(metadata: Arc<Metadata>) -> Self {
        LeasesService { metadata }
    }
}

fn wire(lease: Lease) -> WireLease {
    WireLease {
        id: lease.id,
        created_at: Some(lease.created_at.into()),
        labels: lease.labels.into_iter().collect(),
    }
}

fn resource(r: Option<WireResource>) -> Result<Resource, Error> {
    let r = r.ok_or_else(|| Error::invalid_argument("resource is missing from the request"))?;
    Resource::parse(&r.r#type, &r.id)
}

type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl Leases for LeasesService {
    async fn create(&self, request: tonic::Request<CreateRequest>) -> Reply<CreateResponse> {
        let ns = namespace::require(request.metadata())?;
        let req = request.into_inner();
        let lease = self
            .metadata
            .create_lease(&ns, &req.id, req.labels.into_iter().collect())
            .await?;
        Ok(tonic::Response::new(CreateResponse {
            lease: Some(wire(lease)),
        }))
    }

    async fn delete(&self, request: tonic::Request<DeleteRequest>) -> Reply<()> {
        let ns = namespace::require(request.metadata())?;
        let req = request.get_ref();
        self.metadata.delete_lease(&ns, &req.id, req.sync).await?;
        Ok(tonic::Response::new(()))
    }

    async fn list(&self, request: tonic::Request<ListRequest>) -> Reply<ListResponse> {
        let ns = namespace::require(request.metadata())?;
        let filter = Filter::parse_all(&request.get_ref().filters)?;
        let leases = self.metadata.list_leases(&ns, &filter)?;
        Ok(tonic::Response::new(ListResponse {
            leases: leases.into_iter().map(wire).collect(),
        }))
    }

    async fn add_resource(&self, request: tonic::Request<AddResourceRequest>) -> Reply<()> {
        let ns = namespace::require(request.metadata())?;
        let req = request.into_inner();
        let resource = resource(req.resource)?;
        self.metadata
            .add_lease_resource(&ns, &req.id, resource)
            .await?;
        Ok(tonic::Response::new(()))
    }

    async fn delete_resource(&self, request: tonic::Request<DeleteResourceRequest>) -> Reply<()> {
        let ns = namespace::require(request.metadata())?;
        let req = request.into_inner();
        let resource = resource(req.resource)?;
        self.metadata
            .delete_lease_resource(&ns, &req.id, &resource)
            .await?;
        Ok(tonic::Response::new(()))
    }

    async fn list_resources(
        &self,
        request: tonic::Request<ListResourcesRequest>,
    ) -> Reply<ListResourcesResponse> {
        let ns = namespace::require(request.metadata())?;
        let resources = self
            .metadata
            .list_lease_resources(&ns, &request.get_ref().id)?
            .into_iter()
            .map(|r| WireResource {
                id: r.id,
                r#type: r.kind,
            })
            .collect();
        Ok(tonic::Response::new(ListResourcesResponse { resources }))
    }
}

impl GrpcService for LeasesService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(LeasesServer::new(self.clone()), limits));
    }
}

/// `io.containerd.grpc.v1.leases`.
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "leases", |ctx| async move {
        let metadata = ctx.single::<MetadataKind>()?;
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(
            LeasesService::new(metadata),
        )))
    })
    .requires(&[PluginType::METADATA])
}
