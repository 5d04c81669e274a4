//! Helpers for the root-only tests: a root check that fails loudly, network
//! namespaces, and packet fixtures.
//!
//! Tests panic with a message instead of returning errors, so helpers here
//! panic too, naming what failed.

#![expect(
    clippy::missing_panics_doc,
    reason = "test helpers panic by design, with a message naming what failed"
)]

use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

pub mod agents;
pub mod cluster;
pub mod conformance;
pub mod figures;
pub mod k8s;
pub mod loadgen;
pub mod netns;
pub mod packet;
pub mod proxies;
pub mod scenarios;
pub mod servers;
pub mod topology;

/// A count as a float for rates and ratios (exact below 2^53, which every
/// count of these tests is).
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "counts far below 2^53")]
pub const fn as_f64(count: u64) -> f64 {
    count as f64
}

/// Fails the test unless it runs as root. These tests load eBPF programs and
/// create network namespaces; they never skip silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (it loads eBPF programs and creates network namespaces); \
         run `cargo xtask test` as root"
    );
}

/// The workspace's root directory.
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// A workspace binary cargo built beside this test (`svc-agent`,
/// `svc-cni`): `cargo test --workspace` builds them.
#[must_use]
pub fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the target directory")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// Bounded polling: `check` every 50 ms until it holds or `timeout`
/// passes. Returns whether it held.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Backend id `n` (not 0), for tables written by hand.
#[must_use]
pub const fn backend(n: u32) -> svc_common::lb::BackendId {
    match svc_common::lb::BackendId::new(n) {
        Some(id) => id,
        None => panic!("backend ids start at 1"),
    }
}
