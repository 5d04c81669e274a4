//! Connection tracking: two entries per flow in `SVC_CT_V1`, one per
//! direction, each holding the tuple its packets become (see
//! `svc_common::ct`).

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use svc_common::{
    config::{DatapathConfig, NS_PER_SEC},
    ct::{CT_F_CLOSING, CT_F_REPLY, CT_F_SEEN_REPLY, CtEntry, CtKey},
    proto,
};

use crate::{
    maps::SVC_CT_V1,
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Monotonic time at tick resolution (timeouts are seconds): jiffies
/// scaled to nanoseconds, an inlined load, when the loader measured the
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

/// How long an original-direction entry lives without packets.
#[inline(always)]
fn timeout_ns(config: &DatapathConfig, protocol: u8, flags: u8) -> u64 {
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

/// Whether a tracked flow still owns its entry. Reply entries are always
/// honoured (their flow's original entry decides); an original entry that
/// has timed out, or a closing TCP flow that sees a fresh SYN (the client
/// reused the port), starts a new flow.
#[inline(always)]
pub fn is_live(
    config: &DatapathConfig,
    entry: &CtEntry,
    protocol: u8,
    tcp_flags: u8,
    now: u64,
) -> bool {
    if entry.flags & CT_F_REPLY != 0 {
        return true;
    }
    if protocol == proto::TCP
        && entry.flags & CT_F_CLOSING != 0
        && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    {
        return false;
    }
    now.saturating_sub(entry.last_seen_ns) < timeout_ns(config, protocol, entry.flags)
}

/// Refreshes the entry's clock at most once a second, and records TCP
/// state. A reply's first packet and a FIN or RST in either direction also
/// update the original-direction entry, which is what times the flow out.
#[inline(always)]
pub fn update(entry: *mut CtEntry, protocol: u8, tcp_flags: u8, now: u64) {
    // SAFETY: `entry` comes from a map lookup and stays valid for this
    // program run; concurrent updates of these fields are benign races.
    unsafe {
        if now.saturating_sub((*entry).last_seen_ns) > NS_PER_SEC {
            (*entry).last_seen_ns = now;
        }
        let mut set = 0;
        if (*entry).flags & CT_F_REPLY != 0 {
            set |= CT_F_SEEN_REPLY;
        }
        if protocol == proto::TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            set |= CT_F_CLOSING;
        }
        if (*entry).flags & set == set {
            return;
        }
        (*entry).flags |= set;
        if (*entry).flags & CT_F_REPLY != 0 {
            // The original entry is keyed by the reverse of what this
            // entry rewrites to.
            let original = original_key(&*entry, protocol);
            if let Some(original) = lookup(&original) {
                (*original).flags |= set;
                (*original).last_seen_ns = now;
            }
        }
    }
}

/// The original-direction key of the flow a reply entry belongs to.
#[inline(always)]
pub fn original_key(reply: &CtEntry, protocol: u8) -> CtKey {
    CtKey {
        saddr: reply.daddr,
        daddr: reply.saddr,
        sport: reply.dport,
        dport: reply.sport,
        protocol,
        _pad: [0; 3],
    }
}

/// Whether `reply_key` belongs to a live flow other than `original`, so a
/// new flow must not take it.
#[inline(always)]
pub fn reply_key_taken(
    config: &DatapathConfig,
    reply_key: &CtKey,
    original: &CtKey,
    now: u64,
) -> bool {
    let Some(reply) = lookup(reply_key) else {
        return false;
    };
    // SAFETY: from a map lookup.
    let owner = original_key(unsafe { &*reply }, reply_key.protocol);
    if owner == *original {
        // Our own flow's stale entry: reuse it.
        return false;
    }
    let Some(entry) = lookup(&owner) else {
        return false;
    };
    // SAFETY: from a map lookup.
    let entry = unsafe { &*entry };
    // The owner still translates into this reply tuple, and is alive.
    entry.saddr == reply_key.daddr
        && entry.sport == reply_key.dport
        && entry.daddr == reply_key.saddr
        && entry.dport == reply_key.sport
        && is_live(config, entry, owner.protocol, 0, now)
}
