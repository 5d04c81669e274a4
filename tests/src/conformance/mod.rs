//! Kubernetes' own e2e suite (`e2e.test` from the same release as the
//! cluster, run by its `ginkgo`) against the test cluster, and its JUnit
//! report read back: what `cargo xtask test` (the `[sig-network] Services`
//! conformance specs) and `cargo xtask conformance` (all of
//! `[sig-network]`, with svc-proxy and with kube-proxy) run.

use std::{
    fmt::Write as _,
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::cluster::KubeCluster;
pub use junit::{Junit, SpecResult, State, read_junit};

pub mod doc;
mod junit;

/// The specs every CI run passes: Kubernetes' conformance specs of the
/// `Services` group (15 in v1.37.2; the two API-only ones of older lists,
/// the master service and the Endpoints lifecycle, moved to `API Server`
/// and `Endpoints`).
pub const CI_FOCUS: &str = r"\[sig-network\] Services.*\[Conformance\]";

/// What never runs once a focus is set (the suite skips these by itself
/// only without one): alpha, beta and optional features, flaky specs, and
/// specs that restart or break cluster components. `[Serial]` specs run,
/// alone, after the parallel ones (ginkgo's `Serial` decorator).
pub const ALWAYS_SKIPPED: &[(&str, &str)] = &[
    (
        r"\[Feature:[^\]]+\]",
        "a feature outside the default set (alpha, beta or optional)",
    ),
    (r"\[Flaky\]", "marked flaky upstream"),
    (
        r"\[Disruptive\]",
        "restarts or breaks cluster components (the API server, kube-proxy as a pod, a node's rules)",
    ),
];

/// One run of the suite.
pub struct Suite<'a> {
    /// A ginkgo regular expression of spec names.
    pub focus: &'a str,
    /// Skipped specs (expression, reason); `ALWAYS_SKIPPED` comes on top.
    pub skip: &'a [(&'a str, &'a str)],
    /// Parallel ginkgo processes: the machine has 2 cores.
    pub procs: u8,
    /// The whole suite's limit.
    pub timeout: Duration,
    /// Where the JUnit report, the suite's log and its artifacts go.
    pub report_dir: PathBuf,
}

/// A finished run.
pub struct Report {
    pub specs: Vec<SpecResult>,
    pub elapsed: Duration,
    /// ginkgo's output.
    pub log: PathBuf,
}

impl Report {
    #[must_use]
    pub fn count(&self, state: State) -> usize {
        self.specs.iter().filter(|spec| spec.state == state).count()
    }

    /// The specs that ran and did not pass.
    #[must_use]
    pub fn failed(&self) -> Vec<&SpecResult> {
        self.specs
            .iter()
            .filter(|spec| spec.state == State::Failed)
            .collect()
    }

    /// A line per spec that ran.
    #[must_use]
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for spec in self
            .specs
            .iter()
            .filter(|spec| spec.state != State::Skipped)
        {
            let _ = writeln!(
                out,
                "{:>6} {:>6.1}s {}{}",
                match spec.state {
                    State::Passed => "ok",
                    State::Failed => "FAILED",
                    State::Skipped => "skip",
                },
                spec.seconds,
                spec.name,
                if spec.state == State::Failed {
                    format!("\n{:>15}{}", "", spec.message)
                } else {
                    String::new()
                }
            );
        }
        let _ = write!(
            out,
            "{} passed, {} failed, {} skipped in {:?}",
            self.count(State::Passed),
            self.count(State::Failed),
            self.count(State::Skipped),
            self.elapsed
        );
        out
    }
}

/// The skip expression ginkgo gets: every pattern of `skip` and
/// [`ALWAYS_SKIPPED`].
#[must_use]
pub fn skip_expression(skip: &[(&str, &str)]) -> String {
    ALWAYS_SKIPPED
        .iter()
        .chain(skip)
        .map(|(pattern, _)| *pattern)
        .collect::<Vec<_>>()
        .join("|")
}

/// Runs `suite` against `cluster` (its proxy already in place) and reads
/// the report.
///
/// # Panics
///
/// When the suite cannot start or writes no report (a spec failing is a
/// result, not a panic).
#[must_use]
pub fn run(cluster: &KubeCluster, suite: &Suite) -> Report {
    // An earlier run's report must not pass for this one's.
    let _ = fs::remove_dir_all(&suite.report_dir);
    fs::create_dir_all(&suite.report_dir)
        .unwrap_or_else(|err| panic!("{}: {err}", suite.report_dir.display()));
    let log = suite.report_dir.join("e2e.log");
    let out = fs::File::create(&log).unwrap_or_else(|err| panic!("{}: {err}", log.display()));
    let started = Instant::now();
    let status = Command::new(cluster.bin.join("ginkgo"))
        .arg(format!("--procs={}", suite.procs))
        .arg(format!("--focus={}", suite.focus))
        .arg(format!("--skip={}", skip_expression(suite.skip)))
        .arg(format!("--timeout={}s", suite.timeout.as_secs()))
        .args(["--no-color", "--silence-skips", "-v"])
        .arg(cluster.bin.join("e2e.test"))
        .arg("--")
        .arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
        .arg(format!(
            "--kubectl-path={}",
            cluster.bin.join("kubectl").display()
        ))
        .arg("--provider=skeleton")
        .arg(format!("--num-nodes={}", cluster.nodes.len()))
        .arg(format!("--report-dir={}", suite.report_dir.display()))
        .arg("--disable-log-dump=true")
        // Specs leave their namespaces to the namespace controller.
        .arg("--delete-namespace-on-failure=true")
        // No provider setup (as kind's and Cilium's conformance jobs).
        .env("KUBERNETES_CONFORMANCE_TEST", "y")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log file"))
        .stderr(out)
        .status()
        .expect("running ginkgo");
    let elapsed = started.elapsed();
    let junit = suite.report_dir.join("junit_01.xml");
    let Junit { specs, .. } = read_junit(&junit).unwrap_or_else(|err| {
        panic!(
            "the suite ({status}) wrote no readable report {}: {err}; see {}",
            junit.display(),
            log.display()
        )
    });
    Report {
        specs,
        elapsed,
        log,
    }
}
