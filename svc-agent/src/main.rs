//! `svc-agent`: the per-node service proxy agent.

mod cli;
mod health;
mod http;
mod inspect_cmd;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::Parser as _;
use k8s_openapi::api::core::v1::Node;
use svc_agent::{
    datapath::{
        Capacities, Datapath, Frontend, LoadOptions, StatsSnapshot, current_netns_cookie, ifaces,
        netlink::LinkEvents, ports,
    },
    metrics,
    model::{LocalDetect, NodeInfo, ObjectKey, Problem, Settings, Translator},
    source::{
        self,
        kube::{Change, Dirty, KubeSource},
        manifests::Watch,
    },
    sweeper::Sweeper,
    sync::Applier,
    tasks::{Ended, Task, Tasks},
};
use svc_common::{
    config::{DatapathConfig, LOCAL_BY_CIDR, LOCAL_BY_INTERFACE},
    stats::Counter,
};
use tokio::{io::unix::AsyncFd, signal, sync::mpsc, time};
use tracing::{error, info, warn};

use crate::{
    cli::{Cli, Command, DetectLocalMode, LogFormat, RunArgs},
    health::HealthChecks,
};

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
        Command::Cleanup { pin_dir } => {
            Datapath::cleanup(&pin_dir)
                .with_context(|| format!("removing {}", pin_dir.display()))?;
            info!(dir = %pin_dir.display(), "removed the pinned datapath");
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
        config.masq_addr = u32::from_ne_bytes(addr.octets());
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
        pin_dir: (!args.no_pin).then(|| args.pin_dir.clone()),
        ..LoadOptions::default()
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

/// Where the objects come from.
enum Source {
    Manifests(Watch),
    Kube {
        source: KubeSource,
        changes: mpsc::Receiver<Change>,
    },
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
    rescan_interfaces(&mut datapath, args);
    Ok(datapath)
}

/// Link changes, announced by rtnetlink: interfaces are attached as they
/// appear and let go as they vanish. Without them (the subscription
/// failed), the interfaces are looked at every 200 ms.
struct Interfaces {
    events: Option<LinkEvents>,
    /// Looks at every interface now and then anyway.
    rescan: time::Interval,
}

impl Interfaces {
    fn watch() -> Self {
        let (events, every) = match LinkEvents::subscribe() {
            Ok(events) => (Some(events), Duration::from_secs(10)),
            Err(err) => {
                warn!(error = %err, "subscribing to link changes failed; looking at interfaces every 200 ms");
                (None, Duration::from_millis(200))
            }
        };
        Self {
            events,
            rescan: time::interval(every),
        }
    }

    /// Waits until the interfaces should be looked at again.
    async fn changed(&mut self) {
        let Some(events) = &mut self.events else {
            self.rescan.tick().await;
            return;
        };
        tokio::select! {
            result = events.changed() => {
                if let Err(err) = result {
                    warn!(error = %err, "link changes stopped; looking at interfaces every 200 ms");
                    self.events = None;
                    self.rescan = time::interval(Duration::from_millis(200));
                    return;
                }
                // A burst (a pod's veth pair is several announcements) is
                // looked at once.
                for _ in 0..10_000 {
                    if futures::FutureExt::now_or_never(events.changed()).is_none() {
                        break;
                    }
                }
            }
            _ = self.rescan.tick() => {}
        }
    }
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
    let page = Arc::new(Mutex::new(Page {
        text: String::new(),
        ready: false,
        refreshed: Instant::now(),
        failed: None,
    }));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("serving metrics on {addr}"))?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    tasks.spawn(HTTP, http::serve(listener, Arc::clone(&page)));
    Ok(page)
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

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
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
    let fixed = FixedNode::from(&args);
    // Connected before the datapath loads: the Node's address becomes the
    // masquerade address.
    let client = match args.manifests.clone() {
        Some(dir) => Err(dir),
        None => Ok(connect(&mut args, &node_name).await?),
    };
    let mut tasks = Tasks::new();
    let mut datapath = start_datapath(&args, &mut tasks)?;
    let mut interfaces = Interfaces::watch();
    log_masquerading(&args, &settings);
    let mut translator = translator(&args, &node_name, settings);
    let mut source = match client {
        Ok(client) => {
            let (source, changes) = KubeSource::start(&client, &node_name, &mut tasks);
            info!(node = %node_name, "watching Services, EndpointSlices, ServiceCIDRs and this Node");
            Source::Kube { source, changes }
        }
        Err(dir) => Source::Manifests(Watch::new(&dir)),
    };
    let mut applier = applier_for(&datapath, &args.pin_dir);
    let page = serve_http(args.metrics_addr, &mut tasks).await?;
    let mut snapshot = metrics::Snapshot::default();
    let mut names: Vec<(Frontend, String)> = Vec::new();
    let mut render_every = time::interval(Duration::from_secs(2));
    let mut synced_once = false;
    let mut sweeper = Sweeper::new(Duration::from_secs(args.ct_sweep_interval_secs));
    let mut sweep_every = time::interval(Duration::from_secs(1));

    let mut last = StatsSnapshot::default();
    let mut ticker = time::interval(Duration::from_secs(args.stats_interval_secs.max(1)));
    // Manifest changes are picked up within a poll; a burst of edits
    // inside one poll is applied once.
    let mut poll = time::interval(Duration::from_millis(200));
    let debounce = Duration::from_millis(args.debounce_ms);
    let mut sync = Sync {
        state_file: &args.state_file,
        translator: &mut translator,
        applier: &mut applier,
        fixed,
        health: HealthChecks::default(),
    };
    loop {
        let synced = tokio::select! {
            () = interfaces.changed() => {
                rescan_interfaces(&mut datapath, &args);
                None
            }
            _ = poll.tick() => {
                match &mut source {
                    Source::Manifests(watch) => sync.manifests(watch, &mut datapath),
                    Source::Kube { .. } => None,
                }
            }
            Some((first, started)) = next_change(&mut source) => {
                let Source::Kube { source, changes } = &mut source else {
                    unreachable!("only the Kubernetes source has changes");
                };
                let dirty = coalesce(source, changes, first, started, debounce).await;
                snapshot.watch_errors += dirty.failures.len() as u64;
                let first = !synced_once;
                sync.kube(source, dirty, first, started, &mut datapath)
            }
            _ = render_every.tick() => {
                let ready = lock(&page).ready;
                snapshot.sweeps = sweeper.stats.clone();
                publish(&page, &mut snapshot, sync.applier, &datapath, &names, ready);
                None
            }
            result = sweeper.finished(), if sweeper.running() => {
                sweeper.finish(result, sync.applier, &mut datapath);
                None
            }
            _ = sweep_every.tick(), if synced_once => {
                sweeper.start_if_due(sync.applier, &mut datapath);
                None
            }
            _ = ticker.tick() => {
                log_counters(&datapath, &mut last);
                None
            }
            ended = tasks.ended() => {
                task_ended(&ended, &page, &mut snapshot);
                None
            }
            result = signal::ctrl_c() => {
                result.context("waiting for Ctrl-C")?;
                log_shutdown(&args);
                return Ok(());
            }
        };
        if let Some(synced) = synced {
            synced_once = true;
            if synced.sweep_wanted {
                sweeper.want();
                sweeper.start_if_due(sync.applier, &mut datapath);
            }
            names = count_sync(&mut snapshot, synced);
            publish(&page, &mut snapshot, sync.applier, &datapath, &names, true);
        }
    }
}

/// Counts `synced` in the metrics; returns the frontends' service names.
fn count_sync(snapshot: &mut metrics::Snapshot, synced: Synced) -> Vec<(Frontend, String)> {
    snapshot.syncs += 1;
    snapshot.sync_errors += synced.errors;
    snapshot.input_problems += synced.problems;
    snapshot.sync_latency.observe(synced.latency);
    synced.names
}

/// A supervised task ended: said loudly, counted, and if the agent cannot
/// do without it, `/healthz` fails from now on.
fn task_ended(ended: &Ended, page: &Mutex<Page>, snapshot: &mut metrics::Snapshot) {
    let Ended { task, why } = ended;
    *snapshot.task_failures.entry(task.name).or_default() += 1;
    if task.essential {
        error!(
            task = task.name,
            why,
            "an essential task ended: /healthz fails so the agent is restarted (the pinned datapath serves meanwhile)"
        );
        lock(page).failed = Some(format!("the {} ended: {why}", task.name));
    } else {
        warn!(
            task = task.name,
            why, "a task ended; the agent goes on without it"
        );
    }
}

/// Logs what the counters moved since `last`, and keeps them there. The
/// counters that mean trouble are warned about.
fn log_counters(datapath: &Datapath, last: &mut StatsSnapshot) {
    let now = match datapath.stats() {
        Ok(now) => now,
        Err(err) => {
            warn!(error = %err, "reading the datapath's counters failed");
            return;
        }
    };
    for (counter, delta) in now.since(last) {
        match counter {
            Counter::DropNatPortsExhausted => warn!(
                packets = delta.packets,
                "new masqueraded flows dropped: every NAT source port to their backend is taken (--nat-port-range)"
            ),
            Counter::LbNewFlowMidstream => warn!(
                packets = delta.packets,
                "TCP segments of connections connection tracking had lost (evicted from a full table?) started new flows"
            ),
            _ => info!(
                counter = counter.name(),
                packets = delta.packets,
                bytes = delta.bytes,
                "packets"
            ),
        }
    }
    *last = now;
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

/// The next Kubernetes change and when it was seen; never resolves for the
/// manifest source.
async fn next_change(source: &mut Source) -> Option<(Change, Instant)> {
    match source {
        Source::Kube { changes, .. } => changes.recv().await.map(|change| (change, Instant::now())),
        Source::Manifests(_) => std::future::pending().await,
    }
}

/// Folds `first` and the changes that follow within `debounce` of each
/// other (at most ten debounce periods after `started`) into one batch.
async fn coalesce(
    source: &mut KubeSource,
    changes: &mut mpsc::Receiver<Change>,
    first: Change,
    started: Instant,
    debounce: Duration,
) -> Dirty {
    let mut dirty = Dirty::default();
    source.absorb(first, &mut dirty);
    let deadline = started + debounce * 10;
    loop {
        // What is queued already joins the batch without waiting.
        while let Ok(change) = changes.try_recv() {
            source.absorb(change, &mut dirty);
        }
        let now = Instant::now();
        if now >= deadline || debounce.is_zero() {
            return dirty;
        }
        match time::timeout(debounce.min(deadline - now), changes.recv()).await {
            Ok(Some(change)) => source.absorb(change, &mut dirty),
            Ok(None) | Err(_) => return dirty,
        }
    }
}

/// Attaches the programs to every present interface the patterns name
/// that is not yet attached (a new one under an old name included), and
/// lets go of the attachments of interfaces that went.
fn rescan_interfaces(datapath: &mut Datapath, args: &RunArgs) {
    let present = ifaces::interfaces();
    for (index, name) in &present {
        let is = |patterns: &[String]| patterns.iter().any(|p| ifaces::matches(p, name));
        let uplink = is(&args.uplinks);
        if !(uplink || is(&args.pod_ifaces)) || datapath.is_attached(*index, name) {
            continue;
        }
        let (kind, result) = if uplink {
            ("uplink", datapath.attach_uplink(name))
        } else {
            ("pod interface", datapath.attach_pod(name))
        };
        match result {
            Ok(()) => info!(iface = %name, index, kind, "attached"),
            Err(err) => warn!(iface = %name, kind, error = %err, "attaching failed"),
        }
    }
    for name in datapath.detach_absent(&present) {
        info!(iface = %name, "interface gone; its attachment and pin removed");
    }
}

/// What one sync did, for the metrics.
struct Synced {
    latency: Duration,
    errors: u64,
    problems: u64,
    names: Vec<(Frontend, String)>,
    /// A sweep of connection tracking should follow.
    sweep_wanted: bool,
}

/// What the flags fixed (the Node object and the `ServiceCIDR` objects do
/// not change it).
#[derive(Clone, Copy)]
#[expect(clippy::struct_excessive_bools, reason = "one per flag")]
struct FixedNode {
    addrs: bool,
    zone: bool,
    pod_cidrs: bool,
    service_cidrs: bool,
}

impl From<&RunArgs> for FixedNode {
    fn from(args: &RunArgs) -> Self {
        Self {
            addrs: !args.node_addrs.is_empty(),
            zone: args.node_zone.is_some(),
            pod_cidrs: !args.node_pod_cidrs.is_empty(),
            service_cidrs: !args.service_cidrs.is_empty(),
        }
    }
}

/// Translation and applying, shared by both sources.
struct Sync<'a> {
    state_file: &'a std::path::Path,
    translator: &'a mut Translator,
    applier: &'a mut Applier,
    fixed: FixedNode,
    health: HealthChecks,
}

impl Sync<'_> {
    /// Reloads the manifests if they changed, and brings the maps in line.
    fn manifests(&mut self, watch: &mut Watch, datapath: &mut Datapath) -> Option<Synced> {
        let started = Instant::now();
        match watch.poll() {
            Ok(true) => {}
            Ok(false) => return None,
            Err(err) => {
                // The datapath keeps serving what it last had.
                warn!(error = %err, "reading the manifest directory failed");
                return None;
            }
        }
        // Only the services whose objects changed are translated again.
        let dirty = watch.take_dirty();
        self.translator.update(dirty, watch);
        let problems: Vec<_> = watch.problems().cloned().collect();
        Some(self.apply(datapath, &problems, started, "manifests applied"))
    }

    /// Re-derives what `dirty` names from the stores (everything on the
    /// first sync and after a relist) and brings the maps in line, once
    /// every kind has been listed (before that the state is partial).
    fn kube(
        &mut self,
        source: &KubeSource,
        dirty: Dirty,
        first: bool,
        started: Instant,
        datapath: &mut Datapath,
    ) -> Option<Synced> {
        for (kind, error) in &dirty.failures {
            warn!(kind = kind.name(), %error, "watch failed; retrying and relisting");
        }
        // A new zone or address changes what topology hints and source
        // ranges keep: everything again.
        let node_changed = dirty.node && self.node(source);
        let cidrs_changed = (dirty.service_cidrs || first)
            && !self.fixed.service_cidrs
            && self.translator.set_service_cidrs(source.service_cidrs());
        if cidrs_changed {
            info!(cidrs = %join(&self.translator.desired().service_cidrs), "service CIDRs from the cluster's ServiceCIDRs");
        }
        if !source.ready() {
            return None;
        }
        let keys: BTreeSet<ObjectKey> = if dirty.all || first || node_changed {
            // A relist may have dropped services whose deletion was never
            // seen: the translator's own keys are re-derived too.
            let mut keys: BTreeSet<ObjectKey> = source.service_keys().into_iter().collect();
            keys.extend(self.translator.service_keys().cloned());
            keys
        } else if dirty.services.is_empty() && !dirty.node && !cidrs_changed {
            return None;
        } else {
            dirty.services
        };
        let fetched = source.fetch(&keys);
        self.translator.update(keys, &fetched);
        Some(self.apply(datapath, &[], started, "cluster state applied"))
    }

    /// Takes this node's addresses and zone from its Node object, where
    /// no flag fixed them. Returns whether either changed.
    fn node(&mut self, source: &KubeSource) -> bool {
        let Some(node) = source.node() else {
            warn!("this node's Node object is gone; keeping its last addresses and zone");
            return false;
        };
        let current = self.translator.node().clone();
        let addrs = if self.fixed.addrs {
            current.addrs.clone()
        } else {
            source::kube::node_addresses(&node)
        };
        let zone = if self.fixed.zone {
            current.zone.clone()
        } else {
            source::kube::node_zone(&node)
        };
        if addrs != current.addrs || zone != current.zone {
            info!(?addrs, ?zone, "this node's addresses or zone changed");
        }
        if !self.fixed.pod_cidrs {
            let pod_cidrs = source::kube::node_pod_cidrs(&node);
            if self.translator.set_pod_cidrs(pod_cidrs.clone()) {
                info!(cidrs = %join(&pod_cidrs), "this node's pod CIDRs");
            }
        }
        self.translator.set_node(addrs, zone)
    }

    /// Writes the translator's desired state to the maps.
    fn apply(
        &mut self,
        datapath: &mut Datapath,
        source_problems: &[Problem],
        started: Instant,
        what: &str,
    ) -> Synced {
        let desired = self.translator.desired();
        let translation_problems = self.translator.problems();
        for problem in source_problems.iter().chain(&translation_problems) {
            if problem.warning {
                warn!(object = %problem.object, "{}", problem.message);
            } else {
                tracing::debug!(object = %problem.object, "{}", problem.message);
            }
        }
        let report = self.applier.apply(datapath.maps_mut(), desired);
        self.health.sync(&desired.health_checks);
        if let Err(err) = svc_agent::inspect::write_state(self.state_file, desired) {
            warn!(error = %err, "recording frontend names for the inspection commands failed");
        }
        for error in &report.errors {
            warn!("{error}");
        }
        if !report.cidrs_dropped.is_empty() {
            warn!(
                cidrs = %join(&report.cidrs_dropped),
                "the datapath holds {} CIDRs per set; these are ignored",
                svc_common::lb::MAX_CIDRS
            );
        }
        let (frontends, backends) = self.applier.sizes();
        info!(
            frontends,
            backends,
            written = report.frontends_written,
            removed = report.frontends_removed,
            backends_added = report.backends_added,
            backends_removed = report.backends_removed,
            "{what}"
        );
        Synced {
            latency: started.elapsed(),
            errors: report.errors.len() as u64,
            problems: source_problems
                .iter()
                .chain(&translation_problems)
                .filter(|p| p.warning)
                .count() as u64,
            names: desired
                .frontends
                .iter()
                .map(|(frontend, spec)| (*frontend, spec.service.to_string()))
                .collect(),
            sweep_wanted: report.sweep_wanted,
        }
    }
}

/// The page the HTTP side serves.
struct Page {
    text: String,
    ready: bool,
    /// When the main loop last rendered it (every 2 s while it runs).
    refreshed: Instant,
    /// Why the agent cannot do its job any more (an essential task
    /// ended): `/healthz` fails with it, so the agent is restarted.
    failed: Option<String>,
}

fn lock(page: &Mutex<Page>) -> std::sync::MutexGuard<'_, Page> {
    // A panicked holder left a whole page or none: still serve it.
    page.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Renders the metrics from the maps and hands the page over.
fn publish(
    page: &Mutex<Page>,
    snapshot: &mut metrics::Snapshot,
    applier: &Applier,
    datapath: &Datapath,
    names: &[(Frontend, String)],
    ready: bool,
) {
    (snapshot.frontends, snapshot.backends) = applier.sizes();
    if let Ok(stats) = datapath.stats() {
        snapshot.datapath = stats;
    }
    let maps = datapath.maps();
    snapshot.fill = maps.fill();
    snapshot.fill.push((
        svc_common::ct::CT_MAP,
        snapshot.sweeps.entries as u64,
        u64::from(maps.ct_capacity()),
    ));
    snapshot.fill.push((
        svc_common::lb::AFFINITY_MAP,
        snapshot.sweeps.affinity_entries as u64,
        u64::from(maps.affinity_capacity()),
    ));
    let config = datapath.config();
    snapshot.nat_port_range =
        u64::from(config.nat_port_max.saturating_sub(config.nat_port_min)) + 1;
    snapshot.traffic = names
        .iter()
        .filter_map(|(frontend, service)| {
            let id = maps.service(frontend)?.id;
            let counters = maps.service_counters(id).ok()?;
            Some(metrics::FrontendTraffic {
                frontend: svc_agent::inspect::frontend_label(frontend),
                service: service.clone(),
                packets: counters.packets,
                bytes: counters.bytes,
            })
        })
        .collect();
    let text = metrics::render(snapshot);
    let mut page = lock(page);
    page.text = text;
    page.ready = ready;
    page.refreshed = Instant::now();
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
