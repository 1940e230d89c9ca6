//! The quantization fixtures written by `scripts/gen_quant_fixtures.py` (from the `gguf` package).
#![allow(dead_code)] // each test binary reads the fields it needs

use kiln_ir::QuantFormat;
use std::path::Path;

pub struct Fixture {
    pub format: QuantFormat,
    /// Whole blocks in GGUF layout.
    pub blocks: Vec<u8>,
    /// What `gguf.quants.dequantize` makes of them, as f32 bit patterns.
    pub expected_bits: Vec<u32>,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

pub fn quant_fixtures() -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quants");
    let mut fixtures: Vec<Fixture> = std::fs::read_dir(dir)
        .expect("fixture dir")
        .map(|entry| {
            let path = entry.expect("dir entry").path();
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
            let name = json["format"].as_str().expect("format");
            Fixture {
                format: QuantFormat::from_name(name)
                    .unwrap_or_else(|| panic!("unknown format {name}")),
                blocks: unhex(json["blocks_hex"].as_str().expect("blocks")),
                expected_bits: unhex(json["expected_f32_le_hex"].as_str().expect("expected"))
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            }
        })
        .collect();
    fixtures.sort_by_key(|f| f.format);
    fixtures
}
