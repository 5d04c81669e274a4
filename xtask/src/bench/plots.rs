//! The plots under `docs/img/`: PNG line charts drawn with `plotters`,
//! every axis logarithmic (service and backend counts span three orders of
//! magnitude, and so do the peers' figures).

use std::{fs, ops::Range, path::Path};

use anyhow::{Context as _, Result, anyhow};
use plotters::{
    prelude::*,
    style::{Palette, Palette99, RGBAColor},
};

use super::Figure;
use crate::setup::PLOT_FONT;

/// The proxies in the order and colours of every plot.
const PROXIES: [(&str, RGBColor); 3] = [
    ("svc-proxy", RGBColor(31, 119, 180)),
    ("kube-proxy-iptables", RGBColor(214, 39, 40)),
    ("kube-proxy-nftables", RGBColor(44, 160, 44)),
];

/// Registers the font every plot's text is drawn with (installed by
/// `cargo xtask bench`'s setup).
pub fn register_font() -> Result<()> {
    let bytes = fs::read(PLOT_FONT).with_context(|| format!("reading {PLOT_FONT}"))?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{PLOT_FONT} is not a font plotters can read"))
}

/// One line of a chart.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    color: RGBAColor,
}

/// A log-log line chart of `series` written to `path`.
fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<()> {
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    let span = |values: Vec<f64>| -> Option<Range<f64>> {
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (low.is_finite() && high.is_finite()).then(|| low / 1.5..high * 1.5)
    };
    let (Some(x), Some(y)) = (
        span(points().map(|(x, _)| x).collect()),
        span(points().map(|(_, y)| y).collect()),
    ) else {
        eprintln!("bench: nothing to plot in {}", path.display());
        return Ok(());
    };
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d(x.log_scale(), y.log_scale())?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()?;
        for line in series {
            let style = ShapeStyle::from(line.color).stroke_width(2);
            chart
                .draw_series(LineSeries::new(line.points.iter().copied(), style))?
                .label(line.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            chart.draw_series(
                line.points
                    .iter()
                    .map(|&point| Circle::new(point, 3, style.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|err| anyhow!("drawing {}: {err}", path.display()))?;
    eprintln!("bench: drew {}", path.display());
    Ok(())
}

/// `metric` against the service count, one line per proxy; positive
/// values only (the axes are logarithmic).
fn per_proxy(figures: &[Figure], metric: &str, label: &str, alpha: f64) -> Vec<Series> {
    PROXIES
        .iter()
        .map(|&(proxy, color)| Series {
            label: format!("{proxy}{label}"),
            points: points(figures, proxy, metric),
            color: color.mix(alpha),
        })
        .filter(|series| !series.points.is_empty())
        .collect()
}

fn points(figures: &[Figure], proxy: &str, metric: &str) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = figures
        .iter()
        .filter(|f| f.proxy == proxy && f.metric == metric && f.value > 0.0)
        .map(|f| (f64::from(f.services), f.value))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

/// The side-by-side plots.
pub fn proxies(figures: &[Figure], img: &Path) -> Result<()> {
    let services = "services installed";
    let mut latency = per_proxy(figures, "connect_p99_last", " (last service)", 1.0);
    latency.extend(per_proxy(
        figures,
        "connect_p99_random",
        " (random services)",
        0.4,
    ));
    line_chart(
        &img.join("proxies-connect-p99.png"),
        "New connection: connect p99, client pod to a ClusterIP",
        services,
        "microseconds",
        &latency,
    )?;
    let mut rate = per_proxy(figures, "conn_per_s_last", " (last service)", 1.0);
    rate.extend(per_proxy(
        figures,
        "conn_per_s_random",
        " (random services)",
        0.4,
    ));
    line_chart(
        &img.join("proxies-connections-per-second.png"),
        "Short connections per second, four clients, one node's two CPUs",
        services,
        "connections per second",
        &rate,
    )?;
    let mut change = per_proxy(figures, "change_to_traffic_p99", " p99", 1.0);
    change.extend(per_proxy(figures, "change_to_traffic_p50", " p50", 0.4));
    line_chart(
        &img.join("proxies-change-to-traffic.png"),
        "One endpoint added until a connection reaches it",
        services,
        "milliseconds",
        &change,
    )?;
    let mut memory = per_proxy(figures, "rss", " resident memory", 1.0);
    memory.extend(
        Some(Series {
            label: "svc-proxy BPF maps (kernel)".to_owned(),
            points: points(figures, "svc-proxy", "bpf_map_memory"),
            color: PROXIES[0].1.mix(0.4),
        })
        .filter(|series| !series.points.is_empty()),
    );
    line_chart(
        &img.join("proxies-memory.png"),
        "Memory of the proxy on one node",
        services,
        "MiB",
        &memory,
    )
}

/// Disruption against the backend count, one line per table size.
pub fn maglev(figures: &[Figure], img: &Path) -> Result<()> {
    let mut sizes: Vec<u32> = figures.iter().filter_map(|f| f.slots).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let value = |m: u32, n: u32, metric: &str| {
        figures
            .iter()
            .find(|f| f.slots == Some(m) && f.backends == Some(n) && f.metric == metric)
            .map(|f| f.value)
    };
    let mut series: Vec<Series> = sizes
        .iter()
        .enumerate()
        .map(|(i, &m)| {
            let mut counts: Vec<u32> = figures
                .iter()
                .filter(|f| f.slots == Some(m))
                .filter_map(|f| f.backends)
                .collect();
            counts.sort_unstable();
            counts.dedup();
            Series {
                label: format!("M = {m} ({} KiB)", m * 8 / 1024),
                points: counts
                    .iter()
                    .filter_map(|&n| {
                        let moved = value(m, n, "moved_on_remove")?;
                        let ideal = value(m, n, "ideal_on_remove")?;
                        Some((f64::from(n), moved / ideal))
                    })
                    .collect(),
                color: Palette99::pick(i).to_rgba(),
            }
        })
        .collect();
    let all: Vec<f64> = figures
        .iter()
        .filter_map(|f| f.backends.map(f64::from))
        .collect();
    let (low, high) = all.iter().fold((f64::INFINITY, 0.0f64), |(low, high), &n| {
        (low.min(n), high.max(n))
    });
    if low.is_finite() {
        series.push(Series {
            label: "1.5 × ideal (the target)".to_owned(),
            points: vec![(low, 1.5), (high, 1.5)],
            color: BLACK.mix(0.5),
        });
    }
    line_chart(
        &img.join("maglev-disruption.png"),
        "Maglev: flows moved by removing one of N backends, over the ideal 1/N",
        "backends (N)",
        "multiple of the ideal",
        &series,
    )
}
