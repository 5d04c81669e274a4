//! One node of the cluster: a network namespace with its own containerd,
//! runc and kubelet and their state directories, a pod CIDR served by
//! Debian's `ptp`, `host-local` and `portmap` CNI plugins, and a cgroup subtree of
//! its own. Processes enter the namespace with `nsenter --net` (only the
//! network: kubelet's volume mounts must be visible to runc, and bpffs and
//! the cgroup tree are the machine's).

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    eventually,
    k8s::{ControlPlane, Process},
    netns::NetNs,
};

/// The cluster's bridge subnet (`/24`) in the root namespace.
pub const LAN_PREFIX: &str = "172.31.0";
/// The cluster's DNS service address.
pub const DNS_SERVICE_IP: &str = "10.96.0.10";
/// Where every node's state lives (a directory per node).
pub const STATE_ROOT: &str = "/var/lib/svc-cluster";
/// Where every node's runtime sockets and state live.
pub const RUN_ROOT: &str = "/run/svc-cluster";
/// The cgroup v1 controllers the kubelet and runc use.
const CGROUP_CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer", "blkio", "systemd",
];

/// A node and its processes.
pub struct KubeNode {
    pub name: String,
    pub ns: NetNs,
    pub addr: String,
    pub pod_cidr: String,
    root: PathBuf,
    run: PathBuf,
    logs: PathBuf,
    bin: PathBuf,
    kubeconfig: PathBuf,
    containerd: Option<Process>,
    kubelet: Option<Process>,
}

impl KubeNode {
    /// Makes node `index` (1 or 2) on the cluster's bridge and starts its
    /// containerd and kubelet.
    pub fn start(index: u8, plane: &ControlPlane, bin: &Path, logs: &Path) -> Self {
        let name = format!("node{index}");
        let ns = NetNs::new(&name);
        let addr = format!("{LAN_PREFIX}.{}", 10 + index);
        super::plug(&ns, &format!("svcc-{name}"), &addr);
        ns.ip(&["route", "add", "default", "via", &format!("{LAN_PREFIX}.1")]);
        let other = 3 - index;
        ns.ip(&[
            "route",
            "add",
            &format!("10.244.{other}.0/24"),
            "via",
            &format!("{LAN_PREFIX}.{}", 10 + other),
        ]);
        ns.sysctl("net.ipv4.ip_forward", "1");
        let root = Path::new(STATE_ROOT).join(&name);
        let run = Path::new(RUN_ROOT).join(&name);
        let mut node = Self {
            pod_cidr: format!("10.244.{index}.0/24"),
            name,
            ns,
            addr,
            root,
            run,
            logs: logs.to_owned(),
            bin: bin.to_owned(),
            kubeconfig: plane.kubeconfig_for("kubelet"),
            containerd: None,
            kubelet: None,
        };
        node.clean_state();
        node.write_configs(plane);
        node.start_containerd();
        node.start_kubelet();
        node
    }

    /// Where its containerd listens.
    #[must_use]
    pub fn containerd_socket(&self) -> PathBuf {
        self.run.join("containerd.sock")
    }

    /// The CNI configuration and plugin directories (what the DaemonSet's
    /// init container writes into).
    #[must_use]
    pub fn cni_dirs(&self) -> (PathBuf, PathBuf) {
        (self.root.join("cni/net.d"), self.root.join("cni/bin"))
    }

    /// The cgroup (under each controller) its pods live in.
    fn cgroup(&self) -> String {
        format!("svc-cluster-{}", self.name)
    }

    fn write_configs(&self, plane: &ControlPlane) {
        let (net_d, cni_bin) = self.cni_dirs();
        for dir in [
            &net_d,
            &cni_bin,
            &self.root.join("cni/ipam"),
            &self.root.join("kubelet"),
            &self.run,
        ] {
            fs::create_dir_all(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
        }
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "podnet",
            "plugins": [{
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": self.root.join("cni/ipam"),
                    "ranges": [[{"subnet": self.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }, {
                // hostPort, as kind's network has it (iptables, and so
                // netfilter's connection tracking, in the node).
                "type": "portmap",
                "capabilities": {"portMappings": true},
            }],
        });
        write(
            &net_d.join("10-podnet.conflist"),
            &serde_json::to_string_pretty(&conflist).expect("json"),
        );
        write(
            &self.root.join("containerd.toml"),
            &self.containerd_config(),
        );
        let resolv = self.root.join("resolv.conf");
        write(&resolv, &format!("nameserver {DNS_SERVICE_IP}\n"));
        let kubelet = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // This machine mounts cgroup v1 (with cgroup2 beside it).
            "failCgroupV1": false,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", self.cgroup()),
            "containerRuntimeEndpoint": format!("unix://{}", self.containerd_socket().display()),
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": false},
                "x509": {"clientCAFile": plane.pki_path("ca.crt")},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDNS": [DNS_SERVICE_IP],
            "clusterDomain": "cluster.local",
            "resolvConf": resolv,
            "failSwapOn": false,
            "podLogsDir": self.root.join("pod-logs"),
            // A small, shared disk must not evict or taint anything.
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "maxPods": 120,
            "nodeStatusUpdateFrequency": "4s",
        });
        write(
            &self.root.join("kubelet.yaml"),
            &serde_json::to_string_pretty(&kubelet).expect("json"),
        );
        for controller in CGROUP_CONTROLLERS {
            let dir = cgroup_root(controller).join(self.cgroup());
            let _ = fs::create_dir_all(&dir);
        }
    }

    /// Its containerd's configuration (version 3).
    fn containerd_config(&self) -> String {
        let (net_d, cni_bin) = self.cni_dirs();
        format!(
            r#"version = 3
root = "{root}/containerd"
state = "{run}/containerd"

[grpc]
  address = "{run}/containerd.sock"

[ttrpc]
  address = "{run}/containerd.sock.ttrpc"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "registry.k8s.io/pause:3.10.2"

# Root here lacks CAP_SYS_RESOURCE: no process may lower its OOM score,
# so containers keep at least containerd's.
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["/usr/lib/cni", "{cni_bin}"]
  conf_dir = "{net_d}"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  SystemdCgroup = false
  BinaryName = "{runc}"
"#,
            root = self.root.display(),
            run = self.run.display(),
            cni_bin = cni_bin.display(),
            net_d = net_d.display(),
            runc = self.bin.join("runc").display(),
        )
    }

    /// `nsenter --net=<this node> -- <binary>`.
    #[must_use]
    pub fn in_node(&self, binary: &Path) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.ns.name()))
            .arg("--")
            .arg(binary);
        command
    }

    fn start_containerd(&mut self) {
        let mut command = self.in_node(&self.bin.join("containerd"));
        command
            .arg("--config")
            .arg(self.root.join("containerd.toml"))
            // Its runc shim, from the same build.
            .env(
                "PATH",
                format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", self.bin.display()),
            );
        let name: &'static str = leak(format!("containerd-{}", self.name));
        self.containerd = Some(Process::spawn_command(name, &mut command, &self.logs));
        let socket = self.containerd_socket();
        assert!(
            eventually(Duration::from_secs(30), || socket.exists()),
            "{}: containerd did not come up; see {name}.log",
            self.name
        );
    }

    /// Starts the kubelet (again).
    pub fn start_kubelet(&mut self) {
        let mut command = self.in_node(&self.bin.join("kubelet"));
        command
            .arg(format!(
                "--config={}",
                self.root.join("kubelet.yaml").display()
            ))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!(
                "--root-dir={}",
                self.root.join("kubelet").display()
            ))
            .arg(format!(
                "--cert-dir={}",
                self.root.join("kubelet/pki").display()
            ))
            .arg(format!("--hostname-override={}", self.name))
            .arg(format!("--node-ip={}", self.addr))
            .arg("--v=1")
            .env(
                "PATH",
                format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", self.bin.display()),
            );
        let name: &'static str = leak(format!("kubelet-{}", self.name));
        self.kubelet = Some(Process::spawn_command(name, &mut command, &self.logs));
    }

    /// Stops the kubelet; its pods keep running.
    pub fn stop_kubelet(&mut self) {
        if let Some(mut kubelet) = self.kubelet.take() {
            kubelet.stop();
        }
    }

    /// Imports an OCI archive into its containerd under `name`'s
    /// repository (`name` is `repository:tag`, the tag the archive's
    /// index names).
    pub fn import(&self, archive: &Path, name: &str) {
        let base = name.rsplit_once(':').map_or(name, |(base, _)| base);
        let archive = archive.to_string_lossy();
        self.ctr(&["images", "import", "--base-name", base, &archive]);
    }

    /// Tags image `from` as `to` in its containerd (a second tag of the
    /// agent's image, to roll the DaemonSet to).
    pub fn tag_image(&self, from: &str, to: &str) {
        self.ctr(&["images", "tag", "--force", from, to]);
    }

    /// Runs `ctr` against its containerd's `k8s.io` namespace; panics
    /// with its output unless it succeeds.
    fn ctr(&self, args: &[&str]) {
        let out = Command::new(self.bin.join("ctr"))
            .arg("--address")
            .arg(self.containerd_socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .expect("running ctr");
        assert!(
            out.status.success(),
            "{}: ctr {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Everything a run leaves: its processes (pods included, found by
    /// their cgroup; the runc shims by their socket), the pods' network
    /// namespaces, its mounts and directories.
    fn clean_state(&mut self) {
        let mut netns = HashSet::new();
        for _ in 0..3 {
            let mut pids = Vec::new();
            for controller in ["pids", "memory", "cpu"] {
                collect_pids(&cgroup_root(controller).join(self.cgroup()), &mut pids);
            }
            pids.extend(processes_mentioning(&self.run.to_string_lossy()));
            if pids.is_empty() {
                break;
            }
            for pid in &pids {
                if let Ok(meta) = fs::metadata(format!("/proc/{pid}/ns/net")) {
                    netns.insert(meta.ino());
                }
                // SAFETY: kill(2) on a process of this node; errors (it is
                // gone) do not matter.
                unsafe {
                    libc::kill(*pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Ok(entries) = fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                let is_pod = entry.file_name().to_string_lossy().starts_with("cni-");
                if is_pod
                    && fs::metadata(entry.path()).is_ok_and(|meta| netns.contains(&meta.ino()))
                {
                    unmount(&entry.path());
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        for dir in [&self.root, &self.run] {
            for mount in mounts_under(dir) {
                unmount(&mount);
            }
            let _ = fs::remove_dir_all(dir);
        }
        for controller in CGROUP_CONTROLLERS {
            remove_cgroup_tree(&cgroup_root(controller).join(self.cgroup()));
        }
        // The agent's pins: its datapath goes with the node.
        let pins = Path::new(super::deploy::PIN_ROOT).join(&self.name);
        let _ = svc_agent::datapath::Datapath::cleanup(&pins);
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        self.stop_kubelet();
        if let Some(mut containerd) = self.containerd.take() {
            containerd.stop();
        }
        self.clean_state();
        let _ = Command::new("ip")
            .args(["link", "del", &format!("svcc-{}", self.name)])
            .status();
    }
}

/// A name that lives as long as the process (process names are few).
pub(super) fn leak(name: String) -> &'static str {
    Box::leak(name.into_boxed_str())
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
}

/// Where cgroup v1 `controller` is mounted, from `/proc/mounts`.
fn cgroup_root(controller: &str) -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup")).then(|| (fields[1], fields[3]))
        })
        .find(|(_, options)| {
            options
                .split(',')
                .any(|option| option == controller || option == format!("name={controller}"))
        })
        .map_or_else(
            || Path::new("/sys/fs/cgroup").join(controller),
            |(dir, _)| PathBuf::from(dir),
        )
}

/// Every pid in the cgroup `dir` and below.
fn collect_pids(dir: &Path, pids: &mut Vec<libc::pid_t>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(
            text.lines()
                .filter_map(|line| line.trim().parse::<libc::pid_t>().ok()),
        );
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                collect_pids(&entry.path(), pids);
            }
        }
    }
}

/// Removes cgroup `dir` and its children, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Processes whose command line mentions `text` (the runc shims, which
/// are started with their containerd's address).
fn processes_mentioning(text: &str) -> Vec<libc::pid_t> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(text))
        })
        .collect()
}

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir))
        .collect();
    mounts.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    mounts
}

fn unmount(path: &Path) {
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: a NUL-terminated path; a lazy unmount of our own mount.
    unsafe {
        libc::umount2(path.as_ptr(), libc::MNT_DETACH);
    }
}
