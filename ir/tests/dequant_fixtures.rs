//! Every reference dequantizer against `gguf.quants` (fixtures from `scripts/gen_quant_fixtures.py`), bit for bit.

mod common;

use kiln_ir::dequant::dequantize;
use kiln_ir::QuantFormat;

#[test]
fn dequantizers_match_gguf_package_bitwise() {
    let fixtures = common::quant_fixtures();
    for f in &fixtures {
        let mut got = vec![0f32; f.expected_bits.len()];
        dequantize(f.format, &f.blocks, &mut got);
        for (i, (g, e)) in got.iter().zip(&f.expected_bits).enumerate() {
            assert_eq!(
                g.to_bits(),
                *e,
                "{}: element {i}: kiln {g} vs gguf {}",
                f.format,
                f32::from_bits(*e)
            );
        }
    }
    let checked: Vec<_> = fixtures.iter().map(|f| f.format).collect();
    let mut all: Vec<_> = kiln_ir::format::FORMATS.iter().map(|f| f.format).collect();
    // F32 and Q8_K: see the generator's docstring; the gguf package knows no I2_S (hand-checked in `dequant`) and
    // no TL1/TL2 (their files are checked against bitnet.cpp's converter in `tl_layout`).
    all.retain(|f| {
        !matches!(
            f,
            QuantFormat::F32
                | QuantFormat::Q8_K
                | QuantFormat::I2_S
                | QuantFormat::TL1
                | QuantFormat::TL2
        )
    });
    all.sort();
    assert_eq!(checked, all, "a format has no fixture");
}
