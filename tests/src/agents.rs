//! The agent's own pipeline on each node of a [`Cluster`], in this process:
//! a manifest directory watched, translated and applied, and connection
//! tracking swept, as `svc-agent run --manifests` does (without its timers:
//! a test says when to poll and when to sweep).

use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use svc_agent::{
    datapath::conntrack::{self, SweepReport},
    model::{NodeInfo, Settings, Translator},
    source::manifests::Watch,
    sync::Applier,
};

use crate::topology::Cluster;

/// One agent per node, reading one shared directory.
pub struct Agents {
    pub dir: PathBuf,
    pub per_node: Vec<(Watch, Translator, Applier)>,
}

impl Agents {
    /// Agents with the default settings, each node's pods on its own
    /// `10.244.<node>.0/24`.
    #[must_use]
    pub fn new(cluster: &Cluster) -> Self {
        Self::with_settings(cluster, &Settings::default())
    }

    #[must_use]
    pub fn with_settings(cluster: &Cluster, settings: &Settings) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "svc-manifests-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("manifest directory");
        let per_node = cluster
            .nodes
            .iter()
            .map(|node| {
                (
                    Watch::new(&dir),
                    Translator::new(node_info(node), settings.clone()),
                    Applier::new(),
                )
            })
            .collect();
        Self { dir, per_node }
    }

    pub fn write(&self, file: &str, text: &str) {
        fs::write(self.dir.join(file), text).expect("write manifest");
    }

    pub fn remove(&self, file: &str) {
        fs::remove_file(self.dir.join(file)).expect("remove manifest");
    }

    /// One poll on every node, as the agent's loop does; panics on any
    /// problem in the manifests or error applying them. Returns whether
    /// each node's agent would sweep now.
    pub fn sync(&mut self, cluster: &mut Cluster) -> Vec<bool> {
        let mut sweeps = Vec::new();
        for ((watch, translator, applier), node) in self.per_node.iter_mut().zip(&mut cluster.nodes)
        {
            assert!(
                watch.poll().expect("the directory is readable"),
                "the edit is seen"
            );
            let problems: Vec<_> = watch.problems().collect();
            assert!(problems.is_empty(), "{problems:?}");
            translator.update(watch.take_dirty(), &*watch);
            let problems = translator.problems();
            assert!(problems.iter().all(|p| !p.warning), "{problems:?}");
            let report = applier.apply(node.datapath_mut().maps_mut(), translator.desired());
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            sweeps.push(report.sweep_wanted);
        }
        sweeps
    }

    /// [`Agents::sync`], then a sweep of connection tracking on every node,
    /// as the agent runs one after such a change.
    pub fn sync_and_sweep(&mut self, cluster: &mut Cluster) -> Vec<SweepReport> {
        self.sync(cluster);
        self.sweep(cluster)
    }

    /// A sweep of connection tracking on every node, through the agent's
    /// code (on this thread rather than a blocking task).
    pub fn sweep(&mut self, cluster: &mut Cluster) -> Vec<SweepReport> {
        let mut reports = Vec::new();
        for ((_, _, applier), node) in self.per_node.iter_mut().zip(&mut cluster.nodes) {
            let datapath = node.datapath_mut();
            let now = datapath.now_ns().expect("the datapath's clock");
            let config = *datapath.config();
            let pending = applier.begin_sweep(datapath.maps_mut(), now, &config);
            let report = conntrack::sweep(datapath.maps().sweep_maps(), &pending.plan)
                .unwrap_or_else(|err| panic!("{}: sweep: {err}", node.name));
            applier.finish_sweep(node.datapath_mut().maps_mut(), &pending, &report);
            reports.push(report);
        }
        reports
    }
}

/// What the translation knows of a test node.
#[must_use]
pub fn node_info(node: &crate::topology::Node) -> NodeInfo {
    NodeInfo {
        name: node.name.to_owned(),
        addrs: vec![node.addr],
        zone: None,
        pod_cidrs: vec![node.pod_cidr()],
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
