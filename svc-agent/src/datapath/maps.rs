//! Writing the datapath's maps: addresses, backends, services with their
//! Maglev tables, and reading connection tracking. This is the only code
//! that writes them; the agent and the tests both go through it.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::Ipv4Addr,
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
        ADDRS_MAP, AFFINITY_MAP, BACKEND_STATS_MAP, BACKENDS_MAP, Backend, BackendId, CIDRS_MAP,
        MAGLEV_MAP, MAX_NODE_ADDRS, MEMBERS_MAP, MemberKey, SERVICE_STATS_MAP, SERVICES_MAP,
        SOURCE_RANGES_MAP, ServiceKey, ServiceValue, SourceRangeKey,
    },
    maglev,
    stats::CounterValue,
    wire::FrontendId,
};

use super::{
    BackendSpec, Error, Frontend, Ipv4Cidr, Result, ServicePolicy,
    addrs::Addrs,
    conntrack::SweepMaps,
    ids::IdPool,
    maglev::{Block, MaglevArea, SlotAllocator},
};

/// The source-range trie's key for a CIDR of frontend `service_id`: the
/// id always matches whole, then the CIDR's prefix.
fn range_key(range: Ipv4Cidr, service_id: FrontendId) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        32 + u32::from(range.prefix()),
        SourceRangeKey {
            service_id,
            addr: range.addr().into(),
        },
    )
}

/// A frontend as installed.
#[derive(Debug)]
struct Installed {
    value: ServiceValue,
    block: Option<Block>,
    /// Backend ids, sorted.
    backends: Vec<BackendId>,
}

/// What an update of a frontend wrote before switching its entry, undone
/// if the switch fails ([`Maps::unstage`]).
struct Staged {
    id: FrontendId,
    /// The new table's block.
    block: Option<Block>,
    /// The id, if allocated for this update.
    new_id: Option<FrontendId>,
    /// The record of ranges before the update, once replaced.
    ranges_had: Option<Vec<Ipv4Cidr>>,
    ranges_added: Vec<Ipv4Cidr>,
    /// The record of members before the update, once replaced.
    members_had: Option<Vec<BackendId>>,
    members_added: Vec<BackendId>,
}

/// Records `items` under `id`; an empty list is no record.
fn record<T>(records: &mut StdHashMap<FrontendId, Vec<T>>, id: FrontendId, items: Vec<T>) {
    if items.is_empty() {
        records.remove(&id);
    } else {
        records.insert(id, items);
    }
}

/// The datapath's maps, owned by the agent.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, Backend>,
    addrs: Addrs,
    ct: HashMap<MapData, CtKey, CtEntry>,
    ct_capacity: u32,
    affinity_capacity: u32,
    service_stats: PerCpuArray<MapData, CounterValue>,
    backend_stats: PerCpuArray<MapData, CounterValue>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    /// Each frontend id's source ranges, sorted.
    ranges_by_id: StdHashMap<FrontendId, Vec<Ipv4Cidr>>,
    member_map: HashMap<MapData, MemberKey, u32>,
    /// Each affinity frontend id's members (its table's backends).
    members: StdHashMap<FrontendId, Vec<BackendId>>,
    maglev: MaglevArea,
    slots: SlotAllocator,
    slots_per_backend: u32,
    installed: StdHashMap<ServiceKey, Installed>,
    backend_values: StdHashMap<BackendId, Backend>,
    /// Frontend ids (index the per-frontend counters).
    ids: IdPool<FrontendId>,
    /// Handles for sweeps of connection tracking on another thread.
    sweep: SweepMaps,
    /// Backend ids that live flows named when the maps were adopted.
    named_backends: HashSet<BackendId>,
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
        let addrs = Addrs::new(
            HashMap::try_from(take(ebpf, ADDRS_MAP)?).map_err(map_error(ADDRS_MAP))?,
            Array::try_from(take(ebpf, CIDRS_MAP)?).map_err(map_error(CIDRS_MAP))?,
        );
        let affinity_map = take(ebpf, AFFINITY_MAP)?;
        let ct_map = take(ebpf, CT_MAP)?;
        let sweep = match (&ct_map, &affinity_map) {
            (Map::LruHashMap(ct), Map::LruHashMap(affinity)) => {
                SweepMaps::new(ct, affinity).map_err(Error::Dup)?
            }
            _ => return Err(Error::MissingMap(CT_MAP)),
        };
        let ct_capacity = match &ct_map {
            Map::LruHashMap(data) => data.info().map_err(map_error(CT_MAP))?.max_entries(),
            _ => 0,
        };
        let affinity_capacity = match &affinity_map {
            Map::LruHashMap(data) => data.info().map_err(map_error(AFFINITY_MAP))?.max_entries(),
            _ => 0,
        };
        let ct = HashMap::try_from(ct_map).map_err(map_error(CT_MAP))?;
        let service_stats = PerCpuArray::try_from(take(ebpf, SERVICE_STATS_MAP)?)
            .map_err(map_error(SERVICE_STATS_MAP))?;
        let backend_stats = PerCpuArray::try_from(take(ebpf, BACKEND_STATS_MAP)?)
            .map_err(map_error(BACKEND_STATS_MAP))?;
        let source_ranges = LpmTrie::try_from(take(ebpf, SOURCE_RANGES_MAP)?)
            .map_err(map_error(SOURCE_RANGES_MAP))?;
        let member_map =
            HashMap::try_from(take(ebpf, MEMBERS_MAP)?).map_err(map_error(MEMBERS_MAP))?;
        let Map::Array(maglev_data) = take(ebpf, MAGLEV_MAP)? else {
            return Err(Error::MissingMap(MAGLEV_MAP));
        };
        let maglev_slots = maglev_data
            .info()
            .map_err(map_error(MAGLEV_MAP))?
            .max_entries();
        let maglev = MaglevArea::new(maglev_data, maglev_slots)?;
        let capacity = service_stats.len();
        Ok(Self {
            services,
            backends,
            addrs,
            ct,
            ct_capacity,
            affinity_capacity,
            service_stats,
            backend_stats,
            source_ranges,
            ranges_by_id: StdHashMap::new(),
            member_map,
            members: StdHashMap::new(),
            maglev,
            slots: SlotAllocator::new(maglev_slots),
            slots_per_backend: slots_per_backend.max(1),
            installed: StdHashMap::new(),
            backend_values: StdHashMap::new(),
            ids: IdPool::new(0, capacity),
            sweep,
            named_backends: HashSet::new(),
        })
    }

    /// Rebuilds the bookkeeping from the maps' contents: maps pinned by a
    /// previous run keep their services, backends, tables and connection
    /// tracking, and this run carries on from them. `named` are the
    /// (frontend, backend) ids live flows name: ids only they name stay
    /// reserved until a sweep finds them unnamed.
    pub(super) fn adopt(&mut self, named: (HashSet<FrontendId>, HashSet<BackendId>)) -> Result<()> {
        self.addrs.adopt()?;
        for (index, backend) in self.backends.iter().enumerate() {
            let backend = backend.map_err(map_error(BACKENDS_MAP))?;
            // Index 0 is never a backend; whatever it holds is unused.
            if let Some(id) = u32::try_from(index).ok().and_then(BackendId::new)
                && !backend.addr.is_unspecified()
            {
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
            let range = u8::try_from(prefix)
                .ok()
                .and_then(|prefix| Ipv4Cidr::new(data.addr.into(), prefix));
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
        for entry in self.member_map.keys() {
            let key = entry.map_err(map_error(MEMBERS_MAP))?;
            // A member 0 names no backend: nothing to keep of it.
            if let Some(backend_id) = BackendId::new(key.backend_id) {
                self.members
                    .entry(key.service_id)
                    .or_default()
                    .push(backend_id);
            }
        }
        let mut used_ids = HashSet::new();
        for (key, value) in entries {
            // Pinned values come from another run, perhaps another version:
            // checked before any arithmetic trusts them.
            if value.id.get() >= self.service_stats.len() || !used_ids.insert(value.id) {
                return Err(Error::Adopt(format!(
                    "frontend {key:?}: its id {} is out of range or another frontend's",
                    value.id
                )));
            }
            if value.maglev_size > maglev::MAX_TABLE_SIZE
                || (value.maglev_size == 0) != (value.backend_count == 0)
            {
                return Err(Error::Adopt(format!(
                    "frontend {key:?}: a Maglev table of {} slots for {} backends is not one this agent writes",
                    value.maglev_size, value.backend_count
                )));
            }
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
            let slots = match block {
                Some(block) => self.maglev.read(block)?,
                None => Vec::new(),
            };
            let Some(mut backends) = slots
                .into_iter()
                .map(BackendId::new)
                .collect::<Option<Vec<BackendId>>>()
            else {
                return Err(Error::Adopt(format!(
                    "frontend {key:?}: its Maglev table names backend 0 (no backend)"
                )));
            };
            backends.sort_unstable();
            backends.dedup();
            self.installed.insert(
                key,
                Installed {
                    value,
                    block,
                    backends,
                },
            );
        }
        self.ids.adopt(&used_ids, &named.0);
        self.named_backends = named.1;
        Ok(())
    }

    /// Backend ids that live flows named when the maps were adopted.
    #[must_use]
    pub fn named_backends(&self) -> &HashSet<BackendId> {
        &self.named_backends
    }

    /// Handles for sweeping connection tracking on another thread.
    #[must_use]
    pub const fn sweep_maps(&self) -> &SweepMaps {
        &self.sweep
    }

    /// The frontend ids, for sweeps.
    pub fn frontend_ids(&mut self) -> &mut IdPool<FrontendId> {
        &mut self.ids
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

    /// The node addresses, ClusterIPs and CIDR sets.
    #[must_use]
    pub const fn addrs(&self) -> &Addrs {
        &self.addrs
    }

    pub fn addrs_mut(&mut self) -> &mut Addrs {
        &mut self.addrs
    }

    /// Sets the node's own addresses (where node ports answer).
    pub fn set_node_addrs(&mut self, addrs: &[Ipv4Addr]) -> Result<()> {
        self.addrs.set_nodes(addrs)
    }

    /// Writes backend `id`: a new one (its counters start at zero), or new
    /// flags for the same address. An id never moves to another address
    /// while installed: flows name it.
    pub fn set_backend(&mut self, id: BackendId, spec: &BackendSpec) -> Result<()> {
        if id.get() >= self.backends.len() {
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
        if let Some(old) = old
            && (old.addr, old.port) != (value.addr, value.port)
        {
            return Err(Error::BackendMoved {
                id,
                from: BackendSpec::from_value(old).addr,
                to: spec.addr,
            });
        }
        self.backends
            .set(id.get(), value, 0)
            .map_err(map_error(BACKENDS_MAP))?;
        if old.is_none() {
            self.reset_counters(BACKEND_STATS_MAP, id.get())?;
        }
        self.backend_values.insert(id, value);
        Ok(())
    }

    /// Removes backend `id`, which no table may still name. Its flows are
    /// left alone: connection tracking holds their addresses, so TCP
    /// connections finish on the pod that served them (a sweep clears the
    /// UDP ones), and the caller keeps the id reserved while flows name
    /// it. Affinity to it lapses: the datapath ignores an entry naming a
    /// removed backend, and a sweep deletes it.
    pub fn remove_backend(&mut self, id: BackendId) -> Result<()> {
        if self.backend_values.remove(&id).is_none() {
            return Ok(());
        }
        if let Some(key) = self
            .installed
            .iter()
            .find_map(|(key, installed)| installed.backends.contains(&id).then_some(*key))
        {
            if let Ok(value) = self.backends.get(&id.get(), 0) {
                self.backend_values.insert(id, value);
            }
            return Err(Error::BackendInUse { id, service: key });
        }
        self.backends
            .set(id.get(), Backend::default(), 0)
            .map_err(map_error(BACKENDS_MAP))
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
    ) -> Result<FrontendId> {
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
            && previous.value.on_empty == policy.on_empty()
            && self.ranges(previous.value.id) == policy.source_ranges.as_slice()
        {
            return Ok(previous.value.id);
        }

        let count = u32::try_from(members.len()).unwrap_or(u32::MAX);
        let block = self.write_table(&members)?;
        let (id, new_id) = if let Some(id) = previous_id {
            (id, None)
        } else if let Some(id) = self.ids.allocate() {
            (id, Some(id))
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
            maglev_size: block.map_or(0, |block| block.len),
            backend_count: count,
            affinity_timeout_secs: policy.affinity_timeout_secs.unwrap_or(0),
            flags,
            on_empty: policy.on_empty(),
            _pad: 0,
        };
        // The members an affinity entry may name.
        let members: &[BackendId] = if policy.affinity_timeout_secs.is_some() {
            &ids
        } else {
            &[]
        };
        let mut staged = Staged {
            id,
            block,
            new_id,
            ranges_had: None,
            ranges_added: Vec::new(),
            members_had: None,
            members_added: Vec::new(),
        };
        let (stale, gone) =
            match self.switch(key, value, &policy.source_ranges, members, &mut staged) {
                Ok(lost) => lost,
                Err(err) => {
                    self.unstage(staged);
                    return Err(err);
                }
            };
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
            self.slots.retire(old_block);
        }
        self.remove_ranges(id, &stale);
        self.remove_members(id, &gone);
        Ok(id)
    }

    /// Writes what the new entry `value` needs (zeroed counters for a new
    /// id; the source ranges and members it gains, before the entry says
    /// to check them), then the entry itself; each step is recorded in
    /// `staged`. Returns the ranges and members it lost, to delete once
    /// the old entry is gone.
    fn switch(
        &mut self,
        key: ServiceKey,
        value: ServiceValue,
        ranges: &[Ipv4Cidr],
        members: &[BackendId],
        staged: &mut Staged,
    ) -> Result<(Vec<Ipv4Cidr>, Vec<BackendId>)> {
        if staged.new_id.is_some() {
            self.reset_counters(SERVICE_STATS_MAP, value.id.get())?;
        }
        let stale = self.add_ranges(ranges, staged)?;
        let gone = self.add_members(members, staged)?;
        self.services
            .insert(key, value, 0)
            .map_err(map_error(SERVICES_MAP))?;
        Ok((stale, gone))
    }

    /// Undoes what [`Maps::switch`] wrote before it failed: the old entry
    /// stays, with its ranges, members and block, and nothing else.
    fn unstage(&mut self, staged: Staged) {
        let id = staged.id;
        if let Some(block) = staged.block {
            // Never published: free at once.
            self.slots.free(block);
        }
        self.remove_ranges(id, &staged.ranges_added);
        if let Some(had) = staged.ranges_had {
            record(&mut self.ranges_by_id, id, had);
        }
        self.remove_members(id, &staged.members_added);
        if let Some(had) = staged.members_had {
            record(&mut self.members, id, had);
        }
        if let Some(id) = staged.new_id {
            self.ids.unallocate(id);
        }
    }

    /// Records `wanted` as the frontend's members, inserting those it lacks
    /// (noted in `staged`); returns those it had and no longer wants. The
    /// ones it loses are deleted once the new table is in place.
    fn add_members(&mut self, wanted: &[BackendId], staged: &mut Staged) -> Result<Vec<BackendId>> {
        let id = staged.id;
        let had = self.members.get(&id).cloned().unwrap_or_default();
        for &backend_id in wanted.iter().filter(|member| !had.contains(member)) {
            let key = MemberKey {
                service_id: id,
                backend_id: backend_id.get(),
            };
            self.member_map
                .insert(key, 0, 0)
                .map_err(map_error(MEMBERS_MAP))?;
            staged.members_added.push(backend_id);
        }
        record(&mut self.members, id, wanted.to_vec());
        let gone = had
            .iter()
            .filter(|member| !wanted.contains(member))
            .copied()
            .collect();
        staged.members_had = Some(had);
        Ok(gone)
    }

    /// Deletes `members` of frontend `id` from the map and the record.
    fn remove_members(&mut self, id: FrontendId, members: &[BackendId]) {
        for &backend_id in members {
            // Already gone is fine: the goal is its absence.
            let _ = self.member_map.remove(&MemberKey {
                service_id: id,
                backend_id: backend_id.get(),
            });
        }
        if let Some(record) = self.members.get_mut(&id) {
            record.retain(|member| !members.contains(member));
            if record.is_empty() {
                self.members.remove(&id);
            }
        }
    }

    fn ranges(&self, id: FrontendId) -> &[Ipv4Cidr] {
        self.ranges_by_id.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Inserts the ranges of `wanted` the frontend lacks (noted in
    /// `staged`) and records `wanted` as its ranges; returns those it had
    /// and no longer wants.
    fn add_ranges(&mut self, wanted: &[Ipv4Cidr], staged: &mut Staged) -> Result<Vec<Ipv4Cidr>> {
        let id = staged.id;
        let had = self.ranges(id).to_vec();
        for range in wanted.iter().filter(|range| !had.contains(range)) {
            self.source_ranges
                .insert(&range_key(*range, id), 1, 0)
                .map_err(map_error(SOURCE_RANGES_MAP))?;
            staged.ranges_added.push(*range);
        }
        record(&mut self.ranges_by_id, id, wanted.to_vec());
        let stale = had
            .iter()
            .filter(|range| !wanted.contains(range))
            .copied()
            .collect();
        staged.ranges_had = Some(had);
        Ok(stale)
    }

    fn remove_ranges(&mut self, id: FrontendId, ranges: &[Ipv4Cidr]) {
        for range in ranges {
            // Already gone is fine: the goal is its absence.
            let _ = self.source_ranges.remove(&range_key(*range, id));
        }
    }

    /// Removes a frontend and zeroes its counters. Its flows in connection
    /// tracking finish (a sweep clears the UDP ones), and its id stays
    /// reserved while flows name it; affinity entries under it are
    /// unreachable and a sweep deletes them.
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
            self.slots.retire(block);
        }
        // A removed service's counters, ranges and members go with it
        // (counters are zeroed again when the id is reused).
        if let Some(ranges) = self.ranges_by_id.remove(&installed.value.id) {
            self.remove_ranges(installed.value.id, &ranges);
        }
        if let Some(members) = self.members.remove(&installed.value.id) {
            self.remove_members(installed.value.id, &members);
        }
        self.reset_counters(SERVICE_STATS_MAP, installed.value.id.get())?;
        self.ids.release(installed.value.id);
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
        self.maglev.slot(index).and_then(BackendId::new)
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
            (
                ADDRS_MAP,
                self.addrs.len() as u64,
                u64::from(self.service_stats.len()) + u64::from(MAX_NODE_ADDRS),
            ),
        ]
    }

    /// Capacity of connection tracking (entries; two per flow).
    #[must_use]
    pub const fn ct_capacity(&self) -> u32 {
        self.ct_capacity
    }

    /// Capacity of session affinity (entries; one per client and service).
    #[must_use]
    pub const fn affinity_capacity(&self) -> u32 {
        self.affinity_capacity
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
    pub fn service_counters(&self, id: FrontendId) -> Result<CounterValue> {
        sum_counters(&self.service_stats, SERVICE_STATS_MAP, id.get())
    }

    /// Packets and bytes sent to a backend, summed over CPUs.
    pub fn backend_counters(&self, id: BackendId) -> Result<CounterValue> {
        sum_counters(&self.backend_stats, BACKEND_STATS_MAP, id.get())
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
        let mut scratch = vec![maglev::Preference::default(); keys.len()];
        maglev::populate(&keys, &mut table, &mut scratch);
        for slot in &mut table {
            *slot = members[*slot as usize].1.get();
        }
        if let Err(err) = self.maglev.write(block, &table) {
            self.slots.free(block);
            return Err(err);
        }
        Ok(Some(block))
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
