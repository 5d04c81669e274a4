//! The inspection commands' reading side: a pinned datapath, services
//! applied through the agent's pipeline, a packet through the program, and
//! what `svc-agent services | backends | conntrack | maglev` would print.

use std::{net::Ipv4Addr, path::PathBuf};
use svc_common::maglev::{DEFAULT_SLOTS_PER_BACKEND, table_size};

use aya::programs::{TestRun as _, TestRunOptions};
use svc_agent::{
    datapath::{Datapath, FROM_POD_PROGRAM, LoadOptions},
    inspect::{PinnedMaps, parse_frontend, write_state},
    model::{NodeInfo, Settings, translate},
    source::manifests::{Parsed, finish, parse},
    sync::Applier,
};
use tests::{
    packet::{self, TcpFlags},
    require_root,
};

const MANIFESTS: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.244.1.2], nodeName: node1}
  - {addresses: [10.244.2.2], nodeName: node2}
";

struct Dirs {
    pin: PathBuf,
    state: PathBuf,
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = Datapath::cleanup(&self.pin);
        let _ = std::fs::remove_file(&self.state);
    }
}

#[test]
fn pinned_maps_read_back_as_the_agent_wrote_them() {
    require_root();
    let id = std::process::id();
    let dirs = Dirs {
        pin: PathBuf::from(format!("/sys/fs/bpf/svc-test-inspect-{id}")),
        state: std::env::temp_dir().join(format!("svc-test-inspect-{id}.json")),
    };
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: Some(dirs.pin.clone()),
        ..LoadOptions::default()
    })
    .expect("the datapath must load");
    let mut parsed = Parsed::default();
    let mut problems = Vec::new();
    parse(MANIFESTS, "inline", &mut parsed, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    let objects = finish(parsed);
    let node = NodeInfo {
        name: "node1".to_owned(),
        addrs: vec![Ipv4Addr::new(192, 168, 1, 10)],
        zone: None,
        pod_cidrs: Vec::new(),
    };
    let translation = translate(
        &objects.services,
        &objects.slices,
        &node,
        &Settings::default(),
    );
    let report = Applier::new().apply(datapath.maps_mut(), &translation.desired);
    assert!(report.errors.is_empty(), "{report:?}");
    write_state(&dirs.state, &translation.desired).expect("state file");

    // One SYN to the ClusterIP: a flow, counted.
    let syn = packet::tcp4(
        (Ipv4Addr::new(10, 244, 1, 5), 40_000),
        (Ipv4Addr::new(10, 96, 0, 10), 80),
        TcpFlags::Syn,
        &[],
    );
    let program = datapath.tc_program(FROM_POD_PROGRAM).expect("program");
    let mut out = vec![0u8; 128];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&syn),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("test run");
    assert_eq!(result.return_value, 0);

    let maps = PinnedMaps::open(&dirs.pin).expect("the pinned maps open by path");
    let services = maps.services(&dirs.state).expect("services");
    let labels: Vec<(&str, &str, &str)> = services
        .iter()
        .map(|r| (r.service.as_str(), r.kind.as_str(), r.frontend.as_str()))
        .collect();
    assert_eq!(
        labels,
        vec![
            ("shop/web:http", "NodePort", "*:30080/TCP"),
            ("shop/web:http", "ClusterIP", "10.96.0.10:80/TCP"),
        ]
    );
    let cluster_ip = &services[1];
    assert_eq!(
        cluster_ip.backends,
        vec!["10.244.1.2:8080", "10.244.2.2:8080"]
    );
    assert_eq!(cluster_ip.affinity_timeout_secs, Some(10_800));
    assert_eq!(
        cluster_ip.packets, 1,
        "the SYN is counted under its frontend"
    );
    assert!(
        services[0].flags.is_empty(),
        "a Cluster policy masquerades what is not local: nothing to flag"
    );

    let frontend = parse_frontend("10.96.0.10:80/TCP").expect("label");
    let table = maps.maglev(&frontend).expect("maglev").expect("installed");
    assert_eq!(table.size, table_size(2, DEFAULT_SLOTS_PER_BACKEND));
    assert_eq!(
        table.slots.iter().map(|(_, slots)| slots).sum::<u32>(),
        table.size
    );
    let backends = maps.backends_of(&frontend).expect("backends");
    assert_eq!(
        backends.iter().map(|(_, _, c)| c.packets).sum::<u64>(),
        1,
        "the SYN is counted under the backend it went to"
    );

    let flows = maps.conntrack(Some("10.244.1.5:40000")).expect("conntrack");
    assert_eq!(flows.len(), 2, "both directions of the flow: {flows:?}");
    assert!(
        flows
            .iter()
            .any(|f| f.direction == "original" && f.to == "10.96.0.10:80")
    );
    assert!(
        maps.conntrack(Some("203.0.113.1"))
            .expect("conntrack")
            .is_empty()
    );
}

/// Pins a fresh one-entry array map at `path` through the bpf syscall, as
/// an older agent's map of another layout would be.
fn pin_a_map(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    // map_type, key_size, value_size, max_entries, then zeroes.
    let mut create = [0u32; 32];
    create[..4].copy_from_slice(&[BPF_MAP_TYPE_ARRAY, 4, 4, 1]);
    // SAFETY: a BPF_MAP_CREATE attribute of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            create.as_ptr(),
            size_of_val(&create),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("a path");
    // pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut pin = [0u64; 4];
    pin[0] = name.as_ptr() as u64;
    pin[1] = u64::try_from(fd).expect("an fd");
    // SAFETY: a BPF_OBJ_PIN attribute of the size given; `name` outlives the call.
    let result =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), size_of_val(&pin)) };
    assert_eq!(
        result,
        0,
        "BPF_OBJ_PIN: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: our own fd; the pin keeps the map.
    unsafe { libc::close(i32::try_from(fd).expect("an fd")) };
}

#[test]
fn a_new_layout_removes_the_maps_an_older_one_pinned() {
    require_root();
    let dirs = Dirs {
        pin: PathBuf::from(format!("/sys/fs/bpf/svc-test-stale-{}", std::process::id())),
        state: std::env::temp_dir().join(format!("svc-test-stale-{}.json", std::process::id())),
    };
    let options = LoadOptions {
        pin_dir: Some(dirs.pin.clone()),
        ..LoadOptions::default()
    };
    drop(Datapath::load(&options).expect("the datapath must load"));
    let stale = dirs.pin.join("SVC_STATS_V1");
    pin_a_map(&stale);
    let datapath = Datapath::load(&options).expect("the datapath must load again");
    assert!(datapath.adopted(), "the current maps are adopted");
    assert!(!stale.exists(), "the older layout's map is unpinned");
    assert!(
        dirs.pin.join(svc_common::stats::STATS_MAP).exists(),
        "the current layout's maps stay"
    );
}

/// Pinned values come from another run: an entry whose Maglev block runs
/// past the end of the numbers is refused with a message naming it, not
/// trusted in arithmetic, and inspection says the same.
#[test]
fn adoption_refuses_a_pinned_entry_it_cannot_have_written() {
    use aya::maps::{HashMap, Map, MapData};
    use svc_common::lb::{SCOPE_ADDR, SERVICES_MAP, ServiceKey, ServiceValue};
    require_root();
    let id = std::process::id();
    let dirs = Dirs {
        pin: PathBuf::from(format!("/sys/fs/bpf/svc-test-corrupt-{id}")),
        state: std::env::temp_dir().join(format!("svc-test-corrupt-{id}.json")),
    };
    let options = LoadOptions {
        pin_dir: Some(dirs.pin.clone()),
        ..LoadOptions::default()
    };
    drop(Datapath::load(&options).expect("the datapath must load"));
    let pinned = MapData::from_pin(dirs.pin.join(SERVICES_MAP)).expect("the pinned services");
    let mut services: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(Map::HashMap(pinned)).expect("a hash map");
    let key = ServiceKey {
        addr: svc_common::wire::WireAddr::from_octets([10, 96, 0, 99]),
        port: svc_common::wire::WirePort::from_host(80),
        protocol: svc_common::proto::TCP,
        scope: SCOPE_ADDR,
    };
    let value = ServiceValue {
        id: svc_common::wire::FrontendId::new(1),
        maglev_offset: u32::MAX - 5,
        maglev_size: 251,
        backend_count: 1,
        ..ServiceValue::default()
    };
    services.insert(key, value, 0).expect("insert");
    let err = Datapath::load(&options)
        .err()
        .expect("the corrupt entry is refused");
    assert!(
        err.to_string().contains("Maglev block"),
        "the message says what is wrong: {err}"
    );
    let err = PinnedMaps::open(&dirs.pin)
        .expect("the pins open")
        .services(&dirs.state)
        .expect_err("inspection refuses it too");
    assert!(err.to_string().contains("Maglev table"), "{err}");

    // A block inside the map whose slots (never written: zero) name
    // backend 0, which is no backend.
    let zeroed = ServiceValue {
        maglev_offset: 0,
        ..value
    };
    services.insert(key, zeroed, 0).expect("insert");
    let err = Datapath::load(&options)
        .err()
        .expect("a table naming backend 0 is refused");
    assert!(
        err.to_string().contains("backend 0"),
        "the message says what is wrong: {err}"
    );
    PinnedMaps::open(&dirs.pin)
        .expect("the pins open")
        .services(&dirs.state)
        .expect_err("inspection refuses it too");
}
