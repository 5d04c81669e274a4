//! The tc program run through BPF_PROG_TEST_RUN on a table of crafted
//! packets: verdict, output bytes and counters per fixture.

use std::net::Ipv4Addr;

use aya::programs::{TestRun as _, TestRunOptions};
use svc_agent::datapath::{Datapath, LoadOptions};
use svc_common::stats::{Counter, CounterValue};
use tests::{
    packet::{self, ETH_HLEN},
    require_root,
};

const TC_ACT_OK: u32 = 0;
const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 1, 0, 5), 40_000);
const SERVER: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);

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

fn fixtures() -> Vec<Fixture> {
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

#[test]
fn every_fixture_passes_unchanged_and_bumps_exactly_its_counter() {
    require_root();
    let datapath = Datapath::load(&LoadOptions::default()).expect("the datapath must load");
    let program = datapath
        .tc_program()
        .expect("the tc program must be loaded");
    for Fixture {
        name,
        packet,
        counter,
    } in fixtures()
    {
        let before = datapath.stats().expect("counters must be readable");
        let mut out = vec![0u8; packet.len() + 64];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|err| panic!("{name}: BPF_PROG_TEST_RUN failed: {err:?}"));
        assert_eq!(result.return_value, TC_ACT_OK, "{name}: verdict");
        let out_len = usize::try_from(result.data_size_out).expect("output size fits usize");
        assert_eq!(
            &out[..out_len],
            &packet[..],
            "{name}: the packet must pass byte for byte"
        );

        let after = datapath.stats().expect("counters must be readable");
        let expected = CounterValue {
            packets: 1,
            bytes: packet.len() as u64,
        };
        assert_eq!(
            after.since(&before),
            vec![(counter, expected)],
            "{name}: exactly one counter must move"
        );
    }
}

/// Frames BPF_PROG_TEST_RUN refuses (EINVAL) before running a tc program:
/// shorter than an Ethernet header, or IPv4 shorter than a minimal IPv4
/// header. A real hook can still see them, so the program counts them; this
/// table keeps the counters covered and notices a kernel that starts to
/// accept them.
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

#[test]
fn every_counter_has_a_fixture() {
    let covered: Vec<Counter> = fixtures()
        .iter()
        .chain(&refused_by_test_run())
        .map(|f| f.counter)
        .collect();
    for counter in Counter::ALL {
        assert!(covered.contains(counter), "no fixture reaches {counter:?}");
    }
}

#[test]
fn frames_the_kernel_refuses_to_test_run_are_still_refused() {
    require_root();
    let datapath = Datapath::load(&LoadOptions::default()).expect("the datapath must load");
    let program = datapath
        .tc_program()
        .expect("the tc program must be loaded");
    for Fixture { name, packet, .. } in refused_by_test_run() {
        let result = program.test_run(TestRunOptions {
            data_in: Some(&packet),
            ..TestRunOptions::default()
        });
        assert!(
            result.is_err(),
            "{name}: the kernel now runs tc programs on it; move it to fixtures()"
        );
    }
}
