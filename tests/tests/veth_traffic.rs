//! The tc program attached to a real veth inside a network namespace counts
//! real traffic sent from another namespace.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use svc_agent::datapath::{Datapath, LoadOptions};
use svc_common::stats::{Counter, CounterValue};
use tests::{netns::VethPair, require_root};

const UDP_DATAGRAMS: u64 = 10;
const UDP_PAYLOAD: &[u8] = b"ping from left";
/// Ethernet + IPv4 + UDP headers.
const UDP_OVERHEAD: u64 = 14 + 20 + 8;
const TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn attached_to_a_veth_it_counts_real_packets_and_passes_them() {
    require_root();
    let pair = VethPair::new(231);
    let mut datapath = Datapath::load(&LoadOptions::default()).expect("the datapath must load");
    pair.right.run(|| {
        datapath
            .attach_pod(pair.iface)
            .expect("attaching at tcx ingress must work");
    });
    let before = datapath.stats().expect("counters must be readable");

    // Servers on the right, where the program sees packets arrive.
    let udp_server = pair.right.run(|| {
        UdpSocket::bind(SocketAddrV4::new(pair.right_addr, 9999)).expect("bind UDP server")
    });
    udp_server
        .set_read_timeout(Some(TIMEOUT))
        .expect("set UDP timeout");
    let tcp_server = pair.right.run(|| {
        TcpListener::bind(SocketAddrV4::new(pair.right_addr, 8080)).expect("bind TCP server")
    });

    // Clients on the left.
    let udp_client = pair
        .left
        .run(|| UdpSocket::bind(SocketAddrV4::new(pair.left_addr, 0)).expect("bind UDP client"));
    for _ in 0..UDP_DATAGRAMS {
        udp_client
            .send_to(UDP_PAYLOAD, SocketAddrV4::new(pair.right_addr, 9999))
            .expect("send UDP");
    }
    let mut buf = [0u8; 64];
    for i in 0..UDP_DATAGRAMS {
        let (len, _) = udp_server
            .recv_from(&mut buf)
            .unwrap_or_else(|err| panic!("datagram {i} did not pass the program: {err}"));
        assert_eq!(&buf[..len], UDP_PAYLOAD);
    }

    let mut tcp_client = pair.left.run(|| {
        TcpStream::connect_timeout(&SocketAddrV4::new(pair.right_addr, 8080).into(), TIMEOUT)
            .expect("TCP connect through the program")
    });
    let (mut accepted, _) = tcp_server.accept().expect("accept");
    tcp_client.write_all(b"hello").expect("TCP write");
    accepted.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut got = [0u8; 5];
    accepted.read_exact(&mut got).expect("TCP read");
    assert_eq!(&got, b"hello");

    let moved = datapath
        .stats()
        .expect("counters must be readable")
        .since(&before);
    let value = |counter| {
        moved
            .iter()
            .find(|(c, _)| *c == counter)
            .map_or(CounterValue::default(), |(_, v)| *v)
    };
    assert_eq!(
        value(Counter::Ipv4Udp),
        CounterValue {
            packets: UDP_DATAGRAMS,
            bytes: UDP_DATAGRAMS * (UDP_OVERHEAD + UDP_PAYLOAD.len() as u64),
        },
        "every UDP datagram counted once at the right side's ingress; all moved: {moved:?}"
    );
    // SYN, the handshake's ACK and the data segment at least.
    assert!(
        value(Counter::Ipv4Tcp).packets >= 3,
        "TCP segments must be counted; all moved: {moved:?}"
    );
    for (counter, _) in &moved {
        assert!(
            !counter.name().starts_with("malformed"),
            "real traffic counted as {counter:?}"
        );
    }
}
