//! The small ops: RMSNorm, RoPE, the KV-cache append, attention and elementwise kernels. They move a few KB per
//! token, next to the megabytes of weights the matmuls stream, so they favour clarity and exact agreement with
//! the CPU executor's math (f64 sums of squares, angles in f64) over speed.

use kiln_ir::cuda_abi::{ElementOp, ATTENTION_THREADS, ATTENTION_TILE, ROW_THREADS};
use kiln_ir::RopeStyle;

pub fn rms_norm(name: &str, d: usize) -> String {
    format!(
        "// RMSNorm of rows of {d} values (plus a residual row when `residual` is set); may run in place.\n\
         extern \"C\" __global__ void __launch_bounds__({ROW_THREADS}) {name}(u64 x_, u64 x_stride, u64 gain_, u64 residual_,\n        \
         u64 residual_stride, u64 out_, u64 out_stride, float eps) {{\n    \
         const u64 row = (u64)blockIdx.y * {d};\n    const float* x = (const float*)x_ + blockIdx.x * x_stride + row;\n    \
         const float* gain = (const float*)gain_;\n    float* out = (float*)out_ + blockIdx.x * out_stride + row;\n    \
         const float* residual = residual_ ? (const float*)residual_ + blockIdx.x * residual_stride + row : 0;\n    \
         double ss = 0.0;\n    for (int i = threadIdx.x; i < {d}; i += blockDim.x) {{ const double v = x[i]; ss += v * v; }}\n    \
         ss = block_sum_f64(ss);\n    const float scale = 1.0f / sqrtf((float)(ss / {d}.0) + eps);\n    \
         for (int i = threadIdx.x; i < {d}; i += blockDim.x) {{\n        const float v = (x[i] * scale) * gain[i];\n        \
         out[i] = residual ? residual[i] + v : v;\n    }}\n}}\n"
    )
}

pub fn rope(name: &str, style: RopeStyle, head_dim: usize, dims: usize) -> String {
    let half = dims / 2;
    let pair = match style {
        RopeStyle::Interleaved => "2 * i, b = 2 * i + 1",
        RopeStyle::Neox => "i, b = i + HALF",
    }
    .replace("HALF", &half.to_string());
    format!(
        "// RoPE ({style}) of heads of {head_dim} values over the first {dims}: pair i turns by\n\
         // pos * freq_scale * base^(-2i / {dims}), the angle in f64 and its sine and cosine rounded to f32.\n\
         extern \"C\" __global__ void __launch_bounds__({half}) {name}(u64 x_, u64 token_stride, u64 positions_, float base,\n        \
         float freq_scale) {{\n    \
         float* h = (float*)x_ + blockIdx.x * token_stride + (u64)blockIdx.y * {head_dim};\n    \
         const int pos = ((const int*)positions_)[blockIdx.x];\n    const int i = threadIdx.x;\n    \
         const double angle = (double)pos * (double)freq_scale * pow((double)base, -2.0 * i / {dims}.0);\n    \
         double s, c;\n    sincos(angle, &s, &c);\n    const float sf = (float)s, cf = (float)c;\n    \
         const int a = {pair};\n    const float x0 = h[a], x1 = h[b];\n    \
         h[a] = x0 * cf - x1 * sf;\n    h[b] = x0 * sf + x1 * cf;\n}}\n",
        style = style.name(),
    )
}

pub fn kv_append(name: &str, width: usize) -> String {
    format!(
        "// Appends each token's {width} keys and values to the layer's cache at its position.\n\
         extern \"C\" __global__ void __launch_bounds__({ROW_THREADS}) {name}(u64 k_, u64 v_, u64 src_stride, u64 positions_,\n        \
         u64 k_cache_, u64 v_cache_) {{\n    \
         const u64 pos = (u64)((const int*)positions_)[blockIdx.x];\n    \
         const float* k = (const float*)k_ + blockIdx.x * src_stride;\n    const float* v = (const float*)v_ + blockIdx.x * src_stride;\n    \
         float* kc = (float*)k_cache_ + pos * {width};\n    float* vc = (float*)v_cache_ + pos * {width};\n    \
         for (int i = threadIdx.x; i < {width}; i += blockDim.x) {{ kc[i] = k[i]; vc[i] = v[i]; }}\n}}\n"
    )
}

pub fn attention(name: &str, head_dim: usize, group: usize) -> String {
    let threads = ATTENTION_THREADS;
    let tile = ATTENTION_TILE;
    // Each thread owns `dims` output dims for one of `groups` interleaved key subsets.
    let dims = head_dim.div_ceil(threads as usize);
    let groups = (threads as usize / head_dim).max(1);
    format!(
        "// Causal attention of one (token, head) over the cached keys up to its position (within `window` when\n\
         // positive), {group} query heads per KV head. Keys go in tiles of {tile}: every thread scores whole keys\n\
         // (the dot products run in parallel, not one warp reduction per key), the block takes the tile's maximum\n\
         // and sum (an online softmax across tiles), then each thread accumulates {dims} output dim(s) over one of\n\
         // {groups} interleaved key subsets, merged at the end.\n\
         extern \"C\" __global__ void __launch_bounds__({threads}) {name}(u64 q_, u64 q_stride, u64 k_cache_, u64 v_cache_,\n        \
         u64 positions_, u64 out_, int kv_heads, float scale, int window) {{\n    \
         __shared__ float qs[{head_dim}];\n    __shared__ float p[{tile}];\n    __shared__ float reduce[32];\n    \
         __shared__ float merge[{groups}][{head_dim}];\n    \
         const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;\n    \
         const int t = blockIdx.x, h = blockIdx.y, heads = gridDim.y;\n    \
         const int pos = ((const int*)positions_)[t];\n    const int first = window > 0 ? max(0, pos + 1 - window) : 0;\n    \
         const u64 kv_width = (u64)kv_heads * {head_dim};\n    \
         const float* kc = (const float*)k_cache_ + (h / {group}) * {head_dim};\n    \
         const float* vc = (const float*)v_cache_ + (h / {group}) * {head_dim};\n    \
         const float* q = (const float*)q_ + t * q_stride + (u64)h * {head_dim};\n    \
         for (int d = tid; d < {head_dim}; d += blockDim.x) qs[d] = q[d];\n    \
         const int g = tid / {head_dim} % {groups}, e0 = tid % {head_dim};\n    \
         float acc[{dims}];\n    for (int i = 0; i < {dims}; i++) acc[i] = 0.0f;\n    \
         float m = -__int_as_float(0x7f800000), l = 0.0f;\n    __syncthreads();\n    \
         for (int start = first; start <= pos; start += {tile}) {{\n        const int n = min({tile}, pos + 1 - start);\n        \
         float local = -__int_as_float(0x7f800000);\n        for (int i = tid; i < n; i += blockDim.x) {{\n            \
         const float4* kj = (const float4*)(kc + (u64)(start + i) * kv_width);\n            float s = 0.0f;\n#pragma unroll 8\n            \
         for (int d = 0; d < {quads}; d++) {{\n                const float4 k4 = kj[d];\n                \
         s += qs[4 * d] * k4.x + qs[4 * d + 1] * k4.y + qs[4 * d + 2] * k4.z + qs[4 * d + 3] * k4.w;\n            }}\n            \
         p[i] = s * scale;\n            local = fmaxf(local, s * scale);\n        }}\n        \
         local = warp_max(local);\n        if (lane == 0) reduce[warp] = local;\n        __syncthreads();\n        \
         float top = reduce[0];\n        for (int w = 1; w < warps; w++) top = fmaxf(top, reduce[w]);\n        \
         const float m2 = fmaxf(m, top), correction = expf(m - m2);\n        __syncthreads();\n        \
         float sum = 0.0f;\n        for (int i = tid; i < n; i += blockDim.x) {{ const float e = expf(p[i] - m2); p[i] = e; sum += e; }}\n        \
         sum = warp_sum(sum);\n        if (lane == 0) reduce[warp] = sum;\n        __syncthreads();\n        \
         float tile_sum = 0.0f;\n        for (int w = 0; w < warps; w++) tile_sum += reduce[w];\n        l = l * correction + tile_sum;\n        \
         for (int i = 0; i < {dims}; i++) {{\n            const int e = e0 + i * blockDim.x;\n            float a = acc[i] * correction;\n            \
         if (e < {head_dim}) {{\n#pragma unroll 8\n                for (int j = g; j < n; j += {groups}) a += p[j] * vc[(u64)(start + j) * kv_width + e];\n            }}\n            \
         acc[i] = a;\n        }}\n        m = m2;\n        __syncthreads();\n    }}\n    \
         for (int i = 0; i < {dims}; i++) {{ const int e = e0 + i * blockDim.x; if (e < {head_dim}) merge[g][e] = acc[i]; }}\n    \
         __syncthreads();\n    float* out = (float*)out_ + ((u64)t * heads + h) * {head_dim};\n    \
         for (int e = tid; e < {head_dim}; e += blockDim.x) {{\n        float v = 0.0f;\n        \
         for (int k = 0; k < {groups}; k++) v += merge[k][e];\n        out[e] = v / l;\n    }}\n}}\n",
        quads = head_dim / 4,
    )
}

pub fn elementwise(name: &str, op: ElementOp) -> String {
    // Each activation is a prelude function of the same name.
    let expr = match op {
        ElementOp::Add => "a[i] + b[i % b_len]".to_string(),
        ElementOp::Mul => "a[i] * b[i % b_len]".to_string(),
        ElementOp::Scale => "a[i] * factor".to_string(),
        ElementOp::Act(act) => format!("{}(a[i])", act.name()),
        ElementOp::Copy => "a[i]".to_string(),
        ElementOp::Gate(act) => format!("{}(a[i]) * b[i]", act.name()),
    };
    format!(
        "// out[i] = {expr}\n\
         extern \"C\" __global__ void __launch_bounds__({ROW_THREADS}) {name}(u64 a_, u64 b_, u64 out_, int n, int b_len,\n        \
         float factor) {{\n    \
         const float* a = (const float*)a_;\n    const float* b = (const float*)b_;\n    (void)b; (void)b_len; (void)factor;\n    \
         const int i = blockIdx.x * blockDim.x + threadIdx.x;\n    if (i < n) ((float*)out_)[i] = {expr};\n}}\n"
    )
}
