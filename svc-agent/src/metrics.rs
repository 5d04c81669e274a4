//! Prometheus metrics in the text exposition format, and the agent's
//! health. The agent's loop renders a fresh page after every sync and
//! every few seconds; the HTTP side only serves the last page, so a scrape
//! never waits on the maps.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use svc_common::stats::Counter;

use crate::{datapath::StatsSnapshot, sweeper::SweepStats};

/// Upper bounds (seconds) of the sync-latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Event → maps-updated latency.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, latency: Duration) {
        let secs = latency.as_secs_f64();
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&mut self.counts) {
            if secs <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

/// Traffic of one frontend.
#[derive(Clone, Debug)]
pub struct FrontendTraffic {
    pub frontend: String,
    pub service: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Everything one page shows.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub frontends: usize,
    pub backends: usize,
    pub syncs: u64,
    /// Map writes applied: (frontend tables written, frontends removed,
    /// backends added, backends removed).
    pub writes: [u64; 4],
    /// Failed map writes, by [`crate::sync::ApplyError::kind`].
    pub sync_errors: BTreeMap<&'static str, u64>,
    pub input_problems: u64,
    /// Kubernetes watch failures (each followed by a retry and a relist).
    pub watch_errors: u64,
    pub sync_latency: Histogram,
    pub datapath: StatsSnapshot,
    pub traffic: Vec<FrontendTraffic>,
    /// (map, entries used, capacity).
    pub fill: Vec<(&'static str, u64, u64)>,
    /// Sweeps of connection tracking.
    pub sweeps: SweepStats,
    /// Ports in the source-NAT range.
    pub nat_port_range: u64,
    /// Supervised tasks that ended, by name (each a fault).
    pub task_failures: BTreeMap<&'static str, u64>,
}

/// The `what` labels of `svc_map_writes_total`, in [`Snapshot::writes`]
/// order.
const WRITES: [&str; 4] = [
    "frontend_written",
    "frontend_removed",
    "backend_added",
    "backend_removed",
];

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The page for `snapshot`.
#[must_use]
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    metric(
        "svc_frontends",
        "gauge",
        "Frontends (service ports on an address or node port) installed.",
    );
    metric("svc_backends", "gauge", "Backends installed.");
    metric("svc_syncs_total", "counter", "Desired-state syncs applied.");
    metric(
        "svc_sync_errors_total",
        "counter",
        "Map writes that failed, by kind (addresses, cidrs, frontend, backend, backend_ids): a full map, no room for a table, no free id.",
    );
    metric(
        "svc_map_writes_total",
        "counter",
        "Map writes applied, by what: frontend tables written and removed, backends added and removed (an unchanged cluster writes none).",
    );
    metric(
        "svc_input_problems_total",
        "counter",
        "Objects or parts of objects skipped as bad input.",
    );
    metric(
        "svc_watch_errors_total",
        "counter",
        "Kubernetes watch failures; each is retried with backoff and relisted.",
    );
    let mut body = String::new();
    let _ = writeln!(body, "svc_frontends {}", snapshot.frontends);
    let _ = writeln!(body, "svc_backends {}", snapshot.backends);
    let _ = writeln!(body, "svc_syncs_total {}", snapshot.syncs);
    for (what, count) in WRITES.iter().zip(snapshot.writes) {
        let _ = writeln!(body, "svc_map_writes_total{{what=\"{what}\"}} {count}");
    }
    for kind in crate::sync::ApplyError::KINDS {
        let errors = snapshot.sync_errors.get(kind).copied().unwrap_or(0);
        let _ = writeln!(body, "svc_sync_errors_total{{kind=\"{kind}\"}} {errors}");
    }
    let _ = writeln!(body, "svc_input_problems_total {}", snapshot.input_problems);
    let _ = writeln!(body, "svc_watch_errors_total {}", snapshot.watch_errors);
    out.push_str(&body);
    let _ = writeln!(
        out,
        "# HELP svc_task_ends_total Supervised tasks (watches, the metrics server, the eBPF log reader) that ended, by task: each is a fault.\n\
         # TYPE svc_task_ends_total counter"
    );
    for (task, ends) in &snapshot.task_failures {
        let _ = writeln!(
            out,
            "svc_task_ends_total{{task=\"{}\"}} {ends}",
            escape(task)
        );
    }

    let _ = writeln!(
        out,
        "# HELP svc_sync_latency_seconds From a change seen to the maps updated.\n\
         # TYPE svc_sync_latency_seconds histogram"
    );
    let histogram = &snapshot.sync_latency;
    for (bound, count) in LATENCY_BUCKETS.iter().zip(&histogram.counts) {
        let _ = writeln!(
            out,
            "svc_sync_latency_seconds_bucket{{le=\"{bound}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "svc_sync_latency_seconds_bucket{{le=\"+Inf\"}} {}",
        histogram.count
    );
    let _ = writeln!(out, "svc_sync_latency_seconds_sum {}", histogram.sum);
    let _ = writeln!(out, "svc_sync_latency_seconds_count {}", histogram.count);

    render_datapath(&mut out, snapshot);
    render_traffic(&mut out, snapshot);
    render_sweeps(&mut out, snapshot);
    out
}

fn render_sweeps(out: &mut String, snapshot: &Snapshot) {
    let sweeps = &snapshot.sweeps;
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "svc_conntrack_sweeps_total",
        "counter",
        "Sweeps of connection tracking, by result.",
        &[
            ("{result=\"ok\"}", sweeps.sweeps.to_string()),
            ("{result=\"failed\"}", sweeps.failures.to_string()),
        ],
    );
    metric(
        "svc_conntrack_entries",
        "gauge",
        "Connection-tracking entries at the last sweep (two per flow, dead ones included).",
        &[("", sweeps.entries.to_string())],
    );
    metric(
        "svc_conntrack_flows",
        "gauge",
        "Live translated flows at the last sweep.",
        &[("", sweeps.flows.to_string())],
    );
    metric(
        "svc_conntrack_removed_total",
        "counter",
        "Entries sweeps removed: flows that timed out, UDP flows whose endpoint stopped serving, affinity to what is gone.",
        &[
            ("{reason=\"expired\"}", sweeps.removed_expired.to_string()),
            (
                "{reason=\"udp_endpoint_gone\"}",
                sweeps.removed_udp.to_string(),
            ),
            ("{reason=\"affinity\"}", sweeps.removed_affinity.to_string()),
        ],
    );
    #[expect(clippy::cast_precision_loss, reason = "a ratio")]
    let nat_fill = if snapshot.nat_port_range == 0 {
        0.0
    } else {
        sweeps.nat_ports_busiest as f64 / snapshot.nat_port_range as f64
    };
    metric(
        "svc_nat_port_fill_ratio",
        "gauge",
        "Share of the source-NAT port range that live masqueraded flows hold toward the busiest backend at the last sweep (new flows to it are dropped at 1).",
        &[("", nat_fill.to_string())],
    );
    metric(
        "svc_conntrack_sweep_seconds",
        "gauge",
        "How long the last sweep took.",
        &[("", sweeps.last_duration.as_secs_f64().to_string())],
    );
    metric(
        "svc_ids_reserved",
        "gauge",
        "Ids of removed frontends and backends that live flows still name (reused once none does).",
        &[
            ("{kind=\"backend\"}", sweeps.reserved_backends.to_string()),
            ("{kind=\"frontend\"}", sweeps.reserved_frontends.to_string()),
        ],
    );
}

fn render_datapath(out: &mut String, snapshot: &Snapshot) {
    let _ = writeln!(
        out,
        "# HELP svc_datapath_packets_total Packets the eBPF programs counted, by counter (class, event or drop reason).\n\
         # TYPE svc_datapath_packets_total counter"
    );
    for counter in Counter::ALL {
        let value = snapshot.datapath.get(*counter);
        let _ = writeln!(
            out,
            "svc_datapath_packets_total{{counter=\"{}\"}} {}",
            counter.name(),
            value.packets
        );
    }
    let _ = writeln!(
        out,
        "# HELP svc_datapath_bytes_total Bytes the eBPF programs counted, by counter.\n\
         # TYPE svc_datapath_bytes_total counter"
    );
    for counter in Counter::ALL {
        let value = snapshot.datapath.get(*counter);
        let _ = writeln!(
            out,
            "svc_datapath_bytes_total{{counter=\"{}\"}} {}",
            counter.name(),
            value.bytes
        );
    }
}

fn render_traffic(out: &mut String, snapshot: &Snapshot) {
    let _ = writeln!(
        out,
        "# HELP svc_frontend_packets_total Packets translated for a frontend.\n\
         # TYPE svc_frontend_packets_total counter\n\
         # HELP svc_frontend_bytes_total Bytes translated for a frontend.\n\
         # TYPE svc_frontend_bytes_total counter"
    );
    for traffic in &snapshot.traffic {
        let labels = format!(
            "frontend=\"{}\",service=\"{}\"",
            escape(&traffic.frontend),
            escape(&traffic.service)
        );
        let _ = writeln!(
            out,
            "svc_frontend_packets_total{{{labels}}} {}",
            traffic.packets
        );
        let _ = writeln!(
            out,
            "svc_frontend_bytes_total{{{labels}}} {}",
            traffic.bytes
        );
    }

    let _ = writeln!(
        out,
        "# HELP svc_map_fill_ratio Share of a map's capacity in use.\n# TYPE svc_map_fill_ratio gauge"
    );
    for (map, used, capacity) in &snapshot.fill {
        #[expect(clippy::cast_precision_loss, reason = "a ratio")]
        let ratio = if *capacity == 0 {
            0.0
        } else {
            *used as f64 / *capacity as f64
        };
        let _ = writeln!(out, "svc_map_fill_ratio{{map=\"{map}\"}} {ratio}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_every_family_and_escapes_labels() {
        let mut snapshot = Snapshot {
            frontends: 2,
            traffic: vec![FrontendTraffic {
                frontend: "10.96.0.10:80/TCP".to_owned(),
                service: "ns/\"odd\"".to_owned(),
                packets: 3,
                bytes: 180,
            }],
            fill: vec![("SVC_SERVICES_V1", 2, 8)],
            nat_port_range: 4,
            ..Snapshot::default()
        };
        snapshot.sweeps.nat_ports_busiest = 3;
        snapshot.task_failures.insert("watch of Services", 1);
        snapshot.sync_errors.insert("backend_ids", 2);
        snapshot.writes = [5, 0, 7, 0];
        snapshot.sync_latency.observe(Duration::from_millis(3));
        let page = render(&snapshot);
        assert!(page.contains("svc_frontends 2\n"));
        assert!(page.contains("svc_sync_errors_total{kind=\"backend_ids\"} 2\n"));
        assert!(page.contains("svc_map_writes_total{what=\"frontend_written\"} 5\n"));
        assert!(page.contains("svc_map_writes_total{what=\"backend_removed\"} 0\n"));
        assert!(page.contains("svc_sync_errors_total{kind=\"frontend\"} 0\n"));
        assert!(page.contains("svc_sync_latency_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(page.contains("svc_sync_latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(page.contains("svc_sync_latency_seconds_count 1\n"));
        assert!(page.contains(
            "svc_frontend_packets_total{frontend=\"10.96.0.10:80/TCP\",service=\"ns/\\\"odd\\\"\"} 3\n"
        ));
        assert!(page.contains("svc_map_fill_ratio{map=\"SVC_SERVICES_V1\"} 0.25\n"));
        assert!(page.contains("svc_nat_port_fill_ratio 0.75\n"));
        assert!(page.contains("svc_task_ends_total{task=\"watch of Services\"} 1\n"));
        assert!(page.contains("svc_datapath_packets_total{counter=\"drop_no_backend\"} 0\n"));
    }
}
