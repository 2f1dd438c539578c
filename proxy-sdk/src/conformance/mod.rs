//! Conformance suites: one per plugin kind, as library functions taking a factory, so the
//! same cases run against every implementation: compiled in, behind the core's metadata
//! wrapper, through the gRPC client and server adapters, or in a vendor's proxy plugin.
//!
//! Behaviour that legitimately differs between implementations is declared by the factory
//! as capabilities (plain booleans), never inferred from names. A suite runs every case,
//! each on a fresh instance, and reports all failures by case name.

use std::fmt;

pub mod content;
pub mod snapshotter;

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
