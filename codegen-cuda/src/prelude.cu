// kiln CUDA prelude, part 2 (after `codes.cu`): the device helpers every kernel shares. NVRTC has no CUDA headers
// built in, so half-precision conversions go through inline PTX.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The maximum of `v` over the whole block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial_max[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) partial_max[warp] = v;
    __syncthreads();
    float m = partial_max[0];
    for (int w = 1; w < warps; w++) m = fmaxf(m, partial_max[w]);
    __syncthreads();
    return m;
}

// The sum of `v` over the whole block (blockDim.x a multiple of 32, at most 1024), in f64, returned to every thread.
__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double partial[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    v = warp_sum_f64(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < warps; w++) total += partial[w];
    __syncthreads();
    return total;
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Rounds to the nearest f16 value (ties to even) and back.
__device__ __forceinline__ float round_f16(float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return f16_to_f32(h);
}

// Rounds to the nearest bf16 value (ties to even) and back.
__device__ __forceinline__ float round_bf16(float x) {
    u32 b = __float_as_uint(x);
    b += 0x7FFFu + ((b >> 16) & 1u);
    return __uint_as_float(b & 0xFFFF0000u);
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ float relu_sqr(float x) { return x > 0.0f ? x * x : 0.0f; }

// GELU, tanh approximation (as ggml and `gelu_pytorch_tanh`).
__device__ __forceinline__ float gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978846f * x * (1.0f + 0.044715f * x * x)));
}

// The dot product of decoded weights with 32 activation codes (`x` 4-byte aligned) whose block scale is `dx` and
// whose two group sums (of 16 codes each) are `s0`, `s1`.
__device__ __forceinline__ float dot_codes(const Codes32& w, const u8* x, float dx, int s0, int s1) {
    int lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) lo = __dp4a((int)w.q[i], (int)ld_a32(x + 4 * i), lo);
#pragma unroll
    for (int i = 4; i < 8; i++) hi = __dp4a((int)w.q[i], (int)ld_a32(x + 4 * i), hi);
    return dx * (w.scale[0] * (float)lo + w.scale[1] * (float)hi) + w.minv * dx * (float)(s0 + s1);
}

