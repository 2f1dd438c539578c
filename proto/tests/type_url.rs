//! `Any` type URLs must be the bare proto full names that containerd uses.

use berth_proto::containerd::events::TaskExit;
use berth_proto::containerd::runc::v1::Options;
use berth_proto::containerd::services::images::v1::ImageCreate;
use berth_proto::containerd::types::Sandbox;
use berth_proto::containerd::types::sandbox::Runtime;
use berth_proto::containerd::types::transfer::{OciRegistry, RegistryResolver};
use berth_proto::type_url::{self, FromAnyError};
use prost::Name;

#[test]
fn type_urls_are_bare_full_names() {
    assert_eq!(type_url::of::<TaskExit>(), "containerd.events.TaskExit");
    assert_eq!(
        type_url::of::<ImageCreate>(),
        "containerd.services.images.v1.ImageCreate"
    );
    assert_eq!(type_url::of::<Options>(), "containerd.runc.v1.Options");
    // prost renames OCIRegistry to OciRegistry in Rust; the wire name is unchanged.
    assert_eq!(
        type_url::of::<OciRegistry>(),
        "containerd.types.transfer.OCIRegistry"
    );
    assert_eq!(
        type_url::of::<Runtime>(),
        "containerd.types.Sandbox.Runtime"
    );
    assert_eq!(Sandbox::full_name(), "containerd.types.Sandbox");
    assert_eq!(
        type_url::type_url("containerd.events.TaskExit"),
        "containerd.events.TaskExit"
    );
}

#[test]
fn any_round_trip() {
    let exit = TaskExit {
        container_id: "c1".into(),
        id: "c1".into(),
        pid: 42,
        exit_status: 137,
        exited_at: None,
    };
    let any = type_url::to_any(&exit);
    assert_eq!(any.type_url, "containerd.events.TaskExit");
    assert!(type_url::is::<TaskExit>(&any));
    assert_eq!(type_url::from_any::<TaskExit>(&any), Ok(exit.clone()));

    // Domain-prefixed URLs (as prost and Go's anypb write them) are accepted.
    let prefixed = prost_types::Any::from_msg(&exit).expect("encodes");
    assert_eq!(prefixed.type_url, "/containerd.events.TaskExit");
    assert_eq!(type_url::from_any::<TaskExit>(&prefixed), Ok(exit));
}

#[test]
fn from_any_rejects_other_types() {
    let registry = OciRegistry {
        reference: "docker.io/library/alpine:latest".into(),
        resolver: Some(RegistryResolver::default()),
    };
    let any = type_url::to_any(&registry);
    assert_eq!(any.type_url, "containerd.types.transfer.OCIRegistry");
    assert!(!type_url::is::<Options>(&any));
    match type_url::from_any::<Options>(&any) {
        Err(FromAnyError::TypeMismatch { expected, found }) => {
            assert_eq!(expected, "containerd.runc.v1.Options");
            assert_eq!(found, "containerd.types.transfer.OCIRegistry");
        }
        other => panic!("expected a type mismatch, got {other:?}"),
    }

    let garbage = prost_types::Any {
        type_url: type_url::of::<Options>(),
        value: vec![0xff, 0xff, 0xff],
    };
    assert!(matches!(
        type_url::from_any::<Options>(&garbage),
        Err(FromAnyError::Decode(_))
    ));
}
