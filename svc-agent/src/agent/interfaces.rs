//! Which interfaces carry the programs: those the patterns name, attached
//! as rtnetlink announces them and let go as they vanish.

use std::time::Duration;

use tokio::time;
use tracing::{info, warn};

use crate::datapath::{Datapath, ifaces, netlink::LinkEvents};

/// Interface name patterns (`*` as the last character matches any tail).
#[derive(Clone, Debug, Default)]
pub struct AttachPatterns {
    /// Where traffic enters from outside the node.
    pub uplinks: Vec<String>,
    /// Pods' host-side interfaces.
    pub pod_ifaces: Vec<String>,
}

/// How often the interfaces are looked at without link announcements.
const FALLBACK_EVERY: Duration = Duration::from_millis(200);
/// How often they are looked at anyway, with announcements.
const RESCAN_EVERY: Duration = Duration::from_secs(10);

/// Link changes, announced by rtnetlink. Without them (the subscription
/// failed), the interfaces are looked at every 200 ms.
pub struct Interfaces {
    patterns: AttachPatterns,
    events: Option<LinkEvents>,
    /// Looks at every interface now and then anyway.
    rescan: time::Interval,
}

impl Interfaces {
    /// Subscribes to link changes (before the first [`Interfaces::rescan`],
    /// so no interface appears unseen in between). Needs a Tokio runtime.
    #[must_use]
    pub fn watch(patterns: AttachPatterns) -> Self {
        let (events, every) = match LinkEvents::subscribe() {
            Ok(events) => (Some(events), RESCAN_EVERY),
            Err(err) => {
                warn!(error = %err, "subscribing to link changes failed; looking at interfaces every 200 ms");
                (None, FALLBACK_EVERY)
            }
        };
        Self {
            patterns,
            events,
            rescan: time::interval(every),
        }
    }

    /// Waits until the interfaces should be looked at again. Cancel-safe.
    pub async fn changed(&mut self) {
        let Some(events) = &mut self.events else {
            self.rescan.tick().await;
            return;
        };
        tokio::select! {
            result = events.changed() => {
                if let Err(err) = result {
                    warn!(error = %err, "link changes stopped; looking at interfaces every 200 ms");
                    self.events = None;
                    self.rescan = time::interval(FALLBACK_EVERY);
                    return;
                }
                // A burst (a pod's veth pair is several announcements) is
                // looked at once.
                for _ in 0..10_000 {
                    if futures::FutureExt::now_or_never(events.changed()).is_none() {
                        break;
                    }
                }
            }
            _ = self.rescan.tick() => {}
        }
    }

    /// Attaches the programs to every present interface the patterns name
    /// (or with a pinned pod link) that is not yet attached (a new one
    /// under an old name included), and lets go of the attachments of
    /// interfaces that went.
    pub fn rescan(&self, datapath: &mut Datapath) {
        let present = ifaces::interfaces();
        for (index, name) in &present {
            if datapath.is_attached(*index, name) {
                continue;
            }
            let is = |patterns: &[String]| patterns.iter().any(|p| ifaces::matches(p, name));
            let uplink = is(&self.patterns.uplinks);
            // A pod veth the CNI plugin attached is taken over (and kept
            // on this datapath's program) whatever its name.
            let pod = is(&self.patterns.pod_ifaces) || datapath.has_pod_link_pin(*index, name);
            if !(uplink || pod) {
                continue;
            }
            let (kind, result) = if uplink {
                ("uplink", datapath.attach_uplink(name))
            } else {
                ("pod interface", datapath.attach_pod(name))
            };
            match result {
                Ok(()) => info!(iface = %name, index, kind, "attached"),
                Err(err) => warn!(iface = %name, kind, error = %err, "attaching failed"),
            }
        }
        for name in datapath.detach_absent(&present) {
            info!(iface = %name, "interface gone; its attachment and pin removed");
        }
    }
}
