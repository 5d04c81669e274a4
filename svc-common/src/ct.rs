//! Connection tracking and NAT.
//!
//! One LRU hash, [`CT_MAP`], holds two entries per translated flow: one
//! keyed by the tuple the client sends (the original direction) and one by
//! the tuple the backend answers with (the reply direction). Each entry says
//! what the packet's tuple becomes, so both directions are translated by one
//! lookup and the same rewrite code. The reply-direction keys double as the
//! NAT table: a new flow whose reply tuple is taken gets another source
//! port, so two flows never share a reply key (one backend behind two
//! services, source NAT for external traffic).
//!
//! The two entries of a flow share its lifetime: both carry the flow's
//! state flags, each is stamped by the packets it translates, and the flow
//! lives while either stamp is younger than the timeout of its state
//! ([`timeout_ns`]). The datapath and the agent's sweep judge it with the
//! same functions, here.

use crate::{
    assert_layout,
    config::{DatapathConfig, NS_PER_SEC},
    impl_user_pod, proto,
    wire::{FrontendId, WireAddr, WirePort},
};

pub const CT_MAP: &str = "SVC_CT_V1";
/// Default capacity of [`CT_MAP`] (entries; two per flow).
pub const DEFAULT_CT_ENTRIES: u32 = 524_288;

/// A packet's IPv4 5-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtKey {
    pub saddr: WireAddr,
    pub daddr: WireAddr,
    pub sport: WirePort,
    pub dport: WirePort,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
assert_layout!(CtKey, size = 16, align = 4);

impl CtKey {
    /// The tuple of a packet going the other way.
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            protocol: self.protocol,
            _pad: [0; 3],
        }
    }
}

/// [`CtEntry::flags`]: this entry is the reply direction.
pub const CT_F_REPLY: u8 = 1 << 0;
/// [`CtEntry::flags`]: a reply has been seen (TCP: the handshake got an
/// answer; UDP: the backend answered).
pub const CT_F_SEEN_REPLY: u8 = 1 << 1;
/// [`CtEntry::flags`]: a FIN or RST has been seen.
pub const CT_F_CLOSING: u8 = 1 << 2;
/// [`CtEntry::flags`]: the source was NATed to the node (masquerade or
/// hairpin).
pub const CT_F_SNAT: u8 = 1 << 3;

/// How to translate packets whose tuple is the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtEntry {
    /// Last packet, on the datapath's clock (jiffies scaled by
    /// `DatapathConfig::ns_per_tick`, or `bpf_ktime_get_coarse_ns` when that
    /// is 0; refreshed at most once a second).
    pub last_seen_ns: u64,
    /// The tuple's new source address.
    pub saddr: WireAddr,
    /// The tuple's new destination address.
    pub daddr: WireAddr,
    /// New source port.
    pub sport: WirePort,
    /// New destination port.
    pub dport: WirePort,
    /// The backend the flow goes to (a [`crate::wire::BackendId`]).
    pub backend_id: u32,
    /// The frontend ([`crate::lb::ServiceValue::id`]).
    pub service_id: FrontendId,
    /// `CT_F_*` bits.
    pub flags: u8,
    pub _pad: [u8; 3],
}
assert_layout!(CtEntry, size = 32, align = 8);

/// Fragments of translated datagrams: [`FragKey`] → [`FragValue`], an LRU
/// hash. Only a first fragment carries the ports connection tracking
/// needs; its translation is remembered here for the later ones.
pub const FRAG_MAP: &str = "SVC_FRAGS_V1";
/// Entries of [`FRAG_MAP`] (datagrams in flight).
pub const DEFAULT_FRAG_ENTRIES: u32 = 8192;

/// A fragmented datagram as it arrived: its addresses, IP id and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FragKey {
    pub saddr: WireAddr,
    pub daddr: WireAddr,
    /// IPv4 identification, network order.
    pub id: u16,
    /// IP protocol number.
    pub protocol: u8,
    pub _pad: u8,
}
assert_layout!(FragKey, size = 12, align = 4);

/// The addresses its first fragment was translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FragValue {
    pub saddr: WireAddr,
    pub daddr: WireAddr,
}
assert_layout!(FragValue, size = 8, align = 4);

/// Direct TCP connections pods opened (to anything but a service), an
/// array of [`DIRECT_SLOTS`] [`CtKey`]s: the tuple the peer answers with,
/// at slot [`direct_slot`]. A new service flow whose reply tuple is in its
/// slot takes a port from the NAT range instead of its client's port, so
/// the backend never sees two connections on one tuple. Written on SYNs
/// only; a later SYN hashed to the same slot replaces the entry. A slot
/// rather than an LRU hash: a SYN then costs a store, not an allocation.
pub const DIRECT_MAP: &str = "SVC_DIRECT_V1";
/// Slots of [`DIRECT_MAP`], a power of two.
pub const DIRECT_SLOTS: u32 = 65_536;

/// The slot of [`DIRECT_MAP`] for a tuple.
#[inline]
#[must_use]
pub const fn direct_slot(key: &CtKey) -> u32 {
    crate::hash::flow_hash(key.saddr, key.daddr, key.sport, key.dport, key.protocol)
        & (DIRECT_SLOTS - 1)
}

impl_user_pod!(CtKey, CtEntry, FragKey, FragValue);

/// How long a flow in the state `flags` lives without packets.
#[inline]
#[must_use]
pub const fn timeout_ns(config: &DatapathConfig, protocol: u8, flags: u8) -> u64 {
    if protocol != proto::TCP {
        config.ct_timeout_udp_ns
    } else if flags & CT_F_CLOSING != 0 {
        config.ct_timeout_tcp_closing_ns
    } else if flags & CT_F_SEEN_REPLY != 0 {
        config.ct_timeout_tcp_established_ns
    } else {
        config.ct_timeout_tcp_syn_ns
    }
}

/// An entry's stamp is refreshed at most this often (a store per packet
/// would bounce the cache line between CPUs).
pub const REFRESH_NS: u64 = NS_PER_SEC;

impl CtEntry {
    /// Whether this entry translated a packet within its flow's timeout.
    #[inline]
    #[must_use]
    pub const fn is_fresh(&self, config: &DatapathConfig, protocol: u8, now: u64) -> bool {
        now.saturating_sub(self.last_seen_ns) < timeout_ns(config, protocol, self.flags)
    }

    /// The key of the flow's other entry: the tuple this entry rewrites
    /// packets to, reversed (an original entry's peer is its reply entry
    /// and the other way round).
    #[inline]
    #[must_use]
    pub const fn peer_key(&self, protocol: u8) -> CtKey {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            protocol,
            _pad: [0; 3],
        }
    }

    /// Whether this entry is the peer of the entry keyed `key`: it
    /// rewrites packets to `key` reversed. An entry whose peer was taken
    /// over by another flow is an orphan and no longer belongs to a flow.
    #[inline]
    #[must_use]
    pub const fn is_peer_of(&self, key: &CtKey) -> bool {
        self.saddr.raw() == key.daddr.raw()
            && self.daddr.raw() == key.saddr.raw()
            && self.sport.raw() == key.dport.raw()
            && self.dport.raw() == key.sport.raw()
    }
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(offset_of!(CtKey, _pad) + 3, size_of::<CtKey>());
        assert_eq!(offset_of!(CtEntry, _pad) + 3, size_of::<CtEntry>());
    }

    const KEY: CtKey = CtKey {
        saddr: WireAddr::from_octets([10, 0, 0, 1]),
        daddr: WireAddr::from_octets([10, 96, 0, 1]),
        sport: WirePort::from_host(40_000),
        dport: WirePort::from_host(80),
        protocol: proto::TCP,
        _pad: [0; 3],
    };

    /// The two entries of a flow from `KEY` to backend 10.1.0.5:8080.
    fn flow() -> (CtEntry, CtEntry) {
        let original = CtEntry {
            saddr: KEY.saddr,
            daddr: WireAddr::from_octets([10, 1, 0, 5]),
            sport: KEY.sport,
            dport: WirePort::from_host(8080),
            ..CtEntry::default()
        };
        let reply = CtEntry {
            saddr: KEY.daddr,
            daddr: KEY.saddr,
            sport: KEY.dport,
            dport: KEY.sport,
            flags: CT_F_REPLY,
            ..CtEntry::default()
        };
        (original, reply)
    }

    #[test]
    fn each_entry_names_its_peer() {
        let (original, reply) = flow();
        let reply_key = original.peer_key(proto::TCP);
        assert_eq!(reply.peer_key(proto::TCP), KEY);
        assert!(reply.is_peer_of(&KEY));
        assert!(original.is_peer_of(&reply_key));
        // A flow that took the original key over with another NAT port
        // no longer owns the old reply entry.
        let taken_over = CtEntry {
            sport: WirePort::from_host(61_000),
            ..original
        };
        assert!(!taken_over.is_peer_of(&reply_key));
    }

    #[test]
    fn a_flow_times_out_by_its_state() {
        let config = DatapathConfig::DEFAULT;
        let (mut entry, _) = flow();
        entry.last_seen_ns = 100 * NS_PER_SEC;
        let after = |secs: u64| entry.last_seen_ns + secs * NS_PER_SEC;
        assert!(
            entry.is_fresh(&config, proto::TCP, after(59)),
            "SYN sent: 60 s"
        );
        assert!(!entry.is_fresh(&config, proto::TCP, after(60)));
        entry.flags |= CT_F_SEEN_REPLY;
        assert!(
            entry.is_fresh(&config, proto::TCP, after(3600)),
            "answered: 6 h"
        );
        entry.flags |= CT_F_CLOSING;
        assert!(
            !entry.is_fresh(&config, proto::TCP, after(10)),
            "closing: 10 s"
        );
        assert!(entry.is_fresh(&config, proto::UDP, after(59)), "UDP: 60 s");
        assert!(
            entry.is_fresh(&config, proto::TCP, 0),
            "a clock behind the stamp is not a timeout"
        );
    }

    #[test]
    fn reversing_twice_is_identity() {
        let key = CtKey {
            saddr: WireAddr::from_raw(1),
            daddr: WireAddr::from_raw(2),
            sport: WirePort::from_raw(3),
            dport: WirePort::from_raw(4),
            protocol: 6,
            _pad: [0; 3],
        };
        assert_eq!(key.reversed().reversed(), key);
        assert_eq!(key.reversed().saddr, WireAddr::from_raw(2));
    }
}
