//! Writing the datapath's maps: node addresses, backends, services with
//! their Maglev tables, and reading connection tracking. This is the only
//! code that writes them; the agent and the tests both go through it.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
};
use svc_common::{
    ct::{CT_MAP, CtEntry, CtKey},
    lb::{
        AFFINITY_MAP, AffinityKey, AffinityValue, BACKEND_F_LOCAL, BACKEND_F_TERMINATING,
        BACKEND_STATS_MAP, BACKENDS_MAP, Backend, BackendId, EMPTY_DROP, EMPTY_REJECT, MAGLEV_MAP,
        NODE_ADDRS_MAP, NodeAddr, SCOPE_ADDR, SCOPE_IN_CLUSTER, SCOPE_NODEPORT, SERVICE_STATS_MAP,
        SERVICES_MAP, SOURCE_RANGES_MAP, SVC_F_AFFINITY, SVC_F_IN_CLUSTER, SVC_F_LOCAL_ONLY,
        SVC_F_SNAT_EXTERNAL, SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue, SourceRangeKey,
    },
    maglev, proto,
    stats::CounterValue,
};

use super::{
    Error, Result,
    maglev::{Block, MaglevArea, SlotAllocator},
};

/// A service's transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
        }
    }
}

/// What a service answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Frontend {
    /// A ClusterIP, an externalIP or a LoadBalancer ingress IP, on the
    /// service port.
    Address {
        addr: Ipv4Addr,
        port: u16,
        protocol: Protocol,
    },
    /// A node port, on every node address.
    NodePort { port: u16, protocol: Protocol },
    /// The in-cluster variant of an external address (externalIP or
    /// LoadBalancer IP) with a Local traffic policy: what this node's pods
    /// and processes reach there (every endpoint, as kube-proxy does).
    AddressInCluster {
        addr: Ipv4Addr,
        port: u16,
        protocol: Protocol,
    },
    /// The in-cluster variant of a node port with a Local traffic policy.
    NodePortInCluster { port: u16, protocol: Protocol },
}

impl Frontend {
    /// A TCP service port on an address.
    #[must_use]
    pub const fn tcp(addr: Ipv4Addr, port: u16) -> Self {
        Self::Address {
            addr,
            port,
            protocol: Protocol::Tcp,
        }
    }

    /// A UDP service port on an address.
    #[must_use]
    pub const fn udp(addr: Ipv4Addr, port: u16) -> Self {
        Self::Address {
            addr,
            port,
            protocol: Protocol::Udp,
        }
    }

    /// A TCP node port.
    #[must_use]
    pub const fn node_port_tcp(port: u16) -> Self {
        Self::NodePort {
            port,
            protocol: Protocol::Tcp,
        }
    }

    /// The in-cluster variant of an external frontend; `None` for one
    /// that already is a variant.
    #[must_use]
    pub const fn in_cluster(self) -> Option<Self> {
        match self {
            Self::Address {
                addr,
                port,
                protocol,
            } => Some(Self::AddressInCluster {
                addr,
                port,
                protocol,
            }),
            Self::NodePort { port, protocol } => Some(Self::NodePortInCluster { port, protocol }),
            Self::AddressInCluster { .. } | Self::NodePortInCluster { .. } => None,
        }
    }

    /// The key the datapath looks the frontend up with.
    #[must_use]
    pub fn key(&self) -> ServiceKey {
        let (addr, port, protocol, scope) = match *self {
            Self::Address {
                addr,
                port,
                protocol,
            } => (addr, port, protocol, SCOPE_ADDR),
            Self::NodePort { port, protocol } => {
                (Ipv4Addr::UNSPECIFIED, port, protocol, SCOPE_NODEPORT)
            }
            Self::AddressInCluster {
                addr,
                port,
                protocol,
            } => (addr, port, protocol, SCOPE_ADDR | SCOPE_IN_CLUSTER),
            Self::NodePortInCluster { port, protocol } => (
                Ipv4Addr::UNSPECIFIED,
                port,
                protocol,
                SCOPE_NODEPORT | SCOPE_IN_CLUSTER,
            ),
        };
        ServiceKey {
            addr: u32::from_ne_bytes(addr.octets()),
            port: port.to_be(),
            protocol: protocol.number(),
            scope,
        }
    }
}

impl Frontend {
    /// The frontend a map key stands for; `None` for a key no frontend
    /// writes (an unknown scope or protocol).
    #[must_use]
    pub fn from_key(key: &ServiceKey) -> Option<Self> {
        let protocol = match key.protocol {
            proto::TCP => Protocol::Tcp,
            proto::UDP => Protocol::Udp,
            _ => return None,
        };
        let port = u16::from_be(key.port);
        let frontend = match key.scope & !SCOPE_IN_CLUSTER {
            SCOPE_ADDR => Self::Address {
                addr: Ipv4Addr::from(key.addr.to_ne_bytes()),
                port,
                protocol,
            },
            SCOPE_NODEPORT => Self::NodePort { port, protocol },
            _ => return None,
        };
        if key.scope & SCOPE_IN_CLUSTER == 0 {
            Some(frontend)
        } else {
            frontend.in_cluster()
        }
    }
}

/// An IPv4 CIDR of `loadBalancerSourceRanges`, its address masked to the
/// prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl SourceRange {
    /// `addr/prefix` with the host bits cleared; `None` for a prefix over
    /// 32.
    #[must_use]
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        (prefix <= 32).then(|| Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    /// Whether `addr` lies inside.
    #[must_use]
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        Self::new(addr, self.prefix).is_some_and(|masked| masked.addr == self.addr)
    }

    fn key(self, service_id: u32) -> LpmKey<SourceRangeKey> {
        LpmKey::new(
            32 + u32::from(self.prefix),
            SourceRangeKey {
                service_id,
                addr: u32::from_ne_bytes(self.addr.octets()),
            },
        )
    }
}

/// How a frontend treats its traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches, each a flag bit of the service entry"
)]
pub struct ServicePolicy {
    /// Masquerade traffic from outside the node (externalTrafficPolicy
    /// Cluster on node ports, externalIPs and LoadBalancer IPs).
    pub masquerade_external: bool,
    /// The backends given are this node's only (a Local traffic policy).
    pub local_only: bool,
    /// sessionAffinity ClientIP with this timeout.
    pub affinity_timeout_secs: Option<u32>,
    /// With no backends, drop instead of refusing.
    pub drop_when_empty: bool,
    /// New flows only from these sources (`loadBalancerSourceRanges`);
    /// empty: from anywhere. Sorted.
    pub source_ranges: Vec<SourceRange>,
    /// An in-cluster variant of this frontend exists
    /// ([`Frontend::in_cluster`]): this node's pods and processes use it.
    pub in_cluster_variant: bool,
}

/// An endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendSpec {
    pub addr: SocketAddrV4,
    /// Runs on this node.
    pub local: bool,
    pub terminating: bool,
}

impl ServicePolicy {
    /// The `SVC_F_*` bits of this policy.
    fn flags(&self) -> u16 {
        [
            (self.masquerade_external, SVC_F_SNAT_EXTERNAL),
            (self.local_only, SVC_F_LOCAL_ONLY),
            (self.affinity_timeout_secs.is_some(), SVC_F_AFFINITY),
            (!self.source_ranges.is_empty(), SVC_F_SOURCE_RANGES),
            (self.in_cluster_variant, SVC_F_IN_CLUSTER),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |flags, (_, bit)| flags | bit)
    }

    fn from_value(value: &ServiceValue, source_ranges: Vec<SourceRange>) -> Self {
        Self {
            source_ranges,
            in_cluster_variant: value.flags & SVC_F_IN_CLUSTER != 0,
            masquerade_external: value.flags & SVC_F_SNAT_EXTERNAL != 0,
            local_only: value.flags & SVC_F_LOCAL_ONLY != 0,
            affinity_timeout_secs: (value.flags & SVC_F_AFFINITY != 0)
                .then_some(value.affinity_timeout_secs),
            drop_when_empty: value.on_empty == EMPTY_DROP,
        }
    }
}

impl BackendSpec {
    fn from_value(value: Backend) -> Self {
        Self {
            addr: SocketAddrV4::new(
                Ipv4Addr::from(value.addr.to_ne_bytes()),
                u16::from_be(value.port),
            ),
            local: value.flags & BACKEND_F_LOCAL != 0,
            terminating: value.flags & BACKEND_F_TERMINATING != 0,
        }
    }

    fn value(self) -> Backend {
        let mut flags = 0;
        if self.local {
            flags |= BACKEND_F_LOCAL;
        }
        if self.terminating {
            flags |= BACKEND_F_TERMINATING;
        }
        Backend {
            addr: u32::from_ne_bytes(self.addr.ip().octets()),
            port: self.addr.port().to_be(),
            flags,
            _pad: 0,
        }
    }
}

/// A frontend as installed.
#[derive(Debug)]
struct Installed {
    value: ServiceValue,
    block: Option<Block>,
    /// Backend ids, sorted.
    backends: Vec<BackendId>,
}

/// The datapath's maps, owned by the agent.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, Backend>,
    node_addrs: HashMap<MapData, u32, NodeAddr>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    ct: HashMap<MapData, CtKey, CtEntry>,
    service_stats: PerCpuArray<MapData, CounterValue>,
    backend_stats: PerCpuArray<MapData, CounterValue>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    /// Each frontend id's source ranges, sorted.
    ranges_by_id: StdHashMap<u32, Vec<SourceRange>>,
    maglev: MaglevArea,
    slots: SlotAllocator,
    slots_per_backend: u32,
    installed: StdHashMap<ServiceKey, Installed>,
    backend_values: StdHashMap<BackendId, Backend>,
    node_addr_set: HashSet<Ipv4Addr>,
    free_ids: Vec<u32>,
    next_id: u32,
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name).ok_or(Error::MissingMap(name))
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf, slots_per_backend: u32) -> Result<Self> {
        let services: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(take(ebpf, SERVICES_MAP)?).map_err(map_error(SERVICES_MAP))?;
        let backends =
            Array::try_from(take(ebpf, BACKENDS_MAP)?).map_err(map_error(BACKENDS_MAP))?;
        let node_addrs =
            HashMap::try_from(take(ebpf, NODE_ADDRS_MAP)?).map_err(map_error(NODE_ADDRS_MAP))?;
        let affinity =
            HashMap::try_from(take(ebpf, AFFINITY_MAP)?).map_err(map_error(AFFINITY_MAP))?;
        let ct = HashMap::try_from(take(ebpf, CT_MAP)?).map_err(map_error(CT_MAP))?;
        let service_stats = PerCpuArray::try_from(take(ebpf, SERVICE_STATS_MAP)?)
            .map_err(map_error(SERVICE_STATS_MAP))?;
        let backend_stats = PerCpuArray::try_from(take(ebpf, BACKEND_STATS_MAP)?)
            .map_err(map_error(BACKEND_STATS_MAP))?;
        let source_ranges = LpmTrie::try_from(take(ebpf, SOURCE_RANGES_MAP)?)
            .map_err(map_error(SOURCE_RANGES_MAP))?;
        let Map::Array(maglev_data) = take(ebpf, MAGLEV_MAP)? else {
            return Err(Error::MissingMap(MAGLEV_MAP));
        };
        let maglev_slots = maglev_data
            .info()
            .map_err(map_error(MAGLEV_MAP))?
            .max_entries();
        let maglev = MaglevArea::new(maglev_data, maglev_slots)?;
        Ok(Self {
            services,
            backends,
            node_addrs,
            affinity,
            ct,
            service_stats,
            backend_stats,
            source_ranges,
            ranges_by_id: StdHashMap::new(),
            maglev,
            slots: SlotAllocator::new(maglev_slots),
            slots_per_backend: slots_per_backend.max(1),
            installed: StdHashMap::new(),
            backend_values: StdHashMap::new(),
            node_addr_set: HashSet::new(),
            free_ids: Vec::new(),
            next_id: 0,
        })
    }

    /// Rebuilds the bookkeeping from the maps' contents: maps pinned by a
    /// previous run keep their services, backends, tables and connection
    /// tracking, and this run carries on from them.
    pub(super) fn adopt(&mut self) -> Result<()> {
        for entry in self.node_addrs.keys() {
            let addr = entry.map_err(map_error(NODE_ADDRS_MAP))?;
            self.node_addr_set
                .insert(Ipv4Addr::from(addr.to_ne_bytes()));
        }
        for (id, backend) in self.backends.iter().enumerate() {
            let backend = backend.map_err(map_error(BACKENDS_MAP))?;
            if backend.addr != 0 {
                let id = BackendId::try_from(id).unwrap_or(BackendId::MAX);
                self.backend_values.insert(id, backend);
            }
        }
        let entries: Vec<(ServiceKey, ServiceValue)> = self
            .services
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_error(SERVICES_MAP))?;
        for entry in self.source_ranges.keys() {
            let key = entry.map_err(map_error(SOURCE_RANGES_MAP))?;
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(32);
            let range = u8::try_from(prefix).ok().and_then(|prefix| {
                SourceRange::new(Ipv4Addr::from(data.addr.to_ne_bytes()), prefix)
            });
            if let Some(range) = range {
                self.ranges_by_id
                    .entry(data.service_id)
                    .or_default()
                    .push(range);
            }
        }
        for ranges in self.ranges_by_id.values_mut() {
            ranges.sort_unstable();
        }
        let mut used_ids = HashSet::new();
        for (key, value) in entries {
            let block = (value.maglev_size > 0).then_some(Block {
                offset: value.maglev_offset,
                len: value.maglev_size,
            });
            if let Some(block) = block
                && !self.slots.reserve(block)
            {
                return Err(Error::Adopt(format!(
                    "frontend {key:?}: its Maglev block {block:?} overlaps another or lies outside the map"
                )));
            }
            let mut backends: Vec<BackendId> = match block {
                Some(block) => self.maglev.read(block)?,
                None => Vec::new(),
            };
            backends.sort_unstable();
            backends.dedup();
            used_ids.insert(value.id);
            self.installed.insert(
                key,
                Installed {
                    value,
                    block,
                    backends,
                },
            );
        }
        self.next_id = used_ids.iter().max().map_or(0, |max| max + 1);
        self.free_ids = (0..self.next_id)
            .filter(|id| !used_ids.contains(id))
            .collect();
        Ok(())
    }

    /// Every installed frontend: its policy and the backends its table
    /// names.
    #[must_use]
    pub fn installed_frontends(&self) -> Vec<(Frontend, ServicePolicy, Vec<BackendId>)> {
        self.installed
            .iter()
            .filter_map(|(key, installed)| {
                Some((
                    Frontend::from_key(key)?,
                    ServicePolicy::from_value(
                        &installed.value,
                        self.ranges_by_id
                            .get(&installed.value.id)
                            .cloned()
                            .unwrap_or_default(),
                    ),
                    installed.backends.clone(),
                ))
            })
            .collect()
    }

    /// Every installed backend.
    #[must_use]
    pub fn installed_backends(&self) -> Vec<(BackendId, BackendSpec)> {
        self.backend_values
            .iter()
            .map(|(id, value)| (*id, BackendSpec::from_value(*value)))
            .collect()
    }

    /// The node addresses installed.
    #[must_use]
    pub fn installed_node_addrs(&self) -> Vec<Ipv4Addr> {
        let mut addrs: Vec<Ipv4Addr> = self.node_addr_set.iter().copied().collect();
        addrs.sort_unstable();
        addrs
    }

    /// Sets the node's own addresses (where node ports answer).
    pub fn set_node_addrs(&mut self, addrs: &[Ipv4Addr]) -> Result<()> {
        let wanted: HashSet<Ipv4Addr> = addrs.iter().copied().collect();
        for addr in self.node_addr_set.difference(&wanted) {
            match self.node_addrs.remove(&u32::from_ne_bytes(addr.octets())) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(map_error(NODE_ADDRS_MAP)(source)),
            }
        }
        for addr in wanted.difference(&self.node_addr_set) {
            self.node_addrs
                .insert(u32::from_ne_bytes(addr.octets()), NodeAddr::default(), 0)
                .map_err(map_error(NODE_ADDRS_MAP))?;
        }
        self.node_addr_set = wanted;
        Ok(())
    }

    /// Writes backend `id`. Changing an existing id's address or port ends
    /// the flows to its old address.
    pub fn set_backend(&mut self, id: BackendId, spec: &BackendSpec) -> Result<()> {
        if id == 0 || id >= self.backends.len() {
            return Err(Error::BackendIdOutOfRange {
                id,
                capacity: self.backends.len(),
            });
        }
        let value = spec.value();
        let old = self.backend_values.get(&id).copied();
        if old == Some(value) {
            return Ok(());
        }
        self.backends
            .set(id, value, 0)
            .map_err(map_error(BACKENDS_MAP))?;
        match old {
            None => self.reset_counters(BACKEND_STATS_MAP, id)?,
            Some(old) if (old.addr, old.port) != (value.addr, value.port) => {
                self.purge_backend_flows(id)?;
            }
            Some(_) => {}
        }
        self.backend_values.insert(id, value);
        Ok(())
    }

    /// Removes backend `id`, which no service may still use, and ends its
    /// flows: their connection-tracking and affinity entries go, so a UDP
    /// client's next packet picks a live backend and a TCP client's next
    /// segment is answered with a reset by the new pick.
    pub fn remove_backend(&mut self, id: BackendId) -> Result<()> {
        if self.backend_values.remove(&id).is_none() {
            return Ok(());
        }
        if let Some(key) = self
            .installed
            .iter()
            .find_map(|(key, installed)| installed.backends.contains(&id).then_some(*key))
        {
            if let Ok(value) = self.backends.get(&id, 0) {
                self.backend_values.insert(id, value);
            }
            return Err(Error::BackendInUse { id, service: key });
        }
        self.backends
            .set(id, Backend::default(), 0)
            .map_err(map_error(BACKENDS_MAP))?;
        self.purge_backend_flows(id)
    }

    /// Installs or updates a frontend with these backends. A new Maglev
    /// table is written into a free block first and the service entry then
    /// switched to it in one update, so packets see the old table or the new
    /// one, never a mix; the old block is freed afterwards. Returns the
    /// frontend's id.
    pub fn upsert_service(
        &mut self,
        frontend: &Frontend,
        policy: &ServicePolicy,
        backends: &[BackendId],
    ) -> Result<u32> {
        let key = frontend.key();
        // Maglev keys by address and port, so that every node builds the
        // same table whatever ids it gave the backends.
        let mut members = Vec::with_capacity(backends.len());
        for &id in backends {
            let backend = self
                .backend_values
                .get(&id)
                .ok_or(Error::UnknownBackend(id))?;
            members.push((maglev::backend_key(backend.addr, backend.port), id));
        }
        members.sort_unstable();
        members.dedup_by_key(|(key, _)| *key);
        let mut ids: Vec<BackendId> = members.iter().map(|&(_, id)| id).collect();
        ids.sort_unstable();

        let flags = policy.flags();
        let previous_id = self.installed.get(&key).map(|previous| previous.value.id);
        if let Some(previous) = self.installed.get(&key)
            && previous.backends == ids
            && previous.value.flags == flags
            && previous.value.affinity_timeout_secs == policy.affinity_timeout_secs.unwrap_or(0)
            && previous.value.on_empty == on_empty(policy)
            && self.ranges(previous.value.id) == policy.source_ranges.as_slice()
        {
            return Ok(previous.value.id);
        }

        let count = u32::try_from(members.len()).unwrap_or(u32::MAX);
        let block = self.write_table(&members)?;
        let size = block.map_or(0, |block| block.len);

        let (id, is_new_id) = if let Some(id) = previous_id {
            (id, false)
        } else if let Some(id) = self.allocate_id() {
            (id, true)
        } else {
            if let Some(block) = block {
                self.slots.free(block);
            }
            return Err(Error::ServicesFull {
                capacity: self.service_stats.len(),
            });
        };
        let value = ServiceValue {
            id,
            maglev_offset: block.map_or(0, |block| block.offset),
            maglev_size: size,
            backend_count: count,
            affinity_timeout_secs: policy.affinity_timeout_secs.unwrap_or(0),
            flags,
            on_empty: on_empty(policy),
            _pad: 0,
        };
        if is_new_id {
            self.reset_counters(SERVICE_STATS_MAP, id)?;
        }
        // Ranges the frontend gains go in before its entry says to check
        // them; those it loses go once it no longer names them.
        let stale = match self.add_ranges(id, &policy.source_ranges) {
            Ok(stale) => stale,
            Err(err) => {
                if let Some(block) = block {
                    self.slots.free(block);
                }
                if is_new_id {
                    self.free_ids.push(id);
                }
                return Err(err);
            }
        };
        if let Err(source) = self.services.insert(key, value, 0) {
            if let Some(block) = block {
                self.slots.free(block);
            }
            if is_new_id {
                self.free_ids.push(id);
            }
            return Err(map_error(SERVICES_MAP)(source));
        }
        let old_block = self
            .installed
            .insert(
                key,
                Installed {
                    value,
                    block,
                    backends: ids,
                },
            )
            .and_then(|old| old.block);
        if let Some(old_block) = old_block {
            self.slots.free(old_block);
        }
        self.remove_ranges(id, &stale);
        Ok(id)
    }

    fn ranges(&self, id: u32) -> &[SourceRange] {
        self.ranges_by_id.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Inserts the ranges of `wanted` that `id` lacks and records `wanted`
    /// as its ranges; returns those it had and no longer wants.
    fn add_ranges(&mut self, id: u32, wanted: &[SourceRange]) -> Result<Vec<SourceRange>> {
        let had = self.ranges(id).to_vec();
        for range in wanted.iter().filter(|range| !had.contains(range)) {
            self.source_ranges
                .insert(&range.key(id), 1, 0)
                .map_err(map_error(SOURCE_RANGES_MAP))?;
        }
        if wanted.is_empty() {
            self.ranges_by_id.remove(&id);
        } else {
            self.ranges_by_id.insert(id, wanted.to_vec());
        }
        Ok(had
            .into_iter()
            .filter(|range| !wanted.contains(range))
            .collect())
    }

    fn remove_ranges(&mut self, id: u32, ranges: &[SourceRange]) {
        for range in ranges {
            // Already gone is fine: the goal is its absence.
            let _ = self.source_ranges.remove(&range.key(id));
        }
    }

    /// Removes a frontend and its counters; its flows in connection
    /// tracking stay until they end (their backends are unchanged).
    pub fn remove_service(&mut self, frontend: &Frontend) -> Result<()> {
        let key = frontend.key();
        let Some(installed) = self.installed.remove(&key) else {
            return Ok(());
        };
        match self.services.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(map_error(SERVICES_MAP)(source)),
        }
        if let Some(block) = installed.block {
            self.slots.free(block);
        }
        // A removed service's counters and ranges go with it (counters are
        // zeroed again when the id is reused).
        if let Some(ranges) = self.ranges_by_id.remove(&installed.value.id) {
            self.remove_ranges(installed.value.id, &ranges);
        }
        self.reset_counters(SERVICE_STATS_MAP, installed.value.id)?;
        self.free_ids.push(installed.value.id);
        let stale: Vec<AffinityKey> = self
            .affinity
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|key| key.service_id == installed.value.id)
            .collect();
        for key in stale {
            let _ = self.affinity.remove(&key);
        }
        Ok(())
    }

    /// The installed value of a frontend.
    #[must_use]
    pub fn service(&self, frontend: &Frontend) -> Option<ServiceValue> {
        self.installed
            .get(&frontend.key())
            .map(|installed| installed.value)
    }

    /// The backend a Maglev table slot names.
    #[must_use]
    pub fn maglev_slot(&self, index: u32) -> Option<BackendId> {
        self.maglev.slot(index)
    }

    /// How full the maps the agent writes are: (map, used, capacity).
    #[must_use]
    pub fn fill(&self) -> Vec<(&'static str, u64, u64)> {
        let maglev_capacity = u64::from(self.slots.capacity());
        vec![
            (
                SERVICES_MAP,
                self.installed.len() as u64,
                u64::from(self.service_stats.len()),
            ),
            (
                BACKENDS_MAP,
                self.backend_values.len() as u64,
                u64::from(self.backends.len()),
            ),
            (
                MAGLEV_MAP,
                maglev_capacity - u64::from(self.slots.free_slots()),
                maglev_capacity,
            ),
        ]
    }

    /// Slots of the Maglev array not owned by a table.
    #[must_use]
    pub fn maglev_free_slots(&self) -> u32 {
        self.slots.free_slots()
    }

    /// Every connection-tracking entry.
    pub fn ct_entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        self.ct
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_error(CT_MAP))
    }

    /// Packets and bytes of a frontend id, summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<CounterValue> {
        sum_counters(&self.service_stats, SERVICE_STATS_MAP, id)
    }

    /// Packets and bytes sent to a backend, summed over CPUs.
    pub fn backend_counters(&self, id: BackendId) -> Result<CounterValue> {
        sum_counters(&self.backend_stats, BACKEND_STATS_MAP, id)
    }

    /// Builds the Maglev table of `members` (Maglev key, id; sorted by
    /// key) into a newly allocated block; `None` when there are none.
    fn write_table(&mut self, members: &[(u64, BackendId)]) -> Result<Option<Block>> {
        if members.is_empty() {
            return Ok(None);
        }
        let count = u32::try_from(members.len()).unwrap_or(u32::MAX);
        let size = maglev::table_size(count, self.slots_per_backend);
        let block = self.slots.allocate(size).ok_or(Error::MaglevFull {
            needed: size,
            free: self.slots.free_slots(),
        })?;
        let keys: Vec<u64> = members.iter().map(|&(key, _)| key).collect();
        let mut table = vec![0u32; size as usize];
        let mut next = vec![0u32; keys.len()];
        maglev::populate(&keys, &mut table, &mut next);
        for slot in &mut table {
            *slot = members[*slot as usize].1;
        }
        if let Err(err) = self.maglev.write(block, &table) {
            self.slots.free(block);
            return Err(err);
        }
        Ok(Some(block))
    }

    fn allocate_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free_ids.pop() {
            return Some(id);
        }
        let capacity = self.service_stats.len();
        (self.next_id < capacity).then(|| {
            self.next_id += 1;
            self.next_id - 1
        })
    }

    fn reset_counters(&mut self, name: &'static str, id: u32) -> Result<()> {
        let map = if name == SERVICE_STATS_MAP {
            &mut self.service_stats
        } else {
            &mut self.backend_stats
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| Error::Cpus(source))?;
        let zeros =
            PerCpuValues::try_from(vec![CounterValue::default(); cpus]).map_err(Error::Cpus)?;
        map.set(id, zeros, 0).map_err(map_error(name))
    }

    fn purge_backend_flows(&mut self, id: BackendId) -> Result<()> {
        let flows: Vec<CtKey> = self
            .ct
            .iter()
            .filter_map(std::result::Result::ok)
            .filter(|(_, entry)| entry.backend_id == id)
            .map(|(key, _)| key)
            .collect();
        for key in flows {
            match self.ct.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(map_error(CT_MAP)(source)),
            }
        }
        let stale: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(std::result::Result::ok)
            .filter(|(_, value)| value.backend_id == id)
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            let _ = self.affinity.remove(&key);
        }
        Ok(())
    }
}

const fn on_empty(policy: &ServicePolicy) -> u8 {
    if policy.drop_when_empty {
        EMPTY_DROP
    } else {
        EMPTY_REJECT
    }
}

fn sum_counters(
    map: &PerCpuArray<MapData, CounterValue>,
    name: &'static str,
    id: u32,
) -> Result<CounterValue> {
    let values = map.get(&id, 0).map_err(map_error(name))?;
    Ok(values
        .iter()
        .fold(CounterValue::default(), |sum, value| sum.add(*value)))
}
