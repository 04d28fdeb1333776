//! summary.md and PNG plots from the records of one run.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::coord::ranged1d::AsRangedCoord;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::results::{Record, Results};

/// Text in the plots is drawn with this font (Debian `fonts-dejavu-core`,
/// installed by the prerequisite step), so no fontconfig is needed.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Median, minimum and maximum of one cell over repetitions.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

pub fn stat(mut v: Vec<f64>) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
        count: n,
    })
}

type Key = (String, String, String, u32); // workload, variant, path, n

struct Table<'a> {
    recs: &'a [Record],
}

impl Table<'_> {
    fn get(
        &self,
        workload: &str,
        variant: &str,
        path: &str,
        n: u32,
        system: &str,
        metric: &str,
    ) -> Option<Stat> {
        stat(
            self.recs
                .iter()
                .filter(|r| {
                    r.ok && r.workload == workload
                        && r.variant == variant
                        && r.path == path
                        && r.n == n
                        && r.system == system
                })
                .filter_map(|r| r.metrics.get(metric).copied())
                .collect(),
        )
    }

    fn keys(&self, workload: &str) -> BTreeSet<Key> {
        self.recs
            .iter()
            .filter(|r| r.workload == workload)
            .map(|r| (r.workload.clone(), r.variant.clone(), r.path.clone(), r.n))
            .collect()
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(s: Option<Stat>) -> String {
    match s {
        Some(s) if s.count > 1 => format!("{} [{}–{}]", fmt(s.median), fmt(s.min), fmt(s.max)),
        Some(s) => fmt(s.median),
        None => "—".into(),
    }
}

fn ratio(a: Option<Stat>, b: Option<Stat>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.median != 0.0 => {
            let r = a.median / b.median;
            if r < 0.1 {
                format!("{r:.4}×")
            } else {
                format!("{r:.2}×")
            }
        }
        _ => "—".into(),
    }
}

/// Workload, title, and (metric, column label) pairs of one summary section.
type Section = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// Writes summary.md and the plots; returns whether every cell carried traffic.
pub fn write(dir: &Path, res: &Results) -> Result<bool> {
    let t = Table { recs: &res.records };
    let systems = &res.systems;
    let mut s = String::new();
    writeln!(s, "# Egress SNAT benchmark {}\n", res.started)?;
    writeln!(s, "Command: `{}`  ", res.command)?;
    writeln!(
        s,
        "Machine: {} CPUs ({}), {}, kernel `{}`; load average at start `{}`, at end `{}`; load generator built `{}`.  ",
        res.machine.cpus,
        res.machine.cpu_model,
        res.machine.mem_total.trim(),
        res.machine.kernel,
        res.machine.loadavg_start,
        res.machine.loadavg_end,
        res.machine.rustc_profile
    )?;
    writeln!(
        s,
        "Repetitions: {} per cell, systems interleaved (order rotated each repetition), {} s measured after {} s warm-up; median [min–max]. \
         Client pinned to one CPU, servers to the other, all of them sharing the machine with the NAT namespaces. `iptables` is `{}`.\n",
        res.reps, res.secs, res.warmup_secs, res.iptables
    )?;
    writeln!(
        s,
        "Settings: {}\n",
        res.settings
            .iter()
            .map(|(k, v)| format!("`{k}={v}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;

    let failed: Vec<&Record> = res.records.iter().filter(|r| !r.ok).collect();
    if !failed.is_empty() {
        writeln!(s, "## FAILED cells ({})\n", failed.len())?;
        for r in &failed {
            writeln!(
                s,
                "- {} {} {} {} N={} rep {}: {}",
                r.system,
                r.workload,
                r.variant,
                r.path,
                r.n,
                r.rep,
                r.error.as_deref().unwrap_or("").replace('\n', " ")
            )?;
        }
        writeln!(s)?;
    }

    writeln!(s, "## Expectations (issue 4)\n")?;
    for line in expectations(&t, res) {
        writeln!(s, "- {line}")?;
    }
    writeln!(s)?;

    let sections: [Section; 6] = [
        (
            "crr",
            "Connection rate (connections/s; `spread`: sources over all N policies, `last`: only the policy whose rule is last)",
            &[
                ("cps", "conn/s"),
                ("connect_p50_us", "connect p50 µs"),
                ("connect_p99_us", "connect p99 µs"),
                ("cpu_us_per_conn", "CPU µs/conn"),
            ],
        ),
        (
            "rr",
            "Request/response on one persistent connection",
            &[
                ("p50_us", "p50 µs"),
                ("p99_us", "p99 µs"),
                ("p999_us", "p99.9 µs"),
                ("tps", "transactions/s"),
            ],
        ),
        (
            "bulk",
            "TCP bulk (iperf3)",
            &[
                ("gbps", "Gbit/s"),
                ("cpu_cores_per_gbps", "CPU cores per Gbit/s"),
            ],
        ),
        (
            "udp",
            "Small-packet UDP over 1024 flows",
            &[("pps", "received pkt/s"), ("cpu_ns_per_pkt", "CPU ns/pkt")],
        ),
        (
            "cp",
            "Control plane: add / remove one egress IP with N existing",
            &[
                ("add_us", "add µs"),
                ("remove_us", "remove µs"),
                ("add_cli_us", "add via CLI µs (bpftool for ebpf)"),
                ("remove_cli_us", "remove via CLI µs"),
            ],
        ),
        (
            "prog",
            "Per-packet cost of our programs (BPF_PROG_TEST_RUN, single runs on fresh packets minus an empty program's run)",
            &[
                ("established_fwd_ns", "established fwd ns"),
                ("reply_rev_ns", "reply rev-NAT ns"),
                ("new_flow_ns", "new flow ns"),
                ("new_flow_p99_ns", "new flow p99 ns"),
                (
                    "batched_fwd_ns",
                    "repeat=1M fwd ns (after 1st: translated pkt)",
                ),
                ("empty_ns", "empty prog ns"),
            ],
        ),
    ];
    for (w, title, metrics) in sections {
        let keys = t.keys(w);
        if keys.is_empty() {
            continue;
        }
        writeln!(s, "## {title}\n")?;
        for (metric, label) in metrics {
            writeln!(s, "### {label}\n")?;
            let mut hdr = String::from("| variant | path | N |");
            let mut sep = String::from("|---|---|---|");
            for sys in systems {
                write!(hdr, " {sys} |")?;
                sep.push_str("---|");
            }
            for sys in systems {
                if sys != "iptables" && sys != "none" {
                    write!(hdr, " {sys}/iptables |")?;
                    sep.push_str("---|");
                }
            }
            for sys in systems {
                if sys != "none" {
                    write!(hdr, " {sys}/none |")?;
                    sep.push_str("---|");
                }
            }
            writeln!(s, "{hdr}\n{sep}")?;
            for (_, variant, path, n) in &keys {
                let mut row = format!("| {variant} | {path} | {n} |");
                let get = |sys: &str| t.get(w, variant, path, *n, sys, metric);
                for sys in systems {
                    write!(row, " {} |", cell(get(sys)))?;
                }
                for sys in systems {
                    if sys != "iptables" && sys != "none" {
                        write!(row, " {} |", ratio(get(sys), get("iptables")))?;
                    }
                }
                for sys in systems {
                    if sys != "none" {
                        write!(row, " {} |", ratio(get(sys), get("none")))?;
                    }
                }
                writeln!(s, "{row}")?;
            }
            writeln!(s)?;
        }
    }

    writeln!(
        s,
        "## Drops, evictions and insert failures (sum over all cells)\n"
    )?;
    let drop_keys = [
        "ct_insert_failed",
        "ct_drop",
        "ct_early_drop",
        "agent_drop_flow_table_full",
        "agent_drop_nat_ports_exhausted",
        "agent_drop_fib_lookup_failed",
        "errors",
    ];
    let mut hdr = String::from("| counter |");
    let mut sep = String::from("|---|");
    for sys in systems {
        write!(hdr, " {sys} |")?;
        sep.push_str("---|");
    }
    writeln!(s, "{hdr}\n{sep}")?;
    for k in drop_keys {
        let mut row = format!("| {k} |");
        for sys in systems {
            let vals: Vec<f64> = res
                .records
                .iter()
                .filter(|r| &r.system == sys)
                .filter_map(|r| r.metrics.get(k).copied())
                .collect();
            if vals.is_empty() {
                write!(row, " — |")?;
            } else {
                write!(row, " {:.0} |", vals.iter().sum::<f64>())?;
            }
        }
        writeln!(s, "{row}")?;
    }
    writeln!(s)?;

    let mut setup = Vec::new();
    for sys in systems {
        for &n in &res.ns {
            if let Some(st) = t.get("setup", "", "", n, sys, "setup_secs") {
                setup.push(format!("{sys} N={n}: {:.2} s", st.median));
            }
        }
    }
    if !setup.is_empty() {
        writeln!(s, "Setup time (median): {}.\n", setup.join("; "))?;
    }

    let plots = plot_all(dir, &t, res)?;
    if !plots.is_empty() {
        writeln!(s, "## Plots\n")?;
        for p in plots {
            writeln!(s, "![{p}]({p})")?;
        }
    }
    std::fs::write(dir.join("summary.md"), &s)?;
    Ok(failed.is_empty())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn expectations(t: &Table, res: &Results) -> Vec<String> {
    let mut out = Vec::new();
    let (nmin, nmax) = (
        res.ns.iter().copied().min().unwrap_or(0),
        res.ns.iter().copied().max().unwrap_or(0),
    );
    let scale_note = if nmin == 1 && nmax == 10_000 {
        String::new()
    } else {
        format!(" (this run's N range is {nmin}..{nmax}, not 1..10000)")
    };
    let ebpfs: Vec<&String> = res
        .systems
        .iter()
        .filter(|s| s.starts_with("ebpf"))
        .collect();
    let paths: BTreeSet<String> = t.keys("crr").into_iter().map(|k| k.2).collect();
    if ebpfs.is_empty() {
        out.push("MISS: no ebpf system in this run; no expectation about ours was tested".into());
    }
    for e in &ebpfs {
        for path in &paths {
            for variant in ["spread", "last"] {
                let lo = t.get("crr", variant, path, nmin, e, "cps");
                let hi = t.get("crr", variant, path, nmax, e, "cps");
                let ipt_hi = t.get("crr", variant, path, nmax, "iptables", "cps");
                let ipt_lo = t.get("crr", variant, path, nmin, "iptables", "cps");
                out.push(match (lo, hi) {
                    (Some(l), Some(h)) => {
                        let d = (h.median / l.median - 1.0) * 100.0;
                        format!(
                            "{}: {e} connections/s flat in N ({variant}, {path}): {:.0} at N={nmin} → {:.0} at N={nmax} ({d:+.1}%, limit ±10%){scale_note}",
                            verdict(d.abs() <= 10.0), l.median, h.median
                        )
                    }
                    _ => format!("MISS: {e} connections/s flat in N ({variant}, {path}): not measured"),
                });
                out.push(match (hi, ipt_hi) {
                    (Some(h), Some(i)) => format!(
                        "{}: {e} ≥ 3× iptables connections/s at N={nmax} ({variant}, {path}): {:.2}×{scale_note}",
                        verdict(h.median >= 3.0 * i.median), h.median / i.median
                    ),
                    _ => format!("MISS: {e} ≥ 3× iptables at N={nmax} ({variant}, {path}): not measured"),
                });
                out.push(match (lo, ipt_lo) {
                    (Some(l), Some(i)) => format!(
                        "{}: {e} not below iptables connections/s at N={nmin} ({variant}, {path}): {:.2}×",
                        verdict(l.median >= i.median), l.median / i.median
                    ),
                    _ => format!("MISS: {e} not below iptables at N={nmin} ({variant}, {path}): not measured"),
                });
            }
        }
        let bulk_keys = t.keys("bulk");
        if bulk_keys.is_empty() {
            out.push(format!(
                "MISS: {e} bulk throughput within 5% of none: not measured"
            ));
        }
        for (_, variant, path, n) in bulk_keys {
            let a = t.get("bulk", &variant, &path, n, e, "gbps");
            let b = t.get("bulk", &variant, &path, n, "none", "gbps");
            out.push(match (a, b) {
                (Some(a), Some(b)) => {
                    let d = (a.median / b.median - 1.0) * 100.0;
                    format!(
                        "{}: {e} bulk within 5% of none ({variant}, {path}): {:.2} vs {:.2} Gbit/s ({d:+.1}%)",
                        verdict(d >= -5.0), a.median, b.median
                    )
                }
                _ => format!("MISS: {e} bulk within 5% of none ({variant}, {path}): not measured"),
            });
        }
        out.push(match t.get("prog", "test-run", "local", nmax, e, "established_fwd_ns") {
            Some(s) => format!(
                "{}: {e} established-path cost in BPF_PROG_TEST_RUN ≤ 100 ns: {:.0} ns (median of single runs on fresh packets, empty-program overhead subtracted)",
                verdict(s.median <= 100.0), s.median
            ),
            None => format!("MISS: {e} established-path cost ≤ 100 ns: not measured"),
        });
        let ipt_add = t.get("cp", "add-remove", "local", nmax, "iptables", "add_us");
        let ipt_del = t.get("cp", "add-remove", "local", nmax, "iptables", "remove_us");
        for (what, metric, ipt) in [("add", "add_us", ipt_add), ("remove", "remove_us", ipt_del)] {
            out.push(match (t.get("cp", "add-remove", "local", nmax, e, metric), ipt) {
                (Some(a), Some(i)) => format!(
                    "{}: {e} egress-IP {what} at N={nmax} < 1 ms and ≥ 100× faster than iptables: {:.1} µs vs {:.0} µs ({:.0}×){scale_note}",
                    verdict(a.median < 1000.0 && i.median >= 100.0 * a.median),
                    a.median, i.median, i.median / a.median
                ),
                (Some(a), None) => format!(
                    "MISS: {e} egress-IP {what} at N={nmax}: {:.1} µs, but iptables was not measured", a.median
                ),
                _ => format!("MISS: {e} egress-IP {what} at N={nmax}: not measured"),
            });
        }
    }
    out
}

fn register_font() -> Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| format!("font {FONT}"))?;
    // plotters keeps fonts for the process's lifetime.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;
    Ok(())
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(80, 80, 80),
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
    ];
    C[i % C.len()]
}

fn plot_all(dir: &Path, t: &Table, res: &Results) -> Result<Vec<String>> {
    register_font()?;
    let mut files = Vec::new();
    let crr_groups: BTreeSet<(String, String)> =
        t.keys("crr").into_iter().map(|k| (k.1, k.2)).collect();
    for (variant, path) in crr_groups {
        let name = format!("cps_vs_n_{path}_{variant}.png");
        let mut series = Vec::new();
        for (i, sys) in res.systems.iter().enumerate() {
            let pts: Vec<(f64, Stat)> = res
                .ns
                .iter()
                .filter_map(|&n| {
                    t.get("crr", &variant, &path, n, sys, "cps")
                        .map(|s| (f64::from(n), s))
                })
                .collect();
            series.push((sys.clone(), color(i), pts));
        }
        plot_cps(
            &dir.join(&name),
            &format!("connections/s vs N ({path} path, {variant})"),
            &series,
        )?;
        files.push(name);
    }
    let rr_paths: BTreeSet<String> = t.keys("rr").into_iter().map(|k| k.2).collect();
    let nmax = res.ns.iter().copied().max().unwrap_or(1);
    for path in rr_paths {
        let name = format!("rr_latency_{path}.png");
        let mut series = Vec::new();
        for (i, sys) in res.systems.iter().enumerate() {
            let v: Vec<Option<f64>> = ["p50_us", "p99_us", "p999_us"]
                .iter()
                .map(|m| t.get("rr", "c1", &path, nmax, sys, m).map(|s| s.median))
                .collect();
            series.push((sys.clone(), color(i), v));
        }
        plot_latency(
            &dir.join(&name),
            &format!("request/response latency ({path} path, N={nmax})"),
            &series,
        )?;
        files.push(name);
    }
    Ok(files)
}

type Series = (String, RGBColor, Vec<(f64, Stat)>);

/// Plotters' errors carry the backend's error type; the report only needs
/// their text.
fn plot_err(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("{e:?}")
}

type Chart<'a, X> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, RangedCoordf64>>;

/// The drawing area and chart frame every plot shares: white 900×560
/// bitmap, caption, margins and label areas.
fn chart<'a, X>(
    root: &DrawingArea<BitMapBackend<'a>, Shift>,
    title: &str,
    x: X,
    ymax: f64,
) -> Result<Chart<'a, X::CoordDescType>>
where
    X: AsRangedCoord<Value = f64>,
{
    root.fill(&WHITE).map_err(plot_err)?;
    ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x, 0f64..ymax.max(1.0))
        .map_err(plot_err)
}

/// One system's line with a dot at each point, named in the legend.
fn line_with_dots<X>(
    chart: &mut Chart<'_, X>,
    name: &str,
    c: RGBColor,
    pts: &[(f64, f64)],
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
        .map_err(plot_err)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    chart
        .draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))
        .map_err(plot_err)?;
    Ok(())
}

/// Draws the legend at `position` and writes the file.
fn finish<X>(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    chart: &mut Chart<'_, X>,
    position: SeriesLabelPosition,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(position)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)
}

fn plot_cps(file: &Path, title: &str, series: &[Series]) -> Result<()> {
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1.max))
        .fold(0.0f64, f64::max)
        * 1.15;
    let xmax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .fold(1.0f64, f64::max)
        * 2.0;
    let root = BitMapBackend::new(file, (900, 560)).into_drawing_area();
    let mut chart = chart(&root, title, (0.5f64..xmax).log_scale(), ymax)?;
    chart
        .configure_mesh()
        .x_desc("N (egress IPs / rules)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("connections/s (median, bars: min–max)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    for (name, c, pts) in series {
        if pts.is_empty() {
            continue;
        }
        let medians: Vec<(f64, f64)> = pts.iter().map(|p| (p.0, p.1.median)).collect();
        line_with_dots(&mut chart, name, *c, &medians)?;
        chart
            .draw_series(
                pts.iter().map(|p| {
                    PathElement::new(vec![(p.0, p.1.min), (p.0, p.1.max)], c.stroke_width(1))
                }),
            )
            .map_err(plot_err)?;
    }
    finish(&root, &mut chart, SeriesLabelPosition::LowerLeft)
}

fn plot_latency(
    file: &Path,
    title: &str,
    series: &[(String, RGBColor, Vec<Option<f64>>)],
) -> Result<()> {
    let labels = ["p50", "p99", "p99.9"];
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter().flatten().copied())
        .fold(0.0f64, f64::max)
        * 1.15;
    let root = BitMapBackend::new(file, (900, 560)).into_drawing_area();
    let mut chart = chart(&root, title, -0.5f64..2.5f64, ymax)?;
    chart
        .configure_mesh()
        .x_labels(3)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && (0.0..3.0).contains(&i) {
                labels[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("latency µs (median of repetitions)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    for (name, c, v) in series {
        let pts: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .filter_map(|(i, y)| y.map(|y| (i as f64, y)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        line_with_dots(&mut chart, name, *c, &pts)?;
    }
    finish(&root, &mut chart, SeriesLabelPosition::UpperLeft)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Machine;

    #[test]
    fn stat_takes_median_and_range() {
        let s = stat(vec![5.0, 1.0, 3.0, 4.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.count), (3.0, 1.0, 5.0, 5));
        let s = stat(vec![4.0, 2.0]).unwrap();
        assert_eq!(s.median, 3.0);
        assert!(stat(vec![]).is_none());
    }

    /// A small run: two systems, crr at two N on both paths, rr at the
    /// largest N; what `run` stores after a real run.
    fn fixture() -> Results {
        let mut records = Vec::new();
        for (si, system) in ["iptables", "ebpf"].into_iter().enumerate() {
            for n in [1, 100] {
                for path in ["local", "remote"] {
                    for rep in 0..2 {
                        let mut r = Record::new("crr", "spread", path, system, n, rep);
                        let cps = 1000.0 * (si as f64 + 1.0) + f64::from(n) + f64::from(rep);
                        r.metrics.insert("cps".into(), cps);
                        r.metrics
                            .insert("cpu_us_per_conn".into(), 10.0 + f64::from(rep));
                        records.push(r);
                    }
                }
            }
            let mut r = Record::new("rr", "c1", "local", system, 100, 0);
            for (k, v) in [
                ("tps", 9000.0),
                ("p50_us", 40.0),
                ("p99_us", 90.0),
                ("p999_us", 150.0),
            ] {
                r.metrics.insert(k.into(), v * (si as f64 + 1.0));
            }
            records.push(r);
        }
        let mut failed = Record::new("udp", "flows=1024,64B", "local", "ebpf", 100, 0);
        failed.fail(&anyhow::anyhow!("no UDP packet reached the server"));
        records.push(failed);
        Results {
            started: "20261203T000000Z".into(),
            command: "egress-bench run --quick".into(),
            quick: true,
            systems: vec!["iptables".into(), "ebpf".into()],
            ns: vec![1, 100],
            reps: 2,
            secs: 2.0,
            warmup_secs: 0.5,
            concurrency: 32,
            iptables: "iptables-legacy".into(),
            settings: [("agent: max_flows".to_string(), "1048576".to_string())].into(),
            machine: Machine {
                kernel: "Linux 6.18".into(),
                cpus: 2,
                cpu_model: "test".into(),
                mem_total: "MemTotal: 1 kB".into(),
                loadavg_start: "0.00".into(),
                loadavg_end: "0.00".into(),
                rustc_profile: "debug".into(),
            },
            records,
        }
    }

    #[test]
    fn writes_summary_and_plots_and_reports_failed_cells() {
        let dir = std::env::temp_dir().join(format!("egress-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let all_ok = write(&dir, &fixture()).unwrap();
        assert!(!all_ok, "the fixture has a failed cell");
        let summary = std::fs::read_to_string(dir.join("summary.md")).unwrap();
        assert!(summary.contains("## FAILED cells (1)"), "{summary}");
        for png in [
            "cps_vs_n_local_spread.png",
            "cps_vs_n_remote_spread.png",
            "rr_latency_local.png",
        ] {
            let bytes = std::fs::read(dir.join(png)).unwrap_or_default();
            assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
            assert!(summary.contains(png), "summary does not show {png}");
        }
        if std::env::var_os("EGRESS_BENCH_KEEP_REPORT").is_none() {
            std::fs::remove_dir_all(&dir).unwrap();
        } else {
            eprintln!("report kept in {}", dir.display());
        }
    }
}
