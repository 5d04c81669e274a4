//! Sweeping connection tracking from user space, off the agent's main loop.
//! One batched read of the map, then:
//!
//! - entries of flows that timed out are deleted (the datapath no longer
//!   translates with them, and the LRU would evict them only once the map
//!   is full);
//! - UDP flows to an endpoint that no longer serves their frontend, and
//!   UDP flows of a frontend that is gone, are deleted, as kube-proxy
//!   clears their conntrack entries: the client's next datagram picks a
//!   serving endpoint. TCP flows are left to finish by themselves;
//! - affinity entries naming a frontend or backend that is gone are
//!   deleted;
//! - the frontend and backend ids that live flows still name are reported,
//!   so a released id is reused only once no flow names it
//!   ([`super::ids::IdPool`]).
//!
//! The datapath and the sweep judge a flow with the same functions
//! (`svc_common::ct`), and a flow that is dead never comes back, so
//! deleting what the sweep found dead cannot end a live flow.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::SocketAddrV4,
    os::fd::{AsFd as _, OwnedFd},
    time::{Duration, Instant},
};

use aya::maps::MapData;
use svc_common::{
    config::DatapathConfig,
    ct::{CT_F_REPLY, CtEntry, CtKey},
    lb::{AffinityKey, AffinityValue, BackendId},
    proto,
    wire::{self, FrontendId, WireAddr, WirePort},
};

use super::sys;

/// Handles on the maps a sweep reads and prunes, independent of the
/// agent's own (a sweep runs on another thread).
#[derive(Debug)]
pub struct SweepMaps {
    ct: OwnedFd,
    affinity: OwnedFd,
}

impl SweepMaps {
    pub(super) fn new(ct: &MapData, affinity: &MapData) -> io::Result<Self> {
        Ok(Self {
            ct: ct.fd().as_fd().try_clone_to_owned()?,
            affinity: affinity.fd().as_fd().try_clone_to_owned()?,
        })
    }

    /// Handles of their own, for a sweep on another thread.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            ct: self.ct.try_clone()?,
            affinity: self.affinity.try_clone()?,
        })
    }
}

/// What the agent had installed when the sweep began.
#[derive(Clone, Debug, Default)]
pub struct SweepPlan {
    /// The datapath's clock (`Datapath::now_ns`).
    pub now_ns: u64,
    /// The timeouts the datapath was loaded with.
    pub config: DatapathConfig,
    /// Every installed frontend id; for a UDP frontend, the endpoints
    /// serving it (ready or serving-and-terminating, whatever the traffic
    /// policy or topology keep: kube-proxy's set).
    pub frontends: HashMap<FrontendId, Option<HashSet<SocketAddrV4>>>,
    /// Every installed backend id.
    pub backends: HashSet<BackendId>,
}

/// What a sweep found and did.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    /// Connection-tracking entries read.
    pub entries: usize,
    /// Live flows (original entries).
    pub flows: usize,
    /// Entries deleted because their flow timed out.
    pub removed_expired: usize,
    /// Entries of UDP flows deleted because their endpoint stopped serving
    /// their frontend, or the frontend went.
    pub removed_udp: usize,
    /// Affinity entries deleted.
    pub removed_affinity: usize,
    /// Affinity entries read.
    pub affinity_entries: usize,
    /// Ports of the source-NAT range held toward the busiest backend (by
    /// source address and protocol): the range runs out there first.
    pub nat_ports_busiest: usize,
    /// Frontend ids that live flows name.
    pub frontends: HashSet<FrontendId>,
    /// Backend ids that live flows name.
    pub backends: HashSet<BackendId>,
    pub elapsed: Duration,
}

/// Why the sweep deletes an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Removal {
    Expired,
    StaleUdp,
}

/// The sweep's decisions over a snapshot sorted by key.
#[derive(Debug, Default)]
struct Judged {
    remove: Vec<(CtKey, CtEntry, Removal)>,
    flows: usize,
    frontends: HashSet<FrontendId>,
    backends: HashSet<BackendId>,
    /// Live masqueraded flows toward the busiest (source address,
    /// backend, protocol): the ports of the NAT range it holds.
    nat_ports_busiest: usize,
}

/// The endpoint a flow's entry leads to: an original entry rewrites to
/// it, a reply entry's packets come from it.
fn endpoint(key: &CtKey, entry: &CtEntry) -> SocketAddrV4 {
    let (addr, port) = if entry.flags & CT_F_REPLY != 0 {
        (key.saddr, key.sport)
    } else {
        (entry.daddr, entry.dport)
    };
    wire::socket(addr, port)
}

/// Judges every entry of `snapshot` (sorted by key): dead ones are to be
/// removed, and with `prune_udp` the UDP flows `plan` no longer serves.
fn judge(snapshot: &[(CtKey, CtEntry)], plan: &SweepPlan, prune_udp: bool) -> Judged {
    let peer_of = |key: &CtKey, entry: &CtEntry| {
        let peer_key = entry.peer_key(key.protocol);
        snapshot
            .binary_search_by(|(k, _)| k.cmp_key(&peer_key))
            .ok()
            .map(|at| &snapshot[at].1)
            .filter(|peer| peer.is_peer_of(key))
    };
    let mut judged = Judged::default();
    let mut nat_ports: HashMap<(WireAddr, WireAddr, WirePort, u8), usize> = HashMap::new();
    let nat_range = plan.config.nat_port_min..=plan.config.nat_port_max;
    for (key, entry) in snapshot {
        let fresh = |e: &CtEntry| e.is_fresh(&plan.config, key.protocol, plan.now_ns);
        let live = fresh(entry) || peer_of(key, entry).is_some_and(fresh);
        if !live {
            judged.remove.push((*key, *entry, Removal::Expired));
            continue;
        }
        if prune_udp && key.protocol == proto::UDP {
            let stale = match plan.frontends.get(&entry.service_id) {
                None => true,
                Some(Some(serving)) => !serving.contains(&endpoint(key, entry)),
                Some(None) => false,
            };
            if stale {
                judged.remove.push((*key, *entry, Removal::StaleUdp));
                continue;
            }
        }
        if entry.flags & CT_F_REPLY == 0 {
            judged.flows += 1;
            if entry.saddr != key.saddr && nat_range.contains(&entry.sport.host()) {
                let held = nat_ports
                    .entry((entry.saddr, entry.daddr, entry.dport, key.protocol))
                    .or_default();
                *held += 1;
                judged.nat_ports_busiest = judged.nat_ports_busiest.max(*held);
            }
        }
        judged.frontends.insert(entry.service_id);
        // 0 (no backend) names nothing.
        judged.backends.extend(BackendId::new(entry.backend_id));
    }
    judged
}

/// Orders keys as the snapshot is sorted.
trait KeyOrder {
    fn cmp_key(&self, other: &Self) -> std::cmp::Ordering;
}

impl KeyOrder for CtKey {
    fn cmp_key(&self, other: &Self) -> std::cmp::Ordering {
        (
            self.saddr,
            self.daddr,
            self.sport,
            self.dport,
            self.protocol,
        )
            .cmp(&(
                other.saddr,
                other.daddr,
                other.sport,
                other.dport,
                other.protocol,
            ))
    }
}

/// Whether `current` is still the entry the sweep judged: a new flow may
/// have taken the key over since, and must not be deleted.
fn unchanged(judged: &CtEntry, current: &CtEntry, why: Removal) -> bool {
    match why {
        // A dead entry is never refreshed: any change is a new flow.
        Removal::Expired => judged == current,
        // A live UDP flow refreshes its stamp; the same flow keeps its
        // tuple and ids.
        Removal::StaleUdp => {
            (current.saddr, current.daddr, current.sport, current.dport)
                == (judged.saddr, judged.daddr, judged.sport, judged.dport)
                && current.backend_id == judged.backend_id
                && current.service_id == judged.service_id
                && current.flags & CT_F_REPLY == judged.flags & CT_F_REPLY
        }
    }
}

/// The (frontend, backend) ids that live flows name, without changing
/// anything: what an agent adopting pinned maps must keep reserved.
pub fn named_ids(
    maps: &SweepMaps,
    now_ns: u64,
    config: &DatapathConfig,
) -> io::Result<(HashSet<FrontendId>, HashSet<BackendId>)> {
    let mut snapshot: Vec<(CtKey, CtEntry)> = sys::dump(maps.ct.as_fd())?;
    snapshot.sort_unstable_by(|(a, _), (b, _)| a.cmp_key(b));
    let plan = SweepPlan {
        now_ns,
        config: *config,
        ..SweepPlan::default()
    };
    let judged = judge(&snapshot, &plan, false);
    Ok((judged.frontends, judged.backends))
}

/// Sweeps connection tracking and affinity as `plan` says.
pub fn sweep(maps: &SweepMaps, plan: &SweepPlan) -> io::Result<SweepReport> {
    let started = Instant::now();
    let mut snapshot: Vec<(CtKey, CtEntry)> = sys::dump(maps.ct.as_fd())?;
    snapshot.sort_unstable_by(|(a, _), (b, _)| a.cmp_key(b));
    let judged = judge(&snapshot, plan, true);
    let mut report = SweepReport {
        entries: snapshot.len(),
        flows: judged.flows,
        frontends: judged.frontends,
        backends: judged.backends,
        nat_ports_busiest: judged.nat_ports_busiest,
        ..SweepReport::default()
    };
    drop(snapshot);
    for (key, entry, why) in &judged.remove {
        let current: Option<CtEntry> = sys::lookup(maps.ct.as_fd(), key)?;
        if current.is_some_and(|current| unchanged(entry, &current, *why))
            && sys::delete(maps.ct.as_fd(), key)?
        {
            match why {
                Removal::Expired => report.removed_expired += 1,
                Removal::StaleUdp => report.removed_udp += 1,
            }
        }
    }
    let affinity: Vec<(AffinityKey, AffinityValue)> = sys::dump(maps.affinity.as_fd())?;
    report.affinity_entries = affinity.len();
    for (key, value) in affinity {
        let gone = !plan.frontends.contains_key(&key.service_id)
            || BackendId::new(value.backend_id).is_none_or(|id| !plan.backends.contains(&id));
        if gone && sys::delete(maps.affinity.as_fd(), &key)? {
            report.removed_affinity += 1;
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use svc_common::{
        config::NS_PER_SEC,
        ct::{CT_F_CLOSING, CT_F_SEEN_REPLY},
    };

    use super::*;

    fn ne(a: u8, b: u8, c: u8, d: u8) -> WireAddr {
        WireAddr::from_octets([a, b, c, d])
    }

    fn port(port: u16) -> WirePort {
        WirePort::from_host(port)
    }

    fn backend(id: u32) -> BackendId {
        BackendId::new(id).expect("not 0")
    }

    const CLIENT: (u8, u8, u8, u8) = (10, 244, 1, 9);
    const VIP: (u8, u8, u8, u8) = (10, 96, 0, 10);

    /// The two entries of a flow from the client's `port` to the VIP's
    /// port 53 over `protocol`, sent to backend `be` (10.244.2.be:5353),
    /// last seen `secs` seconds after 0.
    fn flow(protocol: u8, sport: u16, be: u8, ids: (u32, u32), secs: u64) -> Vec<(CtKey, CtEntry)> {
        let client = ne(CLIENT.0, CLIENT.1, CLIENT.2, CLIENT.3);
        let vip = ne(VIP.0, VIP.1, VIP.2, VIP.3);
        let backend = ne(10, 244, 2, be);
        let key = CtKey {
            saddr: client,
            daddr: vip,
            sport: port(sport),
            dport: port(53),
            protocol,
            _pad: [0; 3],
        };
        let original = CtEntry {
            last_seen_ns: secs * NS_PER_SEC,
            saddr: client,
            daddr: backend,
            sport: port(sport),
            dport: port(5353),
            service_id: FrontendId::new(ids.0),
            backend_id: ids.1,
            flags: CT_F_SEEN_REPLY,
            _pad: [0; 3],
        };
        let reply = CtEntry {
            saddr: vip,
            daddr: client,
            sport: port(53),
            dport: port(sport),
            flags: CT_F_REPLY | CT_F_SEEN_REPLY,
            ..original
        };
        vec![(key, original), (original.peer_key(protocol), reply)]
    }

    fn plan(now_secs: u64) -> SweepPlan {
        SweepPlan {
            now_ns: now_secs * NS_PER_SEC,
            config: DatapathConfig::DEFAULT,
            ..SweepPlan::default()
        }
    }

    fn sorted(mut entries: Vec<(CtKey, CtEntry)>) -> Vec<(CtKey, CtEntry)> {
        entries.sort_unstable_by(|(a, _), (b, _)| a.cmp_key(b));
        entries
    }

    fn serving(hosts: &[u8]) -> HashSet<SocketAddrV4> {
        hosts
            .iter()
            .map(|&h| SocketAddrV4::new(std::net::Ipv4Addr::new(10, 244, 2, h), 5353))
            .collect()
    }

    #[test]
    fn a_flow_lives_while_either_direction_is_fresh_and_dies_whole() {
        let mut entries = flow(proto::UDP, 40_000, 5, (1, 7), 100);
        // Only the client talks: the reply entry is old, the flow is not.
        entries[1].1.last_seen_ns = 0;
        let mut dead = flow(proto::TCP, 40_001, 5, (1, 8), 100);
        for (_, entry) in &mut dead {
            entry.flags |= CT_F_CLOSING;
        }
        let mut plan = plan(150);
        plan.frontends
            .insert(FrontendId::new(1), Some(serving(&[5])));
        let judged = judge(&sorted([entries, dead].concat()), &plan, true);
        assert_eq!(judged.flows, 1);
        assert_eq!(judged.remove.len(), 2, "the closed TCP flow, both entries");
        assert!(
            judged
                .remove
                .iter()
                .all(|(key, _, why)| key.protocol == proto::TCP && *why == Removal::Expired)
        );
        assert_eq!(
            judged.backends,
            HashSet::from([backend(7)]),
            "8 is named by nothing live"
        );
    }

    #[test]
    fn udp_flows_move_off_endpoints_that_stop_serving_and_tcp_flows_stay() {
        let udp_gone = flow(proto::UDP, 40_000, 5, (1, 7), 100);
        let udp_kept = flow(proto::UDP, 40_001, 6, (1, 8), 100);
        let tcp_gone = flow(proto::TCP, 40_002, 5, (2, 7), 100);
        let udp_of_removed = flow(proto::UDP, 40_003, 6, (3, 8), 100);
        let mut plan = plan(101);
        plan.frontends
            .insert(FrontendId::new(1), Some(serving(&[6])));
        plan.frontends.insert(FrontendId::new(2), None);
        let snapshot = sorted([udp_gone, udp_kept, tcp_gone, udp_of_removed].concat());
        assert!(
            judge(&snapshot, &plan, false).remove.is_empty(),
            "adoption only reads"
        );
        let judged = judge(&snapshot, &plan, true);
        let removed: Vec<(u16, Removal)> = judged
            .remove
            .iter()
            .map(|(key, entry, why)| {
                let port = if entry.flags & CT_F_REPLY != 0 {
                    key.dport
                } else {
                    key.sport
                };
                (port.host(), *why)
            })
            .collect();
        assert_eq!(removed.len(), 4, "{removed:?}");
        assert!(
            removed
                .iter()
                .all(|&(port, why)| matches!(port, 40_000 | 40_003) && why == Removal::StaleUdp),
            "{removed:?}"
        );
        assert_eq!(judged.flows, 2, "the kept UDP flow and the TCP flow");
        assert_eq!(
            judged.frontends,
            HashSet::from([FrontendId::new(1), FrontendId::new(2)]),
            "the TCP flow keeps its removed frontend's id"
        );
    }

    #[test]
    fn nat_ports_are_counted_toward_the_busiest_backend() {
        let node = ne(192, 168, 0, 1);
        let masqueraded = |client_port: u16, nat_port: u16, be: u8| {
            let mut entries = flow(proto::TCP, client_port, be, (1, u32::from(be)), 100);
            entries[0].1.saddr = node;
            entries[0].1.sport = port(nat_port);
            entries
        };
        let snapshot = sorted(
            [
                masqueraded(40_000, 61_000, 5),
                masqueraded(40_001, 61_001, 5),
                masqueraded(40_002, 61_000, 6),
                // Kept its own port, outside the range.
                masqueraded(40_003, 40_003, 5),
                flow(proto::TCP, 40_004, 5, (1, 5), 100),
            ]
            .concat(),
        );
        assert_eq!(judge(&snapshot, &plan(101), false).nat_ports_busiest, 2);
        assert_eq!(
            judge(&snapshot, &plan(10_000_000), false).nat_ports_busiest,
            0,
            "dead flows hold no port"
        );
    }

    #[test]
    fn an_orphaned_reply_entry_lives_only_on_its_own_stamp() {
        let mut entries = flow(proto::TCP, 40_000, 5, (1, 7), 100);
        // The original was taken over by a newer flow through a NAT port.
        entries[0].1.sport = port(61_000);
        entries[0].1.last_seen_ns = 200 * NS_PER_SEC;
        entries[1].1.flags |= CT_F_CLOSING;
        let judged = judge(&sorted(entries), &plan(200), true);
        assert_eq!(judged.remove.len(), 1);
        assert_ne!(
            judged.remove[0].1.flags & CT_F_REPLY,
            0,
            "the orphan goes, the new original stays"
        );
    }

    #[test]
    fn a_changed_entry_is_not_deleted() {
        let entries = flow(proto::UDP, 40_000, 5, (1, 7), 100);
        let judged = entries[0].1;
        let refreshed = CtEntry {
            last_seen_ns: judged.last_seen_ns + NS_PER_SEC,
            ..judged
        };
        assert!(unchanged(&judged, &refreshed, Removal::StaleUdp));
        assert!(!unchanged(&judged, &refreshed, Removal::Expired));
        let taken_over = CtEntry {
            backend_id: 9,
            ..refreshed
        };
        assert!(!unchanged(&judged, &taken_over, Removal::StaleUdp));
    }
}
