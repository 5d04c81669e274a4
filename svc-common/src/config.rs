//! Load-time configuration of the datapath: one global, [`CONFIG_GLOBAL`],
//! written by the loader with `EbpfLoader::override_global`.

use crate::{assert_layout, impl_user_pod, wire::WireAddr};

/// Symbol name of the `Global<DatapathConfig>` in the eBPF object.
pub const CONFIG_GLOBAL: &str = "SVC_CONFIG";

/// Nanoseconds per second.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// [`DatapathConfig::local_detect`]: traffic entering at a pod interface
/// is local, traffic entering at an uplink is not (kube-proxy's
/// `InterfaceNamePrefix` mode).
pub const LOCAL_BY_INTERFACE: u8 = 0;
/// [`DatapathConfig::local_detect`]: a source inside the local CIDRs
/// (`crate::lb::CIDRS_LOCAL`: the cluster's or this node's pod CIDRs) is
/// local, wherever it enters (kube-proxy's `ClusterCIDR` and `NodeCIDR`
/// modes).
pub const LOCAL_BY_CIDR: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DatapathConfig {
    /// Network namespace cookie of the node's own namespace: the socket
    /// hooks translate only sockets of that namespace (pods are translated
    /// per packet). 0 disables the socket hooks.
    pub host_netns_cookie: u64,
    /// A TCP flow that has not seen a reply yet (SYN sent), nanoseconds.
    pub ct_timeout_tcp_syn_ns: u64,
    /// An answered TCP flow, nanoseconds.
    pub ct_timeout_tcp_established_ns: u64,
    /// A TCP flow after FIN or RST, nanoseconds.
    pub ct_timeout_tcp_closing_ns: u64,
    /// A UDP flow, nanoseconds.
    pub ct_timeout_udp_ns: u64,
    /// The node address that masqueraded and hairpinned flows take as
    /// their source.
    pub masq_addr: WireAddr,
    /// First source port for NAT, host order.
    pub nat_port_min: u16,
    /// Last source port for NAT, host order.
    pub nat_port_max: u16,
    /// Nanoseconds per kernel tick (10⁹ / `CONFIG_HZ`). The programs' clock
    /// is then `bpf_jiffies64() × ns_per_tick`, which the verifier inlines
    /// into one load; 0 makes them call `bpf_ktime_get_coarse_ns` instead.
    /// The loader fills it in when it can measure the tick.
    pub ns_per_tick: u64,
    /// How a new flow's source is judged local (this node's pods) or not,
    /// which decides masquerading: [`LOCAL_BY_INTERFACE`] or
    /// [`LOCAL_BY_CIDR`].
    pub local_detect: u8,
    pub _pad: [u8; 7],
}
assert_layout!(DatapathConfig, size = 64, align = 8);
impl_user_pod!(DatapathConfig);

impl DatapathConfig {
    /// Defaults: kube-proxy-like timeouts, NAT ports above Linux's default
    /// ephemeral range so they never meet the node's own sockets.
    pub const DEFAULT: Self = Self {
        host_netns_cookie: 0,
        ct_timeout_tcp_syn_ns: 60 * NS_PER_SEC,
        ct_timeout_tcp_established_ns: 6 * 3600 * NS_PER_SEC,
        ct_timeout_tcp_closing_ns: 10 * NS_PER_SEC,
        ct_timeout_udp_ns: 60 * NS_PER_SEC,
        masq_addr: WireAddr::UNSPECIFIED,
        nat_port_min: 61_000,
        nat_port_max: 65_535,
        ns_per_tick: 0,
        local_detect: LOCAL_BY_INTERFACE,
        _pad: [0; 7],
    };
}

/// A pinned one-entry array of [`DatapathMeta`]: what the pinned maps were
/// written with, so a restarted agent reads them the same way.
pub const META_MAP: &str = "SVC_META_V1";

/// [`DatapathMeta::flags`]: `ns_per_tick` is set.
pub const META_F_CLOCK: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DatapathMeta {
    /// [`DatapathConfig::ns_per_tick`] of the programs that stamped the
    /// pinned connection-tracking entries (0: the coarse clock).
    pub ns_per_tick: u64,
    /// `META_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
assert_layout!(DatapathMeta, size = 16, align = 8);
impl_user_pod!(DatapathMeta);

impl Default for DatapathConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}
