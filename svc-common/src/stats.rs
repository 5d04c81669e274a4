//! Packet counters by class, by datapath event and by drop reason.
//!
//! One per-CPU array, `SVC_STATS_V3`, indexed by [`Counter`]; user space sums
//! the CPUs. Every packet the tc programs see bumps exactly one class counter
//! (`pass_non_ipv4` to `malformed_l4_truncated`); translated, dropped and
//! rejected packets also bump one event counter. The socket hooks count
//! their own events.

use crate::{assert_layout, impl_user_pod};

/// Name of the per-CPU array of [`CounterValue`]s, indexed by [`Counter`].
pub const STATS_MAP: &str = "SVC_STATS_V3";

/// Packets and bytes, in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CounterValue {
    /// Packets counted (host order).
    pub packets: u64,
    /// Bytes counted, whole frames as the hook saw them (host order).
    pub bytes: u64,
}
assert_layout!(CounterValue, size = 16, align = 8);
impl_user_pod!(CounterValue);

impl CounterValue {
    /// Adds another CPU's (or another period's) counts.
    #[must_use]
    pub const fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)+) => {
        /// Index into [`STATS_MAP`]. The map holds the value; this enum is
        /// never stored in a map.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Counter {
            $($(#[doc = $doc])* $variant,)+
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &[Self] = &[$(Self::$variant,)+];

            /// Stable `snake_case` name, used for metrics and tables.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)+
                }
            }
        }
    };
}

counters! {
    /// Not IPv4 (IPv6, ARP, ...): passed untouched.
    PassNonIpv4 = "pass_non_ipv4",
    /// IPv4 TCP.
    Ipv4Tcp = "ipv4_tcp",
    /// IPv4 UDP.
    Ipv4Udp = "ipv4_udp",
    /// IPv4 ICMP.
    Ipv4Icmp = "ipv4_icmp",
    /// IPv4 with another protocol.
    Ipv4Other = "ipv4_other",
    /// A non-first IPv4 fragment: it carries no L4 header.
    Ipv4Fragment = "ipv4_fragment",
    /// Shorter than an Ethernet header.
    MalformedEthernet = "malformed_ethernet",
    /// `EtherType` IPv4 but shorter than a minimal IPv4 header.
    MalformedIpv4Truncated = "malformed_ipv4_truncated",
    /// IPv4 header with a wrong version, a header length under 20 bytes, or a
    /// header length that runs past the packet.
    MalformedIpv4Header = "malformed_ipv4_header",
    /// TCP or UDP header cut short.
    MalformedL4Truncated = "malformed_l4_truncated",
    /// First packet of a flow to a service: a backend was chosen.
    LbNewFlow = "lb_new_flow",
    /// Later packet of a tracked flow, client to backend.
    LbEstablished = "lb_established",
    /// Packet of a tracked flow, backend to client (reverse translated).
    LbReply = "lb_reply",
    /// The backend came from session affinity.
    LbAffinityHit = "lb_affinity_hit",
    /// A new flow started by a TCP segment that is not a SYN: its
    /// connection-tracking entries were evicted (a full table) or it
    /// predates the datapath. If the service's table changed since, the
    /// backend it now reaches resets it.
    LbNewFlowMidstream = "lb_new_flow_midstream",
    /// An ICMP error quoting a translated packet: the quote translated back
    /// and the error sent on to the quote's original sender.
    LbIcmpError = "lb_icmp_error",
    /// A later fragment of a translated datagram: given the addresses its
    /// first fragment was translated to.
    LbFragment = "lb_fragment",
    /// Dropped: no backend and the service says drop (externalTrafficPolicy
    /// Local without local endpoints).
    DropNoBackend = "drop_no_backend",
    /// Refused with ICMP port unreachable: the service has no endpoints.
    RejectNoBackend = "reject_no_backend",
    /// Dropped: the refusal could not be built (IP options, helper error).
    DropRejectFailed = "drop_reject_failed",
    /// Dropped: every NAT source port tried was taken.
    DropNatPortsExhausted = "drop_nat_ports_exhausted",
    /// Dropped: a Maglev slot named a backend id with no backend (the agent
    /// and the maps disagree).
    DropBadBackend = "drop_bad_backend",
    /// Dropped: connection tracking refused the new entries.
    DropCtInsertFailed = "drop_ct_insert_failed",
    /// Dropped: rewriting the packet failed.
    DropRewriteFailed = "drop_rewrite_failed",
    /// Dropped: the flow needs source NAT (hairpin or masquerade) and no
    /// masquerade address is configured.
    DropNoSnatAddr = "drop_no_snat_addr",
    /// Dropped: the source is outside the LoadBalancer IP's
    /// `loadBalancerSourceRanges` (host sockets: the connect fails).
    DropSourceRange = "drop_source_range",
    /// Refused with ICMP port unreachable (host sockets: `ECONNREFUSED`):
    /// a new flow to a ClusterIP on a port or protocol its service does
    /// not define.
    RejectUnknownPort = "reject_unknown_port",
    /// Dropped (host sockets: `EHOSTUNREACH`): an address of the service
    /// CIDRs that no service holds.
    DropUnallocatedServiceIp = "drop_unallocated_service_ip",
    /// Host socket: a connect or sendmsg to a service was translated.
    SockTranslated = "sock_translated",
    /// Host socket: refused, the service has no endpoints.
    SockRejectNoBackend = "sock_reject_no_backend",
    /// Host socket: a peer address was translated back to the service.
    SockRevTranslated = "sock_rev_translated",
}

/// Number of entries in [`STATS_MAP`].
#[expect(
    clippy::cast_possible_truncation,
    reason = "a handful of counters always fits in u32"
)]
pub const COUNTERS: u32 = Counter::ALL.len() as u32;

impl Counter {
    /// Index of this counter in [`STATS_MAP`].
    #[must_use]
    pub const fn index(self) -> u32 {
        self as u32
    }
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use super::*;

    #[test]
    fn counter_value_has_no_implicit_padding() {
        assert_eq!(offset_of!(CounterValue, packets), 0);
        assert_eq!(offset_of!(CounterValue, bytes), 8);
        assert_eq!(size_of::<CounterValue>(), 16);
    }

    #[test]
    fn counter_indexes_are_dense_and_names_unique() {
        for (i, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(counter.index() as usize, i, "{counter:?} is out of order");
        }
        for (i, a) in Counter::ALL.iter().enumerate() {
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.name(), b.name(), "two counters share a name");
            }
        }
        assert_eq!(COUNTERS as usize, Counter::ALL.len());
    }

    #[test]
    fn add_sums_both_fields() {
        let a = CounterValue {
            packets: 1,
            bytes: 60,
        };
        let b = CounterValue {
            packets: 2,
            bytes: 100,
        };
        assert_eq!(
            a.add(b),
            CounterValue {
                packets: 3,
                bytes: 160
            }
        );
    }
}
