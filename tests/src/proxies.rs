//! The proxies the side-by-side benchmark compares, each run as a node
//! process in the namespace cluster's nodes against the same API server:
//! svc-proxy's agent and upstream kube-proxy in iptables and nftables
//! mode. One proxy programs the nodes at a time; [`RunningProxy::stop`]
//! tears it down the proxy's own way and then checks the nodes are clean,
//! so the next one starts from the same state.

use std::{
    collections::BTreeSet,
    fmt, fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    str::FromStr,
    time::Duration,
};

use crate::{k8s::Process, netns::NetNs};

/// Where both proxies serve their metrics inside a node (kube-proxy's
/// `--metrics-bind-address` default, the agent's too).
pub const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);

/// A proxy under measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proxy {
    SvcProxy,
    KubeProxyIptables,
    KubeProxyNftables,
}

impl Proxy {
    pub const ALL: [Self; 3] = [
        Self::SvcProxy,
        Self::KubeProxyIptables,
        Self::KubeProxyNftables,
    ];

    /// The name figures carry.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SvcProxy => "svc-proxy",
            Self::KubeProxyIptables => "kube-proxy-iptables",
            Self::KubeProxyNftables => "kube-proxy-nftables",
        }
    }

    /// The proxy's own metric of how long programming a change took: a
    /// histogram whose sum and count give the mean.
    #[must_use]
    pub const fn sync_metric(self) -> &'static str {
        match self {
            Self::SvcProxy => "svc_sync_latency_seconds",
            Self::KubeProxyIptables | Self::KubeProxyNftables => {
                "kubeproxy_sync_proxy_rules_duration_seconds"
            }
        }
    }
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Proxy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|proxy| proxy.name() == text)
            .ok_or_else(|| {
                format!(
                    "unknown proxy {text:?}: svc-proxy, kube-proxy-iptables or kube-proxy-nftables"
                )
            })
    }
}

/// What a proxy needs to start on a node.
pub struct NodeSpec<'a> {
    pub name: &'static str,
    pub ns: &'a NetNs,
    /// The node's address (kube-proxy's health endpoint listens there).
    pub addr: Ipv4Addr,
}

/// Where the binaries and credentials are.
pub struct Setup<'a> {
    /// Directory of the upstream binaries (`kube-proxy`).
    pub bin: &'a Path,
    /// The `svc-agent` binary.
    pub agent: &'a Path,
    pub agent_kubeconfig: &'a Path,
    pub kube_proxy_kubeconfig: &'a Path,
    /// Logs and the agent's state files.
    pub dir: &'a Path,
    /// The agent's `--maglev-slots` (sized for the services measured).
    pub maglev_slots: u32,
}

/// A proxy running on every node.
pub struct RunningProxy {
    pub proxy: Proxy,
    processes: Vec<Process>,
    namespaces: Vec<String>,
    pin_dirs: Vec<PathBuf>,
    agent: PathBuf,
}

impl RunningProxy {
    /// Starts `proxy` on every node of `nodes`; `tag` keeps the logs of
    /// runs apart.
    #[must_use]
    pub fn start(proxy: Proxy, nodes: &[NodeSpec<'_>], setup: &Setup<'_>, tag: &str) -> Self {
        let logs = setup.dir.join("logs");
        fs::create_dir_all(&logs).expect("log directory");
        let mut processes = Vec::new();
        let mut pin_dirs = Vec::new();
        for node in nodes {
            let name: &'static str =
                Box::leak(format!("{proxy}-{}-{tag}", node.name).into_boxed_str());
            let mut command = match proxy {
                Proxy::SvcProxy => {
                    let pin_dir = PathBuf::from(format!(
                        "/sys/fs/bpf/svc-bench-{}-{}",
                        std::process::id(),
                        node.name
                    ));
                    let mut command = Command::new(setup.agent);
                    command
                        .args(["run", "--netns", node.ns.name(), "--node-name", node.name])
                        .args(["--uplink", "eth0", "--pod-iface", "p*", "--no-host-sockets"])
                        .arg("--kubeconfig")
                        .arg(setup.agent_kubeconfig)
                        .arg("--pin-dir")
                        .arg(&pin_dir)
                        .arg("--state-file")
                        .arg(setup.dir.join(format!("{}-frontends.json", node.name)))
                        .arg(format!("--maglev-slots={}", setup.maglev_slots))
                        .env("SVC_AGENT_LOG", "warn");
                    pin_dirs.push(pin_dir);
                    command
                }
                Proxy::KubeProxyIptables | Proxy::KubeProxyNftables => {
                    let mut command = in_netns(node.ns, &setup.bin.join("kube-proxy"));
                    let mode = if proxy == Proxy::KubeProxyIptables {
                        "iptables"
                    } else {
                        "nftables"
                    };
                    command
                        .arg(format!(
                            "--kubeconfig={}",
                            setup.kube_proxy_kubeconfig.display()
                        ))
                        .arg(format!("--proxy-mode={mode}"))
                        .arg(format!("--hostname-override={}", node.name))
                        .arg("--cluster-cidr=10.244.0.0/16")
                        // nf_conntrack_max is the machine's, not the node's.
                        .arg("--conntrack-max-per-core=0")
                        .arg(format!("--healthz-bind-address={}:10256", node.addr))
                        .arg("--v=1")
                        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
                    command
                }
            };
            processes.push(Process::spawn_command(name, &mut command, &logs));
        }
        Self {
            proxy,
            processes,
            namespaces: nodes.iter().map(|node| node.ns.name().to_owned()).collect(),
            pin_dirs,
            agent: setup.agent.to_path_buf(),
        }
    }

    /// The process on node `index`.
    #[must_use]
    pub fn pid(&self, index: usize) -> u32 {
        self.processes[index].id()
    }

    /// Every process is still up.
    pub fn assert_running(&mut self) {
        for process in &mut self.processes {
            process.assert_running();
        }
    }

    /// Stops the proxy on every node, removes what it programmed its own
    /// way (`svc-agent cleanup`, `kube-proxy --cleanup`), then checks that
    /// no rule, table, pinned map or link is left; flushes netfilter's
    /// connection tracking so the next proxy starts from the same state.
    ///
    /// # Panics
    ///
    /// When the cleanup fails or leaves anything behind.
    pub fn stop(mut self, bin: &Path) {
        for process in &mut self.processes {
            process.stop();
        }
        for (index, ns) in self.namespaces.iter().enumerate() {
            match self.proxy {
                Proxy::SvcProxy => {
                    let pin_dir = &self.pin_dirs[index];
                    run_quietly(
                        Command::new(&self.agent)
                            .args(["cleanup", "--pin-dir"])
                            .arg(pin_dir),
                    );
                    assert!(
                        !pin_dir.exists(),
                        "{ns}: {} is left after svc-agent cleanup",
                        pin_dir.display()
                    );
                }
                Proxy::KubeProxyIptables | Proxy::KubeProxyNftables => {
                    run_quietly(
                        in_netns_named(ns, &bin.join("kube-proxy"))
                            .arg("--cleanup")
                            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    );
                }
            }
            let mut state = NetfilterState::of(ns);
            // kube-proxy's copy of kubelet's anti-martian chain: its
            // cleanup leaves it to kubelet, which owns it (proxier.go,
            // `kubeletFirewallChain`).
            state
                .kube_chains
                .retain(|chain| chain != "filter KUBE-FIREWALL");
            assert!(
                state.kube_chains.is_empty() && state.kube_tables == 0,
                "{ns}: {} left {state:?} after its cleanup",
                self.proxy
            );
            // Empty tables iptables-nft leaves keep netfilter's hooks (and
            // its connection tracking) in the path of the next proxy.
            run_quietly(in_netns_named(ns, Path::new("nft")).args(["flush", "ruleset"]));
            run_quietly(in_netns_named(ns, Path::new("conntrack")).arg("-F"));
            let left = NetfilterState::of(ns);
            assert_eq!(left.nft_rules, 0, "{ns}: rules left after the flush");
        }
        self.processes.clear();
    }
}

impl Drop for RunningProxy {
    /// A run that failed half-way: stop what still runs and remove the
    /// pinned datapath (best effort; [`Self::stop`] is the checked way).
    fn drop(&mut self) {
        for process in &mut self.processes {
            process.stop();
        }
        for pin_dir in &self.pin_dirs {
            if pin_dir.exists() {
                let _ = Command::new(&self.agent)
                    .args(["cleanup", "--pin-dir"])
                    .arg(pin_dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// `binary` run inside network namespace `ns`, as a host-network pod's
/// process would be.
fn in_netns(ns: &NetNs, binary: &Path) -> Command {
    in_netns_named(ns.name(), binary)
}

fn in_netns_named(ns: &str, binary: &Path) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(binary);
    command
}

fn run_quietly(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("running {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What netfilter holds in a node's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetfilterState {
    /// Rules in every table (iptables-nft's included: they are nftables
    /// rules underneath).
    pub nft_rules: u64,
    /// Elements of every nftables set and map.
    pub nft_elements: u64,
    /// Chains whose name starts with `KUBE-` (iptables mode's).
    pub kube_chains: Vec<String>,
    /// Tables named `kube-proxy` (nftables mode's).
    pub kube_tables: u64,
}

impl NetfilterState {
    /// Counts from `nft -j list ruleset` in namespace `ns`.
    ///
    /// # Panics
    ///
    /// When `nft` fails or prints something other than its JSON.
    #[must_use]
    pub fn of(ns: &str) -> Self {
        let output = in_netns_named(ns, Path::new("nft"))
            .args(["-j", "list", "ruleset"])
            .output()
            .unwrap_or_else(|err| panic!("nft in {ns}: {err}"));
        assert!(
            output.status.success(),
            "nft -j list ruleset in {ns}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let json: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("nft's JSON ruleset");
        let mut state = Self::default();
        for object in json["nftables"].as_array().into_iter().flatten() {
            if object.get("rule").is_some() {
                state.nft_rules += 1;
            } else if let Some(chain) = object.get("chain") {
                if let Some(name) = chain["name"].as_str().filter(|n| n.starts_with("KUBE-")) {
                    state.kube_chains.push(format!(
                        "{} {}",
                        chain["table"].as_str().unwrap_or_default(),
                        name
                    ));
                }
            } else if let Some(table) = object.get("table") {
                if table["name"] == "kube-proxy" {
                    state.kube_tables += 1;
                }
            } else if let Some(set) = object.get("set").or_else(|| object.get("map")) {
                state.nft_elements += set["elem"].as_array().map_or(0, |e| e.len() as u64);
            }
        }
        state
    }
}

/// Resident memory of process `pid` (`VmRSS`), in bytes.
#[must_use]
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// CPU time (user and system) process `pid` has used, threads included.
#[must_use]
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from state.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(crate::loadgen::ticks_to_duration(utime + stime))
}

/// Kernel memory of the BPF maps process `pid` holds open (the `memlock`
/// of each map's fdinfo, each map once), in bytes.
#[must_use]
pub fn bpf_map_bytes(pid: u32) -> u64 {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for entry in entries.flatten() {
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += memlock;
        }
    }
    total
}

/// The metrics page a proxy serves inside `ns` (empty when unreachable).
#[must_use]
pub fn metrics_page(ns: &NetNs) -> String {
    ns.run(|| {
        let mut stream =
            TcpStream::connect_timeout(&METRICS.into(), Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        Some(text)
    })
    .unwrap_or_default()
}

/// The `_sum` and `_count` of histogram `name` on a metrics page (summed
/// over its label sets).
#[must_use]
pub fn histogram_sum_count(page: &str, name: &str) -> Option<(f64, f64)> {
    let total = |suffix: &str| {
        let prefix = format!("{name}{suffix}");
        let values: Vec<f64> = page
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let rest = line.strip_prefix(&prefix)?;
                let value = if let Some(labelled) = rest.strip_prefix('{') {
                    labelled.split_once('}')?.1
                } else {
                    rest
                };
                value.split_whitespace().next()?.parse::<f64>().ok()
            })
            .collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>())
    };
    Some((total("_sum")?, total("_count")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_sums_and_counts_are_read_with_or_without_labels() {
        let page = "# HELP x\nkubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.1\"} 3\n\
                    kubeproxy_sync_proxy_rules_duration_seconds_sum 0.25\n\
                    kubeproxy_sync_proxy_rules_duration_seconds_count 5\n\
                    svc_sync_latency_seconds_sum{a=\"b\"} 1.5\nsvc_sync_latency_seconds_count{a=\"b\"} 3\n";
        assert_eq!(
            histogram_sum_count(page, "kubeproxy_sync_proxy_rules_duration_seconds"),
            Some((0.25, 5.0))
        );
        assert_eq!(
            histogram_sum_count(page, "svc_sync_latency_seconds"),
            Some((1.5, 3.0))
        );
        assert_eq!(histogram_sum_count(page, "missing"), None);
    }

    #[test]
    fn proxies_parse_from_their_names() {
        for proxy in Proxy::ALL {
            assert_eq!(proxy.name().parse::<Proxy>(), Ok(proxy));
        }
        assert!("kube-proxy".parse::<Proxy>().is_err());
    }
}
