//! Hand-made GGUF files, valid and malformed: each malformed one must give its exact error, never a panic.

use kiln_compiler::gguf::{GgufError, MetaValue};
use kiln_compiler::GgufFile;

/// Builds GGUF bytes field by field, so a test can break any one of them.
#[derive(Clone)]
struct Builder {
    version: u32,
    kvs: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
    alignment: usize,
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            kvs: Vec::new(),
            n_kv: 0,
            infos: Vec::new(),
            n_tensors: 0,
            data: Vec::new(),
            alignment: 32,
        }
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A key with a raw value: `type_id` then `value` bytes.
    fn kv_raw(mut self, key: &str, type_id: u32, value: &[u8]) -> Self {
        Self::string(&mut self.kvs, key);
        self.kvs.extend(type_id.to_le_bytes());
        self.kvs.extend(value);
        self.n_kv += 1;
        self
    }

    fn kv_str(self, key: &str, value: &str) -> Self {
        let mut v = Vec::new();
        Self::string(&mut v, value);
        self.kv_raw(key, 8, &v)
    }

    /// A tensor info with explicit fields; `data` is appended to the data section at `offset`.
    fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, offset: u64, data: &[u8]) -> Self {
        Self::string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(type_id.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        if !data.is_empty() {
            let end = offset as usize + data.len();
            if self.data.len() < end {
                self.data.resize(end, 0);
            }
            self.data[offset as usize..end].copy_from_slice(data);
        }
        self.n_tensors += 1;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kvs);
        out.extend(&self.infos);
        out.resize(out.len().div_ceil(self.alignment) * self.alignment, 0);
        out.extend(&self.data);
        out
    }
}

fn valid() -> Builder {
    let f32s: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    Builder::new()
        .kv_str("general.architecture", "llama")
        .kv_raw("answer", 4, &42u32.to_le_bytes())
        .tensor("a", &[4], 0, 0, &f32s)
        .tensor("b", &[2, 2], 0, 32, &f32s)
}

fn error_of(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("a malformed file was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn reads_a_valid_file() {
    let file = GgufFile::from_bytes(valid().bytes()).unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(
        file.get("general.architecture"),
        Some(&MetaValue::String("llama".into()))
    );
    assert_eq!(file.get("answer").and_then(|v| v.as_u64()), Some(42));
    let b = file.tensor("b").unwrap();
    assert_eq!((b.shape.clone(), b.size), (vec![2, 2], 16));
    assert_eq!(&file.tensor_data(b)[..4], &1.0f32.to_le_bytes());
}

#[test]
fn reads_version_2_and_nested_arrays() {
    // An array of two arrays of u8: [[1, 2], []].
    let mut nested = 9u32.to_le_bytes().to_vec(); // element type: array
    nested.extend(2u64.to_le_bytes());
    for items in [&[1u8, 2][..], &[][..]] {
        nested.extend(0u32.to_le_bytes()); // element type: u8
        nested.extend((items.len() as u64).to_le_bytes());
        nested.extend(items);
    }
    let mut b = valid().kv_raw("nested", 9, &nested);
    b.version = 2;
    let file = GgufFile::from_bytes(b.bytes()).unwrap();
    let outer = file.get("nested").unwrap().as_array().unwrap();
    assert_eq!(
        outer[0].as_array().unwrap(),
        &[MetaValue::U8(1), MetaValue::U8(2)]
    );
    assert!(outer[1].as_array().unwrap().is_empty());
}

#[test]
fn reads_i2_s_with_its_scale_trailer() {
    let mut data = vec![0x55u8; 32]; // 128 codes of 1: zeros
    data[0] = 0b10_00_01_01; // element 0: +1, element 32: -1
    data.extend(0.5f32.to_le_bytes());
    data.extend([0u8; 28]);
    let file = GgufFile::from_bytes(valid().tensor("t", &[128], 36, 64, &data).bytes()).unwrap();
    let t = file.tensor("t").unwrap();
    assert_eq!((t.format, t.size), (kiln_ir::QuantFormat::I2_S, 64));
    let mut y = vec![0f32; 128];
    kiln_ir::dequant::dequantize(t.format, file.tensor_data(t), &mut y);
    assert_eq!((y[0], y[32], y[1]), (0.5, -0.5, 0.0));
}

#[test]
fn honours_general_alignment() {
    let f32s: Vec<u8> = [1.0f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut b = Builder::new()
        .kv_raw("general.alignment", 4, &64u32.to_le_bytes())
        .tensor("t", &[4], 0, 64, &f32s);
    b.alignment = 64;
    let file = GgufFile::from_bytes(b.bytes()).unwrap();
    let t = file.tensor("t").unwrap();
    assert_eq!(file.alignment, 64);
    assert_eq!(file.tensor_data(t), &f32s[..]);
}

#[test]
fn malformed_files_give_precise_errors() {
    let good = valid().bytes();
    let header_end = 24; // magic, version, tensor count, kv count
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "malformed GGUF at byte 0: magic: needs 4 bytes, only 0 left (truncated file?)"),
        ("bad magic", b"GGML\x03\0\0\0".to_vec(), "not a GGUF file: magic is [71, 71, 77, 76] at byte 0, expected \"GGUF\""),
        ("version 1", { let mut b = valid(); b.version = 1; b.bytes() }, "unsupported GGUF version 1 at byte 4 (kiln reads versions 2 and 3)"),
        ("truncated header", good[..10].to_vec(), "malformed GGUF at byte 8: tensor_count: needs 8 bytes, only 2 left (truncated file?)"),
        ("absurd tensor count", { let mut b = good.clone(); b[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); b },
            "malformed GGUF at byte 8: tensor_count: count 18446744073709551615 cannot fit in the"),
        ("absurd kv count", { let mut b = good.clone(); b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes()); b },
            "malformed GGUF at byte 16: metadata_kv_count: count 1099511627776 cannot fit in the"),
        ("absurd string length", { let mut b = good.clone(); b[header_end..header_end + 8].copy_from_slice(&(1u64 << 50).to_le_bytes()); b },
            "malformed GGUF at byte 24: metadata key #0: count 1125899906842624 cannot fit in the"),
        ("unknown value type", valid().kv_raw("x", 77, &[]).bytes(), "x: unknown value type 77"),
        ("bad bool", valid().kv_raw("flag", 7, &[2]).bytes(), "flag: bool must be 0 or 1, is 2"),
        ("bad utf-8 value", valid().kv_raw("s", 8, &[1, 0, 0, 0, 0, 0, 0, 0, 0xff]).bytes(), "s: string is not valid UTF-8"),
        ("duplicate key", valid().kv_str("general.architecture", "again").bytes(), "metadata key `general.architecture`: duplicate key"),
        ("bad alignment", valid().kv_raw("general.alignment", 4, &48u32.to_le_bytes()).bytes(), "general.alignment: alignment must be a power of two up to 65536, is 48"),
        ("deep arrays", valid().kv_raw("deep", 9, &deep_array(20)).bytes(), "deep: arrays nested deeper than 8"),
        ("too many dims", valid().tensor("t", &[1, 1, 1, 1, 1], 0, 64, &[0; 4]).bytes(), "tensor `t` n_dims: must be 1..=4, is 5"),
        ("zero dim", valid().tensor("t", &[0], 0, 64, &[]).bytes(), "tensor `t` dim 0: must be positive, is 0"),
        ("unknown type", valid().tensor("t", &[4], 99, 64, &[0; 16]).bytes(), "tensor `t` type: unknown type id 99"),
        ("unsupported type", valid().tensor("t", &[32], 16, 64, &[0; 16]).bytes(), "tensor `t` type: type 16 (IQ2_XXS) is not supported"),
        ("partial block", valid().tensor("t", &[33], 2, 64, &[0; 18]).bytes(), "tensor `t` dims: [33] is not a whole number of q4_0 blocks of 32"),
        ("size overflow", valid().tensor("t", &[1 << 40, 1 << 40], 0, 64, &[]).bytes(), "or overflows"),
        // Found by the fuzzer: the byte count of one row overflowing (elements alone fit in usize).
        ("row bytes overflow", valid().tensor("t", &[1 << 62], 0, 64, &[]).bytes(), "[4611686018427387904] is not a whole number of f32 blocks of 1 or overflows"),
        ("misaligned offset", valid().tensor("t", &[4], 0, 65, &[0; 16]).bytes(), "tensor `t` offset: 65 is not a multiple of the alignment 32"),
        ("out of range", valid().tensor("t", &[1 << 20], 0, 64, &[]).bytes(), "tensor `t` data: 4194304 bytes at data offset 64 run past the end of the file"),
        // Found by the fuzzer: an offset near u64::MAX overflowed while reporting the error.
        ("huge offset", valid().tensor("t", &[4], 0, u64::MAX - 31, &[]).bytes(), "malformed GGUF at byte 18446744073709551615: tensor `t` data: 16 bytes at data offset 18446744073709551584 run past the end"),
        ("overlap", valid().tensor("t", &[4], 0, 32, &[]).bytes(), "overlaps tensor"),
        ("duplicate tensor", valid().tensor("a", &[4], 0, 64, &[0; 16]).bytes(), "tensor `a` name: duplicate tensor name"),
        ("truncated data", { let b = valid().bytes(); b[..b.len() - 1].to_vec() }, "tensor `b` data: 16 bytes at data offset 32 run past the end of the file (47 data bytes)"),
        // I2_S (id 36) carries its 32-byte scale trailer after the codes: 128 weights take 32 + 32 bytes, and a
        // tensor laid out without the trailer runs into the next one.
        ("i2_s without its trailer", valid().tensor("t", &[128], 36, 64, &[0x55; 32]).tensor("u", &[16], 0, 96, &[0; 64]).bytes(),
            "tensor `t` data: overlaps tensor `u` at data offset 96"),
        // TL1 and TL2 are read only with the tiling kiln records: bitnet.cpp keeps it outside the file, and upstream
        // gives 39 to MXFP4.
        ("tl2 or mxfp4", valid().tensor("t", &[32], 39, 64, &[0; 32]).bytes(), "type 39 is TL2 (bitnet.cpp) or MXFP4 (upstream), and this file records no TL tiling (`kiln.tl.tiling`)"),
        ("tl1 without tiling", valid().tensor("t", &[128, 32], 38, 64, &[0; 1056]).bytes(), "type 38 is TL1 (bitnet.cpp), and this file records no TL tiling"),
        ("tiling of another shape", valid().kv_raw("kiln.tl.tiling", 9, &u32_array(&[64, 128, 64, 128, 32])).tensor("t", &[128, 32], 38, 64, &[0; 1056]).bytes(),
            "tensor `t` dims: no TL tiling is given for a 32 x 128 matrix"),
        ("tiling that does not fit", valid().kv_raw("kiln.tl.tiling", 9, &u32_array(&[32, 128, 32, 100, 32])).tensor("t", &[128, 32], 38, 64, &[0; 1056]).bytes(),
            "the tiling BM 32 BK 100 bm 32 does not fit a 32 x 128 tl1 matrix"),
        ("tiling not in fives", valid().kv_raw("kiln.tl.tiling", 9, &u32_array(&[32, 128, 32])).tensor("t", &[128, 32], 38, 64, &[0; 1056]).bytes(),
            "kiln.tl.tiling: must be an array of unsigned integers, five per matrix shape"),
        ("tl1 vector", valid().kv_raw("kiln.tl.tiling", 9, &u32_array(&[32, 128, 32, 128, 32])).tensor("t", &[128], 38, 64, &[0; 64]).bytes(),
            "a tl1 tensor must be a matrix, is [128]"),
    ];
    for (what, bytes, want) in cases {
        let got = error_of(bytes);
        assert!(got.contains(want), "{what}:\n  got:  {got}\n  want: {want}");
    }
}

/// A GGUF array value of u32s.
fn u32_array(values: &[u32]) -> Vec<u8> {
    let mut out = 4u32.to_le_bytes().to_vec();
    out.extend((values.len() as u64).to_le_bytes());
    values.iter().for_each(|v| out.extend(v.to_le_bytes()));
    out
}

/// An array nested `depth` levels deep.
fn deep_array(depth: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..depth {
        out.extend(9u32.to_le_bytes());
        out.extend(1u64.to_le_bytes());
    }
    out
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let good = valid().bytes();
    for len in 0..good.len() {
        match GgufFile::from_bytes(good[..len].to_vec()) {
            Err(GgufError::Malformed { .. } | GgufError::BadMagic { .. }) => {}
            Err(other) => panic!("truncated to {len}: unexpected error {other}"),
            Ok(_) => panic!("truncated to {len} bytes was accepted"),
        }
    }
}

#[test]
fn missing_file_names_the_path() {
    let err = GgufFile::open("/nonexistent/model.gguf")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("cannot read /nonexistent/model.gguf: "),
        "{err}"
    );
}

/// Inputs the fuzzer once crashed on (kept in `tests/fixtures/fuzz-*.gguf`): each must now be a clean error.
#[test]
fn past_fuzz_findings_are_errors() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("fuzz-")
        {
            let err = GgufFile::open(&path)
                .err()
                .unwrap_or_else(|| panic!("{} was accepted", path.display()));
            assert!(
                matches!(err, GgufError::Malformed { .. }),
                "{}: {err}",
                path.display()
            );
            seen += 1;
        }
    }
    assert!(seen > 0);
}
