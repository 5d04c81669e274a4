//! Addresses that are not frontends but mean something to the datapath:
//! this node's (node ports answer there) and every service's ClusterIP
//! (`SVC_ADDRS_V1`), and the CIDR sets (`SVC_CIDRS_V1`): the service CIDRs,
//! whose unallocated addresses are dropped, and the local CIDRs, whose
//! sources are not masqueraded.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::Ipv4Addr,
};

use aya::maps::{Array, HashMap, MapData, MapError};
use svc_common::{
    lb::{
        ADDR_F_CLUSTER_IP, ADDR_F_NODE, ADDRS_MAP, AddrInfo, CIDRS_LOCAL, CIDRS_MAP, CIDRS_SERVICE,
        Cidr, MAX_NODE_ADDRS,
    },
    wire::WireAddr,
};

use super::{Error, Ipv4Cidr, Result, cidr::cidr_set};

/// Which CIDR set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidrSetKind {
    /// The service CIDRs.
    Service,
    /// Sources counted as local (`--detect-local-mode` by CIDR).
    Local,
}

impl CidrSetKind {
    const fn index(self) -> u32 {
        match self {
            Self::Service => CIDRS_SERVICE,
            Self::Local => CIDRS_LOCAL,
        }
    }
}

/// The address map and the CIDR sets, and what this agent wrote to them.
pub struct Addrs {
    map: HashMap<MapData, WireAddr, AddrInfo>,
    cidrs: Array<MapData, svc_common::lb::CidrSet>,
    nodes: BTreeSet<Ipv4Addr>,
    /// ClusterIPs: `true` for a service this proxy serves.
    cluster_ips: BTreeMap<Ipv4Addr, bool>,
    /// The flags each address has in the map.
    written: StdHashMap<Ipv4Addr, u32>,
    /// Addresses whose entry may differ from what is wanted (a write
    /// failed): written again by the next change.
    dirty: BTreeSet<Ipv4Addr>,
    service_cidrs: Vec<Ipv4Cidr>,
    local_cidrs: Vec<Ipv4Cidr>,
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

impl Addrs {
    pub(super) fn new(
        map: HashMap<MapData, WireAddr, AddrInfo>,
        cidrs: Array<MapData, svc_common::lb::CidrSet>,
    ) -> Self {
        Self {
            map,
            cidrs,
            nodes: BTreeSet::new(),
            cluster_ips: BTreeMap::new(),
            written: StdHashMap::new(),
            dirty: BTreeSet::new(),
            service_cidrs: Vec::new(),
            local_cidrs: Vec::new(),
        }
    }

    /// Reads back what an earlier run wrote.
    pub(super) fn adopt(&mut self) -> Result<()> {
        for entry in &self.map {
            let (addr, info) = entry.map_err(map_error(ADDRS_MAP))?;
            let addr = Ipv4Addr::from(addr);
            if info.flags & ADDR_F_NODE != 0 {
                self.nodes.insert(addr);
            } else {
                self.cluster_ips
                    .insert(addr, info.flags & ADDR_F_CLUSTER_IP != 0);
            }
            self.written.insert(addr, info.flags);
        }
        for kind in [CidrSetKind::Service, CidrSetKind::Local] {
            let set = self
                .cidrs
                .get(&kind.index(), 0)
                .map_err(map_error(CIDRS_MAP))?;
            let count = usize::try_from(set.count).unwrap_or(0).min(set.cidrs.len());
            let cidrs = set.cidrs[..count]
                .iter()
                .copied()
                .filter_map(from_map)
                .collect();
            *self.cidrs_mut(kind) = cidrs;
        }
        Ok(())
    }

    /// The node addresses written.
    #[must_use]
    pub fn nodes(&self) -> Vec<Ipv4Addr> {
        self.nodes.iter().copied().collect()
    }

    /// The ClusterIPs written (`true`: served here).
    #[must_use]
    pub const fn cluster_ips(&self) -> &BTreeMap<Ipv4Addr, bool> {
        &self.cluster_ips
    }

    /// The CIDRs of a set, as written.
    #[must_use]
    pub fn cidrs(&self, kind: CidrSetKind) -> &[Ipv4Cidr] {
        match kind {
            CidrSetKind::Service => &self.service_cidrs,
            CidrSetKind::Local => &self.local_cidrs,
        }
    }

    fn cidrs_mut(&mut self, kind: CidrSetKind) -> &mut Vec<Ipv4Cidr> {
        match kind {
            CidrSetKind::Service => &mut self.service_cidrs,
            CidrSetKind::Local => &mut self.local_cidrs,
        }
    }

    /// Entries in the address map.
    #[must_use]
    pub fn len(&self) -> usize {
        self.written.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.written.is_empty()
    }

    /// Sets the node's own addresses (where node ports answer): at most
    /// `MAX_NODE_ADDRS` (the map's room beyond the ClusterIPs); more are
    /// refused whole.
    pub fn set_nodes(&mut self, addrs: &[Ipv4Addr]) -> Result<()> {
        let wanted: BTreeSet<Ipv4Addr> = addrs.iter().copied().collect();
        if wanted.len() > MAX_NODE_ADDRS as usize {
            return Err(Error::TooManyNodeAddrs {
                count: wanted.len(),
                max: MAX_NODE_ADDRS,
            });
        }
        self.dirty
            .extend(wanted.symmetric_difference(&self.nodes).copied());
        self.nodes = wanted;
        self.flush()
    }

    /// Sets the ClusterIPs of every service (`true`: served here, so new
    /// flows to ports it lacks are refused; `false`: another proxy's,
    /// left alone).
    pub fn set_cluster_ips(&mut self, wanted: &BTreeMap<Ipv4Addr, bool>) -> Result<()> {
        let touched: Vec<Ipv4Addr> = wanted
            .iter()
            .filter(|(addr, served)| self.cluster_ips.get(addr) != Some(served))
            .map(|(addr, _)| *addr)
            .chain(
                self.cluster_ips
                    .keys()
                    .filter(|addr| !wanted.contains_key(addr))
                    .copied(),
            )
            .collect();
        self.cluster_ips.clone_from(wanted);
        self.dirty.extend(touched);
        self.flush()
    }

    /// Writes every dirty address, deletions first (they make room); one
    /// that fails stays dirty, and so do those after it, for the next
    /// change (or [`Addrs::flush`] at the next sync) to retry.
    pub fn flush(&mut self) -> Result<()> {
        let (gone, kept): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) = self
            .dirty
            .iter()
            .partition(|addr| !self.nodes.contains(addr) && !self.cluster_ips.contains_key(addr));
        for addr in gone.into_iter().chain(kept) {
            self.write(addr)?;
            self.dirty.remove(&addr);
        }
        Ok(())
    }

    /// Brings one address's entry in line with the node addresses and the
    /// ClusterIPs.
    fn write(&mut self, addr: Ipv4Addr) -> Result<()> {
        let node = self.nodes.contains(&addr);
        let cluster_ip = self.cluster_ips.get(&addr);
        let mut flags = 0;
        if node {
            flags |= ADDR_F_NODE;
        }
        if cluster_ip == Some(&true) {
            flags |= ADDR_F_CLUSTER_IP;
        }
        let wanted = node || cluster_ip.is_some();
        match (wanted, self.written.get(&addr)) {
            (true, Some(&written)) if written == flags => {}
            (true, _) => {
                self.map
                    .insert(WireAddr::from(addr), AddrInfo { flags }, 0)
                    .map_err(map_error(ADDRS_MAP))?;
                self.written.insert(addr, flags);
            }
            (false, Some(_)) => {
                match self.map.remove(&WireAddr::from(addr)) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(source) => return Err(map_error(ADDRS_MAP)(source)),
                }
                self.written.remove(&addr);
            }
            (false, None) => {}
        }
        Ok(())
    }

    /// Writes a CIDR set. The datapath holds a few
    /// (`svc_common::lb::MAX_CIDRS`); those that do not fit are returned.
    pub fn set_cidrs(&mut self, kind: CidrSetKind, cidrs: &[Ipv4Cidr]) -> Result<Vec<Ipv4Cidr>> {
        let (set, rest) = cidr_set(cidrs);
        let kept = &cidrs[..cidrs.len() - rest.len()];
        if self.cidrs(kind) != kept {
            self.cidrs
                .set(kind.index(), set, 0)
                .map_err(map_error(CIDRS_MAP))?;
            *self.cidrs_mut(kind) = kept.to_vec();
        }
        Ok(rest.to_vec())
    }
}

fn from_map(cidr: Cidr) -> Option<Ipv4Cidr> {
    let prefix = u8::try_from(cidr.mask.prefix_len()).ok()?;
    Ipv4Cidr::new(cidr.base.into(), prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_read_back_as_written() {
        for text in ["10.96.0.0/12", "0.0.0.0/0", "192.0.2.7/32"] {
            let cidr: Ipv4Cidr = text.parse().expect("a CIDR");
            assert_eq!(from_map(cidr.to_map()), Some(cidr));
        }
    }
}
