//! What the agent writes, in its own terms: frontends (a service port on
//! an address, or a node port), how each treats its traffic, and the
//! endpoints behind it. `Maps` turns them into map entries.

use std::net::{Ipv4Addr, SocketAddrV4};

use svc_common::{
    lb::{
        BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Backend, EMPTY_DROP, EMPTY_REJECT, SCOPE_ADDR,
        SCOPE_IN_CLUSTER, SCOPE_NODEPORT, SVC_F_AFFINITY, SVC_F_IN_CLUSTER, SVC_F_LOCAL_ONLY,
        SVC_F_MASQ_ALWAYS, SVC_F_MASQ_NON_LOCAL, SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue,
    },
    proto,
    wire::{self, WirePort},
};

use super::Ipv4Cidr;

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
            addr: addr.into(),
            port: WirePort::from_host(port),
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
        let port = key.port.host();
        let frontend = match key.scope & !SCOPE_IN_CLUSTER {
            SCOPE_ADDR => Self::Address {
                addr: key.addr.into(),
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

/// How a frontend treats its traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePolicy {
    /// Which new flows take the node's address as their source.
    pub masquerade: Masquerade,
    /// The backends given are this node's only (a Local traffic policy).
    pub local_only: bool,
    /// sessionAffinity ClientIP with this timeout.
    pub affinity_timeout_secs: Option<u32>,
    /// With no backends, drop instead of refusing.
    pub drop_when_empty: bool,
    /// New flows only from these sources (`loadBalancerSourceRanges`);
    /// empty: from anywhere. Sorted.
    pub source_ranges: Vec<Ipv4Cidr>,
    /// An in-cluster variant of this frontend exists
    /// ([`Frontend::in_cluster`]): this node's pods and processes use it.
    pub in_cluster_variant: bool,
}

/// Which new flows of a frontend are masqueraded (take the node's address
/// as their source, so the backend's replies come back through this
/// node). Hairpin flows always are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Masquerade {
    /// Keep every client's address (a Local traffic policy).
    Never,
    /// Masquerade sources that are not local (not this node's pods; see
    /// `--detect-local-mode`): kube-proxy's rule for ClusterIPs and for
    /// external addresses with a Cluster traffic policy.
    #[default]
    NonLocal,
    /// Masquerade every source (`--masquerade-all`).
    Always,
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
    pub(super) fn flags(&self) -> u16 {
        [
            (
                self.masquerade == Masquerade::NonLocal,
                SVC_F_MASQ_NON_LOCAL,
            ),
            (self.masquerade == Masquerade::Always, SVC_F_MASQ_ALWAYS),
            (self.local_only, SVC_F_LOCAL_ONLY),
            (self.affinity_timeout_secs.is_some(), SVC_F_AFFINITY),
            (!self.source_ranges.is_empty(), SVC_F_SOURCE_RANGES),
            (self.in_cluster_variant, SVC_F_IN_CLUSTER),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |flags, (_, bit)| flags | bit)
    }

    /// `ServiceValue::on_empty` of this policy.
    pub(super) const fn on_empty(&self) -> u8 {
        if self.drop_when_empty {
            EMPTY_DROP
        } else {
            EMPTY_REJECT
        }
    }

    pub(super) fn from_value(value: &ServiceValue, source_ranges: Vec<Ipv4Cidr>) -> Self {
        let masquerade = if value.flags & SVC_F_MASQ_ALWAYS != 0 {
            Masquerade::Always
        } else if value.flags & SVC_F_MASQ_NON_LOCAL != 0 {
            Masquerade::NonLocal
        } else {
            Masquerade::Never
        };
        Self {
            source_ranges,
            in_cluster_variant: value.flags & SVC_F_IN_CLUSTER != 0,
            masquerade,
            local_only: value.flags & SVC_F_LOCAL_ONLY != 0,
            affinity_timeout_secs: (value.flags & SVC_F_AFFINITY != 0)
                .then_some(value.affinity_timeout_secs),
            drop_when_empty: value.on_empty == EMPTY_DROP,
        }
    }
}

impl BackendSpec {
    pub(super) fn from_value(value: Backend) -> Self {
        Self {
            addr: wire::socket(value.addr, value.port),
            local: value.flags & BACKEND_F_LOCAL != 0,
            terminating: value.flags & BACKEND_F_TERMINATING != 0,
        }
    }

    pub(super) fn value(self) -> Backend {
        let mut flags = 0;
        if self.local {
            flags |= BACKEND_F_LOCAL;
        }
        if self.terminating {
            flags |= BACKEND_F_TERMINATING;
        }
        let (addr, port) = wire::split(self.addr);
        Backend {
            addr,
            port,
            flags,
            _pad: 0,
        }
    }
}
