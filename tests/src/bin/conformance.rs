//! `cargo xtask conformance`: Kubernetes' e2e suite (`[sig-network]` by
//! default) on the two-node test cluster, once with svc-proxy and once with
//! upstream kube-proxy (nftables) in its place, each on a fresh cluster;
//! JUnit reports under `target/conformance/<proxy>/`, and
//! `docs/conformance.md` written from both.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tests::{
    cluster::{KubeCluster, deploy, kube_proxy::KubeProxy},
    conformance::{
        self, Suite,
        doc::{self, Proxy},
    },
};

/// The wide focus of the issue: every `[sig-network]` spec.
const WIDE_FOCUS: &str = r"\[sig-network\]";

/// Ctrl-C reaches ginkgo too, which ends its specs and writes its report;
/// this process then stops after that run and tears its cluster down.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupted(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() {
    let mut proxies = Vec::new();
    let mut focus = WIDE_FOCUS.to_owned();
    let mut procs = 4;
    let mut timeout_minutes = 150;
    let root = tests::workspace_root();
    let mut out = root.join("target/conformance");
    let mut doc_path = Some(root.join("docs/conformance.md"));
    let mut report_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--proxy" => proxies.push(Proxy::parse(&value())),
            "--focus" => focus = value(),
            "--procs" => procs = value().parse().expect("--procs takes a number"),
            "--timeout-minutes" => {
                timeout_minutes = value().parse().expect("--timeout-minutes takes a number");
            }
            "--out" => out = PathBuf::from(value()),
            "--no-doc" => doc_path = None,
            "--doc" => doc_path = Some(PathBuf::from(value())),
            // Only (re)write the document from the reports under --out.
            "--report-only" => report_only = true,
            other => panic!("unknown argument {other}"),
        }
    }
    if proxies.is_empty() && !report_only {
        proxies = vec![Proxy::KubeProxy, Proxy::SvcProxy];
    }
    let handler = interrupted as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    for proxy in proxies {
        if INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("interrupted: {} not run", proxy.name());
            continue;
        }
        let cluster = KubeCluster::start(2);
        deploy::dns(&cluster);
        // Held for the run; dropped (stopped) with the cluster.
        let _kube_proxy = match proxy {
            Proxy::SvcProxy => {
                deploy::agent(&cluster, env!("CARGO_PKG_VERSION"));
                None
            }
            Proxy::KubeProxy => Some(KubeProxy::start(&cluster, "nftables")),
        };
        let report = conformance::run(
            &cluster,
            &Suite {
                focus: &focus,
                skip: doc::WIDE_SKIPPED,
                procs,
                timeout: Duration::from_mins(timeout_minutes),
                report_dir: out.join(proxy.name()),
            },
        );
        eprintln!("{}:\n{}", proxy.name(), report.summary());
    }
    if let Some(path) =
        doc_path.filter(|_| focus == WIDE_FOCUS && !INTERRUPTED.load(Ordering::SeqCst))
    {
        match doc::write(&out, &focus, procs, &path) {
            Ok(()) => eprintln!("wrote {}", path.display()),
            Err(err) => eprintln!("{} not written: {err}", path.display()),
        }
    }
}
