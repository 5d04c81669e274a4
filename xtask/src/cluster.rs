//! `cargo xtask cluster`: a Kubernetes cluster on this machine (see
//! `tests/src/cluster/`), and the images its nodes import: the agent's
//! (as `cargo xtask image` builds it), and Kubernetes' own test server
//! `agnhost` twice, as itself and, with its `pause` subcommand, as the pod
//! sandbox. No registry is reachable: every image is built here and
//! imported into each node's containerd under the name the cluster uses.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{
    cmd,
    image::{self, LayerFile, Metadata, Spec},
    upstream,
};

/// Where the tests read the directory of image archives.
pub const IMAGES_DIR_ENV: &str = "SVC_CLUSTER_IMAGES";

/// agnhost's name and tag in Kubernetes v1.37.2's e2e image manifest
/// (`test/utils/image/manifest.go`).
const AGNHOST: (&str, &str) = ("registry.k8s.io/e2e-test-images/agnhost", "2.66.1");
/// The pause image kubeadm v1.37.2 pins (the sandbox image).
const PAUSE: (&str, &str) = ("registry.k8s.io/pause", "3.10.2");

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

    let agnhost_path = bin_dir.join("agnhost");
    let agnhost =
        fs::read(&agnhost_path).with_context(|| format!("reading {}", agnhost_path.display()))?;
    image::ensure_static(&agnhost).context("agnhost is not a static binary")?;
    for (file, (name, tag), entrypoint, cmd) in [
        (
            "agnhost",
            AGNHOST,
            vec!["/agnhost".to_owned()],
            vec!["pause".to_owned()],
        ),
        (
            "pause",
            PAUSE,
            vec!["/agnhost".to_owned(), "pause".to_owned()],
            Vec::new(),
        ),
    ] {
        let spec = Spec {
            title: file.to_owned(),
            description: format!(
                "Kubernetes' agnhost ({} pin) for the test cluster",
                meta.version
            ),
            entrypoint,
            cmd,
            tag: tag.to_owned(),
        };
        let files = [LayerFile {
            path: "agnhost",
            mode: 0o755,
            bytes: agnhost.clone(),
        }];
        let archive = dir.join(format!("{file}.oci.tar"));
        image::write_archive(&files, &meta, &spec, &archive)?;
        write_name(&archive, &format!("{name}:{tag}"))?;
    }
    Ok(dir)
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
    let bin_dir = upstream::binaries()?;
    let images = images(&bin_dir)?;
    cmd::run(&mut cmd::cargo(["build", "--package", "svc-agent"]))?;
    let mut run = cmd::cargo(["run", "--package", "tests", "--bin", "cluster", "--"]);
    run.arg("--nodes")
        .arg(nodes.to_string())
        .env(upstream::BIN_DIR_ENV, bin_dir)
        .env(IMAGES_DIR_ENV, images);
    cmd::run(&mut run)
}
