//! A two-node cluster in network namespaces, with the datapath loaded and
//! attached on each node the way the agent does it:
//!
//! ```text
//!                       lan (bridge, 172.16.0.0/24)
//!        +----------------------+----------------------+
//!   node1 eth0 .11         node2 eth0 .12         external eth0 .100
//!   pods 10.244.1.0/24     pods 10.244.2.0/24
//!   (routed veths)         (a Linux bridge, cbr0)
//! ```
//!
//! Each node routes the other's pod CIDR over the lan; the external client
//! only knows the lan (and, for externalIPs and LoadBalancer IPs, a route
//! to them through node1). On each node the pod program sits at ingress of
//! every pod veth's host side and the uplink program at ingress of `eth0`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use svc_agent::datapath::{
    BackendSpec, Capacities, Datapath, Frontend, Ipv4Cidr, LoadOptions, ServicePolicy,
    current_netns_cookie,
};
use svc_common::{
    config::{DatapathConfig, LOCAL_BY_CIDR, LOCAL_BY_INTERFACE},
    lb::BackendId,
};

use crate::{
    netns::{NetNs, ip},
    servers::{Answer, Server, read_answer},
};

pub const LAN_PREFIX: &str = "172.16.0";
pub const EXTERNAL_ADDR: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 100);
/// externalIPs and LoadBalancer IPs live here; the external client routes
/// them to node1.
pub const EXTERNAL_SERVICE_NET: &str = "172.16.1.0/24";
/// The service CIDR, which the external client also routes to node1 (as a
/// router told the service range would).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const TIMEOUT: Duration = Duration::from_secs(3);

static NEXT_LINK: AtomicU32 = AtomicU32::new(0);

fn link_name(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        NEXT_LINK.fetch_add(1, Ordering::Relaxed)
    )
}

/// A veth pair from `a` (named `a_name`) to `b` (named `b_name`).
fn veth(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) {
    let (tmp_a, tmp_b) = (link_name("sva"), link_name("svb"));
    ip(&[
        "link",
        "add",
        &tmp_a,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &tmp_b,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", &tmp_a, "name", a_name]);
    b.ip(&["link", "set", &tmp_b, "name", b_name]);
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}

/// A pod: a namespace behind a veth, with its servers.
pub struct Pod {
    pub name: String,
    pub addr: Ipv4Addr,
    pub ns: NetNs,
    /// The veth's name on the node.
    pub host_iface: String,
    servers: Vec<Server>,
    /// Listening sockets nothing accepts on.
    listeners: Vec<TcpListener>,
}

impl Pod {
    /// Starts a TCP backend on `port`.
    pub fn serve_tcp(&mut self, port: u16) {
        let addr = SocketAddrV4::new(self.addr, port);
        let listener = self
            .ns
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|err| panic!("{}: bind TCP {addr}: {err}", self.name));
        self.servers.push(Server::tcp(&self.name, listener));
    }

    /// Listens on TCP `port` with room for `backlog` connections and
    /// never accepts: the kernel completes their handshakes and queues
    /// them, so many connections cost the test no open files.
    pub fn listen_tcp(&mut self, port: u16, backlog: i32) {
        let addr = SocketAddrV4::new(self.addr, port);
        self.ns.sysctl("net.core.somaxconn", &backlog.to_string());
        self.ns
            .sysctl("net.ipv4.tcp_max_syn_backlog", &backlog.to_string());
        let listener = self
            .ns
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|err| panic!("{}: bind TCP {addr}: {err}", self.name));
        // SAFETY: listen(2) on our own socket, again, with a longer queue.
        let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), backlog) };
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
        self.listeners.push(listener);
    }

    /// Starts a UDP backend on `port`.
    pub fn serve_udp(&mut self, port: u16) {
        let addr = SocketAddrV4::new(self.addr, port);
        let socket = self
            .ns
            .run(|| UdpSocket::bind(addr))
            .unwrap_or_else(|err| panic!("{}: bind UDP {addr}: {err}", self.name));
        self.servers.push(Server::udp(&self.name, socket));
    }

    /// A TCP connection from this pod.
    pub fn connect(&self, to: SocketAddrV4) -> std::io::Result<TcpStream> {
        self.ns
            .run(|| TcpStream::connect_timeout(&to.into(), TIMEOUT))
    }

    /// A TCP connection from a chosen source port.
    pub fn connect_from(&self, port: u16, to: SocketAddrV4) -> std::io::Result<TcpStream> {
        let from = SocketAddrV4::new(self.addr, port);
        self.ns.run(|| connect_from(from, to))
    }

    /// A UDP socket in this pod.
    #[must_use]
    pub fn udp_socket(&self) -> UdpSocket {
        let socket = self
            .ns
            .run(|| UdpSocket::bind(SocketAddrV4::new(self.addr, 0)))
            .unwrap_or_else(|err| panic!("{}: UDP socket: {err}", self.name));
        socket.set_read_timeout(Some(TIMEOUT)).expect("UDP timeout");
        socket
    }

    /// Connects to `to` and returns the backend's answer.
    pub fn ask(&self, to: SocketAddrV4) -> std::io::Result<Answer> {
        read_answer(&self.connect(to)?, TIMEOUT)
    }
}

/// A TCP connection from `from` (an address of the calling thread's
/// namespace) to `to`. The port may be reused right after an earlier
/// connection from it closed.
pub fn connect_from(from: SocketAddrV4, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
    }
    let sockaddr = |addr: SocketAddrV4| {
        let (addr, port) = svc_common::wire::split(addr);
        libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits"),
            sin_port: port.raw(),
            sin_addr: libc::in_addr { s_addr: addr.raw() },
            sin_zero: [0; 8],
        }
    };
    let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).expect("fits");
    let local = sockaddr(from);
    // SAFETY: valid fd and address of the given length.
    if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let stream = TcpStream::from(owned);
    let remote = sockaddr(to);
    // SAFETY: as above; a blocking connect bounded by the SYN retries,
    // which the read timeout below does not cover, so tests pass
    // reachable or refusing destinations only.
    if unsafe { libc::connect(fd, (&raw const remote).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// A node: its namespace, uplink, pods and loaded datapath (the agent's
/// half of it: stopping the agent drops it).
pub struct Node {
    pub name: &'static str,
    pub ns: NetNs,
    pub addr: Ipv4Addr,
    pub pods: Vec<Pod>,
    /// Servers in the node's own namespace: a host-network pod's.
    servers: Vec<Server>,
    datapath: Option<Datapath>,
    options: LoadOptions,
    host_sockets: bool,
    index: u8,
    bridge: bool,
}

static NEXT_PIN_DIR: AtomicU32 = AtomicU32::new(0);

impl Node {
    fn new(name: &'static str, index: u8, lan: &NetNs, bridge: bool, options: Options) -> Self {
        let host_sockets = options.host_sockets_on_node1 && index == 1;
        let agent_binary = options.agent_binary;
        let ns = NetNs::new(name);
        let addr = Ipv4Addr::new(172, 16, 0, 10 + index);
        veth(&ns, "eth0", lan, &format!("n{index}"));
        lan.ip(&["link", "set", &format!("n{index}"), "master", "br0"]);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        // Strict reverse-path filtering, as many distributions set it: the
        // datapath must work with it (the agent relaxes what it needs).
        for key in ["all", "default"] {
            ns.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "1");
        }
        ns.sysctl("net.ipv4.ip_forward", "1");
        let other = 3 - index;
        ns.ip(&[
            "route",
            "add",
            &format!("10.244.{other}.0/24"),
            "via",
            &format!("{LAN_PREFIX}.{}", 10 + other),
        ]);
        if bridge {
            ns.ip(&["link", "add", "cbr0", "type", "bridge"]);
            ns.ip(&[
                "addr",
                "add",
                &format!("10.244.{index}.1/24"),
                "dev",
                "cbr0",
            ]);
            ns.ip(&["link", "set", "cbr0", "up"]);
        }
        let mut config = DatapathConfig {
            masq_addr: addr.into(),
            local_detect: if options.local_by_cidr {
                LOCAL_BY_CIDR
            } else {
                LOCAL_BY_INTERFACE
            },
            ..DatapathConfig::DEFAULT
        };
        if let Some((min, max)) = options.nat_ports {
            config.nat_port_min = min;
            config.nat_port_max = max;
        }
        if options.quick_timeouts {
            let quick = u64::try_from(QUICK_TIMEOUT.as_nanos()).expect("a few seconds");
            config.ct_timeout_tcp_closing_ns = quick;
            config.ct_timeout_udp_ns = quick;
        }
        if host_sockets {
            config.host_netns_cookie = ns.run(|| current_netns_cookie().expect("netns cookie"));
        }
        let pin_dir = options.pinned.then(|| {
            PathBuf::from(format!(
                "/sys/fs/bpf/svc-test-{}-{}-{name}",
                std::process::id(),
                NEXT_PIN_DIR.fetch_add(1, Ordering::Relaxed)
            ))
        });
        let options = LoadOptions {
            config,
            capacities: Capacities {
                ct_entries: options.ct_entries.unwrap_or(65_536),
                maglev_slots: 1 << 18,
                services: 1024,
                backends: 1024,
                ..Capacities::default()
            },
            pin_dir,
            ..LoadOptions::default()
        };
        let mut node = Self {
            name,
            ns,
            addr,
            pods: Vec::new(),
            servers: Vec::new(),
            datapath: None,
            options,
            host_sockets,
            index,
            bridge,
        };
        if !agent_binary {
            assert!(
                !node.start_agent(),
                "{name}: a fresh datapath adopts nothing"
            );
            node.datapath_mut()
                .maps_mut()
                .set_node_addrs(&[addr])
                .expect("node addresses");
        }
        node
    }

    /// Starts TCP and UDP servers on the node's own address, as a
    /// host-network pod would; they answer with the node's name.
    pub fn serve_host_network(&mut self, tcp_port: u16, udp_port: u16) {
        let (tcp, udp) = (
            SocketAddrV4::new(self.addr, tcp_port),
            SocketAddrV4::new(self.addr, udp_port),
        );
        let listener = self
            .ns
            .run(|| TcpListener::bind(tcp))
            .unwrap_or_else(|err| panic!("{}: bind TCP {tcp}: {err}", self.name));
        self.servers.push(Server::tcp(self.name, listener));
        let socket = self
            .ns
            .run(|| UdpSocket::bind(udp))
            .unwrap_or_else(|err| panic!("{}: bind UDP {udp}: {err}", self.name));
        self.servers.push(Server::udp(self.name, socket));
    }

    /// The running agent's datapath.
    ///
    /// # Panics
    ///
    /// If the agent is stopped.
    #[must_use]
    pub fn datapath(&self) -> &Datapath {
        self.datapath
            .as_ref()
            .unwrap_or_else(|| panic!("{}: the agent is stopped", self.name))
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        let name = self.name;
        self.datapath
            .as_mut()
            .unwrap_or_else(|| panic!("{name}: the agent is stopped"))
    }

    /// Stops the agent: its datapath is dropped. Pinned, the programs and
    /// maps stay in the kernel and keep serving.
    pub fn stop_agent(&mut self) {
        self.datapath = None;
    }

    /// The pinned maps' directory, if pinned.
    #[must_use]
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.options.pin_dir.as_deref()
    }

    /// Starts the agent: loads the datapath and attaches it to the uplink
    /// and every pod veth. Returns whether it adopted pinned maps.
    pub fn start_agent(&mut self) -> bool {
        let mut datapath = Datapath::load(&self.options).expect("the datapath must load");
        self.ns
            .run(|| datapath.attach_uplink("eth0").expect("attach uplink"));
        for pod in &self.pods {
            self.ns.run(|| {
                datapath
                    .attach_pod(&pod.host_iface)
                    .expect("attach to the pod veth");
            });
        }
        if self.host_sockets {
            datapath
                .attach_host_sockets()
                .expect("attach the host socket hooks");
        }
        let adopted = datapath.adopted();
        self.datapath = Some(datapath);
        adopted
    }

    /// This node's pod CIDR, `10.244.<node>.0/24`.
    #[must_use]
    pub fn pod_cidr(&self) -> Ipv4Cidr {
        Ipv4Cidr::new(Ipv4Addr::new(10, 244, self.index, 0), 24).expect("a CIDR")
    }

    /// Adds a pod with address `10.244.<node>.<host>`, its veth attached
    /// by the running agent.
    pub fn add_pod(&mut self, name: &str, host: u8) -> &mut Pod {
        self.add_pod_as(name, host, true)
    }

    /// Adds a pod that no agent attaches: what the CNI plugin is for.
    pub fn add_pod_unattached(&mut self, name: &str, host: u8) -> &mut Pod {
        self.add_pod_as(name, host, false)
    }

    fn add_pod_as(&mut self, name: &str, host: u8, attach: bool) -> &mut Pod {
        let ns = NetNs::new(name);
        let addr = Ipv4Addr::new(10, 244, self.index, host);
        let gateway = Ipv4Addr::new(10, 244, self.index, 1);
        let host_iface = format!("p{host}");
        veth(&self.ns, &host_iface, &ns, "eth0");
        if self.bridge {
            self.ns.ip(&["link", "set", &host_iface, "master", "cbr0"]);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        } else {
            // Routed veth: the pod's gateway is an address every host-side
            // veth carries; the node routes each pod's /32 to its veth.
            self.ns
                .ip(&["addr", "add", &format!("{gateway}/32"), "dev", &host_iface]);
            self.ns
                .ip(&["route", "add", &format!("{addr}/32"), "dev", &host_iface]);
            ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"]);
            ns.ip(&["route", "add", &format!("{gateway}"), "dev", "eth0"]);
        }
        ns.ip(&["route", "add", "default", "via", &gateway.to_string()]);
        // The agent binary attaches new pod veths itself.
        if attach && let Some(datapath) = self.datapath.as_mut() {
            self.ns.run(|| {
                datapath
                    .attach_pod(&host_iface)
                    .expect("attach to the pod veth");
            });
        }
        self.pods.push(Pod {
            name: name.to_owned(),
            addr,
            ns,
            host_iface,
            servers: Vec::new(),
            listeners: Vec::new(),
        });
        self.pods.last_mut().expect("just pushed")
    }

    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|pod| pod.name == name)
            .unwrap_or_else(|| panic!("{}: no pod {name}", self.name))
    }

    pub fn pod_mut(&mut self, name: &str) -> &mut Pod {
        let node = self.name;
        self.pods
            .iter_mut()
            .find(|pod| pod.name == name)
            .unwrap_or_else(|| panic!("{node}: no pod {name}"))
    }
}

/// The external client.
pub struct External {
    pub ns: NetNs,
    pub addr: Ipv4Addr,
}

impl External {
    pub fn connect(&self, to: SocketAddrV4) -> std::io::Result<TcpStream> {
        self.ns
            .run(|| TcpStream::connect_timeout(&to.into(), TIMEOUT))
    }

    pub fn ask(&self, to: SocketAddrV4) -> std::io::Result<Answer> {
        read_answer(&self.connect(to)?, TIMEOUT)
    }
}

/// Options of the cluster.
#[derive(Clone, Copy, Debug, Default)]
#[expect(clippy::struct_excessive_bools, reason = "independent switches")]
pub struct Options {
    /// Attach the host socket hooks on node1.
    pub host_sockets_on_node1: bool,
    /// Pin each node's maps and links under its own bpffs directory, so
    /// the datapath outlives the agent (removed with the cluster).
    pub pinned: bool,
    /// Load no datapath in this process: the test runs the `svc-agent`
    /// binary on each node, which attaches to the uplink and pod veths.
    pub agent_binary: bool,
    /// Tell local sources by the local CIDRs rather than by the interface
    /// they enter at (`--detect-local-mode cluster-cidr` or `node-cidr`).
    pub local_by_cidr: bool,
    /// Closed TCP flows and idle UDP flows time out after
    /// [`QUICK_TIMEOUT`] instead of 10 and 60 seconds.
    pub quick_timeouts: bool,
    /// The NAT source ports (first, last) instead of the default.
    pub nat_ports: Option<(u16, u16)>,
    /// Connection-tracking entries instead of 65,536.
    pub ct_entries: Option<u32>,
}

/// Closing TCP and idle UDP timeout with [`Options::quick_timeouts`].
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(2);

impl Drop for Node {
    fn drop(&mut self) {
        self.datapath = None;
        if let Some(dir) = &self.options.pin_dir {
            let _ = Datapath::cleanup(dir);
        }
    }
}

/// Two nodes, a lan and an external client.
pub struct Cluster {
    pub nodes: [Node; 2],
    pub external: External,
    backend_ids: HashMap<SocketAddrV4, BackendId>,
    // Dropped last: the bridge every uplink hangs off.
    _lan: NetNs,
}

impl Cluster {
    /// The usual test cluster: on node1 client `z` (10.244.1.5) and
    /// backend `a` (.2); on node2 backends `b` (.2) and `c` (.3). Every
    /// backend serves `tcp_ports` and UDP 5353.
    #[must_use]
    pub fn with_backends(options: Options, tcp_ports: &[u16]) -> Self {
        let mut cluster = Self::new(options);
        cluster.nodes[0].add_pod("z", 5);
        for (node, name, host) in [(0, "a", 2), (1, "b", 2), (1, "c", 3)] {
            let pod = cluster.nodes[node].add_pod(name, host);
            for &port in tcp_ports {
                pod.serve_tcp(port);
            }
            pod.serve_udp(5353);
        }
        cluster
    }

    #[must_use]
    pub fn new(options: Options) -> Self {
        crate::require_root();
        let lan = NetNs::new("lan");
        lan.ip(&["link", "add", "br0", "type", "bridge"]);
        lan.ip(&["link", "set", "br0", "up"]);
        let node1 = Node::new("node1", 1, &lan, false, options);
        let node2 = Node::new("node2", 2, &lan, true, options);
        let ext_ns = NetNs::new("ext");
        veth(&ext_ns, "eth0", &lan, "ext");
        lan.ip(&["link", "set", "ext", "master", "br0"]);
        ext_ns.ip(&["addr", "add", &format!("{EXTERNAL_ADDR}/24"), "dev", "eth0"]);
        for net in [EXTERNAL_SERVICE_NET, SERVICE_CIDR] {
            ext_ns.ip(&["route", "add", net, "via", &node1.addr.to_string()]);
        }
        Self {
            nodes: [node1, node2],
            external: External {
                ns: ext_ns,
                addr: EXTERNAL_ADDR,
            },
            backend_ids: HashMap::new(),
            _lan: lan,
        }
    }

    /// The pod named `name`, on whichever node.
    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.nodes
            .iter()
            .flat_map(|node| &node.pods)
            .find(|pod| pod.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The node a pod address belongs to (0 or 1), from its pod CIDR.
    fn node_of(addr: Ipv4Addr) -> usize {
        usize::from(addr.octets()[2] == 2)
    }

    /// The id both nodes give the backend at `addr` (stable per address).
    pub fn backend_id(&mut self, addr: SocketAddrV4) -> BackendId {
        let next = u32::try_from(self.backend_ids.len() + 1)
            .ok()
            .and_then(BackendId::new)
            .expect("few backends");
        *self.backend_ids.entry(addr).or_insert(next)
    }

    /// The address of a pod, or of a node (a host-network backend), by
    /// name, and the index of the node it is on.
    fn endpoint(&self, name: &str) -> (Ipv4Addr, usize) {
        if let Some(index) = self.nodes.iter().position(|node| node.name == name) {
            return (self.nodes[index].addr, index);
        }
        let addr = self.pod(name).addr;
        (addr, Self::node_of(addr))
    }

    /// Programs `frontends` on both nodes with `backends` (pod or node
    /// name, port), as the agent would: every node gets every backend unless the
    /// policy is Local, which keeps each node's own. Returns the ids.
    pub fn apply(
        &mut self,
        frontends: &[Frontend],
        policy: &ServicePolicy,
        backends: &[(&str, u16)],
    ) -> Vec<BackendId> {
        let resolved: Vec<(SocketAddrV4, usize)> = backends
            .iter()
            .map(|&(name, port)| {
                let (addr, node) = self.endpoint(name);
                (SocketAddrV4::new(addr, port), node)
            })
            .collect();
        let ids: Vec<BackendId> = resolved
            .iter()
            .map(|&(addr, _)| self.backend_id(addr))
            .collect();
        for (index, node) in self.nodes.iter_mut().enumerate() {
            let node_name = node.name;
            let maps = node.datapath_mut().maps_mut();
            let mut node_ids = Vec::new();
            for (&(addr, home), &id) in resolved.iter().zip(&ids) {
                let local = home == index;
                maps.set_backend(
                    id,
                    &BackendSpec {
                        addr,
                        local,
                        terminating: false,
                    },
                )
                .expect("set backend");
                if local || !policy.local_only {
                    node_ids.push(id);
                }
            }
            for frontend in frontends {
                maps.upsert_service(frontend, policy, &node_ids)
                    .unwrap_or_else(|err| panic!("{node_name}: {frontend:?}: {err}"));
            }
        }
        ids
    }

    /// Removes backend `id` from both nodes (after the services stopped
    /// using it), ending its flows.
    pub fn remove_backend(&mut self, id: BackendId) {
        for node in &mut self.nodes {
            node.datapath_mut()
                .maps_mut()
                .remove_backend(id)
                .unwrap_or_else(|err| panic!("{}: remove backend {id}: {err}", node.name));
        }
    }
}
