// kiln CUDA prelude, part 1: fixed-width types, block-field loads and decoded codes. Only plain C++ and the CUDA
// intrinsics `__uint_as_float` and `__vsub4`, so the format decoders compile on the host too, where the tests check
// them against kiln-ir's reference dequantizers without a GPU (`tests/host_decoders.rs`).
typedef unsigned char u8;
typedef signed char i8;
typedef short i16;
typedef unsigned short u16;
typedef int i32;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Loads for block fields: `a` forms need 4-byte alignment, `u` forms take any address (GGUF-layout blocks).
__device__ __forceinline__ u32 ld_a32(const u8* p) { return *(const u32*)p; }
__device__ __forceinline__ u32 ld_u32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}
__device__ __forceinline__ u16 ld_u16(const u8* p) { return (u16)(p[0] | (p[1] << 8)); }
__device__ __forceinline__ float ld_f32(const u8* p) { return __uint_as_float(ld_u32(p)); }

// Spreads 4 bits to bit 4 of each byte of a word (the fifth bit of Q5 codes).
__device__ __forceinline__ u32 spread_bit4(u32 b) {
    return ((b & 1u) << 4) | ((b & 2u) << 11) | ((b & 4u) << 18) | ((b & 8u) << 25);
}

// Block-format weights are decoded 32 values at a time into signed byte codes: value i is
// `scale[i / 16] * code[i] + minv`, which covers every format's scales, offsets and minimums.
struct Codes32 {
    u32 q[8];
    float scale[2];
    float minv;
};

// Value i of decoded weights.
__device__ __forceinline__ float code_value(const Codes32& w, int i) {
    const int code = (int)(i8)(w.q[i >> 2] >> (8 * (i & 3)));
    return w.scale[i >> 4] * (float)code + w.minv;
}

// Weight `i` (as a signed byte) of a 2-bit table: the TL formats' decoders keep `weight + 1` of each index there.
__device__ __forceinline__ u32 table_weight(u32 table, u32 i) { return (((table >> (2 * i)) & 3u) - 1u) & 0xFFu; }
