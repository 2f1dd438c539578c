//! Image records: a name pointing at a target descriptor (an index or manifest).
//!
//! Records live at `o\0<ns>\0images\0<name>`. An image is a GC root and keeps its target
//! blob (and through the target's `gc.ref` labels, the rest of the image) alive. Delete can
//! be conditional (containerd PR 8989: with a `target`, an image that now points elsewhere is
//! NotFound and stays) and synchronous (returns after the collection it triggers).

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::content::Digest;
use crate::error::{Error, Result};
use crate::filters::Filter;
use crate::labels::{self, Labels};
use crate::metadata::ObjectKind;
use crate::metadata::db::{Metadata, Mutation};
use crate::metadata::leases::{self, Resource};
use crate::namespace::Namespace;
use crate::snapshot::Descriptor;

/// An image as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Its name (a reference such as `docker.io/library/busybox:latest`).
    pub name: String,
    /// Its labels.
    pub labels: Labels,
    /// What it points at.
    pub target: Descriptor,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it last changed.
    pub updated_at: SystemTime,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TargetRecord {
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageRecord {
    target: TargetRecord,
    #[serde(default)]
    labels: Labels,
    created_at: SystemTime,
    updated_at: SystemTime,
}

impl ImageRecord {
    fn image(self, name: String) -> Image {
        Image {
            name,
            labels: self.labels,
            target: Descriptor {
                media_type: self.target.media_type,
                digest: self.target.digest,
                size: self.target.size,
                annotations: self.target.annotations,
            },
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// Applies an Update's field paths (containerd's: `labels`, `labels.<key>`, `target`,
/// `annotations`, `annotations.<key>`; none replaces labels and target) from `image` to
/// `record`. An empty value for a key removes it.
fn apply_fieldpaths(record: &mut ImageRecord, image: &Image, fieldpaths: &[String]) -> Result<()> {
    if fieldpaths.is_empty() {
        record.labels = image.labels.clone();
        record.target = target_record(&image.target);
    }
    for path in fieldpaths {
        if let Some(key) = path.strip_prefix("labels.") {
            match image.labels.get(key).filter(|v| !v.is_empty()) {
                Some(v) => record.labels.insert(key.to_owned(), v.clone()),
                None => record.labels.remove(key),
            };
        } else if let Some(key) = path.strip_prefix("annotations.") {
            match image.target.annotations.get(key).filter(|v| !v.is_empty()) {
                Some(v) => record.target.annotations.insert(key.to_owned(), v.clone()),
                None => record.target.annotations.remove(key),
            };
        } else {
            match path.as_str() {
                "labels" => record.labels = image.labels.clone(),
                "target" => record.target = target_record(&image.target),
                "annotations" => record.target.annotations = image.target.annotations.clone(),
                other => {
                    return Err(Error::invalid_argument(format!(
                        "cannot update {other:?} field on image {:?}",
                        image.name
                    )));
                }
            }
        }
    }
    Ok(())
}

fn target_record(d: &Descriptor) -> TargetRecord {
    TargetRecord {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: d.annotations.clone(),
    }
}

/// containerd's checks on an image before storing it.
fn validate(image: &Image) -> Result<()> {
    if image.name.is_empty() {
        return Err(Error::invalid_argument("image name must not be empty"));
    }
    labels::validate_all(&image.labels)?;
    if image.target.size == 0 {
        return Err(Error::invalid_argument(format!(
            "image {:?}: target size must be greater than zero",
            image.name
        )));
    }
    if image.target.media_type.is_empty() {
        return Err(Error::invalid_argument(format!(
            "image {:?}: target media type must be set",
            image.name
        )));
    }
    Ok(())
}

/// Fields an image filter can name: `name`, `target.digest`, `target.mediatype`,
/// `labels.<key>`, `annotations.<key>`.
pub fn image_field(image: &Image, path: &[String]) -> Option<String> {
    match (
        path.first().map(String::as_str)?,
        path.get(1).map(String::as_str),
    ) {
        ("name", None) => Some(image.name.clone()),
        ("target", Some("digest")) => Some(image.target.digest.to_string()),
        ("target", Some("mediatype")) => Some(image.target.media_type.clone()),
        ("labels", Some(_)) => image.labels.get(&path[1..].join(".")).cloned(),
        ("annotations", Some(_)) => image.target.annotations.get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

impl Metadata {
    /// One image; NotFound if absent.
    pub fn get_image(&self, ns: &Namespace, name: &str) -> Result<Image> {
        self.store
            .get_object::<ImageRecord>(ns, &ObjectKind::Images, name)?
            .map(|r| r.image(name.to_owned()))
            .ok_or_else(|| Error::not_found(format!("image {name:?}")))
    }

    /// Images matching `filter`, by name.
    pub fn list_images(&self, ns: &Namespace, filter: &Filter) -> Result<Vec<Image>> {
        Ok(self
            .store
            .list_objects::<ImageRecord>(ns, &ObjectKind::Images)?
            .into_iter()
            .map(|(name, r)| r.image(name))
            .filter(|i| filter.matches(&|path: &[String]| image_field(i, path)))
            .collect())
    }

    /// Creates an image (AlreadyExists if the name is taken). Times are `source_date_epoch`
    /// when given (reproducible builds), else now. Under a lease, the image joins it.
    pub async fn create_image(
        &self,
        ns: &Namespace,
        image: Image,
        source_date_epoch: Option<SystemTime>,
        lease: Option<&str>,
    ) -> Result<Image> {
        validate(&image)?;
        let at = source_date_epoch.unwrap_or_else(SystemTime::now);
        let record = ImageRecord {
            target: target_record(&image.target),
            labels: image.labels.clone(),
            created_at: at,
            updated_at: at,
        };
        let name = image.name.clone();
        self.store
            .write_then(
                |txn| {
                    if txn
                        .get_object::<ImageRecord>(ns, &ObjectKind::Images, &name)?
                        .is_some()
                    {
                        return Err(Error::already_exists(format!("image {name:?}")));
                    }
                    if let Some(lease) = lease {
                        leases::attach(
                            txn,
                            ns,
                            lease,
                            Resource {
                                kind: "images".into(),
                                id: name.clone(),
                            },
                        )?;
                    }
                    txn.put_object(ns, &ObjectKind::Images, &name, &record)
                },
                |()| {
                    self.mutated(Mutation::Change);
                    self.publish(
                        ns.as_str(),
                        "/images/create",
                        &berth_proto::containerd::services::images::v1::ImageCreate {
                            name: name.clone(),
                            labels: record.labels.clone().into_iter().collect(),
                        },
                    );
                },
            )
            .await?;
        Ok(record.image(name))
    }

    /// Updates an image (NotFound if absent, which `ctr images import` relies on). Field paths
    /// as containerd: `labels`, `labels.<key>`, `target`, `annotations`, `annotations.<key>`;
    /// none replaces labels and target.
    pub async fn update_image(
        &self,
        ns: &Namespace,
        image: Image,
        fieldpaths: &[String],
        source_date_epoch: Option<SystemTime>,
    ) -> Result<Image> {
        let name = image.name.clone();
        if name.is_empty() {
            return Err(Error::invalid_argument("image name must not be empty"));
        }
        let record = self
            .store
            .write_then(
                |txn| {
                    let mut record: ImageRecord =
                        txn.get_object(ns, &ObjectKind::Images, &name)?
                            .ok_or_else(|| Error::not_found(format!("image {name:?}")))?;
                    apply_fieldpaths(&mut record, &image, fieldpaths)?;
                    let updated = record.clone().image(name.clone());
                    validate(&updated)?;
                    record.updated_at = source_date_epoch.unwrap_or_else(SystemTime::now);
                    txn.put_object(ns, &ObjectKind::Images, &name, &record)?;
                    Ok(record)
                },
                |record| {
                    // A changed target can leave the old one unreferenced.
                    self.mutated(Mutation::Deletion);
                    self.publish(
                        ns.as_str(),
                        "/images/update",
                        &berth_proto::containerd::services::images::v1::ImageUpdate {
                            name: name.clone(),
                            labels: record.labels.clone().into_iter().collect(),
                        },
                    );
                },
            )
            .await?;
        Ok(record.image(name))
    }

    /// Deletes an image. With `target`, only if the image still points at that digest
    /// (otherwise NotFound and the image stays). With `sync`, returns after the collection.
    pub async fn delete_image(
        &self,
        ns: &Namespace,
        name: &str,
        target: Option<&Digest>,
        sync: bool,
    ) -> Result<()> {
        self.store
            .write_then(
                |txn| {
                    let record: ImageRecord = txn
                        .get_object(ns, &ObjectKind::Images, name)?
                        .ok_or_else(|| Error::not_found(format!("image {name:?}")))?;
                    if let Some(target) = target
                        && record.target.digest != *target
                    {
                        return Err(Error::not_found(format!(
                            "image {name:?} has target {}, not {target}",
                            record.target.digest
                        )));
                    }
                    txn.remove_object(ns, &ObjectKind::Images, name)
                },
                |()| {
                    self.mutated(Mutation::Deletion);
                    self.publish(
                        ns.as_str(),
                        "/images/delete",
                        &berth_proto::containerd::services::images::v1::ImageDelete {
                            name: name.to_owned(),
                        },
                    );
                },
            )
            .await?;
        if sync {
            self.schedule_and_wait().await?;
        }
        Ok(())
    }
}
