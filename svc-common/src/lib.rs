//! The single source of truth for what the eBPF datapath and the agent share:
//! map names, `#[repr(C)]` map keys and values, and load-time constants.
//!
//! Every map type is plain old data: explicit `_pad` fields, no `bool`,
//! `Option` or enum fields, byte order stated per field, and a compile-time
//! size and alignment check. With the `user` feature each type also
//! implements `bytemuck::Pod` (which rejects implicit padding at compile time)
//! and `aya::Pod`.

#![no_std]

pub mod stats;

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
