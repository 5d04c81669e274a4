//! `cargo xtask bench datapath`: runs the `bench-datapath` binary (release
//! build) and renders its JSON as the Markdown table `docs/benchmarks.md`
//! quotes, with the machine and kernel it ran on.

use std::{fmt::Write as _, fs};

use anyhow::{Context as _, Result};
use serde::Deserialize;

use crate::cmd;

/// Builds a benchmark binary of the `tests` crate (release) and returns
/// its path.
fn build_bench_binary(name: &str) -> Result<std::path::PathBuf> {
    cmd::run(&mut cmd::cargo([
        "build",
        "--release",
        "--package",
        "tests",
        "--bin",
        name,
    ]))?;
    Ok(cmd::workspace_root().join("target/release").join(name))
}

/// Runs benchmark binary `name` with `--out target/bench/<stem>.json` and
/// `args`, reads the figures it wrote back, and writes `render`'s Markdown
/// of them beside the JSON (and prints it).
fn run_and_render<T: serde::de::DeserializeOwned>(
    name: &str,
    stem: &str,
    args: &[String],
    render: impl FnOnce(&[T]) -> String,
) -> Result<()> {
    let root = cmd::workspace_root();
    let json = root.join(format!("target/bench/{stem}.json"));
    let markdown = root.join(format!("target/bench/{stem}.md"));
    cmd::run(
        std::process::Command::new(build_bench_binary(name)?)
            .arg("--out")
            .arg(&json)
            .args(args),
    )?;
    let text = fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
    let figures: Vec<T> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    let table = render(&figures);
    fs::write(&markdown, &table).with_context(|| format!("writing {}", markdown.display()))?;
    println!("{table}");
    eprintln!("wrote {} and {}", json.display(), markdown.display());
    Ok(())
}

#[derive(Deserialize)]
struct Sample {
    case: String,
    services: u32,
    ns_per_pkt: f64,
}

pub fn datapath(repeat: u32, services: &[u32]) -> Result<()> {
    let mut args = vec!["--repeat".to_owned(), repeat.to_string()];
    for count in services {
        args.extend(["--services".to_owned(), count.to_string()]);
    }
    run_and_render("bench-datapath", "datapath", &args, render)
}

#[derive(Deserialize)]
struct ControlPlaneSample {
    case: String,
    services: u32,
    value: f64,
    unit: String,
}

/// `cargo xtask bench control-plane`.
pub fn control_plane() -> Result<()> {
    run_and_render(
        "bench-control-plane",
        "control-plane",
        &[],
        |samples: &[ControlPlaneSample]| {
            let mut table = format!(
                "Machine: {}; kernel {}.\n\n| case | services | value |\n|---|---:|---:|\n",
                cpu_model(),
                kernel()
            );
            for sample in samples {
                let _ = writeln!(
                    table,
                    "| {} | {} | {:.3} {} |",
                    sample.case, sample.services, sample.value, sample.unit
                );
            }
            table
        },
    )
}

#[derive(Deserialize)]
struct MaglevFigure {
    slots: u32,
    backends: u32,
    metric: String,
    value: f64,
}

/// `cargo xtask bench maglev`: runs `bench-maglev` and renders, per table
/// size M (rows) and backend count N (columns), the share of flows moved
/// by removing one backend as a multiple of the ideal 1/N, and the build
/// time.
pub fn maglev() -> Result<()> {
    run_and_render("bench-maglev", "maglev", &[], render_maglev)
}

fn render_maglev(figures: &[MaglevFigure]) -> String {
    let value = |slots: u32, backends: u32, metric: &str| {
        figures
            .iter()
            .find(|f| f.slots == slots && f.backends == backends && f.metric == metric)
            .map(|f| f.value)
    };
    let mut sizes: Vec<u32> = figures.iter().map(|f| f.slots).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut counts: Vec<u32> = figures.iter().map(|f| f.backends).collect();
    counts.sort_unstable();
    counts.dedup();
    let mut out = format!("Machine: {}; kernel {}.\n", cpu_model(), kernel());
    for (title, cell) in [
        (
            "Flows moved when one of N backends is removed, as a multiple of the ideal 1/N",
            &(|m, n| {
                value(m, n, "moved_on_remove")
                    .zip(value(m, n, "ideal_on_remove"))
                    .map(|(moved, ideal)| format!("{:.2}", moved / ideal))
            }) as &dyn Fn(u32, u32) -> Option<String>,
        ),
        (
            "Flows moved when a backend is added to N, as a multiple of the ideal 1/(N+1)",
            &|m, n| {
                value(m, n, "moved_on_add")
                    .zip(value(m, n, "ideal_on_add"))
                    .map(|(moved, ideal)| format!("{:.2}", moved / ideal))
            },
        ),
        ("Most slots of one backend over the mean M/N", &|m, n| {
            value(m, n, "imbalance").map(|v| format!("{v:.3}"))
        }),
        ("Build time (ms, fastest of at least 5)", &|m, n| {
            value(m, n, "build").map(|v| format!("{v:.3}"))
        }),
    ] {
        let _ = write!(out, "\n{title}:\n\n| M (table bytes) |");
        for n in &counts {
            let _ = write!(out, " N = {n} |");
        }
        out.push_str("\n|---|");
        for _ in &counts {
            out.push_str("---:|");
        }
        out.push('\n');
        for &m in &sizes {
            let _ = write!(out, "| {m} ({} KiB) |", m * 4 / 1024);
            for &n in &counts {
                let _ = write!(out, " {} |", cell(m, n).unwrap_or_else(|| "-".to_owned()));
            }
            out.push('\n');
        }
    }
    out
}

fn render(samples: &[Sample]) -> String {
    let mut counts: Vec<u32> = samples.iter().map(|s| s.services).collect();
    counts.sort_unstable();
    counts.dedup();
    let mut cases: Vec<&str> = Vec::new();
    for sample in samples {
        if !cases.contains(&sample.case.as_str()) {
            cases.push(&sample.case);
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "Machine: {}; kernel {}.\n", cpu_model(), kernel());
    out.push_str("| case |");
    for count in &counts {
        let _ = write!(out, " {count} services |");
    }
    out.push_str(" last/first |\n|---|");
    for _ in &counts {
        out.push_str("---:|");
    }
    out.push_str("---:|\n");
    for case in cases {
        let _ = write!(out, "| {case} |");
        let figures: Vec<f64> = counts
            .iter()
            .map(|count| {
                samples
                    .iter()
                    .find(|s| s.case == case && s.services == *count)
                    .map_or(f64::NAN, |s| s.ns_per_pkt)
            })
            .collect();
        for figure in &figures {
            let _ = write!(out, " {figure:.0} ns |");
        }
        let first = figures.first().copied().unwrap_or(f64::NAN);
        let last = figures.last().copied().unwrap_or(f64::NAN);
        let _ = writeln!(out, " {:.2} |", last / first);
    }
    out
}

fn cpu_model() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{model}, {cpus} CPUs")
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
        |_| "unknown".to_owned(),
        |release| release.trim().to_owned(),
    )
}
