//! `cargo xtask`: every project chore behind one entry point.
//!
//! Each subcommand first runs [`setup`], so a fresh machine needs nothing but
//! `cargo xtask <cmd>`.

mod bench;
mod cluster;
mod cmd;
mod image;
mod rootfs;
mod run;
mod setup;
mod upstream;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and run the eBPF service proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing: rust-src, the musl target, bpf-linker,
    /// Debian packages.
    Setup,
    /// Build the eBPF object and the agent that embeds it.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run every test: host unit tests, BPF_PROG_TEST_RUN tests, the
    /// root-only network-namespace tests and the end-to-end tests against
    /// an upstream Kubernetes control plane (built the first time).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Only the end-to-end tests: etcd, kube-apiserver and
    /// kube-controller-manager (built from the pin in tests/k8s if missing)
    /// and the agent, with real traffic.
    E2e {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the e2e tests' control plane (etcd, kube-apiserver,
    /// kube-controller-manager on loopback, a Node for this machine) until
    /// Ctrl-C, printing a KUBECONFIG for the agent.
    ControlPlane,
    /// A Kubernetes cluster on this machine until Ctrl-C: the control plane
    /// with kube-scheduler and CoreDNS, and nodes in network namespaces,
    /// each with containerd, runc and a kubelet (built from the pins),
    /// svc-proxy deployed as its DaemonSet from its image. No kube-proxy.
    Cluster {
        /// How many nodes (1 or 2).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
        nodes: u8,
    },
    /// Kubernetes' e2e suite (`[sig-network]` by default) on the test
    /// cluster, with svc-proxy and with upstream kube-proxy (nftables) as
    /// the control run, each on a fresh cluster: JUnit reports under
    /// target/conformance/<proxy>/, and docs/conformance.md from both.
    Conformance {
        /// Only this proxy (svc-proxy or kube-proxy; repeatable).
        #[arg(long)]
        proxy: Vec<String>,
        /// A ginkgo regular expression of specs (not the wide focus: no
        /// document is written).
        #[arg(long)]
        focus: Option<String>,
        /// Parallel ginkgo processes (most specs wait on timers: the
        /// machine stays mostly idle with 4 on 2 cores).
        #[arg(long, default_value_t = 4)]
        procs: u8,
        /// The limit of each proxy's run.
        #[arg(long, default_value_t = 150)]
        timeout_minutes: u32,
    },
    /// Run the agent against the cluster of `KUBECONFIG` (or ~/.kube/config)
    /// when it answers; otherwise start a sandbox (pod namespaces with the
    /// datapath attached, services from examples/sandbox) and run the agent
    /// in it until Ctrl-C.
    Run,
    /// The agent's OCI image as an archive, without a container engine:
    /// target/image/svc-agent-<version>.oci.tar (reproducible).
    Image {
        /// Directory to write the archive to.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Build twice and check the archives are identical, read back and
        /// runnable (what `cargo xtask test` does).
        #[arg(long, conflicts_with = "out")]
        check: bool,
    },
    /// Benchmarks: every part by default (a few minutes with --quick,
    /// an hour or more without). Figures under target/bench/, tables in
    /// the generated sections of docs/benchmarks.md, plots in docs/img/.
    Bench(bench::Options),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    setup::ensure()?;
    match cli.command {
        Command::Setup => Ok(()),
        Command::Build { release } => build(release),
        Command::Test { args } => test(&args),
        Command::E2e { args } => e2e(&args),
        Command::ControlPlane => control_plane(),
        Command::Run => run::run(),
        Command::Cluster { nodes } => cluster::run(nodes),
        Command::Conformance {
            proxy,
            focus,
            procs,
            timeout_minutes,
        } => {
            let mut args = Vec::new();
            for proxy in proxy {
                args.extend(["--proxy".to_owned(), proxy]);
            }
            if let Some(focus) = focus {
                args.extend(["--focus".to_owned(), focus]);
            }
            args.extend([
                "--procs".to_owned(),
                procs.to_string(),
                "--timeout-minutes".to_owned(),
                timeout_minutes.to_string(),
            ]);
            cluster::conformance(&args)
        }
        Command::Image { check: true, .. } => image::check_reproducible(),
        Command::Image { out, .. } => {
            let built = image::build(out.as_deref())?;
            println!("{} {}", built.archive.display(), built.digest);
            Ok(())
        }
        Command::Bench(options) => bench::run(&options),
    }
}

fn build(release: bool) -> Result<()> {
    let mut build = cmd::cargo(["build", "--package", "svc-agent"]);
    if release {
        build.arg("--release");
    }
    cmd::run(&mut build)
}

fn test(args: &[String]) -> Result<()> {
    // The root-only tests create network namespaces and load programs; they
    // fail with a clear message when not root, never skip.
    let bin_dir = upstream::binaries()?;
    // The cluster tests import the agent's image and the test images.
    let images = cluster::images(&bin_dir)?;
    let mut test = cmd::cargo(["test", "--workspace"]);
    test.env(upstream::BIN_DIR_ENV, bin_dir)
        .env(cluster::IMAGES_DIR_ENV, images);
    if !args.is_empty() {
        test.arg("--").args(args);
        return cmd::run(&mut test);
    }
    cmd::run(&mut test)?;
    // The image builds twice to the same bytes, and holds what it should.
    image::check_reproducible()
}

fn control_plane() -> Result<()> {
    let bin_dir = upstream::binaries()?;
    let mut run = cmd::cargo(["run", "--package", "tests", "--bin", "control-plane"]);
    run.env(upstream::BIN_DIR_ENV, bin_dir);
    cmd::run(&mut run)
}

fn e2e(args: &[String]) -> Result<()> {
    let bin_dir = upstream::binaries()?;
    // The scenarios run the agent binary, which `cargo test --package
    // tests` alone would not rebuild.
    build(false)?;
    let mut test = cmd::cargo(["test", "--package", "tests", "--test", "e2e"]);
    test.env(upstream::BIN_DIR_ENV, bin_dir);
    if !args.is_empty() {
        test.arg("--").args(args);
    }
    cmd::run(&mut test)
}
