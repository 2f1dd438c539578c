//! `containerd.services.events.v1.Events` over the core's event [`Exchange`].
//!
//! Behaviour follows containerd (`plugins/services/events`, `core/events/exchange`):
//!
//! - **Publish** needs the caller's namespace (`containerd-namespace` header; FailedPrecondition
//!   without one) and a valid topic (InvalidArgument); the server stamps the time. An absent
//!   event payload is accepted, as containerd does, and reaches subscribers as no payload.
//! - **Forward** re-publishes an envelope as it is, for a publisher acting on behalf of another
//!   namespace (a shim, another daemon): its own namespace, topic and timestamp are validated and
//!   kept; the caller's header plays no part.
//! - **Subscribe** streams every event published after the call, from all namespaces, that
//!   matches any of the filters (see [`EnvelopeFields`] for the fields). A filter that does not
//!   parse is InvalidArgument before the stream starts.
//!
//! A subscriber that reads slowly never slows publishers: the exchange keeps a bounded queue per
//! subscriber and drops the oldest events for it. containerd's queue is unbounded instead, so
//! there a stuck client costs memory rather than events. The wire has no way to say "you missed
//! some", so the loss is logged at warn with its size and the stream goes on.
//!
//! The stream is driven by the response body itself, without a task of its own: when the client
//! cancels the call or goes away, the transport drops the body and with it the subscription.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use berth_core::error::Error;
use berth_core::events::{Envelope, EventsKind, Exchange, Received, Subscription};
use berth_core::filters::{Fields, Filter};
use berth_core::namespace::{self, Namespace};
use berth_core::registry::{Instance, PluginType, Registration};
use berth_core::serve::{GrpcService, GrpcServiceKind, MessageLimits};
use berth_proto::containerd::events as ev;
use berth_proto::containerd::services::events::v1::events_server::{Events, EventsServer};
use berth_proto::containerd::services::events::v1::{
    ForwardRequest, PublishRequest, SubscribeRequest,
};
use berth_proto::containerd::services::images::v1 as images;
use berth_proto::containerd::types::Envelope as WireEnvelope;
use berth_proto::type_url;
use prost::Message;
// The `Stream` trait tonic's generated servers are written against.
use tonic::codegen::tokio_stream::Stream;

/// The events service.
#[derive(Clone)]
pub struct EventsService {
    exchange: Arc<Exchange>,
}

impl EventsService {
    /// A service that publishes to and subscribes on `exchange`.
    pub fn new(exchange: Arc<Exchange>) -> Self {
        EventsService { exchange }
    }
}

#[tonic::async_trait]
impl Events for EventsService {
    async fn publish(
        &self,
        request: tonic::Request<PublishRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        // Namespace before topic, as containerd checks them.
        let ns = namespace::require(request.metadata())?;
        let req = request.into_inner();
        let event = req.event.unwrap_or_default();
        self.exchange.publish(Envelope {
            timestamp: SystemTime::now(),
            namespace: ns.to_string(),
            topic: req.topic,
            type_url: event.type_url,
            value: event.value,
        })?;
        Ok(tonic::Response::new(()))
    }

    async fn forward(
        &self,
        request: tonic::Request<ForwardRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        let envelope = request
            .into_inner()
            .envelope
            .ok_or_else(|| Error::invalid_argument("forward request has no envelope"))?;
        self.exchange.publish(from_wire(envelope)?)?;
        Ok(tonic::Response::new(()))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: tonic::Request<SubscribeRequest>,
    ) -> Result<tonic::Response<EventStream>, tonic::Status> {
        let filters = request.into_inner().filters;
        let filter = Filter::parse_all(&filters)?;
        // Subscribe before answering, so that everything published once the client holds the
        // stream is seen.
        let subscriber = Subscriber {
            subscription: self.exchange.subscribe(),
            filter,
            filters,
        };
        Ok(tonic::Response::new(EventStream::new(subscriber)))
    }
}

/// Checks a forwarded envelope the way containerd's exchange does, keeping its timestamp.
fn from_wire(envelope: WireEnvelope) -> Result<Envelope, Error> {
    Namespace::parse(&envelope.namespace).map_err(|e| {
        Error::invalid_argument(format!(
            "event envelope has invalid namespace: {}",
            e.message()
        ))
    })?;
    let timestamp = envelope
        .timestamp
        .ok_or_else(|| Error::invalid_argument("timestamp must be set on forwarded event"))?;
    let timestamp = SystemTime::try_from(timestamp).map_err(|e| {
        Error::invalid_argument(format!("forwarded event has an invalid timestamp: {e}"))
    })?;
    let event = envelope.event.unwrap_or_default();
    // The topic is checked by the exchange on publish.
    Ok(Envelope {
        timestamp,
        namespace: envelope.namespace,
        topic: envelope.topic,
        type_url: event.type_url,
        value: event.value,
    })
}

fn to_wire(envelope: &Envelope) -> WireEnvelope {
    // An event published without payload goes out without one, as containerd sends it.
    let event =
        (!envelope.type_url.is_empty() || !envelope.value.is_empty()).then(|| prost_types::Any {
            type_url: envelope.type_url.clone(),
            value: envelope.value.clone(),
        });
    WireEnvelope {
        timestamp: Some(envelope.timestamp.into()),
        namespace: envelope.namespace.clone(),
        topic: envelope.topic.clone(),
        event,
    }
}

/// One client's subscription and what it asked for.
struct Subscriber {
    subscription: Subscription,
    filter: Filter,
    /// As the client wrote them, to name the subscriber in logs.
    filters: Vec<String>,
}

impl Subscriber {
    /// The next matching event, or `None` once the exchange is gone. Takes and gives back
    /// `self` so that the pending future owns everything and can be boxed as `'static`.
    async fn next_matching(mut self) -> (Option<WireEnvelope>, Self) {
        loop {
            match self.subscription.next().await {
                Received::Event(envelope) => {
                    if self.filter.matches(&EnvelopeFields::new(&envelope)) {
                        return (Some(to_wire(&envelope)), self);
                    }
                }
                Received::Lost(lost) => {
                    // Counted before filtering: the queue holds every event.
                    tracing::warn!(
                        lost,
                        filters = ?self.filters,
                        "events subscriber fell behind; its oldest events were dropped"
                    );
                }
                Received::Closed => return (None, self),
            }
        }
    }
}

type Pending = Pin<Box<dyn Future<Output = (Option<WireEnvelope>, Subscriber)> + Send>>;

/// The response stream of Subscribe: envelopes that match the subscriber's filters, until the
/// exchange closes. Dropping it ends the subscription.
pub struct EventStream {
    pending: Option<Pending>,
}

impl EventStream {
    fn new(subscriber: Subscriber) -> Self {
        EventStream {
            pending: Some(Box::pin(subscriber.next_matching())),
        }
    }
}

impl Stream for EventStream {
    type Item = Result<WireEnvelope, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(pending) = self.pending.as_mut() else {
            return Poll::Ready(None);
        };
        let (next, subscriber) = ready!(pending.as_mut().poll(cx));
        self.pending = match next {
            Some(_) => Some(Box::pin(subscriber.next_matching())),
            None => None,
        };
        Poll::Ready(next.map(Ok))
    }
}

/// What an event subscription's filters can see of an envelope, as containerd's
/// `Envelope.Field`:
///
/// - `namespace` and `topic`;
/// - `event.<path>`: a field of the payload, for the event types containerd defines
///   (`containerd.events.*` and the image events). As in containerd's generated field
///   accessors, string fields are present when not empty, booleans are always present as
///   `true`/`false`, `labels.<key>` reads a label, and nested messages are followed
///   (`event.runtime.name`, `event.io.terminal`). Numbers, timestamps, repeated fields and
///   nested `Any` payloads (`event.runtime.options.*`) never match, nor does anything in a
///   payload of another type.
///
/// The payload is decoded only when a filter asks for an `event.*` field, and at most once per
/// envelope.
pub struct EnvelopeFields<'a> {
    envelope: &'a Envelope,
    decoded: OnceCell<Option<Box<dyn EventFields>>>,
}

impl<'a> EnvelopeFields<'a> {
    /// Exposes `envelope` to filters.
    pub fn new(envelope: &'a Envelope) -> Self {
        EnvelopeFields {
            envelope,
            decoded: OnceCell::new(),
        }
    }
}

impl Fields for EnvelopeFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        let (first, rest) = path.split_first()?;
        match (first.as_str(), rest) {
            ("namespace", []) => text(&self.envelope.namespace, rest),
            ("topic", []) => text(&self.envelope.topic, rest),
            ("event", _) => self
                .decoded
                .get_or_init(|| decode_event(&self.envelope.type_url, &self.envelope.value))
                .as_deref()?
                .field(rest),
            _ => None,
        }
    }
}

/// A decoded event payload's filterable fields.
trait EventFields {
    fn field(&self, path: &[String]) -> Option<String>;
}

type Decoder = fn(&[u8]) -> Option<Box<dyn EventFields>>;

fn decoder<M: Message + Default + EventFields + 'static>(
    value: &[u8],
) -> Option<Box<dyn EventFields>> {
    // A payload that does not decode as its type says has no fields to match.
    M::decode(value)
        .ok()
        .map(|m| Box::new(m) as Box<dyn EventFields>)
}

/// The event types whose fields filters can read, by type URL.
static DECODERS: LazyLock<HashMap<String, Decoder>> = LazyLock::new(|| {
    fn entry<M: prost::Name + Message + Default + EventFields + 'static>() -> (String, Decoder) {
        (type_url::of::<M>(), decoder::<M>)
    }
    HashMap::from([
        entry::<ev::ContainerCreate>(),
        entry::<ev::ContainerUpdate>(),
        entry::<ev::ContainerDelete>(),
        entry::<ev::ContentCreate>(),
        entry::<ev::ContentDelete>(),
        entry::<images::ImageCreate>(),
        entry::<images::ImageUpdate>(),
        entry::<images::ImageDelete>(),
        entry::<ev::NamespaceCreate>(),
        entry::<ev::NamespaceUpdate>(),
        entry::<ev::NamespaceDelete>(),
        entry::<ev::SandboxCreate>(),
        entry::<ev::SandboxStart>(),
        entry::<ev::SandboxExit>(),
        entry::<ev::SnapshotPrepare>(),
        entry::<ev::SnapshotCommit>(),
        entry::<ev::SnapshotRemove>(),
        entry::<ev::TaskCreate>(),
        entry::<ev::TaskStart>(),
        entry::<ev::TaskDelete>(),
        entry::<ev::TaskExit>(),
        entry::<ev::TaskOom>(),
        entry::<ev::TaskExecAdded>(),
        entry::<ev::TaskExecStarted>(),
        entry::<ev::TaskPaused>(),
        entry::<ev::TaskResumed>(),
        entry::<ev::TaskCheckpointed>(),
    ])
});

fn decode_event(url: &str, value: &[u8]) -> Option<Box<dyn EventFields>> {
    // Accept a domain-prefixed URL too, as protobuf runtimes do.
    DECODERS.get(&type_url::type_url(url))?(value)
}

// Field readers, one per kind of proto field; `rest` is the path below the field.

fn text(value: &str, rest: &[String]) -> Option<String> {
    (rest.is_empty() && !value.is_empty()).then(|| value.to_owned())
}

fn flag(value: &bool, rest: &[String]) -> Option<String> {
    rest.is_empty().then(|| value.to_string())
}

fn labels(map: &HashMap<String, String>, rest: &[String]) -> Option<String> {
    // A key may contain dots (`labels.containerd.io/gc.root` parses as several fields).
    map.get(&rest.join(".")).cloned()
}

fn nested<T: EventFields>(message: &Option<T>, rest: &[String]) -> Option<String> {
    message.as_ref()?.field(rest)
}

/// Implements [`EventFields`] from a list of `"proto name" => reader field`, mirroring what
/// containerd's `protoc-gen-go-fieldpath` generates for each message.
macro_rules! event_fields {
    ($($ty:ty { $($name:literal => $read:ident $field:ident),+ $(,)? })+) => {$(
        impl EventFields for $ty {
            fn field(&self, path: &[String]) -> Option<String> {
                let (first, rest) = path.split_first()?;
                match first.as_str() {
                    $($name => $read(&self.$field, rest),)+
                    _ => None,
                }
            }
        }
    )+};
}

event_fields! {
    ev::ContainerCreate { "id" => text id, "image" => text image, "runtime" => nested runtime }
    ev::container_create::Runtime { "name" => text name }
    ev::ContainerUpdate {
        "id" => text id,
        "image" => text image,
        "labels" => labels labels,
        "snapshot_key" => text snapshot_key,
    }
    ev::ContainerDelete { "id" => text id }
    ev::ContentCreate { "digest" => text digest, "mediaType" => text media_type }
    ev::ContentDelete { "digest" => text digest }
    images::ImageCreate { "name" => text name, "labels" => labels labels }
    images::ImageUpdate { "name" => text name, "labels" => labels labels }
    images::ImageDelete { "name" => text name }
    ev::NamespaceCreate { "name" => text name, "labels" => labels labels }
    ev::NamespaceUpdate { "name" => text name, "labels" => labels labels }
    ev::NamespaceDelete { "name" => text name }
    ev::SandboxCreate { "sandbox_id" => text sandbox_id }
    ev::SandboxStart { "sandbox_id" => text sandbox_id }
    ev::SandboxExit { "sandbox_id" => text sandbox_id }
    ev::SnapshotPrepare {
        "key" => text key,
        "parent" => text parent,
        "snapshotter" => text snapshotter,
    }
    ev::SnapshotCommit { "key" => text key, "name" => text name, "snapshotter" => text snapshotter }
    ev::SnapshotRemove { "key" => text key, "snapshotter" => text snapshotter }
    ev::TaskCreate {
        "container_id" => text container_id,
        "bundle" => text bundle,
        "io" => nested io,
        "checkpoint" => text checkpoint,
    }
    ev::TaskIo {
        "stdin" => text stdin,
        "stdout" => text stdout,
        "stderr" => text stderr,
        "terminal" => flag terminal,
    }
    ev::TaskStart { "container_id" => text container_id }
    ev::TaskDelete { "container_id" => text container_id, "id" => text id }
    ev::TaskExit { "container_id" => text container_id, "id" => text id }
    ev::TaskOom { "container_id" => text container_id }
    ev::TaskExecAdded { "container_id" => text container_id, "exec_id" => text exec_id }
    ev::TaskExecStarted { "container_id" => text container_id, "exec_id" => text exec_id }
    ev::TaskPaused { "container_id" => text container_id }
    ev::TaskResumed { "container_id" => text container_id }
    ev::TaskCheckpointed { "container_id" => text container_id, "checkpoint" => text checkpoint }
}

impl GrpcService for EventsService {
    fn add_to(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits) {
        routes.add_service(crate::with_limits!(EventsServer::new(self.clone()), limits));
    }
}

/// `io.containerd.grpc.v1.events`.
pub fn registration() -> Registration {
    Registration::new(PluginType::GRPC, "events", |ctx| async move {
        let exchange = ctx.single::<EventsKind>()?;
        Ok(Instance::new::<GrpcServiceKind>(Arc::new(
            EventsService::new(exchange),
        )))
    })
    .requires(&[PluginType::EVENT])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope<M: prost::Name>(namespace: &str, topic: &str, event: &M) -> Envelope {
        let any = type_url::to_any(event);
        Envelope {
            timestamp: SystemTime::now(),
            namespace: namespace.into(),
            topic: topic.into(),
            type_url: any.type_url,
            value: any.value,
        }
    }

    fn matches(filter: &str, envelope: &Envelope) -> bool {
        Filter::parse_all(&[filter])
            .expect("parses")
            .matches(&EnvelopeFields::new(envelope))
    }

    #[test]
    fn envelope_fields() {
        let e = envelope(
            "team-a",
            "/namespaces/create",
            &ev::NamespaceCreate {
                name: "team-a".into(),
                labels: HashMap::from([("containerd.io/gc.root".into(), "x".into())]),
            },
        );
        assert!(matches("namespace==team-a", &e));
        assert!(matches("topic==\"/namespaces/create\"", &e));
        assert!(matches("topic~=^/namespaces/", &e));
        assert!(!matches("namespace==team-b", &e));
        assert!(!matches("timestamp", &e), "containerd exposes no timestamp");
        assert!(!matches("topic.x", &e));
        assert!(matches("event.name==team-a", &e));
        assert!(matches("event.labels.\"containerd.io/gc.root\"==x", &e));
        assert!(!matches("event.missing", &e));
        assert!(!matches("event.name.deeper", &e));
    }

    #[test]
    fn nested_bool_and_unfilterable_event_fields() {
        let e = envelope(
            "default",
            "/tasks/create",
            &ev::TaskCreate {
                container_id: "c1".into(),
                io: Some(ev::TaskIo {
                    stdout: "/run/fifo".into(),
                    terminal: false,
                    ..Default::default()
                }),
                pid: 42,
                ..Default::default()
            },
        );
        assert!(matches("event.container_id==c1", &e));
        assert!(matches("event.io.stdout==\"/run/fifo\"", &e));
        assert!(
            matches("event.io.terminal==false", &e),
            "booleans are always present"
        );
        assert!(!matches("event.io.stdin", &e), "an empty string is absent");
        assert!(
            !matches("event.pid", &e),
            "numbers are not exposed, as in containerd"
        );
        assert!(!matches("event.bundle", &e));

        let content = envelope(
            "default",
            "/content/create",
            &ev::ContentCreate {
                digest: "sha256:abc".into(),
                size: 3,
                media_type: "application/octet-stream".into(),
            },
        );
        assert!(matches("event.digest==sha256:abc", &content));
        assert!(
            matches("event.mediaType", &content),
            "the proto name, as containerd"
        );
    }

    #[test]
    fn unknown_or_undecodable_payloads_have_no_event_fields() {
        let mut e = envelope(
            "default",
            "/tasks/exit",
            &ev::TaskExit {
                container_id: "c1".into(),
                ..Default::default()
            },
        );
        assert!(matches("event.container_id==c1", &e));
        e.type_url = format!("type.googleapis.com/{}", e.type_url);
        assert!(
            matches("event.container_id==c1", &e),
            "domain prefix accepted"
        );
        e.type_url = "example.com/Unknown".into();
        assert!(!matches("event.container_id", &e));
        e.type_url = type_url::of::<ev::TaskExit>();
        e.value = vec![0xff, 0xff, 0xff];
        assert!(!matches("event.container_id", &e));
        assert!(
            matches("topic==\"/tasks/exit\"", &e),
            "other fields still work"
        );
    }

    #[test]
    fn forwarded_envelopes_are_validated() {
        let good = WireEnvelope {
            timestamp: Some(SystemTime::UNIX_EPOCH.into()),
            namespace: "default".into(),
            topic: "/tasks/exit".into(),
            event: None,
        };
        let kept = from_wire(good.clone()).expect("valid");
        assert_eq!(kept.timestamp, SystemTime::UNIX_EPOCH);
        for bad in [
            WireEnvelope {
                namespace: String::new(),
                ..good.clone()
            },
            WireEnvelope {
                namespace: "bad..ns".into(),
                ..good.clone()
            },
            WireEnvelope {
                timestamp: None,
                ..good.clone()
            },
        ] {
            let err = from_wire(bad.clone()).expect_err("invalid");
            assert_eq!(
                berth_core::error::Classify::kind(&err),
                berth_core::ErrorKind::InvalidArgument,
                "{bad:?}"
            );
        }
    }
}
