//! The datapath's eBPF programs.
//!
//! Every entry point calls a `try_*` function returning `Result<action,
//! action>` and returns whichever verdict it produced.

#![no_std]
#![no_main]

mod maps;
mod parse;
mod stats;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use aya_log_ebpf::debug;
use svc_common::stats::Counter;

use crate::parse::{Ipv4Packet, L3};

/// tc ingress on pod veths and uplinks. For now it classifies and counts
/// every packet and passes it unchanged.
#[classifier]
pub fn svc_tc(ctx: TcContext) -> i32 {
    match try_svc_tc(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_svc_tc(ctx: &TcContext) -> Result<i32, i32> {
    let l3 = parse::l3(ctx).map_err(|reason| {
        debug!(ctx, "malformed packet: counter {}", reason.index());
        stats::count(reason, ctx.len());
        TC_ACT_OK
    })?;
    let counter = match l3 {
        L3::Other => Counter::PassNonIpv4,
        L3::Ipv4(packet) => classify_ipv4(ctx, &packet),
    };
    stats::count(counter, ctx.len());
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn classify_ipv4(ctx: &TcContext, packet: &Ipv4Packet) -> Counter {
    if packet.is_later_fragment {
        return Counter::Ipv4Fragment;
    }
    match packet.protocol {
        parse::IPPROTO_TCP => match parse::tcp(ctx, packet) {
            Ok(_) => Counter::Ipv4Tcp,
            Err(reason) => reason,
        },
        parse::IPPROTO_UDP => match parse::udp(ctx, packet) {
            Ok(_) => Counter::Ipv4Udp,
            Err(reason) => reason,
        },
        parse::IPPROTO_ICMP => Counter::Ipv4Icmp,
        _ => Counter::Ipv4Other,
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
