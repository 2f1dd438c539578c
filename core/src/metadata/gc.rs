//! Garbage collection: mark from the roots over the resource graph, sweep the rest.
//!
//! Roots: leases that have not expired (and what they hold), images, containers, sandboxes,
//! ingests that have not expired, and content or snapshots labelled `containerd.io/gc.root`.
//! Edges ([`Edge`]): an image's target; a container's snapshot; `containerd.io/gc.ref.content*`
//! labels (to a digest) and `containerd.io/gc.ref.snapshot.<snapshotter>*` labels (to a key);
//! a snapshot's parent; a shared ingest's expected digest.
//!
//! Marking and the metadata sweep run as one write (under the single-writer lock, so the view
//! is consistent and the sweep atomic). Then the backends are swept while commits are held
//! off: blobs no namespace records are deleted, backend ingests no namespace records aborted.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize as _;
use serde_json::Value;

use crate::content::CallContext;
use crate::error::{Classify, ErrorKind, Result};
use crate::filters::Filter;
use crate::metadata::content::IngestRecord;
use crate::metadata::db::Metadata;
use crate::metadata::leases::LeaseRecord;
use crate::metadata::{ObjectKind, WriteTxn};
use crate::namespace::Namespace;

/// Label that makes content or a snapshot a root.
pub const LABEL_ROOT: &str = "containerd.io/gc.root";
/// Prefix of labels referencing content by digest.
pub const LABEL_REF_CONTENT: &str = "containerd.io/gc.ref.content";
/// Prefix of labels referencing a snapshot: `containerd.io/gc.ref.snapshot.<snapshotter>`.
pub const LABEL_REF_SNAPSHOT: &str = "containerd.io/gc.ref.snapshot.";

/// A node of the resource graph.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    /// Its namespace.
    pub namespace: String,
    /// Its record kind (`content`, `snapshots/<sn>`, ...).
    pub kind: String,
    /// Its id within the kind.
    pub id: String,
}

/// Why one node keeps another alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edge {
    /// An image's target, or a `gc.ref.content` label.
    Content(String),
    /// A container's snapshot, a snapshot's parent, or a `gc.ref.snapshot` label.
    Snapshot {
        /// The snapshotter.
        snapshotter: String,
        /// The snapshot key.
        key: String,
    },
}

/// The edges a record's labels declare.
pub fn label_edges(labels: &serde_json::Map<String, Value>) -> Vec<Edge> {
    let mut edges = Vec::new();
    for (key, value) in labels {
        let Some(value) = value.as_str() else {
            continue;
        };
        if key == LABEL_REF_CONTENT || key.starts_with(&format!("{LABEL_REF_CONTENT}.")) {
            edges.push(Edge::Content(value.to_owned()));
        } else if let Some(rest) = key.strip_prefix(LABEL_REF_SNAPSHOT) {
            let snapshotter = rest.split('/').next().unwrap_or_default();
            if !snapshotter.is_empty() {
                edges.push(Edge::Snapshot {
                    snapshotter: snapshotter.to_owned(),
                    key: value.to_owned(),
                });
            }
        }
    }
    edges
}

fn structural_edges(kind: &str, record: &Value) -> Vec<Edge> {
    let mut edges = Vec::new();
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    match kind {
        "images" => {
            if let Some(d) = record.get("target").and_then(|t| text(t, "digest")) {
                edges.push(Edge::Content(d));
            }
        }
        "containers" => {
            if let (Some(sn), Some(key)) =
                (text(record, "snapshotter"), text(record, "snapshot_key"))
                && !sn.is_empty()
                && !key.is_empty()
            {
                edges.push(Edge::Snapshot {
                    snapshotter: sn,
                    key,
                });
            }
        }
        "ingests" => {
            // A shared ingest stands for a blob that another namespace may drop meanwhile.
            if record.get("shared").and_then(Value::as_bool) == Some(true)
                && let Some(d) = text(record, "expected")
            {
                edges.push(Edge::Content(d));
            }
        }
        _ => {
            if let Some(sn) = kind.strip_prefix("snapshots/")
                && let Some(parent) = text(record, "parent").filter(|p| !p.is_empty())
            {
                edges.push(Edge::Snapshot {
                    snapshotter: sn.to_owned(),
                    key: parent,
                });
            }
        }
    }
    edges
}

/// What a collection did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Records removed from the metadata store.
    pub removed: Vec<Node>,
    /// Blobs removed from the content backend.
    pub blobs_removed: usize,
    /// Backend ingests aborted.
    pub ingests_aborted: usize,
    /// Backend snapshots removed.
    pub snapshots_removed: usize,
    /// How long the collection took.
    pub duration: Duration,
}

struct Graph {
    records: std::collections::BTreeMap<Node, Value>,
    /// Each lease's resources, by namespace and lease id.
    lease_resources: std::collections::BTreeMap<(String, String), Vec<super::leases::Resource>>,
}

impl Graph {
    fn load(txn: &WriteTxn<'_>) -> Result<Graph> {
        let lease_resources = super::leases::all_resources(txn)?;
        let mut records = std::collections::BTreeMap::new();
        for (key, value) in txn.scan_prefix(b"o\0")? {
            let Some((ns, kind, id)) = super::key_parts(&key) else {
                continue;
            };
            let node = Node {
                namespace: String::from_utf8_lossy(ns).into_owned(),
                kind: String::from_utf8_lossy(kind).into_owned(),
                id: super::unescape_id(id),
            };
            let value: Value = serde_json::from_slice(&value).unwrap_or(Value::Null);
            records.insert(node, value);
        }
        Ok(Graph {
            records,
            lease_resources,
        })
    }

    fn labels(record: &Value) -> Option<&serde_json::Map<String, Value>> {
        record.get("labels").and_then(Value::as_object)
    }

    /// Marks everything reachable from the roots.
    fn mark(&self, now: SystemTime) -> HashSet<Node> {
        let mut marked = HashSet::new();
        // (node, follow label references)
        let mut queue: VecDeque<(Node, bool)> = VecDeque::new();
        for (node, record) in &self.records {
            match node.kind.as_str() {
                "leases" => {
                    let Ok(lease) = LeaseRecord::deserialize(record) else {
                        continue;
                    };
                    if lease.expired(now) {
                        continue;
                    }
                    marked.insert(node.clone());
                    let flat = lease.flat();
                    let key = (node.namespace.clone(), node.id.clone());
                    for r in self.lease_resources.get(&key).into_iter().flatten() {
                        if let Some(kind) = r.object_kind() {
                            queue.push_back((
                                Node {
                                    namespace: node.namespace.clone(),
                                    kind: kind.encode(),
                                    id: r.id.clone(),
                                },
                                !flat,
                            ));
                        }
                    }
                }
                "images" | "containers" | "sandboxes" => queue.push_back((node.clone(), true)),
                "ingests" => {
                    // As containerd: an ingest is a root only while its expiry lies ahead.
                    // Leased ingests have none; their lease holds them, and once it is gone
                    // nothing does.
                    let fresh = IngestRecord::deserialize(record)
                        .ok()
                        .and_then(|r| r.expires_at)
                        .is_some_and(|t| t >= now);
                    if fresh {
                        queue.push_back((node.clone(), true));
                    }
                }
                _ => {
                    if Self::labels(record).is_some_and(|l| l.contains_key(LABEL_ROOT)) {
                        queue.push_back((node.clone(), true));
                    }
                }
            }
        }
        while let Some((node, follow)) = queue.pop_front() {
            let Some(record) = self.records.get(&node) else {
                continue;
            };
            if !marked.insert(node.clone()) {
                continue;
            }
            let mut edges = structural_edges(&node.kind, record);
            if follow && let Some(labels) = Self::labels(record) {
                edges.extend(label_edges(labels));
            }
            for edge in edges {
                let (kind, id) = match edge {
                    // A flat lease still keeps a snapshot's parents: without them it is unusable.
                    Edge::Snapshot { snapshotter, key } => {
                        (format!("snapshots/{snapshotter}"), key)
                    }
                    Edge::Content(_) if !follow && node.kind.starts_with("snapshots/") => continue,
                    Edge::Content(d) => ("content".to_owned(), d),
                };
                queue.push_back((
                    Node {
                        namespace: node.namespace.clone(),
                        kind,
                        id,
                    },
                    follow,
                ));
            }
        }
        marked
    }
}

fn collectible(node: &Node) -> bool {
    matches!(node.kind.as_str(), "content" | "ingests" | "leases")
        || node.kind.starts_with("snapshots/")
}

impl Metadata {
    /// Removes the backend snapshots of `name` that no namespace records (`recorded`: the
    /// backend keys of the records the collection kept), children first. The caller lets the
    /// backend clean up afterwards.
    async fn sweep_snapshotter(
        &self,
        name: &str,
        backend: &std::sync::Arc<dyn crate::snapshot::Snapshotter>,
        recorded: Option<&BTreeSet<String>>,
    ) -> Result<usize> {
        let mut live = recorded.cloned().unwrap_or_default();
        // A commit a crash interrupted still needs its active backend snapshot until
        // recovery has finished it.
        live.extend(self.snapshot_intent_keys(name)?);
        let cx = CallContext::default();
        let mut dead: Vec<crate::snapshot::SnapshotInfo> = backend
            .list(&cx, &Filter::default())
            .await?
            .into_iter()
            .filter(|i| !live.contains(&i.name))
            .collect();
        let mut removed = 0;
        // Children before parents: remove leaves until nothing removable is left.
        loop {
            let parents: BTreeSet<String> = dead.iter().filter_map(|i| i.parent.clone()).collect();
            let (leaves, rest): (Vec<_>, Vec<_>) =
                dead.into_iter().partition(|i| !parents.contains(&i.name));
            if leaves.is_empty() {
                break;
            }
            for leaf in leaves {
                match backend.remove(&cx, &leaf.name).await {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(snapshotter = name, key = %leaf.name, error = %e, "cannot remove snapshot");
                    }
                }
            }
            dead = rest;
        }
        Ok(removed)
    }

    /// Removes the blobs and ingests of the content backend that no record keeps.
    async fn sweep_content(
        &self,
        backend: &std::sync::Arc<dyn crate::content::ContentStore>,
        live_blobs: &BTreeSet<String>,
        live_ingests: &BTreeSet<String>,
        report: &mut GcReport,
    ) -> Result<()> {
        let cx = CallContext::default();
        for info in backend.list(&cx, &Filter::default()).await? {
            if !live_blobs.contains(&info.digest.to_string()) {
                match backend.delete(&cx, &info.digest).await {
                    Ok(()) => report.blobs_removed += 1,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        for status in backend.list_statuses(&cx, &Filter::default()).await? {
            if !live_ingests.contains(&status.reference) {
                match backend.abort(&cx, &status.reference).await {
                    Ok(()) => report.ingests_aborted += 1,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Runs one collection: mark and metadata sweep atomically, then the backend sweep.
    pub async fn collect_garbage(&self) -> Result<GcReport> {
        let started = Instant::now();
        // Held exclusively: no commit is between its backend commit and its record now.
        let _gc = self.gc_lock.write().await;
        // Taken before the records are read: an operation that marks a backend from here on
        // has it walked by the next collection (see `DirtyBackends`).
        let content_dirty = self.dirty.take_content();
        let dirty_snapshotters: BTreeSet<&String> = self
            .snapshot_backends
            .keys()
            .filter(|name| self.dirty.take_snapshotter(name))
            .collect();
        let now = SystemTime::now();
        let store = std::sync::Arc::clone(&self.store);
        // The mark reads every record: on a blocking thread, not on an async worker, which
        // it would hold for the whole pass (a tenth of a second with 10,000 blobs).
        let pass = tokio::task::spawn_blocking(move || {
            store.write_unflushed(|txn| {
                let graph = Graph::load(txn)?;
                let marked = graph.mark(now);
                let mut removed = Vec::new();
                let mut live_blobs = BTreeSet::new();
                let mut live_ingests = BTreeSet::new();
                // Snapshotter name -> backend keys of the snapshot records kept.
                let mut live_snapshots: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                for (node, record) in &graph.records {
                    let keep = marked.contains(node) || !collectible(node);
                    if keep {
                        match node.kind.as_str() {
                            "content" => {
                                live_blobs.insert(node.id.clone());
                            }
                            "ingests" => {
                                if let Ok(r) = IngestRecord::deserialize(record) {
                                    if r.shared
                                        && let Some(e) = &r.expected
                                    {
                                        live_blobs.insert(e.to_string());
                                    }
                                    live_ingests.insert(r.backend_ref);
                                }
                            }
                            kind => {
                                if let Some(snapshotter) = kind.strip_prefix("snapshots/")
                                    && let Some(b) =
                                        record.get("backend_key").and_then(Value::as_str)
                                {
                                    live_snapshots
                                        .entry(snapshotter.to_owned())
                                        .or_default()
                                        .insert(b.to_owned());
                                }
                            }
                        }
                        continue;
                    }
                    let ns = Namespace::parse(&node.namespace)?;
                    let kind = match node.kind.as_str() {
                        "content" => ObjectKind::Content,
                        "ingests" => ObjectKind::Ingests,
                        "leases" => ObjectKind::Leases,
                        other => {
                            ObjectKind::Snapshots(other.trim_start_matches("snapshots/").to_owned())
                        }
                    };
                    txn.remove_object(&ns, &kind, &node.id)?;
                    removed.push(node.clone());
                }
                Ok((removed, live_blobs, live_ingests, live_snapshots))
            })
        });
        let swept = match pass.await {
            Ok(Ok((out, seq))) => self.store.durable(seq).await.map(|()| out),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(crate::Error::internal(format!("collection task: {e}"))),
        };
        let (removed, live_blobs, live_ingests, live_snapshots) = match swept {
            Ok(swept) => swept,
            Err(e) => {
                // Whatever this collection did not get to is walked by the next.
                self.dirty.set_all();
                return Err(e);
            }
        };
        let removed_kinds: BTreeSet<String> = removed.iter().map(|n| n.kind.clone()).collect();
        let removed_kind = |kind: &str| removed_kinds.contains(kind);

        let mut report = GcReport {
            removed,
            ..GcReport::default()
        };
        if let Some(backend) = &self.content_backend
            && (content_dirty || removed_kind("content") || removed_kind("ingests"))
        {
            let walked = self
                .sweep_content(backend, &live_blobs, &live_ingests, &mut report)
                .await;
            if let Err(e) = walked {
                self.dirty.set_all();
                return Err(e);
            }
        }
        let mut to_clean = Vec::new();
        for (name, backend) in &self.snapshot_backends {
            if !dirty_snapshotters.contains(name) && !removed_kind(&format!("snapshots/{name}")) {
                continue;
            }
            let removed = match self
                .sweep_snapshotter(name, backend, live_snapshots.get(name))
                .await
            {
                Ok(removed) => removed,
                Err(e) => {
                    self.dirty.set_all();
                    return Err(e);
                }
            };
            if removed > 0 {
                to_clean.push(backend);
            }
            report.snapshots_removed += removed;
        }
        // A backend's cleanup (removing the directories of the snapshots it no longer
        // records) concerns only what it has already forgotten, and ids are never reused: it
        // needs no lock of ours, so Prepare and Commit go on meanwhile instead of waiting
        // behind the slowest part of a collection.
        drop(_gc);
        let cx = CallContext::default();
        for backend in to_clean {
            backend.cleanup(&cx).await?;
        }
        report.duration = started.elapsed();
        tracing::debug!(
            removed = report.removed.len(),
            blobs = report.blobs_removed,
            ingests = report.ingests_aborted,
            duration = ?report.duration,
            "garbage collected"
        );
        Ok(report)
    }
}

/// Settings of the GC scheduler (`[plugins."io.containerd.gc.v1.scheduler"]`), as containerd.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Target fraction of time spent collecting (capped at 0.5): the pause between
    /// collections is `average / threshold - average`.
    pub pause_threshold: f64,
    /// Deletions that trigger a collection; 0 means every deletion does.
    pub deletion_threshold: u64,
    /// Mutations after which a collection runs at the next opportunity.
    pub mutation_threshold: u64,
    /// Delay between a trigger and the collection (a Go duration such as "0ms").
    pub schedule_delay: String,
    /// Delay before the first collection after start.
    pub startup_delay: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            pause_threshold: 0.02,
            deletion_threshold: 0,
            mutation_threshold: 100,
            schedule_delay: "0ms".into(),
            startup_delay: "100ms".into(),
        }
    }
}

/// Parses a Go duration ("100ms", "1.5s", "1m30s", "0").
pub fn parse_go_duration(text: &str) -> Result<Duration> {
    let bad = || {
        crate::Error::invalid_argument(format!(
            "invalid duration {text:?}: use e.g. 100ms, 1s, 1m30s"
        ))
    };
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * seconds;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

impl Graph {
    #[cfg(test)]
    fn from_records(
        records: Vec<(Node, Value)>,
        lease_resources: Vec<(Node, Vec<super::leases::Resource>)>,
    ) -> Graph {
        Graph {
            records: records.into_iter().collect(),
            lease_resources: lease_resources
                .into_iter()
                .map(|(lease, resources)| ((lease.namespace, lease.id), resources))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(ns: &str, kind: &str, id: &str) -> Node {
        Node {
            namespace: ns.into(),
            kind: kind.into(),
            id: id.into(),
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("0").ok(), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("0ms").ok(), Some(Duration::ZERO));
        assert_eq!(
            parse_go_duration("100ms").ok(),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            parse_go_duration("1m30s").ok(),
            Some(Duration::from_secs(90))
        );
        assert!(parse_go_duration("10 parsecs").is_err());
        assert!(parse_go_duration("").is_err());
    }

    #[test]
    fn marking_follows_labels_targets_and_parents() {
        let now = SystemTime::now();
        let graph = Graph::from_records(
            vec![
                (
                    node("a", "images", "img"),
                    json!({"target": {"digest": "sha256:m"}}),
                ),
                (
                    node("a", "content", "sha256:m"),
                    json!({"labels": {"containerd.io/gc.ref.content.l.0": "sha256:l",
                                   "containerd.io/gc.ref.snapshot.overlayfs": "top"}}),
                ),
                (node("a", "content", "sha256:l"), json!({})),
                (node("a", "content", "sha256:orphan"), json!({})),
                (
                    node("a", "snapshots/overlayfs", "top"),
                    json!({"parent": "base"}),
                ),
                (node("a", "snapshots/overlayfs", "base"), json!({})),
                (node("a", "snapshots/overlayfs", "stray"), json!({})),
                (node("b", "content", "sha256:l"), json!({})),
                (
                    node("b", "content", "sha256:rooted"),
                    json!({"labels": {"containerd.io/gc.root": "x"}}),
                ),
            ],
            Vec::new(),
        );
        let marked = graph.mark(now);
        for kept in [
            node("a", "images", "img"),
            node("a", "content", "sha256:m"),
            node("a", "content", "sha256:l"),
            node("a", "snapshots/overlayfs", "top"),
            node("a", "snapshots/overlayfs", "base"),
            node("b", "content", "sha256:rooted"),
        ] {
            assert!(marked.contains(&kept), "{kept:?} must be kept");
        }
        for gone in [
            node("a", "content", "sha256:orphan"),
            node("a", "snapshots/overlayfs", "stray"),
            // References never cross namespaces.
            node("b", "content", "sha256:l"),
        ] {
            assert!(!marked.contains(&gone), "{gone:?} must be collected");
        }
    }

    #[test]
    fn flat_and_expired_leases() {
        let now = SystemTime::now();
        let lease = |labels: Value| {
            json!({"created_at": {"secs_since_epoch": 0, "nanos_since_epoch": 0},
                   "labels": labels})
        };
        let holds = |lease: &str, id: &str| {
            (
                node("a", "leases", lease),
                vec![super::super::leases::Resource {
                    kind: "content".into(),
                    id: id.into(),
                }],
            )
        };
        let graph = Graph::from_records(
            vec![
                (
                    node("a", "leases", "flat"),
                    lease(json!({"containerd.io/gc.flat": "1"})),
                ),
                (
                    node("a", "content", "sha256:f"),
                    json!({"labels": {"containerd.io/gc.ref.content": "sha256:child"}}),
                ),
                (node("a", "content", "sha256:child"), json!({})),
                (
                    node("a", "leases", "old"),
                    lease(json!({"containerd.io/gc.expire": "2000-01-01T00:00:00Z"})),
                ),
                (node("a", "content", "sha256:o"), json!({})),
            ],
            vec![holds("flat", "sha256:f"), holds("old", "sha256:o")],
        );
        let marked = graph.mark(now);
        assert!(marked.contains(&node("a", "content", "sha256:f")));
        assert!(
            !marked.contains(&node("a", "content", "sha256:child")),
            "flat leases do not follow labels"
        );
        assert!(
            !marked.contains(&node("a", "content", "sha256:o")),
            "expired leases protect nothing"
        );
        assert!(
            !marked.contains(&node("a", "leases", "old")),
            "expired leases are collected"
        );
    }
}
