//! kiln's TL1/TL2 tiling against bitnet.cpp's converter: fixtures from `scripts/gen_tl_fixtures.py`, which runs
//! the converter's numpy reshapes on random ternary matrices.

use kiln_ir::format::TENSOR_SCALE_TRAILER;
use kiln_ir::tl::{self, Tiling};
use kiln_ir::QuantFormat;
use std::path::Path;

struct Fixture {
    name: String,
    format: QuantFormat,
    m: usize,
    k: usize,
    tiling: Tiling,
    weights: Vec<i8>,
    bytes: Vec<u8>,
}

fn fixtures() -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tl");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            let n = |key: &str| v[key].as_u64().unwrap() as usize;
            let tiling: Vec<usize> = v["tiling"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as usize)
                .collect();
            let hex = v["bytes"].as_str().unwrap();
            Fixture {
                name: path.file_name().unwrap().to_string_lossy().into_owned(),
                format: QuantFormat::from_name(v["format"].as_str().unwrap()).unwrap(),
                m: n("m"),
                k: n("k"),
                tiling: Tiling {
                    rows: tiling[0],
                    cols: tiling[1],
                    block_rows: tiling[2],
                },
                weights: v["weights"]
                    .as_str()
                    .unwrap()
                    .chars()
                    .map(|c| match c {
                        '-' => -1,
                        '0' => 0,
                        '+' => 1,
                        other => panic!("weight {other:?}"),
                    })
                    .collect(),
                bytes: (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                    .collect(),
            }
        })
        .collect()
}

#[test]
fn kiln_tiles_exactly_as_the_bitnet_cpp_converter() {
    let fixtures = fixtures();
    let formats: Vec<_> = fixtures.iter().map(|f| f.format).collect();
    assert!(formats.contains(&QuantFormat::TL1) && formats.contains(&QuantFormat::TL2));
    for f in &fixtures {
        assert!(
            f.tiling.fits(f.format, f.m, f.k),
            "{}: {}",
            f.name,
            f.tiling
        );
        let ours = tl::tile(f.format, f.tiling, f.m, f.k, &f.weights);
        // ggml rounds TL2's size up to 32 bytes where the converter's padding stops at the formula.
        let size = tl::tensor_file_bytes(f.format, f.m, f.k).unwrap() - TENSOR_SCALE_TRAILER;
        assert_eq!(ours.len(), size, "{}", f.name);
        assert_eq!(&ours[..f.bytes.len()], &f.bytes[..], "{}", f.name);
        assert!(ours[f.bytes.len()..].iter().all(|&b| b == 0), "{}", f.name);
        assert_eq!(
            tl::untile(f.format, f.tiling, f.m, f.k, &ours),
            f.weights,
            "{}",
            f.name
        );
    }
}
