//! The few `bpf(2)` commands aya 0.14 does not offer: batched map reads
//! (one system call per thousands of connection-tracking entries instead
//! of two per entry), `BPF_LINK_UPDATE` on a pinned link, and
//! `BPF_LINK_DETACH`.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `bpf(cmd, attr, sizeof attr)`.
fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for
    // `cmd`, of the size passed; pointers inside it are the caller's and
    // outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// The value under `key`, or `None` when there is none.
pub fn lookup<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = V::zeroed();
    let mut attr = ElemAttr {
        map_fd: fd_u32(map),
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Deletes `key`; `false` when it was not there.
pub fn delete<K: bytemuck::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: fd_u32(map),
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: 0,
        flags: 0,
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(err) => Err(err),
    }
}

#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: usize = 4096;

/// Every entry of a hash map (plain or LRU), read a batch at a time. The
/// map may change meanwhile: an entry present throughout is read once.
pub fn dump<K: bytemuck::Pod, V: bytemuck::Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut keys = vec![K::zeroed(); BATCH];
    let mut values = vec![V::zeroed(); BATCH];
    // Hash maps' batch token is a bucket index.
    let mut token_in = 0u32;
    let mut token_out = 0u32;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_mut(&mut token_in) as u64
            },
            out_batch: std::ptr::from_mut(&mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
            map_fd: fd_u32(map),
            elem_flags: 0,
            flags: 0,
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let read = usize::try_from(attr.count).unwrap_or(0).min(keys.len());
        match result {
            Ok(_) => {}
            // The last batch.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(
                    keys[..read]
                        .iter()
                        .copied()
                        .zip(values[..read].iter().copied()),
                );
                return Ok(out);
            }
            // One bucket holds more than a batch: a larger batch.
            Err(err) if err.raw_os_error() == Some(libc::ENOSPC) && keys.len() < (1 << 20) => {
                let len = keys.len() * 2;
                keys.resize(len, K::zeroed());
                values.resize(len, V::zeroed());
                continue;
            }
            Err(err) => return Err(err),
        }
        out.extend(
            keys[..read]
                .iter()
                .copied()
                .zip(values[..read].iter().copied()),
        );
        token_in = token_out;
        first = false;
    }
}

/// Points the link pinned at `pin` to program `prog_fd`
/// (`BPF_LINK_UPDATE`, atomic).
pub fn link_update(pin: &Path, prog_fd: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let link = obj_get(pin)?;
    let mut update = LinkUpdate {
        link_fd: u32::try_from(link.as_raw_fd()).unwrap_or(u32::MAX),
        new_prog_fd: fd_u32(prog_fd),
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut update)?;
    Ok(())
}

/// Detaches the link pinned at `pin` from its hook (`BPF_LINK_DETACH`):
/// the program stops running there at once, whoever else still holds the
/// link.
pub fn link_detach(pin: &Path) -> io::Result<()> {
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let link = obj_get(pin)?;
    let mut detach = LinkDetach {
        link_fd: u32::try_from(link.as_raw_fd()).unwrap_or(u32::MAX),
    };
    bpf(BPF_LINK_DETACH, &mut detach)?;
    Ok(())
}

/// A descriptor of the object pinned at `pin` (`BPF_OBJ_GET`).
fn obj_get(pin: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let path = CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
