//! Results: measurements with their samples, saved as JSON, summarized as Markdown
//! tables (median, min–max, Switchyard's ratio to each peer) and SVG bar charts.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::systems::Kind;

/// One metric of one system in one case of a scenario, with every repetition.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub scenario: String,
    pub case: String,
    pub system: String,
    pub metric: String,
    pub unit: String,
    pub samples: Vec<f64>,
}

impl Measurement {
    pub fn new(scenario: &str, case: &str, kind: Kind, metric: &str, unit: &str) -> Self {
        Measurement {
            scenario: scenario.to_owned(),
            case: case.to_owned(),
            system: kind.label().to_owned(),
            metric: metric.to_owned(),
            unit: unit.to_owned(),
            samples: Vec::new(),
        }
    }

    pub fn push(&mut self, sample: f64) {
        self.samples.push(sample);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    pub fn median(&self) -> f64 {
        let s = self.sorted();
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    }

    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "case": self.case,
            "system": self.system,
            "metric": self.metric,
            "unit": self.unit,
            "samples": self.samples,
            "median": self.median(),
            "min": self.min(),
            "max": self.max(),
        })
    }

    fn from_json(value: &Value) -> Option<Measurement> {
        let text = |key: &str| value.get(key)?.as_str().map(str::to_owned);
        Some(Measurement {
            scenario: text("scenario")?,
            case: text("case")?,
            system: text("system")?,
            metric: text("metric")?,
            unit: text("unit")?,
            samples: value
                .get("samples")?
                .as_array()?
                .iter()
                .filter_map(Value::as_f64)
                .collect(),
        })
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub command: String,
    pub smoke: bool,
    pub machine: Value,
    pub measurements: Vec<Measurement>,
}

impl Results {
    pub fn add(&mut self, measurement: Measurement) {
        if !measurement.samples.is_empty() {
            self.measurements.push(measurement);
        }
    }

    pub fn find(
        &self,
        scenario: &str,
        case: &str,
        system: &str,
        metric: &str,
    ) -> Option<&Measurement> {
        self.measurements.iter().find(|m| {
            m.scenario == scenario && m.case == case && m.system == system && m.metric == metric
        })
    }

    pub fn median(&self, scenario: &str, case: &str, kind: Kind, metric: &str) -> Option<f64> {
        self.find(scenario, case, kind.label(), metric)
            .map(Measurement::median)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "command": self.command,
            "smoke": self.smoke,
            "machine": self.machine,
            "measurements": self.measurements.iter().map(Measurement::to_json).collect::<Vec<_>>(),
        })
    }

    pub fn load(path: &Path) -> Result<Results> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)?;
        Ok(Results {
            command: value["command"].as_str().unwrap_or_default().to_owned(),
            smoke: value["smoke"].as_bool().unwrap_or(false),
            machine: value["machine"].clone(),
            measurements: value["measurements"]
                .as_array()
                .map(|a| a.iter().filter_map(Measurement::from_json).collect())
                .unwrap_or_default(),
        })
    }

    /// Writes `results.json`, `results.md` and the charts into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(&self.to_json())? + "\n",
        )?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        for chart in CHARTS {
            if let Some(svg) = self.chart(chart) {
                std::fs::write(dir.join(format!("{}.svg", chart.file)), svg)?;
            }
        }
        Ok(())
    }

    fn scenarios(&self) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        for m in &self.measurements {
            if !seen.contains(&m.scenario.as_str()) {
                seen.push(&m.scenario);
            }
        }
        seen
    }

    /// Tables of medians (min–max) per scenario, systems as columns, and the ratio
    /// of Switchyard to each peer on the headline metrics.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for scenario in self.scenarios() {
            let rows: Vec<&Measurement> = self
                .measurements
                .iter()
                .filter(|m| m.scenario == scenario)
                .collect();
            let mut systems: Vec<&str> = Vec::new();
            let mut keys: Vec<(&str, &str, &str)> = Vec::new();
            for m in &rows {
                if !systems.contains(&m.system.as_str()) {
                    systems.push(&m.system);
                }
                let key = (m.case.as_str(), m.metric.as_str(), m.unit.as_str());
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            let _ = writeln!(out, "### {scenario}\n");
            let _ = writeln!(out, "| case | metric | {} |", systems.join(" | "));
            let _ = writeln!(out, "|---|---|{}", "---|".repeat(systems.len()));
            for (case, metric, unit) in keys {
                let cells: Vec<String> = systems
                    .iter()
                    .map(|system| {
                        rows.iter()
                            .find(|m| m.case == case && m.metric == metric && m.system == *system)
                            .map_or("–".to_owned(), |m| {
                                if m.samples.len() > 1 {
                                    format!(
                                        "{} ({}–{})",
                                        short(m.median()),
                                        short(m.min()),
                                        short(m.max())
                                    )
                                } else {
                                    short(m.median())
                                }
                            })
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "| {case} | {metric} ({unit}) | {} |",
                    cells.join(" | ")
                );
            }
            out.push('\n');
        }
        let ratios = self.ratios();
        if !ratios.is_empty() {
            let _ = writeln!(out, "### Switchyard ÷ peer (medians)\n");
            let _ = writeln!(out, "| figure | ratio |\n|---|---|");
            for (label, ratio) in ratios {
                let _ = writeln!(out, "| {label} | {ratio:.2}× |");
            }
            out.push('\n');
        }
        out
    }

    /// Headline comparisons: throughput (higher is better) and p99 latency at 50%
    /// load (lower is better; the ratio is peer ÷ Switchyard so > 1 means better).
    fn ratios(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for case in ["100B", "1024B"] {
            for ours in [Kind::Switchyard, Kind::SwitchyardDurable] {
                let Some(mine) = self.median("throughput", case, ours, "records_per_s") else {
                    continue;
                };
                for peer in [
                    Kind::Nats,
                    Kind::JetStream,
                    Kind::RedisPubSub,
                    Kind::RedisStreams,
                ] {
                    if let Some(theirs) = self.median("throughput", case, peer, "records_per_s") {
                        out.push((
                            format!("throughput {case}: {} ÷ {}", ours.label(), peer.label()),
                            mine / theirs,
                        ));
                    }
                }
            }
        }
        if let Some(mine) = self.median("latency", "50%", Kind::Switchyard, "p99_us") {
            for peer in [
                Kind::Nats,
                Kind::JetStream,
                Kind::RedisPubSub,
                Kind::RedisStreams,
            ] {
                if let Some(theirs) = self.median("latency", "50%", peer, "p99_us") {
                    out.push((
                        format!(
                            "p99 latency at 50% load: {} ÷ switchyard (> 1: switchyard lower)",
                            peer.label()
                        ),
                        theirs / mine,
                    ));
                }
            }
        }
        out
    }

    fn chart(&self, chart: &Chart) -> Option<String> {
        let rows: Vec<&Measurement> = self
            .measurements
            .iter()
            .filter(|m| m.scenario == chart.scenario && chart.metrics.contains(&m.metric.as_str()))
            .collect();
        if rows.is_empty() {
            return None;
        }
        let mut groups: Vec<String> = Vec::new();
        let mut series: Vec<String> = Vec::new();
        for m in &rows {
            let group = group_label(m, chart);
            if !groups.contains(&group) {
                groups.push(group);
            }
            if !series.contains(&m.system) {
                series.push(m.system.clone());
            }
        }
        let bars: Vec<Vec<Option<Bar>>> = groups
            .iter()
            .map(|group| {
                series
                    .iter()
                    .map(|system| {
                        rows.iter()
                            .find(|m| &m.system == system && &group_label(m, chart) == group)
                            .map(|m| (m.median(), m.min(), m.max()))
                    })
                    .collect()
            })
            .collect();
        Some(svg_bars(
            chart.title,
            rows[0].unit.as_str(),
            &groups,
            &series,
            &bars,
            chart.log,
        ))
    }
}

fn group_label(m: &Measurement, chart: &Chart) -> String {
    if chart.metrics.len() > 1 {
        format!("{} {}", m.case, m.metric)
    } else {
        m.case.clone()
    }
}

/// A chart: one scenario, one or more metrics of the same unit.
struct Chart {
    file: &'static str,
    title: &'static str,
    scenario: &'static str,
    metrics: &'static [&'static str],
    log: bool,
}

const CHARTS: &[Chart] = &[
    Chart {
        file: "throughput",
        title: "1 producer → 1 subscriber: records/s (higher is better)",
        scenario: "throughput",
        metrics: &["records_per_s"],
        log: false,
    },
    Chart {
        file: "latency-p99",
        title: "Publish-to-delivery p99 latency at % of each system's max (lower is better)",
        scenario: "latency",
        metrics: &["p99_us"],
        log: true,
    },
    Chart {
        file: "latency-p50",
        title: "Publish-to-delivery p50 latency at % of each system's max (lower is better)",
        scenario: "latency",
        metrics: &["p50_us"],
        log: true,
    },
    Chart {
        file: "fanout",
        title: "One topic → many subscriber streams: deliveries/s (higher is better)",
        scenario: "fanout",
        metrics: &["deliveries_per_s"],
        log: false,
    },
    Chart {
        file: "many-topics-memory",
        title: "Server memory per subscribed topic, anonymous RSS (lower is better)",
        scenario: "many_topics",
        metrics: &["rss_bytes_per_topic"],
        log: true,
    },
    Chart {
        file: "many-topics-rate",
        title: "Many topics, one record each: records/s (higher is better)",
        scenario: "many_topics",
        metrics: &["records_per_s"],
        log: false,
    },
    Chart {
        file: "filters",
        title: "Filtered fan-out: server CPU per subscription (lower is better)",
        scenario: "filters",
        metrics: &["server_cpu_ns_per_subscription"],
        log: true,
    },
    Chart {
        file: "restart",
        title: "Time to serve again after a restart (lower is better)",
        scenario: "restart",
        metrics: &["clean_s", "sigkill_s"],
        log: false,
    },
];

/// A number in at most four significant figures with a k/M/G suffix.
pub fn short(value: f64) -> String {
    if !value.is_finite() {
        return "–".to_owned();
    }
    let (scaled, suffix) = match value.abs() {
        v if v >= 1e9 => (value / 1e9, "G"),
        v if v >= 1e6 => (value / 1e6, "M"),
        v if v >= 1e4 => (value / 1e3, "k"),
        _ => (value, ""),
    };
    let digits = match scaled.abs() {
        v if v >= 100.0 => 0,
        v if v >= 10.0 => 1,
        v if v >= 1.0 => 2,
        _ => 3,
    };
    format!("{scaled:.digits$}{suffix}")
}

const PALETTE: [&str; 6] = [
    "#1f6feb", "#0b3d91", "#2da44e", "#8250df", "#d1242f", "#bf8700",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A bar: median, min, max.
type Bar = (f64, f64, f64);

/// A grouped bar chart with min–max whiskers, as a standalone SVG.
fn svg_bars(
    title: &str,
    unit: &str,
    groups: &[String],
    series: &[String],
    bars: &[Vec<Option<Bar>>],
    log: bool,
) -> String {
    let (width, height) = (860.0f64, 420.0f64);
    let (left, right, top, bottom) = (80.0, 20.0, 70.0, 50.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let values = bars
        .iter()
        .flatten()
        .flatten()
        .flat_map(|&(m, lo, hi)| [m, lo, hi]);
    let max = values.clone().fold(0.0f64, f64::max).max(1e-9);
    let min_positive = values.filter(|v| *v > 0.0).fold(f64::MAX, f64::min);
    let (lo_exp, hi_exp) = if log {
        let lo = min_positive.min(max).log10().floor();
        let hi = max.log10().ceil().max(lo + 1.0);
        (lo, hi)
    } else {
        (0.0, 0.0)
    };
    let top_value = if log {
        10f64.powf(hi_exp)
    } else {
        nice_ceiling(max)
    };
    let y = |v: f64| -> f64 {
        if log {
            let v = v.max(10f64.powf(lo_exp));
            top + plot_h * (1.0 - (v.log10() - lo_exp) / (hi_exp - lo_exp))
        } else {
            top + plot_h * (1.0 - v / top_value)
        }
    };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    // Legend.
    let mut x = left;
    for (i, name) in series.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="36" width="12" height="12" fill="{}"/><text x="{}" y="46">{}</text>"#,
            PALETTE[i % PALETTE.len()],
            x + 16.0,
            escape(name)
        );
        x += 24.0 + 7.5 * name.len() as f64;
    }
    // Axis and grid.
    let ticks: Vec<f64> = if log {
        (lo_exp as i32..=hi_exp as i32)
            .map(|e| 10f64.powi(e))
            .collect()
    } else {
        (0..=5).map(|i| top_value * i as f64 / 5.0).collect()
    };
    for tick in ticks {
        let ty = y(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{ty:.1}" y2="{ty:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            width - right,
            left - 6.0,
            ty + 4.0,
            short(tick)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{}</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        escape(&format!("{unit}{}", if log { " (log scale)" } else { "" }))
    );
    let group_w = plot_w / groups.len().max(1) as f64;
    let bar_w = (group_w * 0.8 / series.len().max(1) as f64).min(60.0);
    for (g, group) in groups.iter().enumerate() {
        let gx = left + group_w * g as f64;
        let start = gx + (group_w - bar_w * series.len() as f64) / 2.0;
        for (s, bar) in bars[g].iter().enumerate() {
            let Some((median, lo, hi)) = *bar else {
                continue;
            };
            let bx = start + bar_w * s as f64;
            let by = y(median);
            let base = top + plot_h;
            let _ = writeln!(
                svg,
                r#"<rect x="{bx:.1}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                bar_w - 2.0,
                (base - by).max(0.0),
                PALETTE[s % PALETTE.len()],
                escape(&series[s]),
                short(median)
            );
            let cx = bx + bar_w / 2.0 - 1.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
                y(lo),
                y(hi)
            );
            let _ = writeln!(
                svg,
                r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                y(hi).min(by) - 4.0,
                short(median)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            gx + group_w / 2.0,
            top + plot_h + 20.0,
            escape(group)
        );
    }
    let _ = writeln!(
        svg,
        r#"<line x1="{left}" x2="{left}" y1="{top}" y2="{}" stroke="black"/>"#,
        top + plot_h
    );
    svg.push_str("</svg>\n");
    svg
}

/// The smallest 1, 2 or 5 × 10^n at or above `value`.
fn nice_ceiling(value: f64) -> f64 {
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&v| v >= value)
        .unwrap_or(10.0 * magnitude)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let mut m = Measurement::new("s", "c", Kind::Nats, "m", "u");
        for v in [3.0, 1.0, 2.0] {
            m.push(v);
        }
        assert_eq!((m.median(), m.min(), m.max()), (2.0, 1.0, 3.0));
        m.push(10.0);
        assert_eq!(m.median(), 2.5);
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(1_234_567.0), "1.23M");
        assert_eq!(short(56_000.0), "56.0k");
        assert_eq!(short(0.5), "0.500");
        assert_eq!(short(f64::NAN), "–");
    }

    #[test]
    fn json_round_trip_and_outputs() {
        let mut results = Results {
            command: "switchyard-bench run".into(),
            ..Default::default()
        };
        for (kind, value) in [(Kind::Switchyard, 2e6), (Kind::Nats, 1e6)] {
            let mut m = Measurement::new("throughput", "100B", kind, "records_per_s", "records/s");
            m.push(value);
            m.push(value * 1.1);
            results.add(m);
        }
        let dir = tempfile::tempdir().unwrap();
        results.write(dir.path()).unwrap();
        let loaded = Results::load(&dir.path().join("results.json")).unwrap();
        assert_eq!(loaded.measurements.len(), 2);
        assert_eq!(
            loaded.median("throughput", "100B", Kind::Nats, "records_per_s"),
            Some(1.05e6)
        );
        let markdown = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
        assert!(
            markdown.contains("| throughput 100B: switchyard ÷ nats | 2.00× |"),
            "{markdown}"
        );
        let svg = std::fs::read_to_string(dir.path().join("throughput.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("switchyard") && svg.contains("nats"));
    }
}
