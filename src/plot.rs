//! A loss-curve plot as a small hand-written SVG: training loss per step (thin line), its moving
//! average (thick line) and evaluation loss (points joined by a dashed line), on linear axes with
//! tick labels.

use std::fmt::Write;

/// One named series of `(step, value)` points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
}

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;

/// "Nice" tick values covering `[lo, hi]` (about `n` of them).
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Centered moving average over `window` points.
fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let half = window / 2;
    (0..points.len())
        .map(|i| {
            let a = i.saturating_sub(half);
            let b = (i + half + 1).min(points.len());
            let m = points[a..b].iter().map(|p| p.1).sum::<f64>() / (b - a) as f64;
            (points[i].0, m)
        })
        .collect()
}

/// The SVG document of a training run's loss curves.
pub fn loss_svg(title: &str, train: &[(f64, f64)], eval: &[(f64, f64)]) -> String {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let train: Vec<(f64, f64)> = train.iter().filter(finite).copied().collect();
    let eval: Vec<(f64, f64)> = eval.iter().filter(finite).copied().collect();
    let all: Vec<&(f64, f64)> = train.iter().chain(&eval).collect();
    let (mut x0, mut x1, mut y0, mut y1) = (0.0f64, 1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for p in &all {
        x1 = x1.max(p.0);
        y0 = y0.min(p.1);
        y1 = y1.max(p.1);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    if y1 - y0 < 1e-6 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let pad = (y1 - y0) * 0.05;
    y0 = (y0 - pad).max(0.0f64.min(y0));
    y1 += pad;
    x0 = x0.min(all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min));
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let py = |y: f64| TOP + (y1 - y) / (y1 - y0) * (H - TOP - BOTTOM);
    let path = |pts: &[(f64, f64)]| {
        let mut s = String::new();
        for (i, p) in pts.iter().enumerate() {
            let _ = write!(
                s,
                "{}{:.1},{:.1}",
                if i == 0 { "M" } else { " L" },
                px(p.0),
                py(p.1)
            );
        }
        s
    };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        xml_escape(title)
    );
    // Axes, grid and ticks.
    for t in ticks(y0, y1, 6) {
        let y = py(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    for t in ticks(x0, x1, 8) {
        let x = px(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 16.0,
            fmt_tick(t)
        );
    }
    let _ = writeln!(
        svg,
        r#"<path d="M{LEFT},{TOP} L{LEFT},{:.1} L{:.1},{:.1}" fill="none" stroke="black"/>"#,
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text><text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">loss (nats / target token)</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 10.0,
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0
    );
    // Curves.
    let mut legend: Vec<(&str, &str, &str)> = Vec::new();
    if !train.is_empty() {
        let _ = writeln!(
            svg,
            r##"<path d="{}" fill="none" stroke="#9ecae1" stroke-width="1"/>"##,
            path(&train)
        );
        legend.push(("train loss", "#9ecae1", ""));
        if train.len() >= 8 {
            let w = (train.len() / 10).max(3);
            let _ = writeln!(
                svg,
                r##"<path d="{}" fill="none" stroke="#2171b5" stroke-width="2.2"/>"##,
                path(&smooth(&train, w))
            );
            legend.push(("train loss (moving average)", "#2171b5", ""));
        }
    }
    if !eval.is_empty() {
        let _ = writeln!(
            svg,
            r##"<path d="{}" fill="none" stroke="#d94801" stroke-width="1.5" stroke-dasharray="5,4"/>"##,
            path(&eval)
        );
        for p in &eval {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#d94801"/>"##,
                px(p.0),
                py(p.1)
            );
        }
        legend.push(("eval loss", "#d94801", r#" stroke-dasharray="5,4""#));
    }
    for (i, (name, color, dash)) in legend.iter().enumerate() {
        let y = TOP + 14.0 + 18.0 * i as f64;
        let x = W - RIGHT - 210.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2.5"{dash}/><text x="{}" y="{}">{}</text>"#,
            x + 26.0,
            x + 32.0,
            y + 4.0,
            name
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_both_curves_and_is_well_formed() {
        let train: Vec<(f64, f64)> = (1..=30).map(|s| (s as f64, 3.0 / s as f64 + 0.5)).collect();
        let eval = vec![(0.0, 3.5), (10.0, 1.2), (30.0, 0.9)];
        let svg = loss_svg("a <run>", &train, &eval);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("eval loss") && svg.contains("train loss"));
        assert!(svg.contains("a &lt;run&gt;"));
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn ticks_cover_the_range() {
        let t = ticks(0.37, 4.2, 6);
        assert!(t.first().unwrap() >= &0.37 && t.last().unwrap() <= &4.2);
        assert!(t.len() >= 3 && t.len() <= 12, "{t:?}");
    }
}
