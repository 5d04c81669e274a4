//! The translation kept up to date service by service.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use crate::datapath::{Frontend, Ipv4Cidr};

use super::{
    Desired, FrontendSpec, HealthCheck, Inputs, LocalDetect, NodeInfo, ObjectKey, Problem,
    Settings, Translation, service::translate_service,
};

/// Gives each of `touched` to the first service (by namespace and name)
/// claiming it, or removes it when none does.
fn settle<K: Ord + Copy, V: Clone>(
    claims: &mut BTreeMap<K, BTreeMap<ObjectKey, V>>,
    desired: &mut BTreeMap<K, V>,
    touched: BTreeSet<K>,
) {
    for key in touched {
        if let Some(winner) = claims.get(&key).and_then(|claims| claims.values().next()) {
            desired.insert(key, winner.clone());
        } else {
            claims.remove(&key);
            desired.remove(&key);
        }
    }
}

/// What a [`Translator`] remembers of one service.
#[derive(Debug, Default)]
struct ServiceRecord {
    frontends: Vec<Frontend>,
    cluster_ips: Vec<Ipv4Addr>,
    health_check: Option<u16>,
    problems: Vec<Problem>,
}

/// The translation kept up to date service by service: [`Translator::update`]
/// re-derives only the services named, and a frontend two services claim
/// goes to the first by namespace and name, whatever the order of updates.
#[derive(Debug)]
pub struct Translator {
    node: NodeInfo,
    settings: Settings,
    /// Each service's frontends and problems (the specs live in
    /// `claims`).
    outputs: HashMap<ObjectKey, ServiceRecord>,
    /// Every service claiming each frontend; the first one serves it.
    claims: BTreeMap<Frontend, BTreeMap<ObjectKey, FrontendSpec>>,
    /// Likewise for health check node ports.
    health_claims: BTreeMap<u16, BTreeMap<ObjectKey, HealthCheck>>,
    /// Likewise for ClusterIPs (whether served here). The API server gives
    /// each address to one service, so a short list per address (not a
    /// map, which costs a node per address).
    ip_claims: HashMap<Ipv4Addr, Vec<(ObjectKey, bool)>>,
    desired: Desired,
}

impl Translator {
    #[must_use]
    pub fn new(node: NodeInfo, settings: Settings) -> Self {
        let mut translator = Self {
            node,
            settings,
            outputs: HashMap::new(),
            claims: BTreeMap::new(),
            health_claims: BTreeMap::new(),
            ip_claims: HashMap::new(),
            desired: Desired::default(),
        };
        translator
            .desired
            .node_addrs
            .clone_from(&translator.node.addrs);
        translator.desired.local_cidrs = translator.local_cidrs();
        translator
    }

    /// The sources counted as local, as the settings and the node say.
    fn local_cidrs(&self) -> Vec<Ipv4Cidr> {
        match &self.settings.local_detect {
            LocalDetect::Interface => Vec::new(),
            LocalDetect::ClusterCidr(cidrs) => cidrs.clone(),
            LocalDetect::NodeCidr => self.node.pod_cidrs.clone(),
        }
    }

    /// Changes this node's pod CIDRs (used when local traffic is detected
    /// by the node's CIDRs). Returns whether they changed.
    pub fn set_pod_cidrs(&mut self, cidrs: Vec<Ipv4Cidr>) -> bool {
        let changed = self.node.pod_cidrs != cidrs;
        self.node.pod_cidrs = cidrs;
        self.desired.local_cidrs = self.local_cidrs();
        changed
    }

    /// Sets the service CIDRs; returns whether they changed.
    pub fn set_service_cidrs(&mut self, cidrs: Vec<Ipv4Cidr>) -> bool {
        let changed = self.desired.service_cidrs != cidrs;
        self.desired.service_cidrs = cidrs;
        changed
    }

    /// The desired state as of the last update.
    #[must_use]
    pub const fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Number of services translated.
    #[must_use]
    pub fn services(&self) -> usize {
        self.outputs.len()
    }

    /// The services translated so far.
    pub fn service_keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.outputs.keys()
    }

    /// This node as the translation sees it.
    #[must_use]
    pub const fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Changes the addresses node ports answer on and the zone. Returns
    /// whether either changed: what topology hints keep depends on the
    /// zone, and which sources `loadBalancerSourceRanges` admit on the
    /// addresses, so every service must then be re-derived.
    pub fn set_node(&mut self, addrs: Vec<Ipv4Addr>, zone: Option<String>) -> bool {
        let changed = self.node.zone != zone || self.node.addrs != addrs;
        self.node.addrs.clone_from(&addrs);
        self.desired.node_addrs = addrs;
        self.node.zone = zone;
        changed
    }

    /// Re-derives the services in `dirty` (added, changed, removed, or
    /// whose slices changed) from `inputs`.
    pub fn update(&mut self, dirty: impl IntoIterator<Item = ObjectKey>, inputs: &impl Inputs) {
        let mut touched = BTreeSet::new();
        let mut touched_health = BTreeSet::new();
        let mut touched_ips = BTreeSet::new();
        for key in dirty {
            if let Some(old) = self.outputs.remove(&key) {
                for frontend in old.frontends {
                    if let Some(claims) = self.claims.get_mut(&frontend) {
                        claims.remove(&key);
                    }
                    touched.insert(frontend);
                }
                for addr in old.cluster_ips {
                    if let Some(claims) = self.ip_claims.get_mut(&addr) {
                        claims.retain(|(claimant, _)| *claimant != key);
                    }
                    touched_ips.insert(addr);
                }
                if let Some(port) = old.health_check {
                    if let Some(claims) = self.health_claims.get_mut(&port) {
                        claims.remove(&key);
                    }
                    touched_health.insert(port);
                }
            }
            let Some(service) = inputs.service(&key) else {
                continue;
            };
            let slices = inputs.slices(&key);
            let mut output = Translation::default();
            translate_service(service, &slices, &self.node, &self.settings, &mut output);
            let mut record = ServiceRecord {
                frontends: Vec::with_capacity(output.desired.frontends.len()),
                cluster_ips: Vec::with_capacity(output.desired.cluster_ips.len()),
                health_check: None,
                problems: output.problems,
            };
            for (addr, served) in output.desired.cluster_ips {
                self.ip_claims
                    .entry(addr)
                    .or_default()
                    .push((key.clone(), served));
                touched_ips.insert(addr);
                record.cluster_ips.push(addr);
            }
            for (port, check) in output.desired.health_checks {
                self.health_claims
                    .entry(port)
                    .or_default()
                    .insert(key.clone(), check);
                touched_health.insert(port);
                record.health_check = Some(port);
            }
            for (frontend, spec) in output.desired.frontends {
                self.claims
                    .entry(frontend)
                    .or_default()
                    .insert(key.clone(), spec);
                touched.insert(frontend);
                record.frontends.push(frontend);
            }
            self.outputs.insert(key, record);
        }
        settle(&mut self.claims, &mut self.desired.frontends, touched);
        settle(
            &mut self.health_claims,
            &mut self.desired.health_checks,
            touched_health,
        );
        for addr in touched_ips {
            let winner = self
                .ip_claims
                .get(&addr)
                .and_then(|claims| claims.iter().min_by(|a, b| a.0.cmp(&b.0)));
            if let Some((_, served)) = winner {
                self.desired.cluster_ips.insert(addr, *served);
            } else {
                self.ip_claims.remove(&addr);
                self.desired.cluster_ips.remove(&addr);
            }
        }
    }

    /// The problems of every service, and the frontends two services
    /// claim (reported for each one that lost).
    #[must_use]
    pub fn problems(&self) -> Vec<Problem> {
        let mut keys: Vec<&ObjectKey> = self
            .outputs
            .iter()
            .filter(|(_, output)| !output.problems.is_empty())
            .map(|(key, _)| key)
            .collect();
        keys.sort();
        let mut problems: Vec<Problem> = keys
            .into_iter()
            .flat_map(|key| self.outputs[key].problems.iter().cloned())
            .collect();
        for (frontend, claims) in &self.claims {
            let mut claimants = claims.iter();
            let Some((_, winner)) = claimants.next() else {
                continue;
            };
            for ((namespace, name), spec) in claimants {
                problems.push(Problem {
                    object: format!("Service {namespace}/{name}"),
                    message: format!(
                        "{frontend:?} is already served by {}; skipped for {}",
                        winner.service, spec.service
                    ),
                    warning: true,
                });
            }
        }
        problems
    }
}
