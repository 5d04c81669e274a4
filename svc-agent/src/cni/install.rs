//! Installing `svc-cni` on a node (the DaemonSet's init container runs
//! `svc-agent install-cni`) and removing it (`svc-agent cleanup`): the
//! binary goes into the CNI bin directory, and an entry for it at the end
//! of the `plugins` of the conflist the runtime uses, the rest of the
//! file kept as it was. Both are idempotent and every write is a rename,
//! so the runtime never reads half a file.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

use super::PLUGIN_TYPE;

/// Errors of installing or removing the plugin.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no CNI network configuration in {0}: install the pod network plugin first")]
    NoConfig(PathBuf),
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{0} is a single-plugin configuration (no \"plugins\" list): svc-cni chains only into a .conflist"
    )]
    NotAList(PathBuf),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What [`install`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// The conflist svc-cni is chained into.
    pub conflist: PathBuf,
    pub binary_written: bool,
    pub conflist_written: bool,
}

/// The configuration file the runtime uses: the first `.conf`,
/// `.conflist` or `.json` in lexical order (as libcni picks it).
pub fn active_config(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let entries = match fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(InstallError::NoConfig(conf_dir.to_owned()));
        }
        Err(err) => return Err(io_error(conf_dir)(err)),
    };
    let mut configs: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| is_network_config(path))
        .collect();
    configs.sort();
    configs
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig(conf_dir.to_owned()))
}

/// Whether `path` is a file libcni reads as a network configuration.
fn is_network_config(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| matches!(ext, "conf" | "conflist" | "json"))
}

/// Copies `plugin` into `bin_dir` as `svc-cni` and chains it into the
/// active conflist of `conf_dir` with `pin_dir`.
pub fn install(
    plugin: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    pin_dir: &Path,
) -> Result<Installed, InstallError> {
    let binary = fs::read(plugin).map_err(io_error(plugin))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    let binary_written = fs::read(&target).ok().as_deref() != Some(&binary[..]);
    if binary_written {
        fs::create_dir_all(bin_dir).map_err(io_error(bin_dir))?;
        write_replacing(&target, &binary, 0o755)?;
    }
    let conflist = active_config(conf_dir)?;
    let mut config = read_json(&conflist)?;
    let changed =
        chain(&mut config, pin_dir).ok_or_else(|| InstallError::NotAList(conflist.clone()))?;
    if changed {
        write_json(&conflist, &config)?;
    }
    Ok(Installed {
        conflist,
        binary_written,
        conflist_written: changed,
    })
}

/// Takes svc-cni out of every configuration in `conf_dir` and its binary
/// out of `bin_dir`; returns the files it changed or removed.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut touched = Vec::new();
    if let Ok(entries) = fs::read_dir(conf_dir) {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        paths.sort();
        for path in paths {
            if !is_network_config(&path) {
                continue;
            }
            // Someone else's broken file is not ours to judge.
            let Ok(mut config) = read_json(&path) else {
                continue;
            };
            if unchain(&mut config) {
                write_json(&path, &config)?;
                touched.push(path);
            }
        }
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => touched.push(binary),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_error(&binary)(err)),
    }
    Ok(touched)
}

/// Puts an svc-cni entry with `pin_dir` at the end of the conflist's
/// plugins, or updates the one there. Returns whether it changed, or
/// `None` when `config` is not a conflist.
fn chain(config: &mut Value, pin_dir: &Path) -> Option<bool> {
    let plugins = config.get_mut("plugins")?.as_array_mut()?;
    let mut entry = Map::new();
    entry.insert("type".to_owned(), Value::from(PLUGIN_TYPE));
    entry.insert(
        "pinDir".to_owned(),
        Value::from(pin_dir.to_string_lossy().into_owned()),
    );
    let entry = Value::Object(entry);
    let ours = plugins
        .iter()
        .position(|plugin| plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE));
    Some(match ours {
        Some(at) if plugins[at] == entry => false,
        Some(at) => {
            plugins[at] = entry;
            true
        }
        None => {
            plugins.push(entry);
            true
        }
    })
}

/// Removes svc-cni entries from a conflist; returns whether there were.
fn unchain(config: &mut Value) -> bool {
    let Some(plugins) = config.get_mut("plugins").and_then(Value::as_array_mut) else {
        return false;
    };
    let before = plugins.len();
    plugins.retain(|plugin| plugin.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    plugins.len() != before
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = fs::read(path).map_err(io_error(path))?;
    serde_json::from_slice(&text).map_err(|source| InstallError::Json {
        path: path.to_owned(),
        source,
    })
}

fn write_json(path: &Path, value: &Value) -> Result<(), InstallError> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|source| InstallError::Json {
        path: path.to_owned(),
        source,
    })?;
    text.push(b'\n');
    let mode = fs::metadata(path).map_or(0o644, |meta| meta.permissions().mode() & 0o7777);
    write_replacing(path, &text, mode)
}

/// Writes `bytes` to a hidden file beside `path` (an extension the runtime
/// ignores), then renames it over `path`.
fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staged = path.with_file_name(format!(".{name}.svc-cni-tmp"));
    let mut file = fs::File::create(&staged).map_err(io_error(&staged))?;
    file.write_all(bytes).map_err(io_error(&staged))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_error(&staged))?;
    file.sync_all().map_err(io_error(&staged))?;
    fs::rename(&staged, path).map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs {
        root: PathBuf,
    }

    impl Dirs {
        fn new(name: &str) -> Self {
            let root = std::env::temp_dir().join(format!("svc-cni-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("net.d")).expect("conf dir");
            fs::write(root.join("plugin"), b"\x7fELF plugin").expect("plugin");
            Self { root }
        }
        fn conf(&self) -> PathBuf {
            self.root.join("net.d")
        }
        fn bin(&self) -> PathBuf {
            self.root.join("bin")
        }
        fn install(&self) -> Result<Installed, InstallError> {
            install(
                &self.root.join("plugin"),
                &self.bin(),
                &self.conf(),
                Path::new("/sys/fs/bpf/node-a"),
            )
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    const PTP: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "podnet",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ],
  "zExtra": {"kept": true}
}"#;

    #[test]
    fn install_chains_once_keeps_the_rest_and_uninstall_undoes_it() {
        let dirs = Dirs::new("chain");
        let list = dirs.conf().join("10-podnet.conflist");
        fs::write(&list, PTP).expect("conflist");
        fs::write(dirs.conf().join("99-later.conflist"), PTP).expect("a later one");
        let first = dirs.install().expect("installs");
        assert_eq!(first.conflist, list, "the first file in lexical order");
        assert!(first.binary_written && first.conflist_written);
        let mode = fs::metadata(dirs.bin().join("svc-cni"))
            .expect("binary")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let again = dirs.install().expect("installs again");
        assert!(
            !again.binary_written && !again.conflist_written,
            "idempotent"
        );

        let config: Value = serde_json::from_slice(&fs::read(&list).expect("read")).expect("json");
        let plugins = config["plugins"].as_array().expect("plugins");
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2]["type"], "svc-cni");
        assert_eq!(plugins[2]["pinDir"], "/sys/fs/bpf/node-a");
        let original: Value = serde_json::from_str(PTP).expect("json");
        assert_eq!(
            plugins[..2],
            original["plugins"].as_array().expect("plugins")[..]
        );
        assert_eq!(config["zExtra"], original["zExtra"]);
        let text = fs::read_to_string(&list).expect("read");
        assert!(
            text.find("\"name\"") < text.find("\"plugins\""),
            "keys keep their order"
        );
        let later = fs::read_to_string(dirs.conf().join("99-later.conflist")).expect("read");
        assert_eq!(later, PTP, "other files untouched");
        assert!(
            fs::read_dir(dirs.conf())
                .expect("dir")
                .flatten()
                .all(|entry| !entry.file_name().to_string_lossy().contains("tmp")),
            "no staged files left"
        );

        let touched = uninstall(&dirs.bin(), &dirs.conf()).expect("uninstalls");
        assert_eq!(touched, [list.clone(), dirs.bin().join("svc-cni")]);
        let config: Value = serde_json::from_slice(&fs::read(&list).expect("read")).expect("json");
        assert_eq!(config, original);
        assert!(
            uninstall(&dirs.bin(), &dirs.conf())
                .expect("again")
                .is_empty()
        );
    }

    #[test]
    fn a_changed_pin_dir_is_updated_in_place() {
        let dirs = Dirs::new("update");
        let list = dirs.conf().join("10-podnet.conflist");
        let mut config: Value = serde_json::from_str(PTP).expect("json");
        config["plugins"]
            .as_array_mut()
            .expect("plugins")
            .insert(1, serde_json::json!({"type": "svc-cni", "pinDir": "/old"}));
        fs::write(&list, serde_json::to_vec(&config).expect("json")).expect("write");
        assert!(dirs.install().expect("installs").conflist_written);
        let config: Value = serde_json::from_slice(&fs::read(&list).expect("read")).expect("json");
        let plugins = config["plugins"].as_array().expect("plugins");
        assert_eq!(plugins.len(), 3, "no second entry");
        assert_eq!(plugins[1]["pinDir"], "/sys/fs/bpf/node-a");
    }

    #[test]
    fn missing_single_and_broken_configs_are_named() {
        let dirs = Dirs::new("errors");
        assert!(matches!(dirs.install(), Err(InstallError::NoConfig(_))));
        fs::write(
            dirs.conf().join("05-single.conf"),
            r#"{"cniVersion":"1.0.0","type":"bridge"}"#,
        )
        .expect("write");
        assert!(
            matches!(dirs.install(), Err(InstallError::NotAList(path)) if path.ends_with("05-single.conf"))
        );
        fs::write(dirs.conf().join("01-broken.conflist"), "{").expect("write");
        let err = dirs.install().expect_err("broken");
        assert!(err.to_string().contains("01-broken.conflist"), "{err}");
    }
}
