//! The tc programs run through BPF_PROG_TEST_RUN on tables of crafted
//! packets, with services installed through the agent's own map writer:
//! verdict, output bytes (checksums recomputed here) and counters per
//! fixture, in the manner of Katran's and Cilium's BPF tests.
//!
//! `fixtures.rs`: packets that must pass untouched, and which counter each
//! moves; `steps.rs`: flows translated step by step; `map_writer.rs`: what
//! the agent's map writer leaves behind when writes fail or tables change;
//! `nat.rs`: source NAT ports. The shared services, addresses and runner
//! are here.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun as _, TestRunOptions};
use svc_agent::datapath::{
    BackendSpec, Capacities, CidrSetKind, Datapath, EGRESS_PROGRAM, FROM_POD_PROGRAM,
    FROM_UPLINK_PROGRAM, Frontend, Ipv4Cidr, LoadOptions, Maps, Masquerade, ServicePolicy,
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

mod fixtures;
mod map_writer;
mod nat;
mod steps;

const TC_ACT_OK: u32 = 0;
/// A pod on this node.
const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 1, 0, 5), 40_000);
/// A pod on another node: no service address.
const SERVER: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 2, 0, 99), 80);
const SYN: TcpFlags = TcpFlags::Syn;
const SYNACK: TcpFlags = TcpFlags::SynAck;
const POD: &str = FROM_POD_PROGRAM;
const UPLINK: &str = FROM_UPLINK_PROGRAM;
/// Egress of a pod veth: packets into the pod.
const EGRESS: &str = EGRESS_PROGRAM;
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
/// A node port whose one endpoint is this node's address.
const NODE_PORT_HOST: u16 = 30_082;
/// The service CIDR.
const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);
/// In the service CIDR, held by no service.
const UNALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);
/// The ClusterIP of a service another proxy serves.
const FOREIGN_SVC: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
/// A service whose one endpoint is a host-network pod of this node.
const HOST_SVC: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const NAT_PORTS: std::ops::RangeInclusive<u16> = 61_000..=65_535;

/// Backends by id: 1 and 2 on this node, 3 and 4 on another, 5 this
/// node's own address (a host-network pod).
const BACKENDS: [(BackendId, Ipv4Addr, u16, bool); 5] = [
    (backend(1), Ipv4Addr::new(10, 1, 0, 7), 8080, true),
    (backend(2), Ipv4Addr::new(10, 1, 0, 8), 8080, true),
    (backend(3), Ipv4Addr::new(10, 2, 0, 9), 8080, false),
    (backend(4), Ipv4Addr::new(10, 2, 0, 4), 9090, false),
    (backend(5), NODE, 8081, true),
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
    let cluster_ips = [CLUSTER, EMPTY_SVC, SVC_C, SVC_D, AFFINITY_SVC, HOST_SVC]
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
    let services: [(Frontend, &ServicePolicy, &[BackendId]); 15] = [
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
        (Frontend::tcp(HOST_SVC, 80), &cluster, &[backend(5)]),
        (
            Frontend::node_port_tcp(NODE_PORT_HOST),
            &external,
            &[backend(5)],
        ),
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
