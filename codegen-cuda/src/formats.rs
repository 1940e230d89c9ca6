//! Per-format weight decoding in CUDA C: one `decode_<format>_<layout>(block, sub)` per (format, layout) that
//! yields 32 values of a block as signed byte codes with their scales (`Codes32` in the prelude), and one
//! `load_<format>_<layout>(w, i)` per plain-float format. Field offsets come from the layout, so the same
//! template serves GGUF blocks and blocks with f32 scales.

use kiln_ir::layout::{f16_fields, Layout, Scales};
use kiln_ir::{tl, QuantFormat};

/// A block format's C helpers, by name.
pub struct Helper {
    pub name: String,
    pub code: String,
}

/// Formats the CUDA backend has kernels for.
pub fn supported(format: QuantFormat) -> bool {
    use QuantFormat::*;
    matches!(
        format,
        F32 | F16
            | BF16
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | Q4_K
            | Q5_K
            | Q6_K
            | TQ2_0
            | TQ1_0
            | I2_S
            | TL1
            | TL2
    )
}

/// Where a block's fields lie in a layout: f16 fields become f32 at the front with `Scales::F32`. (Grouped scales
/// are the CPU kernels' alone: `supports` refuses them.)
struct Fields {
    format: QuantFormat,
    layout: Layout,
}

impl Fields {
    /// The C expression of f16 field `k` (by index among the format's f16 fields) of the block at `b`.
    fn scale(&self, k: usize) -> String {
        if self.layout.scales == Scales::F32 {
            format!("ld_f32(b + {})", 4 * k)
        } else {
            format!("f16_to_f32(ld_u16(b + {}))", f16_fields(self.format)[k])
        }
    }

    /// Where byte `gguf_offset` (outside the f16 fields) of a GGUF block lies in this layout.
    fn byte(&self, gguf_offset: usize) -> usize {
        if self.layout.scales != Scales::F32 {
            return gguf_offset;
        }
        let fields = f16_fields(self.format);
        let before = fields.iter().filter(|&&f| f < gguf_offset).count();
        4 * fields.len() + gguf_offset - 2 * before
    }

    /// The 32-bit load for this layout: aligned when every stored block and field is 4-byte aligned.
    fn load(&self) -> &'static str {
        if self.layout.block_bytes(self.format).is_multiple_of(4)
            && self.layout.scales == Scales::F32
        {
            "ld_a32"
        } else {
            "ld_u32"
        }
    }
}

/// The helper name that decodes `format` blocks in `layout`.
pub fn decode_name(format: QuantFormat, layout: Layout) -> String {
    let prefix = if format.is_float() { "load" } else { "decode" };
    format!("{prefix}_{format}_{}", layout.to_string().replace('.', "_"))
}

/// The C helper for `format` in `layout`: `Codes32 decode_..(const u8* b, int sub)` for block formats,
/// `float load_..(const u8* w, u64 i)` (element `i` of the stored array) for plain floats.
pub fn helper(format: QuantFormat, layout: Layout) -> Helper {
    let name = decode_name(format, layout);
    let code = match format {
        QuantFormat::F32 => format!(
            "__device__ __forceinline__ float {name}(const u8* w, u64 i) {{ return ld_f32(w + 4 * i); }}\n"
        ),
        QuantFormat::F16 => format!(
            "__device__ __forceinline__ float {name}(const u8* w, u64 i) {{ return f16_to_f32(ld_u16(w + 2 * i)); }}\n"
        ),
        QuantFormat::BF16 => format!(
            "__device__ __forceinline__ float {name}(const u8* w, u64 i) {{ return bf16_to_f32(ld_u16(w + 2 * i)); }}\n"
        ),
        _ => {
            let body = decode_body(&Fields { format, layout });
            format!(
                "// {format} ({layout}): 32 values of the block at `b`, sub-block `sub` of {per}.\n\
                 __device__ __forceinline__ Codes32 {name}(const u8* b, int sub) {{\n    Codes32 c;\n{body}    return c;\n}}\n",
                per = format.block_elems() / 32,
            )
        }
    };
    Helper { name, code }
}

/// The statements that fill `c` for one block format.
fn decode_body(f: &Fields) -> String {
    let ld = f.load();
    if f.format == QuantFormat::I2_S {
        // No block scale at all.
        return format!(
            "    // bitnet.cpp's packing: byte j holds elements j, j + 32, j + 64, j + 96 in bits 7:6, 5:4, 3:2, 1:0 (codes\n    \
             // 0, 1, 2 for -1, 0, +1). The tensor's scale is applied to the finished row sum by the matmul.\n    \
             const int shift = 6 - 2 * sub;\n    \
             for (int i = 0; i < 8; i++) c.q[i] = __vsub4(({ld}(b + 4 * i) >> shift) & 0x03030303u, 0x01010101u);\n    \
             c.scale[0] = c.scale[1] = 1.0f;\n    c.minv = 0.0f;\n"
        );
    }
    if matches!(f.format, QuantFormat::TL1 | QuantFormat::TL2) {
        return tl_body(f.format);
    }
    let d = f.scale(0);
    match f.format {
        QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
            let qs = f.byte(if f.format == QuantFormat::Q4_0 { 2 } else { 4 });
            let (fix, minv) = if f.format == QuantFormat::Q4_0 {
                ("__vsub4(", ", 0x08080808u)")
            } else {
                ("(", ")")
            };
            let minv_expr = if f.format == QuantFormat::Q4_0 {
                "0.0f".to_string()
            } else {
                f.scale(1)
            };
            format!(
                "    (void)sub;\n    for (int i = 0; i < 4; i++) {{\n        const u32 w = {ld}(b + {qs} + 4 * i);\n        \
                 c.q[i] = {fix}w & 0x0F0F0F0Fu{minv};\n        c.q[4 + i] = {fix}(w >> 4) & 0x0F0F0F0Fu{minv};\n    }}\n    \
                 c.scale[0] = c.scale[1] = {d};\n    c.minv = {minv_expr};\n"
            )
        }
        QuantFormat::Q5_0 | QuantFormat::Q5_1 => {
            let q5_0 = f.format == QuantFormat::Q5_0;
            let (qh, qs) = if q5_0 {
                (f.byte(2), f.byte(6))
            } else {
                (f.byte(4), f.byte(8))
            };
            let (fix, close) = if q5_0 {
                ("__vsub4(", ", 0x10101010u)")
            } else {
                ("(", ")")
            };
            let minv_expr = if q5_0 { "0.0f".to_string() } else { f.scale(1) };
            format!(
                "    (void)sub;\n    const u32 qh = {ld}(b + {qh});\n    for (int i = 0; i < 4; i++) {{\n        \
                 const u32 w = {ld}(b + {qs} + 4 * i);\n        \
                 c.q[i] = {fix}(w & 0x0F0F0F0Fu) | spread_bit4((qh >> (4 * i)) & 0xFu){close};\n        \
                 c.q[4 + i] = {fix}((w >> 4) & 0x0F0F0F0Fu) | spread_bit4((qh >> (16 + 4 * i)) & 0xFu){close};\n    }}\n    \
                 c.scale[0] = c.scale[1] = {d};\n    c.minv = {minv_expr};\n"
            )
        }
        QuantFormat::Q8_0 => {
            let qs = f.byte(2);
            format!(
                "    (void)sub;\n    for (int i = 0; i < 8; i++) c.q[i] = {ld}(b + {qs} + 4 * i);\n    \
                 c.scale[0] = c.scale[1] = {d};\n    c.minv = 0.0f;\n"
            )
        }
        QuantFormat::Q4_K | QuantFormat::Q5_K => {
            let dmin = f.scale(1);
            let scales = f.byte(4);
            let (qh, qs) = if f.format == QuantFormat::Q5_K {
                (Some(f.byte(16)), f.byte(48))
            } else {
                (None, f.byte(16))
            };
            let high = match qh {
                Some(qh) => format!(
                    "        c.q[i] |= ((({ld}(b + {qh} + 4 * i)) >> sub) & 0x01010101u) << 4;\n"
                ),
                None => String::new(),
            };
            format!(
                "    // Sub-block `sub` is the low (even) or high (odd) nibbles of 32 bytes; ggml's 6-bit scale and\n    \
                 // minimum packing (`get_scale_min_k4`).\n    \
                 const u8* s = b + {scales};\n    int sc, m;\n    \
                 if (sub < 4) {{ sc = s[sub] & 63; m = s[sub + 4] & 63; }}\n    \
                 else {{ sc = (s[sub + 4] & 0xF) | ((s[sub - 4] >> 6) << 4); m = (s[sub + 4] >> 4) | ((s[sub] >> 6) << 4); }}\n    \
                 const int shift = 4 * (sub & 1);\n    for (int i = 0; i < 8; i++) {{\n        \
                 c.q[i] = ({ld}(b + {qs} + 32 * (sub >> 1) + 4 * i) >> shift) & 0x0F0F0F0Fu;\n{high}    }}\n    \
                 c.scale[0] = c.scale[1] = {d} * (float)sc;\n    c.minv = -({dmin} * (float)m);\n"
            )
        }
        QuantFormat::Q6_K => {
            let (ql, qh, scales) = (f.byte(0), f.byte(128), f.byte(192));
            format!(
                "    // Half n = sub / 4 of the block; quarter sub % 4 takes low or high nibbles of ql and bits 2 * (sub % 4)\n    \
                 // of qh; one i8 scale per 16 values.\n    \
                 const int n = sub >> 2, quarter = sub & 3;\n    \
                 const u8* ql = b + {ql} + 64 * n + 32 * (quarter & 1);\n    const u8* qh = b + {qh} + 32 * n;\n    \
                 const int shift = 4 * (quarter >> 1), hshift = 2 * quarter;\n    for (int i = 0; i < 8; i++) {{\n        \
                 const u32 lo = ({ld}(ql + 4 * i) >> shift) & 0x0F0F0F0Fu;\n        \
                 const u32 hi = (({ld}(qh + 4 * i) >> hshift) & 0x03030303u) << 4;\n        \
                 c.q[i] = __vsub4(lo | hi, 0x20202020u);\n    }}\n    \
                 const float d = {d};\n    const i8* sc = (const i8*)(b + {scales}) + 8 * n + 2 * quarter;\n    \
                 c.scale[0] = d * (float)sc[0];\n    c.scale[1] = d * (float)sc[1];\n    c.minv = 0.0f;\n"
            )
        }
        QuantFormat::TQ2_0 => {
            let qs = f.byte(0);
            format!(
                "    // Ternary digits as 2-bit codes (0, 1, 2 for -1, 0, +1): half sub / 4 of the block reads its 32 bytes\n    \
                 // at shift 2 * (sub % 4).\n    \
                 const u8* q = b + {qs} + 32 * (sub >> 2);\n    const int shift = 2 * (sub & 3);\n    \
                 for (int i = 0; i < 8; i++) c.q[i] = __vsub4(({ld}(q + 4 * i) >> shift) & 0x03030303u, 0x01010101u);\n    \
                 c.scale[0] = c.scale[1] = {d};\n    c.minv = 0.0f;\n"
            )
        }
        QuantFormat::TQ1_0 => {
            let qs = f.byte(0);
            format!(
                "    // Five base-3 digits per byte as the fraction ceil(q * 256 / 243): digit k of byte v is\n    \
                 // ((v * 3^k) mod 256) * 3 >> 8. Bytes 0..32 hold elements 32k + m, bytes 32..48 elements 160 + 16k + m,\n    \
                 // bytes 48..52 (qh) elements 240 + 4k + j.\n    \
                 const u8* q = b + {qs};\n    const u32 pow3[5] = {{1, 3, 9, 27, 81}};\n    \
                 for (int i = 0; i < 8; i++) c.q[i] = 0;\n    for (int i = 0; i < 32; i++) {{\n        \
                 const int e = 32 * sub + i;\n        int byte, k;\n        \
                 if (e < 160) {{ k = e / 32; byte = e % 32; }}\n        \
                 else if (e < 240) {{ k = (e - 160) / 16; byte = 32 + (e - 160) % 16; }}\n        \
                 else {{ k = (e - 240) / 4; byte = 48 + (e - 240) % 4; }}\n        \
                 const u32 digit = (((u32)q[byte] * pow3[k]) & 0xFFu) * 3 >> 8;\n        \
                 c.q[i >> 2] |= ((digit - 1) & 0xFFu) << (8 * (i & 3));\n    }}\n    \
                 c.scale[0] = c.scale[1] = {d};\n    c.minv = 0.0f;\n"
            )
        }
        other => unreachable!("no CUDA decoder for {other}"),
    }
}

/// A 2-bit table (for `table_weight`) of weight `n` of each index below `count`, as `weights` gives them.
fn weight_table<const N: usize>(count: u8, weights: impl Fn(u8) -> [i8; N], n: usize) -> String {
    let bits = (0..count).fold(0u32, |t, i| t | (((weights(i)[n] + 1) as u32) << (2 * i)));
    format!("0x{bits:07X}u")
}

/// TL1 and TL2 in kiln's row blocks (`kiln_ir::tl::row_blocks`): each index's weights come from 2-bit tables built
/// from `kiln_ir::tl`'s own decoding, so the C cannot drift from the reference. No block scale: the matmul applies
/// the tensor's.
fn tl_body(format: QuantFormat) -> String {
    let pair = |n| weight_table(tl::PAIR_INDEX_MAX + 1, tl::pair_weights, n);
    let pairs = format!("const u32 pair_tables[2] = {{{}, {}}};", pair(0), pair(1));
    let fill = "    for (int i = 0; i < 8; i++) c.q[i] = 0;\n";
    let finish = "    c.scale[0] = c.scale[1] = 1.0f;\n    c.minv = 0.0f;\n";
    if format == QuantFormat::TL1 {
        return format!(
            "    // Byte 16h + j holds pair 2h in its high nibble and pair 2h + 1 in its low one; pair `sub` is elements\n    \
             // 32 sub + j (its first weights) and 32 sub + 16 + j (its second).\n    \
             {pairs}\n    const u8* p = b + 16 * (sub >> 1);\n    const int shift = (sub & 1) ? 0 : 4;\n{fill}    \
             for (int j = 0; j < 16; j++) {{\n        const u32 index = (p[j] >> shift) & 0xFu;\n        \
             for (int n = 0; n < 2; n++) c.q[4 * n + (j >> 2)] |= table_weight(pair_tables[n], index) << (8 * (j & 3));\n    \
             }}\n{finish}"
        );
    }
    let triple = |n| {
        weight_table(
            tl::TRIPLE_INDEX_MAX + 1,
            |i| tl::triple_weights(i, false),
            n,
        )
    };
    format!(
        "    // Subs 0, 1, 2: byte j < 16 holds triple (j, 16 + j, 32 + j) in its high nibble (group 0) and (48 + j,\n    \
         // 64 + j, 80 + j) in its low one (group 1), negated where bit 16 group + j of the u32 at byte 16 is set.\n    \
         // Sub 3: byte 20 + j (j < 8) holds pair (96 + j, 112 + j) high and (104 + j, 120 + j) low.\n    \
         const u32 triple_tables[3] = {{{}, {}, {}}};\n    {pairs}\n    const u32 signs = ld_a32(b + 16);\n{fill}    \
         for (int half = 0; half < 2; half++) {{\n        \
         for (int j = 0; j < 16; j++) {{\n            u32 w;\n            if (sub < 3) {{\n                \
         const int e = 32 * sub + 16 * half, group = e / 48;\n                \
         const u32 index = (b[j] >> (group ? 0 : 4)) & 0xFu;\n                \
         w = table_weight(triple_tables[(e % 48) / 16], index);\n                \
         if ((signs >> (16 * group + j)) & 1u) w = (0u - w) & 0xFFu;\n            }} else {{\n                \
         const u32 index = (b[20 + (j & 7)] >> ((j & 8) ? 0 : 4)) & 0xFu;\n                \
         w = table_weight(pair_tables[half], index);\n            }}\n            \
         c.q[4 * half + (j >> 2)] |= w << (8 * (j & 3));\n        }}\n    }}\n{finish}",
        triple(0),
        triple(1),
        triple(2),
    )
}
