//! `cargo xtask bench`: runs the benchmarks (each a release binary of the
//! `tests` crate writing `target/bench/<part>.json`), records the run's
//! machine and versions beside each, and renders what is there into the
//! generated sections of `docs/benchmarks.md` and the plots under
//! `docs/img/`.

mod plots;
mod tables;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::{cmd, setup, upstream};

/// A part of the benchmark run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// Nanoseconds per packet of the tc programs (`BPF_PROG_TEST_RUN`).
    Datapath,
    /// The agent's own pipeline: programming from cold, one change, memory.
    ControlPlane,
    /// Maglev table quality: build time, imbalance, disruption.
    Maglev,
    /// svc-proxy next to kube-proxy (iptables, nftables) on one topology.
    Proxies,
}

impl Part {
    const ALL: [Self; 4] = [
        Self::Datapath,
        Self::ControlPlane,
        Self::Maglev,
        Self::Proxies,
    ];

    /// The JSON file's stem and the generated section's name.
    const fn stem(self) -> &'static str {
        match self {
            Self::Datapath => "datapath",
            Self::ControlPlane => "control-plane",
            Self::Maglev => "maglev",
            Self::Proxies => "proxies",
        }
    }

    const fn binary(self) -> &'static str {
        match self {
            Self::Datapath => "bench-datapath",
            Self::ControlPlane => "bench-control-plane",
            Self::Maglev => "bench-maglev",
            Self::Proxies => "bench-proxies",
        }
    }
}

/// What `cargo xtask bench` was asked.
#[derive(clap::Args)]
pub struct Options {
    /// Parts to run (default: all).
    #[arg(value_enum)]
    pub parts: Vec<Part>,
    /// Fewer service counts, shorter runs: a few minutes.
    #[arg(long)]
    pub quick: bool,
    /// Service counts of the datapath and side-by-side parts
    /// (repeatable; defaults per part).
    #[arg(long = "services")]
    pub services: Vec<u32>,
    /// Proxies of the side-by-side part (repeatable: svc-proxy,
    /// kube-proxy-iptables, kube-proxy-nftables; default all).
    #[arg(long = "proxy")]
    pub proxies: Vec<String>,
    /// Iterations per `BPF_PROG_TEST_RUN` call of the datapath part.
    #[arg(long)]
    pub repeat: Option<u32>,
    /// Run nothing: render the docs and plots from target/bench/.
    #[arg(long)]
    pub render_only: bool,
    /// Side-by-side part: keep the figures of target/bench/proxies.json
    /// this run does not measure (other counts or proxies).
    #[arg(long)]
    pub merge: bool,
    /// Side-by-side part: give a proxy up when it has not programmed the
    /// services after this long (default 15).
    #[arg(long)]
    pub limit_minutes: Option<u32>,
}

/// One figure, as every benchmark binary writes it.
#[derive(Clone, Debug, Deserialize)]
pub struct Figure {
    pub proxy: String,
    pub services: u32,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    #[serde(default)]
    pub slots: Option<u32>,
    #[serde(default)]
    pub backends: Option<u32>,
}

/// Where and with what a part ran: `target/bench/<part>.run.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunInfo {
    pub date: String,
    pub machine: String,
    pub kernel: String,
    pub commit: String,
    pub quick: bool,
    /// Peer versions (kube-proxy, iptables, nft) for the side-by-side part.
    #[serde(default)]
    pub versions: Vec<String>,
}

pub fn run(options: &Options) -> Result<()> {
    let parts = if options.parts.is_empty() {
        Part::ALL.to_vec()
    } else {
        options.parts.clone()
    };
    if !options.render_only {
        setup::ensure_bench_packages()?;
        for &part in &parts {
            run_part(part, options)?;
        }
    }
    render(&parts)
}

fn bench_dir() -> PathBuf {
    cmd::workspace_root().join("target/bench")
}

fn run_part(part: Part, options: &Options) -> Result<()> {
    let mut args: Vec<String> = Vec::new();
    let mut command;
    match part {
        Part::Datapath => {
            let repeat = options
                .repeat
                .unwrap_or(if options.quick { 100_000 } else { 1_000_000 });
            args.extend(["--repeat".to_owned(), repeat.to_string()]);
            let services: &[u32] = if !options.services.is_empty() {
                &options.services
            } else if options.quick {
                &[1, 10_000]
            } else {
                &[]
            };
            for count in services {
                args.extend(["--services".to_owned(), count.to_string()]);
            }
            command = Command::new(build_bench_binary(part.binary())?);
        }
        Part::ControlPlane | Part::Maglev => {
            if options.quick && part == Part::ControlPlane {
                args.push("--quick".to_owned());
            }
            command = Command::new(build_bench_binary(part.binary())?);
        }
        Part::Proxies => {
            // The agent the side-by-side run starts, next to the binary.
            cmd::run(&mut cmd::cargo([
                "build",
                "--release",
                "--package",
                "svc-agent",
            ]))?;
            let bin = upstream::binaries()?;
            if options.quick {
                args.push("--quick".to_owned());
            }
            for count in &options.services {
                args.extend(["--services".to_owned(), count.to_string()]);
            }
            for proxy in &options.proxies {
                args.extend(["--proxy".to_owned(), proxy.clone()]);
            }
            if options.merge {
                args.push("--merge".to_owned());
            }
            if let Some(minutes) = options.limit_minutes {
                args.extend(["--limit-minutes".to_owned(), minutes.to_string()]);
            }
            command = Command::new(build_bench_binary(part.binary())?);
            command.env(upstream::BIN_DIR_ENV, &bin);
        }
    }
    // Written first: a long run stopped half-way keeps what it measured
    // (the binaries write their figures as they go) and where.
    let info = RunInfo {
        date: cmd::output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?
            .trim()
            .to_owned(),
        machine: machine(),
        kernel: kernel(),
        commit: commit(),
        quick: options.quick,
        versions: if part == Part::Proxies {
            peer_versions()?
        } else {
            Vec::new()
        },
    };
    fs::create_dir_all(bench_dir())?;
    let path = bench_dir().join(format!("{}.run.json", part.stem()));
    fs::write(&path, serde_json::to_string_pretty(&info)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let json = bench_dir().join(format!("{}.json", part.stem()));
    cmd::run(command.arg("--out").arg(&json).args(&args))
}

/// Builds a benchmark binary of the `tests` crate (release) and returns
/// its path.
fn build_bench_binary(name: &str) -> Result<PathBuf> {
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

/// Reads a part's figures and run record; `None` when it never ran here.
fn load(part: Part) -> Result<Option<(Vec<Figure>, RunInfo)>> {
    let json = bench_dir().join(format!("{}.json", part.stem()));
    let run = bench_dir().join(format!("{}.run.json", part.stem()));
    if !json.is_file() || !run.is_file() {
        return Ok(None);
    }
    let read = |path: &Path| {
        fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let figures = serde_json::from_str(&read(&json)?)
        .with_context(|| format!("parsing {}", json.display()))?;
    let info =
        serde_json::from_str(&read(&run)?).with_context(|| format!("parsing {}", run.display()))?;
    Ok(Some((figures, info)))
}

/// Rewrites the generated section of each part in `docs/benchmarks.md`
/// (and the plots) from `target/bench/`.
fn render(parts: &[Part]) -> Result<()> {
    let doc_path = cmd::workspace_root().join("docs/benchmarks.md");
    let mut doc =
        fs::read_to_string(&doc_path).with_context(|| format!("reading {}", doc_path.display()))?;
    let img = cmd::workspace_root().join("docs/img");
    fs::create_dir_all(&img).with_context(|| format!("creating {}", img.display()))?;
    plots::register_font()?;
    for &part in parts {
        let Some((figures, info)) = load(part)? else {
            eprintln!("bench: no figures of {} under target/bench/", part.stem());
            continue;
        };
        let mut section = tables::header(&info);
        section.push_str(&match part {
            Part::Datapath => tables::datapath(&figures),
            Part::ControlPlane => tables::control_plane(&figures),
            Part::Maglev => {
                plots::maglev(&figures, &img)?;
                tables::maglev(&figures)
            }
            Part::Proxies => {
                plots::proxies(&figures, &img)?;
                tables::proxies(&figures)
            }
        });
        let markdown = bench_dir().join(format!("{}.md", part.stem()));
        fs::write(&markdown, &section)
            .with_context(|| format!("writing {}", markdown.display()))?;
        doc = replace_section(&doc, part.stem(), &section)?;
        eprintln!("bench: rendered {}", part.stem());
    }
    fs::write(&doc_path, doc).with_context(|| format!("writing {}", doc_path.display()))
}

/// `doc` with the text between `<!-- generated: name -->` and
/// `<!-- end generated: name -->` replaced by `section`.
fn replace_section(doc: &str, name: &str, section: &str) -> Result<String> {
    let begin = format!("<!-- generated: {name} -->\n");
    let end = format!("<!-- end generated: {name} -->");
    let Some(start) = doc.find(&begin).map(|at| at + begin.len()) else {
        bail!("docs/benchmarks.md has no `{}` marker", begin.trim());
    };
    let Some(stop) = doc[start..].find(&end).map(|at| start + at) else {
        bail!("docs/benchmarks.md has no `{end}` marker");
    };
    Ok(format!(
        "{}{}\n{}",
        &doc[..start],
        section.trim_end(),
        &doc[stop..]
    ))
}

fn machine() -> String {
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
    let memory = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let kib: u64 = info
                .lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(format!(", {} GiB", (kib + (1 << 19)) >> 20))
        })
        .unwrap_or_default();
    format!("{model}, {cpus} CPUs{memory}")
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
        |_| "unknown".to_owned(),
        |release| release.trim().to_owned(),
    )
}

fn commit() -> String {
    cmd::output(
        Command::new("git")
            .args(["-C"])
            .arg(cmd::workspace_root())
            .args(["rev-parse", "--short", "HEAD"]),
    )
    .map_or_else(|_| "unknown".to_owned(), |out| out.trim().to_owned())
}

fn peer_versions() -> Result<Vec<String>> {
    let bin = upstream::binaries()?;
    let first_line = |command: &mut Command| {
        cmd::output(command).map(|out| out.lines().next().unwrap_or_default().trim().to_owned())
    };
    Ok(vec![
        first_line(Command::new(bin.join("kube-proxy")).arg("--version"))?,
        first_line(Command::new("iptables").arg("-V"))?,
        first_line(Command::new("nft").arg("-v"))?,
    ])
}
