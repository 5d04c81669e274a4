//! `docs/conformance.md`, written from the JUnit reports of the wide run
//! with each proxy: what ran, what passed, what was skipped and why, and
//! every failure with its cause.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path, process::Command};

use regex::Regex;

use super::{ALWAYS_SKIPPED, Junit, SpecResult, State, read_junit};

/// The proxy a run had in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    SvcProxy,
    KubeProxy,
}

impl Proxy {
    /// # Panics
    ///
    /// On anything but `svc-proxy` or `kube-proxy`.
    #[must_use]
    pub fn parse(name: &str) -> Self {
        match name {
            "svc-proxy" => Self::SvcProxy,
            "kube-proxy" => Self::KubeProxy,
            other => panic!("--proxy takes svc-proxy or kube-proxy, not {other}"),
        }
    }

    /// Its report directory's name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SvcProxy => "svc-proxy",
            Self::KubeProxy => "kube-proxy",
        }
    }
}

/// The wide run's skips beyond [`ALWAYS_SKIPPED`], each with what this
/// machine or cluster lacks.
pub const WIDE_SKIPPED: &[(&str, &str)] = &[(
    r"DNS configMap nameserver",
    "reconfigures the cluster's DNS through the `kube-system/coredns` ConfigMap of CoreDNS pods; this cluster's CoreDNS runs on the host (`kube-dns` has no pods), and the specs test the DNS server, not the proxy",
)];

/// Why a spec fails, where the cause is known (a substring of its name,
/// the proxy or `None` for both, the cause).
const KNOWN_CAUSES: &[(&str, Option<Proxy>, &str)] = &[];

/// The wide focus's reports under `out` (`<proxy>/junit_01.xml`) as
/// Markdown at `doc`.
///
/// # Errors
///
/// svc-proxy's report is missing or the document cannot be written.
pub fn write(out: &Path, focus: &str, procs: u8, doc: &Path) -> Result<(), String> {
    let read = |proxy: Proxy| {
        let path = out.join(proxy.name()).join("junit_01.xml");
        read_junit(&path).map_err(|err| format!("{}: {err}", path.display()))
    };
    let ours = read(Proxy::SvcProxy)?;
    let theirs = read(Proxy::KubeProxy).ok();
    let text = render(focus, procs, &ours, theirs.as_ref());
    fs::write(doc, text).map_err(|err| format!("{}: {err}", doc.display()))
}

/// What one spec did in one run.
fn outcome(spec: &SpecResult, skips: &[(Regex, &str)]) -> String {
    match spec.state {
        State::Passed => "passed".to_owned(),
        State::Failed => "**failed**".to_owned(),
        State::Skipped => {
            if let Some((_, reason)) = skips.iter().find(|(re, _)| re.is_match(&spec.name)) {
                format!("skipped: {reason}")
            } else {
                format!(
                    "skipped itself: {}",
                    spec.message.trim_start_matches("skipped - ")
                )
            }
        }
    }
}

/// Counts of one run over the focus.
struct Counts {
    in_focus: usize,
    filtered: usize,
    passed: usize,
    failed: usize,
    skipped_itself: usize,
}

fn counts(specs: &[&SpecResult], skips: &[(Regex, &str)]) -> Counts {
    let filtered = |spec: &&&SpecResult| {
        spec.state == State::Skipped && skips.iter().any(|(re, _)| re.is_match(&spec.name))
    };
    let state = |state| specs.iter().filter(|spec| spec.state == state).count();
    let filtered = specs.iter().filter(filtered).count();
    Counts {
        in_focus: specs.len(),
        filtered,
        passed: state(State::Passed),
        failed: state(State::Failed),
        skipped_itself: state(State::Skipped) - filtered,
    }
}

fn compile(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|err| panic!("{pattern}: {err}"))
}

#[expect(clippy::too_many_lines, reason = "one document, section by section")]
fn render(focus: &str, procs: u8, ours: &Junit, theirs: Option<&Junit>) -> String {
    let focus_re = compile(focus);
    let skips: Vec<(Regex, &str)> = ALWAYS_SKIPPED
        .iter()
        .chain(WIDE_SKIPPED)
        .map(|(pattern, reason)| (compile(pattern), *reason))
        .collect();
    let in_focus = |report: &'_ Junit| -> BTreeMap<String, SpecResult> {
        report
            .specs
            .iter()
            .filter(|spec| focus_re.is_match(&spec.name))
            .map(|spec| (spec.name.clone(), spec.clone()))
            .collect()
    };
    let our_specs = in_focus(ours);
    let their_specs = theirs.map(in_focus).unwrap_or_default();
    let ours_counts = counts(&our_specs.values().collect::<Vec<_>>(), &skips);
    let theirs_counts = counts(&their_specs.values().collect::<Vec<_>>(), &skips);

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Kubernetes' e2e suite: `{focus}` with svc-proxy and with kube-proxy\n\n\
         Written by `cargo xtask conformance` from the JUnit reports under \
         `target/conformance/` (do not edit by hand). Each proxy ran on a \
         fresh two-node test cluster ([deploy.md](deploy.md#the-test-cluster-cargo-xtask-cluster)): \
         svc-proxy as its DaemonSet from its image with svc-cni chained, or \
         upstream kube-proxy in nftables mode as a process in each node's \
         network namespace; no other difference.\n"
    );
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| Date | {} |", today());
    for (what, module, file) in [
        (
            "Kubernetes (e2e.test, kube-proxy, kubelet, control plane)",
            "k8s.io/kubernetes",
            "tests/conformance/go.mod",
        ),
        (
            "containerd",
            "github.com/containerd/containerd/v2",
            "tests/cluster/containerd/go.mod",
        ),
        (
            "runc",
            "github.com/opencontainers/runc",
            "tests/cluster/runc/go.mod",
        ),
        (
            "CoreDNS",
            "github.com/coredns/coredns",
            "tests/cluster/coredns/go.mod",
        ),
    ] {
        let _ = writeln!(md, "| {what} | {} |", required_version(file, module));
    }
    let _ = writeln!(md, "| Machine | {} |", machine());
    let _ = writeln!(
        md,
        "| Run | ginkgo, {procs} parallel processes (`[Serial]` specs alone at the end), `KUBERNETES_CONFORMANCE_TEST=y`, `--provider=skeleton` |\n"
    );

    let _ = writeln!(md, "## Results\n");
    let _ = writeln!(
        md,
        "| specs | svc-proxy | kube-proxy (nftables) |\n|---|---:|---:|"
    );
    let seconds = |report: Option<&Junit>| {
        report.map_or_else(
            || "not run".to_owned(),
            |r| format!("{:.0} min", r.seconds / 60.0),
        )
    };
    let theirs_cell = |value: usize| {
        if theirs.is_some() {
            value.to_string()
        } else {
            "not run".to_owned()
        }
    };
    for (label, a, b) in [
        ("in the focus", ours_counts.in_focus, theirs_counts.in_focus),
        (
            "skipped by the list below",
            ours_counts.filtered,
            theirs_counts.filtered,
        ),
        (
            "ran",
            ours_counts.passed + ours_counts.failed,
            theirs_counts.passed + theirs_counts.failed,
        ),
        ("**passed**", ours_counts.passed, theirs_counts.passed),
        ("failed", ours_counts.failed, theirs_counts.failed),
        (
            "skipped themselves (provider, node count, ...)",
            ours_counts.skipped_itself,
            theirs_counts.skipped_itself,
        ),
    ] {
        let _ = writeln!(md, "| {label} | {a} | {} |", theirs_cell(b));
    }
    let _ = writeln!(
        md,
        "| wall time | {} | {} |\n",
        seconds(Some(ours)),
        seconds(theirs)
    );
    let passed_by_both_missing: Vec<&String> = their_specs
        .iter()
        .filter(|(name, spec)| {
            spec.state == State::Passed
                && our_specs
                    .get(*name)
                    .is_none_or(|ours| ours.state != State::Passed)
        })
        .map(|(name, _)| name)
        .collect();
    let _ = writeln!(
        md,
        "Specs kube-proxy passes that svc-proxy does not: {}.\n",
        if theirs.is_none() {
            "unknown (kube-proxy's run is missing)".to_owned()
        } else if passed_by_both_missing.is_empty() {
            "none".to_owned()
        } else {
            passed_by_both_missing
                .iter()
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );

    let _ = writeln!(md, "## Skipped, and why\n");
    let _ = writeln!(
        md,
        "| pattern | reason | specs in the focus |\n|---|---|---:|"
    );
    for (re, reason) in &skips {
        let matched = our_specs.keys().filter(|name| re.is_match(name)).count();
        let _ = writeln!(
            md,
            "| `{}` | {reason} | {matched} |",
            re.as_str().replace('|', "\\|")
        );
    }
    let _ = writeln!(
        md,
        "\nSpecs that skipped themselves say why in the table of every spec below \
         (a cloud provider, a feature the cluster does not enable, a node count).\n"
    );

    let _ = writeln!(md, "## Failures\n");
    let mut any = false;
    for (proxy, specs) in [
        (Proxy::SvcProxy, &our_specs),
        (Proxy::KubeProxy, &their_specs),
    ] {
        for spec in specs.values().filter(|spec| spec.state == State::Failed) {
            any = true;
            let cause = KNOWN_CAUSES
                .iter()
                .find(|(name, only, _)| {
                    spec.name.contains(name) && only.is_none_or(|only| only == proxy)
                })
                .map_or("not yet explained", |(_, _, cause)| cause);
            let _ = writeln!(
                md,
                "- **{}**, `{}`: {}\n  - failure: `{}`",
                proxy.name(),
                spec.name,
                cause,
                spec.message.replace('`', "'")
            );
        }
    }
    if !any {
        let _ = writeln!(md, "None.");
    }

    let _ = writeln!(md, "\n## Every spec of the focus\n");
    let _ = writeln!(md, "| spec | svc-proxy | kube-proxy |\n|---|---|---|");
    for (name, spec) in &our_specs {
        let theirs = their_specs
            .get(name)
            .map_or_else(|| "not run".to_owned(), |spec| outcome(spec, &skips));
        let _ = writeln!(
            md,
            "| {} | {} | {theirs} |",
            name.replace('|', "\\|"),
            outcome(spec, &skips)
        );
    }
    md
}

/// The version `file` (relative to the workspace) requires of `module`.
fn required_version(file: &str, module: &str) -> String {
    let path = crate::workspace_root().join(file);
    let text = fs::read_to_string(&path).unwrap_or_default();
    text.lines()
        .find_map(|line| {
            let line = line.trim().trim_start_matches("require ");
            let rest = line.strip_prefix(module)?.strip_prefix(' ')?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .unwrap_or_else(|| format!("unknown ({file} requires no {module})"))
}

/// CPU model and count, memory, kernel.
fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim())
        .to_owned();
    let cpus = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| (kib + (1 << 19)) >> 20);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cpus} CPUs, {gib} GiB, kernel {}", kernel.trim())
}

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map_or_else(|| "unknown".to_owned(), |day| day.trim().to_owned())
}
