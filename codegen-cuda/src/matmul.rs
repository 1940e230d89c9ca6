//! Matmul, activation quantization and embedding kernels: the weight stream.
//!
//! A matmul block holds `MATMUL_WARPS` warps, one output row each, and `MATMUL_TOKENS` tokens. A warp's lanes
//! take the row's 32-value sub-blocks in turn, decode each once, and meet it with every token's activation codes
//! in `dp4a`; the partial sums are reduced across the warp and the epilogue writes the finished values.

use crate::formats::{decode_name, helper, Helper};
use kiln_ir::cpu_abi::{ActFormat, Epilogue, FloatRound};
use kiln_ir::cuda_abi::{MATMUL_TOKENS, MATMUL_WARPS, ROW_THREADS};
use kiln_ir::layout::Layout;
use kiln_ir::QuantFormat;

/// The C expression that finishes one output value `v` (and `v2`, the up projection of a gated epilogue) of token
/// `t`, row `r`. Each activation is a prelude function of the same name.
fn epilogue_expr(epilogue: Epilogue) -> String {
    match epilogue {
        Epilogue::Store => "v".into(),
        Epilogue::Bias => "v + extra[r]".into(),
        Epilogue::Residual => "extra[(u64)t * extra_stride + r] + v".into(),
        Epilogue::Gated(act) => format!("{}(v) * v2", act.name()),
    }
}

/// The C index of block `blk` of row `r` among the stored blocks (`Layout::block_index`).
fn block_index(layout: Layout, per_row: usize) -> String {
    let il = layout.interleave;
    if il == 1 {
        format!("(u64)r * {per_row} + blk")
    } else {
        format!("((u64)(r / {il}) * {per_row} + blk) * {il} + r % {il}")
    }
}

pub fn matmul(
    name: &str,
    format: QuantFormat,
    layout: Layout,
    k: usize,
    epilogue: Epilogue,
) -> (Vec<Helper>, String) {
    let gated = matches!(epilogue, Epilogue::Gated(_));
    let act = ActFormat::for_weight(format);
    let x_row = act.row_bytes(k);
    let (warps, tokens) = (MATMUL_WARPS, MATMUL_TOKENS);
    let finish = epilogue_expr(epilogue);
    let helper = helper(format, layout);
    let decode = decode_name(format, layout);
    // I2_S: the whole tensor's scale lies after its `n` rows.
    let (tensor_scales, scaled, scaled2) = if format.tensor_trailer_bytes() > 0 {
        let rows_bytes = format!(
            "(u64)n * {}",
            layout.block_bytes(format) * k / format.block_elems()
        );
        (
            format!(
                "    const float ws = ld_f32(w + {rows_bytes});\n    const float ws2 = {};\n",
                if gated {
                    format!("ld_f32(w2 + {rows_bytes})")
                } else {
                    "1.0f".into()
                }
            ),
            " * ws",
            " * ws2",
        )
    } else {
        (String::new(), "", "")
    };
    let (second_acc, second_reduce, second_value) = if gated {
        (
            "    float acc2[TT];\n#pragma unroll\n    for (int i = 0; i < TT; i++) acc2[i] = 0.0f;\n",
            "        acc2[i] = warp_sum(acc2[i]);\n",
            format!("            const float v2 = acc2[i]{scaled2};\n"),
        )
    } else {
        ("", "", String::new())
    };
    let body = if format.is_float() {
        // Plain floats: a lane takes 32 consecutive values of the row; activations are f32 (rounded to the
        // weight's precision by the quantizer).
        let index = block_index(layout, k);
        let second = if gated {
            "                acc2[i] += load(w2, at) * xv;\n"
        } else {
            ""
        };
        format!(
            "    for (int u = lane; u < {units}; u += 32) {{\n\
             #pragma unroll 4\n        for (int e = 0; e < 32; e++) {{\n            const u64 blk = 32 * (u64)u + e;\n            \
             const u64 at = {index};\n            const float wv = load(w, at);\n#pragma unroll\n            \
             for (int i = 0; i < TT; i++) {{\n                if (t0 + i >= tokens) break;\n                \
             const float xv = ((const float*)(x + (u64)(t0 + i) * {x_row}))[blk];\n                acc[i] += wv * xv;\n{second}            }}\n        }}\n    }}\n",
            units = k / 32,
        )
        .replace("load(", &format!("{decode}("))
    } else {
        let per_row = k / format.block_elems();
        let subs = format.block_elems() / 32;
        let index = block_index(layout, per_row);
        let block_bytes = layout.block_bytes(format);
        let (codes_at, sums_at, act_bytes) =
            (act.codes_at(), ActFormat::SUMS_AT, act.block_bytes());
        let second_decode = if gated {
            format!("        const Codes32 c2 = {decode}(w2 + at, sub);\n")
        } else {
            String::new()
        };
        let second_dot = if gated {
            "                acc2[i] += dot_codes(c2, xc, dx, s[0], s[1]);\n"
        } else {
            ""
        };
        format!(
            "    for (int u = lane; u < {units}; u += 32) {{\n        const int blk = u / {subs}, sub = u % {subs};\n        \
             const u64 at = ({index}) * {block_bytes};\n        const Codes32 c = {decode}(w + at, sub);\n{second_decode}\
             #pragma unroll\n        for (int i = 0; i < TT; i++) {{\n            if (t0 + i >= tokens) break;\n            \
             const u8* xb = x + (u64)(t0 + i) * {x_row} + (u64)blk * {act_bytes};\n            const float dx = ld_f32(xb);\n            \
             const i16* s = (const i16*)(xb + {sums_at}) + 2 * sub;\n            const u8* xc = xb + {codes_at} + 32 * sub;\n            \
             acc[i] += dot_codes(c, xc, dx, s[0], s[1]);\n{second_dot}        }}\n    }}\n",
            units = k / 32,
        )
    };
    let code = format!(
        "// out[t, r] = {finish} over rows of {format} ({layout}) weights, k = {k}, activations {act}.\n\
         extern \"C\" __global__ void __launch_bounds__({threads}) {name}(u64 w_, u64 w2_, u64 x_, u64 out_, u64 out_stride,\n        \
         u64 extra_, u64 extra_stride, int n, int tokens) {{\n    \
         const u8* w = (const u8*)w_;\n    const u8* w2 = (const u8*)w2_;\n    const u8* x = (const u8*)x_;\n    \
         float* out = (float*)out_;\n    const float* extra = (const float*)extra_;\n    (void)w2; (void)extra; (void)extra_stride;\n    \
         const int TT = {tokens};\n    const int lane = threadIdx.x & 31;\n    const int r = blockIdx.x * {warps} + (threadIdx.x >> 5);\n    \
         if (r >= n) return;\n{tensor_scales}    const int t0 = blockIdx.y * TT;\n    float acc[TT];\n#pragma unroll\n    \
         for (int i = 0; i < TT; i++) acc[i] = 0.0f;\n{second_acc}{body}#pragma unroll\n    for (int i = 0; i < TT; i++) {{\n        \
         acc[i] = warp_sum(acc[i]);\n{second_reduce}    }}\n#pragma unroll\n    for (int i = 0; i < TT; i++) {{\n        \
         const int t = t0 + i;\n        if (lane == i && t < tokens) {{\n            const float v = acc[i]{scaled};\n{second_value}            \
         out[(u64)t * out_stride + r] = {finish};\n        }}\n    }}\n}}\n",
        act = act.name(),
        threads = warps * 32,
    );
    (vec![helper], code)
}

/// Rounds (and with `norm`, RMS-normalizes) rows of `k` f32 into `act` blocks, as the CPU quantizer does.
pub fn quantize(name: &str, act: ActFormat, k: usize, norm: bool) -> String {
    let threads = ROW_THREADS;
    let x_row = act.row_bytes(k);
    let prologue = if norm {
        format!(
            "    // RMSNorm prologue: the sum of squares in f64, as ggml sums it.\n    double ss = 0.0;\n    \
             for (int i = threadIdx.x; i < {k}; i += blockDim.x) {{ const double v = x[i]; ss += v * v; }}\n    \
             ss = block_sum_f64(ss);\n    const float scale = 1.0f / sqrtf((float)(ss / {k}.0) + eps);\n    \
             #define VALUE(i) ((x[i] * scale) * gain[i])\n"
        )
    } else {
        "    (void)gain; (void)eps;\n    #define VALUE(i) (x[i])\n".to_string()
    };
    let body = match act {
        ActFormat::Q8_0 => format!(
            "    // ggml's quantize_row_q8_0: d = max|x| / 127 (as f16), q = round(x * 127 / max|x|), ties to even.\n    \
             const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;\n    \
             for (int blk = warp; blk < {blocks}; blk += blockDim.x >> 5) {{\n        \
             const float v = VALUE(32 * blk + lane);\n        const float amax = warp_max(fabsf(v));\n        \
             const float d = round_f16(amax / 127.0f);\n        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;\n        \
             const int q = __float2int_rn(v * id);\n        int s = q;\n        \
             for (int o = 1; o < 16; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);\n        \
             const int total = s + __shfl_xor_sync(0xffffffffu, s, 16);\n        \
             u8* ob = out + {block_bytes} * blk;\n        if (lane == 0) {{ *(float*)ob = d; *(float*)(ob + {scaled_at}) = d * (float)total; }}\n        \
             if ((lane & 15) == 0) ((i16*)(ob + 4))[lane >> 4] = (i16)s;\n        ob[{codes_at} + lane] = (u8)(i8)q;\n    }}\n",
            blocks = k / 32,
            block_bytes = act.block_bytes(),
            codes_at = act.codes_at(),
            scaled_at = act.scaled_sum_at().expect("Q8_0 blocks keep d * sum"),
        ),
        ActFormat::Q8K => format!(
            "    // ggml's quantize_row_q8_K: the value of largest magnitude maps to -127, q = min(round(-127 x / max), 127).\n    \
             const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;\n    \
             for (int blk = warp; blk < {blocks}; blk += blockDim.x >> 5) {{\n        \
             float v[8];\n        float hi = -3.4e38f, lo = 3.4e38f;\n        \
             for (int j = 0; j < 8; j++) {{ v[j] = VALUE(256 * blk + 8 * lane + j); hi = fmaxf(hi, v[j]); lo = fminf(lo, v[j]); }}\n        \
             hi = warp_max(hi);\n        lo = warp_min(lo);\n        const float max = -lo > hi ? lo : hi;\n        \
             const float iscale = max != 0.0f ? -127.0f / max : 0.0f;\n        const float d = max != 0.0f ? 1.0f / iscale : 0.0f;\n        \
             u8* ob = out + {block_bytes} * blk;\n        int s = 0;\n        for (int j = 0; j < 8; j++) {{\n            \
             const int q = __float2int_rn(fminf(rintf(iscale * v[j]), 127.0f));\n            s += q;\n            \
             ob[{codes_at} + 8 * lane + j] = (u8)(i8)q;\n        }}\n        s += __shfl_xor_sync(0xffffffffu, s, 1);\n        \
             if (lane == 0) *(float*)ob = d;\n        if ((lane & 1) == 0) ((i16*)(ob + 4))[lane >> 1] = (i16)s;\n    }}\n",
            blocks = k / 256,
            block_bytes = act.block_bytes(),
            codes_at = act.codes_at(),
        ),
        ActFormat::I8Row => format!(
            "    // BitNet's per-token int8: d = max|x| / 127 over the row, q = round(x * 127 / max|x|), ties to even.\n    \
             float m = 0.0f;\n    for (int i = threadIdx.x; i < {k}; i += blockDim.x) m = fmaxf(m, fabsf(VALUE(i)));\n    \
             const float amax = block_max(m);\n    const float d = amax / 127.0f;\n    \
             const float id = amax != 0.0f ? 127.0f / amax : 0.0f;\n    \
             const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;\n    \
             for (int blk = warp; blk < {blocks}; blk += blockDim.x >> 5) {{\n        \
             u8* ob = out + {block_bytes} * blk;\n        if (lane == 0) *(float*)ob = d;\n        \
             for (int j = 0; j < 4; j++) {{\n            \
             const int q = __float2int_rn(VALUE(128 * blk + 32 * j + lane) * id);\n            int s = q;\n            \
             for (int o = 1; o < 16; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);\n            \
             if ((lane & 15) == 0) ((i16*)(ob + 4))[2 * j + (lane >> 4)] = (i16)s;\n            \
             ob[{codes_at} + 32 * j + lane] = (u8)(i8)q;\n        }}\n    }}\n",
            blocks = k / 128,
            block_bytes = act.block_bytes(),
            codes_at = act.codes_at(),
        ),
        ActFormat::F32 { round } => {
            let rounded = match round {
                FloatRound::None => "VALUE(i)",
                FloatRound::F16 => "round_f16(VALUE(i))",
                FloatRound::BF16 => "round_bf16(VALUE(i))",
            };
            format!(
                "    float* of = (float*)out;\n    for (int i = threadIdx.x; i < {k}; i += blockDim.x) of[i] = {rounded};\n"
            )
        }
    };
    format!(
        "// Row-wise {norm}quantization of {k} values to {act}.\n\
         extern \"C\" __global__ void __launch_bounds__({threads}) {name}(u64 x_, u64 gain_, u64 out_, float eps) {{\n    \
         const float* x = (const float*)x_ + (u64)blockIdx.x * {k};\n    const float* gain = (const float*)gain_;\n    \
         u8* out = (u8*)out_ + (u64)blockIdx.x * {x_row};\n{prologue}{body}    #undef VALUE\n}}\n",
        norm = if norm { "RMS-normalized " } else { "" },
        act = act.name(),
    )
}

/// Rows of an embedding table, dequantized.
pub fn embed(name: &str, format: QuantFormat, layout: Layout, d: usize) -> (Vec<Helper>, String) {
    let helper = helper(format, layout);
    let decode = decode_name(format, layout);
    let body = if format.is_float() {
        let index = block_index(layout, d).replace("blk", "e");
        format!("    for (int e = threadIdx.x; e < {d}; e += blockDim.x) o[e] = {decode}(w, {index});\n")
    } else {
        let per_row = d / format.block_elems();
        let subs = format.block_elems() / 32;
        let index = block_index(layout, per_row);
        format!(
            "    for (int u = threadIdx.x; u < {units}; u += blockDim.x) {{\n        const int blk = u / {subs}, sub = u % {subs};\n        \
             const Codes32 c = {decode}(w + ({index}) * {block_bytes}, sub);\n        \
             for (int i = 0; i < 32; i++) o[32 * u + i] = code_value(c, i);\n    }}\n",
            units = d / 32,
            block_bytes = layout.block_bytes(format),
        )
    };
    let code = format!(
        "// Embedding rows of {format} ({layout}), {d} values each.\n\
         extern \"C\" __global__ void __launch_bounds__({ROW_THREADS}) {name}(u64 w_, u64 ids_, u64 out_) {{\n    \
         const u8* w = (const u8*)w_;\n    const u64 r = (u64)((const int*)ids_)[blockIdx.x];\n    \
         float* o = (float*)out_ + (u64)blockIdx.x * {d};\n{body}}}\n"
    );
    (vec![helper], code)
}
