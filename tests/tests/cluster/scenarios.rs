//! The scenarios, each over the shared cluster.

use std::{
    net::SocketAddrV4,
    path::Path,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use tests::{cluster::deploy::PIN_ROOT, eventually, k8s::http_at};

use crate::harness::{AGNHOST, Harness, answered_by, dial};

/// The agent is Ready on both nodes (its `/readyz` is the readiness
/// probe), started without any proxy (the `kubernetes` ClusterIP served
/// nothing; it read the API server's address from the ConfigMap), answers
/// `/metrics`, and `kubectl exec` into it runs `svc-agent services`.
pub fn the_agent_runs_from_its_image_on_every_node(h: &mut Harness) {
    let pods = h.pods("kube-system", "app.kubernetes.io/name=svc-agent");
    assert_eq!(pods.len(), 2, "one agent per node: {pods:?}");
    for (name, ip) in &pods {
        let (status, body) = http_at(SocketAddrV4::new(*ip, 10249), "GET", "/metrics", "")
            .unwrap_or_else(|| panic!("{name}: /metrics does not answer"));
        assert_eq!(status, 200, "{name}: /metrics");
        assert!(body.contains("svc_frontends"), "{name}: {body}");
        let (status, _) = http_at(SocketAddrV4::new(*ip, 10249), "GET", "/readyz", "")
            .unwrap_or_else(|| panic!("{name}: /readyz does not answer"));
        assert_eq!(status, 200, "{name}: /readyz");
        let node = h.field("kube-system", &format!("pod/{name}"), "{.spec.nodeName}");
        let services = h.kubectl(&[
            "-n",
            "kube-system",
            "exec",
            name,
            "-c",
            "agent",
            "--",
            "svc-agent",
            "services",
            "--pin-dir",
            &format!("{PIN_ROOT}/{node}"),
        ]);
        for frontend in ["default/kubernetes:https", "kube-system/kube-dns:dns"] {
            assert!(services.contains(frontend), "{name}: {services}");
        }
    }
}

const WEB: &str = r"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 4
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule,
         labelSelector: {matchLabels: {app: web}}}
      containers:
      - name: web
        image: AGNHOST
        imagePullPolicy: Never
        args: [netexec, --http-port=8080, --udp-port=8081]
        readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-headless}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 8080}]
";

/// A client pod on each node: agnhost `netexec`, whose `/dial` the tests
/// use to connect from inside the cluster.
fn client_pods(node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: client-{node}, labels: {{app: client}}}}\n\
         spec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: {AGNHOST}\n    \
         imagePullPolicy: Never\n    args: [netexec, --http-port=8080]\n    \
         readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}\n"
    )
}

/// Pods on both nodes reach a ClusterIP service by address and by name
/// (CoreDNS through the `kube-dns` ClusterIP), spread over the backends of
/// both nodes; a NodePort answers on both nodes from outside the cluster
/// and from a node; a headless service's name leads to a pod; a
/// selector-less service reaches the address its hand-written
/// EndpointSlice names.
pub fn services_reach_pods_by_address_and_name(h: &mut Harness) {
    h.apply(&WEB.replace("AGNHOST", AGNHOST));
    h.apply(&format!(
        "{}---\n{}",
        client_pods("node1"),
        client_pods("node2")
    ));
    h.wait_ready("default", "app=web");
    h.wait_ready("default", "app=client");
    let web = h.pods("default", "app=web");
    let web_names: Vec<&str> = web.iter().map(|(name, _)| name.as_str()).collect();
    let clients = h.pods("default", "app=client");
    let cluster_ip = h.field("default", "service/web", "{.spec.clusterIP}");

    let mut seen: Vec<String> = Vec::new();
    for (client, client_ip) in &clients {
        for host in [cluster_ip.as_str(), "web", "web.default.svc.cluster.local"] {
            // A name is looked up anew on each dial: DNS goes through the
            // proxy every time.
            for name in answered_by(*client_ip, host, 80, 12) {
                assert!(
                    web_names.contains(&name.as_str()),
                    "{client} → {host}: {name}"
                );
                seen.push(name);
            }
        }
    }
    seen.sort();
    seen.dedup();
    let nodes_seen: Vec<String> = seen
        .iter()
        .map(|name| h.field("default", &format!("pod/{name}"), "{.spec.nodeName}"))
        .collect();
    for node in ["node1", "node2"] {
        assert!(
            nodes_seen.iter().any(|seen| seen == node),
            "backends on {node} answered too: {seen:?} on {nodes_seen:?}"
        );
    }

    // NodePort, on every node, from outside and from a node.
    let node_port: u16 = h
        .field("default", "service/web-np", "{.spec.ports[0].nodePort}")
        .parse()
        .expect("a node port");
    for node in &h.cluster.nodes {
        let addr = SocketAddrV4::new(node.addr.parse().expect("node address"), node_port);
        let from_outside = h
            .cluster
            .external
            .run(|| http_at(addr, "GET", "/hostname", ""))
            .unwrap_or_else(|| panic!("NodePort {addr} from outside"));
        assert!(
            web_names.contains(&from_outside.1.trim()),
            "{addr}: {from_outside:?}"
        );
        let from_node1 = h.cluster.nodes[0]
            .ns
            .run(|| http_at(addr, "GET", "/hostname", ""))
            .unwrap_or_else(|| panic!("NodePort {addr} from node1"));
        assert!(
            web_names.contains(&from_node1.1.trim()),
            "{addr}: {from_node1:?}"
        );
    }

    // Headless: the name resolves to the pods themselves.
    let (_, client_ip) = &clients[0];
    let by_name = dial(*client_ip, "web-headless", 8080).expect("dial web-headless");
    assert!(web_names.contains(&by_name.as_str()), "{by_name}");
    assert_eq!(
        h.field("default", "service/web-headless", "{.spec.clusterIP}"),
        "None"
    );

    // Selector-less: a slice written by hand.
    let (chosen, chosen_ip) = &web[0];
    h.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: manual}}\n\
         spec:\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: manual-1, labels: {{kubernetes.io/service-name: manual}}}}\n\
         addressType: IPv4\nendpoints: [{{addresses: ['{chosen_ip}'], conditions: {{ready: true}}}}]\n\
         ports: [{{name: http, port: 8080, protocol: TCP}}]\n"
    ));
    let answered = eventually(Duration::from_secs(20), || {
        dial(*client_ip, "manual", 80).is_ok_and(|name| name == *chosen)
    });
    assert!(answered, "the selector-less service reaches {chosen}");
    assert_eq!(
        answered_by(*client_ip, "manual", 80, 5),
        std::slice::from_ref(chosen)
    );
}

/// Fifty new pods, spread over both nodes, whose only action is one
/// connection to a ClusterIP (agnhost `connect`, no retry): every one
/// succeeds. Then ten more on a node whose agent is gone (the DaemonSet
/// narrowed to the other node): svc-cni attaches them from the pinned
/// datapath, so they succeed too (without it, nothing would attach their
/// veths: checked by hand, all ten fail).
pub fn new_pods_reach_a_cluster_ip_on_their_first_attempt(h: &mut Harness) {
    let cluster_ip = h.field("default", "service/web", "{.spec.clusterIP}");
    assert!(
        !cluster_ip.is_empty(),
        "the web service (an earlier scenario) is there"
    );
    first_connections(h, "first", 50, &["node1", "node2"], &cluster_ip);

    h.patch_agents(
        r#"{"spec":{"template":{"spec":{"nodeSelector":{"kubernetes.io/hostname":"node1"}}}}}"#,
    );
    assert!(
        eventually(Duration::from_mins(1), || h
            .agent_pods_on("node2")
            .is_empty()),
        "node2's agent went"
    );
    first_connections(h, "agentless", 10, &["node2"], &cluster_ip);
    h.patch_agents(r#"{"spec":{"template":{"spec":{"nodeSelector":null}}}}"#);
    tests::cluster::deploy::wait_agents_ready(&h.cluster, Duration::from_mins(2));
}

/// Creates `count` pods labelled `app=<label>` over `nodes`, each making
/// one connection to `cluster_ip:80`; panics unless all succeed.
fn first_connections(h: &Harness, label: &str, count: usize, nodes: &[&str], cluster_ip: &str) {
    let manifests: Vec<String> = (0..count)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {label}-{i}, labels: {{app: {label}}}}}\n\
                 spec:\n  nodeName: {}\n  restartPolicy: Never\n  containers:\n  - name: c\n    \
                 image: {AGNHOST}\n    imagePullPolicy: Never\n    \
                 args: [connect, '{cluster_ip}:80', --timeout=5s]\n",
                nodes[i % nodes.len()]
            )
        })
        .collect();
    let started = Instant::now();
    h.apply(&manifests.join("---\n"));
    let selector = format!("app={label}");
    let mut phases = Vec::new();
    let done = eventually(Duration::from_mins(4), || {
        let text = h.kubectl(&[
            "get",
            "pods",
            "-l",
            &selector,
            "-o",
            "jsonpath={.items[*].status.phase}",
        ]);
        phases = text.split_whitespace().map(str::to_owned).collect();
        phases.len() == count && phases.iter().all(|p| p == "Succeeded" || p == "Failed")
    });
    let failed: Vec<String> = h
        .kubectl(&[
            "get",
            "pods",
            "-l",
            &selector,
            "--field-selector=status.phase=Failed",
            "-o",
            "name",
        ])
        .lines()
        .map(str::to_owned)
        .collect();
    eprintln!(
        "first connections of {label} pods on {nodes:?}: {} of {count} succeeded, {} failed, all done after {:?}",
        phases.iter().filter(|p| *p == "Succeeded").count(),
        failed.len(),
        started.elapsed()
    );
    assert!(done, "the {label} pods did not all finish: {phases:?}");
    assert!(
        failed.is_empty(),
        "pods whose first connection failed: {failed:?}"
    );
    h.kubectl(&["delete", "pods", "-l", &selector, "--wait=false"]);
}

/// Deleting the DaemonSet and running `svc-agent cleanup` on each node
/// leaves nothing: no pins, no tc programs on any interface, no socket
/// hooks, no svc-cni in the CNI configuration or bin directory, and no
/// svc-proxy program loaded at all.
pub fn uninstall_leaves_nothing_behind(h: &mut Harness) {
    // The programs the agents' links run (tc and socket hooks), to check
    // they are unloaded in the end.
    let mut ours = Vec::new();
    for node in &h.cluster.nodes {
        let links = Path::new(PIN_ROOT).join(&node.name).join("links");
        for entry in std::fs::read_dir(&links)
            .expect("the agent's link pins")
            .flatten()
        {
            let link = aya::programs::links::PinnedLink::from_pin(entry.path())
                .map(aya::programs::links::FdLink::from)
                .expect("a pinned link");
            ours.push(link.info().expect("link info").program_id());
        }
    }
    assert!(ours.len() >= 6, "uplink, pods and socket hooks: {ours:?}");
    h.kubectl(&[
        "-n",
        "kube-system",
        "delete",
        "daemonset",
        "svc-agent",
        "--wait=true",
        "--timeout=60s",
    ]);
    let gone = eventually(Duration::from_mins(1), || {
        h.pods("kube-system", "app.kubernetes.io/name=svc-agent")
            .is_empty()
    });
    assert!(gone, "the agent pods went");
    let agent = tests::built_binary("svc-agent");
    for node in &h.cluster.nodes {
        let (net_d, cni_bin) = node.cni_dirs();
        let pins = Path::new(PIN_ROOT).join(&node.name);
        let out = std::process::Command::new(&agent)
            .arg("cleanup")
            .arg("--pin-dir")
            .arg(&pins)
            .arg("--cni-conf-dir")
            .arg(&net_d)
            .arg("--cni-bin-dir")
            .arg(&cni_bin)
            .output()
            .expect("running svc-agent cleanup");
        assert!(
            out.status.success(),
            "{}: cleanup: {}",
            node.name,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!pins.exists(), "{}: {} is gone", node.name, pins.display());
        assert!(
            !cni_bin.join("svc-cni").exists(),
            "{}: the plugin is gone",
            node.name
        );
        let conflist = std::fs::read_to_string(net_d.join("10-podnet.conflist"))
            .expect("the pod network's conflist stays");
        assert!(!conflist.contains("svc-cni"), "{}: {conflist}", node.name);
        assert!(
            conflist.contains("\"ptp\""),
            "{}: the rest is kept",
            node.name
        );
        let attached: Vec<String> = node.ns.run(|| {
            svc_agent::datapath::ifaces::interfaces()
                .into_iter()
                .filter(|(_, name)| {
                    [TcAttachType::Ingress, TcAttachType::Egress]
                        .into_iter()
                        .any(|direction| {
                            SchedClassifier::query_tcx(name, direction)
                                .is_ok_and(|(_, programs)| !programs.is_empty())
                        })
                })
                .map(|(_, name)| name)
                .collect()
        });
        assert!(
            attached.is_empty(),
            "{}: tc programs remain on {attached:?}",
            node.name
        );
    }
    let unloaded = eventually(Duration::from_secs(20), || {
        aya::programs::loaded_programs()
            .flatten()
            .all(|program| !ours.contains(&program.id()))
    });
    assert!(
        unloaded,
        "none of the agents' programs stays loaded (socket hooks included)"
    );
    // Pods still run, untranslated: the pod network is untouched.
    let clients = h.pods("default", "app=client");
    let web = h.pods("default", "app=web");
    let (_, client_ip) = clients[0];
    let (name, web_ip) = &web[0];
    let direct = dial(client_ip, &web_ip.to_string(), 8080).expect("pod to pod");
    assert_eq!(&direct, name);
}

/// Under continuous load from outside through a NodePort on node1 (see
/// `load.rs`), three operations, each awaited until the agents are Ready
/// again: a rolling update of the DaemonSet to a second tag of the image,
/// deleting node1's agent pod, and restarting node1's kubelet. Not one
/// request may fail and not one long-lived connection break.
pub fn operations_under_load_lose_nothing(h: &mut Harness) {
    let (tcp, udp) = load_service(h);
    for node in &h.cluster.nodes {
        node.tag_image(
            tests::cluster::deploy::AGENT_IMAGE,
            "ghcr.io/svc-proxy/svc-agent:0.1.0-next",
        );
    }
    let load = crate::load::Load::start(&h.cluster.external, tcp, udp);
    std::thread::sleep(Duration::from_secs(3));
    let timeline = |what: &str, load: &crate::load::Load| {
        eprintln!("  {what}: {:?}", load.counts().snapshot());
    };
    timeline("before", &load);

    // 1. A rolling update to another tag.
    h.kubectl(&[
        "-n",
        "kube-system",
        "set",
        "image",
        "daemonset/svc-agent",
        "agent=ghcr.io/svc-proxy/svc-agent:0.1.0-next",
    ]);
    h.kubectl(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/svc-agent",
        "--timeout=180s",
    ]);
    tests::cluster::deploy::wait_agents_ready(&h.cluster, Duration::from_mins(2));
    std::thread::sleep(Duration::from_secs(2));
    timeline("after the rolling update", &load);

    // 2. An agent pod deleted.
    let on_node1 = h.agent_pods_on("node1");
    let pod = on_node1.first().expect("node1 has an agent");
    h.kubectl(&[
        "-n",
        "kube-system",
        "delete",
        pod,
        "--wait=true",
        "--timeout=60s",
    ]);
    tests::cluster::deploy::wait_agents_ready(&h.cluster, Duration::from_mins(2));
    std::thread::sleep(Duration::from_secs(2));
    timeline("after deleting node1's agent", &load);

    // 3. node1's kubelet restarted.
    h.cluster.nodes[0].stop_kubelet();
    std::thread::sleep(Duration::from_secs(3));
    h.cluster.nodes[0].start_kubelet();
    std::thread::sleep(Duration::from_secs(10));
    tests::cluster::deploy::wait_agents_ready(&h.cluster, Duration::from_mins(2));
    std::thread::sleep(Duration::from_secs(2));
    let counts = load.stop();
    let totals = counts.snapshot();
    eprintln!("  after restarting node1's kubelet (final): {totals:?}");
    let value = |name: &str| {
        totals
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    };
    assert!(
        value("long-lived requests") > 100,
        "the load ran: {totals:?}"
    );
    assert!(value("short requests") > 100, "the load ran: {totals:?}");
    assert!(value("UDP answers") > 100, "the load ran: {totals:?}");
    for failure in [
        "long-lived connections broken",
        "short requests failed",
        "UDP requests unanswered",
    ] {
        assert_eq!(value(failure), 0, "{failure}: {totals:?}");
    }
}

/// A NodePort service over the web pods, TCP and UDP; returns node1's
/// TCP and UDP node port addresses once the TCP one answers.
fn load_service(h: &Harness) -> (SocketAddrV4, SocketAddrV4) {
    h.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: load}\nspec:\n  type: NodePort\n  \
         selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: 8080, protocol: TCP}\n  \
         - {name: udp, port: 81, targetPort: 8081, protocol: UDP}\n",
    );
    let port = |index: usize| -> u16 {
        h.field(
            "default",
            "service/load",
            &format!("{{.spec.ports[{index}].nodePort}}"),
        )
        .parse()
        .expect("a node port")
    };
    let node1: std::net::Ipv4Addr = h.cluster.nodes[0].addr.parse().expect("node1's address");
    let tcp = SocketAddrV4::new(node1, port(0));
    let udp = SocketAddrV4::new(node1, port(1));
    let ready = eventually(Duration::from_secs(20), || {
        h.cluster
            .external
            .run(|| http_at(tcp, "GET", "/hostname", ""))
            .is_some()
    });
    assert!(ready, "the NodePort {tcp} answers before the load starts");
    (tcp, udp)
}

/// The plugin the init container installed (from the image) answers bad
/// input with the documented CNI errors on a real node.
pub fn the_installed_plugin_answers_bad_input_with_cni_errors(h: &mut Harness) {
    let node = &h.cluster.nodes[0];
    let (_, cni_bin) = node.cni_dirs();
    let plugin = cni_bin.join("svc-cni");
    assert!(plugin.is_file(), "{} installed", plugin.display());
    let run = |stdin: &str| -> serde_json::Value {
        let stdin = stdin.to_owned();
        let plugin = plugin.clone();
        node.ns.run(move || {
            let mut child = std::process::Command::new(&plugin)
                .env_clear()
                .env("CNI_COMMAND", "ADD")
                .env("CNI_CONTAINERID", "bad-input")
                .env("CNI_NETNS", "/var/run/netns/none")
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", "/usr/lib/cni")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("running the installed svc-cni");
            std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), stdin.as_bytes())
                .expect("config");
            let out = child.wait_with_output().expect("svc-cni ends");
            assert!(!out.status.success(), "{stdin}: an error exits non-zero");
            serde_json::from_slice(&out.stdout).expect("a CNI error object")
        })
    };
    let malformed = run("{\"cniVersion\": ");
    assert_eq!(malformed["code"], 6, "{malformed}");
    let no_prev = run(r#"{"cniVersion":"1.0.0","name":"podnet","type":"svc-cni"}"#);
    assert_eq!(no_prev["code"], 7, "{no_prev}");
    let veth = node
        .ns
        .run(svc_agent::datapath::ifaces::interfaces)
        .into_iter()
        .map(|(_, name)| name)
        .find(|name| name.starts_with("veth"))
        .expect("a pod veth on node1");
    let not_loaded = run(&format!(
        r#"{{"cniVersion":"1.0.0","name":"podnet","type":"svc-cni","pinDir":"/sys/fs/bpf/svc-cluster/no-such-node",
            "prevResult":{{"interfaces":[{{"name":"{veth}"}}]}}}}"#
    ));
    assert_eq!(not_loaded["code"], 11, "{not_loaded}");
    assert!(
        not_loaded["msg"]
            .as_str()
            .is_some_and(|msg| msg.contains("svc-proxy's datapath is not loaded on this node")),
        "{not_loaded}"
    );
}

/// Both agents hang their socket hooks off the one cgroup v2 root; each
/// acts only for its own node's network namespace. A service with
/// `internalTrafficPolicy: Local` whose only pod is on node2 serves node2's
/// own processes and not node1's (were node2's hook to act for node1's
/// sockets too, node1 would reach node2's pod); node1's processes reach an
/// ordinary ClusterIP, through node1's hook.
pub fn each_node_s_socket_hooks_act_for_that_node_only(h: &mut Harness) {
    h.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: only2, labels: {{app: only2}}}}\n\
         spec:\n  nodeName: node2\n  containers:\n  - name: c\n    image: {AGNHOST}\n    \
         imagePullPolicy: Never\n    args: [netexec, --http-port=8080]\n    \
         readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: local-only}}\n\
         spec:\n  internalTrafficPolicy: Local\n  selector: {{app: only2}}\n  \
         ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
    ));
    h.wait_ready("default", "app=only2");
    let local_only: std::net::Ipv4Addr = h
        .field("default", "service/local-only", "{.spec.clusterIP}")
        .parse()
        .expect("a ClusterIP");
    let web: std::net::Ipv4Addr = h
        .field("default", "service/web", "{.spec.clusterIP}")
        .parse()
        .expect("the web ClusterIP");
    let ask = |node: usize, ip: std::net::Ipv4Addr| {
        h.cluster.nodes[node]
            .ns
            .run(|| http_at(SocketAddrV4::new(ip, 80), "GET", "/hostname", ""))
            .map(|(_, body)| body.trim().to_owned())
    };
    let served = eventually(Duration::from_secs(20), || {
        ask(1, local_only).as_deref() == Some("only2")
    });
    assert!(served, "node2's own processes reach its local pod");
    assert_eq!(
        ask(0, local_only),
        None,
        "node1 has no local endpoint: its processes must not be served by node2's hook"
    );
    assert!(
        ask(0, web).is_some(),
        "node1's own hook serves node1's processes"
    );
    h.kubectl(&["delete", "pod/only2", "service/local-only", "--wait=false"]);
}
