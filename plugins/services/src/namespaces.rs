//! `containerd.services.namespaces.v1.Namespaces` over the core's metadata store.
//!
//! Behaviour follows containerd: Get of a namespace that does not exist answers with empty
//! labels; Update with a mask sets (or, with an empty value, removes) each `labels.<key>`;
//! Update without a mask replaces all labels; Delete of a namespace that still holds objects
//! is FailedPrecondition. Create, Update and Delete publish `/namespaces/*` events, and run
//! whole with their event ([`run_whole`]): a call cancelled while its change is flushed must
//! not apply it and skip the event (containerd publishes once its transaction commits).

use std::sync::Arc;
use std::time::SystemTime;

use berth_core::error::{Error, Result};
use berth_core::events::{Envelope, EventsKind, Exchange};
use berth_core::filters::Filter;
use berth_core::labels::Labels;
use berth_core::metadata::{MetaStore, MetadataKind, run_whole};
use berth_core::namespace::{self, Namespace};
use berth_core::registry::{Instance, PluginType, Registration};
use berth_core::serve::{GrpcService, GrpcServiceKind, MessageLimits};
use berth_proto::containerd::events::{NamespaceCreate, NamespaceDelete, NamespaceUpdate};
use berth_proto::containerd::services::namespaces::v1::namespaces_server::{
    Namespaces, NamespacesServer,
};
use berth_proto::containerd::services::namespaces::v1::{
    CreateNamespaceRequest, CreateNamespaceResponse, DeleteNamespaceRequest, GetNamespaceRequest,
    GetNamespaceResponse, ListNamespacesRequest, ListNamespacesResponse,
    Namespace as WireNamespace, UpdateNamespaceRequest, UpdateNamespaceResponse,
};
use berth_proto::type_url;

/// The namespaces service.
#[derive(Clone)]
pub struct NamespacesService {
    store: Arc<MetaStore>,
    events: Arc<Exchange>,
}

impl NamespacesService {
    /// A service over `store`, publishing to `events`.
    pub fn new(store: Arc<MetaStore>, events: Arc<Exchange>) -> Self {
        NamespacesService { store, events }
    }

    fn publish<M: prost::Name>(
        &self,
        caller: Option<&Namespace>,
        subject: &str,
        topic: &str,
        event: &M,
    ) {
        let any = type_url::to_any(event);
        let envelope = Envelope {
            timestamp: SystemTime::now(),
            namespace: caller.map_or_else(|| subject.to_owned(), |n| n.to_string()),
            topic: topic.to_owned(),
            type_url: any.type_url,
            value: any.value,
        };
        if let Err(e) = self.events.publish(envelope) {
            tracing::warn!(%topic, error = %e, "cannot publish event");
        }
    }
}

fn wire(name: &str, labels: Labels) -> WireNamespace {
    WireNamespace {
        name: name.to_owned(),
        labels: labels.into_iter().collect(),
    }
}

fn caller_namespace<T>(request: &tonic::Request<T>) -> Option<Namespace> {
    namespace::from_metadata(request.metadata()).ok().flatten()
}

#[tonic::async_trait]
impl Namespaces for NamespacesService {
    async fn get(
        &self,
        request: tonic::Request<GetNamespaceRequest>,
    ) -> Result<tonic::Response<GetNamespaceResponse>, tonic::Status> {
        let name = &request.get_ref().name;
        // A name that is not valid cannot exist: answer like any absent namespace.
        let labels = match Namespace::parse(name) {
            Ok(ns) => self.store.namespace_labels(&ns)?,
            Err(_) => Labels::new(),
        };
        Ok(tonic::Response::new(GetNamespaceResponse {
            namespace: Some(wire(name, labels)),
        }))
    }

    async fn list(
        &self,
        request: tonic::Request<ListNamespacesRequest>,
    ) -> Result<tonic::Response<ListNamespacesResponse>, tonic::Status> {
        let filter = Filter::parse_all(&[&request.get_ref().filter])?;
        let namespaces = self
            .store
            .list_namespaces()?
            .into_iter()
            .map(|(ns, labels)| wire(ns.as_str(), labels))
            .filter(|n| {
                filter.matches(&|path: &[String]| match path.first().map(String::as_str) {
                    Some("name") => Some(n.name.clone()),
                    Some("labels") => n.labels.get(&path[1..].join(".")).cloned(),
                    _ => None,
                })
            })
            .collect();
        Ok(tonic::Response::new(ListNamespacesResponse { namespaces }))
    }

    async fn create(
        &self,
        request: tonic::Request<CreateNamespaceRequest>,
    ) -> Result<tonic::Response<CreateNamespaceResponse>, tonic::Status> {
        let caller = caller_namespace(&request);
        let requested = request
            .into_inner()
            .namespace
            .ok_or_else(|| Error::invalid_argument("namespace is missing from the request"))?;
        let ns = Namespace::parse(&requested.name)?;
        let labels: Labels = requested.labels.into_iter().collect();
        let (this, created, event_labels) = (self.clone(), ns.clone(), labels.clone());
        run_whole(async move {
            this.store
                .create_namespace(&created, event_labels.clone())
                .await?;
            this.publish(
                caller.as_ref(),
                created.as_str(),
                "/namespaces/create",
                &NamespaceCreate {
                    name: created.to_string(),
                    labels: event_labels.into_iter().collect(),
                },
            );
            Ok(())
        })
        .await?;
        Ok(tonic::Response::new(CreateNamespaceResponse {
            namespace: Some(wire(ns.as_str(), labels)),
        }))
    }

    async fn update(
        &self,
        request: tonic::Request<UpdateNamespaceRequest>,
    ) -> Result<tonic::Response<UpdateNamespaceResponse>, tonic::Status> {
        let caller = caller_namespace(&request);
        let req = request.into_inner();
        let requested = req
            .namespace
            .ok_or_else(|| Error::invalid_argument("namespace is missing from the request"))?;
        let ns = Namespace::parse(&requested.name)?;
        // The event carries the labels the request set, as containerd's does.
        let requested_labels = requested.labels.clone();
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let (changes, replace) = if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            (requested.labels.into_iter().collect::<Vec<_>>(), true)
        } else {
            let mut changes = Vec::new();
            for path in &paths {
                let key = path.strip_prefix("labels.").ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "cannot update {path:?} field of namespace {:?}: only labels.<key> can change",
                        ns.as_str()
                    ))
                })?;
                let value = requested.labels.get(key).cloned().unwrap_or_default();
                changes.push((key.to_owned(), value));
            }
            (changes, false)
        };
        let (this, updated) = (self.clone(), ns.clone());
        let labels = run_whole(async move {
            let labels = this
                .store
                .update_namespace_labels(&updated, &changes, replace)
                .await?;
            this.publish(
                caller.as_ref(),
                updated.as_str(),
                "/namespaces/update",
                &NamespaceUpdate {
                    name: updated.to_string(),
                    labels: requested_labels,
                },
            );
            Ok(labels)
        })
        .await?;
        Ok(tonic::Response::new(UpdateNamespaceResponse {
            namespace: Some(wire(ns.as_str(), labels)),
        }))
    }

    async fn delete(
        &self,
        request: tonic::Request<DeleteNamespaceRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        let name = &request.get_ref().name;
        // A name that is not valid cannot exist: NotFound, as containerd answers.
        let ns =
            Namespace::parse(name).map_err(|_| Error::not_found(format!("namespace {name:?}")))?;
        let this = self.clone();
        run_whole(async move {
            this.store.delete_namespace(&ns).await?;
            // Published in the deleted namespace itself, as containerd does.
            this.publish(
                Some(&ns),
                ns.as_str(),
                "/namespaces/delete",
                &NamespaceDelete {
                    name: ns.to_string(),
                },
            );
            Ok(())
        })
        .await?;
        Ok(tonic::Response::new(()))
    }
}

impl GrpcService for NamespacesService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(
            NamespacesServer::new(self.clone()),
            limits
        ));
    }
}

/// `io.containerd.grpc.v1.namespaces`.
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "namespaces", |ctx| async move {
        let metadata = ctx.single::<MetadataKind>()?;
        let events = ctx.single::<EventsKind>()?;
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(
            NamespacesService::new(Arc::clone(metadata.store()), events),
        )))
    })
    .requires(&[PluginType::METADATA, PluginType::EVENT])
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::events::Received;
    use berth_core::metadata::MetadataConfig;
    use prost::Message;

    fn service(dir: &std::path::Path) -> NamespacesService {
        let store = MetaStore::open(&dir.join("meta"), &MetadataConfig::default()).expect("open");
        NamespacesService::new(Arc::new(store), Arc::new(Exchange::default()))
    }

    fn create_req(name: &str) -> tonic::Request<CreateNamespaceRequest> {
        tonic::Request::new(CreateNamespaceRequest {
            namespace: Some(wire(name, Labels::from([("a".into(), "1".into())]))),
        })
    }

    #[tokio::test]
    async fn create_publishes_an_event_and_codes_match_containerd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = service(dir.path());
        let mut events = svc.events.subscribe();
        svc.create(create_req("team-a")).await.expect("create");
        let Received::Event(e) = events.next().await else {
            panic!("no event")
        };
        assert_eq!(e.topic, "/namespaces/create");
        assert_eq!(e.type_url, "containerd.events.NamespaceCreate");
        let decoded = NamespaceCreate::decode(e.value.as_slice()).expect("decode");
        assert_eq!(decoded.name, "team-a");

        let again = svc.create(create_req("team-a")).await.expect_err("exists");
        assert_eq!(again.code(), tonic::Code::AlreadyExists);
        let bad = svc.create(create_req("-bad")).await.expect_err("invalid");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        let missing = svc
            .delete(tonic::Request::new(DeleteNamespaceRequest {
                name: "nope".into(),
            }))
            .await
            .expect_err("missing");
        assert_eq!(missing.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn update_with_and_without_mask() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = service(dir.path());
        svc.create(create_req("n")).await.expect("create");
        let masked = svc
            .update(tonic::Request::new(UpdateNamespaceRequest {
                namespace: Some(wire("n", Labels::from([("b".into(), "2".into())]))),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["labels.b".into(), "labels.a".into()],
                }),
            }))
            .await
            .expect("update")
            .into_inner();
        let labels = masked.namespace.expect("ns").labels;
        assert_eq!(
            labels.len(),
            1,
            "a removed (no value given), b set: {labels:?}"
        );
        assert_eq!(labels["b"], "2");
        let replaced = svc
            .update(tonic::Request::new(UpdateNamespaceRequest {
                namespace: Some(wire("n", Labels::from([("c".into(), "3".into())]))),
                update_mask: None,
            }))
            .await
            .expect("replace")
            .into_inner();
        let labels = replaced.namespace.expect("ns").labels;
        assert_eq!(labels.keys().collect::<Vec<_>>(), ["c"]);
        let bad = svc
            .update(tonic::Request::new(UpdateNamespaceRequest {
                namespace: Some(wire("n", Labels::new())),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
            }))
            .await
            .expect_err("name cannot change");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn get_of_a_missing_namespace_has_empty_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = service(dir.path());
        let got = svc
            .get(tonic::Request::new(GetNamespaceRequest {
                name: "ghost".into(),
            }))
            .await
            .expect("get")
            .into_inner();
        let ns = got.namespace.expect("ns");
        assert_eq!(ns.name, "ghost");
        assert!(ns.labels.is_empty());
    }
}
