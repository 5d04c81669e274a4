//! Interfaces of the calling thread's network namespace, and the name
//! patterns the agent attaches to (`veth*`, `cali*`, or an exact name).

use std::ffi::CStr;

/// The interfaces of the calling thread's network namespace: (index,
/// name).
#[must_use]
pub fn interfaces() -> Vec<(u32, String)> {
    // SAFETY: if_nameindex returns an array ending with a zero entry, or
    // null; it is freed below with if_freenameindex.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut entry = list;
    // SAFETY: walking the array up to its terminating zero entry; names
    // are NUL-terminated C strings owned by the array.
    unsafe {
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            found.push((
                (*entry).if_index,
                CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            ));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    found
}

/// The index of interface `name` in the calling thread's namespace.
#[must_use]
pub fn index_of(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Whether `name` matches `pattern`, where `*` stands for any run of
/// characters.
#[must_use]
pub fn matches(pattern: &str, name: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut remaining) = name.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let last = parts.pop().unwrap_or_default();
    for part in parts {
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_shell_globs() {
        assert!(matches("veth*", "veth1234"));
        assert!(matches("eth0", "eth0"));
        assert!(!matches("eth0", "eth01"));
        assert!(matches("*", "anything"));
        assert!(matches("p*x", "p12x"));
        assert!(!matches("p*x", "p12y"));
        assert!(matches("a*b*c", "a-b-c"));
        assert!(!matches("veth*", "eth0"));
    }

    #[test]
    fn the_loopback_interface_is_listed_with_its_index() {
        let lo = index_of("lo").expect("lo has an index");
        assert!(interfaces().contains(&(lo, "lo".to_owned())));
        assert_eq!(index_of("svc-no-such0"), None);
    }
}
