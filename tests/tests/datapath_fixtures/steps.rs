//! Flows translated step by step, each packet with its expected output.

use super::{fixtures::assert_every_counter_covered, *};

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
    const C4: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 1, 0, 11), 40_000);
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
        // A host-network endpoint on this node: the node's own stack
        // answers, straight into the client pod's veth, where only the
        // egress program sees the reply.
        |_| {
            step(
                "pod SYN to a service whose endpoint is this node's address: DNAT to the node",
                POD,
                packet::tcp4(C4, (HOST_SVC, 80), SYN, &[]),
                packet::tcp4(C4, (NODE, 8081), SYN, &[]),
                NEW_TCP,
            )
        },
        |_| {
            step(
                "the node's SYN-ACK into the pod: reverse-translated at the veth's egress",
                EGRESS,
                packet::tcp4((NODE, 8081), C4, SYNACK, &[]),
                packet::tcp4((HOST_SVC, 80), C4, SYNACK, &[]),
                &[Counter::LbReply],
            )
        },
        |_| {
            step(
                "SYN from outside to a node port whose endpoint is this node: DNAT only, never masqueraded to the node itself",
                UPLINK,
                packet::tcp4(EXTERNAL, (NODE, NODE_PORT_HOST), SYN, &[]),
                packet::tcp4(EXTERNAL, (NODE, 8081), SYN, &[]),
                NEW_TCP,
            )
        },
        |_| {
            step(
                "the node's SYN-ACK out of the uplink: reverse-translated at egress",
                EGRESS,
                packet::tcp4((NODE, 8081), EXTERNAL, SYNACK, &[]),
                packet::tcp4((NODE, NODE_PORT_HOST), EXTERNAL, SYNACK, &[]),
                &[Counter::LbReply],
            )
        },
        |_| {
            let packet = packet::tcp4((NODE, 22), C4, TcpFlags::Ack, b"ssh");
            step(
                "the node's own connection into the pod: untouched at egress",
                EGRESS,
                packet.clone(),
                packet,
                &[],
            )
        },
        |_| {
            let packet = packet::tcp4(SERVER, C4, TcpFlags::Ack, b"hi");
            step(
                "a packet from elsewhere into the pod: untouched at egress (translated where it entered)",
                EGRESS,
                packet.clone(),
                packet,
                &[],
            )
        },
    ]
}

// ---------------------------------------------------------------------------
// Running the tables.

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
