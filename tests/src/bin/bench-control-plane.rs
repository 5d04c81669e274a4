//! `cargo xtask bench control-plane`: the agent's pipeline (manifest watch
//! → translation → applying to the maps), in process, on N services with
//! 10 endpoints each. Measures the time to program them from cold, the
//! latency from one EndpointSlice edit to the maps updated with 10,000
//! services installed (p50 and p99 over 200 edits), the process's resident
//! memory, and, with connection tracking full (the default 524,288
//! entries, flows made by the pod program through `BPF_PROG_TEST_RUN`),
//! removing 1,000 backends, sweeping, and an edit while the sweep runs.
//! Writes `{"bench", "proxy", "services", "metric", "value", "unit"}` objects to the JSON file
//! given with `--out`.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions};
use svc_agent::{
    datapath::{Capacities, Datapath, FROM_POD_PROGRAM, LoadOptions, conntrack},
    model::{NodeInfo, Settings, Translator},
    source::manifests::Watch,
    sync::Applier,
};
use svc_common::ct::DEFAULT_CT_ENTRIES;
use tests::figures::{self, Figure};

const COLD_COUNTS: [u32; 3] = [1_000, 10_000, 50_000];
const CHANGE_SERVICES: u32 = 10_000;
const CHANGES: usize = 200;
const ENDPOINTS: u32 = 10;
/// Services per manifest file.
const PER_FILE: u32 = 100;

fn cluster_ip(i: u32) -> Ipv4Addr {
    let [_, b, c, d] = (i + 1).to_be_bytes();
    Ipv4Addr::new(10, 96 + b, c, d)
}

fn endpoint(i: u32, k: u32, generation: u32) -> Ipv4Addr {
    // Unique per service and endpoint; a new generation moves one.
    let index = (i * ENDPOINTS + k) + generation * 7_919;
    let [_, high, mid, low] = index.to_be_bytes();
    Ipv4Addr::new(10, 128 + (high & 0x3f), mid, low)
}

/// One file's services and slices; `bumped` gives service `bumped`'s
/// first endpoint a new address.
fn file_text(first: u32, count: u32, bumped: Option<(u32, u32)>) -> String {
    let mut text = String::new();
    for i in first..first + count {
        let _ = write!(
            text,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\n\
             spec:\n  clusterIP: {}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
            cluster_ip(i)
        );
        for k in 0..ENDPOINTS {
            let generation = match bumped {
                Some((service, generation)) if service == i && k == 0 => generation,
                _ => 0,
            };
            let node = if k % 2 == 0 { "node-1" } else { "node-2" };
            let _ = writeln!(
                text,
                "  - {{addresses: [{}], nodeName: {node}}}",
                endpoint(i, k, generation)
            );
        }
        text.push_str("---\n");
    }
    text
}

fn write_manifests(dir: &Path, services: u32) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).expect("manifest directory");
    for first in (0..services).step_by(PER_FILE as usize) {
        let count = PER_FILE.min(services - first);
        fs::write(
            dir.join(format!("f{first:06}.yaml")),
            file_text(first, count, None),
        )
        .expect("write manifests");
    }
}

fn load(services: u32) -> Datapath {
    load_with_ct(services, 65_536)
}

fn load_with_ct(services: u32, ct_entries: u32) -> Datapath {
    Datapath::load(&LoadOptions {
        capacities: Capacities {
            ct_entries,
            services: (services * 2).next_power_of_two(),
            backends: services * ENDPOINTS + 1_024,
            maglev_slots: services
                * svc_common::maglev::table_size(
                    ENDPOINTS,
                    svc_common::maglev::DEFAULT_SLOTS_PER_BACKEND,
                )
                + 4_096,
            ..Capacities::default()
        },
        ..LoadOptions::default()
    })
    .expect("the datapath must load")
}

struct Agent {
    watch: Watch,
    applier: Applier,
    translator: Translator,
}

impl Agent {
    fn new(dir: &Path) -> Self {
        Self {
            watch: Watch::new(dir),
            applier: Applier::new(),
            translator: Translator::new(
                NodeInfo {
                    name: "node-1".to_owned(),
                    addrs: vec![Ipv4Addr::new(192, 168, 1, 10)],
                    zone: None,
                    pod_cidrs: Vec::new(),
                },
                Settings::default(),
            ),
        }
    }

    /// One poll of the agent's loop; panics unless it applied a change
    /// without errors.
    fn sync(&mut self, datapath: &mut Datapath) {
        assert!(
            self.watch.poll().expect("directory readable"),
            "a change is seen"
        );
        assert_eq!(self.watch.problems().count(), 0);
        self.translator.update(self.watch.take_dirty(), &self.watch);
        let report = self
            .applier
            .apply(datapath.maps_mut(), self.translator.desired());
        assert!(
            report.errors.is_empty(),
            "{:?}",
            &report.errors[..report.errors.len().min(3)]
        );
    }
}

/// Services of the full-table case; 10 endpoints each, so a tenth of them
/// losing every endpoint removes 1,000 backends.
const FULL_SERVICES: u32 = 1_000;

/// Fills connection tracking with real flows: SYNs from pod clients to
/// every service, through the pod program. Returns how many ran.
fn fill_connection_tracking(datapath: &Datapath, flows: u32) -> u32 {
    let program = datapath
        .tc_program(FROM_POD_PROGRAM)
        .expect("the pod program");
    let mut out = vec![0u8; 256];
    for flow in 0..flows {
        let [_, high, mid, low] = flow.to_be_bytes();
        let port = 1_024 + (u16::from(mid) << 8 | u16::from(low)) % 60_000;
        let client = Ipv4Addr::new(10, 200, high, mid);
        let packet =
            tests::packet::tcp4_syn((client, port), (cluster_ip(flow % FULL_SERVICES), 80));
        program
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
    }
    flows
}

/// With connection tracking full: removing 1,000 backends (the agent's
/// time), the sweep that follows (on another thread), and an edit applied
/// while it runs.
fn full_table(dir: &Path, samples: &mut Vec<(String, u32, f64, &str)>) {
    write_manifests(dir, FULL_SERVICES);
    let mut datapath = load_with_ct(FULL_SERVICES, DEFAULT_CT_ENTRIES);
    let mut agent = Agent::new(dir);
    agent.sync(&mut datapath);
    let started = Instant::now();
    let flows = fill_connection_tracking(&datapath, DEFAULT_CT_ENTRIES / 2);
    eprintln!(
        "{flows} flows through the pod program in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // A tenth of the services lose every endpoint: 1,000 backends go.
    for first in (0..FULL_SERVICES / 10).step_by(PER_FILE as usize) {
        let mut text = String::new();
        for i in first..first + PER_FILE.min(FULL_SERVICES / 10 - first) {
            let _ = write!(
                text,
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\n\
                 spec:\n  clusterIP: {}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n",
                cluster_ip(i)
            );
        }
        fs::write(dir.join(format!("f{first:06}.yaml")), text).expect("edit");
    }
    let started = Instant::now();
    agent.sync(&mut datapath);
    let removal = started.elapsed().as_secs_f64() * 1e3;
    let (_, backends) = agent.applier.sizes();
    eprintln!(
        "1,000 backends removed with connection tracking full in {removal:.1} ms ({backends} left)"
    );
    samples.push((
        "remove_1000_backends_full_ct".to_owned(),
        FULL_SERVICES,
        removal,
        "ms",
    ));

    // The sweep, on a thread of its own as in the agent, and an edit
    // applied meanwhile.
    let now = datapath.now_ns().expect("the datapath's clock");
    let config = *datapath.config();
    let pending = agent.applier.begin_sweep(datapath.maps_mut(), now, &config);
    let maps = datapath
        .maps()
        .sweep_maps()
        .try_clone()
        .expect("sweep handles");
    let plan = pending.plan.clone();
    let sweep = std::thread::spawn(move || conntrack::sweep(&maps, &plan).expect("sweep"));
    let service = FULL_SERVICES - 1;
    let first = service - service % PER_FILE;
    fs::write(
        dir.join(format!("f{first:06}.yaml")),
        file_text(first, PER_FILE, Some((service, 1))),
    )
    .expect("edit a slice");
    let started = Instant::now();
    agent.sync(&mut datapath);
    let during = started.elapsed().as_secs_f64() * 1e3;
    let swept = !sweep.is_finished();
    let report = sweep.join().expect("the sweep thread");
    agent
        .applier
        .finish_sweep(datapath.maps_mut(), &pending, &report);
    eprintln!(
        "sweep of {} entries ({} live flows) in {:.3} s; an edit {} it took {during:.1} ms",
        report.entries,
        report.flows,
        report.elapsed.as_secs_f64(),
        if swept { "during" } else { "after" },
    );
    samples.push((
        "sweep_full_ct".to_owned(),
        FULL_SERVICES,
        report.elapsed.as_secs_f64(),
        "s",
    ));
    samples.push((
        "change_during_sweep".to_owned(),
        FULL_SERVICES,
        during,
        "ms",
    ));
}

/// A `/proc/self/status` memory field (`VmRSS`, `RssAnon`, ...), MiB.
fn status_mib(field: &str) -> f64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let prefix = format!("{field}:");
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn main() {
    tests::require_root();
    let mut out = String::from("target/bench/control-plane.json");
    let mut counts = COLD_COUNTS.to_vec();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().expect("--out takes a path"),
            // Up to the 10,000 services of the change and memory cases.
            "--quick" => counts.retain(|&count| count <= CHANGE_SERVICES),
            other => panic!("unknown argument {other}; use --out PATH [--quick]"),
        }
    }
    let dir = std::env::temp_dir().join(format!("svc-bench-cp-{}", std::process::id()));
    let mut samples: Vec<(String, u32, f64, &str)> = Vec::new();

    for services in counts {
        write_manifests(&dir, services);
        let mut datapath = load(services);
        let mut agent = Agent::new(&dir);
        let started = Instant::now();
        agent.sync(&mut datapath);
        let cold = started.elapsed().as_secs_f64();
        eprintln!("{services} services programmed from cold in {cold:.3} s");
        samples.push(("cold_program".to_owned(), services, cold, "s"));

        if services == CHANGE_SERVICES {
            // Resident memory, and the part that is the agent's own heap:
            // the rest is mostly the Maglev array's pages, mapped to write
            // tables (kernel memory that exists whether mapped or not).
            samples.push(("rss".to_owned(), services, status_mib("VmRSS"), "MiB"));
            samples.push((
                "rss_anon".to_owned(),
                services,
                status_mib("RssAnon"),
                "MiB",
            ));
            let mut latencies = Vec::with_capacity(CHANGES);
            for change in 0..CHANGES {
                #[expect(clippy::cast_possible_truncation, reason = "CHANGES is small")]
                let generation = change as u32 + 1;
                let service = (generation * 37) % services;
                let first = service - service % PER_FILE;
                fs::write(
                    dir.join(format!("f{first:06}.yaml")),
                    file_text(first, PER_FILE, Some((service, generation))),
                )
                .expect("edit a slice");
                let started = Instant::now();
                agent.sync(&mut datapath);
                latencies.push(started.elapsed());
            }
            latencies.sort_unstable();
            for (case, p) in [("change_p50", 0.5), ("change_p99", 0.99)] {
                let ms = percentile(&latencies, p).as_secs_f64() * 1e3;
                eprintln!("{case}: {ms:.1} ms with {services} services");
                samples.push((case.to_owned(), services, ms, "ms"));
            }
        }
    }
    full_table(&dir, &mut samples);
    let _ = fs::remove_dir_all(&dir);
    let figures: Vec<Figure> = samples
        .into_iter()
        .map(|(case, services, value, unit)| {
            Figure::ours("control-plane", services, case, value, unit)
        })
        .collect();
    figures::write(&PathBuf::from(out), &figures);
}
