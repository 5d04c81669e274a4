//! Counting packets into `SVC_STATS_V1`.

use svc_common::stats::Counter;

use crate::maps::SVC_STATS_V1;

/// Counts one packet of `bytes` bytes under `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter, bytes: u32) {
    if let Some(value) = SVC_STATS_V1.get_ptr_mut(counter.index()) {
        // SAFETY: the pointer comes from a successful per-CPU lookup, so it is
        // valid and no other CPU writes this slot.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += u64::from(bytes);
        }
    }
}
