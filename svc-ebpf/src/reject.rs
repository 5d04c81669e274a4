//! Refusing a flow to a service without endpoints, as kube-proxy's REJECT
//! does: the packet is turned into an ICMP port unreachable from the
//! service address and sent back out of the interface it came in on. TCP
//! clients see ECONNREFUSED, UDP clients an error on their next call.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use svc_common::proto;

use crate::parse::{ETH_HLEN, IPV4_MIN_HLEN, Ipv4Packet};

/// New IPv4 header plus ICMP header, inserted in front of the original.
const PREFIX_LEN: usize = IPV4_MIN_HLEN + 8;
/// The original IPv4 header and the first 8 bytes after it (RFC 792).
const QUOTE_LEN: usize = IPV4_MIN_HLEN + 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

pub struct RejectFailed;

/// Sum of big-endian 16-bit words.
#[inline(always)]
fn sum_words(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    // Folded twice: fits 16 bits.
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits")]
    let folded = sum as u16;
    !folded
}

/// Turns the packet into an ICMP port unreachable for its sender and
/// redirects it out of its ingress interface. Only packets without IP
/// options are refused this way; the caller drops the others.
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, packet: &Ipv4Packet) -> Result<i32, RejectFailed> {
    if packet.l4_offset != ETH_HLEN + IPV4_MIN_HLEN {
        return Err(RejectFailed);
    }
    // Fixed-size loads: the verifier needs a constant, non-zero length.
    let eth: [u8; ETH_HLEN] = ctx.load(0).map_err(|_| RejectFailed)?;
    let quote: [u8; QUOTE_LEN] = ctx.load(ETH_HLEN).map_err(|_| RejectFailed)?;

    // SAFETY: `ctx.skb.skb` is the program's own skb.
    let skb = ctx.skb.skb;
    // Keep only the quote, then open room for the new headers before it.
    // SAFETY: as above; the helper checks the length.
    if unsafe { bpf_skb_change_tail(skb, (ETH_HLEN + QUOTE_LEN) as u32, 0) } != 0 {
        return Err(RejectFailed);
    }
    ctx.adjust_room(PREFIX_LEN as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| RejectFailed)?;

    // Answer from whom the client addressed, to the client.
    let mut reply_eth = [0u8; ETH_HLEN];
    reply_eth[..6].copy_from_slice(&eth[6..12]);
    reply_eth[6..12].copy_from_slice(&eth[..6]);
    reply_eth[12..].copy_from_slice(&eth[12..]);

    let mut prefix = [0u8; PREFIX_LEN];
    let total_len = (PREFIX_LEN + QUOTE_LEN) as u16;
    prefix[0] = 0x45;
    prefix[2..4].copy_from_slice(&total_len.to_be_bytes());
    prefix[8] = 64;
    prefix[9] = proto::ICMP;
    prefix[12..16].copy_from_slice(&packet.daddr.to_ne_bytes());
    prefix[16..20].copy_from_slice(&packet.saddr.to_ne_bytes());
    let ip_csum = fold(sum_words(&prefix[..IPV4_MIN_HLEN]));
    prefix[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    prefix[20] = ICMP_DEST_UNREACH;
    prefix[21] = ICMP_PORT_UNREACH;
    let icmp_csum = fold(sum_words(&prefix[IPV4_MIN_HLEN..]) + sum_words(&quote));
    prefix[22..24].copy_from_slice(&icmp_csum.to_be_bytes());

    ctx.store(0, &reply_eth, 0).map_err(|_| RejectFailed)?;
    ctx.store(ETH_HLEN, &prefix, 0).map_err(|_| RejectFailed)?;

    // SAFETY: reading the skb's ingress ifindex.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: no preconditions; the verdict carries the redirect.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action != i64::from(TC_ACT_REDIRECT) {
        return Err(RejectFailed);
    }
    Ok(TC_ACT_REDIRECT as i32)
}
