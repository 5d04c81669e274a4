//! `svc-agent`: the per-node service proxy agent.

mod cli;

use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser as _;
use svc_agent::datapath::{Capacities, Datapath, LoadOptions, StatsSnapshot, current_netns_cookie};
use svc_common::config::DatapathConfig;
use tokio::{io::unix::AsyncFd, signal, time};
use tracing::{info, warn};

use crate::cli::{Cli, Command, LogFormat, RunArgs};

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Run(args) => run(args).await,
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SVC_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let mut config = DatapathConfig::DEFAULT;
    if let Some(addr) = args
        .masquerade_addr
        .or_else(|| args.node_addrs.first().copied())
    {
        config.masq_addr = u32::from_ne_bytes(addr.octets());
    }
    if !args.no_host_sockets {
        config.host_netns_cookie =
            current_netns_cookie().context("reading this network namespace's cookie")?;
    }
    let options = LoadOptions {
        bpf_log_level: args.bpf_log_level,
        config,
        capacities: Capacities {
            ct_entries: args.ct_entries,
            affinity_entries: args.affinity_entries,
            maglev_slots: args.maglev_slots,
            ..Capacities::default()
        },
        ..LoadOptions::default()
    };
    let mut datapath = Datapath::load(&options).context("loading the datapath")?;
    datapath
        .maps_mut()
        .set_node_addrs(&args.node_addrs)
        .context("writing node addresses")?;
    let logger = datapath.logger().context("starting the eBPF logger")?;
    // SAFETY: the logger owns its ring buffer's fd, which stays open and
    // unchanged until the AsyncFd drops the logger.
    let mut logger =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|err| anyhow::anyhow!("polling the eBPF log ring buffer: {err}"))?;
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(err) => {
                    warn!(error = %err, "eBPF logger stopped");
                    return;
                }
            }
        }
    });

    for iface in &args.pod_ifaces {
        datapath
            .attach_pod(iface)
            .with_context(|| format!("attaching to pod interface {iface}"))?;
        info!(%iface, "attached to pod interface");
    }
    for iface in &args.uplinks {
        datapath
            .attach_uplink(iface)
            .with_context(|| format!("attaching to uplink {iface}"))?;
        info!(%iface, "attached to uplink");
    }
    if !args.no_host_sockets {
        let cgroup = datapath
            .attach_host_sockets()
            .context("attaching the host socket hooks")?;
        info!(cgroup = %cgroup.display(), "translating host sockets");
    }

    let mut last = StatsSnapshot::default();
    let mut ticker = time::interval(Duration::from_secs(args.stats_interval_secs.max(1)));
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = datapath.stats().context("reading counters")?;
                for (counter, delta) in now.since(&last) {
                    info!(counter = counter.name(), packets = delta.packets, bytes = delta.bytes, "packets");
                }
                last = now;
            }
            result = signal::ctrl_c() => {
                result.context("waiting for Ctrl-C")?;
                info!("shutting down; detaching");
                return Ok(());
            }
        }
    }
}
