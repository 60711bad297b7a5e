//! `--html FILE`: the run as one self-contained page, and the same charts as `.svg` files.
//!
//! The page is meant to be attached to an issue or archived with a release and still open
//! years later with no network: the charts are inline SVG drawn by [`chart`], the style is
//! inline, and nothing is fetched (no scripts, fonts, images or links). It shows the
//! summary JSON's figures as tables, the `--verify` report when the summary carries one
//! under `"verify"` (the JSON of [`crate::verify::Report`]), and three kinds of chart:
//! - throughput over time: 2xx, 429 and other answers per second, by completion instant;
//! - latency as an HDR-style percentile plot (x: 50 % … 99.999 %, one width per "nine"),
//!   the view that shows the tail, for all answers, 2xx and 429 separately;
//! - per key, its sliding-window usage of each limit in % of the limit, against 100 %:
//!   the `--verify` series (each request placed at the midpoint of send → last byte).

mod chart;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::record::{LimitKind, Outcome, Record, UsageSeries};
use chart::{escape, percentile_x, Chart, Line, XAxis};

/// Everything the page shows. `keys` are display names, never secrets.
pub struct Page<'a> {
    pub title: String,
    pub targets: &'a [String],
    pub keys: &'a [String],
    pub records: &'a [Record],
    /// From `--verify`; empty without it (then there are no usage charts).
    pub series: &'a [UsageSeries],
    /// The run's JSON summary; `"verify"` in it, if present, is the verify report.
    pub summary: &'a Value,
}

/// Writes the page to `path`.
pub fn write(path: &Path, page: &Page) -> io::Result<()> {
    std::fs::write(path, render(page))
}

/// Writes each chart of the page as its own `.svg` file into `dir` (created if missing):
/// `throughput.svg`, `latency.svg`, `usage-<key>.svg`. Returns the paths, in page order.
pub fn write_svgs(dir: &Path, page: &Page) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut paths = Vec::new();
    for (stem, chart) in charts(page) {
        let path = dir.join(format!("{stem}.svg"));
        std::fs::write(&path, chart.svg(true))?;
        paths.push(path);
    }
    Ok(paths)
}

const GREEN: &str = "#2a9d3a";
const ORANGE: &str = "#e07b00";
const GREY: &str = "#7f7f7f";
const RED: &str = "#d62728";

/// Every chart of the page with its file name (without `.svg`), in page order.
fn charts(page: &Page) -> Vec<(String, Chart)> {
    let mut charts = vec![
        ("throughput".to_owned(), throughput(page.records)),
        ("latency".to_owned(), latency(page.records)),
    ];
    let mut used: HashSet<String> = charts.iter().map(|c| c.0.clone()).collect();
    for (key, series) in by_key(page.series) {
        // Key names are `[A-Za-z0-9._-]` in the config, but a display name is whatever
        // the runner passed: keep file names to that alphabet, and distinct.
        let base = format!("usage-{}", file_name(key));
        let mut stem = base.clone();
        let mut n = 2;
        while !used.insert(stem.clone()) {
            stem = format!("{base}-{n}");
            n += 1;
        }
        charts.push((stem, usage(key, &series)));
    }
    charts
}

fn file_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "key".to_owned()
    } else {
        clean
    }
}

/// The series grouped by key, keys in order of first appearance.
fn by_key(series: &[UsageSeries]) -> Vec<(&str, Vec<&UsageSeries>)> {
    let mut groups: Vec<(&str, Vec<&UsageSeries>)> = Vec::new();
    for s in series {
        match groups.iter_mut().find(|g| g.0 == s.key) {
            Some(group) => group.1.push(s),
            None => groups.push((&s.key, vec![s])),
        }
    }
    groups
}

/// Answers per second by completion instant. Long runs are cut into wider buckets (at
/// most ~1,200 per line), still shown per second.
fn throughput(records: &[Record]) -> Chart {
    let end_s = records.iter().map(|r| r.done_us).max().unwrap_or(0) as f64 / 1e6;
    let width = (end_s / 1200.0).ceil().max(1.0);
    let buckets = (end_s / width) as usize + 1;
    let mut counts = vec![[0u64; 3]; if records.is_empty() { 0 } else { buckets }];
    for r in records {
        let b = ((r.done_us as f64 / 1e6 / width) as usize).min(buckets - 1);
        let class = match r.outcome {
            Outcome::Ok => 0,
            Outcome::RateLimited => 1,
            Outcome::Other => 2,
        };
        counts[b][class] += 1;
    }
    // The last bucket ends with the run: a rate over its real length, or none when it is
    // too short to mean anything (the last straggling answers).
    let last_width = end_s - (buckets - 1) as f64 * width;
    let line = |class: usize, name: &str, color| Line {
        name: name.to_owned(),
        color,
        dashed: false,
        points: counts
            .iter()
            .enumerate()
            .filter_map(|(b, c)| {
                let span = if b + 1 == buckets { last_width } else { width };
                let keep = span >= width / 2.0 || (buckets == 1 && span > 0.0);
                keep.then(|| (b as f64 * width, c[class] as f64 / span))
            })
            .collect(),
    };
    Chart {
        title: "Throughput".to_owned(),
        x_label: "seconds since start (by completion)".to_owned(),
        y_label: "answers per second".to_owned(),
        x_axis: XAxis::Linear,
        y_at_least: 0.0,
        lines: vec![
            line(0, "2xx", GREEN),
            line(1, "429", ORANGE),
            line(2, "other", GREY),
        ],
    }
}

/// Latency by percentile, from each record's intended send (so coordinated omission is
/// corrected in `--rate` mode). A line stops at the last percentile its count resolves.
fn latency(records: &[Record]) -> Chart {
    let sorted = |keep: &dyn Fn(&Record) -> bool| {
        let mut v: Vec<u64> = records
            .iter()
            .filter(|r| keep(r))
            .map(Record::latency_us)
            .collect();
        v.sort_unstable();
        v
    };
    let classes = [
        ("all", "#1f77b4", sorted(&|_| true)),
        ("2xx", GREEN, sorted(&|r| r.outcome == Outcome::Ok)),
        (
            "429",
            ORANGE,
            sorted(&|r| r.outcome == Outcome::RateLimited),
        ),
    ];
    let from = percentile_x(50.0);
    let lines = classes
        .into_iter()
        .filter(|(name, _, v)| *name == "all" || !v.is_empty())
        .map(|(name, color, v)| {
            let to = (v.len() as f64).log10().clamp(from, percentile_x(99.999));
            const STEPS: usize = 240;
            let points = if v.is_empty() {
                Vec::new()
            } else {
                (0..=STEPS)
                    .map(|i| from + (to - from) * i as f64 / STEPS as f64)
                    .map(|x| {
                        let q = 1.0 - 10f64.powf(-x);
                        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
                        (x, v[rank - 1] as f64 / 1000.0)
                    })
                    .collect()
            };
            Line {
                name: format!("{name} ({})", v.len()),
                color,
                dashed: false,
                points,
            }
        })
        .collect();
    Chart {
        title: "Latency by percentile".to_owned(),
        x_label: "percentile".to_owned(),
        y_label: "latency (ms)".to_owned(),
        x_axis: XAxis::Percentile,
        y_at_least: 0.0,
        lines,
    }
}

fn usage(key: &str, series: &[&UsageSeries]) -> Chart {
    let mut lines: Vec<Line> = series
        .iter()
        .map(|s| Line {
            name: format!("{} (limit {})", s.limit.as_str(), s.limit_value),
            color: match s.limit {
                LimitKind::Requests => "#1f77b4",
                LimitKind::InputTokens => "#9467bd",
                LimitKind::OutputTokens => ORANGE,
            },
            dashed: false,
            points: s
                .points
                .iter()
                .map(|&(t, used)| (t, 100.0 * used as f64 / s.limit_value.max(1) as f64))
                .collect(),
        })
        .collect();
    let xs = || series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (first, last) = (xs().fold(0f64, f64::min), xs().fold(0f64, f64::max));
    lines.push(Line {
        name: "100 % = limit".to_owned(),
        color: RED,
        dashed: true,
        points: vec![(first, 100.0), (last, 100.0)],
    });
    Chart {
        title: format!("{key}: sliding-window usage"),
        x_label: "seconds since start (window ending then)".to_owned(),
        y_label: "% of the limit".to_owned(),
        x_axis: XAxis::Linear,
        // Room above the limit line, so it never sits on the frame.
        y_at_least: 110.0,
        lines,
    }
}

const STYLE: &str =
    "body{font-family:sans-serif;color:#222;max-width:820px;margin:2em auto;padding:0 1em}\
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:90%}\
th,td{border:1px solid #ddd;padding:2px 8px;text-align:right}\
th{background:#f4f4f4}th:first-child,td:first-child{text-align:left}\
.pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}\
svg{max-width:100%;height:auto}figure{margin:1em 0}p.note{color:#555;font-size:90%}";

fn render(page: &Page) -> String {
    let mut html = String::new();
    let title = escape(&page.title);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n"
    );
    let end_s = page.records.iter().map(|r| r.done_us).max().unwrap_or(0) as f64 / 1e6;
    let _ = writeln!(
        html,
        "<p>{} requests over {end_s:.1} s. Targets: {}. Keys: {}.</p>",
        page.records.len(),
        list(page.targets),
        list(page.keys)
    );
    summary_tables(page.summary, &mut html);
    if let Some(verify) = page.summary.get("verify").filter(|v| v.is_object()) {
        verify_table(verify, &mut html);
    }
    let charts = charts(page);
    for (i, (_, chart)) in charts.iter().enumerate() {
        if i == 0 {
            html.push_str("<h2>Throughput and latency</h2>\n");
        }
        if i == 2 {
            html.push_str(
                "<h2>Sliding-window usage per key</h2>\n<p class=\"note\">Each admitted request \
                 is placed at the midpoint of its send and last byte, with its real output \
                 tokens; the window ending at each instant is summed.</p>\n",
            );
        }
        let _ = writeln!(html, "<figure>{}</figure>", chart.svg(false));
    }
    if charts.len() == 2 {
        html.push_str(
            "<p class=\"note\">No per-key usage charts: run with <code>--verify CONFIG</code> \
             to see each key's window against its limits.</p>\n",
        );
    }
    html.push_str("</body></html>\n");
    html
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        return "none".to_owned();
    }
    items
        .iter()
        .map(|t| format!("<code>{}</code>", escape(t)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A JSON value as a table cell.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "–".to_owned(),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => u.to_string(),
            (_, Some(i), _) => i.to_string(),
            (_, _, Some(f)) => {
                let s = format!("{f:.3}");
                s.trim_end_matches('0').trim_end_matches('.').to_owned()
            }
            _ => n.to_string(),
        },
        Value::String(s) => escape(s),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(", "),
        Value::Object(_) => "…".to_owned(),
    }
}

/// The summary's scalars as (dotted path, value); arrays of objects apart, as tables.
fn flatten<'v>(
    v: &'v Value,
    path: &str,
    depth: usize,
    scalars: &mut Vec<(String, &'v Value)>,
    tables: &mut Vec<(String, &'v [Value])>,
) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(map) if depth < 4 => {
            for (k, v) in map {
                // The verify report has a section of its own.
                if !(depth == 0 && k == "verify") {
                    flatten(v, &join(k), depth + 1, scalars, tables);
                }
            }
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            tables.push((path.to_owned(), items));
        }
        Value::Array(items) if items.len() > 16 || items.iter().any(|i| !is_scalar(i)) => {}
        Value::Object(_) => {}
        _ => scalars.push((path.to_owned(), v)),
    }
}

fn is_scalar(v: &Value) -> bool {
    !matches!(v, Value::Array(_) | Value::Object(_))
}

/// The summary JSON as tables: its figures, then each list of records (per target, per
/// key...) as a table with one column per figure.
fn summary_tables(summary: &Value, html: &mut String) {
    const MAX_ROWS: usize = 200;
    let mut scalars = Vec::new();
    let mut tables = Vec::new();
    flatten(summary, "", 0, &mut scalars, &mut tables);
    if scalars.is_empty() && tables.is_empty() {
        return;
    }
    html.push_str("<h2>Summary</h2>\n");
    if !scalars.is_empty() {
        html.push_str("<table>");
        for (name, v) in scalars.iter().take(MAX_ROWS) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td></tr>",
                escape(name),
                cell(v)
            );
        }
        html.push_str("</table>\n");
    }
    for (name, rows) in tables {
        let rows: Vec<Vec<(String, &Value)>> = rows
            .iter()
            .take(MAX_ROWS)
            .map(|row| {
                let mut cells = Vec::new();
                flatten(row, "", 1, &mut cells, &mut Vec::new());
                cells
            })
            .collect();
        let mut columns: Vec<&str> = Vec::new();
        for (c, _) in rows.iter().flatten() {
            if !columns.contains(&c.as_str()) {
                columns.push(c);
            }
        }
        // Names (target, key) first: serde_json keeps object keys sorted, not as written.
        columns.sort_by_key(|c| !rows.iter().flatten().any(|(k, v)| k == c && v.is_string()));
        let _ = write!(html, "<h3>{}</h3><table><tr>", escape(&name));
        for c in &columns {
            let _ = write!(html, "<th>{}</th>", escape(c));
        }
        html.push_str("</tr>");
        for row in &rows {
            html.push_str("<tr>");
            for c in &columns {
                let v = row
                    .iter()
                    .find(|(k, _)| k == c)
                    .map_or(&Value::Null, |p| p.1);
                let _ = write!(html, "<td>{}</td>", cell(v));
            }
            html.push_str("</tr>");
        }
        html.push_str("</table>\n");
    }
}

/// The `--verify` report (its JSON, see [`crate::verify::Report`]) as a table per key and
/// limit. Fields it lacks show as "–" rather than failing the page.
fn verify_table(v: &Value, html: &mut String) {
    let percent = |v: &Value| {
        v.as_f64()
            .map_or("–".to_owned(), |f| format!("{:.1}%", f * 100.0))
    };
    let ms = |v: &Value| match v {
        Value::Number(_) => format!("{} ms", cell(v)),
        other => cell(other),
    };
    let passed = v["passed"].as_bool().unwrap_or(false);
    let _ = writeln!(
        html,
        "<h2>Verify: <span class=\"{}\">{}</span></h2>\n<p>Window {} ms, precision {} ms. Send to last byte of admitted requests: p50 {}, p99 {}, max {}.</p>",
        if passed { "pass" } else { "fail" },
        if passed { "PASS" } else { "FAIL" },
        cell(&v["window_ms"]),
        cell(&v["precision_ms"]),
        ms(&v["network"]["p50_ms"]),
        ms(&v["network"]["p99_ms"]),
        ms(&v["network"]["max_ms"]),
    );
    html.push_str(
        "<table><tr><th>key</th><th>limit</th><th>per window</th><th>peak definite</th>\
         <th>estimate</th><th>possible</th><th>over-admission</th><th>429s</th>\
         <th>false 429s</th><th>error p99</th><th>error max</th></tr>",
    );
    let denial_cells = |d: &Value| {
        format!(
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            cell(&d["total"]),
            cell(&d["false_429"]),
            ms(&d["error_ms_p99"]),
            ms(&d["error_ms_max"])
        )
    };
    for key in v["keys"].as_array().map_or(&[][..], Vec::as_slice) {
        let name = cell(&key["name"]);
        for l in key["limits"].as_array().map_or(&[][..], Vec::as_slice) {
            let over = match &l["over_admission"] {
                Value::Null => "none".to_owned(),
                o => ms(&o["error_ms"]),
            };
            let _ = write!(
                html,
                "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{over}</td>{}</tr>",
                cell(&l["limit"]),
                cell(&l["limit_value"]),
                percent(&l["peak"]["definite_fraction"]),
                percent(&l["peak"]["estimate_fraction"]),
                percent(&l["peak"]["possible_fraction"]),
                denial_cells(&l["denials"]),
            );
        }
        let unnamed = &key["unnamed_denials"];
        if unnamed["total"].as_u64().unwrap_or(0) > 0 {
            let _ = write!(
                html,
                "<tr><td>{name}</td><td>(unnamed)</td><td></td><td></td><td></td><td></td><td></td>{}</tr>",
                denial_cells(unnamed)
            );
        }
    }
    html.push_str(
        "</table>\n<p class=\"note\">The limiter decided each request at an unknown instant \
         between its send and its last byte. <em>definite</em> counts only requests wholly \
         inside a window, <em>possible</em> every request that meets it, <em>estimate</em> \
         places each at its midpoint; the true peak lies between definite and possible. \
         Errors are lower bounds, reported only when they hold for every possible decision \
         instant; an error up to one precision bucket is the design.</p>\n",
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{Audit, AuditKey};

    fn record(key: u16, done_ms: u64, outcome: Outcome) -> Record {
        Record {
            target: 0,
            key,
            model: 0,
            intended_us: done_ms * 1000 - 2000,
            sent_us: done_ms * 1000 - 1500,
            done_us: done_ms * 1000,
            outcome,
            status: 200,
            denied_by: None,
            denied_in: None,
            prompt_tokens: 10,
            completion_tokens: 4,
            max_tokens: 8,
        }
    }

    fn records() -> Vec<Record> {
        (0..400u64)
            .map(|i| {
                let outcome = match i % 5 {
                    0 => Outcome::RateLimited,
                    1 if i % 3 == 0 => Outcome::Other,
                    _ => Outcome::Ok,
                };
                record((i % 2) as u16, 10 + i * 25, outcome)
            })
            .collect()
    }

    fn replay(records: &[Record], names: [&str; 2]) -> crate::verify::Report {
        Audit {
            window_ms: 2000,
            precision_ms: 100,
            default_max_output_tokens: 16,
            key_names: names.iter().map(|n| n.to_string()).collect(),
            keys: names
                .iter()
                .enumerate()
                .map(|(i, n)| AuditKey::own(n, [40, 1000, 1000], i as u16, 2000, 100))
                .collect(),
        }
        .replay(records)
    }

    fn page<'a>(
        records: &'a [Record],
        series: &'a [UsageSeries],
        summary: &'a Value,
        keys: &'a [String],
    ) -> Page<'a> {
        Page {
            title: "run <1> & more".to_owned(),
            targets: &[],
            keys,
            records,
            series,
            summary,
        }
    }

    fn assert_self_contained(text: &str) {
        for fetch in [
            "http://", "https://", "src=", "href=", "url(", "@import", "<script", "<link",
        ] {
            assert!(!text.contains(fetch), "{fetch} in the page");
        }
        assert!(!text.contains("NaN") && !text.contains("inf\""), "{text}");
    }

    #[test]
    fn the_page_is_self_contained_with_every_chart() {
        let records = records();
        let report = replay(&records, ["team-a", "team-b"]);
        let summary = serde_json::json!({
            "duration_s": 10.0,
            "throughput": {"total": 400, "per_s": 39.95},
            "latency_ms": {"p50": 2.0, "p99": 2.0},
            "per_target": [{"target": "t0", "ok": 320, "rate_limited": 80, "latency_ms": {"p99": 2.5}}],
            "verify": serde_json::to_value(&report).unwrap(),
        });
        let keys = vec!["team-a".to_owned(), "team-b".to_owned()];
        let targets = vec!["127.0.0.1:10000".to_owned()];
        let page = Page {
            targets: &targets,
            ..page(&records, &report.series, &summary, &keys)
        };
        let html = render(&page);
        assert_self_contained(&html);
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.ends_with("</body></html>\n"));
        assert_eq!(html.matches("<svg").count(), 4);
        assert_eq!(html.matches("</svg>").count(), 4);
        assert!(html.contains("team-b: sliding-window usage"));
        assert!(html.contains("<td>throughput.per_s</td><td>39.95</td>"));
        assert!(html.contains("<th>latency_ms.p99</th>"));
        assert!(html.contains("<tr><td>t0</td><td>2.5</td><td>320</td><td>80</td></tr>"));
        assert!(html.contains("Verify: <span class=\"fail\">FAIL</span>"));
        assert!(html.contains("<td>team-a</td><td>requests</td><td>40</td>"));
        // The verify report is shown once, as its own section, not flattened.
        assert!(!html.contains("verify.window_ms"));
    }

    #[test]
    fn names_and_titles_are_escaped() {
        let records = records();
        let report = replay(&records, ["a<b&c", "x\"y'"]);
        let keys = vec!["a<b&c".to_owned()];
        let targets = vec!["http://host/?a=1&b=<2>".to_owned()];
        let summary = serde_json::json!({"note<": "<b>"});
        let page = Page {
            targets: &targets,
            ..page(&records, &report.series, &summary, &keys)
        };
        let html = render(&page);
        assert!(html.contains("<title>run &lt;1&gt; &amp; more</title>"));
        assert!(html.contains("a&lt;b&amp;c: sliding-window usage"));
        assert!(html.contains("x&quot;y&#39;"));
        assert!(html.contains("<code>http://host/?a=1&amp;b=&lt;2&gt;</code>"));
        assert!(html.contains("<td>note&lt;</td><td>&lt;b&gt;</td>"));
        assert!(!html.contains("a<b") && !html.contains("<b>"));
    }

    #[test]
    fn zero_records_still_make_a_page() {
        let html = render(&page(&[], &[], &Value::Null, &[]));
        assert_self_contained(&html);
        assert_eq!(html.matches("<svg").count(), 2);
        assert_eq!(html.matches("no data").count(), 2);
        assert!(html.contains("--verify CONFIG"));
        // And an empty verify: one flat series per limit at 0.
        let report = replay(&[], ["k", "l"]);
        let html = render(&page(&[], &report.series, &Value::Null, &[]));
        assert_self_contained(&html);
        assert_eq!(html.matches("<svg").count(), 4);
    }

    #[test]
    fn svgs_are_written_with_safe_distinct_names() {
        let dir = tempfile::tempdir().unwrap();
        let records = records();
        let report = replay(&records, ["../etc/x", "../etc/x"]);
        let mut series = report.series.clone();
        for s in &mut series[3..] {
            s.key = "../etc?x".to_owned();
        }
        let paths = write_svgs(
            &dir.path().join("svg"),
            &page(&records, &series, &Value::Null, &[]),
        )
        .unwrap();
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "throughput.svg",
                "latency.svg",
                "usage-.._etc_x.svg",
                "usage-.._etc_x-2.svg"
            ]
        );
        for p in &paths {
            assert_eq!(p.parent().unwrap(), dir.path().join("svg"));
            let svg = std::fs::read_to_string(p).unwrap();
            assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
            assert!(svg.ends_with("</svg>"));
        }
        let file = dir.path().join("page.html");
        write(&file, &page(&records, &series, &Value::Null, &[])).unwrap();
        assert!(std::fs::read_to_string(file).unwrap().contains("<svg"));
    }

    fn polyline(svg: &str, n: usize) -> Vec<(f64, f64)> {
        let points = svg.split("<polyline").nth(n + 1).unwrap();
        let points = points
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        points
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn charts_are_to_scale() {
        // 10 answers in the first second, 5 in the next, one straggler as the run ends: the
        // 2xx line peaks at the top, and the run's last instant adds no bucket.
        let mut records: Vec<Record> = (0..10)
            .map(|i| record(0, 100 + i * 50, Outcome::Ok))
            .collect();
        records.extend((0..5).map(|i| record(0, 1100 + i * 100, Outcome::Ok)));
        records.push(record(0, 2000, Outcome::Ok));
        let svg = throughput(&records).svg(false);
        let ok = polyline(&svg, 0);
        assert_eq!(ok[0], (chart::LEFT, chart::TOP));
        assert_eq!(ok[1], (chart::RIGHT, (chart::TOP + chart::BOTTOM) / 2.0));
        assert_eq!(ok.len(), 2);
        // Latency: every request took 2 ms, so the line is flat at the top (2 ms).
        let svg = latency(&records).svg(false);
        assert!(polyline(&svg, 0).iter().all(|p| p.1 == chart::TOP));
        // Usage: a window exactly at its limit sits on the 100 % line, the axis reaching
        // the next round number (125 %).
        let series = UsageSeries {
            key: "k".into(),
            limit: LimitKind::Requests,
            limit_value: 40,
            points: vec![(0.0, 0), (1.0, 40)],
        };
        let svg = usage("k", &[&series]).svg(false);
        // Coordinates are written with one decimal.
        let full =
            ((chart::BOTTOM - 100.0 / 125.0 * (chart::BOTTOM - chart::TOP)) * 10.0).round() / 10.0;
        assert_eq!(polyline(&svg, 0)[1], (chart::RIGHT, full));
        assert_eq!(
            polyline(&svg, 1),
            vec![(chart::LEFT, full), (chart::RIGHT, full)]
        );
    }
}
