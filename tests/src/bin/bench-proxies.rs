//! `cargo xtask bench proxies`: svc-proxy next to upstream kube-proxy
//! (iptables and nftables mode, built from the same Kubernetes pin as the
//! control plane) on one machine, one topology, one API server, the same
//! services and the same load.
//!
//! The namespace cluster of the tests (two nodes, an external client) and a
//! real kube-apiserver with etcd and kube-controller-manager. Ten server
//! pods (five per node) answer short request/response connections on 8080
//! and sink a stream on 9000. N services (ClusterIP, port 80), created
//! through the API server without a selector, each get an EndpointSlice the
//! bench writes with the ten servers as endpoints, so every service answers
//! and the API server holds 2N objects (no Pod objects: no kubelet, and
//! etcd shares the two CPUs). One more service, `edge`, is a NodePort with
//! both ports. The counts grow from the smallest N to the largest, adding
//! services; at each N every proxy in turn:
//!
//! 1. starts on both nodes: time until every service answers a connection
//!    from the client pod (`cold_to_all_answering`);
//! 2. resident memory, the kernel state it made (BPF map memory; nftables
//!    rules and set elements, iptables-nft's included), CPU while idle;
//! 3. connections per second with four clients back to back, and machine
//!    CPU per connection, to the service created last and to random ones;
//!    connect and first-byte latency (p50, p99, p99.9) of a paced series;
//!    the same through the NodePort from the external namespace; one long
//!    stream through the ClusterIP and through the NodePort;
//! 4. the last service's slice gains a ready pod (and loses the previous
//!    change's): time until a connection from the client reaches it;
//! 5. its own sync metric; then it stops, cleans up its own way, and the
//!    nodes are checked clean.
//!
//! Writes `{"bench", "proxy", "services", "metric", "value", "unit"}`
//! objects to the file given with `--out` after every proxy's run.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use svc_common::{lb::DEFAULT_MAGLEV_SLOTS, maglev};
use tests::{
    as_f64,
    figures::{self, Figure},
    k8s,
    k8s::{ControlPlane, Forwarder, apply},
    loadgen::{self, BenchServer, Serve, Timing},
    netns::NetNs,
    proxies::{self, NetfilterState, NodeSpec, Proxy, RunningProxy, Setup},
    topology::{Cluster, Options},
};

const NS: &str = "bench";
const ANSWER_PORT: u16 = 8080;
const STREAM_PORT: u16 = 9000;
const SERVERS: u8 = 10;
/// How many creations are in flight at once.
const IN_FLIGHT: usize = 32;
/// Clients of the saturating runs.
const CLIENTS: usize = 4;
/// Default bound of every wait for programming (`--limit-minutes`).
const PROGRAMMING_LIMIT: Duration = Duration::from_mins(15);
const MANAGED_BY: &str = "bench.svc-proxy.dev";

#[derive(Clone, Copy)]
struct Plan {
    saturate: Duration,
    paced_rate: u32,
    paced_count: u32,
    stream: Duration,
    idle: Duration,
    changes: u32,
}

const FULL: Plan = Plan {
    saturate: Duration::from_secs(5),
    paced_rate: 500,
    paced_count: 2_000,
    stream: Duration::from_secs(3),
    idle: Duration::from_mins(1),
    changes: 50,
};

const QUICK: Plan = Plan {
    saturate: Duration::from_secs(2),
    paced_rate: 500,
    paced_count: 1_000,
    stream: Duration::from_secs(1),
    idle: Duration::from_secs(10),
    changes: 20,
};

struct Args {
    out: PathBuf,
    /// Keep the figures already in `out` of (proxy, count) pairs this run
    /// does not measure.
    merge: bool,
    limit: Duration,
    services: Vec<u32>,
    proxies: Vec<Proxy>,
    plan: Plan,
}

fn parse_args() -> Args {
    let mut args = Args {
        out: PathBuf::from("target/bench/proxies.json"),
        merge: false,
        limit: PROGRAMMING_LIMIT,
        services: Vec::new(),
        proxies: Vec::new(),
        plan: FULL,
    };
    let mut words = std::env::args().skip(1);
    while let Some(arg) = words.next() {
        let mut value = || {
            words
                .next()
                .unwrap_or_else(|| panic!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--out" => args.out = PathBuf::from(value()),
            "--services" => args.services.push(
                value()
                    .parse()
                    .unwrap_or_else(|err| panic!("--services: {err}")),
            ),
            "--proxy" => args.proxies.push(
                value()
                    .parse()
                    .unwrap_or_else(|err| panic!("--proxy: {err}")),
            ),
            "--quick" => args.plan = QUICK,
            "--merge" => args.merge = true,
            "--limit-minutes" => {
                args.limit = Duration::from_mins(
                    value()
                        .parse()
                        .unwrap_or_else(|err| panic!("--limit-minutes: {err}")),
                );
            }
            other => panic!("unknown argument {other}"),
        }
    }
    if args.services.is_empty() {
        args.services = if args.plan.changes == QUICK.changes {
            vec![100, 1_000]
        } else {
            vec![100, 1_000, 10_000, 30_000]
        };
    }
    args.services.sort_unstable();
    args.services.dedup();
    if args.proxies.is_empty() {
        args.proxies = Proxy::ALL.to_vec();
    }
    args
}

/// The pods of the bench: the servers, the two pods the changes add, the
/// client.
struct Pods {
    servers: Vec<(String, Ipv4Addr, &'static str)>,
    added: [(String, Ipv4Addr, &'static str); 2],
    _running: Vec<BenchServer>,
}

fn start_pods(cluster: &mut Cluster) -> Pods {
    let mut running = Vec::new();
    let mut serve = |cluster: &mut Cluster, node: usize, name: &str, host: u8, sink: bool| {
        let node_name = cluster.nodes[node].name;
        let pod = cluster.nodes[node].add_pod(name, host);
        running.push(BenchServer::start(
            &pod.ns,
            SocketAddrV4::new(pod.addr, ANSWER_PORT),
            name,
            Serve::Answer,
        ));
        if sink {
            running.push(BenchServer::start(
                &pod.ns,
                SocketAddrV4::new(pod.addr, STREAM_PORT),
                name,
                Serve::Sink,
            ));
        }
        (name.to_owned(), pod.addr, node_name)
    };
    let servers = (0..SERVERS)
        .map(|k| {
            serve(
                cluster,
                usize::from(k % 2),
                &format!("srv-{k}"),
                10 + k / 2,
                true,
            )
        })
        .collect();
    let added = [
        serve(cluster, 1, "added-0", 30, false),
        serve(cluster, 0, "added-1", 31, false),
    ];
    let client = cluster.nodes[0].add_pod("client", 200);
    // The client makes hundreds of thousands of connections (each ended
    // by a reset: no TIME_WAIT); a wide port range spreads them.
    client
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    Pods {
        servers,
        added,
        _running: running,
    }
}

fn endpoint(name: &str, addr: Ipv4Addr, node: &str) -> serde_json::Value {
    json!({"addresses": [addr.to_string()], "conditions": {"ready": true},
           "nodeName": node, "targetRef": {"kind": "Pod", "namespace": NS, "name": name}})
}

fn slice(service: &str, endpoints: &[serde_json::Value], stream: bool) -> serde_json::Value {
    let mut ports = vec![json!({"name": "http", "port": ANSWER_PORT, "protocol": "TCP"})];
    if stream {
        ports.push(json!({"name": "stream", "port": STREAM_PORT, "protocol": "TCP"}));
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": NS,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
    })
}

fn base_endpoints(pods: &Pods) -> Vec<serde_json::Value> {
    pods.servers
        .iter()
        .map(|(name, addr, node)| endpoint(name, *addr, node))
        .collect()
}

/// Creates services `s<first>`.. `s<last - 1>` and their slices, returns
/// their ClusterIPs in order.
async fn create_services(
    services: Api<Service>,
    slices: Api<EndpointSlice>,
    range: std::ops::Range<u32>,
    endpoints: Arc<Vec<serde_json::Value>>,
) -> Vec<Ipv4Addr> {
    let created = futures::stream::iter(range.map(|i| {
        let (services, slices, endpoints) =
            (services.clone(), slices.clone(), Arc::clone(&endpoints));
        async move {
            let name = format!("s{i}");
            let service: Service = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": ANSWER_PORT}]}
            }))
            .expect("a Service");
            let service = services
                .create(&PostParams::default(), &service)
                .await
                .unwrap_or_else(|err| panic!("creating service {name}: {err}"));
            let slice: EndpointSlice =
                serde_json::from_value(slice(&name, &endpoints, false)).expect("an EndpointSlice");
            slices
                .create(&PostParams::default(), &slice)
                .await
                .unwrap_or_else(|err| panic!("creating {name}'s slice: {err}"));
            (i, cluster_ip(&service))
        }
    }))
    .buffer_unordered(IN_FLIGHT)
    .collect::<Vec<_>>()
    .await;
    let mut created = created;
    created.sort_unstable_by_key(|(i, _)| *i);
    created.into_iter().map(|(_, ip)| ip).collect()
}

fn cluster_ip(service: &Service) -> Ipv4Addr {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.cluster_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .expect("an allocated IPv4 ClusterIP")
}

/// Probes every address from `ns` (four threads) until each has answered
/// once; returns the time since `since` when the last one did, or `None`
/// at the limit.
fn all_answer(
    ns: &NetNs,
    addrs: &[SocketAddrV4],
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut pending: Vec<SocketAddrV4> = addrs.to_vec();
    while !pending.is_empty() {
        if since.elapsed() > limit {
            return None;
        }
        let chunk = pending.len().div_ceil(CLIENTS);
        let parts: Vec<Vec<SocketAddrV4>> = pending.chunks(chunk).map(<[_]>::to_vec).collect();
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                ns.spawn(move || {
                    // A sweep whose probes time out (a proxy half-way
                    // through programming) stops at the limit too.
                    part.into_iter()
                        .filter(|addr| since.elapsed() > limit || loadgen::exchange(*addr).is_err())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        pending = handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("probe thread"))
            .collect();
        if !pending.is_empty() {
            thread::sleep(Duration::from_millis(20));
        }
    }
    Some(since.elapsed())
}

/// A well-mixed index for the random-service target.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where the `i`-th connection of a run goes.
type Target = Arc<dyn Fn(u64) -> SocketAddrV4 + Send + Sync>;

struct Recorder {
    figures: Vec<Figure>,
    /// Figures of an earlier run kept with `--merge`.
    kept: Vec<serde_json::Value>,
    out: PathBuf,
}

impl Recorder {
    fn push(&mut self, proxy: Proxy, services: u32, metric: &str, value: f64, unit: &'static str) {
        eprintln!("  {proxy} N={services} {metric} = {value:.3} {unit}");
        self.figures.push(Figure {
            proxy: proxy.name().to_owned(),
            ..Figure::ours("proxies", services, metric, value, unit)
        });
    }

    fn latency(&mut self, proxy: Proxy, services: u32, what: &str, timings: &[Timing]) {
        for (part, pick) in [
            (
                "connect",
                (|t: &Timing| t.connect) as fn(&Timing) -> Duration,
            ),
            ("first_byte", |t: &Timing| t.first_byte),
        ] {
            let mut sorted: Vec<Duration> = timings.iter().map(pick).collect();
            sorted.sort_unstable();
            for (label, p) in [("p50", 50.0), ("p99", 99.0), ("p999", 99.9)] {
                let value = loadgen::percentile(&sorted, p).as_secs_f64() * 1e6;
                self.push(
                    proxy,
                    services,
                    &format!("{part}_{label}_{what}"),
                    value,
                    "us",
                );
            }
        }
    }

    fn write(&self) {
        if self.kept.is_empty() {
            figures::write(&self.out, &self.figures);
            return;
        }
        let mut all = self.kept.clone();
        all.extend(
            self.figures
                .iter()
                .map(|figure| serde_json::to_value(figure).expect("a figure as JSON")),
        );
        std::fs::write(
            &self.out,
            serde_json::to_string_pretty(&all).expect("figures as JSON"),
        )
        .unwrap_or_else(|err| panic!("writing {}: {err}", self.out.display()));
    }
}

struct Bench {
    plane: ControlPlane,
    cluster: Cluster,
    pods: Pods,
    _forwarders: Vec<Forwarder>,
    /// ClusterIPs of s0, s1, ... in creation order.
    cluster_ips: Vec<Ipv4Addr>,
    edge_ip: Ipv4Addr,
    edge_node_port: u16,
    plan: Plan,
    limit: Duration,
}

fn main() {
    let args = parse_args();
    let mut bench = Bench::start(args.plan, args.limit);
    let mut recorder = Recorder {
        figures: Vec::new(),
        kept: if args.merge {
            kept_figures(&args)
        } else {
            Vec::new()
        },
        out: args.out.clone(),
    };
    // The release agent cargo built beside this binary.
    let agent = std::env::current_exe()
        .expect("own path")
        .with_file_name("svc-agent");
    assert!(
        agent.is_file(),
        "{} is missing: `cargo xtask bench proxies` builds it",
        agent.display()
    );
    let bin = PathBuf::from(
        std::env::var_os(k8s::BIN_DIR_ENV).expect("the upstream binaries' directory"),
    );
    // A proxy that did not program N services within the limit is not
    // run with more.
    let mut gave_up: Vec<Proxy> = Vec::new();
    for &services in &args.services {
        let had = bench.cluster_ips.len();
        let started = Instant::now();
        bench.grow_to(services);
        let created = started.elapsed();
        eprintln!("{services} services in the API server ({created:.1?} to add them)");
        recorder.figures.push(Figure {
            proxy: "api-server".to_owned(),
            ..Figure::ours(
                "proxies",
                services,
                "api_create",
                created.as_secs_f64(),
                "s",
            )
        });
        recorder.figures.push(Figure {
            proxy: "api-server".to_owned(),
            ..Figure::ours(
                "proxies",
                services,
                "api_created",
                as_f64((bench.cluster_ips.len() - had) as u64),
                "services",
            )
        });
        for &proxy in &args.proxies {
            if gave_up.contains(&proxy) {
                eprintln!("{proxy}: not run with {services} services (gave up at fewer)");
                continue;
            }
            if !bench.measure(proxy, services, &bin, &agent, &mut recorder) {
                gave_up.push(proxy);
            }
            recorder.write();
        }
    }
    eprintln!("wrote {}", args.out.display());
}

/// The figures of `args.out` whose proxy and count this run does not
/// measure.
fn kept_figures(args: &Args) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(&args.out) else {
        return Vec::new();
    };
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", args.out.display()));
    all.into_iter()
        .filter(|figure| {
            let services = figure["services"].as_u64().unwrap_or_default();
            let proxy = figure["proxy"].as_str().unwrap_or_default();
            let measured = args.services.iter().any(|&n| u64::from(n) == services)
                && (proxy == "api-server" || args.proxies.iter().any(|p| p.name() == proxy));
            !measured
        })
        .collect()
}

impl Bench {
    fn start(plan: Plan, limit: Duration) -> Self {
        let plane = ControlPlane::start();
        let mut cluster = Cluster::new(Options {
            agent_binary: true,
            ..Options::default()
        });
        let pods = start_pods(&mut cluster);
        let client = plane.client();
        let (edge_ip, edge_node_port) = plane.block_on(async {
            let namespaces: Api<Namespace> = Api::all(client.clone());
            apply(
                &namespaces,
                NS,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
            )
            .await;
            let nodes: Api<Node> = Api::all(client.clone());
            for node in &cluster.nodes {
                apply(
                    &nodes,
                    node.name,
                    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}}),
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
            let services: Api<Service> = Api::namespaced(client.clone(), NS);
            let edge = apply(
                &services,
                "edge",
                json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "edge", "namespace": NS},
                       "spec": {"type": "NodePort", "ports": [
                           {"name": "http", "port": 80, "targetPort": ANSWER_PORT},
                           {"name": "stream", "port": STREAM_PORT, "targetPort": STREAM_PORT}]}}),
            )
            .await;
            let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
            apply(
                &slices,
                "edge-1",
                slice("edge", &base_endpoints(&pods), true),
            )
            .await;
            let node_port = edge
                .spec
                .as_ref()
                .and_then(|spec| spec.ports.as_ref())
                .and_then(|ports| ports.first())
                .and_then(|port| port.node_port)
                .and_then(|port| u16::try_from(port).ok())
                .expect("edge's node port");
            (cluster_ip(&edge), node_port)
        });
        let forwarders = cluster
            .nodes
            .iter()
            .map(|node| Forwarder::new(&node.ns, plane.api_port))
            .collect();
        Self {
            plane,
            cluster,
            pods,
            _forwarders: forwarders,
            cluster_ips: Vec::new(),
            edge_ip,
            edge_node_port,
            plan,
            limit,
        }
    }

    fn grow_to(&mut self, count: u32) {
        let have = u32::try_from(self.cluster_ips.len()).expect("fits");
        if have >= count {
            return;
        }
        let client = self.plane.client();
        let endpoints = Arc::new(base_endpoints(&self.pods));
        let ips = self.plane.block_on(create_services(
            Api::namespaced(client.clone(), NS),
            Api::namespaced(client, NS),
            have..count,
            endpoints,
        ));
        self.cluster_ips.extend(ips);
    }

    fn node_specs(&self) -> Vec<NodeSpec<'_>> {
        self.cluster
            .nodes
            .iter()
            .map(|node| NodeSpec {
                name: node.name,
                ns: &node.ns,
                addr: node.addr,
            })
            .collect()
    }

    fn measure(
        &self,
        proxy: Proxy,
        services: u32,
        bin: &std::path::Path,
        agent: &std::path::Path,
        recorder: &mut Recorder,
    ) -> bool {
        eprintln!("{proxy} with {services} services");
        let count = services as usize;
        let client_ns = &self.cluster.pod("client").ns;
        let mut targets: Vec<SocketAddrV4> = self.cluster_ips[..count]
            .iter()
            .map(|ip| SocketAddrV4::new(*ip, 80))
            .collect();
        targets.push(SocketAddrV4::new(self.edge_ip, 80));
        let logs = self
            .plane
            .dir()
            .join(format!("bench-{}", std::process::id()));
        let agent_kubeconfig = self.plane.agent_kubeconfig();
        let kube_proxy_kubeconfig = self.plane.kubeconfig_for("kube-proxy");
        // Room for every service's table and the edge service's frontends.
        let table = maglev::table_size(u32::from(SERVERS), maglev::DEFAULT_SLOTS_PER_BACKEND);
        let maglev_slots = ((services + 64) * table).max(DEFAULT_MAGLEV_SLOTS);
        let setup = Setup {
            bin,
            agent,
            agent_kubeconfig: &agent_kubeconfig,
            kube_proxy_kubeconfig: &kube_proxy_kubeconfig,
            dir: &logs,
            maglev_slots,
        };
        let started = Instant::now();
        let mut running =
            RunningProxy::start(proxy, &self.node_specs(), &setup, &services.to_string());
        let Some(cold) = all_answer(client_ns, &targets, started, self.limit) else {
            running.assert_running();
            eprintln!(
                "{proxy}: not every one of {services} services answered within {:?}; giving up",
                self.limit
            );
            recorder.push(
                proxy,
                services,
                "cold_not_done_after",
                self.limit.as_secs_f64(),
                "s",
            );
            running.stop(bin);
            return false;
        };
        recorder.push(
            proxy,
            services,
            "cold_to_all_answering",
            cold.as_secs_f64(),
            "s",
        );
        // The first syncs' aftermath (kube-proxy's partial syncs, our
        // sweeper) settles before anything is timed.
        thread::sleep(Duration::from_secs(2));
        self.resources(&running, services, recorder);
        self.datapath(proxy, services, recorder);
        self.changes(proxy, services, recorder);
        let page = proxies::metrics_page(&self.cluster.nodes[0].ns);
        if let Some((sum, count)) = proxies::histogram_sum_count(&page, proxy.sync_metric())
            && count > 0.0
        {
            recorder.push(proxy, services, "own_sync_mean", sum / count * 1e3, "ms");
        }
        if let Some((sum, count)) =
            proxies::histogram_sum_count(&page, "kubeproxy_network_programming_duration_seconds")
            && count > 0.0
        {
            recorder.push(
                proxy,
                services,
                "network_programming_mean",
                sum / count * 1e3,
                "ms",
            );
        }
        running.assert_running();
        running.stop(bin);
        true
    }

    fn resources(&self, running: &RunningProxy, services: u32, recorder: &mut Recorder) {
        let proxy = running.proxy;
        let pid = running.pid(0);
        let mib = |bytes: u64| as_f64(bytes) / f64::from(1 << 20);
        if let Some(rss) = proxies::rss_bytes(pid) {
            recorder.push(proxy, services, "rss", mib(rss), "MiB");
        }
        if proxy == Proxy::SvcProxy {
            recorder.push(
                proxy,
                services,
                "bpf_map_memory",
                mib(proxies::bpf_map_bytes(pid)),
                "MiB",
            );
        }
        let state = NetfilterState::of(self.cluster.nodes[0].ns.name());
        recorder.push(
            proxy,
            services,
            "nft_rules",
            as_f64(state.nft_rules),
            "rules",
        );
        recorder.push(
            proxy,
            services,
            "nft_elements",
            as_f64(state.nft_elements),
            "elements",
        );
        let before = proxies::cpu_time(pid).unwrap_or_default();
        thread::sleep(self.plan.idle);
        let used = proxies::cpu_time(pid)
            .unwrap_or_default()
            .saturating_sub(before);
        recorder.push(
            proxy,
            services,
            "idle_cpu",
            used.as_secs_f64() * 1e3 / (self.plan.idle.as_secs_f64() / 60.0),
            "ms/min",
        );
    }

    fn datapath(&self, proxy: Proxy, services: u32, recorder: &mut Recorder) {
        let plan = self.plan;
        let client_ns = &self.cluster.pod("client").ns;
        let count = services as usize;
        let last = SocketAddrV4::new(self.cluster_ips[count - 1], 80);
        let ips: Arc<Vec<Ipv4Addr>> = Arc::new(self.cluster_ips[..count].to_vec());
        let node_port = SocketAddrV4::new(self.cluster.nodes[0].addr, self.edge_node_port);
        let random = {
            let ips = Arc::clone(&ips);
            Arc::new(move |i: u64| {
                let index = usize::try_from(mix(i) % ips.len() as u64).expect("fits");
                SocketAddrV4::new(ips[index], 80)
            })
        };
        let external = &self.cluster.external.ns;
        let cases: [(&str, &NetNs, Target); 3] = [
            ("last", client_ns, Arc::new(move |_| last)),
            ("random", client_ns, random),
            ("nodeport", external, Arc::new(move |_| node_port)),
        ];
        for (what, ns, target) in cases {
            let run = loadgen::saturate(ns, CLIENTS, plan.saturate, 2_000_000, &target);
            recorder.push(
                proxy,
                services,
                &format!("conn_per_s_{what}"),
                run.per_second(),
                "1/s",
            );
            recorder.push(
                proxy,
                services,
                &format!("cpu_per_conn_{what}"),
                run.cpu_per_connection().as_secs_f64() * 1e6,
                "us",
            );
            recorder.push(
                proxy,
                services,
                &format!("failed_{what}"),
                as_f64(run.failed),
                "connections",
            );
            recorder.push(
                proxy,
                services,
                &format!("slow_{what}"),
                as_f64(run.slow),
                "connections",
            );
            let (timings, failed) = loadgen::paced(ns, plan.paced_rate, plan.paced_count, &*target);
            recorder.latency(proxy, services, what, &timings);
            recorder.push(
                proxy,
                services,
                &format!("paced_failed_{what}"),
                as_f64(failed),
                "connections",
            );
        }
        for (what, ns, to) in [
            (
                "clusterip",
                client_ns,
                SocketAddrV4::new(self.edge_ip, STREAM_PORT),
            ),
            ("nodeport", external, {
                let edge = self.edge_stream_node_port();
                SocketAddrV4::new(self.cluster.nodes[0].addr, edge)
            }),
        ] {
            let rate = loadgen::stream(ns, to, plan.stream)
                .unwrap_or_else(|err| panic!("{proxy}: stream through {to}: {err}"));
            recorder.push(
                proxy,
                services,
                &format!("stream_{what}"),
                rate * 8.0 / 1e9,
                "Gbit/s",
            );
        }
    }

    fn edge_stream_node_port(&self) -> u16 {
        let services: Api<Service> = Api::namespaced(self.plane.client(), NS);
        let edge = self
            .plane
            .block_on(services.get("edge"))
            .unwrap_or_else(|err| panic!("reading service edge: {err}"));
        edge.spec
            .and_then(|spec| spec.ports)
            .and_then(|ports| {
                ports
                    .into_iter()
                    .find(|port| port.name.as_deref() == Some("stream"))
            })
            .and_then(|port| port.node_port)
            .and_then(|port| u16::try_from(port).ok())
            .expect("edge's stream node port")
    }

    /// The last service's slice gains one ready pod (alternately
    /// `added-0` and `added-1`, the other one leaving): the time from the
    /// write until a new connection from the client reaches the added pod.
    fn changes(&self, proxy: Proxy, services: u32, recorder: &mut Recorder) {
        let last_index = services - 1;
        let name = format!("s{last_index}");
        let last = SocketAddrV4::new(self.cluster_ips[last_index as usize], 80);
        let slices: Api<EndpointSlice> = Api::namespaced(self.plane.client(), NS);
        let client_ns = &self.cluster.pod("client").ns;
        let base = base_endpoints(&self.pods);
        let mut times = Vec::new();
        let mut probes_total = 0u64;
        for change in 0..self.plan.changes {
            let (added, addr, node) = &self.pods.added[(change % 2) as usize];
            let mut endpoints = base.clone();
            endpoints.push(endpoint(added, *addr, node));
            let started = Instant::now();
            self.plane.block_on(apply(
                &slices,
                &format!("{name}-1"),
                slice(&name, &endpoints, false),
            ));
            let (reached, probes) = client_ns.run(|| {
                let mut probes = 0u64;
                while started.elapsed() < self.limit {
                    probes += 1;
                    if loadgen::exchange(last).is_ok_and(|(_, who)| &who == added) {
                        return (Some(started.elapsed()), probes);
                    }
                }
                (None, probes)
            });
            let reached = reached.unwrap_or_else(|| {
                panic!("{proxy}: {added} never answered through {name} after change {change}")
            });
            probes_total += probes;
            times.push(reached);
            // Changes are isolated from each other: kube-proxy syncs at
            // most once a second (--min-sync-period).
            let gap = 1_000 + mix(u64::from(change)) % 500;
            thread::sleep(Duration::from_millis(gap));
        }
        self.plane.block_on(apply(
            &slices,
            &format!("{name}-1"),
            slice(&name, &base, false),
        ));
        times.sort_unstable();
        for (label, p) in [("p50", 50.0), ("p99", 99.0)] {
            recorder.push(
                proxy,
                services,
                &format!("change_to_traffic_{label}"),
                loadgen::percentile(&times, p).as_secs_f64() * 1e3,
                "ms",
            );
        }
        recorder.push(
            proxy,
            services,
            "change_probes_mean",
            as_f64(probes_total) / f64::from(self.plan.changes),
            "connections",
        );
    }
}

#[cfg(test)]
mod unit {
    #[test]
    fn mixed_indexes_spread() {
        let buckets = (0..10_000u64).fold([0u32; 10], |mut buckets, i| {
            buckets[usize::try_from(super::mix(i) % 10).expect("small")] += 1;
            buckets
        });
        assert!(
            buckets.iter().all(|&b| (900..1100).contains(&b)),
            "{buckets:?}"
        );
    }
}
