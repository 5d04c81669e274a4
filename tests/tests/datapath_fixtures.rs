//! The tc programs run through BPF_PROG_TEST_RUN on tables of crafted
//! packets, with services installed through the agent's own map writer:
//! verdict, output bytes (checksums recomputed here) and counters per
//! fixture, in the manner of Katran's and Cilium's BPF tests.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun as _, TestRunOptions};
use svc_agent::datapath::{
    BackendSpec, Capacities, CidrSetKind, Datapath, FROM_POD_PROGRAM, FROM_UPLINK_PROGRAM,
    Frontend, Ipv4Cidr, LoadOptions, Maps, Masquerade, ServicePolicy,
};
use svc_common::{
    config::DatapathConfig,
    ct::{CtEntry, CtKey},
    hash::flow_hash,
    lb::BackendId,
    stats::{Counter, CounterValue},
    wire::WirePort,
};
use tests::{
    backend,
    packet::{self, ETH_HLEN, TcpFlags},
    require_root,
};

const TC_ACT_OK: u32 = 0;
const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 1, 0, 5), 40_000);
/// Not a service: these packets must pass untouched.
/// A pod on another node: no service address.
const SERVER: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 2, 0, 99), 80);

struct Fixture {
    name: &'static str,
    packet: Vec<u8>,
    counter: Counter,
}

fn fixture(name: &'static str, packet: Vec<u8>, counter: Counter) -> Fixture {
    Fixture {
        name,
        packet,
        counter,
    }
}

fn with_protocol(mut frame: Vec<u8>, protocol: u8) -> Vec<u8> {
    frame[ETH_HLEN + 9] = protocol;
    packet::fix_ipv4_checksum(&mut frame);
    frame
}

fn truncated(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    frame.truncate(len);
    frame
}

#[expect(clippy::too_many_lines, reason = "one table of fixtures")]
fn pass_fixtures() -> Vec<Fixture> {
    let udp = packet::udp4(CLIENT, SERVER, b"hello");
    let mut udp_no_checksum = udp.clone();
    let udp_check = ETH_HLEN + 20 + 6;
    udp_no_checksum[udp_check..udp_check + 2].fill(0);
    let mut later_fragment = udp.clone();
    packet::set_fragment_offset(&mut later_fragment, 185);
    let mut first_fragment = udp.clone();
    // More-fragments flag, offset 0: the first fragment still has its header.
    first_fragment[ETH_HLEN + 6] |= 0x20;
    packet::fix_ipv4_checksum(&mut first_fragment);
    let mut version6 = udp.clone();
    packet::set_version_ihl(&mut version6, 0x65);
    let mut ihl4 = udp.clone();
    packet::set_version_ihl(&mut ihl4, 0x44);
    let mut ihl_past_end = truncated(udp.clone(), ETH_HLEN + 20 + 8);
    packet::set_version_ihl(&mut ihl_past_end, 0x4f);

    vec![
        fixture(
            "TCP SYN",
            packet::tcp4_syn(CLIENT, SERVER),
            Counter::Ipv4Tcp,
        ),
        fixture("UDP", udp.clone(), Counter::Ipv4Udp),
        fixture("UDP with zero checksum", udp_no_checksum, Counter::Ipv4Udp),
        fixture(
            "UDP behind 8 bytes of IP options",
            packet::udp4_with_ip_options(CLIENT, SERVER, &[1, 1, 1, 0, 0x94, 4, 0, 0], b"hi"),
            Counter::Ipv4Udp,
        ),
        fixture(
            "UDP behind 40 bytes of IP options (IHL 15)",
            packet::udp4_with_ip_options(CLIENT, SERVER, &[1; 40], b"hi"),
            Counter::Ipv4Udp,
        ),
        fixture(
            "ICMP echo request",
            packet::icmp4_echo(CLIENT.0, SERVER.0),
            Counter::Ipv4Icmp,
        ),
        fixture(
            "IPv4 GRE",
            with_protocol(udp.clone(), 47),
            Counter::Ipv4Other,
        ),
        fixture("first fragment", first_fragment, Counter::Ipv4Udp),
        fixture("later fragment", later_fragment, Counter::Ipv4Fragment),
        fixture(
            "later fragment to a service port",
            {
                let mut frame = packet::udp4(CLIENT, (CLUSTER, 53), b"tail");
                packet::set_fragment_offset(&mut frame, 185);
                frame
            },
            Counter::Ipv4Fragment,
        ),
        fixture(
            "ICMP echo to the ClusterIP of a service another proxy serves",
            packet::icmp4_echo(CLIENT.0, FOREIGN_SVC),
            Counter::Ipv4Icmp,
        ),
        fixture(
            "ICMP error quoting a flow that was not translated",
            packet::icmp4_frag_needed(SERVER.0, CLIENT.0, &packet::tcp4_syn(CLIENT, SERVER)),
            Counter::Ipv4Icmp,
        ),
        fixture(
            "ICMP error whose quote is cut before the ports",
            truncated(
                packet::icmp4_frag_needed(SERVER.0, CLIENT.0, &packet::tcp4_syn(CLIENT, SERVER)),
                ETH_HLEN + 20 + 8 + 20 + 2,
            ),
            Counter::Ipv4Icmp,
        ),
        fixture(
            "UDP to the ClusterIP of a service another proxy serves",
            packet::udp4(CLIENT, (FOREIGN_SVC, 53), b"?"),
            Counter::Ipv4Udp,
        ),
        fixture(
            "TCP just outside the service CIDR",
            packet::tcp4_syn(CLIENT, (Ipv4Addr::new(10, 97, 0, 1), 80)),
            Counter::Ipv4Tcp,
        ),
        fixture(
            "TCP to a node port on an address that is not the node's",
            packet::tcp4_syn(EXTERNAL, (Ipv4Addr::new(192, 168, 1, 99), 30080)),
            Counter::Ipv4Tcp,
        ),
        fixture(
            "ARP request",
            packet::arp_request(CLIENT.0, SERVER.0),
            Counter::PassNonIpv4,
        ),
        fixture("IPv6 UDP", packet::udp6(), Counter::PassNonIpv4),
        fixture(
            "version 6 under EtherType IPv4",
            version6,
            Counter::MalformedIpv4Header,
        ),
        fixture("IHL below 5", ihl4, Counter::MalformedIpv4Header),
        fixture(
            "IHL past the end of the packet",
            ihl_past_end,
            Counter::MalformedIpv4Header,
        ),
        fixture(
            "TCP header cut short",
            truncated(packet::tcp4_syn(CLIENT, SERVER), ETH_HLEN + 20 + 10),
            Counter::MalformedL4Truncated,
        ),
        fixture(
            "UDP header cut short",
            truncated(udp, ETH_HLEN + 20 + 4),
            Counter::MalformedL4Truncated,
        ),
    ]
}

// ---------------------------------------------------------------------------
// The cluster the translation fixtures run against.

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const EXTERNAL: (Ipv4Addr, u16) = (Ipv4Addr::new(203, 0, 113, 5), 5555);
const CLUSTER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_SVC: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const SVC_C: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const SVC_D: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
const AFFINITY_SVC: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const LB_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// A LoadBalancer IP open only to 203.0.113.0/28 (`EXTERNAL` is inside).
const LB_IP_RANGED: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 101);
const OUTSIDE_RANGES: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 18, 0, 9), 6000);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const NODE_PORT: u16 = 30_080;
const NODE_PORT_LOCAL: u16 = 30_081;
/// The service CIDR.
const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);
/// In the service CIDR, held by no service.
const UNALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);
/// The ClusterIP of a service another proxy serves.
const FOREIGN_SVC: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const NAT_PORTS: std::ops::RangeInclusive<u16> = 61_000..=65_535;

/// Backends by id: 1 and 2 on this node, 3 and 4 on another.
const BACKENDS: [(BackendId, Ipv4Addr, u16, bool); 4] = [
    (backend(1), Ipv4Addr::new(10, 1, 0, 7), 8080, true),
    (backend(2), Ipv4Addr::new(10, 1, 0, 8), 8080, true),
    (backend(3), Ipv4Addr::new(10, 2, 0, 9), 8080, false),
    (backend(4), Ipv4Addr::new(10, 2, 0, 4), 9090, false),
];

fn backend_addr(id: BackendId) -> (Ipv4Addr, u16) {
    let (_, addr, port, _) = BACKENDS
        .iter()
        .find(|(bid, ..)| *bid == id)
        .unwrap_or_else(|| panic!("no backend {id}"));
    (*addr, *port)
}

fn config() -> DatapathConfig {
    DatapathConfig {
        masq_addr: NODE.into(),
        ..DatapathConfig::DEFAULT
    }
}

fn load(config: DatapathConfig) -> Datapath {
    let mut datapath = Datapath::load(&LoadOptions {
        config,
        capacities: Capacities {
            ct_entries: 4096,
            services: 64,
            backends: 64,
            maglev_slots: 65_536,
            affinity_entries: 64,
            sock_revnat_entries: 64,
        },
        ..LoadOptions::default()
    })
    .expect("the datapath must load");
    install(datapath.maps_mut());
    datapath
}

/// `frame` with the more-fragments flag set (offset 0: a first fragment).
fn more_fragments(mut frame: Vec<u8>) -> Vec<u8> {
    frame[ETH_HLEN + 6] |= 0x20;
    packet::fix_ipv4_checksum(&mut frame);
    frame
}

/// The services, written through the agent's map writer.
fn install(maps: &mut Maps) {
    maps.set_node_addrs(&[NODE]).expect("node addresses");
    let cluster_ips = [CLUSTER, EMPTY_SVC, SVC_C, SVC_D, AFFINITY_SVC]
        .into_iter()
        .map(|addr| (addr, true))
        .chain([(FOREIGN_SVC, false)])
        .collect();
    maps.addrs_mut()
        .set_cluster_ips(&cluster_ips)
        .expect("ClusterIPs");
    let service_cidr = Ipv4Cidr::new(SERVICE_CIDR.0, SERVICE_CIDR.1).expect("a CIDR");
    maps.addrs_mut()
        .set_cidrs(CidrSetKind::Service, &[service_cidr])
        .expect("service CIDRs");
    for (id, addr, port, local) in BACKENDS {
        maps.set_backend(
            id,
            &BackendSpec {
                addr: SocketAddrV4::new(addr, port),
                local,
                terminating: false,
            },
        )
        .expect("backend");
    }
    let cluster = ServicePolicy::default();
    let external = ServicePolicy {
        masquerade: Masquerade::NonLocal,
        ..ServicePolicy::default()
    };
    let local = ServicePolicy {
        masquerade: Masquerade::Never,
        local_only: true,
        drop_when_empty: true,
        ..ServicePolicy::default()
    };
    let affinity = ServicePolicy {
        affinity_timeout_secs: Some(10_800),
        ..ServicePolicy::default()
    };
    // A Local node port with no endpoint here, and its in-cluster variant
    // (every endpoint) for this node's pods.
    let local_with_variant = ServicePolicy {
        in_cluster_variant: true,
        ..local.clone()
    };
    let node_port_local = Frontend::node_port_tcp(NODE_PORT_LOCAL);
    let in_cluster = node_port_local
        .in_cluster()
        .expect("a node port has an in-cluster variant");
    let ranged = ServicePolicy {
        source_ranges: vec![Ipv4Cidr::new(Ipv4Addr::new(203, 0, 113, 0), 28).expect("a CIDR")],
        ..external.clone()
    };
    let services: [(Frontend, &ServicePolicy, &[BackendId]); 13] = [
        (
            Frontend::tcp(CLUSTER, 80),
            &cluster,
            &[backend(1), backend(2), backend(3)],
        ),
        (
            Frontend::udp(CLUSTER, 53),
            &cluster,
            &[backend(1), backend(2), backend(3)],
        ),
        (Frontend::tcp(EMPTY_SVC, 80), &cluster, &[]),
        (Frontend::udp(EMPTY_SVC, 80), &cluster, &[]),
        (Frontend::tcp(SVC_C, 80), &cluster, &[backend(1)]),
        (Frontend::tcp(SVC_D, 80), &cluster, &[backend(1)]),
        (
            Frontend::tcp(AFFINITY_SVC, 80),
            &affinity,
            &[backend(1), backend(2), backend(3)],
        ),
        (Frontend::node_port_tcp(NODE_PORT), &external, &[backend(3)]),
        (in_cluster, &cluster, &[backend(3)]),
        (node_port_local, &local_with_variant, &[]),
        (Frontend::tcp(LB_IP, 443), &external, &[backend(4)]),
        (Frontend::tcp(LB_IP_RANGED, 443), &ranged, &[backend(4)]),
        (Frontend::tcp(EXTERNAL_IP, 80), &local, &[backend(1)]),
    ];
    for (frontend, policy, backends) in services {
        maps.upsert_service(&frontend, policy, backends)
            .unwrap_or_else(|err| panic!("installing {frontend:?}: {err}"));
    }
}

fn ct_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), protocol: u8) -> CtKey {
    CtKey {
        saddr: src.0.into(),
        daddr: dst.0.into(),
        sport: WirePort::from_host(src.1),
        dport: WirePort::from_host(dst.1),
        protocol,
        _pad: [0; 3],
    }
}

/// The backend Maglev gives a flow, computed here from the shared hash and
/// the table the agent wrote: what the program must choose.
fn predict(
    maps: &Maps,
    frontend: Frontend,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
) -> (Ipv4Addr, u16) {
    let service = maps.service(&frontend).expect("the service is installed");
    let key = frontend.key();
    let hash = flow_hash(
        src.0.into(),
        dst.0.into(),
        WirePort::from_host(src.1),
        WirePort::from_host(dst.1),
        key.protocol,
    );
    let slot = service.maglev_offset + hash % service.maglev_size;
    backend_addr(
        maps.maglev_slot(slot)
            .expect("slot inside the Maglev array"),
    )
}

/// The connection-tracking entry of a packet tuple.
fn ct_entry(maps: &Maps, key: &CtKey) -> CtEntry {
    maps.ct_entries()
        .expect("CT readable")
        .into_iter()
        .find_map(|(k, entry)| (k == *key).then_some(entry))
        .unwrap_or_else(|| panic!("no CT entry for {key:?}"))
}

/// The source port a flow was translated to, checked to be a NAT port.
fn nat_port(maps: &Maps, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> u16 {
    let port = ct_entry(maps, &ct_key(src, dst, 6)).sport.host();
    assert!(
        NAT_PORTS.contains(&port),
        "NAT port {port} outside {NAT_PORTS:?}"
    );
    port
}

enum Expect {
    /// This exact frame: checksums are those etherparse computes.
    Packet(Vec<u8>),
    /// A frame whose translated source port is only known after the run.
    NatPacket(fn(&Maps) -> Vec<u8>),
    /// An ICMP port unreachable from this address back to the sender.
    Unreachable(Ipv4Addr),
    /// Nothing: the packet is dropped.
    Dropped,
}

struct Step {
    name: &'static str,
    program: &'static str,
    packet: Vec<u8>,
    verdict: u32,
    expect: Expect,
    /// Counters that move by one packet of the input's length.
    counters: &'static [Counter],
}

const SYN: TcpFlags = TcpFlags::Syn;
const SYNACK: TcpFlags = TcpFlags::SynAck;
const POD: &str = FROM_POD_PROGRAM;
const UPLINK: &str = FROM_UPLINK_PROGRAM;
const NEW_TCP: &[Counter] = &[Counter::Ipv4Tcp, Counter::LbNewFlow];
const NEW_UDP: &[Counter] = &[Counter::Ipv4Udp, Counter::LbNewFlow];
const REPLY_TCP: &[Counter] = &[Counter::Ipv4Tcp, Counter::LbReply];
const ICMP_ERROR: &[Counter] = &[Counter::Ipv4Icmp, Counter::LbIcmpError];
/// A router between the nodes, the source of ICMP errors.
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 254);

fn step(
    name: &'static str,
    program: &'static str,
    packet: Vec<u8>,
    expect: Vec<u8>,
    counters: &'static [Counter],
) -> Step {
    Step {
        name,
        program,
        packet,
        verdict: TC_ACT_OK,
        expect: Expect::Packet(expect),
        counters,
    }
}

/// The fixture table, in order: later steps build on the flows earlier
/// ones created. Each entry builds its step from the maps as they are.
#[expect(clippy::too_many_lines, reason = "one table")]
fn translation_steps() -> Vec<fn(&Maps) -> Step> {
    const C2: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 1, 0, 6), 40_001);
    // Its own address, so no earlier flow shares its reply tuples.
    const C3: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 1, 0, 9), 40_000);
    vec![
        |maps| {
            let backend = predict(maps, Frontend::tcp(CLUSTER, 80), CLIENT, (CLUSTER, 80));
            step(
                "pod SYN to a ClusterIP: DNAT to the Maglev pick",
                POD,
                packet::tcp4(CLIENT, (CLUSTER, 80), SYN, &[]),
                packet::tcp4(CLIENT, backend, SYN, &[]),
                NEW_TCP,
            )
        },
        |maps| {
            let backend = predict(maps, Frontend::tcp(CLUSTER, 80), CLIENT, (CLUSTER, 80));
            step(
                "ACK with data of the same flow: same backend",
                POD,
                packet::tcp4(CLIENT, (CLUSTER, 80), TcpFlags::Ack, b"GET /"),
                packet::tcp4(CLIENT, backend, TcpFlags::Ack, b"GET /"),
                &[Counter::Ipv4Tcp, Counter::LbEstablished],
            )
        },
        |maps| {
            let backend = predict(maps, Frontend::tcp(CLUSTER, 80), CLIENT, (CLUSTER, 80));
            step(
                "the backend's SYN-ACK: reverse-translated to the ClusterIP",
                POD,
                packet::tcp4(backend, CLIENT, SYNACK, &[]),
                packet::tcp4((CLUSTER, 80), CLIENT, SYNACK, &[]),
                REPLY_TCP,
            )
        },
        |maps| {
            let backend = predict(maps, Frontend::tcp(CLUSTER, 80), CLIENT, (CLUSTER, 80));
            step(
                "a router's frag-needed about the translated segment: it quotes what the client sent",
                UPLINK,
                packet::icmp4_frag_needed(
                    ROUTER,
                    CLIENT.0,
                    &packet::tcp4(CLIENT, backend, TcpFlags::Ack, b"GET /"),
                ),
                packet::icmp4_frag_needed(
                    ROUTER,
                    CLIENT.0,
                    &packet::tcp4(CLIENT, (CLUSTER, 80), TcpFlags::Ack, b"GET /"),
                ),
                ICMP_ERROR,
            )
        },
        |maps| {
            let backend = predict(maps, Frontend::tcp(CLUSTER, 80), CLIENT, (CLUSTER, 80));
            step(
                "a router's frag-needed about a translated reply, sent to the ClusterIP: goes to the backend, quoting its own segment",
                POD,
                packet::icmp4_frag_needed(
                    ROUTER,
                    CLUSTER,
                    &packet::tcp4((CLUSTER, 80), CLIENT, SYNACK, &[]),
                ),
                packet::icmp4_frag_needed(
                    ROUTER,
                    backend.0,
                    &packet::tcp4(backend, CLIENT, SYNACK, &[]),
                ),
                ICMP_ERROR,
            )
        },
        |maps| {
            let backend = predict(maps, Frontend::tcp(CLUSTER, 80), CLIENT, (CLUSTER, 80));
            step(
                "FIN of that flow: still translated, the flow now closing",
                POD,
                packet::tcp4(CLIENT, (CLUSTER, 80), TcpFlags::Fin, &[]),
                packet::tcp4(CLIENT, backend, TcpFlags::Fin, &[]),
                &[Counter::Ipv4Tcp, Counter::LbEstablished],
            )
        },
        |maps| {
            let backend = predict(maps, Frontend::tcp(CLUSTER, 80), CLIENT, (CLUSTER, 80));
            step(
                "a SYN reusing the closed flow's port starts a new flow",
                POD,
                packet::tcp4(CLIENT, (CLUSTER, 80), SYN, &[]),
                packet::tcp4(CLIENT, backend, SYN, &[]),
                NEW_TCP,
            )
        },
        |maps| {
            let backend = predict(maps, Frontend::udp(CLUSTER, 53), CLIENT, (CLUSTER, 53));
            step(
                "pod UDP to a ClusterIP",
                POD,
                packet::udp4(CLIENT, (CLUSTER, 53), b"query"),
                packet::udp4(CLIENT, backend, b"query"),
                NEW_UDP,
            )
        },
        |maps| {
            let backend = predict(maps, Frontend::udp(CLUSTER, 53), CLIENT, (CLUSTER, 53));
            step(
                "the UDP reply: reverse-translated",
                UPLINK,
                packet::udp4(backend, CLIENT, b"answer"),
                packet::udp4((CLUSTER, 53), CLIENT, b"answer"),
                &[Counter::Ipv4Udp, Counter::LbReply],
            )
        },
        |maps| {
            let src = (CLIENT.0, 40_200);
            let backend = predict(maps, Frontend::udp(CLUSTER, 53), src, (CLUSTER, 53));
            step(
                "first fragment of a UDP datagram to a ClusterIP: translated, and remembered",
                POD,
                more_fragments(packet::udp4(src, (CLUSTER, 53), b"first part")),
                more_fragments(packet::udp4(src, backend, b"first part")),
                NEW_UDP,
            )
        },
        |maps| {
            let src = (CLIENT.0, 40_200);
            let backend = predict(maps, Frontend::udp(CLUSTER, 53), src, (CLUSTER, 53));
            let mut input = packet::udp4(src, (CLUSTER, 53), b"second part");
            packet::set_fragment_offset(&mut input, 3);
            let mut output = input.clone();
            output[ETH_HLEN + 16..ETH_HLEN + 20].copy_from_slice(&backend.0.octets());
            packet::fix_ipv4_checksum(&mut output);
            step(
                "a later fragment of that datagram: the same addresses, its bytes otherwise untouched",
                POD,
                input,
                output,
                &[Counter::Ipv4Fragment, Counter::LbFragment],
            )
        },
        |maps| {
            let src = (CLIENT.0, 40_002);
            let backend = predict(maps, Frontend::udp(CLUSTER, 53), src, (CLUSTER, 53));
            let mut input = packet::udp4(src, (CLUSTER, 53), b"query");
            packet::clear_udp_checksum(&mut input);
            let mut output = packet::udp4(src, backend, b"query");
            packet::clear_udp_checksum(&mut output);
            step(
                "UDP without a checksum: it stays zero",
                POD,
                input,
                output,
                NEW_UDP,
            )
        },
        |maps| {
            let src = (CLIENT.0, 40_003);
            let backend = predict(maps, Frontend::udp(CLUSTER, 53), src, (CLUSTER, 53));
            let options = [1, 1, 1, 0, 0x94, 4, 0, 0];
            step(
                "UDP behind IP options: ports found after them",
                POD,
                packet::udp4_with_ip_options(src, (CLUSTER, 53), &options, b"q"),
                packet::udp4_with_ip_options(src, backend, &options, b"q"),
                NEW_UDP,
            )
        },
        |_| Step {
            name: "SYN to a service without endpoints: ICMP port unreachable",
            program: POD,
            packet: packet::tcp4(CLIENT, (EMPTY_SVC, 80), SYN, &[]),
            verdict: TC_ACT_REDIRECT,
            expect: Expect::Unreachable(EMPTY_SVC),
            counters: &[Counter::Ipv4Tcp, Counter::RejectNoBackend],
        },
        |_| Step {
            name: "UDP with IP options to a service without endpoints: dropped",
            program: POD,
            packet: packet::udp4_with_ip_options(CLIENT, (EMPTY_SVC, 80), &[1; 4], b"x"),
            verdict: TC_ACT_SHOT,
            expect: Expect::Dropped,
            counters: &[Counter::Ipv4Udp, Counter::DropRejectFailed],
        },
        |_| Step {
            name: "node port from outside: masqueraded to the node, DNAT to a remote backend",
            program: UPLINK,
            packet: packet::tcp4(EXTERNAL, (NODE, NODE_PORT), SYN, &[]),
            verdict: TC_ACT_OK,
            expect: Expect::NatPacket(|maps| {
                let port = nat_port(maps, EXTERNAL, (NODE, NODE_PORT));
                packet::tcp4((NODE, port), backend_addr(backend(3)), SYN, &[])
            }),
            counters: NEW_TCP,
        },
        |maps| {
            let port = nat_port(maps, EXTERNAL, (NODE, NODE_PORT));
            step(
                "the remote backend's reply: back to the client from the node port",
                UPLINK,
                packet::tcp4(backend_addr(backend(3)), (NODE, port), SYNACK, &[]),
                packet::tcp4((NODE, NODE_PORT), EXTERNAL, SYNACK, &[]),
                REPLY_TCP,
            )
        },
        |maps| {
            let port = nat_port(maps, EXTERNAL, (NODE, NODE_PORT));
            step(
                "an error from the remote backend about a masqueraded segment: from the node port to the client",
                UPLINK,
                packet::icmp4_frag_needed(
                    backend_addr(backend(3)).0,
                    NODE,
                    &packet::tcp4((NODE, port), backend_addr(backend(3)), TcpFlags::Ack, &[]),
                ),
                packet::icmp4_frag_needed(
                    NODE,
                    EXTERNAL.0,
                    &packet::tcp4(EXTERNAL, (NODE, NODE_PORT), TcpFlags::Ack, &[]),
                ),
                ICMP_ERROR,
            )
        },
        |_| Step {
            name: "node port with traffic policy Local and no local endpoint: dropped",
            program: UPLINK,
            packet: packet::tcp4(EXTERNAL, (NODE, NODE_PORT_LOCAL), SYN, &[]),
            verdict: TC_ACT_SHOT,
            expect: Expect::Dropped,
            counters: &[Counter::Ipv4Tcp, Counter::DropNoBackend],
        },
        |_| {
            step(
                "that Local node port from a pod of this node: every endpoint (the in-cluster variant)",
                POD,
                packet::tcp4((CLIENT.0, 40_100), (NODE, NODE_PORT_LOCAL), SYN, &[]),
                packet::tcp4((CLIENT.0, 40_100), backend_addr(backend(3)), SYN, &[]),
                NEW_TCP,
            )
        },
        |_| Step {
            name: "LoadBalancer IP from outside: masqueraded, DNAT to the backend's port",
            program: UPLINK,
            packet: packet::tcp4((EXTERNAL.0, 5556), (LB_IP, 443), SYN, &[]),
            verdict: TC_ACT_OK,
            expect: Expect::NatPacket(|maps| {
                let port = nat_port(maps, (EXTERNAL.0, 5556), (LB_IP, 443));
                packet::tcp4((NODE, port), backend_addr(backend(4)), SYN, &[])
            }),
            counters: NEW_TCP,
        },
        |_| Step {
            name: "LoadBalancer IP with source ranges, from outside them: dropped",
            program: UPLINK,
            packet: packet::tcp4(OUTSIDE_RANGES, (LB_IP_RANGED, 443), SYN, &[]),
            verdict: TC_ACT_SHOT,
            expect: Expect::Dropped,
            counters: &[Counter::Ipv4Tcp, Counter::DropSourceRange],
        },
        |_| Step {
            name: "LoadBalancer IP with source ranges, from inside one: translated",
            program: UPLINK,
            packet: packet::tcp4((EXTERNAL.0, 5558), (LB_IP_RANGED, 443), SYN, &[]),
            verdict: TC_ACT_OK,
            expect: Expect::NatPacket(|maps| {
                let port = nat_port(maps, (EXTERNAL.0, 5558), (LB_IP_RANGED, 443));
                packet::tcp4((NODE, port), backend_addr(backend(4)), SYN, &[])
            }),
            counters: NEW_TCP,
        },
        |_| {
            step(
                "externalIP with traffic policy Local: the client's address is kept",
                UPLINK,
                packet::tcp4((EXTERNAL.0, 5557), (EXTERNAL_IP, 80), SYN, &[]),
                packet::tcp4((EXTERNAL.0, 5557), backend_addr(backend(1)), SYN, &[]),
                NEW_TCP,
            )
        },
        |_| {
            step(
                "one backend behind two services: the first flow keeps its port",
                POD,
                packet::tcp4(C2, (SVC_C, 80), SYN, &[]),
                packet::tcp4(C2, backend_addr(backend(1)), SYN, &[]),
                NEW_TCP,
            )
        },
        |_| Step {
            name: "the same socket to the second service: its reply tuple would collide, so the port moves",
            program: POD,
            packet: packet::tcp4(C2, (SVC_D, 80), SYN, &[]),
            verdict: TC_ACT_OK,
            expect: Expect::NatPacket(|maps| {
                let port = nat_port(maps, C2, (SVC_D, 80));
                packet::tcp4((C2.0, port), backend_addr(backend(1)), SYN, &[])
            }),
            counters: NEW_TCP,
        },
        |_| {
            step(
                "reply of the first flow: from the first service",
                POD,
                packet::tcp4(backend_addr(backend(1)), C2, SYNACK, &[]),
                packet::tcp4((SVC_C, 80), C2, SYNACK, &[]),
                REPLY_TCP,
            )
        },
        |maps| {
            let port = nat_port(maps, C2, (SVC_D, 80));
            step(
                "reply of the second flow: from the second service, to the client's own port",
                POD,
                packet::tcp4(backend_addr(backend(1)), (C2.0, port), SYNACK, &[]),
                packet::tcp4((SVC_D, 80), C2, SYNACK, &[]),
                REPLY_TCP,
            )
        },
        |_| Step {
            name: "hairpin: a backend reaching itself through its service comes from the node",
            program: POD,
            packet: packet::tcp4((backend_addr(backend(1)).0, 41_000), (SVC_C, 80), SYN, &[]),
            verdict: TC_ACT_OK,
            expect: Expect::NatPacket(|maps| {
                let port = nat_port(maps, (backend_addr(backend(1)).0, 41_000), (SVC_C, 80));
                packet::tcp4((NODE, port), backend_addr(backend(1)), SYN, &[])
            }),
            counters: NEW_TCP,
        },
        |maps| {
            let port = nat_port(maps, (backend_addr(backend(1)).0, 41_000), (SVC_C, 80));
            step(
                "hairpin reply: back to the backend from the service",
                POD,
                packet::tcp4(backend_addr(backend(1)), (NODE, port), SYNACK, &[]),
                packet::tcp4(
                    (SVC_C, 80),
                    (backend_addr(backend(1)).0, 41_000),
                    SYNACK,
                    &[],
                ),
                REPLY_TCP,
            )
        },
        |maps| {
            let backend = predict(
                maps,
                Frontend::tcp(AFFINITY_SVC, 80),
                C3,
                (AFFINITY_SVC, 80),
            );
            step(
                "session affinity, first connection: the Maglev pick",
                POD,
                packet::tcp4(C3, (AFFINITY_SVC, 80), SYN, &[]),
                packet::tcp4(C3, backend, SYN, &[]),
                NEW_TCP,
            )
        },
        |maps| {
            let first = predict(
                maps,
                Frontend::tcp(AFFINITY_SVC, 80),
                C3,
                (AFFINITY_SVC, 80),
            );
            // A source port Maglev alone would send elsewhere.
            let port = (41_000..42_000)
                .find(|&port| {
                    predict(
                        maps,
                        Frontend::tcp(AFFINITY_SVC, 80),
                        (C3.0, port),
                        (AFFINITY_SVC, 80),
                    ) != first
                })
                .expect("some port hashes to another backend");
            let src = (C3.0, port);
            Step {
                name: "session affinity, next connection: the same backend",
                program: POD,
                packet: packet::tcp4(src, (AFFINITY_SVC, 80), SYN, &[]),
                verdict: TC_ACT_OK,
                expect: Expect::Packet(packet::tcp4(src, first, SYN, &[])),
                counters: &[Counter::Ipv4Tcp, Counter::LbNewFlow, Counter::LbAffinityHit],
            }
        },
        |_| Step {
            name: "a ClusterIP on a port its service does not define: refused",
            program: POD,
            packet: packet::tcp4(CLIENT, (CLUSTER, 81), SYN, &[]),
            verdict: TC_ACT_REDIRECT,
            expect: Expect::Unreachable(CLUSTER),
            counters: &[Counter::Ipv4Tcp, Counter::RejectUnknownPort],
        },
        |_| Step {
            name: "a ClusterIP over UDP where the service has only TCP: refused",
            program: UPLINK,
            packet: packet::udp4(EXTERNAL, (SVC_C, 80), b"?"),
            verdict: TC_ACT_REDIRECT,
            expect: Expect::Unreachable(SVC_C),
            counters: &[Counter::Ipv4Udp, Counter::RejectUnknownPort],
        },
        |_| Step {
            name: "a ping to a ClusterIP: refused, as kube-proxy's nftables mode does",
            program: POD,
            packet: packet::icmp4_echo(CLIENT.0, CLUSTER),
            verdict: TC_ACT_REDIRECT,
            expect: Expect::Unreachable(CLUSTER),
            counters: &[Counter::Ipv4Icmp, Counter::RejectUnknownPort],
        },
        |_| Step {
            name: "an address of the service CIDR no service holds: dropped",
            program: POD,
            packet: packet::tcp4(CLIENT, (UNALLOCATED, 80), SYN, &[]),
            verdict: TC_ACT_SHOT,
            expect: Expect::Dropped,
            counters: &[Counter::Ipv4Tcp, Counter::DropUnallocatedServiceIp],
        },
        |_| Step {
            name: "a ping to an unallocated service address: dropped",
            program: UPLINK,
            packet: packet::icmp4_echo(EXTERNAL.0, UNALLOCATED),
            verdict: TC_ACT_SHOT,
            expect: Expect::Dropped,
            counters: &[Counter::Ipv4Icmp, Counter::DropUnallocatedServiceIp],
        },
        |_| {
            let packet = packet::tcp4(CLIENT, (FOREIGN_SVC, 80), SYN, &[]);
            step(
                "the ClusterIP of a service another proxy serves: left alone",
                POD,
                packet.clone(),
                packet,
                &[Counter::Ipv4Tcp],
            )
        },
        |_| Step {
            name: "a client outside the cluster routed to a ClusterIP: masqueraded, so replies come back here",
            program: UPLINK,
            packet: packet::tcp4((EXTERNAL.0, 5600), (SVC_C, 80), SYN, &[]),
            verdict: TC_ACT_OK,
            expect: Expect::NatPacket(|maps| {
                let port = nat_port(maps, (EXTERNAL.0, 5600), (SVC_C, 80));
                packet::tcp4((NODE, port), backend_addr(backend(1)), SYN, &[])
            }),
            counters: NEW_TCP,
        },
        |maps| {
            let port = nat_port(maps, (EXTERNAL.0, 5600), (SVC_C, 80));
            step(
                "its reply: back to the client from the ClusterIP",
                POD,
                packet::tcp4(backend_addr(backend(1)), (NODE, port), SYNACK, &[]),
                packet::tcp4((SVC_C, 80), (EXTERNAL.0, 5600), SYNACK, &[]),
                REPLY_TCP,
            )
        },
        |maps| {
            let src = (CLIENT.0, 40_400);
            let backend = predict(maps, Frontend::tcp(CLUSTER, 80), src, (CLUSTER, 80));
            step(
                "a segment of a connection nothing tracks (its entries evicted): a new flow, counted as such",
                POD,
                packet::tcp4(src, (CLUSTER, 80), TcpFlags::Ack, b"data"),
                packet::tcp4(src, backend, TcpFlags::Ack, b"data"),
                &[
                    Counter::Ipv4Tcp,
                    Counter::LbNewFlow,
                    Counter::LbNewFlowMidstream,
                ],
            )
        },
        |maps| {
            let src = (CLIENT.0, 40_300);
            let backend = predict(maps, Frontend::tcp(SVC_D, 80), src, (SVC_D, 80));
            step(
                "a flow to a ClusterIP that will close",
                POD,
                packet::tcp4(src, (SVC_D, 80), SYN, &[]),
                packet::tcp4(src, backend, SYN, &[]),
                NEW_TCP,
            )
        },
        |maps| {
            let src = (CLIENT.0, 40_300);
            let backend = predict(maps, Frontend::tcp(SVC_D, 80), src, (SVC_D, 80));
            step(
                "its client closes",
                POD,
                packet::tcp4(src, (SVC_D, 80), TcpFlags::Fin, &[]),
                packet::tcp4(src, backend, TcpFlags::Fin, &[]),
                &[Counter::Ipv4Tcp, Counter::LbEstablished],
            )
        },
        |maps| {
            let src = (CLIENT.0, 40_300);
            let backend = predict(maps, Frontend::tcp(SVC_D, 80), src, (SVC_D, 80));
            let packet = packet::tcp4(backend, src, SYNACK, &[]);
            step(
                "a direct connection from the same port meets the closed flow's reply tuple: untranslated",
                POD,
                packet.clone(),
                packet,
                &[Counter::Ipv4Tcp],
            )
        },
        |maps| {
            let src = (CLIENT.0, 40_300);
            let backend = predict(maps, Frontend::tcp(SVC_D, 80), src, (SVC_D, 80));
            let packet = packet::tcp4(backend, src, TcpFlags::Ack, b"hello");
            step(
                "the rest of that direct connection: untranslated too (the closed flow is gone)",
                POD,
                packet.clone(),
                packet,
                &[Counter::Ipv4Tcp],
            )
        },
    ]
}

// ---------------------------------------------------------------------------
// Running the tables.

struct Run {
    verdict: u32,
    output: Vec<u8>,
    moved: Vec<(Counter, CounterValue)>,
}

fn run(datapath: &Datapath, program: &'static str, name: &str, packet: &[u8]) -> Run {
    let program = datapath
        .tc_program(program)
        .unwrap_or_else(|err| panic!("{name}: program {program}: {err}"));
    let before = datapath.stats().expect("counters must be readable");
    let mut out = vec![0u8; packet.len() + 128];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|err| panic!("{name}: BPF_PROG_TEST_RUN failed: {err:?}"));
    let out_len = usize::try_from(result.data_size_out).expect("output size fits usize");
    out.truncate(out_len);
    let after = datapath.stats().expect("counters must be readable");
    Run {
        verdict: result.return_value,
        output: out,
        moved: after.since(&before),
    }
}

fn one_packet(counters: &[Counter], len: usize) -> Vec<(Counter, CounterValue)> {
    let mut expected: Vec<_> = counters
        .iter()
        .map(|&counter| {
            (
                counter,
                CounterValue {
                    packets: 1,
                    bytes: len as u64,
                },
            )
        })
        .collect();
    expected.sort_by_key(|(counter, _)| counter.index());
    expected
}

#[test]
fn packets_not_for_a_service_pass_byte_for_byte() {
    require_root();
    let datapath = load(config());
    for program in [POD, UPLINK] {
        for Fixture {
            name,
            packet,
            counter,
        } in pass_fixtures()
        {
            let run = run(&datapath, program, name, &packet);
            assert_eq!(run.verdict, TC_ACT_OK, "{program}: {name}: verdict");
            assert_eq!(
                run.output, packet,
                "{program}: {name}: the packet must pass byte for byte"
            );
            assert_eq!(
                run.moved,
                one_packet(&[counter], packet.len()),
                "{program}: {name}: exactly its class counter must move"
            );
        }
    }
}

#[test]
fn service_packets_are_translated_as_the_table_says() {
    require_root();
    let datapath = load(config());
    let mut reached = Vec::new();
    for build in translation_steps() {
        let step = build(datapath.maps());
        reached.extend_from_slice(step.counters);
        let name = step.name;
        let run = run(&datapath, step.program, name, &step.packet);
        assert_eq!(
            run.verdict, step.verdict,
            "{name}: verdict (counters moved: {:?})",
            run.moved
        );
        assert_eq!(
            run.moved,
            one_packet(step.counters, step.packet.len()),
            "{name}: counters"
        );
        match step.expect {
            Expect::Dropped => {}
            Expect::Packet(expected) => assert_translated(name, &run.output, &expected),
            Expect::NatPacket(build) => {
                assert_translated(name, &run.output, &build(datapath.maps()));
            }
            Expect::Unreachable(from) => {
                assert_port_unreachable(name, &step.packet, &run.output, from);
            }
        }
    }
    assert_every_counter_covered(&reached);
}

fn assert_translated(name: &str, output: &[u8], expected: &[u8]) {
    let errors = packet::checksum_errors(output);
    assert!(errors.is_empty(), "{name}: wrong checksums: {errors:?}");
    assert_eq!(output, expected, "{name}: translated packet");
}

fn assert_port_unreachable(name: &str, input: &[u8], output: &[u8], from: Ipv4Addr) {
    let errors = packet::checksum_errors(output);
    assert!(errors.is_empty(), "{name}: wrong checksums: {errors:?}");
    assert_eq!(
        &output[..6],
        &input[6..12],
        "{name}: back to the sender's MAC"
    );
    assert_eq!(
        &output[6..12],
        &input[..6],
        "{name}: from the MAC it was sent to"
    );
    let ip = &output[ETH_HLEN..];
    assert_eq!(ip[9], 1, "{name}: ICMP");
    assert_eq!(
        &ip[12..16],
        &from.octets(),
        "{name}: from the service address"
    );
    assert_eq!(
        &ip[16..20],
        &input[ETH_HLEN + 12..ETH_HLEN + 16],
        "{name}: to the sender"
    );
    assert_eq!(
        (ip[20], ip[21]),
        (3, 3),
        "{name}: destination/port unreachable"
    );
    // The IPv4 header and 8 bytes of UDP, or 18 of TCP (through its
    // checksum field, which a local socket's segment may not have filled).
    let quote = 20 + if input[ETH_HLEN + 9] == 6 { 18 } else { 8 };
    assert_eq!(
        &ip[28..28 + quote],
        &input[ETH_HLEN..ETH_HLEN + quote],
        "{name}: quotes the offending header and the start of its payload"
    );
    assert_eq!(
        output.len(),
        ETH_HLEN + 28 + quote,
        "{name}: nothing after the quote"
    );
}

/// Every node builds the same table for a service whatever ids it gave
/// the backends (they are node-local), so a flow lands on the same pod
/// whichever node translates it: two datapaths, the same endpoints under
/// different ids, slot for slot the same addresses.
#[test]
fn the_table_depends_on_the_endpoints_not_on_node_local_ids() {
    let endpoints: Vec<SocketAddrV4> = (1..=10)
        .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 3, 0, i), 8080))
        .collect();
    let frontend = Frontend::tcp(Ipv4Addr::new(10, 96, 9, 9), 80);
    let table = |ids: &[BackendId]| {
        let mut datapath = load(config());
        let maps = datapath.maps_mut();
        for (&id, addr) in ids.iter().zip(&endpoints) {
            let spec = BackendSpec {
                addr: *addr,
                local: false,
                terminating: false,
            };
            maps.set_backend(id, &spec).expect("backend");
        }
        maps.upsert_service(&frontend, &ServicePolicy::default(), ids)
            .expect("service");
        let value = maps.service(&frontend).expect("installed");
        let addr_of: std::collections::HashMap<BackendId, SocketAddrV4> =
            ids.iter().copied().zip(endpoints.iter().copied()).collect();
        (0..value.maglev_size)
            .map(|slot| {
                let id = maps
                    .maglev_slot(value.maglev_offset + slot)
                    .expect("a slot");
                addr_of[&id]
            })
            .collect::<Vec<_>>()
    };
    let first = table(&[
        backend(11),
        backend(12),
        backend(13),
        backend(14),
        backend(15),
        backend(16),
        backend(17),
        backend(18),
        backend(19),
        backend(20),
    ]);
    let second = table(&[
        backend(40),
        backend(31),
        backend(38),
        backend(33),
        backend(36),
        backend(35),
        backend(34),
        backend(37),
        backend(32),
        backend(39),
    ]);
    assert_eq!(first.len(), 1_021);
    assert_eq!(first, second, "the same endpoints, slot for slot");
}

/// Address writes that fail are neither half-applied for good nor
/// allowed to eat the ClusterIPs' room: too many node addresses are
/// refused whole, and addresses a full map refused are written once there
/// is room.
#[test]
fn address_writes_refuse_too_many_nodes_and_retry_what_a_full_map_refused() {
    let mut datapath = load(config());
    let maps = datapath.maps_mut();
    let nodes: Vec<Ipv4Addr> = (0..65).map(|i| Ipv4Addr::new(192, 168, 1, i)).collect();
    let err = maps.set_node_addrs(&nodes).expect_err("65 node addresses");
    assert!(err.to_string().contains("at most 64"), "{err}");
    assert_eq!(maps.addrs().nodes(), [NODE], "nothing of them was written");
    let written = maps.addrs().len();
    // The map holds services + 64 = 128 entries.
    let mut cluster_ips = maps.addrs().cluster_ips().clone();
    let extra: Vec<Ipv4Addr> = (0..200).map(|i| Ipv4Addr::new(10, 97, 0, i)).collect();
    cluster_ips.extend(extra.iter().map(|&addr| (addr, true)));
    maps.addrs_mut()
        .set_cluster_ips(&cluster_ips)
        .expect_err("more ClusterIPs than the map holds");
    for addr in &extra[100..] {
        cluster_ips.remove(addr);
    }
    maps.addrs_mut()
        .set_cluster_ips(&cluster_ips)
        .expect("room for 100 more");
    assert_eq!(
        maps.addrs().len(),
        written + 100,
        "every wanted address is in the map, none of the others"
    );
}

/// An update that fails part way leaves the frontend as it was: the
/// source ranges it had written for the new entry are taken out again, so
/// they never let in sources the installed entry does not allow.
#[test]
fn a_failed_update_leaves_no_source_range_behind() {
    let mut datapath = load(config());
    let frontend = Frontend::tcp(LB_IP_RANGED, 443);
    let mut ranges = vec![Ipv4Cidr::new(Ipv4Addr::new(203, 0, 113, 0), 28).expect("a CIDR")];
    // The first new range lets OUTSIDE_RANGES in; more follow than the
    // trie holds (16,384).
    ranges.push(Ipv4Cidr::new(OUTSIDE_RANGES.0, 32).expect("a CIDR"));
    ranges.extend(
        (0..16_400u32).map(|i| Ipv4Cidr::new(Ipv4Addr::from(0x0a80_0000 + i), 32).expect("a CIDR")),
    );
    let policy = ServicePolicy {
        masquerade: Masquerade::NonLocal,
        source_ranges: ranges,
        ..ServicePolicy::default()
    };
    datapath
        .maps_mut()
        .upsert_service(&frontend, &policy, &[backend(4)])
        .expect_err("more source ranges than the trie holds");
    let packet = packet::tcp4(OUTSIDE_RANGES, (LB_IP_RANGED, 443), SYN, &[]);
    let run = run(&datapath, UPLINK, "after the failed update", &packet);
    assert_eq!(run.verdict, TC_ACT_SHOT, "{:?}", run.moved);
    assert!(
        run.moved
            .iter()
            .any(|(c, _)| *c == Counter::DropSourceRange),
        "still outside the ranges: {:?}",
        run.moved
    );
}

/// A packet that read a service entry just before an update may read the
/// old table's slot a moment later: the block must not hold another
/// service's table by then.
#[test]
fn a_replaced_table_s_block_is_not_reused_at_once() {
    let mut datapath = load(config());
    let maps = datapath.maps_mut();
    let a = Frontend::tcp(Ipv4Addr::new(10, 96, 9, 1), 80);
    let b = Frontend::tcp(Ipv4Addr::new(10, 96, 9, 2), 80);
    let policy = ServicePolicy::default();
    maps.upsert_service(&a, &policy, &[backend(1)]).expect("a");
    let old = maps.service(&a).expect("a is installed");
    maps.upsert_service(&a, &policy, &[backend(1), backend(2), backend(3)])
        .expect("a grows");
    let grown = maps.service(&a).expect("a is installed");
    maps.upsert_service(&b, &policy, &[backend(4)]).expect("b");
    let new = maps.service(&b).expect("b is installed");
    assert_eq!(new.maglev_size, old.maglev_size, "the old block would fit");
    assert_ne!(
        new.maglev_offset, old.maglev_offset,
        "b's table is not written over a's old one"
    );
    maps.remove_service(&a).expect("a goes");
    let c = Frontend::tcp(Ipv4Addr::new(10, 96, 9, 3), 80);
    maps.upsert_service(&c, &policy, &[backend(1), backend(2), backend(3)])
        .expect("c");
    let c = maps.service(&c).expect("c is installed");
    assert_eq!(c.maglev_size, grown.maglev_size);
    assert_ne!(
        c.maglev_offset, grown.maglev_offset,
        "nor over a removed service's"
    );
}

#[test]
fn hairpin_without_a_masquerade_address_is_dropped_not_mistranslated() {
    require_root();
    let datapath = load(DatapathConfig::DEFAULT);
    let packet = packet::tcp4((backend_addr(backend(1)).0, 41_000), (SVC_C, 80), SYN, &[]);
    let run = run(&datapath, POD, "hairpin without masq", &packet);
    assert_eq!(run.verdict, TC_ACT_SHOT, "counters moved: {:?}", run.moved);
    assert_eq!(
        run.moved,
        one_packet(&[Counter::Ipv4Tcp, Counter::DropNoSnatAddr], packet.len())
    );
}

#[test]
fn an_exhausted_nat_port_range_drops_and_counts() {
    require_root();
    let datapath = load(DatapathConfig {
        nat_port_min: 61_000,
        nat_port_max: 61_000,
        ..config()
    });
    let first = packet::tcp4(EXTERNAL, (NODE, NODE_PORT), SYN, &[]);
    let run_first = run(&datapath, UPLINK, "first masqueraded flow", &first);
    assert_eq!(
        run_first.verdict, TC_ACT_OK,
        "the only NAT port is free (counters moved: {:?})",
        run_first.moved
    );
    let second = packet::tcp4((EXTERNAL.0, 5600), (NODE, NODE_PORT), SYN, &[]);
    let run_second = run(&datapath, UPLINK, "second masqueraded flow", &second);
    assert_eq!(run_second.verdict, TC_ACT_SHOT, "no NAT port is left");
    assert_eq!(
        run_second.moved,
        one_packet(
            &[Counter::Ipv4Tcp, Counter::DropNatPortsExhausted],
            second.len()
        )
    );
}

#[test]
fn every_nat_port_is_taken_before_new_flows_are_dropped() {
    const PORTS: u16 = 64;
    require_root();
    let datapath = load(DatapathConfig {
        nat_port_min: 62_000,
        nat_port_max: 62_000 + PORTS - 1,
        ..config()
    });
    let mut taken = std::collections::BTreeSet::new();
    for i in 0..PORTS {
        let client = (EXTERNAL.0, 20_000 + i);
        let packet = packet::tcp4(client, (NODE, NODE_PORT), SYN, &[]);
        let run = run(&datapath, UPLINK, "a masqueraded flow", &packet);
        assert_eq!(
            run.verdict, TC_ACT_OK,
            "flow {i}: a port is left (counters moved: {:?})",
            run.moved
        );
        taken.insert(nat_port(datapath.maps(), client, (NODE, NODE_PORT)));
    }
    assert_eq!(
        taken.len(),
        usize::from(PORTS),
        "each flow its own port: the whole range, found by scanning once the hashed places are taken"
    );
    let packet = packet::tcp4((EXTERNAL.0, 30_000), (NODE, NODE_PORT), SYN, &[]);
    let run = run(&datapath, UPLINK, "one flow too many", &packet);
    assert_eq!(run.verdict, TC_ACT_SHOT, "the range is full");
    assert_eq!(
        run.moved,
        one_packet(
            &[Counter::Ipv4Tcp, Counter::DropNatPortsExhausted],
            packet.len()
        )
    );
}

/// A Maglev slot naming a backend id with no backend (the agent and the
/// maps disagree, which the agent's applier never lets happen): the new
/// flow is dropped and counted, never sent anywhere.
#[test]
fn a_table_naming_a_missing_backend_drops_and_counts() {
    use aya::maps::{Array, Map, MapData};
    require_root();
    let pin = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/svc-test-bad-backend-{}",
        std::process::id()
    ));
    let _ = Datapath::cleanup(&pin);
    let mut datapath = Datapath::load(&LoadOptions {
        config: config(),
        pin_dir: Some(pin.clone()),
        ..LoadOptions::default()
    })
    .expect("the datapath must load");
    install(datapath.maps_mut());
    // SVC_C's table names only backend 1; its entry is zeroed behind the
    // map writer's back (which refuses to remove a backend a table names).
    let pinned = MapData::from_pin(pin.join(svc_common::lb::BACKENDS_MAP)).expect("pinned");
    let mut backends: Array<_, svc_common::lb::Backend> =
        Array::try_from(Map::Array(pinned)).expect("an array");
    backends
        .set(1, svc_common::lb::Backend::default(), 0)
        .expect("zeroing backend 1");
    let packet = packet::tcp4(CLIENT, (SVC_C, 80), SYN, &[]);
    let run = run(&datapath, POD, "a SYN to SVC_C", &packet);
    drop(datapath);
    let _ = Datapath::cleanup(&pin);
    assert_eq!(run.verdict, TC_ACT_SHOT, "dropped");
    assert_eq!(
        run.moved,
        one_packet(&[Counter::Ipv4Tcp, Counter::DropBadBackend], packet.len())
    );
}

/// Frames BPF_PROG_TEST_RUN refuses (EINVAL) before running a tc program:
/// shorter than an Ethernet header, or IPv4 shorter than a minimal IPv4
/// header. This table notices a kernel that starts to accept them. A real
/// veth delivers the second kind
/// (`veth_traffic::a_frame_ending_inside_its_ipv4_header_is_counted_on_a_real_hook`);
/// the first cannot arrive at all (see [`COVERED_ELSEWHERE`]).
fn refused_by_test_run() -> Vec<Fixture> {
    vec![
        fixture(
            "frame shorter than Ethernet",
            vec![0; ETH_HLEN - 1],
            Counter::MalformedEthernet,
        ),
        fixture(
            "IPv4 cut inside its header",
            truncated(packet::udp4(CLIENT, SERVER, b"x"), ETH_HLEN + 10),
            Counter::MalformedIpv4Truncated,
        ),
    ]
}

/// Counters no fixture table here reaches: the test that does, or why
/// none can.
const COVERED_ELSEWHERE: &[(Counter, &str)] = &[
    (
        Counter::DropBadBackend,
        "a_table_naming_a_missing_backend_drops_and_counts",
    ),
    (
        Counter::MalformedIpv4Truncated,
        "veth_traffic::a_frame_ending_inside_its_ipv4_header_is_counted_on_a_real_hook",
    ),
    (
        Counter::MalformedEthernet,
        "unreachable: the agent attaches only to Ethernet devices \
         (devices_without_an_ethernet_header_are_refused), whose frames the kernel \
         pulls an Ethernet header from before tc ingress (eth_type_trans), and \
         BPF_PROG_TEST_RUN refuses shorter ones; the bounds check the verifier \
         needs stays counted",
    ),
    (
        Counter::DropCtInsertFailed,
        "unreachable by a test: connection tracking is an LRU hash written with \
         BPF_ANY, which evicts to make room and fails only with ENOMEM when every \
         LRU node is held by other CPUs mid-update",
    ),
    (
        Counter::DropRewriteFailed,
        "unreachable by a test: the rewrite's offsets are checked against the \
         packet first, so only bpf_skb_store_bytes failing to make a cloned skb \
         writable (ENOMEM) lands here",
    ),
    (
        Counter::DropNoSnatAddr,
        "hairpin_without_a_masquerade_address_is_dropped_not_mistranslated",
    ),
    (
        Counter::DropNatPortsExhausted,
        "an_exhausted_nat_port_range_drops_and_counts",
    ),
    (
        Counter::SockTranslated,
        "host sockets: tests/tests/topology.rs",
    ),
    (
        Counter::SockRejectNoBackend,
        "host sockets: tests/tests/topology.rs",
    ),
    (
        Counter::SockRevTranslated,
        "host sockets: tests/tests/topology.rs",
    ),
];

/// Fails unless every counter is reached by a fixture here or named in
/// [`COVERED_ELSEWHERE`].
fn assert_every_counter_covered(reached_by_steps: &[Counter]) {
    let mut covered: Vec<Counter> = pass_fixtures()
        .iter()
        .chain(&refused_by_test_run())
        .map(|f| f.counter)
        .collect();
    covered.extend(COVERED_ELSEWHERE.iter().map(|(counter, _)| *counter));
    covered.extend_from_slice(reached_by_steps);
    for counter in Counter::ALL {
        assert!(covered.contains(counter), "no fixture reaches {counter:?}");
    }
}

#[test]
fn frames_the_kernel_refuses_to_test_run_are_still_refused() {
    require_root();
    let datapath = load(config());
    let program = datapath
        .tc_program(POD)
        .expect("the tc program must be loaded");
    for Fixture { name, packet, .. } in refused_by_test_run() {
        let result = program.test_run(TestRunOptions {
            data_in: Some(&packet),
            ..TestRunOptions::default()
        });
        assert!(
            result.is_err(),
            "{name}: the kernel now runs tc programs on it; move it to pass_fixtures()"
        );
    }
}

#[test]
fn the_kernel_accepts_the_objects_btf() {
    require_root();
    let datapath = load(config());
    for name in [POD, UPLINK] {
        let info = datapath
            .tc_program(name)
            .expect("program")
            .info()
            .expect("program info");
        // aya loads an object whose BTF the kernel refuses without it, with
        // only a warning: the programs then have no BTF id.
        assert!(
            info.btf_id().is_some_and(|id| id != 0),
            "{name} was loaded without BTF: the kernel refused the object's BTF"
        );
    }
}
