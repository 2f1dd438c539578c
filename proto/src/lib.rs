//! containerd's v1 gRPC API for berth: protobuf messages, tonic clients and
//! tonic servers.
//!
//! This crate is the single source of berth's wire format. The `.proto` files
//! beside `src/` define the same packages, services, messages, field numbers
//! and enum values as containerd's `api/` directory (containerd main, which is
//! a superset of v1.6), so `ctr` and the `containerd-client` crate can talk to
//! a berth daemon. They are written for berth; no generated code is edited by
//! hand.
//!
//! The module tree mirrors the proto packages exactly, for example
//! `containerd.services.content.v1` is [`containerd::services::content::v1`]
//! and `containerd.v1.types` (task state) is [`containerd::v1::types`]. Each
//! service package holds the messages plus a `<service>_client` and a
//! `<service>_server` module. Well-known types (`Any`, `Empty`, `Timestamp`,
//! `FieldMask`) are those of [`prost_types`].
//!
//! Every message implements [`prost::Name`]. Use [`type_url::to_any`] and
//! [`type_url::from_any`] to pack and unpack `Any` values the way containerd
//! does: its type URLs are bare full names such as
//! `containerd.events.TaskExit`.
//!
//! [`FILE_DESCRIPTOR_SET`] holds the encoded descriptors of every file, for
//! reflection and for tests that check the wire contract.

/// Encoded `google.protobuf.FileDescriptorSet` of every `.proto` file in this
/// crate, including the well-known types they import.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/berth_descriptor_set.bin"));

pub mod type_url;

/// Generated code for the `containerd.*` proto packages.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    rustdoc::all
)]
pub mod containerd {
    /// `containerd.events`: events published on the event bus (except image
    /// events, which are in `containerd.services.images.v1`).
    pub mod events {
        include!(concat!(env!("OUT_DIR"), "/containerd.events.rs"));
    }

    /// `containerd.runc.*`: runc shim options.
    pub mod runc {
        /// `containerd.runc.v1`: `Options`, `CheckpointOptions`,
        /// `ProcessDetails`.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/containerd.runc.v1.rs"));
        }
    }

    /// `containerd.services.*`: the gRPC services.
    pub mod services {
        /// `containerd.services.containers.*`
        pub mod containers {
            /// `containerd.services.containers.v1`: the `Containers` service.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.containers.v1.rs"
                ));
            }
        }

        /// `containerd.services.content.*`
        pub mod content {
            /// `containerd.services.content.v1`: the `Content` service.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.content.v1.rs"
                ));
            }
        }

        /// `containerd.services.diff.*`
        pub mod diff {
            /// `containerd.services.diff.v1`: the `Diff` service.
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/containerd.services.diff.v1.rs"));
            }
        }

        /// `containerd.services.events.*`
        pub mod events {
            /// `containerd.services.events.v1`: the `Events` service.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.events.v1.rs"
                ));
            }
        }

        /// `containerd.services.images.*`
        pub mod images {
            /// `containerd.services.images.v1`: the `Images` service and the
            /// image events (`ImageCreate`, `ImageUpdate`, `ImageDelete`).
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.images.v1.rs"
                ));
            }
        }

        /// `containerd.services.introspection.*`
        pub mod introspection {
            /// `containerd.services.introspection.v1`: the `Introspection`
            /// service.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.introspection.v1.rs"
                ));
            }
        }

        /// `containerd.services.leases.*`
        pub mod leases {
            /// `containerd.services.leases.v1`: the `Leases` service.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.leases.v1.rs"
                ));
            }
        }

        /// `containerd.services.mounts.*`
        pub mod mounts {
            /// `containerd.services.mounts.v1`: the `Mounts` service
            /// (containerd 2.2+).
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.mounts.v1.rs"
                ));
            }
        }

        /// `containerd.services.namespaces.*`
        pub mod namespaces {
            /// `containerd.services.namespaces.v1`: the `Namespaces` service.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.namespaces.v1.rs"
                ));
            }
        }

        /// `containerd.services.sandbox.*`
        pub mod sandbox {
            /// `containerd.services.sandbox.v1`: the `Store` and `Controller`
            /// services.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.sandbox.v1.rs"
                ));
            }
        }

        /// `containerd.services.snapshots.*`
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`: the `Snapshots` service.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.snapshots.v1.rs"
                ));
            }
        }

        /// `containerd.services.streaming.*`
        pub mod streaming {
            /// `containerd.services.streaming.v1`: the `Streaming` service.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.streaming.v1.rs"
                ));
            }
        }

        /// `containerd.services.tasks.*`
        pub mod tasks {
            /// `containerd.services.tasks.v1`: the `Tasks` service.
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/containerd.services.tasks.v1.rs"));
            }
        }

        /// `containerd.services.transfer.*`
        pub mod transfer {
            /// `containerd.services.transfer.v1`: the `Transfer` service.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.transfer.v1.rs"
                ));
            }
        }

        /// `containerd.services.version.*`
        pub mod version {
            /// `containerd.services.version.v1`: the `Version` service.
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.version.v1.rs"
                ));
            }
        }
    }

    /// `containerd.types`: shared messages (`Mount`, `Descriptor`,
    /// `Platform`, `Metric`, `Sandbox`, `Envelope`, runtime introspection).
    pub mod types {
        include!(concat!(env!("OUT_DIR"), "/containerd.types.rs"));

        /// `containerd.types.transfer`: transfer sources, destinations and
        /// stream messages.
        pub mod transfer {
            include!(concat!(env!("OUT_DIR"), "/containerd.types.transfer.rs"));
        }
    }

    /// `containerd.v1.*`
    pub mod v1 {
        /// `containerd.v1.types`: task and process state.
        pub mod types {
            include!(concat!(env!("OUT_DIR"), "/containerd.v1.types.rs"));
        }
    }
}

/// Generated code for the `google.*` proto packages that are not well-known
/// types.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    rustdoc::all
)]
pub mod google {
    /// `google.rpc`: the `Status` error model.
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}
