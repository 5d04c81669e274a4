//! Upstream kube-proxy on the test cluster's nodes, in place of svc-proxy:
//! the control run of the conformance suite (a spec that fails with both
//! proxies points at the harness, not at svc-proxy). One process per node,
//! in the node's network namespace as the DaemonSet's host-network pod
//! would be, authenticated as `system:kube-proxy` (the `system:node-proxier`
//! role of the API server's bootstrap policy).

use std::time::Duration;

use super::KubeCluster;
use crate::{eventually, k8s::Process};

/// kube-proxy's health port (`--healthz-bind-address`), on every node.
const HEALTHZ_PORT: u16 = 10256;

/// kube-proxy running on every node; dropping it stops them (their rules
/// go with the nodes' namespaces).
pub struct KubeProxy {
    processes: Vec<Process>,
}

impl KubeProxy {
    /// Starts kube-proxy in `mode` (`nftables`, `iptables`) on every node
    /// and waits until each reports healthy (its first sync is done).
    ///
    /// # Panics
    ///
    /// When a kube-proxy does not become healthy within a minute.
    #[must_use]
    pub fn start(cluster: &KubeCluster, mode: &str) -> Self {
        let kubeconfig = cluster.plane.kubeconfig_for("kube-proxy");
        let logs = cluster.plane.dir().join("logs");
        let mut processes = Vec::new();
        for node in &cluster.nodes {
            let mut command = node.in_node(&cluster.bin.join("kube-proxy"));
            command
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!("--proxy-mode={mode}"))
                .arg(format!("--hostname-override={}", node.name))
                .arg("--cluster-cidr=10.244.0.0/16")
                // nf_conntrack_max is the whole machine's, not the node's.
                .arg("--conntrack-max-per-core=0")
                .arg(format!("--healthz-bind-address=0.0.0.0:{HEALTHZ_PORT}"))
                .arg("--v=2")
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
            let name = super::node::leak(format!("kube-proxy-{}", node.name));
            processes.push(Process::spawn_command(name, &mut command, &logs));
        }
        let mut proxy = Self { processes };
        for node in &cluster.nodes {
            let addr = format!("{}:{HEALTHZ_PORT}", node.addr)
                .parse()
                .expect("a socket address");
            let healthy = eventually(Duration::from_mins(1), || {
                crate::k8s::http_at(addr, "GET", "/healthz", "")
                    .is_some_and(|(status, _)| status == 200)
            });
            if !healthy {
                proxy.assert_running();
            }
            assert!(
                healthy,
                "kube-proxy on {} is not healthy after a minute; see {}",
                node.name,
                logs.join(format!("kube-proxy-{}.log", node.name)).display()
            );
        }
        proxy
    }

    /// Every kube-proxy is still up.
    pub fn assert_running(&mut self) {
        for process in &mut self.processes {
            process.assert_running();
        }
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        for process in &mut self.processes {
            process.stop();
        }
    }
}
