//! Counting packets: global counters by class and event, and per-frontend
//! and per-backend traffic.

use aya_ebpf::maps::PerCpuArray;
use svc_common::{
    stats::{Counter, CounterValue},
    wire::FrontendId,
};

use crate::maps::{SVC_BE_STATS_V1, SVC_STATS_V3, SVC_SVC_CTRS_V1};

#[inline(always)]
fn bump(map: &PerCpuArray<CounterValue>, index: u32, bytes: u32) {
    if let Some(value) = map.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful per-CPU lookup, so it is
        // valid and no other CPU writes this slot.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += u64::from(bytes);
        }
    }
}

/// Counts one packet of `bytes` bytes under `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter, bytes: u32) {
    bump(&SVC_STATS_V3, counter.index(), bytes);
}

/// Counts a translated packet under its frontend and its backend.
#[inline(always)]
pub fn count_flow(service_id: FrontendId, backend_id: u32, bytes: u32) {
    bump(&SVC_SVC_CTRS_V1, service_id.get(), bytes);
    bump(&SVC_BE_STATS_V1, backend_id, bytes);
}
