//! `berth-bench`: runs the same work against berthd and Debian's containerd on the same machine,
//! alternating the daemons run by run, and writes medians and ratios to `bench/REPORT.md`.
//!
//! It builds nothing: run `cargo build --release -p berthd` first (or set `$BERTHD`).
//!
//! Adding a workload: implement [`Workload`] (its metrics with their targets, and one run against
//! one daemon kind) and list it in [`workloads`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use berth_integration::{Daemon, Kind, Options, Profile, block_on_global};
use clap::Parser;

mod content;
mod images;
mod placement;
mod proxy;
mod pull;
mod results;

/// Benchmarks berthd against Debian's containerd and writes bench/REPORT.md.
#[derive(Debug, Parser)]
#[command(name = "berth-bench")]
struct Args {
    /// Measured runs per daemon (the daemons alternate run by run).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Unmeasured warm-up runs per daemon before the measured ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Measured runs per daemon for the heavy workloads (1 GiB ingest, 1000 leases, 10k blobs).
    #[arg(long, default_value_t = 3)]
    heavy_runs: usize,
    /// Warm-up runs per daemon for the heavy workloads.
    #[arg(long, default_value_t = 0)]
    heavy_warmup: usize,
    /// Seconds a freshly started daemon idles before its RSS is read.
    #[arg(long, default_value_t = 2.0)]
    idle_secs: f64,
    /// Where to write the report. The samples go beside it (same name, `.json`): a run of
    /// some workloads replaces theirs there and the report shows every workload's last run.
    #[arg(long, default_value_os_t = default_report())]
    output: PathBuf,
    /// Run only the workloads with these names (default: all).
    #[arg(long = "workload")]
    workloads: Vec<String>,
    /// Print the workloads and exit.
    #[arg(long)]
    list: bool,
}

fn default_report() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("REPORT.md")
}

/// Whether smaller or larger values are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Times, memory.
    Lower,
    /// Throughput.
    Higher,
}

/// A named measurement a workload produces, with berth's target relative to containerd.
#[derive(Debug, Clone)]
pub struct Metric {
    /// Short name, unique across workloads.
    pub name: &'static str,
    /// Unit of the values (`ms`, `MiB`, ...).
    pub unit: &'static str,
    /// Target for berthd/containerd: at most this ratio (for [`Better::Lower`]) or at least
    /// (for [`Better::Higher`]).
    pub target_ratio: Option<f64>,
    /// Direction.
    pub better: Better,
    /// How it is measured, for the report.
    pub method: &'static str,
}

/// A ratio within one daemon: the same work done directly and through something (a proxy),
/// reported as how many times slower the indirect way is (above 1: slower).
#[derive(Debug, Clone)]
pub struct Overhead {
    /// Short name for the report.
    pub name: &'static str,
    /// The metric measured directly.
    pub direct: &'static str,
    /// The metric measured through the indirection.
    pub through: &'static str,
    /// The metrics' direction: for a rate the overhead is direct/through, for a time
    /// through/direct.
    pub better: Better,
    /// berthd's overhead must stay below this.
    pub target: Option<f64>,
}

impl Overhead {
    /// The overhead from the two medians (NaN when either is missing).
    pub fn ratio(&self, direct: f64, through: f64) -> f64 {
        match self.better {
            Better::Higher => direct / through,
            Better::Lower => through / direct,
        }
    }
}

/// Settings every workload sees.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Idle time before the RSS reading.
    pub idle: Duration,
}

/// One kind of work measured against both daemons.
pub trait Workload {
    /// Name shown in the report and used by `--workload`.
    fn name(&self) -> &'static str;
    /// What it measures.
    fn metrics(&self) -> Vec<Metric>;
    /// One run against a daemon of `kind`: a value for each metric, by name.
    fn run(&self, kind: Kind, ctx: &Ctx) -> Result<BTreeMap<&'static str, f64>>;
    /// Heavy workloads run `--heavy-runs` times after `--heavy-warmup` warm-ups instead of
    /// `--runs` and `--warmup`, to keep the whole bench near ten minutes.
    fn heavy(&self) -> bool {
        false
    }
    /// At most this many measured runs per daemon (and no warm-up), whatever the options say.
    fn runs_cap(&self) -> Option<usize> {
        None
    }
    /// Extra lines for the report (after the runs).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// Ratios within one daemon, reported in their own table.
    fn overheads(&self) -> Vec<Overhead> {
        Vec::new()
    }
}

/// Start-up time and idle memory of a freshly started daemon on a private root.
struct StartupIdle;

impl Workload for StartupIdle {
    fn name(&self) -> &'static str {
        "startup-idle"
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric {
                name: "start-up",
                unit: "ms",
                target_ratio: Some(0.5),
                better: Better::Lower,
                method: "process spawn until the first Version RPC reply on its socket. The \
                         harness polls every 5 ms with a plain connect() on the unix socket and, \
                         once that succeeds, a tonic connect + containerd.services.version.v1 \
                         Version call (what `ctr version` does first, without ctr's own \
                         start-up). Fresh private root, state and socket each run.",
            },
            Metric {
                name: "idle RSS",
                unit: "MiB",
                target_ratio: Some(1.0 / 3.0),
                better: Better::Lower,
                method: "VmRSS from /proc/<pid>/status after start-up and the idle time \
                         (--idle-secs). For containerd only the containerd process counts (no \
                         shims run).",
            },
        ]
    }

    fn run(&self, kind: Kind, ctx: &Ctx) -> Result<BTreeMap<&'static str, f64>> {
        let d = Daemon::launch(
            kind,
            Options {
                profile: Profile::Release,
                poll_interval: Duration::from_millis(5),
                ..Options::default()
            },
        )?;
        let startup = d
            .startup_time()
            .context("the harness did not record the start-up time")?;
        thread::sleep(ctx.idle);
        let rss = d.rss_kib()?;
        Ok(BTreeMap::from([
            ("start-up", startup.as_secs_f64() * 1000.0),
            ("idle RSS", rss as f64 / 1024.0),
        ]))
    }
}

/// Every workload, in report order. Later issues append theirs here.
fn workloads() -> Vec<Box<dyn Workload>> {
    let ten_k = content::TenK::default();
    vec![
        Box::new(StartupIdle),
        Box::new(content::Ingest1G::new()),
        Box::new(content::LeaseCreateDelete),
        Box::new(content::ContentLs10k(ten_k.clone())),
        Box::new(content::Gc10k(ten_k)),
        Box::new(images::SnapshotOps),
        Box::new(images::ImageImport::new()),
        Box::new(pull::Pull::new()),
        Box::new(proxy::ProxyOverhead::new()),
    ]
}

/// Samples of one metric for one daemon.
#[derive(Debug, Default, Clone)]
struct Samples(Vec<f64>);

impl Samples {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
    /// `median (min–max)`, or `n/a` when nothing was measured.
    fn summary(&self) -> String {
        if self.0.is_empty() {
            "n/a".to_string()
        } else {
            format!("{:.2} ({:.2}–{:.2})", self.median(), self.min(), self.max())
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("berth-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let all = workloads();
    if args.list {
        for w in &all {
            let names: Vec<&str> = w.metrics().iter().map(|m| m.name).collect();
            println!("{}: {}", w.name(), names.join(", "));
        }
        return Ok(());
    }
    for name in &args.workloads {
        if !all.iter().any(|w| w.name() == name) {
            bail!("unknown workload {name:?} (see --list)");
        }
    }
    if args.runs == 0 || args.heavy_runs == 0 {
        bail!("--runs and --heavy-runs must be at least 1");
    }
    let selected: Vec<&dyn Workload> = all
        .iter()
        .map(|w| w.as_ref())
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name()))
        .collect();

    let berthd = berth_integration::berthd_binary(Profile::Release).context(
        "berth-bench measures the release build: run `cargo build --release -p berthd` first",
    )?;
    let containerd = berth_integration::containerd_binary()?;
    // Start the harness runtime now so its set-up is not part of the first measurement.
    block_on_global(async {});

    let ctx = Ctx {
        idle: Duration::from_secs_f64(args.idle_secs),
    };
    let versions = daemon_versions();

    let results_path = args.output.with_extension("json");
    let mut stored = results::Results::load(&results_path);
    let command = command_line();
    let berthd_text = format!(
        "`{}`, {}",
        berthd.display(),
        versions
            .get(&Kind::Berthd)
            .map(String::as_str)
            .unwrap_or("?")
    );
    let containerd_text = format!(
        "`{}`, {}",
        containerd.display(),
        versions
            .get(&Kind::Containerd)
            .map(String::as_str)
            .unwrap_or("?")
    );
    for w in &selected {
        let (warmup, runs) = match (w.runs_cap(), w.heavy()) {
            (Some(cap), true) => (0, cap.min(args.heavy_runs)),
            (Some(cap), false) => (0, cap.min(args.runs)),
            (None, true) => (args.heavy_warmup, args.heavy_runs),
            (None, false) => (args.warmup, args.runs),
        };
        // samples[metric][daemon]
        let mut samples: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
        for i in 0..warmup + runs {
            let measured = i >= warmup;
            // Alternate which daemon goes first, so neither always runs on a warmer machine.
            let order = if i % 2 == 0 {
                [Kind::Containerd, Kind::Berthd]
            } else {
                [Kind::Berthd, Kind::Containerd]
            };
            for kind in order {
                let values = w
                    .run(kind, &ctx)
                    .with_context(|| format!("{} against {kind}", w.name()))?;
                // What this run left dirty is written back now, not during the next run.
                nix::unistd::sync();
                let label = if measured {
                    format!("run {}/{}", i - warmup + 1, runs)
                } else {
                    "warm-up".to_string()
                };
                let shown: Vec<String> =
                    values.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
                eprintln!("{} {label} {kind}: {}", w.name(), shown.join(", "));
                if measured {
                    for (metric, v) in values {
                        samples
                            .entry(metric.to_string())
                            .or_default()
                            .entry(kind.name().to_string())
                            .or_default()
                            .push(v);
                    }
                }
            }
        }
        stored.workloads.insert(
            w.name().to_string(),
            results::WorkloadRun {
                date: utc_now(),
                command: command.clone(),
                berthd: berthd_text.clone(),
                containerd: containerd_text.clone(),
                runs,
                warmup,
                samples,
                notes: w.notes(),
            },
        );
        // Saved after each workload: a later failure keeps what was measured.
        stored.save(&results_path)?;
    }

    let report = render(&all, &stored);
    print!("{report}");
    std::fs::write(&args.output, &report)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "wrote {} (samples in {})",
        args.output.display(),
        results_path.display()
    );
    Ok(())
}

/// How this bench was started, for the report.
fn command_line() -> String {
    let env: String = ["BERTHD", "CONTAINERD", "CARGO_TARGET_DIR"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v} ")))
        .collect();
    let argv: Vec<String> = std::env::args().collect();
    format!("{env}{}", argv.join(" "))
}

/// `(berthd version, containerd version)` from a Version RPC against one short-lived instance
/// of each.
fn daemon_versions() -> BTreeMap<Kind, String> {
    let mut v = BTreeMap::new();
    for kind in Kind::ALL {
        let text = Daemon::launch(
            kind,
            Options {
                profile: Profile::Release,
                ..Options::default()
            },
        )
        .and_then(|d| {
            let socket = d.socket().to_path_buf();
            block_on_global(async move {
                berth_integration::version_with_timeout(&socket, Duration::from_secs(5)).await
            })
        })
        .map(|r| format!("{} ({})", r.version, r.revision))
        .unwrap_or_else(|e| format!("unknown: {e:#}"));
        v.insert(kind, text);
    }
    v
}

fn render(all: &[Box<dyn Workload>], stored: &results::Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# berth benchmark report\n");
    let _ = writeln!(s, "- Rendered: {}", utc_now());
    let _ = writeln!(s, "- Machine: {}", machine());
    let _ = writeln!(
        s,
        "- Build first: `cargo build --release -p berthd -p berth-cli -p berth-bench`; each row \
         comes from the last run of its workload (`./target/release/berth-bench --workload \
         NAME`), its samples in `REPORT.json`."
    );
    let present: Vec<(&dyn Workload, &results::WorkloadRun)> = all
        .iter()
        .filter_map(|w| stored.workloads.get(w.name()).map(|r| (w.as_ref(), r)))
        .collect();
    // One line per distinct run (workloads measured by the same command share it).
    let mut runs: Vec<(&results::WorkloadRun, Vec<&str>)> = Vec::new();
    for (w, r) in &present {
        match runs
            .iter_mut()
            .find(|(seen, _)| seen.command == r.command && seen.berthd == r.berthd)
        {
            Some((_, names)) => names.push(w.name()),
            None => runs.push((r, vec![w.name()])),
        }
    }
    for (r, names) in &runs {
        let _ = writeln!(
            s,
            "- {}: {} (`{}`), {} measured runs per daemon after {} warm-up, alternating the \
             daemons run by run; berthd {}; containerd {}",
            names.join(", "),
            r.date,
            r.command,
            r.runs,
            r.warmup,
            r.berthd,
            r.containerd
        );
    }
    let _ = writeln!(s);

    let _ = writeln!(
        s,
        "| workload | metric | berthd median (min–max) | containerd median (min–max) | berthd/containerd | target | met |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (w, r) in &present {
        for m in w.metrics() {
            let b = Samples(r.samples(m.name, Kind::Berthd.name()));
            let c = Samples(r.samples(m.name, Kind::Containerd.name()));
            if b.0.is_empty() && c.0.is_empty() {
                continue;
            }
            let ratio = b.median() / c.median();
            let (target, met) = match m.target_ratio {
                Some(t) => {
                    let ok = match m.better {
                        Better::Lower => ratio <= t,
                        Better::Higher => ratio >= t,
                    };
                    let op = match m.better {
                        Better::Lower => "≤",
                        Better::Higher => "≥",
                    };
                    (
                        format!("{op} {t:.2}x"),
                        if ok { "met" } else { "not met" }.to_string(),
                    )
                }
                None => ("—".to_string(), "—".to_string()),
            };
            let _ = writeln!(
                s,
                "| {} | {} ({}) | {} | {} | {} | {} | {} |",
                w.name(),
                m.name,
                m.unit,
                b.summary(),
                c.summary(),
                if ratio.is_finite() {
                    format!("{ratio:.2}x")
                } else {
                    "n/a".to_string()
                },
                target,
                met
            );
        }
    }
    let overheads: Vec<(&dyn Workload, &results::WorkloadRun, Overhead)> = present
        .iter()
        .flat_map(|(w, r)| w.overheads().into_iter().map(move |o| (*w, *r, o)))
        .collect();
    if !overheads.is_empty() {
        let _ = writeln!(s, "\n## Overheads within one daemon\n");
        let _ = writeln!(
            s,
            "How many times slower the same work is through the indirection than direct, from \
             the medians above (1.00x: no cost). The target applies to berthd.\n"
        );
        let _ = writeln!(
            s,
            "| workload | overhead | berthd | containerd | target | met |\n|---|---|---|---|---|---|"
        );
        for (w, r, o) in &overheads {
            let of = |kind: Kind| {
                o.ratio(
                    Samples(r.samples(o.direct, kind.name())).median(),
                    Samples(r.samples(o.through, kind.name())).median(),
                )
            };
            let shown = |v: f64| {
                if v.is_finite() {
                    format!("{v:.2}x")
                } else {
                    "n/a".to_string()
                }
            };
            let b = of(Kind::Berthd);
            let (target, met) = match o.target {
                Some(t) => (
                    format!("< {t:.2}x"),
                    if b < t { "met" } else { "not met" }.to_string(),
                ),
                None => ("—".to_string(), "—".to_string()),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                w.name(),
                o.name,
                shown(b),
                shown(of(Kind::Containerd)),
                target,
                met
            );
        }
    }
    let _ = writeln!(s, "\n## Methods\n");
    for (w, _) in &present {
        for m in w.metrics() {
            let _ = writeln!(s, "- **{} / {}**: {}", w.name(), m.name, m.method);
        }
    }
    let notes: Vec<&String> = present.iter().flat_map(|(_, r)| &r.notes).collect();
    if !notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    let _ = writeln!(
        s,
        "\nEach run starts the daemon on a fresh private root, state and socket under /tmp (Debian's containerd with config version 2 and the CRI plugin disabled) and stops it with SIGTERM afterwards. The content, lease, GC and image workloads give both daemons the same extra TOML, `[plugins.\"io.containerd.gc.v1.scheduler\"] startup_delay = \"1h\"`, so the automatic collection 100 ms after start-up never lands inside a measurement; snapshot-ops keeps the default collector settings and starts measuring 300 ms after start-up. After each run its directory is deleted and the bench calls sync(2), so no run's writeback lands in the next. Durability is alike: containerd's bolt fdatasyncs each commit, berthd fdatasyncs its metadata redo log (a pre-written file of fixed size that every write of its database is appended to) for each (group) flush. Timings are reported here only; they are never part of pass/fail tests.\n\n**This machine's file system.** The root ext4 of this VM has no journal (`/proc/fs/jbd2/` lists none for it). Without one, ext4 skips on every inode allocation each free inode deleted in the last minute or more, reading its on-disk inode to find out (`recently_deleted()` in `fs/ext4/ialloc.c`), and starts that scan again for the next file. Every run creates its files right after the previous run's directory, with tens of thousands of files for the unpacking workloads, was deleted, and a new directory lands in its parent's block group, the one just emptied: `perf` put a third of an unpack's CPU time in `find_inode_bit`/`recently_deleted`. berthd's snapshotters mark `staging/`, where each snapshot directory is made, with FS_TOPDIR_FL (`chattr +T`, the top of unrelated hierarchies), so ext4's Orlov allocator places each snapshot in a block group of its own choosing; containerd's snapshotters do not. That placement is a large part of berthd's margin in the unpacking rows here. The rows named 'same placement' give containerd the same flag on its overlayfs `snapshots/` and show what is left of the margin. A journaled ext4 or XFS has no recently-deleted scan."
    );
    s
}

fn machine() -> String {
    let nproc = thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.1} GiB RAM", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "? RAM".into());
    format!("nproc {nproc}, Linux {kernel}, {cpu}, {mem}")
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(Samples(vec![3.0, 1.0, 2.0]).median(), 2.0);
        assert_eq!(Samples(vec![4.0, 1.0, 2.0, 3.0]).median(), 2.5);
        assert_eq!(Samples(vec![4.0, 1.0]).min(), 1.0);
        assert_eq!(Samples(vec![4.0, 1.0]).max(), 4.0);
        assert!(Samples(vec![]).median().is_nan());
    }

    #[test]
    fn overheads_read_above_one_when_the_indirect_way_is_slower() {
        let rate = Overhead {
            name: "r",
            direct: "d",
            through: "t",
            better: Better::Higher,
            target: Some(1.5),
        };
        // 300 cycles/s direct, 200 through: 1.5 times slower.
        assert_eq!(rate.ratio(300.0, 200.0), 1.5);
        let time = Overhead {
            better: Better::Lower,
            ..rate
        };
        // 2 s direct, 3 s through: 1.5 times slower.
        assert_eq!(time.ratio(2.0, 3.0), 1.5);
        assert!(time.ratio(f64::NAN, 3.0).is_nan());
    }

    #[test]
    fn date_format() {
        let s = utc_now();
        assert_eq!(s.len(), "2026-01-01 00:00:00 UTC".len(), "{s}");
        assert!(s.starts_with("20"), "{s}");
    }
}
