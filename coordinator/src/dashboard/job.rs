//! A job's page (`/jobs/{id}`) and its JSON (`/api/jobs/{id}`): state and progress, loss and
//! tokens/s curves (recoveries marked), the expert-load heat map of the latest step, the
//! placement (pipeline stage x data-parallel rank, coloured by EP group), the step timeline,
//! the failure and recovery log (a table and duration bars) and the state history.

use std::fmt::Write;

use serde_json::json;

use super::cluster::{ep_group, placement_summary, progress};
use super::{
    badge, clock, duration_ms, escape, job_state_class, page, push_escaped, short, timeline, utc,
};
use crate::actor::{Snapshot, StepPoint};
use crate::jobs::{JobRecord, Recovery};
use shoal_proto::v1 as pb;

/// Placement columns (data-parallel ranks) drawn at most.
const MAX_DP_COLUMNS: usize = 64;
/// State changes listed at most (the newest).
const MAX_HISTORY: usize = 60;

/// The HTML fragments of the page, by element id (the timeline apart: it reads a file).
pub fn fragments(s: &Snapshot, j: &JobRecord, now_ms: u64) -> Vec<(&'static str, String)> {
    let curve = s.curves.get(&j.id).map_or(&[][..], Vec::as_slice);
    let latest = s.steps.get(&j.id);
    vec![
        ("head", head(j, latest)),
        ("curves", curves(j, curve)),
        ("heatmap", heatmap(latest)),
        ("placement", placement(j)),
        ("recoveries", recoveries(j, now_ms)),
        ("history", history(j)),
    ]
}

/// The whole page; `timeline` is [`timeline::fragment`] of the job (read by the caller, off
/// the async runtime).
pub fn render_page(s: &Snapshot, j: &JobRecord, timeline: &str, now_ms: u64) -> String {
    let f = fragments(s, j, now_ms);
    let get = |id: &str| {
        f.iter()
            .find(|(k, _)| *k == id)
            .map_or("", |(_, v)| v.as_str())
    };
    let mut body = String::with_capacity(f.iter().map(|(_, v)| v.len()).sum::<usize>() + 4096);
    let _ = write!(
        body,
        "<section><div id=\"head\">{}</div></section>",
        get("head")
    );
    let _ = write!(
        body,
        "<section><h2>Training</h2><div id=\"curves\" class=\"cols\">{}</div></section>",
        get("curves")
    );
    let _ = write!(
        body,
        "<section><h2>Failures and recoveries</h2><div id=\"recoveries\">{}</div></section>",
        get("recoveries")
    );
    let _ = write!(
        body,
        "<section><h2>Expert load per MoE layer (latest step)</h2><div id=\"heatmap\">{}</div></section>",
        get("heatmap")
    );
    let _ = write!(
        body,
        "<section><h2>Step timeline (per rank: F / B / W, dispatch, combine, idle)</h2><div id=\"timeline\">{timeline}</div></section>"
    );
    let _ = write!(
        body,
        "<section><h2>Placement</h2><div id=\"placement\">{}</div></section>",
        get("placement")
    );
    let _ = write!(
        body,
        "<section><h2>History</h2><div id=\"history\">{}</div></section>",
        get("history")
    );
    let api = format!("/api/jobs/{}", j.id);
    page(&format!("{} {}", j.id, j.spec.name), &api, &body)
}

/// `/api/jobs/{id}`: the record's figures, its curve and the page's fragments (with the
/// timeline's when `timeline` is given).
pub fn api(
    s: &Snapshot,
    j: &JobRecord,
    timeline: Option<String>,
    now_ms: u64,
) -> serde_json::Value {
    let curve: Vec<_> = s
        .curves
        .get(&j.id)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|p| json!([p.step, p.loss, p.tokens_per_s]))
        .collect();
    let recoveries: Vec<_> = j
        .recoveries
        .iter()
        .map(|r| {
            json!({
                "attempt": r.attempt,
                "cause": r.cause,
                "detected_unix_ms": r.detected_unix_ms,
                "last_heard_unix_ms": r.last_heard_unix_ms,
                "resumed_unix_ms": r.resumed_unix_ms,
                "recovery_ms": r.recovery_ms(),
                "failed_step": r.failed_step,
                "restored_step": r.restored_step,
                "steps_redone": r.steps_redone(),
                "dp_before": r.dp_before,
                "dp_after": r.dp_after,
                "nodes_before": r.nodes_before,
                "nodes_after": r.nodes_after,
                "replan_us": r.replan_us,
            })
        })
        .collect();
    let mut fragments: serde_json::Map<String, serde_json::Value> = fragments(s, j, now_ms)
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
        .collect();
    if let Some(t) = timeline {
        fragments.insert("timeline".into(), serde_json::Value::String(t));
    }
    json!({
        "updated_unix_ms": now_ms,
        "id": j.id,
        "name": j.spec.name,
        "state": job_state_class(j.state),
        "reason": j.reason,
        "step": j.step,
        "steps": j.spec.training.steps,
        "attempt": j.attempt,
        "checkpoint_step": j.checkpoint_step,
        "placement": j.placement.iter().map(|p| json!({
            "node": p.node, "device": p.device, "pp_rank": p.pp_rank, "dp_rank": p.dp_rank,
            "ep_group": ep_group(j.spec.parallelism.ep, p),
        })).collect::<Vec<_>>(),
        "curve": curve,
        "recoveries": recoveries,
        "fragments": fragments,
    })
}

fn head(j: &JobRecord, latest: Option<&pb::StepMetrics>) -> String {
    let mut out = String::from("<h1>");
    push_escaped(&mut out, &j.spec.name);
    let _ = write!(out, " <span class=\"mute\">{}</span> ", escape(&j.id));
    badge(&mut out, job_state_class(j.state));
    out.push_str("</h1><div class=\"kv\"><div><span>progress</span>");
    progress(&mut out, j);
    out.push_str("</div>");
    let par = &j.spec.parallelism;
    let mut kv = |k: &str, v: String| {
        let _ = write!(out, "<div><span>{k}</span>");
        push_escaped(&mut out, &v);
        out.push_str("</div>");
    };
    kv("attempt", j.attempt.to_string());
    kv("checkpoint", format!("step {}", j.checkpoint_step));
    kv("recoveries", j.recoveries.len().to_string());
    if let Some(m) = latest {
        kv("loss", format!("{:.4}", m.loss));
        kv("tokens/s", short(m.tokens_per_s));
        kv("step time", format!("{:.3} s", m.seconds));
        if m.seconds > 0.0 {
            kv(
                "pipeline bubble",
                format!("{:.0}%", (m.bubble_s / m.seconds * 100.0).clamp(0.0, 100.0)),
            );
        }
    }
    kv(
        "parallelism",
        format!(
            "pp {} × dp {} (ep {}), {}",
            par.pp, par.dp, par.ep, par.schedule
        ),
    );
    kv(
        "model",
        format!("{} ({:?})", j.spec.model, j.spec.precision).to_lowercase(),
    );
    kv("priority", j.spec.priority.to_string());
    kv("submitted", utc(j.submitted_unix_ms()));
    kv("placement", placement_summary(j));
    out.push_str("</div>");
    if !j.reason.is_empty() {
        out.push_str("<p class=\"mute\">");
        push_escaped(&mut out, &j.reason);
        out.push_str("</p>");
    }
    out
}

/// A line chart of `(x, y)` points as SVG, with the steps in `marks` drawn as red dashed lines.
pub fn line_chart(
    id: &str,
    title: &str,
    colour: &str,
    pts: &[(f64, f64)],
    marks: &[(f64, String)],
) -> String {
    const W: f64 = 560.0;
    const H: f64 = 200.0;
    const L: f64 = 56.0;
    const B: f64 = 24.0;
    const T: f64 = 20.0;
    let mut out = format!(
        "<svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" role=\"img\" aria-label=\"{}\">\
         <text x=\"0\" y=\"13\" style=\"font-weight:600\">{}</text>",
        escape(title),
        escape(title)
    );
    let pts: Vec<(f64, f64)> = pts
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if pts.is_empty() {
        let _ = write!(
            out,
            "<text x=\"{L}\" y=\"{}\">no steps reported yet</text></svg>",
            H / 2.0
        );
        return out;
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (mut y0, mut y1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let pad = ((y1 - y0) * 0.08).max(y1.abs() * 0.01).max(1e-9);
    y0 -= pad;
    y1 += pad;
    let xs = (W - L - 8.0) / (x1 - x0).max(1.0);
    let ys = (H - B - T) / (y1 - y0);
    let px = |x: f64| L + (x - x0) * xs;
    let py = |y: f64| H - B - (y - y0) * ys;
    let _ = write!(
        out,
        "<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{}\" stroke=\"#ccd\"/><line x1=\"{L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#ccd\"/>",
        H - B,
        H - B,
        W - 8.0,
        H - B
    );
    let _ = write!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        L - 4.0,
        T + 8.0,
        short(y1),
        L - 4.0,
        H - B,
        short(y0)
    );
    let _ = write!(
        out,
        "<text x=\"{L}\" y=\"{}\">step {x0}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">step {x1}</text>",
        H - 6.0,
        W - 8.0,
        H - 6.0
    );
    for (x, label) in marks {
        if *x < x0 || *x > x1 {
            continue;
        }
        let _ = write!(
            out,
            "<line class=\"mark\" x1=\"{:.1}\" y1=\"{T}\" x2=\"{:.1}\" y2=\"{}\" stroke=\"#d3343a\" stroke-dasharray=\"4 3\"><title>",
            px(*x),
            px(*x),
            H - B
        );
        push_escaped(&mut out, label);
        out.push_str("</title></line>");
    }
    out.push_str("<polyline class=\"line\" fill=\"none\" stroke-width=\"1.8\" stroke=\"");
    out.push_str(colour);
    out.push_str("\" points=\"");
    for (x, y) in &pts {
        let _ = write!(out, "{:.1},{:.1} ", px(*x), py(*y));
    }
    out.push_str("\"/>");
    if pts.len() == 1 {
        let (x, y) = pts[0];
        let _ = write!(
            out,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
            px(x),
            py(y)
        );
    }
    out.push_str("</svg>");
    out
}

fn curves(j: &JobRecord, curve: &[StepPoint]) -> String {
    let marks: Vec<(f64, String)> = j
        .recoveries
        .iter()
        .map(|r| {
            (
                r.failed_step as f64,
                format!("failure at step {}: {}", r.failed_step, r.cause),
            )
        })
        .collect();
    let loss: Vec<(f64, f64)> = curve.iter().map(|p| (p.step as f64, p.loss)).collect();
    let tps: Vec<(f64, f64)> = curve
        .iter()
        .map(|p| (p.step as f64, p.tokens_per_s))
        .collect();
    let mut out = String::from("<div>");
    out.push_str(&line_chart("loss-chart", "loss", "#4e79a7", &loss, &marks));
    out.push_str("</div><div>");
    out.push_str(&line_chart(
        "tps-chart",
        "tokens/s",
        "#59a14f",
        &tps,
        &marks,
    ));
    out.push_str("</div>");
    if !marks.is_empty() {
        out.push_str(
            "<p class=\"mute\" style=\"grid-column:1/-1;margin:0\">red dashed lines: failures (the steps after each were run again from the checkpoint)</p>",
        );
    }
    out
}

/// Fill for a load `ratio` to the layer's mean: white at 1, blue below, red above (full at 0
/// and 2).
fn heat(ratio: f64) -> String {
    let r = if ratio.is_finite() { ratio } else { 0.0 };
    if r >= 1.0 {
        let t = (r - 1.0).min(1.0);
        format!("hsl(4,75%,{:.0}%)", 96.0 - 50.0 * t)
    } else {
        let t = (1.0 - r).min(1.0);
        format!("hsl(214,70%,{:.0}%)", 96.0 - 46.0 * t)
    }
}

fn heatmap(latest: Option<&pb::StepMetrics>) -> String {
    let Some(m) = latest.filter(|m| !m.expert_loads.is_empty()) else {
        return "<p class=\"note\">no expert loads reported yet</p>".into();
    };
    let layers = m.expert_loads.len();
    let experts = m
        .expert_loads
        .iter()
        .map(|l| l.tokens.len())
        .max()
        .unwrap_or(0)
        .max(1);
    const L: f64 = 64.0;
    let cell = (900.0 / experts as f64).clamp(3.0, 22.0);
    let row = 18.0;
    let w = L + cell * experts as f64 + 90.0;
    let h = row * layers as f64 + 22.0;
    let mut out = format!(
        "<div class=\"legend\"><span>step {}: tokens per expert against the layer's mean</span>\
         <span><i class=\"sw\" style=\"background:{}\"></i>idle</span><span><i class=\"sw\" style=\"background:{}\"></i>mean</span>\
         <span><i class=\"sw\" style=\"background:{}\"></i>2× mean or more</span></div>\
         <svg id=\"heatmap-svg\" viewBox=\"0 0 {w:.0} {h:.0}\" width=\"{w:.0}\" role=\"img\" aria-label=\"expert load heat map\">",
        m.step,
        heat(0.0),
        heat(1.0),
        heat(2.0)
    );
    for (layer, loads) in m.expert_loads.iter().enumerate() {
        let y = layer as f64 * row;
        let total: u64 = loads.tokens.iter().sum();
        let mean = total as f64 / loads.tokens.len().max(1) as f64;
        let _ = write!(
            out,
            "<text x=\"0\" y=\"{:.1}\">layer {layer}</text>",
            y + 13.0
        );
        for (e, n) in loads.tokens.iter().enumerate() {
            let ratio = if mean > 0.0 { *n as f64 / mean } else { 0.0 };
            let _ = write!(
                out,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>layer {layer} expert {e}: {n} tokens ({ratio:.2}× mean)</title></rect>",
                L + e as f64 * cell,
                (cell - 1.0).max(1.0),
                row - 2.0,
                heat(ratio)
            );
        }
        if let Some(v) = m.max_vio.get(layer) {
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\">MaxVio {v:.2}</text>",
                L + cell * experts as f64 + 6.0,
                y + 13.0
            );
        }
    }
    let _ = write!(
        out,
        "<text x=\"{L}\" y=\"{:.1}\">expert 0</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">expert {}</text></svg>",
        h - 4.0,
        L + cell * experts as f64,
        h - 4.0,
        experts - 1
    );
    out
}

fn placement(j: &JobRecord) -> String {
    if j.placement.is_empty() {
        return "<p class=\"note\">not placed</p>".into();
    }
    let pp = j.placement.iter().map(|p| p.pp_rank + 1).max().unwrap_or(0);
    let dp = j.placement.iter().map(|p| p.dp_rank + 1).max().unwrap_or(0);
    let cols = dp.min(MAX_DP_COLUMNS);
    let mut cells: Vec<Option<&crate::jobs::Placed>> = vec![None; pp * cols];
    for p in &j.placement {
        if p.dp_rank < cols {
            cells[p.pp_rank * cols + p.dp_rank] = Some(p);
        }
    }
    let ep = j.spec.parallelism.ep.max(1);
    let mut out = format!(
        "<p class=\"mute\">rows: pipeline stages; columns: data-parallel ranks; colour: EP group (ep {ep}: consecutive data-parallel ranks of a stage)</p><div class=\"scroll\"><table class=\"pl\"><tr><th></th>"
    );
    for d in 0..cols {
        let _ = write!(out, "<th>dp {d}</th>");
    }
    out.push_str("</tr>");
    for s in 0..pp {
        let _ = write!(out, "<tr><th>stage {s}</th>");
        for d in 0..cols {
            match cells[s * cols + d] {
                Some(p) => {
                    let g = ep_group(ep, p);
                    let _ = write!(
                        out,
                        "<td class=\"j{}\" title=\"EP group {g}\">",
                        (s * dp.div_ceil(ep) + d / ep) % 12
                    );
                    push_escaped(&mut out, &p.node);
                    let _ = write!(out, ":{}</td>", p.device);
                }
                None => out.push_str("<td class=\"mute\">-</td>"),
            }
        }
        out.push_str("</tr>");
    }
    out.push_str("</table></div>");
    if dp > cols {
        let _ = write!(
            out,
            "<p class=\"note\">{} more data-parallel ranks not shown</p>",
            dp - cols
        );
    }
    out
}

fn nodes_list(nodes: &[String]) -> String {
    if nodes.is_empty() {
        return "-".into();
    }
    let mut s = nodes
        .iter()
        .take(6)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if nodes.len() > 6 {
        let _ = write!(s, ", … +{}", nodes.len() - 6);
    }
    s
}

fn recoveries(j: &JobRecord, now_ms: u64) -> String {
    if j.recoveries.is_empty() {
        return "<p class=\"note\">no failures</p>".into();
    }
    let mut out = String::new();
    // Duration bars: detection (last heard to noticed) then recovery (noticed to training
    // again), on one scale.
    let detection = |r: &Recovery| {
        (r.last_heard_unix_ms > 0 && r.detected_unix_ms >= r.last_heard_unix_ms)
            .then(|| r.detected_unix_ms - r.last_heard_unix_ms)
    };
    let took = |r: &Recovery| {
        r.recovery_ms()
            .unwrap_or_else(|| now_ms.saturating_sub(r.detected_unix_ms))
    };
    let longest = j
        .recoveries
        .iter()
        .map(|r| detection(r).unwrap_or(0) + took(r))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    const W: f64 = 1000.0;
    const L: f64 = 170.0;
    let bar_w = W - L - 260.0;
    let h = 26.0 * j.recoveries.len() as f64 + 24.0;
    let _ = write!(
        out,
        "<div class=\"legend\"><span><i class=\"sw\" style=\"background:#8a94a0\"></i>detection (last heard → noticed)</span>\
         <span><i class=\"sw\" style=\"background:#e0701a\"></i>recovery (noticed → training again)</span>\
         <span><i class=\"sw\" style=\"background:#f5c79e\"></i>still recovering</span></div>\
         <svg id=\"recovery-svg\" viewBox=\"0 0 {W} {h}\" width=\"{W}\" role=\"img\" aria-label=\"recoveries\">"
    );
    for (i, r) in j.recoveries.iter().enumerate() {
        let y = i as f64 * 26.0;
        let det = detection(r).unwrap_or(0) as f64;
        let rec = took(r) as f64;
        let dw = det / longest * bar_w;
        let rw = (rec / longest * bar_w).max(2.0);
        let open = r.resumed_unix_ms == 0;
        let _ = write!(
            out,
            "<text x=\"0\" y=\"{:.1}\">#{} at {}</text>\
             <rect x=\"{L}\" y=\"{:.1}\" width=\"{dw:.1}\" height=\"14\" fill=\"#8a94a0\"/>\
             <rect x=\"{:.1}\" y=\"{:.1}\" width=\"{rw:.1}\" height=\"14\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            y + 15.0,
            i + 1,
            clock(r.detected_unix_ms),
            y + 4.0,
            L + dw,
            y + 4.0,
            if open { "#f5c79e" } else { "#e0701a" },
            L + dw + rw + 6.0,
            y + 15.0,
            if open {
                format!("recovering for {}", duration_ms(rec as u64))
            } else {
                format!(
                    "{} + {}, {} steps redone",
                    duration_ms(det as u64),
                    duration_ms(rec as u64),
                    r.steps_redone()
                )
            }
        );
    }
    let _ = write!(
        out,
        "<text x=\"{L}\" y=\"{:.1}\">0</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text></svg>",
        h - 4.0,
        L + bar_w,
        h - 4.0,
        duration_ms(longest as u64)
    );
    out.push_str(
        "<table id=\"recovery-log\"><thead><tr><th>#</th><th>attempt</th><th>what failed</th><th>last heard</th><th>detected</th>\
         <th class=\"num\">detection</th><th>training again</th><th class=\"num\">recovery</th><th class=\"num\">re-plan</th>\
         <th class=\"num\">steps redone</th><th>dp before → after</th><th>nodes before → after</th></tr></thead><tbody>",
    );
    for (i, r) in j.recoveries.iter().enumerate() {
        let _ = write!(
            out,
            "<tr class=\"recovery\" data-attempt=\"{}\"><td>{}</td><td>{}</td><td class=\"cause\">",
            r.attempt,
            i + 1,
            r.attempt
        );
        push_escaped(&mut out, &r.cause);
        let _ = write!(
            out,
            "</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>",
            if r.last_heard_unix_ms > 0 {
                clock(r.last_heard_unix_ms)
            } else {
                "-".into()
            },
            clock(r.detected_unix_ms),
            detection(r).map_or("-".into(), duration_ms),
            if r.resumed_unix_ms > 0 {
                clock(r.resumed_unix_ms)
            } else {
                "recovering".into()
            },
            r.recovery_ms().map_or("-".into(), duration_ms),
            if r.replan_us > 0 {
                format!("{:.1} ms", r.replan_us as f64 / 1000.0)
            } else {
                "-".into()
            },
        );
        let redone = if r.resumed_unix_ms > 0 {
            format!(
                "{} (step {} → {})",
                r.steps_redone(),
                r.failed_step,
                r.restored_step
            )
        } else {
            format!("from step {}", r.failed_step)
        };
        let _ = write!(
            out,
            "<td class=\"num redone\">{redone}</td><td>{} → {}</td><td>",
            r.dp_before,
            if r.dp_after > 0 {
                r.dp_after.to_string()
            } else {
                "-".into()
            }
        );
        push_escaped(
            &mut out,
            &format!(
                "{} → {}",
                nodes_list(&r.nodes_before),
                nodes_list(&r.nodes_after)
            ),
        );
        out.push_str("</td></tr>");
    }
    out.push_str("</tbody></table>");
    out
}

fn history(j: &JobRecord) -> String {
    let mut out = String::from(
        "<table><thead><tr><th>when (UTC)</th><th>state</th><th>why</th></tr></thead><tbody>",
    );
    for t in j.history.iter().rev().take(MAX_HISTORY) {
        let _ = write!(out, "<tr><td>{}</td><td>", utc(t.unix_ms));
        badge(&mut out, job_state_class(t.state));
        out.push_str("</td><td class=\"mute\">");
        push_escaped(&mut out, &t.reason);
        out.push_str("</td></tr>");
    }
    out.push_str("</tbody></table>");
    if j.history.len() > MAX_HISTORY {
        let _ = write!(
            out,
            "<p class=\"note\">{} older changes not shown</p>",
            j.history.len() - MAX_HISTORY
        );
    }
    out
}

/// [`timeline::fragment`] of the job (reads the trace file: call it off the async runtime).
pub fn timeline_fragment(j: &JobRecord) -> String {
    timeline::fragment(&j.spec)
}
