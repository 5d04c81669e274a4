//! Restarts of the agent and the API server under a live connection, and
//! a thousand services.

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::json;
use tests::{eventually, k8s::apply};

use super::harness::{
    AGENT_HTTP, CONVERGE, Chatter, E2e, NS, WEB_PORT, addr, create_pod, get, metric, metrics,
    set_ready,
};

/// Scenario 9: services, and pods behind each.
const BULK_SERVICES: usize = 1000;
const BULK_PODS_PER_SERVICE: usize = 5;

/// Scenario 8: an agent restart, an API server restart, and etcd
/// compaction with a restart, under a connection that keeps exchanging.
pub(crate) fn agent_and_api_server_restarts(e2e: &mut E2e) {
    // Pods of its own: their readiness changes here.
    e2e.add_pod(0, "restart-1", 41, "restart", true);
    e2e.add_pod(1, "restart-2", 42, "restart", true);
    let web_ip = E2e::cluster_ip(&e2e.apply_service(
        "restart",
        &json!({"selector": {"app": "restart"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    ));
    let (web1, web2) = (e2e.pod_addr("restart-1"), e2e.pod_addr("restart-2"));
    e2e.converge(&format!("{web_ip}:80/TCP"), Some(&[web1, web2]));
    let stream = e2e
        .cluster
        .pod("client")
        .connect(addr(&web_ip, 80))
        .expect("client → restart");
    let chatter = Chatter::new(stream);

    // The agent that translated it restarts: it adopts the pinned maps,
    // waits for its stores to fill, and finds nothing to change.
    e2e.agents[0].stop();
    e2e.agents[0].start();
    let node1 = &e2e.cluster.nodes[0].ns;
    assert!(
        eventually(CONVERGE, || get(node1, AGENT_HTTP, "/readyz")
            .starts_with("HTTP/1.0 200")),
        "the restarted agent becomes ready (its first sync applied)"
    );
    let page = metrics(node1);
    let syncs = metric(&page, "svc_syncs_total").unwrap_or(0);
    assert!(syncs >= 1, "the first sync is counted: {syncs}");
    for what in [
        "frontend_written",
        "frontend_removed",
        "backend_added",
        "backend_removed",
    ] {
        assert_eq!(
            metric(&page, &format!("svc_map_writes_total{{what=\"{what}\"}}")),
            Some(0),
            "an unchanged cluster writes nothing after a restart ({what}, {syncs} syncs)"
        );
    }
    e2e.converge(&format!("{web_ip}:80/TCP"), Some(&[web1, web2]));

    e2e.plane.restart_apiserver();
    // A change after the restart is applied: the watches reconnected.
    e2e.set_ready("restart-2", false);
    let (slice, maps) = e2e.after_restart("restart", &web_ip, &[web1]);
    eprintln!(
        "scenario 8: change after an API server restart: in the slice after {slice:?}, in the maps after {maps:?}"
    );

    // History compacted while the API server is down: the watches resume
    // from a resource version etcd no longer has, get 410 Gone, relist.
    e2e.plane.stop_apiserver();
    e2e.plane.compact_etcd();
    e2e.plane.start_apiserver_again();
    e2e.set_ready("restart-2", true);
    let (slice, maps) = e2e.after_restart("restart", &web_ip, &[web1, web2]);
    eprintln!(
        "scenario 8: change after compaction and restart: in the slice after {slice:?}, in the maps after {maps:?}"
    );
    for (agent, node) in e2e.agents.iter().zip(&e2e.cluster.nodes) {
        let errors = metric(&metrics(&node.ns), "svc_watch_errors_total").unwrap_or(0);
        assert!(
            errors > 0,
            "{}: the watches saw the outages ({errors:?} errors) and recovered",
            agent.node
        );
    }

    let exchanges = chatter.finish("API server restarts");
    assert!(
        exchanges > 10,
        "the connection kept exchanging ({exchanges})"
    );
    e2e.delete_service("restart");
}

/// Scenario 9.
pub(crate) fn a_thousand_services(e2e: &mut E2e) {
    let pods = e2e.pods();
    let services = e2e.services();
    let node_names: Vec<&str> = e2e.cluster.nodes.iter().map(|node| node.name).collect();
    let started = Instant::now();
    e2e.plane.block_on(async {
        use futures::StreamExt as _;
        let creates = (0..BULK_SERVICES)
            .flat_map(|service| (0..BULK_PODS_PER_SERVICE).map(move |pod| (service, pod)));
        futures::stream::iter(creates)
            .for_each_concurrent(16, |(service, pod)| {
                let pods = pods.clone();
                let node = node_names[pod % 2];
                async move {
                    let index = u32::try_from(service * BULK_PODS_PER_SERVICE + pod).expect("fits");
                    // Addresses no namespace carries: these pods are only
                    // counted in the maps, not connected to.
                    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + index);
                    let name = format!("bulk-{service}-{pod}");
                    create_pod(&pods, &name, node, ip, &format!("bulk-{service}")).await;
                    set_ready(&pods, &name, true).await;
                }
            })
            .await;
    });
    let pods_took = started.elapsed();
    let started = Instant::now();
    let ips: Vec<String> = e2e.plane.block_on(async {
        use futures::StreamExt as _;
        futures::stream::iter(0..BULK_SERVICES)
            .map(|service| {
                let services = services.clone();
                async move {
                    let name = format!("bulk-{service}");
                    let created = apply(
                        &services,
                        &name,
                        json!({"apiVersion": "v1", "kind": "Service",
                               "metadata": {"name": name, "namespace": NS},
                               "spec": {"selector": {"app": name},
                                        "ports": [{"port": 80, "targetPort": WEB_PORT}]}}),
                    )
                    .await;
                    E2e::cluster_ip(&created)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await
    });
    let creates_took = started.elapsed();
    let last_create = Instant::now();
    for agent in &mut e2e.agents {
        agent.assert_running();
        let mut programmed = 0;
        let done = eventually(Duration::from_mins(2), || {
            let frontends = agent.frontends();
            programmed = ips
                .iter()
                .filter(|ip| {
                    frontends
                        .get(&format!("{ip}:80/TCP"))
                        .is_some_and(|backends| backends.len() == BULK_PODS_PER_SERVICE)
                })
                .count();
            programmed == ips.len()
        });
        assert!(
            done,
            "{}: {programmed} of {BULK_SERVICES} services programmed with {BULK_PODS_PER_SERVICE} backends",
            agent.node
        );
    }
    let all_programmed = last_create.elapsed();
    eprintln!(
        "scenario 9: {BULK_SERVICES} services × {BULK_PODS_PER_SERVICE} pods: pods created in {pods_took:?}, \
         services in {creates_took:?}; all programmed on both nodes {all_programmed:?} after the last create"
    );
    let report = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    if fs::create_dir_all(&report).is_ok() {
        let _ = fs::write(
            report.join("e2e-scale.json"),
            json!([
                {"case": "pods_created", "services": BULK_SERVICES, "value": pods_took.as_secs_f64(), "unit": "s"},
                {"case": "services_created", "services": BULK_SERVICES, "value": creates_took.as_secs_f64(), "unit": "s"},
                {"case": "last_create_to_all_programmed", "services": BULK_SERVICES, "value": all_programmed.as_secs_f64(), "unit": "s"}
            ])
            .to_string(),
        );
    }
}
