//! The agent's control loop: batches from a [`Source`] are reconciled
//! into the desired state and applied to the maps; around that, interfaces
//! are attached as they come, connection tracking is swept, the metrics
//! page is rendered and supervised tasks are watched. `main.rs` builds an
//! [`Agent`] from the flags and runs it.

pub mod interfaces;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use svc_common::stats::Counter;
use tokio::{signal, time};
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{Datapath, Frontend, StatsSnapshot},
    health::HealthChecks,
    http::{Page, lock},
    inspect, metrics,
    reconcile::{Reconciler, Round, Source, join},
    sweeper::Sweeper,
    sync::Applier,
    tasks::{Ended, Tasks},
};
pub use interfaces::AttachPatterns;

/// What the flags say of the loop.
#[derive(Clone, Debug)]
pub struct Options {
    /// Frontend names for the inspection commands.
    pub state_file: PathBuf,
    pub attach: AttachPatterns,
    /// How often the counters that moved are logged.
    pub stats_every: Duration,
    /// How often connection tracking is swept at the most.
    pub sweep_every: Duration,
}

/// The running agent: a loaded datapath and what programs it.
pub struct Agent {
    pub datapath: Datapath,
    pub applier: Applier,
    pub reconciler: Reconciler,
    /// Supervised tasks (watches, the metrics server, the log reader).
    pub tasks: Tasks,
    /// The page the metrics server serves.
    pub page: Arc<Mutex<Page>>,
    pub options: Options,
}

/// How often the metrics page is rendered.
const RENDER_EVERY: Duration = Duration::from_secs(2);

/// The loop's own state.
struct Looping {
    health: HealthChecks,
    snapshot: metrics::Snapshot,
    /// Each frontend's service, for the traffic metrics.
    names: Vec<(Frontend, String)>,
    sweeper: Sweeper,
    /// The counters as last logged.
    logged: StatsSnapshot,
    /// Whether the pod program is pinned for the CNI plugin.
    published: bool,
}

impl Agent {
    /// Runs until Ctrl-C (or SIGINT); the datapath stays pinned or is
    /// detached as it was loaded.
    ///
    /// # Errors
    /// Waiting for the signal failed.
    pub async fn run(mut self, mut source: impl Source) -> std::io::Result<()> {
        let mut interfaces = interfaces::Interfaces::watch(self.options.attach.clone());
        interfaces.rescan(&mut self.datapath);
        let mut state = Looping {
            health: HealthChecks::default(),
            snapshot: metrics::Snapshot::default(),
            names: Vec::new(),
            sweeper: Sweeper::new(self.options.sweep_every),
            logged: StatsSnapshot::default(),
            published: false,
        };
        let mut render_every = time::interval(RENDER_EVERY);
        let mut sweep_every = time::interval(Duration::from_secs(1));
        let mut log_every = time::interval(self.options.stats_every);
        loop {
            tokio::select! {
                () = interfaces.changed() => interfaces.rescan(&mut self.datapath),
                batch = source.changed() => {
                    state.snapshot.watch_errors += batch.dirty.failures.len() as u64;
                    lock(&self.page).proxy.queued(batch.started);
                    if let Some(round) = self.reconciler.reconcile(&source, batch) {
                        self.apply(&round, &mut state);
                    } else if self.reconciler.synced() {
                        // Nothing the datapath holds changed: it is current.
                        lock(&self.page).proxy.updated(SystemTime::now());
                    }
                    // No Node object (a manifest directory): nothing says
                    // the node is leaving.
                    lock(&self.page).proxy.node_eligible =
                        source.node().is_none_or(|node| node.eligible);
                }
                _ = render_every.tick() => {
                    let ready = lock(&self.page).ready;
                    self.publish(&mut state, ready);
                }
                result = state.sweeper.finished(), if state.sweeper.running() => {
                    state.sweeper.finish(result, &mut self.applier, &mut self.datapath);
                }
                _ = sweep_every.tick(), if self.reconciler.synced() => {
                    state.sweeper.start_if_due(&mut self.applier, &mut self.datapath);
                }
                _ = log_every.tick() => log_counters(&self.datapath, &mut state.logged),
                ended = self.tasks.ended() => task_ended(&ended, &self.page, &mut state.snapshot),
                result = signal::ctrl_c() => return result,
            }
        }
    }

    /// Writes the desired state of `round` to the maps, the health check
    /// servers and the state file, and counts it.
    fn apply(&mut self, round: &Round, state: &mut Looping) {
        let desired = self.reconciler.desired();
        for problem in &round.problems {
            if problem.warning {
                warn!(object = %problem.object, "{}", problem.message);
            } else {
                debug!(object = %problem.object, "{}", problem.message);
            }
        }
        let report = self.applier.apply(self.datapath.maps_mut(), desired);
        // Only a datapath that serves the services is handed to the CNI
        // plugin: until then, it fails new pods (the kubelet retries).
        if !state.published {
            match self.datapath.publish_pod_program() {
                Ok(()) => state.published = true,
                Err(err) => {
                    warn!(error = %err, "pinning the pod program for the CNI plugin failed");
                }
            }
        }
        state.health.sync(&desired.health_checks);
        if let Err(err) = inspect::write_state(&self.options.state_file, desired) {
            warn!(error = %err, "recording frontend names for the inspection commands failed");
        }
        for error in &report.errors {
            warn!("{error}");
        }
        if !report.cidrs_dropped.is_empty() {
            warn!(
                cidrs = %join(&report.cidrs_dropped),
                "the datapath holds {} CIDRs per set; these are ignored",
                svc_common::lb::MAX_CIDRS
            );
        }
        let (frontends, backends) = self.applier.sizes();
        info!(
            frontends,
            backends,
            translated = round.translated,
            written = report.frontends_written,
            removed = report.frontends_removed,
            backends_added = report.backends_added,
            backends_removed = report.backends_removed,
            "desired state applied"
        );
        let snapshot = &mut state.snapshot;
        snapshot.syncs += 1;
        for (total, count) in snapshot.writes.iter_mut().zip([
            report.frontends_written,
            report.frontends_removed,
            report.backends_added,
            report.backends_removed,
        ]) {
            *total += count as u64;
        }
        for error in &report.errors {
            *snapshot.sync_errors.entry(error.kind()).or_default() += 1;
        }
        snapshot.input_problems += round.problems.iter().filter(|p| p.warning).count() as u64;
        snapshot.sync_latency.observe(round.started.elapsed());
        state.names = desired
            .frontends
            .iter()
            .map(|(frontend, spec)| (*frontend, spec.service.to_string()))
            .collect();
        if report.sweep_wanted {
            state.sweeper.want();
            state
                .sweeper
                .start_if_due(&mut self.applier, &mut self.datapath);
        }
        lock(&self.page).proxy.updated(SystemTime::now());
        self.publish(state, true);
    }

    /// Renders the metrics from the maps and hands the page over.
    fn publish(&self, state: &mut Looping, ready: bool) {
        let snapshot = &mut state.snapshot;
        snapshot.sweeps = state.sweeper.stats.clone();
        (snapshot.frontends, snapshot.backends) = self.applier.sizes();
        if let Ok(stats) = self.datapath.stats() {
            snapshot.datapath = stats;
        }
        let maps = self.datapath.maps();
        snapshot.fill = maps.fill();
        snapshot.fill.push((
            svc_common::ct::CT_MAP,
            snapshot.sweeps.entries as u64,
            u64::from(maps.ct_capacity()),
        ));
        snapshot.fill.push((
            svc_common::lb::AFFINITY_MAP,
            snapshot.sweeps.affinity_entries as u64,
            u64::from(maps.affinity_capacity()),
        ));
        let config = self.datapath.config();
        snapshot.nat_port_range =
            u64::from(config.nat_port_max.saturating_sub(config.nat_port_min)) + 1;
        snapshot.traffic = state
            .names
            .iter()
            .filter_map(|(frontend, service)| {
                let id = maps.service(frontend)?.id;
                let counters = maps.service_counters(id).ok()?;
                Some(metrics::FrontendTraffic {
                    frontend: inspect::frontend_label(frontend),
                    service: service.clone(),
                    packets: counters.packets,
                    bytes: counters.bytes,
                })
            })
            .collect();
        let text = metrics::render(snapshot);
        let mut page = lock(&self.page);
        page.text = text;
        page.ready = ready;
        page.refreshed = Instant::now();
    }
}

/// A supervised task ended: said loudly, counted, and if the agent cannot
/// do without it, `/healthz` fails from now on.
fn task_ended(ended: &Ended, page: &Mutex<Page>, snapshot: &mut metrics::Snapshot) {
    let Ended { task, why } = ended;
    *snapshot.task_failures.entry(task.name).or_default() += 1;
    if task.essential {
        error!(
            task = task.name,
            why,
            "an essential task ended: /healthz fails so the agent is restarted (the pinned datapath serves meanwhile)"
        );
        lock(page).failed = Some(format!("the {} ended: {why}", task.name));
    } else {
        warn!(
            task = task.name,
            why, "a task ended; the agent goes on without it"
        );
    }
}

/// Logs what the counters moved since `last`, and keeps them there. The
/// counters that mean trouble are warned about.
fn log_counters(datapath: &Datapath, last: &mut StatsSnapshot) {
    let now = match datapath.stats() {
        Ok(now) => now,
        Err(err) => {
            warn!(error = %err, "reading the datapath's counters failed");
            return;
        }
    };
    for (counter, delta) in now.since(last) {
        match counter {
            Counter::DropNatPortsExhausted => warn!(
                packets = delta.packets,
                "new masqueraded flows dropped: every NAT source port to their backend is taken (--nat-port-range)"
            ),
            Counter::LbNewFlowMidstream => warn!(
                packets = delta.packets,
                "TCP segments of connections connection tracking had lost (evicted from a full table?) started new flows"
            ),
            _ => info!(
                counter = counter.name(),
                packets = delta.packets,
                bytes = delta.bytes,
                "packets"
            ),
        }
    }
    *last = now;
}
