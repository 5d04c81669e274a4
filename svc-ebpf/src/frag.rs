//! Fragments of translated datagrams. Only the first fragment carries the
//! ports connection tracking needs; when it is translated, its new
//! addresses are remembered under the datagram's (source, destination, IP
//! id, protocol), and later fragments of that datagram get the same
//! addresses, as conntrack's defragmentation gives kube-proxy. A later
//! fragment that arrives before its first passes as it is.

use svc_common::{
    ct::{FragKey, FragValue},
    wire::WireAddr,
};

use crate::{
    maps::SVC_FRAGS_V1,
    nat::csum_addr,
    parse::{ETH_HLEN, Ipv4Hdr, Ipv4Packet, ptr_at},
};

#[inline(always)]
fn key(packet: &Ipv4Packet) -> FragKey {
    FragKey {
        saddr: packet.saddr,
        daddr: packet.daddr,
        id: packet.id,
        protocol: packet.protocol,
        _pad: 0,
    }
}

/// Remembers the addresses the first fragment of `packet`'s datagram was
/// translated to. Not inlined: rare, and its keys would add to the packet
/// path's stack frame.
#[inline(never)]
pub fn remember(packet: &Ipv4Packet, saddr: WireAddr, daddr: WireAddr) {
    // Best effort: without the entry, the later fragments pass as they are.
    let _ = SVC_FRAGS_V1.insert(key(packet), FragValue { saddr, daddr }, 0);
}

/// Gives a later fragment its datagram's translated addresses; returns
/// whether it had any.
#[inline(always)]
pub fn translate_later(ctx: &aya_ebpf::programs::TcContext, packet: &Ipv4Packet) -> bool {
    let Some(value) = SVC_FRAGS_V1.get_ptr(key(packet)) else {
        return false;
    };
    // SAFETY: from a map lookup, valid for this run.
    let FragValue { saddr, daddr } = unsafe { *value };
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return false;
    };
    // SAFETY: `ptr_at` checked the header lies inside the packet.
    unsafe {
        let mut check = (*ip).check;
        check = csum_addr(check, packet.saddr, saddr);
        check = csum_addr(check, packet.daddr, daddr);
        (*ip).saddr = saddr;
        (*ip).daddr = daddr;
        (*ip).check = check;
    }
    true
}
