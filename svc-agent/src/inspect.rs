//! Inspection of a running (or stopped) agent's datapath: reads the pinned
//! maps, and the names the agent recorded for its frontends, for
//! `kubectl`-like tables or JSON.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use serde::{Deserialize, Serialize};
use svc_common::{
    ct::{CT_F_REPLY, CT_F_SNAT, CT_MAP, CtEntry, CtKey},
    lb::{
        BACKEND_STATS_MAP, BACKENDS_MAP, Backend, BackendId, MAGLEV_MAP, SERVICE_STATS_MAP,
        SERVICES_MAP, SVC_F_AFFINITY, SVC_F_LOCAL_ONLY, SVC_F_MASQ_ALWAYS, SVC_F_MASQ_NON_LOCAL,
        SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue,
    },
    maglev::MAX_TABLE_SIZE,
    proto,
    stats::CounterValue,
    wire::{FrontendId, socket},
};

use crate::{
    datapath::{Frontend, Protocol},
    model::{Desired, FrontendKind},
};

/// Default path of the frontend names `svc-agent run` records.
pub const DEFAULT_STATE_FILE: &str = "/run/svc-proxy/frontends.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening pinned map {path}: {source} (is `svc-agent run` using this --pin-dir?)")]
    Open {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading map {name}: {source}")]
    Read {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "a frontend's Maglev table at slot {offset}, {size} slots long, cannot be one of this agent's"
    )]
    BadTable { offset: u32, size: u32 },
    #[error("state file {path}: {source}")]
    State {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a frontend serves, as recorded by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendName {
    pub frontend: String,
    pub service: String,
    pub kind: FrontendKind,
}

const fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// `10.96.0.10:80/TCP` or `*:30080/TCP`; an in-cluster variant has
/// ` in-cluster` after its frontend's label.
#[must_use]
pub fn frontend_label(frontend: &Frontend) -> String {
    let label = match *frontend {
        Frontend::Address {
            addr,
            port,
            protocol,
        }
        | Frontend::AddressInCluster {
            addr,
            port,
            protocol,
        } => format!("{addr}:{port}/{}", protocol_name(protocol)),
        Frontend::NodePort { port, protocol } | Frontend::NodePortInCluster { port, protocol } => {
            format!("*:{port}/{}", protocol_name(protocol))
        }
    };
    if frontend.in_cluster().is_some() {
        label
    } else {
        format!("{label} in-cluster")
    }
}

/// Parses a [`frontend_label`]: `ADDR:PORT/PROTO` or `*:PORT/PROTO`
/// (protocol optional, TCP by default), with ` in-cluster` for a variant.
#[must_use]
pub fn parse_frontend(text: &str) -> Option<Frontend> {
    if let Some(outer) = text.strip_suffix(" in-cluster") {
        return parse_frontend(outer)?.in_cluster();
    }
    let (rest, protocol) = match text.rsplit_once('/') {
        Some((rest, p)) if p.eq_ignore_ascii_case("udp") => (rest, Protocol::Udp),
        Some((rest, p)) if p.eq_ignore_ascii_case("tcp") => (rest, Protocol::Tcp),
        Some(_) => return None,
        None => (text, Protocol::Tcp),
    };
    let (addr, port) = rest.rsplit_once(':')?;
    let port = port.parse().ok()?;
    if addr == "*" {
        return Some(Frontend::NodePort { port, protocol });
    }
    Some(Frontend::Address {
        addr: addr.parse().ok()?,
        port,
        protocol,
    })
}

/// Records the names of the desired frontends for the inspection
/// commands (written to a temporary file, then renamed into place).
pub fn write_state(path: &Path, desired: &Desired) -> Result<()> {
    let names: Vec<FrontendName> = desired
        .frontends
        .iter()
        .map(|(frontend, spec)| FrontendName {
            frontend: frontend_label(frontend),
            service: spec.service.to_string(),
            kind: spec.kind,
        })
        .collect();
    let state_error = |source| Error::State {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(state_error)?;
    }
    let text = serde_json::to_string_pretty(&names).map_err(|err| state_error(err.into()))?;
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(state_error)?;
    fs::rename(&tmp, path).map_err(state_error)
}

fn read_state(path: &Path) -> BTreeMap<String, FrontendName> {
    fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Vec<FrontendName>>(&text).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|name| (name.frontend.clone(), name))
        .collect()
}

/// The pinned maps the inspection commands read.
pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, Backend>,
    /// Slots: backend ids as `u32`s.
    maglev: Array<MapData, u32>,
    ct: HashMap<MapData, CtKey, CtEntry>,
    service_stats: PerCpuArray<MapData, CounterValue>,
    backend_stats: PerCpuArray<MapData, CounterValue>,
}

fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let open_error = |source| Error::Open {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(open_error)?;
    Map::from_map_data(data).map_err(open_error)
}

fn read_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Read { name, source }
}

fn sum(values: &aya::maps::PerCpuValues<CounterValue>) -> CounterValue {
    values
        .iter()
        .fold(CounterValue::default(), |a, v| a.add(*v))
}

/// One row of `svc-agent services`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub service: String,
    pub kind: String,
    pub id: u32,
    pub backends: Vec<String>,
    pub affinity_timeout_secs: Option<u32>,
    pub flags: Vec<&'static str>,
    pub maglev_slots: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// A frontend's Maglev table: its size and each backend's slots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MaglevShares {
    pub size: u32,
    /// Backend address and its number of slots.
    pub slots: Vec<(String, u32)>,
}

/// One row of `svc-agent conntrack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    pub protocol: &'static str,
    pub direction: &'static str,
    pub from: String,
    pub to: String,
    pub becomes_from: String,
    pub becomes_to: String,
    pub backend_id: u32,
    pub snat: bool,
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            services: HashMap::try_from(open(dir, SERVICES_MAP)?)
                .map_err(read_error(SERVICES_MAP))?,
            backends: Array::try_from(open(dir, BACKENDS_MAP)?)
                .map_err(read_error(BACKENDS_MAP))?,
            maglev: Array::try_from(open(dir, MAGLEV_MAP)?).map_err(read_error(MAGLEV_MAP))?,
            ct: HashMap::try_from(open(dir, CT_MAP)?).map_err(read_error(CT_MAP))?,
            service_stats: PerCpuArray::try_from(open(dir, SERVICE_STATS_MAP)?)
                .map_err(read_error(SERVICE_STATS_MAP))?,
            backend_stats: PerCpuArray::try_from(open(dir, BACKEND_STATS_MAP)?)
                .map_err(read_error(BACKEND_STATS_MAP))?,
        })
    }

    fn table(&self, value: &ServiceValue) -> Result<Vec<BackendId>> {
        let end = value
            .maglev_offset
            .checked_add(value.maglev_size)
            .filter(|_| value.maglev_size <= MAX_TABLE_SIZE)
            .ok_or(Error::BadTable {
                offset: value.maglev_offset,
                size: value.maglev_size,
            })?;
        (value.maglev_offset..end)
            .map(|slot| {
                let id = self.maglev.get(&slot, 0).map_err(read_error(MAGLEV_MAP))?;
                // 0 is no backend: a table this agent never writes.
                BackendId::new(id).ok_or(Error::BadTable {
                    offset: value.maglev_offset,
                    size: value.maglev_size,
                })
            })
            .collect()
    }

    fn backend_addr(&self, id: BackendId) -> Result<String> {
        let backend = self
            .backends
            .get(&id.get(), 0)
            .map_err(read_error(BACKENDS_MAP))?;
        Ok(socket(backend.addr, backend.port).to_string())
    }

    /// Every frontend, with names from `state_file` where recorded.
    pub fn services(&self, state_file: &Path) -> Result<Vec<ServiceRow>> {
        let names = read_state(state_file);
        let mut rows = Vec::new();
        for entry in &self.services {
            let (key, value) = entry.map_err(read_error(SERVICES_MAP))?;
            let Some(frontend) = Frontend::from_key(&key) else {
                continue;
            };
            let label = frontend_label(&frontend);
            let mut ids = self.table(&value)?;
            ids.sort_unstable();
            ids.dedup();
            let backends = ids
                .into_iter()
                .map(|id| self.backend_addr(id))
                .collect::<Result<_>>()?;
            let mut flags = Vec::new();
            // Who keeps their address: sources that are not local lose it
            // by default (kube-proxy's rule), every source with
            // --masquerade-all, none with a Local policy.
            if value.flags & SVC_F_MASQ_ALWAYS != 0 {
                flags.push("masquerade-all");
            } else if value.flags & SVC_F_MASQ_NON_LOCAL == 0 {
                flags.push("keep-source");
            }
            if value.flags & SVC_F_LOCAL_ONLY != 0 {
                flags.push("local-only");
            }
            if value.flags & SVC_F_SOURCE_RANGES != 0 {
                flags.push("source-ranges");
            }
            let stats = self.service_counters(value.id)?;
            let name = names.get(&label);
            let kind = match (name, frontend) {
                (Some(name), _) => name.kind.name(),
                (None, Frontend::NodePort { .. } | Frontend::NodePortInCluster { .. }) => {
                    "NodePort"
                }
                (None, Frontend::Address { .. } | Frontend::AddressInCluster { .. }) => "?",
            };
            rows.push(ServiceRow {
                service: name.map_or_else(|| "?".to_owned(), |n| n.service.clone()),
                kind: kind.to_owned(),
                frontend: label,
                id: value.id.get(),
                backends,
                affinity_timeout_secs: (value.flags & SVC_F_AFFINITY != 0)
                    .then_some(value.affinity_timeout_secs),
                flags,
                maglev_slots: value.maglev_size,
                packets: stats.packets,
                bytes: stats.bytes,
            });
        }
        rows.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
        Ok(rows)
    }

    /// The traffic counted for service id `id` (summed over CPUs).
    pub fn service_counters(&self, id: FrontendId) -> Result<CounterValue> {
        Ok(sum(&self
            .service_stats
            .get(&id.get(), 0)
            .map_err(read_error(SERVICE_STATS_MAP))?))
    }

    /// A frontend's table size and each backend's number of slots; `None`
    /// when the frontend is not installed.
    pub fn maglev(&self, frontend: &Frontend) -> Result<Option<MaglevShares>> {
        let Ok(value) = self.services.get(&frontend.key(), 0) else {
            return Ok(None);
        };
        let mut shares: BTreeMap<BackendId, u32> = BTreeMap::new();
        for id in self.table(&value)? {
            *shares.entry(id).or_default() += 1;
        }
        let rows = shares
            .into_iter()
            .map(|(id, slots)| Ok((self.backend_addr(id)?, slots)))
            .collect::<Result<_>>()?;
        Ok(Some(MaglevShares {
            size: value.maglev_size,
            slots: rows,
        }))
    }

    /// The backends a frontend's table names, with their traffic.
    pub fn backends_of(
        &self,
        frontend: &Frontend,
    ) -> Result<Vec<(String, BackendId, CounterValue)>> {
        let Ok(value) = self.services.get(&frontend.key(), 0) else {
            return Ok(Vec::new());
        };
        let mut ids = self.table(&value)?;
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                let counters = sum(&self
                    .backend_stats
                    .get(&id.get(), 0)
                    .map_err(read_error(BACKEND_STATS_MAP))?);
                Ok((self.backend_addr(id)?, id, counters))
            })
            .collect()
    }

    /// Every connection-tracking entry whose tuples contain `filter`.
    pub fn conntrack(&self, filter: Option<&str>) -> Result<Vec<FlowRow>> {
        let mut rows = Vec::new();
        for entry in &self.ct {
            let (key, value) = entry.map_err(read_error(CT_MAP))?;
            let row = FlowRow {
                protocol: match key.protocol {
                    proto::TCP => "TCP",
                    proto::UDP => "UDP",
                    _ => "?",
                },
                direction: if value.flags & CT_F_REPLY == 0 {
                    "original"
                } else {
                    "reply"
                },
                from: socket(key.saddr, key.sport).to_string(),
                to: socket(key.daddr, key.dport).to_string(),
                becomes_from: socket(value.saddr, value.sport).to_string(),
                becomes_to: socket(value.daddr, value.dport).to_string(),
                backend_id: value.backend_id,
                snat: value.flags & CT_F_SNAT != 0,
            };
            let text = format!(
                "{} {} {} {}",
                row.from, row.to, row.becomes_from, row.becomes_to
            );
            if filter.is_none_or(|f| text.contains(f)) {
                rows.push(row);
            }
        }
        rows.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
        Ok(rows)
    }
}

/// Renders rows as an aligned table under upper-case headers.
#[must_use]
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (cell, width) in cells.iter().zip(&widths) {
            let _ = write!(text, "{cell:<width$}   ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&headers.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_labels_parse_back() {
        for text in [
            "10.96.0.10:80/TCP",
            "*:30080/UDP",
            "192.0.2.1:443/TCP",
            "192.0.2.1:443/TCP in-cluster",
            "*:30080/TCP in-cluster",
        ] {
            let frontend = parse_frontend(text).expect("parses");
            assert_eq!(frontend_label(&frontend), text);
        }
        assert_eq!(
            parse_frontend("10.96.0.10:80"),
            parse_frontend("10.96.0.10:80/TCP")
        );
        assert!(parse_frontend("10.96.0.10:80/SCTP").is_none());
        assert!(parse_frontend("nonsense").is_none());
    }

    #[test]
    fn tables_align_columns() {
        let out = table(
            &["NAME", "PORT"],
            &[
                vec!["a".to_owned(), "80".to_owned()],
                vec!["longer".to_owned(), "8080".to_owned()],
            ],
        );
        assert_eq!(out, "NAME     PORT\na        80\nlonger   8080\n");
    }
}
