//! IPv4 CIDRs: `loadBalancerSourceRanges`, service CIDRs, pod CIDRs.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use svc_common::{
    lb::{Cidr, CidrSet, MAX_CIDRS},
    wire::WireAddr,
};

/// An IPv4 CIDR, its address masked to the prefix. The prefix is at most
/// 32 by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// `addr/prefix` with the host bits cleared; `None` for a prefix over
    /// 32.
    #[must_use]
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then(|| Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// The network address (host bits zero).
    #[must_use]
    pub const fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    #[must_use]
    pub const fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `addr` lies inside.
    #[must_use]
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.addr)
    }

    /// The datapath's form: base and mask in wire order.
    #[must_use]
    pub fn to_map(self) -> Cidr {
        Cidr {
            base: self.addr.into(),
            mask: WireAddr::mask(self.prefix),
        }
    }
}

/// The netmask of a prefix of at most 32, host order.
fn mask(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a string is not an IPv4 CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is an IPv6 CIDR; only IPv4 is served")]
    Ipv6(String),
    #[error("{0:?} is not an IPv4 CIDR (ADDRESS/PREFIX, prefix 0-32)")]
    Invalid(String),
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;

    /// `a.b.c.d/n`, or a bare address (a /32).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let (addr, prefix) = trimmed.split_once('/').unwrap_or((trimmed, "32"));
        let invalid = || CidrError::Invalid(text.to_owned());
        match addr.parse::<std::net::IpAddr>().map_err(|_| invalid())? {
            std::net::IpAddr::V4(addr) => {
                let prefix = prefix.parse::<u8>().map_err(|_| invalid())?;
                Self::new(addr, prefix).ok_or_else(invalid)
            }
            std::net::IpAddr::V6(_) => Err(CidrError::Ipv6(text.to_owned())),
        }
    }
}

/// The datapath's fixed-size set of at most [`MAX_CIDRS`] CIDRs; the rest
/// are returned, for the caller to report.
#[must_use]
pub fn cidr_set(cidrs: &[Ipv4Cidr]) -> (CidrSet, &[Ipv4Cidr]) {
    let kept = cidrs.len().min(MAX_CIDRS as usize);
    let mut set = CidrSet {
        count: u32::try_from(kept).unwrap_or(0),
        ..CidrSet::default()
    };
    for (slot, cidr) in set.cidrs.iter_mut().zip(cidrs) {
        *slot = cidr.to_map();
    }
    (set, &cidrs[kept..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_over_32_are_refused_not_panicked_on() {
        assert_eq!(Ipv4Cidr::new(Ipv4Addr::new(10, 0, 0, 0), 33), None);
        assert_eq!(Ipv4Cidr::new(Ipv4Addr::new(10, 0, 0, 0), 255), None);
        assert_eq!(
            "10.0.0.0/33".parse::<Ipv4Cidr>(),
            Err(CidrError::Invalid("10.0.0.0/33".to_owned()))
        );
    }

    #[test]
    fn parsing_masks_host_bits_and_takes_bare_addresses() {
        let cidr: Ipv4Cidr = "10.96.7.9/12".parse().expect("a CIDR");
        assert_eq!(cidr.to_string(), "10.96.0.0/12");
        assert!(cidr.contains(Ipv4Addr::new(10, 111, 1, 1)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 112, 0, 0)));
        let host: Ipv4Cidr = " 192.0.2.7 ".parse().expect("an address");
        assert_eq!(host.to_string(), "192.0.2.7/32");
        let all: Ipv4Cidr = "1.2.3.4/0".parse().expect("everything");
        assert!(all.contains(Ipv4Addr::new(255, 1, 1, 1)));
        assert!(matches!(
            "fd00::/64".parse::<Ipv4Cidr>(),
            Err(CidrError::Ipv6(_))
        ));
        assert!("10.0.0.0/x".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn the_datapath_set_matches_what_the_cidrs_contain() {
        let cidrs: Vec<Ipv4Cidr> = ["10.96.0.0/16", "172.20.0.0/24"]
            .iter()
            .map(|text| text.parse().expect("a CIDR"))
            .collect();
        let (set, rest) = cidr_set(&cidrs);
        assert!(rest.is_empty());
        for addr in [
            Ipv4Addr::new(10, 96, 3, 4),
            Ipv4Addr::new(172, 20, 0, 9),
            Ipv4Addr::new(172, 20, 1, 9),
            Ipv4Addr::new(10, 97, 0, 1),
        ] {
            assert_eq!(
                set.contains(addr.into()),
                cidrs.iter().any(|cidr| cidr.contains(addr)),
                "{addr}"
            );
        }
        let many = vec![cidrs[0]; MAX_CIDRS as usize + 2];
        let (set, rest) = cidr_set(&many);
        assert_eq!(set.count, MAX_CIDRS);
        assert_eq!(rest.len(), 2, "the ones that do not fit come back");
    }
}
