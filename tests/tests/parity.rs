//! Behaving as kube-proxy does where connections must survive, where
//! traffic is masqueraded and where it is refused, with real traffic in the
//! two-node namespace cluster and each node running the agent's pipeline
//! (manifests → translation → maps → sweeps of connection tracking).

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use svc_agent::{
    datapath::Ipv4Cidr,
    model::{LocalDetect, Settings},
};
use svc_common::{proto, stats::Counter};
use tests::{
    agents::Agents,
    servers::{Answer, read_answer},
    topology::{Cluster, Options, QUICK_TIMEOUT, TIMEOUT, connect_from},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30_080;
/// In the service CIDR; no service holds it.
const UNALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 9);
/// A second address of the external client, inside the cluster's pod CIDR
/// but on none of the nodes.
const STRAY_POD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 9);

/// The usual cluster, every backend serving TCP 8080 and UDP 5353.
fn cluster(options: Options) -> Cluster {
    Cluster::with_backends(options, &[8080])
}

/// An endpoint of the `web` service: a pod and its conditions.
#[derive(Clone, Copy)]
struct Ep {
    pod: &'static str,
    ready: bool,
    serving: bool,
    terminating: bool,
}

const fn ready(pod: &'static str) -> Ep {
    Ep {
        pod,
        ready: true,
        serving: true,
        terminating: false,
    }
}

/// Terminating, still serving (its pod is shutting down gracefully).
const fn draining(pod: &'static str) -> Ep {
    Ep {
        pod,
        ready: false,
        serving: true,
        terminating: true,
    }
}

/// Terminating and no longer serving.
const fn stopped(pod: &'static str) -> Ep {
    Ep {
        pod,
        ready: false,
        serving: false,
        terminating: true,
    }
}

fn pod_addr(pod: &str) -> (&'static str, &'static str) {
    match pod {
        "a" => ("10.244.1.2", "node1"),
        "b" => ("10.244.2.2", "node2"),
        "c" => ("10.244.2.3", "node2"),
        other => panic!("no backend pod {other}"),
    }
}

/// `web`: a NodePort service with TCP 80 (node port 30080) and UDP 53 on
/// `CLUSTER_IP`, and its slice.
fn web(endpoints: &[Ep]) -> String {
    let mut text = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  clusterIP: {CLUSTER_IP}
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports:
- {{name: http, port: 8080}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:
"
    );
    for ep in endpoints {
        let (addr, node) = pod_addr(ep.pod);
        let _ = writeln!(
            text,
            "  - {{addresses: [{addr}], nodeName: {node}, conditions: {{ready: {}, serving: {}, terminating: {}}}}}",
            ep.ready, ep.serving, ep.terminating
        );
    }
    text
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Writes a line and reads it back, panicking with `when`.
fn echo(stream: &mut TcpStream, when: &str) {
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    stream
        .write_all(b"ping\n")
        .unwrap_or_else(|err| panic!("{when}: write: {err}"));
    let mut buf = [0u8; 5];
    stream
        .read_exact(&mut buf)
        .unwrap_or_else(|err| panic!("{when}: the established connection broke: {err}"));
    assert_eq!(&buf, b"ping\n", "{when}");
}

/// Who answers `count` new connections from pod `z` to the ClusterIP.
fn new_connections(cluster: &Cluster, count: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for i in 0..count {
        let answer = cluster
            .pod("z")
            .ask(addr(CLUSTER_IP, 80))
            .unwrap_or_else(|err| panic!("new connection {i}: {err}"));
        *seen.entry(answer.name).or_insert(0) += 1;
    }
    seen
}

/// Connects with `connect` until a connection lands on `pod` (Maglev
/// spreads them by source port), at most 60 tries.
fn connection_to(
    pod: &str,
    what: &str,
    mut connect: impl FnMut() -> std::io::Result<TcpStream>,
) -> TcpStream {
    for _ in 0..60 {
        let stream = connect().unwrap_or_else(|err| panic!("{what}: {err}"));
        if read_answer(&stream, TIMEOUT)
            .unwrap_or_else(|err| panic!("{what}: answer: {err}"))
            .name
            == pod
        {
            return stream;
        }
    }
    panic!("{what}: no connection in 60 reached {pod}");
}

fn udp_ask(socket: &UdpSocket) -> std::io::Result<Answer> {
    socket.send(b"?")?;
    let mut buf = [0u8; 256];
    let len = socket.recv(&mut buf)?;
    Ok(Answer::parse(&String::from_utf8_lossy(&buf[..len])))
}

/// The datapath counter `counter` on node `index`.
fn counted(cluster: &Cluster, index: usize, counter: Counter) -> u64 {
    cluster.nodes[index]
        .datapath()
        .stats()
        .expect("counters")
        .get(counter)
        .packets
}

#[test]
fn established_tcp_outlives_its_endpoint_from_pods_outside_and_the_node() {
    let mut cluster = cluster(Options {
        host_sockets_on_node1: true,
        quick_timeouts: true,
        ..Options::default()
    });
    let mut agents = Agents::new(&cluster);
    agents.write("web.yaml", &web(&[ready("a"), ready("b"), ready("c")]));
    agents.sync_and_sweep(&mut cluster);

    // Three long-lived connections to `b`, as a rolling update finds them.
    let node1 = cluster.nodes[0].addr;
    let mut streams = vec![
        (
            "from a pod",
            connection_to("b", "pod to ClusterIP", || {
                cluster.pod("z").connect(addr(CLUSTER_IP, 80))
            }),
        ),
        (
            "from outside through the node port",
            connection_to("b", "outside to node port", || {
                cluster.external.connect(addr(node1, NODE_PORT))
            }),
        ),
        (
            "from the node's own process",
            connection_to("b", "node to ClusterIP", || {
                cluster.nodes[0]
                    .ns
                    .run(|| TcpStream::connect_timeout(&addr(CLUSTER_IP, 80).into(), TIMEOUT))
            }),
        ),
    ];
    let echo_all = |streams: &mut Vec<(&str, TcpStream)>, when: &str| {
        for (what, stream) in streams.iter_mut() {
            echo(stream, &format!("{what}, {when}"));
        }
    };
    echo_all(&mut streams, "before the update");

    for (when, endpoints) in [
        (
            "b terminating but serving",
            vec![ready("a"), draining("b"), ready("c")],
        ),
        (
            "b no longer serving",
            vec![ready("a"), stopped("b"), ready("c")],
        ),
        ("b gone from the slice", vec![ready("a"), ready("c")]),
    ] {
        agents.write("web.yaml", &web(&endpoints));
        agents.sync_and_sweep(&mut cluster);
        echo_all(&mut streams, when);
        let seen = new_connections(&cluster, 15);
        assert!(
            !seen.contains_key("b"),
            "{when}: new connections avoid b: {seen:?}"
        );
    }
    // Its id stays reserved on node1, which translated the flows, while
    // they live.
    let reserved = |agents: &Agents| agents.per_node[0].2.retired_backends();
    assert_eq!(reserved(&agents), 1, "b's id is held by live flows");
    echo_all(&mut streams, "after a sweep");

    // The connections end; once their entries time out, a sweep frees it.
    drop(streams);
    thread::sleep(QUICK_TIMEOUT + Duration::from_secs(2));
    let reports = agents.sweep(&mut cluster);
    assert!(reports[0].removed_expired > 0, "{:?}", reports[0]);
    assert_eq!(reserved(&agents), 0, "no flow names b any more");
}

#[test]
fn udp_flows_stay_while_their_endpoint_serves_and_move_when_it_stops() {
    let mut cluster = cluster(Options::default());
    let mut agents = Agents::new(&cluster);
    agents.write("web.yaml", &web(&[ready("a"), ready("b"), ready("c")]));
    agents.sync_and_sweep(&mut cluster);
    let socket = cluster.pod("z").udp_socket();
    socket
        .connect(addr(CLUSTER_IP, 53))
        .expect("connect the UDP socket");
    let first = udp_ask(&socket).expect("first datagram").name;
    let others: Vec<&'static str> = ["a", "b", "c"]
        .into_iter()
        .filter(|pod| *pod != first)
        .collect();
    let with = |first_ep: Ep| -> Vec<Ep> {
        std::iter::once(first_ep)
            .chain(others.iter().map(|pod| ready(pod)))
            .collect()
    };
    let first_pod: &'static str = ["a", "b", "c"]
        .into_iter()
        .find(|pod| *pod == first)
        .expect("one of the backends");

    // Terminating but serving: kube-proxy leaves its UDP flows alone.
    agents.write("web.yaml", &web(&with(draining(first_pod))));
    agents.sync_and_sweep(&mut cluster);
    let next = udp_ask(&socket).expect("datagram while the endpoint drains");
    assert_eq!(next.name, first, "the flow stays while its endpoint serves");

    // No longer serving: the flow is cleared and the next datagram picks
    // a serving endpoint.
    agents.write("web.yaml", &web(&with(stopped(first_pod))));
    let reports = agents.sync_and_sweep(&mut cluster);
    assert!(
        reports[0].removed_udp >= 2,
        "node1 cleared both entries of the flow: {:?}",
        reports[0]
    );
    // The socket is connected to the ClusterIP: an answer from anywhere
    // else would not reach it.
    let answer = udp_ask(&socket).expect("datagram after the endpoint stopped");
    assert_ne!(answer.name, first, "the next datagram moved off {first}");
    // TCP flows of the same endpoint would have been left alone: the
    // sweep cleared only UDP entries.
    for node in &cluster.nodes {
        let entries = node.datapath().maps().ct_entries().expect("CT");
        let first_addr: Ipv4Addr = pod_addr(first_pod).0.parse().expect("address");
        assert!(
            entries.iter().all(|(key, entry)| key.protocol != proto::UDP
                || (entry.daddr != first_addr.into() && key.saddr != first_addr.into())),
            "{}: no UDP entry leads to {first} any more",
            node.name
        );
    }
}

#[test]
fn a_deleted_service_lets_tcp_finish_and_clears_udp() {
    let mut cluster = cluster(Options::default());
    let mut agents = Agents::new(&cluster);
    for (_, translator, _) in &mut agents.per_node {
        translator.set_service_cidrs(vec!["10.96.0.0/16".parse().expect("a CIDR")]);
    }
    agents.write("web.yaml", &web(&[ready("a"), ready("b"), ready("c")]));
    agents.sync_and_sweep(&mut cluster);
    let mut stream = cluster
        .pod("z")
        .connect(addr(CLUSTER_IP, 80))
        .expect("connect");
    read_answer(&stream, TIMEOUT).expect("answer");
    let socket = cluster.pod("z").udp_socket();
    socket
        .connect(addr(CLUSTER_IP, 53))
        .expect("connect the UDP socket");
    udp_ask(&socket).expect("a UDP answer");
    let udp_port = socket.local_addr().expect("local address").port();

    agents.remove("web.yaml");
    agents.sync_and_sweep(&mut cluster);
    echo(&mut stream, "after the service was deleted");
    echo(&mut stream, "after the service was deleted, again");
    let entries = cluster.nodes[0].datapath().maps().ct_entries().expect("CT");
    assert!(
        !entries.iter().any(|(key, _)| key.protocol == proto::UDP
            && (key.sport.host() == udp_port || key.dport.host() == udp_port)),
        "the UDP flow of the deleted service is cleared"
    );
    let dropped = counted(&cluster, 0, Counter::DropUnallocatedServiceIp);
    socket.send(b"?").expect("send");
    let mut buf = [0u8; 64];
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    assert!(
        socket.recv(&mut buf).is_err(),
        "no service answers the deleted ClusterIP"
    );
    assert_eq!(
        counted(&cluster, 0, Counter::DropUnallocatedServiceIp),
        dropped + 1,
        "its address is no longer allocated: the datagram is dropped"
    );
    // New TCP connections to it fail the same way.
    let err = cluster
        .pod("z")
        .ns
        .run(|| TcpStream::connect_timeout(&addr(CLUSTER_IP, 80).into(), Duration::from_secs(1)))
        .expect_err("the service is gone");
    assert_eq!(
        err.kind(),
        ErrorKind::TimedOut,
        "dropped, not refused: {err}"
    );
}

#[test]
fn a_client_routed_to_a_cluster_ip_is_masqueraded_and_reaches_every_backend() {
    let mut cluster = cluster(Options::default());
    let mut agents = Agents::new(&cluster);
    agents.write("web.yaml", &web(&[ready("a"), ready("b"), ready("c")]));
    agents.sync_and_sweep(&mut cluster);
    let node1 = cluster.nodes[0].addr;
    let mut seen = BTreeSet::new();
    for i in 0..30 {
        let stream = cluster
            .external
            .connect(addr(CLUSTER_IP, 80))
            .unwrap_or_else(|err| panic!("connection {i} from outside: {err}"));
        let answer = read_answer(&stream, TIMEOUT)
            .unwrap_or_else(|err| panic!("connection {i} from outside: answer: {err}"));
        assert_eq!(
            answer.peer_ip(),
            node1,
            "{}: the backend sees the node, so its replies come back through it",
            answer.name
        );
        seen.insert(answer.name);
    }
    assert_eq!(
        seen,
        BTreeSet::from(["a".to_owned(), "b".to_owned(), "c".to_owned()]),
        "local and remote backends alike"
    );
    // A pod of the node keeps its address.
    let answer = cluster
        .pod("z")
        .ask(addr(CLUSTER_IP, 80))
        .expect("from a pod");
    assert_eq!(answer.peer_ip(), cluster.pod("z").addr);
}

/// Connects from the external client's `STRAY_POD_ADDR` to backend `a`
/// through the ClusterIP and returns the source `a` saw.
fn peer_of_stray_client(cluster: &Cluster, port: u16) -> Ipv4Addr {
    let stream = cluster
        .external
        .ns
        .run(|| connect_from(addr(STRAY_POD_ADDR, port), addr(CLUSTER_IP, 80)))
        .expect("connection from the stray pod address");
    read_answer(&stream, TIMEOUT).expect("answer").peer_ip()
}

/// A cluster whose only `web` backend is `a` (node1), with the external
/// client also owning [`STRAY_POD_ADDR`] (routed back to it by both
/// nodes), and agents with `settings`.
fn locality_cluster(options: Options, settings: &Settings) -> (Cluster, Agents) {
    let mut cluster = cluster(options);
    cluster.external.ns.ip(&[
        "addr",
        "add",
        &format!("{STRAY_POD_ADDR}/32"),
        "dev",
        "eth0",
    ]);
    for node in &cluster.nodes {
        node.ns.ip(&[
            "route",
            "add",
            &format!("{STRAY_POD_ADDR}/32"),
            "via",
            &cluster.external.addr.to_string(),
        ]);
    }
    let mut agents = Agents::with_settings(&cluster, settings);
    agents.write("web.yaml", &web(&[ready("a")]));
    agents.sync_and_sweep(&mut cluster);
    (cluster, agents)
}

#[test]
fn local_traffic_is_told_by_interface_cluster_cidr_or_node_cidr() {
    let cluster_cidr: Ipv4Cidr = "10.244.0.0/16".parse().expect("a CIDR");
    let cases = [
        (
            "by interface",
            false,
            LocalDetect::Interface,
            // Only what enters at a pod veth is local.
            false,
        ),
        (
            "by the cluster's CIDR",
            true,
            LocalDetect::ClusterCidr(vec![cluster_cidr]),
            // Any source in the cluster's pod CIDR is local.
            true,
        ),
        (
            "by the node's pod CIDR",
            true,
            LocalDetect::NodeCidr,
            // Only node1's own pod CIDR is local.
            false,
        ),
    ];
    for (index, (mode, local_by_cidr, local_detect, stray_is_local)) in
        cases.into_iter().enumerate()
    {
        let settings = Settings {
            local_detect,
            ..Settings::default()
        };
        let (cluster, _agents) = locality_cluster(
            Options {
                local_by_cidr,
                ..Options::default()
            },
            &settings,
        );
        let node1 = cluster.nodes[0].addr;
        let z = cluster.pod("z");
        let answer = z.ask(addr(CLUSTER_IP, 80)).expect("from a pod");
        assert_eq!(answer.peer_ip(), z.addr, "{mode}: a pod keeps its address");
        let answer = cluster
            .external
            .ask(addr(CLUSTER_IP, 80))
            .expect("from outside");
        assert_eq!(answer.peer_ip(), node1, "{mode}: outside is masqueraded");
        let port = 42_000 + u16::try_from(index).expect("few cases");
        let expected = if stray_is_local {
            STRAY_POD_ADDR
        } else {
            node1
        };
        assert_eq!(
            peer_of_stray_client(&cluster, port),
            expected,
            "{mode}: a source in the cluster's pod CIDR entering at the uplink"
        );
    }
}

#[test]
fn masquerade_all_hides_every_client_of_a_cluster_ip() {
    let settings = Settings {
        masquerade_all: true,
        ..Settings::default()
    };
    let (cluster, _agents) = locality_cluster(Options::default(), &settings);
    let node1 = cluster.nodes[0].addr;
    let answer = cluster
        .pod("z")
        .ask(addr(CLUSTER_IP, 80))
        .expect("from a pod");
    assert_eq!(answer.peer_ip(), node1, "a pod is masqueraded too");
    let answer = cluster
        .external
        .ask(addr(CLUSTER_IP, 80))
        .expect("from outside");
    assert_eq!(answer.peer_ip(), node1);
}

#[test]
fn cluster_ips_refuse_ports_they_lack_and_unallocated_addresses_are_dropped() {
    let mut cluster = cluster(Options {
        host_sockets_on_node1: true,
        ..Options::default()
    });
    let mut agents = Agents::new(&cluster);
    for (_, translator, _) in &mut agents.per_node {
        translator.set_service_cidrs(vec!["10.96.0.0/16".parse().expect("a CIDR")]);
    }
    agents.write("web.yaml", &web(&[ready("a"), ready("b")]));
    agents.sync_and_sweep(&mut cluster);
    let refused_before = counted(&cluster, 0, Counter::RejectUnknownPort);
    let refused = |result: std::io::Result<TcpStream>, what: &str| {
        let err = result.expect_err(what);
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "{what}: refused at once: {err}"
        );
    };
    refused(
        cluster.pod("z").connect(addr(CLUSTER_IP, 81)),
        "TCP from a pod to a port the service lacks",
    );
    refused(
        cluster.external.connect(addr(CLUSTER_IP, 81)),
        "TCP from a routed client",
    );
    refused(
        cluster.nodes[0]
            .ns
            .run(|| TcpStream::connect_timeout(&addr(CLUSTER_IP, 81).into(), TIMEOUT)),
        "TCP from the node's own process",
    );
    let socket = cluster.pod("z").udp_socket();
    socket
        .connect(addr(CLUSTER_IP, 54))
        .expect("connect the UDP socket");
    socket.send(b"?").expect("send");
    let mut buf = [0u8; 16];
    let err = socket.recv(&mut buf).expect_err("no such port");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "UDP: {err}");
    assert_eq!(
        counted(&cluster, 0, Counter::RejectUnknownPort),
        refused_before + 4,
        "node1 refused the pod's TCP and UDP, the routed client's, and its own process's"
    );
    // The ports it has still work.
    assert!(cluster.pod("z").ask(addr(CLUSTER_IP, 80)).is_ok());

    let dropped_before = counted(&cluster, 0, Counter::DropUnallocatedServiceIp);
    let err = cluster
        .pod("z")
        .ns
        .run(|| TcpStream::connect_timeout(&addr(UNALLOCATED, 80).into(), Duration::from_secs(1)))
        .expect_err("nothing holds the address");
    assert_eq!(
        err.kind(),
        ErrorKind::TimedOut,
        "dropped, not refused: {err}"
    );
    assert!(
        counted(&cluster, 0, Counter::DropUnallocatedServiceIp) > dropped_before,
        "the drop is counted"
    );
    let err = cluster.nodes[0]
        .ns
        .run(|| TcpStream::connect_timeout(&addr(UNALLOCATED, 80).into(), TIMEOUT))
        .expect_err("nothing holds the address");
    assert_eq!(
        err.kind(),
        ErrorKind::HostUnreachable,
        "a host process fails at once: {err}"
    );
}
