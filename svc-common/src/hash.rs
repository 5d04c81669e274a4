//! The flow hash: one implementation, run by the eBPF program to pick a
//! Maglev slot and by user space to predict that pick. Every node computes
//! the same value for the same flow, so a flow lands on the same backend
//! whichever node it enters.

use crate::wire::{WireAddr, WirePort};

/// `murmur3`'s 32-bit finalizer: a full-avalanche mix of one word.
#[inline]
#[must_use]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline]
const fn mix(h: u32, word: u32) -> u32 {
    fmix32(h ^ word).wrapping_add(0x9e37_79b9)
}

/// Hash of an IPv4 5-tuple, over the bytes the packet carries.
#[inline]
#[must_use]
pub const fn flow_hash(
    saddr: WireAddr,
    daddr: WireAddr,
    sport: WirePort,
    dport: WirePort,
    protocol: u8,
) -> u32 {
    let ports = ((sport.raw() as u32) << 16) | dport.raw() as u32;
    let mut h = mix(0x5bd1_e995 ^ protocol as u32, saddr.raw());
    h = mix(h, daddr.raw());
    h = mix(h, ports);
    fmix32(h)
}

/// Hash of a client address alone (session affinity, socket-level
/// selection of host processes).
#[inline]
#[must_use]
pub const fn addr_hash(addr: WireAddr, salt: u32) -> u32 {
    fmix32(mix(0x27d4_eb2f ^ salt, addr.raw()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash of raw packet words, as the pinned values were taken.
    fn flow(saddr: u32, daddr: u32, sport: u16, dport: u16, protocol: u8) -> u32 {
        flow_hash(
            WireAddr::from_raw(saddr),
            WireAddr::from_raw(daddr),
            WirePort::from_raw(sport),
            WirePort::from_raw(dport),
            protocol,
        )
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = flow(1, 2, 3, 4, 6);
        assert_ne!(base, flow(9, 2, 3, 4, 6));
        assert_ne!(base, flow(1, 9, 3, 4, 6));
        assert_ne!(base, flow(1, 2, 9, 4, 6));
        assert_ne!(base, flow(1, 2, 3, 9, 6));
        assert_ne!(base, flow(1, 2, 3, 4, 17));
        // Swapping source and destination is a different flow.
        assert_ne!(base, flow(2, 1, 4, 3, 6));
    }

    const FLOW_PIN: u32 = 0x80ba_001e;

    #[test]
    fn flow_hash_is_stable() {
        // Pinned values: the eBPF program and every node must agree, so a
        // change here changes where flows land on a rolling upgrade.
        assert_eq!(flow(0, 0, 0, 0, 0), 0xff0a_0319);
        assert_eq!(flow(0x0a01_0005, 0x0a60_000a, 40000, 80, 6), FLOW_PIN);
    }

    #[test]
    fn source_ports_spread_evenly_over_buckets() {
        let mut buckets = [0u32; 7];
        for sport in 1024..(1024 + 7000) {
            let h = flow(0x0a01_0005, 0x0a60_000a, sport, 80, 6);
            buckets[(h % 7) as usize] += 1;
        }
        for count in buckets {
            assert!((850..=1150).contains(&count), "uneven buckets: {buckets:?}");
        }
    }
}
