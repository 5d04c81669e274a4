//! The translation rules on YAML fixtures.

use super::*;
use crate::datapath::Masquerade;
use crate::source::{
    Objects,
    manifests::{Parsed, finish, parse},
};
use k8s_openapi::api::core::v1::Service;

const NODE1: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);

fn objects(documents: &[&str]) -> Objects {
    let mut parsed = Parsed::default();
    let mut problems = Vec::new();
    for (i, text) in documents.iter().enumerate() {
        parse(text, &format!("fixture {i}"), &mut parsed, &mut problems);
    }
    assert!(problems.is_empty(), "fixtures must parse: {problems:?}");
    finish(parsed)
}

fn run(documents: &[&str]) -> Translation {
    run_in_zone(None, documents)
}

/// [`run`] on node-1 in `zone`.
fn run_in_zone(zone: Option<&str>, documents: &[&str]) -> Translation {
    let objects = objects(documents);
    translate(
        &objects.services,
        &objects.slices,
        &NodeInfo {
            name: "node-1".to_owned(),
            addrs: vec![NODE1],
            zone: zone.map(str::to_owned),
            pod_cidrs: Vec::new(),
        },
        &Settings::default(),
    )
}

fn tcp(addr: [u8; 4], port: u16) -> Frontend {
    Frontend::Address {
        addr: Ipv4Addr::from(addr),
        port,
        protocol: Protocol::Tcp,
    }
}

fn node_port(port: u16) -> Frontend {
    Frontend::NodePort {
        port,
        protocol: Protocol::Tcp,
    }
}

fn ep(addr: [u8; 4], port: u16, local: bool) -> Endpoint {
    Endpoint {
        addr: SocketAddrV4::new(Ipv4Addr::from(addr), port),
        local,
        terminating: false,
    }
}

fn spec(t: &Translation, frontend: Frontend) -> &FrontendSpec {
    t.desired
        .frontends
        .get(&frontend)
        .unwrap_or_else(|| panic!("no {frontend:?} in {:#?}", t.desired.frontends.keys()))
}

fn endpoints(list: &[Endpoint]) -> BTreeSet<Endpoint> {
    list.iter().copied().collect()
}

fn warnings(t: &Translation) -> Vec<String> {
    t.problems
        .iter()
        .filter(|p| p.warning)
        .map(ToString::to_string)
        .collect()
}

/// ClusterIPs and external addresses with a Cluster policy alike:
/// every endpoint, sources that are not local masqueraded.
const CLUSTER: ServicePolicy = ServicePolicy {
    masquerade: Masquerade::NonLocal,
    local_only: false,
    affinity_timeout_secs: None,
    drop_when_empty: false,
    source_ranges: Vec::new(),
    in_cluster_variant: false,
};
const EXTERNAL: ServicePolicy = CLUSTER;

#[test]
fn docs_cluster_ip_service_with_its_endpoint_slice() {
    let t = run(&[include_str!("../../fixtures/docs-clusterip.yaml")]);
    assert_eq!(t.desired.frontends.len(), 1);
    let spec = spec(&t, tcp([10, 96, 0, 10], 80));
    assert_eq!(spec.service.to_string(), "default/my-service");
    assert_eq!(spec.policy, CLUSTER);
    assert_eq!(
        spec.endpoints,
        endpoints(&[
            ep([10, 1, 2, 3], 9376, true),
            ep([10, 1, 2, 4], 9376, false)
        ])
    );
    assert_eq!(t.desired.node_addrs, vec![NODE1]);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
}

#[test]
fn node_ports_load_balancer_ips_and_external_ips() {
    let t = run(&[include_str!("../../fixtures/docs-nodeport-lb.yaml")]);
    let one = endpoints(&[ep([10, 1, 2, 3], 80, true)]);
    assert_eq!(spec(&t, tcp([10, 96, 0, 20], 80)).policy, CLUSTER);
    assert_eq!(spec(&t, node_port(32123)).policy, EXTERNAL);
    assert_eq!(spec(&t, node_port(32123)).endpoints, one);
    assert_eq!(spec(&t, tcp([192, 0, 2, 127], 80)).policy, EXTERNAL);
    assert_eq!(
        spec(&t, node_port(30080)).endpoints,
        endpoints(&[ep([10, 1, 2, 3], 9376, true)])
    );
    // allocateLoadBalancerNodePorts: false: no node port; the external
    // IP and the ingress IP (not its hostname, nor the ipMode Proxy
    // one) are served.
    let other = endpoints(&[ep([10, 1, 2, 5], 8443, false)]);
    assert_eq!(spec(&t, tcp([198, 51, 100, 7], 443)).endpoints, other);
    assert_eq!(spec(&t, tcp([192, 0, 2, 128], 443)).endpoints, other);
    assert_eq!(
        t.desired.frontends.len(),
        8,
        "{:#?}",
        t.desired.frontends.keys()
    );
}

#[test]
fn headless_and_external_name_have_no_frontends_selectorless_endpoints_are_mirrored() {
    let t = run(&[include_str!(
        "../../fixtures/docs-headless-selectorless.yaml"
    )]);
    assert_eq!(t.desired.frontends.len(), 1, "{:#?}", t.desired.frontends);
    let spec = spec(&t, tcp([10, 96, 0, 30], 80));
    assert_eq!(spec.service.to_string(), "default/outside:http");
    assert_eq!(spec.endpoints, endpoints(&[ep([1, 2, 3, 4], 80, false)]));
}

#[test]
fn kubectl_get_output_with_named_target_ports_dual_stack_and_sctp() {
    let t = run(&[include_str!("../../fixtures/kubectl-get.yaml")]);
    let http = spec(&t, tcp([10, 96, 100, 1], 80));
    assert_eq!(http.service.to_string(), "prod/api:http");
    assert_eq!(
        http.endpoints,
        endpoints(&[
            ep([10, 244, 1, 10], 8080, true),
            ep([10, 244, 2, 11], 9090, false)
        ]),
        "the named target port resolves per slice"
    );
    assert_eq!(http.policy.affinity_timeout_secs, Some(300));
    let dns = spec(
        &t,
        Frontend::Address {
            addr: Ipv4Addr::new(10, 96, 100, 1),
            port: 53,
            protocol: Protocol::Udp,
        },
    );
    assert_eq!(
        dns.endpoints,
        endpoints(&[ep([10, 244, 1, 10], 5353, true)])
    );
    assert_eq!(t.desired.frontends.len(), 2);
    let warnings = warnings(&t);
    assert!(
        warnings.len() == 1 && warnings[0].contains("SCTP"),
        "only SCTP is warned about: {warnings:?}"
    );
    let notes: Vec<String> = t
        .problems
        .iter()
        .filter(|p| !p.warning)
        .map(ToString::to_string)
        .collect();
    assert!(
        notes.iter().any(|n| n.contains("fd00:10:96::1")),
        "{notes:?}"
    );
    assert!(notes.iter().any(|n| n.contains("api-v6")), "{notes:?}");
}

const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: s, namespace: ns}
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  externalIPs: [203.0.113.50]
  ports: [{name: web, port: 80, nodePort: 30050}]
";

fn slice(endpoints_yaml: &str) -> String {
    format!(
        "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: s-1, namespace: ns, labels: {{kubernetes.io/service-name: s}}}}
addressType: IPv4
ports: [{{name: web, port: 8080}}]
endpoints:
{endpoints_yaml}"
    )
}

const TWO_NODES: &str = "
  - {addresses: [10.1.0.1], nodeName: node-1}
  - {addresses: [10.2.0.1], nodeName: node-2}
";

#[test]
fn external_traffic_policy_local_keeps_the_source_and_only_local_endpoints() {
    let service = SERVICE.replace(
        "type: NodePort",
        "type: NodePort\n  externalTrafficPolicy: Local",
    );
    let t = run(&[&service, &slice(TWO_NODES)]);
    let local = ServicePolicy {
        masquerade: Masquerade::Never,
        local_only: true,
        affinity_timeout_secs: None,
        drop_when_empty: true,
        source_ranges: Vec::new(),
        in_cluster_variant: true,
    };
    for frontend in [node_port(30050), tcp([203, 0, 113, 50], 80)] {
        assert_eq!(spec(&t, frontend).policy, local, "{frontend:?}");
        assert_eq!(
            spec(&t, frontend).endpoints,
            endpoints(&[ep([10, 1, 0, 1], 8080, true)])
        );
        // From this node's pods and processes: every endpoint, as
        // kube-proxy does.
        let variant = frontend.in_cluster().expect("an external frontend");
        assert_eq!(spec(&t, variant).policy, CLUSTER, "{variant:?}");
        assert_eq!(spec(&t, variant).endpoints.len(), 2, "{variant:?}");
    }
    // Inside the cluster the policy is Cluster.
    assert_eq!(spec(&t, tcp([10, 96, 0, 50], 80)).endpoints.len(), 2);
    assert_eq!(spec(&t, tcp([10, 96, 0, 50], 80)).policy, CLUSTER);
}

#[test]
fn internal_traffic_policy_local_applies_to_the_cluster_ip_only() {
    let service = SERVICE.replace(
        "type: NodePort",
        "type: NodePort\n  internalTrafficPolicy: Local",
    );
    let only_remote = "
  - {addresses: [10.2.0.1], nodeName: node-2}
";
    let t = run(&[&service, &slice(only_remote)]);
    let cluster_ip = spec(&t, tcp([10, 96, 0, 50], 80));
    assert!(cluster_ip.endpoints.is_empty());
    assert!(cluster_ip.policy.local_only);
    assert!(
        cluster_ip.policy.drop_when_empty,
        "endpoints exist elsewhere: drop, do not refuse"
    );
    assert_eq!(spec(&t, node_port(30050)).endpoints.len(), 1);
}

#[test]
fn udp_ports_record_every_serving_endpoint_whatever_the_table_keeps() {
    let service = "
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: ns}
spec:
  clusterIP: 10.96.0.53
  internalTrafficPolicy: Local
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: tcp, port: 53, protocol: TCP}
";
    let slice = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: ns, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}, {name: tcp, port: 5353, protocol: TCP}]
endpoints:
  - {addresses: [10.1.0.1], nodeName: node-1}
  - {addresses: [10.2.0.1], nodeName: node-2}
  - {addresses: [10.2.0.2], nodeName: node-2, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.2.0.3], nodeName: node-2, conditions: {ready: false, serving: false, terminating: true}}
";
    let t = run(&[service, slice]);
    let udp = spec(&t, Frontend::udp(Ipv4Addr::new(10, 96, 0, 53), 53));
    assert_eq!(
        udp.endpoints.len(),
        1,
        "internalTrafficPolicy Local: the table holds the local endpoint"
    );
    let serving: Vec<String> = udp.serving.iter().map(ToString::to_string).collect();
    assert_eq!(
        serving,
        ["10.1.0.1:5353", "10.2.0.1:5353", "10.2.0.2:5353"],
        "UDP flows to any serving endpoint stay, as kube-proxy keeps them"
    );
    assert!(
        spec(&t, tcp([10, 96, 0, 53], 53)).serving.is_empty(),
        "TCP flows are never cleared: nothing to record"
    );
}

#[test]
fn cluster_ips_are_recorded_even_for_services_another_proxy_serves() {
    let other = SERVICE
        .replace(
            "name: s,",
            "name: other, labels: {service.kubernetes.io/service-proxy-name: other},",
        )
        .replace("10.96.0.50", "10.96.0.51");
    let headless = "
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: ns}
spec:
  clusterIP: None
  ports: [{port: 80}]
";
    let t = run(&[SERVICE, &other, headless]);
    assert_eq!(
        t.desired.cluster_ips,
        BTreeMap::from([
            (Ipv4Addr::new(10, 96, 0, 50), true),
            (Ipv4Addr::new(10, 96, 0, 51), false),
        ]),
        "served ones refuse unknown ports; another proxy's are only allocated"
    );
}

#[test]
fn masquerade_all_reaches_cluster_ips_and_cluster_policies_only() {
    let service = SERVICE.replace(
        "type: NodePort",
        "type: NodePort\n  externalTrafficPolicy: Local",
    );
    let objects = objects(&[SERVICE, &slice(TWO_NODES)]);
    let local_objects = objects_local(&service);
    let settings = Settings {
        masquerade_all: true,
        ..Settings::default()
    };
    let node = NodeInfo {
        name: "node-1".to_owned(),
        addrs: vec![NODE1],
        ..NodeInfo::default()
    };
    let t = translate(&objects.services, &objects.slices, &node, &settings);
    for frontend in [tcp([10, 96, 0, 50], 80), node_port(30050)] {
        assert_eq!(
            spec(&t, frontend).policy.masquerade,
            Masquerade::Always,
            "{frontend:?}"
        );
    }
    let t = translate(
        &local_objects.services,
        &local_objects.slices,
        &node,
        &settings,
    );
    assert_eq!(
        spec(&t, node_port(30050)).policy.masquerade,
        Masquerade::Never,
        "a Local policy keeps the client's address all the same"
    );
    assert_eq!(
        spec(&t, tcp([10, 96, 0, 50], 80)).policy.masquerade,
        Masquerade::Always
    );
}

fn objects_local(service: &str) -> Objects {
    objects(&[service, &slice(TWO_NODES)])
}

#[test]
fn local_cidrs_follow_the_detection_mode() {
    let cluster_cidr: Ipv4Cidr = "10.0.0.0/8".parse().expect("a CIDR");
    let pod_cidr: Ipv4Cidr = "10.1.0.0/24".parse().expect("a CIDR");
    let node = NodeInfo {
        pod_cidrs: vec![pod_cidr],
        ..NodeInfo::default()
    };
    let with = |local_detect| {
        Translator::new(
            node.clone(),
            Settings {
                local_detect,
                ..Settings::default()
            },
        )
    };
    assert!(
        with(LocalDetect::Interface)
            .desired()
            .local_cidrs
            .is_empty()
    );
    assert_eq!(
        with(LocalDetect::ClusterCidr(vec![cluster_cidr]))
            .desired()
            .local_cidrs,
        [cluster_cidr]
    );
    let mut by_node = with(LocalDetect::NodeCidr);
    assert_eq!(by_node.desired().local_cidrs, [pod_cidr]);
    let moved: Ipv4Cidr = "10.1.7.0/24".parse().expect("a CIDR");
    assert!(by_node.set_pod_cidrs(vec![moved]));
    assert_eq!(by_node.desired().local_cidrs, [moved]);
    assert!(!by_node.set_pod_cidrs(vec![moved]), "unchanged");
}

#[test]
fn no_endpoints_anywhere_refuses_even_with_a_local_policy() {
    let service = SERVICE.replace(
        "type: NodePort",
        "type: NodePort\n  externalTrafficPolicy: Local",
    );
    let t = run(&[&service]);
    assert!(!spec(&t, node_port(30050)).policy.drop_when_empty);
}

#[test]
fn terminating_endpoints_serve_only_when_nothing_is_ready() {
    let mixed = "
  - {addresses: [10.1.0.1], nodeName: node-1, conditions: {ready: true}}
  - {addresses: [10.1.0.2], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.1.0.3], nodeName: node-1, conditions: {ready: false, serving: false, terminating: true}}
  - {addresses: [10.1.0.4], nodeName: node-1, conditions: {ready: false, serving: false, terminating: false}}
";
    let t = run(&[SERVICE, &slice(mixed)]);
    assert_eq!(
        spec(&t, tcp([10, 96, 0, 50], 80)).endpoints,
        endpoints(&[ep([10, 1, 0, 1], 8080, true)])
    );
    let none_ready = mixed.replace("conditions: {ready: true}", "conditions: {ready: false}");
    let t = run(&[SERVICE, &slice(&none_ready)]);
    assert_eq!(
        spec(&t, tcp([10, 96, 0, 50], 80)).endpoints,
        endpoints(&[Endpoint {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 8080),
            local: true,
            terminating: true,
        }]),
        "only the serving, terminating endpoint; never the others"
    );
}

#[test]
fn an_endpoint_in_two_slices_counts_once_whatever_their_order() {
    let second = |endpoints_yaml: &str| slice(endpoints_yaml).replace("name: s-1", "name: s-2");
    // The same address, once said to run here and once elsewhere (a slice
    // being replaced); and once not ready.
    let here = "  - {addresses: [10.1.0.1], nodeName: node-1, conditions: {ready: true}}\n";
    let elsewhere = "  - {addresses: [10.1.0.1], nodeName: node-2, conditions: {ready: true}}\n";
    let not_ready = "  - {addresses: [10.1.0.1], nodeName: node-2, conditions: {ready: false}}\n";
    let expected = endpoints(&[ep([10, 1, 0, 1], 8080, true)]);
    for (first, then) in [
        (slice(here), second(&format!("{elsewhere}{not_ready}"))),
        (slice(&format!("{not_ready}{elsewhere}")), second(here)),
    ] {
        let t = run(&[SERVICE, &first, &then]);
        assert_eq!(
            spec(&t, tcp([10, 96, 0, 50], 80)).endpoints,
            expected,
            "one endpoint per address, the local listing (as kube-proxy)"
        );
    }
}

#[test]
fn local_policy_falls_back_to_local_terminating_endpoints() {
    let service = SERVICE.replace(
        "type: NodePort",
        "type: NodePort\n  externalTrafficPolicy: Local",
    );
    let remote_ready_local_terminating = "
  - {addresses: [10.1.0.2], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.2.0.1], nodeName: node-2, conditions: {ready: true}}
";
    let t = run(&[&service, &slice(remote_ready_local_terminating)]);
    assert_eq!(
        spec(&t, node_port(30050)).endpoints,
        endpoints(&[Endpoint {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 8080),
            local: true,
            terminating: true,
        }]),
        "kube-proxy: no local ready endpoint, so the local serving-terminating one"
    );
    assert_eq!(
        spec(&t, tcp([10, 96, 0, 50], 80)).endpoints,
        endpoints(&[ep([10, 2, 0, 1], 8080, false)]),
        "cluster policy: the ready one"
    );
}

const ZONED: &str = "
  - {addresses: [10.1.0.1], nodeName: node-1, hints: {forZones: [{name: zone-a}]}}
  - {addresses: [10.2.0.1], nodeName: node-2, hints: {forZones: [{name: zone-b}]}}
";

#[test]
fn zone_hints_keep_this_zones_endpoints_when_kube_proxy_would() {
    let cluster_ip = tcp([10, 96, 0, 50], 80);
    let t = run_in_zone(Some("zone-a"), &[SERVICE, &slice(ZONED)]);
    assert_eq!(
        spec(&t, cluster_ip).endpoints,
        endpoints(&[ep([10, 1, 0, 1], 8080, true)]),
        "this zone's endpoint only"
    );
    assert_eq!(
        spec(&t, node_port(30050)).endpoints,
        endpoints(&[ep([10, 1, 0, 1], 8080, true)]),
        "hints apply to every cluster-policy frontend"
    );
    for (zone, why) in [
        (Some("zone-c"), "no endpoint is hinted for this zone"),
        (None, "this node has no zone"),
    ] {
        let t = run_in_zone(zone, &[SERVICE, &slice(ZONED)]);
        assert_eq!(spec(&t, cluster_ip).endpoints.len(), 2, "{why}");
    }
    let one_unhinted = format!("{ZONED}  - {{addresses: [10.2.0.2], nodeName: node-2}}\n");
    let t = run_in_zone(Some("zone-a"), &[SERVICE, &slice(&one_unhinted)]);
    assert_eq!(
        spec(&t, cluster_ip).endpoints.len(),
        3,
        "a ready endpoint without hints turns them off"
    );
    let local = SERVICE.replace(
        "type: NodePort",
        "type: NodePort\n  externalTrafficPolicy: Local",
    );
    let t = run_in_zone(Some("zone-b"), &[&local, &slice(ZONED)]);
    assert_eq!(
        spec(&t, node_port(30050)).endpoints,
        endpoints(&[ep([10, 1, 0, 1], 8080, true)]),
        "a local policy ignores hints"
    );
}

#[test]
fn node_hints_come_before_zone_hints() {
    let hinted = "
  - {addresses: [10.1.0.1], nodeName: node-1, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-1}]}}
  - {addresses: [10.1.0.9], nodeName: node-9, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-9}]}}
  - {addresses: [10.2.0.1], nodeName: node-2, hints: {forZones: [{name: zone-b}], forNodes: [{name: node-2}]}}
";
    let t = run_in_zone(Some("zone-a"), &[SERVICE, &slice(hinted)]);
    assert_eq!(
        spec(&t, tcp([10, 96, 0, 50], 80)).endpoints,
        endpoints(&[ep([10, 1, 0, 1], 8080, true)]),
        "PreferSameNode: this node's endpoint only"
    );
    let elsewhere = hinted.replace("forNodes: [{name: node-1}]", "forNodes: [{name: node-8}]");
    let t = run_in_zone(Some("zone-a"), &[SERVICE, &slice(&elsewhere)]);
    assert_eq!(
        spec(&t, tcp([10, 96, 0, 50], 80)).endpoints.len(),
        2,
        "no endpoint for this node: the zone's two"
    );
}

#[test]
fn local_load_balancers_get_a_health_check_counting_local_ready_endpoints() {
    let lb = SERVICE.replace(
        "type: NodePort",
        "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
    );
    let endpoints = "
  - {addresses: [10.1.0.1], nodeName: node-1}
  - {addresses: [10.1.0.2], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.2.0.1], nodeName: node-2}
";
    let t = run(&[&lb, &slice(endpoints)]);
    let check = &t.desired.health_checks[&32000];
    assert_eq!((check.namespace.as_str(), check.name.as_str()), ("ns", "s"));
    assert_eq!(check.local_endpoints, 1, "ready local endpoints only");
    let t = run(&[&lb]);
    assert_eq!(t.desired.health_checks[&32000].local_endpoints, 0);
    for other in [
        lb.replace(
            "externalTrafficPolicy: Local",
            "externalTrafficPolicy: Cluster",
        ),
        lb.replace("type: LoadBalancer", "type: NodePort"),
    ] {
        let t = run(&[&other, &slice(endpoints)]);
        assert!(t.desired.health_checks.is_empty(), "{other}");
    }
}

#[test]
fn load_balancer_source_ranges_restrict_only_the_load_balancer_ips() {
    let lb = |ranges: &str| {
        format!(
            "{}  loadBalancerSourceRanges: [{ranges}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 192.0.2.80}}]\n",
            SERVICE.replace("type: NodePort", "type: LoadBalancer")
        )
    };
    let t = run(&[
        &lb("203.0.113.7/24, '2001:db8::/32', not-a-cidr"),
        &slice(TWO_NODES),
    ]);
    let range =
        |a, b, c, d, prefix| Ipv4Cidr::new(Ipv4Addr::new(a, b, c, d), prefix).expect("CIDR");
    assert_eq!(
        spec(&t, tcp([192, 0, 2, 80], 80)).policy.source_ranges,
        [range(203, 0, 113, 0, 24)],
        "the IPv4 range, host bits cleared"
    );
    for frontend in [
        node_port(30050),
        tcp([10, 96, 0, 50], 80),
        tcp([203, 0, 113, 50], 80),
    ] {
        assert!(
            spec(&t, frontend).policy.source_ranges.is_empty(),
            "{frontend:?} is not a load balancer IP"
        );
    }
    assert!(
        warnings(&t).iter().any(|w| w.contains("not-a-cidr")),
        "{:?}",
        warnings(&t)
    );
    // A range holding the node's address lets the load balancer's own
    // IP in as a source too (kube-proxy's allowance for VIP-style
    // balancers looping traffic from the node back).
    let t = run(&[&lb("192.168.0.0/16"), &slice(TWO_NODES)]);
    assert_eq!(
        spec(&t, tcp([192, 0, 2, 80], 80)).policy.source_ranges,
        [range(192, 0, 2, 80, 32), range(192, 168, 0, 0, 16)]
    );
}

#[test]
fn session_affinity_defaults_to_three_hours() {
    let service = SERVICE.replace(
        "type: NodePort",
        "type: NodePort\n  sessionAffinity: ClientIP",
    );
    let t = run(&[&service, &slice(TWO_NODES)]);
    assert_eq!(
        spec(&t, node_port(30050)).policy.affinity_timeout_secs,
        Some(10_800)
    );
    let absurd = service.replace(
        "sessionAffinity: ClientIP",
        "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 999999}}",
    );
    let t = run(&[&absurd, &slice(TWO_NODES)]);
    assert_eq!(
        spec(&t, node_port(30050)).policy.affinity_timeout_secs,
        Some(10_800)
    );
    assert_eq!(warnings(&t).len(), 1, "{:?}", warnings(&t));
}

#[test]
fn services_for_another_proxy_are_left_alone() {
    let service = SERVICE.replace(
            "metadata: {name: s, namespace: ns}",
            "metadata: {name: s, namespace: ns, labels: {service.kubernetes.io/service-proxy-name: other}}",
        );
    let t = run(&[&service, &slice(TWO_NODES)]);
    assert!(t.desired.frontends.is_empty());
    let objects = objects(&[&service, &slice(TWO_NODES)]);
    let mine = translate(
        &objects.services,
        &objects.slices,
        &NodeInfo::default(),
        &Settings {
            proxy_name: Some("other".to_owned()),
            ..Settings::default()
        },
    );
    assert_eq!(
        mine.desired.frontends.len(),
        3,
        "a proxy named so serves it"
    );
}

#[test]
fn slices_of_headless_services_and_without_a_service_are_ignored() {
    let headless = slice(TWO_NODES).replace(
        "labels: {kubernetes.io/service-name: s}",
        "labels: {kubernetes.io/service-name: s, service.kubernetes.io/headless: \"\"}",
    );
    let t = run(&[SERVICE, &headless]);
    assert!(spec(&t, node_port(30050)).endpoints.is_empty());
    let orphan = slice(TWO_NODES).replace("labels: {kubernetes.io/service-name: s}", "labels: {}");
    let t = run(&[SERVICE, &orphan]);
    assert!(spec(&t, node_port(30050)).endpoints.is_empty());
}

#[test]
fn bad_input_is_named_and_skipped_and_the_rest_is_served() {
    let bad = "
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: ns}
spec:
  clusterIP: 10.96.0.999
  externalIPs: [not-an-ip, 203.0.113.60]
  ports:
    - {name: a, port: 80}
    - {name: b, port: 80}
    - {name: c, port: 70000}
    - {name: d, port: 81, protocol: QUIC}
";
    let t = run(&[bad, SERVICE, &slice(TWO_NODES)]);
    let warnings = warnings(&t);
    for expected in ["10.96.0.999", "not-an-ip", "appears twice", "70000", "QUIC"] {
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(expected) && w.contains("ns/bad")),
            "no warning naming {expected}: {warnings:?}"
        );
    }
    assert!(
        t.desired
            .frontends
            .contains_key(&tcp([203, 0, 113, 60], 80))
    );
    assert_eq!(
        spec(&t, node_port(30050)).endpoints.len(),
        2,
        "the good service is served"
    );
}

#[test]
fn a_frontend_claimed_twice_goes_to_the_first_service_by_name() {
    let twin = SERVICE
        .replace("name: s,", "name: t,")
        .replace("10.96.0.50", "10.96.0.51");
    let t = run(&[&twin, SERVICE]);
    assert_eq!(spec(&t, node_port(30050)).service.name, "s");
    assert!(
        warnings(&t)
            .iter()
            .any(|w| w.contains("ns/t") && w.contains("already served"))
    );
}

/// Runs a [`Translator`] over `objects` for the `dirty` services.
fn update(translator: &mut Translator, objects: &Objects, dirty: &[&str]) {
    let mut scratch = Translation::default();
    let slices = index_slices(&objects.slices, &mut scratch);
    let services: HashMap<(&str, &str), &Service> = objects
        .services
        .iter()
        .map(|s| {
            (
                (
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default(),
                ),
                s,
            )
        })
        .collect();
    let inputs = Indexed {
        services: &services,
        slices: &slices,
    };
    translator.update(
        dirty
            .iter()
            .map(|name| ("ns".to_owned(), (*name).to_owned())),
        &inputs,
    );
}

#[test]
fn incremental_updates_agree_with_a_full_translation_whatever_their_order() {
    let twin = SERVICE
        .replace("name: s,", "name: t,")
        .replace("10.96.0.50", "10.96.0.51");
    let both = objects(&[SERVICE, &twin, &slice(TWO_NODES)]);
    let node = NodeInfo {
        name: "node-1".to_owned(),
        addrs: vec![NODE1],
        zone: None,
        pod_cidrs: Vec::new(),
    };
    let full = translate(&both.services, &both.slices, &node, &Settings::default());
    let mut translator = Translator::new(node.clone(), Settings::default());
    // The later name first: it holds the node port until `s` comes.
    update(&mut translator, &both, &["t"]);
    assert_eq!(
        translator.desired().frontends[&node_port(30050)]
            .service
            .name,
        "t"
    );
    update(&mut translator, &both, &["s"]);
    assert_eq!(translator.desired(), &full.desired);
    assert!(
        translator
            .problems()
            .iter()
            .any(|p| p.object == "Service ns/t" && p.message.contains("already served")),
        "{:?}",
        translator.problems()
    );
    // `s` goes: the node port passes to `t`, `s`'s own frontends go.
    let only_t = objects(&[&twin, &slice(TWO_NODES)]);
    update(&mut translator, &only_t, &["s"]);
    let expected = translate(
        &only_t.services,
        &only_t.slices,
        &node,
        &Settings::default(),
    );
    assert_eq!(translator.desired(), &expected.desired);
    assert_eq!(translator.services(), 1);
}

#[test]
fn endpoints_mirroring_follows_the_controller() {
    let selectorless = "
apiVersion: v1
kind: Service
metadata: {name: m}
spec:
  clusterIP: 10.96.0.60
  ports: [{port: 80}]
";
    let endpoints_yaml = "
apiVersion: v1
kind: Endpoints
metadata: {name: m}
subsets:
  - addresses: [{ip: 10.9.0.1, nodeName: node-1}]
    notReadyAddresses: [{ip: 10.9.0.2}]
    ports: [{port: 8080}]
";
    let t = run(&[selectorless, endpoints_yaml]);
    assert_eq!(
        spec(&t, tcp([10, 96, 0, 60], 80)).endpoints,
        endpoints(&[ep([10, 9, 0, 1], 8080, true)]),
        "ready addresses only"
    );
    let skip = endpoints_yaml.replace(
        "metadata: {name: m}",
        "metadata: {name: m, labels: {endpointslice.kubernetes.io/skip-mirror: \"true\"}}",
    );
    let t = run(&[selectorless, &skip]);
    assert!(spec(&t, tcp([10, 96, 0, 60], 80)).endpoints.is_empty());
    let with_selector = selectorless.replace("spec:", "spec:\n  selector: {app: m}");
    let t = run(&[&with_selector, endpoints_yaml]);
    assert!(
        spec(&t, tcp([10, 96, 0, 60], 80)).endpoints.is_empty(),
        "Endpoints of a selector service are not mirrored"
    );
}

#[test]
fn documents_that_do_not_parse_are_reported_by_file_and_position() {
    let mut parsed = Parsed::default();
    let mut problems = Vec::new();
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n---\n: : :\n";
    parse(text, "svc.yaml", &mut parsed, &mut problems);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].object.contains("svc.yaml, document 1"),
        "{problems:?}"
    );
    assert!(parsed.objects.services.is_empty());
}
