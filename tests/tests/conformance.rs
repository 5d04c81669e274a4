//! Kubernetes' own conformance specs for Services (`[sig-network]
//! Services ... [Conformance]`, 15 in v1.37.2) against the two-node test
//! cluster with svc-proxy deployed as its DaemonSet and no kube-proxy:
//! every one must pass. The wide run with kube-proxy beside it is `cargo
//! xtask conformance`. `cargo xtask test` builds the suite, the cluster's
//! binaries and the images first.

use std::time::Duration;

use tests::{
    cluster::{KubeCluster, deploy},
    conformance::{self, CI_FOCUS, State, Suite},
};

/// The specs `CI_FOCUS` selects in the pinned release; a run with fewer
/// passing (all skipped, say) fails too.
const CI_SPECS: usize = 15;

#[test]
fn kubernetes_services_conformance_specs_pass_with_svc_proxy() {
    let cluster = KubeCluster::start(2);
    deploy::dns(&cluster);
    deploy::agent(&cluster, env!("CARGO_PKG_VERSION"));
    let report_dir = tests::workspace_root().join("target/conformance/ci");
    let report = conformance::run(
        &cluster,
        &Suite {
            focus: CI_FOCUS,
            skip: &[],
            procs: 2,
            timeout: Duration::from_mins(30),
            report_dir,
        },
    );
    eprintln!("{}", report.summary());
    assert!(
        report.failed().is_empty() && report.count(State::Passed) == CI_SPECS,
        "{} of {CI_SPECS} conformance specs passed; the suite's log: {}",
        report.count(State::Passed),
        report.log.display()
    );
}
