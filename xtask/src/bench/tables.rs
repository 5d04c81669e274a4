//! The Markdown of each part's generated section in `docs/benchmarks.md`.

use std::fmt::Write as _;

use super::{Figure, RunInfo};

/// The ones measured against svc-proxy, in the order of the tables.
const PEERS: [&str; 2] = ["kube-proxy-iptables", "kube-proxy-nftables"];
const OURS: &str = "svc-proxy";

/// The run's date, machine, kernel, commit and peer versions.
pub fn header(info: &RunInfo) -> String {
    let mut out = format!(
        "Run of {} on {}; kernel {}; commit `{}`{}.",
        info.date,
        info.machine,
        info.kernel,
        info.commit,
        if info.quick { "; `--quick`" } else { "" }
    );
    if !info.versions.is_empty() {
        let _ = write!(out, " Peers: {}.", info.versions.join("; "));
    }
    out.push_str("\n\n");
    out
}

/// Sorted distinct values of `key` over `figures`.
fn distinct(figures: &[Figure], key: impl Fn(&Figure) -> Option<u32>) -> Vec<u32> {
    let mut values: Vec<u32> = figures.iter().filter_map(key).collect();
    values.sort_unstable();
    values.dedup();
    values
}

/// Metric names in the order the benchmark wrote them.
fn metrics_in_order(figures: &[Figure]) -> Vec<&str> {
    let mut metrics: Vec<&str> = Vec::new();
    for figure in figures {
        if !metrics.contains(&figure.metric.as_str()) {
            metrics.push(&figure.metric);
        }
    }
    metrics
}

fn find<'a>(figures: &'a [Figure], proxy: &str, services: u32, metric: &str) -> Option<&'a Figure> {
    figures
        .iter()
        .find(|f| f.proxy == proxy && f.services == services && f.metric == metric)
}

/// A value with about three significant digits.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 || magnitude == 0.0 {
        group(&format!("{value:.0}"))
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// Thousands separated by commas.
fn group(digits: &str) -> String {
    let (sign, digits) = digits
        .strip_prefix('-')
        .map_or(("", digits), |rest| ("-", rest));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn count(services: u32) -> String {
    group(&services.to_string())
}

/// `cargo xtask bench datapath`: nanoseconds per packet, a column per
/// service count.
pub fn datapath(figures: &[Figure]) -> String {
    let counts = distinct(figures, |f| Some(f.services));
    let mut out = String::from("| case |");
    for &services in &counts {
        let _ = write!(out, " {} services |", count(services));
    }
    out.push_str(" last / first |\n|---|");
    for _ in &counts {
        out.push_str("---:|");
    }
    out.push_str("---:|\n");
    for metric in metrics_in_order(figures) {
        let _ = write!(out, "| {metric} |");
        let values: Vec<Option<f64>> = counts
            .iter()
            .map(|&services| find(figures, OURS, services, metric).map(|f| f.value))
            .collect();
        for value in &values {
            match value {
                Some(ns) => {
                    let _ = write!(out, " {ns:.0} ns |");
                }
                None => out.push_str(" - |"),
            }
        }
        match (
            values.first().copied().flatten(),
            values.last().copied().flatten(),
        ) {
            (Some(first), Some(last)) => {
                let _ = writeln!(out, " {:.2} |", last / first);
            }
            _ => out.push_str(" - |\n"),
        }
    }
    out
}

/// `cargo xtask bench control-plane`: one row per figure.
pub fn control_plane(figures: &[Figure]) -> String {
    let mut out = String::from("| case | services | value |\n|---|---:|---:|\n");
    for figure in figures {
        let _ = writeln!(
            out,
            "| {} | {} | {} {} |",
            figure.metric,
            count(figure.services),
            number(figure.value),
            figure.unit
        );
    }
    out
}

/// `cargo xtask bench maglev`: per table size M (rows) and backend count N
/// (columns), disruption as a multiple of the ideal, imbalance, build time.
pub fn maglev(figures: &[Figure]) -> String {
    let value = |slots: u32, backends: u32, metric: &str| {
        figures
            .iter()
            .find(|f| f.slots == Some(slots) && f.backends == Some(backends) && f.metric == metric)
            .map(|f| f.value)
    };
    let sizes = distinct(figures, |f| f.slots);
    let counts = distinct(figures, |f| f.backends);
    let mut out = String::from(
        "![Flows moved by removing one of N backends, as a multiple of the ideal 1/N, \
         per table size](img/maglev-disruption.png)\n\n\
         The table bytes are kernel memory per frontend: the array map keeps each 4-byte \
         slot in 8 bytes.\n",
    );
    let ratio = |moved: &'static str, ideal: &'static str| {
        move |m: u32, n: u32| {
            value(m, n, moved)
                .zip(value(m, n, ideal))
                .map(|(moved, ideal)| format!("{:.2}", moved / ideal))
        }
    };
    let on_remove = ratio("moved_on_remove", "ideal_on_remove");
    let on_add = ratio("moved_on_add", "ideal_on_add");
    let imbalance = |m, n| value(m, n, "imbalance").map(|v| format!("{v:.3}"));
    let build = |m, n| value(m, n, "build").map(|v| format!("{v:.3}"));
    let tables: [(&str, &Cell<'_>); 4] = [
        (
            "Flows moved when one of N backends is removed, as a multiple of the ideal 1/N",
            &on_remove,
        ),
        (
            "Flows moved when a backend is added to N, as a multiple of the ideal 1/(N+1)",
            &on_add,
        ),
        ("Most slots of one backend over the mean M/N", &imbalance),
        ("Build time (ms, fastest of at least 5)", &build),
    ];
    for (title, cell) in tables {
        let _ = write!(out, "\n{title}:\n\n| M (table bytes) |");
        for n in &counts {
            let _ = write!(out, " N = {} |", count(*n));
        }
        out.push_str("\n|---|");
        for _ in &counts {
            out.push_str("---:|");
        }
        out.push('\n');
        for &m in &sizes {
            let _ = write!(out, "| {} ({} KiB) |", count(m), m * 8 / 1024);
            for &n in &counts {
                let _ = write!(out, " {} |", cell(m, n).unwrap_or_else(|| "-".to_owned()));
            }
            out.push('\n');
        }
    }
    out
}

/// A cell of the Maglev tables: its text for table size M and N backends.
type Cell<'a> = dyn Fn(u32, u32) -> Option<String> + 'a;

/// One target of the side-by-side issue, checked against the figures.
struct Target {
    what: String,
    measured: String,
    met: Option<bool>,
}

/// The counts the targets are read at: 10,000 services (or the largest
/// measured below it) and the largest.
fn target_counts(counts: &[u32]) -> (Option<u32>, Option<u32>) {
    let at = counts.iter().copied().filter(|&n| n <= 10_000).max();
    (at, counts.iter().copied().max())
}

#[expect(
    clippy::too_many_lines,
    reason = "one check per target of the benchmark issue, in its order"
)]
fn targets(figures: &[Figure]) -> Vec<Target> {
    let counts = distinct(figures, |f| Some(f.services));
    let (Some(at), Some(largest)) = target_counts(&counts) else {
        return Vec::new();
    };
    let get = |proxy: &str, services: u32, metric: &str| {
        find(figures, proxy, services, metric).map(|f| f.value)
    };
    let [iptables, nftables] = PEERS;
    let n = count(at);
    // Ours and each peer at `at`; a peer without the figure reads as
    // "not measured" and leaves the target undecided.
    let compare = |metric: &str, unit: &str, met: &dyn Fn(f64, f64, f64) -> bool| {
        let Some(ours) = get(OURS, at, metric) else {
            return Target {
                what: String::new(),
                measured: "not measured".to_owned(),
                met: None,
            };
        };
        let (ipt, nft) = (get(iptables, at, metric), get(nftables, at, metric));
        let peer = |name: &str, value: Option<f64>| match value {
            Some(value) => format!("{name} {} {unit} ({:.2}×)", number(value), ours / value),
            None => format!(
                "{name} {}",
                missing(figures, &format!("kube-proxy-{name}"), at, metric)
            ),
        };
        Target {
            what: String::new(),
            measured: format!(
                "{} {unit}; {}; {}",
                number(ours),
                peer("iptables", ipt),
                peer("nftables", nft)
            ),
            met: ipt.zip(nft).map(|(ipt, nft)| met(ours, ipt, nft)),
        }
    };
    let mut out = Vec::new();
    let mut push = |what: String, target: Target| out.push(Target { what, ..target });
    push(
        format!(
            "New-connection (connect) p99 to the last service at {n} services: at most 1/5 of iptables mode, no worse than nftables mode"
        ),
        compare("connect_p99_last", "µs", &|ours, ipt, nft| {
            ours * 5.0 <= ipt && ours <= nft
        }),
    );
    if largest > counts[0] {
        let (high, low) = (
            get(OURS, largest, "connect_p99_last"),
            get(OURS, counts[0], "connect_p99_last"),
        );
        push(
            format!(
                "Ours flat: connect p99 at {} services within 10% of {}",
                count(largest),
                count(counts[0])
            ),
            Target {
                what: String::new(),
                measured: high.zip(low).map_or_else(
                    || "not measured".to_owned(),
                    |(high, low)| {
                        format!(
                            "{} µs against {} µs ({:.2}×)",
                            number(high),
                            number(low),
                            high / low
                        )
                    },
                ),
                met: high.zip(low).map(|(high, low)| high <= low * 1.1),
            },
        );
    }
    push(
        format!("Machine CPU per connection at {n} services: below both peers"),
        compare("cpu_per_conn_last", "µs", &|ours, ipt, nft| {
            ours < ipt && ours < nft
        }),
    );
    push(
        format!(
            "One slice change to traffic on the new pod at {n} services: p99 under 50 ms, at least 10× faster than iptables mode, faster than nftables mode"
        ),
        compare("change_to_traffic_p99", "ms", &|ours, ipt, nft| {
            ours < 50.0 && ours * 10.0 <= ipt && ours < nft
        }),
    );
    let ours = get(OURS, at, "cold_to_all_answering");
    let nft = get(nftables, at, "cold_to_all_answering");
    push(
        format!(
            "{n} services until all answer (cold start): at least 20× faster than nftables mode"
        ),
        Target {
            what: String::new(),
            measured: ours.map_or_else(
                || "not measured".to_owned(),
                |ours| {
                    let peer = nft.map_or_else(
                        || missing(figures, nftables, at, "cold_to_all_answering"),
                        |nft| format!("{} s ({:.1}× faster)", number(nft), nft / ours),
                    );
                    format!("{} s; nftables {peer}", number(ours))
                },
            ),
            met: ours.zip(nft).map(|(ours, nft)| ours * 20.0 <= nft),
        },
    );
    let rss = get(OURS, at, "rss");
    push(
        format!("Agent resident memory at {n} services under 100 MiB"),
        Target {
            what: String::new(),
            measured: rss.map_or_else(
                || "not measured".to_owned(),
                |rss| format!("{} MiB", number(rss)),
            ),
            met: rss.map(|rss| rss < 100.0),
        },
    );
    out
}

/// A peer's cell without a figure: a cold start given up on says so.
fn missing(figures: &[Figure], peer: &str, services: u32, metric: &str) -> String {
    let gave_up = |n| find(figures, peer, n, "cold_not_done_after");
    if let Some(limit) = gave_up(services)
        && metric == "cold_to_all_answering"
    {
        return format!("> {} (not done)", number(limit.value));
    }
    if gave_up(services).is_some()
        || figures
            .iter()
            .any(|f| f.proxy == peer && f.services < services && f.metric == "cold_not_done_after")
    {
        return "not run".to_owned();
    }
    "-".to_owned()
}

/// How long creating the services through the API server took.
fn creation(figures: &[Figure]) -> String {
    let mut out = String::new();
    for created in figures
        .iter()
        .filter(|f| f.proxy == "api-server" && f.metric == "api_create")
    {
        let added =
            find(figures, "api-server", created.services, "api_created").map_or(0.0, |f| f.value);
        let _ = write!(
            out,
            "{}{} services added in {} s",
            if out.is_empty() { "" } else { "; " },
            number(added),
            number(created.value)
        );
    }
    if out.is_empty() {
        return out;
    }
    format!(
        "Creating the services and their slices through the API server (32 in flight, no proxy running): {out}.\n\n"
    )
}

/// `cargo xtask bench proxies`: the targets, then a table per service
/// count with the three proxies side by side and our ratio to each peer.
pub fn proxies(figures: &[Figure]) -> String {
    let mut out = String::from(
        "![New-connection latency (connect p99) against the number of services]\
         (img/proxies-connect-p99.png)\n\
         ![Connections per second against the number of services]\
         (img/proxies-connections-per-second.png)\n\
         ![One slice change until traffic reaches the new pod]\
         (img/proxies-change-to-traffic.png)\n\
         ![Resident memory of the proxy process](img/proxies-memory.png)\n\n\
         | target | measured | met |\n|---|---|---|\n",
    );
    for target in targets(figures) {
        let met = match target.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let _ = writeln!(out, "| {} | {} | {met} |", target.what, target.measured);
    }
    out.push('\n');
    out.push_str(&creation(figures));
    let counts = distinct(figures, |f| Some(f.services));
    for services in counts {
        let _ = write!(
            out,
            "\n{} services:\n\n| metric | unit | svc-proxy | iptables | nftables | ours / iptables | ours / nftables |\n\
             |---|---|---:|---:|---:|---:|---:|\n",
            count(services)
        );
        for metric in metrics_in_order(figures) {
            let Some(ours) = find(figures, OURS, services, metric) else {
                continue;
            };
            let peers: Vec<Option<f64>> = PEERS
                .iter()
                .map(|peer| find(figures, peer, services, metric).map(|f| f.value))
                .collect();
            let _ = write!(out, "| {metric} | {} | {} |", ours.unit, number(ours.value));
            for (peer, value) in PEERS.iter().zip(&peers) {
                let cell = value.map_or_else(|| missing(figures, peer, services, metric), number);
                let _ = write!(out, " {cell} |");
            }
            for peer in &peers {
                match peer {
                    Some(value) if *value > 0.0 => {
                        let _ = write!(out, " {:.2} |", ours.value / value);
                    }
                    _ => out.push_str(" - |"),
                }
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_about_three_digits_and_group_thousands() {
        assert_eq!(number(14_280.9), "14,281");
        assert_eq!(number(123.4), "123");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(1.234), "1.23");
        assert_eq!(number(0.1234), "0.123");
        assert_eq!(number(0.0), "0");
        assert_eq!(count(30_000), "30,000");
    }

    #[test]
    fn targets_are_read_at_ten_thousand_or_the_largest_count_below() {
        assert_eq!(
            target_counts(&[100, 1_000, 10_000, 30_000]),
            (Some(10_000), Some(30_000))
        );
        assert_eq!(target_counts(&[100, 1_000]), (Some(1_000), Some(1_000)));
    }
}
