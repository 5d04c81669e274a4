//! The lifecycle of connection-tracking entries with real traffic: entries
//! share their flow's lifetime and never translate a packet that is not
//! their flow's.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    thread,
};

use svc_agent::datapath::{Frontend, ServicePolicy};
use tests::{
    agents::Agents,
    servers::read_answer,
    topology::{Cluster, Options, QUICK_TIMEOUT, TIMEOUT},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A connection from `z`'s `port` to `to`, answered, echoed once and
/// closed by the client; returns who answered and the source they saw.
fn exchange(cluster: &Cluster, port: u16, to: SocketAddrV4, what: &str) -> (String, SocketAddr) {
    let mut stream = cluster
        .pod("z")
        .connect_from(port, to)
        .unwrap_or_else(|err| panic!("{what}: connect: {err}"));
    let answer = read_answer(&stream, TIMEOUT).unwrap_or_else(|err| panic!("{what}: {err}"));
    stream.write_all(b"ping\n").expect("write");
    let mut buf = [0u8; 5];
    stream
        .read_exact(&mut buf)
        .unwrap_or_else(|err| panic!("{what}: echo: {err}"));
    (answer.name, answer.peer)
}

#[test]
fn a_direct_connection_from_the_port_a_service_connection_used_is_left_alone() {
    let mut cluster = Cluster::new(Options {
        quick_timeouts: true,
        ..Options::default()
    });
    cluster.nodes[0].add_pod("z", 5);
    cluster.nodes[0].add_pod("a", 2).serve_tcp(8080);
    cluster.nodes[1].add_pod("b", 2).serve_tcp(8080);
    for (backend, port) in [("a", 40_100), ("b", 40_200)] {
        cluster.apply(
            &[Frontend::tcp(CLUSTER_IP, 80)],
            &ServicePolicy::default(),
            &[(backend, 8080)],
        );
        let backend_addr = addr(cluster.pod(backend).addr, 8080);
        let z = SocketAddr::V4(addr(cluster.pod("z").addr, port));
        let (name, _) = exchange(&cluster, port, addr(CLUSTER_IP, 80), "through the service");
        assert_eq!(name, backend);
        // The service connection is closed (its entries are closing); the
        // pod now reaches the same backend directly from the same port,
        // as a StatefulSet peer or a scraper does. Its SYN-ACK must not be
        // rewritten to come from the service.
        let (name, peer) = exchange(&cluster, port, backend_addr, "direct, right after");
        assert_eq!((name.as_str(), peer), (backend, z), "{backend}: direct");
        // And once the service flow has timed out too.
        thread::sleep(QUICK_TIMEOUT + QUICK_TIMEOUT / 2);
        let (name, peer) = exchange(&cluster, port + 1, backend_addr, "direct, other port");
        assert_eq!((name.as_str(), peer.ip()), (backend, z.ip()));
        let (name, peer) = exchange(&cluster, port, backend_addr, "direct, after the timeout");
        assert_eq!(
            (name.as_str(), peer),
            (backend, z),
            "{backend}: direct, later"
        );
    }
}

#[test]
fn a_service_connection_from_the_port_of_an_open_direct_connection_takes_another() {
    let mut cluster = Cluster::new(Options::default());
    cluster.nodes[0].add_pod("z", 5);
    cluster.nodes[0].add_pod("a", 2).serve_tcp(8080);
    cluster.nodes[1].add_pod("b", 2).serve_tcp(8080);
    let z = cluster.pod("z").addr;
    for (backend, port) in [("a", 40_300), ("b", 40_400)] {
        cluster.apply(
            &[Frontend::tcp(CLUSTER_IP, 80)],
            &ServicePolicy::default(),
            &[(backend, 8080)],
        );
        let backend_addr = addr(cluster.pod(backend).addr, 8080);
        // A peer connection the datapath does not translate, left open.
        let mut direct = cluster
            .pod("z")
            .connect_from(port, backend_addr)
            .unwrap_or_else(|err| panic!("{backend}: direct: {err}"));
        let answer =
            read_answer(&direct, TIMEOUT).unwrap_or_else(|err| panic!("{backend}: direct: {err}"));
        assert_eq!(answer.peer, SocketAddr::V4(addr(z, port)));
        // The service connection from the same port would reach the
        // backend on the direct connection's tuple: it takes another port.
        let (name, peer) = exchange(&cluster, port, addr(CLUSTER_IP, 80), "through the service");
        assert_eq!(name, backend);
        assert_eq!(peer.ip(), z, "{backend}: the client's address is kept");
        assert_ne!(peer.port(), port, "{backend}: a port of the NAT range");
        direct.write_all(b"ping\n").expect("write");
        let mut buf = [0u8; 5];
        direct
            .read_exact(&mut buf)
            .unwrap_or_else(|err| panic!("{backend}: the direct connection goes on: {err}"));
    }
}

/// `name`: a ClusterIP service on `ip` port 80 (session affinity if
/// `sticky`), and its slice with `pods` (from a, on node1, and b, on
/// node2).
fn service(name: &str, ip: Ipv4Addr, sticky: bool, pods: &[&str]) -> String {
    let affinity = if sticky {
        "\n  sessionAffinity: ClientIP"
    } else {
        ""
    };
    let mut text = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  clusterIP: {ip}{affinity}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
"
    );
    for pod in pods {
        let (addr, node) = match *pod {
            "a" => ("10.244.1.2", "node1"),
            _ => ("10.244.2.2", "node2"),
        };
        let _ = writeln!(text, "  - {{addresses: [{addr}], nodeName: {node}}}");
    }
    text
}

#[test]
fn affinity_ends_when_its_backend_leaves_the_service_though_another_keeps_it() {
    const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
    const PLAIN: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
    let mut cluster = Cluster::new(Options::default());
    cluster.nodes[0].add_pod("z", 5);
    cluster.nodes[0].add_pod("a", 2).serve_tcp(8080);
    cluster.nodes[1].add_pod("b", 2).serve_tcp(8080);
    let mut agents = Agents::new(&cluster);
    agents.write("plain.yaml", &service("plain", PLAIN, false, &["a", "b"]));
    agents.write("sticky.yaml", &service("sticky", STICKY, true, &["a", "b"]));
    agents.sync(&mut cluster);
    let ask = |cluster: &Cluster, to: Ipv4Addr| {
        cluster
            .pod("z")
            .ask(addr(to, 80))
            .unwrap_or_else(|err| panic!("{to}: {err}"))
            .name
    };
    let pinned = ask(&cluster, STICKY);
    for _ in 0..5 {
        assert_eq!(ask(&cluster, STICKY), pinned, "affinity holds");
    }
    // The pinned pod leaves sticky but stays in plain (two services
    // selecting the same pods).
    let other = if pinned == "a" { "b" } else { "a" };
    agents.write("sticky.yaml", &service("sticky", STICKY, true, &[other]));
    agents.sync(&mut cluster);
    for i in 0..10 {
        assert_eq!(
            ask(&cluster, STICKY),
            other,
            "connection {i}: affinity to a pod no longer in sticky's table is not honoured"
        );
    }
    let seen: std::collections::BTreeSet<String> = (0..12).map(|_| ask(&cluster, PLAIN)).collect();
    assert!(
        seen.contains(&pinned),
        "plain still sends to {pinned}: {seen:?}"
    );
}

/// Runs `f` on a thread with a private mount namespace in which
/// `/proc/timer_list` reads as empty, as in an unprivileged container.
fn with_timer_list_masked<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: this thread leaves the process's mount namespace
                // (and its filesystem attributes) for a private copy.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_FS) };
                assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
                let mount = |source: &std::ffi::CStr, target: &std::ffi::CStr, flags| {
                    // SAFETY: NUL-terminated strings that outlive the call.
                    let rc = unsafe {
                        libc::mount(
                            source.as_ptr(),
                            target.as_ptr(),
                            std::ptr::null(),
                            flags,
                            std::ptr::null(),
                        )
                    };
                    assert_eq!(rc, 0, "mount: {}", std::io::Error::last_os_error());
                };
                mount(c"none", c"/", libc::MS_REC | libc::MS_PRIVATE);
                mount(c"/dev/null", c"/proc/timer_list", libc::MS_BIND);
                assert_eq!(
                    std::fs::read_to_string("/proc/timer_list").expect("readable"),
                    "",
                    "masked"
                );
                f()
            })
            .join()
            .expect("the masked thread")
    })
}

#[test]
fn a_restart_keeps_the_clock_the_pinned_entries_were_stamped_with() {
    const NODE_PORT: u16 = 30_080;
    const NAT_PORTS: u16 = 8;
    let mut cluster = Cluster::new(Options {
        pinned: true,
        quick_timeouts: true,
        nat_ports: Some((61_000, 61_000 + NAT_PORTS - 1)),
        ..Options::default()
    });
    cluster.nodes[1].add_pod("b", 2).serve_tcp(8080);
    cluster.apply(
        &[Frontend::node_port_tcp(NODE_PORT)],
        &ServicePolicy::default(),
        &[("b", 8080)],
    );
    let node1 = cluster.nodes[0].addr;
    // Every NAT port once: masqueraded connections from outside, closed.
    let fill = |cluster: &Cluster, when: &str| {
        for i in 0..NAT_PORTS {
            let answer = cluster
                .external
                .ask(addr(node1, NODE_PORT))
                .unwrap_or_else(|err| panic!("{when}: connection {i}: {err}"));
            assert_eq!(answer.peer.ip(), std::net::IpAddr::V4(node1), "masqueraded");
        }
    };
    fill(&cluster, "before the restart");
    let tick = cluster.nodes[0].datapath().config().ns_per_tick;

    // The agent restarts where /proc/timer_list cannot be read.
    cluster.nodes[0].stop_agent();
    let adopted = with_timer_list_masked(|| cluster.nodes[0].start_agent());
    assert!(adopted, "the pinned maps are adopted");
    assert_eq!(
        cluster.nodes[0].datapath().config().ns_per_tick,
        tick,
        "the same clock"
    );
    // The closed flows time out as they would have, freeing their ports.
    thread::sleep(QUICK_TIMEOUT + QUICK_TIMEOUT / 2);
    fill(&cluster, "after the restart");

    // Pins of an agent that did not record its clock: the stamps tell.
    let meta = cluster.nodes[0]
        .pin_dir()
        .expect("pinned")
        .join(svc_common::config::META_MAP);
    cluster.nodes[0].stop_agent();
    std::fs::remove_file(&meta).expect("unpin the record of the clock");
    assert!(cluster.nodes[0].start_agent(), "adopted again");
    assert_eq!(
        cluster.nodes[0].datapath().config().ns_per_tick,
        tick,
        "the clock is read off the pinned stamps"
    );
    thread::sleep(QUICK_TIMEOUT + QUICK_TIMEOUT / 2);
    fill(&cluster, "after the second restart");
}

#[test]
fn a_full_table_evicts_live_flows_and_says_so() {
    const CT_ENTRIES: u32 = 256;
    let mut cluster = Cluster::new(Options {
        ct_entries: Some(CT_ENTRIES),
        ..Options::default()
    });
    cluster.nodes[0].add_pod("z", 5);
    cluster.nodes[0].add_pod("a", 2).serve_tcp(8080);
    cluster.nodes[1].add_pod("b", 2).serve_tcp(8080);
    let mut agents = Agents::new(&cluster);
    agents.write("web.yaml", &service("web", CLUSTER_IP, false, &["a", "b"]));
    agents.sync(&mut cluster);
    // Twice as many flows as the table holds entries for (two each).
    let mut streams: Vec<std::net::TcpStream> = (0..CT_ENTRIES)
        .map(|i| {
            let stream = cluster
                .pod("z")
                .connect(addr(CLUSTER_IP, 80))
                .unwrap_or_else(|err| panic!("connection {i}: {err}"));
            read_answer(&stream, TIMEOUT).unwrap_or_else(|err| panic!("connection {i}: {err}"));
            stream
        })
        .collect();
    let report = &agents.sweep(&mut cluster)[0];
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZero::get);
    assert!(
        svc_agent::sweeper::nearly_full(report.entries, CT_ENTRIES as usize, cpus),
        "the sweep sees the table full (the agent warns): {} of {CT_ENTRIES}",
        report.entries
    );
    let midstream = |cluster: &Cluster| {
        cluster.nodes[0]
            .datapath()
            .stats()
            .expect("counters")
            .get(svc_common::stats::Counter::LbNewFlowMidstream)
            .packets
    };
    let before = midstream(&cluster);
    for (i, stream) in streams.iter_mut().enumerate() {
        // The table did not change: a flow that lost its entries starts
        // again on the same backend and goes on.
        stream.write_all(b"ping\n").expect("write");
        let mut buf = [0u8; 5];
        stream
            .read_exact(&mut buf)
            .unwrap_or_else(|err| panic!("connection {i}: {err}"));
    }
    assert!(
        midstream(&cluster) > before,
        "segments of evicted connections are counted (lb_new_flow_midstream)"
    );
}

/// As many concurrent masqueraded connections to one backend as the NAT
/// range has ports: every one connects, and one more finds no port.
/// `SVC_NAT_TEST_CONNECTIONS` sets how many (2,000 by default); client
/// processes of at most 10,000 connections each hold them, and the backend
/// leaves them in its accept queue, so no process needs more open files
/// than this machine allows.
#[test]
fn masqueraded_connections_fill_the_whole_nat_range() {
    use std::{
        io::{BufRead as _, BufReader},
        process::{Command, Stdio},
    };
    const NODE_PORT: u16 = 30_080;
    const PER_CLIENT: u16 = 10_000;
    let connections: u16 = std::env::var("SVC_NAT_TEST_CONNECTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let first_port = 20_000;
    let mut cluster = Cluster::new(Options {
        nat_ports: Some((first_port, first_port + connections - 1)),
        ..Options::default()
    });
    // The client needs as many source ports.
    cluster
        .external
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    cluster.nodes[1]
        .add_pod("b", 2)
        .listen_tcp(8080, i32::from(connections) + 1);
    cluster.apply(
        &[Frontend::node_port_tcp(NODE_PORT)],
        &ServicePolicy::default(),
        &[("b", 8080)],
    );
    let to = addr(cluster.nodes[0].addr, NODE_PORT);
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    let mut left = connections;
    while left > 0 {
        let count = left.min(PER_CLIENT);
        left -= count;
        let mut child = Command::new(env!("CARGO_BIN_EXE_hold-connections"))
            .args([
                cluster.external.ns.name(),
                &to.to_string(),
                &count.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a client");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("its report");
        assert_eq!(line.trim(), format!("ok {count}"), "a client's connections");
        clients.push(child);
    }
    eprintln!(
        "{connections} masqueraded connections through {connections} NAT ports in {:?}",
        started.elapsed()
    );
    let exhausted = |cluster: &Cluster| {
        cluster.nodes[0]
            .datapath()
            .stats()
            .expect("counters")
            .get(svc_common::stats::Counter::DropNatPortsExhausted)
            .packets
    };
    assert_eq!(exhausted(&cluster), 0, "no port ran out");
    let datapath = cluster.nodes[0].datapath();
    let plan = svc_agent::datapath::conntrack::SweepPlan {
        now_ns: datapath.now_ns().expect("the datapath's clock"),
        config: *datapath.config(),
        ..Default::default()
    };
    let report = svc_agent::datapath::conntrack::sweep(datapath.maps().sweep_maps(), &plan)
        .expect("a sweep");
    assert_eq!(
        report.nat_ports_busiest,
        usize::from(connections),
        "the sweep sees the range full (svc_nat_port_fill_ratio 1, and the agent warns)"
    );
    // One more finds none.
    let err = cluster
        .external
        .ns
        .run(|| std::net::TcpStream::connect_timeout(&to.into(), std::time::Duration::from_secs(1)))
        .expect_err("the range is full");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(exhausted(&cluster) > 0, "counted");
    for mut client in clients {
        drop(client.stdin.take());
        let _ = client.wait();
    }
}
