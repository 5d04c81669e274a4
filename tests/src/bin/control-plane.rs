//! `cargo xtask control-plane`: the e2e tests' control plane (etcd,
//! kube-apiserver, kube-controller-manager on loopback) kept running until
//! Ctrl-C, with a Node object for this machine, so the agent can be run
//! against a real API server by hand (`cargo xtask run` picks it up through
//! the printed `KUBECONFIG`).

use std::process::Command;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tests::k8s::{ControlPlane, apply};

/// This machine's source address towards the outside, as `ip route get`
/// reports it.
fn node_addr() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "route", "get", "192.0.2.1"])
        .output()
        .expect("running ip route get");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|word| *word != "src")
        .nth(1)
        .unwrap_or_else(|| panic!("no source address in `ip route get`: {text}"))
        .to_owned()
}

fn main() {
    let plane = ControlPlane::start();
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("the host name")
        .trim()
        .to_owned();
    let addr = node_addr();
    let nodes: Api<Node> = Api::all(plane.client());
    plane.block_on(async {
        apply(
            &nodes,
            &name,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
        )
        .await;
        nodes
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"addresses": [
                    {"type": "InternalIP", "address": addr}
                ]}})),
            )
            .await
            .expect("the node's address");
    });
    let kubeconfig = plane.agent_kubeconfig();
    println!(
        "control plane up: Node {name} ({addr}).\n\
         As the agent's service account:  export KUBECONFIG={}\n\
         As an administrator:             export KUBECONFIG={}\n\
         Ctrl-C stops it.",
        kubeconfig.display(),
        plane.dir().join("admin.kubeconfig").display()
    );
    plane
        .block_on(tokio::signal::ctrl_c())
        .expect("waiting for Ctrl-C");
}
