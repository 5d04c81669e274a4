//! The per-packet path at tc ingress of pod veths and uplinks: translate
//! packets of tracked flows, start new flows to services, pass the rest
//! untouched; and at tc egress of pod veths and uplinks, the replies of
//! host-network endpoints on this node.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use aya_log_ebpf::trace;
use svc_common::{
    config::DatapathConfig,
    ct::{CT_F_REPLY, CT_F_SNAT, CtEntry, CtKey},
    hash::flow_hash,
    lb::{EMPTY_DROP, SVC_F_IN_CLUSTER, SVC_F_MASQ_ALWAYS, SVC_F_MASQ_NON_LOCAL, ServiceValue},
    proto,
    stats::Counter,
};

use crate::{
    ct, frag, icmp,
    lb::{self, Destination},
    maps::{SVC_CT_V1, config},
    nat,
    parse::{self, ETH_HLEN, IPV4_MIN_HLEN, Ipv4Packet, L3, L4, TCP_SYN},
    reject::{self, Refusal},
    stats,
};

/// Where the program is attached: the only difference is that traffic
/// entering from an uplink is external and may be masqueraded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Host side of a pod's veth: packets leaving the pod.
    Pod,
    /// A node uplink: packets from other nodes and from outside.
    Uplink,
}

/// A counted drop.
#[inline(always)]
fn drop(counter: Counter, bytes: u32) -> i32 {
    stats::count(counter, bytes);
    TC_ACT_SHOT
}

/// What the packet path decided, short of a drop.
pub enum Verdict {
    /// Return this action.
    Action(i32),
    /// Turn the packet into a refusal.
    Refuse(Refusal),
}

pub fn try_tc(ctx: &TcContext, hook: Hook) -> Result<i32, i32> {
    match translate(ctx, hook)? {
        Verdict::Action(action) => Ok(action),
        Verdict::Refuse(refusal) => {
            let action = reject::port_unreachable(ctx, &refusal)
                .map_err(|_| drop(Counter::DropRejectFailed, refusal.len))?;
            let counter = if refusal.unknown_port != 0 {
                Counter::RejectUnknownPort
            } else {
                Counter::RejectNoBackend
            };
            stats::count(counter, refusal.len);
            Ok(action)
        }
    }
}

/// Packets leaving through a pod veth (into the pod) or an uplink, at tc
/// egress. Every flow was translated where its packets entered this node,
/// except those given a host-network endpoint on this node: the node's own
/// stack answers them, straight into the client pod's veth or out of the
/// uplink towards an outside client. Those replies, and ICMP errors from
/// the node about translated flows, are reverse-translated here;
/// everything else passes untouched and uncounted (it was counted where it
/// entered).
pub fn try_egress(ctx: &TcContext) -> Result<i32, i32> {
    let Ok(L3::Ipv4(packet)) = parse::l3(ctx) else {
        return Ok(TC_ACT_OK);
    };
    if !lb::is_node_addr(packet.saddr) {
        return Ok(TC_ACT_OK);
    }
    let len = ctx.len();
    if packet.is_later_fragment {
        if frag::translate_later(ctx, &packet) {
            stats::count(Counter::LbFragment, len);
        }
        return Ok(TC_ACT_OK);
    }
    match packet.protocol {
        proto::TCP | proto::UDP => {}
        proto::ICMP => {
            if icmp::reverse(ctx, &packet) {
                stats::count(Counter::LbIcmpError, len);
            }
            return Ok(TC_ACT_OK);
        }
        _ => return Ok(TC_ACT_OK),
    }
    let Ok(l4) = parse::l4(ctx, &packet) else {
        return Ok(TC_ACT_OK);
    };
    let key = flow_key(&packet, &l4);
    let Some(entry) = ct::lookup(&key) else {
        return Ok(TC_ACT_OK);
    };
    let config = config();
    let now = ct::now_ns(config);
    // SAFETY: from a map lookup, valid for this run; read in place, each
    // reference dropped before `update` writes.
    let (is_reply, live) = unsafe {
        (
            (*entry).flags & CT_F_REPLY != 0,
            ct::is_live(config, &key, &*entry, l4.tcp_flags, now),
        )
    };
    // Only a reply: an original entry's tuple was translated at ingress.
    if !is_reply || !live {
        return Ok(TC_ACT_OK);
    }
    ct::update(&key, entry, l4.tcp_flags, now);
    // SAFETY: as above.
    tracked(ctx, &packet, &l4, &key, unsafe { &*entry }, len)
}

/// The packet's tuple, as connection tracking keys it.
#[inline(always)]
fn flow_key(packet: &Ipv4Packet, l4: &L4) -> CtKey {
    CtKey {
        saddr: packet.saddr,
        daddr: packet.daddr,
        sport: l4.sport,
        dport: l4.dport,
        protocol: packet.protocol,
        _pad: [0; 3],
    }
}

/// A refusal of the packet's flow (ICMP port unreachable to its sender).
#[inline(always)]
fn refusal(packet: &Ipv4Packet, len: u32, unknown_port: bool) -> Verdict {
    Verdict::Refuse(Refusal {
        saddr: packet.saddr,
        daddr: packet.daddr,
        protocol: packet.protocol,
        has_ip_options: u8::from(packet.l4_offset != ETH_HLEN + IPV4_MIN_HLEN),
        unknown_port: u8::from(unknown_port),
        len,
    })
}

/// The packet path proper. Not inlined, so that its stack frame and the
/// refusal's are siblings rather than stacked (the verifier caps their
/// sum at 512 bytes).
#[inline(never)]
fn translate(ctx: &TcContext, hook: Hook) -> Result<Verdict, i32> {
    let len = ctx.len();
    let l3 = parse::l3(ctx).map_err(|reason| {
        stats::count(reason, len);
        TC_ACT_OK
    })?;
    let L3::Ipv4(packet) = l3 else {
        stats::count(Counter::PassNonIpv4, len);
        return Ok(Verdict::Action(TC_ACT_OK));
    };
    // Later fragments carry no ports; they pass as they are.
    let class = if packet.is_later_fragment {
        Counter::Ipv4Fragment
    } else {
        match packet.protocol {
            proto::TCP => Counter::Ipv4Tcp,
            proto::UDP => Counter::Ipv4Udp,
            proto::ICMP => Counter::Ipv4Icmp,
            _ => Counter::Ipv4Other,
        }
    };
    if !matches!(class, Counter::Ipv4Tcp | Counter::Ipv4Udp) {
        stats::count(class, len);
        match class {
            Counter::Ipv4Icmp => {
                if icmp::reverse(ctx, &packet) {
                    stats::count(Counter::LbIcmpError, len);
                } else if icmp::is_echo_request(ctx, &packet) {
                    return other_protocol(&packet, len);
                }
            }
            Counter::Ipv4Fragment => {
                if frag::translate_later(ctx, &packet) {
                    stats::count(Counter::LbFragment, len);
                }
            }
            _ => return other_protocol(&packet, len),
        }
        return Ok(Verdict::Action(TC_ACT_OK));
    }
    let l4 = parse::l4(ctx, &packet).map_err(|reason| {
        stats::count(reason, len);
        TC_ACT_OK
    })?;
    stats::count(class, len);

    let key = flow_key(&packet, &l4);
    let config = config();
    let now = ct::now_ns(config);
    let mut replacing = false;
    if let Some(entry) = ct::lookup(&key) {
        // SAFETY: from a map lookup, valid for this run; read in place
        // (no copy), each reference dropped before `update` writes.
        if ct::is_live(config, &key, unsafe { &*entry }, l4.tcp_flags, now) {
            ct::update(&key, entry, l4.tcp_flags, now);
            // SAFETY: as above.
            return tracked(ctx, &packet, &l4, &key, unsafe { &*entry }, len).map(Verdict::Action);
        }
        // SAFETY: as above.
        if unsafe { (*entry).flags } & CT_F_REPLY != 0 {
            // The reply entry of a dead flow translates nothing (a direct
            // connection may be meeting its tuple): the flow's entries go,
            // so the rest of that connection is not translated either.
            // SAFETY: as above.
            ct::end_flow(&key, unsafe { &*entry });
            if hook == Hook::Pod {
                ct::remember_direct(&key, l4.tcp_flags);
            }
            return Ok(Verdict::Action(TC_ACT_OK));
        }
        // A dead flow's original entry: a new flow takes its key below.
        replacing = true;
    }
    match lb::destination(key.daddr, key.dport, key.protocol) {
        Destination::Service(service_key, service) => {
            let local = service.flags & (SVC_F_IN_CLUSTER | SVC_F_MASQ_NON_LOCAL) != 0
                && lb::is_local(config, hook == Hook::Pod, key.saddr);
            let service = if local {
                lb::in_cluster(service_key, service)
            } else {
                service
            };
            let flow = NewFlow {
                packet: &packet,
                l4: &l4,
                key: &key,
                service,
                local,
                replacing,
                now,
            };
            new_flow(ctx, config, &flow)
        }
        Destination::UnknownPort => Ok(refusal(&packet, len, true)),
        Destination::Unallocated => Err(drop(Counter::DropUnallocatedServiceIp, len)),
        Destination::Other => {
            if hook == Hook::Pod {
                ct::remember_direct(&key, l4.tcp_flags);
            }
            Ok(Verdict::Action(TC_ACT_OK))
        }
    }
}

/// A packet that is neither TCP nor UDP (nor an ICMP error): to a
/// ClusterIP it is refused, as kube-proxy's nftables mode rejects it; to
/// an unallocated service address dropped.
#[inline(always)]
fn other_protocol(packet: &Ipv4Packet, len: u32) -> Result<Verdict, i32> {
    match lb::other_protocol_destination(packet.daddr) {
        Destination::UnknownPort => Ok(refusal(packet, len, true)),
        Destination::Unallocated => Err(drop(Counter::DropUnallocatedServiceIp, len)),
        Destination::Service(..) | Destination::Other => Ok(Verdict::Action(TC_ACT_OK)),
    }
}

/// The first packet of a flow to a service, parsed.
struct NewFlow<'a> {
    packet: &'a Ipv4Packet,
    l4: &'a L4,
    key: &'a CtKey,
    service: &'a ServiceValue,
    /// The source is local (this node's pods).
    local: bool,
    /// A dead flow's original entry holds the key.
    replacing: bool,
    now: u64,
}

/// A packet of a tracked flow, either direction.
#[inline(always)]
fn tracked(
    ctx: &TcContext,
    packet: &Ipv4Packet,
    l4: &L4,
    key: &CtKey,
    entry: &CtEntry,
    len: u32,
) -> Result<i32, i32> {
    nat::rewrite(ctx, l4, packet.l4_offset, key, entry)
        .map_err(|_| drop(Counter::DropRewriteFailed, len))?;
    if packet.more_fragments {
        frag::remember(packet, entry.saddr, entry.daddr);
    }
    let event = if entry.flags & CT_F_REPLY != 0 {
        Counter::LbReply
    } else {
        Counter::LbEstablished
    };
    stats::count(event, len);
    stats::count_flow(entry.service_id, entry.backend_id, len);
    Ok(TC_ACT_OK)
}

/// The first packet of a flow to a service: choose a backend, record both
/// directions in connection tracking, translate.
#[inline(always)]
fn new_flow(ctx: &TcContext, config: &DatapathConfig, flow: &NewFlow<'_>) -> Result<Verdict, i32> {
    let (packet, key, service, now) = (flow.packet, flow.key, flow.service, flow.now);
    let len = ctx.len();
    if !lb::source_allowed(service, key.saddr) {
        return Err(drop(Counter::DropSourceRange, len));
    }
    if service.maglev_size == 0 {
        if service.on_empty == EMPTY_DROP {
            return Err(drop(Counter::DropNoBackend, len));
        }
        return Ok(refusal(packet, len, false));
    }
    let hash = flow_hash(key.saddr, key.daddr, key.sport, key.dport, key.protocol);
    let choice = lb::choose(service, key.saddr, hash, now)
        .ok_or_else(|| drop(Counter::DropBadBackend, len))?;

    // Hairpin (a pod reaching itself through the service) needs the node
    // as source, or the pod would see a packet from its own address. A
    // source that is not local is masqueraded where the service says so
    // (ClusterIPs, external addresses with a Cluster policy), so the
    // backend's replies come back through this node, as kube-proxy does.
    // An endpoint that is this node's own address (a host-network pod)
    // is never masqueraded to: the packet does not leave the node, and
    // kube-proxy's masquerade (in POSTROUTING) does not apply to it either.
    // Its replies to a pod are reverse-translated at the pod's veth.
    let hairpin = choice.backend.addr == key.saddr;
    let masquerade = (service.flags & SVC_F_MASQ_ALWAYS != 0
        || (service.flags & SVC_F_MASQ_NON_LOCAL != 0 && !flow.local))
        && !lb::is_node_addr(choice.backend.addr);
    let snat = hairpin || masquerade;
    if snat && config.masq_addr.is_unspecified() {
        return Err(drop(Counter::DropNoSnatAddr, len));
    }
    let snat_flag = if snat { CT_F_SNAT } else { 0 };
    let mut forward = CtEntry {
        last_seen_ns: now,
        saddr: if snat { config.masq_addr } else { key.saddr },
        daddr: choice.backend.addr,
        sport: key.sport,
        dport: choice.backend.port,
        backend_id: choice.id,
        service_id: service.id,
        flags: snat_flag,
        _pad: [0; 3],
    };
    let reply = CtEntry {
        last_seen_ns: now,
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        backend_id: choice.id,
        service_id: service.id,
        flags: CT_F_REPLY | snat_flag,
        _pad: [0; 3],
    };
    if !nat::claim_reply(config, key, &mut forward, &reply, snat, now) {
        return Err(drop(Counter::DropNatPortsExhausted, len));
    }
    if flow.replacing {
        // The dead flow's reply entry goes with it, unless this flow just
        // took its key over.
        ct::retire_reply(key, &nat::reply_key(&forward, key.protocol));
    }
    if SVC_CT_V1.insert(key, forward, 0).is_err() {
        let _ = SVC_CT_V1.remove(nat::reply_key(&forward, key.protocol));
        return Err(drop(Counter::DropCtInsertFailed, len));
    }
    trace!(
        ctx,
        "new flow to service {} backend {}",
        service.id.get(),
        choice.id
    );
    nat::rewrite(ctx, flow.l4, packet.l4_offset, key, &forward)
        .map_err(|_| drop(Counter::DropRewriteFailed, len))?;
    if packet.more_fragments {
        frag::remember(packet, forward.saddr, forward.daddr);
    }
    stats::count(Counter::LbNewFlow, len);
    if key.protocol == proto::TCP && flow.l4.tcp_flags & TCP_SYN == 0 {
        stats::count(Counter::LbNewFlowMidstream, len);
    }
    if choice.from_affinity {
        stats::count(Counter::LbAffinityHit, len);
    }
    stats::count_flow(service.id, choice.id, len);
    Ok(Verdict::Action(TC_ACT_OK))
}
