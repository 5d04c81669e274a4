//! Kubernetes objects → the datapath's desired state, with kube-proxy's
//! semantics. A pure function over plain data: no I/O, no clock, so every
//! rule is tested on YAML fixtures (`tests` below and `fixtures/`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::EndpointSlice,
};

use crate::datapath::{CidrError, Frontend, Ipv4Cidr, Masquerade, Protocol, ServicePolicy};

/// Label naming the proxy that should serve a service.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on slices of headless services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Label tying an EndpointSlice to its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// The largest affinity timeout the API server accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;

/// What the translation needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Addresses node ports answer on.
    pub addrs: Vec<Ipv4Addr>,
    /// Its `topology.kubernetes.io/zone`, for topology hints.
    pub zone: Option<String>,
    /// Its pod CIDRs (`spec.podCIDRs`), for [`LocalDetect::NodeCidr`].
    pub pod_cidrs: Vec<Ipv4Cidr>,
}

/// How the datapath tells local sources (this node's pods), whose address
/// a ClusterIP flow keeps, from the rest, which are masqueraded: kube-proxy's
/// `--detect-local-mode`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LocalDetect {
    /// Traffic entering at a pod interface (`--pod-iface`) is local
    /// (kube-proxy's `InterfaceNamePrefix`).
    #[default]
    Interface,
    /// Sources in these CIDRs, the cluster's pod CIDRs, are local
    /// (`ClusterCIDR`).
    ClusterCidr(Vec<Ipv4Cidr>),
    /// Sources in this node's pod CIDRs are local (`NodeCIDR`).
    NodeCidr,
}

/// Translation settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// This proxy's name for the `service-proxy-name` label; services with
    /// the label set to anything else are left alone.
    pub proxy_name: Option<String>,
    /// Masquerade every flow to a ClusterIP, and every flow to an external
    /// address with a Cluster policy, local or not (kube-proxy's
    /// `--masquerade-all`).
    pub masquerade_all: bool,
    pub local_detect: LocalDetect,
}

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

/// `namespace/name:port-name`, naming a frontend's origin in logs and
/// inspection output.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortRef {
    pub namespace: String,
    pub name: String,
    /// The service port's name (may be empty for a single-port service).
    pub port: String,
}

impl fmt::Display for ServicePortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// An endpoint a frontend sends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: SocketAddrV4,
    /// Its pod runs on this node.
    pub local: bool,
    /// Terminating but still serving (used only when nothing is ready).
    pub terminating: bool,
}

/// Which of a service's addresses a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancerIp,
    NodePort,
}

impl FrontendKind {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::ExternalIp => "ExternalIP",
            Self::LoadBalancerIp => "LoadBalancerIP",
            Self::NodePort => "NodePort",
        }
    }
}

/// One frontend's desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub service: ServicePortRef,
    pub kind: FrontendKind,
    pub policy: ServicePolicy,
    /// What its table holds.
    pub endpoints: BTreeSet<Endpoint>,
    /// For a UDP port, every endpoint serving it (ready, or serving and
    /// terminating), whatever the policy and topology keep: its UDP flows
    /// to any other endpoint are cleared, as kube-proxy clears their
    /// conntrack entries. Empty for TCP, whose flows are never cleared.
    pub serving: BTreeSet<SocketAddrV4>,
}

/// A health check node port (`spec.healthCheckNodePort` of a LoadBalancer
/// service with `externalTrafficPolicy: Local`): load balancers probe it on
/// every node and send traffic only to nodes that answer 200, that is,
/// nodes with a ready endpoint of the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// This node's ready endpoints of the service (distinct addresses).
    pub local_endpoints: usize,
}

/// Everything the maps should hold, and the health check ports to serve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<Frontend, FrontendSpec>,
    pub node_addrs: Vec<Ipv4Addr>,
    /// Every service's IPv4 ClusterIPs: `true` where this proxy serves the
    /// service (new flows to ports it lacks are refused), `false` where
    /// another proxy does (left alone, never dropped as unallocated).
    pub cluster_ips: BTreeMap<Ipv4Addr, bool>,
    /// The service CIDRs: addresses in them that no service holds are
    /// dropped.
    pub service_cidrs: Vec<Ipv4Cidr>,
    /// Sources counted as local when local traffic is detected by CIDR.
    pub local_cidrs: Vec<Ipv4Cidr>,
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// Something in the input that was skipped, naming the object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `Kind namespace/name`.
    pub object: String,
    pub message: String,
    /// Worth a warning (bad input) rather than a debug line (a feature
    /// not served yet, such as IPv6).
    pub warning: bool,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// The result of a translation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub desired: Desired,
    pub problems: Vec<Problem>,
}

impl Translation {
    fn warn(&mut self, object: &ObjectRef<'_>, message: impl Into<String>) {
        self.problems.push(Problem {
            object: object.to_string(),
            message: message.into(),
            warning: true,
        });
    }

    fn note(&mut self, object: &ObjectRef<'_>, message: impl Into<String>) {
        self.problems.push(Problem {
            object: object.to_string(),
            message: message.into(),
            warning: false,
        });
    }
}

/// Translates services and slices into the desired datapath state.
#[must_use]
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
    settings: &Settings,
) -> Translation {
    let mut out = Translation::default();
    let slices_by_service = index_slices(slices, &mut out);
    let services: HashMap<(&str, &str), &Service> = services
        .into_iter()
        .map(|service| {
            (
                (
                    service.metadata.namespace.as_deref().unwrap_or_default(),
                    service.metadata.name.as_deref().unwrap_or_default(),
                ),
                service,
            )
        })
        .collect();
    let inputs = Indexed {
        services: &services,
        slices: &slices_by_service,
    };
    let mut translator = Translator::new(node.clone(), settings.clone());
    translator.update(
        services
            .keys()
            .map(|(ns, name)| ((*ns).to_owned(), (*name).to_owned())),
        &inputs,
    );
    out.desired = translator.desired().clone();
    out.problems.extend(translator.problems());
    out
}

/// A service's identity: (namespace, name).
pub type ObjectKey = (String, String);

/// Where a [`Translator`] reads a service and its slices.
pub trait Inputs {
    fn service(&self, key: &ObjectKey) -> Option<&Service>;
    /// The slices that serve the service (see [`slice_service`]).
    fn slices(&self, key: &ObjectKey) -> Vec<&EndpointSlice>;
}

struct Indexed<'s, 'a> {
    services: &'s HashMap<(&'a str, &'a str), &'a Service>,
    slices: &'s HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

impl Inputs for Indexed<'_, '_> {
    fn service(&self, key: &ObjectKey) -> Option<&Service> {
        self.services
            .get(&(key.0.as_str(), key.1.as_str()))
            .copied()
    }

    fn slices(&self, key: &ObjectKey) -> Vec<&EndpointSlice> {
        self.slices
            .get(&(key.0.as_str(), key.1.as_str()))
            .cloned()
            .unwrap_or_default()
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

/// `Kind namespace/name`, formatted only when a problem names it.
struct ObjectRef<'a> {
    kind: &'static str,
    namespace: Option<&'a String>,
    name: Option<&'a String>,
}

impl<'a> ObjectRef<'a> {
    const fn new(
        kind: &'static str,
        namespace: Option<&'a String>,
        name: Option<&'a String>,
    ) -> Self {
        Self {
            kind,
            namespace,
            name,
        }
    }
}

impl fmt::Display for ObjectRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}",
            self.kind,
            self.namespace.map_or("", String::as_str),
            self.name.map_or("<unnamed>", String::as_str)
        )
    }
}

/// The service a slice serves, if the translation uses it: labelled with
/// its service, not a headless service's, and IPv4. Otherwise a note
/// saying why not (`None` for headless slices, which are simply skipped).
pub fn slice_service(slice: &EndpointSlice) -> Result<(&str, &str), Option<String>> {
    let labels = slice.metadata.labels.as_ref();
    if labels.is_some_and(|labels| labels.contains_key(HEADLESS_LABEL)) {
        return Err(None);
    }
    let Some(service) = labels.and_then(|labels| labels.get(SERVICE_NAME_LABEL)) else {
        return Err(Some(format!(
            "no {SERVICE_NAME_LABEL} label: belongs to no service"
        )));
    };
    match slice.address_type.as_str() {
        "IPv4" => Ok((
            slice.metadata.namespace.as_deref().unwrap_or_default(),
            service.as_str(),
        )),
        "IPv6" => Err(Some("IPv6 endpoints are not served yet".to_owned())),
        other => Err(Some(format!("address type {other} is not served"))),
    }
}

/// Slices by (namespace, service name); IPv4 slices only.
fn index_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    out: &mut Translation,
) -> HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>> {
    let mut index: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        match slice_service(slice) {
            Ok(key) => index.entry(key).or_default().push(slice),
            Err(Some(note)) => {
                let object = ObjectRef::new(
                    "EndpointSlice",
                    slice.metadata.namespace.as_ref(),
                    slice.metadata.name.as_ref(),
                );
                out.note(&object, note);
            }
            Err(None) => {}
        }
    }
    index
}

fn protocol_of(value: Option<&String>) -> Result<Protocol, String> {
    match value.map_or("TCP", String::as_str) {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(other.to_owned()),
    }
}

fn port_number(value: i32, what: &str) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("{what} {value} is not a port (1-65535)"))
}

#[expect(
    clippy::too_many_lines,
    reason = "one rule after another, in kube-proxy's order"
)]
fn translate_service(
    service: &Service,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    settings: &Settings,
    out: &mut Translation,
) {
    let meta = &service.metadata;
    let object = ObjectRef::new("Service", meta.namespace.as_ref(), meta.name.as_ref());
    let Some(spec) = service.spec.as_ref() else {
        out.warn(&object, "no spec");
        return;
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return;
    }
    let cluster_ips: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().collect(),
        (_, Some(ip)) => vec![ip],
        _ => Vec::new(),
    };
    if cluster_ips.iter().any(|ip| ip.as_str() == "None") {
        // Headless: DNS only.
        return;
    }
    let mut cluster_v4 = Vec::new();
    for ip in &cluster_ips {
        match parse_ip(ip) {
            Ok(Some(addr)) => cluster_v4.push(addr),
            Ok(None) => out.note(&object, format!("cluster IP {ip} is IPv6: not served yet")),
            Err(err) => out.warn(&object, format!("cluster IP {ip:?}: {err}")),
        }
    }
    let labels = meta.labels.as_ref();
    if let Some(proxy) = labels.and_then(|labels| labels.get(SERVICE_PROXY_NAME_LABEL))
        && settings.proxy_name.as_deref() != Some(proxy.as_str())
    {
        // Its address is allocated all the same: never dropped.
        for addr in cluster_v4 {
            out.desired.cluster_ips.insert(addr, false);
        }
        out.note(&object, format!("served by proxy {proxy:?}, not this one"));
        return;
    }
    if !matches!(kind, "ClusterIP" | "NodePort" | "LoadBalancer") {
        out.warn(&object, format!("unknown type {kind}"));
        return;
    }
    for addr in &cluster_v4 {
        out.desired.cluster_ips.insert(*addr, true);
    }
    let mut external_v4 = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        match parse_ip(ip) {
            Ok(Some(addr)) => external_v4.push((addr, FrontendKind::ExternalIp)),
            Ok(None) => out.note(&object, format!("external IP {ip} is IPv6: not served yet")),
            Err(err) => out.warn(&object, format!("external IP {ip:?}: {err}")),
        }
    }
    if kind == "LoadBalancer" {
        let ingress = service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for entry in ingress.into_iter().flatten() {
            let Some(ip) = entry.ip.as_ref() else {
                continue;
            };
            // ipMode Proxy: the load balancer proxies to node ports itself,
            // and packets to its IP must reach it (kube-proxy leaves them).
            if entry.ip_mode.as_deref() == Some("Proxy") {
                out.note(
                    &object,
                    format!("ingress IP {ip} has ipMode Proxy: left to the load balancer"),
                );
                continue;
            }
            match parse_ip(ip) {
                Ok(Some(addr)) => external_v4.push((addr, FrontendKind::LoadBalancerIp)),
                Ok(None) => out.note(&object, format!("ingress IP {ip} is IPv6: not served yet")),
                Err(err) => out.warn(&object, format!("load balancer ingress IP {ip:?}: {err}")),
            }
        }
    }

    let affinity_timeout_secs = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|config| config.client_ip.as_ref())
            .and_then(|client| client.timeout_seconds)
            .map_or(Ok(DEFAULT_AFFINITY_TIMEOUT_SECS), |secs| {
                u32::try_from(secs)
                    .ok()
                    .filter(|secs| (1..=MAX_AFFINITY_TIMEOUT_SECS).contains(secs))
                    .ok_or(secs)
            });
        match timeout {
            Ok(secs) => Some(secs),
            Err(secs) => {
                out.warn(
                    &object,
                    format!(
                        "session affinity timeout {secs}s outside 1..=86400; using the default"
                    ),
                );
                Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
            }
        }
    } else {
        None
    };
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    // externalTrafficPolicy only means something for node ports and load
    // balancers; kube-proxy applies it to externalIPs as well.
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");

    let source_ranges = if kind == "LoadBalancer" {
        load_balancer_source_ranges(spec, &external_v4, node, &object, out)
    } else {
        Vec::new()
    };
    let mut seen_ports = BTreeSet::new();
    let mut local_ready_addrs = BTreeSet::new();
    for port in spec.ports.iter().flatten() {
        let port_ref = ServicePortRef {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            port: port.name.clone().unwrap_or_default(),
        };
        let protocol = match protocol_of(port.protocol.as_ref()) {
            Ok(protocol) => protocol,
            Err(other) => {
                out.warn(
                    &object,
                    format!("port {port_ref}: protocol {other} is not served; port skipped"),
                );
                continue;
            }
        };
        let number = match port_number(port.port, "port") {
            Ok(number) => number,
            Err(err) => {
                out.warn(&object, format!("{err}; port skipped"));
                continue;
            }
        };
        if !seen_ports.insert((number, protocol)) {
            out.warn(
                &object,
                format!("port {number}/{protocol:?} appears twice; the second is skipped"),
            );
            continue;
        }
        let Categorized {
            cluster: all,
            local,
            any: any_endpoints,
            local_ready,
            serving,
        } = endpoints_for(port, protocol, slices, node, &object, out);
        local_ready_addrs.extend(local_ready);
        // Only UDP flows are cleared when their endpoint stops serving.
        let serving = if protocol == Protocol::Udp {
            serving
        } else {
            BTreeSet::new()
        };
        let port_ref = PortRef {
            service: &port_ref,
            serving: &serving,
        };

        // kube-proxy masquerades what is not local to ClusterIPs (a routed
        // client's replies must come back through this node) and to
        // external addresses with a Cluster policy; --masquerade-all
        // everything there.
        let masquerade = if settings.masquerade_all {
            Masquerade::Always
        } else {
            Masquerade::NonLocal
        };
        let internal = ServicePolicy {
            masquerade,
            local_only: internal_local,
            affinity_timeout_secs,
            drop_when_empty: internal_local && any_endpoints,
            source_ranges: Vec::new(),
            in_cluster_variant: false,
        };
        let internal_endpoints = if internal_local { &local } else { &all };
        let external = ServicePolicy {
            masquerade: if external_local {
                Masquerade::Never
            } else {
                masquerade
            },
            local_only: external_local,
            affinity_timeout_secs,
            drop_when_empty: external_local && any_endpoints,
            source_ranges: Vec::new(),
            in_cluster_variant: false,
        };
        // loadBalancerSourceRanges restrict the load balancer's IPs only.
        let load_balancer = ServicePolicy {
            source_ranges: source_ranges.clone(),
            ..external.clone()
        };
        let addresses = cluster_v4
            .iter()
            .map(|&addr| (addr, FrontendKind::ClusterIp))
            .chain(external_v4.iter().copied());
        for (addr, frontend_kind) in addresses {
            let frontend = Frontend::Address {
                addr,
                port: number,
                protocol,
            };
            let policy = match frontend_kind {
                FrontendKind::ClusterIp => {
                    insert(
                        out,
                        &object,
                        frontend,
                        frontend_kind,
                        &port_ref,
                        internal.clone(),
                        internal_endpoints,
                    );
                    continue;
                }
                FrontendKind::LoadBalancerIp => load_balancer.clone(),
                _ => external.clone(),
            };
            insert_external(
                out,
                &object,
                (frontend, frontend_kind),
                &port_ref,
                policy,
                (&all, &local),
            );
        }
        if matches!(kind, "NodePort" | "LoadBalancer")
            && let Some(node_port) = port.node_port
        {
            match port_number(node_port, "node port") {
                Ok(node_port) => {
                    let frontend = Frontend::NodePort {
                        port: node_port,
                        protocol,
                    };
                    insert_external(
                        out,
                        &object,
                        (frontend, FrontendKind::NodePort),
                        &port_ref,
                        external,
                        (&all, &local),
                    );
                }
                Err(err) => out.warn(&object, format!("{err}; node port skipped")),
            }
        }
    }
    // kube-proxy serves one only where the API server allocates one.
    if kind == "LoadBalancer"
        && external_local
        && let Some(port) = spec.health_check_node_port
    {
        match port_number(port, "health check node port") {
            Ok(port) => {
                out.desired.health_checks.insert(
                    port,
                    HealthCheck {
                        namespace: meta.namespace.clone().unwrap_or_default(),
                        name: meta.name.clone().unwrap_or_default(),
                        local_endpoints: local_ready_addrs.len(),
                    },
                );
            }
            Err(err) => out.warn(&object, format!("{err}; not served")),
        }
    }
}

/// What every frontend of one service port shares.
struct PortRef<'a> {
    service: &'a ServicePortRef,
    /// Its serving endpoints (UDP only).
    serving: &'a BTreeSet<SocketAddrV4>,
}

fn insert(
    out: &mut Translation,
    object: &ObjectRef<'_>,
    frontend: Frontend,
    kind: FrontendKind,
    port: &PortRef<'_>,
    policy: ServicePolicy,
    endpoints: &BTreeSet<Endpoint>,
) {
    if let Some(existing) = out.desired.frontends.get(&frontend) {
        let message = format!(
            "{frontend:?} is already served by {}; skipped for {}",
            existing.service, port.service
        );
        out.warn(object, message);
        return;
    }
    out.desired.frontends.insert(
        frontend,
        FrontendSpec {
            service: port.service.clone(),
            kind,
            policy,
            endpoints: endpoints.clone(),
            serving: port.serving.clone(),
        },
    );
}

/// The IPv4 `loadBalancerSourceRanges`, sorted. As kube-proxy does, when
/// one holds a node address the load balancer's own IPs are allowed too
/// (a VIP-style balancer whose traffic from the node loops back with the
/// VIP as source).
fn load_balancer_source_ranges(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    external: &[(Ipv4Addr, FrontendKind)],
    node: &NodeInfo,
    object: &ObjectRef<'_>,
    out: &mut Translation,
) -> Vec<Ipv4Cidr> {
    let mut ranges = BTreeSet::new();
    for text in spec.load_balancer_source_ranges.iter().flatten() {
        match text.parse::<Ipv4Cidr>() {
            Ok(range) => {
                ranges.insert(range);
            }
            Err(CidrError::Ipv6(_)) => {
                out.note(
                    object,
                    format!("source range {text} is IPv6: not served yet"),
                );
            }
            Err(CidrError::Invalid(_)) => out.warn(
                object,
                format!("source range {text:?} is not a CIDR; skipped"),
            ),
        }
    }
    if ranges
        .iter()
        .any(|range| node.addrs.iter().any(|addr| range.contains(*addr)))
    {
        for (addr, kind) in external {
            if *kind == FrontendKind::LoadBalancerIp
                && let Some(range) = Ipv4Cidr::new(*addr, 32)
            {
                ranges.insert(range);
            }
        }
    }
    ranges.into_iter().collect()
}

/// Inserts a node port, externalIP or load-balancer IP frontend, given its
/// service's (cluster, local) endpoints. With a Local policy it keeps this
/// node's endpoints, and an in-cluster variant holding every endpoint
/// serves this node's pods and processes: kube-proxy sends their traffic
/// to such addresses to every endpoint rather than drop it.
fn insert_external(
    out: &mut Translation,
    object: &ObjectRef<'_>,
    (frontend, kind): (Frontend, FrontendKind),
    service: &PortRef<'_>,
    policy: ServicePolicy,
    (all, local): (&BTreeSet<Endpoint>, &BTreeSet<Endpoint>),
) {
    if !policy.local_only {
        insert(out, object, frontend, kind, service, policy, all);
        return;
    }
    if let Some(variant) = frontend.in_cluster() {
        // Only local sources use the variant, which kube-proxy sends to the
        // endpoints without masquerading (--masquerade-all included).
        let in_cluster = ServicePolicy {
            masquerade: Masquerade::NonLocal,
            local_only: false,
            drop_when_empty: false,
            in_cluster_variant: false,
            ..policy.clone()
        };
        insert(out, object, variant, kind, service, in_cluster, all);
    }
    let policy = ServicePolicy {
        in_cluster_variant: true,
        ..policy
    };
    insert(out, object, frontend, kind, service, policy, local);
}

/// `Ok(Some)` for IPv4, `Ok(None)` for IPv6, `Err` for garbage.
fn parse_ip(text: &str) -> Result<Option<Ipv4Addr>, String> {
    match text.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(addr)) => Ok(Some(addr)),
        Ok(std::net::IpAddr::V6(_)) => Ok(None),
        Err(err) => Err(err.to_string()),
    }
}

/// One endpoint of a service port and what kube-proxy's categorization
/// reads of it.
struct Candidate {
    endpoint: Endpoint,
    ready: bool,
    /// Its serving condition (ready when unset).
    serving: bool,
    /// Serving and terminating (used only when nothing is ready).
    serving_terminating: bool,
    zones: Vec<String>,
    nodes: Vec<String>,
}

/// Which endpoints topology hints keep.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    Any,
    SameNode,
    SameZone,
}

/// kube-proxy's choice: node hints when every ready endpoint has some and
/// one names this node; else zone hints when every ready endpoint has some
/// and one names this node's zone; else no filtering.
fn topology(candidates: &[Candidate], node: &NodeInfo) -> Topology {
    let ready = || candidates.iter().filter(|c| c.ready);
    if ready().next().is_none() {
        return Topology::Any;
    }
    if ready().all(|c| !c.nodes.is_empty()) && ready().any(|c| c.nodes.contains(&node.name)) {
        return Topology::SameNode;
    }
    if let Some(zone) = &node.zone
        && ready().all(|c| !c.zones.is_empty())
        && ready().any(|c| c.zones.contains(zone))
    {
        return Topology::SameZone;
    }
    Topology::Any
}

/// The endpoints of one service port, categorized as kube-proxy does.
struct Categorized {
    /// For cluster traffic policy: the ready endpoints topology hints keep
    /// for this node, else (none ready) the serving, terminating ones.
    cluster: BTreeSet<Endpoint>,
    /// For local traffic policy: this node's ready endpoints, else its
    /// serving, terminating ones.
    local: BTreeSet<Endpoint>,
    /// Whether the service has any usable endpoint anywhere (a local
    /// policy then drops rather than refuses).
    any: bool,
    /// This node's ready endpoints' addresses (for health checks).
    local_ready: BTreeSet<Ipv4Addr>,
    /// Every serving endpoint (ready, or serving and terminating).
    serving: BTreeSet<SocketAddrV4>,
}

fn categorize(candidates: &[Candidate], node: &NodeInfo) -> Categorized {
    let pick = |keep: &dyn Fn(&Candidate) -> bool| -> BTreeSet<Endpoint> {
        candidates
            .iter()
            .filter(|c| keep(c))
            .map(|c| c.endpoint)
            .collect()
    };
    let mode = topology(candidates, node);
    let mut cluster = pick(&|c| {
        c.ready
            && match mode {
                Topology::Any => true,
                Topology::SameNode => c.nodes.contains(&node.name),
                Topology::SameZone => node.zone.as_ref().is_some_and(|z| c.zones.contains(z)),
            }
    });
    if cluster.is_empty() {
        cluster = pick(&|c| c.serving_terminating);
    }
    let mut local = pick(&|c| c.ready && c.endpoint.local);
    if local.is_empty() {
        local = pick(&|c| c.serving_terminating && c.endpoint.local);
    }
    Categorized {
        cluster,
        local,
        any: candidates.iter().any(|c| c.ready || c.serving_terminating),
        local_ready: candidates
            .iter()
            .filter(|c| c.ready && c.endpoint.local)
            .map(|c| *c.endpoint.addr.ip())
            .collect(),
        serving: candidates
            .iter()
            .filter(|c| c.serving)
            .map(|c| c.endpoint.addr)
            .collect(),
    }
}

/// The endpoints of one service port across its slices: the slice port
/// with the service port's name gives each slice's target port, so
/// backends may listen on different ports. Endpoints neither ready nor
/// serving-and-terminating are never used.
fn endpoints_for(
    port: &ServicePort,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    object: &ObjectRef<'_>,
    out: &mut Translation,
) -> Categorized {
    let name = port.name.clone().unwrap_or_default();
    let mut candidates = Vec::new();
    for slice in slices {
        let slice_object = ObjectRef::new(
            "EndpointSlice",
            slice.metadata.namespace.as_ref(),
            slice.metadata.name.as_ref(),
        );
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.clone().unwrap_or_default() == name
                && protocol_of(p.protocol.as_ref()).ok() == Some(protocol)
        }) else {
            continue;
        };
        let Some(target) = target.port else {
            continue;
        };
        let target = match port_number(target, "endpoint port") {
            Ok(target) => target,
            Err(err) => {
                out.warn(&slice_object, format!("{err}; slice skipped for {object}"));
                continue;
            }
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let addr = match parse_ip(address) {
                Ok(Some(addr)) => addr,
                Ok(None) => continue,
                Err(err) => {
                    out.warn(
                        &slice_object,
                        format!("endpoint address {address:?}: {err}"),
                    );
                    continue;
                }
            };
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let hints = endpoint.hints.as_ref();
            candidates.push(Candidate {
                endpoint: Endpoint {
                    addr: SocketAddrV4::new(addr, target),
                    local: endpoint.node_name.as_deref() == Some(node.name.as_str()),
                    terminating: !ready,
                },
                ready,
                serving,
                serving_terminating: !ready && serving && terminating,
                zones: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|zone| zone.name.clone())
                    .collect(),
                nodes: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|node| node.name.clone())
                    .collect(),
            });
        }
    }
    categorize(&candidates, node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{
        Objects,
        manifests::{Parsed, finish, parse},
    };
    use k8s_openapi::api::core::v1::Service;

    const NODE1: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);

    fn objects(documents: &[&str]) -> Objects {
        let mut parsed = Parsed::default();
        let mut problems = Vec::new();
        for (i, text) in documents.iter().enumerate() {
            parse(text, &format!("fixture {i}"), &mut parsed, &mut problems);
        }
        assert!(problems.is_empty(), "fixtures must parse: {problems:?}");
        finish(parsed)
    }

    fn run(documents: &[&str]) -> Translation {
        run_in_zone(None, documents)
    }

    /// [`run`] on node-1 in `zone`.
    fn run_in_zone(zone: Option<&str>, documents: &[&str]) -> Translation {
        let objects = objects(documents);
        translate(
            &objects.services,
            &objects.slices,
            &NodeInfo {
                name: "node-1".to_owned(),
                addrs: vec![NODE1],
                zone: zone.map(str::to_owned),
                pod_cidrs: Vec::new(),
            },
            &Settings::default(),
        )
    }

    fn tcp(addr: [u8; 4], port: u16) -> Frontend {
        Frontend::Address {
            addr: Ipv4Addr::from(addr),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn node_port(port: u16) -> Frontend {
        Frontend::NodePort {
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn ep(addr: [u8; 4], port: u16, local: bool) -> Endpoint {
        Endpoint {
            addr: SocketAddrV4::new(Ipv4Addr::from(addr), port),
            local,
            terminating: false,
        }
    }

    fn spec(t: &Translation, frontend: Frontend) -> &FrontendSpec {
        t.desired
            .frontends
            .get(&frontend)
            .unwrap_or_else(|| panic!("no {frontend:?} in {:#?}", t.desired.frontends.keys()))
    }

    fn endpoints(list: &[Endpoint]) -> BTreeSet<Endpoint> {
        list.iter().copied().collect()
    }

    fn warnings(t: &Translation) -> Vec<String> {
        t.problems
            .iter()
            .filter(|p| p.warning)
            .map(ToString::to_string)
            .collect()
    }

    /// ClusterIPs and external addresses with a Cluster policy alike:
    /// every endpoint, sources that are not local masqueraded.
    const CLUSTER: ServicePolicy = ServicePolicy {
        masquerade: Masquerade::NonLocal,
        local_only: false,
        affinity_timeout_secs: None,
        drop_when_empty: false,
        source_ranges: Vec::new(),
        in_cluster_variant: false,
    };
    const EXTERNAL: ServicePolicy = CLUSTER;

    #[test]
    fn docs_cluster_ip_service_with_its_endpoint_slice() {
        let t = run(&[include_str!("../fixtures/docs-clusterip.yaml")]);
        assert_eq!(t.desired.frontends.len(), 1);
        let spec = spec(&t, tcp([10, 96, 0, 10], 80));
        assert_eq!(spec.service.to_string(), "default/my-service");
        assert_eq!(spec.policy, CLUSTER);
        assert_eq!(
            spec.endpoints,
            endpoints(&[
                ep([10, 1, 2, 3], 9376, true),
                ep([10, 1, 2, 4], 9376, false)
            ])
        );
        assert_eq!(t.desired.node_addrs, vec![NODE1]);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
    }

    #[test]
    fn node_ports_load_balancer_ips_and_external_ips() {
        let t = run(&[include_str!("../fixtures/docs-nodeport-lb.yaml")]);
        let one = endpoints(&[ep([10, 1, 2, 3], 80, true)]);
        assert_eq!(spec(&t, tcp([10, 96, 0, 20], 80)).policy, CLUSTER);
        assert_eq!(spec(&t, node_port(32123)).policy, EXTERNAL);
        assert_eq!(spec(&t, node_port(32123)).endpoints, one);
        assert_eq!(spec(&t, tcp([192, 0, 2, 127], 80)).policy, EXTERNAL);
        assert_eq!(
            spec(&t, node_port(30080)).endpoints,
            endpoints(&[ep([10, 1, 2, 3], 9376, true)])
        );
        // allocateLoadBalancerNodePorts: false: no node port; the external
        // IP and the ingress IP (not its hostname, nor the ipMode Proxy
        // one) are served.
        let other = endpoints(&[ep([10, 1, 2, 5], 8443, false)]);
        assert_eq!(spec(&t, tcp([198, 51, 100, 7], 443)).endpoints, other);
        assert_eq!(spec(&t, tcp([192, 0, 2, 128], 443)).endpoints, other);
        assert_eq!(
            t.desired.frontends.len(),
            8,
            "{:#?}",
            t.desired.frontends.keys()
        );
    }

    #[test]
    fn headless_and_external_name_have_no_frontends_selectorless_endpoints_are_mirrored() {
        let t = run(&[include_str!("../fixtures/docs-headless-selectorless.yaml")]);
        assert_eq!(t.desired.frontends.len(), 1, "{:#?}", t.desired.frontends);
        let spec = spec(&t, tcp([10, 96, 0, 30], 80));
        assert_eq!(spec.service.to_string(), "default/outside:http");
        assert_eq!(spec.endpoints, endpoints(&[ep([1, 2, 3, 4], 80, false)]));
    }

    #[test]
    fn kubectl_get_output_with_named_target_ports_dual_stack_and_sctp() {
        let t = run(&[include_str!("../fixtures/kubectl-get.yaml")]);
        let http = spec(&t, tcp([10, 96, 100, 1], 80));
        assert_eq!(http.service.to_string(), "prod/api:http");
        assert_eq!(
            http.endpoints,
            endpoints(&[
                ep([10, 244, 1, 10], 8080, true),
                ep([10, 244, 2, 11], 9090, false)
            ]),
            "the named target port resolves per slice"
        );
        assert_eq!(http.policy.affinity_timeout_secs, Some(300));
        let dns = spec(
            &t,
            Frontend::Address {
                addr: Ipv4Addr::new(10, 96, 100, 1),
                port: 53,
                protocol: Protocol::Udp,
            },
        );
        assert_eq!(
            dns.endpoints,
            endpoints(&[ep([10, 244, 1, 10], 5353, true)])
        );
        assert_eq!(t.desired.frontends.len(), 2);
        let warnings = warnings(&t);
        assert!(
            warnings.len() == 1 && warnings[0].contains("SCTP"),
            "only SCTP is warned about: {warnings:?}"
        );
        let notes: Vec<String> = t
            .problems
            .iter()
            .filter(|p| !p.warning)
            .map(ToString::to_string)
            .collect();
        assert!(
            notes.iter().any(|n| n.contains("fd00:10:96::1")),
            "{notes:?}"
        );
        assert!(notes.iter().any(|n| n.contains("api-v6")), "{notes:?}");
    }

    const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: s, namespace: ns}
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  externalIPs: [203.0.113.50]
  ports: [{name: web, port: 80, nodePort: 30050}]
";

    fn slice(endpoints_yaml: &str) -> String {
        format!(
            "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: s-1, namespace: ns, labels: {{kubernetes.io/service-name: s}}}}
addressType: IPv4
ports: [{{name: web, port: 8080}}]
endpoints:
{endpoints_yaml}"
        )
    }

    const TWO_NODES: &str = "
  - {addresses: [10.1.0.1], nodeName: node-1}
  - {addresses: [10.2.0.1], nodeName: node-2}
";

    #[test]
    fn external_traffic_policy_local_keeps_the_source_and_only_local_endpoints() {
        let service = SERVICE.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let t = run(&[&service, &slice(TWO_NODES)]);
        let local = ServicePolicy {
            masquerade: Masquerade::Never,
            local_only: true,
            affinity_timeout_secs: None,
            drop_when_empty: true,
            source_ranges: Vec::new(),
            in_cluster_variant: true,
        };
        for frontend in [node_port(30050), tcp([203, 0, 113, 50], 80)] {
            assert_eq!(spec(&t, frontend).policy, local, "{frontend:?}");
            assert_eq!(
                spec(&t, frontend).endpoints,
                endpoints(&[ep([10, 1, 0, 1], 8080, true)])
            );
            // From this node's pods and processes: every endpoint, as
            // kube-proxy does.
            let variant = frontend.in_cluster().expect("an external frontend");
            assert_eq!(spec(&t, variant).policy, CLUSTER, "{variant:?}");
            assert_eq!(spec(&t, variant).endpoints.len(), 2, "{variant:?}");
        }
        // Inside the cluster the policy is Cluster.
        assert_eq!(spec(&t, tcp([10, 96, 0, 50], 80)).endpoints.len(), 2);
        assert_eq!(spec(&t, tcp([10, 96, 0, 50], 80)).policy, CLUSTER);
    }

    #[test]
    fn internal_traffic_policy_local_applies_to_the_cluster_ip_only() {
        let service = SERVICE.replace(
            "type: NodePort",
            "type: NodePort\n  internalTrafficPolicy: Local",
        );
        let only_remote = "
  - {addresses: [10.2.0.1], nodeName: node-2}
";
        let t = run(&[&service, &slice(only_remote)]);
        let cluster_ip = spec(&t, tcp([10, 96, 0, 50], 80));
        assert!(cluster_ip.endpoints.is_empty());
        assert!(cluster_ip.policy.local_only);
        assert!(
            cluster_ip.policy.drop_when_empty,
            "endpoints exist elsewhere: drop, do not refuse"
        );
        assert_eq!(spec(&t, node_port(30050)).endpoints.len(), 1);
    }

    #[test]
    fn udp_ports_record_every_serving_endpoint_whatever_the_table_keeps() {
        let service = "
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: ns}
spec:
  clusterIP: 10.96.0.53
  internalTrafficPolicy: Local
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: tcp, port: 53, protocol: TCP}
";
        let slice = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: ns, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}, {name: tcp, port: 5353, protocol: TCP}]
endpoints:
  - {addresses: [10.1.0.1], nodeName: node-1}
  - {addresses: [10.2.0.1], nodeName: node-2}
  - {addresses: [10.2.0.2], nodeName: node-2, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.2.0.3], nodeName: node-2, conditions: {ready: false, serving: false, terminating: true}}
";
        let t = run(&[service, slice]);
        let udp = spec(&t, Frontend::udp(Ipv4Addr::new(10, 96, 0, 53), 53));
        assert_eq!(
            udp.endpoints.len(),
            1,
            "internalTrafficPolicy Local: the table holds the local endpoint"
        );
        let serving: Vec<String> = udp.serving.iter().map(ToString::to_string).collect();
        assert_eq!(
            serving,
            ["10.1.0.1:5353", "10.2.0.1:5353", "10.2.0.2:5353"],
            "UDP flows to any serving endpoint stay, as kube-proxy keeps them"
        );
        assert!(
            spec(&t, tcp([10, 96, 0, 53], 53)).serving.is_empty(),
            "TCP flows are never cleared: nothing to record"
        );
    }

    #[test]
    fn cluster_ips_are_recorded_even_for_services_another_proxy_serves() {
        let other = SERVICE
            .replace(
                "name: s,",
                "name: other, labels: {service.kubernetes.io/service-proxy-name: other},",
            )
            .replace("10.96.0.50", "10.96.0.51");
        let headless = "
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: ns}
spec:
  clusterIP: None
  ports: [{port: 80}]
";
        let t = run(&[SERVICE, &other, headless]);
        assert_eq!(
            t.desired.cluster_ips,
            BTreeMap::from([
                (Ipv4Addr::new(10, 96, 0, 50), true),
                (Ipv4Addr::new(10, 96, 0, 51), false),
            ]),
            "served ones refuse unknown ports; another proxy's are only allocated"
        );
    }

    #[test]
    fn masquerade_all_reaches_cluster_ips_and_cluster_policies_only() {
        let service = SERVICE.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let objects = objects(&[SERVICE, &slice(TWO_NODES)]);
        let local_objects = objects_local(&service);
        let settings = Settings {
            masquerade_all: true,
            ..Settings::default()
        };
        let node = NodeInfo {
            name: "node-1".to_owned(),
            addrs: vec![NODE1],
            ..NodeInfo::default()
        };
        let t = translate(&objects.services, &objects.slices, &node, &settings);
        for frontend in [tcp([10, 96, 0, 50], 80), node_port(30050)] {
            assert_eq!(
                spec(&t, frontend).policy.masquerade,
                Masquerade::Always,
                "{frontend:?}"
            );
        }
        let t = translate(
            &local_objects.services,
            &local_objects.slices,
            &node,
            &settings,
        );
        assert_eq!(
            spec(&t, node_port(30050)).policy.masquerade,
            Masquerade::Never,
            "a Local policy keeps the client's address all the same"
        );
        assert_eq!(
            spec(&t, tcp([10, 96, 0, 50], 80)).policy.masquerade,
            Masquerade::Always
        );
    }

    fn objects_local(service: &str) -> Objects {
        objects(&[service, &slice(TWO_NODES)])
    }

    #[test]
    fn local_cidrs_follow_the_detection_mode() {
        let cluster_cidr: Ipv4Cidr = "10.0.0.0/8".parse().expect("a CIDR");
        let pod_cidr: Ipv4Cidr = "10.1.0.0/24".parse().expect("a CIDR");
        let node = NodeInfo {
            pod_cidrs: vec![pod_cidr],
            ..NodeInfo::default()
        };
        let with = |local_detect| {
            Translator::new(
                node.clone(),
                Settings {
                    local_detect,
                    ..Settings::default()
                },
            )
        };
        assert!(
            with(LocalDetect::Interface)
                .desired()
                .local_cidrs
                .is_empty()
        );
        assert_eq!(
            with(LocalDetect::ClusterCidr(vec![cluster_cidr]))
                .desired()
                .local_cidrs,
            [cluster_cidr]
        );
        let mut by_node = with(LocalDetect::NodeCidr);
        assert_eq!(by_node.desired().local_cidrs, [pod_cidr]);
        let moved: Ipv4Cidr = "10.1.7.0/24".parse().expect("a CIDR");
        assert!(by_node.set_pod_cidrs(vec![moved]));
        assert_eq!(by_node.desired().local_cidrs, [moved]);
        assert!(!by_node.set_pod_cidrs(vec![moved]), "unchanged");
    }

    #[test]
    fn no_endpoints_anywhere_refuses_even_with_a_local_policy() {
        let service = SERVICE.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let t = run(&[&service]);
        assert!(!spec(&t, node_port(30050)).policy.drop_when_empty);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_nothing_is_ready() {
        let mixed = "
  - {addresses: [10.1.0.1], nodeName: node-1, conditions: {ready: true}}
  - {addresses: [10.1.0.2], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.1.0.3], nodeName: node-1, conditions: {ready: false, serving: false, terminating: true}}
  - {addresses: [10.1.0.4], nodeName: node-1, conditions: {ready: false, serving: false, terminating: false}}
";
        let t = run(&[SERVICE, &slice(mixed)]);
        assert_eq!(
            spec(&t, tcp([10, 96, 0, 50], 80)).endpoints,
            endpoints(&[ep([10, 1, 0, 1], 8080, true)])
        );
        let none_ready = mixed.replace("conditions: {ready: true}", "conditions: {ready: false}");
        let t = run(&[SERVICE, &slice(&none_ready)]);
        assert_eq!(
            spec(&t, tcp([10, 96, 0, 50], 80)).endpoints,
            endpoints(&[Endpoint {
                addr: SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 8080),
                local: true,
                terminating: true,
            }]),
            "only the serving, terminating endpoint; never the others"
        );
    }

    #[test]
    fn local_policy_falls_back_to_local_terminating_endpoints() {
        let service = SERVICE.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let remote_ready_local_terminating = "
  - {addresses: [10.1.0.2], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.2.0.1], nodeName: node-2, conditions: {ready: true}}
";
        let t = run(&[&service, &slice(remote_ready_local_terminating)]);
        assert_eq!(
            spec(&t, node_port(30050)).endpoints,
            endpoints(&[Endpoint {
                addr: SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 8080),
                local: true,
                terminating: true,
            }]),
            "kube-proxy: no local ready endpoint, so the local serving-terminating one"
        );
        assert_eq!(
            spec(&t, tcp([10, 96, 0, 50], 80)).endpoints,
            endpoints(&[ep([10, 2, 0, 1], 8080, false)]),
            "cluster policy: the ready one"
        );
    }

    const ZONED: &str = "
  - {addresses: [10.1.0.1], nodeName: node-1, hints: {forZones: [{name: zone-a}]}}
  - {addresses: [10.2.0.1], nodeName: node-2, hints: {forZones: [{name: zone-b}]}}
";

    #[test]
    fn zone_hints_keep_this_zones_endpoints_when_kube_proxy_would() {
        let cluster_ip = tcp([10, 96, 0, 50], 80);
        let t = run_in_zone(Some("zone-a"), &[SERVICE, &slice(ZONED)]);
        assert_eq!(
            spec(&t, cluster_ip).endpoints,
            endpoints(&[ep([10, 1, 0, 1], 8080, true)]),
            "this zone's endpoint only"
        );
        assert_eq!(
            spec(&t, node_port(30050)).endpoints,
            endpoints(&[ep([10, 1, 0, 1], 8080, true)]),
            "hints apply to every cluster-policy frontend"
        );
        for (zone, why) in [
            (Some("zone-c"), "no endpoint is hinted for this zone"),
            (None, "this node has no zone"),
        ] {
            let t = run_in_zone(zone, &[SERVICE, &slice(ZONED)]);
            assert_eq!(spec(&t, cluster_ip).endpoints.len(), 2, "{why}");
        }
        let one_unhinted = format!("{ZONED}  - {{addresses: [10.2.0.2], nodeName: node-2}}\n");
        let t = run_in_zone(Some("zone-a"), &[SERVICE, &slice(&one_unhinted)]);
        assert_eq!(
            spec(&t, cluster_ip).endpoints.len(),
            3,
            "a ready endpoint without hints turns them off"
        );
        let local = SERVICE.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let t = run_in_zone(Some("zone-b"), &[&local, &slice(ZONED)]);
        assert_eq!(
            spec(&t, node_port(30050)).endpoints,
            endpoints(&[ep([10, 1, 0, 1], 8080, true)]),
            "a local policy ignores hints"
        );
    }

    #[test]
    fn node_hints_come_before_zone_hints() {
        let hinted = "
  - {addresses: [10.1.0.1], nodeName: node-1, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-1}]}}
  - {addresses: [10.1.0.9], nodeName: node-9, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-9}]}}
  - {addresses: [10.2.0.1], nodeName: node-2, hints: {forZones: [{name: zone-b}], forNodes: [{name: node-2}]}}
";
        let t = run_in_zone(Some("zone-a"), &[SERVICE, &slice(hinted)]);
        assert_eq!(
            spec(&t, tcp([10, 96, 0, 50], 80)).endpoints,
            endpoints(&[ep([10, 1, 0, 1], 8080, true)]),
            "PreferSameNode: this node's endpoint only"
        );
        let elsewhere = hinted.replace("forNodes: [{name: node-1}]", "forNodes: [{name: node-8}]");
        let t = run_in_zone(Some("zone-a"), &[SERVICE, &slice(&elsewhere)]);
        assert_eq!(
            spec(&t, tcp([10, 96, 0, 50], 80)).endpoints.len(),
            2,
            "no endpoint for this node: the zone's two"
        );
    }

    #[test]
    fn local_load_balancers_get_a_health_check_counting_local_ready_endpoints() {
        let lb = SERVICE.replace(
            "type: NodePort",
            "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
        );
        let endpoints = "
  - {addresses: [10.1.0.1], nodeName: node-1}
  - {addresses: [10.1.0.2], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.2.0.1], nodeName: node-2}
";
        let t = run(&[&lb, &slice(endpoints)]);
        let check = &t.desired.health_checks[&32000];
        assert_eq!((check.namespace.as_str(), check.name.as_str()), ("ns", "s"));
        assert_eq!(check.local_endpoints, 1, "ready local endpoints only");
        let t = run(&[&lb]);
        assert_eq!(t.desired.health_checks[&32000].local_endpoints, 0);
        for other in [
            lb.replace(
                "externalTrafficPolicy: Local",
                "externalTrafficPolicy: Cluster",
            ),
            lb.replace("type: LoadBalancer", "type: NodePort"),
        ] {
            let t = run(&[&other, &slice(endpoints)]);
            assert!(t.desired.health_checks.is_empty(), "{other}");
        }
    }

    #[test]
    fn load_balancer_source_ranges_restrict_only_the_load_balancer_ips() {
        let lb = |ranges: &str| {
            format!(
                "{}  loadBalancerSourceRanges: [{ranges}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 192.0.2.80}}]\n",
                SERVICE.replace("type: NodePort", "type: LoadBalancer")
            )
        };
        let t = run(&[
            &lb("203.0.113.7/24, '2001:db8::/32', not-a-cidr"),
            &slice(TWO_NODES),
        ]);
        let range =
            |a, b, c, d, prefix| Ipv4Cidr::new(Ipv4Addr::new(a, b, c, d), prefix).expect("CIDR");
        assert_eq!(
            spec(&t, tcp([192, 0, 2, 80], 80)).policy.source_ranges,
            [range(203, 0, 113, 0, 24)],
            "the IPv4 range, host bits cleared"
        );
        for frontend in [
            node_port(30050),
            tcp([10, 96, 0, 50], 80),
            tcp([203, 0, 113, 50], 80),
        ] {
            assert!(
                spec(&t, frontend).policy.source_ranges.is_empty(),
                "{frontend:?} is not a load balancer IP"
            );
        }
        assert!(
            warnings(&t).iter().any(|w| w.contains("not-a-cidr")),
            "{:?}",
            warnings(&t)
        );
        // A range holding the node's address lets the load balancer's own
        // IP in as a source too (kube-proxy's allowance for VIP-style
        // balancers looping traffic from the node back).
        let t = run(&[&lb("192.168.0.0/16"), &slice(TWO_NODES)]);
        assert_eq!(
            spec(&t, tcp([192, 0, 2, 80], 80)).policy.source_ranges,
            [range(192, 0, 2, 80, 32), range(192, 168, 0, 0, 16)]
        );
    }

    #[test]
    fn session_affinity_defaults_to_three_hours() {
        let service = SERVICE.replace(
            "type: NodePort",
            "type: NodePort\n  sessionAffinity: ClientIP",
        );
        let t = run(&[&service, &slice(TWO_NODES)]);
        assert_eq!(
            spec(&t, node_port(30050)).policy.affinity_timeout_secs,
            Some(10_800)
        );
        let absurd = service.replace(
            "sessionAffinity: ClientIP",
            "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 999999}}",
        );
        let t = run(&[&absurd, &slice(TWO_NODES)]);
        assert_eq!(
            spec(&t, node_port(30050)).policy.affinity_timeout_secs,
            Some(10_800)
        );
        assert_eq!(warnings(&t).len(), 1, "{:?}", warnings(&t));
    }

    #[test]
    fn services_for_another_proxy_are_left_alone() {
        let service = SERVICE.replace(
            "metadata: {name: s, namespace: ns}",
            "metadata: {name: s, namespace: ns, labels: {service.kubernetes.io/service-proxy-name: other}}",
        );
        let t = run(&[&service, &slice(TWO_NODES)]);
        assert!(t.desired.frontends.is_empty());
        let objects = objects(&[&service, &slice(TWO_NODES)]);
        let mine = translate(
            &objects.services,
            &objects.slices,
            &NodeInfo::default(),
            &Settings {
                proxy_name: Some("other".to_owned()),
                ..Settings::default()
            },
        );
        assert_eq!(
            mine.desired.frontends.len(),
            3,
            "a proxy named so serves it"
        );
    }

    #[test]
    fn slices_of_headless_services_and_without_a_service_are_ignored() {
        let headless = slice(TWO_NODES).replace(
            "labels: {kubernetes.io/service-name: s}",
            "labels: {kubernetes.io/service-name: s, service.kubernetes.io/headless: \"\"}",
        );
        let t = run(&[SERVICE, &headless]);
        assert!(spec(&t, node_port(30050)).endpoints.is_empty());
        let orphan =
            slice(TWO_NODES).replace("labels: {kubernetes.io/service-name: s}", "labels: {}");
        let t = run(&[SERVICE, &orphan]);
        assert!(spec(&t, node_port(30050)).endpoints.is_empty());
    }

    #[test]
    fn bad_input_is_named_and_skipped_and_the_rest_is_served() {
        let bad = "
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: ns}
spec:
  clusterIP: 10.96.0.999
  externalIPs: [not-an-ip, 203.0.113.60]
  ports:
    - {name: a, port: 80}
    - {name: b, port: 80}
    - {name: c, port: 70000}
    - {name: d, port: 81, protocol: QUIC}
";
        let t = run(&[bad, SERVICE, &slice(TWO_NODES)]);
        let warnings = warnings(&t);
        for expected in ["10.96.0.999", "not-an-ip", "appears twice", "70000", "QUIC"] {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains(expected) && w.contains("ns/bad")),
                "no warning naming {expected}: {warnings:?}"
            );
        }
        assert!(
            t.desired
                .frontends
                .contains_key(&tcp([203, 0, 113, 60], 80))
        );
        assert_eq!(
            spec(&t, node_port(30050)).endpoints.len(),
            2,
            "the good service is served"
        );
    }

    #[test]
    fn a_frontend_claimed_twice_goes_to_the_first_service_by_name() {
        let twin = SERVICE
            .replace("name: s,", "name: t,")
            .replace("10.96.0.50", "10.96.0.51");
        let t = run(&[&twin, SERVICE]);
        assert_eq!(spec(&t, node_port(30050)).service.name, "s");
        assert!(
            warnings(&t)
                .iter()
                .any(|w| w.contains("ns/t") && w.contains("already served"))
        );
    }

    /// Runs a [`Translator`] over `objects` for the `dirty` services.
    fn update(translator: &mut Translator, objects: &Objects, dirty: &[&str]) {
        let mut scratch = Translation::default();
        let slices = index_slices(&objects.slices, &mut scratch);
        let services: HashMap<(&str, &str), &Service> = objects
            .services
            .iter()
            .map(|s| {
                (
                    (
                        s.metadata.namespace.as_deref().unwrap_or_default(),
                        s.metadata.name.as_deref().unwrap_or_default(),
                    ),
                    s,
                )
            })
            .collect();
        let inputs = Indexed {
            services: &services,
            slices: &slices,
        };
        translator.update(
            dirty
                .iter()
                .map(|name| ("ns".to_owned(), (*name).to_owned())),
            &inputs,
        );
    }

    #[test]
    fn incremental_updates_agree_with_a_full_translation_whatever_their_order() {
        let twin = SERVICE
            .replace("name: s,", "name: t,")
            .replace("10.96.0.50", "10.96.0.51");
        let both = objects(&[SERVICE, &twin, &slice(TWO_NODES)]);
        let node = NodeInfo {
            name: "node-1".to_owned(),
            addrs: vec![NODE1],
            zone: None,
            pod_cidrs: Vec::new(),
        };
        let full = translate(&both.services, &both.slices, &node, &Settings::default());
        let mut translator = Translator::new(node.clone(), Settings::default());
        // The later name first: it holds the node port until `s` comes.
        update(&mut translator, &both, &["t"]);
        assert_eq!(
            translator.desired().frontends[&node_port(30050)]
                .service
                .name,
            "t"
        );
        update(&mut translator, &both, &["s"]);
        assert_eq!(translator.desired(), &full.desired);
        assert!(
            translator
                .problems()
                .iter()
                .any(|p| p.object == "Service ns/t" && p.message.contains("already served")),
            "{:?}",
            translator.problems()
        );
        // `s` goes: the node port passes to `t`, `s`'s own frontends go.
        let only_t = objects(&[&twin, &slice(TWO_NODES)]);
        update(&mut translator, &only_t, &["s"]);
        let expected = translate(
            &only_t.services,
            &only_t.slices,
            &node,
            &Settings::default(),
        );
        assert_eq!(translator.desired(), &expected.desired);
        assert_eq!(translator.services(), 1);
    }

    #[test]
    fn endpoints_mirroring_follows_the_controller() {
        let selectorless = "
apiVersion: v1
kind: Service
metadata: {name: m}
spec:
  clusterIP: 10.96.0.60
  ports: [{port: 80}]
";
        let endpoints_yaml = "
apiVersion: v1
kind: Endpoints
metadata: {name: m}
subsets:
  - addresses: [{ip: 10.9.0.1, nodeName: node-1}]
    notReadyAddresses: [{ip: 10.9.0.2}]
    ports: [{port: 8080}]
";
        let t = run(&[selectorless, endpoints_yaml]);
        assert_eq!(
            spec(&t, tcp([10, 96, 0, 60], 80)).endpoints,
            endpoints(&[ep([10, 9, 0, 1], 8080, true)]),
            "ready addresses only"
        );
        let skip = endpoints_yaml.replace(
            "metadata: {name: m}",
            "metadata: {name: m, labels: {endpointslice.kubernetes.io/skip-mirror: \"true\"}}",
        );
        let t = run(&[selectorless, &skip]);
        assert!(spec(&t, tcp([10, 96, 0, 60], 80)).endpoints.is_empty());
        let with_selector = selectorless.replace("spec:", "spec:\n  selector: {app: m}");
        let t = run(&[&with_selector, endpoints_yaml]);
        assert!(
            spec(&t, tcp([10, 96, 0, 60], 80)).endpoints.is_empty(),
            "Endpoints of a selector service are not mirrored"
        );
    }

    #[test]
    fn documents_that_do_not_parse_are_reported_by_file_and_position() {
        let mut parsed = Parsed::default();
        let mut problems = Vec::new();
        let text =
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n---\n: : :\n";
        parse(text, "svc.yaml", &mut parsed, &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].object.contains("svc.yaml, document 1"),
            "{problems:?}"
        );
        assert!(parsed.objects.services.is_empty());
    }
}
