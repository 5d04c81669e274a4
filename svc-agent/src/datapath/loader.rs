//! Loading the embedded eBPF object and attaching its programs.

use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TestRun as _, TestRunOptions,
        links::PinnedLink,
    },
};
use aya_log::EbpfLogger;
use svc_common::{
    config::{CONFIG_GLOBAL, DatapathConfig, DatapathMeta, META_F_CLOCK, META_MAP},
    ct::{CT_MAP, CtEntry, CtKey, DEFAULT_CT_ENTRIES, DIRECT_MAP, FRAG_MAP},
    lb::{
        ADDRS_MAP, AFFINITY_MAP, BACKEND_STATS_MAP, BACKENDS_MAP, CIDRS_MAP, DEFAULT_MAGLEV_SLOTS,
        DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, MAGLEV_MAP,
        MAX_NODE_ADDRS, MEMBERS_MAP, SERVICE_STATS_MAP, SERVICES_MAP, SOURCE_RANGES_MAP,
    },
    maglev::DEFAULT_SLOTS_PER_BACKEND,
    sock::{DEFAULT_SOCK_REVNAT_ENTRIES, SOCK_REVNAT_MAP},
    stats::STATS_MAP,
};

use super::{
    Error, Maps, Result, StatsSnapshot, conntrack, sys,
    tc_links::{self, Direction, TcLinks},
};

/// The eBPF object built by `build.rs` from `svc-ebpf`.
pub static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/svc-ebpf"));

/// tc ingress on the host side of pod veths.
pub const FROM_POD_PROGRAM: &str = "svc_from_pod";
/// tc egress on the host side of pod veths and on uplinks: replies of
/// host-network endpoints on this node.
pub const EGRESS_PROGRAM: &str = "svc_egress";
/// The programs of a pod veth, as the agent and the CNI plugin attach
/// them (egress first, so a flow's replies are handled before its first
/// packet can be translated).
pub const POD_PROGRAMS: [(&str, Direction); 2] = [
    (EGRESS_PROGRAM, Direction::Egress),
    (FROM_POD_PROGRAM, Direction::Ingress),
];
/// tc ingress on node uplinks.
pub const FROM_UPLINK_PROGRAM: &str = "svc_from_uplink";
/// Never attached: run to read the programs' clock.
pub const CLOCK_PROGRAM: &str = "svc_clock";
/// The cgroup `sock_addr` programs for host processes.
pub const SOCK_PROGRAMS: [&str; 4] = [
    "svc_connect4",
    "svc_sendmsg4",
    "svc_recvmsg4",
    "svc_getpeername4",
];

/// Default bpffs directory of `svc-agent run`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/svc-proxy";

/// Maps the agent relies on (and pins); loading fails if the object lacks
/// one.
const REQUIRED_MAPS: &[&str] = &[
    META_MAP,
    STATS_MAP,
    SERVICES_MAP,
    BACKENDS_MAP,
    MAGLEV_MAP,
    ADDRS_MAP,
    CIDRS_MAP,
    AFFINITY_MAP,
    MEMBERS_MAP,
    CT_MAP,
    SERVICE_STATS_MAP,
    BACKEND_STATS_MAP,
    SOCK_REVNAT_MAP,
    SOURCE_RANGES_MAP,
    FRAG_MAP,
    DIRECT_MAP,
];

/// Level of the eBPF programs' own log lines (aya-log), fixed at load time.
/// The per-packet path only logs at debug and trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[repr(u8)]
pub enum BpfLogLevel {
    #[default]
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// Map sizes, fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Connection-tracking entries (two per translated flow).
    pub ct_entries: u32,
    pub services: u32,
    pub backends: u32,
    /// Slots of the shared Maglev array.
    pub maglev_slots: u32,
    pub affinity_entries: u32,
    pub sock_revnat_entries: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            ct_entries: DEFAULT_CT_ENTRIES,
            services: DEFAULT_MAX_SERVICES,
            backends: DEFAULT_MAX_BACKENDS,
            maglev_slots: DEFAULT_MAGLEV_SLOTS,
            affinity_entries: DEFAULT_MAX_AFFINITY,
            sock_revnat_entries: DEFAULT_SOCK_REVNAT_ENTRIES,
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub bpf_log_level: BpfLogLevel,
    pub config: DatapathConfig,
    pub capacities: Capacities,
    /// Minimum Maglev slots per backend (the table is the next prime up).
    pub maglev_slots_per_backend: u32,
    /// A bpffs directory to pin the maps and tc links in. The datapath
    /// then outlives the agent: a later load adopts the maps (connection
    /// tracking included) and takes the links over in place.
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            bpf_log_level: BpfLogLevel::default(),
            config: DatapathConfig::DEFAULT,
            capacities: Capacities::default(),
            maglev_slots_per_backend: DEFAULT_SLOTS_PER_BACKEND,
            pin_dir: None,
        }
    }
}

/// The loaded datapath. Dropping it detaches and unloads everything.
pub struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    /// The configuration the programs were loaded with.
    config: DatapathConfig,
    pin_dir: Option<PathBuf>,
    /// Whether the maps came from an earlier run's pins.
    adopted: bool,
    // Held so the pins' links stay ours until drop; the pins keep them
    // attached after.
    pinned_links: Vec<PinnedLink>,
    /// The tc attachments, by interface index.
    tc_links: TcLinks,
}

impl Datapath {
    /// Loads the embedded object and its programs (not yet attached).
    pub fn load(options: &LoadOptions) -> Result<Self> {
        Self::load_object(EBPF_OBJECT, options)
    }

    fn load_object(object: &[u8], options: &LoadOptions) -> Result<Self> {
        if object.is_empty() {
            return Err(Error::EmptyObject);
        }
        let level = options.bpf_log_level as u8;
        let caps = options.capacities;
        let mut adopted = false;
        if let Some(dir) = &options.pin_dir {
            ensure_bpffs()?;
            fs::create_dir_all(dir.join("links")).map_err(|source| Error::Pin {
                path: dir.clone(),
                source,
            })?;
            adopted = dir.join(SERVICES_MAP).exists();
        }
        let mut config = options.config;
        if config.ns_per_tick == 0 {
            config.ns_per_tick = super::tick_ns().unwrap_or(0);
        }
        // Pinned entries keep the clock they were stamped with: read with
        // another, they would never expire, or expire at once.
        if adopted
            && let Some(dir) = &options.pin_dir
            && let Some(tick) = pinned_tick(dir)
        {
            if tick != config.ns_per_tick {
                tracing::info!(
                    ns_per_tick = tick,
                    "keeping the clock the pinned connection tracking was stamped with"
                );
            }
            config.ns_per_tick = tick;
        }
        let mut loader = EbpfLoader::new();
        if let Some(dir) = &options.pin_dir {
            for &name in REQUIRED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .override_global(aya_log::LEVEL, &level, true)
            .override_global(CONFIG_GLOBAL, &config, true)
            .map_max_entries(CT_MAP, caps.ct_entries)
            .map_max_entries(SERVICES_MAP, caps.services)
            .map_max_entries(ADDRS_MAP, caps.services.saturating_add(MAX_NODE_ADDRS))
            .map_max_entries(SERVICE_STATS_MAP, caps.services)
            .map_max_entries(BACKENDS_MAP, caps.backends)
            .map_max_entries(BACKEND_STATS_MAP, caps.backends)
            .map_max_entries(MEMBERS_MAP, caps.backends)
            .map_max_entries(MAGLEV_MAP, caps.maglev_slots)
            .map_max_entries(AFFINITY_MAP, caps.affinity_entries)
            .map_max_entries(SOCK_REVNAT_MAP, caps.sock_revnat_entries)
            .load(object)?;
        for &name in REQUIRED_MAPS {
            if ebpf.map(name).is_none() {
                return Err(Error::MissingMap(name));
            }
        }
        for name in [
            FROM_POD_PROGRAM,
            EGRESS_PROGRAM,
            FROM_UPLINK_PROGRAM,
            CLOCK_PROGRAM,
        ] {
            let program = classifier_mut(&mut ebpf, name)?;
            retry_interrupted(|| program.load())
                .map_err(|source| Error::Program { name, source })?;
        }
        for name in SOCK_PROGRAMS {
            let program = sock_program_mut(&mut ebpf, name)?;
            retry_interrupted(|| program.load())
                .map_err(|source| Error::Program { name, source })?;
        }
        record_tick(&mut ebpf, config.ns_per_tick)?;
        let mut maps = Maps::take(&mut ebpf, options.maglev_slots_per_backend)?;
        if adopted {
            // Ids that only live flows name stay reserved.
            let now = clock_now(&ebpf)?;
            let named = conntrack::named_ids(maps.sweep_maps(), now, &config)
                .map_err(|err| Error::Adopt(format!("reading connection tracking: {err}")))?;
            maps.adopt(named)?;
        }
        if let Some(dir) = &options.pin_dir {
            remove_stale_pins(dir);
        }
        Ok(Self {
            ebpf,
            maps,
            config,
            pin_dir: options.pin_dir.clone(),
            adopted,
            pinned_links: Vec::new(),
            tc_links: TcLinks::default(),
        })
    }

    /// The configuration the programs were loaded with.
    #[must_use]
    pub const fn config(&self) -> &DatapathConfig {
        &self.config
    }

    /// The programs' clock now, as connection-tracking stamps read it
    /// (the clock program run through `BPF_PROG_TEST_RUN`).
    pub fn now_ns(&self) -> Result<u64> {
        clock_now(&self.ebpf)
    }

    /// Whether the maps were adopted from an earlier run's pins.
    #[must_use]
    pub const fn adopted(&self) -> bool {
        self.adopted
    }

    /// Removes everything pinned under `dir`: the maps are freed and the
    /// links detach once no program holds them.
    pub fn cleanup(dir: &Path) -> Result<()> {
        match fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Pin {
                path: dir.to_owned(),
                source,
            }),
        }
    }

    /// Takes the eBPF log ring buffer; poll the returned logger to forward
    /// the programs' log lines to `tracing`.
    pub fn logger(&mut self) -> Result<EbpfLogger<&'static dyn log::Log>> {
        Ok(EbpfLogger::init(&mut self.ebpf)?)
    }

    /// Attaches the pod programs to a pod veth's host side (egress and
    /// ingress), in the caller's network namespace. The links live as long
    /// as `self`.
    pub fn attach_pod(&mut self, iface: &str) -> Result<()> {
        for (program, direction) in POD_PROGRAMS {
            self.attach_tc(program, direction, iface)?;
        }
        Ok(())
    }

    /// Attaches the uplink programs to a node uplink (egress, then
    /// ingress).
    pub fn attach_uplink(&mut self, iface: &str) -> Result<()> {
        self.attach_tc(EGRESS_PROGRAM, Direction::Egress, iface)?;
        self.attach_tc(FROM_UPLINK_PROGRAM, Direction::Ingress, iface)
    }

    fn attach_tc(
        &mut self,
        program: &'static str,
        direction: Direction,
        iface: &str,
    ) -> Result<()> {
        let index = super::ifaces::index_of(iface).ok_or_else(|| Error::Link {
            iface: iface.to_owned(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        if self.tc_links.has(index, direction, iface) {
            return Ok(());
        }
        tc_links::prepare_iface(iface)?;
        let classifier = classifier_mut(&mut self.ebpf, program)?;
        let (pin, handle) = match &self.pin_dir {
            Some(dir) => {
                let (path, handle) =
                    tc_links::attach_pinned(classifier, program, dir, (iface, index), direction)?;
                (Some(path), handle)
            }
            None => (
                None,
                tc_links::attach_held(classifier, program, direction, iface)?,
            ),
        };
        self.tc_links.insert((index, direction), iface, pin, handle);
        Ok(())
    }

    /// Whether a tc link running the pod program (the CNI plugin's, or an
    /// earlier run's) is pinned for interface `index` named `iface`: the
    /// agent takes it over whatever the name patterns say.
    #[must_use]
    pub fn has_pod_link_pin(&self, index: u32, iface: &str) -> bool {
        self.pin_dir.as_deref().is_some_and(|dir| {
            tc_links::pinned_link_program(&tc_links::pin_path(
                dir,
                Direction::Ingress,
                iface,
                index,
            ))
            .as_deref()
                == Some(FROM_POD_PROGRAM)
        })
    }

    /// Pins the pod programs where the CNI plugin finds them
    /// (`<pin dir>/progs/`), replacing an earlier run's in one step each
    /// (egress first, as the plugin attaches them): from then on new pods
    /// get this datapath before their first packet.
    pub fn publish_pod_program(&mut self) -> Result<()> {
        let Some(dir) = self.pin_dir.clone() else {
            return Ok(());
        };
        for (program, _) in POD_PROGRAMS {
            let classifier = classifier_mut(&mut self.ebpf, program)?;
            tc_links::publish_program(classifier, &dir, program)?;
        }
        Ok(())
    }

    /// Whether interface `index` named `iface` is attached (at ingress,
    /// which a pod veth gets last).
    #[must_use]
    pub fn is_attached(&self, index: u32, iface: &str) -> bool {
        self.tc_links.has(index, Direction::Ingress, iface)
    }

    /// Lets go of the attachments (and pins) of interfaces that are not in
    /// `present` ((index, name) of every interface of the namespace), and
    /// of every other tc pin but those of present interfaces: an earlier
    /// run's for interfaces that went, an older interface's of a reused
    /// name, the layout without an index (after the attachments that
    /// replace them, so no packet goes untranslated). Returns the names of
    /// the attached interfaces that went.
    pub fn detach_absent(&mut self, present: &[(u32, String)]) -> Vec<String> {
        let gone = self.tc_links.retain_present(present);
        if let Some(dir) = &self.pin_dir {
            tc_links::prune_pins(dir, |name, index| {
                index.is_some_and(|index| present.iter().any(|(i, n)| *i == index && n == name))
            });
        }
        gone
    }

    /// Attaches the socket programs to the cgroup v2 hierarchy's root, so
    /// they see every socket of the machine; they translate only those of
    /// the network namespace whose cookie the datapath was loaded with.
    pub fn attach_host_sockets(&mut self) -> Result<PathBuf> {
        let root = cgroup2_mount()?;
        let cgroup = fs::File::open(&root).map_err(|source| Error::Cgroup {
            path: root.clone(),
            source,
        })?;
        for name in SOCK_PROGRAMS {
            let attach_error = |source| Error::Attach {
                program: name,
                iface: root.display().to_string(),
                source,
            };
            let pin = self
                .pin_dir
                .as_ref()
                .map(|dir| dir.join("links").join(format!("cgroup-{name}")));
            let program = sock_program_mut(&mut self.ebpf, name)?;
            if let Some(pin) = &pin
                && pin.exists()
            {
                // An earlier run's link: swap our program in, so host
                // sockets stay translated across the restart.
                let prog_fd = program.fd().map_err(attach_error)?;
                if sys::link_update(pin, prog_fd.as_fd()).is_ok() {
                    continue;
                }
                let _ = fs::remove_file(pin);
            }
            // A bpf_link attachment: other programs on the cgroup stay, and
            // link_create takes no attach flags.
            let id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            if let Some(pin) = pin {
                let link = program.take_link(id).map_err(attach_error)?;
                self.pinned_links.push(tc_links::pin_link(link, &pin)?);
            }
        }
        Ok(root)
    }

    /// A loaded tc program by name, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn tc_program(&self, name: &'static str) -> Result<&SchedClassifier> {
        let program = self.ebpf.program(name).ok_or(Error::MissingProgram(name))?;
        program
            .try_into()
            .map_err(|source| Error::Program { name, source })
    }

    /// The service, backend and connection-tracking maps.
    #[must_use]
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The maps, for writing.
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Current packet counters, summed over CPUs.
    pub fn stats(&self) -> Result<StatsSnapshot> {
        StatsSnapshot::read(&self.ebpf)
    }
}

/// The clock the maps pinned under `dir` were stamped with: as recorded in
/// `SVC_META_V1`, or for pins of an agent that did not record it, as their
/// connection-tracking stamps tell ([`super::clock::infer_tick`]); `None`
/// when nothing tells.
fn pinned_tick(dir: &Path) -> Option<u64> {
    let meta = dir.join(META_MAP);
    if meta.exists() {
        let map = aya::maps::MapData::from_pin(&meta).ok()?;
        let array: aya::maps::Array<_, DatapathMeta> =
            aya::maps::Array::try_from(aya::maps::Map::Array(map)).ok()?;
        let value = array.get(&0, 0).ok()?;
        if value.flags & META_F_CLOCK != 0 {
            return Some(value.ns_per_tick);
        }
    }
    let ct = aya::maps::MapData::from_pin(dir.join(CT_MAP)).ok()?;
    let entries: Vec<(CtKey, CtEntry)> = sys::dump(ct.fd().as_fd()).ok()?;
    let newest = entries.iter().map(|(_, entry)| entry.last_seen_ns).max();
    super::clock::infer_tick(
        newest,
        super::coarse_now_ns()?,
        super::tick_ns().unwrap_or(0),
    )
}

/// Records the clock the programs stamp with in `SVC_META_V1`.
fn record_tick(ebpf: &mut Ebpf, ns_per_tick: u64) -> Result<()> {
    let map = ebpf.map_mut(META_MAP).ok_or(Error::MissingMap(META_MAP))?;
    let mut array: aya::maps::Array<_, DatapathMeta> =
        aya::maps::Array::try_from(map).map_err(|source| Error::Map {
            name: META_MAP,
            source,
        })?;
    let meta = DatapathMeta {
        ns_per_tick,
        flags: META_F_CLOCK,
        _pad: 0,
    };
    array.set(0, meta, 0).map_err(|source| Error::Map {
        name: META_MAP,
        source,
    })
}

/// Loads a program, again when the verifier gave up with `EAGAIN`: it does
/// when a signal arrives for the thread while it works (a child process
/// exiting, in a process that runs commands), as libbpf knows and retries.
fn retry_interrupted(
    mut load: impl FnMut() -> std::result::Result<(), aya::programs::ProgramError>,
) -> std::result::Result<(), aya::programs::ProgramError> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Runs the clock program (see [`Datapath::now_ns`]).
fn clock_now(ebpf: &Ebpf) -> Result<u64> {
    let program: &SchedClassifier = ebpf
        .program(CLOCK_PROGRAM)
        .ok_or(Error::MissingProgram(CLOCK_PROGRAM))?
        .try_into()
        .map_err(|source| Error::Program {
            name: CLOCK_PROGRAM,
            source,
        })?;
    // An Ethernet header's worth, the least a tc program is run with.
    let data = [0u8; 64];
    let mut out = [0u8; 64];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&data),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .map_err(|err| Error::Clock(err.to_string()))?;
    if result.return_value != 0 {
        return Err(Error::Clock(format!(
            "the clock program returned {}",
            result.return_value
        )));
    }
    let mut now = [0u8; 8];
    now.copy_from_slice(&out[..8]);
    Ok(u64::from_ne_bytes(now))
}

fn classifier_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn sock_program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr> {
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// Removes pinned maps this object no longer has: a map whose layout
/// changed has a new `_V<n>` name, and its old pin would linger until a
/// cleanup. Best effort: a pin that cannot be removed only wastes memory.
fn remove_stale_pins(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_file = entry.file_type().is_ok_and(|kind| kind.is_file());
        if is_file && !REQUIRED_MAPS.iter().any(|map| name == *map) {
            let path = entry.path();
            if let Err(err) = fs::remove_file(&path) {
                tracing::warn!(pin = %path.display(), error = %err, "cannot remove a stale pin");
            } else {
                tracing::info!(pin = %path.display(), "removed a map pinned by an older layout");
            }
        }
    }
}

/// Where bpffs lives.
const BPFFS: &str = "/sys/fs/bpf";
/// `statfs`'s `f_type` of bpffs (signed with glibc, unsigned with musl).
const BPF_FS_MAGIC: i128 = 0xcafe_4a11;

/// Mounts bpffs at `/sys/fs/bpf` unless it is there already (a fresh
/// machine may not have it mounted).
fn ensure_bpffs() -> Result<()> {
    let path = std::ffi::CString::new(BPFFS).map_err(|_| Error::Pin {
        path: PathBuf::from(BPFFS),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    let pin_error = |source| Error::Pin {
        path: PathBuf::from(BPFFS),
        source,
    };
    // SAFETY: a zeroed statfs is a valid out-parameter.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid buffer.
    if unsafe { libc::statfs(path.as_ptr(), &raw mut stat) } != 0 {
        return Err(pin_error(std::io::Error::last_os_error()));
    }
    if i128::from(stat.f_type) == BPF_FS_MAGIC {
        return Ok(());
    }
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(pin_error(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Where the agent mounts cgroup v2 when its mount namespace has none.
const CGROUP2_FALLBACK: &str = "/run/svc-proxy/cgroupv2";

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mounts`.
/// When this mount namespace hides it (`ip netns exec` remounts `/sys`),
/// the agent mounts it itself, as Cilium does.
pub fn cgroup2_mount() -> Result<PathBuf> {
    if let Some(dir) = find_cgroup2(Path::new("/proc/self/mounts"))? {
        return Ok(dir);
    }
    let dir = PathBuf::from(CGROUP2_FALLBACK);
    let cgroup_error = |source| Error::Cgroup {
        path: dir.clone(),
        source,
    };
    fs::create_dir_all(&dir).map_err(cgroup_error)?;
    let target = std::ffi::CString::new(CGROUP2_FALLBACK).map_err(|_| Error::NoCgroup2)?;
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(cgroup_error(std::io::Error::last_os_error()));
    }
    Ok(dir)
}

fn find_cgroup2(mounts: &Path) -> Result<Option<PathBuf>> {
    let text = fs::read_to_string(mounts).map_err(|source| Error::Cgroup {
        path: mounts.to_owned(),
        source,
    })?;
    Ok(text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(dir))
    }))
}

/// `SO_NETNS_COOKIE` (Linux 5.14); not in every libc crate version.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace, the value the
/// socket programs compare with `DatapathConfig::host_netns_cookie`.
pub fn current_netns_cookie() -> Result<u64> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(Error::NetnsCookie(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap_or(8);
    // SAFETY: a valid socket and a buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(Error::NetnsCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EM_BPF: u16 = 247;

    #[test]
    fn embedded_object_is_an_elf_bpf_object() {
        assert!(
            EBPF_OBJECT.len() > 64,
            "embedded eBPF object is {} bytes: the eBPF build produced nothing",
            EBPF_OBJECT.len()
        );
        assert_eq!(
            &EBPF_OBJECT[..4],
            b"\x7fELF",
            "embedded eBPF object is not ELF"
        );
        let machine = u16::from_le_bytes([EBPF_OBJECT[18], EBPF_OBJECT[19]]);
        assert_eq!(
            machine, EM_BPF,
            "embedded object is not for the BPF machine"
        );
    }

    #[test]
    fn empty_object_is_refused_by_name() {
        let err = Datapath::load_object(&[], &LoadOptions::default())
            .err()
            .expect("an empty object must not load");
        assert!(matches!(err, Error::EmptyObject), "unexpected error: {err}");
    }
}
