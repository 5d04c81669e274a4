//! Services (frontends), backends and Maglev tables.
//!
//! | map | type | key | value |
//! |---|---|---|---|
//! | [`SERVICES_MAP`] | hash | [`ServiceKey`] | [`ServiceValue`] |
//! | [`BACKENDS_MAP`] | array | [`BackendId`] (`u32`) | [`Backend`] |
//! | [`MAGLEV_MAP`] | array, mmapable | slot (`u32`) | [`BackendId`] (`u32`) |
//! | [`ADDRS_MAP`] | hash | [`WireAddr`] | [`AddrInfo`] |
//! | [`CIDRS_MAP`] | array | [`CIDRS_SERVICE`] or [`CIDRS_LOCAL`] | [`CidrSet`] |
//! | [`AFFINITY_MAP`] | LRU hash | [`AffinityKey`] | [`AffinityValue`] |
//! | [`MEMBERS_MAP`] | hash | [`MemberKey`] | `u32` (unused) |

pub use crate::wire::{FrontendId, WireAddr, WirePort};
use crate::{assert_layout, impl_user_pod};

pub const SERVICES_MAP: &str = "SVC_SERVICES_V1";
pub const BACKENDS_MAP: &str = "SVC_BACKENDS_V1";
pub const MAGLEV_MAP: &str = "SVC_MAGLEV_V1";
/// Addresses that are not frontends themselves but mean something: this
/// node's (node ports answer there) and every service's ClusterIP.
pub const ADDRS_MAP: &str = "SVC_ADDRS_V1";
/// Sets of CIDRs, one per index: the service CIDRs and the local CIDRs.
pub const CIDRS_MAP: &str = "SVC_CIDRS_V1";
pub const AFFINITY_MAP: &str = "SVC_AFFINITY_V1";
/// The backends in each session-affinity frontend's table: an affinity
/// entry is honoured only while its backend is still a member, not merely
/// installed for another service.
pub const MEMBERS_MAP: &str = "SVC_MEMBERS_V1";
/// Per-CPU array of `CounterValue` indexed by [`ServiceValue::id`].
pub const SERVICE_STATS_MAP: &str = "SVC_SVC_CTRS_V1";
/// `loadBalancerSourceRanges`: an LPM trie of [`SourceRangeKey`] → `u8`
/// (unused value).
pub const SOURCE_RANGES_MAP: &str = "SVC_SRC_RANGES_V1";
/// Entries of [`SOURCE_RANGES_MAP`] (CIDRs over all frontends).
pub const DEFAULT_MAX_SOURCE_RANGES: u32 = 16_384;
/// Per-CPU array of `CounterValue` indexed by [`BackendId`].
pub const BACKEND_STATS_MAP: &str = "SVC_BE_STATS_V1";

/// Default capacities; the agent sets them at load time.
pub const DEFAULT_MAX_SERVICES: u32 = 131_072;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
pub const DEFAULT_MAGLEV_SLOTS: u32 = 4 * 1024 * 1024;
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;
/// Node addresses [`ADDRS_MAP`] holds room for, besides one ClusterIP per
/// frontend.
pub const MAX_NODE_ADDRS: u32 = 64;

pub use crate::wire::BackendId;

/// [`ServiceKey::scope`]: the key's address is the service's own (a
/// ClusterIP, an externalIP or a LoadBalancer ingress IP).
pub const SCOPE_ADDR: u8 = 0;
/// [`ServiceKey::scope`]: a NodePort; the key's address is 0 and the
/// packet's destination must be one of [`NODE_ADDRS_MAP`].
pub const SCOPE_NODEPORT: u8 = 1;
/// [`ServiceKey::scope`] bit: the in-cluster variant of an external
/// frontend with a Local traffic policy (see [`SVC_F_IN_CLUSTER`]).
pub const SCOPE_IN_CLUSTER: u8 = 0x80;

/// What a packet is matched against.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceKey {
    /// Service address; unspecified for [`SCOPE_NODEPORT`].
    pub addr: WireAddr,
    /// Service port (or node port).
    pub port: WirePort,
    /// IP protocol number.
    pub protocol: u8,
    /// [`SCOPE_ADDR`] or [`SCOPE_NODEPORT`].
    pub scope: u8,
}
assert_layout!(ServiceKey, size = 8, align = 4);

/// [`ServiceValue::flags`]: masquerade new flows whose source is not local
/// (see `DatapathConfig::local_detect`) to the node's address, as
/// kube-proxy does for ClusterIPs (so a routed client's replies come back
/// through this node) and for external addresses with
/// externalTrafficPolicy Cluster.
pub const SVC_F_MASQ_NON_LOCAL: u16 = 1 << 0;
/// [`ServiceValue::flags`]: the table holds only this node's endpoints
/// (externalTrafficPolicy or internalTrafficPolicy Local).
pub const SVC_F_LOCAL_ONLY: u16 = 1 << 1;
/// [`ServiceValue::flags`]: sessionAffinity ClientIP; see
/// [`ServiceValue::affinity_timeout_secs`].
pub const SVC_F_AFFINITY: u16 = 1 << 2;
/// [`ServiceValue::flags`]: new flows only from sources under this
/// frontend's id in [`SOURCE_RANGES_MAP`] (`loadBalancerSourceRanges`, on
/// LoadBalancer IPs); others are dropped.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 3;
/// [`ServiceValue::flags`]: an external frontend with a Local traffic
/// policy that has an in-cluster variant (same key, scope with
/// [`SCOPE_IN_CLUSTER`]) holding every endpoint. Traffic from this node's
/// pods and processes uses the variant, as kube-proxy sends in-cluster
/// traffic to such addresses to every endpoint instead of only local ones.
pub const SVC_F_IN_CLUSTER: u16 = 1 << 4;
/// [`ServiceValue::flags`]: masquerade every new flow, local or not
/// (`--masquerade-all`).
pub const SVC_F_MASQ_ALWAYS: u16 = 1 << 5;

/// [`ServiceValue::on_empty`]: refuse (ICMP port unreachable, or
/// `ECONNREFUSED` from `connect`/`sendmsg` for host processes), as
/// kube-proxy's REJECT does.
pub const EMPTY_REJECT: u8 = 0;
/// [`ServiceValue::on_empty`]: drop silently (externalTrafficPolicy Local
/// on a node without local endpoints).
pub const EMPTY_DROP: u8 = 1;

/// A frontend: one service port on one address (or node port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceValue {
    /// Frontend id: index of its counters and part of its affinity keys.
    pub id: FrontendId,
    /// First slot of this frontend's table in [`MAGLEV_MAP`].
    pub maglev_offset: u32,
    /// Table size M (a prime); 0 when there are no backends.
    pub maglev_size: u32,
    /// Number of distinct backends in the table (informational).
    pub backend_count: u32,
    /// sessionAffinity ClientIP timeout, seconds.
    pub affinity_timeout_secs: u32,
    /// `SVC_F_*` bits.
    pub flags: u16,
    /// [`EMPTY_REJECT`] or [`EMPTY_DROP`].
    pub on_empty: u8,
    pub _pad: u8,
}
assert_layout!(ServiceValue, size = 24, align = 4);

/// [`Backend::flags`]: the endpoint runs on this node.
pub const BACKEND_F_LOCAL: u8 = 1 << 0;
/// [`Backend::flags`]: the endpoint is terminating (but still serving).
pub const BACKEND_F_TERMINATING: u8 = 1 << 1;

/// An endpoint address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Backend {
    /// Unspecified marks an unused id.
    pub addr: WireAddr,
    pub port: WirePort,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
}
assert_layout!(Backend, size = 8, align = 4);

/// [`AddrInfo::flags`]: a node address; node ports answer on it.
pub const ADDR_F_NODE: u32 = 1 << 0;
/// [`AddrInfo::flags`]: the ClusterIP of a service this proxy serves; a
/// new TCP or UDP flow to a port it does not define is refused, as
/// kube-proxy's nftables mode rejects it.
pub const ADDR_F_CLUSTER_IP: u32 = 1 << 1;

/// What an address of [`ADDRS_MAP`] is. An address there is allocated, even
/// with no flag (the ClusterIP of a service another proxy serves): packets
/// to service CIDRs are dropped only for addresses the map lacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AddrInfo {
    /// `ADDR_F_*` bits.
    pub flags: u32,
}
assert_layout!(AddrInfo, size = 4, align = 4);

/// [`CIDRS_MAP`] index: the service CIDRs (the cluster's `ServiceCIDR`
/// objects or `--service-cidr`). Packets to an address inside them that
/// no service holds are dropped, as kube-proxy's nftables mode does.
pub const CIDRS_SERVICE: u32 = 0;
/// [`CIDRS_MAP`] index: the CIDRs whose sources are local when
/// `DatapathConfig::local_detect` is `LOCAL_BY_CIDR`.
pub const CIDRS_LOCAL: u32 = 1;
/// Entries of [`CIDRS_MAP`].
pub const CIDR_SETS: u32 = 2;
/// CIDRs one [`CidrSet`] holds.
pub const MAX_CIDRS: u32 = 8;

/// An IPv4 CIDR as a base and a mask, both in wire order, so that
/// `addr & mask == base` works on addresses as read from packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Cidr {
    /// Host bits zero.
    pub base: WireAddr,
    pub mask: WireAddr,
}
assert_layout!(Cidr, size = 8, align = 4);

/// A few CIDRs, looked up by a bounded scan (cheaper than an LPM trie for
/// so few, and one array lookup for the whole set).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CidrSet {
    /// CIDRs in use, at most [`MAX_CIDRS`] (host order).
    pub count: u32,
    pub _pad: u32,
    pub cidrs: [Cidr; MAX_CIDRS as usize],
}
assert_layout!(CidrSet, size = 72, align = 4);

impl CidrSet {
    /// Whether `addr` lies in one of the CIDRs.
    #[inline]
    #[must_use]
    pub fn contains(&self, addr: WireAddr) -> bool {
        let mut i = 0;
        while i < MAX_CIDRS {
            if i >= self.count {
                return false;
            }
            let cidr = self.cidrs[i as usize];
            if addr & cidr.mask == cidr.base {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// sessionAffinity ClientIP: which frontend, which client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityKey {
    /// [`ServiceValue::id`].
    pub service_id: FrontendId,
    pub client_addr: WireAddr,
}
assert_layout!(AffinityKey, size = 8, align = 4);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityValue {
    /// Time of the last new connection, on the datapath's clock (as
    /// `CtEntry::last_seen_ns`).
    pub last_used_ns: u64,
    /// A [`BackendId`].
    pub backend_id: u32,
    pub _pad: u32,
}
assert_layout!(AffinityValue, size = 16, align = 8);

/// A backend in a frontend's table ([`MEMBERS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct MemberKey {
    /// [`ServiceValue::id`].
    pub service_id: FrontendId,
    /// A [`BackendId`].
    pub backend_id: u32,
}
assert_layout!(MemberKey, size = 8, align = 4);

/// The data of a [`SOURCE_RANGES_MAP`] key: the trie's prefix length is 32
/// plus the CIDR's, so the frontend id always matches whole (its byte
/// order therefore does not matter; it is host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SourceRangeKey {
    /// [`ServiceValue::id`].
    pub service_id: FrontendId,
    /// Source address (a packet's) or CIDR base (an entry's).
    pub addr: WireAddr,
}
assert_layout!(SourceRangeKey, size = 8, align = 4);

/// Prefix length of a [`SOURCE_RANGES_MAP`] lookup: the id and a whole
/// address.
pub const SOURCE_RANGE_LOOKUP_PREFIX: u32 = 64;

impl_user_pod!(
    SourceRangeKey,
    ServiceKey,
    ServiceValue,
    Backend,
    AddrInfo,
    Cidr,
    CidrSet,
    AffinityKey,
    AffinityValue,
    MemberKey
);

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(offset_of!(ServiceKey, scope) + 1, size_of::<ServiceKey>());
        assert_eq!(
            offset_of!(ServiceValue, _pad) + 1,
            size_of::<ServiceValue>()
        );
        assert_eq!(offset_of!(Backend, _pad) + 1, size_of::<Backend>());
        assert_eq!(
            offset_of!(AffinityKey, client_addr) + 4,
            size_of::<AffinityKey>()
        );
        assert_eq!(
            offset_of!(AffinityValue, _pad) + 4,
            size_of::<AffinityValue>()
        );
        assert_eq!(offset_of!(CidrSet, cidrs), 8);
    }

    fn cidr(octets: [u8; 4], prefix: u8) -> Cidr {
        let mask = WireAddr::mask(prefix);
        Cidr {
            base: WireAddr::from_octets(octets) & mask,
            mask,
        }
    }

    #[test]
    fn a_cidr_set_holds_what_its_cidrs_cover_and_nothing_past_its_count() {
        let mut set = CidrSet {
            count: 2,
            ..CidrSet::default()
        };
        set.cidrs[0] = cidr([10, 96, 0, 0], 12);
        set.cidrs[1] = cidr([192, 168, 7, 9], 32);
        set.cidrs[2] = cidr([172, 16, 0, 0], 16);
        let addr = WireAddr::from_octets;
        assert!(set.contains(addr([10, 96, 0, 10])));
        assert!(set.contains(addr([10, 111, 255, 255])));
        assert!(!set.contains(addr([10, 112, 0, 0])));
        assert!(set.contains(addr([192, 168, 7, 9])));
        assert!(!set.contains(addr([192, 168, 7, 8])));
        assert!(
            !set.contains(addr([172, 16, 0, 1])),
            "beyond the count: unused"
        );
        assert!(
            !CidrSet::default().contains(WireAddr::UNSPECIFIED),
            "an empty set holds nothing"
        );
        set.count = 99;
        set.cidrs = [cidr([10, 0, 0, 0], 8); MAX_CIDRS as usize];
        assert!(
            set.contains(addr([10, 1, 2, 3])),
            "a count too large stops at the array"
        );
    }
}
