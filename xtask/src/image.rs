//! `cargo xtask image`: the agent's OCI image, without a container engine.
//! The agent is linked statically (musl; its eBPF object is embedded) and
//! put into one layer at `/usr/local/bin/svc-agent` with the CNI plugin
//! beside it at `/usr/local/bin/svc-cni` (which `svc-agent install-cni`
//! copies to the node), the paths `deploy/Containerfile` uses; no shell,
//! no CA bundle (the agent trusts only the cluster CA its kubeconfig or
//! service account names).
//!
//! The archive is reproducible: layer entries in a fixed order with the
//! commit's time, owner 0, no user or group names; gzip without a time or
//! name; JSON with sorted keys. The same tree, built in the same place,
//! gives the same digest ([`check_reproducible`] builds twice and
//! compares); the embedded eBPF object's debug info names the checkout's
//! path, so another place gives another digest.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use flate2::{Compression, GzBuilder};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, HistoryBuilder, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType, OciLayoutBuilder, Os, RootFsBuilder, SCHEMA_VERSION,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::{cmd, setup};

/// The static target the image's binaries are built for.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Where the agent lives in the image (and in `deploy/Containerfile`).
pub const AGENT_PATH: &str = "usr/local/bin/svc-agent";
/// Where the CNI plugin lives in the image, beside the agent.
pub const CNI_PLUGIN_PATH: &str = "usr/local/bin/svc-cni";
/// Tells the agent's build script which checkout it builds (see `svc-agent/build.rs`).
const SOURCE_ROOT_ENV: &str = "SVC_SOURCE_ROOT";

/// A file of the layer.
pub struct LayerFile {
    /// Path inside the image, without a leading `/`.
    pub path: &'static str,
    pub mode: u32,
    pub bytes: Vec<u8>,
}

/// What the image says about itself.
pub struct Metadata {
    pub version: String,
    /// The commit, or `unknown` outside a git checkout.
    pub revision: String,
    /// Seconds since the epoch: the commit's time (or `SOURCE_DATE_EPOCH`),
    /// stamped on every file and as the creation time.
    pub epoch: u64,
}

/// What an image is called and how it starts.
pub struct Spec {
    pub title: String,
    pub description: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// The index's `org.opencontainers.image.ref.name`: the tag a runtime
    /// imports the archive under.
    pub tag: String,
}

impl Spec {
    /// The agent's image.
    #[must_use]
    pub fn agent(meta: &Metadata) -> Self {
        Self {
            title: "svc-agent".to_owned(),
            description: "svc-proxy's node agent: an eBPF replacement for kube-proxy".to_owned(),
            entrypoint: vec![format!("/{AGENT_PATH}")],
            cmd: Vec::new(),
            tag: meta.version.clone(),
        }
    }
}

/// A written archive.
pub struct Built {
    pub archive: PathBuf,
    /// The image manifest's digest (`sha256:...`): the image's identity.
    pub digest: String,
}

/// Builds the static agent and writes `target/image/svc-agent-<version>.oci.tar`
/// (or under `out`).
pub fn build(out: Option<&Path>) -> Result<Built> {
    setup::ensure_image_tools()?;
    let root = cmd::workspace_root();
    let release_dir = build_static_binaries()?;
    let mut files = Vec::new();
    for path in [AGENT_PATH, CNI_PLUGIN_PATH] {
        let name = path.rsplit('/').next().unwrap_or(path);
        let binary = release_dir.join(name);
        let bytes = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
        ensure_static(&bytes)
            .with_context(|| format!("{} is not a static binary", binary.display()))?;
        files.push(LayerFile {
            path,
            mode: 0o755,
            bytes,
        });
    }
    let meta = Metadata::of_checkout(&root)?;
    let dir = out.map_or_else(|| root.join("target/image"), Path::to_path_buf);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let archive = dir.join(format!("svc-agent-{}.oci.tar", meta.version));
    let digest = write_archive(&files, &meta, &Spec::agent(&meta), &archive)?;
    Ok(Built { archive, digest })
}

/// Builds the image twice and fails unless both archives are the same
/// bytes, and checks what the archive holds.
pub fn check_reproducible() -> Result<()> {
    let root = cmd::workspace_root();
    let first = build(Some(&root.join("target/image/check-1")))?;
    let second = build(Some(&root.join("target/image/check-2")))?;
    let (a, b) = (fs::read(&first.archive)?, fs::read(&second.archive)?);
    ensure!(
        a == b,
        "two builds of the same tree differ: {} ({}) and {} ({})",
        first.archive.display(),
        first.digest,
        second.archive.display(),
        second.digest
    );
    let image = read_archive(&first.archive)?;
    ensure!(
        image.digest == first.digest,
        "the archive's index names {}, the build said {}",
        image.digest,
        first.digest
    );
    let run_dir = root.join("target/image/check-run");
    for (path, args, env, says) in [
        (AGENT_PATH, &["--help"][..], None, "Usage"),
        (
            CNI_PLUGIN_PATH,
            &[][..],
            Some(("CNI_COMMAND", "VERSION")),
            "supportedVersions",
        ),
    ] {
        let (mode, bytes) = image
            .files
            .get(path)
            .with_context(|| format!("the layer has no {path}"))?;
        ensure!(mode & 0o777 == 0o755, "{path} has mode {mode:o}");
        ensure_static(bytes).with_context(|| format!("{path} is not static"))?;
        run_extracted(bytes, &run_dir, args, env, says)?;
    }
    let entrypoint = image
        .config
        .config()
        .as_ref()
        .and_then(|config| config.entrypoint().clone());
    ensure!(
        entrypoint == Some(vec![format!("/{AGENT_PATH}")]),
        "entry point {entrypoint:?}"
    );
    eprintln!(
        "image: {} is reproducible ({})",
        first.archive.display(),
        first.digest
    );
    Ok(())
}

/// Builds the static agent and CNI plugin in a target directory under the
/// cache, so that a fresh checkout rebuilds only this workspace's crates
/// for musl; returns the directory holding them.
fn build_static_binaries() -> Result<PathBuf> {
    let target_dir = setup::cache_dir()?.join("image-target");
    let mut build = cmd::cargo([
        "build",
        "--release",
        "--package",
        "svc-agent",
        "--bin",
        "svc-agent",
        "--bin",
        "svc-cni",
        "--target",
        MUSL_TARGET,
    ]);
    // ring's C parts need musl's compiler wrapper; symbols are stripped.
    // The directory is shared by every checkout: naming this one makes the
    // agent's build script rebuild the eBPF object from these sources when
    // the last build was another checkout's (its change checks name that
    // checkout's files).
    build
        .arg("--target-dir")
        .arg(&target_dir)
        .env(SOURCE_ROOT_ENV, cmd::workspace_root())
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS",
            "-C strip=symbols -C target-feature=+crt-static",
        );
    cmd::run(&mut build)?;
    Ok(target_dir.join(format!("{MUSL_TARGET}/release")))
}

/// Runs one of the image's binaries as the image would, with nothing from
/// the machine's environment: it must start and print `says`.
fn run_extracted(
    bytes: &[u8],
    dir: &Path,
    args: &[&str],
    env: Option<(&str, &str)>,
    says: &str,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(dir)?;
    let binary = dir.join("binary");
    fs::write(&binary, bytes)?;
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755))?;
    let mut command = Command::new(&binary);
    command.args(args).env_clear();
    if let Some((key, value)) = env {
        command.env(key, value);
    }
    let out = command
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(says),
        "the image's binary did not run: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Fails unless `elf` is an ELF executable without an interpreter (a
/// dynamic loader), so that it runs in an image with nothing else.
pub fn ensure_static(elf: &[u8]) -> Result<()> {
    const PT_INTERP: u32 = 3;
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "not a 64-bit little-endian ELF file"
    );
    let read = |at: usize, len: usize| -> Result<u64> {
        let bytes = elf.get(at..at + len).context("ELF header cut short")?;
        Ok(bytes
            .iter()
            .rev()
            .fold(0u64, |value, &byte| (value << 8) | u64::from(byte)))
    };
    let offset = usize::try_from(read(0x20, 8)?)?;
    let size = usize::try_from(read(0x36, 2)?)?;
    let count = usize::try_from(read(0x38, 2)?)?;
    for index in 0..count {
        if read(offset + index * size, 4)? == u64::from(PT_INTERP) {
            bail!("it names a dynamic loader (PT_INTERP)");
        }
    }
    Ok(())
}

impl Metadata {
    /// The workspace version and the checkout's commit and commit time;
    /// `SOURCE_DATE_EPOCH` overrides the time.
    pub fn of_checkout(root: &Path) -> Result<Self> {
        let git = |args: &[&str]| {
            Command::new("git")
                .arg("-C")
                .arg(root)
                .args(args)
                .output()
                .ok()
                .filter(|out| out.status.success())
                .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        };
        let revision = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
        let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(text) => text.parse().context("SOURCE_DATE_EPOCH is not a number")?,
            Err(_) => git(&["log", "-1", "--format=%ct"])
                .and_then(|text| text.parse().ok())
                .unwrap_or(0),
        };
        Ok(Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            revision,
            epoch,
        })
    }

    /// The time as RFC 3339 (UTC).
    fn created(&self) -> String {
        let days = self.epoch / 86_400;
        let secs = self.epoch % 86_400;
        let (year, month, day) = civil_from_days(days);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

/// The proleptic Gregorian date of `days` after 1970-01-01 (Howard
/// Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// `value` as JSON with every object's keys sorted: the documents hold
/// hash maps, whose order would otherwise change the digests.
fn canonical_json(value: &impl Serialize) -> Result<Vec<u8>> {
    fn sorted(value: serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => {
                let ordered: BTreeMap<String, serde_json::Value> =
                    map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                serde_json::Value::Object(ordered.into_iter().collect())
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.into_iter().map(sorted).collect())
            }
            other => other,
        }
    }
    Ok(serde_json::to_vec(&sorted(serde_json::to_value(value)?))?)
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A blob of the layout: its descriptor and bytes.
struct Blob {
    descriptor: Descriptor,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(media_type: MediaType, bytes: Vec<u8>) -> Result<Self> {
        let digest: Digest = format!("sha256:{}", sha256(&bytes)).parse()?;
        let size = u64::try_from(bytes.len())?;
        Ok(Self {
            descriptor: Descriptor::new(media_type, size, digest),
            bytes,
        })
    }

    fn path(&self) -> String {
        format!("blobs/sha256/{}", self.descriptor.digest().digest())
    }
}

/// A tar entry header for a file or directory, the same wherever built.
fn header(path: &str, mode: u32, size: u64, mtime: u64, directory: bool) -> Result<tar::Header> {
    let mut header = tar::Header::new_ustar();
    header.set_path(path)?;
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(if directory {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    header.set_cksum();
    Ok(header)
}

/// The layer: `files` and their parent directories, as an uncompressed tar.
fn layer_tar(files: &[LayerFile], mtime: u64) -> Result<Vec<u8>> {
    // Every parent directory of every file, each once, in order.
    let dirs: BTreeSet<&str> = files
        .iter()
        .flat_map(|file| {
            file.path
                .match_indices('/')
                .map(|(at, _)| &file.path[..=at])
        })
        .collect();
    let mut tar = tar::Builder::new(Vec::new());
    for dir in &dirs {
        tar.append(&header(dir, 0o755, 0, mtime, true)?, std::io::empty())?;
    }
    let mut files: Vec<&LayerFile> = files.iter().collect();
    files.sort_by_key(|file| file.path);
    for file in files {
        let size = u64::try_from(file.bytes.len())?;
        tar.append(
            &header(file.path, file.mode, size, mtime, false)?,
            file.bytes.as_slice(),
        )?;
    }
    Ok(tar.into_inner()?)
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    // No name and time 0 in the gzip header; a fixed level.
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::new(6));
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

/// A layer, compressed once and usable in several images.
pub struct Layer {
    /// The digest of the uncompressed tar (the config's `diff_ids`).
    diff_id: String,
    blob: Blob,
}

impl Layer {
    /// A layer of `files` and their parent directories.
    pub fn of_files(files: &[LayerFile], mtime: u64) -> Result<Self> {
        Self::of_tar(&layer_tar(files, mtime)?)
    }

    /// A layer of a tar as it is (a root file system, say).
    pub fn of_tar(tar: &[u8]) -> Result<Self> {
        Ok(Self {
            diff_id: format!("sha256:{}", sha256(tar)),
            blob: Blob::new(MediaType::ImageLayerGzip, gzip(tar)?)?,
        })
    }
}

/// Writes the OCI archive of an image of `files` to `path`; returns the
/// manifest's digest.
pub fn write_archive(
    files: &[LayerFile],
    meta: &Metadata,
    spec: &Spec,
    path: &Path,
) -> Result<String> {
    write_layered_archive(&[&Layer::of_files(files, meta.epoch)?], meta, spec, path)
}

/// Writes the OCI archive of an image of `layers` (bottom first) to
/// `path`; returns the manifest's digest.
pub fn write_layered_archive(
    layers: &[&Layer],
    meta: &Metadata,
    spec: &Spec,
    path: &Path,
) -> Result<String> {
    let labels: HashMap<String, String> = [
        ("org.opencontainers.image.title", spec.title.as_str()),
        (
            "org.opencontainers.image.description",
            spec.description.as_str(),
        ),
        ("org.opencontainers.image.version", meta.version.as_str()),
        ("org.opencontainers.image.revision", meta.revision.as_str()),
        ("org.opencontainers.image.created", meta.created().as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let config: ImageConfiguration = ImageConfigurationBuilder::default()
        .created(meta.created())
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config({
            let mut config = ConfigBuilder::default().labels(labels.clone());
            // An empty list would still be written; absent means none.
            if !spec.entrypoint.is_empty() {
                config = config.entrypoint(spec.entrypoint.clone());
            }
            if !spec.cmd.is_empty() {
                config = config.cmd(spec.cmd.clone());
            }
            config.build()?
        })
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(
                    layers
                        .iter()
                        .map(|layer| layer.diff_id.clone())
                        .collect::<Vec<_>>(),
                )
                .build()?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created(meta.created())
                .created_by("cargo xtask image")
                .build()?,
        ])
        .build()?;
    let config = Blob::new(MediaType::ImageConfig, canonical_json(&config)?)?;
    let manifest: ImageManifest = ImageManifestBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor.clone())
        .layers(
            layers
                .iter()
                .map(|layer| layer.blob.descriptor.clone())
                .collect::<Vec<_>>(),
        )
        .annotations(labels)
        .build()?;
    let manifest = Blob::new(MediaType::ImageManifest, canonical_json(&manifest)?)?;
    let mut named = manifest.descriptor.clone();
    named.set_annotations(Some(HashMap::from([(
        "org.opencontainers.image.ref.name".to_owned(),
        spec.tag.clone(),
    )])));
    let index: ImageIndex = ImageIndexBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![named])
        .build()?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()?;

    let mut entries: Vec<(String, Vec<u8>)> = vec![
        ("oci-layout".to_owned(), canonical_json(&layout)?),
        ("index.json".to_owned(), canonical_json(&index)?),
    ];
    for blob in layers
        .iter()
        .map(|layer| &layer.blob)
        .chain([&config, &manifest])
    {
        entries.push((blob.path(), blob.bytes.clone()));
    }
    entries.sort();
    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["blobs/", "blobs/sha256/"] {
        tar.append(&header(dir, 0o755, 0, meta.epoch, true)?, std::io::empty())?;
    }
    for (name, bytes) in &entries {
        let size = u64::try_from(bytes.len())?;
        tar.append(
            &header(name, 0o644, size, meta.epoch, false)?,
            bytes.as_slice(),
        )?;
    }
    let bytes = tar.into_inner()?;
    let tmp = path.with_extension("tar.tmp");
    fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(manifest.descriptor.digest().to_string())
}

/// What an archive holds, read back and checked against its digests.
pub struct ReadBack {
    pub digest: String,
    pub config: ImageConfiguration,
    /// The layer's files: path → (mode, bytes).
    pub files: BTreeMap<String, (u32, Vec<u8>)>,
}

/// Reads an OCI archive, checking every blob against its digest and size.
pub fn read_archive(path: &Path) -> Result<ReadBack> {
    let mut entries: HashMap<String, Vec<u8>> = HashMap::new();
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    for entry in tar::Archive::new(file).entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        entries.insert(name, bytes);
    }
    let blob = |descriptor: &Descriptor| -> Result<&Vec<u8>> {
        let hex = descriptor.digest().digest();
        let bytes = entries
            .get(&format!("blobs/sha256/{hex}"))
            .with_context(|| format!("no blob {hex}"))?;
        ensure!(sha256(bytes) == hex, "blob {hex} does not match its digest");
        ensure!(
            u64::try_from(bytes.len())? == descriptor.size(),
            "blob {hex} is not {} bytes",
            descriptor.size()
        );
        Ok(bytes)
    };
    ensure!(entries.contains_key("oci-layout"), "no oci-layout file");
    let index = ImageIndex::from_reader(
        entries
            .get("index.json")
            .context("no index.json")?
            .as_slice(),
    )?;
    let [descriptor] = index.manifests().as_slice() else {
        bail!(
            "the index names {} manifests, not one",
            index.manifests().len()
        );
    };
    let manifest = ImageManifest::from_reader(blob(descriptor)?.as_slice())?;
    let config = ImageConfiguration::from_reader(blob(manifest.config())?.as_slice())?;
    let [layer] = manifest.layers().as_slice() else {
        bail!("{} layers, not one", manifest.layers().len());
    };
    let mut files = BTreeMap::new();
    let gz = flate2::read::GzDecoder::new(blob(layer)?.as_slice());
    for entry in tar::Archive::new(gz).entries()? {
        let mut entry = entry?;
        if entry.header().entry_type().is_file() {
            let name = entry.path()?.to_string_lossy().into_owned();
            let mode = entry.header().mode()?;
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            files.insert(name, (mode, bytes));
        }
    }
    Ok(ReadBack {
        digest: descriptor.digest().to_string(),
        config,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Metadata {
        Metadata {
            version: "1.2.3".to_owned(),
            revision: "abc".to_owned(),
            epoch: 1_764_633_600,
        }
    }

    fn files(body: &[u8]) -> [LayerFile; 1] {
        [LayerFile {
            path: AGENT_PATH,
            mode: 0o755,
            bytes: body.to_vec(),
        }]
    }

    #[test]
    fn the_same_inputs_give_the_same_archive_and_it_reads_back() {
        let dir = std::env::temp_dir().join(format!("svc-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let (a, b, c) = (dir.join("a.tar"), dir.join("b.tar"), dir.join("c.tar"));
        let first =
            write_archive(&files(b"agent"), &meta(), &Spec::agent(&meta()), &a).expect("first");
        let second =
            write_archive(&files(b"agent"), &meta(), &Spec::agent(&meta()), &b).expect("second");
        assert_eq!(first, second, "the same digest");
        assert_eq!(
            fs::read(&a).expect("a"),
            fs::read(&b).expect("b"),
            "the same bytes (labels live in hash maps: their order must not leak)"
        );
        let other =
            write_archive(&files(b"agent2"), &meta(), &Spec::agent(&meta()), &c).expect("third");
        assert_ne!(first, other, "another binary, another digest");

        let image = read_archive(&a).expect("reads back");
        assert_eq!(image.digest, first);
        assert_eq!(image.files[AGENT_PATH], (0o755, b"agent".to_vec()));
        let config = image.config.config().clone().expect("a config");
        assert_eq!(
            config.entrypoint().clone(),
            Some(vec![format!("/{AGENT_PATH}")])
        );
        let labels = config.labels().clone().expect("labels");
        assert_eq!(labels["org.opencontainers.image.version"], "1.2.3");
        assert_eq!(labels["org.opencontainers.image.revision"], "abc");
        assert_eq!(
            labels["org.opencontainers.image.created"],
            "2025-12-02T00:00:00Z"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn dynamic_binaries_are_refused() {
        let mut elf = vec![0u8; 0x200];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20] = 0x40; // program headers at 0x40
        elf[0x36] = 0x38; // 56 bytes each
        elf[0x38] = 1; // one
        assert!(ensure_static(&elf).is_ok(), "a PT_NULL header only");
        elf[0x40] = 3; // PT_INTERP
        assert!(ensure_static(&elf).is_err());
        assert!(ensure_static(b"#!/bin/sh").is_err());
    }
}
