//! Source NAT: no masquerade address, an exhausted port range, every
//! port of the range used.

use super::*;

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
