//! The source ports masqueraded flows take. They must never be ports the
//! node's own connections take (its ephemeral range): a masqueraded flow
//! and a node connection to the same backend would share a tuple.

use std::{fs, io, ops::RangeInclusive, str::FromStr};

/// Ports below are privileged: never taken.
const FIRST_UNPRIVILEGED: u16 = 1024;

/// A range of source ports, `MIN-MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    /// How many ports.
    #[must_use]
    pub fn len(self) -> u32 {
        u32::from(self.max) - u32::from(self.min) + 1
    }

    #[must_use]
    pub const fn is_empty(self) -> bool {
        false
    }

    fn overlaps(self, other: &RangeInclusive<u16>) -> bool {
        self.min <= *other.end() && *other.start() <= self.max
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("{text:?} is not a port range MIN-MAX (1024-65535)");
        let (min, max) = text.split_once('-').ok_or_else(invalid)?;
        let min: u16 = min.trim().parse().map_err(|_| invalid())?;
        let max: u16 = max.trim().parse().map_err(|_| invalid())?;
        if min < FIRST_UNPRIVILEGED || min > max {
            return Err(invalid());
        }
        Ok(Self { min, max })
    }
}

/// The node's ephemeral ports (`net.ipv4.ip_local_port_range`) in this
/// network namespace.
pub fn local_port_range() -> io::Result<RangeInclusive<u16>> {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    match (fields.next(), fields.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Ok(lo..=hi),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("ip_local_port_range {text:?}"),
        )),
    }
}

/// The widest run of unprivileged ports outside `local` (the node's
/// ephemeral range): with Linux's default 32768-60999, 1024-32767.
#[must_use]
pub fn default_range(local: &RangeInclusive<u16>) -> PortRange {
    let below = (*local.start() > FIRST_UNPRIVILEGED).then(|| PortRange {
        min: FIRST_UNPRIVILEGED,
        max: local.start() - 1,
    });
    let above = (*local.end() < u16::MAX).then(|| PortRange {
        min: local.end().max(&(FIRST_UNPRIVILEGED - 1)) + 1,
        max: u16::MAX,
    });
    match (below, above) {
        (Some(below), Some(above)) if above.len() > below.len() => above,
        (Some(below), _) => below,
        (None, Some(above)) => above,
        // Every unprivileged port is ephemeral: share the top of it.
        (None, None) => PortRange {
            min: 61_000,
            max: u16::MAX,
        },
    }
}

/// Whether `range` takes ports the node's own connections may take.
#[must_use]
pub fn overlaps_local(range: PortRange, local: &RangeInclusive<u16>) -> bool {
    range.overlaps(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_widest_run_outside_the_ephemeral_ports() {
        assert_eq!(default_range(&(32_768..=60_999)).to_string(), "1024-32767");
        assert_eq!(default_range(&(1024..=40_000)).to_string(), "40001-65535");
        assert_eq!(default_range(&(10_000..=20_000)).to_string(), "20001-65535");
        assert_eq!(default_range(&(1024..=65_535)).to_string(), "61000-65535");
    }

    #[test]
    fn ranges_parse_and_bad_ones_are_named() {
        let range: PortRange = "20000-49999".parse().expect("a range");
        assert_eq!(
            (range.min, range.max, range.len()),
            (20_000, 49_999, 30_000)
        );
        for bad in ["80-90", "5000", "6000-5000", "x-y", "1024-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        assert!(overlaps_local(range, &(32_768..=60_999)));
        assert!(!overlaps_local(
            "1024-32767".parse().expect("a range"),
            &(32_768..=60_999)
        ));
    }
}
