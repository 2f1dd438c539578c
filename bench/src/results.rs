//! The samples of every workload's last run, kept beside the report (`REPORT.json` next to
//! `REPORT.md`): a run of some workloads replaces their results and keeps the others', and
//! the report is rendered from all of them, each with the date and command of its own run.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Every workload's last run, by workload name.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Results {
    /// Workload name -> its last run.
    pub workloads: BTreeMap<String, WorkloadRun>,
}

/// One run of one workload against both daemons.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadRun {
    /// When it ended, `YYYY-MM-DD HH:MM:SS UTC`.
    pub date: String,
    /// The bench command line.
    pub command: String,
    /// berthd's binary and version.
    pub berthd: String,
    /// containerd's binary and version.
    pub containerd: String,
    /// Measured runs per daemon, after `warmup` unmeasured ones.
    pub runs: usize,
    /// Unmeasured runs per daemon.
    pub warmup: usize,
    /// Metric name -> daemon (`berthd`, `containerd`) -> samples.
    pub samples: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    /// The workload's notes from that run.
    pub notes: Vec<String>,
}

impl WorkloadRun {
    /// The samples of `metric` for `daemon` (empty when not measured).
    pub fn samples(&self, metric: &str, daemon: &str) -> Vec<f64> {
        self.samples
            .get(metric)
            .and_then(|by_daemon| by_daemon.get(daemon))
            .cloned()
            .unwrap_or_default()
    }
}

impl Results {
    /// Reads `path`; a missing file is an empty set. An unreadable one is set aside with a
    /// warning rather than stopping a long bench run at its end.
    pub fn load(path: &Path) -> Results {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Results::default(),
            Err(e) => {
                eprintln!(
                    "berth-bench: cannot read {} ({e}); starting a new set of results",
                    path.display()
                );
                return Results::default();
            }
        };
        serde_json::from_str(&text).unwrap_or_else(|e| {
            eprintln!(
                "berth-bench: {} is not a results file ({e}); starting a new set of results",
                path.display()
            );
            Results::default()
        })
    }

    /// Writes `path` (through a temporary file and a rename, so it is never half written).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("serialising the results")?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_replacement_keep_other_workloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("REPORT.json");
        assert!(Results::load(&path).workloads.is_empty());
        let run = |date: &str, v: f64| WorkloadRun {
            date: date.into(),
            command: "berth-bench".into(),
            berthd: "b".into(),
            containerd: "c".into(),
            runs: 1,
            warmup: 0,
            samples: BTreeMap::from([(
                "m".to_string(),
                BTreeMap::from([("berthd".to_string(), vec![v])]),
            )]),
            notes: vec![],
        };
        let mut results = Results::default();
        results.workloads.insert("a".into(), run("d1", 1.0));
        results.workloads.insert("b".into(), run("d1", 2.0));
        results.save(&path).expect("save");
        let mut again = Results::load(&path);
        again.workloads.insert("b".into(), run("d2", 3.0));
        again.save(&path).expect("save");
        let last = Results::load(&path);
        assert_eq!(last.workloads["a"].date, "d1");
        assert_eq!(last.workloads["b"].date, "d2");
        assert_eq!(last.workloads["b"].samples("m", "berthd"), vec![3.0]);
        assert!(last.workloads["b"].samples("m", "containerd").is_empty());
        std::fs::write(&path, "not json").expect("write");
        assert!(Results::load(&path).workloads.is_empty());
    }
}
