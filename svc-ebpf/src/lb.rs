//! Services and backend selection: frontend lookup, session affinity and
//! Maglev.

use svc_common::{
    config::{DatapathConfig, LOCAL_BY_INTERFACE, NS_PER_SEC},
    lb::{
        ADDR_F_CLUSTER_IP, ADDR_F_NODE, AffinityKey, AffinityValue, Backend, CIDRS_LOCAL,
        CIDRS_SERVICE, MemberKey, SCOPE_ADDR, SCOPE_IN_CLUSTER, SCOPE_NODEPORT,
        SOURCE_RANGE_LOOKUP_PREFIX, SVC_F_AFFINITY, SVC_F_IN_CLUSTER, SVC_F_SOURCE_RANGES,
        ServiceKey, ServiceValue, SourceRangeKey,
    },
    wire::{FrontendId, WireAddr, WirePort},
};

use aya_ebpf::maps::lpm_trie::Key;

use crate::maps::{
    SVC_ADDRS_V1, SVC_AFFINITY_V1, SVC_BACKENDS_V1, SVC_CIDRS_V1, SVC_MAGLEV_V1, SVC_MEMBERS_V1,
    SVC_SERVICES_V1, SVC_SRC_RANGES_V1,
};

/// What a packet's destination is to the proxy.
pub enum Destination {
    /// A frontend: its key and its entry, read in place (valid for the
    /// program run: an update swaps in a new element and frees the old one
    /// only after readers are done).
    Service(ServiceKey, &'static ServiceValue),
    /// The ClusterIP of a served service, on a port or protocol it does not
    /// define: refused.
    UnknownPort,
    /// An address of the service CIDRs that no service holds: dropped.
    Unallocated,
    /// Not a service address: none of the proxy's business.
    Other,
}

/// The frontend for a destination: its own address (ClusterIP, externalIP,
/// LoadBalancer IP) first, then a NodePort if the address is the node's.
/// Failing that, a ClusterIP is refused and the rest of the service CIDRs
/// dropped, as kube-proxy's nftables mode does.
#[inline(always)]
pub fn destination(daddr: WireAddr, dport: WirePort, protocol: u8) -> Destination {
    let key = ServiceKey {
        addr: daddr,
        port: dport,
        protocol,
        scope: SCOPE_ADDR,
    };
    if let Some(service) = SVC_SERVICES_V1.get_ptr(key) {
        // SAFETY: from a map lookup, valid for the program run.
        return Destination::Service(key, unsafe { &*service });
    }
    let Some(info) = SVC_ADDRS_V1.get_ptr(daddr) else {
        return if in_cidrs(CIDRS_SERVICE, daddr) {
            Destination::Unallocated
        } else {
            Destination::Other
        };
    };
    // SAFETY: from a map lookup.
    let flags = unsafe { (*info).flags };
    if flags & ADDR_F_NODE != 0 {
        let key = ServiceKey {
            addr: WireAddr::UNSPECIFIED,
            port: dport,
            protocol,
            scope: SCOPE_NODEPORT,
        };
        if let Some(service) = SVC_SERVICES_V1.get_ptr(key) {
            // SAFETY: from a map lookup, valid for the program run.
            return Destination::Service(key, unsafe { &*service });
        }
    }
    if flags & ADDR_F_CLUSTER_IP != 0 {
        Destination::UnknownPort
    } else {
        Destination::Other
    }
}

/// Whether the destination of a packet that is not TCP or UDP (nor a
/// later fragment) is refused or dropped: every protocol but TCP and UDP
/// is unknown to a ClusterIP.
#[inline(always)]
pub fn other_protocol_destination(daddr: WireAddr) -> Destination {
    match SVC_ADDRS_V1.get_ptr(daddr) {
        // SAFETY: from a map lookup.
        Some(info) if unsafe { (*info).flags } & ADDR_F_CLUSTER_IP != 0 => Destination::UnknownPort,
        Some(_) => Destination::Other,
        None if in_cidrs(CIDRS_SERVICE, daddr) => Destination::Unallocated,
        None => Destination::Other,
    }
}

/// Whether `addr` is one of this node's addresses (a host-network pod's
/// address too).
#[inline(always)]
pub fn is_node_addr(addr: WireAddr) -> bool {
    // SAFETY: from a map lookup.
    SVC_ADDRS_V1
        .get_ptr(addr)
        .is_some_and(|info| unsafe { (*info).flags } & ADDR_F_NODE != 0)
}

#[inline(always)]
fn in_cidrs(set: u32, addr: WireAddr) -> bool {
    SVC_CIDRS_V1
        .get(set)
        .is_some_and(|cidrs| cidrs.contains(addr))
}

/// Whether a new flow's source is local (this node's pods): by where it
/// entered (`from_pod`), or by the local CIDRs, as the configuration says.
/// Local sources keep their address to ClusterIPs and reach every endpoint
/// of external addresses with a Local policy.
#[inline(always)]
pub fn is_local(config: &DatapathConfig, from_pod: bool, saddr: WireAddr) -> bool {
    if config.local_detect == LOCAL_BY_INTERFACE {
        from_pod
    } else {
        in_cidrs(CIDRS_LOCAL, saddr)
    }
}

/// For traffic from this node's own pods and processes: an external
/// frontend with a Local policy gives way to its in-cluster variant, which
/// holds every endpoint.
#[inline(always)]
pub fn in_cluster(mut key: ServiceKey, service: &'static ServiceValue) -> &'static ServiceValue {
    if service.flags & SVC_F_IN_CLUSTER != 0 {
        key.scope |= SCOPE_IN_CLUSTER;
        if let Some(variant) = SVC_SERVICES_V1.get_ptr(key) {
            // SAFETY: from a map lookup, valid for the program run.
            return unsafe { &*variant };
        }
    }
    service
}

/// Whether `saddr` may open a new flow to `service`: always, unless the
/// frontend has `loadBalancerSourceRanges` and none of them holds it.
#[inline(always)]
pub fn source_allowed(service: &ServiceValue, saddr: WireAddr) -> bool {
    service.flags & SVC_F_SOURCE_RANGES == 0 || in_source_ranges(service.id, saddr)
}

/// Whether `saddr` is in frontend `service_id`'s source ranges. Not
/// inlined: its key would add to the packet path's stack frame.
#[inline(never)]
fn in_source_ranges(service_id: FrontendId, saddr: WireAddr) -> bool {
    let key = Key::new(
        SOURCE_RANGE_LOOKUP_PREFIX,
        SourceRangeKey {
            service_id,
            addr: saddr,
        },
    );
    SVC_SRC_RANGES_V1.get(&key).is_some()
}

/// A backend by id; `None` for 0 or an id without a backend.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    let backend = *SVC_BACKENDS_V1.get(id)?;
    (!backend.addr.is_unspecified()).then_some(backend)
}

/// The Maglev pick for a flow hash. The service must have backends.
#[inline(always)]
pub fn maglev(service: &ServiceValue, hash: u32) -> Option<u32> {
    if service.maglev_size == 0 {
        return None;
    }
    let slot = service
        .maglev_offset
        .wrapping_add(hash % service.maglev_size);
    SVC_MAGLEV_V1.get(slot).copied()
}

/// A chosen backend and whether session affinity chose it.
pub struct Choice {
    /// A backend id (never 0).
    pub id: u32,
    pub backend: Backend,
    pub from_affinity: bool,
}

/// Records the client's backend for its next flow. Best effort: without the
/// entry the next flow still gets a backend. Not inlined: its value would
/// add to the packet path's stack frame.
#[inline(never)]
fn remember_affinity(key: &AffinityKey, backend_id: u32, now: u64) {
    let value = AffinityValue {
        last_used_ns: now,
        backend_id,
        _pad: 0,
    };
    let _ = SVC_AFFINITY_V1.insert(key, value, 0);
}

/// Whether backend `id` is in the table of affinity frontend `service_id`.
#[inline(always)]
fn is_member(service_id: FrontendId, id: u32) -> bool {
    let key = MemberKey {
        service_id,
        backend_id: id,
    };
    SVC_MEMBERS_V1.get_ptr(key).is_some()
}

/// Picks the backend for a new flow: the client's affinity entry if it is
/// fresh and its backend is still in the service's table, else Maglev on
/// the flow hash. Records affinity for the next flow.
#[inline(always)]
pub fn choose(service: &ServiceValue, client: WireAddr, hash: u32, now: u64) -> Option<Choice> {
    let affinity_key = AffinityKey {
        service_id: service.id,
        client_addr: client,
    };
    let with_affinity = service.flags & SVC_F_AFFINITY != 0;
    if with_affinity && let Some(entry) = SVC_AFFINITY_V1.get_ptr_mut(affinity_key) {
        // SAFETY: from a map lookup; racing writers store whole values.
        let entry = unsafe { &mut *entry };
        let timeout = u64::from(service.affinity_timeout_secs) * NS_PER_SEC;
        if now.saturating_sub(entry.last_used_ns) < timeout
            && is_member(service.id, entry.backend_id)
            && let Some(backend) = backend(entry.backend_id)
        {
            entry.last_used_ns = now;
            return Some(Choice {
                id: entry.backend_id,
                backend,
                from_affinity: true,
            });
        }
    }
    let id = maglev(service, hash)?;
    let backend = backend(id)?;
    if with_affinity {
        remember_affinity(&affinity_key, id, now);
    }
    Some(Choice {
        id,
        backend,
        from_affinity: false,
    })
}
