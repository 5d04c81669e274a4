//! Map writes that fail are reported as typed errors naming what failed;
//! everything else is applied, nothing is half-written or leaked, and the
//! next apply tries the same writes again.

use std::net::{Ipv4Addr, SocketAddrV4};

use svc_agent::{
    datapath::{self, Capacities, Datapath, Frontend, LoadOptions},
    model::{NodeInfo, Settings, translate},
    source::manifests::{Parsed, finish, parse},
    sync::{Applier, ApplyError},
};
use tests::require_root;

/// Three services: `a` and `b` with two endpoints each, `c` sharing `a`'s.
const MANIFESTS: &str = "
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-1, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.1]}, {addresses: [10.244.0.2]}]
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: b-1, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.3]}, {addresses: [10.244.0.4]}]
---
apiVersion: v1
kind: Service
metadata: {name: c}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: c-1, labels: {kubernetes.io/service-name: c}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.1]}, {addresses: [10.244.0.2]}]
";

fn frontend(last: u8) -> Frontend {
    Frontend::tcp(Ipv4Addr::new(10, 96, 0, last), 80)
}

#[test]
fn failed_writes_are_typed_errors_and_the_rest_is_applied() {
    require_root();
    // Backend ids 1..=3 (0 means none), and room for two Maglev tables of
    // 251 slots (two endpoints each, at 100 slots per backend) but not
    // three.
    let mut datapath = Datapath::load(&LoadOptions {
        capacities: Capacities {
            backends: 4,
            maglev_slots: 600,
            ..Capacities::default()
        },
        maglev_slots_per_backend: 100,
        ..LoadOptions::default()
    })
    .expect("the datapath must load");
    let mut parsed = Parsed::default();
    let mut problems = Vec::new();
    parse(MANIFESTS, "inline", &mut parsed, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    let objects = finish(parsed);
    let desired = translate(
        &objects.services,
        &objects.slices,
        &NodeInfo::default(),
        &Settings::default(),
    )
    .desired;

    let mut applier = Applier::new();
    for round in 1..=2 {
        let report = applier.apply(datapath.maps_mut(), &desired);
        let kinds: Vec<&str> = report.errors.iter().map(ApplyError::kind).collect();
        assert_eq!(
            kinds,
            ["backend", "frontend"],
            "round {round}: {:?}",
            report.errors
        );
        assert!(
            matches!(
                &report.errors[0],
                ApplyError::Backend {
                    addr,
                    source: datapath::Error::BackendIdOutOfRange { id, capacity: 4 },
                } if *addr == SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 4), 8080) && id.get() == 4
            ),
            "round {round}: b's second endpoint has no id: {}",
            report.errors[0]
        );
        assert!(
            matches!(
                &report.errors[1],
                ApplyError::Frontend {
                    frontend: f,
                    service,
                    source: datapath::Error::MaglevFull { needed: 251, free: 98 },
                } if *f == frontend(3) && service == "default/c"
            ),
            "round {round}: c's table has no room: {}",
            report.errors[1]
        );
        assert_eq!(
            report.frontends_written,
            if round == 1 { 2 } else { 1 },
            "round {round}: a and b written, then b again for its missing backend"
        );
        let maps = datapath.maps();
        assert!(maps.service(&frontend(1)).is_some(), "a is installed");
        assert!(maps.service(&frontend(2)).is_some(), "b is installed");
        assert!(maps.service(&frontend(3)).is_none(), "c is not");
        assert_eq!(
            applier.sizes(),
            (2, 3),
            "round {round}: two frontends, three backends, nothing leaked"
        );
    }
}
