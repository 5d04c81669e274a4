//! One Service and its slices → frontends, with kube-proxy's rules.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::datapath::{CidrError, Frontend, Ipv4Cidr, Masquerade, Protocol, ServicePolicy};

use super::{
    DEFAULT_AFFINITY_TIMEOUT_SECS, Endpoint, FrontendKind, FrontendSpec, HealthCheck,
    MAX_AFFINITY_TIMEOUT_SECS, NodeInfo, ObjectRef, SERVICE_PROXY_NAME_LABEL, ServicePortRef,
    Settings, Translation,
    endpoints::{Categorized, endpoints_for},
    parse_ip, port_number, protocol_of,
};

#[expect(
    clippy::too_many_lines,
    reason = "one rule after another, in kube-proxy's order"
)]
pub(super) fn translate_service(
    service: &Service,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    settings: &Settings,
    out: &mut Translation,
) {
    let meta = &service.metadata;
    let object = ObjectRef::new("Service", meta.namespace.as_ref(), meta.name.as_ref());
    let Some(spec) = service.spec.as_ref() else {
        out.warn(&object, "no spec");
        return;
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return;
    }
    let cluster_ips: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().collect(),
        (_, Some(ip)) => vec![ip],
        _ => Vec::new(),
    };
    if cluster_ips.iter().any(|ip| ip.as_str() == "None") {
        // Headless: DNS only.
        return;
    }
    let mut cluster_v4 = Vec::new();
    for ip in &cluster_ips {
        match parse_ip(ip) {
            Ok(Some(addr)) => cluster_v4.push(addr),
            Ok(None) => out.note(&object, format!("cluster IP {ip} is IPv6: not served yet")),
            Err(err) => out.warn(&object, format!("cluster IP {ip:?}: {err}")),
        }
    }
    let labels = meta.labels.as_ref();
    if let Some(proxy) = labels.and_then(|labels| labels.get(SERVICE_PROXY_NAME_LABEL))
        && settings.proxy_name.as_deref() != Some(proxy.as_str())
    {
        // Its address is allocated all the same: never dropped.
        for addr in cluster_v4 {
            out.desired.cluster_ips.insert(addr, false);
        }
        out.note(&object, format!("served by proxy {proxy:?}, not this one"));
        return;
    }
    if !matches!(kind, "ClusterIP" | "NodePort" | "LoadBalancer") {
        out.warn(&object, format!("unknown type {kind}"));
        return;
    }
    for addr in &cluster_v4 {
        out.desired.cluster_ips.insert(*addr, true);
    }
    let mut external_v4 = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        match parse_ip(ip) {
            Ok(Some(addr)) => external_v4.push((addr, FrontendKind::ExternalIp)),
            Ok(None) => out.note(&object, format!("external IP {ip} is IPv6: not served yet")),
            Err(err) => out.warn(&object, format!("external IP {ip:?}: {err}")),
        }
    }
    if kind == "LoadBalancer" {
        let ingress = service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for entry in ingress.into_iter().flatten() {
            let Some(ip) = entry.ip.as_ref() else {
                continue;
            };
            // ipMode Proxy: the load balancer proxies to node ports itself,
            // and packets to its IP must reach it (kube-proxy leaves them).
            if entry.ip_mode.as_deref() == Some("Proxy") {
                out.note(
                    &object,
                    format!("ingress IP {ip} has ipMode Proxy: left to the load balancer"),
                );
                continue;
            }
            match parse_ip(ip) {
                Ok(Some(addr)) => external_v4.push((addr, FrontendKind::LoadBalancerIp)),
                Ok(None) => out.note(&object, format!("ingress IP {ip} is IPv6: not served yet")),
                Err(err) => out.warn(&object, format!("load balancer ingress IP {ip:?}: {err}")),
            }
        }
    }

    let affinity_timeout_secs = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|config| config.client_ip.as_ref())
            .and_then(|client| client.timeout_seconds)
            .map_or(Ok(DEFAULT_AFFINITY_TIMEOUT_SECS), |secs| {
                u32::try_from(secs)
                    .ok()
                    .filter(|secs| (1..=MAX_AFFINITY_TIMEOUT_SECS).contains(secs))
                    .ok_or(secs)
            });
        match timeout {
            Ok(secs) => Some(secs),
            Err(secs) => {
                out.warn(
                    &object,
                    format!(
                        "session affinity timeout {secs}s outside 1..=86400; using the default"
                    ),
                );
                Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
            }
        }
    } else {
        None
    };
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    // externalTrafficPolicy only means something for node ports and load
    // balancers; kube-proxy applies it to externalIPs as well.
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");

    let source_ranges = if kind == "LoadBalancer" {
        load_balancer_source_ranges(spec, &external_v4, node, &object, out)
    } else {
        Vec::new()
    };
    let mut seen_ports = BTreeSet::new();
    let mut local_ready_addrs = BTreeSet::new();
    for port in spec.ports.iter().flatten() {
        let port_ref = ServicePortRef {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            port: port.name.clone().unwrap_or_default(),
        };
        let protocol = match protocol_of(port.protocol.as_ref()) {
            Ok(protocol) => protocol,
            Err(other) => {
                out.warn(
                    &object,
                    format!("port {port_ref}: protocol {other} is not served; port skipped"),
                );
                continue;
            }
        };
        let number = match port_number(port.port, "port") {
            Ok(number) => number,
            Err(err) => {
                out.warn(&object, format!("{err}; port skipped"));
                continue;
            }
        };
        if !seen_ports.insert((number, protocol)) {
            out.warn(
                &object,
                format!("port {number}/{protocol:?} appears twice; the second is skipped"),
            );
            continue;
        }
        let Categorized {
            cluster: all,
            local,
            any: any_endpoints,
            local_ready,
            serving,
        } = endpoints_for(port, protocol, slices, node, &object, out);
        local_ready_addrs.extend(local_ready);
        // Only UDP flows are cleared when their endpoint stops serving.
        let serving = if protocol == Protocol::Udp {
            serving
        } else {
            BTreeSet::new()
        };
        let port_ref = PortRef {
            service: &port_ref,
            serving: &serving,
        };

        // kube-proxy masquerades what is not local to ClusterIPs (a routed
        // client's replies must come back through this node) and to
        // external addresses with a Cluster policy; --masquerade-all
        // everything there.
        let masquerade = if settings.masquerade_all {
            Masquerade::Always
        } else {
            Masquerade::NonLocal
        };
        let internal = ServicePolicy {
            masquerade,
            local_only: internal_local,
            affinity_timeout_secs,
            drop_when_empty: internal_local && any_endpoints,
            source_ranges: Vec::new(),
            in_cluster_variant: false,
        };
        let internal_endpoints = if internal_local { &local } else { &all };
        let external = ServicePolicy {
            masquerade: if external_local {
                Masquerade::Never
            } else {
                masquerade
            },
            local_only: external_local,
            affinity_timeout_secs,
            drop_when_empty: external_local && any_endpoints,
            source_ranges: Vec::new(),
            in_cluster_variant: false,
        };
        // loadBalancerSourceRanges restrict the load balancer's IPs only.
        let load_balancer = ServicePolicy {
            source_ranges: source_ranges.clone(),
            ..external.clone()
        };
        let addresses = cluster_v4
            .iter()
            .map(|&addr| (addr, FrontendKind::ClusterIp))
            .chain(external_v4.iter().copied());
        for (addr, frontend_kind) in addresses {
            let frontend = Frontend::Address {
                addr,
                port: number,
                protocol,
            };
            let policy = match frontend_kind {
                FrontendKind::ClusterIp => {
                    insert(
                        out,
                        &object,
                        frontend,
                        frontend_kind,
                        &port_ref,
                        internal.clone(),
                        internal_endpoints,
                    );
                    continue;
                }
                FrontendKind::LoadBalancerIp => load_balancer.clone(),
                _ => external.clone(),
            };
            insert_external(
                out,
                &object,
                (frontend, frontend_kind),
                &port_ref,
                policy,
                (&all, &local),
            );
        }
        if matches!(kind, "NodePort" | "LoadBalancer")
            && let Some(node_port) = port.node_port
        {
            match port_number(node_port, "node port") {
                Ok(node_port) => {
                    let frontend = Frontend::NodePort {
                        port: node_port,
                        protocol,
                    };
                    insert_external(
                        out,
                        &object,
                        (frontend, FrontendKind::NodePort),
                        &port_ref,
                        external,
                        (&all, &local),
                    );
                }
                Err(err) => out.warn(&object, format!("{err}; node port skipped")),
            }
        }
    }
    // kube-proxy serves one only where the API server allocates one.
    if kind == "LoadBalancer"
        && external_local
        && let Some(port) = spec.health_check_node_port
    {
        match port_number(port, "health check node port") {
            Ok(port) => {
                out.desired.health_checks.insert(
                    port,
                    HealthCheck {
                        namespace: meta.namespace.clone().unwrap_or_default(),
                        name: meta.name.clone().unwrap_or_default(),
                        local_endpoints: local_ready_addrs.len(),
                    },
                );
            }
            Err(err) => out.warn(&object, format!("{err}; not served")),
        }
    }
}

/// What every frontend of one service port shares.
struct PortRef<'a> {
    service: &'a ServicePortRef,
    /// Its serving endpoints (UDP only).
    serving: &'a BTreeSet<SocketAddrV4>,
}

fn insert(
    out: &mut Translation,
    object: &ObjectRef<'_>,
    frontend: Frontend,
    kind: FrontendKind,
    port: &PortRef<'_>,
    policy: ServicePolicy,
    endpoints: &BTreeSet<Endpoint>,
) {
    if let Some(existing) = out.desired.frontends.get(&frontend) {
        let message = format!(
            "{frontend:?} is already served by {}; skipped for {}",
            existing.service, port.service
        );
        out.warn(object, message);
        return;
    }
    out.desired.frontends.insert(
        frontend,
        FrontendSpec {
            service: port.service.clone(),
            kind,
            policy,
            endpoints: endpoints.clone(),
            serving: port.serving.clone(),
        },
    );
}

/// The IPv4 `loadBalancerSourceRanges`, sorted. As kube-proxy does, when
/// one holds a node address the load balancer's own IPs are allowed too
/// (a VIP-style balancer whose traffic from the node loops back with the
/// VIP as source).
fn load_balancer_source_ranges(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    external: &[(Ipv4Addr, FrontendKind)],
    node: &NodeInfo,
    object: &ObjectRef<'_>,
    out: &mut Translation,
) -> Vec<Ipv4Cidr> {
    let mut ranges = BTreeSet::new();
    for text in spec.load_balancer_source_ranges.iter().flatten() {
        match text.parse::<Ipv4Cidr>() {
            Ok(range) => {
                ranges.insert(range);
            }
            Err(CidrError::Ipv6(_)) => {
                out.note(
                    object,
                    format!("source range {text} is IPv6: not served yet"),
                );
            }
            Err(CidrError::Invalid(_)) => out.warn(
                object,
                format!("source range {text:?} is not a CIDR; skipped"),
            ),
        }
    }
    if ranges
        .iter()
        .any(|range| node.addrs.iter().any(|addr| range.contains(*addr)))
    {
        for (addr, kind) in external {
            if *kind == FrontendKind::LoadBalancerIp
                && let Some(range) = Ipv4Cidr::new(*addr, 32)
            {
                ranges.insert(range);
            }
        }
    }
    ranges.into_iter().collect()
}

/// Inserts a node port, externalIP or load-balancer IP frontend, given its
/// service's (cluster, local) endpoints. With a Local policy it keeps this
/// node's endpoints, and an in-cluster variant holding every endpoint
/// serves this node's pods and processes: kube-proxy sends their traffic
/// to such addresses to every endpoint rather than drop it.
fn insert_external(
    out: &mut Translation,
    object: &ObjectRef<'_>,
    (frontend, kind): (Frontend, FrontendKind),
    service: &PortRef<'_>,
    policy: ServicePolicy,
    (all, local): (&BTreeSet<Endpoint>, &BTreeSet<Endpoint>),
) {
    if !policy.local_only {
        insert(out, object, frontend, kind, service, policy, all);
        return;
    }
    if let Some(variant) = frontend.in_cluster() {
        // Only local sources use the variant, which kube-proxy sends to the
        // endpoints without masquerading (--masquerade-all included).
        let in_cluster = ServicePolicy {
            masquerade: Masquerade::NonLocal,
            local_only: false,
            drop_when_empty: false,
            in_cluster_variant: false,
            ..policy.clone()
        };
        insert(out, object, variant, kind, service, in_cluster, all);
    }
    let policy = ServicePolicy {
        in_cluster_variant: true,
        ..policy
    };
    insert(out, object, frontend, kind, service, policy, local);
}
