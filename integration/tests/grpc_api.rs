//! Acceptance 3 of issue 2: version, introspection and health over `containerd-client` (and
//! `tonic-health`), calibrated on Debian's containerd.

use berth_integration::containerd_client::services::v1::PluginsRequest;
use berth_integration::containerd_client::services::v1::introspection_client::IntrospectionClient;
use berth_integration::containerd_client::services::v1::version_client::VersionClient;
use berth_integration::{Daemon, Kind, Options, block_on, calibrated};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn grpc_version(kind: Kind) {
    let d = Daemon::start(kind);
    block_on(async {
        let ch = d.channel().await.expect("channel");
        let v = VersionClient::new(ch)
            .version(())
            .await
            .expect("Version")
            .into_inner();
        assert!(!v.version.is_empty(), "{v:?}");
        assert!(!v.revision.is_empty(), "{v:?}");
        if kind == Kind::Berthd {
            assert!(
                !v.version.starts_with("1.6.") && !v.version.contains("~ds"),
                "berthd reports containerd's version {v:?}"
            );
        }
    });
}
calibrated!(grpc_version);

async fn plugins(d: &Daemon, filters: &[&str]) -> Vec<(String, String, bool)> {
    let ch = d.channel().await.expect("channel");
    let resp = IntrospectionClient::new(ch)
        .plugins(PluginsRequest {
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await
        .unwrap_or_else(|e| panic!("Plugins {filters:?}: {e:?}"))
        .into_inner();
    resp.plugins
        .into_iter()
        .map(|p| (p.r#type, p.id, p.init_err.is_none()))
        .collect()
}

fn grpc_introspection_plugins(kind: Kind) {
    let d = Daemon::start(kind);
    block_on(async {
        let all = plugins(&d, &[]).await;
        let grpc = plugins(&d, &["type==io.containerd.grpc.v1"]).await;
        assert!(
            grpc.iter().all(|(t, _, _)| t == "io.containerd.grpc.v1"),
            "{grpc:?}"
        );
        for id in ["version", "introspection", "namespaces", "healthcheck"] {
            assert!(
                grpc.iter().any(|(_, i, ok)| i == id && *ok),
                "io.containerd.grpc.v1.{id} missing or failed in {grpc:?}"
            );
        }
        assert_eq!(
            grpc.len(),
            all.iter()
                .filter(|(t, _, _)| t == "io.containerd.grpc.v1")
                .count(),
            "filtered list differs from the full list's grpc plugins"
        );

        // A conjunction inside one filter.
        let one = plugins(&d, &["type==io.containerd.grpc.v1,id==version"]).await;
        assert_eq!(one.len(), 1, "{one:?}");
        assert_eq!(one[0].1, "version");

        // Several filters are ORed.
        let two = plugins(&d, &["id==version", "id==namespaces"]).await;
        let mut ids: Vec<&str> = two.iter().map(|(_, i, _)| i.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["namespaces", "version"], "{two:?}");

        // A filter nothing matches.
        assert!(plugins(&d, &["id==no-such-plugin"]).await.is_empty());
    });
}
calibrated!(grpc_introspection_plugins);

async fn server_uuid(d: &Daemon) -> String {
    let ch = d.channel().await.expect("channel");
    IntrospectionClient::new(ch)
        .server(())
        .await
        .expect("Introspection.Server")
        .into_inner()
        .uuid
}

fn grpc_introspection_server_uuid(kind: Kind) {
    let mut d = Daemon::start(kind);
    let first = block_on(server_uuid(&d));
    assert_eq!(first.len(), 36, "not a uuid: {first:?}");
    assert_eq!(first.matches('-').count(), 4, "not a uuid: {first:?}");
    assert_eq!(
        block_on(server_uuid(&d)),
        first,
        "uuid changed between calls"
    );

    d.restart().expect("restart");
    assert_eq!(
        block_on(server_uuid(&d)),
        first,
        "uuid changed across a restart"
    );

    let other = Daemon::start_with(kind, Options::default());
    assert_ne!(
        block_on(server_uuid(&other)),
        first,
        "two roots share a uuid"
    );
}
calibrated!(grpc_introspection_server_uuid);

fn grpc_health(kind: Kind) {
    let d = Daemon::start(kind);
    block_on(async {
        let ch = d.channel().await.expect("channel");
        let mut health = HealthClient::new(ch);
        let resp = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("Health.Check")
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving);

        let err = health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .expect_err("an unknown service must not be SERVING");
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    });
}
calibrated!(grpc_health);
