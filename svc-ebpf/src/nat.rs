//! Rewriting a packet's tuple with incremental checksum updates, and
//! finding a free reply tuple for a new flow.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    helpers::bpf_loop,
    programs::TcContext,
};
use svc_common::{
    config::DatapathConfig,
    ct::{CtEntry, CtKey},
    hash::fmix32,
    proto,
    wire::{WireAddr, WirePort},
};

use crate::{
    ct::{self, Owner},
    maps::{SVC_CT_V1, SVC_NAT_SCAN, config},
    parse::{ETH_HLEN, Ipv4Hdr, L4, ptr_at},
};

/// NAT ports a new flow tries at hashed places before it scans the range.
const PORT_ATTEMPTS: u32 = 8;

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

/// `check` after an address changes from `old` to `new`.
#[inline(always)]
pub fn csum_addr(check: u16, old: WireAddr, new: WireAddr) -> u16 {
    csum_replace4(check, old.raw(), new.raw())
}

/// `check` after a port changes from `old` to `new`.
#[inline(always)]
pub fn csum_port(check: u16, old: WirePort, new: WirePort) -> u16 {
    csum_replace2(check, old.raw(), new.raw())
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
    let (addr, port) = (|a: WireAddr| a.raw(), |p: WirePort| u32::from(p.raw()));
    l4_field(ctx, l4, protocol, addr(old.saddr), addr(new.saddr), 4, true)?;
    l4_field(ctx, l4, protocol, addr(old.daddr), addr(new.daddr), 4, true)?;
    l4_field(
        ctx,
        l4,
        protocol,
        port(old.sport),
        port(new.sport),
        2,
        false,
    )?;
    l4_field(
        ctx,
        l4,
        protocol,
        port(old.dport),
        port(new.dport),
        2,
        false,
    )?;
    // The helpers may have moved the packet: pointers are taken afresh.
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(RewriteFailed)?;
    let ports: *mut [WirePort; 2] = ptr_at(ctx, l4_offset).ok_or(RewriteFailed)?;
    // SAFETY: `ptr_at` checked both headers lie inside the packet.
    unsafe {
        let mut check = (*ip).check;
        check = csum_addr(check, old.saddr, new.saddr);
        check = csum_addr(check, old.daddr, new.daddr);
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
/// is free, of flows and of direct connections the client opened;
/// otherwise, or when `must_move` (source NAT to the node, where
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
    if !must_move
        && !ct::direct_holds(&reply_key)
        && try_claim(config, original, &reply_key, reply, now)
    {
        return true;
    }
    let range = u32::from(config.nat_port_max.saturating_sub(config.nat_port_min)) + 1;
    let start = fmix32(
        original.saddr.raw()
            ^ u32::from(original.sport.raw())
            ^ (u32::from(original.dport.raw()) << 16),
    );
    for attempt in 0..PORT_ATTEMPTS {
        let offset = start.wrapping_add(attempt.wrapping_mul(0x9e37)) % range;
        // `offset < range <= 65536` and the sum stays within u16.
        #[expect(clippy::cast_possible_truncation, reason = "offset < range")]
        let port = (config.nat_port_min as u32 + offset) as u16;
        reply_key.dport = WirePort::from_host(port);
        if try_claim(config, original, &reply_key, reply, now) {
            new.sport = reply_key.dport;
            return true;
        }
    }
    // A busy range: every port in order from the flow's place, so a port is
    // found while any is free.
    scan_range(original, &reply_key, reply, now, start, range).is_some_and(|port| {
        new.sport = port;
        true
    })
}

/// The state of a scan of the NAT range, kept in a per-CPU map rather than
/// on the stack: the scan's callback runs a call deeper than the packet
/// path, whose frames may sum to 512 bytes at most. Keys are built here
/// too, so the callback needs next to no stack of its own.
#[repr(C)]
pub struct NatScan {
    original: CtKey,
    reply_key: CtKey,
    /// The original key of the flow holding `reply_key`, if any.
    owner_key: CtKey,
    reply: CtEntry,
    now: u64,
    start: u32,
    range: u32,
    /// The port claimed; 0: none.
    port: WirePort,
    _pad: [u8; 6],
}

/// Tries every port of the NAT range once, in order from `start`
/// (`bpf_loop`). Returns the port claimed.
#[inline(always)]
fn scan_range(
    original: &CtKey,
    reply_key: &CtKey,
    reply: &CtEntry,
    now: u64,
    start: u32,
    range: u32,
) -> Option<WirePort> {
    let scan = SVC_NAT_SCAN.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    unsafe {
        (*scan).original = *original;
        (*scan).reply_key = *reply_key;
        (*scan).reply = *reply;
        (*scan).now = now;
        (*scan).start = start;
        (*scan).range = range;
        (*scan).port = WirePort::from_raw(0);
        bpf_loop(range, scan_step as *mut c_void, core::ptr::null_mut(), 0);
        let port = (*scan).port;
        (port.raw() != 0).then_some(port)
    }
}

/// One port of a scan: claimed (stop), or on to the next. The same rules
/// as [`try_claim`], with every key in the scan's slot.
extern "C" fn scan_step(index: u32, _ctx: *mut c_void) -> i64 {
    let Some(scan) = SVC_NAT_SCAN.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot, filled by `scan_range`.
    let scan = unsafe { &mut *scan };
    let config = config();
    let offset = scan.start.wrapping_add(index) % scan.range.max(1);
    #[expect(clippy::cast_possible_truncation, reason = "offset < range")]
    let port = (u32::from(config.nat_port_min) + offset) as u16;
    scan.reply_key.dport = WirePort::from_host(port);
    let protocol = scan.reply_key.protocol;
    if let Some(held) = ct::lookup(&scan.reply_key) {
        // SAFETY: from a map lookup.
        let held = unsafe { &*held };
        scan.owner_key = held.peer_key(protocol);
        if scan.owner_key == scan.original {
            // Our own flow's old entry (see `Owner::Ours`).
            if SVC_CT_V1.insert(&scan.reply_key, &scan.reply, 0).is_ok() {
                scan.port = scan.reply_key.dport;
                return 1;
            }
            return 0;
        }
        let live = ct::lookup(&scan.owner_key).is_some_and(|owner| {
            // SAFETY: from a map lookup.
            let owner = unsafe { &*owner };
            owner.is_peer_of(&scan.reply_key)
                && (owner.is_fresh(config, protocol, scan.now)
                    || held.is_fresh(config, protocol, scan.now))
        });
        if live {
            return 0;
        }
        let _ = SVC_CT_V1.remove(&scan.reply_key);
    }
    if SVC_CT_V1
        .insert(&scan.reply_key, &scan.reply, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        scan.port = scan.reply_key.dport;
        return 1;
    }
    0
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
