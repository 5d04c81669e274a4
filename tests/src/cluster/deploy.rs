//! What the cluster runs on top of its nodes: the `kube-dns` Service
//! (selector-less, its slice naming CoreDNS on the bridge), and svc-proxy
//! as `deploy/rbac.yaml` and `deploy/daemonset.yaml` ship it, with an
//! overlay for this machine (see [`daemonset`]).

use std::time::Duration;

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Service},
    discovery::v1::EndpointSlice,
};
use kube::Api;
use serde_json::{Value, json};

use super::{DNS_SERVICE_IP, KubeCluster, LAN_PREFIX};
use crate::{eventually, k8s::apply, k8s::deploy_documents};

/// The agent's image as the cluster imported it.
pub const AGENT_IMAGE: &str = "ghcr.io/svc-proxy/svc-agent:0.1.0";
/// Where each node's agent pins its datapath (`<dir>/<node name>`): the
/// nodes share one bpffs.
pub const PIN_ROOT: &str = "/sys/fs/bpf/svc-cluster";

/// The `kube-dns` Service at [`DNS_SERVICE_IP`] and its slice: CoreDNS on
/// the bridge, reached through svc-proxy like any other backend.
pub fn dns(cluster: &KubeCluster) {
    let client = cluster.plane.client();
    cluster.plane.block_on(async {
        let services: Api<Service> = Api::namespaced(client.clone(), "kube-system");
        apply(
            &services,
            "kube-dns",
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "kube-dns", "namespace": "kube-system",
                             "labels": {"k8s-app": "kube-dns"}},
                "spec": {"clusterIP": DNS_SERVICE_IP, "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"}
                ]}
            }),
        )
        .await;
        let slices: Api<EndpointSlice> = Api::namespaced(client, "kube-system");
        apply(
            &slices,
            "kube-dns-coredns",
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "kube-dns-coredns", "namespace": "kube-system",
                             "labels": {"kubernetes.io/service-name": "kube-dns",
                                        "endpointslice.kubernetes.io/managed-by": "svc-cluster"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [format!("{LAN_PREFIX}.1")],
                               "conditions": {"ready": true}}],
                "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                          {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
            }),
        )
        .await;
    });
}

/// `deploy/daemonset.yaml` made fit for this machine, whose nodes share
/// one file system and one bpffs: each node's CNI directories, agent state
/// and pins are a subdirectory named after the node (`subPathExpr`,
/// `$(NODE_NAME)`); the uplink is `eth0`; the image is the one imported
/// (never pulled); `tag` replaces the image's tag.
#[must_use]
pub fn daemonset(tag: &str) -> Value {
    let mut documents = deploy_documents("daemonset.yaml");
    assert_eq!(documents.len(), 1, "deploy/daemonset.yaml: one DaemonSet");
    let mut ds = documents.remove(0);
    let image = AGENT_IMAGE
        .rsplit_once(':')
        .map_or(AGENT_IMAGE, |(base, _)| base);
    let spec = &mut ds["spec"]["template"]["spec"];
    let node_name = json!({"name": "NODE_NAME",
                           "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}});
    let pin_dir = format!("--pin-dir={PIN_ROOT}/$(NODE_NAME)");
    for (list, index) in [("initContainers", 0), ("containers", 0)] {
        let container = &mut spec[list][index];
        container["image"] = json!(format!("{image}:{tag}"));
        container["imagePullPolicy"] = json!("Never");
        let args: Vec<Value> = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter(|arg| {
                let arg = arg.as_str().unwrap_or_default();
                !arg.starts_with("--uplink") && !arg.starts_with("--pod-iface")
            })
            .cloned()
            .chain([json!(pin_dir)])
            .collect();
        container["args"] = json!(args);
        if list == "initContainers" {
            container["env"] = json!([node_name.clone()]);
        } else {
            let args = container["args"].as_array_mut().expect("args");
            args.extend([json!("--uplink=eth0"), json!("--pod-iface=veth*")]);
        }
        if let Some(mounts) = container["volumeMounts"].as_array_mut() {
            for mount in mounts {
                let sub = match mount["name"].as_str() {
                    Some("cni-bin") => "cni/bin",
                    Some("cni-conf") => "cni/net.d",
                    Some("state") => "agent",
                    _ => continue,
                };
                mount["subPathExpr"] = json!(format!("$(NODE_NAME)/{sub}"));
            }
        }
    }
    for volume in spec["volumes"].as_array_mut().expect("volumes") {
        let root = match volume["name"].as_str() {
            Some("cni-bin" | "cni-conf") => super::node::STATE_ROOT,
            Some("state") => super::node::RUN_ROOT,
            _ => continue,
        };
        volume["hostPath"] = json!({"path": root, "type": "Directory"});
    }
    ds
}

/// Deploys svc-proxy: the RBAC of `deploy/rbac.yaml`, the API server's
/// address for the agent's first start (the `svc-agent-apiserver`
/// ConfigMap the DaemonSet reads), and the DaemonSet; waits until every
/// node's agent is Ready.
pub fn agent(cluster: &KubeCluster, tag: &str) {
    // Applies the RBAC (and checks the DaemonSet in a dry run).
    let _ = cluster.plane.agent_kubeconfig();
    let client = cluster.plane.client();
    let api_addr = cluster.plane.api_addr();
    cluster.plane.block_on(async {
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
        apply(
            &maps,
            "svc-agent-apiserver",
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "svc-agent-apiserver", "namespace": "kube-system"},
                "data": {"host": api_addr.ip().to_string(), "port": api_addr.port().to_string()}
            }),
        )
        .await;
        let daemonsets: Api<DaemonSet> = Api::namespaced(client, "kube-system");
        apply(&daemonsets, "svc-agent", daemonset(tag)).await;
    });
    wait_agents_ready(cluster, Duration::from_mins(2));
}

/// Waits until the DaemonSet has a Ready, up-to-date agent on every node.
pub fn wait_agents_ready(cluster: &KubeCluster, timeout: Duration) {
    let api: Api<DaemonSet> = Api::namespaced(cluster.plane.client(), "kube-system");
    let nodes = i32::try_from(cluster.nodes.len()).expect("few nodes");
    let ready = eventually(timeout, || {
        cluster.plane.block_on(async {
            api.get_opt("svc-agent")
                .await
                .ok()
                .flatten()
                .is_some_and(|ds| {
                    let generation = ds.metadata.generation;
                    ds.status.is_some_and(|status| {
                        status.observed_generation == generation
                            && status.number_ready == nodes
                            && status.updated_number_scheduled == Some(nodes)
                            && status.number_unavailable.unwrap_or(0) == 0
                    })
                })
        })
    });
    assert!(
        ready,
        "the svc-agent DaemonSet did not become ready on {nodes} nodes in {timeout:?}: {}",
        String::from_utf8_lossy(
            &cluster
                .kubectl(&["-n", "kube-system", "get", "pods", "-o", "wide"])
                .stdout
        )
    );
}
