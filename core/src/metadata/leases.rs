//! Leases: named, optionally expiring holds on resources (containerd PR 3304).
//!
//! A lease is a GC root until its `containerd.io/gc.expire` time passes. It holds the
//! resources listed in it; with `containerd.io/gc.flat` it holds only those, without
//! following their references. Anything created under the `containerd-lease` header joins
//! the lease. Records live at `o\0<ns>\0leases\0<id>`; each resource a lease holds is an
//! empty record of its own at `l\0<ns>\0<id>\0<type>\0<resource id>` (ids escaped as in
//! object keys), as containerd keeps a bucket per lease: adding one is one small write
//! whatever the lease holds already. (A resource set inside the lease's record made every
//! addition rewrite all of them: 10,000 blobs under one lease meant 10,000 rewrites of a
//! record growing to a megabyte.)

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::content::Digest;
use crate::error::{Classify as _, Error, Result};
use crate::filters::Filter;
use crate::labels::{self, Labels};
use crate::metadata::db::{Metadata, Mutation, lease_missing};
use crate::metadata::{ObjectKind, WriteTxn, escape_id, key_parts, object_key, unescape_id};
use crate::namespace::Namespace;

/// Label holding the RFC 3339 time after which a lease no longer protects anything.
pub const LABEL_EXPIRE: &str = "containerd.io/gc.expire";
/// Label that makes a lease hold only what it lists (no reference following).
pub const LABEL_FLAT: &str = "containerd.io/gc.flat";

/// A lease as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Its id.
    pub id: String,
    /// When it was created.
    pub created_at: SystemTime,
    /// Its labels.
    pub labels: Labels,
}

/// A resource a lease holds: a type (`content`, `ingests`, `images`, `snapshots/<name>`) and
/// an id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Resource {
    /// The resource type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The resource id (a digest for content).
    pub id: String,
}

impl Resource {
    /// Validates a resource as containerd does: unknown types are NotImplemented, malformed
    /// ones InvalidArgument; content ids must be digests.
    pub fn parse(kind: &str, id: &str) -> Result<Resource> {
        let parts: Vec<&str> = kind.split('/').collect();
        match parts[0] {
            "content" | "ingests" | "images" if parts.len() == 1 => {}
            "content" | "ingests" | "images" => {
                return Err(Error::invalid_argument(format!(
                    "invalid resource type {kind:?}: it takes no '/'"
                )));
            }
            "snapshots" if parts.len() == 2 && !parts[1].is_empty() => {}
            "snapshots" => {
                return Err(Error::invalid_argument(format!(
                    "invalid resource type {kind:?}: use snapshots/<snapshotter>"
                )));
            }
            _ => {
                return Err(Error::not_implemented(format!(
                    "resource type {kind:?} not supported yet: use content, ingests, images or \
                     snapshots/<snapshotter>"
                )));
            }
        }
        if id.is_empty() {
            return Err(Error::invalid_argument(format!(
                "resource of type {kind:?} needs an id"
            )));
        }
        let id = if kind == "content" {
            Digest::parse(id)
                .map_err(|e| {
                    Error::invalid_argument(format!("invalid content resource id: {}", e.message()))
                })?
                .to_string()
        } else {
            id.to_owned()
        };
        Ok(Resource {
            kind: kind.to_owned(),
            id,
        })
    }

    /// The record kind this resource names.
    pub(crate) fn object_kind(&self) -> Option<ObjectKind> {
        match self.kind.split_once('/') {
            Some(("snapshots", sn)) => Some(ObjectKind::Snapshots(sn.to_owned())),
            None => match self.kind.as_str() {
                "content" => Some(ObjectKind::Content),
                "ingests" => Some(ObjectKind::Ingests),
                "images" => Some(ObjectKind::Images),
                _ => None,
            },
            _ => None,
        }
    }
}

/// A lease's stored record (its resources are records of their own, see the module).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LeaseRecord {
    pub(crate) created_at: SystemTime,
    #[serde(default)]
    pub(crate) labels: Labels,
}

impl LeaseRecord {
    /// Whether the lease's expiry has passed (an unparseable expiry never expires, as a
    /// lease that protects too long is safer than one that protects too little).
    pub(crate) fn expired(&self, now: SystemTime) -> bool {
        let Some(text) = self.labels.get(LABEL_EXPIRE) else {
            return false;
        };
        match text.parse::<jiff::Timestamp>() {
            Ok(t) => SystemTime::from(t) < now,
            Err(e) => {
                tracing::warn!(label = LABEL_EXPIRE, value = %text, "cannot parse lease expiry: {e}");
                false
            }
        }
    }

    pub(crate) fn flat(&self) -> bool {
        self.labels.contains_key(LABEL_FLAT)
    }

    fn lease(&self, id: String) -> Lease {
        Lease {
            id,
            created_at: self.created_at,
            labels: self.labels.clone(),
        }
    }
}

fn lease_exists(txn: &WriteTxn<'_>, ns: &Namespace, id: &str) -> Result<bool> {
    Ok(txn
        .get(&object_key(ns, &ObjectKind::Leases, id)?)?
        .is_some())
}

/// Where the resource records of lease `id` start.
pub(super) fn resources_prefix(ns: &Namespace, id: &str) -> Vec<u8> {
    [b"l\0", ns.as_str().as_bytes(), b"\0", &escape_id(id), b"\0"].concat()
}

fn resource_key(ns: &Namespace, id: &str, resource: &Resource) -> Vec<u8> {
    [
        resources_prefix(ns, id),
        escape_id(&resource.kind),
        b"\0".to_vec(),
        escape_id(&resource.id),
    ]
    .concat()
}

/// The resource a resource record's key names after its lease's prefix.
fn parse_resource(rest: &[u8]) -> Option<Resource> {
    let split = rest.iter().position(|b| *b == 0)?;
    Some(Resource {
        kind: unescape_id(&rest[..split]),
        id: unescape_id(&rest[split + 1..]),
    })
}

/// The resources of lease `id` as the write `txn` sees them.
pub(crate) fn resources_of(txn: &WriteTxn<'_>, ns: &Namespace, id: &str) -> Result<Vec<Resource>> {
    let prefix = resources_prefix(ns, id);
    Ok(txn
        .scan_prefix(&prefix)?
        .into_iter()
        .filter_map(|(key, _)| parse_resource(&key[prefix.len()..]))
        .collect())
}

/// Every lease's resources, by namespace and lease id: for the collector.
pub(crate) fn all_resources(
    txn: &WriteTxn<'_>,
) -> Result<BTreeMap<(String, String), Vec<Resource>>> {
    let mut out: BTreeMap<(String, String), Vec<Resource>> = BTreeMap::new();
    for (key, _) in txn.scan_prefix(b"l\0")? {
        let Some((ns, lease, rest)) = key_parts(&key) else {
            continue;
        };
        if let Some(resource) = parse_resource(rest) {
            out.entry((String::from_utf8_lossy(ns).into_owned(), unescape_id(lease)))
                .or_default()
                .push(resource);
        }
    }
    Ok(out)
}

/// Adds `resource` to the lease `lease` inside a write; NotFound if the lease does not exist.
pub(crate) fn attach(
    txn: &mut WriteTxn<'_>,
    ns: &Namespace,
    lease: &str,
    resource: Resource,
) -> Result<()> {
    if !lease_exists(txn, ns, lease)? {
        return Err(lease_missing(lease));
    }
    txn.put(resource_key(ns, lease, &resource), Vec::new());
    Ok(())
}

/// Removes `resource` from the lease `lease` inside a write, if both exist.
pub(crate) fn detach(
    txn: &mut WriteTxn<'_>,
    ns: &Namespace,
    lease: &str,
    resource: &Resource,
) -> Result<()> {
    let key = resource_key(ns, lease, resource);
    if txn.get(&key)?.is_some() {
        txn.remove(key);
    }
    Ok(())
}

/// Schema 2: moves the resource set out of each lease's record into records of its own.
pub(crate) fn migrate_resources_out_of_records(txn: &mut WriteTxn<'_>) -> Result<()> {
    for (key, value) in txn.scan_prefix(b"o\0")? {
        let Some((ns, b"leases", id)) = key_parts(&key) else {
            continue;
        };
        let ns = Namespace::parse(&String::from_utf8_lossy(ns))?;
        let id = unescape_id(id);
        let mut record: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&value)
            .map_err(|e| {
                Error::internal(format!(
                    "lease {id:?} in namespace {ns}: corrupt record: {e}"
                ))
            })?;
        let Some(resources) = record.remove("resources") else {
            continue;
        };
        let resources: Vec<Resource> = serde_json::from_value(resources).map_err(|e| {
            Error::internal(format!(
                "lease {id:?} in namespace {ns}: corrupt resource list: {e}"
            ))
        })?;
        for resource in &resources {
            txn.put(resource_key(&ns, &id, resource), Vec::new());
        }
        txn.put(
            key,
            serde_json::to_vec(&record)
                .map_err(|e| Error::internal(format!("encode lease {id:?}: {e}")))?,
        );
    }
    Ok(())
}

/// A fresh lease id: valid as an identifier and unique enough for concurrent clients.
fn random_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{nanos}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

impl Metadata {
    /// Creates a lease; an empty id gets a random one. AlreadyExists if the id is taken.
    pub async fn create_lease(&self, ns: &Namespace, id: &str, labels: Labels) -> Result<Lease> {
        // Any non-empty id goes, as in containerd: ctr's own random ids (`<nanos>-<base64>`)
        // are not identifiers.
        let id = if id.is_empty() {
            random_id()
        } else {
            id.to_owned()
        };
        labels::validate_all(&labels)?;
        let record = LeaseRecord {
            created_at: SystemTime::now(),
            labels,
        };
        self.store
            .write(|txn| {
                if lease_exists(txn, ns, &id)? {
                    return Err(Error::already_exists(format!("lease {id:?}")));
                }
                txn.put_object(ns, &ObjectKind::Leases, &id, &record)
            })
            .await?;
        Ok(record.lease(id))
    }

    /// Leases of a namespace matching `filter` (fields `id`, `labels.<key>`).
    pub fn list_leases(&self, ns: &Namespace, filter: &Filter) -> Result<Vec<Lease>> {
        Ok(self
            .store
            .list_objects::<LeaseRecord>(ns, &ObjectKind::Leases)?
            .into_iter()
            .map(|(id, record)| record.lease(id))
            .filter(|lease| {
                filter.matches(&|path: &[String]| match path.first().map(String::as_str) {
                    Some("id") => Some(lease.id.clone()),
                    Some("labels") => lease.labels.get(&path[1..].join(".")).cloned(),
                    _ => None,
                })
            })
            .collect())
    }

    /// Deletes a lease (NotFound if absent); with `sync`, returns after the collection that
    /// frees what only it held.
    pub async fn delete_lease(&self, ns: &Namespace, id: &str, sync: bool) -> Result<()> {
        self.store
            .write_then(
                |txn| {
                    if !lease_exists(txn, ns, id)? {
                        return Err(Error::not_found(format!("lease {id:?}")));
                    }
                    txn.remove_object(ns, &ObjectKind::Leases, id)
                },
                |()| self.mutated(Mutation::Deletion),
            )
            .await?;
        if sync {
            self.schedule_and_wait().await?;
        }
        Ok(())
    }

    /// Adds a resource to a lease (the resource need not exist yet).
    pub async fn add_lease_resource(
        &self,
        ns: &Namespace,
        id: &str,
        resource: Resource,
    ) -> Result<()> {
        self.store
            .write(|txn| attach(txn, ns, id, resource))
            .await
            .map_err(|e| match e.kind() {
                crate::ErrorKind::NotFound => Error::not_found(format!("lease {id:?}")),
                _ => e,
            })
    }

    /// Removes a resource from a lease; removing one it does not hold is not an error.
    pub async fn delete_lease_resource(
        &self,
        ns: &Namespace,
        id: &str,
        resource: &Resource,
    ) -> Result<()> {
        self.store
            .write_then(
                |txn| {
                    if !lease_exists(txn, ns, id)? {
                        return Err(Error::not_found(format!("lease {id:?}")));
                    }
                    detach(txn, ns, id, resource)
                },
                |()| self.mutated(Mutation::Deletion),
            )
            .await?;
        Ok(())
    }

    /// The resources a lease holds.
    pub fn list_lease_resources(&self, ns: &Namespace, id: &str) -> Result<Vec<Resource>> {
        let txn = self.store.reader();
        if !lease_exists(&txn, ns, id)? {
            return Err(Error::not_found(format!("lease {id:?}")));
        }
        resources_of(&txn, ns, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::error::Classify;

    #[test]
    fn resource_types_as_containerd() {
        let d = Digest::sha256_of(b"x").to_string();
        assert!(Resource::parse("content", &d).is_ok());
        assert!(Resource::parse("ingests", "ref-1").is_ok());
        assert!(Resource::parse("snapshots/overlayfs", "k").is_ok());
        assert!(Resource::parse("images", "docker.io/library/busybox:latest").is_ok());
        let kind = |t: &str, id: &str| Resource::parse(t, id).map_err(|e| e.kind()).err();
        assert_eq!(
            kind("content", "not-a-digest"),
            Some(ErrorKind::InvalidArgument)
        );
        assert_eq!(kind("snapshots", "k"), Some(ErrorKind::InvalidArgument));
        assert_eq!(kind("snapshots/a/b", "k"), Some(ErrorKind::InvalidArgument));
        assert_eq!(kind("content/x", &d), Some(ErrorKind::InvalidArgument));
        assert_eq!(kind("containers", "c"), Some(ErrorKind::NotImplemented));
    }

    #[test]
    fn expiry() {
        let mut record = LeaseRecord {
            created_at: SystemTime::now(),
            labels: Labels::new(),
        };
        let now = SystemTime::now();
        assert!(!record.expired(now));
        record
            .labels
            .insert(LABEL_EXPIRE.into(), "2000-01-01T00:00:00Z".into());
        assert!(record.expired(now));
        record
            .labels
            .insert(LABEL_EXPIRE.into(), "2999-01-01T00:00:00+02:00".into());
        assert!(!record.expired(now));
    }
}
