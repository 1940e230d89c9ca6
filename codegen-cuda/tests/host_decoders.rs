//! The CUDA backend's format decoders, compiled for the host by the system C++ compiler and checked value for value
//! against kiln-ir's reference dequantizers: every block format in every layout the backend stores, no GPU needed.
//! `codes.cu` is plain C++ apart from two CUDA intrinsics, and the decoders' f16 conversion is inline PTX on the
//! device; the shim below gives the host all three.

// Shared with the matmul tests; this one needs only the random weights.
#[allow(dead_code)]
#[path = "../../codegen-cpu/tests/common/weights.rs"]
mod weights;

use kiln_codegen_cuda::{decoder, supports_format, CODES_PRELUDE};
use kiln_ir::dequant::dequantize_blocks;
use kiln_ir::layout::{f16_fields, Layout, Scales};
use kiln_ir::QuantFormat;
use rand::SeedableRng;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use weights::{random_weight, FORMATS};

/// What CUDA gives kernels for free, written for the host.
const SHIM: &str = r#"#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#define __device__
#define __forceinline__ inline
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
// Byte-wise a - b, each byte wrapping.
static inline unsigned __vsub4(unsigned a, unsigned b) {
    unsigned r = 0;
    for (int i = 0; i < 32; i += 8) r |= (((a >> i) - (b >> i)) & 0xFFu) << i;
    return r;
}
"#;

/// IEEE half to single, subnormals included (the device does this with `cvt.f32.f16`).
const HOST_F16: &str = r#"
static inline float f16_to_f32(u16 h) {
    const u32 sign = (u32)(h >> 15) << 31, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    if (exponent == 0) return (sign ? -1.0f : 1.0f) * std::ldexp((float)mantissa, -24);
    if (exponent == 31) return __uint_as_float(sign | 0x7F800000u | (mantissa << 13));
    return __uint_as_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}
"#;

/// The system C++ compiler; `None` (skipped loudly) without one, except in CI, where it must be there.
fn cxx() -> Option<&'static str> {
    let found = Command::new("c++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("c++");
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "no C++ compiler (`c++`): install g++"
    );
    eprintln!("\n!!!!!!!! SKIPPED: no C++ compiler (`c++`) to build the CUDA decoders for the host !!!!!!!!\n");
    None
}

/// The layouts the CUDA backend stores `format` in: GGUF's, and f32 scales where the format has f16 fields
/// (interleaving moves whole blocks, which the decoders never see).
fn layouts_of(format: QuantFormat) -> Vec<Layout> {
    let mut layouts = vec![Layout::GGUF];
    if !f16_fields(format).is_empty() {
        layouts.push(Layout {
            scales: Scales::F32,
            interleave: 1,
        });
    }
    layouts
}

/// One program holding every decoder: `decode N < blocks > values` runs decoder `N` over the stored blocks on
/// stdin and writes each block's values (`code_value` of every sub-block) to stdout as f32.
fn program(cases: &[(QuantFormat, Layout)]) -> String {
    let mut out = format!("{SHIM}{CODES_PRELUDE}{HOST_F16}");
    let mut table = String::new();
    for &(format, layout) in cases {
        let helper = decoder(format, layout);
        out.push_str(&helper.code);
        table.push_str(&format!(
            "    {{{}, {}, {}}},\n",
            helper.name,
            layout.block_bytes(format),
            format.block_elems() / 32
        ));
    }
    out.push_str(&format!(
        r#"
struct Decoder {{ Codes32 (*decode)(const u8*, int); size_t bytes; int subs; }};
static const Decoder decoders[] = {{
{table}}};

int main(int argc, char** argv) {{
    const Decoder& d = decoders[std::atoi(argv[1])];
    std::vector<u8> blocks;
    u8 buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, stdin)) > 0;) blocks.insert(blocks.end(), buf, buf + n);
    for (size_t at = 0; at + d.bytes <= blocks.size(); at += d.bytes) {{
        for (int sub = 0; sub < d.subs; sub++) {{
            const Codes32 c = d.decode(blocks.data() + at, sub);
            float values[32];
            for (int i = 0; i < 32; i++) values[i] = code_value(c, i);
            std::fwrite(values, sizeof(float), 32, stdout);
        }}
    }}
    return 0;
}}
"#
    ));
    out
}

#[test]
fn every_cuda_decoder_gives_the_reference_dequantizers_values_on_the_host() {
    let Some(cxx) = cxx() else {
        return;
    };
    let cases: Vec<(QuantFormat, Layout)> = FORMATS
        .into_iter()
        .filter(|&f| !f.is_float() && supports_format(f))
        .flat_map(|f| layouts_of(f).into_iter().map(move |l| (f, l)))
        .collect();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let source = dir.join("host_decoders.cpp");
    let binary = dir.join("host_decoders");
    std::fs::write(&source, program(&cases)).unwrap();
    let out = Command::new(cxx)
        .args(["-std=c++17", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("the C++ compiler runs");
    assert!(
        out.status.success(),
        "the CUDA decoders do not compile as C++ ({}): {}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let (rows, k) = (3, 1024);
    for (n, &(format, layout)) in cases.iter().enumerate() {
        let gguf = random_weight(&mut rng, format, rows, k);
        let trailer = format.tensor_trailer_bytes();
        let stored = layout.repack(format, &[rows, k], &gguf);
        let mut expected = vec![0f32; rows * k];
        dequantize_blocks(format, &gguf[..gguf.len() - trailer], &mut expected);

        let mut child = Command::new(&binary)
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let blocks = stored[..stored.len() - trailer].to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&blocks).unwrap());
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(
            out.status.success(),
            "{format} {layout}: the decoder failed"
        );
        let got: Vec<f32> = out
            .stdout
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got.len(), expected.len(), "{format} {layout}");
        // The decoders compute each value as `scale * code + minv`, the reference in each format's own order; the
        // two may round differently in the last bit, never more.
        let scale = expected.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(
                (g - e).abs() <= 1e-6 * scale,
                "{format} {layout}: value {i} (block {}, sub {}) is {g}, the reference {e}",
                i / format.block_elems(),
                i % format.block_elems() / 32
            );
        }
        eprintln!("{format} {layout}: {} values match", got.len());
    }
}
