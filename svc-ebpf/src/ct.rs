//! Connection tracking: two entries per flow in `SVC_CT_V1`, one per
//! direction, each holding the tuple its packets become (see
//! `svc_common::ct`). The entries share the flow's lifetime: the flow
//! lives while either of them translated a packet within the timeout of
//! the flow's state.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use svc_common::{
    config::DatapathConfig,
    ct::{CT_F_CLOSING, CT_F_REPLY, CT_F_SEEN_REPLY, CtEntry, CtKey, REFRESH_NS, direct_slot},
    proto,
};

use crate::{
    maps::{SVC_CT_V1, SVC_DIRECT_V1},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Monotonic time at tick resolution (timeouts are seconds): jiffies
/// scaled to nanoseconds, an inlined load, when the loader knows the
/// tick; the coarse clock helper otherwise.
#[inline(always)]
pub fn now_ns(config: &DatapathConfig) -> u64 {
    if config.ns_per_tick != 0 {
        // SAFETY: no preconditions.
        unsafe { bpf_jiffies64() }.wrapping_mul(config.ns_per_tick)
    } else {
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_coarse_ns() }
    }
}

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    SVC_CT_V1.get_ptr_mut(key)
}

/// Whether the flow of `entry` (keyed `key`) still owns it for a packet
/// with `tcp_flags`. A SYN meeting a closing TCP flow starts a new
/// connection on its tuple (a client reusing its port, or a direct
/// connection from a port a closed service flow used): the old flow does
/// not translate it. Otherwise the flow lives while this entry is fresh
/// or, when this direction has been quiet, while its other entry is (a
/// one-way UDP stream keeps both).
#[inline(always)]
pub fn is_live(
    config: &DatapathConfig,
    key: &CtKey,
    entry: &CtEntry,
    tcp_flags: u8,
    now: u64,
) -> bool {
    if key.protocol == proto::TCP && entry.flags & CT_F_CLOSING != 0 && tcp_flags & TCP_SYN != 0 {
        return false;
    }
    entry.is_fresh(config, key.protocol, now) || peer_is_fresh(config, key, entry, now)
}

/// Whether the other entry of `entry`'s flow exists, still belongs to the
/// flow, and is fresh.
#[inline(always)]
fn peer_is_fresh(config: &DatapathConfig, key: &CtKey, entry: &CtEntry, now: u64) -> bool {
    let Some(peer) = lookup(&entry.peer_key(key.protocol)) else {
        return false;
    };
    // SAFETY: from a map lookup, valid for this run.
    let peer = unsafe { &*peer };
    peer.is_peer_of(key) && peer.is_fresh(config, key.protocol, now)
}

/// Refreshes the entry's stamp at most once a second, and records TCP
/// state. State lives in both entries of a flow (it decides their shared
/// timeout): a reply's first packet and a FIN or RST in either direction
/// are written to the other entry too.
#[inline(always)]
pub fn update(key: &CtKey, entry: *mut CtEntry, tcp_flags: u8, now: u64) {
    // SAFETY: `entry` comes from a map lookup and stays valid for this
    // program run; concurrent updates of these fields are benign races.
    unsafe {
        if now.saturating_sub((*entry).last_seen_ns) > REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
        let mut set = 0;
        if (*entry).flags & CT_F_REPLY != 0 {
            set |= CT_F_SEEN_REPLY;
        }
        if key.protocol == proto::TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            set |= CT_F_CLOSING;
        }
        if (*entry).flags & set == set {
            return;
        }
        (*entry).flags |= set;
        if let Some(peer) = lookup(&(*entry).peer_key(key.protocol))
            && (*peer).is_peer_of(key)
        {
            (*peer).flags |= set;
        }
    }
}

/// Who holds a reply key a new flow wants.
pub enum Owner {
    /// Nobody.
    Free,
    /// The flow starting at the same original tuple (its old, dead self).
    Ours,
    /// Another flow, alive.
    Live,
    /// A dead flow, or an orphan entry no flow points back to.
    Dead,
}

/// Who holds `reply_key`, for a new flow starting at `original`.
/// Not inlined: the claim loop keeps its lookups out of the packet
/// path's stack frame.
#[inline(never)]
pub fn reply_key_owner(
    config: &DatapathConfig,
    reply_key: &CtKey,
    original: &CtKey,
    now: u64,
) -> Owner {
    let Some(reply) = lookup(reply_key) else {
        return Owner::Free;
    };
    // SAFETY: from a map lookup.
    let reply = unsafe { &*reply };
    let owner_key = reply.peer_key(reply_key.protocol);
    if owner_key == *original {
        return Owner::Ours;
    }
    let Some(owner) = lookup(&owner_key) else {
        return Owner::Dead;
    };
    // SAFETY: from a map lookup.
    let owner = unsafe { &*owner };
    if owner.is_peer_of(reply_key)
        && (owner.is_fresh(config, reply_key.protocol, now)
            || reply.is_fresh(config, reply_key.protocol, now))
    {
        Owner::Live
    } else {
        Owner::Dead
    }
}

/// Removes both entries of the dead flow that `entry` (keyed `key`)
/// belongs to.
#[inline(always)]
pub fn end_flow(key: &CtKey, entry: &CtEntry) {
    let peer_key = entry.peer_key(key.protocol);
    if let Some(peer) = lookup(&peer_key) {
        // SAFETY: from a map lookup.
        if unsafe { (*peer).is_peer_of(key) } {
            let _ = SVC_CT_V1.remove(&peer_key);
        }
    }
    let _ = SVC_CT_V1.remove(key);
}

/// Removes the reply entry of the dead flow whose original entry (keyed
/// `key`) a new flow is replacing, unless it is `kept` (the new flow's own
/// reply key), so no packet of the old flow is translated as the new one's.
#[inline(always)]
pub fn retire_reply(key: &CtKey, kept: &CtKey) {
    let Some(old) = lookup(key) else {
        return;
    };
    // SAFETY: from a map lookup.
    let reply_key = unsafe { (*old).peer_key(key.protocol) };
    if reply_key == *kept {
        return;
    }
    if let Some(reply) = lookup(&reply_key) {
        // SAFETY: from a map lookup.
        if unsafe { (*reply).is_peer_of(key) } {
            let _ = SVC_CT_V1.remove(&reply_key);
        }
    }
}

/// Remembers a direct TCP connection a pod is opening (`key`: its first
/// SYN), by the tuple its peer answers with, which a service flow must not
/// take as its reply tuple ([`direct_holds`]). Other packets cost nothing.
#[inline(always)]
pub fn remember_direct(key: &CtKey, tcp_flags: u8) {
    if key.protocol == proto::TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        let answer = key.reversed();
        if let Some(slot) = SVC_DIRECT_V1.get_ptr_mut(direct_slot(&answer)) {
            // SAFETY: an array slot, valid for this run. A write racing
            // another CPU's may leave a mix of two keys, which matches
            // neither: at worst a service flow keeps a port it should
            // have moved from, as if the SYN had not been seen.
            unsafe { *slot = answer };
        }
    }
}

/// Whether a direct connection a pod opened answers with `reply_key`.
#[inline(always)]
pub fn direct_holds(reply_key: &CtKey) -> bool {
    reply_key.protocol == proto::TCP
        && SVC_DIRECT_V1
            .get(direct_slot(reply_key))
            .is_some_and(|held| held == reply_key)
}
