//! The upstream Kubernetes control plane the e2e tests run against: etcd,
//! kube-apiserver and kube-controller-manager built from the Go module
//! pinned in `tests/k8s` into a cache outside the repository, keyed by the
//! pin, so later runs reuse them.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

/// Each binary and the package it is built from.
const TOOLS: &[(&str, &str)] = &[
    ("etcd", "go.etcd.io/etcd/server/v3"),
    ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
    (
        "kube-controller-manager",
        "k8s.io/kubernetes/cmd/kube-controller-manager",
    ),
];

/// Where the tests read the directory holding the binaries.
pub const BIN_DIR_ENV: &str = "SVC_E2E_K8S_BIN";

fn pin_dir() -> PathBuf {
    cmd::workspace_root().join("tests/k8s")
}

/// FNV-1a: a stable key for the cache directory (std's hasher may change
/// between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The Kubernetes release the pin names (`require k8s.io/kubernetes vX`).
fn kubernetes_version() -> Result<String> {
    let go_mod = pin_dir().join("go.mod");
    let text =
        fs::read_to_string(&go_mod).with_context(|| format!("reading {}", go_mod.display()))?;
    text.lines()
        .find_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("require ")
                .unwrap_or(line)
                .strip_prefix("k8s.io/kubernetes ")?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .with_context(|| format!("{} requires no k8s.io/kubernetes", go_mod.display()))
}

/// Builds whatever is missing and returns the directory of the binaries.
pub fn binaries() -> Result<PathBuf> {
    let pin = pin_dir();
    let mut key = Vec::new();
    for file in ["go.mod", "go.sum"] {
        let path = pin.join(file);
        key.extend(fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    let version = kubernetes_version()?;
    let dir = setup::cache_dir()?
        .join("k8s")
        .join(format!("{version}-{:016x}", fnv1a(&key)));
    let missing: Vec<_> = TOOLS
        .iter()
        .filter(|(name, _)| !dir.join(name).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(dir);
    }
    let go = cmd::output(Command::new("go").arg("version")).context(
        "the e2e tests build Kubernetes from its Go modules and need Go (1.26 or newer) on PATH",
    )?;
    eprintln!(
        "e2e: building Kubernetes {version} and etcd with {} into {} (about 10 minutes the first time)",
        go.trim(),
        dir.display()
    );
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let minor = version
        .trim_start_matches('v')
        .split('.')
        .nth(1)
        .context("the Kubernetes version has no minor number")?;
    let ldflags = format!(
        "-s -w -X k8s.io/component-base/version.gitVersion={version} \
         -X k8s.io/component-base/version.gitMajor=1 \
         -X k8s.io/component-base/version.gitMinor={minor}"
    );
    for (name, package) in missing {
        let partial = dir.join(format!("{name}.partial"));
        cmd::run(
            Command::new("go")
                .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
                .arg(&partial)
                .arg(package)
                .current_dir(&pin)
                // Never edit the pin while building from it.
                .env("GOFLAGS", "-mod=readonly"),
        )?;
        fs::rename(&partial, dir.join(name))
            .with_context(|| format!("moving {} into place", partial.display()))?;
    }
    for (name, _) in TOOLS {
        if !dir.join(name).is_file() {
            bail!("{name} was not built into {}", dir.display());
        }
    }
    Ok(dir)
}
