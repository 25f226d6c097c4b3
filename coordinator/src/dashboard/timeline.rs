//! The step timeline of a job: the Chrome trace its rank 0 writes into the job directory
//! (`trace.json`, one traced step, a process per node and a track per thread), read back and
//! drawn per track as bars: pipeline operations (F, B, W, overlapped F&B) on one row,
//! expert dispatch and combine and the other communication on a second, gaps as idle.
//! Bounded: files over [`MAX_TRACE_BYTES`] are not read, at most [`MAX_TRACKS`] tracks and
//! [`MAX_SPANS`] spans (the longest) are drawn.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shoal_spec::job::JobSpec;

use super::{escape, push_escaped};

/// Trace files larger than this are not read.
pub const MAX_TRACE_BYTES: u64 = 8 << 20;
/// Tracks drawn at most.
pub const MAX_TRACKS: usize = 48;
/// Spans drawn at most (the longest ones).
pub const MAX_SPANS: usize = 6000;

/// A job's run directory, as the worker computes it (`shoal_worker::job::run_dir`: the
/// coordinator does not depend on the worker, so the rule is repeated here):
/// `checkpointing.dir`, else `runs/<name>`. A relative one is relative to the coordinator's
/// working directory, which is the worker's only when both run from the same place.
pub fn run_dir(spec: &JobSpec) -> PathBuf {
    if spec.checkpointing.dir.is_empty() {
        PathBuf::from("runs").join(&spec.name)
    } else {
        PathBuf::from(&spec.checkpointing.dir)
    }
}

/// What a span is, for its colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Forward chunk (`F0.3`).
    F,
    /// Input-gradient backward chunk (`B1.2`).
    B,
    /// Weight-gradient chunk (`W1.2`).
    W,
    /// Overlapped forward and backward (`F0.3&B1.1`).
    FB,
    /// Expert-parallel dispatch.
    Dispatch,
    /// Expert-parallel combine.
    Combine,
    /// Other communication (send, recv, collectives).
    Comm,
    /// Anything else (layers, the optimizer): not drawn over the operations.
    Other,
}

impl Kind {
    /// The CSS-free fill colour.
    pub fn colour(self) -> &'static str {
        match self {
            Kind::F => "#4e79a7",
            Kind::B => "#e15759",
            Kind::W => "#59a14f",
            Kind::FB => "#b07aa1",
            Kind::Dispatch => "#f28e2b",
            Kind::Combine => "#edc948",
            Kind::Comm => "#9c755f",
            Kind::Other => "#bab0ac",
        }
    }

    /// Legend label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::F => "F (forward)",
            Kind::B => "B (input grad)",
            Kind::W => "W (weight grad)",
            Kind::FB => "F&B overlapped",
            Kind::Dispatch => "dispatch",
            Kind::Combine => "combine",
            Kind::Comm => "send / recv / collective",
            Kind::Other => "other",
        }
    }

    fn is_op(self) -> bool {
        matches!(self, Kind::F | Kind::B | Kind::W | Kind::FB)
    }
}

/// The kind of a span by its name (`F0.3`, `B1.2`, `W1.2`, `F0.3&B1.1`, `dispatch(F)`, ...).
pub fn classify(name: &str) -> Kind {
    let op = |c: char| {
        name.strip_prefix(c)
            .is_some_and(|r| r.starts_with(|d: char| d.is_ascii_digit()))
    };
    if op('F') && name.contains('&') {
        Kind::FB
    } else if op('F') {
        Kind::F
    } else if op('B') {
        Kind::B
    } else if op('W') {
        Kind::W
    } else if name.starts_with("dispatch") {
        Kind::Dispatch
    } else if name.starts_with("combine") {
        Kind::Combine
    } else if [
        "send",
        "recv",
        "collective",
        "all_gather",
        "reduce_scatter",
        "all_reduce",
    ]
    .iter()
    .any(|p| name.starts_with(p))
    {
        Kind::Comm
    } else {
        Kind::Other
    }
}

/// One span of a track.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    /// Name as traced.
    pub name: String,
    /// Kind.
    pub kind: Kind,
    /// Start, microseconds on the trace's clock.
    pub start_us: f64,
    /// Duration, microseconds.
    pub dur_us: f64,
}

/// One thread of one node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Track {
    /// `node / thread`.
    pub name: String,
    /// Its spans, in start order.
    pub spans: Vec<Span>,
}

/// A parsed trace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    /// Tracks, device threads first.
    pub tracks: Vec<Track>,
    /// Earliest start, microseconds.
    pub start_us: f64,
    /// Latest end, microseconds.
    pub end_us: f64,
    /// Spans left out to keep the picture bounded.
    pub dropped: usize,
}

#[derive(Deserialize)]
struct File {
    #[serde(rename = "traceEvents", default)]
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    name: String,
    #[serde(default)]
    ph: String,
    #[serde(default)]
    pid: u64,
    #[serde(default)]
    tid: u64,
    #[serde(default)]
    ts: f64,
    #[serde(default)]
    dur: f64,
    #[serde(default)]
    args: serde_json::Value,
}

/// Parses Chrome trace JSON into tracks.
pub fn parse(text: &str) -> Result<Timeline, String> {
    let file: File = serde_json::from_str(text).map_err(|e| format!("not a chrome trace: {e}"))?;
    let mut process: std::collections::BTreeMap<u64, String> = Default::default();
    let mut thread: std::collections::BTreeMap<(u64, u64), String> = Default::default();
    let mut spans: Vec<((u64, u64), Span)> = Vec::new();
    for e in file.events {
        let label = || e.args["name"].as_str().unwrap_or_default().to_string();
        match (e.ph.as_str(), e.name.as_str()) {
            ("M", "process_name") => {
                process.insert(e.pid, label());
            }
            ("M", "thread_name") => {
                thread.insert((e.pid, e.tid), label());
            }
            ("X", _) if e.dur.is_finite() && e.ts.is_finite() && e.dur >= 0.0 => {
                let kind = classify(&e.name);
                spans.push((
                    (e.pid, e.tid),
                    Span {
                        name: e.name,
                        kind,
                        start_us: e.ts,
                        dur_us: e.dur,
                    },
                ));
            }
            _ => {}
        }
    }
    let mut t = Timeline {
        start_us: spans
            .iter()
            .map(|(_, s)| s.start_us)
            .fold(f64::INFINITY, f64::min),
        end_us: spans
            .iter()
            .map(|(_, s)| s.start_us + s.dur_us)
            .fold(f64::NEG_INFINITY, f64::max),
        ..Default::default()
    };
    if spans.is_empty() {
        return Ok(Timeline::default());
    }
    // Keep the longest spans, then group by track.
    if spans.len() > MAX_SPANS {
        spans.sort_by(|a, b| b.1.dur_us.total_cmp(&a.1.dur_us));
        t.dropped = spans.len() - MAX_SPANS;
        spans.truncate(MAX_SPANS);
    }
    let mut tracks: std::collections::BTreeMap<(u64, u64), Vec<Span>> = Default::default();
    for (k, s) in spans {
        tracks.entry(k).or_default().push(s);
    }
    let mut named: Vec<(bool, String, Vec<Span>)> = tracks
        .into_iter()
        .map(|((pid, tid), mut spans)| {
            spans.sort_by(|a, b| a.start_us.total_cmp(&b.start_us));
            let p = process
                .get(&pid)
                .cloned()
                .unwrap_or_else(|| format!("process {pid}"));
            let th = thread
                .get(&(pid, tid))
                .cloned()
                .unwrap_or_else(|| format!("thread {tid}"));
            let device = th.starts_with("device");
            (!device, format!("{p} / {th}"), spans)
        })
        .collect();
    // Device tracks first, then by name; pid order is kept by the name's process part.
    named.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    for (_, name, spans) in named.into_iter().take(MAX_TRACKS) {
        t.tracks.push(Track { name, spans });
    }
    Ok(t)
}

/// Microseconds of `[start, end)` covered by the union of `spans` (sorted by start).
fn covered(spans: &[&Span]) -> f64 {
    let mut total = 0.0;
    let mut cur: Option<(f64, f64)> = None;
    for s in spans {
        let (a, b) = (s.start_us, s.start_us + s.dur_us);
        cur = match cur {
            Some((x, y)) if a <= y => Some((x, y.max(b))),
            Some((x, y)) => {
                total += y - x;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    if let Some((x, y)) = cur {
        total += y - x;
    }
    total
}

/// The timeline as SVG, with a legend and each track's idle share.
pub fn render(t: &Timeline) -> String {
    if t.tracks.is_empty() {
        return "<p class=\"note\">the trace has no spans</p>".into();
    }
    const LABEL: f64 = 230.0;
    const WIDTH: f64 = 1100.0;
    const ROW: f64 = 26.0;
    let span_us = (t.end_us - t.start_us).max(1.0);
    let scale = (WIDTH - LABEL - 70.0) / span_us;
    let height = ROW * t.tracks.len() as f64 + 24.0;
    let mut out = String::with_capacity(t.tracks.iter().map(|k| k.spans.len()).sum::<usize>() * 90);
    out.push_str("<div class=\"legend\">");
    for k in [
        Kind::F,
        Kind::B,
        Kind::W,
        Kind::FB,
        Kind::Dispatch,
        Kind::Combine,
        Kind::Comm,
    ] {
        let _ = write!(
            out,
            "<span><i class=\"sw\" style=\"background:{}\"></i>{}</span>",
            k.colour(),
            k.label()
        );
    }
    out.push_str("<span><i class=\"sw\" style=\"background:#f0f2f5;border:1px solid #ccc\"></i>idle</span></div>");
    let _ = write!(
        out,
        "<svg id=\"timeline-svg\" viewBox=\"0 0 {WIDTH} {height}\" width=\"{WIDTH}\" role=\"img\" aria-label=\"step timeline\">"
    );
    for (i, track) in t.tracks.iter().enumerate() {
        let y = i as f64 * ROW;
        let ops: Vec<&Span> = track.spans.iter().filter(|s| s.kind.is_op()).collect();
        let has_ops = !ops.is_empty();
        let busy_set: Vec<&Span> = if has_ops {
            ops
        } else {
            track.spans.iter().collect()
        };
        let idle = 1.0 - covered(&busy_set) / span_us;
        out.push_str("<g class=\"track\"><text x=\"0\" y=\"");
        let _ = write!(out, "{:.1}\">", y + 16.0);
        let shown: String = track.name.chars().take(34).collect();
        push_escaped(&mut out, &shown);
        let _ = write!(
            out,
            "</text><rect x=\"{LABEL}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#f0f2f5\"/>",
            y + 2.0,
            span_us * scale,
            ROW - 4.0
        );
        for s in &track.spans {
            // Layers inside the operations would hide them; drawn only on tracks without any.
            if s.kind == Kind::Other && has_ops {
                continue;
            }
            let (row_y, h) = if s.kind.is_op() || s.kind == Kind::Other {
                (y + 2.0, 13.0)
            } else {
                (y + 16.0, 7.0)
            };
            let x = LABEL + (s.start_us - t.start_us) * scale;
            let w = (s.dur_us * scale).max(0.5);
            let _ = write!(
                out,
                "<rect x=\"{x:.1}\" y=\"{row_y:.1}\" width=\"{w:.1}\" height=\"{h}\" fill=\"{}\"><title>",
                s.kind.colour()
            );
            push_escaped(&mut out, &s.name);
            let _ = write!(out, " {:.0} µs</title></rect>", s.dur_us);
        }
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\">idle {:.0}%</text></g>",
            WIDTH - 62.0,
            y + 16.0,
            (idle * 100.0).clamp(0.0, 100.0)
        );
    }
    let _ = write!(
        out,
        "<text x=\"{LABEL}\" y=\"{:.1}\">0</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.1} ms</text></svg>",
        height - 6.0,
        WIDTH - 70.0,
        height - 6.0,
        span_us / 1000.0
    );
    if t.dropped > 0 {
        let _ = write!(
            out,
            "<p class=\"note\">{} shorter spans left out</p>",
            t.dropped
        );
    }
    out
}

/// The timeline fragment of a job: the picture, or what stands in its place (a placeholder
/// marked `data-missing` while there is no trace yet, so the page keeps asking).
pub fn fragment(spec: &JobSpec) -> String {
    let path = run_dir(spec).join("trace.json");
    let shown = escape(&path.display().to_string());
    let missing = || {
        format!(
            "<p class=\"note\" data-missing=\"1\">no step trace yet: rank 0 writes {shown} after the job's second step</p>"
        )
    };
    match std::fs::metadata(&path) {
        Err(_) => missing(),
        Ok(m) if m.len() > MAX_TRACE_BYTES => format!(
            "<p class=\"note\">{shown} is {} MiB, over the {} MiB the dashboard reads</p>",
            m.len() >> 20,
            MAX_TRACE_BYTES >> 20
        ),
        Ok(_) => match read(&path) {
            Ok(t) => {
                let mut out = format!("<p class=\"mute\">the traced step, from {shown}</p>");
                out.push_str(&render(&t));
                out
            }
            Err(e) => format!("<p class=\"note\">cannot read {shown}: {}</p>", escape(&e)),
        },
    }
}

fn read(path: &Path) -> Result<Timeline, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = r#"{"traceEvents":[
        {"name":"process_name","ph":"M","pid":0,"tid":0,"args":{"name":"n1"}},
        {"name":"thread_name","ph":"M","pid":0,"tid":0,"args":{"name":"device-0"}},
        {"name":"thread_name","ph":"M","pid":0,"tid":1,"args":{"name":"tcp-writer"}},
        {"name":"F0.0","ph":"X","pid":0,"tid":0,"ts":100,"dur":50,"args":{}},
        {"name":"dispatch(F)","ph":"X","pid":0,"tid":0,"ts":110,"dur":5,"args":{}},
        {"name":"B0.0","ph":"X","pid":0,"tid":0,"ts":170,"dur":30,"args":{}},
        {"name":"send","ph":"X","pid":0,"tid":1,"ts":150,"dur":10,"args":{}}
    ]}"#;

    #[test]
    fn spans_are_classified_by_their_names() {
        assert_eq!(classify("F0.3"), Kind::F);
        assert_eq!(classify("B1.2"), Kind::B);
        assert_eq!(classify("W1.2"), Kind::W);
        assert_eq!(classify("F0.3&B1.1"), Kind::FB);
        assert_eq!(classify("dispatch(F)"), Kind::Dispatch);
        assert_eq!(classify("combine(B)"), Kind::Combine);
        assert_eq!(classify("recv"), Kind::Comm);
        assert_eq!(classify("forward"), Kind::Other);
        assert_eq!(classify("Backward"), Kind::Other);
    }

    #[test]
    fn a_trace_becomes_tracks_device_first_with_idle_shares() {
        let t = parse(TRACE).expect("parse");
        assert_eq!(t.tracks.len(), 2);
        assert_eq!(t.tracks[0].name, "n1 / device-0");
        assert_eq!(t.tracks[0].spans.len(), 3);
        assert_eq!((t.start_us, t.end_us), (100.0, 200.0));
        let svg = render(&t);
        // Device 0 computes 80 of 100 µs: idle 20 %.
        assert!(svg.contains("idle 20%"), "{svg}");
        assert!(svg.contains("F0.0 50 µs"));
        assert!(svg.contains(Kind::Dispatch.colour()));
    }

    #[test]
    fn bad_traces_are_refused_not_panicked_on() {
        assert!(parse("not json").is_err());
        assert_eq!(parse("{}").expect("empty"), Timeline::default());
        assert!(render(&Timeline::default()).contains("no spans"));
    }

    #[test]
    fn the_run_dir_follows_the_workers_rule() {
        let mut s = JobSpec::from_toml("name = \"x\"", "t").expect("spec");
        assert_eq!(run_dir(&s), PathBuf::from("runs/x"));
        s.checkpointing.dir = "/tmp/y".into();
        assert_eq!(run_dir(&s), PathBuf::from("/tmp/y"));
    }
}
