//! Loading the embedded eBPF object and attaching its programs.

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLinkId},
};
use aya_log::EbpfLogger;
use svc_common::stats::STATS_MAP;

use super::{Error, Result, StatsSnapshot};

/// The eBPF object built by `build.rs` from `svc-ebpf`.
pub static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/svc-ebpf"));

/// The tc program attached at ingress of pod veths and uplinks.
pub const TC_PROGRAM: &str = "svc_tc";

/// Maps the agent relies on; loading fails if the object lacks one.
const REQUIRED_MAPS: &[&str] = &[STATS_MAP];

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

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub bpf_log_level: BpfLogLevel,
}

/// The loaded datapath. Dropping it detaches and unloads everything.
pub struct Datapath {
    ebpf: Ebpf,
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
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, true)
            .load(object)?;
        for &name in REQUIRED_MAPS {
            if ebpf.map(name).is_none() {
                return Err(Error::MissingMap(name));
            }
        }
        let program = tc_program_mut(&mut ebpf)?;
        program.load().map_err(|source| Error::Program {
            name: TC_PROGRAM,
            source,
        })?;
        Ok(Self { ebpf })
    }

    /// Takes the eBPF log ring buffer; poll the returned logger to forward
    /// the programs' log lines to `tracing`.
    pub fn logger(&mut self) -> Result<EbpfLogger<&'static dyn log::Log>> {
        Ok(EbpfLogger::init(&mut self.ebpf)?)
    }

    /// Attaches the tc program at ingress of `iface` (as a tcx link). The
    /// link lives as long as `self`.
    pub fn attach_tc(&mut self, iface: &str) -> Result<SchedClassifierLinkId> {
        tc_program_mut(&mut self.ebpf)?
            .attach(iface, TcAttachType::Ingress)
            .map_err(|source| Error::Attach {
                program: TC_PROGRAM,
                iface: iface.to_owned(),
                source,
            })
    }

    /// The loaded tc program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn tc_program(&self) -> Result<&SchedClassifier> {
        let program = self
            .ebpf
            .program(TC_PROGRAM)
            .ok_or(Error::MissingProgram(TC_PROGRAM))?;
        program.try_into().map_err(|source| Error::Program {
            name: TC_PROGRAM,
            source,
        })
    }

    /// Current packet counters, summed over CPUs.
    pub fn stats(&self) -> Result<StatsSnapshot> {
        StatsSnapshot::read(&self.ebpf)
    }
}

fn tc_program_mut(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    let program = ebpf
        .program_mut(TC_PROGRAM)
        .ok_or(Error::MissingProgram(TC_PROGRAM))?;
    program.try_into().map_err(|source| Error::Program {
        name: TC_PROGRAM,
        source,
    })
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
