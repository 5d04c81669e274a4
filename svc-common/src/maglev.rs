//! Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! Each backend gets a permutation of the table's slots from its stable
//! identity (address and port, never a node-local id), and backends take
//! turns claiming their next free preferred slot until the table is full.
//! Every backend ends with ⌊M/N⌋ or ⌈M/N⌉ slots, and removing one backend
//! moves little more than that backend's own slots. The table size M is a
//! prime, so every skip visits every slot.
//!
//! The datapath looks a flow up as `table[flow_hash % M]`.

use crate::{
    hash::fmix32,
    wire::{WireAddr, WirePort},
};

/// Table sizes (primes) a service's table is chosen from.
pub const TABLE_SIZES: &[u32] = &[251, 509, 1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_537];
/// Smallest table.
pub const MIN_TABLE_SIZE: u32 = 251;
/// Largest table.
pub const MAX_TABLE_SIZE: u32 = 65_537;
/// Default minimum number of slots per backend. 100 balances within 1%;
/// 200 also keeps the flows that move when one of N backends goes within
/// 1.5 times the ideal 1/N up to about 30 backends (`cargo xtask bench
/// maglev`, docs/benchmarks.md), at 16 KiB of kernel memory per frontend
/// of 10 backends. `svc-agent run --maglev-slots-per-backend` changes it.
pub const DEFAULT_SLOTS_PER_BACKEND: u32 = 200;

/// Marks an unfilled slot while populating.
const EMPTY: u32 = u32::MAX;

/// The table size for `backends` backends: the smallest size in
/// [`TABLE_SIZES`] with at least `slots_per_backend` slots per backend,
/// capped at [`MAX_TABLE_SIZE`].
#[must_use]
pub fn table_size(backends: u32, slots_per_backend: u32) -> u32 {
    let wanted = backends.saturating_mul(slots_per_backend);
    let mut i = 0;
    while i < TABLE_SIZES.len() {
        if TABLE_SIZES[i] >= wanted {
            return TABLE_SIZES[i];
        }
        i += 1;
    }
    MAX_TABLE_SIZE
}

/// A backend's stable identity for Maglev: its address and port, as the
/// packet carries them.
#[must_use]
pub const fn backend_key(addr: WireAddr, port: WirePort) -> u64 {
    ((addr.raw() as u64) << 16) | port.raw() as u64
}

/// A backend's first preferred slot and the step between its preferences.
#[must_use]
pub fn permutation(key: u64, size: u32) -> (u32, u32) {
    // Truncations split the 64-bit key into its halves.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "splitting the key into halves"
    )]
    let (lo, hi) = (key as u32, (key >> 32) as u32);
    let h1 = fmix32(lo ^ fmix32(hi ^ 0x2f1e_3c4d));
    let h2 = fmix32(lo.wrapping_mul(0x9e37_79b1) ^ fmix32(hi ^ 0x7a5b_c1d3));
    (h1 % size, h2 % (size - 1) + 1)
}

/// Where a backend is in its permutation while a table fills: the next
/// slot it prefers and the step to the one after.
#[derive(Clone, Copy, Debug, Default)]
pub struct Preference {
    next: u32,
    skip: u32,
}

/// Fills `table` with indexes into `keys`.
///
/// `table.len()` must be a prime from [`TABLE_SIZES`]; `keys` are the
/// backends' [`backend_key`]s, sorted and without duplicates so that every
/// node builds the same table; `scratch` holds one [`Preference`] per key.
/// With no keys the table is left empty (every slot `u32::MAX`).
///
/// # Panics
///
/// If `scratch` is shorter than `keys`, or the table is shorter than 2
/// slots.
pub fn populate(keys: &[u64], table: &mut [u32], scratch: &mut [Preference]) {
    table.fill(EMPTY);
    if keys.is_empty() {
        return;
    }
    assert!(
        scratch.len() >= keys.len(),
        "scratch shorter than the backends"
    );
    let size = u32::try_from(table.len()).unwrap_or(u32::MAX);
    assert!(size >= 2, "table too small");
    let preferences = &mut scratch[..keys.len()];
    // Each backend's permutation is (offset + j * skip) mod M: walked by
    // adding the skip and wrapping once (both below M), not by hashing
    // and dividing at every step.
    for (preference, &key) in preferences.iter_mut().zip(keys) {
        let (offset, skip) = permutation(key, size);
        *preference = Preference { next: offset, skip };
    }
    let mut filled = 0u32;
    loop {
        for (index, preference) in preferences.iter_mut().enumerate() {
            let slot = loop {
                let slot = preference.next as usize;
                // Below 2M, which fits: M is at most 65,537.
                preference.next += preference.skip;
                if preference.next >= size {
                    preference.next -= size;
                }
                if table[slot] == EMPTY {
                    break slot;
                }
            };
            #[expect(
                clippy::cast_possible_truncation,
                reason = "index < keys.len() <= u32::MAX"
            )]
            {
                table[slot] = index as u32;
            }
            filled += 1;
            if filled == size {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{vec, vec::Vec};

    use super::*;

    fn keys(n: u32) -> Vec<u64> {
        let mut keys: Vec<u64> = (0..n)
            .map(|i| {
                let [_, _, hi, lo] = (i + 2).to_be_bytes();
                backend_key(
                    WireAddr::from_octets([10, 244, hi, lo]),
                    WirePort::from_host(8080),
                )
            })
            .collect();
        keys.sort_unstable();
        keys
    }

    fn table(keys: &[u64], size: u32) -> Vec<u32> {
        let mut table = vec![0; size as usize];
        let mut scratch = vec![Preference::default(); keys.len()];
        populate(keys, &mut table, &mut scratch);
        table
    }

    #[test]
    fn sizes_are_primes_in_range() {
        for &m in TABLE_SIZES {
            assert!(
                (2..m).take_while(|d| d * d <= m).all(|d| m % d != 0),
                "{m} is not prime"
            );
            assert!((MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&m));
        }
        assert_eq!(table_size(1, 100), 251);
        assert_eq!(table_size(3, 100), 509);
        assert_eq!(table_size(10, 100), 1_021);
        assert_eq!(table_size(10_000, 100), MAX_TABLE_SIZE);
        assert_eq!(table_size(0, 100), 251);
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_within_one_percent() {
        for n in [1u32, 2, 3, 5, 7, 10, 33, 100, 500] {
            let size = table_size(n, DEFAULT_SLOTS_PER_BACKEND);
            let table = table(&keys(n), size);
            let mut counts = vec![0u32; n as usize];
            for &slot in &table {
                assert!(slot < n, "unfilled or bad slot {slot} with {n} backends");
                counts[slot as usize] += 1;
            }
            let ideal = f64::from(size) / f64::from(n);
            for (backend, &count) in counts.iter().enumerate() {
                let error = (f64::from(count) - ideal).abs() / ideal;
                assert!(
                    error <= 0.01,
                    "backend {backend} of {n} has {count} of {size} slots ({:.2}% off M/N)",
                    error * 100.0
                );
            }
        }
    }

    /// The paper's resilience property. Maglev is not minimally disruptive:
    /// besides the removed backend's own 1/N, a few more slots change hands,
    /// fewer as M/N grows (measured on average over each removal: N=10,
    /// M=1021 moves 18.2% of slots; N=10, M=65537 moves 10.3%; 1/N is 10%).
    /// The test prints its figures.
    #[test]
    fn removing_one_backend_moves_about_one_nth_of_the_slots() {
        for n in [3u32, 10, 50] {
            let all = keys(n);
            let size = table_size(n, DEFAULT_SLOTS_PER_BACKEND);
            let before = table(&all, size);
            let mut total = 0.0;
            for removed in 0..n as usize {
                let mut rest = all.clone();
                rest.remove(removed);
                let after = table(&rest, size);
                // Compare by identity: indexes shift when a key is removed.
                let mut moved = 0;
                for (&b, &a) in before.iter().zip(&after) {
                    if b as usize == removed {
                        assert_ne!(all[b as usize], rest[a as usize]);
                    }
                    if all[b as usize] != rest[a as usize] {
                        moved += 1;
                    }
                }
                total += f64::from(moved) / f64::from(size);
            }
            let fraction = total / f64::from(n);
            let ideal = 1.0 / f64::from(n);
            std::println!(
                "maglev: N={n} M={size}: removing one backend moves {:.2}% of slots on average (1/N = {:.2}%)",
                fraction * 100.0,
                ideal * 100.0
            );
            assert!(
                fraction <= ideal * 2.0,
                "removing 1 of {n} moved {:.2}% of slots",
                fraction * 100.0
            );
        }
    }

    #[test]
    fn no_backends_leaves_the_table_empty() {
        let table = table(&[], 251);
        assert!(table.iter().all(|&slot| slot == u32::MAX));
    }
}
