//! The Helm chart (`charts/kiln`) and the Dockerfile, checked offline by `tests/helm_chart.py`: strict lint, renders
//! with each values file and with the GPU Deployment, `kubernetes-validate --strict`, `checkov`, and assertions on
//! the rendered objects, against this build's `kiln serve --help` and a real server's `/metrics`.

mod common;

use std::process::Command;

#[test]
fn chart_renders_valid_secure_objects_that_match_the_binary() {
    let Some(plan) = common::smollm2_plan() else {
        return;
    };
    let server = common::Server::start(&[], plan.to_str().unwrap(), &[], &[]);
    let metrics = common::http_get(&server.metrics_url);
    drop(server);
    let scrape = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kiln-metrics-{}.txt", std::process::id()));
    std::fs::write(&scrape, metrics).unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/helm_chart.py");
    let out = Command::new("python3")
        .args([script, env!("CARGO_BIN_EXE_kiln"), scrape.to_str().unwrap()])
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_file(&scrape);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if report.contains("ModuleNotFoundError") && std::env::var_os("CI").is_none() {
        eprintln!(
            "\n!!!!!!!! SKIPPED: the chart checks need `pip install helm-python-sdk kubernetes-validate checkov` !!!!!!!!\n{report}"
        );
        return;
    }
    assert!(out.status.success(), "chart checks failed:\n{report}");
    eprintln!("{report}");
}
