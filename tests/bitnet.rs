//! The `bitnet` architecture end to end on a synthetic BitNet b1.58 model (`common::bitnet`): it round-trips through
//! `kiln quantize --to i2_s`, `kiln compile` and `kiln run`, and the compiled plan (generated I2_S kernels,
//! per-token int8 activations, fused sub-norms and squared-ReLU gate) follows the reference interpreter.

mod common;

use kiln_compiler::GgufFile;
use kiln_ir::QuantFormat;
use std::path::{Path, PathBuf};

/// `kiln run --json` greedy on the reference prompt: (ids, the first step's top logits).
fn greedy(path: &Path, extra: &[&str]) -> (Vec<u64>, Vec<(u64, f64)>) {
    let out = common::greedy_json(path, 12, extra);
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    let top = value["top_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    (common::ids(&value["ids"]), top)
}

fn i2_s_model() -> Option<(PathBuf, PathBuf)> {
    let source = common::bitnet::synthetic_bitnet()?;
    let out = source.with_file_name("bitnet-synthetic-i2_s.gguf");
    common::quantize(&source, "i2_s", &out);
    Some((source, out))
}

#[test]
fn a_bitnet_model_round_trips_through_quantize_compile_and_run() {
    let Some((source, i2s)) = i2_s_model() else {
        return;
    };
    // Every projection becomes I2_S; the embeddings (the tied LM head) and the norms stay.
    let gguf = GgufFile::open(&i2s).unwrap();
    let formats = |suffix: &str| -> Vec<QuantFormat> {
        gguf.tensors()
            .iter()
            .filter(|t| t.name.ends_with(suffix))
            .map(|t| t.format)
            .collect()
    };
    for projection in [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ] {
        assert_eq!(
            formats(&format!("{projection}.weight")),
            [QuantFormat::I2_S; 2],
            "{projection}"
        );
    }
    assert_eq!(formats("token_embd.weight"), [QuantFormat::F16]);

    let plan = common::compile(&i2s, None);
    // Every launch has generated code: the ternary matmuls, the F16 LM head (plain-float matrices keep the GGUF
    // layout their kernels read) and the F16 embedding lookup.
    let run = common::kiln(&["run", plan.to_str().unwrap(), "-p", "hi", "-n", "1"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success() && !stderr.contains("lacks generated code"),
        "{stderr}"
    );
    let inspect = common::kiln_ok(&["inspect", plan.to_str().unwrap()]);
    for want in [
        "(bitnet)",
        "act=relu_sqr",
        "i2_s[256, 128] x4",
        "i2_s[128, 256] x4",
    ] {
        assert!(
            inspect.contains(want),
            "`kiln inspect` lacks {want:?}:\n{inspect}"
        );
    }

    // The ternary digits survive quantization exactly (only the scale moves to the absmean), so the F32 source,
    // the I2_S file interpreted, the plan's generated code and the plan on the reference interpreter all run
    // the same model up to rounding: the same greedy tokens, logits within a small tolerance.
    let (ids, top) = greedy(&plan, &[]);
    for (what, (other_ids, other_top)) in [
        (
            "plan on the reference interpreter",
            greedy(&plan, &["--reference"]),
        ),
        ("I2_S GGUF interpreted", greedy(&i2s, &[])),
    ] {
        assert_eq!(ids, other_ids, "{what}");
        for ((id, logit), (other_id, other_logit)) in top.iter().zip(&other_top) {
            assert_eq!(id, other_id, "{what}: top-5 order");
            assert!(
                (logit - other_logit).abs() < 0.05,
                "{what}: {logit} vs {other_logit}"
            );
        }
    }
    // The source's scales are the digits' magnitudes, not their absmeans: a different model, same machinery.
    let (source_ids, _) = greedy(&source, &[]);
    assert_eq!(source_ids.len(), ids.len());
}

/// RoPE over half of each head (`rope.dimension_count` 16 of 32), as phi-style models rotate: the compiled plan
/// (the executor rotating the prompt's tokens in pieces, each from its own row of the angle table) follows the
/// reference interpreter.
#[test]
fn a_partial_rotary_model_runs_compiled_as_interpreted() {
    let source = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bitnet-partial-rope.gguf");
    let shape = common::bitnet::Shape {
        rope_dims: 16,
        ..common::bitnet::SMALL
    };
    if common::bitnet::write_synthetic_bitnet(shape, &source).is_none() {
        return;
    }
    let plan = common::compile(&source, None);
    let (ids, top) = greedy(&plan, &[]);
    let (reference_ids, reference_top) = greedy(&plan, &["--reference"]);
    assert_eq!(ids, reference_ids);
    for ((id, logit), (other_id, other_logit)) in top.iter().zip(&reference_top) {
        assert_eq!(id, other_id, "top-5 order");
        assert!(
            (logit - other_logit).abs() < 0.05,
            "{logit} vs {other_logit}"
        );
    }
}
