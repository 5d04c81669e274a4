//! From source events to a desired state worth applying: one [`Source`]
//! abstraction over the Kubernetes API and a manifest directory, and the
//! [`Reconciler`] that decides, batch by batch, which services to
//! translate again and whether the result may be applied. No I/O and no
//! datapath here, so every rule (readiness gating, what a relist or a node
//! change re-derives, what the flags fix) is tested without root.

use std::{collections::BTreeSet, future::Future, net::Ipv4Addr, time::Instant};

use tracing::{info, warn};

use crate::{
    datapath::Ipv4Cidr,
    model::{Desired, Inputs, ObjectKey, Problem, Translator},
};

/// What a batch of source events asks of the translation.
#[derive(Debug, Default)]
#[expect(clippy::struct_excessive_bools, reason = "one per thing to read again")]
pub struct Dirty {
    /// Services whose objects (or slices) changed.
    pub services: BTreeSet<ObjectKey>,
    /// Re-derive every service (after a relist).
    pub all: bool,
    /// Read this node's facts again.
    pub node: bool,
    /// Read the service CIDRs again.
    pub service_cidrs: bool,
    /// The source's own problems may have changed (a file that stopped
    /// or started parsing): apply, so they are said and counted.
    pub problems: bool,
    /// Watches that failed (they retry), for the log and the metrics.
    pub failures: Vec<Failure>,
}

/// A watch that failed, or a kind the source goes on without.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What was watched (`Service`, `EndpointSlice`, ...).
    pub what: &'static str,
    pub error: String,
}

/// One batch: what changed, and when its first event was seen.
#[derive(Debug)]
pub struct Batch {
    pub started: Instant,
    pub dirty: Dirty,
}

/// What the source says of this node (its Node object).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub addrs: Vec<Ipv4Addr>,
    pub zone: Option<String>,
    pub pod_cidrs: Vec<Ipv4Cidr>,
    /// Not being deleted nor tainted for deletion by the cluster
    /// autoscaler: kube-proxy's node eligibility, which `/healthz` reports.
    pub eligible: bool,
}

/// Where the objects come from: the Kubernetes API
/// ([`crate::source::kube::KubeSource`]) or a manifest directory
/// ([`crate::source::manifests::ManifestSource`]).
pub trait Source {
    /// The objects of one round, as [`Inputs`] of the translation.
    type Inputs<'a>: Inputs
    where
        Self: 'a;

    /// Waits for the next batch of changes. Cancel-safe: a batch being
    /// gathered when the future is dropped is kept for the next call.
    /// Never resolves once the source can say nothing more.
    fn changed(&mut self) -> impl Future<Output = Batch>;

    /// Everything has been read once: the desired state is whole and may
    /// be applied (before, applying would remove what an earlier agent
    /// installed).
    fn ready(&self) -> bool;

    /// Every service the source holds.
    fn service_keys(&self) -> Vec<ObjectKey>;

    /// The services `keys` and their slices, as of now.
    fn inputs<'a>(&'a self, keys: &BTreeSet<ObjectKey>) -> Self::Inputs<'a>;

    /// This node's facts; `None` when the source has no Node for it (gone,
    /// or a source without nodes).
    fn node(&self) -> Option<NodeFacts>;

    /// The cluster's service CIDRs; `None` when the source has none.
    fn service_cidrs(&self) -> Option<Vec<Ipv4Cidr>>;

    /// What the source itself could not read, naming the object or file.
    fn problems(&self) -> Vec<Problem>;
}

/// What the flags fixed: the Node object and the `ServiceCIDR` objects do
/// not change it.
#[derive(Clone, Copy, Debug, Default)]
#[expect(clippy::struct_excessive_bools, reason = "one per flag")]
pub struct Fixed {
    pub addrs: bool,
    pub zone: bool,
    pub pod_cidrs: bool,
    pub service_cidrs: bool,
}

/// One round to apply: the translator's desired state changed (or may
/// have) and the source is ready.
#[derive(Debug)]
pub struct Round {
    /// When the batch's first event was seen (for the sync latency).
    pub started: Instant,
    /// Services translated again.
    pub translated: usize,
    /// The source's and the translation's problems.
    pub problems: Vec<Problem>,
}

/// Keeps the translator in step with a [`Source`].
#[derive(Debug)]
pub struct Reconciler {
    translator: Translator,
    fixed: Fixed,
    /// A round has been handed out: from then on only what changed is
    /// translated.
    synced: bool,
}

impl Reconciler {
    #[must_use]
    pub const fn new(translator: Translator, fixed: Fixed) -> Self {
        Self {
            translator,
            fixed,
            synced: false,
        }
    }

    /// The desired state as of the last round.
    #[must_use]
    pub const fn desired(&self) -> &Desired {
        self.translator.desired()
    }

    #[must_use]
    pub const fn translator(&self) -> &Translator {
        &self.translator
    }

    /// A round has been handed out.
    #[must_use]
    pub const fn synced(&self) -> bool {
        self.synced
    }

    /// Folds `batch` into the translation. Returns a round to apply, or
    /// `None` when nothing the datapath holds changed or the source is not
    /// ready yet (what the batch said of the node and the CIDRs is kept;
    /// the first round re-derives every service).
    pub fn reconcile(&mut self, source: &impl Source, batch: Batch) -> Option<Round> {
        let Batch { started, dirty } = batch;
        for failure in &dirty.failures {
            warn!(what = failure.what, error = %failure.error, "watch failed (it retries and relists) or is unavailable");
        }
        // A new zone or address changes what topology hints and source
        // ranges keep: everything again.
        let node_changed = dirty.node && self.node(source);
        let cidrs_changed = (dirty.service_cidrs || !self.synced)
            && !self.fixed.service_cidrs
            && source
                .service_cidrs()
                .is_some_and(|cidrs| self.translator.set_service_cidrs(cidrs));
        if cidrs_changed {
            info!(cidrs = %join(&self.translator.desired().service_cidrs), "service CIDRs from the cluster's ServiceCIDRs");
        }
        if !source.ready() {
            return None;
        }
        let keys: BTreeSet<ObjectKey> = if dirty.all || !self.synced || node_changed {
            // A relist may have dropped services whose deletion was never
            // seen: the translator's own keys are re-derived too.
            let mut keys: BTreeSet<ObjectKey> = source.service_keys().into_iter().collect();
            keys.extend(self.translator.service_keys().cloned());
            keys
        } else if dirty.services.is_empty() && !dirty.node && !cidrs_changed && !dirty.problems {
            return None;
        } else {
            dirty.services
        };
        let translated = keys.len();
        let inputs = source.inputs(&keys);
        self.translator.update(keys, &inputs);
        self.synced = true;
        let mut problems = source.problems();
        problems.extend(self.translator.problems());
        Some(Round {
            started,
            translated,
            problems,
        })
    }

    /// Takes this node's addresses, zone and pod CIDRs from the source,
    /// where no flag fixed them. Returns whether the addresses or the zone
    /// changed.
    fn node(&mut self, source: &impl Source) -> bool {
        let Some(facts) = source.node() else {
            warn!("this node's Node object is gone; keeping its last addresses and zone");
            return false;
        };
        let current = self.translator.node().clone();
        let addrs = if self.fixed.addrs {
            current.addrs.clone()
        } else {
            facts.addrs
        };
        let zone = if self.fixed.zone {
            current.zone.clone()
        } else {
            facts.zone
        };
        if addrs != current.addrs || zone != current.zone {
            info!(?addrs, ?zone, "this node's addresses or zone changed");
        }
        if !self.fixed.pod_cidrs && self.translator.set_pod_cidrs(facts.pod_cidrs.clone()) {
            info!(cidrs = %join(&facts.pod_cidrs), "this node's pod CIDRs");
        }
        self.translator.set_node(addrs, zone)
    }
}

/// `items` comma-separated, for the log.
pub fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

    use super::*;
    use crate::{
        datapath::Frontend,
        model::{NodeInfo, Settings, slice_service},
    };

    fn yaml<K: serde::de::DeserializeOwned>(text: &str) -> K {
        serde_yaml_ng::from_str(text).expect("fixture parses")
    }

    fn key(name: &str) -> ObjectKey {
        ("ns".to_owned(), name.to_owned())
    }

    /// A source holding plain objects, as the test sets them.
    #[derive(Default)]
    struct Fake {
        ready: bool,
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
        node: Option<NodeFacts>,
        service_cidrs: Option<Vec<Ipv4Cidr>>,
    }

    impl Fake {
        /// Service `name` at ClusterIP 10.96.0.`n`:80 with one endpoint.
        fn add(&mut self, name: &str, n: u8) {
            self.services.push(yaml(&format!(
                "metadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: 10.96.0.{n}, ports: [{{port: 80}}]}}\n"
            )));
            self.slices.push(yaml(&format!(
                "metadata: {{name: {name}-1, namespace: ns, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [10.244.0.{n}]}}]\nports: [{{port: 8080}}]\n"
            )));
        }

        fn remove(&mut self, name: &str) {
            self.services
                .retain(|s| s.metadata.name.as_deref() != Some(name));
        }
    }

    impl Inputs for Fake {
        fn service(&self, key: &ObjectKey) -> Option<&Service> {
            self.services.iter().find(|s| {
                s.metadata.namespace.as_deref() == Some(&key.0)
                    && s.metadata.name.as_deref() == Some(&key.1)
            })
        }

        fn slices(&self, key: &ObjectKey) -> Vec<&EndpointSlice> {
            self.slices
                .iter()
                .filter(|slice| slice_service(slice).ok() == Some((&key.0, &key.1)))
                .collect()
        }
    }

    impl Source for Fake {
        type Inputs<'a> = &'a Self;

        async fn changed(&mut self) -> Batch {
            std::future::pending().await
        }

        fn ready(&self) -> bool {
            self.ready
        }

        fn service_keys(&self) -> Vec<ObjectKey> {
            self.services
                .iter()
                .map(|s| {
                    (
                        s.metadata.namespace.clone().unwrap_or_default(),
                        s.metadata.name.clone().unwrap_or_default(),
                    )
                })
                .collect()
        }

        fn inputs<'a>(&'a self, _keys: &BTreeSet<ObjectKey>) -> &'a Self {
            self
        }

        fn node(&self) -> Option<NodeFacts> {
            self.node.clone()
        }

        fn service_cidrs(&self) -> Option<Vec<Ipv4Cidr>> {
            self.service_cidrs.clone()
        }

        fn problems(&self) -> Vec<Problem> {
            Vec::new()
        }
    }

    fn batch(dirty: Dirty) -> Batch {
        Batch {
            started: Instant::now(),
            dirty,
        }
    }

    fn services(names: &[&str]) -> Dirty {
        Dirty {
            services: names.iter().map(|name| key(name)).collect(),
            ..Dirty::default()
        }
    }

    fn reconciler(addrs: &[Ipv4Addr], fixed: Fixed) -> Reconciler {
        let node = NodeInfo {
            name: "n1".to_owned(),
            addrs: addrs.to_vec(),
            ..NodeInfo::default()
        };
        Reconciler::new(Translator::new(node, Settings::default()), fixed)
    }

    fn cluster_ip(n: u8) -> Frontend {
        Frontend::tcp(Ipv4Addr::new(10, 96, 0, n), 80)
    }

    #[test]
    fn nothing_is_applied_before_the_source_is_ready_and_the_first_round_takes_everything() {
        let mut source = Fake::default();
        source.add("a", 1);
        source.add("b", 2);
        let mut reconciler = reconciler(&[], Fixed::default());
        assert!(
            reconciler
                .reconcile(&source, batch(services(&["a"])))
                .is_none(),
            "a partial view must not be applied: it would remove what an earlier agent installed"
        );
        assert!(!reconciler.synced());

        source.ready = true;
        // The batch that makes the source ready may name nothing itself.
        let round = reconciler
            .reconcile(&source, batch(Dirty::default()))
            .expect("the first ready batch is a round");
        assert_eq!(round.translated, 2, "every service is translated");
        assert!(reconciler.synced());
        let frontends: Vec<Frontend> = reconciler.desired().frontends.keys().copied().collect();
        assert_eq!(frontends, [cluster_ip(1), cluster_ip(2)]);
    }

    #[test]
    fn only_what_changed_is_translated_and_a_quiet_batch_is_no_round() {
        let mut source = Fake {
            ready: true,
            ..Fake::default()
        };
        source.add("a", 1);
        source.add("b", 2);
        let mut reconciler = reconciler(&[], Fixed::default());
        reconciler
            .reconcile(&source, batch(Dirty::default()))
            .expect("first round");

        let failures_only = Dirty {
            failures: vec![Failure {
                what: "Service",
                error: "connection refused".to_owned(),
            }],
            ..Dirty::default()
        };
        assert!(
            reconciler
                .reconcile(&source, batch(failures_only))
                .is_none(),
            "a failed watch changes nothing by itself"
        );

        source.remove("b");
        let round = reconciler
            .reconcile(&source, batch(services(&["b"])))
            .expect("a changed service is a round");
        assert_eq!(round.translated, 1);
        assert!(!reconciler.desired().frontends.contains_key(&cluster_ip(2)));
        assert!(reconciler.desired().frontends.contains_key(&cluster_ip(1)));
    }

    #[test]
    fn a_relist_drops_services_whose_deletion_was_missed() {
        let mut source = Fake {
            ready: true,
            ..Fake::default()
        };
        source.add("a", 1);
        source.add("b", 2);
        let mut reconciler = reconciler(&[], Fixed::default());
        reconciler
            .reconcile(&source, batch(Dirty::default()))
            .expect("first round");
        // b is gone from the source, and no event said so.
        source.remove("b");
        let relist = Dirty {
            all: true,
            ..Dirty::default()
        };
        let round = reconciler
            .reconcile(&source, batch(relist))
            .expect("a relist is a round");
        assert_eq!(
            round.translated, 2,
            "the source's keys and the translator's own"
        );
        let frontends: Vec<Frontend> = reconciler.desired().frontends.keys().copied().collect();
        assert_eq!(frontends, [cluster_ip(1)]);
    }

    #[test]
    fn node_facts_apply_where_no_flag_fixed_them() {
        let flag_addr = Ipv4Addr::new(192, 168, 0, 9);
        let node_addr = Ipv4Addr::new(192, 168, 0, 5);
        let pod_cidr: Ipv4Cidr = "10.244.1.0/24".parse().expect("a CIDR");
        let mut source = Fake {
            ready: true,
            node: Some(NodeFacts {
                addrs: vec![node_addr],
                zone: Some("z1".to_owned()),
                pod_cidrs: vec![pod_cidr],
                eligible: true,
            }),
            ..Fake::default()
        };
        source.add("a", 1);
        let node_changed = || Dirty {
            node: true,
            ..Dirty::default()
        };

        let mut free = reconciler(&[], Fixed::default());
        free.reconcile(&source, batch(Dirty::default()))
            .expect("first round");
        let round = free
            .reconcile(&source, batch(node_changed()))
            .expect("new node addresses are a round");
        assert_eq!(
            round.translated, 1,
            "a new address or zone re-derives every service"
        );
        assert_eq!(free.desired().node_addrs, [node_addr]);
        assert_eq!(free.translator().node().zone.as_deref(), Some("z1"));
        assert_eq!(free.translator().node().pod_cidrs, [pod_cidr]);

        let fixed = Fixed {
            addrs: true,
            ..Fixed::default()
        };
        let mut pinned = reconciler(&[flag_addr], fixed);
        pinned
            .reconcile(&source, batch(Dirty::default()))
            .expect("first round");
        pinned
            .reconcile(&source, batch(node_changed()))
            .expect("the zone changed: a round");
        assert_eq!(pinned.desired().node_addrs, [flag_addr], "--node-addr wins");
        assert_eq!(pinned.translator().node().zone.as_deref(), Some("z1"));

        // The Node object vanishes: the last facts are kept.
        source.node = None;
        free.reconcile(&source, batch(node_changed()));
        assert_eq!(free.desired().node_addrs, [node_addr]);
    }

    #[test]
    fn service_cidrs_come_from_the_source_unless_a_flag_gave_them() {
        let cidr: Ipv4Cidr = "10.96.0.0/16".parse().expect("a CIDR");
        let flag: Ipv4Cidr = "10.100.0.0/16".parse().expect("a CIDR");
        let mut source = Fake {
            ready: true,
            service_cidrs: Some(vec![cidr]),
            ..Fake::default()
        };
        let mut free = reconciler(&[], Fixed::default());
        free.reconcile(&source, batch(Dirty::default()))
            .expect("first round");
        assert_eq!(free.desired().service_cidrs, [cidr]);

        let mut node = Translator::new(NodeInfo::default(), Settings::default());
        node.set_service_cidrs(vec![flag]);
        let mut pinned = Reconciler::new(
            node,
            Fixed {
                service_cidrs: true,
                ..Fixed::default()
            },
        );
        pinned
            .reconcile(&source, batch(Dirty::default()))
            .expect("first round");
        assert_eq!(pinned.desired().service_cidrs, [flag]);

        source.service_cidrs = Some(Vec::new());
        let changed = || Dirty {
            service_cidrs: true,
            ..Dirty::default()
        };
        assert!(
            free.reconcile(&source, batch(changed())).is_some(),
            "removed service CIDRs are a round"
        );
        assert!(free.desired().service_cidrs.is_empty());
        assert!(
            pinned.reconcile(&source, batch(changed())).is_none(),
            "fixed service CIDRs ignore the cluster's"
        );
    }
}
