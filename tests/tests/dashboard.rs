//! The coordinator's dashboard in a real browser: a coordinator and two node agents run a job
//! that loses a node agent (SIGKILL) mid-run and recovers onto a replacement; headless Chromium
//! then loads the cluster page, the job's page and a bad job's page, and the test asserts what
//! they show after their scripts ran (live data fetched from the JSON endpoints), keeping
//! screenshots under `target/dashboard-screenshots/`. Bad dashboard URLs get 404 pages.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoal_tests::start_worker as worker;
use shoal_tests::{
    Background, free_port, http_get, rendered_dom, screenshot, shoal_bin, submit_toml, url_in,
    wait_for_nodes,
};

/// Polls `/api/jobs/{id}` until `done` holds (and returns it), failing after `within`.
fn wait_for(
    http: &str,
    id: &str,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (code, body) = http_get(&format!("{http}/api/jobs/{id}"));
        let j: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if code == 200 && done(&j) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} after {within:?}: {code} {}",
            &body[..body.len().min(2000)]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where the screenshots are kept: `target/dashboard-screenshots/`.
fn screenshots() -> PathBuf {
    let target = shoal_bin()
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .expect("target directory");
    let dir = target.join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

#[test]
fn the_dashboard_shows_a_job_that_failed_and_recovered_in_a_real_browser() {
    let began = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let port = free_port();
    let mut coordinator = Background::start(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--http",
        &format!("127.0.0.1:{port}"),
        "--store",
        store.to_str().expect("utf-8"),
    ]);
    let url = url_in(&coordinator.first_line());
    let http = format!("http://127.0.0.1:{port}");
    let _w1 = worker(&url, "n1");
    let mut w2 = worker(&url, "n2");
    wait_for_nodes(&url, 2);

    // Two pipeline stages x two data-parallel ranks over both nodes, checkpointing every 2
    // steps so it can recover.
    let id = submit_toml(
        &url,
        dir.path(),
        "dash",
        "name = \"dash\"\nprecision = \"fp32\"\n[training]\nsteps = 10\nseq_len = 32\nbatch = 8\n[parallelism]\npp = 2\ndp = 2\nep = 2\nschedule = \"dualpipe\"\nmicro_batches = 4\n[checkpointing]\ndir = \"{dir}\"\ninterval = 2\n",
        &[],
    );

    // Running past its first checkpoint, then n2 is killed; n3 replaces it.
    wait_for(&http, &id, Duration::from_secs(90), |j| {
        j["state"] == "running" && j["checkpoint_step"].as_u64().unwrap_or(0) >= 2
    });
    w2.kill();
    wait_for(&http, &id, Duration::from_secs(30), |j| {
        j["recoveries"].as_array().is_some_and(|r| !r.is_empty())
    });
    let _w3 = worker(&url, "n3");
    let j = wait_for(&http, &id, Duration::from_secs(120), |j| {
        j["state"] == "succeeded"
    });
    let rec = &j["recoveries"][0];
    assert!(rec["recovery_ms"].as_u64().is_some(), "{rec}");
    assert!(
        rec["cause"].as_str().is_some_and(|c| c.contains("n2")),
        "{rec}"
    );
    let redone = rec["steps_redone"].as_u64().expect("steps redone");
    eprintln!("job done after {:.1} s", began.elapsed().as_secs_f64());

    // The cluster page, after its script fetched /api/cluster.
    let dom = rendered_dom(&format!("{http}/"), 3000);
    for node in ["n1", "n2", "n3"] {
        assert!(
            dom.contains(&format!("<b>{node}</b>")),
            "node {node}: {dom}"
        );
    }
    assert!(
        dom.contains("node st-failed\" data-f=\"n2 failed"),
        "n2 failed"
    );
    assert!(
        dom.contains("node st-healthy\" data-f=\"n1 healthy"),
        "n1 healthy"
    );
    assert!(
        dom.contains("node st-healthy\" data-f=\"n3 healthy"),
        "n3 healthy"
    );
    assert_eq!(dom.matches("<i class=\"d").count(), 6, "a cell per device");
    assert!(
        dom.contains(&format!("data-job=\"{id}\" data-state=\"succeeded\"")),
        "the job's row"
    );
    assert!(dom.contains("the queue is empty"));
    let live = |dom: &str| {
        dom.split("id=\"live\"")
            .nth(1)
            .is_some_and(|rest| rest[..rest.find('>').unwrap_or(0)].contains("data-updated=\""))
    };
    assert!(live(&dom), "the page's script fetched /api/cluster");
    assert!(dom.contains("live · updated"));
    // The page timed its own load (what `shoal bench dashboard` reads).
    let load_ms: f64 = dom
        .split("data-load-ms=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|v| v.parse().ok())
        .expect("data-load-ms on the body");
    assert!(load_ms > 0.0, "{load_ms}");

    // The job's page: curves, heat map, timeline, and the recovery log.
    let job_url = format!("{http}/jobs/{id}");
    let dom = rendered_dom(&job_url, 3000);
    assert!(live(&dom), "the page's script fetched /api/jobs/{id}");
    assert!(dom.contains("<span class=\"badge s-succeeded\">succeeded</span>"));
    assert!(dom.contains("id=\"loss-chart\"") && dom.contains("<polyline class=\"line\""));
    assert!(dom.contains("id=\"tps-chart\""));
    assert!(
        dom.contains("failure at step"),
        "the failure marked on the curves"
    );
    assert!(
        dom.contains("id=\"heatmap-svg\""),
        "the expert-load heat map"
    );
    assert!(dom.contains("layer 0 expert 0:"));
    assert!(dom.contains("id=\"recovery-svg\""), "the recovery picture");
    let log = dom
        .split("id=\"recovery-log\"")
        .nth(1)
        .expect("the recovery log");
    let row = log
        .split("<tr class=\"recovery\"")
        .nth(1)
        .expect("a recovery row");
    let cause = row
        .split("class=\"cause\">")
        .nth(1)
        .and_then(|c| c.split("</td>").next())
        .expect("its cause");
    assert!(
        cause.contains("n2"),
        "the cause names the lost node: {cause}"
    );
    assert!(
        row.contains(&format!("<td class=\"num redone\">{redone} (step ")),
        "steps redone: {row}"
    );
    assert!(row.contains("n1, n2 → "), "nodes before: {row}");
    assert!(row.contains("n3"), "nodes after: {row}");
    assert!(
        dom.contains("id=\"timeline-svg\""),
        "the step timeline of the traced step"
    );
    assert!(dom.contains("idle "));

    // Bad URLs: 404 pages, not panics, and the coordinator still answers.
    let dom = rendered_dom(&format!("{http}/jobs/job-999"), 500);
    assert!(
        dom.contains("404") && dom.contains("no job job-999"),
        "{dom}"
    );
    for path in [
        "/jobs/job-999",
        "/jobs/",
        "/jobs/a/b",
        "/jobs/%ff%fe",
        "/api/jobs/nope",
        "/nothing/here",
        "/%3Cscript%3E",
    ] {
        let (code, body) = http_get(&format!("{http}{path}"));
        assert_eq!(code, 404, "{path}: {body}");
        assert!(
            !body.contains("<script>"),
            "{path} reflected markup: {body}"
        );
    }
    let (code, _) = http_get(&format!("{http}/"));
    assert_eq!(code, 200, "still serving");

    // Screenshots, kept.
    let shots = screenshots();
    screenshot(&format!("{http}/"), &shots.join("cluster.png"), 1400, 1000);
    screenshot(&job_url, &shots.join("job.png"), 1400, 2400);
    eprintln!(
        "screenshots in {} ({:.1} s in all)",
        shots.display(),
        began.elapsed().as_secs_f64()
    );
    coordinator.kill();
}
