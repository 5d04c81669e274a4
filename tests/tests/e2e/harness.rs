//! The shared harness: the control plane, the namespace cluster, an agent
//! process per node, and helpers the scenarios share.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use svc_agent::inspect::PinnedMaps;
use tests::{
    eventually,
    k8s::{ControlPlane, Forwarder, apply},
    servers::read_answer,
    topology::{Cluster, Options, TIMEOUT},
};

pub(crate) const NS: &str = "e2e";
pub(crate) const CONVERGE: Duration = Duration::from_secs(15);
pub(crate) const WEB_PORT: u16 = 8080;

/// The `svc-agent` binary cargo built next to this test.
pub(crate) fn agent_binary() -> PathBuf {
    tests::built_binary("svc-agent")
}

/// One node's agent process.
pub(crate) struct Agent {
    pub(crate) node: &'static str,
    pub(crate) netns: String,
    pub(crate) pin_dir: PathBuf,
    pub(crate) state_file: PathBuf,
    pub(crate) child: Option<Child>,
    pub(crate) kubeconfig: PathBuf,
    pub(crate) log: PathBuf,
}

impl Agent {
    pub(crate) fn new(
        node: &'static str,
        netns: &str,
        kubeconfig: PathBuf,
        dir: &std::path::Path,
    ) -> Self {
        let mut agent = Self {
            node,
            netns: netns.to_owned(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/svc-e2e-{}-{node}", std::process::id())),
            state_file: dir.join(format!("{node}-frontends.json")),
            child: None,
            kubeconfig,
            log: dir.join("logs").join(format!("svc-agent-{node}.log")),
        };
        agent.start();
        agent
    }

    pub(crate) fn start(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = Command::new(agent_binary())
            .args(["run", "--netns", &self.netns, "--node-name", self.node])
            .args(["--uplink", "eth0", "--pod-iface", "p*", "--no-host-sockets"])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-file")
            .arg(&self.state_file)
            .env("SVC_AGENT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("agent log"))
            .stderr(log)
            .spawn()
            .expect("starting svc-agent");
        self.child = Some(child);
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(
                    libc::pid_t::try_from(child.id()).expect("pid fits"),
                    libc::SIGINT,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "svc-agent on {} exited: {status}; see {}",
                self.node,
                self.log.display()
            );
        }
    }

    /// Frontend label → backend addresses, as the pinned maps hold them.
    pub(crate) fn frontends(&self) -> BTreeMap<String, BTreeSet<String>> {
        let Ok(maps) = PinnedMaps::open(&self.pin_dir) else {
            return BTreeMap::new();
        };
        maps.services(&self.state_file)
            .unwrap_or_default()
            .into_iter()
            .map(|row| (row.frontend, row.backends.into_iter().collect()))
            .collect()
    }
}

/// `GET path` from `addr` inside `ns`: the whole response, empty when the
/// exchange failed.
pub(crate) fn get(ns: &tests::netns::NetNs, addr: SocketAddrV4, path: &str) -> String {
    ns.run(|| {
        let mut stream = TcpStream::connect_timeout(&addr.into(), TIMEOUT).ok()?;
        stream.set_read_timeout(Some(TIMEOUT)).ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        Some(text)
    })
    .unwrap_or_default()
}

/// The agent's own HTTP address inside its node's namespace.
pub(crate) const AGENT_HTTP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);

/// An agent's metrics page, fetched inside its node's namespace.
pub(crate) fn metrics(ns: &tests::netns::NetNs) -> String {
    get(ns, AGENT_HTTP, "/metrics")
}

/// The value of the sample named exactly `name` (labels included) on a
/// metrics page.
pub(crate) fn metric(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// A datapath counter's packets on `ns`'s agent.
pub(crate) fn datapath_counter(ns: &tests::netns::NetNs, counter: &str) -> u64 {
    metric(
        &metrics(ns),
        &format!("svc_datapath_packets_total{{counter=\"{counter}\"}}"),
    )
    .unwrap_or(0)
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new(agent_binary())
            .args(["cleanup", "--pin-dir"])
            .arg(&self.pin_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The control plane, the namespace cluster and an agent per node.
pub(crate) struct E2e {
    // Dropped in order: agents first, the control plane last.
    pub(crate) agents: Vec<Agent>,
    pub(crate) cluster: Cluster,
    pub(crate) _forwarders: Vec<Forwarder>,
    pub(crate) plane: ControlPlane,
}

pub(crate) fn addr(text: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(
        text.parse()
            .unwrap_or_else(|err| panic!("address {text:?}: {err}")),
        port,
    )
}

impl E2e {
    pub(crate) fn start() -> Self {
        let plane = ControlPlane::start();
        let cluster = Cluster::new(Options {
            agent_binary: true,
            ..Options::default()
        });
        let client = plane.client();
        plane.block_on(async {
            let namespaces: Api<Namespace> = Api::all(client.clone());
            apply(
                &namespaces,
                NS,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
            )
            .await;
            let nodes: Api<Node> = Api::all(client.clone());
            for node in &cluster.nodes {
                // node1 in zone-a, node2 in zone-b: for topology hints.
                let zone = format!("zone-{}", if node.name == "node1" { 'a' } else { 'b' });
                apply(
                    &nodes,
                    node.name,
                    json!({"apiVersion": "v1", "kind": "Node",
                           "metadata": {"name": node.name,
                                        "labels": {"topology.kubernetes.io/zone": zone}}}),
                )
                .await;
                nodes
                    .patch_status(
                        node.name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"status": {"addresses": [
                            {"type": "InternalIP", "address": node.addr.to_string()},
                            {"type": "Hostname", "address": node.name}
                        ]}})),
                    )
                    .await
                    .unwrap_or_else(|err| panic!("Node {} status: {err}", node.name));
            }
        });
        let kubeconfig = plane.agent_kubeconfig();
        let forwarders = cluster
            .nodes
            .iter()
            .map(|node| Forwarder::new(&node.ns, plane.api_port))
            .collect();
        let agents = cluster
            .nodes
            .iter()
            .map(|node| Agent::new(node.name, node.ns.name(), kubeconfig.clone(), plane.dir()))
            .collect();
        let mut e2e = Self {
            agents,
            cluster,
            _forwarders: forwarders,
            plane,
        };
        e2e.add_pod(0, "client", 200, "client", true);
        e2e.add_pod(0, "web-1", 2, "web", true);
        e2e.add_pod(1, "web-2", 2, "web", true);
        e2e
    }

    pub(crate) fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.plane.client(), NS)
    }

    pub(crate) fn services(&self) -> Api<Service> {
        Api::namespaced(self.plane.client(), NS)
    }

    /// A pod namespace on `node` (0 or 1) serving TCP on [`WEB_PORT`], and
    /// its Pod object, ready or not.
    pub(crate) fn add_pod(&mut self, node: usize, name: &str, host: u8, app: &str, ready: bool) {
        let pod = self.cluster.nodes[node].add_pod(name, host);
        pod.serve_tcp(WEB_PORT);
        let ip = pod.addr;
        self.create_pod(node, name, ip, app, ready);
    }

    /// A Pod object bound to `node` with address `ip` (no kubelet: the
    /// test writes its status).
    pub(crate) fn create_pod(&self, node: usize, name: &str, ip: Ipv4Addr, app: &str, ready: bool) {
        let pods = self.pods();
        let node_name = self.cluster.nodes[node].name;
        self.plane.block_on(async {
            create_pod(&pods, name, node_name, ip, app).await;
            set_ready(&pods, name, ready).await;
        });
    }

    pub(crate) fn set_ready(&self, name: &str, ready: bool) {
        let pods = self.pods();
        self.plane.block_on(set_ready(&pods, name, ready));
    }

    pub(crate) fn delete_pod(&self, name: &str, grace_seconds: u32) {
        let pods = self.pods();
        let params = DeleteParams {
            grace_period_seconds: Some(grace_seconds),
            ..DeleteParams::default()
        };
        self.plane
            .block_on(pods.delete(name, &params))
            .unwrap_or_else(|err| panic!("deleting pod {name}: {err}"));
    }

    /// Applies a service and returns it as the API server stored it.
    pub(crate) fn apply_service(&self, name: &str, spec: &serde_json::Value) -> Service {
        let services = self.services();
        self.plane.block_on(apply(
            &services,
            name,
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": NS}, "spec": spec}),
        ))
    }

    pub(crate) fn delete_service(&self, name: &str) {
        let services = self.services();
        self.plane
            .block_on(services.delete(name, &DeleteParams::default()))
            .unwrap_or_else(|err| panic!("deleting service {name}: {err}"));
    }

    /// Writes the load balancer's address into the service's status, as a
    /// cloud controller would.
    pub(crate) fn set_ingress(&self, service: &str, ip: &str) {
        let services = self.services();
        self.plane
            .block_on(services.patch_status(
                service,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}})),
            ))
            .unwrap_or_else(|err| panic!("writing {service}'s load balancer ingress: {err}"));
    }

    pub(crate) fn cluster_ip(service: &Service) -> String {
        service
            .spec
            .as_ref()
            .and_then(|spec| spec.cluster_ip.clone())
            .expect("an allocated cluster IP")
    }

    /// Waits until every agent's maps show `frontend` with exactly
    /// `backends` (pod addresses on [`WEB_PORT`]); `None`: no such
    /// frontend. Returns how long it took.
    pub(crate) fn converge(&mut self, frontend: &str, backends: Option<&[Ipv4Addr]>) -> Duration {
        let started = Instant::now();
        for node in 0..self.agents.len() {
            self.converge_on(node, frontend, backends);
        }
        started.elapsed()
    }

    /// [`Self::converge`] on one node.
    pub(crate) fn converge_on(
        &mut self,
        node: usize,
        frontend: &str,
        backends: Option<&[Ipv4Addr]>,
    ) {
        let wanted: Option<BTreeSet<String>> = backends.map(|list| {
            list.iter()
                .map(|ip| SocketAddrV4::new(*ip, WEB_PORT).to_string())
                .collect()
        });
        let agent = &mut self.agents[node];
        agent.assert_running();
        let mut last = None;
        let done = eventually(CONVERGE, || {
            let now = agent.frontends().get(frontend).cloned();
            let done = now == wanted;
            last = now;
            done
        });
        assert!(
            done,
            "{}: {frontend} should have backends {wanted:?}, has {last:?}; log: {}",
            agent.node,
            agent.log.display()
        );
    }

    /// After an API server restart, the controller manager reconnects with
    /// its own backoff before it writes the slice: waits (up to a minute)
    /// for `service`'s slices to hold exactly `ready` as ready endpoints,
    /// then for the maps. Returns both times, from now.
    pub(crate) fn after_restart(
        &mut self,
        service: &str,
        ip: &str,
        ready: &[Ipv4Addr],
    ) -> (Duration, Duration) {
        let started = Instant::now();
        let slices: Api<EndpointSlice> = Api::namespaced(self.plane.client(), NS);
        let wanted: BTreeSet<String> = ready.iter().map(ToString::to_string).collect();
        let selector = format!("kubernetes.io/service-name={service}");
        let written = eventually(Duration::from_mins(1), || {
            let Ok(list) = self
                .plane
                .block_on(slices.list(&ListParams::default().labels(&selector)))
            else {
                return false;
            };
            let now: BTreeSet<String> = list
                .items
                .iter()
                .flat_map(|slice| slice.endpoints.iter().flatten())
                .filter(|endpoint| {
                    endpoint
                        .conditions
                        .as_ref()
                        .and_then(|conditions| conditions.ready)
                        .unwrap_or(false)
                })
                .flat_map(|endpoint| endpoint.addresses.clone())
                .collect();
            now == wanted
        });
        assert!(written, "the EndpointSlice controller did not recover");
        let slice = started.elapsed();
        self.converge(&format!("{ip}:80/TCP"), Some(ready));
        (slice, started.elapsed())
    }

    pub(crate) fn pod_addr(&self, name: &str) -> Ipv4Addr {
        self.cluster.pod(name).addr
    }

    /// Names of the backends answering `count` new connections from pod
    /// `client` to `to`.
    pub(crate) fn answers(&self, client: &str, to: SocketAddrV4, count: usize) -> BTreeSet<String> {
        let pod = self.cluster.pod(client);
        (0..count)
            .map(|attempt| {
                pod.ask(to)
                    .unwrap_or_else(|err| panic!("{client} → {to} (attempt {attempt}): {err}"))
                    .name
            })
            .collect()
    }
}

/// The node port the API server allocated to the service's first port.
pub(crate) fn node_port(service: &Service) -> u16 {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.ports.as_ref())
        .and_then(|ports| ports.first())
        .and_then(|port| port.node_port)
        .and_then(|port| u16::try_from(port).ok())
        .expect("an allocated node port")
}

pub(crate) async fn create_pod(pods: &Api<Pod>, name: &str, node: &str, ip: Ipv4Addr, app: &str) {
    let pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": app, "pod": name}},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "server", "image": "svc-e2e/server",
                            "ports": [{"name": "http", "containerPort": WEB_PORT}]}]
        }
    }))
    .expect("a Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|err| panic!("creating pod {name}: {err}"));
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]
        }})),
    )
    .await
    .unwrap_or_else(|err| panic!("pod {name} address: {err}"));
}

/// Writes the pod's Ready condition as a kubelet would.
pub(crate) async fn set_ready(pods: &Api<Pod>, name: &str, ready: bool) {
    let status = if ready { "True" } else { "False" };
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": [
            {"type": "Ready", "status": status},
            {"type": "ContainersReady", "status": status}
        ]}})),
    )
    .await
    .unwrap_or_else(|err| panic!("pod {name} readiness: {err}"));
}

/// Keeps one TCP connection busy (a line every 50 ms, echoed back) until
/// stopped; reports whether it never broke.
pub(crate) struct Chatter {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) exchanges: Arc<AtomicU32>,
    pub(crate) thread: Option<thread::JoinHandle<Result<(), String>>>,
}

impl Chatter {
    pub(crate) fn new(stream: TcpStream) -> Self {
        Self::start(stream, false)
    }

    /// A chatter on a connection whose greeting was read already.
    pub(crate) fn greeted(stream: TcpStream) -> Self {
        Self::start(stream, true)
    }

    pub(crate) fn start(stream: TcpStream, greeted: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let exchanges = Arc::new(AtomicU32::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&exchanges));
        let thread = thread::spawn(move || {
            if !greeted {
                read_answer(&stream, TIMEOUT).map_err(|err| format!("greeting: {err}"))?;
            }
            let mut stream = stream;
            // Bounded: at most ten minutes of 50 ms exchanges.
            for round in 0..12_000u32 {
                if flag.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let line = format!("ping {round}\n");
                stream
                    .write_all(line.as_bytes())
                    .map_err(|err| format!("round {round}: write: {err}"))?;
                let mut echo = vec![0; line.len()];
                stream
                    .read_exact(&mut echo)
                    .map_err(|err| format!("round {round}: read: {err}"))?;
                if echo != line.as_bytes() {
                    return Err(format!("round {round}: echo {echo:?}"));
                }
                count.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        });
        Self {
            stop,
            exchanges,
            thread: Some(thread),
        }
    }

    /// Exchanges made so far.
    pub(crate) fn exchanges(&self) -> u32 {
        self.exchanges.load(Ordering::Relaxed)
    }

    /// Waits (bounded) for a few more exchanges than now: the connection
    /// still carries traffic.
    pub(crate) fn assert_alive(&self, what: &str) {
        let before = self.exchanges();
        assert!(
            eventually(Duration::from_secs(5), || self.exchanges() >= before + 5),
            "{what}: the established connection stalled at {before} exchanges"
        );
    }

    /// Stops and returns the exchanges made; panics if the connection broke.
    pub(crate) fn finish(mut self, what: &str) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        let result = self
            .thread
            .take()
            .expect("running")
            .join()
            .expect("chatter thread");
        if let Err(err) = result {
            panic!("{what}: the established connection broke: {err}");
        }
        self.exchanges.load(Ordering::Relaxed)
    }
}

/// A connection from `connect` that lands on pod `name` (Maglev spreads
/// connections by source port), its greeting read; at most 60 tries.
pub(crate) fn connection_to(
    name: &str,
    what: &str,
    mut connect: impl FnMut() -> std::io::Result<TcpStream>,
) -> TcpStream {
    for _ in 0..60 {
        let stream = connect().unwrap_or_else(|err| panic!("{what}: {err}"));
        let answer = read_answer(&stream, TIMEOUT).unwrap_or_else(|err| panic!("{what}: {err}"));
        if answer.name == name {
            return stream;
        }
    }
    panic!("{what}: no connection in 60 reached {name}");
}

/// How a TCP connection from `ns` to `to` fails (`None`: it connected).
pub(crate) fn refusal(ns: &tests::netns::NetNs, to: SocketAddrV4) -> Option<std::io::ErrorKind> {
    ns.run(|| TcpStream::connect_timeout(&to.into(), TIMEOUT))
        .err()
        .map(|err| err.kind())
}
