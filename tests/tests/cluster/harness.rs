//! The shared two-node cluster and what the scenarios do with it: apply
//! manifests with kubectl, wait for pods, and ask a client pod's agnhost
//! `netexec` to dial a service (its `/dial` endpoint), as Kubernetes' own
//! e2e tests do.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    cluster::{KubeCluster, deploy},
    k8s::http_at,
};

/// agnhost as the cluster imported it.
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.66.1";
/// How long pods have to become Ready.
pub const POD_READY: Duration = Duration::from_mins(2);
/// The netexec port of the client pods.
pub const CLIENT_PORT: u16 = 8080;

pub struct Harness {
    pub cluster: KubeCluster,
}

impl Harness {
    /// Two nodes, DNS, and svc-proxy deployed from its image.
    pub fn start() -> Self {
        let started = std::time::Instant::now();
        let cluster = KubeCluster::start(2);
        let ready = started.elapsed();
        deploy::dns(&cluster);
        deploy::agent(&cluster, "0.1.0");
        eprintln!(
            "cluster: nodes Ready after {ready:?}, svc-proxy Ready on both after {:?}",
            started.elapsed()
        );
        Self { cluster }
    }

    /// Runs kubectl; panics with its output unless it succeeds.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.cluster.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` with `yaml`.
    pub fn apply(&self, yaml: &str) {
        let mut child = Command::new(self.cluster.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.cluster.kubeconfig())
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl apply");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(yaml.as_bytes())
            .expect("writing the manifest");
        let out = child.wait_with_output().expect("kubectl apply ends");
        assert!(
            out.status.success(),
            "kubectl apply: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until the pods `selector` names in `namespace` are Ready.
    pub fn wait_ready(&self, namespace: &str, selector: &str) {
        let timeout = format!("--timeout={}s", POD_READY.as_secs());
        let out = self.cluster.kubectl(&[
            "-n",
            namespace,
            "wait",
            "--for=condition=Ready",
            "pod",
            "-l",
            selector,
            &timeout,
        ]);
        assert!(
            out.status.success(),
            "pods {selector} in {namespace} did not become Ready: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.kubectl(&["-n", namespace, "get", "pods", "-o", "wide"])
        );
    }

    /// `(name, IP)` of the pods `selector` names in `namespace`.
    pub fn pods(&self, namespace: &str, selector: &str) -> Vec<(String, Ipv4Addr)> {
        let text = self.kubectl(&[
            "-n",
            namespace,
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.podIP}{\"\\n\"}{end}",
        ]);
        text.lines()
            .filter_map(|line| {
                let (name, ip) = line.split_once(' ')?;
                Some((name.to_owned(), ip.trim().parse().ok()?))
            })
            .collect()
    }

    /// The agent pods on `node` (`pod/<name>`).
    pub fn agent_pods_on(&self, node: &str) -> Vec<String> {
        self.kubectl(&[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=svc-agent",
            &format!("--field-selector=spec.nodeName={node}"),
            "-o",
            "name",
        ])
        .lines()
        .map(str::to_owned)
        .collect()
    }

    /// Merge-patches the agents' DaemonSet.
    pub fn patch_agents(&self, patch: &str) {
        self.kubectl(&[
            "-n",
            "kube-system",
            "patch",
            "daemonset",
            "svc-agent",
            "--type=merge",
            "-p",
            patch,
        ]);
    }

    /// A field of a namespaced object (`jsonpath`).
    pub fn field(&self, namespace: &str, object: &str, jsonpath: &str) -> String {
        self.kubectl(&[
            "-n",
            namespace,
            "get",
            object,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ])
        .trim()
        .to_owned()
    }
}

/// Asks the netexec of the client pod at `client` to connect to
/// `host:port` over HTTP once and return the answering pod's host name.
pub fn dial(client: Ipv4Addr, host: &str, port: u16) -> Result<String, String> {
    let path = format!("/dial?request=hostname&protocol=http&host={host}&port={port}&tries=1");
    let (status, body) = http_at(SocketAddrV4::new(client, CLIENT_PORT), "GET", &path, "")
        .ok_or_else(|| format!("the client pod {client} did not answer"))?;
    if status != 200 {
        return Err(format!("/dial answered {status}: {body}"));
    }
    let json: serde_json::Value =
        serde_json::from_str(&body).map_err(|err| format!("{body}: {err}"))?;
    json["responses"][0]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no response: {body}"))
}

/// The names `tries` dials of `host:port` from `client` were answered by;
/// panics on a failed dial.
pub fn answered_by(client: Ipv4Addr, host: &str, port: u16, tries: usize) -> Vec<String> {
    let mut names: Vec<String> = (0..tries)
        .map(|i| {
            dial(client, host, port)
                .unwrap_or_else(|err| panic!("dial {i} of {host}:{port} from {client}: {err}"))
        })
        .collect();
    names.sort();
    names.dedup();
    names
}
