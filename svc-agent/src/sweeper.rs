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
    pub stats: SweepStats,
}

impl Sweeper {
    #[must_use]
    pub fn new(every: Duration) -> Self {
        Self {
            running: None,
            wanted: false,
            every,
            last_start: None,
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
