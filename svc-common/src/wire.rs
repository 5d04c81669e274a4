//! Addresses, ports and ids as the maps hold them, as types: an address or
//! a port in a map is in wire order (the bytes the packet carries), an id
//! is host order, and the type says which, so no caller converts by hand.
//! Each is `#[repr(transparent)]`: the maps' layouts are those of the bare
//! integers.

use core::{
    net::{Ipv4Addr, SocketAddrV4},
    num::NonZeroU32,
    ops::BitAnd,
};

/// An IPv4 address in wire order: the `u32` whose memory holds the
/// address's octets in order, as loaded from or stored into a packet.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WireAddr(u32);

impl WireAddr {
    /// `0.0.0.0`: no address.
    pub const UNSPECIFIED: Self = Self(0);

    #[must_use]
    pub const fn from_octets(octets: [u8; 4]) -> Self {
        Self(u32::from_ne_bytes(octets))
    }

    #[must_use]
    pub const fn octets(self) -> [u8; 4] {
        self.0.to_ne_bytes()
    }

    /// The address a packet holds, read as a native `u32`.
    #[must_use]
    pub const fn from_raw(raw: u32) -> Self {
        Self(raw)
    }

    /// The `u32` to store into a packet (or fold into a checksum).
    #[must_use]
    pub const fn raw(self) -> u32 {
        self.0
    }

    #[must_use]
    pub const fn is_unspecified(self) -> bool {
        self.0 == 0
    }

    /// The number of leading one bits: a mask's prefix length.
    #[must_use]
    pub const fn prefix_len(self) -> u32 {
        u32::from_be(self.0).leading_ones()
    }

    /// A mask of `prefix` leading one bits (at most 32).
    #[must_use]
    pub const fn mask(prefix: u8) -> Self {
        let prefix = if prefix > 32 { 32 } else { prefix as u32 };
        let bits = match u32::MAX.checked_shl(32 - prefix) {
            Some(bits) => bits,
            None => 0,
        };
        Self(bits.to_be())
    }
}

/// The socket address of a wire-order address and port.
#[must_use]
pub fn socket(addr: WireAddr, port: WirePort) -> SocketAddrV4 {
    SocketAddrV4::new(addr.into(), port.host())
}

/// A socket address's address and port in wire order.
#[must_use]
pub fn split(socket: SocketAddrV4) -> (WireAddr, WirePort) {
    ((*socket.ip()).into(), WirePort::from_host(socket.port()))
}

impl BitAnd for WireAddr {
    type Output = Self;

    fn bitand(self, mask: Self) -> Self {
        Self(self.0 & mask.0)
    }
}

impl From<Ipv4Addr> for WireAddr {
    fn from(addr: Ipv4Addr) -> Self {
        Self::from_octets(addr.octets())
    }
}

impl From<WireAddr> for Ipv4Addr {
    fn from(addr: WireAddr) -> Self {
        Self::from(addr.octets())
    }
}

/// A TCP or UDP port in wire order (big-endian), as a packet holds it.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct WirePort(u16);

impl WirePort {
    /// The port numbered `port`.
    #[must_use]
    pub const fn from_host(port: u16) -> Self {
        Self(port.to_be())
    }

    /// Its number.
    #[must_use]
    pub const fn host(self) -> u16 {
        u16::from_be(self.0)
    }

    /// The port a packet holds, read as a native `u16`.
    #[must_use]
    pub const fn from_raw(raw: u16) -> Self {
        Self(raw)
    }

    /// The `u16` to store into a packet (or fold into a checksum).
    #[must_use]
    pub const fn raw(self) -> u16 {
        self.0
    }
}

/// A frontend's id (host order): the index of its counters and part of
/// its affinity, member and source-range keys.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FrontendId(u32);

impl FrontendId {
    #[must_use]
    pub const fn new(id: u32) -> Self {
        Self(id)
    }

    #[must_use]
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// A backend's index in [`crate::lb::BACKENDS_MAP`]; never 0, which the
/// maps use for "no backend" (a `u32` field holding a backend id is 0 or
/// one of these).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(NonZeroU32);

impl BackendId {
    /// The id `raw`; `None` for 0.
    #[must_use]
    pub const fn new(raw: u32) -> Option<Self> {
        match NonZeroU32::new(raw) {
            Some(id) => Some(Self(id)),
            None => None,
        }
    }

    /// The index, as a map field holds it.
    #[must_use]
    pub const fn get(self) -> u32 {
        self.0.get()
    }
}

impl core::fmt::Display for BackendId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

impl core::fmt::Display for FrontendId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

crate::impl_user_pod!(WireAddr, WirePort, FrontendId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_order_is_the_packets_byte_order() {
        let addr = WireAddr::from(Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(addr.raw().to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(Ipv4Addr::from(addr), Ipv4Addr::new(10, 96, 0, 1));
        let port = WirePort::from_host(8080);
        assert_eq!(port.raw().to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(port.host(), 8080);
    }

    #[test]
    fn masks_cover_their_prefix_and_saturate_at_32() {
        let net = WireAddr::from(Ipv4Addr::new(10, 96, 7, 9));
        assert_eq!(
            Ipv4Addr::from(net & WireAddr::mask(12)),
            Ipv4Addr::new(10, 96, 0, 0)
        );
        assert_eq!(WireAddr::mask(0), WireAddr::UNSPECIFIED);
        assert_eq!(WireAddr::mask(32).octets(), [255; 4]);
        assert_eq!(WireAddr::mask(40), WireAddr::mask(32));
        assert_eq!(WireAddr::mask(12).prefix_len(), 12);
        let sock = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 2), 8080);
        let (addr, port) = split(sock);
        assert_eq!(socket(addr, port), sock);
    }

    #[test]
    fn backend_ids_are_never_zero() {
        assert_eq!(BackendId::new(0), None);
        assert_eq!(BackendId::new(7).map(BackendId::get), Some(7));
    }
}
