//! The tc attachments, one per interface and direction, keyed by interface
//! index: a pod's veth that goes away takes its attachments (and their
//! pins) with it, and a new interface that takes an old one's name gets
//! its own, never the old one's links.
//!
//! Pinned links live under `<pin dir>/links/tc-<direction>-<name>@<index>`,
//! and the pod programs the CNI plugin attaches under
//! `<pin dir>/progs/<program>`. The agent and the plugin both attach under
//! [`LinksLock`], so an interface never carries the program twice.

use std::{
    collections::HashMap,
    fs,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
};

use super::{Error, Result};

/// Which way through an interface a program sees packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Packets the interface receives (from a pod, from the wire).
    Ingress,
    /// Packets the interface sends (into a pod).
    Egress,
}

impl Direction {
    const ALL: [Self; 2] = [Self::Ingress, Self::Egress];

    /// Prefix of this direction's link pins.
    const fn pin_prefix(self) -> &'static str {
        match self {
            Self::Ingress => "tc-ingress-",
            Self::Egress => "tc-egress-",
        }
    }

    const fn attach_type(self) -> TcAttachType {
        match self {
            Self::Ingress => TcAttachType::Ingress,
            Self::Egress => TcAttachType::Egress,
        }
    }
}

/// Where the tc link of interface `iface` (index `index`) in `direction`
/// is pinned.
pub fn pin_path(dir: &Path, direction: Direction, iface: &str, index: u32) -> PathBuf {
    dir.join("links")
        .join(format!("{}{iface}@{index}", direction.pin_prefix()))
}

/// What keeps a link: its pin (it outlives the agent), or the agent's own
/// handle (it goes with the agent). Dropping either lets go of the kernel
/// link unless a pin still holds it.
#[expect(dead_code, reason = "held for what dropping it does")]
pub enum Handle {
    Pinned(PinnedLink),
    Held(SchedClassifierLink),
}

/// One interface's attachment in one direction.
struct Attachment {
    iface: String,
    pin: Option<PathBuf>,
    _handle: Handle,
}

/// Every tc attachment this datapath made or adopted.
#[derive(Default)]
pub struct TcLinks {
    by_index: HashMap<(u32, Direction), Attachment>,
}

impl TcLinks {
    /// Whether interface `index` has an attachment in `direction` under
    /// `iface`.
    pub fn has(&self, index: u32, direction: Direction, iface: &str) -> bool {
        self.by_index
            .get(&(index, direction))
            .is_some_and(|attachment| attachment.iface == iface)
    }

    pub fn insert(
        &mut self,
        (index, direction): (u32, Direction),
        iface: &str,
        pin: Option<PathBuf>,
        handle: Handle,
    ) {
        let attachment = Attachment {
            iface: iface.to_owned(),
            pin,
            _handle: handle,
        };
        if let Some(old) = self.by_index.insert((index, direction), attachment) {
            remove_pin(old.pin.as_deref());
        }
    }

    /// Lets go of the attachments of interfaces not in `present`
    /// ((index, name) pairs), and of their pins; returns their names.
    pub fn retain_present(&mut self, present: &[(u32, String)]) -> Vec<String> {
        let mut gone = Vec::new();
        self.by_index.retain(|(index, _), attachment| {
            let here = present
                .iter()
                .any(|(i, name)| i == index && *name == attachment.iface);
            if !here {
                remove_pin(attachment.pin.as_deref());
                gone.push(attachment.iface.clone());
            }
            here
        });
        gone.sort();
        gone.dedup();
        gone
    }
}

/// Where the program `name` is pinned for the CNI plugin.
pub fn program_pin_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("progs").join(name)
}

/// An exclusive `flock` on `<pin dir>/links`, held while an attachment is
/// made or let go: the agent's interface scan and the CNI plugin may see
/// a new veth at the same moment, and two tcx links would run the
/// program twice on each packet.
pub struct LinksLock {
    _dir: OwnedFd,
}

/// How long [`LinksLock::take`] waits for the other holder.
const LOCK_WAIT: Duration = Duration::from_secs(10);

impl LinksLock {
    /// Takes the lock, creating the directory if needed; gives up after
    /// ten seconds (a holder never keeps it longer than an attach).
    pub fn take(dir: &Path) -> Result<Self> {
        let links = dir.join("links");
        let pin_error = |source| Error::Pin {
            path: links.clone(),
            source,
        };
        fs::create_dir_all(&links).map_err(pin_error)?;
        let file = fs::File::open(&links).map_err(pin_error)?;
        let fd = OwnedFd::from(file);
        let started = Instant::now();
        loop {
            // SAFETY: a descriptor we own, and flags only.
            if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self { _dir: fd });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) || started.elapsed() > LOCK_WAIT {
                return Err(pin_error(err));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Readies `iface` for translated packets. They may carry a node address
/// as their source (masquerade, hairpin), or a source the reverse path
/// does not lead back through: the kernel must accept them on ingress,
/// also where a bridge is the device they enter the stack by. It ORs
/// `all` with the device's own `accept_local`, and takes the larger of the
/// two `rp_filter`s: `all` goes to 0 (many distributions set it to 1),
/// which leaves every other device its own setting. Refuses a device
/// without an Ethernet header (WireGuard, tun, IP-in-IP): the programs
/// would read the IP header as one and could mistranslate.
pub fn prepare_iface(iface: &str) -> Result<()> {
    let link_error = |source| Error::Link {
        iface: iface.to_owned(),
        source,
    };
    let link_layer = super::netlink::link_layer(iface).map_err(link_error)?;
    if link_layer != netlink_packet_route::link::LinkLayerType::Ether {
        return Err(Error::NotEthernet {
            iface: iface.to_owned(),
            link_layer: link_layer.to_string(),
        });
    }
    set_iface_sysctl(iface, "accept_local", "1")?;
    set_iface_sysctl("all", "accept_local", "1")?;
    set_iface_sysctl("all", "rp_filter", "0")?;
    set_iface_sysctl(iface, "rp_filter", "0")?;
    if let Some(bridge) = super::netlink::controller_of(iface).map_err(link_error)? {
        set_iface_sysctl(&bridge, "rp_filter", "0")?;
    }
    Ok(())
}

fn set_iface_sysctl(iface: &str, key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys/net/ipv4/conf").join(iface).join(key);
    fs::write(&path, value).map_err(|source| Error::Sysctl { path, source })
}

/// Attaches `classifier` to `iface` in `direction`, held by this process
/// only.
pub fn attach_held(
    classifier: &mut SchedClassifier,
    program: &'static str,
    direction: Direction,
    iface: &str,
) -> Result<Handle> {
    let attach_error = |source| Error::Attach {
        program,
        iface: iface.to_owned(),
        source,
    };
    let id = classifier
        .attach(iface, direction.attach_type())
        .map_err(attach_error)?;
    let link = classifier.take_link(id).map_err(attach_error)?;
    Ok(Handle::Held(link))
}

/// Attaches `classifier` to `iface` (index `index`) in `direction` and
/// pins the link under `dir`; where a live link is pinned for this very
/// interface already (an earlier run's, the CNI plugin's), swaps the
/// program into it atomically instead, so not one packet goes
/// untranslated. Returns the pin and the handle.
pub fn attach_pinned(
    classifier: &mut SchedClassifier,
    program: &'static str,
    dir: &Path,
    (iface, index): (&str, u32),
    direction: Direction,
) -> Result<(PathBuf, Handle)> {
    let attach_error = |source| Error::Attach {
        program,
        iface: iface.to_owned(),
        source,
    };
    let _lock = LinksLock::take(dir)?;
    let path = pin_path(dir, direction, iface, index);
    if path.exists() {
        let taken = PinnedLink::from_pin(&path)
            .map(FdLink::from)
            .and_then(SchedClassifierLink::try_from);
        if let Ok(Ok(id)) = taken.map(|link| classifier.attach_to_link(link)) {
            let link = classifier.take_link(id).map_err(attach_error)?;
            return Ok((path, Handle::Held(link)));
        }
        // Its interface went away and came back: the link is dead.
        let _ = fs::remove_file(&path);
    }
    let id = classifier
        .attach(iface, direction.attach_type())
        .map_err(attach_error)?;
    let link = classifier.take_link(id).map_err(attach_error)?;
    let pinned = pin_link(link, &path)?;
    Ok((path, Handle::Pinned(pinned)))
}

/// Pins `classifier` at [`program_pin_path`], replacing what is there in
/// one step (a rename), so the CNI plugin never finds the pin missing.
pub fn publish_program(classifier: &mut SchedClassifier, dir: &Path, name: &str) -> Result<()> {
    let path = program_pin_path(dir, name);
    let pin_error = |source| Error::Pin {
        path: path.clone(),
        source,
    };
    if let Some(progs) = path.parent() {
        fs::create_dir_all(progs).map_err(pin_error)?;
    }
    // bpffs refuses dots in names.
    let staged = path.with_file_name(format!("{name}_new"));
    let _ = fs::remove_file(&staged);
    classifier
        .pin(&staged)
        .map_err(|err| pin_error(std::io::Error::other(err.to_string())))?;
    fs::rename(&staged, &path).map_err(pin_error)
}

/// The name of the program the link pinned at `path` runs, if the pin is
/// there and the link alive.
pub fn pinned_link_program(path: &Path) -> Option<String> {
    if !path.exists() {
        return None;
    }
    let id = FdLink::from(PinnedLink::from_pin(path).ok()?)
        .info()
        .ok()?
        .program_id();
    aya::programs::loaded_programs()
        .flatten()
        .find(|program| program.id() == id)
        .and_then(|program| program.name_as_str().map(str::to_owned))
}

/// Pins an attachment's link at `path`, so it outlives this process.
pub fn pin_link<L>(link: L, path: &Path) -> Result<PinnedLink>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    let pin_error = |err: String| Error::Pin {
        path: path.to_owned(),
        source: std::io::Error::other(err),
    };
    FdLink::try_from(link)
        .map_err(|err| pin_error(err.to_string()))?
        .pin(path)
        .map_err(|err| pin_error(err.to_string()))
}

fn remove_pin(pin: Option<&Path>) {
    if let Some(pin) = pin
        && let Err(err) = fs::remove_file(pin)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(pin = %pin.display(), error = %err, "cannot remove a link's pin");
    }
}

/// The link pins of interface name `iface` under `dir`, both directions,
/// with the index each names (none for the older layout).
pub fn pins_of(dir: &Path, iface: &str) -> Vec<(PathBuf, Option<u32>)> {
    let Ok(entries) = fs::read_dir(dir.join("links")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let (pinned, index) = parse_pin_name(name.to_str()?)?;
            (pinned == iface).then(|| (entry.path(), index))
        })
        .collect()
}

/// The interface name and index a link pin's file name names.
fn parse_pin_name(file_name: &str) -> Option<(&str, Option<u32>)> {
    let rest = Direction::ALL
        .iter()
        .find_map(|direction| file_name.strip_prefix(direction.pin_prefix()))?;
    Some(match rest.rsplit_once('@') {
        Some((iface, index)) => (iface, index.parse::<u32>().ok()),
        None => (rest, None),
    })
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
        let Some((iface, index)) = file_name.to_str().and_then(parse_pin_name) else {
            continue;
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
            "tc-egress-p1@7",
            "tc-ingress-p1@9",
            "tc-egress-p1@9",
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
        assert_eq!(
            removed,
            ["tc-egress-p1@7", "tc-ingress-p1@7", "tc-ingress-p2"]
        );
        assert!(
            links.join("tc-egress-p1@9").exists(),
            "a present egress pin"
        );
        assert!(links.join("cgroup-svc_connect4").exists(), "not a tc pin");
        assert_eq!(
            pin_path(&dir, Direction::Ingress, "p1", 9),
            links.join("tc-ingress-p1@9"),
            "the name and index make the pin"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
