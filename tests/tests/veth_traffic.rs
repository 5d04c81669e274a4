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

/// A veth pair in `10.<subnet>.0.0/24` with the pod program attached at
/// the right side's ingress.
fn attached_pair(subnet: u8) -> (VethPair, Datapath) {
    require_root();
    let pair = VethPair::new(subnet);
    let mut datapath = Datapath::load(&LoadOptions::default()).expect("the datapath must load");
    pair.right.run(|| {
        datapath
            .attach_pod(pair.iface)
            .expect("attaching at tcx ingress must work");
    });
    (pair, datapath)
}

#[test]
fn attached_to_a_veth_it_counts_real_packets_and_passes_them() {
    let (pair, datapath) = attached_pair(231);
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

/// Sends `frame` (Ethernet header included) out of `iface` of the calling
/// thread's namespace through a raw packet socket.
fn send_raw(iface: &str, frame: &[u8]) -> std::io::Result<()> {
    let name = std::ffi::CString::new(iface).expect("a name without NUL");
    // SAFETY: a NUL-terminated name that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let protocol = u16::try_from(libc::ETH_P_ALL).expect("fits").to_be();
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, closed when `_owned` drops.
    let _owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = u16::try_from(libc::AF_PACKET).expect("fits");
    to.sll_protocol = protocol;
    to.sll_ifindex = i32::try_from(index).expect("fits");
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: valid buffer and address of the right length.
    let sent = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::from_ref(&to).cast(),
            u32::try_from(size_of::<libc::sockaddr_ll>()).expect("fits"),
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A frame that says IPv4 but ends inside the IPv4 header cannot go
/// through `BPF_PROG_TEST_RUN` (the kernel refuses it, see
/// `datapath_fixtures`), but a device delivers it: the program counts it
/// and lets it be.
#[test]
fn a_frame_ending_inside_its_ipv4_header_is_counted_on_a_real_hook() {
    let (pair, datapath) = attached_pair(232);
    let before = datapath.stats().expect("counters must be readable");
    // Broadcast, EtherType IPv4, then ten bytes of an IPv4 header.
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    frame.extend_from_slice(&[0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 17]);
    pair.left
        .run(|| send_raw(pair.iface, &frame))
        .expect("sending a raw frame");
    let truncated = |moved: &[(Counter, CounterValue)]| {
        moved
            .iter()
            .find(|(counter, _)| *counter == Counter::MalformedIpv4Truncated)
            .map(|(_, value)| *value)
    };
    let mut moved = Vec::new();
    for _ in 0..50 {
        moved = datapath
            .stats()
            .expect("counters must be readable")
            .since(&before);
        if truncated(&moved).is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        truncated(&moved),
        Some(CounterValue {
            packets: 1,
            bytes: frame.len() as u64,
        }),
        "the short frame is counted once, as malformed_ipv4_truncated: {moved:?}"
    );
    // IPv6 neighbour discovery of the new link may pass too (pass_non_ipv4);
    // nothing may count the frame as IPv4.
    for (counter, _) in &moved {
        assert!(
            matches!(
                counter,
                Counter::MalformedIpv4Truncated | Counter::PassNonIpv4
            ),
            "only the truncation is counted: {moved:?}"
        );
    }
}

/// The programs parse Ethernet frames: a device without an Ethernet
/// header (tun, `WireGuard`, IP-in-IP) is refused, not misread.
#[test]
fn devices_without_an_ethernet_header_are_refused() {
    require_root();
    let ns = tests::netns::NetNs::new("tun");
    ns.ip(&["tuntap", "add", "dev", "svctun0", "mode", "tun"]);
    ns.ip(&["link", "set", "svctun0", "up"]);
    let mut datapath = Datapath::load(&LoadOptions::default()).expect("the datapath must load");
    let err = ns
        .run(|| datapath.attach_uplink("svctun0"))
        .expect_err("a tun device has no Ethernet header");
    assert!(
        matches!(&err, svc_agent::datapath::Error::NotEthernet { iface, .. } if iface == "svctun0"),
        "refused as not Ethernet: {err}"
    );
}
