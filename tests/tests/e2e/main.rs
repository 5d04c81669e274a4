//! End to end against an upstream control plane (etcd, kube-apiserver,
//! kube-controller-manager; see `tests::k8s`): the real EndpointSlice
//! controllers write the slices, the `svc-agent` binary on each node of the
//! two-node namespace cluster reads them as a least-privileged service
//! account, and traffic between the namespaces shows the result. Scenarios
//! after the sig-network Service e2e tests, each a test of its own over one
//! shared control plane (starting it is the slow part): a scenario makes
//! the services and pods it needs beyond the shared `client`, `web-1` and
//! `web-2`, and removes its services, so any one runs alone
//! (`cargo xtask e2e -- <name>`) or after any other.

mod harness;
mod policies;
mod resilience;
mod services;

use harness::E2e;

/// The scenarios, in the order they run: the thousand services last, as
/// they stay (deleting 5,000 pods would take longer than the rest).
const SCENARIOS: &[(&str, tests::scenarios::Scenario<E2e>)] = &[
    (
        "selector_service_reaches_the_selected_pods",
        services::selector_service_reaches_the_selected_pods,
    ),
    (
        "scaling_and_readiness_are_followed",
        services::scaling_and_readiness_are_followed,
    ),
    (
        "connections_outlive_deleted_pods",
        services::connections_outlive_deleted_pods,
    ),
    (
        "cluster_ips_refuse_unknown_ports_and_the_service_range_drops_the_rest",
        services::cluster_ips_refuse_unknown_ports_and_the_service_range_drops_the_rest,
    ),
    (
        "type_changes_install_and_remove_frontends",
        services::type_changes_install_and_remove_frontends,
    ),
    (
        "affinity_and_traffic_policies",
        policies::affinity_and_traffic_policies,
    ),
    (
        "traffic_distribution_keeps_traffic_in_the_zone",
        policies::traffic_distribution_keeps_traffic_in_the_zone,
    ),
    (
        "health_check_node_ports_follow_local_endpoints",
        policies::health_check_node_ports_follow_local_endpoints,
    ),
    (
        "node_health_answers_as_kube_proxy_and_drains_a_node_being_deleted",
        policies::node_health_answers_as_kube_proxy_and_drains_a_node_being_deleted,
    ),
    (
        "load_balancer_source_ranges_admit_only_their_sources",
        policies::load_balancer_source_ranges_admit_only_their_sources,
    ),
    (
        "local_load_balancer_ips_serve_in_cluster_clients_from_every_endpoint",
        policies::local_load_balancer_ips_serve_in_cluster_clients_from_every_endpoint,
    ),
    (
        "selectorless_services_with_slices_and_mirrored_endpoints",
        services::selectorless_services_with_slices_and_mirrored_endpoints,
    ),
    (
        "no_endpoints_is_refused_and_deletion_removes_everything",
        services::no_endpoints_is_refused_and_deletion_removes_everything,
    ),
    (
        "agent_and_api_server_restarts",
        resilience::agent_and_api_server_restarts,
    ),
    ("a_thousand_services", resilience::a_thousand_services),
];

fn main() -> std::process::ExitCode {
    tests::scenarios::run(SCENARIOS, E2e::start)
}
