//! The tc attachments, one per interface, keyed by interface index: a
//! pod's veth that goes away takes its attachment (and its pin) with it,
//! and a new interface that takes an old one's name gets its own, never
//! the old one's link.
//!
//! Pinned links live under `<pin dir>/links/tc-ingress-<name>@<index>`.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use aya::programs::{links::PinnedLink, tc::SchedClassifierLink};

/// Prefix of every tc link pin.
const PIN_PREFIX: &str = "tc-ingress-";

/// Where the tc link of interface `iface` (index `index`) is pinned.
pub fn pin_path(dir: &Path, iface: &str, index: u32) -> PathBuf {
    dir.join("links")
        .join(format!("{PIN_PREFIX}{iface}@{index}"))
}

/// What keeps a link: its pin (it outlives the agent), or the agent's own
/// handle (it goes with the agent). Dropping either lets go of the kernel
/// link unless a pin still holds it.
#[expect(dead_code, reason = "held for what dropping it does")]
pub enum Handle {
    Pinned(PinnedLink),
    Held(SchedClassifierLink),
}

/// One interface's attachment.
struct Attachment {
    iface: String,
    pin: Option<PathBuf>,
    _handle: Handle,
}

/// Every tc attachment this datapath made or adopted.
#[derive(Default)]
pub struct TcLinks {
    by_index: HashMap<u32, Attachment>,
}

impl TcLinks {
    /// Whether interface `index` has an attachment under `iface`.
    pub fn has(&self, index: u32, iface: &str) -> bool {
        self.by_index
            .get(&index)
            .is_some_and(|attachment| attachment.iface == iface)
    }

    pub fn insert(&mut self, index: u32, iface: &str, pin: Option<PathBuf>, handle: Handle) {
        let attachment = Attachment {
            iface: iface.to_owned(),
            pin,
            _handle: handle,
        };
        if let Some(old) = self.by_index.insert(index, attachment) {
            remove_pin(old.pin.as_deref());
        }
    }

    /// Lets go of the attachments of interfaces not in `present`
    /// ((index, name) pairs), and of their pins; returns their names.
    pub fn retain_present(&mut self, present: &[(u32, String)]) -> Vec<String> {
        let mut gone = Vec::new();
        self.by_index.retain(|index, attachment| {
            let here = present
                .iter()
                .any(|(i, name)| i == index && *name == attachment.iface);
            if !here {
                remove_pin(attachment.pin.as_deref());
                gone.push(attachment.iface.clone());
            }
            here
        });
        gone
    }
}

fn remove_pin(pin: Option<&Path>) {
    if let Some(pin) = pin
        && let Err(err) = fs::remove_file(pin)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(pin = %pin.display(), error = %err, "cannot remove a link's pin");
    }
}

/// Removes the tc link pins under `dir` that `keep` (given each pin's
/// interface name and index, none for the older layout without one)
/// rejects. Returns the pins removed.
pub fn prune_pins(dir: &Path, keep: impl Fn(&str, Option<u32>) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir.join("links")) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name
            .to_str()
            .and_then(|name| name.strip_prefix(PIN_PREFIX))
        else {
            continue;
        };
        let (iface, index) = match rest.rsplit_once('@') {
            Some((iface, index)) => (iface, index.parse::<u32>().ok()),
            None => (rest, None),
        };
        if keep(iface, index) {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(err) => {
                tracing::warn!(pin = %path.display(), error = %err, "cannot remove a stale link pin");
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_of_absent_interfaces_and_of_the_old_layout_are_pruned() {
        let dir = std::env::temp_dir().join(format!("svc-tc-pins-{}", std::process::id()));
        let links = dir.join("links");
        fs::create_dir_all(&links).expect("dir");
        for name in [
            "tc-ingress-p1@7",
            "tc-ingress-p1@9",
            "tc-ingress-p2",
            "tc-ingress-eth0@2",
            "cgroup-svc_connect4",
        ] {
            fs::write(links.join(name), "").expect("pin stand-in");
        }
        let present = [(9, "p1"), (2, "eth0")];
        let mut removed: Vec<String> = prune_pins(&dir, |iface, index| {
            index.is_some_and(|index| present.contains(&(index, iface)))
        })
        .iter()
        .filter_map(|path| Some(path.file_name()?.to_str()?.to_owned()))
        .collect();
        removed.sort();
        assert_eq!(removed, ["tc-ingress-p1@7", "tc-ingress-p2"]);
        assert!(links.join("cgroup-svc_connect4").exists(), "not a tc pin");
        assert_eq!(
            pin_path(&dir, "p1", 9),
            links.join("tc-ingress-p1@9"),
            "the name and index make the pin"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
