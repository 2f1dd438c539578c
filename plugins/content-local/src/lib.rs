//! berth's local content store, plugin `io.containerd.content.v1.content`: blobs on the local
//! file system, in containerd's layout.
//!
//! ```text
//! <root>/                                  (the plugin's root, exported as `root`)
//!   blobs/<algorithm>/<hex>                committed blobs, mode 0444
//!   ingest/<sha256 of the ref, hex>/       one ingest (write in progress)
//!     ref         the reference text; written last, so a directory without it is the
//!                 remains of an interrupted creation (ignored, removed by `prepare`)
//!     data        the bytes written so far; its length is the ingest's offset
//!     total       expected size in decimal, absent when unknown
//!     expected    expected digest, absent when unknown
//!     startedat   decimal unix nanoseconds
//!     updatedat   decimal unix nanoseconds of the last close (the data file's modification
//!                 time is newer while a writer appends)
//! ```
//!
//! The behaviour is the contract of [`berth_core::content`], with these choices, taken from
//! containerd's `plugins/content/local`:
//!
//! - **Refs** may hold any text: the directory is named by their SHA-256. One writer per ref
//!   in this process (a second gets Unavailable, "ref X locked for ..."); dropping a writer
//!   releases the ref like closing it.
//! - **Resume**: opening a writer on an existing ingest re-hashes its data, so the digest
//!   always covers every byte on disk, whatever a crash left. An ingest that cannot be resumed
//!   (interrupted creation, a different `total` requested) is started over, as containerd
//!   does.
//! - **Commit**: fsync the data, verify size and digest (FailedPrecondition, the ingest stays),
//!   set the blob's time and mode 0444, then rename it into `blobs/` with `RENAME_NOREPLACE`
//!   and fsync the directory. A blob that is already there is AlreadyExists and the ingest is
//!   dropped. Nothing is ever visible under a digest before its bytes are verified and
//!   durable.
//! - **Labels** are the metadata layer's job: this store keeps none, `info` returns empty
//!   labels and `update` of a stored blob is FailedPrecondition ("immutable content store",
//!   containerd's answer when it has no label store). `created_at` and `updated_at` are both
//!   the commit time.
//! - **Truncate** supports 0 only (start over); any other size is NotImplemented.
//! - **Abort** removes an ingest even while a writer holds it (containerd does too); that
//!   writer's commit then fails with NotFound.
//! - The [`CallContext`](berth_core::content::CallContext) is ignored: the store is not
//!   namespaced; the core's metadata layer namespaces it.
//!
//! File-system work runs on tokio's blocking pool. Durability: committed blobs are fsynced
//! with their directory; ingest metadata is not, because resuming re-verifies the data.

mod files;
mod layout;
mod locks;
mod store;
mod writer;

use std::sync::Arc;

use berth_core::content::ContentKind;
use berth_core::registry::{Instance, PluginType, Registration};

pub use store::LocalStore;

/// The registration of `io.containerd.content.v1.content`: a [`LocalStore`] in the plugin's
/// root directory, which init creates; exports `root`.
pub fn registration() -> Registration {
    Registration::new(PluginType::CONTENT, "content", |ctx| async move {
        let store = LocalStore::new(ctx.root());
        store.prepare().await?;
        let root = store.root().display().to_string();
        ctx.set_meta(|meta| {
            meta.exports.insert("root".to_owned(), root);
        });
        Ok(Instance::new::<ContentKind>(Arc::new(store)))
    })
}
