//! The events service served over a real unix socket, driven by a tonic client.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use berth_core::events::Exchange;
use berth_core::namespace::GRPC_HEADER;
use berth_core::serve::{GrpcService, MessageLimits, ServeOptions, Shutdown, serve};
use berth_proto::containerd::events::{NamespaceCreate, NamespaceDelete, TaskExit};
use berth_proto::containerd::services::events::v1::events_client::EventsClient;
use berth_proto::containerd::services::events::v1::{
    ForwardRequest, PublishRequest, SubscribeRequest,
};
use berth_proto::containerd::types::Envelope;
use berth_proto::type_url;
use berth_services::events::EventsService;
use prost::Message;
use tonic::transport::{Channel, Endpoint};

const LIMITS: MessageLimits = MessageLimits {
    max_recv: 16 << 20,
    max_send: 16 << 20,
};

/// A server on a temporary socket; shuts down when dropped.
struct Server {
    exchange: Arc<Exchange>,
    dir: tempfile::TempDir,
    shutdown: Shutdown,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let exchange = Arc::new(Exchange::default());
        let mut routes = tonic::service::RoutesBuilder::default();
        EventsService::new(exchange.clone()).add_to(&mut routes, LIMITS);
        let listener = tokio::net::UnixListener::bind(dir.path().join("berth.sock")).expect("bind");
        let shutdown = Shutdown::new();
        tokio::spawn(serve(
            routes.routes(),
            listener,
            shutdown.clone(),
            ServeOptions {
                drain: Duration::from_secs(1),
            },
        ));
        Server {
            exchange,
            dir,
            shutdown,
        }
    }

    async fn client(&self) -> EventsClient<Channel> {
        EventsClient::new(connect(&self.dir.path().join("berth.sock")).await)
    }
}

async fn connect(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connect")
}

fn in_namespace<T>(message: T, ns: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(GRPC_HEADER, ns.parse().expect("ascii"));
    request
}

fn publish_request<M: prost::Name>(topic: &str, event: &M) -> PublishRequest {
    PublishRequest {
        topic: topic.into(),
        event: Some(type_url::to_any(event)),
    }
}

async fn publish<M: prost::Name>(
    client: &mut EventsClient<Channel>,
    ns: &str,
    topic: &str,
    event: &M,
) {
    client
        .publish(in_namespace(publish_request(topic, event), ns))
        .await
        .unwrap_or_else(|e| panic!("publish {topic} in {ns}: {e}"));
}

async fn subscribe(
    client: &mut EventsClient<Channel>,
    filters: &[&str],
) -> tonic::Streaming<Envelope> {
    client
        .subscribe(SubscribeRequest {
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        })
        .await
        .expect("subscribe")
        .into_inner()
}

async fn next(stream: &mut tonic::Streaming<Envelope>) -> Envelope {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10s")
        .expect("stream ok")
        .expect("stream still open")
}

fn name_of(envelope: &Envelope) -> String {
    let any = envelope.event.as_ref().expect("payload");
    if type_url::is::<NamespaceCreate>(any) {
        NamespaceCreate::decode(any.value.as_slice())
            .expect("decode")
            .name
    } else {
        format!("<{}>", any.type_url)
    }
}

/// Waits until `condition` holds, failing after `limit`.
async fn eventually(limit: Duration, what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn create(name: &str) -> NamespaceCreate {
    NamespaceCreate {
        name: name.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_topic_filter_sees_exactly_the_matching_events_in_order() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut events = subscribe(&mut client, &["topic==\"/namespaces/create\""]).await;

    let before = SystemTime::now();
    for i in 0..50 {
        publish(
            &mut client,
            "default",
            "/namespaces/create",
            &create(&format!("n{i}")),
        )
        .await;
        publish(
            &mut client,
            "default",
            "/namespaces/delete",
            &NamespaceDelete {
                name: format!("n{i}"),
            },
        )
        .await;
        publish(
            &mut client,
            "default",
            "/namespaces/create/extra",
            &create("not me"),
        )
        .await;
    }
    publish(&mut client, "default", "/namespaces/create", &create("end")).await;

    let mut seen = Vec::new();
    loop {
        let envelope = next(&mut events).await;
        assert_eq!(envelope.topic, "/namespaces/create");
        assert_eq!(envelope.namespace, "default", "from the caller's header");
        let stamped = SystemTime::try_from(envelope.timestamp.expect("stamped")).expect("time");
        assert!(stamped >= before, "the server stamps the time");
        let name = name_of(&envelope);
        if name == "end" {
            break;
        }
        seen.push(name);
    }
    let expected: Vec<String> = (0..50).map(|i| format!("n{i}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn filters_on_namespace_and_or_across_strings() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut team_a = subscribe(&mut client, &["namespace==team-a"]).await;
    let mut either = subscribe(
        &mut client,
        &[
            "namespace==team-a",
            "topic==\"/tasks/exit\",event.container_id==c1",
        ],
    )
    .await;

    publish(&mut client, "team-b", "/namespaces/create", &create("b1")).await;
    publish(&mut client, "team-a", "/namespaces/create", &create("a1")).await;
    for id in ["c2", "c1"] {
        publish(
            &mut client,
            "team-b",
            "/tasks/exit",
            &TaskExit {
                container_id: id.into(),
                ..Default::default()
            },
        )
        .await;
    }
    publish(&mut client, "team-a", "/namespaces/create", &create("a2")).await;

    for expected in ["a1", "a2"] {
        let envelope = next(&mut team_a).await;
        assert_eq!(envelope.namespace, "team-a");
        assert_eq!(name_of(&envelope), expected);
    }

    assert_eq!(name_of(&next(&mut either).await), "a1");
    let exit = next(&mut either).await;
    assert_eq!(
        (exit.namespace.as_str(), exit.topic.as_str()),
        ("team-b", "/tasks/exit")
    );
    let decoded = TaskExit::decode(exit.event.expect("payload").value.as_slice()).expect("decode");
    assert_eq!(
        decoded.container_id, "c1",
        "c2 did not match event.container_id"
    );
    assert_eq!(name_of(&next(&mut either).await), "a2");
}

#[tokio::test]
async fn publish_needs_a_namespace_and_a_valid_topic() {
    let server = Server::start().await;
    let mut client = server.client().await;

    let missing = client
        .publish(publish_request("/namespaces/create", &create("x")))
        .await
        .expect_err("no namespace");
    assert_eq!(missing.code(), tonic::Code::FailedPrecondition, "{missing}");
    assert!(
        missing.message().contains("namespace is required"),
        "{missing}"
    );

    let bad_ns = client
        .publish(in_namespace(
            publish_request("/namespaces/create", &create("x")),
            "bad..ns",
        ))
        .await
        .expect_err("invalid namespace");
    assert_eq!(bad_ns.code(), tonic::Code::InvalidArgument, "{bad_ns}");

    for topic in ["", "/", "namespaces/create", "/a//b", "/a/", "/a b"] {
        let err = client
            .publish(in_namespace(
                publish_request(topic, &create("x")),
                "default",
            ))
            .await
            .expect_err(topic);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{topic:?}: {err}");
    }

    let bad_filter = client
        .subscribe(SubscribeRequest {
            filters: vec!["topic==".into()],
        })
        .await
        .expect_err("bad filter");
    assert_eq!(
        bad_filter.code(),
        tonic::Code::InvalidArgument,
        "{bad_filter}"
    );
}

#[tokio::test]
async fn forward_keeps_the_envelope_and_validates_it() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut events = subscribe(&mut client, &[]).await;

    let then = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let envelope = Envelope {
        timestamp: Some(then.into()),
        namespace: "k8s.io".into(),
        topic: "/tasks/exit".into(),
        event: Some(type_url::to_any(&TaskExit {
            container_id: "c1".into(),
            ..Default::default()
        })),
    };
    // The caller's namespace header plays no part in Forward.
    client
        .forward(in_namespace(
            ForwardRequest {
                envelope: Some(envelope.clone()),
            },
            "default",
        ))
        .await
        .expect("forward");
    assert_eq!(next(&mut events).await, envelope, "forwarded unchanged");

    let invalid = [
        None,
        Some(Envelope {
            namespace: String::new(),
            ..envelope.clone()
        }),
        Some(Envelope {
            topic: "tasks".into(),
            ..envelope.clone()
        }),
        Some(Envelope {
            timestamp: None,
            ..envelope.clone()
        }),
    ];
    for bad in invalid {
        let err = client
            .forward(ForwardRequest {
                envelope: bad.clone(),
            })
            .await
            .expect_err("invalid envelope");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}: {err}");
    }
}

#[tokio::test]
async fn a_subscriber_that_never_reads_does_not_block_publishers() {
    const PUBLISHES: usize = 10_000;
    const PUBLISHERS: usize = 8;
    let server = Server::start().await;
    let mut publisher = server.client().await;
    // Its own connection, so that its full HTTP/2 window cannot hold up the publisher's calls.
    let mut reader = server.client().await;
    let mut stuck = subscribe(&mut reader, &[]).await;

    // Payloads big enough to fill the client's flow-control window, so the server really has to
    // stop sending to this subscriber and its queue overflows.
    let big = create(&"x".repeat(1024));
    let started = Instant::now();
    // Several publishers at once, as in the daemon; each call is answered only after the event
    // was handed to the exchange.
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let mut client = publisher.clone();
            let big = big.clone();
            tokio::spawn(async move {
                for _ in 0..PUBLISHES / PUBLISHERS {
                    publish(&mut client, "default", "/namespaces/create", &big).await;
                }
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), async {
        for task in publishers {
            task.await.expect("publisher");
        }
    })
    .await
    .expect("10,000 publishes finish although a subscriber reads nothing");
    publish(
        &mut publisher,
        "default",
        "/namespaces/create",
        &create("end"),
    )
    .await;
    let took = started.elapsed();

    // The subscriber lost the events that did not fit, but its stream goes on.
    let mut received = 0;
    loop {
        let envelope = next(&mut stuck).await;
        if name_of(&envelope) == "end" {
            break;
        }
        received += 1;
    }
    eprintln!("{PUBLISHES} publishes took {took:?}; the stuck subscriber then got {received}");
    assert!(
        received < PUBLISHES,
        "expected the stuck subscriber to lose events, got all {received}"
    );
    publish(
        &mut publisher,
        "default",
        "/namespaces/create",
        &create("after"),
    )
    .await;
    assert_eq!(name_of(&next(&mut stuck).await), "after");
}

#[tokio::test]
async fn a_client_that_goes_away_ends_its_subscription() {
    let server = Server::start().await;
    let exchange = server.exchange.clone();

    // Cancelling the call on a live connection.
    let mut client = server.client().await;
    let events = subscribe(&mut client, &["topic==\"/never\""]).await;
    assert_eq!(exchange.subscriber_count(), 1);
    drop(events);
    eventually(
        Duration::from_secs(5),
        "a cancelled subscription ends",
        || exchange.subscriber_count() == 0,
    )
    .await;

    // Dropping the whole connection while the server waits for a matching event.
    let mut client = server.client().await;
    let events = subscribe(&mut client, &["topic==\"/never\""]).await;
    let mut other = server.client().await;
    publish(
        &mut other,
        "default",
        "/namespaces/create",
        &create("skipped"),
    )
    .await;
    assert_eq!(exchange.subscriber_count(), 1);
    drop((client, events));
    eventually(
        Duration::from_secs(5),
        "a disconnected subscription ends",
        || exchange.subscriber_count() == 0,
    )
    .await;

    // Dropping a client that has unread events queued on the server.
    let mut client = server.client().await;
    let events = subscribe(&mut client, &[]).await;
    for i in 0..100 {
        publish(
            &mut other,
            "default",
            "/namespaces/create",
            &create(&format!("q{i}")),
        )
        .await;
    }
    drop((client, events));
    eventually(
        Duration::from_secs(5),
        "a subscription with a backlog ends",
        || exchange.subscriber_count() == 0,
    )
    .await;
}
