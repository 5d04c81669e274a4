//! Services (frontends), backends and Maglev tables.
//!
//! | map | type | key | value |
//! |---|---|---|---|
//! | [`SERVICES_MAP`] | hash | [`ServiceKey`] | [`ServiceValue`] |
//! | [`BACKENDS_MAP`] | array | [`BackendId`] (`u32`) | [`Backend`] |
//! | [`MAGLEV_MAP`] | array, mmapable | slot (`u32`) | [`BackendId`] |
//! | [`NODE_ADDRS_MAP`] | hash | node IPv4 address (network order) | [`NodeAddr`] |
//! | [`AFFINITY_MAP`] | LRU hash | [`AffinityKey`] | [`AffinityValue`] |

use crate::{assert_layout, impl_user_pod};

pub const SERVICES_MAP: &str = "SVC_SERVICES_V1";
pub const BACKENDS_MAP: &str = "SVC_BACKENDS_V1";
pub const MAGLEV_MAP: &str = "SVC_MAGLEV_V1";
pub const NODE_ADDRS_MAP: &str = "SVC_NODEADDR_V1";
pub const AFFINITY_MAP: &str = "SVC_AFFINITY_V1";
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
pub const MAX_NODE_ADDRS: u32 = 64;

/// A backend's index in [`BACKENDS_MAP`]. 0 is never a backend.
pub type BackendId = u32;

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
    /// Service address, network order; 0 for [`SCOPE_NODEPORT`].
    pub addr: u32,
    /// Service port (or node port), network order.
    pub port: u16,
    /// IP protocol number.
    pub protocol: u8,
    /// [`SCOPE_ADDR`] or [`SCOPE_NODEPORT`].
    pub scope: u8,
}
assert_layout!(ServiceKey, size = 8, align = 4);

/// [`ServiceValue::flags`]: source-NAT traffic arriving from an uplink to
/// the node's address (externalTrafficPolicy Cluster on NodePort,
/// externalIPs and LoadBalancer IPs, as kube-proxy masquerades it).
pub const SVC_F_SNAT_EXTERNAL: u16 = 1 << 0;
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
    pub id: u32,
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
    /// Network order; 0 marks an unused id.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
}
assert_layout!(Backend, size = 8, align = 4);

/// A local node address (value of [`NODE_ADDRS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NodeAddr {
    /// Reserved for per-address flags.
    pub flags: u32,
}
assert_layout!(NodeAddr, size = 4, align = 4);

/// sessionAffinity ClientIP: which frontend, which client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityKey {
    /// [`ServiceValue::id`].
    pub service_id: u32,
    /// Client address, network order.
    pub client_addr: u32,
}
assert_layout!(AffinityKey, size = 8, align = 4);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityValue {
    /// Monotonic time of the last new connection, `bpf_ktime_get_coarse_ns`.
    pub last_used_ns: u64,
    pub backend_id: BackendId,
    pub _pad: u32,
}
assert_layout!(AffinityValue, size = 16, align = 8);

/// The data of a [`SOURCE_RANGES_MAP`] key: the trie's prefix length is 32
/// plus the CIDR's, so the frontend id always matches whole (its byte
/// order therefore does not matter; it is host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SourceRangeKey {
    /// [`ServiceValue::id`], host order.
    pub service_id: u32,
    /// Source address (a packet's) or CIDR base (an entry's), network
    /// order.
    pub addr: u32,
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
    NodeAddr,
    AffinityKey,
    AffinityValue
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
    }
}
