//! The agent's manifest source driving the datapath in the two-node
//! namespace cluster: services and endpoints are created, changed and
//! deleted by editing files, and real traffic follows. Each node runs the
//! agent's own pipeline (watch → translate → apply), as `svc-agent run
//! --manifests` does.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use svc_agent::{
    model::{Settings, Translator},
    source::manifests::Watch,
    sync::Applier,
};
use tests::{
    agents::{Agents, node_info},
    servers::read_answer,
    topology::{Cluster, Options, TIMEOUT},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

fn web(endpoints: &[(&str, &str)]) -> String {
    let mut text = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  clusterIP: {CLUSTER_IP}
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
"
    );
    for (addr, node) in endpoints {
        let _ = writeln!(text, "  - {{addresses: [{addr}], nodeName: {node}}}");
    }
    text
}

fn answers(cluster: &Cluster, to: SocketAddrV4, count: usize) -> HashMap<String, usize> {
    let client = cluster.pod("z");
    let mut seen = HashMap::new();
    for i in 0..count {
        let answer = client
            .ask(to)
            .unwrap_or_else(|err| panic!("connection {i} to {to}: {err}"));
        *seen.entry(answer.name).or_insert(0) += 1;
    }
    seen
}

fn cluster() -> Cluster {
    cluster_with(Options::default())
}

fn cluster_with(options: Options) -> Cluster {
    let mut cluster = Cluster::new(options);
    cluster.nodes[0].add_pod("z", 5);
    for (node, name, host) in [(0, "a", 2), (1, "b", 2)] {
        cluster.nodes[node].add_pod(name, host).serve_tcp(8080);
    }
    cluster
}

fn refused_or_unreachable(to: SocketAddrV4, cluster: &Cluster) -> bool {
    let result = cluster
        .pod("z")
        .ns
        .run(|| TcpStream::connect_timeout(&to.into(), Duration::from_secs(1)));
    result.is_err()
}

#[test]
fn editing_manifest_files_moves_real_traffic() {
    let mut cluster = cluster();
    let mut agents = Agents::new(&cluster);

    // Create: a service with a local and a remote endpoint.
    agents.write(
        "web.yaml",
        &web(&[("10.244.1.2", "node1"), ("10.244.2.2", "node2")]),
    );
    agents.sync(&mut cluster);
    let seen = answers(&cluster, SocketAddrV4::new(CLUSTER_IP, 80), 40);
    assert!(seen.contains_key("a") && seen.contains_key("b"), "{seen:?}");

    // Change: the local endpoint leaves the slice.
    agents.write("web.yaml", &web(&[("10.244.2.2", "node2")]));
    agents.sync(&mut cluster);
    let seen = answers(&cluster, SocketAddrV4::new(CLUSTER_IP, 80), 20);
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["b"], "{seen:?}");

    // Add: a selector-less service whose hand-written Endpoints point at a.
    agents.write(
        "outside.yaml",
        &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: outside}}
spec:
  clusterIP: {OUTSIDE_IP}
  ports: [{{port: 81, targetPort: 8080}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: outside}}
subsets:
  - addresses: [{{ip: 10.244.1.2}}]
    ports: [{{port: 8080}}]
"
        ),
    );
    agents.sync(&mut cluster);
    let seen = answers(&cluster, SocketAddrV4::new(OUTSIDE_IP, 81), 5);
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["a"], "{seen:?}");

    // No endpoints left: refused at once.
    agents.write("web.yaml", &web(&[]));
    agents.sync(&mut cluster);
    let err = cluster
        .pod("z")
        .connect(SocketAddrV4::new(CLUSTER_IP, 80))
        .expect_err("no endpoints");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    // Delete: the file goes, and so does the service.
    agents.remove("web.yaml");
    agents.sync(&mut cluster);
    for node in &cluster.nodes {
        let maps = node.datapath().maps();
        let frontend = svc_agent::datapath::Frontend::Address {
            addr: CLUSTER_IP,
            port: 80,
            protocol: svc_agent::datapath::Protocol::Tcp,
        };
        assert!(
            maps.service(&frontend).is_none(),
            "{}: still installed",
            node.name
        );
    }
    assert!(refused_or_unreachable(
        SocketAddrV4::new(CLUSTER_IP, 80),
        &cluster
    ));
    // The other service is untouched.
    let stream = cluster
        .pod("z")
        .connect(SocketAddrV4::new(OUTSIDE_IP, 81))
        .expect("outside still served");
    assert_eq!(read_answer(&stream, TIMEOUT).expect("answer").name, "a");
}

#[test]
fn the_applier_writes_only_what_changed_and_shares_backends() {
    use svc_agent::{
        datapath::{Datapath, LoadOptions},
        model::{Desired, Endpoint, FrontendSpec, ServicePortRef},
    };
    tests::require_root();
    let mut datapath = Datapath::load(&LoadOptions::default()).expect("the datapath must load");
    let shared = Endpoint {
        addr: SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 8080),
        local: true,
        terminating: false,
    };
    let other = Endpoint {
        addr: SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 8080),
        ..shared
    };
    let frontend = |last: u8| svc_agent::datapath::Frontend::Address {
        addr: Ipv4Addr::new(10, 96, 0, last),
        port: 80,
        protocol: svc_agent::datapath::Protocol::Tcp,
    };
    let spec = |endpoints: &[Endpoint]| FrontendSpec {
        service: ServicePortRef {
            namespace: "ns".to_owned(),
            name: "s".to_owned(),
            port: String::new(),
        },
        kind: svc_agent::model::FrontendKind::ClusterIp,
        policy: svc_agent::datapath::ServicePolicy::default(),
        endpoints: endpoints.iter().copied().collect(),
        serving: std::collections::BTreeSet::new(),
    };
    let mut desired = Desired::default();
    desired
        .frontends
        .insert(frontend(1), spec(&[shared, other]));
    desired.frontends.insert(frontend(2), spec(&[shared]));
    let mut applier = Applier::new();

    let first = applier.apply(datapath.maps_mut(), &desired);
    assert_eq!(
        (first.frontends_written, first.backends_added),
        (2, 2),
        "{first:?}"
    );
    assert_eq!(applier.sizes(), (2, 2), "the shared backend is stored once");
    let again = applier.apply(datapath.maps_mut(), &desired);
    assert!(
        !again.changed(),
        "nothing changed, nothing written: {again:?}"
    );

    desired.frontends.remove(&frontend(1));
    let removed = applier.apply(datapath.maps_mut(), &desired);
    assert_eq!(
        (removed.frontends_removed, removed.backends_removed),
        (1, 1),
        "the backend only the removed frontend named goes; the shared one stays: {removed:?}"
    );
    assert!(applier.backend_id(shared.addr).is_some());
    assert!(applier.backend_id(other.addr).is_none());

    desired.frontends.clear();
    let emptied = applier.apply(datapath.maps_mut(), &desired);
    assert_eq!(
        (emptied.frontends_removed, emptied.backends_removed),
        (1, 1)
    );
    assert_eq!(applier.sizes(), (0, 0));
    assert_eq!(
        datapath.maps().maglev_free_slots(),
        svc_common::lb::DEFAULT_MAGLEV_SLOTS,
        "every block freed"
    );
}

/// Echoes a line over an established connection, panicking with `when`.
fn echo(stream: &mut TcpStream, when: &str) {
    use std::io::{Read as _, Write as _};
    stream.write_all(b"ping\n").expect("write");
    let mut buf = [0u8; 5];
    stream
        .read_exact(&mut buf)
        .unwrap_or_else(|err| panic!("{when}: the established connection broke: {err}"));
    assert_eq!(&buf, b"ping\n", "{when}");
}

#[test]
fn established_connections_survive_an_agent_restart() {
    let mut cluster = cluster_with(Options {
        pinned: true,
        ..Options::default()
    });
    let mut agents = Agents::new(&cluster);
    agents.write(
        "web.yaml",
        &web(&[("10.244.1.2", "node1"), ("10.244.2.2", "node2")]),
    );
    agents.sync(&mut cluster);
    let to = SocketAddrV4::new(CLUSTER_IP, 80);
    let mut streams: Vec<TcpStream> = (0..6)
        .map(|i| {
            let stream = cluster
                .pod("z")
                .connect(to)
                .unwrap_or_else(|err| panic!("connection {i}: {err}"));
            read_answer(&stream, TIMEOUT).expect("answer");
            stream
        })
        .collect();
    let ct_before = cluster.nodes[0]
        .datapath()
        .maps()
        .ct_entries()
        .expect("CT")
        .len();

    // The agents stop: the pinned programs and maps keep serving.
    for node in &mut cluster.nodes {
        node.stop_agent();
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        echo(stream, &format!("connection {i} with the agents stopped"));
    }
    let seen = answers(&cluster, to, 10);
    assert!(
        !seen.is_empty(),
        "new connections work with the agents stopped"
    );

    // They start again, adopt the pinned maps, resync: nothing to write.
    for node in &mut cluster.nodes {
        assert!(node.start_agent(), "{}: adopts the pinned maps", node.name);
    }
    for ((_, translator, applier), node) in agents.per_node.iter_mut().zip(&mut cluster.nodes) {
        *applier = Applier::adopt(node.datapath().maps());
        // A restarted agent starts from nothing but the files.
        let mut watch = Watch::new(&agents.dir);
        assert!(watch.poll().expect("manifests"));
        *translator = Translator::new(node_info(node), Settings::default());
        translator.update(watch.take_dirty(), &watch);
        let report = applier.apply(node.datapath_mut().maps_mut(), translator.desired());
        assert!(
            !report.changed() && report.errors.is_empty(),
            "{}: an unchanged cluster writes nothing after a restart: {report:?}",
            node.name
        );
    }
    let ct_after = cluster.nodes[0]
        .datapath()
        .maps()
        .ct_entries()
        .expect("CT")
        .len();
    assert!(
        ct_after >= ct_before,
        "connection tracking kept across the restart ({ct_before} entries before, {ct_after} after)"
    );
    for (i, stream) in streams.iter_mut().enumerate() {
        echo(stream, &format!("connection {i} after the restart"));
    }

    // And the restarted agents still follow the files.
    agents.write("web.yaml", &web(&[("10.244.2.2", "node2")]));
    agents.sync(&mut cluster);
    let seen = answers(&cluster, to, 10);
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["b"], "{seen:?}");
}

#[test]
fn host_sockets_stay_translated_while_the_agent_restarts() {
    let mut cluster = cluster_with(Options {
        pinned: true,
        host_sockets_on_node1: true,
        ..Options::default()
    });
    let mut agents = Agents::new(&cluster);
    agents.write(
        "web.yaml",
        &web(&[("10.244.1.2", "node1"), ("10.244.2.2", "node2")]),
    );
    agents.sync(&mut cluster);
    let to = SocketAddrV4::new(CLUSTER_IP, 80);
    let from_node = |cluster: &Cluster, when: &str| {
        let stream = cluster.nodes[0]
            .ns
            .run(|| TcpStream::connect_timeout(&to.into(), TIMEOUT))
            .unwrap_or_else(|err| panic!("{when}: the node's own connection failed: {err}"));
        let answer = read_answer(&stream, TIMEOUT).expect("answer");
        assert!(
            ["a", "b"].contains(&answer.name.as_str()),
            "{when}: {answer:?}"
        );
    };
    from_node(&cluster, "agent running");
    cluster.nodes[0].stop_agent();
    from_node(&cluster, "agent stopped");
    assert!(cluster.nodes[0].start_agent(), "adopts the pinned maps");
    from_node(&cluster, "agent restarted");
}
