//! kube-proxy's settings of the kernel's own connection tracking
//! (netfilter's, not svc-proxy's): a node that replaced kube-proxy keeps
//! them for the traffic that still goes through netfilter (CNI
//! masquerading, host connections). kube-proxy raises the established TCP
//! timeout to 24 h and sets the `CLOSE_WAIT` one to 1 h
//! (`--conntrack-tcp-timeout-established`, `--conntrack-tcp-timeout-close-wait`),
//! in the node's network namespace; 0 leaves a value as it is.

use std::{fs, io, path::Path};

/// Where the settings live (per network namespace).
const SYSCTL_DIR: &str = "/proc/sys/net/netfilter";

/// One setting: its file under [`SYSCTL_DIR`] and the wanted seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeout {
    pub sysctl: &'static str,
    pub seconds: u32,
}

/// What happened to one setting.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Already so (or 0: left alone).
    Unchanged,
    Set {
        from: u32,
    },
    /// netfilter's connection tracking is not loaded: nothing to set.
    Absent,
}

/// The TCP timeouts kube-proxy sets, with these values.
#[must_use]
pub const fn tcp_timeouts(established: u32, close_wait: u32) -> [Timeout; 2] {
    [
        Timeout {
            sysctl: "nf_conntrack_tcp_timeout_established",
            seconds: established,
        },
        Timeout {
            sysctl: "nf_conntrack_tcp_timeout_close_wait",
            seconds: close_wait,
        },
    ]
}

/// Applies `timeout` under `dir` (the real one is [`SYSCTL_DIR`]).
///
/// # Errors
///
/// The file exists but cannot be read, parsed or written.
pub fn apply_in(dir: &Path, timeout: Timeout) -> io::Result<Outcome> {
    let path = dir.join(timeout.sysctl);
    let current = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Absent),
        Err(err) => return Err(err),
    };
    let from: u32 = current
        .trim()
        .parse()
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, format!("{current:?}: {err}")))?;
    if timeout.seconds == 0 || from == timeout.seconds {
        return Ok(Outcome::Unchanged);
    }
    fs::write(&path, timeout.seconds.to_string())?;
    Ok(Outcome::Set { from })
}

/// Applies `timeout` in this network namespace.
///
/// # Errors
///
/// As [`apply_in`].
pub fn apply(timeout: Timeout) -> io::Result<Outcome> {
    apply_in(Path::new(SYSCTL_DIR), timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_what_differs_and_leaves_the_rest() {
        let dir = std::env::temp_dir().join(format!("svc-netfilter-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let [established, close_wait] = tcp_timeouts(86_400, 3_600);
        fs::write(dir.join(established.sysctl), "432000\n").expect("write");
        fs::write(dir.join(close_wait.sysctl), "3600\n").expect("write");
        assert_eq!(
            apply_in(&dir, established).expect("applies"),
            Outcome::Set { from: 432_000 }
        );
        assert_eq!(
            fs::read_to_string(dir.join(established.sysctl)).expect("read"),
            "86400"
        );
        assert_eq!(
            apply_in(&dir, close_wait).expect("applies"),
            Outcome::Unchanged
        );
        let [zero, _] = tcp_timeouts(0, 0);
        assert_eq!(apply_in(&dir, zero).expect("applies"), Outcome::Unchanged);
        fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(apply_in(&dir, close_wait).expect("absent"), Outcome::Absent);
        fs::create_dir_all(&dir).expect("temp dir");
        fs::write(dir.join(close_wait.sysctl), "soon").expect("write");
        assert!(apply_in(&dir, close_wait).is_err(), "garbage is an error");
        let _ = fs::remove_dir_all(&dir);
    }
}
