//! Rewriting a packet's tuple with incremental checksum updates, and
//! finding a free reply tuple for a new flow.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    programs::TcContext,
};
use svc_common::{
    config::DatapathConfig,
    ct::{CtEntry, CtKey},
    hash::fmix32,
    proto,
};

use crate::{
    ct,
    maps::SVC_CT_V1,
    parse::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, L4},
};

/// How many source ports a new flow tries before giving up.
const PORT_ATTEMPTS: u32 = 16;

/// The rewrite failed; the packet must not go out half-translated.
pub struct RewriteFailed;

/// Checksum flags for an L4 field of `size` bytes. UDP's zero checksum
/// means "none" and must stay zero.
#[inline(always)]
const fn l4_flags(protocol: u8, size: u64, pseudo: bool) -> u64 {
    let mut flags = size;
    if pseudo {
        flags |= BPF_F_PSEUDO_HDR as u64;
    }
    if protocol == proto::UDP {
        flags |= BPF_F_MARK_MANGLED_0 as u64;
    }
    flags
}

#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    l4: &L4,
    protocol: u8,
    offset: usize,
    old: u32,
    new: u32,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        l4.csum_offset,
        u64::from(old),
        u64::from(new),
        l4_flags(protocol, 4, true),
    )
    .map_err(|_| RewriteFailed)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(|_| RewriteFailed)?;
    ctx.store(offset, &new, 0).map_err(|_| RewriteFailed)
}

#[inline(always)]
fn set_port(
    ctx: &TcContext,
    l4: &L4,
    protocol: u8,
    offset: usize,
    old: u16,
    new: u16,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        l4.csum_offset,
        u64::from(old),
        u64::from(new),
        l4_flags(protocol, 2, false),
    )
    .map_err(|_| RewriteFailed)?;
    ctx.store(offset, &new, 0).map_err(|_| RewriteFailed)
}

/// Rewrites the packet's tuple from `old` to the tuple in `new`.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    l4: &L4,
    l4_offset: usize,
    old: &CtKey,
    new: &CtEntry,
) -> Result<(), RewriteFailed> {
    let protocol = old.protocol;
    set_addr(ctx, l4, protocol, IP_SADDR_OFF, old.saddr, new.saddr)?;
    set_addr(ctx, l4, protocol, IP_DADDR_OFF, old.daddr, new.daddr)?;
    set_port(ctx, l4, protocol, l4_offset, old.sport, new.sport)?;
    set_port(ctx, l4, protocol, l4_offset + 2, old.dport, new.dport)
}

/// The reply-direction key of a flow whose packets become `forward`.
#[inline(always)]
pub fn reply_key(forward: &CtEntry, protocol: u8) -> CtKey {
    CtKey {
        saddr: forward.daddr,
        daddr: forward.saddr,
        sport: forward.dport,
        dport: forward.sport,
        protocol,
        _pad: [0; 3],
    }
}

/// Claims the reply entry of a new flow whose packets become `new`
/// (original tuple `original`). The source port is kept if its reply tuple
/// is free; otherwise, or when `must_move` (source NAT to the node, where
/// the client's port means nothing), a port from the NAT range is taken.
/// On success `new.sport` holds the port and the reply entry is in place.
#[inline(always)]
pub fn claim_reply(
    config: &DatapathConfig,
    original: &CtKey,
    new: &mut CtEntry,
    reply: &CtEntry,
    must_move: bool,
    now: u64,
) -> bool {
    let mut reply_key = reply_key(new, original.protocol);
    if !must_move && try_claim(config, original, &reply_key, reply, now) {
        return true;
    }
    let range = u32::from(config.nat_port_max.saturating_sub(config.nat_port_min)) + 1;
    let start =
        fmix32(original.saddr ^ u32::from(original.sport) ^ (u32::from(original.dport) << 16));
    for attempt in 0..PORT_ATTEMPTS {
        let offset = start.wrapping_add(attempt.wrapping_mul(0x9e37)) % range;
        // `offset < range <= 65536` and the sum stays within u16.
        #[expect(clippy::cast_possible_truncation, reason = "offset < range")]
        let port = (config.nat_port_min as u32 + offset) as u16;
        reply_key.dport = port.to_be();
        if try_claim(config, original, &reply_key, reply, now) {
            new.sport = reply_key.dport;
            return true;
        }
    }
    false
}

#[inline(always)]
fn try_claim(
    config: &DatapathConfig,
    original: &CtKey,
    reply_key: &CtKey,
    reply: &CtEntry,
    now: u64,
) -> bool {
    if ct::reply_key_taken(config, reply_key, original, now) {
        return false;
    }
    // A free key is taken with NOEXIST, so two CPUs racing for it cannot
    // both win; a stale one (its flow is gone) is overwritten.
    let flags = if ct::lookup(reply_key).is_some() {
        0
    } else {
        u64::from(BPF_NOEXIST)
    };
    SVC_CT_V1.insert(reply_key, reply, flags).is_ok()
}
