//! The pod programs' attachments as the CNI plugin makes them: from the
//! programs the agent pinned (`<pin dir>/progs/svc_from_pod` and
//! `svc_egress`), pinned under
//! the same names and the same lock as the agent's own, so the agent
//! takes them over as if it had made them.

use std::{fs, io, path::Path};

use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
};

use super::{
    Error, FROM_POD_PROGRAM, POD_PROGRAMS, ifaces, netlink, sys,
    tc_links::{self, Direction},
};

/// Why a pod interface could not be attached, checked or let go.
#[derive(Debug, thiserror::Error)]
pub enum PodLinkError {
    /// No agent has published its pod program under the pin directory.
    #[error("svc-proxy's datapath is not loaded on this node (no program pinned at {0})")]
    NotLoaded(String),
    #[error("interface {0} does not exist")]
    NoInterface(String),
    #[error("interface {iface}: {reason}")]
    NotAttached { iface: String, reason: String },
    #[error(transparent)]
    Datapath(#[from] Error),
}

/// The pinned pod program `name`, if an agent published one under `dir`.
fn pinned_program(dir: &Path, name: &'static str) -> Result<SchedClassifier, PodLinkError> {
    let path = tc_links::program_pin_path(dir, name);
    if !path.exists() {
        return Err(PodLinkError::NotLoaded(path.display().to_string()));
    }
    SchedClassifier::from_pin(&path)
        .map_err(|source| PodLinkError::Datapath(Error::Program { name, source }))
}

/// Whether an agent published its pod program under `dir`.
#[must_use]
pub fn is_loaded(dir: &Path) -> bool {
    tc_links::program_pin_path(dir, FROM_POD_PROGRAM).exists()
}

/// Whether `iface` is the host side of a veth pair: a pod's interface as
/// the CNI plugin receives it (a bridge the pod plugin lists is not).
pub fn is_pod_veth(iface: &str) -> Result<bool, PodLinkError> {
    netlink::is_veth(iface).map_err(|source| {
        if source.raw_os_error() == Some(libc::ENODEV) {
            PodLinkError::NoInterface(iface.to_owned())
        } else {
            PodLinkError::Datapath(Error::Link {
                iface: iface.to_owned(),
                source,
            })
        }
    })
}

/// Attaches the pinned pod programs to `iface` (egress, then ingress) and
/// pins the links, or keeps the links already pinned there (pointed at the
/// pinned programs).
pub fn attach(dir: &Path, iface: &str) -> Result<(), PodLinkError> {
    let mut programs = Vec::with_capacity(POD_PROGRAMS.len());
    for (name, direction) in POD_PROGRAMS {
        programs.push((name, direction, pinned_program(dir, name)?));
    }
    let index =
        ifaces::index_of(iface).ok_or_else(|| PodLinkError::NoInterface(iface.to_owned()))?;
    tc_links::prepare_iface(iface)?;
    for (name, direction, mut program) in programs {
        // The handle goes with this process; the pin keeps the link.
        let _attached =
            tc_links::attach_pinned(&mut program, name, dir, (iface, index), direction)?;
    }
    Ok(())
}

/// Checks that `iface` runs the pod program from a pinned link at ingress.
pub fn check(dir: &Path, iface: &str) -> Result<(), PodLinkError> {
    let program = pinned_program(dir, FROM_POD_PROGRAM)?;
    let index =
        ifaces::index_of(iface).ok_or_else(|| PodLinkError::NoInterface(iface.to_owned()))?;
    let not_attached = |reason: String| PodLinkError::NotAttached {
        iface: iface.to_owned(),
        reason,
    };
    let pin = tc_links::pin_path(dir, Direction::Ingress, iface, index);
    let link = PinnedLink::from_pin(&pin)
        .map_err(|err| not_attached(format!("no live link pinned at {}: {err}", pin.display())))?;
    let running = FdLink::from(link)
        .info()
        .map_err(|err| not_attached(err.to_string()))?
        .program_id();
    let (_, attached) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress)
        .map_err(|err| not_attached(format!("listing its tcx programs: {err}")))?;
    if !attached.iter().any(|info| info.id() == running) {
        return Err(not_attached(format!(
            "the pinned link's program {running} is not attached at its ingress"
        )));
    }
    let published = program
        .info()
        .map_err(|err| not_attached(err.to_string()))?
        .id();
    if running != published {
        return Err(not_attached(format!(
            "it runs program {running}, not the published pod program {published}"
        )));
    }
    Ok(())
}

/// Detaches the pod programs from `iface` and removes their pins, the pins
/// of earlier interfaces of that name included. Nothing attached, or no
/// such interface, is no error: a DEL may come twice, or after the pod's
/// plugin removed the veth.
pub fn detach(dir: &Path, iface: &str) -> Result<(), PodLinkError> {
    let _lock = tc_links::LinksLock::take(dir)?;
    let index = ifaces::index_of(iface);
    for (pin, pinned_index) in tc_links::pins_of(dir, iface) {
        if pinned_index.is_some() && pinned_index == index {
            match sys::link_detach(&pin) {
                Ok(()) => {}
                // Already detached (its device went), or gone.
                Err(err) if matches!(err.raw_os_error(), Some(libc::ENOLINK | libc::ENOENT)) => {}
                Err(source) => {
                    return Err(PodLinkError::Datapath(Error::Link {
                        iface: iface.to_owned(),
                        source,
                    }));
                }
            }
        }
        match fs::remove_file(&pin) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(PodLinkError::Datapath(Error::Pin { path: pin, source })),
        }
    }
    Ok(())
}

/// Removes the link pins of interfaces that no longer exist (CNI `GC`);
/// returns how many.
pub fn prune(dir: &Path) -> Result<usize, PodLinkError> {
    let _lock = tc_links::LinksLock::take(dir)?;
    let present = ifaces::interfaces();
    Ok(tc_links::prune_pins(dir, |name, index| {
        index.is_some_and(|index| present.iter().any(|(i, n)| *i == index && n == name))
    })
    .len())
}
