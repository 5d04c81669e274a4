//! Host processes: the cgroup `sock_addr` hooks translate a socket's
//! destination when it connects or sends, so its packets leave already
//! addressed to the backend and the per-packet path never sees a service
//! address. Only sockets of the node's own network namespace are
//! translated: pods are translated per packet at their veth.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use svc_common::{
    hash::flow_hash,
    proto,
    sock::{SockRevKey, SockRevValue},
    stats::Counter,
    wire::{WireAddr, WirePort},
};

use crate::{
    ct,
    lb::{self, Destination},
    maps::{SVC_SOCK_REV_V1, config},
    stats,
};

/// Verdict letting the call go on.
pub const ALLOW: i32 = 1;
/// Verdict failing `connect`/`sendmsg` (with the error [`refuse`] set).
pub const REFUSE: i32 = 0;
/// `ECONNREFUSED`: what kube-proxy's REJECT gives a host process.
const ECONNREFUSED: i32 = 111;
/// `EHOSTUNREACH`: an unallocated service address, which kube-proxy drops
/// (a socket call cannot be dropped; it fails at once instead).
const EHOSTUNREACH: i32 = 113;

/// Fails the call with `errno` rather than the hook's default `EPERM`.
#[inline(always)]
fn fail(counter: Counter, errno: i32) -> i32 {
    stats::count(counter, 0);
    // SAFETY: allowed in connect and sendmsg hooks; only sets the value
    // the call returns.
    unsafe { bpf_set_retval(-errno) };
    REFUSE
}

/// Fails the call with `ECONNREFUSED`, as a refused connection would.
#[inline(always)]
fn refuse(counter: Counter) -> i32 {
    fail(counter, ECONNREFUSED)
}

/// `connect4` and `sendmsg4`: a service destination becomes a backend.
#[inline(always)]
pub fn try_translate_dst(ctx: &SockAddrContext) -> Result<i32, i32> {
    let config = config();
    // SAFETY: the helper takes the program's own context.
    if config.host_netns_cookie == 0
        || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != config.host_netns_cookie
    {
        return Ok(ALLOW);
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program run.
    let (daddr, user_port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let daddr = WireAddr::from_raw(daddr);
    let dport = wire_port(user_port);
    #[expect(
        clippy::cast_possible_truncation,
        reason = "IP protocol numbers are 8 bits"
    )]
    let protocol = protocol as u8;
    if protocol != proto::TCP && protocol != proto::UDP {
        return Ok(ALLOW);
    }
    let service = match lb::destination(daddr, dport, protocol) {
        // The node's own processes are local: an external frontend with a
        // Local policy gives way to its in-cluster variant.
        Destination::Service(key, service) => lb::in_cluster(key, service),
        Destination::UnknownPort => return Err(refuse(Counter::RejectUnknownPort)),
        Destination::Unallocated => {
            return Err(fail(Counter::DropUnallocatedServiceIp, EHOSTUNREACH));
        }
        Destination::Other => return Ok(ALLOW),
    };
    // The node's own address stands in for the not yet chosen source, as
    // kube-proxy lets the node through when a range holds its address.
    if !lb::source_allowed(service, config.masq_addr) {
        return Err(refuse(Counter::DropSourceRange));
    }
    if service.maglev_size == 0 {
        return Err(refuse(Counter::SockRejectNoBackend));
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The source port is not known yet: the socket cookie stands in for
    // it, so each socket gets its own pick.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "hash input, bits are mixed"
    )]
    let hash = flow_hash(
        config.masq_addr,
        daddr,
        WirePort::from_raw((cookie ^ (cookie >> 16) ^ (cookie >> 32)) as u16),
        dport,
        protocol,
    );
    let Some(choice) = lb::choose(service, config.masq_addr, hash, ct::now_ns(config)) else {
        stats::count(Counter::DropBadBackend, 0);
        return Err(REFUSE);
    };
    let key = SockRevKey {
        cookie,
        backend_addr: choice.backend.addr,
        backend_port: choice.backend.port,
        _pad: 0,
    };
    let value = SockRevValue {
        service_addr: daddr,
        service_port: dport,
        _pad: 0,
    };
    // Without the entry the process would see the backend's address as
    // its peer; the connection itself still works.
    let _ = SVC_SOCK_REV_V1.insert(key, value, 0);
    // SAFETY: as above; these fields are writable in these hooks.
    unsafe {
        (*sa).user_ip4 = choice.backend.addr.raw();
        (*sa).user_port = u32::from(choice.backend.port.raw());
    }
    stats::count(Counter::SockTranslated, 0);
    if choice.from_affinity {
        stats::count(Counter::LbAffinityHit, 0);
    }
    Ok(ALLOW)
}

/// `recvmsg4` and `getpeername4`: a backend peer is reported as the
/// service the process asked for.
#[inline(always)]
pub fn try_translate_peer(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program run.
    let (addr, user_port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        backend_addr: WireAddr::from_raw(addr),
        backend_port: wire_port(user_port),
        _pad: 0,
    };
    if let Some(value) = SVC_SOCK_REV_V1.get_ptr(key) {
        // SAFETY: from a map lookup; the context fields are writable here.
        unsafe {
            (*sa).user_ip4 = (*value).service_addr.raw();
            (*sa).user_port = u32::from((*value).service_port.raw());
        }
        stats::count(Counter::SockRevTranslated, 0);
    }
    Ok(ALLOW)
}

/// A `bpf_sock_addr` port: the low 16 bits, in wire order.
#[inline(always)]
fn wire_port(user_port: u32) -> WirePort {
    #[expect(clippy::cast_possible_truncation, reason = "a port is 16 bits")]
    WirePort::from_raw(user_port as u16)
}
