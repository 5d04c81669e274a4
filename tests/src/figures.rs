//! The figures every benchmark binary writes: one JSON object per figure,
//! `{"bench", "proxy", "services", "metric", "value", "unit"}` (Maglev's
//! also name the table size and the backend count), read back by
//! `cargo xtask bench` to render `docs/benchmarks.md` and the plots.

use std::path::Path;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub bench: &'static str,
    pub proxy: String,
    pub services: u32,
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends: Option<u32>,
}

impl Figure {
    /// A figure of svc-proxy's own (every benchmark but the side-by-side
    /// one measures only svc-proxy).
    #[must_use]
    pub fn ours(
        bench: &'static str,
        services: u32,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        Self {
            bench,
            proxy: "svc-proxy".to_owned(),
            services,
            metric: metric.into(),
            value,
            unit,
            slots: None,
            backends: None,
        }
    }
}

/// Writes `figures` to `path` as a JSON array, creating its directory.
pub fn write(path: &Path, figures: &[Figure]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
    }
    let text = serde_json::to_string_pretty(figures).expect("figures serialise");
    std::fs::write(path, text).unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
    eprintln!("wrote {}", path.display());
}
