//! Bringing the maps to the desired state: a diff against what this agent
//! installed, writing only what changed. A frontend whose policy and
//! endpoints are unchanged costs one comparison; only changed frontends
//! touch backends. Backends shared by several frontends are stored once,
//! reference-counted by the frontends naming them; a frontend's table is
//! replaced in one update, and a backend is removed (ending its flows)
//! only after no table names it any more.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
};

use svc_common::lb::BackendId;

use crate::{
    datapath::{BackendSpec, Frontend, Maps, ServicePolicy},
    model::{Desired, Endpoint},
};

/// What one [`Applier::apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    /// Writes that failed, naming the frontend or backend; everything else
    /// was applied and what was installed before stays.
    pub errors: Vec<String>,
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InstalledBackend {
    id: BackendId,
    spec: BackendSpec,
    /// Frontends naming it.
    refs: usize,
}

/// The agent's record of what it wrote.
#[derive(Debug, Default)]
pub struct Applier {
    frontends: BTreeMap<Frontend, InstalledFrontend>,
    backends: HashMap<SocketAddrV4, InstalledBackend>,
    node_addrs: Vec<Ipv4Addr>,
    free_ids: Vec<BackendId>,
    next_id: BackendId,
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
            next_id: 1,
            ..Self::default()
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
            applier.next_id = applier.next_id.max(id + 1);
        }
        let used: BTreeSet<BackendId> = by_id.keys().copied().collect();
        applier.free_ids = (1..applier.next_id)
            .filter(|id| !used.contains(id))
            .collect();
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
            applier
                .frontends
                .insert(frontend, InstalledFrontend { policy, endpoints });
        }
        applier.node_addrs = maps.installed_node_addrs();
        applier
    }

    /// Number of frontends and backends installed.
    #[must_use]
    pub fn sizes(&self) -> (usize, usize) {
        (self.frontends.len(), self.backends.len())
    }

    /// The id of the backend at `addr`, if installed.
    #[must_use]
    pub fn backend_id(&self, addr: SocketAddrV4) -> Option<BackendId> {
        self.backends.get(&addr).map(|b| b.id)
    }

    pub fn apply(&mut self, maps: &mut Maps, desired: &Desired) -> Report {
        let mut report = Report::default();
        let mut node_addrs = desired.node_addrs.clone();
        node_addrs.sort_unstable();
        node_addrs.dedup();
        if self.node_addrs != node_addrs {
            match maps.set_node_addrs(&node_addrs) {
                Ok(()) => self.node_addrs = node_addrs,
                Err(err) => report.errors.push(format!("node addresses: {err}")),
            }
        }

        for (frontend, spec) in &desired.frontends {
            let unchanged = self
                .frontends
                .get(frontend)
                .is_some_and(|i| i.policy == spec.policy && i.endpoints == spec.endpoints);
            if !unchanged {
                let want = InstalledFrontend {
                    policy: spec.policy.clone(),
                    endpoints: spec.endpoints.clone(),
                };
                let service = spec.service.to_string();
                self.write_frontend(maps, *frontend, want, &service, &mut report);
            }
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
                }
                Err(err) => report.errors.push(format!("removing {frontend:?}: {err}")),
            }
        }
        self.remove_unreferenced(maps, &mut report);
        report
    }

    /// Writes one frontend: its backends first, then its table.
    fn write_frontend(
        &mut self,
        maps: &mut Maps,
        frontend: Frontend,
        want: InstalledFrontend,
        service: &str,
        report: &mut Report,
    ) {
        let mut ids = Vec::with_capacity(want.endpoints.len());
        let mut taken = Vec::with_capacity(want.endpoints.len());
        for endpoint in &want.endpoints {
            if let Some(id) = self.hold_backend(maps, spec_of(*endpoint), report) {
                ids.push(id);
                taken.push(endpoint.addr);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        match maps.upsert_service(&frontend, &want.policy, &ids) {
            Ok(_) => {
                if let Some(old) = self.frontends.insert(frontend, want) {
                    self.release(&old.endpoints);
                }
                report.frontends_written += 1;
            }
            Err(err) => {
                for addr in taken {
                    if let Some(backend) = self.backends.get_mut(&addr) {
                        backend.refs -= 1;
                    }
                }
                report
                    .errors
                    .push(format!("{frontend:?} of {service}: {err}"));
            }
        }
    }

    /// Takes a reference on the backend at `spec.addr`, writing it if it is
    /// new or its flags changed.
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
                    Err(err) => report.errors.push(format!("backend {}: {err}", spec.addr)),
                }
            }
            installed.refs += 1;
            return Some(installed.id);
        }
        let id = self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        });
        match maps.set_backend(id, &spec) {
            Ok(()) => {
                self.backends
                    .insert(spec.addr, InstalledBackend { id, spec, refs: 1 });
                report.backends_added += 1;
                Some(id)
            }
            Err(err) => {
                self.free_ids.push(id);
                report.errors.push(format!("backend {}: {err}", spec.addr));
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

    /// Removes backends no table names any more (ending their flows).
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
                    self.free_ids.push(id);
                    report.backends_removed += 1;
                }
                Err(err) => report
                    .errors
                    .push(format!("removing backend {addr}: {err}")),
            }
        }
    }
}
