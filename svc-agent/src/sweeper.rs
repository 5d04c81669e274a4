//! Sweeps of connection tracking, one at a time, on a blocking thread, so
//! a large table never stalls the agent's loop (syncs, `/healthz`). A sweep
//! starts when a sync changed what it acts on, and every
//! `--ct-sweep-interval-secs` in any case (flows time out, ids wait).

use std::{
    io,
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::{
    datapath::{
        Datapath,
        conntrack::{self, SweepReport},
    },
    sync::{Applier, PendingSweep},
};

/// What the sweeps did, for the metrics.
#[derive(Clone, Debug, Default)]
pub struct SweepStats {
    pub sweeps: u64,
    pub failures: u64,
    /// Entries and live flows the last sweep read.
    pub entries: usize,
    pub flows: usize,
    pub removed_expired: u64,
    pub removed_udp: u64,
    pub removed_affinity: u64,
    /// Ids released and still named by live flows.
    pub reserved_backends: usize,
    pub reserved_frontends: usize,
    pub last_duration: Duration,
}

/// At most one sweep under way, and whether another is wanted.
#[derive(Debug)]
pub struct Sweeper {
    running: Option<(PendingSweep, JoinHandle<io::Result<SweepReport>>)>,
    wanted: bool,
    every: Duration,
    last_start: Option<Instant>,
    /// When the table was last said to be full (warned once a minute).
    last_full_warning: Option<Instant>,
    pub stats: SweepStats,
}

/// A sweep finding connection tracking at least this full warns.
const FULL_PERCENT: usize = 90;
/// Free entries the kernel's LRU keeps aside per CPU at most
/// (`LOCAL_FREE_TARGET`); at least, half a CPU's share of the map.
const LRU_SLACK_PER_CPU: usize = 128;

/// Whether an LRU map holding `entries` of `capacity` is full enough that
/// it evicts: at 90%, or within what the kernel keeps aside on each CPU's
/// free list (a full map of 256 entries on 2 CPUs holds about 192).
#[must_use]
pub fn nearly_full(entries: usize, capacity: usize, cpus: usize) -> bool {
    let cpus = cpus.max(1);
    let slack = LRU_SLACK_PER_CPU.min(capacity / cpus / 2) * cpus;
    capacity > 0 && (entries * 100 >= capacity * FULL_PERCENT || entries + slack >= capacity)
}
/// Between two warnings that the table is full.
const WARN_EVERY: Duration = Duration::from_mins(1);

impl Sweeper {
    #[must_use]
    pub fn new(every: Duration) -> Self {
        Self {
            running: None,
            wanted: false,
            every,
            last_start: None,
            last_full_warning: None,
            stats: SweepStats::default(),
        }
    }

    /// A sync changed what a sweep acts on: sweep as soon as possible.
    pub const fn want(&mut self) {
        self.wanted = true;
    }

    /// Whether a sweep is under way.
    #[must_use]
    pub const fn running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts a sweep if one is wanted or due and none is running.
    pub fn start_if_due(&mut self, applier: &mut Applier, datapath: &mut Datapath) {
        let due = self
            .last_start
            .is_none_or(|last| last.elapsed() >= self.every);
        if self.running.is_some() || !(self.wanted || due) {
            return;
        }
        let now = match datapath.now_ns() {
            Ok(now) => now,
            Err(err) => {
                self.stats.failures += 1;
                warn!(error = %err, "reading the datapath's clock for a sweep failed");
                self.last_start = Some(Instant::now());
                return;
            }
        };
        let config = *datapath.config();
        let pending = applier.begin_sweep(datapath.maps_mut(), now, &config);
        let maps = match datapath.maps().sweep_maps().try_clone() {
            Ok(maps) => maps,
            Err(err) => {
                self.stats.failures += 1;
                warn!(error = %err, "duplicating map descriptors for a sweep failed");
                self.last_start = Some(Instant::now());
                return;
            }
        };
        let plan = pending.plan.clone();
        let task = tokio::task::spawn_blocking(move || conntrack::sweep(&maps, &plan));
        self.running = Some((pending, task));
        self.wanted = false;
        self.last_start = Some(Instant::now());
    }

    /// Waits for the running sweep; pending forever when none runs (for
    /// `select!`).
    pub async fn finished(&mut self) -> io::Result<SweepReport> {
        match &mut self.running {
            Some((_, task)) => match task.await {
                Ok(result) => result,
                Err(err) => Err(io::Error::other(format!("the sweep task failed: {err}"))),
            },
            None => std::future::pending().await,
        }
    }

    /// Warns (once a minute at most) when connection tracking is nearly
    /// full: the LRU then evicts flows that are still alive.
    fn warn_if_full(&mut self, entries: usize, capacity: u32) {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        if !nearly_full(entries, capacity, cpus) {
            return;
        }
        if self
            .last_full_warning
            .is_some_and(|last| last.elapsed() < WARN_EVERY)
        {
            return;
        }
        self.last_full_warning = Some(Instant::now());
        warn!(
            entries,
            capacity,
            "connection tracking is {}% full: the least recently used flows, live ones included, are evicted, and an evicted TCP connection is reset if its service's table changed since; raise --ct-entries (two per flow)",
            entries * 100 / capacity
        );
    }

    /// Takes the result of the sweep [`Sweeper::finished`] returned:
    /// frees the ids no live flow names.
    pub fn finish(
        &mut self,
        result: io::Result<SweepReport>,
        applier: &mut Applier,
        datapath: &mut Datapath,
    ) {
        let Some((pending, _)) = self.running.take() else {
            return;
        };
        match result {
            Ok(report) => {
                let (backends, frontends) =
                    applier.finish_sweep(datapath.maps_mut(), &pending, &report);
                let stats = &mut self.stats;
                stats.sweeps += 1;
                stats.entries = report.entries;
                stats.flows = report.flows;
                stats.removed_expired += report.removed_expired as u64;
                stats.removed_udp += report.removed_udp as u64;
                stats.removed_affinity += report.removed_affinity as u64;
                stats.reserved_backends = applier.retired_backends();
                stats.reserved_frontends = datapath.maps_mut().frontend_ids().quarantined();
                stats.last_duration = report.elapsed;
                self.warn_if_full(report.entries, datapath.maps().ct_capacity());
                debug!(
                    entries = report.entries,
                    flows = report.flows,
                    expired = report.removed_expired,
                    udp = report.removed_udp,
                    affinity = report.removed_affinity,
                    freed_backend_ids = backends,
                    freed_frontend_ids = frontends,
                    elapsed_ms = report.elapsed.as_millis(),
                    "swept connection tracking"
                );
            }
            Err(err) => {
                self.stats.failures += 1;
                // What it would have cleared waits for the next one.
                self.wanted = true;
                warn!(error = %err, "sweeping connection tracking failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::nearly_full;

    #[test]
    fn full_is_ninety_percent_or_the_lru_slack() {
        assert!(nearly_full(472_000, 524_288, 2));
        assert!(!nearly_full(400_000, 524_288, 2));
        assert!(nearly_full(192, 256, 2), "a full small map on 2 CPUs");
        assert!(!nearly_full(100, 256, 2));
        assert!(!nearly_full(0, 0, 2));
    }
}
