//! Spans over OTLP to a real receiver (the collector service generated from the OpenTelemetry
//! protobuf definitions): a job submitted to a coordinator and run by two node agents gives one
//! trace, from the CLI's submission through the coordinator's placement to every node's steps
//! and pipeline operations; a bad endpoint is refused by name; an unreachable collector costs
//! one warning, never the run.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use shoal_tests::otlp::{Receiver, Span};
use shoal_tests::{
    Background, free_port, http_get, run_shoal, sample, submit_toml, url_in, wait_for_nodes,
};

/// Batches go out every 100 ms rather than every 5 s.
const FAST: [(&str, &str); 1] = [("OTEL_BSP_SCHEDULE_DELAY", "100")];

fn by_name<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[test]
fn a_submitted_jobs_spans_reach_the_collector_as_one_trace() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let http = format!("127.0.0.1:{}", free_port());
    let mut coordinator = Background::start_env(
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--store",
            store.to_str().expect("utf-8"),
            "--otlp-endpoint",
            &rx.url,
            "--http",
            &http,
        ],
        &FAST,
    );
    let url = url_in(&coordinator.first_line());
    let worker_http: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let _workers: Vec<Background> = ["n1", "n2"]
        .iter()
        .zip(&worker_http)
        .map(|(n, h)| {
            Background::start_env(
                &[
                    "worker",
                    "--coordinator",
                    &url,
                    "--node",
                    n,
                    "--devices",
                    "cpu:2",
                    "--otlp-endpoint",
                    &rx.url,
                    "--http",
                    h,
                ],
                &FAST,
            )
        })
        .collect();
    wait_for_nodes(&url, 2);
    let id = submit_toml(
        &url,
        dir.path(),
        "otel",
        "name = \"otel\"\n[training]\nsteps = 3\nseq_len = 32\nbatch = 8\n[parallelism]\npp = 2\ndp = 2\nep = 2\nschedule = \"dualpipe\"\nmicro_batches = 4\n[checkpointing]\ndir = \"{dir}\"\n",
        &["--otlp-endpoint", &rx.url],
    );
    let o = run_shoal(&["watch", &id, "--coordinator", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Both nodes' attempts end with the job; their spans follow within a few batches.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = rx.spans();
        if by_name(&spans, "attempt").len() >= 2 || Instant::now() > deadline {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let one = |name: &str| -> Span {
        let found = by_name(&spans, name);
        assert_eq!(found.len(), 1, "one {name} span; got {names:?}");
        found[0].clone()
    };
    // The CLI's submission is the root; the coordinator's handling of it, its child; each
    // node's attempt, a child of that.
    let root = one("shoal submit");
    assert_eq!(root.service, "shoal-cli");
    assert_eq!(root.parent_id, "", "the root of the trace");
    assert_eq!(root.attributes.get("job").map(String::as_str), Some("otel"));
    let submit = one("submit_job");
    assert_eq!(submit.service, "shoal-coordinator");
    assert_eq!(submit.parent_id, root.span_id);
    assert_eq!(submit.attributes.get("job"), Some(&id));
    let trace = &root.trace_id;
    let place = one("place");
    assert_eq!(
        (&place.trace_id, &place.parent_id),
        (trace, &submit.span_id)
    );
    let attempts = by_name(&spans, "attempt");
    let nodes: BTreeSet<&str> = attempts
        .iter()
        .map(|a| {
            assert_eq!(a.service, "shoal-worker");
            assert_eq!((&a.trace_id, &a.parent_id), (trace, &submit.span_id));
            assert_eq!(a.attributes.get("job"), Some(&id));
            a.attributes.get("node").map_or("", String::as_str)
        })
        .collect();
    assert_eq!(nodes, BTreeSet::from(["n1", "n2"]), "{attempts:?}");

    // Every node's spans are in the job's trace, down to the pipeline operations.
    let workers: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "shoal-worker")
        .collect();
    assert!(workers.len() > 100, "{} worker spans", workers.len());
    for s in &workers {
        assert_eq!(&s.trace_id, trace, "{s:?}");
        assert_ne!(s.parent_id, "", "{s:?}");
    }
    let steps: BTreeSet<String> = by_name(&spans, "step")
        .iter()
        .filter_map(|s| s.attributes.get("step").cloned())
        .collect();
    // Step 2 is the one `shoal trace` records into the job's Chrome trace instead.
    assert!(steps.contains("1") && steps.contains("3"), "{steps:?}");
    let has = |name: &str, keys: &[&str]| {
        by_name(&spans, name)
            .iter()
            .any(|s| keys.iter().all(|k| s.attributes.contains_key(*k)))
    };
    assert!(has("op", &["op", "rank"]), "pipeline operations: {names:?}");
    assert!(
        has("forward", &["stage", "mb"]),
        "stage and micro-batch: {names:?}"
    );
    assert!(has("backward", &["stage", "mb"]), "{names:?}");
    assert!(has("wgrad", &["mb"]), "weight-gradient passes: {names:?}");
    assert!(names.contains("all_to_all"), "expert exchanges: {names:?}");
    assert!(by_name(&spans, "pp_rank").len() >= 2, "{names:?}");
    for s in by_name(&spans, "op") {
        let op = &s.attributes["op"];
        assert!(
            op.starts_with('F') || op.starts_with('B') || op.starts_with('W'),
            "{op}"
        );
    }

    // Prometheus: the coordinator's view of the cluster and the job, and each node's own.
    let (code, m) = http_get(&format!("http://{http}/metrics"));
    assert_eq!(code, 200, "{m}");
    let job = format!("job=\"{id}\",name=\"otel\"");
    for (series, want) in [
        ("shoal_jobs{state=\"succeeded\"}".to_string(), 1.0),
        ("shoal_queue_length".to_string(), 0.0),
        ("shoal_nodes{state=\"healthy\"}".to_string(), 2.0),
        (
            "shoal_devices{node_state=\"healthy\",use=\"free\"}".to_string(),
            4.0,
        ),
        (format!("shoal_job_step{{{job}}}"), 3.0),
        (format!("shoal_job_steps{{{job}}}"), 3.0),
        (format!("shoal_job_ranks{{{job}}}"), 4.0),
        (format!("shoal_job_failures_total{{{job}}}"), 0.0),
    ] {
        assert_eq!(sample(&m, &series), Some(want), "{series} in\n{m}");
    }
    let loss = sample(&m, &format!("shoal_job_loss{{{job}}}")).expect("the job's loss");
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
    assert!(
        sample(&m, &format!("shoal_job_tokens_per_second{{{job}}}")) > Some(0.0),
        "{m}"
    );
    // DualPipe over 2 stages leaves a bubble: some of the step, not all of it.
    let bubble = sample(&m, &format!("shoal_job_pipeline_bubble_ratio{{{job}}}")).expect("bubble");
    assert!(bubble > 0.0 && bubble < 1.0, "{bubble}");
    // Every MoE layer of the model routed the same number of tokens (each to its top-k
    // experts); the MTP module's layer routes fewer (a sequence's last token predicts nothing
    // there).
    let layer_sum = |layer: usize| -> f64 {
        m.lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "shoal_job_expert_load_tokens{{job=\"{id}\",layer=\"{layer}\","
                ))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let first = layer_sum(0);
    assert!(first > 0.0, "expert loads of layer 0 in\n{m}");
    assert!(
        sample(
            &m,
            &format!("shoal_job_max_vio{{job=\"{id}\",layer=\"0\"}}")
        )
        .is_some(),
        "{m}"
    );
    let layers = (0..64).take_while(|l| layer_sum(*l) > 0.0).count();
    assert!(layers >= 2, "{m}");
    for l in 0..layers - 1 {
        assert_eq!(layer_sum(l), first, "layer {l}");
    }
    assert!(layer_sum(layers - 1) <= first, "{m}");
    for (node, h) in ["n1", "n2"].iter().zip(&worker_http) {
        let (code, w) = http_get(&format!("http://{h}/metrics"));
        assert_eq!(code, 200, "{w}");
        let at = format!("job=\"{id}\",node=\"{node}\"");
        assert_eq!(sample(&w, &format!("shoal_step{{{at}}}")), Some(3.0), "{w}");
        assert_eq!(sample(&w, "shoal_agent_jobs_running"), Some(0.0), "{w}");
        assert_eq!(sample(&w, "shoal_agent_sessions_total"), Some(1.0), "{w}");
        assert_eq!(sample(&w, "shoal_agent_devices"), Some(2.0), "{w}");
        assert!(
            sample(
                &w,
                &format!("shoal_comm_bytes_total{{{at},transport=\"tcp\",op=\"all\"}}")
            ) > Some(0.0),
            "the stages talk across nodes: {w}"
        );
        assert!(
            sample(&w, &format!("shoal_step_duration_seconds_count{{{at}}}")) == Some(3.0),
            "{w}"
        );
        assert!(w.ends_with("# EOF\n"), "{w}");
        let (code, body) = http_get(&format!("http://{h}/nope"));
        assert_eq!(code, 404, "{body}");
    }
    let (code, body) = http_get(&format!("http://{http}/no/such/page"));
    assert_eq!(
        (code, body.contains("/no/such/page")),
        (404, true),
        "{body}"
    );
    drop(coordinator);
}

#[test]
fn a_malformed_otlp_endpoint_is_refused_by_name() {
    for (endpoint, why) in [
        ("not a url", "is not a URL"),
        ("ftp://127.0.0.1:4317", "is not http or https"),
        ("127.0.0.1:4317", "has no scheme"),
    ] {
        let o = run_shoal(&["jobs", "--otlp-endpoint", endpoint]);
        assert!(!o.status.success(), "{endpoint}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--otlp-endpoint") && err.contains(why),
            "{endpoint}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn an_unreachable_collector_costs_one_warning_not_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on.
    let port = shoal_tests::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = dir.path().join("run");
    let began = Instant::now();
    let o = std::process::Command::new(shoal_tests::shoal_bin())
        .args([
            "train",
            "--steps",
            "3",
            "--seq-len",
            "32",
            "--batch",
            "8",
            "--json",
            "--out",
            out.to_str().expect("utf-8"),
            "--otlp-endpoint",
            &endpoint,
        ])
        .envs(FAST)
        .output()
        .expect("run shoal train");
    let took = began.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let summary: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap_or(""),
    )
    .expect("the run's summary");
    assert_eq!(
        summary["losses"].as_array().map(Vec::len),
        Some(3),
        "{summary}"
    );
    // Batches went out every 100 ms and all failed: warnings rate-limited to one per 30 s from
    // each process that exported (the run's and its two node agents'), naming the endpoint.
    let warnings = err.matches("spans not exported").count() as u64;
    let most = 3 * (1 + took.as_secs() / 30);
    assert!((1..=most).contains(&warnings), "{err}");
    assert!(err.contains(&endpoint), "{err}");
    assert!(took < Duration::from_secs(60), "{took:?}");
}
