//! What a run reports: per device the medians over rounds, the merged latency histogram, the
//! table, the JSON of issue 6's schema, `.hgrm` percentile files and an SVG plot.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde_json::{Value, json};

/// One device's figures from one round.
#[derive(Debug, Clone, Default)]
pub struct RoundFigures {
    /// Delivered pps at the highest offered rate with at most 0.1 % loss.
    pub max_pps: f64,
    /// Delivered pps at the highest offered rate with no loss.
    pub max_pps_zero_loss: f64,
    /// Delivered pps with the generator unpaced.
    pub max_delivered_pps: f64,
    /// Loss (fraction) at the fixed rate.
    pub loss_at_rate: f64,
    /// Testbed CPU per delivered packet at the fixed rate, ns: this process's and the
    /// agent's user + system time plus the machine's softirq time.
    pub cpu_ns_per_packet: f64,
    /// Testbed CPU per delivered packet in the trial that set `max_pps`, ns.
    pub cpu_ns_per_packet_at_max: f64,
    /// The whole machine's user + system + softirq per delivered packet (includes whatever
    /// else runs on it).
    pub machine_cpu_ns_per_packet: f64,
    /// Reordered and duplicated frames at the fixed rate.
    pub reordered: u64,
    /// Duplicated frames at the fixed rate.
    pub duplicated: u64,
    /// Table swaps made during the fixed-rate trial.
    pub swaps: u64,
    /// Frames sent and not received in the fixed-rate trial.
    pub lost_at_rate: u64,
}

/// A device's result over all rounds.
#[derive(Debug)]
pub struct DeviceResult {
    /// `ocelot`, `kernel` or `raw-xsk`.
    pub name: &'static str,
    /// Figures per round.
    pub rounds: Vec<RoundFigures>,
    /// Latency at the fixed rate, all rounds merged.
    pub latency: Histogram<u64>,
}

/// The median of `values` (the mean of the two middle ones for an even count); 0 if empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

impl DeviceResult {
    fn med(&self, f: impl Fn(&RoundFigures) -> f64) -> f64 {
        median(self.rounds.iter().map(f))
    }

    /// Median max pps (≤ 0.1 % loss).
    pub fn max_pps(&self) -> f64 {
        self.med(|r| r.max_pps)
    }

    fn us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1e3
    }

    /// The JSON object of this device.
    pub fn json(&self) -> Value {
        json!({
            "name": self.name,
            "max_pps": self.max_pps(),
            "max_pps_zero_loss": self.med(|r| r.max_pps_zero_loss),
            "max_delivered_pps": self.med(|r| r.max_delivered_pps),
            "loss_at_rate": self.med(|r| r.loss_at_rate),
            "cpu_ns_per_packet": self.med(|r| r.cpu_ns_per_packet),
            "machine_cpu_ns_per_packet": self.med(|r| r.machine_cpu_ns_per_packet),
            "cpu_ns_per_packet_at_max": self.med(|r| r.cpu_ns_per_packet_at_max),
            "p50_us": self.us(0.5),
            "p90_us": self.us(0.9),
            "p99_us": self.us(0.99),
            "p999_us": self.us(0.999),
            "max_us": self.latency.max() as f64 / 1e3,
            "latency_samples": self.latency.len(),
            "reordered_at_rate": self.rounds.iter().map(|r| r.reordered).sum::<u64>(),
            "duplicated_at_rate": self.rounds.iter().map(|r| r.duplicated).sum::<u64>(),
            "swaps_at_rate": self.rounds.iter().map(|r| r.swaps).sum::<u64>(),
            "lost_at_rate": self.rounds.iter().map(|r| r.lost_at_rate).sum::<u64>(),
            "rounds": self.rounds.iter().map(|r| json!({
                "max_pps": r.max_pps,
                "max_pps_zero_loss": r.max_pps_zero_loss,
                "max_delivered_pps": r.max_delivered_pps,
                "loss_at_rate": r.loss_at_rate,
                "cpu_ns_per_packet": r.cpu_ns_per_packet,
            })).collect::<Vec<_>>(),
        })
    }
}

/// ocelot's max pps over another device's, if both were measured.
pub fn ratio(results: &[DeviceResult], a: &str, b: &str) -> Option<f64> {
    let get = |n: &str| {
        results
            .iter()
            .find(|r| r.name == n)
            .map(DeviceResult::max_pps)
    };
    match (get(a), get(b)) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    }
}

/// The readable table.
pub fn table(results: &[DeviceResult], rate: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:>12} {:>9} {:>12} {:>12} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "device",
        "max pps",
        "ns/p@max",
        "0-loss pps",
        "unpaced pps",
        format!("loss@{}k", rate / 1000),
        "cpu ns/p",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs"
    );
    for r in results {
        let _ = writeln!(
            s,
            "{:<8} {:>12.0} {:>9.0} {:>12.0} {:>12.0} {:>9.3}% {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1}",
            r.name,
            r.max_pps(),
            r.med(|x| x.cpu_ns_per_packet_at_max),
            r.med(|x| x.max_pps_zero_loss),
            r.med(|x| x.max_delivered_pps),
            100.0 * r.med(|x| x.loss_at_rate),
            r.med(|x| x.cpu_ns_per_packet),
            r.us(0.5),
            r.us(0.9),
            r.us(0.99),
            r.us(0.999),
            r.latency.max() as f64 / 1e3,
        );
    }
    s
}

/// The percentile distribution in HdrHistogram's `.hgrm` text format (values in µs).
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            1.0 / (1.0 - q)
        } else {
            f64::INFINITY
        };
        let _ = writeln!(
            s,
            "{:>12.3} {:>14.12} {:>10} {:>14.2}",
            v.value_iterated_to() as f64 / 1e3,
            q,
            v.count_since_last_iteration(),
            inv
        );
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1e3,
        h.stdev() / 1e3
    );
    let _ = writeln!(
        s,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1e3,
        h.len()
    );
    s
}

/// Writes the SVG percentile plot: latency (µs, log scale) against percentile, with the
/// x axis stretched as 1/(1-p) so the tail is visible, one curve per device.
pub fn svg(path: &Path, results: &[DeviceResult], title: &str) -> Result<()> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> = results
        .iter()
        .filter(|r| !r.latency.is_empty())
        .map(|r| {
            let pts = r
                .latency
                .iter_quantiles(5)
                .map(|v| v.quantile_iterated_to())
                .filter(|q| *q < 0.99999)
                .map(|q| {
                    let x = (1.0 / (1.0 - q)).log10();
                    (x, (r.latency.value_at_quantile(q) as f64 / 1e3).max(0.1))
                })
                .collect();
            (r.name, pts)
        })
        .collect();
    let y_max = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(1.0f64, f64::max)
        * 1.5;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..5f64, (0.1f64..y_max).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("one-way latency (µs)")
            .x_labels(6)
            .x_label_formatter(&|x| {
                let p = 100.0 * (1.0 - 10f64.powf(-x));
                format!("{p:.3}%")
            })
            .draw()?;
        let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
        for (i, (name, pts)) in curves.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("drawing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_table() {
        fn check(v: &[f64], want: f64) {
            assert_eq!(median(v.iter().copied()), want, "{v:?}");
        }
        check(&[], 0.0);
        check(&[3.0], 3.0);
        check(&[5.0, 1.0, 3.0], 3.0);
        check(&[4.0, 1.0, 3.0, 2.0], 2.5);
        check(&[f64::NAN, 2.0], 2.0);
    }

    #[test]
    fn ratios_need_both_devices() {
        let dev = |name, pps| DeviceResult {
            name,
            rounds: vec![RoundFigures {
                max_pps: pps,
                ..RoundFigures::default()
            }],
            latency: Histogram::new(3).unwrap(),
        };
        let rs = [dev("ocelot", 300.0), dev("kernel", 200.0)];
        assert_eq!(ratio(&rs, "ocelot", "kernel"), Some(1.5));
        assert_eq!(ratio(&rs, "ocelot", "raw-xsk"), None);
        assert_eq!(
            ratio(
                &[dev("ocelot", 1.0), dev("kernel", 0.0)],
                "ocelot",
                "kernel"
            ),
            None
        );
    }

    #[test]
    fn hgrm_ends_at_the_maximum() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let text = hgrm(&h);
        assert!(text.starts_with(&format!("{:>12}", "Value")));
        assert!(text.contains("Total count    =         1000"), "{text}");
        let last = text.lines().rfind(|l| !l.starts_with('#')).unwrap();
        assert!(last.trim_start().starts_with("1000."), "{last}");
    }
}
