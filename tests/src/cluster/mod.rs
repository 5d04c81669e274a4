//! A whole Kubernetes cluster on this machine, for tests that need real
//! pods: the control plane of [`crate::k8s`] in its full form (every
//! controller, kube-scheduler, service-account tokens) bound to a bridge in
//! the root namespace, CoreDNS serving `cluster.local` behind the
//! `kube-dns` Service, and one or two nodes in network namespaces
//! ([`node::KubeNode`]: containerd, runc, kubelet). No kube-proxy: svc-proxy
//! is deployed as its DaemonSet from its image ([`deploy`]).
//!
//! The service and pod ranges are blackholed in the root namespace (each
//! node's pod CIDR routed to it), so no unproxied packet leaves the
//! machine.
//!
//! `cargo xtask cluster` builds the binaries and images and runs one until
//! Ctrl-C; the cluster tests share one.

pub mod deploy;
pub mod kube_proxy;
pub mod node;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::{
    eventually,
    k8s::{BIN_DIR_ENV, ControlPlane, PlaneOptions, Process},
    netns::NetNs,
};
pub use node::{DNS_SERVICE_IP, KubeNode, LAN_PREFIX};

/// Where `cargo xtask` puts the directory of image archives.
pub const IMAGES_DIR_ENV: &str = "SVC_CLUSTER_IMAGES";
/// The root namespace's bridge every node hangs off.
const BRIDGE: &str = "svcc0";
/// The ranges nothing outside the cluster may see: services, pods, and
/// TEST-NET-3, which Kubernetes' e2e specs use as an extra `ServiceCIDR`
/// and as externalIPs.
const BLACKHOLES: [&str; 3] = ["10.96.0.0/16", "10.244.0.0/16", "203.0.113.0/24"];
/// How long a node has to become Ready.
const NODE_READY: Duration = Duration::from_mins(2);

/// The cluster. Dropping it stops everything and removes what it made.
pub struct KubeCluster {
    // Dropped first: their pods go before the control plane.
    pub nodes: Vec<KubeNode>,
    pub external: NetNs,
    coredns: Process,
    pub plane: ControlPlane,
    pub bin: PathBuf,
    pub images: PathBuf,
    _network: RootNetwork,
}

impl KubeCluster {
    /// Starts a cluster of `nodes` nodes (1 or 2) and waits until they are
    /// Ready. The agent is not deployed yet ([`Self::deploy_agent`]).
    ///
    /// # Panics
    ///
    /// When a binary or image is missing or a component does not come up.
    #[must_use]
    pub fn start(nodes: u8) -> Self {
        crate::require_root();
        assert!((1..=2).contains(&nodes), "one or two nodes");
        let bin = env_dir(BIN_DIR_ENV);
        let images = env_dir(IMAGES_DIR_ENV);
        let network = RootNetwork::new(nodes);
        // The DaemonSet mounts bpffs with Bidirectional propagation (its
        // pins must outlive the pod), which needs a shared mount; without
        // systemd, mounts here are private (as kind's node entrypoint does,
        // recursively: bpffs may be mounted twice over).
        let shared = Command::new("mount")
            .args(["--make-rshared", "/sys"])
            .status()
            .expect("running mount");
        assert!(shared.success(), "mount --make-rshared /sys failed");
        let plane = ControlPlane::start_with(PlaneOptions {
            bind: format!("{LAN_PREFIX}.1").parse().expect("an address"),
            full: true,
        });
        let logs = plane.dir().join("logs");
        let coredns = start_coredns(&plane, &bin, &logs);
        let external = NetNs::new("outside");
        plug(&external, "svcc-outside", &format!("{LAN_PREFIX}.100"));
        let nodes: Vec<KubeNode> = (1..=nodes)
            .map(|index| {
                let node = KubeNode::start(index, &plane, &bin, &logs);
                // Replies of the API server and CoreDNS to pods.
                crate::netns::ip(&["route", "replace", &node.pod_cidr, "via", &node.addr]);
                node
            })
            .collect();
        let archives = image_archives(&images);
        assert!(
            archives.len() >= 3,
            "{}: expected the agent, agnhost and pause images, found {archives:?}",
            images.display()
        );
        for node in &nodes {
            for (archive, name) in &archives {
                node.import(archive, name);
            }
        }
        let cluster = Self {
            nodes,
            external,
            coredns,
            plane,
            bin,
            images,
            _network: network,
        };
        cluster.wait_nodes_ready();
        cluster
    }

    fn wait_nodes_ready(&self) {
        let api: Api<Node> = Api::all(self.plane.client());
        for node in &self.nodes {
            let ready = eventually(NODE_READY, || {
                self.plane.block_on(async {
                    api.get_opt(&node.name)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|object| {
                            object
                                .status
                                .and_then(|status| status.conditions)
                                .is_some_and(|conditions| {
                                    conditions
                                        .iter()
                                        .any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                        })
                })
            });
            assert!(
                ready,
                "{} did not become Ready in {NODE_READY:?}; logs in {}",
                node.name,
                self.plane.dir().join("logs").display()
            );
        }
    }

    /// The admin kubeconfig.
    #[must_use]
    pub fn kubeconfig(&self) -> PathBuf {
        self.plane.dir().join("admin.kubeconfig")
    }

    /// Runs `kubectl` as the administrator.
    #[must_use]
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .output()
            .expect("running kubectl")
    }

    /// The CoreDNS process is still up.
    pub fn assert_running(&mut self) {
        self.coredns.assert_running();
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        self.coredns.stop();
        // Each node removed its own pins; the directory they shared goes
        // once empty.
        let _ = fs::remove_dir(deploy::PIN_ROOT);
    }
}

fn env_dir(var: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: run the cluster tests with `cargo xtask test` (or `cargo xtask cluster`), which build the binaries and images first")
    }))
}

/// `(archive, name)` of every image under `dir`: `<file>.oci.tar` beside
/// `<file>.name`.
#[must_use]
pub fn image_archives(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut found: Vec<(PathBuf, String)> = fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let stem = path.to_str()?.strip_suffix(".oci.tar")?.to_owned();
            let name = fs::read_to_string(format!("{stem}.name")).ok()?;
            Some((path, name.trim().to_owned()))
        })
        .collect();
    found.sort();
    found
}

/// Plugs `ns` into the bridge: a veth whose end in `ns` is `eth0` with
/// `addr/24`, the other end `host_end` (a crashed run's is replaced).
fn plug(ns: &NetNs, host_end: &str, addr: &str) {
    let _ = Command::new("ip")
        .args(["link", "del", host_end])
        .stderr(Stdio::null())
        .status();
    crate::netns::ip(&[
        "link",
        "add",
        host_end,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ]);
    crate::netns::ip(&["link", "set", host_end, "master", BRIDGE, "up"]);
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
}

/// CoreDNS on the bridge address, answering `cluster.local` from the API
/// and nothing else (no forwarding: nothing leaves the machine).
fn start_coredns(plane: &ControlPlane, bin: &Path, logs: &Path) -> Process {
    let corefile = plane.dir().join("Corefile");
    let kubeconfig = plane.kubeconfig_for("admin");
    let text = format!(
        "cluster.local:53 in-addr.arpa:53 {{\n    bind {LAN_PREFIX}.1\n    errors\n    \
         kubernetes cluster.local in-addr.arpa {{\n        kubeconfig {}\n        pods insecure\n    }}\n}}\n\
         .:53 {{\n    bind {LAN_PREFIX}.1\n    template ANY ANY {{\n        rcode NXDOMAIN\n    }}\n}}\n",
        kubeconfig.display()
    );
    fs::write(&corefile, text).expect("Corefile");
    Process::spawn(
        "coredns",
        &bin.join("coredns"),
        &["-conf".into(), corefile.display().to_string()],
        logs,
    )
}

/// The root namespace's part: the bridge, routes to each node's pod CIDR
/// and blackholes for the rest of the service and pod ranges.
struct RootNetwork {
    nodes: u8,
}

impl RootNetwork {
    fn new(nodes: u8) -> Self {
        let network = Self { nodes };
        network.remove();
        crate::netns::ip(&["link", "add", BRIDGE, "type", "bridge"]);
        crate::netns::ip(&["addr", "add", &format!("{LAN_PREFIX}.1/24"), "dev", BRIDGE]);
        crate::netns::ip(&["link", "set", BRIDGE, "up"]);
        for range in BLACKHOLES {
            crate::netns::ip(&["route", "replace", "blackhole", range]);
        }
        network
    }

    fn remove(&self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        };
        quiet(&["link", "del", BRIDGE]);
        for range in BLACKHOLES {
            quiet(&["route", "del", "blackhole", range]);
        }
        for index in 1..=self.nodes.max(2) {
            quiet(&["route", "del", &format!("10.244.{index}.0/24")]);
        }
    }
}

impl Drop for RootNetwork {
    fn drop(&mut self) {
        self.remove();
    }
}
