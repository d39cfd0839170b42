//! `--report FILE.html`: one self-contained page (inline CSS and SVG, no scripts) with
//! the rounds' summary table and, per operation kind, throughput per second and p50/p99
//! latency per second, one line per endpoint and round.
//!
//! Reads [`RoundResult`]s from `results`; it never imports `driver`, which calls it.

use std::fmt::Write as _;

use crate::cli::Cli;
use crate::results::RoundResult;
use crate::stats::{KindReport, SecondPoint};

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 32.0;
/// Shades per side, by round.
const BLUES: &[&str] = &["#1f5fa8", "#5b9bd5", "#0b3a66", "#8fb9e3"];
const ORANGES: &[&str] = &["#d2691e", "#f0a060", "#8a3d00", "#f5c08f"];

/// (seconds into the round, value).
type Point = (f64, f64);

struct Series {
    label: String,
    color: &'static str,
    dashed: bool,
    points: Vec<Point>,
}

pub fn html(cli: &Cli, results: &[RoundResult]) -> String {
    let mut out = String::new();
    let workload = cli.workload.name();
    let command: Vec<String> = std::env::args().collect();
    let _ = write!(
        out,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>loadgen {w}</title>\n<style>\
         body{{font:14px system-ui,sans-serif;margin:24px;color:#222}}\
         table{{border-collapse:collapse;margin:8px 0 16px}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
         th{{background:#f3f3f3}} td.l{{text-align:left}}\
         code{{background:#f6f6f6;padding:2px 4px}}\
         .legend span{{display:inline-block;margin-right:16px}}\
         .sw{{display:inline-block;width:22px;height:3px;vertical-align:middle;margin-right:4px}}\
         svg{{display:block;margin:4px 0 18px}} svg text{{font:11px system-ui,sans-serif;fill:#444}}\
         </style></head><body>\n<h1>loadgen {w}</h1>\n<p><code>{cmd}</code></p>\n",
        w = esc(workload),
        cmd = esc(&command.join(" "))
    );
    summary_table(&mut out, results);
    let Some(first) = results.first() else {
        out.push_str("<p>No rounds.</p></body></html>\n");
        return out;
    };
    for (k, kind) in first.kinds.iter().enumerate() {
        if results
            .iter()
            .all(|r| r.kinds.get(k).is_none_or(|x| x.ops == 0 && x.errors == 0))
        {
            continue;
        }
        let _ = writeln!(out, "<h2>{}</h2>", esc(kind.kind));
        let mut tput = Vec::new();
        let mut lat = Vec::new();
        for r in results {
            let Some(kr) = r.kinds.get(k) else { continue };
            let color = color(r);
            let label = format!("{} {} round {}", r.side, r.endpoint, r.round);
            tput.push(Series {
                label: label.clone(),
                color,
                dashed: false,
                points: throughput_points(kr, |s| s.ok),
            });
            if kr.timeline.iter().any(|s| s.errors > 0) {
                tput.push(Series {
                    label: format!("{label} errors"),
                    color: "#c0392b",
                    dashed: true,
                    points: throughput_points(kr, |s| s.errors),
                });
            }
            let (p50, p99) = latency_points(kr);
            lat.push(Series {
                label: format!("{label} p50"),
                color,
                dashed: false,
                points: p50,
            });
            lat.push(Series {
                label: format!("{label} p99"),
                color,
                dashed: true,
                points: p99,
            });
        }
        out.push_str("<p>Operations completed per second (errors dashed red)</p>\n");
        out.push_str(&chart(&tput, "ops/s"));
        legend(&mut out, &tput);
        out.push_str("<p>Latency per second: p50 (solid), p99 (dashed)</p>\n");
        out.push_str(&chart(&lat, "ms"));
        legend(&mut out, &lat);
    }
    out.push_str("</body></html>\n");
    out
}

fn color(r: &RoundResult) -> &'static str {
    let palette = if r.side == "A" { BLUES } else { ORANGES };
    palette[r.round % palette.len()]
}

fn summary_table(out: &mut String, results: &[RoundResult]) {
    out.push_str(
        "<table><tr><th>side</th><th>endpoint</th><th>round</th><th>kind</th><th>ok</th>\
         <th>ops/s</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>max ms</th>\
         <th>errors</th><th>items/s</th><th>conflicts</th><th>server CPU µs/op</th></tr>\n",
    );
    for r in results {
        for (i, k) in r.kinds.iter().enumerate() {
            let cpu = if i == 0 {
                r.server_cpu_us_per_op
                    .map(|c| format!("{c:.0}"))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            let ops_per_sec = if i == 0 { r.ops_per_sec } else { k.ops_per_sec };
            let _ = writeln!(
                out,
                "<tr><td class=l>{}</td><td class=l>{}</td><td>{}</td><td class=l>{}</td><td>{}</td>\
                 <td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td></tr>",
                r.side,
                esc(&r.endpoint),
                r.round,
                esc(k.kind),
                k.ops,
                ops_per_sec,
                k.latency.p50_ms,
                k.latency.p90_ms,
                k.latency.p99_ms,
                k.latency.max_ms,
                k.errors,
                if k.items > 0 {
                    format!("{:.0}", k.items_per_sec)
                } else {
                    String::new()
                },
                if k.conflicts > 0 {
                    k.conflicts.to_string()
                } else {
                    String::new()
                },
                cpu
            );
        }
        for n in &r.notes {
            let _ = writeln!(
                out,
                "<tr><td></td><td class=l colspan=13>{}</td></tr>",
                esc(n)
            );
        }
    }
    out.push_str("</table>\n");
}

/// Where second `i` is drawn (its end) and the factor that turns its count into a
/// rate: a last partial second is scaled, or left out when shorter than 0.2 s.
fn bucket_x(k: &KindReport, i: usize) -> Option<(f64, f64)> {
    let full = k.seconds.floor() as usize;
    let frac = k.seconds - k.seconds.floor();
    if i < full {
        Some(((i + 1) as f64, 1.0))
    } else if i == full && frac >= 0.2 {
        Some((k.seconds, 1.0 / frac))
    } else {
        None
    }
}

/// Operations per second at the end of each second.
fn throughput_points(k: &KindReport, count: impl Fn(&SecondPoint) -> u64) -> Vec<Point> {
    k.timeline
        .iter()
        .enumerate()
        .filter_map(|(i, s)| bucket_x(k, i).map(|(x, scale)| (x, count(s) as f64 * scale)))
        .collect()
}

/// (p50, p99) per second that had operations.
fn latency_points(k: &KindReport) -> (Vec<Point>, Vec<Point>) {
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for (i, s) in k.timeline.iter().enumerate() {
        let Some((x, _)) = bucket_x(k, i) else {
            continue;
        };
        if s.ok == 0 {
            continue;
        }
        p50.push((x, s.p50_ms));
        p99.push((x, s.p99_ms));
    }
    (p50, p99)
}

/// 1, 2, 5 times a power of ten at or above `v`.
fn nice_ceil(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_tick(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn chart(series: &[Series], unit: &str) -> String {
    let x_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max)
        .ceil();
    let y_max = nice_ceil(
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0f64, f64::max),
    );
    let pw = WIDTH - LEFT - RIGHT;
    let ph = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / x_max * pw;
    let sy = |y: f64| TOP + ph - y / y_max * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\">"
    );
    for i in 0..=5 {
        let y = y_max * i as f64 / 5.0;
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y1:.1}\" y2=\"{y1:.1}\" stroke=\"#e4e4e4\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            sy(y) + 4.0,
            fmt_tick(y),
            y1 = sy(y)
        );
    }
    let step = nice_ceil(x_max / 10.0).max(1.0);
    let mut x = 0.0;
    while x <= x_max + 1e-9 {
        let _ = writeln!(
            s,
            "<line x1=\"{x1:.1}\" x2=\"{x1:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>\
             <text x=\"{x1:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + ph,
            TOP + ph + 4.0,
            TOP + ph + 16.0,
            fmt_tick(x.round()),
            x1 = sx(x)
        );
        x += step;
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds into the round</text>\
         <text x=\"12\" y=\"{:.1}\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{}</text>\
         <rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw:.1}\" height=\"{ph:.1}\" fill=\"none\" stroke=\"#999\"/>",
        LEFT + pw / 2.0,
        HEIGHT - 4.0,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(unit)
    );
    for ser in series {
        if ser.points.is_empty() {
            continue;
        }
        let pts: Vec<String> = ser
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\"{} points=\"{}\"><title>{}</title></polyline>",
            ser.color,
            if ser.dashed {
                " stroke-dasharray=\"5 3\""
            } else {
                ""
            },
            pts.join(" "),
            esc(&ser.label)
        );
        if ser.points.len() == 1 {
            let (x, y) = ser.points[0];
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>",
                sx(x),
                sy(y),
                ser.color
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn legend(out: &mut String, series: &[Series]) {
    out.push_str("<div class=legend>");
    for s in series {
        let style = if s.dashed {
            format!(
                "background:repeating-linear-gradient(90deg,{c} 0 5px,transparent 5px 8px)",
                c = s.color
            )
        } else {
            format!("background:{}", s.color)
        };
        let _ = write!(
            out,
            "<span><i class=sw style=\"{style}\"></i>{}</span>",
            esc(&s.label)
        );
    }
    out.push_str("</div>\n");
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceil(0.0), 1.0);
        assert_eq!(nice_ceil(3.0), 5.0);
        assert_eq!(nice_ceil(11.0), 20.0);
        assert_eq!(nice_ceil(100.0), 100.0);
        assert_eq!(nice_ceil(0.03), 0.05);
    }

    #[test]
    fn escapes() {
        assert_eq!(
            esc("<a href=\"x\">&</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
    }
}
