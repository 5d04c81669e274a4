//! Network namespaces made with `ip netns`, removed on drop.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with `args`; panics with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run `ip {}`: {err}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A named network namespace, deleted (with its interfaces) on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// A new namespace named after `role`, unique within this machine.
    #[must_use]
    pub fn new(role: &str) -> Self {
        let name = format!(
            "svct-{role}-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // No IPv6: no router solicitations or MLD reports in the counters.
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        ns
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.run(|| {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            std::fs::write(&path, value)
                .unwrap_or_else(|err| panic!("cannot set {key}={value}: {err}"));
        });
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets made
    /// there stay in the namespace when handed back.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    enter(&path);
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a new thread that has entered this namespace, in the
    /// background.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = self.path();
        thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

/// Moves the calling thread into the network namespace at `path`
/// (`/run/netns/<name>`).
pub fn enter(path: &str) {
    let file = File::open(path).unwrap_or_else(|err| panic!("cannot open {path}: {err}"));
    // SAFETY: a valid namespace fd; setns only changes this thread's
    // namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(
        rc == 0,
        "setns({path}) failed: {}",
        std::io::Error::last_os_error()
    );
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Best effort: a failed delete must not hide the test's own failure.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair, each end with an address in
/// `10.<subnet>.0.0/24`: `.1` on the left, `.2` on the right.
pub struct VethPair {
    pub left: NetNs,
    pub right: NetNs,
    /// Interface name on each side.
    pub iface: &'static str,
    pub left_addr: std::net::Ipv4Addr,
    pub right_addr: std::net::Ipv4Addr,
}

impl VethPair {
    #[must_use]
    pub fn new(subnet: u8) -> Self {
        let left = NetNs::new("left");
        let right = NetNs::new("right");
        let iface = "veth0";
        // Unique names while the pair is created, renamed inside each namespace.
        let tmp_left = format!("svl{}-{subnet}", std::process::id() % 100_000);
        let tmp_right = format!("svr{}-{subnet}", std::process::id() % 100_000);
        ip(&[
            "link",
            "add",
            &tmp_left,
            "netns",
            left.name(),
            "type",
            "veth",
            "peer",
            "name",
            &tmp_right,
            "netns",
            right.name(),
        ]);
        left.ip(&["link", "set", &tmp_left, "name", iface]);
        right.ip(&["link", "set", &tmp_right, "name", iface]);
        let left_addr = std::net::Ipv4Addr::new(10, subnet, 0, 1);
        let right_addr = std::net::Ipv4Addr::new(10, subnet, 0, 2);
        left.ip(&["addr", "add", &format!("{left_addr}/24"), "dev", iface]);
        right.ip(&["addr", "add", &format!("{right_addr}/24"), "dev", iface]);
        left.ip(&["link", "set", iface, "up"]);
        right.ip(&["link", "set", iface, "up"]);
        Self {
            left,
            right,
            iface,
            left_addr,
            right_addr,
        }
    }
}
