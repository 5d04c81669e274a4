//! The single source of truth for what the eBPF datapath and the agent share:
//! map names, `#[repr(C)]` map keys and values, load-time constants, and the
//! pure logic both sides run (the flow hash and Maglev tables).
//!
//! Every map type is plain old data: explicit `_pad` fields, no `bool`,
//! `Option` or enum fields, byte order stated per field, and a compile-time
//! size and alignment check. With the `user` feature each type also
//! implements `bytemuck::Pod` (which rejects implicit padding at compile time)
//! and `aya::Pod`.
//!
//! Byte order: addresses and ports are kept exactly as they appear on the
//! wire, as [`wire::WireAddr`] and [`wire::WirePort`]; ids are
//! [`wire::FrontendId`] and backend ids `u32`s that are 0 or a
//! [`wire::BackendId`]. Everything else is host order.
//!
//! Map names are at most 15 characters (the kernel's limit) and end in a
//! `_V<n>` that changes with the layout.

#![no_std]

pub mod config;
pub mod ct;
pub mod hash;
pub mod lb;
pub mod maglev;
pub mod sock;
pub mod stats;
pub mod wire;

/// Checks a map type's size and alignment at compile time, on both sides.
macro_rules! assert_layout {
    ($ty:ty, size = $size:expr, align = $align:expr) => {
        const _: () = {
            assert!(core::mem::size_of::<$ty>() == $size);
            assert!(core::mem::align_of::<$ty>() == $align);
        };
    };
}
pub(crate) use assert_layout;

/// Implements the user-space marker traits for a map type.
macro_rules! impl_user_pod {
    ($($ty:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `#[repr(C)]`, has no padding (bytemuck's
            // derive checks it) and every bit pattern is a valid value.
            unsafe impl aya::Pod for $ty {}
        )+
    };
}
pub(crate) use impl_user_pod;

/// IP protocol numbers the datapath handles.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}
