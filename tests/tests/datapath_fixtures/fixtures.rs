//! Packets that must pass byte for byte, each with the counter it moves,
//! and the coverage of every counter.

use super::*;

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
pub(super) fn assert_every_counter_covered(reached_by_steps: &[Counter]) {
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
