//! The lifecycle of connection-tracking entries with real traffic: entries
//! share their flow's lifetime and never translate a packet that is not
//! their flow's.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    thread,
};

use svc_agent::datapath::{Frontend, ServicePolicy};
use tests::{
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
