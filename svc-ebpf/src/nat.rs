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
    ct::{self, Owner},
    maps::SVC_CT_V1,
    parse::{ETH_HLEN, Ipv4Hdr, L4, ptr_at},
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

/// RFC 1624 incremental update of a ones'-complement checksum (network
/// order, as stored) for a 32-bit field changing from `old` to `new`.
/// `check` (network order) after a 16-bit field changes from `old` to `new`
/// (both as stored, network order): RFC 1624.
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    fold(
        u32::from(!u16::from_be(check))
            + (!u32::from(u16::from_be(old)) & 0xffff)
            + u32::from(u16::from_be(new)),
    )
    .to_be()
}

/// A ones'-complement sum folded to 16 bits and complemented: the checksum,
/// host order.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits")]
    let folded = sum as u16;
    !folded
}

/// An address as stored (network order) split into its two 16-bit words,
/// host order.
#[inline(always)]
pub fn halves(addr: u32) -> (u16, u16) {
    let bytes = addr.to_ne_bytes();
    (
        u16::from_be_bytes([bytes[0], bytes[1]]),
        u16::from_be_bytes([bytes[2], bytes[3]]),
    )
}

/// `check` (network order) after a 32-bit field changes from `old` to
/// `new` (both as stored): RFC 1624.
#[inline(always)]
pub fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let (old_hi, old_lo) = halves(old);
    let (new_hi, new_lo) = halves(new);
    fold(
        u32::from(!u16::from_be(check))
            + u32::from(!old_hi)
            + u32::from(!old_lo)
            + u32::from(new_hi)
            + u32::from(new_lo),
    )
    .to_be()
}

/// Updates the L4 checksum for one changed field through the kernel's
/// helper: only the kernel knows whether the field holds a full checksum
/// or, for a segment from a local socket (`CHECKSUM_PARTIAL`), the
/// pseudo-header sum still to be completed.
#[inline(always)]
fn l4_field(
    ctx: &TcContext,
    l4: &L4,
    protocol: u8,
    old: u32,
    new: u32,
    size: u64,
    pseudo: bool,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        l4.csum_offset,
        u64::from(old),
        u64::from(new),
        l4_flags(protocol, size, pseudo),
    )
    .map_err(|_| RewriteFailed)
}

/// Rewrites the packet's tuple from `old` to the tuple in `new`: the L4
/// checksum through the helpers, then the addresses, ports and IPv4
/// checksum by direct packet access (cheaper than a helper call each).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    l4: &L4,
    l4_offset: usize,
    old: &CtKey,
    new: &CtEntry,
) -> Result<(), RewriteFailed> {
    let protocol = old.protocol;
    l4_field(ctx, l4, protocol, old.saddr, new.saddr, 4, true)?;
    l4_field(ctx, l4, protocol, old.daddr, new.daddr, 4, true)?;
    l4_field(
        ctx,
        l4,
        protocol,
        old.sport.into(),
        new.sport.into(),
        2,
        false,
    )?;
    l4_field(
        ctx,
        l4,
        protocol,
        old.dport.into(),
        new.dport.into(),
        2,
        false,
    )?;
    // The helpers may have moved the packet: pointers are taken afresh.
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(RewriteFailed)?;
    let ports: *mut [u16; 2] = ptr_at(ctx, l4_offset).ok_or(RewriteFailed)?;
    // SAFETY: `ptr_at` checked both headers lie inside the packet.
    unsafe {
        let mut check = (*ip).check;
        check = csum_replace4(check, old.saddr, new.saddr);
        check = csum_replace4(check, old.daddr, new.daddr);
        (*ip).check = check;
        (*ip).saddr = new.saddr;
        (*ip).daddr = new.daddr;
        (*ports)[0] = new.sport;
        (*ports)[1] = new.dport;
    }
    Ok(())
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
    match ct::reply_key_owner(config, reply_key, original, now) {
        Owner::Free => {}
        Owner::Live => return false,
        // Our own flow's old entry: only packets of this very tuple race
        // for it, and the new flow overwrites it in place.
        Owner::Ours => return SVC_CT_V1.insert(reply_key, reply, 0).is_ok(),
        // Another flow's dead entry: removed first, then claimed with
        // NOEXIST, so of two CPUs racing for it only one wins.
        Owner::Dead => {
            let _ = SVC_CT_V1.remove(reply_key);
        }
    }
    SVC_CT_V1
        .insert(reply_key, reply, u64::from(BPF_NOEXIST))
        .is_ok()
}
