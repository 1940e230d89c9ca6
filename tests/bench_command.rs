//! `kiln bench`: the JSON report has every measure, `--batch` decodes several sequences at once on the CPU
//! executor, and an executor that cannot batch says so in one line. (What the figures are is measured, not
//! asserted.)

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
