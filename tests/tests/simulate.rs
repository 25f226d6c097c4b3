//! `shoal simulate` as a user runs it: a real coordinator process, simulated nodes attached
//! over loopback gRPC, failures injected at random (seeded).

use shoal_tests::run_shoal;

fn simulate(extra: &[&str]) -> std::process::Output {
    simulate_for("4", extra)
}

/// `shoal simulate` of the small cluster, taking about `real_seconds` without failures.
fn simulate_for(real_seconds: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "simulate",
        "--nodes",
        "8",
        "--gpus-per-node",
        "8",
        "--pp",
        "2",
        "--dp",
        "32",
        "--ep",
        "8",
        "--hours",
        "24",
        "--real-seconds",
        real_seconds,
        "--json",
    ];
    args.extend_from_slice(extra);
    run_shoal(&args)
}

fn report(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "shoal simulate failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {text}"))
}

fn num(r: &serde_json::Value, key: &str) -> f64 {
    r[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {r}"))
}

fn log(r: &serde_json::Value) -> Vec<serde_json::Value> {
    r["failure_log"].as_array().cloned().unwrap_or_default()
}

#[test]
fn failures_are_detected_and_recovered_onto_spares_with_the_same_schedule_per_seed() {
    let run = || {
        report(&simulate_for(
            "8",
            &["--mtbf-hours", "20", "--spares", "2", "--seed", "7"],
        ))
    };
    let r = run();
    for key in [
        "placement_ms",
        "detect_p50_ms",
        "detect_p99_ms",
        "recovery_p50_s",
        "recovery_p99_s",
        "ettr",
        "coordinator_cpu_s",
        "coordinator_peak_rss_mb",
        "gpu_hours_per_trillion_tokens",
    ] {
        assert!(num(&r, key).is_finite(), "{key} in {r}");
    }
    assert!(num(&r, "placement_ms") > 0.0);
    // 10 nodes at a 20 h MTBF over 24 h: about a dozen failures.
    let failures = log(&r);
    assert!(failures.len() >= 3, "{r}");
    for f in failures.iter().filter(|f| f["in_job"] == true) {
        // A killed node's stream breaks: detected well under the 2 s goal.
        let d = f["detect_ms"].as_f64().unwrap();
        assert!((0.0..2000.0).contains(&d), "{f}");
        // Recovery: the coordinator's part plus the modelled restart (5 s) and read.
        let rec = f["recovery_s"].as_f64().unwrap();
        assert!(rec >= 5.0, "{f}");
        assert!(f["replan_ms"].as_f64().unwrap() > 0.0, "{f}");
    }
    let ettr = num(&r, "ettr");
    assert!(ettr > 0.5 && ettr < 1.0, "{r}");
    assert!(num(&r, "steps") > 0.0);
    assert!(num(&r, "coordinator_cpu_s") > 0.0);
    assert!(num(&r, "coordinator_peak_rss_mb") > 1.0);
    // Fewer tokens than a failure-free run for the same GPU-hours.
    assert!(
        num(&r, "gpu_hours_per_trillion_tokens")
            > num(&r, "gpu_hours_per_trillion_tokens_no_failures")
    );
    // The same seed fails the same nodes at the same simulated times (the schedule follows
    // from the seed, not from how fast the real run handled each failure).
    let again = run();
    let who = |r: &serde_json::Value| -> Vec<(String, bool, String)> {
        log(r)
            .iter()
            .map(|f| {
                (
                    f["node"].to_string(),
                    f["in_job"] == true,
                    f["at_s"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(who(&r), who(&again));
}

#[test]
fn without_spares_the_job_waits_for_a_repaired_node() {
    let r = report(&simulate(&[
        "--mtbf-hours",
        "40",
        "--repair-hours",
        "1",
        "--seed",
        "3",
    ]));
    let waited: Vec<f64> = log(&r)
        .iter()
        .filter(|f| f["in_job"] == true)
        .map(|f| f["waited_h"].as_f64().unwrap())
        .collect();
    assert!(!waited.is_empty(), "{r}");
    // Every node runs the job: each failure waits for a repair (up to an hour).
    for w in &waited {
        assert!(*w > 0.0 && *w <= 1.0 + 1e-6, "{r}");
    }
    // The waits are lost time.
    let lost = waited.iter().sum::<f64>() / 24.0;
    assert!(num(&r, "ettr") < 1.0 - lost + 0.01, "{r}");
}

#[test]
fn a_hung_node_is_caught_by_the_heartbeat_timeout() {
    let r = report(&simulate(&[
        "--mtbf-hours",
        "30",
        "--spares",
        "2",
        "--hang-fraction",
        "1",
        "--heartbeat-timeout-ms",
        "1000",
        "--seed",
        "5",
    ]));
    let hung: Vec<f64> = log(&r)
        .iter()
        .filter(|f| f["in_job"] == true && f["kind"] == "hang")
        .map(|f| f["detect_ms"].as_f64().unwrap())
        .collect();
    assert!(!hung.is_empty(), "{r}");
    for d in hung {
        // The timeout, plus about one check interval (500 ms) and slack for a loaded machine.
        assert!((1000.0..4000.0).contains(&d), "{r}");
    }
}

#[test]
fn bad_options_are_refused_with_the_flag_named() {
    for (args, flag) in [
        (vec!["--hang-fraction", "2"], "--hang-fraction"),
        (vec!["--hours", "0"], "--hours"),
        (vec!["--mtbf-hours=-1"], "--mtbf-hours"),
        (vec!["--nodes", "2"], "--pp x --dp"),
        (vec!["--checkpoint-every", "0"], "--checkpoint-every"),
        (vec!["--ep", "3"], "parallelism.ep"),
    ] {
        // On their own: every case fails before anything starts.
        let mut all = vec!["simulate"];
        all.extend_from_slice(&args);
        let o = run_shoal(&all);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(flag), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_slow_node_is_flagged_as_a_straggler_and_costs_the_job_its_pace() {
    let r = report(&simulate(&[
        "--mtbf-hours",
        "100000",
        "--stragglers",
        "1",
        "--straggler-factor",
        "1.6",
        "--seed",
        "2",
    ]));
    let made: Vec<String> = r["stragglers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(made.len(), 1, "{r}");
    let flagged = r["stragglers_flagged"].as_array().unwrap();
    assert_eq!(flagged.len(), 1, "{r}");
    assert_eq!(flagged[0]["node"].as_str(), Some(made[0].as_str()));
    let ratio =
        flagged[0]["busy_s"].as_f64().unwrap() / flagged[0]["peers_busy_s"].as_f64().unwrap();
    assert!((ratio - 1.6).abs() < 1e-9, "{r}");
    // Every step waits for it: the job runs at 1/1.6 of its pace.
    let ettr = num(&r, "ettr");
    assert!((ettr - 1.0 / 1.6).abs() < 0.03, "{r}");
}
