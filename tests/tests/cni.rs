//! `svc-cni`, the real binary, run as a container runtime runs it (config
//! on stdin, `CNI_*` variables, in the node's network namespace) against
//! a datapath pinned the way the agent pins it: a pod it attaches reaches
//! a ClusterIP on its first connection without any agent having looked at
//! its veth, the agent takes its links over, and each documented error
//! comes with its code.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    thread,
};

use aya::programs::{SchedClassifier, TcAttachType};
use serde_json::{Value, json};
use svc_agent::{
    cni::code,
    datapath::{Frontend, ServicePolicy},
};
use tests::{
    built_binary,
    netns::NetNs,
    topology::{Cluster, Options},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);

/// What the plugin printed and whether it exited zero.
struct Outcome {
    ok: bool,
    json: Option<Value>,
}

impl Outcome {
    fn error_code(&self) -> u64 {
        assert!(!self.ok, "expected a CNI error, got {:?}", self.json);
        let json = self.json.as_ref().expect("an error object on stdout");
        json["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code in {json}"))
    }

    fn error_msg(&self) -> String {
        let json = self.json.as_ref().expect("an error object on stdout");
        json["msg"].as_str().unwrap_or_default().to_owned()
    }
}

/// Runs `f` on this thread after entering network namespace `name`.
fn in_netns<T>(name: &str, f: impl FnOnce() -> T) -> T {
    tests::netns::enter(&format!("/run/netns/{name}"));
    f()
}

/// Runs `svc-cni` in `node`'s network namespace.
fn plugin(node: &NetNs, command: &str, stdin: &[u8]) -> Outcome {
    plugin_in(node.name(), command, stdin)
}

/// Runs `svc-cni` in network namespace `netns`, from a thread of its own.
fn plugin_in(netns: &str, command: &str, stdin: &[u8]) -> Outcome {
    let binary = built_binary("svc-cni");
    thread::scope(|scope| {
        scope
            .spawn(|| {
                in_netns(netns, || {
                    let mut child = Command::new(&binary)
                        .env_clear()
                        .env("CNI_COMMAND", command)
                        .env("CNI_CONTAINERID", "0123456789abcdef")
                        .env("CNI_NETNS", "/var/run/netns/pod")
                        .env("CNI_IFNAME", "eth0")
                        .env("CNI_PATH", "/opt/cni/bin")
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("running svc-cni");
                    child
                        .stdin
                        .take()
                        .expect("stdin")
                        .write_all(stdin)
                        .expect("writing the config");
                    let out = child.wait_with_output().expect("svc-cni ends");
                    let text = String::from_utf8_lossy(&out.stdout);
                    let json = (!text.trim().is_empty()).then(|| {
                        serde_json::from_str(&text)
                            .unwrap_or_else(|err| panic!("stdout {text:?}: {err}"))
                    });
                    Outcome {
                        ok: out.status.success(),
                        json,
                    }
                })
            })
            .join()
            .expect("the plugin's thread")
    })
}

/// The plugin's config as a runtime hands it over, after a ptp plugin
/// that made `host_iface`.
fn config(pin_dir: &Path, host_iface: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "cniVersion": "1.0.0",
        "name": "podnet",
        "type": "svc-cni",
        "pinDir": pin_dir,
        "prevResult": prev_result(host_iface),
    }))
    .expect("json")
}

fn prev_result(host_iface: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": host_iface, "mac": "02:00:00:00:00:01"},
            {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/var/run/netns/pod"}
        ],
        "ips": [{"address": "10.244.1.20/32", "interface": 1}],
        "dns": {}
    })
}

/// Runs `f` in network namespace `netns`, on a thread of its own.
fn on_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| scope.spawn(|| in_netns(netns, f)).join())
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// How many tcx programs run at ingress of `iface` in `netns`; as many
/// must run at its egress (the pod programs go in pairs).
fn tcx_programs(netns: &str, iface: &str) -> usize {
    on_netns(netns, || {
        let count = |direction| {
            SchedClassifier::query_tcx(iface, direction)
                .unwrap_or_else(|err| panic!("listing {iface}'s tcx programs: {err}"))
                .1
                .len()
        };
        let ingress = count(TcAttachType::Ingress);
        assert_eq!(
            count(TcAttachType::Egress),
            ingress,
            "{iface}: as many programs at egress as at ingress"
        );
        ingress
    })
}

#[test]
fn a_pod_the_plugin_attached_reaches_a_cluster_ip_on_its_first_connection() {
    let mut cluster = Cluster::with_backends(
        Options {
            pinned: true,
            ..Options::default()
        },
        &[8080],
    );
    cluster.apply(
        &[Frontend::tcp(CLUSTER_IP, 80)],
        &ServicePolicy::default(),
        &[("a", 8080), ("b", 8080), ("c", 8080)],
    );
    let pin_dir = cluster.nodes[0].pin_dir().expect("pinned").to_owned();
    cluster.nodes[0].add_pod_unattached("fresh", 20);
    let node = cluster.nodes[0].ns.name().to_owned();
    let node = node.as_str();
    let iface = cluster.nodes[0].pod("fresh").host_iface.clone();
    let conf = config(&pin_dir, &iface);

    // No agent has published its pod program yet: the runtime is told to
    // try again later, and STATUS says the plugin cannot serve.
    let early = plugin_in(node, "ADD", &conf);
    assert_eq!(early.error_code(), u64::from(code::TRY_AGAIN_LATER));
    assert!(
        early
            .error_msg()
            .contains("svc-proxy's datapath is not loaded on this node"),
        "{}",
        early.error_msg()
    );
    assert_eq!(
        plugin_in(node, "STATUS", &conf).error_code(),
        u64::from(code::NOT_AVAILABLE)
    );
    assert_eq!(tcx_programs(node, &iface), 0, "nothing attached");

    cluster.nodes[0]
        .datapath_mut()
        .publish_pod_program()
        .expect("publishing the pod program");
    assert!(plugin_in(node, "STATUS", &conf).ok, "loaded now");
    let added = plugin_in(node, "ADD", &conf);
    assert!(added.ok, "ADD: {:?}", added.json);
    assert_eq!(
        added.json.expect("a result"),
        prev_result(&iface),
        "prevResult passed on unchanged"
    );
    assert_eq!(tcx_programs(node, &iface), 1);
    assert!(plugin_in(node, "CHECK", &conf).ok, "CHECK after ADD");

    // The very first connection of the pod is translated.
    let fresh = cluster.nodes[0].pod("fresh");
    let answer = fresh
        .ask(SocketAddrV4::new(CLUSTER_IP, 80))
        .expect("the pod's first connection to the ClusterIP");
    assert_eq!(answer.port, 8080);
    assert_eq!(answer.peer_ip(), fresh.addr);

    // A repeated ADD keeps the one link.
    assert!(plugin_in(node, "ADD", &conf).ok, "a repeated ADD");
    assert_eq!(tcx_programs(node, &iface), 1, "never two links");

    // The agent restarts (as after an upgrade): it takes the plugin's link
    // over in place, whatever its interface patterns say.
    let index = on_netns(node, || {
        svc_agent::datapath::ifaces::index_of(&iface).expect("index")
    });
    cluster.nodes[0].stop_agent();
    cluster.nodes[0].start_agent();
    let datapath = cluster.nodes[0].datapath_mut();
    assert!(
        on_netns(node, || datapath.has_pod_link_pin(index, &iface)),
        "the agent sees the plugin's pod link"
    );
    on_netns(node, || {
        datapath.attach_pod(&iface).expect("taking the link over");
    });
    datapath
        .publish_pod_program()
        .expect("the new run publishes its program");
    assert_eq!(tcx_programs(node, &iface), 1, "taken over, not doubled");
    assert!(
        plugin_in(node, "CHECK", &conf).ok,
        "CHECK after the takeover"
    );
    let fresh = cluster.nodes[0].pod("fresh");
    fresh
        .ask(SocketAddrV4::new(CLUSTER_IP, 80))
        .expect("translated after the takeover");

    // DEL detaches and forgets; again is fine; CHECK now fails.
    assert!(plugin_in(node, "DEL", &conf).ok, "DEL");
    assert_eq!(tcx_programs(node, &iface), 0, "detached");
    assert!(plugin_in(node, "DEL", &conf).ok, "a repeated DEL");
    assert_eq!(
        plugin_in(node, "CHECK", &conf).error_code(),
        u64::from(code::NOT_ATTACHED)
    );
}

#[test]
fn the_agent_and_the_plugin_attaching_at_once_make_one_link() {
    let mut cluster = Cluster::new(Options {
        pinned: true,
        ..Options::default()
    });
    let pin_dir = cluster.nodes[0].pin_dir().expect("pinned").to_owned();
    cluster.nodes[0]
        .datapath_mut()
        .publish_pod_program()
        .expect("publishing the pod program");
    for host in 30..38 {
        cluster.nodes[0].add_pod_unattached(&format!("race{host}"), host);
        let iface = format!("p{host}");
        let conf = config(&pin_dir, &iface);
        let ns_name = cluster.nodes[0].ns.name().to_owned();
        let datapath = cluster.nodes[0].datapath_mut();
        thread::scope(|scope| {
            let plugin_run = scope.spawn(|| plugin_in(&ns_name, "ADD", &conf));
            let agent_run = scope.spawn(|| {
                in_netns(&ns_name, || {
                    datapath.attach_pod(&iface).expect("the agent attaches");
                });
            });
            let outcome = plugin_run.join().expect("the plugin thread");
            agent_run.join().expect("the agent thread");
            assert!(
                outcome.ok,
                "ADD during the agent's attach: {:?}",
                outcome.json
            );
        });
        assert_eq!(
            tcx_programs(&ns_name, &iface),
            1,
            "{iface}: one link whoever came first"
        );
    }
    // GC: the pin of a veth that went is removed, the others stay.
    let ns_name = cluster.nodes[0].ns.name().to_owned();
    cluster.nodes[0].ns.ip(&["link", "del", "p30"]);
    let pins = |iface: &str| {
        std::fs::read_dir(pin_dir.join("links"))
            .expect("the link pins")
            .flatten()
            .filter(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                ["tc-ingress-", "tc-egress-"]
                    .iter()
                    .any(|prefix| name.starts_with(&format!("{prefix}{iface}@")))
            })
            .count()
    };
    assert_eq!(pins("p30"), 2, "the gone veth's pins are still there");
    let gc = plugin_in(&ns_name, "GC", &config(&pin_dir, "p31"));
    assert!(gc.ok, "GC: {:?}", gc.json);
    assert_eq!(pins("p30"), 0, "GC removed the gone veth's pins");
    assert_eq!(pins("p31"), 2, "GC kept a present veth's pins");
}

#[test]
fn malformed_input_gets_the_documented_errors() {
    let node = NetNs::new("cni-bad");
    for (stdin, expected) in [
        (&b"{not json"[..], code::DECODE),
        (br#"{"name":"x"}"#, code::DECODE),
        (
            br#"{"cniVersion":"0.3.1","name":"x","type":"svc-cni"}"#,
            code::INCOMPATIBLE_VERSION,
        ),
        (
            br#"{"cniVersion":"1.0.0","name":"x","type":"svc-cni"}"#,
            code::INVALID_CONFIG,
        ),
        (
            br#"{"cniVersion":"1.0.0","name":"x","type":"svc-cni","prevResult":{"interfaces":[{"name":"svc-nosuch0"}]}}"#,
            code::INVALID_CONFIG,
        ),
    ] {
        let outcome = plugin(&node, "ADD", stdin);
        assert_eq!(
            outcome.error_code(),
            u64::from(expected),
            "{}: {}",
            String::from_utf8_lossy(stdin),
            outcome.error_msg()
        );
    }
    let missing = plugin(
        &node,
        "ADD",
        br#"{"cniVersion":"1.0.0","name":"x","type":"svc-cni"}"#,
    );
    assert!(
        missing.error_msg().contains("prevResult"),
        "{}",
        missing.error_msg()
    );
    let version = plugin(&node, "VERSION", b"{}");
    assert!(version.ok);
    assert_eq!(
        version.json.expect("versions")["supportedVersions"],
        json!(["0.4.0", "1.0.0", "1.1.0"])
    );
}
