//! `svc-agent`: the per-node service proxy agent.

mod cli;
mod inspect_cmd;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Parser as _;
use k8s_openapi::api::core::v1::Node;
use svc_agent::{
    agent::{self, Agent, AttachPatterns},
    cni,
    datapath::{Capacities, Datapath, LoadOptions, current_netns_cookie, ports},
    http::{self, Page},
    model::{LocalDetect, NodeInfo, Settings, Translator},
    netfilter, proxy_health,
    reconcile::{Fixed, Reconciler, join},
    source::{self, kube::KubeSource, manifests::ManifestSource},
    sync::Applier,
    tasks::{Task, Tasks},
};
use svc_common::config::{DatapathConfig, LOCAL_BY_CIDR, LOCAL_BY_INTERFACE};
use tokio::{io::unix::AsyncFd, time};
use tracing::{info, warn};

use crate::cli::{Cli, Command, DetectLocalMode, LogFormat, RunArgs};

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            if let Some(netns) = &args.netns {
                // Before any thread exists: the runtime's threads inherit it.
                enter_netns(netns)?;
            }
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(run(args))
        }
        Command::Services(args) => inspect_cmd::services(&args),
        Command::Backends { service, inspect } => inspect_cmd::backends(&service, &inspect),
        Command::Conntrack { filter, inspect } => {
            inspect_cmd::conntrack(filter.as_deref(), &inspect)
        }
        Command::Maglev { frontend, inspect } => inspect_cmd::maglev(&frontend, &inspect),
        Command::Cleanup { pin_dir, cni } => {
            for path in cni::install::uninstall(&cni.cni_bin_dir, &cni.cni_conf_dir)
                .context("taking svc-cni out of the CNI configuration")?
            {
                info!(file = %path.display(), "svc-cni removed");
            }
            Datapath::cleanup(&pin_dir)
                .with_context(|| format!("removing {}", pin_dir.display()))?;
            info!(dir = %pin_dir.display(), "removed the pinned datapath");
            Ok(())
        }
        Command::InstallCni {
            plugin,
            pin_dir,
            cni,
        } => {
            let plugin = match plugin {
                Some(plugin) => plugin,
                None => std::env::current_exe()
                    .context("finding this program's path")?
                    .with_file_name(cni::PLUGIN_TYPE),
            };
            let installed =
                cni::install::install(&plugin, &cni.cni_bin_dir, &cni.cni_conf_dir, &pin_dir)
                    .context("installing svc-cni")?;
            info!(
                conflist = %installed.conflist.display(),
                binary_written = installed.binary_written,
                conflist_written = installed.conflist_written,
                "svc-cni installed"
            );
            Ok(())
        }
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

/// The NAT source ports: the flag's, else the default next to the node's
/// ephemeral ports; a flag overlapping them is kept but warned about.
fn nat_port_range(args: &RunArgs) -> ports::PortRange {
    let local = ports::local_port_range();
    let range = match (args.nat_port_range, &local) {
        (Some(range), _) => range,
        (None, Ok(local)) => ports::default_range(local),
        (None, Err(err)) => {
            warn!(error = %err, "reading ip_local_port_range; NAT ports above Linux's default ephemeral range");
            ports::default_range(&(32_768..=60_999))
        }
    };
    if let Ok(local) = &local
        && ports::overlaps_local(range, local)
    {
        warn!(
            %range,
            local = %format!("{}-{}", local.start(), local.end()),
            "the NAT port range overlaps the node's ephemeral ports: a masqueraded flow may share a tuple with the node's own connection"
        );
    }
    info!(%range, ports = range.len(), "NAT source ports of masqueraded flows");
    range
}

/// Loads the datapath as the flags say (adopting pinned maps).
fn load_datapath(args: &RunArgs) -> Result<Datapath> {
    let mut config = DatapathConfig::DEFAULT;
    if let Some(addr) = args
        .masquerade_addr
        .or_else(|| args.node_addrs.first().copied())
    {
        config.masq_addr = addr.into();
    } else {
        warn!(
            "no masquerade address (--node-addr or --masquerade-addr): hairpinned and masqueraded flows are dropped (drop_no_snat_addr)"
        );
    }
    if !args.no_host_sockets {
        config.host_netns_cookie =
            current_netns_cookie().context("reading this network namespace's cookie")?;
    }
    let nat_ports = nat_port_range(args);
    config.nat_port_min = nat_ports.min;
    config.nat_port_max = nat_ports.max;
    config.local_detect = match args.detect_local_mode {
        DetectLocalMode::Interface => LOCAL_BY_INTERFACE,
        DetectLocalMode::ClusterCidr | DetectLocalMode::NodeCidr => LOCAL_BY_CIDR,
    };
    let options = LoadOptions {
        bpf_log_level: args.bpf_log_level,
        config,
        capacities: Capacities {
            ct_entries: args.ct_entries,
            affinity_entries: args.affinity_entries,
            maglev_slots: args.maglev_slots,
            ..Capacities::default()
        },
        maglev_slots_per_backend: args.maglev_slots_per_backend,
        pin_dir: (!args.no_pin).then(|| args.pin_dir.clone()),
    };
    Datapath::load(&options).context("loading the datapath")
}

/// The eBPF log reader: losing it loses debug lines, not service.
const LOGGER: Task = Task {
    name: "eBPF log reader",
    essential: false,
};
/// The `/metrics`, `/healthz` and `/readyz` server.
const HTTP: Task = Task {
    name: "metrics and health server",
    essential: true,
};

/// kube-proxy's node health server: load balancers lose this node without
/// it, but its services still work.
const PROXY_HEALTH: Task = Task {
    name: "kube-proxy health server",
    essential: false,
};

/// Forwards the eBPF programs' log lines to `tracing`.
fn spawn_logger(datapath: &mut Datapath, tasks: &mut Tasks) -> Result<()> {
    let logger = datapath.logger().context("starting the eBPF logger")?;
    // SAFETY: the logger owns its ring buffer's fd, which stays open and
    // unchanged until the AsyncFd drops the logger.
    let mut logger =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|err| anyhow::anyhow!("polling the eBPF log ring buffer: {err}"))?;
    tasks.spawn(LOGGER, async move {
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
    Ok(())
}

/// Connects to the API server and, unless `--node-addr` gave them, reads
/// this node's addresses from its Node object.
async fn connect(args: &mut RunArgs, node_name: &str) -> Result<kube::Client> {
    let client = source::kube::client(args.kubeconfig.as_deref())
        .await
        .context("connecting to Kubernetes (--manifests DIR serves a directory instead)")?;
    if args.node_addrs.is_empty() {
        let nodes: kube::Api<Node> = kube::Api::all(client.clone());
        // Bounded: a node agent without its Node is better restarted.
        let mut attempts = 0;
        let node = loop {
            match nodes.get(node_name).await {
                Ok(node) => break node,
                Err(err) if attempts < 30 => {
                    attempts += 1;
                    warn!(node = node_name, error = %err, "reading this node's object; retrying");
                    time::sleep(Duration::from_secs(2)).await;
                }
                Err(err) => {
                    return Err(err).with_context(|| format!("reading Node {node_name}"));
                }
            }
        };
        args.node_addrs = source::kube::node_addresses(&node);
        if args.node_addrs.is_empty() {
            warn!(
                node = node_name,
                "the Node object lists no IPv4 address: node ports answer nowhere and \
                 masquerading has no source address until --node-addr is given"
            );
        } else {
            info!(node = node_name, addrs = ?args.node_addrs, "node addresses from the Node object");
        }
    }
    Ok(client)
}

/// Loads and attaches the datapath.
fn start_datapath(args: &RunArgs, tasks: &mut Tasks) -> Result<Datapath> {
    let mut datapath = load_datapath(args)?;
    spawn_logger(&mut datapath, tasks)?;
    if !args.no_host_sockets {
        let cgroup = datapath
            .attach_host_sockets()
            .context("attaching the host socket hooks")?;
        info!(cgroup = %cgroup.display(), "translating host sockets");
    }
    Ok(datapath)
}

/// An applier that knows what an earlier agent left pinned, if anything.
fn applier_for(datapath: &Datapath, pin_dir: &std::path::Path) -> Applier {
    if !datapath.adopted() {
        return Applier::new();
    }
    let applier = Applier::adopt(datapath.maps());
    let (frontends, backends) = applier.sizes();
    info!(frontends, backends, dir = %pin_dir.display(), "adopted the pinned datapath");
    applier
}

/// Serves `/metrics`, `/healthz` and `/readyz` from the returned page.
async fn serve_http(addr: std::net::SocketAddr, tasks: &mut Tasks) -> Result<Arc<Mutex<Page>>> {
    let page = Arc::new(Mutex::new(Page::new()));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("serving metrics on {addr}"))?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    tasks.spawn(HTTP, http::serve(listener, Arc::clone(&page)));
    Ok(page)
}

/// kube-proxy's netfilter timeouts ([`netfilter`]); a failure is said, not
/// fatal (svc-proxy's own flows do not depend on them).
fn tune_netfilter(args: &RunArgs) {
    for timeout in netfilter::tcp_timeouts(
        args.conntrack_tcp_timeout_established,
        args.conntrack_tcp_timeout_close_wait,
    ) {
        match netfilter::apply(timeout) {
            Ok(netfilter::Outcome::Set { from }) => {
                info!(
                    sysctl = timeout.sysctl,
                    from,
                    to = timeout.seconds,
                    "set as kube-proxy does"
                );
            }
            Ok(netfilter::Outcome::Unchanged | netfilter::Outcome::Absent) => {}
            Err(err) => {
                warn!(sysctl = timeout.sysctl, error = %err, "cannot set netfilter's timeout");
            }
        }
    }
}

/// Serves kube-proxy's node health from `page`. Not essential: a port in
/// use (kube-proxy still running, say) is said and the agent goes on.
async fn serve_proxy_health(
    addr: std::net::SocketAddr,
    page: &Arc<Mutex<Page>>,
    tasks: &mut Tasks,
) {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            info!(%addr, "serving kube-proxy's node health: /healthz and /livez");
            tasks.spawn(
                PROXY_HEALTH,
                proxy_health::serve(listener, Arc::clone(page)),
            );
        }
        Err(err) => warn!(
            %addr,
            error = %err,
            "cannot serve kube-proxy's node health (--healthz-addr); load balancers that probe it will see this node down"
        ),
    }
}

/// The translation settings the flags give, checked: a local-detection
/// mode needs its CIDRs.
fn settings(args: &RunArgs) -> Result<Settings> {
    let local_detect = match args.detect_local_mode {
        DetectLocalMode::Interface => LocalDetect::Interface,
        DetectLocalMode::ClusterCidr if args.cluster_cidrs.is_empty() => {
            anyhow::bail!("--detect-local-mode cluster-cidr needs --cluster-cidr")
        }
        DetectLocalMode::ClusterCidr => LocalDetect::ClusterCidr(args.cluster_cidrs.clone()),
        DetectLocalMode::NodeCidr if args.manifests.is_some() && args.node_pod_cidrs.is_empty() => {
            anyhow::bail!(
                "--detect-local-mode node-cidr with --manifests needs --node-pod-cidr (there is no Node object)"
            )
        }
        DetectLocalMode::NodeCidr => LocalDetect::NodeCidr,
    };
    Ok(Settings {
        proxy_name: args.service_proxy_name.clone(),
        masquerade_all: args.masquerade_all,
        local_detect,
    })
}

/// Says how local traffic is told apart and who is masqueraded.
fn log_masquerading(args: &RunArgs, settings: &Settings) {
    let masquerade = if settings.masquerade_all {
        "every flow to a ClusterIP or a Cluster-policy external address (--masquerade-all)"
    } else {
        "flows from sources that are not local"
    };
    match &settings.local_detect {
        LocalDetect::Interface => info!(
            pod_ifaces = ?args.pod_ifaces,
            masquerade,
            "local traffic: what enters at pod interfaces"
        ),
        LocalDetect::ClusterCidr(cidrs) => info!(
            cidrs = %join(cidrs),
            masquerade,
            "local traffic: sources in the cluster CIDRs"
        ),
        LocalDetect::NodeCidr => info!(
            masquerade,
            "local traffic: sources in this node's pod CIDRs"
        ),
    }
}

/// The translator, with what the flags say of this node and the service
/// CIDRs.
fn translator(args: &RunArgs, node_name: &str, settings: Settings) -> Translator {
    let mut translator = Translator::new(
        NodeInfo {
            name: node_name.to_owned(),
            addrs: args.node_addrs.clone(),
            zone: args.node_zone.clone(),
            pod_cidrs: args.node_pod_cidrs.clone(),
        },
        settings,
    );
    if !args.service_cidrs.is_empty() {
        translator.set_service_cidrs(args.service_cidrs.clone());
        info!(cidrs = %join(&args.service_cidrs), "service CIDRs: unallocated addresses are dropped");
    }
    translator
}

async fn run(mut args: RunArgs) -> Result<()> {
    let node_name = args.node_name.clone().unwrap_or_else(hostname);
    let settings = settings(&args)?;
    let fixed = fixed_by_flags(&args);
    // Connected before the datapath loads: the Node's address becomes the
    // masquerade address.
    let client = match args.manifests.clone() {
        Some(dir) => Err(dir),
        None => Ok(connect(&mut args, &node_name).await?),
    };
    let mut tasks = Tasks::new();
    let datapath = start_datapath(&args, &mut tasks)?;
    log_masquerading(&args, &settings);
    tune_netfilter(&args);
    let reconciler = Reconciler::new(translator(&args, &node_name, settings), fixed);
    let applier = applier_for(&datapath, &args.pin_dir);
    let page = serve_http(args.metrics_addr, &mut tasks).await?;
    if let Some(addr) = args.healthz_addr.0 {
        serve_proxy_health(addr, &page, &mut tasks).await;
    }
    let debounce = Duration::from_millis(args.debounce_ms);
    let source = client.map(|client| {
        let source = KubeSource::start(&client, &node_name, debounce, &mut tasks);
        info!(node = %node_name, "watching Services, EndpointSlices, ServiceCIDRs and this Node");
        source
    });
    let agent = Agent {
        datapath,
        applier,
        reconciler,
        tasks,
        page,
        options: agent::Options {
            state_file: args.state_file.clone(),
            attach: AttachPatterns {
                uplinks: args.uplinks.clone(),
                pod_ifaces: args.pod_ifaces.clone(),
            },
            stats_every: Duration::from_secs(args.stats_interval_secs.max(1)),
            sweep_every: Duration::from_secs(args.ct_sweep_interval_secs),
        },
    };
    match source {
        Ok(source) => agent.run(source).await,
        Err(dir) => agent.run(ManifestSource::new(&dir)).await,
    }
    .context("waiting for Ctrl-C")?;
    log_shutdown(&args);
    Ok(())
}

/// What the flags fixed: the Node object and the `ServiceCIDR` objects do
/// not change it.
fn fixed_by_flags(args: &RunArgs) -> Fixed {
    Fixed {
        addrs: !args.node_addrs.is_empty(),
        zone: args.node_zone.is_some(),
        pod_cidrs: !args.node_pod_cidrs.is_empty(),
        service_cidrs: !args.service_cidrs.is_empty(),
    }
}

fn log_shutdown(args: &RunArgs) {
    if args.no_pin {
        info!("shutting down; detaching");
    } else {
        info!(
            dir = %args.pin_dir.display(),
            "shutting down; the pinned datapath keeps serving (`svc-agent cleanup` removes it)"
        );
    }
}

/// Moves this (still single-threaded) process into the network namespace
/// `ip netns` knows as `name`, keeping its mount namespace (and so the
/// host's bpffs and cgroup mounts).
fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let path = std::path::Path::new("/run/netns").join(name);
    let file = std::fs::File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    // SAFETY: a valid namespace fd; the process has one thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("entering network namespace {name}"));
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".to_owned(), |name| name.trim().to_owned())
}
