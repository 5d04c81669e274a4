//! A real cluster (see `tests::cluster`): two nodes with containerd, runc
//! and kubelet in network namespaces, pods created by the kubelet on
//! Debian's ptp CNI plugin, svc-proxy deployed as its DaemonSet from its
//! own image with svc-cni chained, no kube-proxy. Scenarios run in order
//! over one shared cluster (starting it is the slow part); the uninstall
//! comes last. `cargo xtask test` builds the binaries and images first.

mod harness;
mod load;
mod rollout;
mod scenarios;

use harness::Harness;

const SCENARIOS: &[(&str, tests::scenarios::Scenario<Harness>)] = &[
    (
        "the_agent_runs_from_its_image_on_every_node",
        scenarios::the_agent_runs_from_its_image_on_every_node,
    ),
    (
        "services_reach_pods_by_address_and_name",
        scenarios::services_reach_pods_by_address_and_name,
    ),
    (
        "each_node_s_socket_hooks_act_for_that_node_only",
        scenarios::each_node_s_socket_hooks_act_for_that_node_only,
    ),
    (
        "new_pods_reach_a_cluster_ip_on_their_first_attempt",
        scenarios::new_pods_reach_a_cluster_ip_on_their_first_attempt,
    ),
    (
        "backend_rollout_keeps_old_connections_and_sends_new_ones_to_ready_pods",
        rollout::backend_rollout_keeps_old_connections_and_sends_new_ones_to_ready_pods,
    ),
    (
        "operations_under_load_lose_nothing",
        scenarios::operations_under_load_lose_nothing,
    ),
    (
        "the_installed_plugin_answers_bad_input_with_cni_errors",
        scenarios::the_installed_plugin_answers_bad_input_with_cni_errors,
    ),
    (
        "uninstall_leaves_nothing_behind",
        scenarios::uninstall_leaves_nothing_behind,
    ),
];

fn main() -> std::process::ExitCode {
    tests::scenarios::run(SCENARIOS, Harness::start)
}
