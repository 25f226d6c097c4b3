//! The failure-recovery dashboard: HTML pages rendered on the server from a [`Snapshot`], and
//! the JSON the pages poll to update themselves in place.
//!
//! - `/`: the cluster (every node and device, coloured by state and job, with its EP group),
//!   the jobs and the queue.
//! - `/jobs/{id}`: one job (progress, placement, loss and tokens/s curves, expert-load heat map,
//!   the step timeline of its traced step, failures and recoveries).
//!
//! Everything is inline (CSS, a little JavaScript, SVG pictures): no asset server and nothing
//! fetched from elsewhere. Every text that comes from users or nodes (job names, reasons,
//! causes, node names) is escaped. The functions here are pure: the HTTP handlers ask the actor
//! for a snapshot and hand it over.
//!
//! [`Snapshot`]: crate::actor::Snapshot

pub mod cluster;
pub mod job;
pub mod timeline;

use std::fmt::Write;

use crate::jobs::JobState;
use crate::nodes::NodeState;

/// How often the pages poll their JSON, milliseconds.
pub const POLL_MS: u64 = 1500;

/// `text` with `& < > " '` escaped, for element text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    push_escaped(&mut out, text);
    out
}

/// Appends `text` escaped to `out`.
pub fn push_escaped(out: &mut String, text: &str) {
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
}

/// A job state's CSS class and label.
pub fn job_state_class(s: JobState) -> &'static str {
    crate::http::job_state_name(s)
}

/// A node state's CSS class and label.
pub fn node_state_class(s: NodeState) -> &'static str {
    crate::http::node_state_name(s)
}

/// The colour class of a job (`j0` .. `j11`), from its submission sequence.
pub fn job_colour(seq: u64) -> String {
    format!("j{}", seq % 12)
}

/// A state badge.
pub fn badge(out: &mut String, class: &str) {
    let _ = write!(out, "<span class=\"badge s-{class}\">{class}</span>");
}

/// `unix_ms` as `YYYY-MM-DD HH:MM:SS` UTC (`-` for 0).
pub fn utc(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `unix_ms` as `HH:MM:SS.mmm` UTC.
pub fn clock(unix_ms: u64) -> String {
    let ms = unix_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms % 3_600_000 / 60_000,
        ms % 60_000 / 1000,
        ms % 1000
    )
}

/// Days since 1970-01-01 as a proleptic Gregorian (year, month, day).
fn civil(days: u64) -> (u64, u64, u64) {
    // Shift to years starting on March 1st of year 0 so leap days come last.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// A duration in milliseconds for people (`850 ms`, `2.4 s`, `3 min 5 s`).
pub fn duration_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000)
    }
}

/// A number with three significant figures and a k/M suffix.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "-".into()
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A whole page: `title` (escaped here), the JSON URL it polls (`api`), and its body.
pub fn page(title: &str, api: &str, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + CSS.len() + SCRIPT.len() + 512);
    out.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>");
    push_escaped(&mut out, title);
    out.push_str(" · shoal</title><meta name=\"viewport\" content=\"width=device-width\"><style>");
    out.push_str(CSS);
    out.push_str("</style></head><body data-api=\"");
    push_escaped(&mut out, api);
    let _ = write!(out, "\" data-poll=\"{POLL_MS}\">");
    out.push_str(
        "<header><a class=\"brand\" href=\"/\">shoal</a><nav><a href=\"/\">cluster</a>\
         <a href=\"/metrics\">metrics</a></nav>",
    );
    if !api.is_empty() {
        out.push_str("<span id=\"live\" class=\"live\">connecting</span>");
    }
    out.push_str("</header><main>");
    out.push_str(body);
    out.push_str("</main>");
    if !api.is_empty() {
        out.push_str("<script>");
        out.push_str(SCRIPT);
        out.push_str("</script>");
    }
    out.push_str("</body></html>");
    out
}

/// The 404 page: `what` says what was not found (escaped here).
pub fn not_found_page(what: &str) -> String {
    let mut body = String::from("<section class=\"missing\"><h1>404</h1><p>");
    push_escaped(&mut body, what);
    body.push_str("</p><p><a href=\"/\">back to the cluster</a></p></section>");
    page("not found", "", &body)
}

/// The pages' styles.
const CSS: &str = r#"
:root{--bg:#f6f7f9;--fg:#1d232b;--mute:#69737f;--line:#dde2e8;--card:#fff;
--healthy:#2e9d57;--cordoned:#d99a00;--draining:#e0701a;--failed:#d3343a;--spare:#3f7fe0;
--pending:#8a94a0;--scheduling:#7b61d6;--running:#2e9d57;--recovering:#e0701a;--succeeded:#1f7a8c;--cancelled:#69737f}
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;gap:18px;align-items:center;padding:10px 20px;background:#1d232b;color:#fff}
header a{color:#cfd6de;text-decoration:none}header .brand{font-weight:700;color:#fff;font-size:16px}nav{display:flex;gap:14px}
.live{margin-left:auto;font-size:12px;color:#cfd6de}.live.ok::before{content:"● ";color:#4cd07d}.live.err::before{content:"● ";color:#ff6b6b}
main{padding:16px 20px;max-width:1600px}section{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:12px 16px;margin-bottom:14px}
h1{font-size:20px;margin:0 0 6px}h2{font-size:15px;margin:0 0 10px}a{color:#2459b3}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}th{font-weight:600;color:var(--mute);font-size:12px}
.mute{color:var(--mute)}.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;color:#fff;background:var(--pending)}
.s-healthy,.s-running{background:var(--healthy)}.s-cordoned{background:var(--cordoned)}.s-draining,.s-recovering{background:var(--draining)}
.s-failed{background:var(--failed)}.s-spare{background:var(--spare)}.s-scheduling{background:var(--scheduling)}.s-succeeded{background:var(--succeeded)}.s-cancelled{background:var(--cancelled)}
.tiles{display:flex;flex-wrap:wrap;gap:10px}.tile{border:1px solid var(--line);border-radius:6px;padding:8px 12px;min-width:120px}.tile b{display:block;font-size:20px}.tile span{color:var(--mute);font-size:12px}
.bar{display:inline-block;width:120px;height:8px;background:#e3e8ee;border-radius:4px;overflow:hidden;vertical-align:middle;margin-right:6px}.bar i{display:block;height:100%;background:var(--succeeded)}
.grid{display:flex;flex-wrap:wrap;gap:4px}.node{display:flex;align-items:center;gap:3px;border:1px solid var(--line);border-left:4px solid var(--healthy);border-radius:3px;padding:2px 4px;font-size:11px}
.node b{font-weight:500;min-width:52px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;max-width:90px}
.node.st-cordoned{border-left-color:var(--cordoned)}.node.st-draining{border-left-color:var(--draining)}.node.st-failed{border-left-color:var(--failed);background:#fdecec}.node.st-spare{border-left-color:var(--spare)}
.d{display:inline-block;width:11px;height:11px;border-radius:2px;background:#e3e8ee}.d.down{background:var(--failed)}.d.spare{background:#cfe0fc}.d.held{background:repeating-linear-gradient(45deg,#f5d27a,#f5d27a 2px,#fff3d1 2px,#fff3d1 4px)}
.j0{background:#4e79a7}.j1{background:#f28e2b}.j2{background:#59a14f}.j3{background:#b07aa1}.j4{background:#76b7b2}.j5{background:#edc948}
.j6{background:#ff9da7}.j7{background:#9c755f}.j8{background:#2f4b7c}.j9{background:#a05195}.j10{background:#00a6a6}.j11{background:#bab0ac}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:middle}
.legend{display:flex;flex-wrap:wrap;gap:12px;font-size:12px;color:var(--mute);margin-bottom:8px;align-items:center}
.legend input{margin-left:auto;padding:3px 6px;border:1px solid var(--line);border-radius:4px}
svg{display:block;max-width:100%;height:auto}svg text{font:11px system-ui,sans-serif;fill:#4a525c}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:14px}@media(max-width:1000px){.cols{grid-template-columns:1fr}}
.kv{display:flex;flex-wrap:wrap;gap:18px;margin:6px 0}.kv div span{display:block;color:var(--mute);font-size:12px}
.pl{width:auto}.pl td{font-size:12px;padding:2px 6px;border:1px solid #fff;color:#fff;text-align:center;white-space:nowrap}.pl th{white-space:nowrap}.scroll{overflow-x:auto}.nowrap{white-space:nowrap}
.missing h1{font-size:40px}.note{color:var(--mute);font-style:italic}
"#;

/// The pages' live updates: poll the page's JSON and put each fragment it carries into the
/// element of that id; `#live` says when the data last arrived (`data-updated`). At the load
/// event the body's `data-load-ms` records the milliseconds since navigation began (what `shoal
/// bench dashboard` reads from a real browser).
const SCRIPT: &str = r#"
(function(){
var b=document.body,api=b.dataset.api,poll=+b.dataset.poll||1500,live=document.getElementById('live'),seen={};
addEventListener('load',function(){b.dataset.loadMs=performance.now().toFixed(1);});
function filter(){var f=document.getElementById('filter');if(!f)return;var q=f.value.trim().toLowerCase();
document.querySelectorAll('.node').forEach(function(n){n.style.display=!q||n.dataset.f.indexOf(q)>=0?'':'none';});}
var f=document.getElementById('filter');if(f)f.addEventListener('input',filter);
function tick(){var q=document.querySelector('[data-missing]')?'?timeline=1':'';
fetch(api+q,{cache:'no-store'}).then(function(r){if(!r.ok)throw new Error('http '+r.status);return r.json();}).then(function(d){
var fr=d.fragments||{};Object.keys(fr).forEach(function(k){if(seen[k]===fr[k])return;var e=document.getElementById(k);if(e){e.innerHTML=fr[k];seen[k]=fr[k];}});
filter();live.dataset.updated=String(d.updated_unix_ms);live.className='live ok';
live.textContent='live · updated '+new Date(d.updated_unix_ms).toLocaleTimeString();setTimeout(tick,poll);
}).catch(function(e){live.className='live err';live.textContent='not updating: '+e.message;setTimeout(tick,2*poll);});}
tick();})();
"#;

#[cfg(test)]
pub(crate) mod sample {
    //! A synthetic snapshot for the render tests.

    use std::collections::BTreeMap;

    use crate::actor::{NodeView, Snapshot, StepPoint};
    use crate::jobs::{JobRecord, JobState, Placed, Recovery, Transition};
    use crate::nodes::{NodeRecord, NodeState};
    use shoal_proto::v1 as pb;
    use shoal_spec::job::JobSpec;

    /// `nodes` nodes of `devices` devices; job-1 (`<b>name</b>`-free) runs on the first two,
    /// recovered once from losing node n2 (replaced by n3); job-2 is pending.
    pub fn snapshot(nodes: usize, devices: usize) -> Snapshot {
        let mut spec = JobSpec::from_toml("name = \"moe\"", "test").expect("spec");
        spec.parallelism.pp = 2;
        spec.parallelism.dp = devices;
        spec.parallelism.ep = 2;
        spec.training.steps = 10;
        let placement: Vec<Placed> = (0..2)
            .flat_map(|pp| {
                (0..devices).map(move |d| Placed {
                    pp_rank: pp,
                    dp_rank: d,
                    node: if pp == 0 { "n1".into() } else { "n3".into() },
                    device: d,
                })
            })
            .collect();
        let t = |state, reason: &str, unix_ms| Transition {
            state,
            reason: reason.into(),
            unix_ms,
        };
        let job = JobRecord {
            id: "job-1".into(),
            seq: 1,
            spec: spec.clone(),
            state: JobState::Running,
            reason: String::new(),
            step: 7,
            history: vec![
                t(JobState::Pending, "", 1_700_000_000_000),
                t(JobState::Running, "", 1_700_000_001_000),
                t(
                    JobState::Recovering,
                    "node n2 lost: heartbeat timeout",
                    1_700_000_005_000,
                ),
                t(JobState::Running, "recovered", 1_700_000_007_000),
            ],
            placement,
            attempt: 1,
            checkpoint_step: 4,
            recoveries: vec![Recovery {
                attempt: 1,
                cause: "node n2 lost: <heartbeat> timeout".into(),
                detected_unix_ms: 1_700_000_005_000,
                last_heard_unix_ms: 1_700_000_004_000,
                resumed_unix_ms: 1_700_000_007_500,
                failed_step: 5,
                restored_step: 4,
                dp_before: devices as u32,
                dp_after: devices as u32,
                replan_us: 1_200,
                nodes_before: vec!["n1".into(), "n2".into()],
                nodes_after: vec!["n1".into(), "n3".into()],
            }],
            trace: String::new(),
        };
        let mut pending_spec = spec;
        pending_spec.name = "<script>x</script>".into();
        let pending = JobRecord {
            id: "job-2".into(),
            seq: 2,
            spec: pending_spec,
            state: JobState::Pending,
            reason: "waiting for 16 devices".into(),
            step: 0,
            history: vec![t(JobState::Pending, "", 1_700_000_002_000)],
            placement: Vec::new(),
            attempt: 0,
            checkpoint_step: 0,
            recoveries: Vec::new(),
            trace: String::new(),
        };
        let nodes = (1..=nodes)
            .map(|i| {
                let name = format!("n{i}");
                let state = match i {
                    2 => NodeState::Failed,
                    4 => NodeState::Cordoned,
                    5 => NodeState::Spare,
                    _ => NodeState::Healthy,
                };
                let busy = if i == 1 || i == 3 {
                    (0..devices).map(|d| (d, "job-1".to_string())).collect()
                } else {
                    BTreeMap::new()
                };
                NodeView {
                    record: NodeRecord {
                        name,
                        devices,
                        models: Vec::new(),
                        nvlink_domain: format!("nv{i}"),
                        ib_rail: 0,
                        data_addr: String::new(),
                        epoch: 1,
                        state,
                    },
                    busy,
                    last_heartbeat_ms: 0,
                }
            })
            .collect();
        let steps = BTreeMap::from([(
            "job-1".to_string(),
            pb::StepMetrics {
                step: 7,
                loss: 5.5,
                tokens_per_s: 1234.0,
                seconds: 0.5,
                bubble_s: 0.1,
                max_vio: vec![0.4, 0.9],
                expert_loads: vec![
                    pb::ExpertLoads {
                        tokens: vec![10, 20, 30, 40],
                    },
                    pb::ExpertLoads {
                        tokens: vec![0, 0, 50, 50],
                    },
                ],
                ..Default::default()
            },
        )]);
        let curve = (1..=7)
            .map(|s| StepPoint {
                step: s,
                loss: 8.0 - s as f64 * 0.3,
                tokens_per_s: 1000.0 + s as f64,
                seconds: 0.5,
            })
            .collect();
        Snapshot {
            jobs: vec![job, pending],
            nodes,
            steps,
            curves: BTreeMap::from([("job-1".to_string(), curve)]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_page_shows_every_node_device_job_and_the_queue() {
        let s = sample::snapshot(6, 8);
        let p = cluster::render_page(&s);
        for n in 1..=6 {
            assert!(p.contains(&format!("<b>n{n}</b>")), "node n{n}");
        }
        assert_eq!(
            p.matches("<i class=\"d").count(),
            6 * 8,
            "one cell per device"
        );
        assert!(p.contains("class=\"node st-failed\""));
        assert!(p.contains("class=\"node st-cordoned\""));
        assert!(p.contains("class=\"node st-spare\""));
        assert!(p.contains("n1:3 · job-1 (moe) · stage 0 dp 3 · EP group s0.ep1"));
        assert!(p.contains("data-job=\"job-1\" data-state=\"running\""));
        assert!(p.contains("waiting for 16 devices"), "the queue says why");
        assert!(
            p.contains("&lt;script&gt;x&lt;/script&gt;"),
            "names escaped"
        );
        assert!(!p.contains("<script>x"), "no markup from names");
        assert!(p.contains("data-api=\"/api/cluster\""));
        let api = cluster::api(&s, 42);
        assert_eq!(api["updated_unix_ms"], 42);
        assert_eq!(api["jobs"][0]["state"], "running");
        assert!(
            api["fragments"]["grid"]
                .as_str()
                .is_some_and(|g| g.contains("n6"))
        );
    }

    #[test]
    fn the_job_page_shows_curves_heat_map_placement_and_the_recovery_log() {
        let s = sample::snapshot(6, 4);
        let j = &s.jobs[0];
        let p = job::render_page(&s, j, "<p>timeline</p>", 1_700_000_010_000);
        assert!(p.contains("id=\"loss-chart\"") && p.contains("id=\"tps-chart\""));
        assert!(p.contains("<polyline class=\"line\""));
        assert!(
            p.contains("failure at step 5"),
            "failures marked on the curves"
        );
        assert!(p.contains("id=\"heatmap-svg\""));
        assert!(p.contains("layer 1 expert 2: 50 tokens (2.00× mean)"));
        assert!(p.contains("MaxVio 0.90"));
        assert!(p.contains("node n2 lost: &lt;heartbeat&gt; timeout"));
        assert!(p.contains("1 (step 5 → 4)"), "steps redone");
        assert!(p.contains("n1, n2 → n1, n3"), "nodes before and after");
        assert!(p.contains("1.0 s"), "detection: last heard to noticed");
        assert!(p.contains("2.5 s"), "recovery: noticed to running");
        assert!(p.contains("EP group s1.ep1"));
        assert!(p.contains("<p>timeline</p>"));
        let api = job::api(&s, j, None, 1);
        assert_eq!(api["recoveries"][0]["steps_redone"], 1);
        assert_eq!(api["curve"].as_array().map(Vec::len), Some(7));
        assert!(api["fragments"].get("timeline").is_none());
        assert!(api["fragments"]["recoveries"].is_string());
    }

    #[test]
    fn a_job_without_steps_or_failures_says_so() {
        let s = sample::snapshot(2, 2);
        let p = job::render_page(&s, &s.jobs[1], "", 0);
        assert!(p.contains("no steps reported yet"));
        assert!(p.contains("no expert loads reported yet"));
        assert!(p.contains("no failures"));
        assert!(p.contains("not placed"));
    }

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape("<b a=\"x\">'&'</b>"),
            "&lt;b a=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/b&gt;"
        );
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1_000), "1970-01-01 00:00:01");
        // 2024-02-29 12:34:56 UTC, a leap day.
        assert_eq!(utc(1_709_210_096_000), "2024-02-29 12:34:56");
        assert_eq!(clock(1_709_210_096_789), "12:34:56.789");
    }

    #[test]
    fn durations_and_numbers_read_well() {
        assert_eq!(duration_ms(850), "850 ms");
        assert_eq!(duration_ms(2_400), "2.4 s");
        assert_eq!(duration_ms(185_000), "3 min 5 s");
        assert_eq!(short(12_345.0), "12.3k");
        assert_eq!(short(4.567), "4.57");
    }

    #[test]
    fn the_404_page_names_what_is_missing_escaped() {
        let p = not_found_page("no job <x>");
        assert!(p.contains("no job &lt;x&gt;"));
        assert!(!p.contains("<script>"), "a 404 page does not poll");
    }
}
