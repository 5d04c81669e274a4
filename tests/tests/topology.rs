//! The datapath carrying real TCP and UDP traffic in a two-node cluster
//! made of network namespaces (see `tests::topology`): one test per
//! behaviour kube-proxy users rely on.

use std::{
    collections::HashMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    thread,
    time::Duration,
};

use svc_agent::datapath::{Frontend, Maps, Masquerade, ServicePolicy};
use svc_common::{hash::flow_hash, lb::BackendId, proto, stats::Counter, wire};
use tests::{
    servers::{Answer, read_answer},
    topology::{Cluster, Options, Pod, TIMEOUT},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLUSTER_IP_2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 1, 50);
const LB_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 1, 60);
const NODE_PORT: u16 = 30_080;

fn masquerading() -> ServicePolicy {
    ServicePolicy {
        masquerade: Masquerade::NonLocal,
        ..ServicePolicy::default()
    }
}

/// The usual cluster, every backend serving TCP 8080, 9090 and UDP 5353.
fn cluster(options: Options) -> Cluster {
    Cluster::with_backends(options, &[8080, 9090])
}

/// One UDP question to `to` from `socket`: the answer, and where the reply
/// came from as the client sees it.
fn ask_udp(
    socket: &std::net::UdpSocket,
    to: SocketAddrV4,
) -> std::io::Result<(Answer, SocketAddr)> {
    socket.send_to(b"?", to)?;
    let mut buf = [0u8; 256];
    let (len, from) = socket.recv_from(&mut buf)?;
    Ok((Answer::parse(&String::from_utf8_lossy(&buf[..len])), from))
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn pods_reach_a_cluster_ip_over_tcp_and_udp_spread_over_local_and_remote_backends() {
    let mut cluster = cluster(Options::default());
    let backends = [("a", 8080), ("b", 8080), ("c", 8080)];
    cluster.apply(
        &[Frontend::tcp(CLUSTER_IP, 80)],
        &ServicePolicy::default(),
        &backends,
    );
    cluster.apply(
        &[Frontend::udp(CLUSTER_IP, 53)],
        &ServicePolicy::default(),
        &[("a", 5353), ("b", 5353), ("c", 5353)],
    );
    let client = cluster.pod("z");

    let mut per_backend: HashMap<String, u32> = HashMap::new();
    for i in 0..300 {
        let answer = client
            .ask(addr(CLUSTER_IP, 80))
            .unwrap_or_else(|err| panic!("connection {i} to the ClusterIP: {err}"));
        assert_eq!(
            answer.peer_ip(),
            client.addr,
            "the backend must see the client pod's own address (no SNAT for ClusterIP)"
        );
        assert_eq!(
            answer.port, 8080,
            "the service port maps to targetPort 8080"
        );
        *per_backend.entry(answer.name).or_default() += 1;
    }
    assert_eq!(
        per_backend.len(),
        3,
        "all three backends used: {per_backend:?}"
    );
    for (name, count) in &per_backend {
        assert!(
            (60..=141).contains(count),
            "backend {name} got {count} of 300 connections, outside 20%..47%: {per_backend:?}"
        );
    }

    // UDP: an unconnected socket sees replies from the ClusterIP itself.
    let mut seen = HashMap::new();
    for i in 0..30 {
        let socket = client.udp_socket();
        let (answer, from) = ask_udp(&socket, addr(CLUSTER_IP, 53))
            .unwrap_or_else(|err| panic!("UDP question {i} to the ClusterIP: {err}"));
        assert_eq!(from, SocketAddr::from(addr(CLUSTER_IP, 53)), "reply source");
        assert_eq!(
            answer.peer_ip(),
            client.addr,
            "UDP keeps the client address"
        );
        *seen.entry(answer.name).or_insert(0) += 1;
    }
    assert!(
        seen.contains_key("a") && (seen.contains_key("b") || seen.contains_key("c")),
        "UDP must reach the local and a remote backend: {seen:?}"
    );
}

/// A host-network endpoint (the node's own address): its node's stack
/// answers a local client straight into the client's veth, and a client
/// whose flow it translated at its uplink (a node port) out of that
/// uplink, so those replies are reverse-translated at egress; a remote
/// client's ClusterIP flow comes back over the uplink as any remote
/// backend's. The endpoint is never masqueraded to, as with kube-proxy.
#[test]
fn a_host_network_endpoint_serves_pods_on_its_own_node_and_on_the_other() {
    let mut cluster = cluster(Options::default());
    cluster.nodes[1].add_pod("y", 5);
    cluster.nodes[0].serve_host_network(8081, 5354);
    cluster.apply(
        &[Frontend::tcp(CLUSTER_IP, 80)],
        &ServicePolicy::default(),
        &[("node1", 8081)],
    );
    cluster.apply(
        &[Frontend::node_port_tcp(NODE_PORT)],
        &masquerading(),
        &[("node1", 8081)],
    );
    let node_port = addr(cluster.nodes[0].addr, NODE_PORT);
    for i in 0..5 {
        let answer = cluster.external.ask(node_port).unwrap_or_else(|err| {
            panic!("outside: connection {i} to a node port with a host-network endpoint: {err}")
        });
        assert_eq!(answer.name, "node1", "the host-network server answers");
        assert_eq!(
            answer.peer_ip(),
            cluster.external.addr,
            "not masqueraded to the node itself"
        );
        let pod = cluster.pod("y");
        let answer = pod
            .ask(node_port)
            .unwrap_or_else(|err| panic!("y: connection {i} to the other node's node port: {err}"));
        assert_eq!(answer.name, "node1", "the host-network server answers");
    }
    cluster.apply(
        &[Frontend::udp(CLUSTER_IP, 53)],
        &ServicePolicy::default(),
        &[("node1", 5354)],
    );
    for client in ["z", "y"] {
        let client = cluster.pod(client);
        for i in 0..5 {
            let answer = client.ask(addr(CLUSTER_IP, 80)).unwrap_or_else(|err| {
                panic!(
                    "{}: connection {i} to a host-network endpoint: {err}",
                    client.name
                )
            });
            assert_eq!(answer.name, "node1", "the host-network server answers");
            assert_eq!(answer.peer_ip(), client.addr, "no SNAT for a ClusterIP");
            let (answer, from) = ask_udp(&client.udp_socket(), addr(CLUSTER_IP, 53))
                .unwrap_or_else(|err| panic!("{}: UDP question {i}: {err}", client.name));
            assert_eq!(answer.name, "node1", "the host-network server answers");
            assert_eq!(
                from,
                SocketAddr::from(addr(CLUSTER_IP, 53)),
                "the reply comes from the ClusterIP"
            );
        }
    }
}

#[test]
fn service_ports_map_to_their_own_target_ports() {
    let mut cluster = cluster(Options::default());
    cluster.apply(
        &[Frontend::tcp(CLUSTER_IP, 80)],
        &ServicePolicy::default(),
        &[("b", 8080)],
    );
    cluster.apply(
        &[Frontend::tcp(CLUSTER_IP, 81)],
        &ServicePolicy::default(),
        &[("b", 9090)],
    );
    cluster.apply(
        &[Frontend::udp(CLUSTER_IP, 80)],
        &ServicePolicy::default(),
        &[("b", 5353)],
    );
    let client = cluster.pod("z");
    for (port, target) in [(80, 8080), (81, 9090)] {
        let answer = client
            .ask(addr(CLUSTER_IP, port))
            .unwrap_or_else(|err| panic!("TCP port {port}: {err}"));
        assert_eq!((answer.name.as_str(), answer.port), ("b", target));
    }
    let (answer, from) = ask_udp(&client.udp_socket(), addr(CLUSTER_IP, 80)).expect("UDP port 80");
    assert_eq!((answer.name.as_str(), answer.port), ("b", 5353));
    assert_eq!(from, SocketAddr::from(addr(CLUSTER_IP, 80)));
}

#[test]
fn a_process_on_the_node_reaches_a_cluster_ip() {
    let mut cluster = cluster(Options {
        host_sockets_on_node1: true,
        ..Options::default()
    });
    cluster.apply(
        &[Frontend::tcp(CLUSTER_IP, 80)],
        &ServicePolicy::default(),
        &[("a", 8080), ("b", 8080)],
    );
    cluster.apply(
        &[Frontend::udp(CLUSTER_IP, 53)],
        &ServicePolicy::default(),
        &[("a", 5353), ("b", 5353)],
    );
    cluster.apply(
        &[Frontend::tcp(CLUSTER_IP_2, 80)],
        &ServicePolicy::default(),
        &[],
    );
    let node = &cluster.nodes[0];
    let before = node.datapath().stats().expect("counters");

    let mut names = Vec::new();
    for i in 0..20 {
        let stream = node
            .ns
            .run(|| std::net::TcpStream::connect_timeout(&addr(CLUSTER_IP, 80).into(), TIMEOUT))
            .unwrap_or_else(|err| panic!("host connection {i}: {err}"));
        assert_eq!(
            stream.peer_addr().expect("peer"),
            SocketAddr::from(addr(CLUSTER_IP, 80)),
            "getpeername reports the service, not the backend"
        );
        names.push(read_answer(&stream, TIMEOUT).expect("answer").name);
    }
    assert!(
        names.iter().all(|name| name == "a" || name == "b"),
        "{names:?}"
    );

    let socket = node
        .ns
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .expect("host UDP socket");
    socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let (answer, from) = ask_udp(&socket, addr(CLUSTER_IP, 53)).expect("host UDP to the ClusterIP");
    assert!(answer.name == "a" || answer.name == "b");
    assert_eq!(
        from,
        SocketAddr::from(addr(CLUSTER_IP, 53)),
        "recvmsg reports the service"
    );

    let refused = node
        .ns
        .run(|| std::net::TcpStream::connect_timeout(&addr(CLUSTER_IP_2, 80).into(), TIMEOUT));
    let err = refused.expect_err("a service without endpoints must refuse host connections");
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "refused at once, as kube-proxy's REJECT does: {err}"
    );

    let moved = node.datapath().stats().expect("counters").since(&before);
    let packets = |counter| {
        moved
            .iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |(_, value)| value.packets)
    };
    assert_eq!(
        packets(Counter::SockTranslated),
        21,
        "20 connects and 1 sendmsg: {moved:?}"
    );
    assert!(packets(Counter::SockRevTranslated) >= 1, "{moved:?}");
    assert_eq!(packets(Counter::SockRejectNoBackend), 1, "{moved:?}");
    // The sockets were translated once, at connect: no packet was.
    assert_eq!(packets(Counter::LbNewFlow), 0, "{moved:?}");
}

/// Asks `to` from outside until both backends answered (or a bounded
/// number of tries ran out); returns the answers.
fn ask_from_outside(cluster: &Cluster, to: SocketAddrV4, tries: usize) -> Vec<Answer> {
    (0..tries)
        .map(|i| {
            cluster
                .external
                .ask(to)
                .unwrap_or_else(|err| panic!("external connection {i} to {to}: {err}"))
        })
        .collect()
}

#[test]
fn node_port_with_traffic_policy_cluster_masquerades_and_works_from_either_node() {
    let mut cluster = cluster(Options::default());
    cluster.apply(
        &[Frontend::node_port_tcp(NODE_PORT)],
        &masquerading(),
        &[("a", 8080), ("b", 8080)],
    );
    for node in 0..2 {
        let node_addr = cluster.nodes[node].addr;
        let answers = ask_from_outside(&cluster, addr(node_addr, NODE_PORT), 30);
        for answer in &answers {
            assert_eq!(
                answer.peer_ip(),
                node_addr,
                "the backend sees the node's address (masquerade)"
            );
        }
        for name in ["a", "b"] {
            assert!(
                answers.iter().any(|answer| answer.name == name),
                "via node{} backend {name} never answered: {answers:?}",
                node + 1
            );
        }
    }
}

#[test]
fn node_port_with_traffic_policy_local_keeps_the_source_and_uses_only_local_backends() {
    let mut cluster = cluster(Options::default());
    let local = ServicePolicy {
        masquerade: Masquerade::Never,
        local_only: true,
        drop_when_empty: true,
        ..ServicePolicy::default()
    };
    // Only a (node1) backs the service.
    cluster.apply(
        &[Frontend::node_port_tcp(NODE_PORT)],
        &local,
        &[("a", 8080)],
    );
    let node1 = cluster.nodes[0].addr;
    for answer in ask_from_outside(&cluster, addr(node1, NODE_PORT), 10) {
        assert_eq!(answer.name, "a");
        assert_eq!(
            answer.peer_ip(),
            cluster.external.addr,
            "the client's own address"
        );
    }
    let node2 = cluster.nodes[1].addr;
    let err = cluster
        .external
        .ns
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &addr(node2, NODE_PORT).into(),
                Duration::from_secs(1),
            )
        })
        .expect_err("node2 has no local endpoint and must not forward");
    assert_eq!(err.kind(), ErrorKind::TimedOut, "dropped silently: {err}");
    let dropped = cluster.nodes[1]
        .datapath()
        .stats()
        .expect("counters")
        .get(Counter::DropNoBackend);
    assert!(dropped.packets >= 1, "node2 counts the drop");
}

#[test]
fn external_ips_and_load_balancer_ips_behave_like_node_ports() {
    let mut cluster = cluster(Options::default());
    cluster.apply(
        &[Frontend::tcp(EXTERNAL_IP, 80), Frontend::tcp(LB_IP, 80)],
        &masquerading(),
        &[("a", 8080), ("b", 8080)],
    );
    let node1 = cluster.nodes[0].addr;
    for ip in [EXTERNAL_IP, LB_IP] {
        let answers = ask_from_outside(&cluster, addr(ip, 80), 30);
        for name in ["a", "b"] {
            assert!(
                answers.iter().any(|a| a.name == name),
                "{ip}: {name} never answered"
            );
        }
        assert!(
            answers.iter().all(|a| a.peer_ip() == node1),
            "{ip}: masqueraded to node1"
        );
    }
    // With traffic policy Local the client's address is kept.
    let local = ServicePolicy {
        masquerade: Masquerade::Never,
        local_only: true,
        drop_when_empty: true,
        ..ServicePolicy::default()
    };
    cluster.apply(
        &[Frontend::tcp(LB_IP, 80)],
        &local,
        &[("a", 8080), ("b", 8080)],
    );
    for answer in ask_from_outside(&cluster, addr(LB_IP, 80), 10) {
        assert_eq!(answer.name, "a", "only node1's own backend");
        assert_eq!(answer.peer_ip(), cluster.external.addr);
    }
}

/// The backend Maglev gives a flow, from the shared hash and the table
/// the map writer built.
fn predict(maps: &Maps, frontend: Frontend, src: SocketAddrV4, dst: SocketAddrV4) -> BackendId {
    let service = maps.service(&frontend).expect("installed");
    let ((saddr, sport), (daddr, dport)) = (wire::split(src), wire::split(dst));
    let hash = flow_hash(saddr, daddr, sport, dport, proto::TCP);
    maps.maglev_slot(service.maglev_offset + hash % service.maglev_size)
        .expect("slot")
}

/// A source port whose Maglev pick is not `backend`.
fn port_avoiding(
    maps: &Maps,
    frontend: Frontend,
    client: &Pod,
    backend: BackendId,
    from: u16,
) -> u16 {
    let dst = addr(CLUSTER_IP, 80);
    (from..from + 1000)
        .find(|&port| predict(maps, frontend, addr(client.addr, port), dst) != backend)
        .expect("some port hashes elsewhere")
}

#[test]
fn session_affinity_pins_a_client_until_its_timeout() {
    let mut cluster = cluster(Options::default());
    let affinity = ServicePolicy {
        affinity_timeout_secs: Some(1),
        ..ServicePolicy::default()
    };
    let frontend = Frontend::tcp(CLUSTER_IP, 80);
    let ids = cluster.apply(
        &[frontend],
        &affinity,
        &[("a", 8080), ("b", 8080), ("c", 8080)],
    );
    let names = ["a", "b", "c"];
    let client = cluster.pod("z");
    let first = client
        .ask(addr(CLUSTER_IP, 80))
        .expect("first connection")
        .name;
    for i in 0..50 {
        let answer = client.ask(addr(CLUSTER_IP, 80)).expect("connection");
        assert_eq!(answer.name, first, "connection {i} left the affine backend");
    }
    let affine_id = ids[names.iter().position(|n| *n == first).expect("known")];

    // After the timeout the next connection follows Maglev again: pick a
    // source port that Maglev sends elsewhere.
    thread::sleep(Duration::from_millis(1500));
    let maps = cluster.nodes[0].datapath().maps();
    let port = port_avoiding(maps, frontend, client, affine_id, 45_000);
    let expected = predict(
        maps,
        frontend,
        addr(client.addr, port),
        addr(CLUSTER_IP, 80),
    );
    let answer = read_answer(
        &client
            .connect_from(port, addr(CLUSTER_IP, 80))
            .expect("connect"),
        TIMEOUT,
    )
    .expect("answer");
    let expected_name = names[ids.iter().position(|id| *id == expected).expect("known")];
    assert_eq!(
        answer.name, expected_name,
        "after the timeout a new choice is made"
    );
}

#[test]
fn established_connections_survive_backend_changes_and_removed_backends_get_nothing_new() {
    let mut cluster = cluster(Options::default());
    let frontend = Frontend::tcp(CLUSTER_IP, 80);
    let ids = cluster.apply(
        &[frontend],
        &ServicePolicy::default(),
        &[("a", 8080), ("b", 8080)],
    );
    let mut stream = cluster
        .pod("z")
        .connect(addr(CLUSTER_IP, 80))
        .expect("connect");
    let kept = read_answer(&stream, TIMEOUT).expect("answer").name;
    let removed = if kept == "a" { "b" } else { "a" };
    let removed_id = ids[usize::from(removed == "b")];

    let echo = |stream: &mut std::net::TcpStream, round: &str| {
        stream.write_all(b"ping\n").expect("write");
        let mut buf = [0u8; 5];
        stream
            .read_exact(&mut buf)
            .unwrap_or_else(|err| panic!("{round}: the established connection broke: {err}"));
        assert_eq!(&buf, b"ping\n");
    };
    echo(&mut stream, "before changes");
    cluster.apply(
        &[frontend],
        &ServicePolicy::default(),
        &[("a", 8080), ("b", 8080), ("c", 8080)],
    );
    echo(&mut stream, "after adding c");
    cluster.apply(
        &[frontend],
        &ServicePolicy::default(),
        &[(kept.as_str(), 8080), ("c", 8080)],
    );
    cluster.remove_backend(removed_id);
    echo(&mut stream, "after removing the other backend");

    let mut seen = HashMap::new();
    for i in 0..60 {
        let answer = cluster
            .pod("z")
            .ask(addr(CLUSTER_IP, 80))
            .unwrap_or_else(|err| panic!("new connection {i}: {err}"));
        assert_ne!(
            answer.name, removed,
            "a new connection reached the removed backend"
        );
        *seen.entry(answer.name).or_insert(0) += 1;
    }
    assert!(
        seen.contains_key("c"),
        "the added backend gets new connections: {seen:?}"
    );
    echo(&mut stream, "at the end");
}

#[test]
fn a_service_without_endpoints_refuses_at_once() {
    let mut cluster = cluster(Options::default());
    cluster.apply(
        &[Frontend::tcp(CLUSTER_IP, 80), Frontend::udp(CLUSTER_IP, 53)],
        &ServicePolicy::default(),
        &[],
    );
    cluster.apply(&[Frontend::node_port_tcp(NODE_PORT)], &masquerading(), &[]);
    let client = cluster.pod("z");
    let err = client
        .connect(addr(CLUSTER_IP, 80))
        .expect_err("no endpoints");
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "TCP refused, not hung: {err}"
    );

    let socket = client.udp_socket();
    socket.connect(addr(CLUSTER_IP, 53)).expect("UDP connect");
    socket.send(b"?").expect("send");
    let mut buf = [0u8; 16];
    let err = socket.recv(&mut buf).expect_err("no endpoints");
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "UDP gets port unreachable: {err}"
    );

    let node1 = cluster.nodes[0].addr;
    let err = cluster
        .external
        .connect(addr(node1, NODE_PORT))
        .expect_err("no endpoints");
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "node port refused: {err}"
    );
}

#[test]
fn a_pod_reaching_itself_through_its_service_gets_a_working_connection() {
    let mut cluster = cluster(Options::default());
    cluster.apply(
        &[Frontend::tcp(CLUSTER_IP, 80)],
        &ServicePolicy::default(),
        &[("a", 8080)],
    );
    cluster.apply(
        &[Frontend::udp(CLUSTER_IP, 53)],
        &ServicePolicy::default(),
        &[("a", 5353)],
    );
    let pod = cluster.pod("a");
    let node1 = cluster.nodes[0].addr;
    let mut stream = pod.connect(addr(CLUSTER_IP, 80)).expect("hairpin connect");
    let answer = read_answer(&stream, TIMEOUT).expect("answer");
    assert_eq!(answer.name, "a");
    assert_eq!(
        answer.peer_ip(),
        node1,
        "hairpin traffic comes from the node"
    );
    stream.write_all(b"ping\n").expect("write");
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).expect("echo over the hairpin");
    let (answer, from) = ask_udp(&pod.udp_socket(), addr(CLUSTER_IP, 53)).expect("UDP hairpin");
    assert_eq!(answer.name, "a");
    assert_eq!(from, SocketAddr::from(addr(CLUSTER_IP, 53)));
}

#[test]
fn one_backend_behind_two_services_answers_each_client_from_what_it_used() {
    let mut cluster = cluster(Options::default());
    cluster.apply(
        &[
            Frontend::udp(CLUSTER_IP, 53),
            Frontend::udp(CLUSTER_IP_2, 53),
        ],
        &ServicePolicy::default(),
        &[("b", 5353)],
    );
    cluster.apply(
        &[
            Frontend::tcp(CLUSTER_IP, 80),
            Frontend::node_port_tcp(NODE_PORT),
        ],
        &masquerading(),
        &[("b", 8080)],
    );
    let client = cluster.pod("z");
    // One socket, one source port, two services, one backend: the reply
    // tuples would be identical without NAT of the second flow.
    let socket = client.udp_socket();
    for round in 0..3 {
        for service in [CLUSTER_IP, CLUSTER_IP_2] {
            let (answer, from) = ask_udp(&socket, addr(service, 53))
                .unwrap_or_else(|err| panic!("round {round}, {service}: {err}"));
            assert_eq!(answer.name, "b");
            assert_eq!(answer.peer_ip(), client.addr, "the backend sees the client");
            assert_eq!(
                from,
                SocketAddr::from(addr(service, 53)),
                "round {round}: reply source"
            );
        }
    }
    // And the same backend by ClusterIP from a pod and by node port from
    // outside at the same time.
    let inside = client.connect(addr(CLUSTER_IP, 80)).expect("ClusterIP");
    let node1 = cluster.nodes[0].addr;
    let outside = cluster
        .external
        .connect(addr(node1, NODE_PORT))
        .expect("node port");
    assert_eq!(read_answer(&inside, TIMEOUT).expect("inside").name, "b");
    assert_eq!(read_answer(&outside, TIMEOUT).expect("outside").name, "b");
}

#[test]
fn an_icmp_error_from_the_backend_reaches_the_client_socket_as_from_the_service() {
    let mut cluster = cluster(Options::default());
    // `b` (node2) has no UDP listener on 6000: its kernel answers port
    // unreachable, quoting the translated datagram.
    cluster.apply(
        &[Frontend::udp(CLUSTER_IP, 60)],
        &ServicePolicy::default(),
        &[("b", 6000)],
    );
    let socket = cluster.pod("z").udp_socket();
    socket
        .connect(addr(CLUSTER_IP, 60))
        .expect("connect the UDP socket to the ClusterIP");
    socket.send(b"?").expect("send");
    let mut buf = [0u8; 16];
    let err = socket
        .recv(&mut buf)
        .expect_err("nothing listens behind the service");
    // Without the quote translated back, the kernel would not match the
    // error to this socket, and the read would time out instead.
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "the port unreachable reaches the socket connected to the service: {err}"
    );
    // The client's node translated the flow, so it holds the entries and
    // translates the error on its uplink.
    let stats = cluster.nodes[0].datapath().stats().expect("counters");
    assert!(
        stats.get(Counter::LbIcmpError).packets >= 1,
        "node1 translated the error back"
    );
}

#[test]
fn a_fragmented_udp_datagram_reaches_its_backend_through_a_cluster_ip() {
    let mut cluster = cluster(Options::default());
    cluster.apply(
        &[Frontend::udp(CLUSTER_IP, 53)],
        &ServicePolicy::default(),
        &[("b", 5353)],
    );
    let socket = cluster.pod("z").udp_socket();
    // 3,000 bytes: the pod's 1,500-byte MTU splits it into three
    // fragments, and only the first carries the ports.
    socket
        .send_to(&[b'?'; 3000], addr(CLUSTER_IP, 53))
        .expect("send the large datagram");
    let mut buf = [0u8; 256];
    let (len, from) = socket
        .recv_from(&mut buf)
        .expect("the backend reassembles the datagram and answers");
    let answer = Answer::parse(&String::from_utf8_lossy(&buf[..len]));
    assert_eq!(answer.name, "b");
    assert_eq!(
        from,
        SocketAddr::V4(addr(CLUSTER_IP, 53)),
        "the reply comes from the service"
    );
    let stats = cluster.nodes[0].datapath().stats().expect("counters");
    assert!(
        stats.get(Counter::LbFragment).packets >= 2,
        "node1 translated the later fragments"
    );
}
