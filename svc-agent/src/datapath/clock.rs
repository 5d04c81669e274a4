//! The kernel's tick, so the programs can read time as jiffies (one
//! inlined load) instead of calling a clock helper on every packet.

/// Tick rates Linux is built with (`CONFIG_HZ`).
const KNOWN_HZ: [u64; 4] = [100, 250, 300, 1000];

/// Nanoseconds per kernel tick: the resolution of the coarse monotonic
/// clock, which the kernel keeps in jiffies (`clock_getres` reports one
/// tick). A system call, so it works where `/proc/timer_list` is masked
/// (unprivileged containers), and the same on every start on one kernel,
/// so a restarted agent reads its pinned entries with the same clock.
/// `None` when the resolution is not a tick Linux is built with.
#[must_use]
pub fn tick_ns() -> Option<u64> {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and out-parameter.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &raw mut res) } != 0 {
        return None;
    }
    let ns = u64::try_from(res.tv_sec)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(res.tv_nsec).ok()?)?;
    tick_of(ns)
}

/// `CLOCK_MONOTONIC_COARSE` now: the clock `bpf_ktime_get_coarse_ns` reads.
#[must_use]
pub fn coarse_now_ns() -> Option<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and out-parameter.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut now) } != 0 {
        return None;
    }
    u64::try_from(now.tv_sec)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(now.tv_nsec).ok()?)
}

/// The clock that stamped connection-tracking entries pinned by an agent
/// that did not record it: `tick` (jiffies scaled) when a stamp lies past
/// the coarse clock's `coarse_now` (jiffies start 2³² − 300·HZ ticks past
/// zero, at least 49 days of nanoseconds at 1000 Hz, more than any live
/// entry's age), else 0 (the coarse clock, which no stamp can be ahead
/// of). `None` when there are no stamps to tell by.
#[must_use]
pub fn infer_tick(max_stamp: Option<u64>, coarse_now: u64, tick: u64) -> Option<u64> {
    let stamp = max_stamp?;
    Some(if stamp > coarse_now { tick } else { 0 })
}

/// `resolution_ns` if it is the tick of a rate Linux is built with (the
/// kernel rounds 10⁹ / HZ to the nearest nanosecond).
fn tick_of(resolution_ns: u64) -> Option<u64> {
    KNOWN_HZ
        .into_iter()
        .map(|hz| (1_000_000_000 + hz / 2) / hz)
        .find(|&tick| tick == resolution_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_those_of_the_rates_linux_is_built_with() {
        assert_eq!(tick_of(4_000_000), Some(4_000_000), "250 Hz");
        assert_eq!(tick_of(3_333_333), Some(3_333_333), "300 Hz");
        assert_eq!(tick_of(1_000_000), Some(1_000_000), "1000 Hz");
        assert_eq!(tick_of(1), None, "a high-resolution clock is no tick");
        assert_eq!(tick_of(2_000_000), None, "500 Hz is not a Linux rate");
    }

    #[test]
    fn the_clock_of_unrecorded_pins_is_told_by_their_stamps() {
        let day = 86_400 * 1_000_000_000u64;
        let uptime = 3 * day;
        // Jiffies at 250 Hz: 2^32 - 75,000 ticks at boot, 4 ms each.
        let jiffies_now = ((1u64 << 32) - 75_000) * 4_000_000 + uptime;
        assert_eq!(
            infer_tick(Some(jiffies_now - 60_000_000_000), uptime, 4_000_000),
            Some(4_000_000),
            "a stamp far ahead of the coarse clock is jiffies"
        );
        assert_eq!(
            infer_tick(Some(uptime - 5_000_000_000), uptime, 4_000_000),
            Some(0),
            "a stamp behind the coarse clock is the coarse clock"
        );
        assert_eq!(infer_tick(None, uptime, 4_000_000), None);
    }

    #[test]
    fn this_kernel_has_a_tick() {
        assert!(
            tick_ns().is_some(),
            "the coarse clock's resolution should be a tick"
        );
    }
}
