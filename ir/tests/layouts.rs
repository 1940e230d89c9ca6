//! Every layout is lossless: repacked weights dequantize, row by row, to exactly what the GGUF bytes give.

mod common;

use kiln_ir::dequant::dequantize;
use kiln_ir::layout::{fields_finite, Layout, Scales};
use kiln_ir::weights::WeightView;
use kiln_ir::QuantFormat;

#[test]
fn repacked_rows_dequantize_exactly_as_gguf_rows() {
    let layouts = [
        Layout {
            scales: Scales::F32,
            interleave: 1,
        },
        Layout {
            scales: Scales::Gguf,
            interleave: 4,
        },
        Layout {
            scales: Scales::F32,
            interleave: 4,
        },
        Layout {
            scales: Scales::F32,
            interleave: 2,
        },
        Layout {
            scales: Scales::Grouped,
            interleave: 4,
        },
        Layout {
            scales: Scales::Grouped,
            interleave: 2,
        },
        Layout {
            scales: Scales::GroupedF16,
            interleave: 4,
        },
    ];
    let mut checked = 0;
    for fixture in common::quant_fixtures() {
        let (format, gguf) = (fixture.format, fixture.blocks);
        let blocks = gguf.len() / format.block_bytes();
        // The fixture's blocks as a [4, cols] matrix (all fixtures hold a multiple of 4 blocks).
        assert_eq!(blocks % 4, 0);
        let shape = [4, blocks / 4 * format.block_elems()];
        let plain = WeightView {
            format,
            layout: Layout::GGUF,
            shape: &shape,
            data: &gguf,
        };
        for layout in layouts {
            if !layout.fits(format, &shape) {
                let no_fields = kiln_ir::layout::f16_fields(format).is_empty();
                let planes_split = kiln_ir::layout::high_bits(format).is_some()
                    && !layout
                        .interleave
                        .is_multiple_of(kiln_ir::layout::PLANE_ROWS);
                assert!(
                    layout.scales != Scales::Gguf && (no_fields || planes_split),
                    "{format} {layout}"
                );
                continue;
            }
            let repacked = layout.repack(format, &shape, &gguf);
            assert_eq!(
                Some(repacked.len()),
                layout.stored_bytes(format, &shape),
                "{format} {layout}"
            );
            let view = WeightView {
                format,
                layout,
                shape: &shape,
                data: &repacked,
            };
            for r in 0..4 {
                let (mut want, mut got) = (vec![0f32; shape[1]], vec![0f32; shape[1]]);
                plain.dequantize_row(r, &mut want);
                view.dequantize_row(r, &mut got);
                let same = want
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{format} {layout}: row {r} differs");
            }
            checked += 1;
        }
        // And the plain view agrees with dequantizing everything at once.
        let mut all = vec![0f32; blocks * format.block_elems()];
        dequantize(format, &gguf, &mut all);
        let mut row0 = vec![0f32; shape[1]];
        plain.dequantize_row(0, &mut row0);
        assert_eq!(row0, all[..shape[1]]);
    }
    assert!(
        checked >= 40,
        "only {checked} format x layout pairs checked"
    );
}

#[test]
fn widened_block_puts_f32_scales_first() {
    // One Q4_1 block: d = 0.5, m = -1.0 (f16), then 16 bytes of codes.
    let mut block = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    block.extend(half::f16::from_f32(-1.0).to_le_bytes());
    block.extend(0u8..16);
    let layout = Layout {
        scales: Scales::F32,
        interleave: 1,
    };
    let stored = layout.repack(QuantFormat::Q4_1, &[32], &block);
    assert_eq!(stored.len(), 24);
    assert_eq!(&stored[0..4], &0.5f32.to_le_bytes());
    assert_eq!(&stored[4..8], &(-1.0f32).to_le_bytes());
    assert_eq!(&stored[8..], &block[4..]);
    assert_eq!(layout.to_string(), "f32s");
}

#[test]
fn grouped_block_puts_the_rows_f32_scales_first() {
    // Four rows of one Q4_1 block each: row r has d = r + 1, m = -r (f16), and codes all equal to r.
    let block = |r: u8| {
        let mut b = half::f16::from_f32(f32::from(r) + 1.0)
            .to_le_bytes()
            .to_vec();
        b.extend(half::f16::from_f32(-f32::from(r)).to_le_bytes());
        b.extend([r; 16]);
        b
    };
    let gguf: Vec<u8> = (0..4).flat_map(block).collect();
    let layout = Layout {
        scales: Scales::Grouped,
        interleave: 4,
    };
    let stored = layout.repack(QuantFormat::Q4_1, &[4, 32], &gguf);
    assert_eq!(stored.len(), 4 * 24);
    for r in 0..4u8 {
        let at = 4 * usize::from(r);
        let d = f32::from(r) + 1.0;
        assert_eq!(&stored[at..at + 4], &d.to_le_bytes(), "row {r}'s d");
        let m = -f32::from(r);
        assert_eq!(
            &stored[16 + at..16 + at + 4],
            &m.to_le_bytes(),
            "row {r}'s m"
        );
        let codes = 32 + 16 * usize::from(r);
        assert_eq!(
            &stored[codes..codes + 16],
            &block(r)[4..],
            "row {r}'s codes"
        );
    }
    assert_eq!(layout.to_string(), "f32g.x4");
    let per_row = Layout {
        scales: Scales::Grouped,
        interleave: 1,
    };
    assert!(
        !per_row.fits(QuantFormat::Q4_1, &[4, 32]),
        "grouped scales need a row group"
    );
}

#[test]
fn grouped_block_keeps_the_rows_fifth_bits_as_bit_planes() {
    // Four rows of one Q5_0 block each: row r has d = r + 1, fifth bits qh = 1 << (8 r + 3) | 1 << (16 + r)
    // (code 8r + 3 of the first half or code 16 + r of the second), and low codes all r.
    let qh = |r: u32| 1u32 << (8 * r + 3) | 1 << (16 + r);
    let block = |r: u8| {
        let mut b = half::f16::from_f32(f32::from(r) + 1.0)
            .to_le_bytes()
            .to_vec();
        b.extend(qh(u32::from(r)).to_le_bytes());
        b.extend([r * 0x11; 16]);
        b
    };
    let gguf: Vec<u8> = (0..4).flat_map(block).collect();
    let layout = Layout {
        scales: Scales::Grouped,
        interleave: 4,
    };
    let stored = layout.repack(QuantFormat::Q5_0, &[4, 32], &gguf);
    assert_eq!(
        stored.len(),
        4 * 24,
        "as many bytes as per-block f32 scales"
    );
    let group = layout.group_block(QuantFormat::Q5_0).expect("grouped");
    let (planes, _) = group.planes_at(0).expect("Q5_0 has fifth bits");
    assert_eq!(planes, 16, "the planes follow the four scales");
    for r in 0..4usize {
        assert_eq!(group.planes_at(r), Some((16, 2 * r as u8)));
        let at = group.field_at(0, r);
        assert_eq!(&stored[at..at + 4], &(r as f32 + 1.0).to_le_bytes());
        let codes = group.others_at(r);
        assert_eq!(codes, 32 + 16 * r, "row {r}'s low codes after the planes");
        assert_eq!(&stored[codes..codes + 16], &[r as u8 * 0x11; 16]);
    }
    // Byte i of the planes: bit 2r for row r's code i, bit 2r + 1 for its code 16 + i.
    for i in 0..16usize {
        let want = (0..4u32)
            .map(|r| {
                let first = u8::from(qh(r) >> i & 1 == 1) << (2 * r);
                let second = u8::from(qh(r) >> (16 + i) & 1 == 1) << (2 * r + 1);
                first | second
            })
            .fold(0, |a, b| a | b);
        assert_eq!(stored[planes + i], want, "plane byte {i}");
    }
    // Code 3 (row 0), code 19 (row 2: 8r + 3; row 3: 16 + r).
    assert_eq!(stored[planes + 3], 0b1010_0001);
    let mut restored = vec![0u8; QuantFormat::Q5_0.block_bytes()];
    for r in 0..4 {
        layout.read_block(QuantFormat::Q5_0, &stored, r, 0, 1, &mut restored);
        assert_eq!(restored, block(r as u8), "row {r} restored");
    }
    let pairs = Layout {
        scales: Scales::Grouped,
        interleave: 2,
    };
    assert!(
        !pairs.fits(QuantFormat::Q5_0, &[4, 32]),
        "a plane vector holds four rows"
    );
    assert!(pairs.fits(QuantFormat::Q4_0, &[4, 32]));
}

/// Kernels widen f16 scales kept in a plan (`Scales::GroupedF16`) exactly for finite values only, so the layout
/// pass asks `fields_finite` first: any infinite or NaN scale or minimum says no.
#[test]
fn fields_finite_finds_every_infinite_or_nan_field() {
    let mut blocks = vec![0u8; 3 * QuantFormat::Q4_1.block_bytes()];
    for (i, block) in blocks
        .chunks_exact_mut(QuantFormat::Q4_1.block_bytes())
        .enumerate()
    {
        let value = half::f16::from_f32(0.5 + i as f32);
        block[0..2].copy_from_slice(&value.to_le_bytes());
        block[2..4].copy_from_slice(&(-value).to_le_bytes());
    }
    assert!(fields_finite(QuantFormat::Q4_1, &blocks));
    for bad in [half::f16::INFINITY, half::f16::NEG_INFINITY, half::f16::NAN] {
        for at in [0, 2, 20, 22, 40, 42] {
            let mut blocks = blocks.clone();
            blocks[at..at + 2].copy_from_slice(&bad.to_le_bytes());
            assert!(
                !fields_finite(QuantFormat::Q4_1, &blocks),
                "{bad} at byte {at}"
            );
        }
    }
    // Subnormal and largest finite values widen exactly.
    let mut edge = blocks.clone();
    edge[0..2].copy_from_slice(&half::f16::from_bits(1).to_le_bytes());
    edge[20..22].copy_from_slice(&half::f16::MAX.to_le_bytes());
    assert!(fields_finite(QuantFormat::Q4_1, &edge));
}
