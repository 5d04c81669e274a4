//! `cargo xtask bench datapath`: nanoseconds per packet of the tc programs,
//! measured with `BPF_PROG_TEST_RUN` (`repeat` ≥ 1,000,000) with 1 to
//! 100,000 services installed. Writes a JSON list of
//! `{"bench", "proxy", "services", "metric", "value", "unit"}` figures to the path given with `--out`.
//!
//! `BPF_PROG_TEST_RUN` runs the program again and again on the *same*
//! buffer, so a translating program would see its own output from the
//! second iteration on. The measured service is therefore built to cycle:
//! its two ports are each other's backends (a ClusterIP), or its node
//! ports point at node addresses (a NodePort), so that every iteration
//! takes the path being measured. Counters prove it: a case fails unless
//! at least 99.9% of its iterations moved the expected counter. Each case
//! is measured three times and the fastest run reported.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use aya::programs::{TestRun as _, TestRunOptions};
use svc_agent::datapath::{
    BackendSpec, Capacities, Datapath, EGRESS_PROGRAM, FROM_POD_PROGRAM, FROM_UPLINK_PROGRAM,
    Frontend, LoadOptions, Maps, Masquerade, Protocol, ServicePolicy,
};
use svc_common::{
    config::DatapathConfig, hash::flow_hash, lb::BackendId, maglev, proto, stats::Counter,
    wire::WirePort,
};
use tests::{
    figures::{self, Figure},
    packet::{self, TcpFlags},
};

const SERVICE_COUNTS: &[u32] = &[1, 1_000, 10_000, 100_000];

const BACKENDS_PER_SERVICE: u32 = 10;
/// Pod addresses the filler services' backends are drawn from.
const BACKEND_POOL: u32 = 4_000;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 5);
const HOT: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const EXTERNAL: (Ipv4Addr, u16) = (Ipv4Addr::new(203, 0, 113, 9), 40_000);
const NODE_PORTS: [u16; 2] = [30_001, 30_002];

struct Args {
    out: String,
    repeat: u32,
    services: Vec<u32>,
}

fn args() -> Args {
    let mut out = String::from("target/bench/datapath.json");
    let mut repeat = 1_000_000;
    let mut services = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--out" => out = it.next().expect("--out takes a path"),
            "--repeat" => {
                repeat = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--repeat takes a number");
            }
            "--services" => services.push(
                it.next()
                    .and_then(|n| n.parse().ok())
                    .expect("--services takes a number"),
            ),
            other => {
                panic!("unknown argument {other}; use --out PATH --repeat N [--services N]...")
            }
        }
    }
    if services.is_empty() {
        services = SERVICE_COUNTS.to_vec();
    }
    Args {
        out,
        repeat,
        services,
    }
}

fn node_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 1, 10 + i)
}

fn pool_addr(i: u32) -> SocketAddrV4 {
    let [_, _, hi, lo] = (i + 256).to_be_bytes();
    SocketAddrV4::new(Ipv4Addr::new(10, 245, hi, lo), 8080)
}

fn filler_addr(i: u32) -> Ipv4Addr {
    let [_, b, c, d] = (i + 1).to_be_bytes();
    Ipv4Addr::new(10, 100 + b, c, d)
}

/// Loads a datapath with `services` services (2 ports, 10 backends each).
fn install(services: u32, config: DatapathConfig) -> Datapath {
    let frontends = 2 * services + 8;
    let mut datapath = Datapath::load(&LoadOptions {
        config,
        capacities: Capacities {
            ct_entries: 1 << 20,
            services: frontends.next_power_of_two(),
            backends: BACKEND_POOL + 64,
            maglev_slots: frontends
                * maglev::table_size(BACKENDS_PER_SERVICE, maglev::DEFAULT_SLOTS_PER_BACKEND)
                + 4096,
            ..Capacities::default()
        },
        ..LoadOptions::default()
    })
    .expect("the datapath must load");
    let maps = datapath.maps_mut();
    let node_addrs: Vec<Ipv4Addr> = (0..10).map(node_addr).collect();
    maps.set_node_addrs(&node_addrs).expect("node addresses");

    // The measured service: ports 80 and 81 on the ClusterIP, each the
    // other's first backend; node ports 30001/30002 whose backends are
    // the other node port on ten node addresses.
    let mut next_id = 1;
    let mut backend = |maps: &mut Maps, addr: SocketAddrV4, local: bool| -> BackendId {
        let id = tests::backend(next_id);
        next_id += 1;
        maps.set_backend(
            id,
            &BackendSpec {
                addr,
                local,
                terminating: false,
            },
        )
        .expect("backend");
        id
    };
    let pool: Vec<BackendId> = (0..BACKEND_POOL)
        .map(|i| backend(maps, pool_addr(i), false))
        .collect();
    for (port, other) in [(80, 81), (81, 80)] {
        let mut ids = vec![backend(maps, SocketAddrV4::new(HOT, other), false)];
        ids.extend_from_slice(&pool[..BACKENDS_PER_SERVICE as usize - 1]);
        maps.upsert_service(&Frontend::tcp(HOT, port), &ServicePolicy::default(), &ids)
            .expect("hot ClusterIP");
    }
    for (index, port) in NODE_PORTS.iter().enumerate() {
        let other = NODE_PORTS[1 - index];
        let ids: Vec<BackendId> = (0..10)
            .map(|i| backend(maps, SocketAddrV4::new(node_addr(i), other), false))
            .collect();
        let policy = ServicePolicy {
            masquerade: Masquerade::NonLocal,
            ..ServicePolicy::default()
        };
        maps.upsert_service(
            &Frontend::NodePort {
                port: *port,
                protocol: Protocol::Tcp,
            },
            &policy,
            &ids,
        )
        .expect("hot node port");
    }
    for i in 1..services {
        let first = ((i * 7) % (BACKEND_POOL - BACKENDS_PER_SERVICE)) as usize;
        let ids = &pool[first..first + BACKENDS_PER_SERVICE as usize];
        for port in [80, 81] {
            maps.upsert_service(
                &Frontend::tcp(filler_addr(i), port),
                &ServicePolicy::default(),
                ids,
            )
            .unwrap_or_else(|err| panic!("filler service {i}: {err}"));
        }
    }
    datapath
}

/// A client port whose flows to port 80 and 81 Maglev sends to each other.
fn cycling_client_port(maps: &Maps) -> u16 {
    let pick = |src_port: u16, port: u16| {
        let service = maps
            .service(&Frontend::tcp(HOT, port))
            .expect("hot service");
        let hash = flow_hash(
            CLIENT.into(),
            HOT.into(),
            WirePort::from_host(src_port),
            WirePort::from_host(port),
            proto::TCP,
        );
        maps.maglev_slot(service.maglev_offset + hash % service.maglev_size)
    };
    // Ids 4001 and 4002 are 81 and 80 as backends (see `install`).
    let (to_81, to_80) = (
        tests::backend(BACKEND_POOL + 1),
        tests::backend(BACKEND_POOL + 2),
    );
    (20_000..60_000)
        .find(|&p| pick(p, 80) == Some(to_81) && pick(p, 81) == Some(to_80))
        .expect("some client port cycles between the two ports")
}

struct Case {
    name: &'static str,
    program: &'static str,
    packet: Vec<u8>,
    /// Packets run first, unmeasured, to set the flows up.
    warmup: Vec<Vec<u8>>,
    /// Counter every measured iteration must move.
    counter: Option<Counter>,
    /// Connection tracking never keeps anything (every packet is new).
    new_flows: bool,
}

fn cases(client_port: u16) -> Vec<Case> {
    let client = (CLIENT, client_port);
    let to_80 = packet::tcp4(client, (HOT, 80), TcpFlags::Ack, b"x");
    vec![
        Case {
            // The floor: Ethernet parsing and one counter, plus what
            // BPF_PROG_TEST_RUN itself costs per iteration.
            name: "non_ip",
            program: FROM_POD_PROGRAM,
            packet: packet::arp_request(CLIENT, HOT),
            warmup: Vec::new(),
            counter: Some(Counter::PassNonIpv4),
            new_flows: false,
        },
        Case {
            name: "non_service",
            program: FROM_POD_PROGRAM,
            packet: packet::tcp4(
                client,
                (Ipv4Addr::new(10, 244, 3, 3), 80),
                TcpFlags::Ack,
                b"x",
            ),
            warmup: Vec::new(),
            counter: Some(Counter::Ipv4Tcp),
            new_flows: false,
        },
        Case {
            // A pod opening a connection to another pod: remembered, so a
            // service flow never takes its tuple (`SVC_DIRECT_V1`).
            name: "non_service_syn",
            program: FROM_POD_PROGRAM,
            packet: packet::tcp4(
                client,
                (Ipv4Addr::new(10, 244, 3, 3), 80),
                TcpFlags::Syn,
                &[],
            ),
            warmup: Vec::new(),
            counter: Some(Counter::Ipv4Tcp),
            new_flows: false,
        },
        Case {
            name: "cluster_ip_new_flow",
            program: FROM_POD_PROGRAM,
            packet: packet::tcp4(client, (HOT, 80), TcpFlags::Syn, &[]),
            warmup: Vec::new(),
            counter: Some(Counter::LbNewFlow),
            new_flows: true,
        },
        Case {
            name: "cluster_ip_established",
            program: FROM_POD_PROGRAM,
            packet: to_80.clone(),
            warmup: vec![to_80.clone()],
            counter: Some(Counter::LbEstablished),
            new_flows: false,
        },
        Case {
            name: "cluster_ip_reply",
            program: FROM_POD_PROGRAM,
            packet: packet::tcp4((HOT, 81), client, TcpFlags::Ack, b"y"),
            // One packet to each port sets up both flows.
            warmup: vec![
                to_80.clone(),
                packet::tcp4(client, (HOT, 81), TcpFlags::Ack, b"x"),
            ],
            counter: Some(Counter::LbReply),
            new_flows: false,
        },
        Case {
            // A packet into a pod from another pod, at the veth's egress:
            // the cost every packet into a pod pays for host-network
            // endpoints' replies (one node-address lookup that misses).
            name: "into_pod",
            program: EGRESS_PROGRAM,
            packet: packet::tcp4(
                (Ipv4Addr::new(10, 244, 3, 3), 80),
                client,
                TcpFlags::Ack,
                b"y",
            ),
            warmup: Vec::new(),
            counter: None,
            new_flows: false,
        },
        Case {
            name: "node_port_remote_new_flow",
            program: FROM_UPLINK_PROGRAM,
            packet: packet::tcp4(EXTERNAL, (node_addr(0), NODE_PORTS[0]), TcpFlags::Syn, &[]),
            warmup: Vec::new(),
            counter: Some(Counter::LbNewFlow),
            new_flows: true,
        },
    ]
}

/// Measured runs per case; the fastest is reported, the usual defence
/// against a busy (virtual) machine's noise.
const RUNS: usize = 3;

fn run(datapath: &Datapath, case: &Case, repeat: u32) -> f64 {
    (0..RUNS)
        .map(|_| run_once(datapath, case, repeat))
        .fold(f64::INFINITY, f64::min)
}

fn run_once(datapath: &Datapath, case: &Case, repeat: u32) -> f64 {
    let program = datapath.tc_program(case.program).expect("program");
    let mut out = vec![0u8; case.packet.len() + 64];
    for packet in &case.warmup {
        program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("warm-up run");
    }
    let before = datapath.stats().expect("counters");
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&case.packet),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|err| panic!("{}: BPF_PROG_TEST_RUN: {err:?}", case.name));
    let moved = datapath.stats().expect("counters").since(&before);
    if let Some(counter) = case.counter {
        let hits = moved
            .iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |(_, value)| value.packets);
        assert!(
            hits * 1000 >= u64::from(repeat) * 999,
            "{}: only {hits} of {repeat} iterations took the measured path ({counter:?}); moved: {moved:?}",
            case.name
        );
    }
    result.duration.as_secs_f64() * 1e9
}

fn main() {
    tests::require_root();
    let args = args();
    assert!(args.repeat >= 1, "--repeat must be positive");
    let mut figures = Vec::new();
    for &services in &args.services {
        let started = Instant::now();
        let established = install(services, DatapathConfig::DEFAULT);
        // Every flow is new when nothing in connection tracking is live.
        let fresh = install(
            services,
            DatapathConfig {
                masq_addr: node_addr(0).into(),
                ct_timeout_tcp_syn_ns: 0,
                ct_timeout_tcp_established_ns: 0,
                ct_timeout_tcp_closing_ns: 0,
                ct_timeout_udp_ns: 0,
                ..DatapathConfig::DEFAULT
            },
        );
        eprintln!(
            "{services} services installed twice in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let client_port = cycling_client_port(established.maps());
        for case in cases(client_port) {
            let datapath = if case.new_flows { &fresh } else { &established };
            let ns = run(datapath, &case, args.repeat);
            eprintln!(
                "{:<28} {services:>7} services {ns:>7.1} ns/packet",
                case.name
            );
            figures.push(Figure::ours("datapath", services, case.name, ns, "ns"));
        }
    }
    figures::write(std::path::Path::new(&args.out), &figures);
}
