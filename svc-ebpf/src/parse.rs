//! Header parsing. Every header access goes through [`ptr_at`], which checks
//! the whole header lies inside the packet; L4 offsets come from the IPv4
//! header length, so IP options are honoured.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use svc_common::{
    proto,
    stats::Counter,
    wire::{WireAddr, WirePort},
};

pub const ETH_P_IP: u16 = 0x0800;

/// Fragment offset bits of `Ipv4Hdr::frag_off` (host order after `from_be`).
const IP_OFFSET_MASK: u16 = 0x1fff;
/// More-fragments flag of `Ipv4Hdr::frag_off` (host order).
const IP_MF: u16 = 0x2000;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub ether_type: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    /// Network byte order.
    pub tot_len: u16,
    /// Network byte order.
    pub id: u16,
    /// Flags and fragment offset, network byte order.
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    /// Network byte order.
    pub check: u16,
    pub saddr: WireAddr,
    pub daddr: WireAddr,
}

#[repr(C)]
pub struct TcpHdr {
    pub source: WirePort,
    pub dest: WirePort,
    pub seq: u32,
    pub ack_seq: u32,
    /// Data offset (high 4 bits) and reserved bits.
    pub doff: u8,
    /// CWR ECE URG ACK PSH RST SYN FIN.
    pub flags: u8,
    pub window: u16,
    /// Network byte order.
    pub check: u16,
    pub urg_ptr: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub source: WirePort,
    pub dest: WirePort,
    /// Network byte order.
    pub len: u16,
    /// Network byte order; zero means "no checksum".
    pub check: u16,
}

pub const ETH_HLEN: usize = size_of::<EthHdr>();
pub const IPV4_MIN_HLEN: usize = size_of::<Ipv4Hdr>();

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Headers the programs read lie within this many bytes of the frame's
/// start (Ethernet, IPv4 with options, an ICMP error's quote).
const MAX_HEADER_OFFSET: usize = 256;

/// A pointer to a `T` at `offset` bytes into the packet, if all of it lies
/// inside the packet's linear data. The offset is bounded first: an offset
/// the compiler spilled to the stack comes back without the bounds the
/// verifier knew, and packet pointer arithmetic needs them.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    if offset > MAX_HEADER_OFFSET {
        return None;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

pub enum L3 {
    /// Not IPv4: passed untouched.
    Other,
    Ipv4(Ipv4Packet),
}

pub struct Ipv4Packet {
    /// Offset of the L4 header: Ethernet header plus the IPv4 header length.
    pub l4_offset: usize,
    pub saddr: WireAddr,
    pub daddr: WireAddr,
    pub protocol: u8,
    /// A fragment other than the first: no L4 header to read.
    pub is_later_fragment: bool,
    /// More fragments follow this one.
    pub more_fragments: bool,
    /// IPv4 identification, network order.
    pub id: u16,
}

/// Parses the Ethernet and IPv4 headers.
#[inline(always)]
pub fn l3(ctx: &TcContext) -> Result<L3, Counter> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Counter::MalformedEthernet)?;
    // SAFETY: `ptr_at` checked the header lies inside the packet.
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return Ok(L3::Other);
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(Counter::MalformedIpv4Truncated)?;
    // SAFETY: as above.
    let (version_ihl, frag_off, protocol, saddr, daddr, id) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).frag_off,
            (*ip).protocol,
            (*ip).saddr,
            (*ip).daddr,
            (*ip).id,
        )
    };
    let frag_off = u16::from_be(frag_off);
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN {
        return Err(Counter::MalformedIpv4Header);
    }
    let l4_offset = ETH_HLEN + header_len;
    if ctx.data() + l4_offset > ctx.data_end() {
        return Err(Counter::MalformedIpv4Header);
    }
    Ok(L3::Ipv4(Ipv4Packet {
        l4_offset,
        saddr,
        daddr,
        protocol,
        is_later_fragment: frag_off & IP_OFFSET_MASK != 0,
        more_fragments: frag_off & IP_MF != 0,
        id,
    }))
}

/// Ports and checksum location of a TCP or UDP header.
pub struct L4 {
    pub sport: WirePort,
    pub dport: WirePort,
    /// Offset of the L4 checksum from the start of the frame.
    pub csum_offset: usize,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
}

/// Reads the TCP or UDP header of `packet`.
#[inline(always)]
pub fn l4(ctx: &TcContext, packet: &Ipv4Packet) -> Result<L4, Counter> {
    if packet.protocol == proto::TCP {
        let tcp: *const TcpHdr =
            ptr_at(ctx, packet.l4_offset).ok_or(Counter::MalformedL4Truncated)?;
        // SAFETY: `ptr_at` checked the header lies inside the packet.
        let (sport, dport, flags) = unsafe { ((*tcp).source, (*tcp).dest, (*tcp).flags) };
        Ok(L4 {
            sport,
            dport,
            csum_offset: packet.l4_offset + 16,
            tcp_flags: flags,
        })
    } else {
        let udp: *const UdpHdr =
            ptr_at(ctx, packet.l4_offset).ok_or(Counter::MalformedL4Truncated)?;
        // SAFETY: as above.
        let (sport, dport) = unsafe { ((*udp).source, (*udp).dest) };
        Ok(L4 {
            sport,
            dport,
            csum_offset: packet.l4_offset + 6,
            tcp_flags: 0,
        })
    }
}
