//! Maps and the load-time configuration. Names, key and value types come
//! from `svc-common`; each static's name is the map's name in the object,
//! and the agent's loader checks every one exists under its `svc-common`
//! constant. Capacities here are defaults: the loader sets the real ones.

use aya_ebpf::{
    Global,
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use svc_common::{
    config::{DatapathConfig, DatapathMeta},
    ct::{
        CtEntry, CtKey, DEFAULT_CT_ENTRIES, DEFAULT_FRAG_ENTRIES, DIRECT_SLOTS, FragKey, FragValue,
    },
    lb::{
        AddrInfo, AffinityKey, AffinityValue, Backend, CIDR_SETS, CidrSet, DEFAULT_MAGLEV_SLOTS,
        DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
        DEFAULT_MAX_SOURCE_RANGES, MAX_NODE_ADDRS, MemberKey, ServiceKey, ServiceValue,
        SourceRangeKey,
    },
    sock::{DEFAULT_SOCK_REVNAT_ENTRIES, SockRevKey, SockRevValue},
    stats::{COUNTERS, CounterValue},
    wire::WireAddr,
};

/// `svc_common::config::CONFIG_GLOBAL`, set by the loader.
#[unsafe(no_mangle)]
static SVC_CONFIG: Global<DatapathConfig> = Global::new(DatapathConfig::DEFAULT);

/// The load-time configuration, read in place (a copy would take 64 bytes
/// of the 512-byte stack). The pointer is laundered through a volatile
/// read, as `Global::load` reads the value: the compiler would otherwise
/// fold field reads to the default the object was built with, not what
/// the loader wrote.
#[inline(always)]
pub fn config() -> &'static DatapathConfig {
    let ptr: *const DatapathConfig = (&raw const SVC_CONFIG).cast();
    // SAFETY: `Global` is `repr(transparent)` over an always initialized
    // value, which lives as long as the program.
    unsafe { &*core::ptr::read_volatile(&raw const ptr) }
}

/// `svc_common::config::META_MAP`: written by the agent, read by the clock
/// program (which keeps it in the object).
#[map]
pub static SVC_META_V1: Array<DatapathMeta> = Array::with_max_entries(1, 0);

/// `svc_common::stats::STATS_MAP`.
#[map]
pub static SVC_STATS_V3: PerCpuArray<CounterValue> = PerCpuArray::with_max_entries(COUNTERS, 0);

/// `svc_common::lb::SERVICES_MAP`.
#[map]
pub static SVC_SERVICES_V1: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// `svc_common::lb::BACKENDS_MAP`.
#[map]
pub static SVC_BACKENDS_V1: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// `svc_common::lb::MAGLEV_MAP`: every service's table back to back. User
/// space writes tables through a memory mapping.
#[map]
pub static SVC_MAGLEV_V1: Array<u32> =
    Array::with_max_entries(DEFAULT_MAGLEV_SLOTS, BPF_F_MMAPABLE);

/// `svc_common::lb::ADDRS_MAP`: node addresses and ClusterIPs.
#[map]
pub static SVC_ADDRS_V1: HashMap<WireAddr, AddrInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES + MAX_NODE_ADDRS, 0);

/// `svc_common::lb::CIDRS_MAP`: the service CIDRs and the local CIDRs.
#[map]
pub static SVC_CIDRS_V1: Array<CidrSet> = Array::with_max_entries(CIDR_SETS, 0);

/// `svc_common::lb::SOURCE_RANGES_MAP` (LPM tries must not preallocate).
#[map]
pub static SVC_SRC_RANGES_V1: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::with_max_entries(DEFAULT_MAX_SOURCE_RANGES, BPF_F_NO_PREALLOC);

/// `svc_common::lb::AFFINITY_MAP`.
#[map]
pub static SVC_AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_AFFINITY, 0);

/// `svc_common::lb::MEMBERS_MAP` (written by the agent only, allocated as
/// it grows).
#[map]
pub static SVC_MEMBERS_V1: HashMap<MemberKey, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// `svc_common::ct::CT_MAP`.
#[map]
pub static SVC_CT_V1: LruHashMap<CtKey, CtEntry> =
    LruHashMap::with_max_entries(DEFAULT_CT_ENTRIES, 0);

/// `svc_common::ct::DIRECT_MAP`.
#[map]
pub static SVC_DIRECT_V1: Array<CtKey> = Array::with_max_entries(DIRECT_SLOTS, 0);

/// Scratch space of a NAT port scan (`nat::NatScan`), one per CPU; not
/// shared with the agent.
#[map]
pub static SVC_NAT_SCAN: PerCpuArray<crate::nat::NatScan> = PerCpuArray::with_max_entries(1, 0);

/// `svc_common::ct::FRAG_MAP`.
#[map]
pub static SVC_FRAGS_V1: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(DEFAULT_FRAG_ENTRIES, 0);

/// `svc_common::lb::SERVICE_STATS_MAP`.
#[map]
pub static SVC_SVC_CTRS_V1: PerCpuArray<CounterValue> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// `svc_common::lb::BACKEND_STATS_MAP`.
#[map]
pub static SVC_BE_STATS_V1: PerCpuArray<CounterValue> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// `svc_common::sock::SOCK_REVNAT_MAP`.
#[map]
pub static SVC_SOCK_REV_V1: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(DEFAULT_SOCK_REVNAT_ENTRIES, 0);
