//! Everything that touches the kernel: loading the eBPF object, attaching its
//! programs and reading or writing its maps.

mod addrs;
mod cidr;
mod clock;
pub mod conntrack;
mod frontend;
pub mod ids;
pub mod ifaces;
mod loader;
mod maglev;
mod maps;
pub mod netlink;
pub mod pod_links;
pub mod ports;
mod stats;
mod sys;
mod tc_links;

use std::path::PathBuf;

pub use addrs::{Addrs, CidrSetKind};
pub use cidr::{CidrError, Ipv4Cidr};
pub use clock::{coarse_now_ns, tick_ns};
pub use frontend::{BackendSpec, Frontend, Masquerade, Protocol, ServicePolicy};
pub use loader::{
    BpfLogLevel, Capacities, DEFAULT_PIN_DIR, Datapath, EBPF_OBJECT, EGRESS_PROGRAM,
    FROM_POD_PROGRAM, FROM_UPLINK_PROGRAM, LoadOptions, POD_PROGRAMS, SOCK_PROGRAMS, cgroup2_mount,
    current_netns_cookie,
};
pub use maglev::{Block, SlotAllocator};
pub use maps::Maps;
pub use stats::StatsSnapshot;
use svc_common::lb::{BackendId, ServiceKey};

/// Errors of the datapath layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the embedded eBPF object is empty: svc-agent was built without its datapath")]
    EmptyObject,
    #[error("loading the eBPF object failed")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no map {0}: it does not match svc-common")]
    MissingMap(&'static str),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to {iface}: {source}")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("starting the eBPF logger: {0}")]
    Logger(#[from] aya_log::Error),
    #[error("mapping the Maglev array into memory: {0}")]
    Mmap(#[source] std::io::Error),
    #[error("writing {path}: {source}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{count} node addresses: the datapath holds at most {max}")]
    TooManyNodeAddrs { count: usize, max: u32 },
    #[error("{iface} is not an Ethernet device ({link_layer}): the programs parse Ethernet frames")]
    NotEthernet { iface: String, link_layer: String },
    #[error("asking rtnetlink about {iface}: {source}")]
    Link {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup v2 at {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup2 file system could be found or mounted: host sockets cannot be translated")]
    NoCgroup2,
    #[error("reading the network namespace cookie: {0}")]
    NetnsCookie(#[source] std::io::Error),
    #[error("counting CPUs: {0}")]
    Cpus(#[source] std::io::Error),
    #[error("backend id {id} is outside the backends map (capacity {capacity})")]
    BackendIdOutOfRange { id: BackendId, capacity: u32 },
    #[error("backend id {0} is not installed")]
    UnknownBackend(BackendId),
    #[error("backend id {id} is still used by service {service:?}")]
    BackendInUse { id: BackendId, service: ServiceKey },
    #[error("backend id {id} is {from}; it cannot become {to} while installed")]
    BackendMoved {
        id: BackendId,
        from: std::net::SocketAddrV4,
        to: std::net::SocketAddrV4,
    },
    #[error("duplicating a map descriptor for the connection-tracking sweep: {0}")]
    Dup(#[source] std::io::Error),
    #[error("running the clock program: {0}")]
    Clock(String),
    #[error("the services map is full ({capacity} frontends)")]
    ServicesFull { capacity: u32 },
    #[error("no room for a Maglev table of {needed} slots ({free} free slots, fragmented or used)")]
    MaglevFull { needed: u32, free: u32 },
    #[error("adopting the pinned maps: {0}; `svc-agent cleanup` starts afresh")]
    Adopt(String),
    #[error("pinning under {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
