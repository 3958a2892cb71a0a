// Shared helpers for keel-serving's kernels: dtype conversion, f16 rounding and block-wide
// reductions. Every kernel computes in f32 and converts on load and store, so the f32 and
// bf16 instantiations share one body.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round to nearest even, as the CPU reference (half::bf16::from_f32) does.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Rounds through f16 and back, as the CPU engine does to K, V, Q and attention
// probabilities for parity with llama.cpp (which stores them as f16).
__device__ __forceinline__ float round_f16(float x) { return __half2float(__float2half_rn(x)); }

// `rounding` arguments: 0 = none, 1 = round through f16 (matches reference::Rounding).
__device__ __forceinline__ float apply_rounding(float x, int rounding) {
    return rounding == 1 ? round_f16(x) : x;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// A reduction over the whole block; every thread receives the result. blockDim.x must be a
// multiple of 32 and at most 1024; `scratch` is shared memory for at least 32 values. The
// leading barrier lets callers reuse `scratch` for consecutive reductions.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T identity, T* scratch, Op op) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T r = lane < warps ? scratch[lane] : identity;
    for (int o = 16; o > 0; o >>= 1) r = op(r, __shfl_xor_sync(0xffffffffu, r, o));
    return r;
}

struct SumOp {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinU64Op {
    __device__ __forceinline__ unsigned long long operator()(unsigned long long a,
                                                             unsigned long long b) const {
        return a < b ? a : b;
    }
};

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    return block_reduce<float>(v, 0.0f, scratch, SumOp());
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    return block_reduce<float>(v, -INFINITY, scratch, MaxOp());
}
