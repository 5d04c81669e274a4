//! `cargo xtask setup`: check every prerequisite and install only what is
//! missing. Idempotent and quiet when everything is there, so every other
//! subcommand runs it first.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// bpf-linker release that supports the LLVM inside Rust 1.95 (LLVM 22).
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// The LLVM shared library shipped inside the Rust toolchain.
const TOOLCHAIN_LLVM_PREFIX: &str = "libLLVM.so.22.1-rust-";

/// Debian packages the tests and the sandbox need, each with a binary that
/// shows it is installed.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[("ip", "iproute2"), ("curl", "curl")];

/// What the test cluster's nodes need besides what is built from the pins:
/// the pod network's CNI plugins (ptp, host-local, loopback), libseccomp
/// with pkg-config for runc's cgo build, mmdebstrap for the root file
/// system of the e2e suite's images, nft for kube-proxy's nftables mode
/// (the conformance control run, the benchmark's peer), iptables for the
/// portmap plugin (hostPort) and kube-proxy's iptables mode, conntrack for
/// kube-proxy's stale-flow cleanup and the benchmark's flush between
/// proxies.
const CLUSTER_PACKAGES: &[(&str, &str)] = &[
    ("/usr/lib/cni/ptp", "containernetworking-plugins"),
    ("pkg-config", "pkg-config"),
    ("/usr/include/seccomp.h", "libseccomp-dev"),
    ("mmdebstrap", "mmdebstrap"),
    ("nft", "nftables"),
    // The portmap CNI plugin's.
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
];

/// The font `cargo xtask bench` draws its plots' text with.
pub const PLOT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// What `cargo xtask bench` needs besides the cluster's packages.
pub fn ensure_bench_packages() -> Result<()> {
    ensure_debian_packages(&[(PLOT_FONT, "fonts-dejavu-core")])
}

pub fn ensure() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_debian_packages(DEBIAN_PACKAGES)?;
    ensure_image_tools()?;
    ensure_cluster_packages()?;
    Ok(())
}

/// What the test cluster needs from Debian.
pub fn ensure_cluster_packages() -> Result<()> {
    ensure_debian_packages(CLUSTER_PACKAGES)
}

/// What `cargo xtask image` needs: Rust's musl target (the agent is linked
/// statically) and musl's compiler wrapper (for ring's C parts).
pub fn ensure_image_tools() -> Result<()> {
    ensure_rust_target(crate::image::MUSL_TARGET)?;
    ensure_debian_packages(&[("musl-gcc", "musl-tools")])
}

fn ensure_rust_target(target: &str) -> Result<()> {
    let std = sysroot()?.join("lib/rustlib").join(target).join("lib");
    if std.is_dir() {
        return Ok(());
    }
    eprintln!("setup: Rust's {target} target is missing; installing it");
    let mut add = Command::new("rustup");
    add.args(["target", "add", target]);
    if let Some(toolchain) = env::var_os("RUSTUP_TOOLCHAIN") {
        add.arg("--toolchain").arg(toolchain);
    }
    cmd::run(&mut add)?;
    if !std.is_dir() {
        bail!("{target} installed but {} is still missing", std.display());
    }
    eprintln!("setup: installed the {target} target");
    Ok(())
}

fn sysroot() -> Result<PathBuf> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = cmd::output(Command::new(rustc).args(["--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

fn ensure_rust_src() -> Result<()> {
    let core = sysroot()?.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core.exists() {
        return Ok(());
    }
    eprintln!("setup: rust-src is missing; installing it");
    let mut add = Command::new("rustup");
    add.args(["component", "add", "rust-src"]);
    if let Some(toolchain) = env::var_os("RUSTUP_TOOLCHAIN") {
        add.arg("--toolchain").arg(toolchain);
    }
    cmd::run(&mut add)?;
    if !core.exists() {
        bail!("rust-src installed but {} is still missing", core.display());
    }
    eprintln!("setup: installed rust-src");
    Ok(())
}

fn cargo_bin_dir() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home).join("bin"));
    }
    Ok(home_dir()?.join(".cargo/bin"))
}

fn home_dir() -> Result<PathBuf> {
    env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

pub fn cache_dir() -> Result<PathBuf> {
    let base = match env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => home_dir()?.join(".cache"),
    };
    Ok(base.join("svc-proxy"))
}

/// The installed bpf-linker's version line, if it runs.
fn installed_bpf_linker() -> Option<String> {
    let path = cargo_bin_dir().ok()?.join("bpf-linker");
    let out = Command::new(path).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(version) = installed_bpf_linker()
        && version.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!(
        "setup: bpf-linker {BPF_LINKER_VERSION} is missing; building it against the toolchain's LLVM"
    );
    let prefix = llvm_prefix()?;
    cmd::run(
        cmd::cargo([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
        ])
        .env("LLVM_PREFIX", &prefix),
    )?;
    match installed_bpf_linker() {
        Some(version) => eprintln!(
            "setup: installed {version} (LLVM from {})",
            prefix.display()
        ),
        None => bail!("bpf-linker was installed but does not run"),
    }
    Ok(())
}

/// A directory whose `lib/` links to the LLVM inside the Rust toolchain, under
/// both the plain name and the soname. bpf-linker keeps an rpath to it, so it
/// lives in the cache directory, not in a temporary one.
fn llvm_prefix() -> Result<PathBuf> {
    let toolchain_lib = sysroot()?.join("lib");
    let llvm = fs::read_dir(&toolchain_lib)
        .with_context(|| format!("cannot read {}", toolchain_lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(TOOLCHAIN_LLVM_PREFIX))
        })
        .with_context(|| {
            format!(
                "no {TOOLCHAIN_LLVM_PREFIX}* in {}: this toolchain does not ship LLVM 22",
                toolchain_lib.display()
            )
        })?;
    let soname = llvm
        .file_name()
        .context("LLVM library path has no file name")?
        .to_owned();
    let prefix = cache_dir()?.join("llvm").join(&soname);
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for name in [Path::new("libLLVM.so"), Path::new(&soname)] {
        let link = lib.join(name);
        if fs::read_link(&link).is_ok_and(|target| target == llvm) {
            continue;
        }
        let _ = fs::remove_file(&link);
        symlink(&llvm, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), llvm.display()))?;
    }
    Ok(prefix)
}

/// Whether `binary` is on `PATH` (or in `/sbin`), or, given as an absolute
/// path (a library's header, a plugin), exists.
fn on_path(binary: &str) -> bool {
    if binary.starts_with('/') {
        return Path::new(binary).exists();
    }
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|dir| Path::new(dir).join(binary).is_file())
}

/// Installs the packages of `packages` (binary or file, package) whose
/// binary or file is missing.
fn ensure_debian_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(binary, _)| !on_path(binary))
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {}", missing.join(" "));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "Debian packages {} are missing and installing them needs root",
            missing.join(" ")
        );
    }
    cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    eprintln!("setup: installed {}", missing.join(" "));
    Ok(())
}
