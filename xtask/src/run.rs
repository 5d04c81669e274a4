//! `cargo xtask run`: a sandbox node on this machine.
//!
//! A "node" network namespace with two "pod" namespaces behind veths and
//! an "external" namespace behind the node's uplink, a small HTTP server in
//! each pod that answers with its name and the client address it saw, and
//! `svc-agent run` in the node namespace serving the manifests of
//! `examples/sandbox/`. Everything lives in namespaces of its own, so the
//! machine's own network is untouched; Ctrl-C stops the agent and removes
//! the namespaces.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

const NODE_NS: &str = "svc-sbx-node";
const EXT_NS: &str = "svc-sbx-ext";
const NODE_NAME: &str = "sandbox-node";
/// Where the sandbox's agent pins its datapath and records its names.
const PIN_DIR: &str = "/sys/fs/bpf/svc-sandbox";
const STATE_FILE: &str = "/run/svc-proxy/sandbox-frontends.json";
const UPLINK: &str = "sbx-uplink";
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
const EXT_ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
/// externalIPs of the example services; the external namespace routes
/// them to the node.
const EXTERNAL_IP_NET: &str = "172.31.1.0/24";
const PODS: &[&str] = &["pod1", "pod2"];
const SERVER_PORT: u16 = 8080;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct Pod {
    ns: String,
    host_iface: String,
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
}

fn pods() -> Vec<Pod> {
    PODS.iter()
        .zip(1u8..)
        .map(|(name, i)| Pod {
            ns: format!("svc-sbx-{name}"),
            host_iface: format!("sbx-{name}"),
            addr: Ipv4Addr::new(10, 244, i, 2),
            gateway: Ipv4Addr::new(10, 244, i, 1),
        })
        .collect()
}

/// The namespaces; dropping it deletes them.
struct Sandbox {
    namespaces: Vec<String>,
}

impl Sandbox {
    fn create(pods: &[Pod]) -> Result<Self> {
        // A sandbox left behind by a killed run is removed first.
        for ns in [NODE_NS.to_owned(), EXT_NS.to_owned()]
            .into_iter()
            .chain(pods.iter().map(|p| p.ns.clone()))
        {
            if Path::new("/run/netns").join(&ns).exists() {
                cmd::run(Command::new("ip").args(["netns", "del", &ns]))?;
            }
        }
        let mut sandbox = Self {
            namespaces: Vec::new(),
        };
        sandbox.add_ns(NODE_NS)?;
        ip(&["-n", NODE_NS, "link", "set", "lo", "up"])?;
        sysctl(NODE_NS, "net.ipv4.ip_forward", "1")?;
        sandbox.add_ns(EXT_NS)?;
        ip(&["-n", EXT_NS, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", UPLINK, "netns", NODE_NS, "type", "veth", "peer", "name", "eth0",
            "netns", EXT_NS,
        ])?;
        let node_cidr = format!("{NODE_ADDR}/24");
        ip(&["-n", NODE_NS, "addr", "add", &node_cidr, "dev", UPLINK])?;
        ip(&["-n", NODE_NS, "link", "set", UPLINK, "up"])?;
        let ext_cidr = format!("{EXT_ADDR}/24");
        ip(&["-n", EXT_NS, "addr", "add", &ext_cidr, "dev", "eth0"])?;
        ip(&["-n", EXT_NS, "link", "set", "eth0", "up"])?;
        let via = NODE_ADDR.to_string();
        ip(&["-n", EXT_NS, "route", "add", EXTERNAL_IP_NET, "via", &via])?;
        for pod in pods {
            sandbox.add_ns(&pod.ns)?;
            ip(&["-n", &pod.ns, "link", "set", "lo", "up"])?;
            ip(&[
                "link",
                "add",
                &pod.host_iface,
                "netns",
                NODE_NS,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &pod.ns,
            ])?;
            ip(&[
                "-n",
                NODE_NS,
                "addr",
                "add",
                &format!("{}/24", pod.gateway),
                "dev",
                &pod.host_iface,
            ])?;
            ip(&["-n", NODE_NS, "link", "set", &pod.host_iface, "up"])?;
            ip(&[
                "-n",
                &pod.ns,
                "addr",
                "add",
                &format!("{}/24", pod.addr),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &pod.ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &pod.ns,
                "route",
                "add",
                "default",
                "via",
                &pod.gateway.to_string(),
            ])?;
        }
        Ok(sandbox)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Err(err) = ip(&["netns", "del", ns]) {
                eprintln!("sandbox: {err:#}");
            }
        }
        eprintln!("sandbox: removed");
    }
}

fn ip(args: &[&str]) -> Result<()> {
    cmd::output(Command::new("ip").args(args)).map(drop)
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    in_netns(ns, || {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).with_context(|| format!("setting {key}={value} in {ns}"))
    })?
}

/// Runs `f` on a thread that entered network namespace `ns`; sockets it
/// opens stay in that namespace.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    thread::scope(|scope| {
        let entered = scope.spawn(|| {
            // SAFETY: a valid namespace fd; setns changes only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        });
        match entered.join() {
            Ok(result) => result.with_context(|| format!("entering {path}")),
            Err(_) => bail!("thread in {ns} panicked"),
        }
    })
}

/// A minimal HTTP server on the pod's address: it answers every request
/// with its name and the client address it saw.
fn spawn_server(pod: &Pod, name: &'static str) -> Result<()> {
    let addr = SocketAddrV4::new(pod.addr, SERVER_PORT);
    let listener = in_netns(&pod.ns, move || TcpListener::bind(addr))?
        .with_context(|| format!("binding {addr} in {}", pod.ns))?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let peer = stream
                .peer_addr()
                .map_or_else(|_| "?".into(), |p| p.to_string());
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            // Read the request head; the body, if any, is ignored.
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let body = format!("{name} saw {peer}\n");
            let _ = write!(
                &stream,
                "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}

/// A kubeconfig to use: `KUBECONFIG` (its first file) or `~/.kube/config`.
fn configured_kubeconfig() -> Option<PathBuf> {
    let path = match std::env::var_os("KUBECONFIG") {
        Some(list) => std::env::split_paths(&list).next()?,
        None => PathBuf::from(std::env::var_os("HOME")?).join(".kube/config"),
    };
    path.is_file().then_some(path)
}

/// The `host:port` of the first `server:` in `kubeconfig`, if it answers a
/// TCP connect within two seconds.
fn reachable_server(kubeconfig: &Path) -> Option<String> {
    let text = std::fs::read_to_string(kubeconfig).ok()?;
    let url = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("server:"))?
        .trim()
        .trim_matches('"');
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next()?;
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:443")
    };
    let addrs = std::net::ToSocketAddrs::to_socket_addrs(&with_port).ok()?;
    addrs
        .into_iter()
        .any(|addr| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
        .then_some(with_port)
}

/// The interface of the default IPv4 route.
fn default_route_iface() -> Option<String> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&"00000000")).then(|| fields[0].to_owned())
    })
}

/// Runs the agent against the configured cluster when it is reachable,
/// else the sandbox.
pub fn run() -> Result<()> {
    let Some(kubeconfig) = configured_kubeconfig() else {
        return sandbox();
    };
    let Some(server) = reachable_server(&kubeconfig) else {
        eprintln!(
            "run: the cluster in {} does not answer; starting the sandbox instead",
            kubeconfig.display()
        );
        return sandbox();
    };
    cmd::run(&mut cmd::cargo(["build", "--package", "svc-agent"]))?;
    let agent = cmd::workspace_root().join("target/debug/svc-agent");
    let uplink = default_route_iface()
        .context("this machine has no default route: which interface is the uplink?")?;
    eprintln!(
        "run: serving the services of the cluster at {server} ({}) on this node; uplink {uplink}. \
         `{} services` lists them; Ctrl-C stops the agent (the datapath stays pinned; `{} cleanup` removes it).",
        kubeconfig.display(),
        agent.display(),
        agent.display()
    );
    let status = Command::new(&agent)
        .args(["run", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--uplink", &uplink])
        .args([
            "--pod-iface",
            "veth*",
            "--pod-iface",
            "cali*",
            "--pod-iface",
            "lxc*",
        ])
        .status()
        .context("starting svc-agent")?;
    if !status.success() {
        bail!("svc-agent exited with {status}");
    }
    Ok(())
}

fn sandbox() -> Result<()> {
    cmd::run(&mut cmd::cargo(["build", "--package", "svc-agent"]))?;
    let agent = cmd::workspace_root().join("target/debug/svc-agent");

    let pods = pods();
    let sandbox = Sandbox::create(&pods)?;
    for (pod, name) in pods.iter().zip(PODS) {
        spawn_server(pod, name)?;
    }

    // Ctrl-C reaches the agent too; we only wait for it to exit, then clean up.
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };

    let manifests = cmd::workspace_root().join("examples/sandbox");
    let mut run = Command::new(&agent);
    run.args(["run", "--netns", NODE_NS])
        .args(["--pin-dir", PIN_DIR, "--state-file", STATE_FILE])
        .args(["--stats-interval-secs", "30", "--node-name", NODE_NAME])
        .args(["--node-addr", &NODE_ADDR.to_string(), "--uplink", UPLINK])
        .args(["--pod-iface", "sbx-pod*", "--manifests"])
        .arg(&manifests);
    let mut child = run.spawn().context("starting svc-agent")?;

    let first = &pods[0];
    let agent_cmd = agent.display();
    println!(
        "\nsandbox: node namespace {NODE_NS} ({NODE_ADDR}), pods {} and {} serving HTTP on :{SERVER_PORT},\n\
         external client namespace {EXT_NS} ({EXT_ADDR}). Services: {}/*.yaml (edit them: the agent follows).\n\
         Try, in another shell:\n  \
         ip netns exec {} curl -s http://10.96.0.10/        # ClusterIP from a pod\n  \
         ip netns exec {NODE_NS} curl -s http://10.96.0.10/    # ClusterIP from the node\n  \
         ip netns exec {EXT_NS} curl -s http://{NODE_ADDR}:30080/  # NodePort from outside\n  \
         ip netns exec {EXT_NS} curl -s http://172.31.1.10/     # externalIP from outside\n  \
         ip netns exec {} curl -s http://10.96.0.11/        # session affinity: always one pod\n  \
         {agent_cmd} services --pin-dir {PIN_DIR} --state-file {STATE_FILE}\n  \
         {agent_cmd} conntrack --pin-dir {PIN_DIR}\n\
         Ctrl-C stops the agent and removes the sandbox.\n",
        first.addr,
        pods[1].addr,
        manifests.display(),
        first.ns,
        first.ns,
    );
    let status = child.wait().context("waiting for svc-agent")?;
    // The agent leaves its datapath pinned (that is how it survives
    // restarts); the sandbox takes it away with the namespaces.
    let cleanup = Command::new(&agent)
        .args(["cleanup", "--pin-dir", PIN_DIR])
        .status();
    if !cleanup.is_ok_and(|status| status.success()) {
        eprintln!("sandbox: could not remove {PIN_DIR}");
    }
    let _ = std::fs::remove_file(STATE_FILE);
    drop(sandbox);
    if !status.success() && !INTERRUPTED.load(Ordering::SeqCst) {
        bail!("svc-agent exited with {status}");
    }
    Ok(())
}
