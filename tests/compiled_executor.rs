//! The CPU executor running a plan's generated code against the reference interpreter on the same plan: logits
//! of a prefill and of decode steps after it, on every real model.

mod common;

use kiln_runtime::plan::PlanFile;
use kiln_runtime::{CpuExecutor, Engine, ReferenceExecutor};
use std::path::PathBuf;

fn compile(name: &str) -> Option<PathBuf> {
    let gguf = common::model(name)?;
    let plan = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-exec.plan"));
    common::kiln_ok(&[
        "compile",
        gguf.to_str().unwrap(),
        "-o",
        plan.to_str().unwrap(),
    ]);
    Some(plan)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Prefill of a prompt, then decode steps feeding the reference's greedy choice to both; returns the largest
/// logit difference of each step.
fn compare(name: &str, prompt: &[u32], steps: usize) -> Vec<f32> {
    let Some(path) = compile(name) else {
        return Vec::new();
    };
    let plan = PlanFile::open(&path).unwrap();
    let mut reference = ReferenceExecutor::new(plan.graph.clone(), &plan, 256).unwrap();
    let mut compiled = CpuExecutor::new(&plan, 2, 256).unwrap();
    assert_eq!(
        compiled.fallbacks(),
        0,
        "{name}: every launch has generated code"
    );
    let mut diffs = Vec::new();
    let (mut tokens, mut start) = (prompt.to_vec(), 0);
    for _ in 0..steps {
        let r = reference.forward(&tokens, start).unwrap();
        let c = compiled.forward(&tokens, start).unwrap();
        eprintln!(
            "ref {:?}\ncpu {:?} nan {}",
            &r.last()[..4],
            &c.last()[..4],
            c.data.iter().filter(|v| v.is_nan()).count()
        );
        diffs.push(max_diff(&r.data, &c.data));
        start += tokens.len();
        let last = r.last();
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap();
        tokens = vec![next as u32];
    }
    diffs
}

#[test]
fn smollm2_compiled_logits_match_the_reference() {
    let diffs = compare("smollm2", &[504, 3575, 282, 4649, 314], 6);
    eprintln!("smollm2 max |logit difference| per step: {diffs:?}");
    assert!(diffs.iter().all(|&d| d < 0.05), "{diffs:?}");
}
