//! The programs' clock, for user space: connection-tracking stamps are in
//! the datapath's own time (jiffies scaled, or the coarse clock), which no
//! system call reads. The agent runs [`try_sample`] through
//! `BPF_PROG_TEST_RUN` and reads the time from the packet it gets back.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};

use crate::{ct, maps::config};

/// Writes the datapath's time, a native-endian `u64`, over the first 8
/// bytes of the packet.
#[inline(always)]
pub fn try_sample(ctx: &TcContext) -> Result<i32, i32> {
    let now = ct::now_ns(config());
    ctx.store(0, &now, 0).map_err(|_| TC_ACT_SHOT)?;
    Ok(TC_ACT_OK)
}
