//! Session affinity, traffic policies, topology, health check node ports
//! and load balancer source ranges.

use std::{collections::BTreeSet, net::SocketAddrV4, process::Command, time::Duration};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use svc_agent::inspect::PinnedMaps;
use tests::{eventually, topology::EXTERNAL_ADDR};

use super::harness::{
    AGENT_HTTP, CONVERGE, E2e, WEB_PORT, addr, agent_binary, datapath_counter, get, node_port,
    refusal,
};

/// Scenario 4.
pub(crate) fn affinity_and_traffic_policies(e2e: &mut E2e) {
    let (web1, web2) = (e2e.pod_addr("web-1"), e2e.pod_addr("web-2"));
    let sticky = e2e.apply_service(
        "sticky",
        &json!({"selector": {"app": "web"}, "sessionAffinity": "ClientIP",
               "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    let ip = E2e::cluster_ip(&sticky);
    e2e.converge(&format!("{ip}:80/TCP"), Some(&[web1, web2]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 12).len(),
        1,
        "ClientIP affinity: every connection from one client reaches one pod"
    );

    let local = e2e.apply_service(
        "local",
        &json!({"type": "NodePort", "externalTrafficPolicy": "Local",
               "selector": {"app": "web"},
               "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    let node_port = node_port(&local);
    // Each node's node port holds only its own pod.
    e2e.converge_on(0, &format!("*:{node_port}/TCP"), Some(&[web1]));
    e2e.converge_on(1, &format!("*:{node_port}/TCP"), Some(&[web2]));
    for (index, pod) in [(0, "web-1"), (1, "web-2")] {
        let node = e2e.cluster.nodes[index].addr;
        let mut seen = BTreeSet::new();
        // Local traffic policy: the datapath may pick only the node's own pod.
        let found = eventually(CONVERGE, || {
            let Ok(answer) = e2e.cluster.external.ask(SocketAddrV4::new(node, node_port)) else {
                return false;
            };
            seen.insert(answer.name.clone());
            answer.name == pod && answer.peer.ip() == std::net::IpAddr::V4(EXTERNAL_ADDR)
        });
        assert!(
            found,
            "node {node}: Local policy should reach {pod} with the client's address kept; saw {seen:?}"
        );
        for _ in 0..6 {
            let answer = e2e
                .cluster
                .external
                .ask(SocketAddrV4::new(node, node_port))
                .expect("external → Local node port");
            assert_eq!(answer.name, pod, "Local policy: only the node's own pod");
            assert_eq!(
                answer.peer.ip(),
                std::net::IpAddr::V4(EXTERNAL_ADDR),
                "Local policy keeps the client's address"
            );
        }
    }
    // Cluster policy: the remote pod is reached too, from the node's
    // address (masqueraded).
    e2e.apply_service(
        "local",
        &json!({"type": "NodePort", "externalTrafficPolicy": "Cluster",
               "selector": {"app": "web"},
               "ports": [{"port": 80, "targetPort": WEB_PORT, "nodePort": node_port}]}),
    );
    let node1 = e2e.cluster.nodes[0].addr;
    let mut remote_seen = false;
    let done = eventually(CONVERGE, || {
        if let Ok(answer) = e2e
            .cluster
            .external
            .ask(SocketAddrV4::new(node1, node_port))
            && answer.name == "web-2"
        {
            remote_seen = answer.peer.ip() == std::net::IpAddr::V4(node1);
        }
        remote_seen
    });
    assert!(
        done,
        "Cluster policy: node1's node port reaches web-2 on node2, masqueraded as node1"
    );
    for name in ["sticky", "local"] {
        e2e.delete_service(name);
    }
}

/// Topology hints: with `trafficDistribution: PreferClose` the controller
/// hints each endpoint for its node's zone, and each node's agent keeps
/// its own zone's endpoints (the zone read from its Node's label).
pub(crate) fn traffic_distribution_keeps_traffic_in_the_zone(e2e: &mut E2e) {
    let (web1, web2) = (e2e.pod_addr("web-1"), e2e.pod_addr("web-2"));
    let close = e2e.apply_service(
        "close",
        &json!({"selector": {"app": "web"}, "trafficDistribution": "PreferClose",
                "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    let ip = E2e::cluster_ip(&close);
    let frontend = format!("{ip}:80/TCP");
    e2e.converge_on(0, &frontend, Some(&[web1]));
    e2e.converge_on(1, &frontend, Some(&[web2]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 8),
        BTreeSet::from(["web-1".to_owned()]),
        "a client in zone-a reaches zone-a's pod only"
    );
    e2e.delete_service("close");
}

/// A LoadBalancer service with `externalTrafficPolicy: Local` gets a
/// health check node port: 200 on the node with its pod, 503 elsewhere,
/// and nothing once the service is gone.
pub(crate) fn health_check_node_ports_follow_local_endpoints(e2e: &mut E2e) {
    let lb = e2e.apply_service(
        "lb-local",
        &json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                "selector": {"pod": "web-1"},
                "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    let port = lb
        .spec
        .as_ref()
        .and_then(|spec| spec.health_check_node_port)
        .and_then(|port| u16::try_from(port).ok())
        .expect("an allocated health check node port");
    let ext = &e2e.cluster.external.ns;
    let probe = |node: usize| {
        get(
            ext,
            SocketAddrV4::new(e2e.cluster.nodes[node].addr, port),
            "/",
        )
    };
    let mut last = String::new();
    assert!(
        eventually(CONVERGE, || {
            last = probe(0);
            last.starts_with("HTTP/1.0 200") && last.contains("\"localEndpoints\":1")
        }),
        "node1 has web-1: 200 with one local endpoint; got {last:?}"
    );
    assert!(
        eventually(CONVERGE, || {
            last = probe(1);
            last.starts_with("HTTP/1.0 503") && last.contains("\"localEndpoints\":0")
        }),
        "node2 has no endpoint of lb-local: 503; got {last:?}"
    );
    e2e.delete_service("lb-local");
    let to = SocketAddrV4::new(e2e.cluster.nodes[0].addr, port);
    let refused = || refusal(ext, to) == Some(std::io::ErrorKind::ConnectionRefused);
    assert!(
        eventually(CONVERGE, refused),
        "the health check port closes with the service: {:?}",
        refusal(ext, to)
    );
    for attempt in 0..3 {
        assert!(
            refused(),
            "attempt {attempt}: the port stays closed: {:?}",
            refusal(ext, to)
        );
    }
}

/// kube-proxy's node health on port 10256 (what cloud load balancers of
/// `externalTrafficPolicy: Cluster` services probe): 200 with its JSON
/// while the agent keeps up; a node tainted for deletion by the cluster
/// autoscaler fails `/healthz` (and only it) until the taint goes. The
/// e2e suite's `should check kube-proxy urls` asks for this.
pub(crate) fn node_health_answers_as_kube_proxy_and_drains_a_node_being_deleted(e2e: &mut E2e) {
    let ext = &e2e.cluster.external.ns;
    let node1 = e2e.cluster.nodes[0].addr;
    let probe = |path: &str| get(ext, SocketAddrV4::new(node1, 10256), path);
    let mut last = String::new();
    for path in ["/healthz", "/livez"] {
        assert!(
            eventually(CONVERGE, || {
                last = probe(path);
                last.starts_with("HTTP/1.0 200")
                    && last.contains("\"healthy\":true")
                    && last.contains("\"lastUpdated\":\"20")
            }),
            "{path} on node1: 200 with kube-proxy's body; got {last:?}"
        );
    }
    assert!(last.contains("application/json"), "{last:?}");
    let taint = |taints: serde_json::Value| {
        let node_api: Api<Node> = Api::all(e2e.plane.client());
        e2e.plane.block_on(async {
            node_api
                .patch(
                    "node1",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"taints": taints}})),
                )
                .await
                .unwrap_or_else(|err| panic!("tainting node1: {err}"));
        });
    };
    taint(
        json!([{"key": "ToBeDeletedByClusterAutoscaler", "value": "1796250000", "effect": "NoSchedule"}]),
    );
    assert!(
        eventually(CONVERGE, || {
            last = probe("/healthz");
            last.starts_with("HTTP/1.0 503") && last.contains("\"nodeEligible\":false")
        }),
        "a node tainted for deletion fails /healthz; got {last:?}"
    );
    last = probe("/livez");
    assert!(
        last.starts_with("HTTP/1.0 200"),
        "/livez ignores the taint: {last:?}"
    );
    taint(json!(null));
    assert!(
        eventually(CONVERGE, || {
            last = probe("/healthz");
            last.starts_with("HTTP/1.0 200") && last.contains("\"nodeEligible\":true")
        }),
        "the taint gone, /healthz passes again; got {last:?}"
    );
    let mode = get(&e2e.cluster.nodes[0].ns, AGENT_HTTP, "/proxyMode");
    assert!(
        mode.starts_with("HTTP/1.0 200") && mode.ends_with("\r\n\r\nebpf"),
        "/proxyMode on the metrics port, as kube-proxy's: {mode:?}"
    );
}

/// `loadBalancerSourceRanges`: the load balancer IP takes new connections
/// only from the listed sources; others are dropped.
pub(crate) fn load_balancer_source_ranges_admit_only_their_sources(e2e: &mut E2e) {
    let lb_ip = "172.16.1.20";
    let spec = |range: &str| {
        json!({"type": "LoadBalancer", "selector": {"app": "web"},
               "loadBalancerSourceRanges": [range],
               "ports": [{"port": 80, "targetPort": WEB_PORT}]})
    };
    e2e.apply_service("ranged", &spec(&format!("{EXTERNAL_ADDR}/32")));
    e2e.set_ingress("ranged", lb_ip);
    let external = &e2e.cluster.external;
    assert!(
        eventually(CONVERGE, || external.ask(addr(lb_ip, 80)).is_ok()),
        "the external client is inside the source range"
    );
    let agent = &e2e.agents[0];
    let row = PinnedMaps::open(&agent.pin_dir)
        .and_then(|maps| maps.services(&agent.state_file))
        .expect("node1's services")
        .into_iter()
        .find(|row| row.frontend == format!("{lb_ip}:80/TCP"))
        .expect("the load balancer IP is installed");
    assert!(
        row.flags.contains(&"source-ranges"),
        "`svc-agent services` shows the restriction: {:?}",
        row.flags
    );
    e2e.apply_service("ranged", &spec("10.0.0.0/8"));
    let node1 = &e2e.cluster.nodes[0].ns;
    let to = addr(lb_ip, 80);
    let dropped = || refusal(&external.ns, to) == Some(std::io::ErrorKind::TimedOut);
    assert!(
        eventually(CONVERGE, dropped),
        "outside the source ranges: dropped (not refused): {:?}",
        refusal(&external.ns, to)
    );
    let before = datapath_counter(node1, "drop_source_range");
    for attempt in 0..2 {
        assert!(
            dropped(),
            "attempt {attempt}: still dropped: {:?}",
            refusal(&external.ns, to)
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || datapath_counter(
            node1,
            "drop_source_range"
        ) > before),
        "node1 counted the dropped SYNs as drop_source_range"
    );
    e2e.delete_service("ranged");
}

/// `externalTrafficPolicy: Local` on a load balancer IP whose only pod runs
/// on node2: traffic arriving at node1 from outside is dropped (no local
/// endpoint), but node1's own pods reach every endpoint, as with
/// kube-proxy.
pub(crate) fn local_load_balancer_ips_serve_in_cluster_clients_from_every_endpoint(e2e: &mut E2e) {
    let lb_ip = "172.16.1.30";
    e2e.apply_service(
        "lb-far",
        &json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                "selector": {"pod": "web-2"},
                "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    e2e.set_ingress("lb-far", lb_ip);
    let web2 = e2e.pod_addr("web-2");
    e2e.converge_on(0, &format!("{lb_ip}:80/TCP"), Some(&[]));
    e2e.converge_on(0, &format!("{lb_ip}:80/TCP in-cluster"), Some(&[web2]));
    assert_eq!(
        e2e.answers("client", addr(lb_ip, 80), 4),
        BTreeSet::from(["web-2".to_owned()]),
        "a pod on node1 reaches the pod on node2 through the load balancer IP"
    );
    let node1 = &e2e.cluster.nodes[0].ns;
    let before = datapath_counter(node1, "drop_no_backend");
    let to = addr(lb_ip, 80);
    for attempt in 0..2 {
        assert_eq!(
            refusal(&e2e.cluster.external.ns, to),
            Some(std::io::ErrorKind::TimedOut),
            "attempt {attempt}: from outside, node1 has no local endpoint: dropped, as kube-proxy does"
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || datapath_counter(
            node1,
            "drop_no_backend"
        ) > before),
        "node1 counted the drops as drop_no_backend"
    );
    // The inspection command lists both tables.
    let agent = &e2e.agents[0];
    let out = Command::new(agent_binary())
        .args(["backends", "e2e/lb-far", "-o", "json", "--pin-dir"])
        .arg(&agent.pin_dir)
        .arg("--state-file")
        .arg(&agent.state_file)
        .output()
        .expect("running svc-agent backends");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("in-cluster") && text.contains(&web2.to_string()),
        "svc-agent backends e2e/lb-far: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    e2e.delete_service("lb-far");
}
