//! End to end against an upstream control plane (etcd, kube-apiserver,
//! kube-controller-manager; see `tests::k8s`): the real EndpointSlice
//! controllers write the slices, the `svc-agent` binary on each node of the
//! two-node namespace cluster reads them as a least-privileged service
//! account, and traffic between the namespaces shows the result. Scenarios
//! after the sig-network Service e2e tests, each a test of its own over one
//! shared control plane (starting it is the slow part): a scenario makes
//! the services and pods it needs beyond the shared `client`, `web-1` and
//! `web-2`, and removes its services, so any one runs alone
//! (`cargo xtask e2e -- <name>`) or after any other.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use svc_agent::inspect::PinnedMaps;
use tests::{
    eventually,
    k8s::{ControlPlane, Forwarder, apply},
    servers::read_answer,
    topology::{Cluster, EXTERNAL_ADDR, Options, TIMEOUT},
};

const NS: &str = "e2e";
const CONVERGE: Duration = Duration::from_secs(15);
const WEB_PORT: u16 = 8080;
/// Scenario 9: services, and pods behind each.
const BULK_SERVICES: usize = 1000;
const BULK_PODS_PER_SERVICE: usize = 5;

/// The `svc-agent` binary cargo built next to this test.
fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/e2e-<hash> → target/<profile>/svc-agent
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the target directory")
        .join("svc-agent");
    assert!(
        path.is_file(),
        "{} is missing: build the workspace (`cargo xtask e2e` does)",
        path.display()
    );
    path
}

/// One node's agent process.
struct Agent {
    node: &'static str,
    netns: String,
    pin_dir: PathBuf,
    state_file: PathBuf,
    child: Option<Child>,
    kubeconfig: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn new(node: &'static str, netns: &str, kubeconfig: PathBuf, dir: &std::path::Path) -> Self {
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

    fn start(&mut self) {
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

    fn stop(&mut self) {
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

    fn assert_running(&mut self) {
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
    fn frontends(&self) -> BTreeMap<String, BTreeSet<String>> {
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
fn get(ns: &tests::netns::NetNs, addr: SocketAddrV4, path: &str) -> String {
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
const AGENT_HTTP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464);

/// An agent's metrics page, fetched inside its node's namespace.
fn metrics(ns: &tests::netns::NetNs) -> String {
    get(ns, AGENT_HTTP, "/metrics")
}

/// The value of the sample named exactly `name` (labels included) on a
/// metrics page.
fn metric(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// A datapath counter's packets on `ns`'s agent.
fn datapath_counter(ns: &tests::netns::NetNs, counter: &str) -> u64 {
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
struct E2e {
    // Dropped in order: agents first, the control plane last.
    agents: Vec<Agent>,
    cluster: Cluster,
    _forwarders: Vec<Forwarder>,
    plane: ControlPlane,
}

fn addr(text: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(
        text.parse()
            .unwrap_or_else(|err| panic!("address {text:?}: {err}")),
        port,
    )
}

impl E2e {
    fn start() -> Self {
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

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.plane.client(), NS)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.plane.client(), NS)
    }

    /// A pod namespace on `node` (0 or 1) serving TCP on [`WEB_PORT`], and
    /// its Pod object, ready or not.
    fn add_pod(&mut self, node: usize, name: &str, host: u8, app: &str, ready: bool) {
        let pod = self.cluster.nodes[node].add_pod(name, host);
        pod.serve_tcp(WEB_PORT);
        let ip = pod.addr;
        self.create_pod(node, name, ip, app, ready);
    }

    /// A Pod object bound to `node` with address `ip` (no kubelet: the
    /// test writes its status).
    fn create_pod(&self, node: usize, name: &str, ip: Ipv4Addr, app: &str, ready: bool) {
        let pods = self.pods();
        let node_name = self.cluster.nodes[node].name;
        self.plane.block_on(async {
            create_pod(&pods, name, node_name, ip, app).await;
            set_ready(&pods, name, ready).await;
        });
    }

    fn set_ready(&self, name: &str, ready: bool) {
        let pods = self.pods();
        self.plane.block_on(set_ready(&pods, name, ready));
    }

    fn delete_pod(&self, name: &str, grace_seconds: u32) {
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
    fn apply_service(&self, name: &str, spec: &serde_json::Value) -> Service {
        let services = self.services();
        self.plane.block_on(apply(
            &services,
            name,
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": NS}, "spec": spec}),
        ))
    }

    fn delete_service(&self, name: &str) {
        let services = self.services();
        self.plane
            .block_on(services.delete(name, &DeleteParams::default()))
            .unwrap_or_else(|err| panic!("deleting service {name}: {err}"));
    }

    /// Writes the load balancer's address into the service's status, as a
    /// cloud controller would.
    fn set_ingress(&self, service: &str, ip: &str) {
        let services = self.services();
        self.plane
            .block_on(services.patch_status(
                service,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}})),
            ))
            .unwrap_or_else(|err| panic!("writing {service}'s load balancer ingress: {err}"));
    }

    fn cluster_ip(service: &Service) -> String {
        service
            .spec
            .as_ref()
            .and_then(|spec| spec.cluster_ip.clone())
            .expect("an allocated cluster IP")
    }

    /// Waits until every agent's maps show `frontend` with exactly
    /// `backends` (pod addresses on [`WEB_PORT`]); `None`: no such
    /// frontend. Returns how long it took.
    fn converge(&mut self, frontend: &str, backends: Option<&[Ipv4Addr]>) -> Duration {
        let started = Instant::now();
        for node in 0..self.agents.len() {
            self.converge_on(node, frontend, backends);
        }
        started.elapsed()
    }

    /// [`Self::converge`] on one node.
    fn converge_on(&mut self, node: usize, frontend: &str, backends: Option<&[Ipv4Addr]>) {
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
    fn after_restart(
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

    fn pod_addr(&self, name: &str) -> Ipv4Addr {
        self.cluster.pod(name).addr
    }

    /// Names of the backends answering `count` new connections from pod
    /// `client` to `to`.
    fn answers(&self, client: &str, to: SocketAddrV4, count: usize) -> BTreeSet<String> {
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
fn node_port(service: &Service) -> u16 {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.ports.as_ref())
        .and_then(|ports| ports.first())
        .and_then(|port| port.node_port)
        .and_then(|port| u16::try_from(port).ok())
        .expect("an allocated node port")
}

async fn create_pod(pods: &Api<Pod>, name: &str, node: &str, ip: Ipv4Addr, app: &str) {
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
async fn set_ready(pods: &Api<Pod>, name: &str, ready: bool) {
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
struct Chatter {
    stop: Arc<AtomicBool>,
    exchanges: Arc<AtomicU32>,
    thread: Option<thread::JoinHandle<Result<(), String>>>,
}

impl Chatter {
    fn new(stream: TcpStream) -> Self {
        Self::start(stream, false)
    }

    /// A chatter on a connection whose greeting was read already.
    fn greeted(stream: TcpStream) -> Self {
        Self::start(stream, true)
    }

    fn start(stream: TcpStream, greeted: bool) -> Self {
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
    fn exchanges(&self) -> u32 {
        self.exchanges.load(Ordering::Relaxed)
    }

    /// Waits (bounded) for a few more exchanges than now: the connection
    /// still carries traffic.
    fn assert_alive(&self, what: &str) {
        let before = self.exchanges();
        assert!(
            eventually(Duration::from_secs(5), || self.exchanges() >= before + 5),
            "{what}: the established connection stalled at {before} exchanges"
        );
    }

    /// Stops and returns the exchanges made; panics if the connection broke.
    fn finish(mut self, what: &str) -> u32 {
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

/// A scenario, run on the shared control plane.
type Scenario = fn(&mut E2e);

/// The scenarios, in the order they run: the thousand services last, as
/// they stay (deleting 5,000 pods would take longer than the rest).
const SCENARIOS: &[(&str, Scenario)] = &[
    (
        "selector_service_reaches_the_selected_pods",
        selector_service_reaches_the_selected_pods,
    ),
    (
        "scaling_and_readiness_are_followed",
        scaling_and_readiness_are_followed,
    ),
    (
        "connections_outlive_deleted_pods",
        connections_outlive_deleted_pods,
    ),
    (
        "cluster_ips_refuse_unknown_ports_and_the_service_range_drops_the_rest",
        cluster_ips_refuse_unknown_ports_and_the_service_range_drops_the_rest,
    ),
    (
        "type_changes_install_and_remove_frontends",
        type_changes_install_and_remove_frontends,
    ),
    (
        "affinity_and_traffic_policies",
        affinity_and_traffic_policies,
    ),
    (
        "traffic_distribution_keeps_traffic_in_the_zone",
        traffic_distribution_keeps_traffic_in_the_zone,
    ),
    (
        "health_check_node_ports_follow_local_endpoints",
        health_check_node_ports_follow_local_endpoints,
    ),
    (
        "load_balancer_source_ranges_admit_only_their_sources",
        load_balancer_source_ranges_admit_only_their_sources,
    ),
    (
        "local_load_balancer_ips_serve_in_cluster_clients_from_every_endpoint",
        local_load_balancer_ips_serve_in_cluster_clients_from_every_endpoint,
    ),
    (
        "selectorless_services_with_slices_and_mirrored_endpoints",
        selectorless_services_with_slices_and_mirrored_endpoints,
    ),
    (
        "no_endpoints_is_refused_and_deletion_removes_everything",
        no_endpoints_is_refused_and_deletion_removes_everything,
    ),
    (
        "agent_and_api_server_restarts",
        agent_and_api_server_restarts,
    ),
    ("a_thousand_services", a_thousand_services),
];

/// The shared control plane: started by the first scenario that runs.
enum Shared {
    NotStarted,
    Running(Box<E2e>),
    /// Starting it panicked (the first scenario to run says why).
    Failed,
}

fn main() -> std::process::ExitCode {
    let mut args = libtest_mimic::Arguments::from_args();
    // One control plane: one scenario at a time.
    args.test_threads = Some(1);
    let shared = Arc::new(Mutex::new(Shared::NotStarted));
    let trials = SCENARIOS
        .iter()
        .map(|&(name, scenario)| {
            let shared = Arc::clone(&shared);
            libtest_mimic::Trial::test(name, move || {
                let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
                if matches!(*shared, Shared::NotStarted) {
                    *shared = Shared::Failed;
                    *shared = Shared::Running(Box::new(E2e::start()));
                }
                let Shared::Running(e2e) = &mut *shared else {
                    return Err("the control plane did not start; see the first scenario".into());
                };
                scenario(e2e);
                Ok(())
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // The agents, the namespaces and the control plane stop here.
    *shared.lock().unwrap_or_else(PoisonError::into_inner) = Shared::NotStarted;
    conclusion.exit_code()
}

/// Scenario 1.
fn selector_service_reaches_the_selected_pods(e2e: &mut E2e) {
    let web = e2e.apply_service(
        "web",
        &json!({"selector": {"app": "web"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    );
    let ip = E2e::cluster_ip(&web);
    assert!(
        ip.starts_with("10.96."),
        "the API server allocates from its service range: {ip}"
    );
    let pods = [e2e.pod_addr("web-1"), e2e.pod_addr("web-2")];
    let took = e2e.converge(&format!("{ip}:80/TCP"), Some(&pods));
    eprintln!("scenario 1: web {ip} programmed on both nodes {took:?} after the create");

    // The controller's slice names exactly the selected pods.
    let slices: Api<EndpointSlice> = Api::namespaced(e2e.plane.client(), NS);
    let listed = e2e
        .plane
        .block_on(slices.list(&ListParams::default().labels("kubernetes.io/service-name=web")))
        .expect("listing web's slices");
    let addresses: BTreeSet<String> = listed
        .items
        .iter()
        .flat_map(|slice| slice.endpoints.iter().flatten())
        .flat_map(|endpoint| endpoint.addresses.clone())
        .collect();
    let expected: BTreeSet<String> = pods.iter().map(ToString::to_string).collect();
    assert_eq!(addresses, expected, "web's EndpointSlice endpoints");

    let names = e2e.answers("client", addr(&ip, 80), 24);
    assert_eq!(
        names,
        BTreeSet::from(["web-1".to_owned(), "web-2".to_owned()]),
        "24 connections to the ClusterIP spread over both pods"
    );
    e2e.delete_service("web");
}

/// Scenario 2.
fn scaling_and_readiness_are_followed(e2e: &mut E2e) {
    // Pods of its own: their readiness and lives change here.
    e2e.add_pod(0, "scale-1", 31, "scale", true);
    e2e.add_pod(1, "scale-2", 32, "scale", true);
    let ip = E2e::cluster_ip(&e2e.apply_service(
        "scale",
        &json!({"selector": {"app": "scale"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    ));
    let frontend = format!("{ip}:80/TCP");
    let (web1, web2) = (e2e.pod_addr("scale-1"), e2e.pod_addr("scale-2"));
    e2e.converge(&frontend, Some(&[web1, web2]));

    e2e.add_pod(1, "scale-3", 33, "scale", true);
    let web3 = e2e.pod_addr("scale-3");
    let took = e2e.converge(&frontend, Some(&[web1, web2, web3]));
    eprintln!("scenario 2: scale up to 3 applied in {took:?}");
    e2e.delete_pod("scale-3", 0);
    let took = e2e.converge(&frontend, Some(&[web1, web2]));
    eprintln!("scenario 2: scale down to 2 applied in {took:?}");

    // Not ready: no new connections.
    e2e.set_ready("scale-2", false);
    let took = e2e.converge(&frontend, Some(&[web1]));
    eprintln!("scenario 2: readiness flip applied in {took:?}");
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 12),
        BTreeSet::from(["scale-1".to_owned()]),
        "a not-ready pod gets no new connections"
    );

    // web-1 terminating (still serving), nothing ready: web-1 serves.
    e2e.delete_pod("scale-1", 300);
    e2e.converge(&frontend, Some(&[web1]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 6),
        BTreeSet::from(["scale-1".to_owned()]),
        "a terminating, serving pod is used when nothing is ready"
    );
    // Once something is ready, the terminating pod is left alone.
    e2e.set_ready("scale-2", true);
    e2e.converge(&frontend, Some(&[web2]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 6),
        BTreeSet::from(["scale-2".to_owned()]),
        "a terminating pod gets nothing while a ready one exists"
    );
    // Its replacement comes up under the same name and address.
    e2e.delete_pod("scale-1", 0);
    let pods = e2e.pods();
    e2e.plane.block_on(async {
        let gone = async {
            for _ in 0..200 {
                if pods.get_opt("scale-1").await.ok().flatten().is_none() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        };
        assert!(gone.await, "web-1 should be deleted");
    });
    e2e.create_pod(0, "scale-1", web1, "scale", true);
    e2e.converge(&frontend, Some(&[web1, web2]));
    e2e.delete_service("scale");
}

/// A connection from `connect` that lands on pod `name` (Maglev spreads
/// connections by source port), its greeting read; at most 60 tries.
fn connection_to(
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

/// Scenario 2b: a pod deleted as the API server deletes it (terminating
/// for its grace period, then no longer serving, then gone) keeps its
/// established connections, from a pod and from outside through a node
/// port, while new connections go elsewhere.
fn connections_outlive_deleted_pods(e2e: &mut E2e) {
    e2e.add_pod(1, "drain-1", 21, "drain", true);
    e2e.add_pod(0, "drain-2", 21, "drain", true);
    let service = e2e.apply_service(
        "drain",
        &json!({"type": "NodePort", "selector": {"app": "drain"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    );
    let ip = E2e::cluster_ip(&service);
    let node_port = node_port(&service);
    let (drain1, drain2) = (e2e.pod_addr("drain-1"), e2e.pod_addr("drain-2"));
    let frontend = format!("{ip}:80/TCP");
    e2e.converge(&frontend, Some(&[drain1, drain2]));
    e2e.converge(&format!("*:{node_port}/TCP"), Some(&[drain1, drain2]));
    let node1 = e2e.cluster.nodes[0].addr;
    let chatters = [
        (
            "pod to ClusterIP",
            Chatter::greeted(connection_to("drain-1", "pod to ClusterIP", || {
                e2e.cluster.pod("client").connect(addr(&ip, 80))
            })),
        ),
        (
            "outside to node port",
            Chatter::greeted(connection_to("drain-1", "outside to node port", || {
                e2e.cluster
                    .external
                    .connect(SocketAddrV4::new(node1, node_port))
            })),
        ),
    ];
    let alive = |when: &str| {
        for (what, chatter) in &chatters {
            chatter.assert_alive(&format!("{what}, {when}"));
        }
    };
    alive("before the deletion");

    // Deleted with a grace period: terminating, still serving.
    e2e.delete_pod("drain-1", 300);
    let took = e2e.converge(&frontend, Some(&[drain2]));
    eprintln!("scenario 2b: the terminating pod left the tables {took:?} after the delete");
    alive("drain-1 terminating");
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 10),
        BTreeSet::from(["drain-2".to_owned()]),
        "new connections avoid the terminating pod"
    );
    // Its containers stop: not serving.
    e2e.set_ready("drain-1", false);
    thread::sleep(Duration::from_secs(1));
    alive("drain-1 no longer serving");
    // Its grace period ends: the Pod object goes, and the slice with it.
    e2e.delete_pod("drain-1", 0);
    let slices: Api<EndpointSlice> = Api::namespaced(e2e.plane.client(), NS);
    let drain1_text = drain1.to_string();
    let gone = eventually(CONVERGE, || {
        e2e.plane
            .block_on(
                slices.list(&ListParams::default().labels("kubernetes.io/service-name=drain")),
            )
            .is_ok_and(|list| {
                !list
                    .items
                    .iter()
                    .flat_map(|slice| slice.endpoints.iter().flatten())
                    .any(|endpoint| endpoint.addresses.contains(&drain1_text))
            })
    });
    assert!(gone, "the deleted pod leaves the slice");
    thread::sleep(Duration::from_secs(1));
    alive("drain-1 gone from the slice");
    for (what, chatter) in chatters {
        let exchanges = chatter.finish(what);
        eprintln!("scenario 2b: {what}: {exchanges} exchanges, never broken");
    }
    e2e.delete_service("drain");
}

/// Scenario 2c: the agents read the cluster's `ServiceCIDR` (the API
/// server's default one, from `--service-cluster-ip-range`): a ClusterIP
/// refuses a port its service lacks, and an address of the range that no
/// service holds is dropped, as kube-proxy's nftables mode does.
fn cluster_ips_refuse_unknown_ports_and_the_service_range_drops_the_rest(e2e: &mut E2e) {
    let ip = E2e::cluster_ip(&e2e.apply_service(
        "web",
        &json!({"selector": {"app": "web"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    ));
    let err = e2e
        .cluster
        .pod("client")
        .connect(addr(&ip, 81))
        .expect_err("web has no port 81");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "refused at once: {err}"
    );
    let node1 = &e2e.cluster.nodes[0].ns;
    let dropped = || datapath_counter(node1, "drop_unallocated_service_ip");
    let before = dropped();
    let unallocated = addr("10.96.255.254", 80);
    let err = e2e
        .cluster
        .pod("client")
        .ns
        .run(|| TcpStream::connect_timeout(&unallocated.into(), Duration::from_secs(1)))
        .expect_err("no service holds the address");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "dropped, not refused: {err}"
    );
    assert!(
        eventually(Duration::from_secs(5), || dropped() > before),
        "node1 counted the drop: the service CIDR came from the ServiceCIDR objects"
    );
    e2e.delete_service("web");
}

/// Scenario 3.
fn type_changes_install_and_remove_frontends(e2e: &mut E2e) {
    let base = json!({"selector": {"app": "web"},
                      "ports": [{"name": "http", "port": 80, "targetPort": "http"}]});
    let (web1, web2) = (e2e.pod_addr("web-1"), e2e.pod_addr("web-2"));
    let node1 = e2e.cluster.nodes[0].addr;

    let mut spec = base.clone();
    spec["type"] = json!("NodePort");
    let typed = e2e.apply_service("typed", &spec);
    let ip = E2e::cluster_ip(&typed);
    let node_port = node_port(&typed);
    let np_frontend = format!("*:{node_port}/TCP");
    e2e.converge(&np_frontend, Some(&[web1, web2]));
    let answer = e2e
        .cluster
        .external
        .ask(SocketAddrV4::new(node1, node_port))
        .expect("external → node1 node port");
    assert!(answer.name.starts_with("web-"), "answered by {answer:?}");

    let mut spec = base.clone();
    spec["type"] = json!("LoadBalancer");
    e2e.apply_service("typed", &spec);
    let lb_ip = "172.16.1.10";
    e2e.set_ingress("typed", lb_ip);
    e2e.converge(&format!("{lb_ip}:80/TCP"), Some(&[web1, web2]));
    let answer = e2e
        .cluster
        .external
        .ask(addr(lb_ip, 80))
        .expect("external → load balancer IP");
    assert!(answer.name.starts_with("web-"), "answered by {answer:?}");

    // Back to ClusterIP: the node port and the LB IP go away.
    e2e.apply_service("typed", &base);
    e2e.converge(&np_frontend, None);
    e2e.converge(&format!("{lb_ip}:80/TCP"), None);
    e2e.converge(&format!("{ip}:80/TCP"), Some(&[web1, web2]));
    e2e.delete_service("typed");
}

/// Scenario 4.
fn affinity_and_traffic_policies(e2e: &mut E2e) {
    let (web1, web2) = (e2e.pod_addr("web-1"), e2e.pod_addr("web-2"));
    let sticky = e2e.apply_service(
        "sticky",
        &json!({"selector": {"app": "web"}, "sessionAffinity": "ClientIP",
               "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    let ip = E2e::cluster_ip(&sticky);
    e2e.converge(&format!("{ip}:80/TCP"), Some(&[web1, web2]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 12).len(),
        1,
        "ClientIP affinity: every connection from one client reaches one pod"
    );

    let local = e2e.apply_service(
        "local",
        &json!({"type": "NodePort", "externalTrafficPolicy": "Local",
               "selector": {"app": "web"},
               "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    let node_port = node_port(&local);
    // Each node's node port holds only its own pod.
    e2e.converge_on(0, &format!("*:{node_port}/TCP"), Some(&[web1]));
    e2e.converge_on(1, &format!("*:{node_port}/TCP"), Some(&[web2]));
    for (index, pod) in [(0, "web-1"), (1, "web-2")] {
        let node = e2e.cluster.nodes[index].addr;
        let mut seen = BTreeSet::new();
        // Local traffic policy: the datapath may pick only the node's own pod.
        let found = eventually(CONVERGE, || {
            let Ok(answer) = e2e.cluster.external.ask(SocketAddrV4::new(node, node_port)) else {
                return false;
            };
            seen.insert(answer.name.clone());
            answer.name == pod && answer.peer.ip() == std::net::IpAddr::V4(EXTERNAL_ADDR)
        });
        assert!(
            found,
            "node {node}: Local policy should reach {pod} with the client's address kept; saw {seen:?}"
        );
        for _ in 0..6 {
            let answer = e2e
                .cluster
                .external
                .ask(SocketAddrV4::new(node, node_port))
                .expect("external → Local node port");
            assert_eq!(answer.name, pod, "Local policy: only the node's own pod");
            assert_eq!(
                answer.peer.ip(),
                std::net::IpAddr::V4(EXTERNAL_ADDR),
                "Local policy keeps the client's address"
            );
        }
    }
    // Cluster policy: the remote pod is reached too, from the node's
    // address (masqueraded).
    e2e.apply_service(
        "local",
        &json!({"type": "NodePort", "externalTrafficPolicy": "Cluster",
               "selector": {"app": "web"},
               "ports": [{"port": 80, "targetPort": WEB_PORT, "nodePort": node_port}]}),
    );
    let node1 = e2e.cluster.nodes[0].addr;
    let mut remote_seen = false;
    let done = eventually(CONVERGE, || {
        if let Ok(answer) = e2e
            .cluster
            .external
            .ask(SocketAddrV4::new(node1, node_port))
            && answer.name == "web-2"
        {
            remote_seen = answer.peer.ip() == std::net::IpAddr::V4(node1);
        }
        remote_seen
    });
    assert!(
        done,
        "Cluster policy: node1's node port reaches web-2 on node2, masqueraded as node1"
    );
    for name in ["sticky", "local"] {
        e2e.delete_service(name);
    }
}

/// Topology hints: with `trafficDistribution: PreferClose` the controller
/// hints each endpoint for its node's zone, and each node's agent keeps
/// its own zone's endpoints (the zone read from its Node's label).
fn traffic_distribution_keeps_traffic_in_the_zone(e2e: &mut E2e) {
    let (web1, web2) = (e2e.pod_addr("web-1"), e2e.pod_addr("web-2"));
    let close = e2e.apply_service(
        "close",
        &json!({"selector": {"app": "web"}, "trafficDistribution": "PreferClose",
                "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    let ip = E2e::cluster_ip(&close);
    let frontend = format!("{ip}:80/TCP");
    e2e.converge_on(0, &frontend, Some(&[web1]));
    e2e.converge_on(1, &frontend, Some(&[web2]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 8),
        BTreeSet::from(["web-1".to_owned()]),
        "a client in zone-a reaches zone-a's pod only"
    );
    e2e.delete_service("close");
}

/// A LoadBalancer service with `externalTrafficPolicy: Local` gets a
/// health check node port: 200 on the node with its pod, 503 elsewhere,
/// and nothing once the service is gone.
fn health_check_node_ports_follow_local_endpoints(e2e: &mut E2e) {
    let lb = e2e.apply_service(
        "lb-local",
        &json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                "selector": {"pod": "web-1"},
                "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    let port = lb
        .spec
        .as_ref()
        .and_then(|spec| spec.health_check_node_port)
        .and_then(|port| u16::try_from(port).ok())
        .expect("an allocated health check node port");
    let ext = &e2e.cluster.external.ns;
    let probe = |node: usize| {
        get(
            ext,
            SocketAddrV4::new(e2e.cluster.nodes[node].addr, port),
            "/",
        )
    };
    let mut last = String::new();
    assert!(
        eventually(CONVERGE, || {
            last = probe(0);
            last.starts_with("HTTP/1.0 200") && last.contains("\"localEndpoints\":1")
        }),
        "node1 has web-1: 200 with one local endpoint; got {last:?}"
    );
    assert!(
        eventually(CONVERGE, || {
            last = probe(1);
            last.starts_with("HTTP/1.0 503") && last.contains("\"localEndpoints\":0")
        }),
        "node2 has no endpoint of lb-local: 503; got {last:?}"
    );
    e2e.delete_service("lb-local");
    let to = SocketAddrV4::new(e2e.cluster.nodes[0].addr, port);
    let refused = || refusal(ext, to) == Some(std::io::ErrorKind::ConnectionRefused);
    assert!(
        eventually(CONVERGE, refused),
        "the health check port closes with the service: {:?}",
        refusal(ext, to)
    );
    for attempt in 0..3 {
        assert!(
            refused(),
            "attempt {attempt}: the port stays closed: {:?}",
            refusal(ext, to)
        );
    }
}

/// How a TCP connection from `ns` to `to` fails (`None`: it connected).
fn refusal(ns: &tests::netns::NetNs, to: SocketAddrV4) -> Option<std::io::ErrorKind> {
    ns.run(|| TcpStream::connect_timeout(&to.into(), TIMEOUT))
        .err()
        .map(|err| err.kind())
}

/// `loadBalancerSourceRanges`: the load balancer IP takes new connections
/// only from the listed sources; others are dropped.
fn load_balancer_source_ranges_admit_only_their_sources(e2e: &mut E2e) {
    let lb_ip = "172.16.1.20";
    let spec = |range: &str| {
        json!({"type": "LoadBalancer", "selector": {"app": "web"},
               "loadBalancerSourceRanges": [range],
               "ports": [{"port": 80, "targetPort": WEB_PORT}]})
    };
    e2e.apply_service("ranged", &spec(&format!("{EXTERNAL_ADDR}/32")));
    e2e.set_ingress("ranged", lb_ip);
    let external = &e2e.cluster.external;
    assert!(
        eventually(CONVERGE, || external.ask(addr(lb_ip, 80)).is_ok()),
        "the external client is inside the source range"
    );
    let agent = &e2e.agents[0];
    let row = PinnedMaps::open(&agent.pin_dir)
        .and_then(|maps| maps.services(&agent.state_file))
        .expect("node1's services")
        .into_iter()
        .find(|row| row.frontend == format!("{lb_ip}:80/TCP"))
        .expect("the load balancer IP is installed");
    assert!(
        row.flags.contains(&"source-ranges"),
        "`svc-agent services` shows the restriction: {:?}",
        row.flags
    );
    e2e.apply_service("ranged", &spec("10.0.0.0/8"));
    let node1 = &e2e.cluster.nodes[0].ns;
    let to = addr(lb_ip, 80);
    let dropped = || refusal(&external.ns, to) == Some(std::io::ErrorKind::TimedOut);
    assert!(
        eventually(CONVERGE, dropped),
        "outside the source ranges: dropped (not refused): {:?}",
        refusal(&external.ns, to)
    );
    let before = datapath_counter(node1, "drop_source_range");
    for attempt in 0..2 {
        assert!(
            dropped(),
            "attempt {attempt}: still dropped: {:?}",
            refusal(&external.ns, to)
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || datapath_counter(
            node1,
            "drop_source_range"
        ) > before),
        "node1 counted the dropped SYNs as drop_source_range"
    );
    e2e.delete_service("ranged");
}

/// `externalTrafficPolicy: Local` on a load balancer IP whose only pod runs
/// on node2: traffic arriving at node1 from outside is dropped (no local
/// endpoint), but node1's own pods reach every endpoint, as with
/// kube-proxy.
fn local_load_balancer_ips_serve_in_cluster_clients_from_every_endpoint(e2e: &mut E2e) {
    let lb_ip = "172.16.1.30";
    e2e.apply_service(
        "lb-far",
        &json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                "selector": {"pod": "web-2"},
                "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    e2e.set_ingress("lb-far", lb_ip);
    let web2 = e2e.pod_addr("web-2");
    e2e.converge_on(0, &format!("{lb_ip}:80/TCP"), Some(&[]));
    e2e.converge_on(0, &format!("{lb_ip}:80/TCP in-cluster"), Some(&[web2]));
    assert_eq!(
        e2e.answers("client", addr(lb_ip, 80), 4),
        BTreeSet::from(["web-2".to_owned()]),
        "a pod on node1 reaches the pod on node2 through the load balancer IP"
    );
    let node1 = &e2e.cluster.nodes[0].ns;
    let before = datapath_counter(node1, "drop_no_backend");
    let to = addr(lb_ip, 80);
    for attempt in 0..2 {
        assert_eq!(
            refusal(&e2e.cluster.external.ns, to),
            Some(std::io::ErrorKind::TimedOut),
            "attempt {attempt}: from outside, node1 has no local endpoint: dropped, as kube-proxy does"
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || datapath_counter(
            node1,
            "drop_no_backend"
        ) > before),
        "node1 counted the drops as drop_no_backend"
    );
    // The inspection command lists both tables.
    let agent = &e2e.agents[0];
    let out = Command::new(agent_binary())
        .args(["backends", "e2e/lb-far", "-o", "json", "--pin-dir"])
        .arg(&agent.pin_dir)
        .arg("--state-file")
        .arg(&agent.state_file)
        .output()
        .expect("running svc-agent backends");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("in-cluster") && text.contains(&web2.to_string()),
        "svc-agent backends e2e/lb-far: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    e2e.delete_service("lb-far");
}

/// Scenario 5.
fn selectorless_services_with_slices_and_mirrored_endpoints(e2e: &mut E2e) {
    let web2 = e2e.pod_addr("web-2");
    let web1 = e2e.pod_addr("web-1");
    let manual = e2e.apply_service("manual", &json!({"ports": [{"port": 80}]}));
    let slices: Api<EndpointSlice> = Api::namespaced(e2e.plane.client(), NS);
    e2e.plane.block_on(apply(
        &slices,
        "manual-1",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "manual-1", "namespace": NS,
                            "labels": {"kubernetes.io/service-name": "manual",
                                       "endpointslice.kubernetes.io/managed-by": "svc-e2e"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": [web2.to_string()], "conditions": {"ready": true}}],
               "ports": [{"port": WEB_PORT, "protocol": "TCP"}]}),
    ));
    let ip = E2e::cluster_ip(&manual);
    e2e.converge(&format!("{ip}:80/TCP"), Some(&[web2]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 3),
        BTreeSet::from(["web-2".to_owned()])
    );

    let legacy = e2e.apply_service("legacy", &json!({"ports": [{"port": 80}]}));
    let endpoints: Api<Endpoints> = Api::namespaced(e2e.plane.client(), NS);
    e2e.plane.block_on(apply(
        &endpoints,
        "legacy",
        json!({"apiVersion": "v1", "kind": "Endpoints",
               "metadata": {"name": "legacy", "namespace": NS},
               "subsets": [{"addresses": [{"ip": web1.to_string()}],
                            "ports": [{"port": WEB_PORT, "protocol": "TCP"}]}]}),
    ));
    let ip = E2e::cluster_ip(&legacy);
    e2e.converge(&format!("{ip}:80/TCP"), Some(&[web1]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 3),
        BTreeSet::from(["web-1".to_owned()]),
        "the mirroring controller's slice is served"
    );
    for name in ["manual", "legacy"] {
        e2e.delete_service(name);
    }
    e2e.plane
        .block_on(endpoints.delete("legacy", &DeleteParams::default()))
        .unwrap_or_else(|err| panic!("deleting Endpoints legacy: {err}"));
    e2e.plane
        .block_on(slices.delete("manual-1", &DeleteParams::default()))
        .unwrap_or_else(|err| panic!("deleting EndpointSlice manual-1: {err}"));
}

/// Scenarios 6 and 7.
fn no_endpoints_is_refused_and_deletion_removes_everything(e2e: &mut E2e) {
    let empty = e2e.apply_service(
        "empty",
        &json!({"selector": {"app": "nothing"}, "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    let ip = E2e::cluster_ip(&empty);
    let frontend = format!("{ip}:80/TCP");
    e2e.converge(&frontend, Some(&[]));
    let err = e2e
        .cluster
        .pod("client")
        .connect(addr(&ip, 80))
        .expect_err("no endpoints: the connection must fail");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "no endpoints: refused at once, not left to time out"
    );

    let sticky_ip = E2e::cluster_ip(&e2e.apply_service(
        "counted",
        &json!({"selector": {"app": "web"}, "sessionAffinity": "ClientIP",
               "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    ));
    let sticky_frontend = format!("{sticky_ip}:80/TCP");
    let (web1, web2) = (e2e.pod_addr("web-1"), e2e.pod_addr("web-2"));
    e2e.converge(&sticky_frontend, Some(&[web1, web2]));
    // Traffic, so that its counters are not zero.
    e2e.answers("client", addr(&sticky_ip, 80), 4);
    let sticky_ids: Vec<u32> = e2e
        .agents
        .iter()
        .map(|agent| {
            let maps = PinnedMaps::open(&agent.pin_dir).expect("the pinned maps");
            let row = maps
                .services(&agent.state_file)
                .expect("services")
                .into_iter()
                .find(|row| row.frontend == sticky_frontend)
                .expect("counted is installed");
            row.id
        })
        .collect();
    let counted = |agent: &Agent, id: u32| {
        PinnedMaps::open(&agent.pin_dir)
            .and_then(|maps| maps.service_counters(svc_common::wire::FrontendId::new(id)))
            .expect("counted's counters")
            .packets
    };
    assert!(
        counted(&e2e.agents[0], sticky_ids[0]) > 0,
        "node1 counted the service's traffic"
    );
    for name in ["empty", "counted"] {
        e2e.delete_service(name);
    }
    e2e.converge(&frontend, None);
    e2e.converge(&format!("{sticky_ip}:80/TCP"), None);
    for (agent, id) in e2e.agents.iter().zip(&sticky_ids) {
        assert_eq!(
            counted(agent, *id),
            0,
            "{}: the deleted service's counters are gone from the maps",
            agent.node
        );
    }
    for (agent, node) in e2e.agents.iter().zip(&e2e.cluster.nodes) {
        let metrics = metrics(&node.ns);
        assert!(
            !metrics.contains(&format!("frontend=\"{sticky_ip}:80/TCP\"")),
            "{}: the deleted service's counters are gone from /metrics",
            agent.node
        );
    }
}

/// Scenario 8: an agent restart, an API server restart, and etcd
/// compaction with a restart, under a connection that keeps exchanging.
fn agent_and_api_server_restarts(e2e: &mut E2e) {
    // Pods of its own: their readiness changes here.
    e2e.add_pod(0, "restart-1", 41, "restart", true);
    e2e.add_pod(1, "restart-2", 42, "restart", true);
    let web_ip = E2e::cluster_ip(&e2e.apply_service(
        "restart",
        &json!({"selector": {"app": "restart"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    ));
    let (web1, web2) = (e2e.pod_addr("restart-1"), e2e.pod_addr("restart-2"));
    e2e.converge(&format!("{web_ip}:80/TCP"), Some(&[web1, web2]));
    let stream = e2e
        .cluster
        .pod("client")
        .connect(addr(&web_ip, 80))
        .expect("client → restart");
    let chatter = Chatter::new(stream);

    // The agent that translated it restarts: it adopts the pinned maps,
    // waits for its stores to fill, and finds nothing to change.
    e2e.agents[0].stop();
    e2e.agents[0].start();
    let node1 = &e2e.cluster.nodes[0].ns;
    assert!(
        eventually(CONVERGE, || get(node1, AGENT_HTTP, "/readyz")
            .starts_with("HTTP/1.0 200")),
        "the restarted agent becomes ready (its first sync applied)"
    );
    let page = metrics(node1);
    let syncs = metric(&page, "svc_syncs_total").unwrap_or(0);
    assert!(syncs >= 1, "the first sync is counted: {syncs}");
    for what in [
        "frontend_written",
        "frontend_removed",
        "backend_added",
        "backend_removed",
    ] {
        assert_eq!(
            metric(&page, &format!("svc_map_writes_total{{what=\"{what}\"}}")),
            Some(0),
            "an unchanged cluster writes nothing after a restart ({what}, {syncs} syncs)"
        );
    }
    e2e.converge(&format!("{web_ip}:80/TCP"), Some(&[web1, web2]));

    e2e.plane.restart_apiserver();
    // A change after the restart is applied: the watches reconnected.
    e2e.set_ready("restart-2", false);
    let (slice, maps) = e2e.after_restart("restart", &web_ip, &[web1]);
    eprintln!(
        "scenario 8: change after an API server restart: in the slice after {slice:?}, in the maps after {maps:?}"
    );

    // History compacted while the API server is down: the watches resume
    // from a resource version etcd no longer has, get 410 Gone, relist.
    e2e.plane.stop_apiserver();
    e2e.plane.compact_etcd();
    e2e.plane.start_apiserver_again();
    e2e.set_ready("restart-2", true);
    let (slice, maps) = e2e.after_restart("restart", &web_ip, &[web1, web2]);
    eprintln!(
        "scenario 8: change after compaction and restart: in the slice after {slice:?}, in the maps after {maps:?}"
    );
    for (agent, node) in e2e.agents.iter().zip(&e2e.cluster.nodes) {
        let errors = metric(&metrics(&node.ns), "svc_watch_errors_total").unwrap_or(0);
        assert!(
            errors > 0,
            "{}: the watches saw the outages ({errors:?} errors) and recovered",
            agent.node
        );
    }

    let exchanges = chatter.finish("API server restarts");
    assert!(
        exchanges > 10,
        "the connection kept exchanging ({exchanges})"
    );
    e2e.delete_service("restart");
}

/// Scenario 9.
fn a_thousand_services(e2e: &mut E2e) {
    let pods = e2e.pods();
    let services = e2e.services();
    let node_names: Vec<&str> = e2e.cluster.nodes.iter().map(|node| node.name).collect();
    let started = Instant::now();
    e2e.plane.block_on(async {
        use futures::StreamExt as _;
        let creates = (0..BULK_SERVICES)
            .flat_map(|service| (0..BULK_PODS_PER_SERVICE).map(move |pod| (service, pod)));
        futures::stream::iter(creates)
            .for_each_concurrent(16, |(service, pod)| {
                let pods = pods.clone();
                let node = node_names[pod % 2];
                async move {
                    let index = u32::try_from(service * BULK_PODS_PER_SERVICE + pod).expect("fits");
                    // Addresses no namespace carries: these pods are only
                    // counted in the maps, not connected to.
                    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + index);
                    let name = format!("bulk-{service}-{pod}");
                    create_pod(&pods, &name, node, ip, &format!("bulk-{service}")).await;
                    set_ready(&pods, &name, true).await;
                }
            })
            .await;
    });
    let pods_took = started.elapsed();
    let started = Instant::now();
    let ips: Vec<String> = e2e.plane.block_on(async {
        use futures::StreamExt as _;
        futures::stream::iter(0..BULK_SERVICES)
            .map(|service| {
                let services = services.clone();
                async move {
                    let name = format!("bulk-{service}");
                    let created = apply(
                        &services,
                        &name,
                        json!({"apiVersion": "v1", "kind": "Service",
                               "metadata": {"name": name, "namespace": NS},
                               "spec": {"selector": {"app": name},
                                        "ports": [{"port": 80, "targetPort": WEB_PORT}]}}),
                    )
                    .await;
                    E2e::cluster_ip(&created)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await
    });
    let creates_took = started.elapsed();
    let last_create = Instant::now();
    for agent in &mut e2e.agents {
        agent.assert_running();
        let mut programmed = 0;
        let done = eventually(Duration::from_mins(2), || {
            let frontends = agent.frontends();
            programmed = ips
                .iter()
                .filter(|ip| {
                    frontends
                        .get(&format!("{ip}:80/TCP"))
                        .is_some_and(|backends| backends.len() == BULK_PODS_PER_SERVICE)
                })
                .count();
            programmed == ips.len()
        });
        assert!(
            done,
            "{}: {programmed} of {BULK_SERVICES} services programmed with {BULK_PODS_PER_SERVICE} backends",
            agent.node
        );
    }
    let all_programmed = last_create.elapsed();
    eprintln!(
        "scenario 9: {BULK_SERVICES} services × {BULK_PODS_PER_SERVICE} pods: pods created in {pods_took:?}, \
         services in {creates_took:?}; all programmed on both nodes {all_programmed:?} after the last create"
    );
    let report = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    if fs::create_dir_all(&report).is_ok() {
        let _ = fs::write(
            report.join("e2e-scale.json"),
            json!([
                {"case": "pods_created", "services": BULK_SERVICES, "value": pods_took.as_secs_f64(), "unit": "s"},
                {"case": "services_created", "services": BULK_SERVICES, "value": creates_took.as_secs_f64(), "unit": "s"},
                {"case": "last_create_to_all_programmed", "services": BULK_SERVICES, "value": all_programmed.as_secs_f64(), "unit": "s"}
            ])
            .to_string(),
        );
    }
}
