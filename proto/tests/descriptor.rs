//! Checks the wire contract recorded in `FILE_DESCRIPTOR_SET` against
//! containerd's API: field numbers of key messages, enum values, and the
//! services with their RPC names and streaming kinds.

use std::collections::{BTreeMap, BTreeSet};

use berth_proto::FILE_DESCRIPTOR_SET;
use prost::Message;
use prost_types::field_descriptor_proto::Label;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorSet, ServiceDescriptorProto,
};

/// Messages, enums and services of the set, keyed by full name (no leading dot).
struct Index {
    messages: BTreeMap<String, DescriptorProto>,
    enums: BTreeMap<String, EnumDescriptorProto>,
    services: BTreeMap<String, ServiceDescriptorProto>,
}

fn index() -> Index {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
    let mut idx = Index {
        messages: BTreeMap::new(),
        enums: BTreeMap::new(),
        services: BTreeMap::new(),
    };
    for file in &set.file {
        let package = file.package();
        for message in &file.message_type {
            add_message(&mut idx, package, message);
        }
        for e in &file.enum_type {
            idx.enums
                .insert(format!("{package}.{}", e.name()), e.clone());
        }
        for service in &file.service {
            let name = format!("{package}.{}", service.name());
            assert!(
                idx.services.insert(name.clone(), service.clone()).is_none(),
                "service {name} defined twice"
            );
        }
    }
    idx
}

fn add_message(idx: &mut Index, scope: &str, message: &DescriptorProto) {
    let name = format!("{scope}.{}", message.name());
    for nested in &message.nested_type {
        add_message(idx, &name, nested);
    }
    for e in &message.enum_type {
        idx.enums.insert(format!("{name}.{}", e.name()), e.clone());
    }
    assert!(
        idx.messages.insert(name.clone(), message.clone()).is_none(),
        "message {name} defined twice"
    );
}

/// Field numbers per package: "Message field=number ...", taken from
/// containerd's API (see shared/notes/containerd-api.md, "Key messages").
const FIELDS: &[(&str, &[&str])] = &[
    (
        "containerd.services.content.v1",
        &[
            "Info digest=1 size=2 created_at=3 updated_at=4 labels=5",
            "UpdateRequest info=1 update_mask=2",
            "ReadContentRequest digest=1 offset=2 size=3",
            "ReadContentResponse offset=1 data=2",
            "Status started_at=1 updated_at=2 ref=3 offset=4 total=5 expected=6",
            "WriteContentRequest action=1 ref=2 total=3 expected=4 offset=5 data=6 labels=7",
            "WriteContentResponse action=1 started_at=2 updated_at=3 offset=4 total=5 digest=6",
        ],
    ),
    (
        "containerd.services.snapshots.v1",
        &[
            "Info name=1 parent=2 kind=3 created_at=4 updated_at=5 labels=6",
            "PrepareSnapshotRequest snapshotter=1 key=2 parent=3 labels=4",
            "PrepareSnapshotResponse mounts=1",
            "ViewSnapshotRequest key=2 parent=3",
            "CommitSnapshotRequest snapshotter=1 name=2 key=3 labels=4 parent=5",
            "UpdateSnapshotRequest snapshotter=1 info=2 update_mask=3",
            "UsageResponse size=1 inodes=2",
            "ListSnapshotsRequest filters=2",
        ],
    ),
    (
        "containerd.types",
        &[
            "Mount type=1 source=2 target=3 options=4",
            "Descriptor media_type=1 digest=2 size=3 annotations=5",
            "Platform os=1 architecture=2 variant=3 os_version=4 os_features=5",
            "Envelope timestamp=1 namespace=2 topic=3 event=4",
            "Sandbox sandbox_id=1 runtime=2 spec=3 labels=4 created_at=5 updated_at=6 extensions=7",
            "Sandbox sandboxer=10",
            "Sandbox.Runtime name=1 options=2",
        ],
    ),
    (
        "containerd.v1.types",
        &[
            "Process container_id=1 id=2 pid=3 status=4 stdin=5 stdout=6 stderr=7 terminal=8",
            "Process exit_status=9 exited_at=10",
            "ProcessInfo pid=1 info=2",
        ],
    ),
    (
        "containerd.services.images.v1",
        &[
            "Image name=1 labels=2 target=3 created_at=7 updated_at=8",
            "CreateImageRequest source_date_epoch=2",
            "UpdateImageRequest update_mask=2 source_date_epoch=3",
            "DeleteImageRequest name=1 sync=2 target=3",
            "ImageCreate name=1 labels=2",
            "ImageDelete name=1",
        ],
    ),
    (
        "containerd.services.leases.v1",
        &[
            "Lease id=1 created_at=2 labels=3",
            "CreateRequest id=1 labels=3",
            "DeleteRequest id=1 sync=2",
            "Resource id=1 type=2",
            "AddResourceRequest id=1 resource=2",
            "DeleteResourceRequest id=1 resource=2",
        ],
    ),
    (
        "containerd.services.introspection.v1",
        &[
            "Plugin type=1 id=2 requires=3 platforms=4 exports=5 capabilities=6 init_err=7",
            "ServerResponse uuid=1 pid=2 pidns=3 deprecations=4",
        ],
    ),
    (
        "containerd.services.version.v1",
        &["VersionResponse version=1 revision=2"],
    ),
    ("google.rpc", &["Status code=1 message=2 details=3"]),
    (
        "containerd.services.sandbox.v1",
        &[
            "ControllerCreateRequest sandbox_id=1 rootfs=2 options=3 netns_path=4 annotations=5",
            "ControllerCreateRequest sandbox=6 sandboxer=10",
            "ControllerStartRequest sandboxer=10",
            "ControllerStartResponse pid=2 created_at=3 labels=4 address=5 version=6 spec=7",
            "ControllerStopRequest timeout_secs=2 sandboxer=10",
            "ControllerStatusResponse state=3 info=4 extra=7 address=8 version=9",
            "ControllerWaitResponse exit_status=1 exited_at=2",
            "ControllerUpdateRequest sandbox_id=1 sandboxer=2 sandbox=3 fields=4",
            "StoreUpdateRequest fields=2",
            "StoreListResponse list=1",
        ],
    ),
    (
        "containerd.services.diff.v1",
        &[
            "ApplyRequest diff=1 mounts=2 payloads=3 sync_fs=4",
            "DiffRequest source_date_epoch=6",
            "DiffResponse diff=3",
        ],
    ),
    (
        "containerd.services.containers.v1",
        &["Container runtime=4 extensions=10 sandbox=11"],
    ),
    (
        "containerd.services.tasks.v1",
        &[
            "CreateTaskRequest rootfs=3 checkpoint=8 task_api_address=11 task_api_version=12",
            "ExecProcessRequest exec_id=7",
        ],
    ),
    (
        "containerd.services.transfer.v1",
        &[
            "TransferRequest source=1 destination=2 options=3",
            "TransferOptions progress_stream=1",
        ],
    ),
    ("containerd.services.streaming.v1", &["StreamInit id=1"]),
    (
        "containerd.types.transfer",
        &[
            "OCIRegistry reference=1 resolver=2",
            "RegistryResolver auth_stream=1 headers=2 host_dir=3 default_scheme=4 http_debug=5",
            "RegistryResolver logs_stream=6",
            "ImageStore name=1 labels=2 platforms=3 all_metadata=4 manifest_limit=5",
            "ImageStore extra_references=6 unpacks=10",
            "UnpackConfiguration platform=1 snapshotter=2",
            "ImageImportStream stream=1 media_type=2 force_compress=3",
            "ImageExportStream skip_non_distributable=6",
            "Progress event=1 name=2 parents=3 progress=4 total=5 desc=6",
            "Data data=1",
            "WindowUpdate update=1",
            "AuthResponse authType=1 expire_at=4",
        ],
    ),
    (
        "containerd.events",
        &[
            "ContentCreate digest=1 size=2 mediaType=3",
            "ContentDelete digest=1",
            "SnapshotPrepare snapshotter=5",
            "SnapshotCommit snapshotter=5",
            "SnapshotRemove snapshotter=5",
            "TaskExit container_id=1 id=2 pid=3 exit_status=4 exited_at=5",
            "SandboxExit exited_at=3",
        ],
    ),
    (
        "containerd.runc.v1",
        &[
            "Options binary_name=6 root=7 systemd_cgroup=9 task_api_version=13",
            "CheckpointOptions parent_path=10",
            "ProcessDetails exec_id=1",
        ],
    ),
];

#[test]
fn key_fields_have_containerds_numbers() {
    let idx = index();
    let mut failures = Vec::new();
    let mut checked = 0;
    for &(package, lines) in FIELDS {
        for line in lines {
            let mut words = line.split_whitespace();
            let message = format!("{package}.{}", words.next().expect("message name"));
            let Some(desc) = idx.messages.get(&message) else {
                failures.push(format!("missing message {message}"));
                continue;
            };
            for pair in words {
                let (field, number) = pair.split_once('=').expect("field=number");
                let number: i32 = number.parse().expect("numeric field number");
                checked += 1;
                match desc.field.iter().find(|f| f.name() == field) {
                    None => failures.push(format!("{message} has no field {field}")),
                    Some(f) if f.number() != number => failures.push(format!(
                        "{message}.{field} is {}, expected {number}",
                        f.number()
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked > 200, "only {checked} fields checked");
}

#[test]
fn optional_and_repeated_fields() {
    let idx = index();
    let field = |message: &str, name: &str| {
        idx.messages[message]
            .field
            .iter()
            .find(|f| f.name() == name)
            .cloned()
            .expect("field exists")
    };
    let target = field("containerd.services.images.v1.DeleteImageRequest", "target");
    assert!(
        target.proto3_optional(),
        "DeleteImageRequest.target is optional"
    );
    assert_eq!(target.type_name(), ".containerd.types.Descriptor");
    let options = field("containerd.types.Mount", "options");
    assert_eq!(options.label(), Label::Repeated);
    let init_err = field("containerd.services.introspection.v1.Plugin", "init_err");
    assert_eq!(init_err.type_name(), ".google.rpc.Status");
    let runc = &idx.messages["containerd.runc.v1.Options"];
    assert!(
        runc.reserved_range
            .iter()
            .any(|r| r.start() == 8 && r.end() == 9),
        "runc Options reserves field 8"
    );
}

#[test]
fn enums_have_containerds_values() {
    let idx = index();
    let expected: &[(&str, &[(&str, i32)])] = &[
        (
            "containerd.services.content.v1.WriteAction",
            &[("STAT", 0), ("WRITE", 1), ("COMMIT", 2)],
        ),
        (
            "containerd.services.snapshots.v1.Kind",
            &[("UNKNOWN", 0), ("VIEW", 1), ("ACTIVE", 2), ("COMMITTED", 3)],
        ),
        (
            "containerd.v1.types.Status",
            &[
                ("UNKNOWN", 0),
                ("CREATED", 1),
                ("RUNNING", 2),
                ("STOPPED", 3),
                ("PAUSED", 4),
                ("PAUSING", 5),
            ],
        ),
        (
            "containerd.types.transfer.HTTPDebug",
            &[("DISABLED", 0), ("DEBUG", 1), ("TRACE", 2), ("BOTH", 3)],
        ),
        (
            "containerd.types.transfer.AuthType",
            &[
                ("NONE", 0),
                ("CREDENTIALS", 1),
                ("REFRESH", 2),
                ("HEADER", 3),
            ],
        ),
    ];
    for &(name, values) in expected {
        let e = idx
            .enums
            .get(name)
            .unwrap_or_else(|| panic!("missing enum {name}"));
        let got: Vec<(&str, i32)> = e.value.iter().map(|v| (v.name(), v.number())).collect();
        assert_eq!(got, values, "values of {name}");
    }
}

/// How an RPC streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unary,
    ServerStream,
    ClientStream,
    Bidi,
}

use Kind::{Bidi, ServerStream, Unary};

/// (service full name, [(rpc, streaming kind)]), in declaration order.
const SERVICES: &[(&str, &[(&str, Kind)])] = &[
    (
        "containerd.services.version.v1.Version",
        &[("Version", Unary)],
    ),
    (
        "containerd.services.introspection.v1.Introspection",
        &[("Plugins", Unary), ("Server", Unary), ("PluginInfo", Unary)],
    ),
    (
        "containerd.services.namespaces.v1.Namespaces",
        &[
            ("Get", Unary),
            ("List", Unary),
            ("Create", Unary),
            ("Update", Unary),
            ("Delete", Unary),
        ],
    ),
    (
        "containerd.services.content.v1.Content",
        &[
            ("Info", Unary),
            ("Update", Unary),
            ("List", ServerStream),
            ("Delete", Unary),
            ("Read", ServerStream),
            ("Status", Unary),
            ("ListStatuses", Unary),
            ("Write", Bidi),
            ("Abort", Unary),
        ],
    ),
    (
        "containerd.services.images.v1.Images",
        &[
            ("Get", Unary),
            ("List", Unary),
            ("Create", Unary),
            ("Update", Unary),
            ("Delete", Unary),
        ],
    ),
    (
        "containerd.services.leases.v1.Leases",
        &[
            ("Create", Unary),
            ("Delete", Unary),
            ("List", Unary),
            ("AddResource", Unary),
            ("DeleteResource", Unary),
            ("ListResources", Unary),
        ],
    ),
    (
        "containerd.services.snapshots.v1.Snapshots",
        &[
            ("Prepare", Unary),
            ("View", Unary),
            ("Mounts", Unary),
            ("Commit", Unary),
            ("Remove", Unary),
            ("Stat", Unary),
            ("Update", Unary),
            ("List", ServerStream),
            ("Usage", Unary),
            ("Cleanup", Unary),
        ],
    ),
    (
        "containerd.services.diff.v1.Diff",
        &[("Apply", Unary), ("Diff", Unary)],
    ),
    (
        "containerd.services.containers.v1.Containers",
        &[
            ("Get", Unary),
            ("List", Unary),
            ("ListStream", ServerStream),
            ("Create", Unary),
            ("Update", Unary),
            ("Delete", Unary),
        ],
    ),
    (
        "containerd.services.tasks.v1.Tasks",
        &[
            ("Create", Unary),
            ("Start", Unary),
            ("Delete", Unary),
            ("DeleteProcess", Unary),
            ("Get", Unary),
            ("List", Unary),
            ("Kill", Unary),
            ("Exec", Unary),
            ("ResizePty", Unary),
            ("CloseIO", Unary),
            ("Pause", Unary),
            ("Resume", Unary),
            ("ListPids", Unary),
            ("Checkpoint", Unary),
            ("Update", Unary),
            ("Metrics", Unary),
            ("Wait", Unary),
        ],
    ),
    (
        "containerd.services.events.v1.Events",
        &[
            ("Publish", Unary),
            ("Forward", Unary),
            ("Subscribe", ServerStream),
        ],
    ),
    (
        "containerd.services.sandbox.v1.Store",
        &[
            ("Create", Unary),
            ("Update", Unary),
            ("Delete", Unary),
            ("List", Unary),
            ("Get", Unary),
        ],
    ),
    (
        "containerd.services.sandbox.v1.Controller",
        &[
            ("Create", Unary),
            ("Start", Unary),
            ("Platform", Unary),
            ("Stop", Unary),
            ("Wait", Unary),
            ("Status", Unary),
            ("Shutdown", Unary),
            ("Metrics", Unary),
            ("Update", Unary),
        ],
    ),
    (
        "containerd.services.transfer.v1.Transfer",
        &[("Transfer", Unary)],
    ),
    (
        "containerd.services.streaming.v1.Streaming",
        &[("Stream", Bidi)],
    ),
    (
        "containerd.services.mounts.v1.Mounts",
        &[
            ("Activate", Unary),
            ("Deactivate", Unary),
            ("Info", Unary),
            ("Update", Unary),
            ("List", ServerStream),
        ],
    ),
];

#[test]
fn services_have_containerds_rpcs() {
    let idx = index();
    let expected_names: BTreeSet<&str> = SERVICES.iter().map(|(name, _)| *name).collect();
    let actual_names: BTreeSet<&str> = idx.services.keys().map(String::as_str).collect();
    assert_eq!(actual_names, expected_names, "set of services");

    for &(name, rpcs) in SERVICES {
        let service = &idx.services[name];
        let got: Vec<(&str, Kind)> = service
            .method
            .iter()
            .map(|m| {
                let kind = match (m.client_streaming(), m.server_streaming()) {
                    (false, false) => Unary,
                    (false, true) => ServerStream,
                    (true, false) => Kind::ClientStream,
                    (true, true) => Bidi,
                };
                (m.name(), kind)
            })
            .collect();
        assert_eq!(got, rpcs, "RPCs of {name}");
    }
}

#[test]
fn rpc_signatures_match_containerd() {
    let idx = index();
    let method = |service: &str, rpc: &str| {
        idx.services[service]
            .method
            .iter()
            .find(|m| m.name() == rpc)
            .map(|m| (m.input_type().to_owned(), m.output_type().to_owned()))
            .expect("rpc exists")
    };
    let cases = [
        (
            "containerd.services.version.v1.Version",
            "Version",
            ".google.protobuf.Empty",
            ".containerd.services.version.v1.VersionResponse",
        ),
        (
            "containerd.services.introspection.v1.Introspection",
            "Server",
            ".google.protobuf.Empty",
            ".containerd.services.introspection.v1.ServerResponse",
        ),
        (
            "containerd.services.events.v1.Events",
            "Subscribe",
            ".containerd.services.events.v1.SubscribeRequest",
            ".containerd.types.Envelope",
        ),
        (
            "containerd.services.tasks.v1.Tasks",
            "DeleteProcess",
            ".containerd.services.tasks.v1.DeleteProcessRequest",
            ".containerd.services.tasks.v1.DeleteResponse",
        ),
        (
            "containerd.services.snapshots.v1.Snapshots",
            "Commit",
            ".containerd.services.snapshots.v1.CommitSnapshotRequest",
            ".google.protobuf.Empty",
        ),
        (
            "containerd.services.transfer.v1.Transfer",
            "Transfer",
            ".containerd.services.transfer.v1.TransferRequest",
            ".google.protobuf.Empty",
        ),
        (
            "containerd.services.streaming.v1.Streaming",
            "Stream",
            ".google.protobuf.Any",
            ".google.protobuf.Any",
        ),
    ];
    for (service, rpc, input, output) in cases {
        assert_eq!(
            method(service, rpc),
            (input.to_owned(), output.to_owned()),
            "{service}/{rpc}"
        );
    }
}

/// The generated servers carry the same names as the descriptors, and every
/// service has both a client and a server.
#[test]
fn generated_servers_and_clients_exist() {
    use berth_proto::containerd::services as s;
    use tonic::transport::Channel;

    let generated = [
        s::containers::v1::containers_server::SERVICE_NAME,
        s::content::v1::content_server::SERVICE_NAME,
        s::diff::v1::diff_server::SERVICE_NAME,
        s::events::v1::events_server::SERVICE_NAME,
        s::images::v1::images_server::SERVICE_NAME,
        s::introspection::v1::introspection_server::SERVICE_NAME,
        s::leases::v1::leases_server::SERVICE_NAME,
        s::mounts::v1::mounts_server::SERVICE_NAME,
        s::namespaces::v1::namespaces_server::SERVICE_NAME,
        s::sandbox::v1::controller_server::SERVICE_NAME,
        s::sandbox::v1::store_server::SERVICE_NAME,
        s::snapshots::v1::snapshots_server::SERVICE_NAME,
        s::streaming::v1::streaming_server::SERVICE_NAME,
        s::tasks::v1::tasks_server::SERVICE_NAME,
        s::transfer::v1::transfer_server::SERVICE_NAME,
        s::version::v1::version_server::SERVICE_NAME,
    ];
    let generated: BTreeSet<&str> = generated.into_iter().collect();
    let expected: BTreeSet<&str> = SERVICES.iter().map(|(name, _)| *name).collect();
    assert_eq!(generated, expected);

    // Clients: naming each constructor is enough to prove it was generated.
    let _ = (
        s::containers::v1::containers_client::ContainersClient::<Channel>::new,
        s::content::v1::content_client::ContentClient::<Channel>::new,
        s::diff::v1::diff_client::DiffClient::<Channel>::new,
        s::events::v1::events_client::EventsClient::<Channel>::new,
        s::images::v1::images_client::ImagesClient::<Channel>::new,
        s::introspection::v1::introspection_client::IntrospectionClient::<Channel>::new,
        s::leases::v1::leases_client::LeasesClient::<Channel>::new,
        s::mounts::v1::mounts_client::MountsClient::<Channel>::new,
        s::namespaces::v1::namespaces_client::NamespacesClient::<Channel>::new,
        s::sandbox::v1::controller_client::ControllerClient::<Channel>::new,
        s::sandbox::v1::store_client::StoreClient::<Channel>::new,
        s::snapshots::v1::snapshots_client::SnapshotsClient::<Channel>::new,
        s::streaming::v1::streaming_client::StreamingClient::<Channel>::new,
        s::tasks::v1::tasks_client::TasksClient::<Channel>::new,
        s::transfer::v1::transfer_client::TransferClient::<Channel>::new,
        s::version::v1::version_client::VersionClient::<Channel>::new,
    );
}
