//! ICMP errors about translated flows (destination unreachable, time
//! exceeded, parameter problem). The packet such an error quotes is the
//! translated one, which its sender never sent: path MTU discovery and
//! unreachable errors would be lost. As conntrack does for kube-proxy, the
//! quote is translated back to the packet its sender knows, and the outer
//! addresses follow it.
//!
//! A quote is a translated packet, the output of some connection-tracking
//! entry X. The entry for the opposite direction, Y, is keyed by the
//! reversed quote, and Y's output reversed is X's key: the packet as its
//! sender sent it. So: look up the reversed quote; the new quote is Y's
//! output reversed.

use svc_common::{
    ct::{CtEntry, CtKey},
    proto,
    wire::WirePort,
};

use crate::{
    ct,
    nat::{csum_addr, csum_port, csum_replace2},
    parse::{ETH_HLEN, Ipv4Hdr, Ipv4Packet, ptr_at},
};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
/// ICMP header before the quote.
const ICMP_HLEN: usize = 8;

#[repr(C)]
struct IcmpHdr {
    type_: u8,
    code: u8,
    /// Network order; covers the whole ICMP message, no pseudo-header.
    check: u16,
    rest: u32,
}

/// Whether the packet is an ICMP echo request (a ping).
#[inline(always)]
pub fn is_echo_request(ctx: &aya_ebpf::programs::TcContext, packet: &Ipv4Packet) -> bool {
    // SAFETY: `ptr_at` checked the header lies inside the packet.
    ptr_at::<IcmpHdr>(ctx, packet.l4_offset)
        .is_some_and(|icmp| unsafe { (*icmp).type_ } == ICMP_ECHO_REQUEST)
}

/// Translates an ICMP error quoting a translated TCP or UDP packet back.
/// Returns whether it did; anything else (other ICMP, a quote of an
/// untranslated flow, a quote cut short) is left as it is.
#[inline(always)]
pub fn reverse(ctx: &aya_ebpf::programs::TcContext, packet: &Ipv4Packet) -> bool {
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, packet.l4_offset) else {
        return false;
    };
    // SAFETY: `ptr_at` checked the header lies inside the packet.
    let kind = unsafe { (*icmp).type_ };
    if !matches!(
        kind,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    ) {
        return false;
    }
    let quote_offset = packet.l4_offset + ICMP_HLEN;
    let Some(quote) = ptr_at::<Ipv4Hdr>(ctx, quote_offset) else {
        return false;
    };
    // SAFETY: as above.
    let (version_ihl, protocol, qsrc, qdst, qcheck) = unsafe {
        (
            (*quote).version_ihl,
            (*quote).protocol,
            (*quote).saddr,
            (*quote).daddr,
            (*quote).check,
        )
    };
    let quote_hlen = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || quote_hlen < 20 || !matches!(protocol, proto::TCP | proto::UDP) {
        return false;
    }
    // The first 4 bytes of a TCP or UDP header are its ports; an error
    // quotes at least 8.
    let Some(ports) = ptr_at::<[WirePort; 2]>(ctx, quote_offset + quote_hlen) else {
        return false;
    };
    // SAFETY: as above.
    let (qsport, qdport) = unsafe { ((*ports)[0], (*ports)[1]) };
    let key = CtKey {
        saddr: qdst,
        daddr: qsrc,
        sport: qdport,
        dport: qsport,
        protocol,
        _pad: [0; 3],
    };
    let Some(entry) = ct::lookup(&key) else {
        return false;
    };
    // SAFETY: from a map lookup, valid for this run.
    let opposite: CtEntry = unsafe { *entry };
    let (new_src, new_sport) = (opposite.daddr, opposite.dport);
    let (new_dst, new_dport) = (opposite.saddr, opposite.sport);
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return false;
    };
    // SAFETY: all three headers were checked to lie inside the packet;
    // nothing resized it since.
    unsafe {
        // The error goes to the quote's sender; it may come from the
        // quote's destination itself (a port unreachable from a backend).
        let (osrc, odst) = ((*outer).saddr, (*outer).daddr);
        let new_osrc = if osrc == qdst { new_dst } else { osrc };
        let new_odst = if odst == qsrc { new_src } else { odst };
        let mut ocheck = (*outer).check;
        ocheck = csum_addr(ocheck, osrc, new_osrc);
        ocheck = csum_addr(ocheck, odst, new_odst);
        (*outer).saddr = new_osrc;
        (*outer).daddr = new_odst;
        (*outer).check = ocheck;

        let new_qcheck = csum_addr(csum_addr(qcheck, qsrc, new_src), qdst, new_dst);
        let mut icheck = (*icmp).check;
        icheck = csum_addr(icheck, qsrc, new_src);
        icheck = csum_addr(icheck, qdst, new_dst);
        icheck = csum_replace2(icheck, qcheck, new_qcheck);
        icheck = csum_port(icheck, qsport, new_sport);
        icheck = csum_port(icheck, qdport, new_dport);
        (*quote).saddr = new_src;
        (*quote).daddr = new_dst;
        (*quote).check = new_qcheck;
        (*ports)[0] = new_sport;
        (*ports)[1] = new_dport;
        (*icmp).check = icheck;
    }
    true
}
