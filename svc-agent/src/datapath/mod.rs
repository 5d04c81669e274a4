//! Everything that touches the kernel: loading the eBPF object, attaching its
//! programs and reading or writing its maps.

mod loader;
mod stats;

pub use loader::{BpfLogLevel, Datapath, EBPF_OBJECT, LoadOptions, TC_PROGRAM};
pub use stats::StatsSnapshot;

/// Errors of the datapath layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the embedded eBPF object is empty: svc-agent was built without its datapath")]
    EmptyObject,
    #[error("loading the eBPF object failed")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no map {0}: it does not match svc-common")]
    MissingMap(&'static str),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to {iface}: {source}")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("starting the eBPF logger: {0}")]
    Logger(#[from] aya_log::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
