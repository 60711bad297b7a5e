//! A small SVG line chart: title, axes with round ticks, lines, legend.
//!
//! The reports need three kinds of chart, all line charts, and must be readable offline
//! years later: so the SVG is written here as plain text, with a generic font family and
//! no scripts, fonts or links. The plotting crates either pull a font stack in to measure
//! text or are far larger than this file.

use std::fmt::Write as _;

/// Outer size of every chart, in SVG user units (px).
pub(crate) const WIDTH: f64 = 760.0;
pub(crate) const HEIGHT: f64 = 360.0;
/// The plot area: everything inside the axes.
pub(crate) const LEFT: f64 = 72.0;
pub(crate) const RIGHT: f64 = WIDTH - 40.0;
pub(crate) const TOP: f64 = 40.0;
pub(crate) const BOTTOM: f64 = HEIGHT - 84.0;

/// How x values map to the width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum XAxis {
    /// Plain numbers from the data's smallest (or 0) to its largest.
    Linear,
    /// Percentiles from 50 to 99.999 on the HDR scale: points carry
    /// [`percentile_x`]`(q)`, so each "nine" gets the same width.
    Percentile,
}

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Line {
    pub name: String,
    pub color: &'static str,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_axis: XAxis,
    /// The y axis starts at 0 and reaches at least this far (a round number above).
    pub y_at_least: f64,
    pub lines: Vec<Line>,
}

/// The x position of percentile `q` (in %) on a [`XAxis::Percentile`] axis: the number of
/// nines, `−log10(1 − q/100)`; 90 % → 1, 99 % → 2, 99.9 % → 3.
pub(crate) fn percentile_x(q: f64) -> f64 {
    -(1.0 - q / 100.0).max(1e-12).log10()
}

const PERCENTILE_TICKS: [(f64, &str); 6] = [
    (50.0, "50%"),
    (90.0, "90%"),
    (99.0, "99%"),
    (99.9, "99.9%"),
    (99.99, "99.99%"),
    (99.999, "99.999%"),
];

/// Escapes text for HTML and SVG (element content and quoted attributes).
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Round tick positions from 0 (or `min`) up to at least `max`: steps of 1, 2, 2.5 or 5
/// times a power of ten, about five of them. The last tick is the axis end, so a value
/// equal to a round maximum lands exactly on the top of the plot.
pub(crate) fn ticks(min: f64, max: f64) -> (f64, Vec<f64>) {
    let span = max - min;
    let span = if span.is_finite() && span > 0.0 {
        span
    } else {
        1.0
    };
    let raw = span / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude);
    let first = (min / step).floor();
    let count = ((min + span) / step - first - 1e-9).ceil().max(1.0) as usize;
    let values = (0..=count).map(|i| (first + i as f64) * step).collect();
    (step, values)
}

/// A tick label: as many decimals as the step needs, thousands as k and millions as M.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = |step: f64| (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    if v.abs() >= 1e6 {
        format!("{:.*}M", decimals(step / 1e6), v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.*}k", decimals(step / 1e3), v / 1e3)
    } else {
        format!("{:.*}", decimals(step), v)
    }
}

impl Chart {
    /// The chart as an `<svg>` element; `standalone` adds the XML namespace a `.svg` file
    /// needs (HTML knows it without).
    pub(crate) fn svg(&self, standalone: bool) -> String {
        let points = || {
            self.lines
                .iter()
                .flat_map(|l| &l.points)
                .filter(|p| p.0.is_finite() && p.1.is_finite())
        };
        let (x_min, x_max, x_ticks): (f64, f64, Vec<(f64, String)>) = match self.x_axis {
            XAxis::Percentile => (
                percentile_x(50.0),
                percentile_x(99.999),
                PERCENTILE_TICKS
                    .iter()
                    .map(|&(q, label)| (percentile_x(q), label.to_owned()))
                    .collect(),
            ),
            XAxis::Linear => {
                // The axis spans the data exactly (time runs to the end of the run, not
                // to the next round number); the ticks are the round values inside it.
                let lo = points().map(|p| p.0).fold(0f64, f64::min);
                let hi = points().map(|p| p.0).fold(lo, f64::max);
                let hi = if hi > lo { hi } else { lo + 1.0 };
                let (step, values) = ticks(lo, hi);
                let labels = values
                    .iter()
                    .filter(|&&v| v >= lo - step * 1e-9 && v <= hi + step * 1e-9)
                    .map(|&v| (v, tick_label(v, step)))
                    .collect();
                (lo, hi, labels)
            }
        };
        let y_top = points().map(|p| p.1).fold(self.y_at_least, f64::max);
        let (y_step, y_values) = ticks(0.0, y_top);
        let y_max = y_values.last().copied().unwrap_or(1.0);
        let sx =
            |x: f64| LEFT + (x - x_min) / (x_max - x_min).max(f64::MIN_POSITIVE) * (RIGHT - LEFT);
        let sy = |y: f64| BOTTOM - y / y_max.max(f64::MIN_POSITIVE) * (BOTTOM - TOP);

        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg{} viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12" role="img" aria-label="{title}">"#,
            if standalone {
                r#" xmlns="http://www.w3.org/2000/svg""#
            } else {
                ""
            },
            title = escape(&self.title),
        );
        let _ = write!(
            svg,
            r##"<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/><text x="{LEFT}" y="22" font-size="14" font-weight="bold">{}</text>"##,
            escape(&self.title)
        );
        for &y in &y_values {
            let at = sy(y);
            let _ = write!(
                svg,
                r##"<line x1="{LEFT}" x2="{RIGHT}" y1="{at:.1}" y2="{at:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT - 6.0,
                at + 4.0,
                tick_label(y, y_step)
            );
        }
        for (x, label) in &x_ticks {
            let at = sx(*x);
            let _ = write!(
                svg,
                r##"<line x1="{at:.1}" x2="{at:.1}" y1="{TOP}" y2="{BOTTOM}" stroke="#f0f0f0"/><text x="{at:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                BOTTOM + 16.0,
                escape(label)
            );
        }
        let _ = write!(
            svg,
            r##"<path d="M{LEFT} {TOP}V{BOTTOM}H{RIGHT}" fill="none" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
            (LEFT + RIGHT) / 2.0,
            BOTTOM + 36.0,
            escape(&self.x_label),
            (TOP + BOTTOM) / 2.0,
            escape(&self.y_label)
        );
        for line in &self.lines {
            let mut coords = String::new();
            for &(x, y) in line
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
            {
                let _ = write!(coords, "{:.1},{:.1} ", sx(x), sy(y));
            }
            if !coords.is_empty() {
                let _ = write!(
                    svg,
                    r#"<polyline fill="none" stroke="{}" stroke-width="1.6"{} points="{}"/>"#,
                    line.color,
                    if line.dashed {
                        r#" stroke-dasharray="6 4""#
                    } else {
                        ""
                    },
                    coords.trim_end()
                );
            }
        }
        if points().next().is_none() {
            let _ = write!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#888">no data</text>"##,
                (LEFT + RIGHT) / 2.0,
                (TOP + BOTTOM) / 2.0
            );
        }
        // The legend: under the x label, entries as wide as their names, two rows at most.
        let (mut x, mut y) = (LEFT, BOTTOM + 58.0);
        for line in &self.lines {
            let width = 40.0 + 7.0 * line.name.chars().count() as f64;
            if x > LEFT && x + width > WIDTH {
                (x, y) = (LEFT, y + 18.0);
            }
            let _ = write!(
                svg,
                r#"<line x1="{x:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="{}" stroke-width="2.5"{}/><text x="{:.1}" y="{:.1}">{}</text>"#,
                x + 22.0,
                line.color,
                if line.dashed {
                    r#" stroke-dasharray="6 4""#
                } else {
                    ""
                },
                x + 28.0,
                y + 4.0,
                escape(&line.name),
            );
            x += width;
        }
        svg.push_str("</svg>");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(points: Vec<(f64, f64)>) -> Chart {
        Chart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_axis: XAxis::Linear,
            y_at_least: 0.0,
            lines: vec![Line {
                name: "a".into(),
                color: "#000",
                dashed: false,
                points,
            }],
        }
    }

    #[test]
    fn ticks_are_round_and_reach_the_maximum() {
        assert_eq!(
            ticks(0.0, 100.0),
            (20.0, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0])
        );
        assert_eq!(ticks(0.0, 101.0).1.last(), Some(&125.0));
        let (step, values) = ticks(0.0, 0.0);
        assert_eq!((step, values.len(), values.last()), (0.2, 6, Some(&1.0)));
        assert_eq!(ticks(0.0, 7.0).0, 2.0);
        assert_eq!(ticks(0.0, 7.0).1.last(), Some(&8.0));
        assert_eq!(ticks(0.0, f64::NAN).1.len(), 6);
    }

    #[test]
    fn labels_use_k_and_m() {
        assert_eq!(tick_label(20_000.0, 5_000.0), "20k");
        assert_eq!(tick_label(2_500_000.0, 500_000.0), "2.5M");
        assert_eq!(tick_label(0.5, 0.1), "0.5");
        assert_eq!(tick_label(40.0, 20.0), "40");
    }

    #[test]
    fn a_round_maximum_lands_on_the_top_and_the_last_x_on_the_right() {
        let svg = chart(vec![(0.0, 0.0), (5.0, 50.0), (10.0, 100.0)]).svg(false);
        let points = svg.split(r#"points=""#).nth(1).unwrap();
        let points = points.split('"').next().unwrap();
        let middle = (LEFT + RIGHT) / 2.0;
        assert_eq!(
            points,
            format!("{LEFT:.1},{BOTTOM:.1} {middle:.1},158.0 {RIGHT:.1},{TOP:.1}")
        );
    }

    #[test]
    fn percentiles_are_nines() {
        assert!((percentile_x(90.0) - 1.0).abs() < 1e-9);
        assert!((percentile_x(99.9) - 3.0).abs() < 1e-9);
        assert!(percentile_x(100.0).is_finite());
    }

    #[test]
    fn empty_and_odd_values_draw_axes_and_no_nan() {
        for points in [
            vec![],
            vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)],
            vec![(3.0, 0.0)],
        ] {
            let svg = chart(points).svg(true);
            assert!(svg.starts_with("<svg xmlns="));
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
        assert!(chart(vec![]).svg(false).contains("no data"));
    }
}
