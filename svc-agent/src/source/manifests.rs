//! A directory of manifests as the source of truth: the YAML `kubectl
//! apply -f` accepts (several documents per file, `kind: List`), holding
//! Services, EndpointSlices and legacy Endpoints. Endpoints are turned into
//! EndpointSlices the way the EndpointSlice mirroring controller does.
//! There is no controller here to make slices from pods: services with a
//! selector need their EndpointSlices written out.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::{
    api::{
        core::v1::{EndpointAddress, Endpoints, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize as _;

use tokio::time;
use tracing::warn;

use super::Objects;
use crate::{
    datapath::Ipv4Cidr,
    model::{Inputs, ObjectKey, Problem, SERVICE_NAME_LABEL, slice_service},
    reconcile::{Batch, Dirty, NodeFacts, Source},
};

/// Label that keeps an Endpoints object from being mirrored.
pub const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";
/// Label the mirroring controller sets on the slices it manages.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MIRRORING_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";

/// Parsed manifests before mirroring.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    pub objects: Objects,
    pub endpoints: Vec<Endpoints>,
}

fn problem(object: String, message: String) -> Problem {
    Problem {
        object,
        message,
        warning: true,
    }
}

/// Parses every document of `text` (from `origin`, for messages) into
/// `parsed`. An object that does not decode is reported and skipped;
/// kinds other than Service, EndpointSlice, Endpoints and List are ignored.
/// Returns `false` when the text is not YAML (reported; the documents
/// after the error are lost).
pub fn parse(text: &str, origin: &str, parsed: &mut Parsed, problems: &mut Vec<Problem>) -> bool {
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let where_ = format!("{origin}, document {}", index + 1);
        match serde_yaml_ng::Value::deserialize(document) {
            Ok(serde_yaml_ng::Value::Null) => {}
            Ok(value) => add_value(value, &where_, parsed, problems),
            Err(err) => {
                // The stream cannot resume after a syntax error (the
                // iterator would repeat it forever): the rest of the file
                // is skipped.
                problems.push(problem(where_, format!("not YAML: {err}")));
                return false;
            }
        }
    }
    true
}

fn add_value(
    value: serde_yaml_ng::Value,
    where_: &str,
    parsed: &mut Parsed,
    problems: &mut Vec<Problem>,
) {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(serde_yaml_ng::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let name = value
        .get("metadata")
        .and_then(|meta| meta.get("name"))
        .and_then(serde_yaml_ng::Value::as_str)
        .unwrap_or("<unnamed>")
        .to_owned();
    let object = format!("{where_}: {kind} {name}");
    let report = |problems: &mut Vec<Problem>, err: serde_yaml_ng::Error| {
        problems.push(problem(object.clone(), format!("does not parse: {err}")));
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(serde_yaml_ng::Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                add_value(item, &format!("{where_}, item {}", i + 1), parsed, problems);
            }
        }
        ("v1", "Service") => match serde_yaml_ng::from_value::<Service>(value) {
            Ok(service) => parsed.objects.services.push(service),
            Err(err) => report(problems, err),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_yaml_ng::from_value::<EndpointSlice>(value) {
                Ok(slice) => parsed.objects.slices.push(slice),
                Err(err) => report(problems, err),
            }
        }
        ("v1", "Endpoints") => match serde_yaml_ng::from_value::<Endpoints>(value) {
            Ok(endpoints) => parsed.endpoints.push(endpoints),
            Err(err) => report(problems, err),
        },
        _ => {}
    }
}

/// Fills in what an API server would default: the namespace.
fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().unwrap_or_default().is_empty() {
        meta.namespace = Some("default".to_owned());
    }
}

/// Drops what the translation never reads and a watch would keep for
/// every object: managed fields and annotations (`kubectl apply` leaves a
/// copy of the whole object in one).
fn strip(parsed: &mut Parsed) {
    let metas = parsed
        .objects
        .services
        .iter_mut()
        .map(|s| &mut s.metadata)
        .chain(parsed.objects.slices.iter_mut().map(|s| &mut s.metadata))
        .chain(parsed.endpoints.iter_mut().map(|e| &mut e.metadata));
    for meta in metas {
        meta.managed_fields = None;
        meta.annotations = None;
    }
}

/// Defaults what an API server would: the namespace.
fn default_namespaces(parsed: &mut Parsed) {
    for service in &mut parsed.objects.services {
        default_namespace(&mut service.metadata);
    }
    for slice in &mut parsed.objects.slices {
        default_namespace(&mut slice.metadata);
    }
    for endpoints in &mut parsed.endpoints {
        default_namespace(&mut endpoints.metadata);
    }
}

/// The slices the mirroring controller would make from `endpoints`: for
/// services without a selector, unless the Endpoints opt out.
fn mirrored_slices<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    endpoints: impl IntoIterator<Item = &'a Endpoints>,
) -> Vec<EndpointSlice> {
    let selectorless: BTreeSet<(&str, &str)> = services
        .into_iter()
        .filter(|s| {
            s.spec
                .as_ref()
                .is_none_or(|spec| spec.selector.as_ref().is_none_or(BTreeMap::is_empty))
        })
        .map(|s| {
            (
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name.as_deref().unwrap_or_default(),
            )
        })
        .collect();
    let mut slices = Vec::new();
    for endpoints in endpoints {
        let key = (
            endpoints.metadata.namespace.as_deref().unwrap_or_default(),
            endpoints.metadata.name.as_deref().unwrap_or_default(),
        );
        let skip = endpoints
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SKIP_MIRROR_LABEL))
            .is_some_and(|value| value == "true");
        if !skip && selectorless.contains(&key) {
            slices.extend(mirror(endpoints));
        }
    }
    slices
}

/// Parsed manifests as the translation sees them: namespaces defaulted,
/// Endpoints mirrored into slices for services without a selector.
#[must_use]
pub fn finish(mut parsed: Parsed) -> Objects {
    default_namespaces(&mut parsed);
    let mirrored = mirrored_slices(&parsed.objects.services, &parsed.endpoints);
    parsed.objects.slices.extend(mirrored);
    parsed.objects
}

/// The EndpointSlices the mirroring controller makes from an Endpoints
/// object: one per subset and address family (IPv4 here; IPv6 addresses
/// get their own slice, which the translation skips).
#[must_use]
pub fn mirror(endpoints: &Endpoints) -> Vec<EndpointSlice> {
    let name = endpoints.metadata.name.clone().unwrap_or_default();
    let mut slices = Vec::new();
    for (index, subset) in endpoints.subsets.iter().flatten().enumerate() {
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .map(|port| EndpointPort {
                name: port.name.clone(),
                port: Some(port.port),
                protocol: port.protocol.clone(),
                app_protocol: port.app_protocol.clone(),
            })
            .collect();
        for (family, v6) in [("IPv4", false), ("IPv6", true)] {
            let convert = |address: &EndpointAddress, ready: bool| {
                (address.ip.contains(':') == v6).then(|| Endpoint {
                    addresses: vec![address.ip.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: Some(ready),
                        terminating: Some(false),
                    }),
                    hostname: address.hostname.clone(),
                    node_name: address.node_name.clone(),
                    ..Endpoint::default()
                })
            };
            let members: Vec<Endpoint> = subset
                .addresses
                .iter()
                .flatten()
                .filter_map(|a| convert(a, true))
                .chain(
                    subset
                        .not_ready_addresses
                        .iter()
                        .flatten()
                        .filter_map(|a| convert(a, false)),
                )
                .collect();
            if members.is_empty() {
                continue;
            }
            let mut labels = endpoints.metadata.labels.clone().unwrap_or_default();
            labels.insert(SERVICE_NAME_LABEL.to_owned(), name.clone());
            labels.insert(MANAGED_BY_LABEL.to_owned(), MIRRORING_CONTROLLER.to_owned());
            slices.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-mirror-{index}-{}", family.to_lowercase())),
                    namespace: endpoints.metadata.namespace.clone(),
                    labels: Some(labels),
                    ..ObjectMeta::default()
                },
                address_type: family.to_owned(),
                endpoints: Some(members),
                ports: Some(ports.clone()),
            });
        }
    }
    slices
}

/// Files the directory holds manifests in.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_file()
                && path
                    .extension()
                    .is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// One manifest file as last read.
#[derive(Debug)]
struct CachedFile {
    modified: Option<SystemTime>,
    len: u64,
    hash: u64,
    parsed: Parsed,
    problems: Vec<Problem>,
    /// The whole file parsed (its objects are a good read to keep).
    whole: bool,
    /// Why the file's latest read was not used (it did not read whole
    /// since `parsed` was read).
    failed: Vec<Problem>,
}

fn content_hash(content: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    content.hash(&mut hasher);
    hasher.finish()
}

/// A manifest file's objects, what was wrong with it, and whether it read
/// whole (not empty, UTF-8, YAML).
fn parse_file(content: Vec<u8>, origin: &str) -> (Parsed, Vec<Problem>, bool) {
    let mut parsed = Parsed::default();
    let mut problems = Vec::new();
    let whole = if content.is_empty() {
        // An editor saving in place truncates first.
        problems.push(problem(origin.to_owned(), "empty".to_owned()));
        false
    } else if let Ok(text) = String::from_utf8(content) {
        parse(&text, origin, &mut parsed, &mut problems)
    } else {
        problems.push(problem(origin.to_owned(), "not UTF-8".to_owned()));
        false
    };
    default_namespaces(&mut parsed);
    strip(&mut parsed);
    (parsed, problems, whole)
}

/// A watched manifest directory: [`Watch::poll`] says whether a file was
/// added, removed or changed since the last call; the objects are then
/// read from the watch itself, without copies. A file is read again only
/// when its size or modification time changed, and parsed again only when
/// its content did.
#[derive(Debug)]
pub struct Watch {
    dir: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    /// Slices mirrored from Endpoints, by service.
    mirrored: HashMap<ObjectKey, Vec<EndpointSlice>>,
    /// Which files hold each service, each service's slices, each
    /// Endpoints object.
    service_files: HashMap<ObjectKey, BTreeSet<PathBuf>>,
    slice_files: HashMap<ObjectKey, BTreeSet<PathBuf>>,
    endpoints_files: HashMap<ObjectKey, BTreeSet<PathBuf>>,
    /// Services whose inputs changed since [`Watch::take_dirty`].
    dirty: BTreeSet<ObjectKey>,
    primed: bool,
}

fn key_of(meta: &ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The services a file's objects bear on, per index.
fn file_keys(parsed: &Parsed) -> [Vec<ObjectKey>; 3] {
    [
        parsed
            .objects
            .services
            .iter()
            .map(|s| key_of(&s.metadata))
            .collect(),
        parsed
            .objects
            .slices
            .iter()
            .filter_map(|slice| slice_service(slice).ok())
            .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
            .collect(),
        parsed
            .endpoints
            .iter()
            .map(|e| key_of(&e.metadata))
            .collect(),
    ]
}

impl Watch {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
            mirrored: HashMap::new(),
            service_files: HashMap::new(),
            slice_files: HashMap::new(),
            endpoints_files: HashMap::new(),
            dirty: BTreeSet::new(),
            primed: false,
        }
    }

    fn indexes(&mut self) -> [&mut HashMap<ObjectKey, BTreeSet<PathBuf>>; 3] {
        [
            &mut self.service_files,
            &mut self.slice_files,
            &mut self.endpoints_files,
        ]
    }

    /// Records (or, with `add` false, forgets) where `parsed`'s objects
    /// are, marking the services they bear on dirty.
    fn index(&mut self, path: &Path, parsed: &Parsed, add: bool) {
        let keys = file_keys(parsed);
        for (index, keys) in self.indexes().into_iter().zip(&keys) {
            for key in keys {
                if add {
                    index
                        .entry(key.clone())
                        .or_default()
                        .insert(path.to_owned());
                } else if let Some(files) = index.get_mut(key) {
                    files.remove(path);
                    if files.is_empty() {
                        index.remove(key);
                    }
                }
            }
        }
        self.dirty.extend(keys.into_iter().flatten());
    }

    /// The services whose inputs changed since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<ObjectKey> {
        std::mem::take(&mut self.dirty)
    }

    /// Rescans the directory; `true` when anything changed.
    pub fn poll(&mut self) -> std::io::Result<bool> {
        let paths = manifest_files(&self.dir)?;
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| !paths.contains(path))
            .cloned()
            .collect();
        let mut changed = !self.primed || !gone.is_empty();
        for path in gone {
            if let Some(file) = self.files.remove(&path) {
                self.index(&path, &file.parsed, false);
            }
        }
        for path in paths {
            let meta = fs::metadata(&path).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.as_ref().map_or(0, fs::Metadata::len);
            if let Some(cached) = self.files.get(&path)
                && cached.modified == modified
                && cached.len == len
            {
                continue;
            }
            let origin = path.display().to_string();
            let (hash, parsed, mut problems, whole) = match fs::read(&path) {
                Ok(content) => {
                    let hash = content_hash(&content);
                    if let Some(cached) = self.files.get_mut(&path)
                        && cached.hash == hash
                    {
                        (cached.modified, cached.len) = (modified, len);
                        if !cached.failed.is_empty() {
                            // Back to what was last read whole.
                            cached.failed.clear();
                            changed = true;
                        }
                        continue;
                    }
                    let (parsed, problems, whole) = parse_file(content, &origin);
                    (hash, parsed, problems, whole)
                }
                // Removed between listing and reading: gone next poll.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => (
                    0,
                    Parsed::default(),
                    vec![problem(origin.clone(), format!("unreadable: {err}"))],
                    false,
                ),
            };
            // A file caught half-written (or unreadable for a moment)
            // keeps the objects of its last good read; only its removal
            // takes them away.
            // Read again at every poll (its size and time are not taken)
            // until it reads whole.
            if !whole
                && let Some(cached) = self.files.get_mut(&path)
                && cached.whole
            {
                for problem in &mut problems {
                    problem
                        .message
                        .push_str("; its objects as last read are kept");
                }
                if cached.failed != problems {
                    cached.failed = problems;
                    changed = true;
                }
                continue;
            }
            if let Some(old) = self.files.remove(&path) {
                self.index(&path, &old.parsed, false);
            }
            self.index(&path, &parsed, true);
            self.files.insert(
                path,
                CachedFile {
                    modified,
                    len,
                    hash,
                    parsed,
                    problems,
                    whole,
                    failed: Vec::new(),
                },
            );
            changed = true;
        }
        self.primed = true;
        if changed {
            let dirty: Vec<ObjectKey> = self.dirty.iter().cloned().collect();
            for key in dirty {
                let mirrored = mirrored_slices(self.service(&key), self.endpoints(&key));
                if mirrored.is_empty() {
                    self.mirrored.remove(&key);
                } else {
                    self.mirrored.insert(key, mirrored);
                }
            }
        }
        Ok(changed)
    }

    /// Every Service in the directory.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.files.values().flat_map(|f| &f.parsed.objects.services)
    }

    /// Every EndpointSlice, written out or mirrored from Endpoints.
    pub fn slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.files
            .values()
            .flat_map(|f| &f.parsed.objects.slices)
            .chain(self.mirrored.values().flatten())
    }

    fn endpoints(&self, key: &ObjectKey) -> Vec<&Endpoints> {
        self.endpoints_files
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|path| self.files.get(path))
            .flat_map(|file| &file.parsed.endpoints)
            .filter(|endpoints| key_of(&endpoints.metadata) == *key)
            .collect()
    }

    /// What could not be read or parsed.
    pub fn problems(&self) -> impl Iterator<Item = &Problem> {
        self.files
            .values()
            .flat_map(|f| f.problems.iter().chain(&f.failed))
    }
}

impl Inputs for Watch {
    fn service(&self, key: &ObjectKey) -> Option<&Service> {
        self.service_files
            .get(key)?
            .iter()
            .filter_map(|path| self.files.get(path))
            .flat_map(|file| &file.parsed.objects.services)
            .find(|service| key_of(&service.metadata) == *key)
    }

    fn slices(&self, key: &ObjectKey) -> Vec<&EndpointSlice> {
        let wanted = (key.0.as_str(), key.1.as_str());
        self.slice_files
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|path| self.files.get(path))
            .flat_map(|file| &file.parsed.objects.slices)
            .chain(self.mirrored.get(key).into_iter().flatten())
            .filter(|slice| slice_service(slice).ok() == Some(wanted))
            .collect()
    }
}

/// A manifest directory as a [`Source`]: looked at every 200 ms, so a
/// burst of edits inside one poll is applied once.
#[derive(Debug)]
pub struct ManifestSource {
    watch: Watch,
    poll: time::Interval,
}

/// How often the directory is looked at.
pub const POLL_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

impl ManifestSource {
    /// Watches `dir` (read at the first [`Source::changed`]); needs a
    /// Tokio runtime.
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            watch: Watch::new(dir),
            poll: time::interval(POLL_EVERY),
        }
    }

    /// The next change, or `None` if nothing changed or the directory
    /// could not be read (the datapath keeps serving what it last had).
    fn poll(&mut self) -> Option<Dirty> {
        match self.watch.poll() {
            Ok(true) => Some(Dirty {
                services: self.watch.take_dirty(),
                problems: true,
                ..Dirty::default()
            }),
            Ok(false) => None,
            Err(err) => {
                warn!(dir = %self.watch.dir.display(), error = %err, "reading the manifest directory failed");
                None
            }
        }
    }
}

impl Source for ManifestSource {
    type Inputs<'a> = &'a Watch;

    async fn changed(&mut self) -> Batch {
        loop {
            self.poll.tick().await;
            let started = std::time::Instant::now();
            if let Some(dirty) = self.poll() {
                return Batch { started, dirty };
            }
        }
    }

    /// A directory is whole once read.
    fn ready(&self) -> bool {
        true
    }

    fn service_keys(&self) -> Vec<ObjectKey> {
        self.watch.service_files.keys().cloned().collect()
    }

    fn inputs<'a>(&'a self, _keys: &BTreeSet<ObjectKey>) -> &'a Watch {
        &self.watch
    }

    /// No Node object: the flags say what the node is.
    fn node(&self) -> Option<NodeFacts> {
        None
    }

    /// No `ServiceCIDR` objects: `--service-cidr` says.
    fn service_cidrs(&self) -> Option<Vec<Ipv4Cidr>> {
        None
    }

    fn problems(&self) -> Vec<Problem> {
        self.watch.problems().cloned().collect()
    }
}

impl<T: Inputs> Inputs for &T {
    fn service(&self, key: &ObjectKey) -> Option<&Service> {
        (**self).service(key)
    }

    fn slices(&self, key: &ObjectKey) -> Vec<&EndpointSlice> {
        (**self).slices(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Service at 10.96.0.10:80.
    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
                       spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";

    /// A fresh directory named after `name` holding `web.yaml` ([`WEB`]).
    fn directory_with_web(name: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("web.yaml");
        fs::write(&file, WEB).expect("write");
        (dir, file)
    }

    #[test]
    fn a_file_caught_half_written_keeps_its_objects_until_it_is_removed() {
        let (dir, file) = directory_with_web("svc-watch-half");
        let good = WEB;
        let mut watch = Watch::new(&dir);
        assert!(watch.poll().expect("readable"));
        let names = |watch: &Watch| -> Vec<String> {
            watch
                .services()
                .filter_map(|s| s.metadata.name.clone())
                .collect()
        };
        assert_eq!(names(&watch), ["web"]);
        watch.take_dirty();
        for (what, content) in [
            ("empty", &b""[..]),
            (
                "not YAML",
                &b"apiVersion: v1\nkind: Service\nmetadata: {name: web"[..],
            ),
            ("not UTF-8", &b"\xff\xfe"[..]),
        ] {
            fs::write(&file, content).expect("write");
            assert!(
                watch.poll().expect("readable"),
                "{what}: the problem is news"
            );
            assert_eq!(names(&watch), ["web"], "{what}: the last good read stays");
            assert!(watch.take_dirty().is_empty(), "{what}: no service changed");
            let problems: Vec<String> = watch.problems().map(ToString::to_string).collect();
            assert!(
                problems
                    .iter()
                    .any(|p| p.contains(what) && p.contains("kept")),
                "{what}: reported: {problems:?}"
            );
            assert!(
                !watch.poll().expect("readable"),
                "{what}: read again, no news"
            );
        }
        fs::write(&file, good).expect("write");
        assert!(watch.poll().expect("readable"), "back to the good read");
        assert_eq!(watch.problems().count(), 0);
        fs::write(&file, good.replace("web", "api")).expect("write");
        assert!(watch.poll().expect("readable"));
        assert_eq!(names(&watch), ["api"], "a whole new read replaces it");
        fs::write(
            dir.join("new.yaml"),
            format!("{}---\n{{ broken", good.replace("web", "new")),
        )
        .expect("write");
        assert!(watch.poll().expect("readable"));
        let mut all = names(&watch);
        all.sort();
        assert_eq!(
            all,
            ["api", "new"],
            "a new file serves what parsed before its error"
        );
        fs::remove_file(&file).expect("remove");
        assert!(watch.poll().expect("readable"));
        assert_eq!(names(&watch), ["new"], "removal takes the objects away");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_watch_keeps_objects_without_managed_fields_and_annotations() {
        let dir = std::env::temp_dir().join(format!("svc-watch-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        fs::write(
            dir.join("get.yaml"),
            include_str!("../../fixtures/kubectl-get.yaml"),
        )
        .expect("fixture");
        let mut watch = Watch::new(&dir);
        assert!(
            watch.poll().expect("readable"),
            "the first poll sees the file"
        );
        let service = watch.services().next().expect("a service");
        assert!(service.metadata.managed_fields.is_none());
        assert!(service.metadata.annotations.is_none());
        assert!(service.metadata.labels.is_some(), "labels are kept");
        assert_eq!(
            watch.take_dirty().into_iter().collect::<Vec<_>>(),
            vec![("prod".to_owned(), "api".to_owned())]
        );
        assert!(!watch.poll().expect("readable"), "nothing changed");
        fs::remove_file(dir.join("get.yaml")).expect("remove");
        assert!(watch.poll().expect("readable"), "the removal is seen");
        assert_eq!(watch.take_dirty().len(), 1, "its service is dirty");
        assert_eq!(watch.services().count(), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_file_is_a_round_that_says_so_and_keeps_the_frontends() {
        use crate::{
            datapath::Frontend,
            model::{NodeInfo, Settings, Translator},
            reconcile::{Fixed, Reconciler},
        };
        let (dir, file) = directory_with_web("svc-source-round");
        let mut source = ManifestSource::new(&dir);
        let mut reconciler = Reconciler::new(
            Translator::new(NodeInfo::default(), Settings::default()),
            Fixed::default(),
        );
        let frontend = Frontend::tcp(std::net::Ipv4Addr::new(10, 96, 0, 10), 80);

        let batch = source.changed().await;
        assert_eq!(batch.dirty.services.len(), 1);
        let round = reconciler.reconcile(&source, batch).expect("first round");
        assert!(round.problems.is_empty(), "{:?}", round.problems);
        assert!(reconciler.desired().frontends.contains_key(&frontend));

        fs::write(&file, "apiVersion: v1\nkind: Service\nmetadata: {name: web").expect("write");
        let batch = source.changed().await;
        assert!(batch.dirty.services.is_empty(), "no service changed");
        let round = reconciler
            .reconcile(&source, batch)
            .expect("a new problem is a round, so it is said and counted");
        assert!(
            round
                .problems
                .iter()
                .any(|p| p.warning && p.object.contains("web.yaml")),
            "the file is named: {:?}",
            round.problems
        );
        assert!(
            reconciler.desired().frontends.contains_key(&frontend),
            "the last good read still serves"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
