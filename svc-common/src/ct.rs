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

use crate::{assert_layout, impl_user_pod};

pub const CT_MAP: &str = "SVC_CT_V1";
/// Default capacity of [`CT_MAP`] (entries; two per flow).
pub const DEFAULT_CT_ENTRIES: u32 = 524_288;

/// A packet's IPv4 5-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtKey {
    /// Network order.
    pub saddr: u32,
    /// Network order.
    pub daddr: u32,
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
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
    /// Last packet, `bpf_ktime_get_coarse_ns` (refreshed at most once a
    /// second).
    pub last_seen_ns: u64,
    /// The tuple's new source address (network order).
    pub saddr: u32,
    /// The tuple's new destination address (network order).
    pub daddr: u32,
    /// New source port (network order).
    pub sport: u16,
    /// New destination port (network order).
    pub dport: u16,
    /// The backend the flow goes to.
    pub backend_id: u32,
    /// The frontend ([`crate::lb::ServiceValue::id`]).
    pub service_id: u32,
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
    /// Network order.
    pub saddr: u32,
    /// Network order.
    pub daddr: u32,
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
    /// Network order.
    pub saddr: u32,
    /// Network order.
    pub daddr: u32,
}
assert_layout!(FragValue, size = 8, align = 4);

impl_user_pod!(CtKey, CtEntry, FragKey, FragValue);

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(offset_of!(CtKey, _pad) + 3, size_of::<CtKey>());
        assert_eq!(offset_of!(CtEntry, _pad) + 3, size_of::<CtEntry>());
    }

    #[test]
    fn reversing_twice_is_identity() {
        let key = CtKey {
            saddr: 1,
            daddr: 2,
            sport: 3,
            dport: 4,
            protocol: 6,
            _pad: [0; 3],
        };
        assert_eq!(key.reversed().reversed(), key);
        assert_eq!(key.reversed().saddr, 2);
    }
}
