//! Bringing the maps to the desired state: a diff against what this agent
//! installed, writing only what changed. Backends shared by several
//! frontends are stored once (reference-counted by the frontends naming
//! them); a frontend's table is replaced in one update, and a backend is
//! removed (ending its flows) only after no table names it any more.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use svc_common::lb::BackendId;

use crate::{
    datapath::{BackendSpec, Frontend, Maps, ServicePolicy},
    model::Desired,
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
    ids: Vec<BackendId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InstalledBackend {
    id: BackendId,
    spec: BackendSpec,
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
        for (id, spec) in maps.installed_backends() {
            applier
                .backends
                .insert(spec.addr, InstalledBackend { id, spec });
            applier.next_id = applier.next_id.max(id + 1);
        }
        let used: BTreeSet<BackendId> = applier.backends.values().map(|b| b.id).collect();
        applier.free_ids = (1..applier.next_id)
            .filter(|id| !used.contains(id))
            .collect();
        for (frontend, policy, ids) in maps.installed_frontends() {
            applier
                .frontends
                .insert(frontend, InstalledFrontend { policy, ids });
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

        // Backends first, so every table can name them.
        let mut wanted: HashMap<SocketAddrV4, BackendSpec> =
            HashMap::with_capacity(self.backends.len());
        for spec in desired.frontends.values() {
            for endpoint in &spec.endpoints {
                let entry = wanted.entry(endpoint.addr).or_insert(BackendSpec {
                    addr: endpoint.addr,
                    local: endpoint.local,
                    terminating: endpoint.terminating,
                });
                // Terminating only if every service sees it so.
                entry.terminating &= endpoint.terminating;
            }
        }
        for (addr, spec) in &wanted {
            self.write_backend(maps, *addr, *spec, &mut report);
        }

        for (frontend, spec) in &desired.frontends {
            let mut ids: Vec<BackendId> = spec
                .endpoints
                .iter()
                .filter_map(|endpoint| self.backends.get(&endpoint.addr).map(|b| b.id))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            let want = InstalledFrontend {
                policy: spec.policy,
                ids,
            };
            if self.frontends.get(frontend) == Some(&want) {
                continue;
            }
            match maps.upsert_service(frontend, &want.policy, &want.ids) {
                Ok(_) => {
                    self.frontends.insert(*frontend, want);
                    report.frontends_written += 1;
                }
                Err(err) => report
                    .errors
                    .push(format!("{frontend:?} of {}: {err}", spec.service)),
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
                    self.frontends.remove(&frontend);
                    report.frontends_removed += 1;
                }
                Err(err) => report.errors.push(format!("removing {frontend:?}: {err}")),
            }
        }

        // Backends no table names any more.
        let named: HashSet<BackendId> = self
            .frontends
            .values()
            .flat_map(|f| f.ids.iter().copied())
            .collect();
        let unused: Vec<(SocketAddrV4, BackendId)> = self
            .backends
            .iter()
            .filter(|(addr, b)| !wanted.contains_key(addr) && !named.contains(&b.id))
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
        report
    }

    fn write_backend(
        &mut self,
        maps: &mut Maps,
        addr: SocketAddrV4,
        spec: BackendSpec,
        report: &mut Report,
    ) {
        if let Some(installed) = self.backends.get(&addr) {
            if installed.spec != spec {
                match maps.set_backend(installed.id, &spec) {
                    Ok(()) => {
                        let id = installed.id;
                        self.backends.insert(addr, InstalledBackend { id, spec });
                    }
                    Err(err) => report.errors.push(format!("backend {addr}: {err}")),
                }
            }
            return;
        }
        let id = self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        });
        match maps.set_backend(id, &spec) {
            Ok(()) => {
                self.backends.insert(addr, InstalledBackend { id, spec });
                report.backends_added += 1;
            }
            Err(err) => {
                self.free_ids.push(id);
                report.errors.push(format!("backend {addr}: {err}"));
            }
        }
    }
}
