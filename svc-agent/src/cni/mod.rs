//! `svc-cni`, the CNI plugin chained after the pod network plugin: on ADD
//! it attaches the pod program to the pod's host-side veth before the pod
//! starts, so the pod's first packet to a ClusterIP is translated.
//!
//! It works from the pins (no socket to the agent): the agent pins its pod
//! program under `<pin dir>/progs/` once its first sync is applied, and the
//! plugin attaches that program and pins the link where the agent's own
//! would be, under the same lock; the agent takes those links over like
//! its own (and swaps its program into them when it is upgraded). A node
//! where no agent ever published a program fails ADD with code 11 ("try
//! again later"): the kubelet retries the pod.
//!
//! The protocol (CNI spec 1.1.0, also 0.4.0 and 1.0.0) is small and the
//! plugin must hand `prevResult` on unchanged, so it is spoken here on
//! plain JSON values rather than through a typed crate that would re-shape
//! the result.

pub mod install;

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::datapath::{DEFAULT_PIN_DIR, pod_links};

/// The plugin's `type` in a conflist, and its binary's name.
pub const PLUGIN_TYPE: &str = "svc-cni";

/// The CNI versions this plugin speaks (0.4.0 brought CHECK).
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// Error codes of the CNI spec, and this plugin's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// CHECK: the pod's interface does not run the pod program.
    pub const NOT_ATTACHED: u32 = 100;
}

/// A CNI error result (printed on stdout, with a non-zero exit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// An error of `code` in the newest version's format (`run` sets the
    /// configuration's version).
    #[must_use]
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: "1.1.0".to_owned(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    #[must_use]
    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

/// The plugin's own entry in the conflist, as the runtime hands it over
/// (the list's `cniVersion` and `name` added, `prevResult` from the plugin
/// before).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    pin_dir: Option<PathBuf>,
    #[serde(default)]
    prev_result: Option<Value>,
}

/// The variables the runtime sets (`CNI_COMMAND`, `CNI_IFNAME`, ...).
pub type Env = BTreeMap<String, String>;

/// What a call prints on success.
pub type Output = Option<Value>;

/// Runs one plugin call: `stdin` is the network configuration, `env` the
/// `CNI_*` variables. Never panics on what it is handed.
pub fn run(stdin: &[u8], env: &Env) -> Result<Output, CniError> {
    let command = env
        .get("CNI_COMMAND")
        .map(String::as_str)
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"))?;
    if command == "VERSION" {
        return Ok(Some(serde_json::json!({
            "cniVersion": "1.1.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|err| {
        CniError::new(
            code::DECODE,
            "the network configuration on stdin is not valid JSON for svc-cni",
        )
        .details(err.to_string())
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {} is not supported (svc-cni speaks {})",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let pin_dir = conf
        .pin_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));
    let result = match command {
        "ADD" => add(&conf, &pin_dir, env),
        "DEL" => del(&conf, &pin_dir, env),
        "CHECK" => check(&conf, &pin_dir, env),
        "STATUS" => status(&pin_dir),
        "GC" => gc(&pin_dir),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
        )),
    };
    result.map_err(|mut err| {
        err.cni_version.clone_from(&conf.cni_version);
        err
    })
}

/// The variables ADD, DEL and CHECK need.
fn require_env(env: &Env, command: &str) -> Result<(), CniError> {
    for name in ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"] {
        if env.get(name).is_none_or(String::is_empty) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("{name} is not set: a {command} needs it"),
            ));
        }
    }
    Ok(())
}

/// The host-side interfaces `prevResult` lists (those without a
/// `sandbox`): the pod's veth, and a bridge with some plugins.
fn host_interfaces(prev_result: &Value) -> Result<Vec<String>, CniError> {
    let invalid = |why: &str| CniError::new(code::INVALID_CONFIG, format!("prevResult {why}"));
    let Some(interfaces) = prev_result.get("interfaces") else {
        return Ok(Vec::new());
    };
    let interfaces = interfaces
        .as_array()
        .ok_or_else(|| invalid("has interfaces that are not a list"))?;
    let mut names = Vec::new();
    for interface in interfaces {
        let name = interface
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("lists an interface without a name"))?;
        let in_sandbox = interface
            .get("sandbox")
            .and_then(Value::as_str)
            .is_some_and(|sandbox| !sandbox.is_empty());
        if !in_sandbox {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// The pod veths among the host-side interfaces `prevResult` lists.
fn pod_veths(prev_result: &Value) -> Result<Vec<String>, CniError> {
    let mut veths = Vec::new();
    for name in host_interfaces(prev_result)? {
        match pod_links::is_pod_veth(&name) {
            Ok(true) => veths.push(name),
            Ok(false) => {}
            Err(err @ pod_links::PodLinkError::NoInterface(_)) => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("prevResult names a host interface that is not here: {err}"),
                ));
            }
            Err(err) => return Err(pod_link_error(&err)),
        }
    }
    Ok(veths)
}

fn pod_link_error(err: &pod_links::PodLinkError) -> CniError {
    use pod_links::PodLinkError as E;
    let code = match err {
        E::NotLoaded(_) => code::TRY_AGAIN_LATER,
        E::NoInterface(_) => code::INVALID_CONFIG,
        E::NotAttached { .. } => code::NOT_ATTACHED,
        E::Datapath(_) => code::IO_FAILURE,
    };
    let details = std::error::Error::source(err)
        .map(ToString::to_string)
        .unwrap_or_default();
    CniError::new(code, err.to_string()).details(details)
}

fn add(conf: &NetConf, pin_dir: &std::path::Path, env: &Env) -> Result<Output, CniError> {
    require_env(env, "ADD")?;
    let prev_result = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "no prevResult: svc-cni must be chained after the plugin that creates the pod's interface",
        )
    })?;
    let veths = pod_veths(prev_result)?;
    if veths.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult lists no host-side veth: svc-cni attaches to the host side of a pod's veth pair",
        ));
    }
    for veth in &veths {
        pod_links::attach(pin_dir, veth).map_err(|err| pod_link_error(&err))?;
    }
    let mut result = prev_result.clone();
    if let Some(object) = result.as_object_mut() {
        object
            .entry("cniVersion")
            .or_insert_with(|| Value::String(conf.cni_version.clone()));
    }
    Ok(Some(result))
}

fn del(conf: &NetConf, pin_dir: &std::path::Path, env: &Env) -> Result<Output, CniError> {
    require_env(env, "DEL")?;
    // Without the cached result there is nothing to name; the agent lets
    // go of pins whose interface went.
    let Some(prev_result) = &conf.prev_result else {
        return Ok(None);
    };
    for name in host_interfaces(prev_result)? {
        pod_links::detach(pin_dir, &name).map_err(|err| pod_link_error(&err))?;
    }
    Ok(None)
}

fn check(conf: &NetConf, pin_dir: &std::path::Path, env: &Env) -> Result<Output, CniError> {
    require_env(env, "CHECK")?;
    let prev_result = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK without a prevResult"))?;
    let veths = pod_veths(prev_result)?;
    if veths.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult lists no host-side veth to check",
        ));
    }
    for veth in &veths {
        pod_links::check(pin_dir, veth).map_err(|err| pod_link_error(&err))?;
    }
    Ok(None)
}

fn status(pin_dir: &std::path::Path) -> Result<Output, CniError> {
    if pod_links::is_loaded(pin_dir) {
        Ok(None)
    } else {
        Err(CniError::new(
            code::NOT_AVAILABLE,
            format!(
                "svc-proxy's datapath is not loaded on this node (no program pinned under {})",
                pin_dir.display()
            ),
        ))
    }
}

fn gc(pin_dir: &std::path::Path) -> Result<Output, CniError> {
    pod_links::prune(pin_dir).map_err(|err| pod_link_error(&err))?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> Env {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", "/var/run/netns/pod"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn code_of(result: Result<Output, CniError>) -> (u32, String) {
        let err = result.expect_err("an error");
        (err.code, err.msg)
    }

    #[test]
    fn version_lists_what_it_speaks() {
        let out = run(b"", &env("VERSION")).expect("VERSION").expect("output");
        assert_eq!(out["supportedVersions"][2], "1.1.0");
    }

    #[test]
    fn bad_input_gets_the_spec_codes() {
        assert_eq!(code_of(run(b"{", &env("ADD"))).0, code::DECODE);
        assert_eq!(code_of(run(b"[1]", &env("ADD"))).0, code::DECODE);
        assert_eq!(
            code_of(run(b"{}", &env("ADD"))).0,
            code::DECODE,
            "no cniVersion"
        );
        let conf = br#"{"cniVersion":"9.9.9","name":"n","type":"svc-cni"}"#;
        assert_eq!(
            code_of(run(conf, &env("ADD"))).0,
            code::INCOMPATIBLE_VERSION
        );
        let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"svc-cni"}"#;
        let (code, msg) = code_of(run(conf, &env("ADD")));
        assert_eq!(code, code::INVALID_CONFIG);
        assert!(msg.contains("prevResult"), "{msg}");
        let mut no_ifname = env("ADD");
        no_ifname.remove("CNI_IFNAME");
        assert_eq!(code_of(run(conf, &no_ifname)).0, code::INVALID_ENV);
        assert_eq!(code_of(run(conf, &Env::new())).0, code::INVALID_ENV);
        assert_eq!(code_of(run(conf, &env("FROB"))).0, code::INVALID_ENV);
        let bad_prev =
            br#"{"cniVersion":"1.0.0","name":"n","type":"svc-cni","prevResult":{"interfaces":7}}"#;
        assert_eq!(code_of(run(bad_prev, &env("ADD"))).0, code::INVALID_CONFIG);
        let nameless = br#"{"cniVersion":"1.0.0","name":"n","type":"svc-cni","prevResult":{"interfaces":[{"mac":"00:11:22:33:44:55"}]}}"#;
        assert_eq!(code_of(run(nameless, &env("ADD"))).0, code::INVALID_CONFIG);
    }

    #[test]
    fn the_error_carries_the_configured_version() {
        let conf = br#"{"cniVersion":"0.4.0","name":"n","type":"svc-cni"}"#;
        let err = run(conf, &env("ADD")).expect_err("no prevResult");
        assert_eq!(err.cni_version, "0.4.0");
        let json = serde_json::to_value(&err).expect("serialises");
        assert_eq!(json["code"], code::INVALID_CONFIG);
        assert!(json.get("details").is_none(), "empty details are left out");
    }

    #[test]
    fn only_host_side_interfaces_are_considered() {
        let prev: Value = serde_json::from_str(
            r#"{"interfaces":[{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/var/run/netns/p"}]}"#,
        )
        .expect("json");
        assert_eq!(host_interfaces(&prev).expect("valid"), ["cni0", "veth1"]);
        assert!(
            host_interfaces(&serde_json::json!({}))
                .expect("valid")
                .is_empty()
        );
    }

    #[test]
    fn a_del_without_prev_result_is_done() {
        let conf = br#"{"cniVersion":"1.1.0","name":"n","type":"svc-cni"}"#;
        assert_eq!(run(conf, &env("DEL")), Ok(None));
    }
}
