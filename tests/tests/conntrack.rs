//! The lifecycle of connection-tracking entries with real traffic: entries
//! share their flow's lifetime and never translate a packet that is not
//! their flow's.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    thread,
};

use svc_agent::datapath::{Frontend, ServicePolicy};
use tests::{
    agents::Agents,
    servers::read_answer,
    topology::{Cluster, Options, QUICK_TIMEOUT, TIMEOUT},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A connection from `z`'s `port` to `to`, answered, echoed once and
/// closed by the client; returns who answered and the source they saw.
fn exchange(cluster: &Cluster, port: u16, to: SocketAddrV4, what: &str) -> (String, SocketAddr) {
    let mut stream = cluster
        .pod("z")
        .connect_from(port, to)
        .unwrap_or_else(|err| panic!("{what}: connect: {err}"));
    let answer = read_answer(&stream, TIMEOUT).unwrap_or_else(|err| panic!("{what}: {err}"));
    stream.write_all(b"ping\n").expect("write");
    let mut buf = [0u8; 5];
    stream
        .read_exact(&mut buf)
        .unwrap_or_else(|err| panic!("{what}: echo: {err}"));
    (answer.name, answer.peer)
}

#[test]
fn a_direct_connection_from_the_port_a_service_connection_used_is_left_alone() {
    let mut cluster = Cluster::new(Options {
        quick_timeouts: true,
        ..Options::default()
    });
    cluster.nodes[0].add_pod("z", 5);
    cluster.nodes[0].add_pod("a", 2).serve_tcp(8080);
    cluster.nodes[1].add_pod("b", 2).serve_tcp(8080);
    for (backend, port) in [("a", 40_100), ("b", 40_200)] {
        cluster.apply(
            &[Frontend::tcp(CLUSTER_IP, 80)],
            &ServicePolicy::default(),
            &[(backend, 8080)],
        );
        let backend_addr = addr(cluster.pod(backend).addr, 8080);
        let z = SocketAddr::V4(addr(cluster.pod("z").addr, port));
        let (name, _) = exchange(&cluster, port, addr(CLUSTER_IP, 80), "through the service");
        assert_eq!(name, backend);
        // The service connection is closed (its entries are closing); the
        // pod now reaches the same backend directly from the same port,
        // as a StatefulSet peer or a scraper does. Its SYN-ACK must not be
        // rewritten to come from the service.
        let (name, peer) = exchange(&cluster, port, backend_addr, "direct, right after");
        assert_eq!((name.as_str(), peer), (backend, z), "{backend}: direct");
        // And once the service flow has timed out too.
        thread::sleep(QUICK_TIMEOUT + QUICK_TIMEOUT / 2);
        let (name, peer) = exchange(&cluster, port + 1, backend_addr, "direct, other port");
        assert_eq!((name.as_str(), peer.ip()), (backend, z.ip()));
        let (name, peer) = exchange(&cluster, port, backend_addr, "direct, after the timeout");
        assert_eq!(
            (name.as_str(), peer),
            (backend, z),
            "{backend}: direct, later"
        );
    }
}

/// `name`: a ClusterIP service on `ip` port 80 (session affinity if
/// `sticky`), and its slice with `pods` (from a, on node1, and b, on
/// node2).
fn service(name: &str, ip: Ipv4Addr, sticky: bool, pods: &[&str]) -> String {
    let affinity = if sticky {
        "\n  sessionAffinity: ClientIP"
    } else {
        ""
    };
    let mut text = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  clusterIP: {ip}{affinity}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
"
    );
    for pod in pods {
        let (addr, node) = match *pod {
            "a" => ("10.244.1.2", "node1"),
            _ => ("10.244.2.2", "node2"),
        };
        let _ = writeln!(text, "  - {{addresses: [{addr}], nodeName: {node}}}");
    }
    text
}

#[test]
fn affinity_ends_when_its_backend_leaves_the_service_though_another_keeps_it() {
    const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
    const PLAIN: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
    let mut cluster = Cluster::new(Options::default());
    cluster.nodes[0].add_pod("z", 5);
    cluster.nodes[0].add_pod("a", 2).serve_tcp(8080);
    cluster.nodes[1].add_pod("b", 2).serve_tcp(8080);
    let mut agents = Agents::new(&cluster);
    agents.write("plain.yaml", &service("plain", PLAIN, false, &["a", "b"]));
    agents.write("sticky.yaml", &service("sticky", STICKY, true, &["a", "b"]));
    agents.sync(&mut cluster);
    let ask = |cluster: &Cluster, to: Ipv4Addr| {
        cluster
            .pod("z")
            .ask(addr(to, 80))
            .unwrap_or_else(|err| panic!("{to}: {err}"))
            .name
    };
    let pinned = ask(&cluster, STICKY);
    for _ in 0..5 {
        assert_eq!(ask(&cluster, STICKY), pinned, "affinity holds");
    }
    // The pinned pod leaves sticky but stays in plain (two services
    // selecting the same pods).
    let other = if pinned == "a" { "b" } else { "a" };
    agents.write("sticky.yaml", &service("sticky", STICKY, true, &[other]));
    agents.sync(&mut cluster);
    for i in 0..10 {
        assert_eq!(
            ask(&cluster, STICKY),
            other,
            "connection {i}: affinity to a pod no longer in sticky's table is not honoured"
        );
    }
    let seen: std::collections::BTreeSet<String> = (0..12).map(|_| ask(&cluster, PLAIN)).collect();
    assert!(
        seen.contains(&pinned),
        "plain still sends to {pinned}: {seen:?}"
    );
}
