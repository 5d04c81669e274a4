//! `cargo xtask cluster`: the test cluster (see `tests::cluster`) with
//! svc-proxy deployed, kept running until Ctrl-C; prints the KUBECONFIG.

use tests::cluster::{KubeCluster, deploy};

fn main() {
    let mut nodes = 2;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--nodes" => {
                nodes = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--nodes takes 1 or 2");
            }
            other => panic!("unknown argument {other}"),
        }
    }
    // Ctrl-C during the start is noted, not fatal: the cluster is torn
    // down (its processes, mounts and namespaces) once it is up.
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for signals");
    // Registered at once (unlike `ctrl_c()`, which registers when first
    // polled), so SIGINT no longer kills the process.
    let mut interrupted = signals.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .expect("listening for SIGINT")
    });
    let started = std::time::Instant::now();
    let cluster = KubeCluster::start(nodes);
    eprintln!(
        "cluster: {nodes} node(s) Ready after {:?}",
        started.elapsed()
    );
    deploy::dns(&cluster);
    deploy::agent(&cluster, "0.1.0");
    eprintln!(
        "cluster: svc-proxy Ready on every node after {:?}\n\
         export KUBECONFIG={}\n\
         kubectl lives at {}; logs in {}. Ctrl-C stops it.",
        started.elapsed(),
        cluster.kubeconfig().display(),
        cluster.bin.join("kubectl").display(),
        cluster.plane.dir().join("logs").display()
    );
    signals.block_on(interrupted.recv());
    eprintln!("cluster: stopping");
}
