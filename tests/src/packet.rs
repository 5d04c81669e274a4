//! Packet fixtures: whole Ethernet frames built with etherparse, and helpers
//! to damage them in precise ways.

use std::net::Ipv4Addr;

use etherparse::{IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, PacketBuilder};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const ETH_HLEN: usize = 14;

/// Writes a built packet with its payload into a new frame.
macro_rules! serialize {
    ($builder:expr, $payload:expr) => {{
        let builder = $builder;
        let payload: &[u8] = $payload;
        let mut out = Vec::with_capacity(builder.size(payload.len()));
        builder
            .write(&mut out, payload)
            .expect("fixture packet must serialize");
        out
    }};
}

/// A UDP datagram in an Ethernet frame.
#[must_use]
pub fn udp4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    serialize!(
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ipv4(src.0.octets(), dst.0.octets(), 64)
            .udp(src.1, dst.1),
        payload
    )
}

/// A TCP SYN in an Ethernet frame.
#[must_use]
pub fn tcp4_syn(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    tcp4(src, dst, TcpFlags::Syn, &[])
}

/// TCP flags of a [`tcp4`] segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpFlags {
    Syn,
    SynAck,
    Ack,
    Fin,
    Rst,
}

/// A TCP segment in an Ethernet frame.
#[must_use]
pub fn tcp4(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flags: TcpFlags,
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240);
    let builder = match flags {
        TcpFlags::Syn => builder.syn(),
        TcpFlags::SynAck => builder.syn().ack(1001),
        TcpFlags::Ack => builder.ack(1001),
        TcpFlags::Fin => builder.fin().ack(1001),
        TcpFlags::Rst => builder.rst(),
    };
    serialize!(builder, payload)
}

/// Zeroes a UDP datagram's checksum ("no checksum").
pub fn clear_udp_checksum(frame: &mut [u8]) {
    let header_len = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    let check = ETH_HLEN + header_len + 6;
    frame[check..check + 2].fill(0);
}

/// Every checksum of an IPv4 frame that does not verify: the IPv4 header,
/// and the TCP, UDP (unless zero) or ICMP checksum over the whole datagram
/// (not for a fragment, which holds only part of one).
#[must_use]
pub fn checksum_errors(frame: &[u8]) -> Vec<String> {
    let mut errors = Vec::new();
    let ip = &frame[ETH_HLEN..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if internet_checksum(&ip[..header_len]) != 0 {
        errors.push("IPv4 header checksum".to_owned());
    }
    // Fragments: only a whole datagram has an L4 checksum to check.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return errors;
    }
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &ip[header_len..total_len];
    let protocol = ip[9];
    let mut pseudo = Vec::with_capacity(12 + l4.len());
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(
        &u16::try_from(l4.len())
            .expect("datagram fits u16")
            .to_be_bytes(),
    );
    pseudo.extend_from_slice(l4);
    match protocol {
        6 if internet_checksum(&pseudo) != 0 => errors.push("TCP checksum".to_owned()),
        17 if l4[6..8] != [0, 0] && internet_checksum(&pseudo) != 0 => {
            errors.push("UDP checksum".to_owned());
        }
        1 if internet_checksum(l4) != 0 => errors.push("ICMP checksum".to_owned()),
        _ => {}
    }
    errors
}

/// A UDP datagram whose IPv4 header carries `options` (a multiple of 4 bytes).
#[must_use]
pub fn udp4_with_ip_options(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut header = Ipv4Header::new(0, 64, IpNumber::UDP, src.0.octets(), dst.0.octets())
        .expect("fixture IPv4 header must build");
    header.options = options
        .try_into()
        .expect("IPv4 options must be a multiple of 4 and at most 40 bytes");
    serialize!(
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ip(IpHeaders::Ipv4(header, Ipv4Extensions::default()))
            .udp(src.1, dst.1),
        payload
    )
}

/// An ICMP echo request.
#[must_use]
pub fn icmp4_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    serialize!(
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ipv4(src.octets(), dst.octets(), 64)
            .icmpv4_echo_request(7, 1),
        &[0xab; 8]
    )
}

/// An ICMP "fragmentation needed" (next-hop MTU 1400) from `src` to
/// `dst`, quoting the IPv4 header and first 8 bytes of the frame `quoted`,
/// as a router does.
#[must_use]
pub fn icmp4_frag_needed(src: Ipv4Addr, dst: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let header_len = usize::from(quoted[ETH_HLEN] & 0x0f) * 4;
    let quote = &quoted[ETH_HLEN..(ETH_HLEN + header_len + 8).min(quoted.len())];
    serialize!(
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ipv4(src.octets(), dst.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400
                }
            )),
        quote
    )
}

/// An IPv6 UDP datagram.
#[must_use]
pub fn udp6() -> Vec<u8> {
    let mut src = [0u8; 16];
    src[0] = 0xfd;
    src[15] = 1;
    let mut dst = src;
    dst[15] = 2;
    serialize!(
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ipv6(src, dst, 64)
            .udp(40000, 53),
        b"abcd"
    )
}

/// An ARP request (who-has `target` tell `sender`).
#[must_use]
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::with_capacity(42);
    out.extend_from_slice(&[0xff; 6]);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&0x0806u16.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&sender.octets());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&target.octets());
    out
}

/// Sets the fragment offset (in 8-byte units) and fixes the header checksum.
pub fn set_fragment_offset(frame: &mut [u8], offset_units: u16) {
    let flags_offset = u16::from_be_bytes([frame[ETH_HLEN + 6], frame[ETH_HLEN + 7]]);
    let value = (flags_offset & !0x1fff) | (offset_units & 0x1fff);
    frame[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&value.to_be_bytes());
    fix_ipv4_checksum(frame);
}

/// Overwrites the version/IHL byte and fixes the header checksum.
pub fn set_version_ihl(frame: &mut [u8], version_ihl: u8) {
    frame[ETH_HLEN] = version_ihl;
    fix_ipv4_checksum(frame);
}

/// Recomputes the IPv4 header checksum over the header length in the packet
/// (or up to the end of the frame, if it is cut short).
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let header_len = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    let end = (ETH_HLEN + header_len).min(frame.len());
    frame[ETH_HLEN + 10] = 0;
    frame[ETH_HLEN + 11] = 0;
    let checksum = internet_checksum(&frame[ETH_HLEN..end]);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&checksum.to_be_bytes());
}

/// RFC 1071 checksum of `bytes`.
#[must_use]
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}
