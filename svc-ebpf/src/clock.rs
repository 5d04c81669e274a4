//! The programs' clock, for user space: connection-tracking stamps are in
//! the datapath's own time (jiffies scaled, or the coarse clock), which no
//! system call reads. The agent runs [`try_sample`] through
//! `BPF_PROG_TEST_RUN` and reads the time from the packet it gets back.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};

use crate::{
    ct,
    maps::{SVC_META_V1, config},
};

/// Writes the datapath's time, a native-endian `u64`, over the first 8
/// bytes of the packet, and the tick the pinned maps were written with
/// (`DatapathMeta::ns_per_tick`) over the next 8.
#[inline(always)]
pub fn try_sample(ctx: &TcContext) -> Result<i32, i32> {
    let now = ct::now_ns(config());
    let pinned_tick = SVC_META_V1.get(0).map_or(0, |meta| meta.ns_per_tick);
    ctx.store(0, &now, 0).map_err(|_| TC_ACT_SHOT)?;
    ctx.store(8, &pinned_tick, 0).map_err(|_| TC_ACT_SHOT)?;
    Ok(TC_ACT_OK)
}
