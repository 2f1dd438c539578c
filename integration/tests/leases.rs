//! Acceptance 2 of issue 3: `ctr leases` (create with and without id and `--expires`, ls with
//! filters, rm, rm --sync) and the resource calls of the leases service through
//! containerd-client (AddResource, ListResources, DeleteResource for `content`, `ingests`,
//! `snapshots/<name>`; NotFound for an unknown lease; Unimplemented for an unknown type; no
//! error when deleting an absent resource), calibrated on Debian's containerd.

use std::collections::HashMap;

use berth_integration::api::{self, LABEL_GC_EXPIRE};
use berth_integration::tonic::Code;
use berth_integration::{Daemon, Kind, block_on, calibrated, label_cell};

/// `ctr leases ls [FILTER...]`: id -> sorted labels. The table is padded with spaces and no
/// cell holds one.
fn leases_ls(d: &Daemon, filters: &[&str]) -> HashMap<String, Vec<String>> {
    let mut args = vec!["leases", "ls"];
    args.extend_from_slice(filters);
    let out = d.ctr_ok(args);
    let mut lines = out.stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["ID", "CREATED", "AT", "LABELS"], "{out}");
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cols.len(), 3, "ID CREATED-AT LABELS expected: {l:?}");
            (cols[0].to_string(), label_cell(cols[2]))
        })
        .collect()
}

fn ids(m: &HashMap<String, Vec<String>>) -> Vec<String> {
    let mut v: Vec<String> = m.keys().cloned().collect();
    v.sort();
    v
}

fn expire_of(labels: &[String]) -> Option<String> {
    labels
        .iter()
        .find_map(|l| l.strip_prefix(&format!("{LABEL_GC_EXPIRE}=")))
        .map(str::to_string)
}

fn leases_cli(kind: Kind) {
    let d = Daemon::start(kind);
    assert!(leases_ls(&d, &[]).is_empty());

    // Without an id ctr makes one up; `--expires` defaults to 24h and becomes the gc.expire
    // label (an RFC 3339 time about a day ahead).
    let out = d.ctr_ok(["leases", "create"]);
    let random = out.stdout.trim().to_string();
    assert!(!random.is_empty() && !random.contains(' '), "{out}");
    let ls = leases_ls(&d, &[]);
    assert_eq!(ids(&ls), std::slice::from_ref(&random));
    let exp = expire_of(&ls[&random]).unwrap_or_else(|| panic!("no gc.expire: {ls:?}"));
    let in_23h = api::rfc3339_from_now(23 * 3600);
    let in_25h = api::rfc3339_from_now(25 * 3600);
    // Both sides are `YYYY-MM-DDTHH:MM:SS...` in UTC (the harness runs ctr with TZ=UTC; it
    // formats in local time): comparing the first 19 characters compares the times.
    assert!(
        exp[..19] > in_23h[..19] && exp[..19] < in_25h[..19],
        "gc.expire {exp} is not about 24h ahead"
    );

    // With an id and labels.
    let out = d.ctr_ok(["leases", "create", "--id", "l1", "a=b", "c=d"]);
    assert_eq!(out.stdout.trim(), "l1");
    d.ctr(["leases", "create", "--id", "l1"])
        .assert_failure_contains("already exists");
    // `--expires 0`: no expiry label; `--expires 1h`: an hour ahead.
    d.ctr_ok(["leases", "create", "--id", "l2", "--expires", "0"]);
    d.ctr_ok(["leases", "create", "--id", "l3", "--expires", "1h"]);

    let ls = leases_ls(&d, &[]);
    let mut want = vec![random.clone(), "l1".into(), "l2".into(), "l3".into()];
    want.sort();
    assert_eq!(ids(&ls), want);
    let l1: Vec<&String> = ls["l1"]
        .iter()
        .filter(|l| !l.starts_with(LABEL_GC_EXPIRE))
        .collect();
    assert_eq!(l1, ["a=b", "c=d"]);
    assert!(expire_of(&ls["l1"]).is_some());
    assert_eq!(ls["l2"], Vec::<String>::new(), "--expires 0 set labels");
    let exp3 = expire_of(&ls["l3"]).expect("l3 gc.expire");
    let in_50m = api::rfc3339_from_now(50 * 60);
    let in_70m = api::rfc3339_from_now(70 * 60);
    assert!(
        exp3[..19] > in_50m[..19] && exp3[..19] < in_70m[..19],
        "gc.expire {exp3} is not about 1h ahead"
    );

    // -q and filters.
    let q = d.ctr_ok(["leases", "ls", "-q"]);
    let mut qs: Vec<String> = q.stdout.lines().map(str::to_string).collect();
    qs.sort();
    assert_eq!(qs, want);
    assert_eq!(ids(&leases_ls(&d, &["id==l1"])), ["l1"]);
    assert_eq!(ids(&leases_ls(&d, &["labels.a==b"])), ["l1"]);
    assert_eq!(ids(&leases_ls(&d, &["id==l2", "id==l3"])), ["l2", "l3"]);
    assert!(leases_ls(&d, &["id==nothing"]).is_empty());

    // rm prints the ids; --sync waits for a collection; an unknown lease is an error.
    let out = d.ctr_ok(["leases", "rm", "l2"]);
    assert_eq!(out.stdout.trim(), "l2");
    let out = d.ctr_ok(["leases", "rm", "--sync", "l3"]);
    assert_eq!(out.stdout.trim(), "l3");
    d.ctr(["leases", "rm", "nope"])
        .assert_failure_contains("not found");
    let out = d.ctr_ok(["leases", "rm", &random, "l1"]);
    let printed: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(printed, [random.as_str(), "l1"]);
    assert!(leases_ls(&d, &[]).is_empty());

    // Leases belong to a namespace.
    d.ctr_ok(["-n", "other", "leases", "create", "--id", "elsewhere"]);
    assert!(leases_ls(&d, &[]).is_empty());
}
calibrated!(leases_cli);

fn leases_grpc(kind: Kind) {
    let d = Daemon::start(kind);
    block_on(async {
        let ch = d.channel().await.expect("channel");
        let ns = "default";

        // An empty id: the server picks one.
        let l = api::create_lease(&ch, ns, "", &[("k", "v")])
            .await
            .expect("Create without id");
        assert!(!l.id.is_empty(), "{l:?}");
        assert!(l.created_at.is_some(), "{l:?}");
        assert_eq!(l.labels, api::label_map(&[("k", "v")]));
        let err = api::create_lease(&ch, ns, &l.id, &[])
            .await
            .expect_err("Create of an existing id");
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

        let listed = api::list_leases(&ch, ns, &[]).await.expect("List");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, l.id);
        assert_eq!(listed[0].labels, l.labels);
        let f = format!("id=={}", l.id);
        assert_eq!(
            api::list_leases(&ch, ns, &[&f]).await.expect("List").len(),
            1
        );
        assert!(
            api::list_leases(&ch, ns, &["labels.k==other"])
                .await
                .expect("List")
                .is_empty()
        );

        api::delete_lease(&ch, ns, &l.id, false)
            .await
            .expect("Delete");
        let err = api::delete_lease(&ch, ns, &l.id, false)
            .await
            .expect_err("second Delete");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        let err = api::delete_lease(&ch, ns, "never", true)
            .await
            .expect_err("Delete sync of an unknown lease");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(
            api::list_leases(&ch, ns, &[])
                .await
                .expect("List")
                .is_empty()
        );
    });
}
calibrated!(leases_grpc);

fn leases_grpc_resources(kind: Kind) {
    let d = Daemon::start(kind);
    block_on(async {
        let ch = d.channel().await.expect("channel");
        let ns = "default";
        let dgst = api::sha256_digest(b"leased");
        let other = api::sha256_digest(b"absent");
        api::create_lease(&ch, ns, "res", &[])
            .await
            .expect("Create");
        assert!(
            api::list_resources(&ch, ns, "res")
                .await
                .expect("ListResources")
                .is_empty()
        );

        // The blob and the snapshot need not exist: a lease may hold a name before the object
        // is created. Adding twice is fine.
        for r in [
            api::resource("content", &dgst),
            api::resource("ingests", "ingest-ref-1"),
            api::resource("snapshots/overlayfs", "snap-1"),
            api::resource("snapshots/native", "snap-2"),
            api::resource("content", &dgst),
        ] {
            api::add_resource(&ch, ns, "res", r.clone())
                .await
                .unwrap_or_else(|e| panic!("AddResource {r:?}: {e:?}"));
        }
        let pair = |t: &str, i: &str| (t.to_string(), i.to_string());
        assert_eq!(
            api::list_resources(&ch, ns, "res")
                .await
                .expect("ListResources"),
            [
                pair("content", &dgst),
                pair("ingests", "ingest-ref-1"),
                pair("snapshots/native", "snap-2"),
                pair("snapshots/overlayfs", "snap-1"),
            ]
        );

        // Deleting: present ones go; absent ones (other id, other snapshotter, never added)
        // are not errors.
        for r in [
            api::resource("content", &dgst),
            api::resource("content", &other),
            api::resource("ingests", "never-added"),
            api::resource("snapshots/overlayfs", "snap-2"),
            api::resource("snapshots/btrfs", "snap-1"),
            api::resource("snapshots/native", "snap-2"),
        ] {
            api::delete_resource(&ch, ns, "res", r.clone())
                .await
                .unwrap_or_else(|e| panic!("DeleteResource {r:?}: {e:?}"));
        }
        assert_eq!(
            api::list_resources(&ch, ns, "res")
                .await
                .expect("ListResources"),
            [
                pair("ingests", "ingest-ref-1"),
                pair("snapshots/overlayfs", "snap-1"),
            ]
        );

        // An unknown lease is NotFound for all three calls.
        let err = api::add_resource(&ch, ns, "nope", api::resource("content", &dgst))
            .await
            .expect_err("AddResource to an unknown lease");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        let err = api::delete_resource(&ch, ns, "nope", api::resource("content", &dgst))
            .await
            .expect_err("DeleteResource from an unknown lease");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        let err = api::list_resources(&ch, ns, "nope")
            .await
            .expect_err("ListResources of an unknown lease");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        // ... and leases are namespaced.
        let err = api::list_resources(&ch, "other", "res")
            .await
            .expect_err("ListResources in another namespace");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");

        // Unknown types are Unimplemented; malformed ones InvalidArgument.
        for t in ["bogus", "containers", "sandboxes"] {
            let err = api::add_resource(&ch, ns, "res", api::resource(t, "x"))
                .await
                .expect_err("AddResource of an unknown type");
            assert_eq!(err.code(), Code::Unimplemented, "{t}: {err:?}");
        }
        for (t, id) in [
            ("content", "not-a-digest"),
            ("content/extra", dgst.as_str()),
            ("ingests/extra", "x"),
            ("snapshots", "x"),
            ("snapshots/a/b", "x"),
        ] {
            let err = api::add_resource(&ch, ns, "res", api::resource(t, id))
                .await
                .expect_err("AddResource of a malformed resource");
            assert_eq!(err.code(), Code::InvalidArgument, "{t} {id}: {err:?}");
        }

        // `images` resources arrived in containerd 2.0; 1.6 answers Unimplemented. berthd
        // follows 2.x (SPEC C4), so this is the one place the daemons legitimately differ.
        let r = api::add_resource(&ch, ns, "res", api::resource("images", "docker.io/x:1")).await;
        match kind {
            Kind::Containerd => {
                let err = r.expect_err("containerd 1.6 has no images resources");
                assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
            }
            Kind::Berthd => {
                r.expect("AddResource images");
                let list = api::list_resources(&ch, ns, "res")
                    .await
                    .expect("ListResources");
                assert!(list.contains(&pair("images", "docker.io/x:1")), "{list:?}");
                api::delete_resource(&ch, ns, "res", api::resource("images", "docker.io/x:1"))
                    .await
                    .expect("DeleteResource images");
            }
        }
        assert_eq!(
            api::list_resources(&ch, ns, "res")
                .await
                .expect("ListResources"),
            [
                pair("ingests", "ingest-ref-1"),
                pair("snapshots/overlayfs", "snap-1"),
            ],
            "failed calls changed the lease"
        );

        // Deleting the lease drops its resources with it.
        api::delete_lease(&ch, ns, "res", true)
            .await
            .expect("Delete sync");
        api::create_lease(&ch, ns, "res", &[])
            .await
            .expect("Create again");
        assert!(
            api::list_resources(&ch, ns, "res")
                .await
                .expect("ListResources")
                .is_empty(),
            "a recreated lease inherited resources"
        );
    });
}
calibrated!(leases_grpc_resources);

/// What a call made under the `containerd-lease` header creates joins the lease: a committed
/// blob as `content`, an unfinished ingest as `ingests`.
fn leases_header_attaches(kind: Kind) {
    let d = Daemon::start(kind);
    block_on(async {
        let ch = d.channel().await.expect("channel");
        let ns = "default";
        api::create_lease(&ch, ns, "hdr", &[])
            .await
            .expect("Create");
        let data = b"under a lease".to_vec();
        let dgst = api::sha256_digest(&data);
        assert_eq!(
            api::write_blob(&ch, ns, Some("hdr"), "hdr-blob", &data, &[])
                .await
                .expect("write under the lease"),
            api::Written::Committed
        );
        let mut w = api::ContentWriter::open(ch.clone(), ns, Some("hdr"), "hdr-partial", 0, "")
            .await
            .expect("open under the lease");
        w.write(b"part").await.expect("write");
        w.close();
        let list = api::list_resources(&ch, ns, "hdr")
            .await
            .expect("ListResources");
        assert!(
            list.contains(&("content".to_string(), dgst.clone())),
            "{list:?}"
        );
        assert!(
            list.contains(&("ingests".to_string(), "hdr-partial".to_string())),
            "{list:?}"
        );

        // A header naming a lease that does not exist fails the call.
        let err = api::write_blob(&ch, ns, Some("missing"), "x", b"x", &[])
            .await
            .expect_err("write under a missing lease");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    });
}
calibrated!(leases_header_attaches);
