//! Command line.

use clap::{Args, Parser, Subcommand, ValueEnum};
use svc_agent::datapath::BpfLogLevel;

#[derive(Parser)]
#[command(version, about = "eBPF Kubernetes service proxy: the node agent")]
pub struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the datapath, attach it and run until Ctrl-C (detaching on exit).
    Run(RunArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// Interface to attach the tc program to at ingress (repeatable).
    #[arg(long = "iface", value_name = "IFACE", required = true)]
    pub ifaces: Vec<String>,
    /// Level of the eBPF programs' own log lines, fixed at load time.
    #[arg(long, value_enum, default_value_t = BpfLogLevel::Off)]
    pub bpf_log_level: BpfLogLevel,
    /// Seconds between counter reports in the log.
    #[arg(long, default_value_t = 5)]
    pub stats_interval_secs: u64,
}
