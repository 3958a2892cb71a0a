// Rotary position embedding, in place on a [tokens, heads, head_dim] tensor (Q or K), with
// the f16 rounding the engine applies afterwards fused in.
#include "common.cuh"

// One thread per rotated pair. style 0 = interleaved pairs (2i, 2i+1), 1 = halves (i, i+d/2).
// cos/sin are [positions, head_dim/2] f32 tables; positions were checked against the tables'
// length on the host.
template <typename T>
__device__ void rope(T* __restrict__ x, const uint32_t* __restrict__ pos,
                     const float* __restrict__ cos_t, const float* __restrict__ sin_t, int tokens,
                     int heads, int head_dim, int style, int rounding) {
    const int half = head_dim / 2;
    const size_t total = (size_t)tokens * heads * half;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const size_t th = idx / half;
        const size_t t = th / heads;
        T* row = x + th * head_dim;
        const int ia = style == 0 ? 2 * i : i;
        const int ib = style == 0 ? 2 * i + 1 : i + half;
        const size_t at = (size_t)pos[t] * half + i;
        const float c = cos_t[at];
        const float s = sin_t[at];
        const float a = to_f32(row[ia]);
        const float b = to_f32(row[ib]);
        const float ra = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        const float rb = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
        row[ia] = from_f32<T>(apply_rounding(ra, rounding));
        row[ib] = from_f32<T>(apply_rounding(rb, rounding));
    }
}

extern "C" __global__ void rope_f32(float* x, const uint32_t* pos, const float* cos_t,
                                    const float* sin_t, int tokens, int heads, int head_dim,
                                    int style, int rounding) {
    rope<float>(x, pos, cos_t, sin_t, tokens, heads, head_dim, style, rounding);
}

extern "C" __global__ void rope_bf16(bf16* x, const uint32_t* pos, const float* cos_t,
                                     const float* sin_t, int tokens, int heads, int head_dim,
                                     int style, int rounding) {
    rope<bf16>(x, pos, cos_t, sin_t, tokens, heads, head_dim, style, rounding);
}
