//! The inspection subcommands: read the pinned maps and print tables or
//! JSON.

use anyhow::{Context as _, Result};
use serde::Serialize;
use svc_agent::inspect::{PinnedMaps, parse_frontend, table};

use crate::cli::{InspectArgs, Output};

fn open(args: &InspectArgs) -> Result<PinnedMaps> {
    PinnedMaps::open(&args.pin_dir).context("opening the pinned datapath")
}

fn print<T: Serialize>(
    output: Output,
    value: &T,
    headers: &[&str],
    rows: &[Vec<String>],
) -> Result<()> {
    let text = match output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(value)?),
        Output::Table => table(headers, rows),
    };
    write_stdout(&text)
}

/// Writes to standard output. A reader that went away (`| head`) ends the
/// output quietly rather than as an error (or a panic, as `print!` would).
fn write_stdout(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to standard output"),
    }
}

pub fn services(args: &InspectArgs) -> Result<()> {
    let rows = open(args)?.services(&args.state_file)?;
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.service.clone(),
                r.kind.clone(),
                r.frontend.clone(),
                r.backends.len().to_string(),
                r.affinity_timeout_secs
                    .map_or_else(|| "-".to_owned(), |s| format!("{s}s")),
                if r.flags.is_empty() {
                    "-".to_owned()
                } else {
                    r.flags.join(",")
                },
                r.packets.to_string(),
                r.bytes.to_string(),
            ]
        })
        .collect();
    print(
        args.output,
        &rows,
        &[
            "SERVICE", "TYPE", "FRONTEND", "BACKENDS", "AFFINITY", "FLAGS", "PACKETS", "BYTES",
        ],
        &cells,
    )
}

#[derive(Serialize)]
struct BackendRow {
    frontend: String,
    backend: String,
    id: u32,
    packets: u64,
    bytes: u64,
}

pub fn backends(service: &str, args: &InspectArgs) -> Result<()> {
    let maps = open(args)?;
    let mut rows = Vec::new();
    for frontend in maps.services(&args.state_file)? {
        let matches = frontend.service == service
            || frontend
                .service
                .strip_prefix(service)
                .is_some_and(|rest| rest.starts_with(':'));
        if !matches {
            continue;
        }
        let parsed =
            parse_frontend(&frontend.frontend).context("a frontend label the agent wrote")?;
        for (backend, id, counters) in maps.backends_of(&parsed)? {
            rows.push(BackendRow {
                frontend: frontend.frontend.clone(),
                backend,
                id: id.get(),
                packets: counters.packets,
                bytes: counters.bytes,
            });
        }
    }
    anyhow::ensure!(
        !rows.is_empty() || args.state_file.exists(),
        "no frontend names recorded at {}",
        args.state_file.display()
    );
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.frontend.clone(),
                r.backend.clone(),
                r.id.to_string(),
                r.packets.to_string(),
                r.bytes.to_string(),
            ]
        })
        .collect();
    print(
        args.output,
        &rows,
        &["FRONTEND", "BACKEND", "ID", "PACKETS", "BYTES"],
        &cells,
    )
}

pub fn conntrack(filter: Option<&str>, args: &InspectArgs) -> Result<()> {
    let rows = open(args)?.conntrack(filter)?;
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.protocol.to_owned(),
                r.direction.to_owned(),
                format!("{} -> {}", r.from, r.to),
                format!("{} -> {}", r.becomes_from, r.becomes_to),
                r.backend_id.to_string(),
                if r.snat { "snat" } else { "-" }.to_owned(),
            ]
        })
        .collect();
    print(
        args.output,
        &rows,
        &["PROTO", "DIRECTION", "TUPLE", "BECOMES", "BACKEND", "NAT"],
        &cells,
    )
}

#[derive(Serialize)]
struct MaglevShare {
    backend: String,
    slots: u32,
    share_percent: f64,
}

#[derive(Serialize)]
struct MaglevTable {
    frontend: String,
    size: u32,
    backends: Vec<MaglevShare>,
}

pub fn maglev(frontend: &str, args: &InspectArgs) -> Result<()> {
    let parsed = parse_frontend(frontend)
        .with_context(|| format!("{frontend:?} is not ADDR:PORT/PROTO or *:NODEPORT/PROTO"))?;
    let svc_agent::inspect::MaglevShares {
        size,
        slots: shares,
    } = open(args)?
        .maglev(&parsed)?
        .with_context(|| format!("no frontend {frontend} in the maps"))?;
    let table_rows = MaglevTable {
        frontend: frontend.to_owned(),
        size,
        backends: shares
            .into_iter()
            .map(|(backend, slots)| MaglevShare {
                backend,
                slots,
                share_percent: f64::from(slots) * 100.0 / f64::from(size.max(1)),
            })
            .collect(),
    };
    if matches!(args.output, Output::Table) {
        write_stdout(&format!("{frontend}: {size} slots\n"))?;
    }
    let cells: Vec<Vec<String>> = table_rows
        .backends
        .iter()
        .map(|s| {
            vec![
                s.backend.clone(),
                s.slots.to_string(),
                format!("{:.2}%", s.share_percent),
            ]
        })
        .collect();
    print(
        args.output,
        &table_rows,
        &["BACKEND", "SLOTS", "SHARE"],
        &cells,
    )
}
