//! Builds `svc-ebpf` for the BPF target and leaves the object in `OUT_DIR`,
//! where `src/datapath/loader.rs` embeds it.

use std::{env, path::PathBuf};

use anyhow::{Context as _, Result};
use aya_build::{Package, Toolchain};

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("svc-agent has no parent directory")?;
    let ebpf_dir = root.join("svc-ebpf");
    let common_dir = root.join("svc-common");
    println!(
        "cargo:rerun-if-changed={}",
        common_dir.join("src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        common_dir.join("Cargo.toml").display()
    );
    // Set by `cargo xtask image`, whose target directory every checkout
    // shares: the paths above are this checkout's, so another checkout's
    // build must not count as up to date.
    println!("cargo:rerun-if-env-changed=SVC_SOURCE_ROOT");

    // svc-ebpf is a workspace of its own (it targets bpfel-unknown-none, not
    // the host), so cargo must run from its directory.
    env::set_current_dir(&ebpf_dir)
        .with_context(|| format!("cannot enter {}", ebpf_dir.display()))?;
    // core is built from source for the BPF target. On a stable toolchain
    // that needs RUSTC_BOOTSTRAP; it is set for this nested build only, never
    // for the host crates.
    // SAFETY: build scripts are single-threaded; nothing reads the
    // environment concurrently.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    // Build with the toolchain that builds us, not nightly.
    let toolchain = env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    let ebpf_dir = ebpf_dir.to_str().context("svc-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "svc-ebpf",
            root_dir: ebpf_dir,
            ..Package::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF object (svc-ebpf) failed; `cargo xtask setup` installs what it needs",
    )
}
