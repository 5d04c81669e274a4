//! Services as kube-proxy serves them: selection, scaling and readiness,
//! connections outliving their pods, refusals, type changes, selectorless
//! services and deletion.

use std::{
    collections::BTreeSet,
    net::{SocketAddrV4, TcpStream},
    thread,
    time::Duration,
};

use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;
use svc_agent::inspect::PinnedMaps;
use tests::{eventually, k8s::apply};

use super::harness::{
    Agent, CONVERGE, Chatter, E2e, NS, WEB_PORT, addr, connection_to, datapath_counter, metrics,
    node_port,
};

/// Scenario 1.
pub(crate) fn selector_service_reaches_the_selected_pods(e2e: &mut E2e) {
    let web = e2e.apply_service(
        "web",
        &json!({"selector": {"app": "web"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    );
    let ip = E2e::cluster_ip(&web);
    assert!(
        ip.starts_with("10.96."),
        "the API server allocates from its service range: {ip}"
    );
    let pods = [e2e.pod_addr("web-1"), e2e.pod_addr("web-2")];
    let took = e2e.converge(&format!("{ip}:80/TCP"), Some(&pods));
    eprintln!("scenario 1: web {ip} programmed on both nodes {took:?} after the create");

    // The controller's slice names exactly the selected pods.
    let slices: Api<EndpointSlice> = Api::namespaced(e2e.plane.client(), NS);
    let listed = e2e
        .plane
        .block_on(slices.list(&ListParams::default().labels("kubernetes.io/service-name=web")))
        .expect("listing web's slices");
    let addresses: BTreeSet<String> = listed
        .items
        .iter()
        .flat_map(|slice| slice.endpoints.iter().flatten())
        .flat_map(|endpoint| endpoint.addresses.clone())
        .collect();
    let expected: BTreeSet<String> = pods.iter().map(ToString::to_string).collect();
    assert_eq!(addresses, expected, "web's EndpointSlice endpoints");

    let names = e2e.answers("client", addr(&ip, 80), 24);
    assert_eq!(
        names,
        BTreeSet::from(["web-1".to_owned(), "web-2".to_owned()]),
        "24 connections to the ClusterIP spread over both pods"
    );
    e2e.delete_service("web");
}

/// Scenario 2.
pub(crate) fn scaling_and_readiness_are_followed(e2e: &mut E2e) {
    // Pods of its own: their readiness and lives change here.
    e2e.add_pod(0, "scale-1", 31, "scale", true);
    e2e.add_pod(1, "scale-2", 32, "scale", true);
    let ip = E2e::cluster_ip(&e2e.apply_service(
        "scale",
        &json!({"selector": {"app": "scale"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    ));
    let frontend = format!("{ip}:80/TCP");
    let (web1, web2) = (e2e.pod_addr("scale-1"), e2e.pod_addr("scale-2"));
    e2e.converge(&frontend, Some(&[web1, web2]));

    e2e.add_pod(1, "scale-3", 33, "scale", true);
    let web3 = e2e.pod_addr("scale-3");
    let took = e2e.converge(&frontend, Some(&[web1, web2, web3]));
    eprintln!("scenario 2: scale up to 3 applied in {took:?}");
    e2e.delete_pod("scale-3", 0);
    let took = e2e.converge(&frontend, Some(&[web1, web2]));
    eprintln!("scenario 2: scale down to 2 applied in {took:?}");

    // Not ready: no new connections.
    e2e.set_ready("scale-2", false);
    let took = e2e.converge(&frontend, Some(&[web1]));
    eprintln!("scenario 2: readiness flip applied in {took:?}");
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 12),
        BTreeSet::from(["scale-1".to_owned()]),
        "a not-ready pod gets no new connections"
    );

    // web-1 terminating (still serving), nothing ready: web-1 serves.
    e2e.delete_pod("scale-1", 300);
    e2e.converge(&frontend, Some(&[web1]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 6),
        BTreeSet::from(["scale-1".to_owned()]),
        "a terminating, serving pod is used when nothing is ready"
    );
    // Once something is ready, the terminating pod is left alone.
    e2e.set_ready("scale-2", true);
    e2e.converge(&frontend, Some(&[web2]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 6),
        BTreeSet::from(["scale-2".to_owned()]),
        "a terminating pod gets nothing while a ready one exists"
    );
    // Its replacement comes up under the same name and address.
    e2e.delete_pod("scale-1", 0);
    let pods = e2e.pods();
    e2e.plane.block_on(async {
        let gone = async {
            for _ in 0..200 {
                if pods.get_opt("scale-1").await.ok().flatten().is_none() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        };
        assert!(gone.await, "web-1 should be deleted");
    });
    e2e.create_pod(0, "scale-1", web1, "scale", true);
    e2e.converge(&frontend, Some(&[web1, web2]));
    e2e.delete_service("scale");
}

/// Scenario 2b: a pod deleted as the API server deletes it (terminating
/// for its grace period, then no longer serving, then gone) keeps its
/// established connections, from a pod and from outside through a node
/// port, while new connections go elsewhere.
pub(crate) fn connections_outlive_deleted_pods(e2e: &mut E2e) {
    e2e.add_pod(1, "drain-1", 21, "drain", true);
    e2e.add_pod(0, "drain-2", 21, "drain", true);
    let service = e2e.apply_service(
        "drain",
        &json!({"type": "NodePort", "selector": {"app": "drain"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    );
    let ip = E2e::cluster_ip(&service);
    let node_port = node_port(&service);
    let (drain1, drain2) = (e2e.pod_addr("drain-1"), e2e.pod_addr("drain-2"));
    let frontend = format!("{ip}:80/TCP");
    e2e.converge(&frontend, Some(&[drain1, drain2]));
    e2e.converge(&format!("*:{node_port}/TCP"), Some(&[drain1, drain2]));
    let node1 = e2e.cluster.nodes[0].addr;
    let chatters = [
        (
            "pod to ClusterIP",
            Chatter::greeted(connection_to("drain-1", "pod to ClusterIP", || {
                e2e.cluster.pod("client").connect(addr(&ip, 80))
            })),
        ),
        (
            "outside to node port",
            Chatter::greeted(connection_to("drain-1", "outside to node port", || {
                e2e.cluster
                    .external
                    .connect(SocketAddrV4::new(node1, node_port))
            })),
        ),
    ];
    let alive = |when: &str| {
        for (what, chatter) in &chatters {
            chatter.assert_alive(&format!("{what}, {when}"));
        }
    };
    alive("before the deletion");

    // Deleted with a grace period: terminating, still serving.
    e2e.delete_pod("drain-1", 300);
    let took = e2e.converge(&frontend, Some(&[drain2]));
    eprintln!("scenario 2b: the terminating pod left the tables {took:?} after the delete");
    alive("drain-1 terminating");
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 10),
        BTreeSet::from(["drain-2".to_owned()]),
        "new connections avoid the terminating pod"
    );
    // Its containers stop: not serving.
    e2e.set_ready("drain-1", false);
    thread::sleep(Duration::from_secs(1));
    alive("drain-1 no longer serving");
    // Its grace period ends: the Pod object goes, and the slice with it.
    e2e.delete_pod("drain-1", 0);
    let slices: Api<EndpointSlice> = Api::namespaced(e2e.plane.client(), NS);
    let drain1_text = drain1.to_string();
    let gone = eventually(CONVERGE, || {
        e2e.plane
            .block_on(
                slices.list(&ListParams::default().labels("kubernetes.io/service-name=drain")),
            )
            .is_ok_and(|list| {
                !list
                    .items
                    .iter()
                    .flat_map(|slice| slice.endpoints.iter().flatten())
                    .any(|endpoint| endpoint.addresses.contains(&drain1_text))
            })
    });
    assert!(gone, "the deleted pod leaves the slice");
    thread::sleep(Duration::from_secs(1));
    alive("drain-1 gone from the slice");
    for (what, chatter) in chatters {
        let exchanges = chatter.finish(what);
        eprintln!("scenario 2b: {what}: {exchanges} exchanges, never broken");
    }
    e2e.delete_service("drain");
}

/// Scenario 2c: the agents read the cluster's `ServiceCIDR` (the API
/// server's default one, from `--service-cluster-ip-range`): a ClusterIP
/// refuses a port its service lacks, and an address of the range that no
/// service holds is dropped, as kube-proxy's nftables mode does.
pub(crate) fn cluster_ips_refuse_unknown_ports_and_the_service_range_drops_the_rest(e2e: &mut E2e) {
    let ip = E2e::cluster_ip(&e2e.apply_service(
        "web",
        &json!({"selector": {"app": "web"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    ));
    let err = e2e
        .cluster
        .pod("client")
        .connect(addr(&ip, 81))
        .expect_err("web has no port 81");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "refused at once: {err}"
    );
    let node1 = &e2e.cluster.nodes[0].ns;
    let dropped = || datapath_counter(node1, "drop_unallocated_service_ip");
    let before = dropped();
    let unallocated = addr("10.96.255.254", 80);
    let err = e2e
        .cluster
        .pod("client")
        .ns
        .run(|| TcpStream::connect_timeout(&unallocated.into(), Duration::from_secs(1)))
        .expect_err("no service holds the address");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "dropped, not refused: {err}"
    );
    assert!(
        eventually(Duration::from_secs(5), || dropped() > before),
        "node1 counted the drop: the service CIDR came from the ServiceCIDR objects"
    );
    e2e.delete_service("web");
}

/// Scenario 3.
pub(crate) fn type_changes_install_and_remove_frontends(e2e: &mut E2e) {
    let base = json!({"selector": {"app": "web"},
                      "ports": [{"name": "http", "port": 80, "targetPort": "http"}]});
    let (web1, web2) = (e2e.pod_addr("web-1"), e2e.pod_addr("web-2"));
    let node1 = e2e.cluster.nodes[0].addr;

    let mut spec = base.clone();
    spec["type"] = json!("NodePort");
    let typed = e2e.apply_service("typed", &spec);
    let ip = E2e::cluster_ip(&typed);
    let node_port = node_port(&typed);
    let np_frontend = format!("*:{node_port}/TCP");
    e2e.converge(&np_frontend, Some(&[web1, web2]));
    let answer = e2e
        .cluster
        .external
        .ask(SocketAddrV4::new(node1, node_port))
        .expect("external → node1 node port");
    assert!(answer.name.starts_with("web-"), "answered by {answer:?}");

    let mut spec = base.clone();
    spec["type"] = json!("LoadBalancer");
    e2e.apply_service("typed", &spec);
    let lb_ip = "172.16.1.10";
    e2e.set_ingress("typed", lb_ip);
    e2e.converge(&format!("{lb_ip}:80/TCP"), Some(&[web1, web2]));
    let answer = e2e
        .cluster
        .external
        .ask(addr(lb_ip, 80))
        .expect("external → load balancer IP");
    assert!(answer.name.starts_with("web-"), "answered by {answer:?}");

    // Back to ClusterIP: the node port and the LB IP go away.
    e2e.apply_service("typed", &base);
    e2e.converge(&np_frontend, None);
    e2e.converge(&format!("{lb_ip}:80/TCP"), None);
    e2e.converge(&format!("{ip}:80/TCP"), Some(&[web1, web2]));
    e2e.delete_service("typed");
}

/// Scenario 5.
pub(crate) fn selectorless_services_with_slices_and_mirrored_endpoints(e2e: &mut E2e) {
    let web2 = e2e.pod_addr("web-2");
    let web1 = e2e.pod_addr("web-1");
    let manual = e2e.apply_service("manual", &json!({"ports": [{"port": 80}]}));
    let slices: Api<EndpointSlice> = Api::namespaced(e2e.plane.client(), NS);
    e2e.plane.block_on(apply(
        &slices,
        "manual-1",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "manual-1", "namespace": NS,
                            "labels": {"kubernetes.io/service-name": "manual",
                                       "endpointslice.kubernetes.io/managed-by": "svc-e2e"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": [web2.to_string()], "conditions": {"ready": true}}],
               "ports": [{"port": WEB_PORT, "protocol": "TCP"}]}),
    ));
    let ip = E2e::cluster_ip(&manual);
    e2e.converge(&format!("{ip}:80/TCP"), Some(&[web2]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 3),
        BTreeSet::from(["web-2".to_owned()])
    );

    let legacy = e2e.apply_service("legacy", &json!({"ports": [{"port": 80}]}));
    let endpoints: Api<Endpoints> = Api::namespaced(e2e.plane.client(), NS);
    e2e.plane.block_on(apply(
        &endpoints,
        "legacy",
        json!({"apiVersion": "v1", "kind": "Endpoints",
               "metadata": {"name": "legacy", "namespace": NS},
               "subsets": [{"addresses": [{"ip": web1.to_string()}],
                            "ports": [{"port": WEB_PORT, "protocol": "TCP"}]}]}),
    ));
    let ip = E2e::cluster_ip(&legacy);
    e2e.converge(&format!("{ip}:80/TCP"), Some(&[web1]));
    assert_eq!(
        e2e.answers("client", addr(&ip, 80), 3),
        BTreeSet::from(["web-1".to_owned()]),
        "the mirroring controller's slice is served"
    );
    for name in ["manual", "legacy"] {
        e2e.delete_service(name);
    }
    e2e.plane
        .block_on(endpoints.delete("legacy", &DeleteParams::default()))
        .unwrap_or_else(|err| panic!("deleting Endpoints legacy: {err}"));
    e2e.plane
        .block_on(slices.delete("manual-1", &DeleteParams::default()))
        .unwrap_or_else(|err| panic!("deleting EndpointSlice manual-1: {err}"));
}

/// Scenarios 6 and 7.
pub(crate) fn no_endpoints_is_refused_and_deletion_removes_everything(e2e: &mut E2e) {
    let empty = e2e.apply_service(
        "empty",
        &json!({"selector": {"app": "nothing"}, "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    );
    let ip = E2e::cluster_ip(&empty);
    let frontend = format!("{ip}:80/TCP");
    e2e.converge(&frontend, Some(&[]));
    let err = e2e
        .cluster
        .pod("client")
        .connect(addr(&ip, 80))
        .expect_err("no endpoints: the connection must fail");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "no endpoints: refused at once, not left to time out"
    );

    let sticky_ip = E2e::cluster_ip(&e2e.apply_service(
        "counted",
        &json!({"selector": {"app": "web"}, "sessionAffinity": "ClientIP",
               "ports": [{"port": 80, "targetPort": WEB_PORT}]}),
    ));
    let sticky_frontend = format!("{sticky_ip}:80/TCP");
    let (web1, web2) = (e2e.pod_addr("web-1"), e2e.pod_addr("web-2"));
    e2e.converge(&sticky_frontend, Some(&[web1, web2]));
    // Traffic, so that its counters are not zero.
    e2e.answers("client", addr(&sticky_ip, 80), 4);
    let sticky_ids: Vec<u32> = e2e
        .agents
        .iter()
        .map(|agent| {
            let maps = PinnedMaps::open(&agent.pin_dir).expect("the pinned maps");
            let row = maps
                .services(&agent.state_file)
                .expect("services")
                .into_iter()
                .find(|row| row.frontend == sticky_frontend)
                .expect("counted is installed");
            row.id
        })
        .collect();
    let counted = |agent: &Agent, id: u32| {
        PinnedMaps::open(&agent.pin_dir)
            .and_then(|maps| maps.service_counters(svc_common::wire::FrontendId::new(id)))
            .expect("counted's counters")
            .packets
    };
    assert!(
        counted(&e2e.agents[0], sticky_ids[0]) > 0,
        "node1 counted the service's traffic"
    );
    for name in ["empty", "counted"] {
        e2e.delete_service(name);
    }
    e2e.converge(&frontend, None);
    e2e.converge(&format!("{sticky_ip}:80/TCP"), None);
    for (agent, id) in e2e.agents.iter().zip(&sticky_ids) {
        assert_eq!(
            counted(agent, *id),
            0,
            "{}: the deleted service's counters are gone from the maps",
            agent.node
        );
    }
    for (agent, node) in e2e.agents.iter().zip(&e2e.cluster.nodes) {
        let metrics = metrics(&node.ns);
        assert!(
            !metrics.contains(&format!("frontend=\"{sticky_ip}:80/TCP\"")),
            "{}: the deleted service's counters are gone from /metrics",
            agent.node
        );
    }
}
