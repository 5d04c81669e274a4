//! The `svc-agent` binary end to end (root): `run` in a network namespace
//! on a manifest directory, its `/readyz` and `/metrics`, a file edit
//! followed, the inspection commands on its pins, and a clean exit.

use std::{
    fmt::Write as _,
    fs::{self, File},
    io::{Read as _, Write as IoWrite},
    net::TcpStream,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

const AGENT: &str = env!("CARGO_BIN_EXE_svc-agent");
const METRICS: &str = "127.0.0.1:10249";

fn web(ports: &[u16]) -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n",
    );
    for port in ports {
        let _ = writeln!(text, "    - {{name: p{port}, port: {port}}}");
    }
    text
}

struct Fixture {
    netns: String,
    dir: PathBuf,
    pins: PathBuf,
    state: PathBuf,
    /// The agent's log (its standard output), shown if the test fails.
    log: PathBuf,
    agent: Option<Child>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let _ = Command::new(AGENT)
            .args(["cleanup", "--pin-dir"])
            .arg(&self.pins)
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_file(&self.state);
        if thread::panicking() {
            eprintln!(
                "the agent's log:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// An HTTP GET to the agent, from inside its network namespace.
fn get(netns: &str, path: &str) -> Option<(u16, String)> {
    let ns = format!("/run/netns/{netns}");
    let path = path.to_owned();
    thread::spawn(move || {
        let file = File::open(&ns).expect("netns");
        // SAFETY: a valid namespace fd; only this thread moves.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let mut stream = TcpStream::connect(METRICS).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        IoWrite::write_all(
            &mut stream,
            format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes(),
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1.to_owned();
        Some((status, body))
    })
    .join()
    .expect("HTTP thread")
}

/// Polls `check` every 50 ms for at most `limit`.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

fn metric(netns: &str, line_start: &str) -> Option<String> {
    let (_, body) = get(netns, "/metrics")?;
    body.lines()
        .find(|line| line.starts_with(line_start))
        .map(str::to_owned)
}

fn inspect(args: &[&str], pins: &Path, state: &Path) -> serde_json::Value {
    let out = Command::new(AGENT)
        .args(args)
        .args(["-o", "json", "--pin-dir"])
        .arg(pins)
        .arg("--state-file")
        .arg(state)
        .output()
        .expect("run svc-agent");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

impl Fixture {
    /// `svc-agent run` in a new network namespace on a manifest directory
    /// holding `manifest`, with `extra` flags; waits until it is ready.
    fn start(name: &str, manifest: &str, extra: &[&str]) -> Self {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root: run `cargo xtask test` as root"
        );
        let id = std::process::id();
        let mut fixture = Self {
            netns: format!("svcbin-{name}-{id}"),
            dir: std::env::temp_dir().join(format!("svcbin-manifests-{name}-{id}")),
            pins: PathBuf::from(format!("/sys/fs/bpf/svcbin-{name}-{id}")),
            state: std::env::temp_dir().join(format!("svcbin-state-{name}-{id}.json")),
            log: std::env::temp_dir().join(format!("svcbin-log-{name}-{id}.txt")),
            agent: None,
        };
        assert!(
            Command::new("ip")
                .args(["netns", "add", &fixture.netns])
                .status()
                .expect("ip")
                .success()
        );
        assert!(
            Command::new("ip")
                .args(["-n", &fixture.netns, "link", "set", "lo", "up"])
                .status()
                .expect("ip")
                .success()
        );
        fs::create_dir_all(&fixture.dir).expect("manifest dir");
        fs::write(fixture.dir.join("web.yaml"), manifest).expect("manifest");
        fixture.agent = Some(
            Command::new(AGENT)
                .args([
                    "run",
                    "--netns",
                    &fixture.netns,
                    "--no-host-sockets",
                    "--node-name",
                    "n1",
                ])
                .args(extra)
                .arg("--manifests")
                .arg(&fixture.dir)
                .arg("--pin-dir")
                .arg(&fixture.pins)
                .arg("--state-file")
                .arg(&fixture.state)
                .stdout(File::create(&fixture.log).expect("log file"))
                .spawn()
                .expect("start svc-agent"),
        );
        let netns = fixture.netns.clone();
        assert!(
            eventually(Duration::from_secs(15), || get(&netns, "/readyz")
                .is_some_and(|(s, _)| s == 200)),
            "the agent never became ready"
        );
        fixture
    }
}

#[test]
fn run_serves_manifests_metrics_and_inspection() {
    let mut fixture = Fixture::start("run", &web(&[80]), &[]);
    let netns = fixture.netns.clone();
    assert!(
        fs::read_to_string(&fixture.log)
            .expect("the log")
            .contains("no masquerade address"),
        "without --node-addr the agent says masquerading cannot work"
    );
    assert_eq!(get(&netns, "/healthz").map(|(s, _)| s), Some(200));
    assert_eq!(get(&netns, "/nope").map(|(s, _)| s), Some(404));
    assert_eq!(
        metric(&netns, "svc_frontends ").as_deref(),
        Some("svc_frontends 1")
    );
    assert!(
        metric(&netns, "svc_sync_latency_seconds_count ")
            .is_some_and(|l| l != "svc_sync_latency_seconds_count 0")
    );

    let services = inspect(&["services"], &fixture.pins, &fixture.state);
    assert_eq!(services[0]["service"], "default/web:p80", "{services}");
    assert_eq!(services[0]["frontend"], "10.96.0.10:80/TCP");

    // An edit is followed.
    fs::write(fixture.dir.join("web.yaml"), web(&[80, 81])).expect("manifest");
    assert!(
        eventually(Duration::from_secs(3), || metric(&netns, "svc_frontends ")
            .as_deref()
            == Some("svc_frontends 2")),
        "the edit was not applied"
    );

    // Ctrl-C: a clean exit, leaving the pinned datapath behind.
    let mut agent = fixture.agent.take().expect("running");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(agent.id()).expect("pid"), libc::SIGINT) };
    let status = agent.wait().expect("wait");
    assert!(status.success(), "svc-agent exited with {status}");
    assert!(
        fixture.pins.join("SVC_SERVICES_V1").exists(),
        "the datapath stays pinned"
    );
    let after = inspect(&["services"], &fixture.pins, &fixture.state);
    assert_eq!(after.as_array().map(Vec::len), Some(2), "{after}");

    // Into a pipe whose reader is gone (`| head` once it has its lines):
    // a quiet, successful exit, not a panic.
    for command in [
        &["services"][..],
        &["conntrack"],
        &["maglev", "10.96.0.10:80/TCP"],
    ] {
        let (status, stderr) = into_closed_pipe(command, &fixture.pins, &fixture.state);
        assert!(
            status.success() && !stderr.contains("panicked"),
            "svc-agent {command:?} into a closed pipe: {status}: {stderr}"
        );
    }
}

/// Runs `svc-agent <args>` with its standard output a pipe whose read end
/// is closed already: every write fails with `EPIPE`.
fn into_closed_pipe(
    args: &[&str],
    pins: &Path,
    state: &Path,
) -> (std::process::ExitStatus, String) {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let mut fds = [0i32; 2];
    // SAFETY: a valid two-int array for pipe(2).
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: fresh descriptors we own.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let out = Command::new(AGENT)
        .args(args)
        .arg("--pin-dir")
        .arg(pins)
        .arg("--state-file")
        .arg(state)
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run svc-agent");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `web` with one port and a slice of `endpoints` addresses (nothing
/// serves them: no traffic here).
fn web_with_endpoints(endpoints: u32) -> String {
    let mut text = web(&[80]);
    text.push_str(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: p80, port: 8080}]\nendpoints:\n",
    );
    for i in 0..endpoints {
        let [_, _, high, low] = i.to_be_bytes();
        let _ = writeln!(text, "  - {{addresses: [10.244.{high}.{low}]}}");
    }
    text
}

/// An integer metric's value, summed over its label sets.
fn metric_value(netns: &str, name: &str) -> u64 {
    get(netns, "/metrics").map_or(0, |(_, body)| {
        body.lines()
            .filter(|line| line.starts_with(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    })
}

#[test]
fn removing_backends_under_a_large_table_never_stalls_the_agent() {
    use aya::maps::{HashMap, Map, MapData};
    use svc_common::{
        ct::{CT_MAP, CtEntry, CtKey},
        wire::{WireAddr, WirePort},
    };
    const ENDPOINTS: u32 = 1_000;
    const ENTRIES: u32 = 200_000;
    let fixture = Fixture::start("large", &web_with_endpoints(ENDPOINTS), &[]);
    let netns = fixture.netns.clone();
    assert!(
        eventually(Duration::from_secs(5), || metric_value(
            &netns,
            "svc_backends "
        ) == u64::from(ENDPOINTS)),
        "the backends are installed"
    );
    // Connection tracking of a busy node: entries of flows long over,
    // naming the backends, written where the datapath keeps them.
    let pinned = MapData::from_pin(fixture.pins.join(CT_MAP)).expect("the pinned table");
    let mut ct: HashMap<_, CtKey, CtEntry> =
        HashMap::try_from(Map::LruHashMap(pinned)).expect("a hash map");
    for i in 0..ENTRIES {
        let [_, a, b, c] = i.to_be_bytes();
        let key = CtKey {
            saddr: WireAddr::from_octets([10, 200 + a, b, c]),
            daddr: WireAddr::from_octets([10, 96, 0, 10]),
            sport: WirePort::from_host(40_000),
            dport: WirePort::from_host(80),
            protocol: svc_common::proto::TCP,
            _pad: [0; 3],
        };
        let entry = CtEntry {
            saddr: key.saddr,
            daddr: WireAddr::from_octets([10, 244, 0, (i % 250) as u8]),
            sport: key.sport,
            dport: WirePort::from_host(8080),
            backend_id: 1 + i % ENDPOINTS,
            ..CtEntry::default()
        };
        ct.insert(key, entry, 0).expect("insert");
    }

    // Every backend goes at once; /healthz answers throughout, and an
    // edit made while the sweep runs is applied.
    fs::write(fixture.dir.join("web.yaml"), web_with_endpoints(0)).expect("manifest");
    let mut failures = Vec::new();
    let mut edited = false;
    let done = eventually(Duration::from_secs(20), || {
        match get(&netns, "/healthz") {
            Some((200, _)) => {}
            other => failures.push(format!("{other:?}")),
        }
        if !edited && metric_value(&netns, "svc_backends ") == 0 {
            fs::write(fixture.dir.join("web.yaml"), web(&[80, 81])).expect("manifest");
            edited = true;
        }
        // A sweep that began before the entries were written may end
        // after: what counts is that one deletes them.
        edited
            && metric_value(&netns, "svc_frontends ") == 2
            && metric_value(&netns, "svc_conntrack_removed_total{reason=\"expired\"}")
                >= u64::from(ENTRIES)
    });
    assert!(failures.is_empty(), "/healthz failed: {failures:?}");
    assert!(
        done,
        "the removal, a sweep deleting the flows that were over, and the next edit all happen"
    );
}

/// Runs `ip -n <netns> -batch -` with `commands`.
fn ip_batch(netns: &str, commands: &str) {
    use std::process::Stdio;
    let mut ip = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("ip");
    ip.stdin
        .take()
        .expect("stdin")
        .write_all(commands.as_bytes())
        .expect("commands");
    assert!(ip.wait().expect("ip").success(), "ip -batch failed");
}

/// The tc link pins of interfaces named `v…`: (name, index).
fn veth_pins(pins: &Path) -> Vec<(String, u32)> {
    fs::read_dir(pins.join("links"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| {
                    let name = entry.file_name().into_string().ok()?;
                    let (iface, index) = name.strip_prefix("tc-ingress-v")?.rsplit_once('@')?;
                    Some((format!("v{iface}"), index.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn open_fds(agent: &Child) -> usize {
    fs::read_dir(format!("/proc/{}/fd", agent.id())).map_or(0, Iterator::count)
}

#[test]
fn pod_interfaces_are_attached_as_they_come_and_let_go_as_they_go() {
    const VETHS: usize = 500;
    let fixture = Fixture::start("veths", &web(&[80]), &["--pod-iface", "v*"]);
    let agent = fixture.agent.as_ref().expect("the agent runs");
    let fds = open_fds(agent);
    let mut create = String::new();
    for i in 0..VETHS {
        let _ = writeln!(create, "link add v{i} type veth peer name w{i}");
    }
    let started = Instant::now();
    ip_batch(&fixture.netns, &create);
    assert!(
        eventually(Duration::from_mins(1), || veth_pins(&fixture.pins).len()
            == VETHS),
        "every pod interface is attached and pinned: {} of {VETHS}",
        veth_pins(&fixture.pins).len()
    );
    eprintln!(
        "{VETHS} veth pairs created and attached in {:?}",
        started.elapsed()
    );
    // A new interface under an old name gets its own link, not the old
    // one's (whose interface is gone).
    let old = veth_pins(&fixture.pins)
        .into_iter()
        .find(|(name, _)| name == "v0")
        .expect("v0 is pinned");
    ip_batch(
        &fixture.netns,
        "link del v0\nlink add v0 type veth peer name w0\n",
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            let v0: Vec<_> = veth_pins(&fixture.pins)
                .into_iter()
                .filter(|(name, _)| name == "v0")
                .collect();
            v0.len() == 1 && v0[0] != old
        }),
        "v0 was attached anew: {:?}",
        veth_pins(&fixture.pins)
            .into_iter()
            .filter(|(name, _)| name == "v0")
            .collect::<Vec<_>>()
    );
    let mut delete = String::new();
    for i in 0..VETHS {
        let _ = writeln!(delete, "link del v{i}");
    }
    let started = Instant::now();
    ip_batch(&fixture.netns, &delete);
    assert!(
        eventually(Duration::from_mins(1), || veth_pins(&fixture.pins)
            .is_empty()),
        "every gone interface's pin is removed: {} left",
        veth_pins(&fixture.pins).len()
    );
    eprintln!(
        "{VETHS} veth pairs deleted and let go in {:?}",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(10), || open_fds(agent) <= fds + 8),
        "the agent holds no link of a gone interface: {} descriptors, {fds} at start",
        open_fds(agent)
    );
    assert_eq!(
        get(&fixture.netns, "/healthz").map(|(status, _)| status),
        Some(200)
    );
}
