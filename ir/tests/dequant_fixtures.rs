//! Every reference dequantizer against `gguf.quants` (fixtures from `scripts/gen_quant_fixtures.py`), bit for bit.

use kiln_ir::dequant::dequantize;
use kiln_ir::QuantFormat;
use std::path::Path;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn dequantizers_match_gguf_package_bitwise() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quants");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("fixture dir") {
        let path = entry.unwrap().path();
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = fixture["format"].as_str().unwrap();
        let format =
            QuantFormat::from_name(name).unwrap_or_else(|| panic!("unknown format {name}"));
        let blocks = unhex(fixture["blocks_hex"].as_str().unwrap());
        let expected: Vec<u32> = unhex(fixture["expected_f32_le_hex"].as_str().unwrap())
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut got = vec![0f32; expected.len()];
        dequantize(format, &blocks, &mut got);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(
                g.to_bits(),
                *e,
                "{name}: element {i}: kiln {g} vs gguf {}",
                f32::from_bits(*e)
            );
        }
        checked.push(format);
    }
    checked.sort();
    let mut all: Vec<_> = kiln_ir::format::FORMATS.iter().map(|f| f.format).collect();
    all.retain(|f| !matches!(f, QuantFormat::F32 | QuantFormat::Q8_K)); // see the generator's docstring
    all.sort();
    assert_eq!(checked, all, "a format has no fixture");
}
