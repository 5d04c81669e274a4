//! `cargo xtask bench maglev`: the quality of svc-proxy's Maglev tables
//! (`svc_common::maglev`, the code the agent runs) for every table size M
//! the agent chooses from and N from 3 to 1,000 backends:
//!
//! - `build`: time to populate one table (fastest of several builds);
//! - `imbalance`: the most slots any backend holds over the mean M/N;
//! - `moved_on_remove` / `moved_on_add`: the share of slots (so of flows,
//!   the flow hash being uniform) whose backend changes when one backend is
//!   removed or one is added, averaged over up to 20 choices, with `ideal`
//!   (1/N and 1/(N+1)) beside them;
//! - `memory`: bytes of one table in the shared Maglev map.
//!
//! Writes `{"bench", "proxy", "slots", "backends", "metric", "value",
//! "unit"}` objects to the JSON file given with `--out`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use svc_common::{
    maglev::{Preference, TABLE_SIZES, backend_key, populate},
    wire::{WireAddr, WirePort},
};
use tests::figures::{self, Figure};

const BACKENDS: [u32; 7] = [3, 10, 30, 100, 300, 1_000, 3_000];
/// How many backends are removed (one at a time) or added per case.
const TRIALS: u32 = 20;
/// A build is timed this often, or for at least [`MIN_TIMING`].
const MIN_BUILDS: u32 = 5;
const MIN_TIMING: Duration = Duration::from_millis(200);

/// Backend `i`'s Maglev key: pod addresses spread over a /16, port 8080.
fn key(i: u32) -> u64 {
    let [_, _, hi, lo] = (i + 2).to_be_bytes();
    backend_key(
        WireAddr::from_octets([10, 244, hi, lo]),
        WirePort::from_host(8080),
    )
}

/// The table for `keys` (sorted, as the agent sorts them), as keys.
fn table(keys: &[u64], size: u32) -> Vec<u64> {
    let mut slots = vec![0; size as usize];
    let mut scratch = vec![Preference::default(); keys.len()];
    populate(keys, &mut slots, &mut scratch);
    slots.iter().map(|&index| keys[index as usize]).collect()
}

fn sorted_keys(indexes: impl Iterator<Item = u32>) -> Vec<u64> {
    let mut keys: Vec<u64> = indexes.map(key).collect();
    keys.sort_unstable();
    keys
}

fn moved(before: &[u64], after: &[u64]) -> f64 {
    let moved = before.iter().zip(after).filter(|(a, b)| a != b).count();
    ratio(moved, before.len())
}

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn ratio(part: usize, whole: usize) -> f64 {
    part as f64 / whole as f64
}

fn build_seconds(keys: &[u64], size: u32) -> f64 {
    let mut slots = vec![0; size as usize];
    let mut scratch = vec![Preference::default(); keys.len()];
    let started = Instant::now();
    let mut best = Duration::MAX;
    let mut builds = 0;
    while builds < MIN_BUILDS || started.elapsed() < MIN_TIMING {
        let one = Instant::now();
        populate(keys, &mut slots, &mut scratch);
        best = best.min(one.elapsed());
        builds += 1;
    }
    std::hint::black_box(&slots);
    best.as_secs_f64()
}

fn case(size: u32, n: u32, figures: &mut Vec<Figure>) {
    let mut push = |metric: &str, value, unit| {
        figures.push(Figure {
            slots: Some(size),
            backends: Some(n),
            ..Figure::ours("maglev", 1, metric, value, unit)
        });
    };
    let keys = sorted_keys(0..n);
    push("build", build_seconds(&keys, size) * 1e3, "ms");
    let before = table(&keys, size);
    let most = keys
        .iter()
        .map(|k| before.iter().filter(|slot| *slot == k).count())
        .max()
        .unwrap_or_default();
    push(
        "imbalance",
        ratio(most * n as usize, size as usize),
        "max/mean",
    );
    let step = (n / TRIALS).max(1);
    let removals: Vec<u32> = (0..n)
        .step_by(step as usize)
        .take(TRIALS as usize)
        .collect();
    let mut on_remove = 0.0;
    for &removed in &removals {
        let after = table(&sorted_keys((0..n).filter(|&i| i != removed)), size);
        on_remove += moved(&before, &after);
    }
    push(
        "moved_on_remove",
        on_remove / f64::from(u32::try_from(removals.len()).unwrap_or(1)),
        "share",
    );
    push("ideal_on_remove", 1.0 / f64::from(n), "share");
    let mut on_add = 0.0;
    for added in 0..TRIALS {
        // New pods get addresses past the existing ones, in a different /24.
        let after = table(&sorted_keys((0..n).chain([n + 512 + added * 37])), size);
        on_add += moved(&before, &after);
    }
    push("moved_on_add", on_add / f64::from(TRIALS), "share");
    push("ideal_on_add", 1.0 / f64::from(n + 1), "share");
    push(
        "memory",
        // One backend id (u32) per slot.
        f64::from(size) * 4.0,
        "bytes",
    );
}

fn main() {
    let mut out = PathBuf::from("target/bench/maglev.json");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = PathBuf::from(args.next().expect("--out needs a path")),
            other => panic!("unknown argument {other}"),
        }
    }
    let mut figures = Vec::new();
    for &size in TABLE_SIZES {
        // A table needs at least one slot per backend.
        for n in BACKENDS.into_iter().filter(|&n| n <= size) {
            case(size, n, &mut figures);
            eprintln!("maglev: M = {size}, N = {n} done");
        }
    }
    figures::write(&out, &figures);
}
