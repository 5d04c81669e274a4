//! What the agent's map writer leaves in the maps: tables by endpoint,
//! failed writes, retired blocks, a table naming a missing backend.

use super::*;

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
    assert_eq!(first.len(), 2_039);
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
