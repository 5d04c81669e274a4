//! A Debian root file system for the e2e suite's images: Kubernetes' own
//! agnhost image is Alpine with the shell tools its specs call (`sh -c`
//! with `nc`, `curl`, `wget`, `nslookup`, `dig`, `ss`, `dd`), and no
//! registry is reachable, so the same tools come from Debian's packages,
//! installed by `mmdebstrap` from this machine's apt sources into a tar
//! kept in the cache (keyed by the suite and the package list).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{cmd, setup, upstream::fnv1a};

/// What the specs run inside agnhost and dnsutils pods (and `conntrack`
/// in the `distroless-iptables` host pod). `netcat-openbsd` as upstream's
/// (`nc -v -t -w 2`, `-u`, `-z`), not busybox's.
const PACKAGES: &[&str] = &[
    "bash",
    "bind9-dnsutils",
    "conntrack",
    "curl",
    "iperf",
    "iproute2",
    "iptables",
    "iputils-ping",
    "netcat-openbsd",
    "procps",
    "socat",
    "wget",
];

/// Documentation has no use in a test image and is most of its size.
const EXCLUDED: &[&str] = &[
    "/usr/share/doc/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/man/*",
];

/// The host's deb822 sources: mmdebstrap pastes a file given as mirror.
const HOST_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The suite this machine runs (`VERSION_CODENAME`), bookworm by default.
fn host_suite() -> String {
    fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("VERSION_CODENAME="))
                .map(|name| name.trim_matches('"').to_owned())
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "bookworm".to_owned())
}

/// The root file system as an uncompressed tar, built once per suite and
/// package list.
pub fn debian() -> Result<PathBuf> {
    setup::ensure_cluster_packages()?;
    let suite = host_suite();
    let mirror = if Path::new(HOST_SOURCES).is_file() {
        HOST_SOURCES
    } else {
        DEFAULT_MIRROR
    };
    let key = fnv1a(format!("{suite} {mirror} {PACKAGES:?} {EXCLUDED:?}").as_bytes());
    let dir = setup::cache_dir()?.join("rootfs");
    let tar = dir.join(format!("debian-{suite}-{key:016x}.tar"));
    if tar.is_file() {
        return Ok(tar);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "rootfs: installing {} from Debian {suite} into {} (a minute)",
        PACKAGES.join(" "),
        tar.display()
    );
    // mmdebstrap tells the format from the extension.
    let partial = dir.join(format!("debian-{suite}-{key:016x}.partial.tar"));
    let mut build = Command::new("mmdebstrap");
    build
        .args(["--variant=minbase", "--mode=root", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .args(
            EXCLUDED
                .iter()
                .map(|pattern| format!("--dpkgopt=path-exclude={pattern}")),
        )
        .arg(&suite)
        .arg(&partial)
        .arg(mirror);
    cmd::run(&mut build).context("mmdebstrap failed (it needs root and Debian's mirror)")?;
    fs::rename(&partial, &tar).with_context(|| format!("moving {} into place", tar.display()))?;
    Ok(tar)
}
