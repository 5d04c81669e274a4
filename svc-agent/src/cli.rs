//! Command line.

use std::{net::Ipv4Addr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use svc_agent::{
    datapath::{BpfLogLevel, DEFAULT_PIN_DIR, Ipv4Cidr, ports::PortRange},
    inspect::DEFAULT_STATE_FILE,
};
use svc_common::{
    ct::DEFAULT_CT_ENTRIES,
    lb::{DEFAULT_MAGLEV_SLOTS, DEFAULT_MAX_AFFINITY},
    maglev::{DEFAULT_SLOTS_PER_BACKEND, MAX_TABLE_SIZE},
};

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
#[expect(clippy::large_enum_variant, reason = "parsed once, at start")]
pub enum Command {
    /// Load the datapath (adopting what an earlier run pinned), attach it,
    /// and serve the cluster's services (or a manifest directory's) until
    /// Ctrl-C. The pinned datapath keeps serving after the agent exits.
    Run(RunArgs),
    /// List the frontends in the pinned maps: service, address, type,
    /// backends, affinity, traffic.
    Services(InspectArgs),
    /// The backends of a service (`namespace/name`) and their traffic.
    Backends {
        /// `namespace/name` of the service.
        service: String,
        #[command(flatten)]
        inspect: InspectArgs,
    },
    /// Connection-tracking entries, optionally only those mentioning a
    /// string (an address, `addr:port`, ...).
    Conntrack {
        #[arg(long)]
        filter: Option<String>,
        #[command(flatten)]
        inspect: InspectArgs,
    },
    /// A frontend's Maglev table: its size and each backend's share.
    Maglev {
        /// `ADDR:PORT/PROTO` or `*:NODEPORT/PROTO`, followed by
        /// ` in-cluster` for the in-cluster variant of a Local external
        /// frontend (as `services` lists them).
        frontend: String,
        #[command(flatten)]
        inspect: InspectArgs,
    },
    /// Remove everything the agent pinned: maps, connection tracking and
    /// the links that keep the programs attached.
    ///
    /// Also takes `svc-cni` out of the node's CNI configuration and bin
    /// directory, first, so no new pod asks for a datapath that is gone.
    Cleanup {
        /// The bpffs directory `run` pinned under.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[command(flatten)]
        cni: CniDirs,
    },
    /// Install the `svc-cni` plugin on this node: copy its binary into the
    /// CNI bin directory and chain it at the end of the active conflist
    /// (idempotent; the rest of the file is kept). The DaemonSet's init
    /// container runs this.
    InstallCni {
        /// The plugin binary to install; `svc-cni` beside this program when
        /// not given.
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// The bpffs directory `run` pins under, written into the plugin's
        /// configuration.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[command(flatten)]
        cni: CniDirs,
    },
}

/// Where the node keeps its CNI plugins and configuration.
#[derive(Args)]
pub struct CniDirs {
    /// The CNI plugin binaries' directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The CNI network configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
}

/// `--detect-local-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DetectLocalMode {
    #[value(alias = "InterfaceNamePrefix")]
    Interface,
    #[value(alias = "ClusterCIDR")]
    ClusterCidr,
    #[value(alias = "NodeCIDR")]
    NodeCidr,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args)]
pub struct InspectArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The bpffs directory `run` pinned under.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Where `run` records its frontends' service names.
    #[arg(long, default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
}

#[derive(Args)]
pub struct RunArgs {
    /// Where to serve Prometheus `/metrics`, `/healthz`, `/readyz` and
    /// `/proxyMode` (kube-proxy's metrics port, 10249).
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_addr: std::net::SocketAddr,
    /// Where to serve kube-proxy's node health (`/healthz`, `/livez`) for
    /// load balancers' health checks (kube-proxy's 0.0.0.0:10256); `off`
    /// serves none.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_addr: OptionalAddr,
    /// Run in this network namespace (a name `ip netns` knows) instead of
    /// the caller's; the mount namespace, and so bpffs, stay the caller's.
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
    /// Where to record the frontends' service names for the inspection
    /// commands.
    #[arg(long, default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    /// Directory of Service, EndpointSlice and Endpoints manifests (the YAML
    /// `kubectl apply -f` takes) to serve; watched for changes.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig to reach the API server with. Without it (and without
    /// --manifests): `KUBECONFIG` or `~/.kube/config` if there is one, else
    /// the in-cluster service account.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// After a Kubernetes change, wait this long for more before applying,
    /// so a burst is applied once (never longer than ten times this in all).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub debounce_ms: u64,
    /// This node's name, to tell local endpoints (`nodeName`) from remote
    /// ones. Defaults to the host name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's zone, for topology hints (`trafficDistribution`). With
    /// the Kubernetes source, the Node's `topology.kubernetes.io/zone`
    /// label when not given.
    #[arg(long, env = "NODE_ZONE")]
    pub node_zone: Option<String>,
    /// This proxy's name: services labelled
    /// `service.kubernetes.io/service-proxy-name` with another value are
    /// left alone.
    #[arg(long)]
    pub service_proxy_name: Option<String>,
    /// Host side of pod veths to translate pod traffic at: a name or a
    /// pattern with `*` (repeatable). Matching interfaces that appear later
    /// are attached too.
    #[arg(long = "pod-iface", alias = "pod-ifaces", value_name = "PATTERN")]
    pub pod_ifaces: Vec<String>,
    /// Node uplinks to translate node-port, external and reply traffic at:
    /// a name or a pattern with `*` (repeatable).
    #[arg(long = "uplink", value_name = "PATTERN")]
    pub uplinks: Vec<String>,
    /// A node address node ports answer on (repeatable). With the
    /// Kubernetes source, the Node object's `InternalIP` and `ExternalIP`
    /// addresses when not given.
    #[arg(long = "node-addr", value_name = "IPV4")]
    pub node_addrs: Vec<Ipv4Addr>,
    /// Source address of masqueraded and hairpinned flows; defaults to the
    /// first --node-addr.
    #[arg(long, value_name = "IPV4")]
    pub masquerade_addr: Option<Ipv4Addr>,
    /// Masquerade every flow to a ClusterIP, and to an external address
    /// with a Cluster traffic policy, local or not (kube-proxy's
    /// --masquerade-all). Local policies keep the client's address all the
    /// same.
    #[arg(long)]
    pub masquerade_all: bool,
    /// How local traffic (this node's pods: it keeps its address to
    /// ClusterIPs) is told from the rest (masqueraded, so replies come back
    /// through this node): `interface` (what enters at --pod-iface),
    /// `cluster-cidr` (sources in --cluster-cidr), `node-cidr` (sources in
    /// this node's pod CIDRs). kube-proxy's names are accepted too.
    #[arg(long, value_enum, default_value_t = DetectLocalMode::Interface)]
    pub detect_local_mode: DetectLocalMode,
    /// The cluster's pod CIDR (repeatable), for
    /// `--detect-local-mode cluster-cidr`.
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    pub cluster_cidrs: Vec<Ipv4Cidr>,
    /// This node's pod CIDR (repeatable), for `--detect-local-mode
    /// node-cidr`. With the Kubernetes source, the Node's `spec.podCIDRs`
    /// when not given.
    #[arg(long = "node-pod-cidr", value_name = "CIDR")]
    pub node_pod_cidrs: Vec<Ipv4Cidr>,
    /// A service CIDR (repeatable): packets to an address in one that no
    /// service holds are dropped, as kube-proxy's nftables mode does. With
    /// the Kubernetes source, the cluster's `ServiceCIDR` objects when not
    /// given; without either, nothing is dropped.
    #[arg(long = "service-cidr", value_name = "CIDR")]
    pub service_cidrs: Vec<Ipv4Cidr>,
    /// Source ports masqueraded flows take, `MIN-MAX`: as many concurrent
    /// masqueraded flows to one backend as ports. By default the widest
    /// run of ports from 1024 outside the node's own ephemeral ports
    /// (`net.ipv4.ip_local_port_range`; with Linux's default,
    /// 1024-32767).
    #[arg(long, value_name = "MIN-MAX")]
    pub nat_port_range: Option<PortRange>,
    /// Seconds between sweeps of connection tracking (timed-out flows
    /// removed, UDP flows moved off endpoints that stopped serving, ids
    /// freed); a sync that removes something sweeps at once too.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ct_sweep_interval_secs: u64,
    /// Do not translate the node's own processes (cgroup socket hooks).
    #[arg(long)]
    pub no_host_sockets: bool,
    /// Connection-tracking entries (two per flow).
    #[arg(long, default_value_t = DEFAULT_CT_ENTRIES, value_parser = clap::value_parser!(u32).range(256..=(1 << 27)))]
    pub ct_entries: u32,
    /// Session-affinity entries.
    #[arg(long, default_value_t = DEFAULT_MAX_AFFINITY, value_parser = clap::value_parser!(u32).range(256..=(1 << 24)))]
    pub affinity_entries: u32,
    /// Slots of the shared Maglev array (at least one largest table).
    #[arg(long, default_value_t = DEFAULT_MAGLEV_SLOTS, value_parser = clap::value_parser!(u32).range(i64::from(MAX_TABLE_SIZE)..=(1 << 28)))]
    pub maglev_slots: u32,
    /// Least Maglev slots per backend of a service's table (the table is
    /// the next prime size up, at most 65,537): more slots move fewer
    /// flows when a backend comes or goes, at 8 bytes of kernel memory
    /// each.
    #[arg(long, default_value_t = DEFAULT_SLOTS_PER_BACKEND, value_parser = clap::value_parser!(u32).range(1..=65_537))]
    pub maglev_slots_per_backend: u32,
    /// bpffs directory for the maps and links, so the datapath outlives the
    /// agent and a restart adopts it (connections survive).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Pin nothing: the datapath goes away with the agent.
    #[arg(long)]
    pub no_pin: bool,
    /// Level of the eBPF programs' own log lines, fixed at load time.
    #[arg(long, value_enum, default_value_t = BpfLogLevel::Off)]
    pub bpf_log_level: BpfLogLevel,
    /// Seconds between counter reports in the log.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stats_interval_secs: u64,
    /// netfilter's established TCP timeout on this node, in seconds, as
    /// kube-proxy sets it (`--conntrack-tcp-timeout-established`); 0
    /// leaves it.
    #[arg(long, default_value_t = 86_400)]
    pub conntrack_tcp_timeout_established: u32,
    /// netfilter's `CLOSE_WAIT` TCP timeout, in seconds, as kube-proxy
    /// sets it; 0 leaves it.
    #[arg(long, default_value_t = 3_600)]
    pub conntrack_tcp_timeout_close_wait: u32,
}

/// A listening address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<std::net::SocketAddr>);

impl std::str::FromStr for OptionalAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "off" {
            return Ok(Self(None));
        }
        text.parse()
            .map(|addr| Self(Some(addr)))
            .map_err(|err| format!("{err} (an address:port, or off)"))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Cli;

    fn run_with(flags: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["svc-agent", "run"].iter().chain(flags))
    }

    #[test]
    fn sizes_and_intervals_out_of_range_are_refused_by_name() {
        for flags in [
            ["--ct-entries", "0"],
            ["--ct-entries", "4294967295"],
            ["--affinity-entries", "1"],
            ["--maglev-slots", "1000"],
            ["--stats-interval-secs", "0"],
            ["--ct-sweep-interval-secs", "0"],
            ["--debounce-ms", "3600000"],
        ] {
            let err = run_with(&flags)
                .err()
                .unwrap_or_else(|| panic!("{flags:?} accepted"));
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{flags:?}"
            );
            assert!(err.to_string().contains(flags[0]), "{flags:?}: {err}");
        }
        assert!(run_with(&["--ct-entries", "256", "--maglev-slots", "65537"]).is_ok());
        assert!(run_with(&[]).is_ok(), "the defaults are in range");
    }

    #[test]
    fn the_health_address_is_kube_proxy_s_or_off() {
        let healthz = |flags: &[&str]| match run_with(flags).map(|cli| cli.command) {
            Ok(super::Command::Run(args)) => Ok(args.healthz_addr.0),
            Ok(_) => panic!("not run"),
            Err(err) => Err(err.kind()),
        };
        assert_eq!(
            healthz(&[]),
            Ok(Some("0.0.0.0:10256".parse().expect("an address")))
        );
        assert_eq!(healthz(&["--healthz-addr", "off"]), Ok(None));
        assert_eq!(
            healthz(&["--healthz-addr", "127.0.0.1:1"]),
            Ok(Some("127.0.0.1:1".parse().expect("an address")))
        );
        assert_eq!(
            healthz(&["--healthz-addr", "10256"]),
            Err(clap::error::ErrorKind::ValueValidation)
        );
    }
}
