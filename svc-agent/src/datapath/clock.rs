//! The kernel's tick, so the programs can read time as jiffies (one
//! inlined load) instead of calling a clock helper on every packet.

use std::{fs, sync::OnceLock, thread, time::Duration};

/// Tick rates Linux is built with (`CONFIG_HZ`).
const KNOWN_HZ: [u64; 4] = [100, 250, 300, 1000];

/// Nanoseconds per kernel tick, measured once per process from
/// `/proc/timer_list` (root only): two samples of `jiffies` and of the
/// monotonic clock 100 ms apart. `None` when the file is unreadable or the
/// rate is not one Linux is built with.
pub fn tick_ns() -> Option<u64> {
    static TICK: OnceLock<Option<u64>> = OnceLock::new();
    *TICK.get_or_init(measure)
}

fn measure() -> Option<u64> {
    let (ns0, jiffies0) = sample()?;
    thread::sleep(Duration::from_millis(100));
    let (ns1, jiffies1) = sample()?;
    let hz = hz_from(ns1.checked_sub(ns0)?, jiffies1.checked_sub(jiffies0)?)?;
    Some(1_000_000_000 / hz)
}

/// The closest known rate to `ticks` per `elapsed_ns`, if within 10%.
fn hz_from(elapsed_ns: u64, ticks: u64) -> Option<u64> {
    if elapsed_ns == 0 {
        return None;
    }
    let measured = ticks.saturating_mul(1_000_000_000) / elapsed_ns;
    KNOWN_HZ
        .into_iter()
        .find(|&hz| measured.abs_diff(hz) * 10 <= hz)
}

/// `now at <ns> nsecs` and the first `jiffies: <n>` of `/proc/timer_list`.
fn sample() -> Option<(u64, u64)> {
    let text = fs::read_to_string("/proc/timer_list").ok()?;
    let now = text.lines().find_map(|line| {
        line.strip_prefix("now at ")?
            .strip_suffix(" nsecs")?
            .trim()
            .parse()
            .ok()
    })?;
    let jiffies = text
        .lines()
        .find_map(|line| line.strip_prefix("jiffies: ")?.trim().parse().ok())?;
    Some((now, jiffies))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_round_to_what_linux_is_built_with() {
        assert_eq!(hz_from(1_000_000_000, 250), Some(250));
        assert_eq!(
            hz_from(100_000_000, 26),
            Some(250),
            "a tick more, within 10%"
        );
        assert_eq!(hz_from(100_000_000, 100), Some(1000));
        assert_eq!(hz_from(100_000_000, 50), None, "500 Hz is not a Linux rate");
        assert_eq!(hz_from(0, 10), None);
    }
}
