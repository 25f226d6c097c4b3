//! The cluster page (`/`) and its JSON (`/api/cluster`): a summary, every node and device
//! coloured by state and job (with each device's ranks and EP group on hover), the jobs and the
//! queue. One pass over the placements builds the device index, so a page of 256 nodes of 8
//! devices is linear in what it shows.

use std::collections::HashMap;
use std::fmt::Write;

use serde_json::json;

use super::{badge, escape, job_colour, job_state_class, node_state_class, page, push_escaped};
use crate::actor::Snapshot;
use crate::jobs::{JobRecord, JobState, Placed};
use crate::nodes::NodeState;

/// The EP group of a rank: within its pipeline stage, expert parallelism groups `ep`
/// consecutive data-parallel ranks (as `shoal_spec::plan` forms them), so group
/// `dp_rank / ep`. `s{stage}.ep{group}`.
pub fn ep_group(spec_ep: usize, p: &Placed) -> String {
    format!("s{}.ep{}", p.pp_rank, p.dp_rank / spec_ep.max(1))
}

/// Distinct nodes of a job's placement and the data-parallel width.
pub fn placement_summary(j: &JobRecord) -> String {
    if j.placement.is_empty() {
        return "-".into();
    }
    let nodes = crate::jobs::nodes_of(&j.placement);
    let dp = j.placement.iter().map(|p| p.dp_rank + 1).max().unwrap_or(0);
    let pp = j.placement.iter().map(|p| p.pp_rank + 1).max().unwrap_or(0);
    let mut out = format!(
        "{} devices (pp {pp} × dp {dp}) on {} node{}: ",
        j.placement.len(),
        nodes.len(),
        if nodes.len() == 1 { "" } else { "s" }
    );
    let shown = nodes.iter().take(4).map(String::as_str).collect::<Vec<_>>();
    out.push_str(&shown.join(", "));
    if nodes.len() > 4 {
        let _ = write!(out, ", … +{}", nodes.len() - 4);
    }
    out
}

/// The HTML fragments of the page, by element id.
pub fn fragments(s: &Snapshot) -> Vec<(&'static str, String)> {
    vec![
        ("summary", summary(s)),
        ("grid", grid(s)),
        ("jobs", jobs_table(s)),
        ("queue", queue(s)),
    ]
}

/// The whole page.
pub fn render_page(s: &Snapshot) -> String {
    let f = fragments(s);
    let get = |id: &str| {
        f.iter()
            .find(|(k, _)| *k == id)
            .map_or("", |(_, v)| v.as_str())
    };
    let mut body = String::with_capacity(f.iter().map(|(_, v)| v.len()).sum::<usize>() + 2048);
    let _ = write!(
        body,
        "<section><h1>Cluster</h1><div id=\"summary\">{}</div></section>",
        get("summary")
    );
    body.push_str(
        "<section><h2>Nodes and devices</h2><div class=\"legend\">\
         <span><i class=\"sw d\"></i>free</span><span><i class=\"sw j0\"></i><i class=\"sw j1\"></i>held by a job (colour per job)</span>\
         <span><i class=\"sw d spare\"></i>spare</span><span><i class=\"sw d held\"></i>cordoned / draining</span>\
         <span><i class=\"sw d down\"></i>failed</span><span class=\"mute\">node edge: its state; hover a device for its job, ranks and EP group</span>\
         <input id=\"filter\" placeholder=\"filter nodes: name, state, job\" aria-label=\"filter nodes\"></div>",
    );
    let _ = write!(
        body,
        "<div id=\"grid\" class=\"grid\">{}</div></section>",
        get("grid")
    );
    let _ = write!(
        body,
        "<section><h2>Jobs</h2><div id=\"jobs\">{}</div></section>",
        get("jobs")
    );
    let _ = write!(
        body,
        "<section><h2>Queue</h2><div id=\"queue\">{}</div></section>",
        get("queue")
    );
    page("cluster", "/api/cluster", &body)
}

/// `/api/cluster`: counts, nodes, jobs, and the page's fragments.
pub fn api(s: &Snapshot, now_ms: u64) -> serde_json::Value {
    let nodes: Vec<_> = s
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.record.name,
                "state": node_state_class(n.record.state),
                "devices": n.record.devices,
                "busy": n.busy,
            })
        })
        .collect();
    let jobs: Vec<_> = s
        .jobs
        .iter()
        .map(|j| {
            json!({
                "id": j.id,
                "name": j.spec.name,
                "state": job_state_class(j.state),
                "step": j.step,
                "steps": j.spec.training.steps,
                "attempt": j.attempt,
                "recoveries": j.recoveries.len(),
                "devices": j.placement.len(),
            })
        })
        .collect();
    let fragments: serde_json::Map<String, serde_json::Value> = fragments(s)
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
        .collect();
    json!({
        "updated_unix_ms": now_ms,
        "nodes": nodes,
        "jobs": jobs,
        "fragments": fragments,
    })
}

fn summary(s: &Snapshot) -> String {
    let mut out = String::from("<div class=\"tiles\">");
    let count = |st: NodeState| s.nodes.iter().filter(|n| n.record.state == st).count();
    let devices: usize = s.nodes.iter().map(|n| n.record.devices).sum();
    let busy: usize = s.nodes.iter().map(|n| n.busy.len()).sum();
    let _ = write!(
        out,
        "<div class=\"tile\"><b>{}</b><span>nodes: {} healthy, {} cordoned, {} draining, {} spare, {} failed</span></div>",
        s.nodes.len(),
        count(NodeState::Healthy),
        count(NodeState::Cordoned),
        count(NodeState::Draining),
        count(NodeState::Spare),
        count(NodeState::Failed)
    );
    let pct = (busy * 100).checked_div(devices).unwrap_or(0);
    let _ = write!(
        out,
        "<div class=\"tile\"><b>{busy} / {devices}</b><span><span class=\"bar\"><i style=\"width:{pct}%\"></i></span>devices held by jobs</span></div>"
    );
    let jobs = |st: JobState| s.jobs.iter().filter(|j| j.state == st).count();
    let _ = write!(
        out,
        "<div class=\"tile\"><b>{}</b><span>jobs: {} running, {} recovering, {} pending, {} succeeded, {} failed</span></div>",
        s.jobs.len(),
        jobs(JobState::Running) + jobs(JobState::Scheduling),
        jobs(JobState::Recovering),
        jobs(JobState::Pending),
        jobs(JobState::Succeeded),
        jobs(JobState::Failed)
    );
    let recoveries: usize = s.jobs.iter().map(|j| j.recoveries.len()).sum();
    let open = s
        .jobs
        .iter()
        .filter(|j| j.recoveries.last().is_some_and(|r| r.resumed_unix_ms == 0))
        .count();
    let _ = write!(
        out,
        "<div class=\"tile\"><b>{recoveries}</b><span>recoveries ({open} in progress)</span></div></div>"
    );
    out
}

fn grid(s: &Snapshot) -> String {
    let by_id: HashMap<&str, &JobRecord> = s.jobs.iter().map(|j| (j.id.as_str(), j)).collect();
    // (job, node, device) -> its rank, for jobs that hold devices now.
    let mut ranks: HashMap<(&str, &str, usize), &Placed> = HashMap::new();
    for j in s.jobs.iter().filter(|j| !j.state.is_final()) {
        for p in &j.placement {
            ranks.insert((j.id.as_str(), p.node.as_str(), p.device), p);
        }
    }
    let devices: usize = s.nodes.iter().map(|n| n.record.devices).sum();
    let mut out = String::with_capacity(devices * 120 + s.nodes.len() * 120);
    if s.nodes.is_empty() {
        out.push_str("<p class=\"note\">no nodes have registered</p>");
        return out;
    }
    for n in &s.nodes {
        let st = node_state_class(n.record.state);
        let mut jobs: Vec<&str> = n.busy.values().map(String::as_str).collect();
        jobs.sort_unstable();
        jobs.dedup();
        out.push_str("<div class=\"node st-");
        out.push_str(st);
        out.push_str("\" data-f=\"");
        push_escaped(&mut out, &n.record.name.to_lowercase());
        let _ = write!(out, " {st}");
        for j in &jobs {
            out.push(' ');
            push_escaped(&mut out, j);
            if let Some(r) = by_id.get(j) {
                out.push(' ');
                push_escaped(&mut out, &r.spec.name.to_lowercase());
            }
        }
        out.push_str("\" title=\"");
        push_escaped(&mut out, &n.record.name);
        let _ = write!(
            out,
            ": {st}, {} devices, nvlink {}, rail {}\"><b>",
            n.record.devices,
            escape(&n.record.nvlink_domain),
            n.record.ib_rail
        );
        push_escaped(&mut out, &n.record.name);
        out.push_str("</b>");
        for d in 0..n.record.devices {
            let here = n.busy.get(&d);
            let class = match (here.and_then(|id| by_id.get(id.as_str())), n.record.state) {
                (_, NodeState::Failed) => "d down".to_string(),
                (Some(j), _) => format!("d {}", job_colour(j.seq)),
                (None, NodeState::Spare) => "d spare".into(),
                (None, NodeState::Cordoned | NodeState::Draining) => "d held".into(),
                (None, NodeState::Healthy) => "d".into(),
            };
            let _ = write!(out, "<i class=\"{class}\" title=\"");
            push_escaped(&mut out, &n.record.name);
            let _ = write!(out, ":{d} · ");
            match here {
                Some(id) => {
                    push_escaped(&mut out, id);
                    if let Some(j) = by_id.get(id.as_str()) {
                        out.push_str(" (");
                        push_escaped(&mut out, &j.spec.name);
                        out.push(')');
                        if let Some(p) = ranks.get(&(id.as_str(), n.record.name.as_str(), d)) {
                            let _ = write!(
                                out,
                                " · stage {} dp {} · EP group {}",
                                p.pp_rank,
                                p.dp_rank,
                                ep_group(j.spec.parallelism.ep, p)
                            );
                        }
                    }
                }
                None => out.push_str(match n.record.state {
                    NodeState::Failed => "failed",
                    NodeState::Spare => "spare",
                    NodeState::Cordoned | NodeState::Draining => "cordoned",
                    NodeState::Healthy => "free",
                }),
            }
            out.push_str("\"></i>");
        }
        out.push_str("</div>");
    }
    out
}

/// A job's progress bar and `step / steps`.
pub fn progress(out: &mut String, j: &JobRecord) {
    let steps = j.spec.training.steps.max(1);
    let pct = (j.step.min(steps) * 100 / steps).min(100);
    let _ = write!(
        out,
        "<span class=\"bar\"><i style=\"width:{pct}%\"></i></span>{} / {}",
        j.step, j.spec.training.steps
    );
}

fn jobs_table(s: &Snapshot) -> String {
    if s.jobs.is_empty() {
        return "<p class=\"note\">no jobs submitted</p>".into();
    }
    let mut out = String::with_capacity(s.jobs.len() * 600);
    out.push_str(
        "<table><thead><tr><th>job</th><th>name</th><th>state</th><th>progress</th>\
         <th class=\"num\">attempt</th><th class=\"num\">recoveries</th><th>placement</th><th>reason</th></tr></thead><tbody>",
    );
    for j in &s.jobs {
        let _ = write!(
            out,
            "<tr data-job=\"{id}\" data-state=\"{st}\"><td><i class=\"sw {c}\"></i><a href=\"/jobs/{id}\">{id}</a></td><td>",
            id = escape(&j.id),
            st = job_state_class(j.state),
            c = job_colour(j.seq)
        );
        push_escaped(&mut out, &j.spec.name);
        out.push_str("</td><td>");
        badge(&mut out, job_state_class(j.state));
        out.push_str("</td><td class=\"nowrap\">");
        progress(&mut out, j);
        let _ = write!(
            out,
            "</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>",
            j.attempt,
            j.recoveries.len()
        );
        push_escaped(&mut out, &placement_summary(j));
        out.push_str("</td><td class=\"mute\">");
        push_escaped(&mut out, &j.reason);
        out.push_str("</td></tr>");
    }
    out.push_str("</tbody></table>");
    out
}

fn queue(s: &Snapshot) -> String {
    let mut waiting: Vec<&JobRecord> = s
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Pending)
        .collect();
    if waiting.is_empty() {
        return "<p class=\"note\">the queue is empty</p>".into();
    }
    // The scheduler's order: priority, then submission.
    waiting.sort_by_key(|j| (std::cmp::Reverse(j.spec.priority), j.seq));
    let mut out = String::from(
        "<table><thead><tr><th class=\"num\">#</th><th>job</th><th class=\"num\">priority</th>\
         <th class=\"num\">devices wanted</th><th>waiting since</th><th>why</th></tr></thead><tbody>",
    );
    for (i, j) in waiting.iter().enumerate() {
        let _ = write!(
            out,
            "<tr><td class=\"num\">{}</td><td><a href=\"/jobs/{id}\">{id}</a> ",
            i + 1,
            id = escape(&j.id)
        );
        push_escaped(&mut out, &j.spec.name);
        let _ = write!(
            out,
            "</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"mute\">",
            j.spec.priority,
            j.spec.parallelism.pp * j.spec.parallelism.dp,
            super::utc(j.updated_unix_ms())
        );
        push_escaped(&mut out, &j.reason);
        out.push_str("</td></tr>");
    }
    out.push_str("</tbody></table>");
    out
}
