//! Refusing a flow to a service without endpoints, or to a port a ClusterIP
//! does not define, as kube-proxy's REJECT does: the packet is turned into
//! an ICMP port unreachable from the address it was sent to and sent back
//! out of the interface it came in on. TCP clients see ECONNREFUSED, UDP
//! clients an error on their next call.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use svc_common::{proto, wire::WireAddr};

use crate::{
    nat::{fold, halves},
    parse::{ETH_HLEN, IPV4_MIN_HLEN},
};

/// New IPv4 header plus ICMP header, inserted in front of the original.
const PREFIX_LEN: usize = IPV4_MIN_HLEN + 8;
/// What is quoted of a UDP datagram: the IPv4 header and the first 8
/// bytes after it (RFC 792).
const UDP_QUOTE_LEN: usize = IPV4_MIN_HLEN + 8;
/// What is quoted of a TCP segment: the IPv4 header and 18 bytes of TCP
/// header, up to and including its checksum. A segment from a local socket
/// carries a checksum still to be filled in (`CHECKSUM_PARTIAL`), and the
/// kernel refuses to trim a packet short of that field.
const TCP_QUOTE_LEN: usize = IPV4_MIN_HLEN + 18;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

pub struct RejectFailed;

/// A flow to refuse: the tuple of its first packet.
pub struct Refusal {
    pub saddr: WireAddr,
    pub daddr: WireAddr,
    pub protocol: u8,
    /// Non-zero when the IPv4 header has options (such packets are not
    /// quoted). Not a `bool`: its niche would become the enclosing enum's
    /// tag at a non-zero offset, which the kernel's BTF checks reject.
    pub has_ip_options: u8,
    /// Non-zero when refused for a port (or protocol) the ClusterIP does
    /// not define rather than for a service without endpoints.
    pub unknown_port: u8,
    /// Length of the packet, for the counters.
    pub len: u32,
}

/// Turns the packet into an ICMP port unreachable for its sender and
/// redirects it out of its ingress interface. Only packets without IP
/// options are refused this way; the caller drops the others.
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, refusal: &Refusal) -> Result<i32, RejectFailed> {
    if refusal.has_ip_options != 0 {
        return Err(RejectFailed);
    }
    if refusal.protocol == proto::TCP {
        refuse::<TCP_QUOTE_LEN>(ctx, refusal.saddr, refusal.daddr)
    } else {
        refuse::<UDP_QUOTE_LEN>(ctx, refusal.saddr, refusal.daddr)
    }
}

/// Not inlined: its locals get their own stack frame instead of adding
/// to the packet path's. Words are summed as they are loaded, so no copy
/// of the quote is kept.
#[inline(never)]
fn refuse<const QUOTE_LEN: usize>(
    ctx: &TcContext,
    saddr: WireAddr,
    daddr: WireAddr,
) -> Result<i32, RejectFailed> {
    let mut quote_sum = 0u32;
    let mut offset = ETH_HLEN;
    while offset < ETH_HLEN + QUOTE_LEN {
        let word: u16 = ctx.load(offset).map_err(|_| RejectFailed)?;
        quote_sum += u32::from(u16::from_be(word));
        offset += 2;
    }
    let macs: [u8; 12] = ctx.load(0).map_err(|_| RejectFailed)?;

    // SAFETY: `ctx.skb.skb` is the program's own skb.
    let skb = ctx.skb.skb;
    // Keep only the quote, then open room for the new headers before it.
    // SAFETY: as above; the helper checks the length.
    if unsafe { bpf_skb_change_tail(skb, (ETH_HLEN + QUOTE_LEN) as u32, 0) } != 0 {
        return Err(RejectFailed);
    }
    ctx.adjust_room(PREFIX_LEN as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| RejectFailed)?;

    // Answer from whom the client addressed, to the client: the IPv4 and
    // ICMP headers as 16-bit words, host order.
    let (s_hi, s_lo) = halves(daddr.raw());
    let (d_hi, d_lo) = halves(saddr.raw());
    let mut words: [u16; PREFIX_LEN / 2] = [
        0x4500,
        (PREFIX_LEN + QUOTE_LEN) as u16,
        0,
        0,
        (64 << 8) | u16::from(proto::ICMP),
        0,
        s_hi,
        s_lo,
        d_hi,
        d_lo,
        (u16::from(ICMP_DEST_UNREACH) << 8) | u16::from(ICMP_PORT_UNREACH),
        0,
        0,
        0,
    ];
    let ip_sum: u32 = words[..IPV4_MIN_HLEN / 2]
        .iter()
        .map(|&w| u32::from(w))
        .sum();
    words[5] = fold(ip_sum);
    let icmp_sum: u32 = words[IPV4_MIN_HLEN / 2..]
        .iter()
        .map(|&w| u32::from(w))
        .sum();
    words[11] = fold(icmp_sum + quote_sum);
    for word in &mut words {
        *word = word.to_be();
    }
    ctx.store(
        0,
        &[macs[6], macs[7], macs[8], macs[9], macs[10], macs[11]],
        0,
    )
    .map_err(|_| RejectFailed)?;
    ctx.store(
        6,
        &[macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]],
        0,
    )
    .map_err(|_| RejectFailed)?;
    ctx.store(ETH_HLEN, &words, 0).map_err(|_| RejectFailed)?;

    // SAFETY: reading the skb's ingress ifindex.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: no preconditions; the verdict carries the redirect.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action != i64::from(TC_ACT_REDIRECT) {
        return Err(RejectFailed);
    }
    Ok(TC_ACT_REDIRECT)
}
