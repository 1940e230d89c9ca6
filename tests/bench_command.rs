//! `kiln bench`: the JSON report has every measure, `--batch` decodes several sequences at once on the CPU
//! executor, an executor that cannot batch says so in one line, and `--profile` accounts for the time of every
//! kernel. (What the figures are is measured, not asserted.)

mod common;

fn bench_json(model: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        model,
        "--prefill",
        "8",
        "--decode",
        "4",
        "--repeat",
        "1",
        "--json",
    ];
    args.extend(extra);
    serde_json::from_str(common::kiln_ok(&args).trim()).unwrap()
}

#[test]
fn bench_reports_every_measure_and_decodes_a_batch() {
    let Some(plan) = common::smollm2_plan() else {
        return;
    };
    let plan = plan.to_str().unwrap();
    for batch in [1, 3] {
        let report = bench_json(plan, &["--batch", &batch.to_string()]);
        assert_eq!(report["batch"], batch, "{report}");
        for measure in [
            &report["prefill_tok_s"]["8"],
            &report["decode_tok_s"],
            &report["ttft_ms"],
        ] {
            assert!(measure.as_f64().is_some_and(|v| v > 0.0), "{report}");
        }
        assert!(
            report["peak_rss_bytes"].as_u64().is_some_and(|v| v > 0),
            "{report}"
        );
    }
    // The reference interpreter (a GGUF) keeps one sequence.
    let gguf = common::model("smollm2").unwrap();
    let out = common::kiln(&[
        "bench",
        gguf.to_str().unwrap(),
        "--batch",
        "2",
        "--decode",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--batch 2 needs an executor that decodes several sequences at once"),
        "{stderr}"
    );
}

#[test]
fn bench_profile_accounts_for_every_kernel() {
    let Some(plan) = common::smollm2_plan() else {
        return;
    };
    let report = bench_json(plan.to_str().unwrap(), &["--profile"]);
    for phase in ["prefill", "decode"] {
        let kernels = report["profile"][phase].as_array().unwrap();
        // SmolLM2's schedule: embed, qkv_rope, attention, matmul_residual, gated_ffn, matmul_residual, LM head.
        assert_eq!(kernels.len(), 7, "{phase}: {kernels:?}");
        let share: f64 = kernels.iter().map(|k| k["share"].as_f64().unwrap()).sum();
        assert!((share - 1.0).abs() < 1e-6, "{phase}: shares sum to {share}");
        let seconds: Vec<f64> = kernels
            .iter()
            .map(|k| k["seconds"].as_f64().unwrap())
            .collect();
        assert!(
            seconds.windows(2).all(|w| w[0] >= w[1]),
            "{phase}: most time first: {seconds:?}"
        );
        let gated = kernels
            .iter()
            .find(|k| k["spec"].as_str().unwrap().starts_with("gated_ffn"))
            .unwrap();
        // 30 layers, once per step: one prefill run, and the decode runs' 4 steps after an 8-token prompt each.
        let launches = if phase == "prefill" { 30 } else { 30 * 5 };
        assert_eq!(gated["launches"], launches, "{phase}: {gated}");
    }
    // Without --profile the report has no profile.
    let report = bench_json(plan.to_str().unwrap(), &[]);
    assert!(report.get("profile").is_none(), "{report}");
}

/// `--depth` runs every timed prefill and decode after that many cached tokens (the fill itself is not profiled)
/// and reports it; a depth past the model's trained context is one clear error.
#[test]
fn bench_runs_at_a_depth_and_refuses_one_past_the_context() {
    let Some(plan) = common::smollm2_plan() else {
        return;
    };
    let plan = plan.to_str().unwrap();
    let report = bench_json(plan, &["--depth", "100", "--profile"]);
    assert_eq!(report["depth"], 100, "{report}");
    for measure in [&report["prefill_tok_s"]["8"], &report["decode_tok_s"]] {
        assert!(measure.as_f64().is_some_and(|v| v > 0.0), "{report}");
    }
    for (phase, launches) in [("prefill", 30), ("decode", 30 * 5)] {
        let kernels = report["profile"][phase].as_array().unwrap();
        let gated = kernels
            .iter()
            .find(|k| k["spec"].as_str().unwrap().starts_with("gated_ffn"))
            .unwrap();
        assert_eq!(gated["launches"], launches, "{phase}: {gated}");
    }
    let out = common::kiln(&["bench", plan, "--depth", "9000"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: the longest run needs 9512 positions (--depth 9000")
            && stderr.contains("the model was trained for 8192"),
        "{stderr}"
    );
}
