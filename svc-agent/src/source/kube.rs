//! The Kubernetes API as the source of truth: a watcher and a reflector
//! store for Services, EndpointSlices and this node's Node. The watch tasks
//! only report which services an event touched; the agent rebuilds those
//! services from the stores (level-triggered), and every relist (`InitDone`)
//! re-derives everything, so a missed `Delete` is collected there.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    future::Future,
    hash::BuildHasher as _,
    net::Ipv4Addr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        utils::Backoff,
        watcher,
    },
};
use tokio::{sync::mpsc, time};

use crate::{
    datapath::Ipv4Cidr,
    model::{Inputs, ObjectKey, Problem, slice_service},
    reconcile::{Batch, Dirty, Failure, NodeFacts, Source},
    tasks::{Task, Tasks},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (in-cluster or KUBECONFIG): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A client from `kubeconfig`, else the in-cluster configuration or
/// `KUBECONFIG` (kube's usual inference).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.display().to_string(),
                source,
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => Config::infer().await?,
    };
    Client::try_from(config).map_err(Error::Client)
}

/// Which watch a [`Change`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
}

impl Kind {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
            Self::ServiceCidr => "ServiceCIDR",
        }
    }

    /// Its watch, as a supervised task: every watch is essential (a dead
    /// one would freeze what it feeds).
    const fn task(self) -> Task {
        let name = match self {
            Self::Service => "watch of Services",
            Self::EndpointSlice => "watch of EndpointSlices",
            Self::Node => "watch of this Node",
            Self::ServiceCidr => "watch of ServiceCIDRs",
        };
        Task {
            name,
            essential: true,
        }
    }
}

/// Every kind the agent watches; all are listed before anything is
/// applied.
const KINDS: usize = 4;

/// What one watch event means to the agent; the objects themselves stay in
/// the stores.
#[derive(Debug)]
pub enum Change {
    /// A service was added, changed or deleted.
    Service(ObjectKey),
    /// A slice (namespace, slice name) was added or changed and now serves
    /// `service` (`None`: no service the translation reads).
    Slice {
        slice: ObjectKey,
        service: Option<ObjectKey>,
    },
    SliceDeleted(ObjectKey),
    /// This node's object changed.
    Node,
    /// A `ServiceCIDR` changed.
    ServiceCidrs,
    /// The kind cannot be watched (the API server lacks it, or the
    /// identity may not read it): the agent goes on without it.
    Unavailable {
        kind: Kind,
        reason: String,
    },
    /// A (re)list finished: the store holds exactly what the API server
    /// has.
    Listed(Kind),
    /// The watch failed; it retries with backoff and relists.
    Failed {
        kind: Kind,
        error: String,
    },
}

/// The stores, and which service each slice serves.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    service_cidrs: Store<ServiceCIDR>,
    node_name: String,
    /// The service each slice serves, as of the last event for it.
    slice_owner: HashMap<ObjectKey, ObjectKey>,
    /// The slices serving each service.
    by_service: HashMap<ObjectKey, BTreeSet<String>>,
    /// The kinds listed at least once.
    listed: HashSet<Kind>,
    /// The watches' changes.
    changes: mpsc::Receiver<Change>,
    /// Quiet time that ends a batch.
    debounce: Duration,
    /// The batch being gathered, and when its first change came: kept
    /// here so that [`Source::changed`] is cancel-safe.
    pending: Dirty,
    /// On Tokio's clock, which tests can pause.
    started: Option<time::Instant>,
}

/// Retry delays of a failed watch: doubling from 250 ms to 4 s with
/// jitter, back to the start once the watch delivers again. A node proxy
/// wants its view back within seconds of an API server restart; the
/// jitter keeps a fleet of agents from reconnecting in step. (kube's
/// default grows to 30 s and restarts from the bottom only after two quiet
/// minutes, so a second restart within that time was seen taking 10 s.)
#[derive(Debug)]
struct WatchBackoff {
    next: Duration,
    hasher: std::hash::RandomState,
}

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(4);

impl Default for WatchBackoff {
    fn default() -> Self {
        Self {
            next: BACKOFF_MIN,
            hasher: std::hash::RandomState::new(),
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (base * 2).min(BACKOFF_MAX);
        // 50% to 150% of the base delay.
        let noise = self.hasher.hash_one(Instant::now()) % 1000;
        Some(base / 2 + base * u32::try_from(noise).unwrap_or(0) / 1000)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Drops what the agent never reads and what makes objects large.
fn slim<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
    object.meta_mut().annotations = None;
}

impl KubeSource {
    /// Starts the watches on `client` as `tasks`. The watches retry with
    /// [`WatchBackoff`] and end only when the source is dropped. Changes
    /// within `debounce` of each other make one batch.
    #[must_use]
    pub fn start(client: &Client, node_name: &str, debounce: Duration, tasks: &mut Tasks) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let all = watcher::Config::default();
        let services = watch(
            Api::all(client.clone()),
            all.clone(),
            Kind::Service,
            (&tx, tasks),
            |service| Change::Service(key_of(service)),
        );
        let slices = watch(
            Api::all(client.clone()),
            all,
            Kind::EndpointSlice,
            (&tx, tasks),
            |slice| Change::Slice {
                slice: key_of(slice),
                service: served_by(slice),
            },
        );
        let own = watcher::Config::default()
            .fields(&format!("metadata.name={}", escape_field_value(node_name)));
        let nodes = watch(
            Api::all(client.clone()),
            own,
            Kind::Node,
            (&tx, tasks),
            |_| Change::Node,
        );
        let service_cidrs = watch_optional(
            Api::all(client.clone()),
            Kind::ServiceCidr,
            (&tx, tasks),
            |_| Change::ServiceCidrs,
        );
        let stores = Stores {
            services,
            slices,
            nodes,
            service_cidrs,
        };
        Self::new(stores, node_name, rx, debounce)
    }

    fn new(
        stores: Stores,
        node_name: &str,
        changes: mpsc::Receiver<Change>,
        debounce: Duration,
    ) -> Self {
        let Stores {
            services,
            slices,
            nodes,
            service_cidrs,
        } = stores;
        Self {
            services,
            slices,
            nodes,
            service_cidrs,
            node_name: node_name.to_owned(),
            slice_owner: HashMap::new(),
            by_service: HashMap::new(),
            listed: HashSet::new(),
            changes,
            debounce,
            pending: Dirty::default(),
            started: None,
        }
    }

    /// Gathers a batch: the first change, then those that follow within
    /// the debounce of each other, at most ten debounce periods in all.
    async fn next_batch(&mut self) -> Batch {
        let started = if let Some(started) = self.started {
            started
        } else {
            let Some(first) = self.changes.recv().await else {
                // Every watch ended; the supervisor says so.
                return std::future::pending().await;
            };
            let now = time::Instant::now();
            self.started = Some(now);
            self.absorb(first);
            now
        };
        let deadline = started + self.debounce * 10;
        loop {
            // What is queued already joins the batch without waiting.
            while let Ok(change) = self.changes.try_recv() {
                self.absorb(change);
            }
            let now = time::Instant::now();
            if now >= deadline || self.debounce.is_zero() {
                break;
            }
            match time::timeout(self.debounce.min(deadline - now), self.changes.recv()).await {
                Ok(Some(change)) => self.absorb(change),
                Ok(None) | Err(_) => break,
            }
        }
        self.started = None;
        Batch {
            started: started.into_std(),
            dirty: std::mem::take(&mut self.pending),
        }
    }

    /// Folds `change` into the pending batch, keeping the slice index
    /// current.
    fn absorb(&mut self, change: Change) {
        match change {
            Change::Service(key) => {
                self.pending.services.insert(key);
            }
            Change::Slice { slice, service } => {
                let old = match &service {
                    Some(service) => self.slice_owner.insert(slice.clone(), service.clone()),
                    None => self.slice_owner.remove(&slice),
                };
                if let Some(old) = old {
                    self.unindex(&old, &slice.1);
                    self.pending.services.insert(old);
                }
                if let Some(service) = service {
                    self.by_service
                        .entry(service.clone())
                        .or_default()
                        .insert(slice.1);
                    self.pending.services.insert(service);
                }
            }
            Change::SliceDeleted(slice) => {
                if let Some(old) = self.slice_owner.remove(&slice) {
                    self.unindex(&old, &slice.1);
                    self.pending.services.insert(old);
                }
            }
            Change::Node => self.pending.node = true,
            Change::ServiceCidrs => self.pending.service_cidrs = true,
            Change::Unavailable { kind, reason } => {
                self.listed.insert(kind);
                self.pending.failures.push(Failure {
                    what: kind.name(),
                    error: reason,
                });
            }
            Change::Listed(kind) => {
                self.listed.insert(kind);
                match kind {
                    Kind::Service => self.pending.all = true,
                    Kind::EndpointSlice => {
                        self.reindex();
                        self.pending.all = true;
                    }
                    Kind::Node => self.pending.node = true,
                    Kind::ServiceCidr => self.pending.service_cidrs = true,
                }
            }
            Change::Failed { kind, error } => self.pending.failures.push(Failure {
                what: kind.name(),
                error,
            }),
        }
    }

    fn unindex(&mut self, service: &ObjectKey, slice: &str) {
        if let Some(slices) = self.by_service.get_mut(service) {
            slices.remove(slice);
            if slices.is_empty() {
                self.by_service.remove(service);
            }
        }
    }

    /// Rebuilds the slice index from the store after a relist, which may
    /// have dropped slices whose deletion was never seen.
    fn reindex(&mut self) {
        self.slice_owner.clear();
        self.by_service.clear();
        for slice in self.slices.state() {
            if let Some(service) = served_by(&slice) {
                let key = key_of(slice.as_ref());
                self.by_service
                    .entry(service.clone())
                    .or_default()
                    .insert(key.1.clone());
                self.slice_owner.insert(key, service);
            }
        }
    }

    /// The services `keys` and their slices, as the stores hold them now.
    fn fetch<'k>(&self, keys: impl IntoIterator<Item = &'k ObjectKey>) -> Fetched {
        let mut fetched = Fetched::default();
        for key in keys {
            let reference = ObjectRef::new(&key.1).within(&key.0);
            if let Some(service) = self.services.get(&reference) {
                fetched.services.insert(key.clone(), service);
            }
            let slices = self
                .by_service
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|name| self.slices.get(&ObjectRef::new(name).within(&key.0)))
                // The store may be ahead of the index (the events are queued).
                .filter(|slice| served_by(slice).as_ref() == Some(key))
                .collect();
            fetched.slices.insert(key.clone(), slices);
        }
        fetched
    }
}

impl Source for KubeSource {
    type Inputs<'a> = Fetched;

    fn changed(&mut self) -> impl Future<Output = Batch> {
        self.next_batch()
    }

    /// Every store has been listed once (or its kind is known to be
    /// unavailable).
    fn ready(&self) -> bool {
        self.listed.len() == KINDS
    }

    fn service_keys(&self) -> Vec<ObjectKey> {
        self.services
            .state()
            .iter()
            .map(|service| key_of(service.as_ref()))
            .collect()
    }

    fn inputs(&self, keys: &BTreeSet<ObjectKey>) -> Fetched {
        self.fetch(keys)
    }

    fn node(&self) -> Option<NodeFacts> {
        let node = self.nodes.get(&ObjectRef::new(&self.node_name))?;
        Some(NodeFacts {
            addrs: node_addresses(&node),
            zone: node_zone(&node),
            pod_cidrs: node_pod_cidrs(&node),
            eligible: node_eligible(&node),
        })
    }

    /// The IPv4 CIDRs of every `ServiceCIDR`, sorted.
    fn service_cidrs(&self) -> Option<Vec<Ipv4Cidr>> {
        let mut cidrs: Vec<Ipv4Cidr> = self
            .service_cidrs
            .state()
            .iter()
            .filter_map(|object| object.spec.as_ref())
            .flat_map(|spec| spec.cidrs.iter().flatten())
            .filter_map(|text| text.parse().ok())
            .collect();
        cidrs.sort_unstable();
        cidrs.dedup();
        Some(cidrs)
    }

    fn problems(&self) -> Vec<Problem> {
        Vec::new()
    }
}

/// The reflector stores of the watched kinds.
struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    service_cidrs: Store<ServiceCIDR>,
}

/// Starts a watch of `api` among `tasks`, feeding the returned store, its
/// changes sent to `tx`.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    (tx, tasks): (&mpsc::Sender<Change>, &mut Tasks),
    applied: impl Fn(&K) -> Change + Send + 'static,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config)
        .backoff(WatchBackoff::default())
        .modify(slim)
        .reflect(writer);
    tasks.spawn(kind.task(), forward(stream, kind, tx.clone(), applied));
    store
}

/// Like [`watch`] for a kind the agent can do without (`ServiceCIDR`: the
/// API is GA since Kubernetes 1.33, and an older RBAC may not grant it).
/// A first list answered 404 or 403 is reported as [`Change::Unavailable`]
/// and not retried (the task then waits for the agent's exit: a task that
/// returns is a fault); anything else starts the watch.
fn watch_optional<K>(
    api: Api<K>,
    kind: Kind,
    (tx, tasks): (&mpsc::Sender<Change>, &mut Tasks),
    applied: impl Fn(&K) -> Change + Send + 'static,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let tx = tx.clone();
    tasks.spawn(kind.task(), async move {
        let probe = api
            .list_metadata(&kube::api::ListParams::default().limit(1))
            .await;
        if let Err(kube::Error::Api(status)) = &probe
            && matches!(status.code, 403 | 404)
        {
            let reason = format!(
                "{} ({}): going on without them",
                status.message, status.code
            );
            let _ = tx.send(Change::Unavailable { kind, reason }).await;
            return std::future::pending().await;
        }
        let stream = watcher(api, watcher::Config::default())
            .backoff(WatchBackoff::default())
            .modify(slim)
            .reflect(writer);
        forward(stream, kind, tx, applied).await;
    });
    store
}

/// Runs one watch, reporting each event as a [`Change`] until the receiver
/// is gone.
async fn forward<K, S>(
    stream: S,
    kind: Kind,
    tx: mpsc::Sender<Change>,
    applied: impl Fn(&K) -> Change,
) where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    K: Resource,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let change = match item {
            Ok(watcher::Event::Apply(object)) => applied(&object),
            Ok(watcher::Event::Delete(object)) => match kind {
                Kind::EndpointSlice => Change::SliceDeleted(key_of(&object)),
                _ => applied(&object),
            },
            // The store swaps in the relisted objects at `InitDone`.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(watcher::Event::InitDone) => Change::Listed(kind),
            Err(error) => Change::Failed {
                kind,
                error: error.to_string(),
            },
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}

fn key_of<K: Resource>(object: &K) -> ObjectKey {
    (object.namespace().unwrap_or_default(), object.name_any())
}

/// The service whose translation reads `slice`, if any.
fn served_by(slice: &EndpointSlice) -> Option<ObjectKey> {
    slice_service(slice)
        .ok()
        .map(|(namespace, name)| (namespace.to_owned(), name.to_owned()))
}

/// Services and slices taken from the stores for one translation round.
#[derive(Default)]
pub struct Fetched {
    services: HashMap<ObjectKey, Arc<Service>>,
    slices: HashMap<ObjectKey, Vec<Arc<EndpointSlice>>>,
}

impl Inputs for Fetched {
    fn service(&self, key: &ObjectKey) -> Option<&Service> {
        self.services.get(key).map(AsRef::as_ref)
    }

    fn slices(&self, key: &ObjectKey) -> Vec<&EndpointSlice> {
        self.slices
            .get(key)
            .into_iter()
            .flatten()
            .map(AsRef::as_ref)
            .collect()
    }
}

/// Node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The node's zone, from its `topology.kubernetes.io/zone` label.
#[must_use]
pub fn node_zone(node: &Node) -> Option<String> {
    node.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned()
}

/// The cluster autoscaler's taint on a node it is about to delete.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's node eligibility for load balancer health checks: not
/// being deleted, not tainted for deletion.
#[must_use]
pub fn node_eligible(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_none()
        && !node
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|taint| taint.key == TO_BE_DELETED_TAINT))
}

/// The node's IPv4 pod CIDRs (`spec.podCIDRs`, or the older `podCIDR`).
#[must_use]
pub fn node_pod_cidrs(node: &Node) -> Vec<Ipv4Cidr> {
    let Some(spec) = node.spec.as_ref() else {
        return Vec::new();
    };
    let listed = spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.iter());
    let mut cidrs: Vec<Ipv4Cidr> = listed.filter_map(|text| text.parse().ok()).collect();
    cidrs.sort_unstable();
    cidrs.dedup();
    cidrs
}

/// The IPv4 addresses node ports answer on: the node's internal and
/// external addresses.
#[must_use]
pub fn node_addresses(node: &Node) -> Vec<Ipv4Addr> {
    let mut addrs = Vec::new();
    let listed = node
        .status
        .iter()
        .flat_map(|status| status.addresses.iter().flatten())
        .filter(|address| matches!(address.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|address| address.address.parse().ok());
    for addr in listed {
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    addrs
}

/// A value for a field selector, escaped as the API server reads it
/// (apimachinery's `fields.EscapeValue`): a node name taken from the host
/// name or a flag cannot add terms.
fn escape_field_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | ',' | '=') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use kube::runtime::{reflector::store::Writer, watcher::Event};

    use super::*;

    fn yaml<K: serde::de::DeserializeOwned>(text: &str) -> K {
        serde_yaml_ng::from_str(text).expect("fixture parses")
    }

    fn slice(name: &str, service: &str, ip: &str) -> EndpointSlice {
        yaml(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: ns\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nendpoints:\n- addresses: [{ip}]\nports:\n- port: 80\n"
        ))
    }

    fn service(name: &str) -> Service {
        yaml(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: ns\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n"
        ))
    }

    fn key(name: &str) -> ObjectKey {
        ("ns".to_owned(), name.to_owned())
    }

    struct Fixture {
        source: KubeSource,
        tx: mpsc::Sender<Change>,
        services: Writer<Service>,
        slices: Writer<EndpointSlice>,
        nodes: Writer<Node>,
        service_cidrs: Writer<ServiceCIDR>,
    }

    impl Fixture {
        fn new(debounce: Duration) -> Self {
            let (services, services_writer) = reflector::store();
            let (slices, slices_writer) = reflector::store();
            let (nodes, nodes_writer) = reflector::store();
            let (service_cidrs, service_cidrs_writer) = reflector::store();
            let stores = Stores {
                services,
                slices,
                nodes,
                service_cidrs,
            };
            let (tx, rx) = mpsc::channel(64);
            Self {
                source: KubeSource::new(stores, "n1", rx, debounce),
                tx,
                services: services_writer,
                slices: slices_writer,
                nodes: nodes_writer,
                service_cidrs: service_cidrs_writer,
            }
        }

        fn send(&self, change: Change) {
            self.tx.try_send(change).expect("the channel has room");
        }

        /// What the watch task does for one slice event: the store first,
        /// then the change.
        fn slice_event(&mut self, event: &Event<EndpointSlice>) {
            self.slices.apply_watcher_event(event);
            let change = match event {
                Event::Apply(slice) => Change::Slice {
                    slice: key_of(slice),
                    service: served_by(slice),
                },
                Event::Delete(slice) => Change::SliceDeleted(key_of(slice)),
                Event::InitDone => Change::Listed(Kind::EndpointSlice),
                Event::Init | Event::InitApply(_) => return,
            };
            self.send(change);
        }

        /// The next batch, which must come within a second.
        async fn batch(&mut self) -> Batch {
            time::timeout(Duration::from_secs(1), self.source.changed())
                .await
                .expect("a batch within a second")
        }

        fn endpoints(&self, service: &str) -> Vec<String> {
            let key = key(service);
            let fetched = self.source.fetch([&key]);
            fetched
                .slices(&key)
                .iter()
                .flat_map(|slice| slice.endpoints.iter().flatten())
                .flat_map(|endpoint| endpoint.addresses.clone())
                .collect()
        }
    }

    #[tokio::test]
    async fn a_slice_moving_between_services_dirties_both_and_is_read_for_the_new_one() {
        let mut fixture = Fixture::new(Duration::ZERO);
        fixture.slice_event(&Event::Apply(slice("s1", "a", "10.0.0.1")));
        assert_eq!(
            fixture.batch().await.dirty.services,
            BTreeSet::from([key("a")])
        );
        assert_eq!(fixture.endpoints("a"), ["10.0.0.1"]);

        fixture.slice_event(&Event::Apply(slice("s1", "b", "10.0.0.2")));
        assert_eq!(
            fixture.batch().await.dirty.services,
            BTreeSet::from([key("a"), key("b")])
        );
        assert!(fixture.endpoints("a").is_empty(), "a lost the slice");
        assert_eq!(fixture.endpoints("b"), ["10.0.0.2"]);

        fixture.slice_event(&Event::Delete(slice("s1", "b", "10.0.0.2")));
        assert_eq!(
            fixture.batch().await.dirty.services,
            BTreeSet::from([key("b")])
        );
        assert!(fixture.endpoints("b").is_empty());
    }

    #[tokio::test]
    async fn a_relist_rebuilds_the_index_and_rederives_everything() {
        let mut fixture = Fixture::new(Duration::ZERO);
        fixture.slice_event(&Event::Apply(slice("s1", "a", "10.0.0.1")));
        fixture.slice_event(&Event::Apply(slice("s2", "a", "10.0.0.2")));
        fixture.batch().await;
        assert!(!fixture.source.ready(), "nothing listed yet");

        // The watch missed s1's deletion; the relist has only s2.
        for event in [
            Event::Init,
            Event::InitApply(slice("s2", "a", "10.0.0.2")),
            Event::InitDone,
        ] {
            fixture.slice_event(&event);
        }
        assert!(
            fixture.batch().await.dirty.all,
            "a relist re-derives every service"
        );
        assert_eq!(fixture.endpoints("a"), ["10.0.0.2"]);

        fixture
            .services
            .apply_watcher_event(&Event::Apply(service("a")));
        for kind in [Kind::Service, Kind::Node] {
            fixture.send(Change::Listed(kind));
        }
        fixture.batch().await;
        assert!(!fixture.source.ready(), "ServiceCIDRs not listed yet");
        fixture.send(Change::Unavailable {
            kind: Kind::ServiceCidr,
            reason: "forbidden (403)".to_owned(),
        });
        let batch = fixture.batch().await;
        assert_eq!(
            batch.dirty.failures.len(),
            1,
            "the unavailable kind is said"
        );
        assert!(
            fixture.source.ready(),
            "every kind listed, or known to be unavailable"
        );
        assert_eq!(fixture.source.service_keys(), [key("a")]);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_within_the_debounce_make_one_batch_and_a_stream_of_them_is_cut_at_ten_periods()
    {
        let debounce = Duration::from_millis(50);
        let mut fixture = Fixture::new(debounce);
        fixture.send(Change::Service(key("a")));
        let tx = fixture.tx.clone();
        let feeder = tokio::spawn(async move {
            // b within the debounce; then one change every 40 ms for 2 s.
            time::sleep(Duration::from_millis(30)).await;
            let _ = tx.send(Change::Service(key("b"))).await;
            for _ in 0..50 {
                time::sleep(Duration::from_millis(40)).await;
                let _ = tx.send(Change::Service(key("c"))).await;
            }
        });
        let started = time::Instant::now();
        let batch = fixture.batch().await;
        assert!(batch.dirty.services.contains(&key("a")));
        assert!(
            batch.dirty.services.contains(&key("b")),
            "b came within the debounce"
        );
        assert_eq!(
            started.elapsed(),
            debounce * 10,
            "a stream of changes is cut at ten debounce periods"
        );
        // The rest of the stream makes the following batches.
        let next = fixture.batch().await;
        assert_eq!(next.dirty.services, BTreeSet::from([key("c")]));
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_interrupted_by_another_branch_is_kept() {
        let debounce = Duration::from_millis(50);
        let mut fixture = Fixture::new(debounce);
        fixture.send(Change::Service(key("a")));
        // The agent's loop picks another branch while the batch gathers.
        let interrupted = time::timeout(Duration::from_millis(10), fixture.source.changed()).await;
        assert!(interrupted.is_err(), "still gathering after 10 ms");
        fixture.send(Change::Service(key("b")));
        let batch = fixture.batch().await;
        assert_eq!(batch.dirty.services, BTreeSet::from([key("a"), key("b")]));
    }

    #[tokio::test]
    async fn this_nodes_object_gives_its_facts_to_the_reconciler() {
        use crate::{
            model::{NodeInfo, Settings, Translator},
            reconcile::{Fixed, Reconciler},
        };
        let mut fixture = Fixture::new(Duration::ZERO);
        let node: Node = yaml(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n  labels: {topology.kubernetes.io/zone: z2}\nspec:\n  podCIDRs: [10.244.1.0/24]\nstatus:\n  addresses: [{type: InternalIP, address: 192.168.1.5}]\n",
        );
        let other: Node = yaml(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n2\nstatus:\n  addresses: [{type: InternalIP, address: 192.168.1.6}]\n",
        );
        fixture.nodes.apply_watcher_event(&Event::Apply(other));
        fixture.nodes.apply_watcher_event(&Event::Apply(node));
        for kind in [
            Kind::Service,
            Kind::EndpointSlice,
            Kind::Node,
            Kind::ServiceCidr,
        ] {
            fixture.send(Change::Listed(kind));
        }
        let mut reconciler = Reconciler::new(
            Translator::new(NodeInfo::default(), Settings::default()),
            Fixed::default(),
        );
        let batch = fixture.batch().await;
        assert!(batch.dirty.node, "listing the Node reads it");
        reconciler
            .reconcile(&fixture.source, batch)
            .expect("every kind listed: a round");
        let facts = reconciler.translator().node();
        assert_eq!(
            facts.addrs,
            [Ipv4Addr::new(192, 168, 1, 5)],
            "this node's, not n2's"
        );
        assert_eq!(facts.zone.as_deref(), Some("z2"));
        assert_eq!(
            facts.pod_cidrs,
            ["10.244.1.0/24".parse::<Ipv4Cidr>().expect("a CIDR")]
        );
    }

    #[test]
    fn a_node_being_deleted_or_tainted_for_deletion_is_not_eligible() {
        let eligible = |text: &str| node_eligible(&yaml(text));
        assert!(eligible(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nspec:\n  taints: [{key: node.kubernetes.io/unschedulable, effect: NoSchedule}]\n"
        ));
        assert!(!eligible(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nspec:\n  taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1767225600', effect: NoSchedule}]\n"
        ));
        assert!(!eligible(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n  deletionTimestamp: '2026-12-02T22:00:00Z'\n  finalizers: [example.com/hold]\n"
        ));
    }

    #[test]
    fn pod_cidrs_and_service_cidrs_keep_the_ipv4_ones() {
        let node: Node = yaml(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nspec:\n  podCIDR: 10.244.1.0/24\n  podCIDRs: [10.244.1.0/24, 'fd00:10:244:1::/64']\n",
        );
        assert_eq!(
            node_pod_cidrs(&node),
            ["10.244.1.0/24".parse::<Ipv4Cidr>().expect("a CIDR")]
        );
        let mut fixture = Fixture::new(Duration::ZERO);
        let cidr: ServiceCIDR = yaml(
            "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\nspec:\n  cidrs: [10.96.0.0/16, 'fd00:10:96::/112']\n",
        );
        fixture
            .service_cidrs
            .apply_watcher_event(&Event::Apply(cidr));
        assert_eq!(
            fixture.source.service_cidrs(),
            Some(vec!["10.96.0.0/16".parse::<Ipv4Cidr>().expect("a CIDR")])
        );
    }

    #[test]
    fn node_ports_answer_on_the_internal_and_external_ipv4_addresses() {
        let node: Node = yaml(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nstatus:\n  addresses:\n  - {type: Hostname, address: n1}\n  - {type: InternalIP, address: 192.168.1.5}\n  - {type: InternalIP, address: 'fd00::5'}\n  - {type: ExternalIP, address: 203.0.113.5}\n  - {type: ExternalIP, address: 192.168.1.5}\n",
        );
        assert_eq!(
            node_addresses(&node),
            [Ipv4Addr::new(192, 168, 1, 5), Ipv4Addr::new(203, 0, 113, 5)]
        );
    }

    #[test]
    fn field_selector_values_cannot_add_terms() {
        assert_eq!(escape_field_value("node-1.example"), "node-1.example");
        assert_eq!(
            escape_field_value(r"a,metadata.name!=b\c=d"),
            r"a\,metadata.name!\=b\\c\=d"
        );
    }
}
