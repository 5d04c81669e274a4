//! The upstream Go components the tests run, built from the pin modules in
//! the repository into a cache outside it, one directory per pin keyed by
//! its `go.mod` and `go.sum`, so later runs reuse them:
//!
//! | pin | binaries |
//! |---|---|
//! | `tests/k8s` | etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl, agnhost |
//! | `tests/cluster/containerd` | containerd, containerd-shim-runc-v2, ctr |
//! | `tests/cluster/runc` | runc (cgo, seccomp) |
//! | `tests/cluster/coredns` | coredns |
//! | `tests/conformance` | e2e.test (Kubernetes' e2e suite), kube-proxy, ginkgo, regression-issue-74839 |
//!
//! containerd, runc and CoreDNS have pins of their own: their dependency
//! versions clash with Kubernetes' `replace` lines. The e2e suite and
//! kube-proxy have one because their extra dependencies would otherwise
//! change `tests/k8s` and rebuild all of it. The tests get one
//! directory with a link to every binary.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

/// One binary of a pin.
struct Tool {
    name: &'static str,
    package: &'static str,
    /// Linked with cgo (runc's nsenter is C).
    cgo: bool,
    tags: &'static str,
    /// A package's test binary (`go test -c`), as the e2e suite ships.
    test: bool,
}

const fn tool(name: &'static str, package: &'static str) -> Tool {
    Tool {
        name,
        package,
        cgo: false,
        tags: "",
        test: false,
    }
}

/// A pin module and what is built from it.
struct Pin {
    /// The module's directory, relative to the workspace.
    dir: &'static str,
    /// Its name in the cache.
    name: &'static str,
    tools: &'static [Tool],
}

const PINS: &[Pin] = &[
    Pin {
        dir: "tests/k8s",
        name: "k8s",
        tools: &[
            tool("etcd", "go.etcd.io/etcd/server/v3"),
            tool("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
            tool(
                "kube-controller-manager",
                "k8s.io/kubernetes/cmd/kube-controller-manager",
            ),
            tool("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
            tool("kubelet", "k8s.io/kubernetes/cmd/kubelet"),
            tool("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
            // Static: it goes into images with nothing else.
            tool("agnhost", "k8s.io/kubernetes/test/images/agnhost"),
        ],
    },
    Pin {
        dir: "tests/cluster/containerd",
        name: "containerd",
        tools: &[
            Tool {
                tags: "no_btrfs",
                ..tool(
                    "containerd",
                    "github.com/containerd/containerd/v2/cmd/containerd",
                )
            },
            Tool {
                tags: "no_btrfs",
                ..tool(
                    "containerd-shim-runc-v2",
                    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
                )
            },
            Tool {
                tags: "no_btrfs",
                ..tool("ctr", "github.com/containerd/containerd/v2/cmd/ctr")
            },
        ],
    },
    Pin {
        dir: "tests/cluster/runc",
        name: "runc",
        tools: &[Tool {
            cgo: true,
            tags: "seccomp",
            ..tool("runc", "github.com/opencontainers/runc")
        }],
    },
    Pin {
        dir: "tests/cluster/coredns",
        name: "coredns",
        tools: &[tool("coredns", "github.com/coredns/coredns")],
    },
    Pin {
        dir: "tests/conformance",
        name: "conformance",
        tools: &[
            Tool {
                test: true,
                ..tool("e2e.test", "k8s.io/kubernetes/test/e2e")
            },
            tool("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy"),
            // Runs the suite's specs in parallel processes.
            tool("ginkgo", "github.com/onsi/ginkgo/v2/ginkgo"),
            // The invalid-conntrack-state spec's server (sends a packet
            // outside the TCP window).
            tool(
                "regression-issue-74839",
                "k8s.io/kubernetes/test/images/regression-issue-74839",
            ),
        ],
    },
];

/// Where the tests read the directory holding the binaries.
pub const BIN_DIR_ENV: &str = "SVC_E2E_K8S_BIN";

/// FNV-1a: a stable key for the cache directory (std's hasher may change
/// between Rust releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The version `go.mod` at `dir` requires of `module`.
fn required_version(dir: &Path, module: &str) -> Result<String> {
    let go_mod = dir.join("go.mod");
    let text =
        fs::read_to_string(&go_mod).with_context(|| format!("reading {}", go_mod.display()))?;
    text.lines()
        .find_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("require ")
                .unwrap_or(line)
                .strip_prefix(module)?
                .strip_prefix(' ')?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .with_context(|| format!("{} requires no {module}", go_mod.display()))
}

/// The `-ldflags` of a pin: stripped, and for Kubernetes its version, so
/// components and specs that check it (`SkipUnlessServerVersionGTE`) see
/// the release rather than `v0.0.0-master`.
fn ldflags(dir: &Path) -> Result<String> {
    let mut flags = String::from("-s -w");
    if let Ok(version) = required_version(dir, "k8s.io/kubernetes") {
        let minor = version
            .trim_start_matches('v')
            .split('.')
            .nth(1)
            .context("the Kubernetes version has no minor number")?
            .to_owned();
        for (key, value) in [
            ("gitVersion", version.as_str()),
            ("gitMajor", "1"),
            ("gitMinor", &minor),
        ] {
            flags.push_str(" -X k8s.io/component-base/version.");
            flags.push_str(key);
            flags.push('=');
            flags.push_str(value);
        }
    }
    Ok(flags)
}

/// Builds what is missing of `pin`; returns its directory and key.
fn build_pin(pin: &Pin, cache: &Path) -> Result<(PathBuf, u64)> {
    let source = cmd::workspace_root().join(pin.dir);
    let mut key = Vec::new();
    for file in ["go.mod", "go.sum"] {
        let path = source.join(file);
        key.extend(fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    let key = fnv1a(&key);
    let dir = cache.join(format!("{}-{key:016x}", pin.name));
    let missing: Vec<&Tool> = pin
        .tools
        .iter()
        .filter(|tool| !dir.join(tool.name).is_file())
        .collect();
    if missing.is_empty() {
        return Ok((dir, key));
    }
    let go = cmd::output(Command::new("go").arg("version")).context(
        "the tests build upstream components from Go modules and need Go (1.26 or newer) on PATH",
    )?;
    eprintln!(
        "upstream: building {} from {} with {} into {} (minutes the first time)",
        missing
            .iter()
            .map(|tool| tool.name)
            .collect::<Vec<_>>()
            .join(", "),
        pin.dir,
        go.trim(),
        dir.display()
    );
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ldflags = ldflags(&source)?;
    for tool in missing {
        let partial = dir.join(format!("{}.partial", tool.name));
        let mut build = Command::new("go");
        build
            .args(if tool.test {
                &["test", "-c"][..]
            } else {
                &["build"][..]
            })
            .args(["-trimpath", "-ldflags", &ldflags])
            .args(["-tags", tool.tags])
            .arg("-o")
            .arg(&partial)
            .arg(tool.package)
            .current_dir(&source)
            // Never edit the pin while building from it.
            .env("GOFLAGS", "-mod=readonly")
            .env("CGO_ENABLED", if tool.cgo { "1" } else { "0" });
        cmd::run(&mut build)?;
        fs::rename(&partial, dir.join(tool.name))
            .with_context(|| format!("moving {} into place", partial.display()))?;
    }
    Ok((dir, key))
}

/// The directory of `module` as the pin at `pin_dir` (relative to the
/// workspace) requires it, in Go's module cache (downloaded if missing).
pub fn module_dir(pin_dir: &str, module: &str) -> Result<PathBuf> {
    let mut list = Command::new("go");
    list.args(["list", "-m", "-f", "{{.Dir}}", module])
        .current_dir(cmd::workspace_root().join(pin_dir))
        .env("GOFLAGS", "-mod=readonly");
    let dir = cmd::output(&mut list)?;
    let dir = PathBuf::from(dir.trim());
    if dir.as_os_str().is_empty() || !dir.is_dir() {
        bail!("go list found no directory for {module} in {pin_dir}");
    }
    Ok(dir)
}

/// Builds whatever is missing and returns one directory with every
/// binary (links into each pin's directory).
pub fn binaries() -> Result<PathBuf> {
    setup::ensure_cluster_packages()?;
    let cache = setup::cache_dir()?.join("upstream");
    let mut built = Vec::new();
    let mut combined = Vec::new();
    for pin in PINS {
        let (dir, key) = build_pin(pin, &cache)?;
        combined.extend(key.to_le_bytes());
        built.push((pin, dir));
    }
    let bin = cache.join(format!("bin-{:016x}", fnv1a(&combined)));
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    for (pin, dir) in built {
        for tool in pin.tools {
            let target = dir.join(tool.name);
            if !target.is_file() {
                bail!("{} was not built into {}", tool.name, dir.display());
            }
            let link = bin.join(tool.name);
            if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
                let _ = fs::remove_file(&link);
                symlink(&target, &link).with_context(|| format!("linking {}", link.display()))?;
            }
        }
    }
    Ok(bin)
}
