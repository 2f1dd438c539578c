//! Conformance suites: one per plugin kind, as library functions taking a factory, so the
//! same cases run against every implementation: compiled in, behind the core's metadata
//! wrapper, through the gRPC client and server adapters, or in a vendor's proxy plugin.
//!
//! Behaviour that legitimately differs between implementations is declared by the factory
//! as capabilities (plain booleans), never inferred from names. A suite runs every case,
//! each on a fresh instance, and reports all failures by case name.

use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Fails the case with the formatted message unless `cond` holds (the case's error type is a
/// `String` or a [`Stop`]).
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+).into());
        }
    };
}

/// Fails the case unless `got == want`, naming both.
macro_rules! ensure_eq {
    ($got:expr, $want:expr, $($arg:tt)+) => {{
        let (got, want) = (&$got, &$want);
        if got != want {
            return Err(format!(
                "{}: got {:?}, expected {:?}", format!($($arg)+), got, want
            )
            .into());
        }
    }};
}

pub mod content;
pub mod differ;
pub mod snapshotter;

/// Why a case of the snapshotter or differ suite stopped early.
enum Stop {
    Fail(String),
    Skip(String),
}

impl From<String> for Stop {
    fn from(message: String) -> Self {
        Stop::Fail(message)
    }
}

/// What a suite run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Cases that passed.
    pub passed: Vec<&'static str>,
    /// Cases skipped, with the reason (a capability the implementation does not declare).
    pub skipped: Vec<(&'static str, String)>,
}

/// One failed case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseFailure {
    /// The case's name.
    pub case: &'static str,
    /// What went wrong, with the step that failed.
    pub message: String,
}

/// A suite run with at least one failed case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteFailure {
    /// The suite's name, e.g. `content`.
    pub suite: &'static str,
    /// Every failed case, in the order they ran.
    pub failures: Vec<CaseFailure>,
    /// The cases that passed or were skipped.
    pub report: Report,
}

impl fmt::Display for SuiteFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} conformance: {} case(s) failed, {} passed, {} skipped",
            self.suite,
            self.failures.len(),
            self.report.passed.len(),
            self.report.skipped.len()
        )?;
        for failure in &self.failures {
            writeln!(f, "  case `{}`: {}", failure.case, failure.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for SuiteFailure {}

/// How a case ended when it did not fail.
pub(crate) enum Outcome {
    Passed,
    Skipped(String),
}

/// Runs `case` for every name in order and gathers the outcomes into a report, or into a
/// failure naming every failed case. Skips are printed: a skipped case must never read as
/// a pass.
pub(crate) async fn run_suite<Fut>(
    suite: &'static str,
    names: &[&'static str],
    mut case: impl FnMut(&'static str) -> Fut,
) -> Result<Report, SuiteFailure>
where
    Fut: Future<Output = Result<Outcome, String>>,
{
    let mut report = Report::default();
    let mut failures = Vec::new();
    for &name in names {
        match case(name).await {
            Ok(Outcome::Passed) => report.passed.push(name),
            Ok(Outcome::Skipped(why)) => {
                eprintln!("{suite} conformance: SKIPPED case `{name}`: {why}");
                report.skipped.push((name, why));
            }
            Err(message) => failures.push(CaseFailure {
                case: name,
                message,
            }),
        }
    }
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(SuiteFailure {
            suite,
            failures,
            report,
        })
    }
}

/// Runs one case body on its own task, so a panicking implementation (or case) and a hung
/// one are reported as that case's failure instead of taking the suite down.
pub(crate) async fn run_guarded<T: Send + 'static>(
    limit: Duration,
    body: impl Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    match tokio::spawn(tokio::time::timeout(limit, body)).await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(_)) => Err(format!("did not finish within {limit:?}")),
        Err(join) if join.is_panic() => {
            let payload = join.into_panic();
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic".to_owned());
            Err(format!("panicked: {text}"))
        }
        Err(join) => Err(format!("case task failed: {join}")),
    }
}

/// Timestamps come from a coarse clock (a scheduler tick behind the time a test reads just
/// before), so time windows are widened by this much.
pub(crate) const SLACK: Duration = Duration::from_millis(100);

/// A span of time something must have happened in.
#[derive(Clone, Copy)]
pub(crate) struct Window {
    from: SystemTime,
    to: SystemTime,
}

impl Window {
    /// A window opening now.
    pub(crate) fn start() -> Self {
        let now = SystemTime::now();
        Window { from: now, to: now }
    }

    /// The window, closed now.
    pub(crate) fn close(mut self) -> Self {
        self.to = SystemTime::now();
        self
    }

    /// Whether `t` lies in the window (widened by [`SLACK`]); `what` names it in the error.
    pub(crate) fn check(&self, t: SystemTime, what: &str) -> Result<(), String> {
        let early = self.from.checked_sub(SLACK).unwrap_or(UNIX_EPOCH);
        if t >= early && t <= self.to + SLACK {
            Ok(())
        } else {
            Err(format!(
                "{what}: {} is outside [{}, {}]",
                Unix(t),
                Unix(self.from),
                Unix(self.to)
            ))
        }
    }
}

/// A time shown as Unix seconds with nanoseconds.
struct Unix(SystemTime);

impl fmt::Display for Unix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.duration_since(UNIX_EPOCH) {
            Ok(d) => write!(f, "{}.{:09}", d.as_secs(), d.subsec_nanos()),
            Err(_) => f.write_str("before 1970"),
        }
    }
}
