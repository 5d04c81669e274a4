//! Which endpoints a frontend sends to: readiness and termination,
//! traffic policies, topology hints.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::api::{core::v1::ServicePort, discovery::v1::EndpointSlice};

use crate::datapath::Protocol;

use super::{Endpoint, NodeInfo, ObjectRef, Translation, parse_ip, port_number, protocol_of};

/// One endpoint of a service port and what kube-proxy's categorization
/// reads of it.
struct Candidate {
    endpoint: Endpoint,
    ready: bool,
    /// Its serving condition (ready when unset).
    serving: bool,
    /// Serving and terminating (used only when nothing is ready).
    serving_terminating: bool,
    zones: Vec<String>,
    nodes: Vec<String>,
}

/// Which endpoints topology hints keep.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    Any,
    SameNode,
    SameZone,
}

/// kube-proxy's choice: node hints when every ready endpoint has some and
/// one names this node; else zone hints when every ready endpoint has some
/// and one names this node's zone; else no filtering.
fn topology(candidates: &[Candidate], node: &NodeInfo) -> Topology {
    let ready = || candidates.iter().filter(|c| c.ready);
    if ready().next().is_none() {
        return Topology::Any;
    }
    if ready().all(|c| !c.nodes.is_empty()) && ready().any(|c| c.nodes.contains(&node.name)) {
        return Topology::SameNode;
    }
    if let Some(zone) = &node.zone
        && ready().all(|c| !c.zones.is_empty())
        && ready().any(|c| c.zones.contains(zone))
    {
        return Topology::SameZone;
    }
    Topology::Any
}

/// The endpoints of one service port, categorized as kube-proxy does.
pub(super) struct Categorized {
    /// For cluster traffic policy: the ready endpoints topology hints keep
    /// for this node, else (none ready) the serving, terminating ones.
    pub(super) cluster: BTreeSet<Endpoint>,
    /// For local traffic policy: this node's ready endpoints, else its
    /// serving, terminating ones.
    pub(super) local: BTreeSet<Endpoint>,
    /// Whether the service has any usable endpoint anywhere (a local
    /// policy then drops rather than refuses).
    pub(super) any: bool,
    /// This node's ready endpoints' addresses (for health checks).
    pub(super) local_ready: BTreeSet<Ipv4Addr>,
    /// Every serving endpoint (ready, or serving and terminating).
    pub(super) serving: BTreeSet<SocketAddrV4>,
}

fn categorize(candidates: &[Candidate], node: &NodeInfo) -> Categorized {
    let pick = |keep: &dyn Fn(&Candidate) -> bool| -> BTreeSet<Endpoint> {
        candidates
            .iter()
            .filter(|c| keep(c))
            .map(|c| c.endpoint)
            .collect()
    };
    let mode = topology(candidates, node);
    let mut cluster = pick(&|c| {
        c.ready
            && match mode {
                Topology::Any => true,
                Topology::SameNode => c.nodes.contains(&node.name),
                Topology::SameZone => node.zone.as_ref().is_some_and(|z| c.zones.contains(z)),
            }
    });
    if cluster.is_empty() {
        cluster = pick(&|c| c.serving_terminating);
    }
    let mut local = pick(&|c| c.ready && c.endpoint.local);
    if local.is_empty() {
        local = pick(&|c| c.serving_terminating && c.endpoint.local);
    }
    Categorized {
        cluster,
        local,
        any: candidates.iter().any(|c| c.ready || c.serving_terminating),
        local_ready: candidates
            .iter()
            .filter(|c| c.ready && c.endpoint.local)
            .map(|c| *c.endpoint.addr.ip())
            .collect(),
        serving: candidates
            .iter()
            .filter(|c| c.serving)
            .map(|c| c.endpoint.addr)
            .collect(),
    }
}

/// The endpoints of one service port across its slices: the slice port
/// with the service port's name gives each slice's target port, so
/// backends may listen on different ports. Endpoints neither ready nor
/// serving-and-terminating are never used.
pub(super) fn endpoints_for(
    port: &ServicePort,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    object: &ObjectRef<'_>,
    out: &mut Translation,
) -> Categorized {
    let name = port.name.clone().unwrap_or_default();
    let mut candidates = Vec::new();
    for slice in slices {
        let slice_object = ObjectRef::new(
            "EndpointSlice",
            slice.metadata.namespace.as_ref(),
            slice.metadata.name.as_ref(),
        );
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.clone().unwrap_or_default() == name
                && protocol_of(p.protocol.as_ref()).ok() == Some(protocol)
        }) else {
            continue;
        };
        let Some(target) = target.port else {
            continue;
        };
        let target = match port_number(target, "endpoint port") {
            Ok(target) => target,
            Err(err) => {
                out.warn(&slice_object, format!("{err}; slice skipped for {object}"));
                continue;
            }
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let addr = match parse_ip(address) {
                Ok(Some(addr)) => addr,
                Ok(None) => continue,
                Err(err) => {
                    out.warn(
                        &slice_object,
                        format!("endpoint address {address:?}: {err}"),
                    );
                    continue;
                }
            };
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let hints = endpoint.hints.as_ref();
            candidates.push(Candidate {
                endpoint: Endpoint {
                    addr: SocketAddrV4::new(addr, target),
                    local: endpoint.node_name.as_deref() == Some(node.name.as_str()),
                    terminating: !ready,
                },
                ready,
                serving,
                serving_terminating: !ready && serving && terminating,
                zones: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|zone| zone.name.clone())
                    .collect(),
                nodes: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|node| node.name.clone())
                    .collect(),
            });
        }
    }
    one_per_address(&mut candidates);
    categorize(&candidates, node)
}

/// Keeps one candidate per address and port, as kube-proxy keeps one
/// endpoint per `ip:port` when slices overlap (a slice being replaced, two
/// controllers). kube-proxy keeps the first it meets unless a later one is
/// local; here the local one, then the ready one, then the serving one
/// wins, so the choice does not depend on the order of the slices (and an
/// endpoint listed twice is not rewritten at every sync).
fn one_per_address(candidates: &mut Vec<Candidate>) {
    candidates.sort_by(|a, b| {
        a.endpoint.addr.cmp(&b.endpoint.addr).then_with(|| {
            let rank = |c: &Candidate| (c.endpoint.local, c.ready, c.serving);
            rank(b).cmp(&rank(a))
        })
    });
    candidates.dedup_by(|later, first| later.endpoint.addr == first.endpoint.addr);
}
