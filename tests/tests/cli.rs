//! The `shoal` binary, run as a separate process.

use shoal_tests::run_shoal;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_the_subcommands() {
    let out = run_shoal(&["--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["train", "eval", "bench"] {
        assert!(text.contains(sub), "help does not mention {sub}: {text}");
    }
}

#[test]
fn unknown_arguments_are_refused_by_name() {
    let out = run_shoal(&["bench", "kernels", "--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--frobnicate"), "{}", stderr(&out));
}

#[test]
fn a_python_without_numpy_is_a_clear_error() {
    let out = run_shoal(&[
        "bench",
        "kernels",
        "--quick",
        "--python",
        "/nonexistent/python3",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--python /nonexistent/python3") && err.contains("numpy"),
        "{err}"
    );
}

#[test]
fn quick_kernel_bench_reports_every_measurement() {
    let out = run_shoal(&["bench", "kernels", "--quick", "--no-numpy", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let q = &report["quantize"];
    for key in ["quantize_gb_s", "memcpy_gb_s", "ratio_vs_memcpy"] {
        let v = q[key].as_f64().unwrap_or(0.0);
        assert!(v.is_finite() && v > 0.0, "quantize.{key} = {v}");
    }
    let gemm = report["gemm"].as_array().expect("gemm rows");
    let sizes: Vec<u64> = gemm.iter().filter_map(|r| r["n"].as_u64()).collect();
    assert_eq!(sizes, [256, 512]);
    for row in gemm {
        for key in ["fp32_gflops", "bf16_gflops", "fp8_exact_gflops"] {
            let v = row[key].as_f64().unwrap_or(0.0);
            assert!(v.is_finite() && v > 0.0, "{key} = {v} in {row}");
        }
        assert!(row["numpy_fp32_gflops"].is_null(), "numpy was skipped");
    }
    assert!(
        report["fp8_tensor_core_emulation"]["gflops"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );
}

#[test]
fn quick_control_bench_reports_positive_rates() {
    let out = run_shoal(&["bench", "control", "--quick", "--no-ray", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().expect("a JSON line");
    let report: serde_json::Value = serde_json::from_str(line).expect("one JSON object");
    let positive = |v: &serde_json::Value, what: &str| {
        let x = v.as_f64().unwrap_or(0.0);
        assert!(x.is_finite() && x > 0.0, "{what} = {v} in {report}");
    };
    let placements = report["rpc"]["placements"].as_array().expect("placements");
    assert!(
        placements.iter().any(|p| p["placement"] == "spread"),
        "{report}"
    );
    for p in placements {
        positive(&p["shoal_calls_per_s"], "shoal_calls_per_s");
        positive(&p["tcp_round_trips_per_s"], "tcp_round_trips_per_s");
        assert!(p["ray_calls_per_s"].is_null(), "ray was skipped: {p}");
    }
    positive(
        &report["launch"]["shoal_median_ms"],
        "launch.shoal_median_ms",
    );
    let levels = report["sessions"]["levels"].as_array().expect("levels");
    assert!(!levels.is_empty(), "{report}");
    // Whether a level passed depends on the machine's load; that the sessions all registered
    // and heartbeated does not.
    for level in levels {
        assert_eq!(level["healthy"], level["sessions"], "{level}");
        positive(&level["heartbeats"], "heartbeats");
    }
}

#[test]
fn quick_pipeline_bench_reports_every_schedule() {
    let out = run_shoal(&[
        "bench",
        "pipeline",
        "--steps",
        "1",
        "--batch",
        "4",
        "--seq-len",
        "16",
        "--micro-batches",
        "4",
        "--pp",
        "2",
        "--precision",
        "fp32",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a JSON line")).expect("one JSON object");
    let rows = report["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["schedule"].as_str()).collect();
    assert_eq!(names, ["1f1b", "zb1p", "dualpipe", "dualpipev"], "{report}");
    for r in rows {
        for key in [
            "step_s",
            "tokens_per_s",
            "f_ms",
            "b_ms",
            "w_ms",
            "table2_ms",
        ] {
            let v = r[key].as_f64().unwrap_or(-1.0);
            assert!(v.is_finite() && v >= 0.0, "{key} = {v} in {r}");
        }
        // 4 micro-batches of 1 x 16 tokens, 256 wide, fp32: activation and gradient once each
        // across the one boundary (DualPipeV's four stages: two, its turn staying on a rank).
        let crossings = if r["schedule"] == "dualpipev" { 2 } else { 1 };
        assert_eq!(r["bytes_per_step"], crossings * 4 * 2 * 16 * 256 * 4, "{r}");
    }
    assert!(rows[2]["fb_ms"].as_f64().is_some(), "dualpipe overlaps");
    assert!(rows[3]["fb_ms"].as_f64().is_some(), "dualpipev overlaps");
    // A bad flag is refused by name.
    let out = run_shoal(&["bench", "pipeline", "--micro-batches", "99", "--batch", "4"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--micro-batches"), "{}", stderr(&out));
}

#[test]
fn quick_comm_bench_reports_both_transports_and_training_shapes() {
    let out = run_shoal(&[
        "bench", "comm", "--tokens", "64", "--hidden", "256", "--iters", "1", "--steps", "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a JSON line")).expect("one JSON object");
    let ex = report["exchanges"].as_array().expect("exchanges");
    assert_eq!(ex.len(), 2, "{report}");
    for e in ex {
        for key in [
            "seconds",
            "gbps",
            "peer_gbps",
            "ratio",
            "quantize_seconds",
            "ratio_with_quantize",
        ] {
            let v = e[key].as_f64().unwrap_or(-1.0);
            assert!(v.is_finite() && v > 0.0, "{key} = {v} in {e}");
        }
        assert!(e["bytes_per_rank"].as_u64().unwrap_or(0) > 0, "{e}");
    }
    // FP8 rows with routes: about (1 + 4/128) / 2 of BF16 plus the routes' share.
    let r = report["fp8_over_bf16_dispatch"].as_f64().unwrap_or(0.0);
    assert!((0.5..0.7).contains(&r), "{r}");
    let training = report["training"].as_array().expect("training");
    assert_eq!(training.len(), 9, "{report}");
    for t in &training[1..] {
        assert!(t["bytes_per_step"].as_u64().unwrap_or(0) > 0, "{t}");
        assert!(t["vs_single"].as_f64().unwrap_or(0.0) > 0.0, "{t}");
    }
    assert!(
        training[4]["shape"]
            .as_str()
            .unwrap_or("")
            .contains("dualpipe")
    );
    // The main job's shape with each overlapped pair's chunks one after the other: the same
    // bytes.
    assert!(
        training[5]["shape"]
            .as_str()
            .unwrap_or("")
            .contains("one after the other")
    );
    assert_eq!(training[5]["bytes_per_step"], training[4]["bytes_per_step"]);
    // Hierarchical dispatch sends fewer dispatch bytes over the network than direct.
    let net = |i: usize| {
        training[i]["network_dispatch_per_step"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(net(7) > 0 && net(7) < net(8), "{report}");
    let out = run_shoal(&["bench", "comm", "--experts", "3"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--experts"), "{}", stderr(&out));
}
