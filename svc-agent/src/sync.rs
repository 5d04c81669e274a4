//! Bringing the maps to the desired state: a diff against what this agent
//! installed, writing only what changed. A frontend whose policy and
//! endpoints are unchanged costs one comparison; only changed frontends
//! touch backends. Backends shared by several frontends are stored once,
//! reference-counted by the frontends naming them; a frontend's table is
//! replaced in one update, and a backend is removed only after no table
//! names it any more.
//!
//! Removing a frontend or a backend never cuts its flows: connection
//! tracking holds their addresses, so established TCP connections finish
//! where they are, as with kube-proxy. A sweep of connection tracking
//! ([`crate::datapath::conntrack`]) afterwards clears the UDP flows whose
//! endpoint stopped serving their frontend, and reports which ids live
//! flows still name: released ids are reused only once none does.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddrV4,
};

use svc_common::{config::DatapathConfig, lb::BackendId};

use crate::{
    datapath::{
        self, BackendSpec, CidrSetKind, Frontend, Ipv4Cidr, Maps, Protocol, ServicePolicy,
        conntrack::{SweepPlan, SweepReport},
        ids::IdPool,
    },
    model::{Desired, Endpoint},
};

/// A write [`Applier::apply`] could not make; what was installed before
/// stays, and the next apply tries again.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("addresses left over from an earlier failure: {0}")]
    LeftoverAddrs(#[source] datapath::Error),
    #[error("node addresses: {0}")]
    NodeAddrs(#[source] datapath::Error),
    #[error("ClusterIPs: {0}")]
    ClusterIps(#[source] datapath::Error),
    #[error("{kind:?} CIDRs: {source}")]
    Cidrs {
        kind: CidrSetKind,
        #[source]
        source: datapath::Error,
    },
    #[error("{frontend:?} of {service}: {source}")]
    Frontend {
        frontend: Frontend,
        service: String,
        #[source]
        source: datapath::Error,
    },
    #[error("removing {frontend:?}: {source}")]
    RemoveFrontend {
        frontend: Frontend,
        #[source]
        source: datapath::Error,
    },
    #[error("backend {addr}: {source}")]
    Backend {
        addr: SocketAddrV4,
        #[source]
        source: datapath::Error,
    },
    #[error("backend {addr}: every backend id is in use or held by live flows")]
    NoBackendId { addr: SocketAddrV4 },
    #[error("removing backend {addr}: {source}")]
    RemoveBackend {
        addr: SocketAddrV4,
        #[source]
        source: datapath::Error,
    },
}

impl ApplyError {
    /// Every [`ApplyError::kind`].
    pub const KINDS: [&'static str; 5] =
        ["addresses", "cidrs", "frontend", "backend", "backend_ids"];

    /// What failed, as the `kind` label of `svc_sync_errors_total`.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::LeftoverAddrs(_) | Self::NodeAddrs(_) | Self::ClusterIps(_) => "addresses",
            Self::Cidrs { .. } => "cidrs",
            Self::Frontend { .. } | Self::RemoveFrontend { .. } => "frontend",
            Self::Backend { .. } | Self::RemoveBackend { .. } => "backend",
            Self::NoBackendId { .. } => "backend_ids",
        }
    }
}

/// What one [`Applier::apply`] did.
#[derive(Debug, Default)]
pub struct Report {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    /// Something a sweep of connection tracking acts on changed: a
    /// frontend or backend went, or a UDP frontend's serving endpoints.
    pub sweep_wanted: bool,
    /// Writes that failed, naming the frontend or backend; everything else
    /// was applied and what was installed before stays.
    pub errors: Vec<ApplyError>,
    /// Service or local CIDRs the datapath had no room for.
    pub cidrs_dropped: Vec<Ipv4Cidr>,
}

impl Report {
    #[must_use]
    pub fn changed(&self) -> bool {
        self.frontends_written
            + self.frontends_removed
            + self.backends_added
            + self.backends_removed
            > 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct InstalledFrontend {
    policy: ServicePolicy,
    endpoints: BTreeSet<Endpoint>,
    /// UDP: the endpoints serving it (see `FrontendSpec::serving`).
    serving: BTreeSet<SocketAddrV4>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InstalledBackend {
    id: BackendId,
    spec: BackendSpec,
    /// Frontends naming it.
    refs: usize,
}

/// A sweep under way: what it was given and the id epochs it may free.
#[derive(Debug)]
pub struct PendingSweep {
    pub plan: SweepPlan,
    backend_epoch: u64,
    frontend_epoch: u64,
}

/// The agent's record of what it wrote.
#[derive(Debug)]
pub struct Applier {
    frontends: BTreeMap<Frontend, InstalledFrontend>,
    backends: HashMap<SocketAddrV4, InstalledBackend>,
    /// Removed backends whose ids wait for a sweep, by address: a backend
    /// that comes back before takes its id back.
    retired: HashMap<SocketAddrV4, BackendId>,
    ids: IdPool<BackendId>,
}

impl Default for Applier {
    fn default() -> Self {
        Self::new()
    }
}

fn spec_of(endpoint: Endpoint) -> BackendSpec {
    BackendSpec {
        addr: endpoint.addr,
        local: endpoint.local,
        terminating: endpoint.terminating,
    }
}

impl Applier {
    #[must_use]
    pub fn new() -> Self {
        Self {
            frontends: BTreeMap::new(),
            backends: HashMap::new(),
            retired: HashMap::new(),
            // Id 0 means "none" to the datapath; the backends map bounds
            // the rest (a write past its capacity fails, naming it).
            ids: IdPool::new(1, u32::MAX),
        }
    }

    /// An applier that carries on from what the maps hold (pinned by an
    /// earlier run): its next [`Applier::apply`] writes only the
    /// differences, so flows and tables in use are left alone.
    #[must_use]
    pub fn adopt(maps: &Maps) -> Self {
        let mut applier = Self::new();
        let mut by_id = HashMap::new();
        for (id, spec) in maps.installed_backends() {
            applier
                .backends
                .insert(spec.addr, InstalledBackend { id, spec, refs: 0 });
            by_id.insert(id, spec);
        }
        let used: HashSet<BackendId> = by_id.keys().copied().collect();
        applier.ids.adopt(&used, maps.named_backends());
        for (frontend, policy, ids) in maps.installed_frontends() {
            let endpoints = ids
                .iter()
                .filter_map(|id| by_id.get(id))
                .map(|spec| Endpoint {
                    addr: spec.addr,
                    local: spec.local,
                    terminating: spec.terminating,
                })
                .collect::<BTreeSet<_>>();
            for endpoint in &endpoints {
                if let Some(backend) = applier.backends.get_mut(&endpoint.addr) {
                    backend.refs += 1;
                }
            }
            // The serving set is not in the maps: the first apply sets it
            // and sweeps.
            applier.frontends.insert(
                frontend,
                InstalledFrontend {
                    policy,
                    endpoints,
                    serving: BTreeSet::new(),
                },
            );
        }
        applier
    }

    /// Number of frontends and backends installed.
    #[must_use]
    pub fn sizes(&self) -> (usize, usize) {
        (self.frontends.len(), self.backends.len())
    }

    /// Backend ids waiting for a sweep to find them unnamed.
    #[must_use]
    pub fn retired_backends(&self) -> usize {
        self.ids.quarantined()
    }

    /// The id of the backend at `addr`, if installed.
    #[must_use]
    pub fn backend_id(&self, addr: SocketAddrV4) -> Option<BackendId> {
        self.backends.get(&addr).map(|b| b.id)
    }

    pub fn apply(&mut self, maps: &mut Maps, desired: &Desired) -> Report {
        let mut report = Report::default();
        Self::apply_addrs(maps, desired, &mut report);

        for (frontend, spec) in &desired.frontends {
            let installed = self.frontends.get_mut(frontend);
            let same_table = installed
                .as_ref()
                .is_some_and(|i| i.policy == spec.policy && i.endpoints == spec.endpoints);
            if same_table {
                if let Some(installed) = installed
                    && installed.serving != spec.serving
                {
                    installed.serving.clone_from(&spec.serving);
                    report.sweep_wanted = true;
                }
                continue;
            }
            let want = InstalledFrontend {
                policy: spec.policy.clone(),
                endpoints: spec.endpoints.clone(),
                serving: spec.serving.clone(),
            };
            let service = spec.service.to_string();
            self.write_frontend(maps, *frontend, want, &service, &mut report);
        }
        let stale: Vec<Frontend> = self
            .frontends
            .keys()
            .filter(|frontend| !desired.frontends.contains_key(frontend))
            .copied()
            .collect();
        for frontend in stale {
            match maps.remove_service(&frontend) {
                Ok(()) => {
                    if let Some(old) = self.frontends.remove(&frontend) {
                        self.release(&old.endpoints);
                    }
                    report.frontends_removed += 1;
                    report.sweep_wanted = true;
                }
                Err(source) => report
                    .errors
                    .push(ApplyError::RemoveFrontend { frontend, source }),
            }
        }
        self.remove_unreferenced(maps, &mut report);
        report
    }

    /// Node addresses, ClusterIPs and the CIDR sets.
    fn apply_addrs(maps: &mut Maps, desired: &Desired, report: &mut Report) {
        let addrs = maps.addrs_mut();
        if let Err(err) = addrs.flush() {
            report.errors.push(ApplyError::LeftoverAddrs(err));
        }
        let mut nodes = desired.node_addrs.clone();
        nodes.sort_unstable();
        nodes.dedup();
        if addrs.nodes() != nodes
            && let Err(err) = addrs.set_nodes(&nodes)
        {
            report.errors.push(ApplyError::NodeAddrs(err));
        }
        if addrs.cluster_ips() != &desired.cluster_ips
            && let Err(err) = addrs.set_cluster_ips(&desired.cluster_ips)
        {
            report.errors.push(ApplyError::ClusterIps(err));
        }
        for (kind, cidrs) in [
            (CidrSetKind::Service, &desired.service_cidrs),
            (CidrSetKind::Local, &desired.local_cidrs),
        ] {
            match addrs.set_cidrs(kind, cidrs) {
                Ok(dropped) => report.cidrs_dropped.extend(dropped),
                Err(source) => report.errors.push(ApplyError::Cidrs { kind, source }),
            }
        }
    }

    /// Writes one frontend: its backends first, then its table.
    fn write_frontend(
        &mut self,
        maps: &mut Maps,
        frontend: Frontend,
        mut want: InstalledFrontend,
        service: &str,
        report: &mut Report,
    ) {
        // One reference per address; an endpoint whose backend could not
        // be written is left out of the table and of the record, so the
        // next apply sees the difference and tries again.
        let mut held: BTreeMap<SocketAddrV4, BackendId> = BTreeMap::new();
        for endpoint in &want.endpoints {
            if held.contains_key(&endpoint.addr) {
                continue;
            }
            if let Some(id) = self.hold_backend(maps, spec_of(*endpoint), report) {
                held.insert(endpoint.addr, id);
            }
        }
        let mut ids: Vec<BackendId> = held.values().copied().collect();
        ids.sort_unstable();
        // What the maps hold (flags included, should a flag write have
        // failed), not what was wanted.
        want.endpoints = held
            .keys()
            .filter_map(|addr| self.backends.get(addr))
            .map(|backend| Endpoint {
                addr: backend.spec.addr,
                local: backend.spec.local,
                terminating: backend.spec.terminating,
            })
            .collect();
        match maps.upsert_service(&frontend, &want.policy, &ids) {
            Ok(_) => {
                if let Some(old) = self.frontends.insert(frontend, want) {
                    if frontend_protocol(frontend) == Protocol::Udp
                        && old.serving != self.frontends[&frontend].serving
                    {
                        report.sweep_wanted = true;
                    }
                    self.release(&old.endpoints);
                }
                report.frontends_written += 1;
            }
            Err(source) => {
                for addr in held.keys() {
                    if let Some(backend) = self.backends.get_mut(addr) {
                        backend.refs -= 1;
                    }
                }
                report.errors.push(ApplyError::Frontend {
                    frontend,
                    service: service.to_owned(),
                    source,
                });
            }
        }
    }

    /// Takes a reference on the backend at `spec.addr`, writing it if it is
    /// new or its flags changed. A backend that returns while its old id
    /// waits for a sweep takes that id back: its flows never left it.
    fn hold_backend(
        &mut self,
        maps: &mut Maps,
        spec: BackendSpec,
        report: &mut Report,
    ) -> Option<BackendId> {
        if let Some(installed) = self.backends.get_mut(&spec.addr) {
            if installed.spec != spec {
                match maps.set_backend(installed.id, &spec) {
                    Ok(()) => installed.spec = spec,
                    Err(source) => report.errors.push(ApplyError::Backend {
                        addr: spec.addr,
                        source,
                    }),
                }
            }
            installed.refs += 1;
            return Some(installed.id);
        }
        let reclaimed = self
            .retired
            .remove(&spec.addr)
            .filter(|&id| self.ids.reclaim(id));
        let Some(id) = reclaimed.or_else(|| self.ids.allocate()) else {
            report
                .errors
                .push(ApplyError::NoBackendId { addr: spec.addr });
            return None;
        };
        match maps.set_backend(id, &spec) {
            Ok(()) => {
                self.backends
                    .insert(spec.addr, InstalledBackend { id, spec, refs: 1 });
                report.backends_added += 1;
                Some(id)
            }
            Err(source) => {
                if reclaimed.is_some() {
                    self.ids.release(id);
                    self.retired.insert(spec.addr, id);
                } else {
                    self.ids.unallocate(id);
                }
                report.errors.push(ApplyError::Backend {
                    addr: spec.addr,
                    source,
                });
                None
            }
        }
    }

    fn release(&mut self, endpoints: &BTreeSet<Endpoint>) {
        for endpoint in endpoints {
            if let Some(backend) = self.backends.get_mut(&endpoint.addr) {
                backend.refs = backend.refs.saturating_sub(1);
            }
        }
    }

    /// Removes backends no table names any more; their ids wait for a
    /// sweep.
    fn remove_unreferenced(&mut self, maps: &mut Maps, report: &mut Report) {
        let unused: Vec<(SocketAddrV4, BackendId)> = self
            .backends
            .iter()
            .filter(|(_, b)| b.refs == 0)
            .map(|(addr, b)| (*addr, b.id))
            .collect();
        for (addr, id) in unused {
            match maps.remove_backend(id) {
                Ok(()) => {
                    self.backends.remove(&addr);
                    self.ids.release(id);
                    self.retired.insert(addr, id);
                    report.backends_removed += 1;
                    report.sweep_wanted = true;
                }
                Err(source) => report
                    .errors
                    .push(ApplyError::RemoveBackend { addr, source }),
            }
        }
    }

    /// Starts a sweep of connection tracking over what is installed now
    /// (`now_ns` is the datapath's clock, `config` what it was loaded
    /// with); run it with [`crate::datapath::conntrack::sweep`], anywhere,
    /// then hand its report to [`Applier::finish_sweep`].
    pub fn begin_sweep(
        &mut self,
        maps: &mut Maps,
        now_ns: u64,
        config: &DatapathConfig,
    ) -> PendingSweep {
        let frontends = self
            .frontends
            .iter()
            .filter_map(|(frontend, installed)| {
                let id = maps.service(frontend)?.id;
                let serving = (frontend_protocol(*frontend) == Protocol::Udp)
                    .then(|| installed.serving.iter().copied().collect());
                Some((id, serving))
            })
            .collect();
        PendingSweep {
            plan: SweepPlan {
                now_ns,
                config: *config,
                frontends,
                backends: self.backends.values().map(|b| b.id).collect(),
            },
            backend_epoch: self.ids.begin_sweep(),
            frontend_epoch: maps.frontend_ids().begin_sweep(),
        }
    }

    /// Frees the ids the sweep found no live flow naming. Returns how many
    /// (backend, frontend) ids were freed.
    pub fn finish_sweep(
        &mut self,
        maps: &mut Maps,
        pending: &PendingSweep,
        report: &SweepReport,
    ) -> (usize, usize) {
        let backends = self.ids.end_sweep(pending.backend_epoch, &report.backends);
        let ids = &self.ids;
        self.retired.retain(|_, id| ids.is_quarantined(*id));
        let frontends = maps
            .frontend_ids()
            .end_sweep(pending.frontend_epoch, &report.frontends);
        (backends, frontends)
    }
}

const fn frontend_protocol(frontend: Frontend) -> Protocol {
    match frontend {
        Frontend::Address { protocol, .. }
        | Frontend::NodePort { protocol, .. }
        | Frontend::AddressInCluster { protocol, .. }
        | Frontend::NodePortInCluster { protocol, .. } => protocol,
    }
}
