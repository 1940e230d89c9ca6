//! `kiln quantize` on SmolLM2: the files it writes are checked with the `gguf` package (llama.cpp's Python
//! reader, `tests/quantize_check.py`), and kiln runs them: Q8_0 keeps SmolLM2's answer, and the two ternary
//! packings of the same digits give the same tokens, interpreted and compiled. I2_S, which the `gguf` package
//! does not know, is checked against the source's absmean digits with kiln's own reader.

mod common;

use kiln_ir::QuantFormat;
use kiln_runtime::plan::PlanFile;
use std::path::{Path, PathBuf};
use std::process::Command;

fn quantize(format: &str) -> Option<(PathBuf, PathBuf)> {
    common::quantized_smollm2(format)
}

/// Runs `tests/quantize_check.py`; skipped with a loud message without the `gguf` package, except in CI.
fn check_with_gguf_package(source: &Path, out: &Path, format: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/quantize_check.py");
    let run = Command::new("python3")
        .args([
            script,
            source.to_str().unwrap(),
            out.to_str().unwrap(),
            format,
        ])
        .output()
        .expect("python3 runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    // The script imports numpy before gguf (which depends on it): either missing means gguf is not installed.
    let missing = ["No module named 'gguf'", "No module named 'numpy'"];
    if missing.iter().any(|m| report.contains(m)) && std::env::var_os("CI").is_none() {
        eprintln!("\n!!!!!!!! SKIPPED: the `gguf` Python package is missing (pip install gguf) !!!!!!!!\n");
        return;
    }
    assert!(run.status.success(), "{report}");
    eprintln!("{report}");
}

fn greedy_ids(model: &Path, n: usize) -> Vec<u64> {
    let out = common::greedy_json(model, n, &[]);
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    common::ids(&value["ids"])
}

#[test]
fn q8_0_requantization_keeps_the_answer() {
    let Some((source, out)) = quantize("q8_0") else {
        return;
    };
    check_with_gguf_package(&source, &out, "q8_0");
    // " Paris" first, as from the Q4_1 original.
    assert_eq!(greedy_ids(&out, 1), [7042]);
}

#[test]
fn ternary_files_hold_absmean_digits_and_both_packings_run_alike() {
    let (Some((source, tq2)), Some((_, tq1))) = (quantize("tq2_0"), quantize("tq1_0")) else {
        return;
    };
    check_with_gguf_package(&source, &tq2, "tq2_0");
    check_with_gguf_package(&source, &tq1, "tq1_0");
    // The same digits and scales in two packings: the same tokens (nonsense: ternarizing a model trained in
    // full precision breaks it, but the files are valid models).
    assert_eq!(greedy_ids(&tq2, 6), greedy_ids(&tq1, 6));
    // Compiled for the CPU, the TQ1_0 file's matrices are stored as TQ2_0 (the same digits, converted exactly, for
    // the faster kernel), and both plans give the same tokens.
    let plans: Vec<PathBuf> = [&tq2, &tq1]
        .iter()
        .map(|gguf| common::compile(gguf, None))
        .collect();
    let formats = |plan: &Path| -> Vec<QuantFormat> {
        let plan = PlanFile::open(plan).unwrap();
        plan.weight_entries().iter().map(|w| w.format).collect()
    };
    assert_eq!(formats(&plans[0]), formats(&plans[1]));
    assert!(formats(&plans[1]).contains(&QuantFormat::TQ2_0));
    assert_eq!(greedy_ids(&plans[0], 6), greedy_ids(&plans[1], 6));
}

#[test]
fn an_unknown_or_unwritable_format_is_one_clear_error() {
    let Some(source) = common::model("smollm2") else {
        return;
    };
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("never.gguf");
    for (format, expected) in [
        (
            "q5_k",
            "kiln cannot write q5_k; it writes f32, f16, q8_0, q4_0, tq1_0, tq2_0, i2_s",
        ),
        ("q9_9", "`q9_9` is not a format kiln knows"),
    ] {
        let run = common::kiln(&[
            "quantize",
            source.to_str().unwrap(),
            "--to",
            format,
            "-o",
            out.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{format}");
        assert!(stderr.contains(expected), "{format}: {stderr}");
        assert!(!out.exists());
    }
}

#[test]
fn i2_s_holds_one_absmean_scale_per_tensor_and_its_kernel_agrees_with_the_reference() {
    use kiln_compiler::GgufFile;
    use kiln_ir::dequant::dequantize;
    use kiln_ir::QuantFormat;
    let Some((source, i2s)) = quantize("i2_s") else {
        return;
    };
    let (src, out) = (
        GgufFile::open(&source).unwrap(),
        GgufFile::open(&i2s).unwrap(),
    );
    let name = "blk.3.ffn_down.weight";
    let find = |g: &GgufFile| g.tensors().iter().find(|t| t.name == name).unwrap().clone();
    let (s, o) = (find(&src), find(&out));
    assert_eq!(o.format, QuantFormat::I2_S);
    // bitnet.cpp's size: n / 4 bytes of codes, then the f32 scale padded to 32 bytes.
    assert_eq!(o.size, o.elements() / 4 + 32);
    let mut x = vec![0f32; s.elements()];
    dequantize(s.format, src.tensor_data(&s), &mut x);
    let mut y = vec![0f32; o.elements()];
    dequantize(o.format, out.tensor_data(&o), &mut y);
    let scale = x.iter().map(|v| v.abs()).sum::<f32>() / x.len() as f32;
    for (a, b) in x.iter().zip(&y) {
        assert_eq!(*b, scale * (a / scale).round().clamp(-1.0, 1.0), "{a}");
    }
    // Compiled, the I2_S matmuls run the generated kernel (per-token int8 activations); interpreted, the reference
    // dot product. The model is nonsense and amplifies every rounding difference, but the first token holds.
    let plan = common::compile(&i2s, None);
    let inspect = common::kiln_ok(&["inspect", plan.to_str().unwrap()]);
    assert!(
        inspect.contains("i2_s[576, 1536] x4"),
        "the I2_S rows are not interleaved for the kernel:\n{inspect}"
    );
    let first = |extra: &[&str]| {
        let out = common::greedy_json(&plan, 1, extra);
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        let top = value["top_logits"][0].as_array().unwrap().clone();
        (common::ids(&value["ids"]), top[1].as_f64().unwrap())
    };
    let ((ids, logit), (ref_ids, ref_logit)) = (first(&[]), first(&["--reference"]));
    assert_eq!(ids, ref_ids);
    assert!((logit - ref_logit).abs() < 0.5, "{logit} vs {ref_logit}");
}

#[test]
fn tl1_and_tl2_hold_i2_s_digits_in_bitnet_cpp_tiles_and_compile_to_the_same_logits() {
    use kiln_compiler::GgufFile;
    use kiln_ir::tl::{self, Tiling};
    use kiln_ir::QuantFormat;
    let Some((_, i2s)) = quantize("i2_s") else {
        return;
    };
    let name = "blk.3.ffn_down.weight";
    let weights = |path: &Path| {
        let file = GgufFile::open(path).unwrap();
        let info = file.tensor(name).unwrap().clone();
        let mut y = vec![0f32; info.elements()];
        kiln_ir::dequant::dequantize(info.format, file.tensor_data(&info), &mut y);
        (file, info, y)
    };
    let (_, _, digits) = weights(&i2s);
    let logits = |gguf: &Path| {
        let plan = common::compile(gguf, None);
        let out = common::greedy_json(&plan, 4, &[]);
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        (common::ids(&value["ids"]), value["top_logits"].to_string())
    };
    let reference = logits(&i2s);
    for (format, name_of) in [(QuantFormat::TL1, "tl1"), (QuantFormat::TL2, "tl2")] {
        let (_, tiled) = quantize(name_of).unwrap();
        let (file, info, y) = weights(&tiled);
        assert_eq!(info.format, format);
        // The same absmean digits and scale as I2_S, in a file of bitnet.cpp's size for the format.
        assert_eq!(y, digits, "{format}");
        let (m, k) = (info.shape[0], info.shape[1]);
        assert_eq!(Some(info.size), tl::tensor_file_bytes(format, m, k));
        // The file holds the tiles kiln's tiling pass chose, recorded for the reader.
        let recorded = file.get(tl::TILING_KEY).and_then(|v| v.as_array()).unwrap();
        let recorded: Vec<u64> = recorded.iter().map(|v| v.as_u64().unwrap()).collect();
        let tilings = tl::parse_tilings(&recorded).unwrap();
        let chosen = Tiling::choose(format, m, k).unwrap();
        assert!(tilings.contains(&((m, k), chosen)), "{format}: {tilings:?}");
        // Compiled, their generated kernels (pshufb lookups, then the int8 dot product) give I2_S's exact sums.
        assert_eq!(logits(&tiled), reference, "{format}");
    }
}

/// A TL file as bitnet.cpp's converter writes it records no tiling (bitnet.cpp keeps it in the
/// `include/kernel_config.ini` its codegen scripts write): kiln refuses it with an error that names
/// `KILN_TL_CONFIG`, and reads it with that variable naming the config, to the same plan output as kiln's own file.
#[test]
fn tl_files_without_a_recorded_tiling_read_with_bitnet_cpp_kernel_config() {
    use kiln_compiler::GgufFile;
    use kiln_ir::tl;
    let Some((_, tiled)) = quantize("tl2") else {
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    // The same file without kiln's key: renamed in place (the same length, so every offset holds).
    let mut bytes = std::fs::read(&tiled).unwrap();
    let key = tl::TILING_KEY.as_bytes();
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at..at + key.len()].copy_from_slice(&b"kiln.xx.xxxxxxxxxxxx"[..key.len()]);
    let bitnet_cpp = dir.join("smollm2-tl2-untiled.gguf");
    std::fs::write(&bitnet_cpp, &bytes).unwrap();
    // The tilings as codegen_tl2.py writes them, through Python's ConfigParser (keys in lower case).
    let file = GgufFile::open(&tiled).unwrap();
    let recorded: Vec<u64> = file
        .get(tl::TILING_KEY)
        .and_then(|v| v.as_array())
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let ini: String = tl::parse_tilings(&recorded)
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, ((m, k), t))| {
            format!(
                "[Kernels_{i}]\nm = {m}\nk = {k}\nbm = {}\nbk = {}\nbmm = {}\n\n",
                t.rows, t.cols, t.block_rows
            )
        })
        .collect();
    let config = dir.join("kernel_config.ini");
    std::fs::write(&config, ini).unwrap();

    let compile = |config: Option<&Path>| {
        let plan = dir.join("smollm2-tl2-untiled.plan");
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args([
            "compile",
            bitnet_cpp.to_str().unwrap(),
            "-o",
            plan.to_str().unwrap(),
        ]);
        command.env_remove("KILN_TL_CONFIG");
        if let Some(config) = config {
            command.env("KILN_TL_CONFIG", config);
        }
        (command.output().unwrap(), plan)
    };
    let (refused, _) = compile(None);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("records no TL tiling") && stderr.contains("set KILN_TL_CONFIG"),
        "{stderr}"
    );
    let (read, plan) = compile(Some(&config));
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let own = common::compile(&tiled, Some(&dir.join("smollm2-tl2-own.plan")));
    assert_eq!(
        common::greedy_json(&plan, 4, &[]),
        common::greedy_json(&own, 4, &[])
    );
}
