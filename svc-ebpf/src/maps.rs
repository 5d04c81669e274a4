//! Map definitions. Names, key and value types come from `svc-common`; the
//! static's name is the map's name in the object, and the agent's loader
//! checks each one exists under the `svc-common` constant.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use svc_common::stats::{COUNTERS, CounterValue};

/// `svc_common::stats::STATS_MAP`.
#[map]
pub static SVC_STATS_V1: PerCpuArray<CounterValue> = PerCpuArray::with_max_entries(COUNTERS, 0);
