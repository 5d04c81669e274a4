//! Host processes are translated when they connect or send, not per packet:
//! the cgroup `sock_addr` hooks rewrite the destination and remember, per
//! socket, which service address to report back (`recvmsg`,
//! `getpeername`).

use crate::{
    assert_layout, impl_user_pod,
    wire::{WireAddr, WirePort},
};

/// LRU hash of [`SockRevKey`] → [`SockRevValue`].
pub const SOCK_REVNAT_MAP: &str = "SVC_SOCK_REV_V1";
pub const DEFAULT_SOCK_REVNAT_ENTRIES: u32 = 65_536;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    pub backend_addr: WireAddr,
    pub backend_port: WirePort,
    pub _pad: u16,
}
assert_layout!(SockRevKey, size = 16, align = 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockRevValue {
    /// Service address the process asked for.
    pub service_addr: WireAddr,
    pub service_port: WirePort,
    pub _pad: u16,
}
assert_layout!(SockRevValue, size = 8, align = 4);

impl_user_pod!(SockRevKey, SockRevValue);
