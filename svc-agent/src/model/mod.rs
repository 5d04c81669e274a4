//! Kubernetes objects → the datapath's desired state, with kube-proxy's
//! semantics. A pure function over plain data: no I/O, no clock, so every
//! rule is tested on YAML fixtures (`tests.rs` and `fixtures/`).
//!
//! `service.rs` turns one Service and its slices into frontends,
//! `endpoints.rs` picks each frontend's endpoints (readiness, traffic
//! policies, topology), `translator.rs` keeps the whole translation up to
//! date service by service.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::datapath::{Frontend, Ipv4Cidr, Protocol, ServicePolicy};

pub use translator::Translator;

mod endpoints;
mod service;
#[cfg(test)]
mod tests;
mod translator;

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

/// `Ok(Some)` for IPv4, `Ok(None)` for IPv6, `Err` for garbage.
fn parse_ip(text: &str) -> Result<Option<Ipv4Addr>, String> {
    match text.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(addr)) => Ok(Some(addr)),
        Ok(std::net::IpAddr::V6(_)) => Ok(None),
        Err(err) => Err(err.to_string()),
    }
}
