//! The datapath's eBPF programs.
//!
//! Every entry point calls a `try_*` function returning `Result<action,
//! action>` and returns whichever verdict it produced.

#![no_std]
#![no_main]

mod clock;
mod ct;
mod frag;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod sock;
mod stats;
mod tc;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};

use crate::tc::Hook;

/// tc ingress on the host side of a pod's veth.
#[classifier]
pub fn svc_from_pod(ctx: TcContext) -> i32 {
    match tc::try_tc(&ctx, Hook::Pod) {
        Ok(action) | Err(action) => action,
    }
}

/// tc egress on pod veths (host side) and uplinks: replies from this
/// node's own addresses (host-network endpoints), which no ingress hook
/// sees.
#[classifier]
pub fn svc_egress(ctx: TcContext) -> i32 {
    match tc::try_egress(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// tc ingress on a node uplink.
#[classifier]
pub fn svc_from_uplink(ctx: TcContext) -> i32 {
    match tc::try_tc(&ctx, Hook::Uplink) {
        Ok(action) | Err(action) => action,
    }
}

/// Never attached: the agent runs it with `BPF_PROG_TEST_RUN` to read the
/// programs' clock (see `clock`).
#[classifier]
pub fn svc_clock(ctx: TcContext) -> i32 {
    match clock::try_sample(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn svc_connect4(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_dst(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn svc_sendmsg4(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_dst(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn svc_recvmsg4(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_peer(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn svc_getpeername4(ctx: SockAddrContext) -> i32 {
    match sock::try_translate_peer(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
