//! `shoal plan`, run as a separate process.

use shoal_tests::run_shoal;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `shoal plan` of the report's setup.
const PAPER: [&str; 15] = [
    "plan",
    "--model",
    "deepseek-v3-671b",
    "--cluster",
    "256x8",
    "--pp",
    "16",
    "--dp",
    "128",
    "--ep",
    "64",
    "--schedule",
    "dualpipe",
    "--micro-batches",
    "32",
];

#[test]
fn the_papers_setup_places_every_ep_group_on_eight_nodes() {
    let mut args = PAPER.to_vec();
    args.push("--json");
    let out = run_shoal(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let groups = plan["ep_groups"].as_array().expect("ep_groups");
    assert_eq!(groups.len(), 32);
    for g in groups {
        let nodes = g["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 8, "{g}");
        assert!(g["stage"].as_u64().is_some(), "{g}");
    }
    assert_eq!(plan["world"], 2048);
    assert_eq!(plan["max_nodes_per_token"], 4);
    assert!(plan["planning_ms"].as_f64().is_some());
    assert!(plan["device"]["parameter_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(plan["bubble"]["bubble_fraction"].as_f64().is_some());
}

#[test]
fn expert_loads_are_balanced_as_eplb_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let loads = dir.path().join("loads.json");
    std::fs::write(
        &loads,
        "[[90,132,40,61,104,165,39,4,73,56,183,86],[20,107,104,64,19,197,187,157,172,86,16,27]]",
    )
    .expect("write");
    let path = loads.to_str().expect("utf-8 path");
    let out = run_shoal(&[
        "plan",
        "--expert-loads",
        path,
        "--replicas",
        "16",
        "--groups",
        "4",
        "--nodes",
        "2",
        "--gpus",
        "8",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(
        r["phy2log"],
        serde_json::json!([
            [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
            [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]
        ])
    );
    assert_eq!(
        r["logcnt"],
        serde_json::json!([
            [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
            [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]
        ])
    );

    // Bad input: a ragged layer, then a missing flag.
    std::fs::write(&loads, "[[1,2,3,4],[1,2]]").expect("write");
    let out = run_shoal(&[
        "plan",
        "--expert-loads",
        path,
        "--replicas",
        "8",
        "--groups",
        "2",
        "--nodes",
        "1",
        "--gpus",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("expert loads[1]"), "{}", stderr(&out));
    let out = run_shoal(&["plan", "--expert-loads", path, "--replicas", "8"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--groups"), "{}", stderr(&out));
}

#[test]
fn invalid_parallelism_names_the_field() {
    for (args, field) in [
        (vec!["--pp", "15"], "parallelism.pp"),
        (vec!["--ep", "48"], "parallelism.ep"),
        (vec!["--micro-batches", "8"], "parallelism.micro_batches"),
        (vec!["--schedule", "gpipe"], "parallelism.schedule"),
        (vec!["--cluster", "100x8"], "not enough devices"),
        (vec!["--model", "huge"], "--model huge"),
    ] {
        let mut all = vec!["plan"];
        all.extend(args);
        let out = run_shoal(&all);
        assert_eq!(out.status.code(), Some(1), "{all:?}");
        assert!(stderr(&out).contains(field), "{all:?}: {}", stderr(&out));
    }
}

#[test]
fn expert_loads_balance_the_plans_ep_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let loads = dir.path().join("loads.json");
    // Three layers of 256 experts; a few experts are hot.
    let layers: Vec<Vec<f64>> = (0..3)
        .map(|l| {
            (0..256)
                .map(|e| {
                    if (e + l) % 50 == 0 {
                        4000.0
                    } else {
                        (e % 7 + 1) as f64
                    }
                })
                .collect()
        })
        .collect();
    std::fs::write(&loads, serde_json::to_string(&layers).expect("json")).expect("write");
    let path = loads.to_str().expect("utf-8 path");
    let out = run_shoal(&["plan", "--expert-loads", path, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let e = &p["expert_placement"];
    // The paper's setup: EP groups of 64 devices on 8 nodes, one redundant slot per device.
    assert_eq!(e["replicas"], 320);
    assert_eq!(e["slots_per_device"], 5);
    assert_eq!(e["nodes"], 8);
    assert_eq!(e["phy2log"].as_array().map(Vec::len), Some(3));
    for l in 0..3 {
        let before = e["imbalance_before"][l].as_f64().expect("ratio");
        let after = e["imbalance_after"][l].as_f64().expect("ratio");
        assert!(after < before / 2.0, "layer {l}: {before} -> {after}");
    }
    // Loads that do not match the model's experts are refused by name.
    std::fs::write(&loads, "[[1,2,3]]").expect("write");
    let out = run_shoal(&["plan", "--expert-loads", path]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("expert loads[0]"), "{}", stderr(&out));
}

#[test]
fn dualpipev_is_planned_with_its_operation_lists() {
    let out = run_shoal(&[
        "plan",
        "--cluster",
        "4x8",
        "--pp",
        "4",
        "--dp",
        "8",
        "--ep",
        "8",
        "--schedule",
        "dualpipev",
        "--micro-batches",
        "8",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let ranks = plan["schedule"].as_array().expect("schedule");
    assert_eq!(ranks.len(), 4);
    for (r, ops) in ranks.iter().enumerate() {
        let ops: Vec<&str> = ops
            .as_array()
            .expect("a rank's operations")
            .iter()
            .map(|o| o.as_str().expect("an operation string"))
            .collect();
        // Both phases of 8 micro-batches x F, B, W, overlapped pairs counting two.
        let chunks: usize = ops.iter().map(|o| o.split('&').count()).sum();
        assert_eq!(chunks, 48, "rank {r}: {ops:?}");
        assert!(ops.iter().any(|o| o.contains('&')), "rank {r}: {ops:?}");
    }
    // Rank 0 feeds every micro-batch in: it starts with 2 (pp - 1) + 1 phase-0 forwards.
    let rank0 = ranks[0].as_array().expect("rank 0");
    assert_eq!(rank0[6], "F0.6");
    assert_eq!(rank0[7], "F1.0");
    let table2 = plan["simulated"]["table2_bubble_flops"]
        .as_f64()
        .expect("table 2");
    for b in plan["simulated"]["bubble_flops"]
        .as_array()
        .expect("bubble")
    {
        let b = b.as_f64().expect("a number");
        assert!(
            b > 0.0 && b <= table2 * (1.0 + 1e-9),
            "{b} against {table2}"
        );
    }
}

#[test]
fn the_schedule_is_data_in_json_and_drawn_as_a_timeline() {
    let args = [
        "plan",
        "--cluster",
        "4x8",
        "--pp",
        "4",
        "--dp",
        "8",
        "--ep",
        "8",
        "--schedule",
        "dualpipe",
        "--micro-batches",
        "8",
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = run_shoal(&json_args);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let ranks = plan["schedule"].as_array().expect("schedule");
    assert_eq!(ranks.len(), 4);
    let rank0: Vec<&str> = ranks[0]
        .as_array()
        .expect("rank 0")
        .iter()
        .map(|o| o.as_str().expect("an operation string"))
        .collect();
    assert_eq!(&rank0[..4], ["F0.0", "F0.1", "F0.2", "F1.0"]);
    assert!(rank0.contains(&"F0.3&B1.1"), "{rank0:?}");
    // 8 micro-batches x F, B, W, with overlapped pairs counting two.
    let chunks: usize = rank0.iter().map(|o| o.split('&').count()).sum();
    assert_eq!(chunks, 24);
    let simulated = plan["simulated"]["bubble_flops"]
        .as_array()
        .expect("bubble");
    let table2 = plan["simulated"]["table2_bubble_flops"]
        .as_f64()
        .expect("table 2");
    assert!(table2 > 0.0);
    for b in simulated {
        let b = b.as_f64().expect("a number");
        assert!(
            b > 0.0 && b <= table2 * (1.0 + 1e-9),
            "{b} against {table2}"
        );
    }

    let out = run_shoal(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("timeline with F = B = W = 1"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("rank   0 |"))
        .expect("rank 0's row");
    assert!(
        row.starts_with("rank   0 |F0.0 F0.1 F0.2 F1.0 B1.0"),
        "{row}"
    );

    // A plan too large for operation lists is still planned, without them.
    let out = run_shoal(&["plan", "--micro-batches", "40000", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let big: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(big["schedule"].is_null() && big["world"] == 2048, "{big}");
    assert!(
        stderr(&out).contains("no operation lists"),
        "{}",
        stderr(&out)
    );

    // DualPipe needs an even pp: the error names the field.
    let out = run_shoal(&[
        "plan",
        "--cluster",
        "4x8",
        "--pp",
        "3",
        "--dp",
        "8",
        "--ep",
        "8",
        "--schedule",
        "dualpipe",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("parallelism.pp"), "{}", stderr(&out));
}

/// `shoal plan | head` with the reader gone before the output: no panic, SIGPIPE's status.
#[test]
fn a_closed_stdout_ends_the_plan_quietly() {
    let mut child = std::process::Command::new(shoal_tests::shoal_bin())
        .args(PAPER)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start shoal plan");
    // The reader goes away before the plan is printed.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}
