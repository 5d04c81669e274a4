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
    /// Affinity entries the last sweep read.
    pub affinity_entries: usize,
    /// Ports of the NAT range held toward the busiest backend.
    pub nat_ports_busiest: usize,
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
    /// When connection tracking, affinity and the NAT range were last said
    /// to be full (each warned once a minute at most).
    last_warnings: [Option<Instant>; 3],
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

/// Whether a warning last given at `last` may be given again, and if so
/// notes that it is given now.
fn due(last: &mut Option<Instant>) -> bool {
    if last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
        return false;
    }
    *last = Some(Instant::now());
    true
}

impl Sweeper {
    #[must_use]
    pub fn new(every: Duration) -> Self {
        Self {
            running: None,
            wanted: false,
            every,
            last_start: None,
            last_warnings: [None; 3],
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

    /// Warns (once a minute at most for each) when connection tracking or
    /// affinity is nearly full, when the LRU evicts entries that are still
    /// alive, and when the NAT range toward a backend nearly runs out.
    fn warn_if_full(&mut self, report: &SweepReport, datapath: &Datapath) {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let maps = datapath.maps();
        let capacity = usize::try_from(maps.ct_capacity()).unwrap_or(usize::MAX);
        if nearly_full(report.entries, capacity, cpus) && due(&mut self.last_warnings[0]) {
            warn!(
                entries = report.entries,
                capacity,
                "connection tracking is {}% full: the least recently used flows, live ones included, are evicted, and an evicted TCP connection is reset if its service's table changed since; raise --ct-entries (two per flow)",
                report.entries * 100 / capacity
            );
        }
        let capacity = usize::try_from(maps.affinity_capacity()).unwrap_or(usize::MAX);
        if nearly_full(report.affinity_entries, capacity, cpus) && due(&mut self.last_warnings[1]) {
            warn!(
                entries = report.affinity_entries,
                capacity,
                "session affinity is {}% full: the least recently used clients lose their backend; raise --affinity-entries (one per client and service)",
                report.affinity_entries * 100 / capacity
            );
        }
        let config = datapath.config();
        let range = usize::from(config.nat_port_max.saturating_sub(config.nat_port_min)) + 1;
        if report.nat_ports_busiest * 100 >= range * FULL_PERCENT && due(&mut self.last_warnings[2])
        {
            warn!(
                ports = report.nat_ports_busiest,
                range,
                "masqueraded flows hold {}% of the NAT port range toward one backend: new ones to it are dropped when it is full (drop_nat_ports_exhausted); widen --nat-port-range",
                report.nat_ports_busiest * 100 / range
            );
        }
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
                stats.affinity_entries = report.affinity_entries;
                stats.nat_ports_busiest = report.nat_ports_busiest;
                stats.reserved_backends = applier.retired_backends();
                stats.reserved_frontends = datapath.maps_mut().frontend_ids().quarantined();
                stats.last_duration = report.elapsed;
                self.warn_if_full(&report, datapath);
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
