//! `cargo xtask cluster`: a Kubernetes cluster on this machine (see
//! `tests/src/cluster/`), and the images its nodes import: the agent's
//! (as `cargo xtask image` builds it); Kubernetes' own test server
//! `agnhost` on a Debian root file system with the shell tools the e2e
//! specs call ([`rootfs`]); the same file system as the specs' `busybox`,
//! `glibc-dns-testing` and `distroless-iptables` (they run `sh`, `nc`,
//! `sleep`, `dig`, `getent` and `conntrack`); agnhost's HTTP server on port 80 as their `nginx` (pods that
//! only have to run and serve); the conntrack spec's
//! `regression-issue-74839` server on that file system; and agnhost alone,
//! with its `pause` subcommand, as the pod sandbox. No registry is reachable: every image is built here and
//! imported into each node's containerd under the name `e2e.test
//! --list-images` prints.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{
    cmd,
    image::{self, Layer, LayerFile, Metadata, Spec},
    rootfs, upstream,
};

/// Where the tests read the directory of image archives.
pub const IMAGES_DIR_ENV: &str = "SVC_CLUSTER_IMAGES";

/// agnhost's name and tag in Kubernetes v1.37.2's e2e image manifest
/// (`test/utils/image/manifest.go`).
const AGNHOST: (&str, &str) = ("registry.k8s.io/e2e-test-images/agnhost", "2.66.1");
/// The pause image kubeadm v1.37.2 pins (the sandbox image).
const PAUSE: (&str, &str) = ("registry.k8s.io/pause", "3.10.2");
/// The other images of v1.37.2's manifest the `[sig-network]` specs run.
const BUSYBOX: (&str, &str) = ("registry.k8s.io/e2e-test-images/busybox", "1.37.0-2");
const GLIBC_DNS: (&str, &str) = ("registry.k8s.io/e2e-test-images/glibc-dns-testing", "2.1.1");
const NGINX: (&str, &str) = ("registry.k8s.io/e2e-test-images/nginx", "1.27.0-2");
const IPTABLES: (&str, &str) = ("registry.k8s.io/build-image/distroless-iptables", "v0.9.9");
const BOOM: (&str, &str) = (
    "registry.k8s.io/e2e-test-images/regression-issue-74839",
    "1.5",
);

/// Builds the images into `target/cluster-images/`: `<file>.oci.tar`
/// beside a `<file>.name` holding the name to import it under.
pub fn images(bin_dir: &Path) -> Result<PathBuf> {
    let root = cmd::workspace_root();
    let dir = root.join("target/cluster-images");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let agent = image::build(Some(&dir))?;
    let meta = Metadata::of_checkout(&root)?;
    write_name(
        &agent.archive,
        &format!("ghcr.io/svc-proxy/svc-agent:{}", meta.version),
    )?;

    let files = agnhost_files(bin_dir)?;
    // The sandbox image needs the binary alone.
    let pause = Layer::of_files(&files[..1], meta.epoch)?;
    let agnhost = Layer::of_files(&files, meta.epoch)?;
    let boom = Layer::of_files(
        &[LayerFile {
            path: "regression-issue-74839",
            mode: 0o755,
            bytes: static_binary(bin_dir, "regression-issue-74839")?,
        }],
        meta.epoch,
    )?;
    let rootfs_tar = rootfs::debian()?;
    let rootfs = Layer::of_tar(
        &fs::read(&rootfs_tar).with_context(|| format!("reading {}", rootfs_tar.display()))?,
    )?;
    let strings = |args: &[&str]| args.iter().map(|&arg| arg.to_owned()).collect::<Vec<_>>();
    for (file, (name, tag), layers, entrypoint, cmd) in [
        (
            "agnhost",
            AGNHOST,
            vec![&rootfs, &agnhost],
            strings(&["/agnhost"]),
            strings(&["pause"]),
        ),
        (
            "pause",
            PAUSE,
            vec![&pause],
            strings(&["/agnhost", "pause"]),
            Vec::new(),
        ),
        (
            "busybox",
            BUSYBOX,
            vec![&rootfs],
            Vec::new(),
            strings(&["/bin/sh"]),
        ),
        (
            "glibc-dns-testing",
            GLIBC_DNS,
            vec![&rootfs],
            Vec::new(),
            strings(&["/bin/sh"]),
        ),
        (
            "distroless-iptables",
            IPTABLES,
            vec![&rootfs],
            Vec::new(),
            strings(&["/bin/sh"]),
        ),
        (
            "regression-issue-74839",
            BOOM,
            vec![&rootfs, &boom],
            strings(&["/regression-issue-74839"]),
            Vec::new(),
        ),
        (
            "nginx",
            NGINX,
            vec![&rootfs, &agnhost],
            strings(&["/agnhost", "netexec", "--http-port=80"]),
            Vec::new(),
        ),
    ] {
        let spec = Spec {
            title: file.to_owned(),
            description: format!("{name} for the test cluster, built by svc-proxy's xtask"),
            entrypoint,
            cmd,
            tag: tag.to_owned(),
        };
        let archive = dir.join(format!("{file}.oci.tar"));
        image::write_layered_archive(&layers, &meta, &spec, &archive)?;
        write_name(&archive, &format!("{name}:{tag}"))?;
    }
    Ok(dir)
}

/// agnhost as upstream's image has it: the binary, CoreDNS (the DNS specs
/// run their own server in an agnhost pod) and the TLS pair porter serves
/// with (the proxy specs' echo server). The binary comes first.
fn agnhost_files(bin_dir: &Path) -> Result<Vec<LayerFile>> {
    let porter =
        upstream::module_dir("tests/k8s", "k8s.io/kubernetes")?.join("test/images/agnhost/porter");
    let mut files = vec![
        LayerFile {
            path: "agnhost",
            mode: 0o755,
            bytes: static_binary(bin_dir, "agnhost")?,
        },
        LayerFile {
            path: "coredns",
            mode: 0o755,
            bytes: static_binary(bin_dir, "coredns")?,
        },
    ];
    for name in ["localhost.crt", "localhost.key"] {
        let path = porter.join(name);
        files.push(LayerFile {
            path: name,
            mode: 0o644,
            bytes: fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        });
    }
    Ok(files)
}

/// The bytes of `name` under `bin_dir`, checked to be static (it goes into
/// images with no libraries).
fn static_binary(bin_dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = bin_dir.join(name);
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    image::ensure_static(&bytes).with_context(|| format!("{name} is not a static binary"))?;
    Ok(bytes)
}

/// Writes `<file>.name` beside `<file>.oci.tar`.
fn write_name(archive: &Path, name: &str) -> Result<()> {
    let stem = archive
        .to_str()
        .and_then(|path| path.strip_suffix(".oci.tar"))
        .with_context(|| format!("{} is not an .oci.tar", archive.display()))?;
    let path = PathBuf::from(format!("{stem}.name"));
    fs::write(&path, name).with_context(|| format!("writing {}", path.display()))
}

/// Builds everything and runs the cluster until Ctrl-C.
pub fn run(nodes: u8) -> Result<()> {
    run_bin("cluster", &["--nodes".to_owned(), nodes.to_string()])
}

/// Builds everything and runs the e2e suite with each proxy (`args` for
/// `tests/src/bin/conformance.rs`).
pub fn conformance(args: &[String]) -> Result<()> {
    run_bin("conformance", args)
}

fn run_bin(bin: &str, args: &[String]) -> Result<()> {
    let bin_dir = upstream::binaries()?;
    let images = images(&bin_dir)?;
    cmd::run(&mut cmd::cargo(["build", "--package", "svc-agent"]))?;
    let mut run = cmd::cargo(["run", "--package", "tests", "--bin", bin, "--"]);
    run.args(args)
        .env(upstream::BIN_DIR_ENV, bin_dir)
        .env(IMAGES_DIR_ENV, images);
    cmd::run(&mut run)
}
